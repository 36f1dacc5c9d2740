//! The Open vSwitch datapath (Antrea, OVN-Kubernetes, Kube-OVN): each node
//! runs its own `ovsdb-server` and `ovs-vswitchd` inside the node's network
//! namespace, pods' host-side veths are ports of an integration bridge
//! `br-int`, and forwarding and policy are OpenFlow flows.
//!
//! Forwarding is layer 3 in OpenFlow, as Antrea does it: a packet to a
//! local pod gets the pod's MAC and leaves on its port; anything else from a
//! pod goes up to the node's stack through the internal gateway port
//! `antrea-gw0`. Pods keep the lab's usual addressing (a /32 and a default
//! route via 169.254.1.1); static neighbour entries on both sides stand in
//! for the ARP responder flows a real CNI installs, so no ARP crosses the
//! bridge.
//!
//! Policy drops are OpenFlow flows whose action list is empty. The kernel
//! datapath frees such a packet with OVS_DROP_LAST_ACTION on 6.4+ kernels
//! (a reason of the Open vSwitch subsystem, above 0xFFFF); older kernels
//! consume it silently, so only a missing answer tells.
//!
//! The kernel module `openvswitch` is needed: it is in Debian's kernels (the
//! VM matrix), not in the kernel of the machines the host tests run on.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use super::super::{
    Lab, LabNode, PodSpec,
    enforce::{self, Allow, EnforceOptions, LabCluster, PodAllows},
    sanitize, services,
    system::{LabError, io, ip_batch, run, slowed},
};

/// The integration bridge, as Antrea and OVN-Kubernetes name it.
pub const BRIDGE: &str = "br-int";
/// The internal port that is the pods' way to the node's stack.
pub const GATEWAY: &str = "antrea-gw0";
/// The gateway address pods route through (the lab's usual one).
const GATEWAY_IP: &str = "169.254.1.1";
/// Priority of forwarding flows; policy drops sit above it.
const FORWARD_PRIORITY: u16 = 100;
/// Priority of the drops a test adds to table 0, ahead of everything.
pub const DROP_PRIORITY: u16 = 200;
/// OpenFlow tables: 0 (entry), conntrack then each pod's egress, then its
/// ingress, then forwarding. Replies of an admitted connection pass on
/// conntrack state, as every OVS CNI does.
const TABLE_EGRESS: u8 = 1;
const TABLE_INGRESS: u8 = 2;
const TABLE_FORWARD: u8 = 3;

/// One node's Open vSwitch: its daemons, bridge and ports.
pub struct OvsSwitch {
    netns: String,
    dir: PathBuf,
    gateway_mac: String,
    gateway_port: u32,
    /// (pod address, pod MAC, OpenFlow port).
    ports: Vec<(String, String, u32)>,
    /// Flows added on top of forwarding (policy, drops), kept across
    /// re-renders.
    extra: Mutex<Vec<String>>,
    daemons: Vec<Child>,
}

