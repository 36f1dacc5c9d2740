//! The lab: a Kubernetes node built on this machine from network namespaces.
//!
//! A node is a network namespace standing in for the node's root namespace,
//! with IP forwarding and its own cgroup v2 root. A pod is a network namespace
//! behind a veth whose host side is named as Calico names it (`cali` + 11 hex
//! digits), with a /32 (and /128) route on the node and proxy ARP, the way
//! Calico wires pods; its processes run in a cgroup shaped like kubelet's
//! (`kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<UID>.slice/
//! cri-containerd-<ID>.scope`). Listeners and probes run inside the pods.
//!
//! Everything a lab creates carries its run id (`<pid>-<seq>`), so labs run
//! side by side, and is removed when the [`Lab`] is dropped: on return, on
//! panic, and (for `cargo xtask lab`) on Ctrl-C. Labs whose process died
//! without cleaning up are swept by the next one.

pub mod datapath;
pub mod enforce;
pub mod flood;
pub mod manifests;
pub mod probe;
pub mod scenario;
pub mod serve;
pub mod services;
pub mod spec;
pub mod system;
pub mod tcprog;

use std::{
    ffi::CString,
    fs,
    io::{BufRead, BufReader},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

pub use enforce::{Direction, EnforceOptions, LabCluster, PodMatch, PodPlacement};
pub use manifests::Manifests;
pub use probe::{Outcome, Probe, ProbeResult};
pub use spec::{Datapath, LabSpec, NodeSpec, PodSpec, Proto};
pub use system::{ChildGuard, LabError, kernel_version, slowed};

/// A stand-in CNI program on lab interfaces ([`Lab::attach_foreign_tc`]):
/// attached while this lives (tcx), its kernel program ids for stats.
pub struct ForeignTc {
    pub program_ids: Vec<u32>,
    _holder: ChildGuard,
}
use system::{io, ip_batch, run, run_with_input, sysctl_in};

static SEQ: AtomicU32 = AtomicU32::new(0);
const NETNS_PREFIX: &str = "nwl-";
const CGROUP_PREFIX: &str = "netwatch-lab-";

/// A lab node as built.
#[derive(Clone, Debug)]
pub struct LabNode {
    pub name: String,
    pub netns: String,
    /// The node's address on the underlay (its InternalIP).
    pub ip: std::net::Ipv4Addr,
    pub uplink_v6: std::net::Ipv6Addr,
    /// This node's cgroup v2 root (what the agent attaches sock_ops to).
    pub cgroup_root: PathBuf,
}

/// A lab pod as built.
#[derive(Clone, Debug)]
pub struct LabPod {
    pub spec: PodSpec,
    pub netns: String,
    /// Host-side interface in the node's namespace (empty for hostNetwork).
    pub host_if: String,
    /// The container's cgroup directory.
    pub cgroup: PathBuf,
    pub uid: String,
    pub container_id: String,
}

/// A running lab. Dropping it tears everything down.
pub struct Lab {
    pub id: String,
    /// The world router: every node's uplink, the underlay between nodes,
    /// and the outside world.
    pub world: String,
    helper: PathBuf,
    cgroup_mount: PathBuf,
    pub nodes: Vec<LabNode>,
    pub pods: Vec<LabPod>,
    children: Vec<Child>,
    created_netns: Vec<String>,
    created_cgroups: Vec<PathBuf>,
    /// The CNI datapath family the nodes emulate.
    pub datapath: Datapath,
    /// Per node, the process holding its eBPF datapath's tcx links.
    ebpf: std::sync::Mutex<std::collections::BTreeMap<String, ChildGuard>>,
    /// Each node's Open vSwitch (ovs datapath), by node name.
    switches: Vec<(String, datapath::ovs::OvsSwitch)>,
}

impl Lab {
    /// Build `spec`. `helper` is the `netwatch-lab` binary (it runs the in-pod
    /// listeners and probes as `netwatch-lab`).
    pub fn up(spec: &LabSpec, helper: &Path) -> Result<Lab, LabError> {
        if !system::is_root() {
            return Err(LabError::NotRoot);
        }
        sweep_stale();
        let cgroup_mount = cgroup2_mount().ok_or_else(|| {
            LabError::Spec("no cgroup v2 mount at /sys/fs/cgroup or /sys/fs/cgroup/unified".into())
        })?;
        let id = format!(
            "{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let mut lab = Lab {
            world: format!("{NETNS_PREFIX}{id}-world"),
            id,
            helper: helper.to_path_buf(),
            cgroup_mount,
            nodes: Vec::new(),
            pods: Vec::new(),
            children: Vec::new(),
            created_netns: Vec::new(),
            created_cgroups: Vec::new(),
            datapath: spec.datapath,
            ebpf: Default::default(),
            switches: Vec::new(),
        };
        // On error, `lab` is dropped here and removes what was built so far.
        lab.build(spec)?;
        Ok(lab)
    }

    fn build(&mut self, spec: &LabSpec) -> Result<(), LabError> {
        if spec.nodes.is_empty() {
            return Err(LabError::Spec("a lab needs at least one node".into()));
        }
        match spec.datapath {
            Datapath::Routed | Datapath::Ebpf | Datapath::Ovs => {}
            Datapath::Bridge => datapath::bridge::validate(&spec.pods)?,
        }
        let world = self.world.clone();
        self.netns_add(&world)?;
        sysctl_in(
            &world,
            &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
        )?;
        for n in &spec.nodes {
            self.add_node(n)?;
            if spec.datapath == Datapath::Bridge {
                let k = self.nodes.len();
                let cidrs = datapath::bridge::node_cidrs(&spec.pods, &n.name);
                datapath::bridge::wire_node(&self.nodes[k - 1], k, cidrs)?;
            }
        }
        for p in &spec.pods {
            self.add_pod(p)?;
        }
        if spec.datapath == Datapath::Bridge {
            let cidrs: Vec<_> = spec
                .nodes
                .iter()
                .enumerate()
                .map(|(i, n)| (i + 1, datapath::bridge::node_cidrs(&spec.pods, &n.name)))
                .collect();
            datapath::bridge::join_nodes(self, &cidrs)?;
        }
        self.add_world_listeners(&spec.world)?;
        for n in &spec.nodes {
            for r in &n.routes {
                let netns = self.node(&n.name)?.netns.clone();
                let mut args = vec!["-n", netns.as_str(), "route", "add"];
                args.extend(r.split_whitespace());
                run("ip", &args)?;
            }
            if let Some(rules) = &n.nftables {
                self.nft(&n.name, rules)?;
            }
        }
        match self.datapath {
            Datapath::Ebpf => self.ebpf_wire(),
            Datapath::Routed | Datapath::Bridge | Datapath::Ovs => Ok(()),
        }
    }

    fn add_node(&mut self, n: &NodeSpec) -> Result<(), LabError> {
        let netns = format!("{NETNS_PREFIX}{}-{}", self.id, sanitize(&n.name));
        self.netns_add(&netns)?;
        sysctl_in(
            &netns,
            &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
        )?;
        // The node's uplink to the world router: a default route out of another
        // interface is also what makes proxy ARP answer pods' requests for
        // their gateway, as on a real node.
        let k = self.nodes.len() + 1;
        let world_if = format!("node{k}");
        run(
            "ip",
            &[
                "link",
                "add",
                "uplink0",
                "netns",
                &netns,
                "type",
                "veth",
                "peer",
                "name",
                &world_if,
                "netns",
                &self.world,
            ],
        )?;
        ip_batch(
            &netns,
            &[
                format!("addr add 100.64.{k}.2/30 dev uplink0"),
                format!("addr add fd64:0:0:{k}::2/64 dev uplink0 nodad"),
                "link set uplink0 up".into(),
                format!("route add default via 100.64.{k}.1"),
                format!("route add ::/0 via fd64:0:0:{k}::1"),
            ],
        )?;
        ip_batch(
            &self.world,
            &[
                format!("addr add 100.64.{k}.1/30 dev {world_if}"),
                format!("addr add fd64:0:0:{k}::1/64 dev {world_if} nodad"),
                format!("link set {world_if} up"),
            ],
        )?;
        if self.datapath == Datapath::Ovs {
            let dir = std::env::temp_dir().join(format!(
                "{NETNS_PREFIX}{}-{}-ovs",
                self.id,
                sanitize(&n.name)
            ));
            let switch = datapath::ovs::OvsSwitch::start(&netns, &dir)?;
            self.switches.push((n.name.clone(), switch));
        }
        let cgroup_root =
            self.cgroup_mount
                .join(format!("{CGROUP_PREFIX}{}-{}", self.id, sanitize(&n.name)));
        self.mkdir_cgroup(&cgroup_root.join("kubepods.slice/kubepods-besteffort.slice"))?;
        self.nodes.push(LabNode {
            name: n.name.clone(),
            netns,
            cgroup_root,
            ip: format!("100.64.{k}.2")
                .parse()
                .map_err(|_| LabError::Spec("node address".into()))?,
            uplink_v6: format!("fd64:0:0:{k}::2")
                .parse()
                .map_err(|_| LabError::Spec("node address".into()))?,
        });
        Ok(())
    }

    /// Wire pod `p` as its datapath's CNI does on ADD (also on a lab that is
    /// up: churn).
    pub fn add_pod(&mut self, p: &PodSpec) -> Result<(), LabError> {
        let node = self.node(&p.node)?.clone();
        let listeners = p.listeners().map_err(LabError::Spec)?;
        if self.pods.iter().any(|q| q.spec.id() == p.id()) {
            return Err(LabError::Spec(format!("pod {} is declared twice", p.id())));
        }
        let uid = p.uid.clone().unwrap_or_else(random_uuid);
        let container_id = random_hex(64);
        let (netns, host_if) = if p.host_network {
            (node.netns.clone(), String::new())
        } else {
            let netns = format!(
                "{NETNS_PREFIX}{}-{}-{}",
                self.id,
                sanitize(&p.namespace),
                sanitize(&p.name)
            );
            let hash = format!("{:016x}", fnv1a(&format!("{}/{}", self.id, p.id())));
            self.netns_add(&netns)?;
            let host_if = match self.datapath {
                Datapath::Bridge => {
                    // flannel's bridge plugin names host veths veth + 8 hex digits.
                    let host_if = format!("veth{}", &hash[..8]);
                    let cidrs = datapath::bridge::node_cidrs(std::slice::from_ref(p), &p.node);
                    datapath::bridge::wire_pod(&node, &netns, &host_if, p, cidrs)?;
                    host_if
                }
                Datapath::Ovs => {
                    let host_if = datapath::ovs::host_if_name(p, &hash);
                    let world = self.world.clone();
                    let switch = self
                        .switches
                        .iter_mut()
                        .find(|(n, _)| *n == node.name)
                        .map(|(_, s)| s)
                        .ok_or_else(|| LabError::Spec(format!("node {}: no switch", node.name)))?;
                    datapath::ovs::wire_pod(&node, &world, &netns, &host_if, p, switch)?;
                    host_if
                }
                Datapath::Routed | Datapath::Ebpf => {
                    let host_if = datapath::routed::host_if_name(&hash);
                    datapath::routed::wire_pod(&node, &self.world, &netns, &host_if, p)?;
                    host_if
                }
            };
            (netns, host_if)
        };
        let cgroup = node
            .cgroup_root
            .join("kubepods.slice/kubepods-besteffort.slice")
            .join(format!(
                "kubepods-besteffort-pod{}.slice",
                uid.replace('-', "_")
            ))
            .join(format!("cri-containerd-{container_id}.scope"));
        self.mkdir_cgroup(&cgroup)?;
        let pod = LabPod {
            spec: p.clone(),
            netns,
            host_if,
            cgroup,
            uid,
            container_id,
        };
        if !listeners.is_empty() {
            let cmd = self.in_pod(&pod, &self.helper);
            self.serve(
                cmd,
                &p.listen.join(","),
                p.id(),
                format!("in pod {}", p.id()),
            )?;
        }
        self.pods.push(pod);
        Ok(())
    }

    /// Delete pod `id` (`namespace/name`) as a CNI's DEL and the kubelet do:
    /// its network namespace (and so its veth and the node's routes through
    /// it), its route on the underlay, its cgroup. Routed, eBPF and bridge
    /// datapaths; not a pod with listeners (they would outlive it).
    pub fn remove_pod(&mut self, id: &str) -> Result<(), LabError> {
        let i = self
            .pods
            .iter()
            .position(|p| p.spec.id() == id)
            .ok_or_else(|| LabError::Spec(format!("remove_pod: no pod {id}")))?;
        if self.datapath == Datapath::Ovs {
            return Err(LabError::Spec(format!(
                "remove_pod {id}: the ovs datapath does not remove switch ports"
            )));
        }
        if !self.pods[i].spec.listen.is_empty() {
            return Err(LabError::Spec(format!(
                "remove_pod {id}: it has listeners, which would outlive it"
            )));
        }
        let pod = self.pods.remove(i);
        if !pod.spec.host_network {
            if matches!(self.datapath, Datapath::Routed | Datapath::Ebpf) {
                let node = self.node(&pod.spec.node)?.clone();
                let mut cmds = vec![format!("route del {}/32 via {}", pod.spec.ip, node.ip)];
                if let Some(v6) = pod.spec.ipv6 {
                    cmds.push(format!("route del {v6}/128 via {}", node.uplink_v6));
                }
                ip_batch(&self.world, &cmds)?;
            }
            run("ip", &["netns", "del", &pod.netns])?;
            self.created_netns.retain(|n| *n != pod.netns);
        }
        let slice = pod.cgroup.parent().map(Path::to_path_buf);
        for dir in std::iter::once(pod.cgroup.clone()).chain(slice) {
            remove_cgroup(&dir);
            self.created_cgroups.retain(|d| *d != dir);
        }
        Ok(())
    }

    /// Run `netwatch-lab serve --listen listen` through `cmd` (already set to
    /// enter the pod or router) and wait until it says it is ready. The
    /// listener is a child of the lab: killed at teardown.
    fn serve(
        &mut self,
        mut cmd: Command,
        listen: &str,
        pod: String,
        place: String,
    ) -> Result<(), LabError> {
        cmd.args(["serve", "--listen", listen])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .map_err(io(format!("starting listeners {place}")))?;
        let ready = child.stdout.take().map(|out| {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            line.trim() == "ready"
        });
        self.children.push(child);
        if ready != Some(true) {
            return Err(LabError::Helper {
                pod,
                detail: format!("listeners {listen} did not start"),
            });
        }
        Ok(())
    }

    /// Addresses and listeners on the world router.
    fn add_world_listeners(&mut self, listeners: &[String]) -> Result<(), LabError> {
        if listeners.is_empty() {
            return Ok(());
        }
        let mut listen = Vec::new();
        let mut cmds = Vec::new();
        for l in listeners {
            let bad = || {
                LabError::Spec(format!(
                    "world listener {l:?}: write ip:port/tcp, e.g. 198.51.100.10:443/tcp"
                ))
            };
            let (addr, proto) = l.split_once('/').unwrap_or((l.as_str(), "tcp"));
            let sock: std::net::SocketAddr = addr.parse().map_err(|_| bad())?;
            let prefix = if sock.is_ipv4() { 32 } else { 128 };
            let cmd = format!("addr add {}/{prefix} dev lo", sock.ip());
            if !cmds.contains(&cmd) {
                cmds.push(cmd);
            }
            listen.push(format!("{}/{proto}", sock.port()));
        }
        ip_batch(&self.world, &cmds)?;
        let cmd = enter(&self.helper, Some(&self.world), None);
        self.serve(
            cmd,
            &listen.join(","),
            "world".into(),
            "on the world router".into(),
        )
    }

    /// Node `name`'s Open vSwitch (ovs datapath only).
    pub fn switch(&self, name: &str) -> Result<&datapath::ovs::OvsSwitch, LabError> {
        self.switches
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s)
            .ok_or_else(|| {
                LabError::Spec(format!(
                    "node {name:?} has no Open vSwitch (datapath is {})",
                    self.datapath
                ))
            })
    }

    pub fn node(&self, name: &str) -> Result<&LabNode, LabError> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| LabError::Spec(format!("no lab node named {name:?}")))
    }

    /// A pod by `namespace/name` (or just `name` when unambiguous).
    pub fn pod(&self, id: &str) -> Result<&LabPod, LabError> {
        let matches: Vec<&LabPod> = self
            .pods
            .iter()
            .filter(|p| p.spec.id() == id || (!id.contains('/') && p.spec.name == id))
            .collect();
        match matches.as_slice() {
            [p] => Ok(p),
            [] => Err(LabError::Spec(format!("no lab pod {id:?}"))),
            _ => Err(LabError::Spec(format!(
                "pod name {id:?} is ambiguous: use namespace/name"
            ))),
        }
    }

    /// A command that runs `program` inside `pod`: its network namespace and
    /// its container cgroup.
    pub fn in_pod(&self, pod: &LabPod, program: &Path) -> Command {
        enter(program, Some(&pod.netns), Some(&pod.cgroup))
    }

    /// A command that runs `program` in a node's network namespace (where the
    /// node's agent runs).
    pub fn on_node(&self, node: &str, program: &Path) -> Result<Command, LabError> {
        Ok(enter(program, Some(&self.node(node)?.netns), None))
    }

    /// The TC programs on `interface` of `node`, in the order they run.
    pub fn tc_programs(&self, node: &str, interface: &str) -> Result<tcprog::TcPrograms, LabError> {
        let out = self
            .on_node(node, &self.helper)?
            .args(["tc-list", "--interface", interface])
            .output()
            .map_err(|e| LabError::Spec(format!("netwatch-lab tc-list: {e}")))?;
        if !out.status.success() {
            return Err(LabError::Spec(format!(
                "netwatch-lab tc-list {interface}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| LabError::Spec(e.to_string()))
    }

    /// Attach a stand-in CNI program that ends the TC chain (`TC_ACT_OK`)
    /// to both directions of `interfaces` on `node`. tcx links live as long
    /// as the returned process; clsact filters as long as the interfaces.
    pub fn attach_foreign_tc(
        &self,
        node: &str,
        interfaces: &[&str],
        mode: tcprog::TcMode,
    ) -> Result<ForeignTc, LabError> {
        use std::io::BufRead;
        let mode = match mode {
            tcprog::TcMode::Tcx => "tcx",
            tcprog::TcMode::Clsact => "clsact",
        };
        let mut cmd = self.on_node(node, &self.helper)?;
        cmd.args(["tc-foreign", "--mode", mode])
            .args(interfaces)
            .stdout(std::process::Stdio::piped())
            .stdin(std::process::Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| LabError::Spec(format!("netwatch-lab tc-foreign: {e}")))?;
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = std::io::BufReader::new(out).read_line(&mut line);
        }
        let Some(ids) = line.trim().strip_prefix("attached") else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(LabError::Spec(format!(
                "the stand-in CNI program did not attach to {interfaces:?}"
            )));
        };
        Ok(ForeignTc {
            program_ids: ids
                .split(',')
                .filter_map(|i| i.trim().parse().ok())
                .collect(),
            _holder: ChildGuard(child),
        })
    }

    /// Run a probe from a pod; waits for its result.
    pub fn probe(&self, from: &str, probe: &Probe) -> Result<ProbeResult, LabError> {
        let pod = self.pod(from)?;
        let json = serde_json::to_string(probe).map_err(|e| LabError::Spec(e.to_string()))?;
        let out = self
            .in_pod(pod, &self.helper)
            .args(["probe", "--json", &json])
            .stderr(Stdio::inherit())
            .output()
            .map_err(io(format!("running a probe in pod {from}")))?;
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.trim()).map_err(|e| LabError::Helper {
            pod: from.into(),
            detail: format!("probe printed {text:?}: {e}"),
        })
    }

    /// How this lab's firewall tells pods apart (see [`PodMatch`]).
    pub fn pod_match(&self) -> PodMatch {
        match self.datapath {
            Datapath::Bridge => PodMatch::Address,
            _ => PodMatch::Interface,
        }
    }

    /// Load an nftables ruleset into a node.
    pub fn nft(&self, node: &str, ruleset: &str) -> Result<(), LabError> {
        nft_in(&self.node(node)?.netns, ruleset)
    }

    /// Load an nftables ruleset into a pod's own network namespace (a
    /// firewall inside the pod, as a sidecar's init container sets up).
    pub fn nft_in_pod(&self, pod: &str, ruleset: &str) -> Result<(), LabError> {
        nft_in(&self.pod(pod)?.netns, ruleset)
    }

    /// Packets counted by the node's nftables rule whose comment is `comment`.
    pub fn nft_counter(&self, node: &str, comment: &str) -> Result<u64, LabError> {
        let netns = &self.node(node)?.netns;
        let out = run(
            "ip",
            &["netns", "exec", netns, "nft", "-j", "list", "ruleset"],
        )?;
        let v: serde_json::Value =
            serde_json::from_str(&out).map_err(|e| LabError::Spec(format!("nft -j: {e}")))?;
        let rules = v
            .get("nftables")
            .and_then(|n| n.as_array())
            .cloned()
            .unwrap_or_default();
        for item in rules {
            let Some(rule) = item.get("rule") else {
                continue;
            };
            if rule.get("comment").and_then(|c| c.as_str()) != Some(comment) {
                continue;
            }
            for e in rule
                .get("expr")
                .and_then(|e| e.as_array())
                .into_iter()
                .flatten()
            {
                if let Some(p) = e
                    .get("counter")
                    .and_then(|c| c.get("packets"))
                    .and_then(|p| p.as_u64())
                {
                    return Ok(p);
                }
            }
        }
        Err(LabError::Spec(format!(
            "node {node} has no nftables rule with comment {comment:?} and a counter"
        )))
    }

    fn netns_add(&mut self, name: &str) -> Result<(), LabError> {
        run("ip", &["netns", "add", name])?;
        self.created_netns.push(name.to_string());
        run("ip", &["-n", name, "link", "set", "lo", "up"]).map(|_| ())
    }

    fn mkdir_cgroup(&mut self, dir: &Path) -> Result<(), LabError> {
        // Remember every level we create, to remove them deepest first.
        let mut missing = Vec::new();
        let mut d = dir.to_path_buf();
        while !d.exists() && d.starts_with(&self.cgroup_mount) {
            missing.push(d.clone());
            if !d.pop() {
                break;
            }
        }
        fs::create_dir_all(dir).map_err(io(format!("creating cgroup {}", dir.display())))?;
        for m in missing.into_iter().rev() {
            self.created_cgroups.push(m);
        }
        Ok(())
    }

    fn teardown(&mut self) {
        if let Ok(mut held) = self.ebpf.lock() {
            held.clear();
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
        // Open vSwitch's daemons and bridges before their namespaces.
        self.switches.clear();
        for dir in self.created_cgroups.iter().rev() {
            remove_cgroup(dir);
        }
        self.created_cgroups.clear();
        // Pods first, the world last: deleting a namespace removes its veths.
        for ns in self.created_netns.iter().rev() {
            if let Err(e) = run("ip", &["netns", "del", ns]) {
                eprintln!("lab cleanup: {e}");
            }
        }
        self.created_netns.clear();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// `nft -f -` in a network namespace.
fn nft_in(netns: &str, ruleset: &str) -> Result<(), LabError> {
    run_with_input(
        "ip",
        &["netns", "exec", netns, "nft", "-f", "-"],
        Some(ruleset),
    )
    .map(|_| ())
}

/// A command that enters a network namespace and a cgroup before exec.
fn enter(program: &Path, netns: Option<&str>, cgroup: Option<&Path>) -> Command {
    let mut cmd = Command::new(program);
    let netns_path = netns.and_then(|n| CString::new(format!("/run/netns/{n}")).ok());
    let procs = cgroup
        .and_then(|c| CString::new(c.join("cgroup.procs").to_string_lossy().into_owned()).ok());
    // SAFETY: only async-signal-safe syscalls (open, write, setns, close) on
    // strings prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(p) = &procs {
                let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" moves the writing process.
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if n != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(ns) = &netns_path {
                let fd = libc::open(ns.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let r = libc::setns(fd, libc::CLONE_NEWNET);
                libc::close(fd);
                if r != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}

/// Kill what is left in a cgroup and remove it.
fn remove_cgroup(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let _ = fs::write(dir.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => {
                eprintln!("lab cleanup: cannot remove cgroup {}: {e}", dir.display());
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    remove_cgroup(dir);
}

/// Remove namespaces and cgroups of labs whose process is gone.
pub fn sweep_stale() -> usize {
    let alive = |pid: &str| Path::new("/proc").join(pid).exists();
    let mut removed = 0;
    if let Ok(entries) = fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(rest) = name.strip_prefix(NETNS_PREFIX) {
                let pid = rest.split('-').next().unwrap_or("");
                if !alive(pid) && run("ip", &["netns", "del", &name]).is_ok() {
                    removed += 1;
                }
            }
        }
    }
    if let Some(mount) = cgroup2_mount()
        && let Ok(entries) = fs::read_dir(&mount)
    {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(rest) = name.strip_prefix(CGROUP_PREFIX) {
                let pid = rest.split('-').next().unwrap_or("");
                if !alive(pid) {
                    remove_cgroup_tree(&e.path());
                    removed += 1;
                }
            }
        }
    }
    removed
}

/// Where cgroup v2 is mounted on this host.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
    let mut found = None;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 2 && f[2] == "cgroup2" {
            let p = PathBuf::from(f[1]);
            // Prefer the unified mount at /sys/fs/cgroup when there is one.
            if p == Path::new("/sys/fs/cgroup") {
                return Some(p);
            }
            found.get_or_insert(p);
        }
    }
    found
}

pub(crate) fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    // SAFETY: writing into our own buffer.
    let got = unsafe { libc::getrandom(v.as_mut_ptr().cast(), n, 0) };
    if got != n as isize {
        // Not security relevant: only names. Fall back to time-derived bytes.
        let seed = fnv1a(&format!("{:?}{}", Instant::now(), std::process::id()));
        for (i, b) in v.iter_mut().enumerate() {
            *b = (seed >> ((i % 8) * 8)) as u8 ^ i as u8;
        }
    }
    v
}

fn random_hex(chars: usize) -> String {
    random_bytes(chars.div_ceil(2))
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()[..chars]
        .to_string()
}

fn random_uuid() -> String {
    let h = random_hex(32);
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_interface_names_fit_ifnamsiz() {
        let name = format!(
            "cali{}",
            &format!("{:016x}", fnv1a("1-0/default/web"))[..11]
        );
        assert_eq!(name.len(), 15);
    }

    #[test]
    fn uuids_look_like_kubernetes_uids() {
        let u = random_uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(u.matches('-').count(), 4);
    }

    #[test]
    fn listeners_parse_and_reject_bad_ports() {
        let mut p = PodSpec {
            name: "a".into(),
            namespace: "x".into(),
            node: "n".into(),
            ip: "10.0.0.1".parse().unwrap(),
            ipv6: None,
            listen: vec!["80/tcp".into(), "53/udp".into(), "81".into()],
            uid: None,
            host_network: false,
        };
        assert_eq!(
            p.listeners().unwrap(),
            vec![(80, Proto::Tcp), (53, Proto::Udp), (81, Proto::Tcp)]
        );
        p.listen = vec!["http/tcp".into()];
        assert!(p.listeners().unwrap_err().contains("x/a"));
    }
}