impl OvsSwitch {
    /// Start Open vSwitch in `netns` with its database, sockets and logs in
    /// `dir`, and create the bridge and its gateway port.
    pub fn start(netns: &str, dir: &Path) -> Result<OvsSwitch, LabError> {
        if run("modprobe", &["openvswitch"]).is_err()
            && !Path::new("/sys/module/openvswitch").exists()
        {
            return Err(LabError::Spec(
                "the ovs datapath needs the kernel module openvswitch, which this kernel does not have: \
                 run it on Debian's kernels in the VM matrix (cargo xtask vmtest)"
                    .into(),
            ));
        }
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        let mut switch = OvsSwitch {
            netns: netns.to_string(),
            dir: dir.to_path_buf(),
            gateway_mac: String::new(),
            gateway_port: 0,
            ports: Vec::new(),
            extra: Mutex::new(Vec::new()),
            daemons: Vec::new(),
        };
        let db = dir.join("conf.db");
        let schema = ["/usr/share/openvswitch/vswitch.ovsschema"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .ok_or_else(|| {
                LabError::Spec(
                    "no Open vSwitch schema at /usr/share/openvswitch/vswitch.ovsschema: \
                     `cargo xtask setup` installs openvswitch-switch"
                        .into(),
                )
            })?;
        run("ovsdb-tool", &["create", &db.to_string_lossy(), schema])?;
        let sock = dir.join("db.sock");
        switch.daemon(
            "ovsdb-server",
            &[
                &db.to_string_lossy(),
                &format!("--remote=punix:{}", sock.display()),
                &format!("--unixctl={}", dir.join("ovsdb-server.ctl").display()),
                &format!("--log-file={}", dir.join("ovsdb-server.log").display()),
            ],
        )?;
        wait_for(&sock, "ovsdb-server's socket")?;
        switch.vsctl(&["--no-wait", "init"])?;
        switch.daemon(
            "ovs-vswitchd",
            &[
                &format!("unix:{}", sock.display()),
                &format!("--unixctl={}", dir.join("ovs-vswitchd.ctl").display()),
                &format!("--log-file={}", dir.join("ovs-vswitchd.log").display()),
            ],
        )?;
        // fail_mode=secure: no flow, no forwarding (not a learning switch).
        switch.vsctl(&[
            "--timeout=60",
            "add-br",
            BRIDGE,
            "--",
            "set",
            "bridge",
            BRIDGE,
            "fail_mode=secure",
            // goto_table and tables need OpenFlow 1.1+.
            "protocols=OpenFlow13",
            "--",
            "add-port",
            BRIDGE,
            GATEWAY,
            "--",
            "set",
            "interface",
            GATEWAY,
            "type=internal",
        ])?;
        switch.gateway_port = switch.ofport(GATEWAY)?;
        ip_batch(
            netns,
            &[
                format!("link set {GATEWAY} up"),
                format!("addr add {GATEWAY_IP}/32 dev {GATEWAY}"),
            ],
        )?;
        switch.gateway_mac = mac_of(netns, GATEWAY)?;
        switch.flows()?;
        Ok(switch)
    }

    /// The gateway port's MAC (pods' static neighbour for 169.254.1.1).
    pub fn gateway_mac(&self) -> &str {
        &self.gateway_mac
    }

    /// Make the node-side veth `host_if` of a pod with `ip` and eth0 MAC
    /// `pod_mac` a port, and route the pod through the gateway port.
    pub fn add_pod(&mut self, host_if: &str, ip: &str, pod_mac: &str) -> Result<(), LabError> {
        self.vsctl(&["--timeout=60", "add-port", BRIDGE, host_if])?;
        let port = self.ofport(host_if)?;
        ip_batch(
            &self.netns,
            &[
                format!("link set {host_if} up"),
                format!("route add {ip}/32 dev {GATEWAY}"),
                format!("neigh replace {ip} lladdr {pod_mac} dev {GATEWAY} nud permanent"),
            ],
        )?;
        self.ports.push((ip.to_string(), pod_mac.to_string(), port));
        self.flows()
    }

    /// Add OpenFlow flows (`ovs-ofctl` syntax, without a table: table 0),
    /// e.g. a drop: `priority=200,tcp,nw_src=A,nw_dst=B,tp_dst=80,actions=drop`.
    pub fn add_flows(&self, flows: &[String]) -> Result<(), LabError> {
        self.extra_flows().extend(flows.iter().cloned());
        self.flows()
    }

    /// Replace the flows added with [`OvsSwitch::add_flows`].
    pub fn set_flows(&self, flows: &[String]) -> Result<(), LabError> {
        *self.extra_flows() = flows.to_vec();
        self.flows()
    }

    fn extra_flows(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.extra.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Packets matched by the flows at `priority` so far.
    pub fn packets_at(&self, priority: u16) -> Result<u64, LabError> {
        let out = self.ofctl(&["dump-flows", BRIDGE])?;
        let mut total = 0;
        for line in out.lines() {
            if !line.contains(&format!("priority={priority}")) {
                continue;
            }
            if let Some(n) = line
                .split([',', ' '])
                .find_map(|f| f.trim().strip_prefix("n_packets="))
                .and_then(|n| n.parse::<u64>().ok())
            {
                total += n;
            }
        }
        Ok(total)
    }

    /// Packets the kernel datapath dropped so far, summed over its cached
    /// flows whose action is a drop. The first packet of a new flow is not
    /// among them: it goes up to ovs-vswitchd (an upcall), which decides in
    /// user space and installs the kernel flow; a drop there frees no packet
    /// in the kernel. Cached flows expire after 10 s idle: read it soon.
    pub fn datapath_drops(&self) -> Result<u64, LabError> {
        let out = run(
            "ip",
            &["netns", "exec", &self.netns, "ovs-dpctl", "dump-flows"],
        )?;
        Ok(out
            .lines()
            .filter(|l| l.trim_end().ends_with("actions:drop"))
            .filter_map(|l| {
                l.split(", ")
                    .find_map(|f| f.trim().strip_prefix("packets:"))
                    .and_then(|n| n.parse::<u64>().ok())
            })
            .sum())
    }

    /// Install forwarding and the extra flows in one `replace-flows`.
    fn flows(&self) -> Result<(), LabError> {
        let mut flows = self.extra_flows().clone();
        // Table 0 holds drops added by hand and, with a policy, the way
        // into conntrack; the rest goes straight to forwarding.
        flows.push(format!(
            "table=0,priority=0,actions=goto_table:{TABLE_FORWARD}"
        ));
        let gw = self.gateway_port;
        let gw_mac = &self.gateway_mac;
        for (ip, mac, port) in &self.ports {
            flows.push(format!(
                "table={TABLE_FORWARD},priority={FORWARD_PRIORITY},ip,nw_dst={ip},actions=mod_dl_src:{gw_mac},mod_dl_dst:{mac},output:{port}"
            ));
            // Everything else a pod sends goes up to the node.
            flows.push(format!(
                "table={TABLE_FORWARD},priority={},in_port={port},actions=output:{gw}",
                FORWARD_PRIORITY - 10
            ));
        }
        let file = self.dir.join("flows.txt");
        std::fs::write(&file, flows.join("\n") + "\n")
            .map_err(io(format!("writing {}", file.display())))?;
        self.ofctl(&["replace-flows", BRIDGE, &file.to_string_lossy()])
            .map(|_| ())
    }

    fn ofport(&self, interface: &str) -> Result<u32, LabError> {
        // The port number is assigned by ovs-vswitchd shortly after add-port.
        let deadline = Instant::now() + slowed(Duration::from_secs(10));
        loop {
            let out = self.vsctl(&["get", "interface", interface, "ofport"])?;
            if let Ok(n) = out.trim().parse::<i64>()
                && n > 0
            {
                return Ok(n as u32);
            }
            if Instant::now() > deadline {
                return Err(LabError::Spec(format!(
                    "Open vSwitch gave interface {interface} no OpenFlow port (ofport {})",
                    out.trim()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn vsctl(&self, args: &[&str]) -> Result<String, LabError> {
        let db = format!("--db=unix:{}", self.dir.join("db.sock").display());
        let mut all = vec!["netns", "exec", &self.netns, "ovs-vsctl", &db];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    fn ofctl(&self, args: &[&str]) -> Result<String, LabError> {
        // ovs-ofctl reaches the bridge through ovs-vswitchd's run directory.
        let rundir = self.dir.to_string_lossy().into_owned();
        let mut all = vec!["netns", "exec", &self.netns, "env"];
        let env = format!("OVS_RUNDIR={rundir}");
        all.push(&env);
        all.extend(["ovs-ofctl", "-O", "OpenFlow13"]);
        all.extend_from_slice(args);
        run("ip", &all)
    }

    fn daemon(&mut self, program: &str, args: &[&str]) -> Result<(), LabError> {
        let dir = self.dir.to_string_lossy().into_owned();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns, program])
            .args(args)
            // Pid files, sockets and logs in the lab's own directory, never
            // the machine's /var/run/openvswitch.
            .env("OVS_RUNDIR", &dir)
            .env("OVS_LOGDIR", &dir)
            .env("OVS_DBDIR", &dir)
            .env("OVS_SYSCONFDIR", &dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| LabError::Spawn {
                command: program.to_string(),
                source,
            })?;
        self.daemons.push(child);
        Ok(())
    }
}

impl Drop for OvsSwitch {
    fn drop(&mut self) {
        // The kernel datapath outlives ovs-vswitchd: delete the bridge first
        // (the datapath goes with its network namespace too).
        let _ = self.vsctl(&["--timeout=10", "--if-exists", "del-br", BRIDGE]);
        for c in self.daemons.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Antrea's host-side name: the pod name's start and a hash.
pub fn host_if_name(pod: &PodSpec, hash: &str) -> String {
    let name = sanitize(&pod.name);
    format!("{}-{}", &name[..name.len().min(8)], &hash[..6])
}

/// The pod's veth as a port of the node's `br-int` (`switch`): the pod's
/// addresses as in the routed wiring, but no route or proxy ARP on the node
/// (OpenFlow forwards to the port), and the gateway's MAC static in the pod
/// (no ARP crosses the bridge). IPv4 pods only.
pub fn wire_pod(
    node: &LabNode,
    world: &str,
    netns: &str,
    host_if: &str,
    pod: &PodSpec,
    switch: &mut OvsSwitch,
) -> Result<(), LabError> {
    if pod.ipv6.is_some() {
        return Err(LabError::Spec(format!(
            "pod {}: the ovs datapath wires IPv4 pods only",
            pod.id()
        )));
    }
    super::veth_into_pod(node, netns, host_if)?;
    let mut pod_cmds = super::pod_address_cmds(pod);
    pod_cmds.push(format!(
        "neigh replace 169.254.1.1 lladdr {} dev eth0 nud permanent",
        switch.gateway_mac()
    ));
    ip_batch(netns, &pod_cmds)?;
    let pod_mac = mac_of(netns, "eth0")?;
    switch.add_pod(host_if, &pod.ip.to_string(), &pod_mac)?;
    super::route_on_underlay(node, world, pod)
}

/// The MAC address of `interface` in `netns`.
pub fn mac_of(netns: &str, interface: &str) -> Result<String, LabError> {
    let out = run(
        "ip",
        &["-n", netns, "-br", "link", "show", "dev", interface],
    )?;
    out.split_whitespace()
        .find(|w| w.len() == 17 && w.matches(':').count() == 5)
        .map(str::to_string)
        .ok_or_else(|| LabError::Spec(format!("no MAC address for {interface} in {netns}")))
}

fn wait_for(path: &Path, what: &str) -> Result<(), LabError> {
    let deadline = Instant::now() + slowed(Duration::from_secs(10));
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(LabError::Spec(format!(
                "{what} ({}) did not appear",
                path.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

// ---------------------------------------------------------------- policy

/// Antrea's conntrack zone: OVS's connection tracking apart from the
/// node's own (the same kernel table).
const CT_ZONE: u16 = 65520;
/// Priorities inside the policy tables.
const PASS_PRIORITY: u16 = 400;
const ALLOW_PRIORITY: u16 = 300;
const POLICY_DROP_PRIORITY: u16 = 200;

/// What the OpenFlow policy needs to know besides the pods' allows.
pub struct PolicyContext<'a> {
    /// Addresses traffic can come from or go to in this lab: an allow with
    /// `except` prefixes (OpenFlow cannot subtract) is written out for each
    /// of them it admits.
    pub endpoints: &'a [IpAddr],
    /// Service frontends: judged after the node's DNAT, on the way back.
    pub service_ips: &'a [IpAddr],
    /// The nodes' own addresses: let into pods unless `police_host_to_pod`.
    pub node_ips: &'a [IpAddr],
    pub police_host_to_pod: bool,
}

/// The OpenFlow flows enforcing `pods`' policies (the lab's own compiler,
/// [`enforce::compile_allows`]): every IPv4 packet goes through conntrack;
/// a new connection passes the source pod's egress table, then the
/// destination pod's ingress table, each ending in a drop (an empty action
/// list) for an isolated pod; established and related packets pass.
pub fn policy_flows(pods: &[PodAllows], cx: &PolicyContext<'_>) -> Vec<String> {
    let (e, i, f) = (TABLE_EGRESS, TABLE_INGRESS, TABLE_FORWARD);
    let z = CT_ZONE;
    let mut flows = vec![
        format!("table=0,priority=10,ip,actions=ct(zone={z},table={e})"),
        format!("table={e},priority=1000,ct_state=+trk+est,ip,actions=goto_table:{f}"),
        format!("table={e},priority=1000,ct_state=+trk+rel,ip,actions=goto_table:{f}"),
        format!("table={e},priority=0,actions=goto_table:{i}"),
        format!("table={i},priority=0,ip,actions=ct(commit,zone={z},table={f})"),
    ];
    // To a Service: up to the node's DNAT unjudged; judged on the way back.
    for vip in cx.service_ips.iter().filter(|a| a.is_ipv4()) {
        flows.push(format!(
            "table={e},priority={PASS_PRIORITY},ip,nw_dst={vip},actions=goto_table:{f}"
        ));
    }
    if !cx.police_host_to_pod {
        for node in cx.node_ips.iter().filter(|a| a.is_ipv4()) {
            flows.push(format!(
                "table={i},priority={PASS_PRIORITY},ip,nw_src={node},actions=ct(commit,zone={z},table={f})"
            ));
        }
    }
    for pod in pods {
        for ip in pod.ips.iter().filter(|ip| ip.is_ipv4()) {
            if let Some(allows) = &pod.egress {
                direction_flows(
                    &mut flows,
                    e,
                    ("nw_src", "nw_dst"),
                    *ip,
                    allows,
                    cx.endpoints,
                    &format!("goto_table:{i}"),
                );
            }
            if let Some(allows) = &pod.ingress {
                direction_flows(
                    &mut flows,
                    i,
                    ("nw_dst", "nw_src"),
                    *ip,
                    allows,
                    cx.endpoints,
                    &format!("ct(commit,zone={z},table={f})"),
                );
            }
        }
    }
    flows
}

/// One pod's flows for one direction: the allows, then the drop.
fn direction_flows(
    flows: &mut Vec<String>,
    table: u8,
    (pod_field, peer_field): (&str, &str),
    pod_ip: IpAddr,
    allows: &[Allow],
    endpoints: &[IpAddr],
    pass: &str,
) {
    for a in allows {
        let peers: Vec<String> = if a.except.is_empty() {
            a.peers
                .iter()
                .filter(|(p, _)| p.is_ipv4())
                .map(|(p, len)| format!("{p}/{len}"))
                .collect()
        } else {
            endpoints
                .iter()
                .filter(|e| a.peers.iter().any(|(p, l)| in_prefix(**e, *p, *l)))
                .filter(|e| !a.except.iter().any(|(p, l)| in_prefix(**e, *p, *l)))
                .filter(|e| e.is_ipv4())
                .map(|e| format!("{e}/32"))
                .collect()
        };
        let ports: Vec<String> = match a.ports {
            None => vec!["ip".to_string()],
            Some((l4, lo, hi)) => port_masks(lo, hi)
                .into_iter()
                .map(|(v, m)| format!("{},tp_dst=0x{v:x}/0x{m:x}", l4.nft()))
                .collect(),
        };
        for peer in &peers {
            for port in &ports {
                flows.push(format!(
                    "table={table},priority={ALLOW_PRIORITY},ct_state=+trk+new,{port},{pod_field}={pod_ip},{peer_field}={peer},actions={pass}"
                ));
            }
        }
    }
    flows.push(format!(
        "table={table},priority={POLICY_DROP_PRIORITY},ct_state=+trk+new,ip,{pod_field}={pod_ip},actions=drop"
    ));
}

fn in_prefix(addr: IpAddr, prefix: IpAddr, len: u8) -> bool {
    match (addr, prefix) {
        (IpAddr::V4(a), IpAddr::V4(p)) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(len.min(32)))
                .unwrap_or(0);
            u32::from(a) & mask == u32::from(p) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(p)) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(len.min(128)))
                .unwrap_or(0);
            u128::from(a) & mask == u128::from(p) & mask
        }
        _ => false,
    }
}

/// A port range as the (value, mask) pairs OpenFlow matches.
fn port_masks(lo: u16, hi: u16) -> Vec<(u16, u16)> {
    let mut out = Vec::new();
    let (mut start, end) = (u32::from(lo), u32::from(hi));
    while start <= end {
        // The largest aligned block from `start` that stays within `end`.
        let mut size = 1u32;
        while start % (size * 2) == 0 && start + size * 2 - 1 <= end {
            size *= 2;
        }
        out.push((start as u16, (0x10000 - size) as u16));
        start += size;
    }
    out
}

impl Lab {
    /// Compile `cluster`'s policies into each node's OpenFlow tables.
    pub(crate) fn ovs_enforce(
        &self,
        cluster: &LabCluster,
        options: &EnforceOptions,
    ) -> Result<(), LabError> {
        let service_ips: Vec<IpAddr> = services::frontends(cluster)
            .map_err(|e| LabError::Spec(e.to_string()))?
            .into_iter()
            .map(|f| f.ip)
            .collect();
        let node_ips: Vec<IpAddr> = self.nodes.iter().map(|n| IpAddr::V4(n.ip)).collect();
        let mut endpoints: Vec<IpAddr> = cluster
            .pods
            .iter()
            .flat_map(|p| p.ips.iter().copied())
            .collect();
        endpoints.extend(&node_ips);
        let cx = PolicyContext {
            endpoints: &endpoints,
            service_ips: &service_ips,
            node_ips: &node_ips,
            police_host_to_pod: options.police_host_to_pod,
        };
        for n in &self.nodes {
            let allows = enforce::compile_allows(cluster, &n.name, options)
                .map_err(|e| LabError::Spec(e.to_string()))?;
            self.switch(&n.name)?
                .set_flows(&policy_flows(&allows, &cx))?;
        }
        Ok(())
    }

    /// Police nothing on `node`: forwarding only.
    pub(crate) fn ovs_stop_enforcing(&self, node: &str) -> Result<(), LabError> {
        self.switch(node)?.set_flows(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_become_aligned_masks() {
        assert_eq!(port_masks(80, 80), vec![(80, 0xffff)]);
        assert_eq!(port_masks(80, 81), vec![(80, 0xfffe)]);
        assert_eq!(port_masks(1, 3), vec![(1, 0xffff), (2, 0xfffe)]);
        assert_eq!(port_masks(0, 65535), vec![(0, 0)]);
        // Every port of a range is covered once, none outside.
        let masks = port_masks(1000, 2047);
        for port in 990u32..2100 {
            let hits = masks.iter().filter(|(v, m)| port as u16 & m == *v).count();
            assert_eq!(hits, usize::from((1000..=2047).contains(&port)), "{port}");
        }
    }

    #[test]
    fn prefixes_contain_their_addresses() {
        let a: IpAddr = "10.244.1.7".parse().unwrap();
        assert!(in_prefix(a, "10.244.0.0".parse().unwrap(), 16));
        assert!(!in_prefix(a, "10.245.0.0".parse().unwrap(), 16));
        assert!(in_prefix(a, "0.0.0.0".parse().unwrap(), 0));
        assert!(!in_prefix(a, "::".parse().unwrap(), 0));
    }
}
