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
    enforce::{self, Action, EnforceOptions, LabCluster, MatchRule, PodFirstMatch},
    sanitize,
    services::{self, Frontend},
    system::{LabError, io, ip_batch, run, slowed},
};

/// The integration bridge, as Antrea and OVN-Kubernetes name it.
pub const BRIDGE: &str = "br-int";
/// The internal port that is the pods' way to the node's stack.
pub const GATEWAY: &str = "antrea-gw0";
/// The gateway address pods route through (the lab's usual one).
/// The gateway's address: the node's source address towards its pods.
const GATEWAY_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 1, 1);
/// Priority of forwarding flows; policy drops sit above it.
const FORWARD_PRIORITY: u16 = 100;
/// Priority of the drops a test adds to table 0, ahead of everything.
pub const DROP_PRIORITY: u16 = 200;
/// OpenFlow tables: 0 (entry), conntrack (with NAT) then the Service load
/// balancer and its DNAT (as AntreaProxy's ServiceLB and EndpointDNAT), then
/// each pod's egress (the Admin tier, then below it: NetworkPolicies or the
/// Baseline tier), then its ingress (the same two), then forwarding.
/// Replies of an admitted connection pass on conntrack state, as every OVS
/// CNI does.
const TABLE_SERVICE: u8 = 1;
const TABLE_DNAT: u8 = 2;
const TABLE_EGRESS: u8 = 3;
const TABLE_EGRESS_BELOW: u8 = 4;
const TABLE_INGRESS: u8 = 5;
const TABLE_INGRESS_BELOW: u8 = 6;
const TABLE_FORWARD: u8 = 7;

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
        // Service traffic turns back out of the gateway after the node's
        // DNAT; the kernel would answer each such packet with an ICMP
        // redirect, which the switch then drops. Antrea turns them off too.
        crate::system::sysctl_in(
            netns,
            &[
                "net.ipv4.conf.all.send_redirects=0",
                &format!("net.ipv4.conf.{GATEWAY}.send_redirects=0"),
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
/// Priorities inside the policy tables: conntrack state and Services
/// first, then each pod's rules from `RULE_PRIORITY` down in first-match
/// order, then what a pod's list ends in.
const PASS_PRIORITY: u16 = 40000;
const RULE_PRIORITY: u16 = 30000;
const OTHERWISE_PRIORITY: u16 = 200;
/// A new connection admitted: committed, with whether it came from the
/// gateway (reg0 bit 0, set in table 0) as its ct_mark; on to forwarding.
const ADMIT: &str = "ct(commit,zone=65520,exec(move:NXM_NX_REG0[0]->NXM_NX_CT_MARK[0]),table=7)";

/// What the OpenFlow policy needs to know besides the pods' lists.
pub struct PolicyContext<'a> {
    /// Service frontends: those with ready endpoints are DNATed in the
    /// switch before the policy tables; those without go up to the node's
    /// stack unjudged, where kube-proxy's REJECT answers them.
    pub frontends: &'a [Frontend],
    /// The nodes' own addresses: let into pods unless `police_host_to_pod`.
    pub node_ips: &'a [IpAddr],
    pub police_host_to_pod: bool,
    /// The OpenFlow port of the gateway to the node's stack.
    pub gateway_port: u32,
}

/// The OpenFlow flows enforcing `pods`' policies (the lab's own compiler,
/// [`enforce::compile_first_match`]): every IPv4 packet goes through
/// conntrack; a new connection to a Service is DNATed to an endpoint
/// ([`service_flows`]); a new connection passes the source pod's egress
/// tables, then
/// the destination pod's ingress tables; established and related packets
/// pass. Per pod and direction, the first-match list becomes descending
/// priorities: the Admin tier's rules in the first table (Allow on to the
/// next direction, Deny a drop, an empty action list; Pass, and no match,
/// on to the table below), then NetworkPolicies' or the Baseline tier's
/// rules, ending in what the list says otherwise.
pub fn policy_flows(pods: &[PodFirstMatch], cx: &PolicyContext<'_>) -> Vec<String> {
    let (e, eb, i, ib, f) = (
        TABLE_EGRESS,
        TABLE_EGRESS_BELOW,
        TABLE_INGRESS,
        TABLE_INGRESS_BELOW,
        TABLE_FORWARD,
    );
    let z = CT_ZONE;
    let gw = cx.gateway_port;
    // Connections that entered from the node's stack (the node, other
    // nodes, the node's own Service traffic after its DNAT) carry ct_mark
    // 1, and their replies go back through it: such a reply must be
    // un-DNATed there, even from a backend on the node's own switch.
    // `nat` in the entry's conntrack: a connection's later packets get its
    // Service DNAT, and replies its un-DNAT, before any table looks at them.
    let s = TABLE_SERVICE;
    let mut flows = vec![
        format!(
            "table=0,priority=11,in_port={gw},ip,actions=load:1->NXM_NX_REG0[0],ct(zone={z},nat,table={s})"
        ),
        format!("table=0,priority=10,ip,actions=ct(zone={z},nat,table={s})"),
        format!("table={s},priority=0,actions=goto_table:{e}"),
        format!(
            "table={f},priority={},ct_state=+trk+rpl,ct_mark=0x1/0x1,ip,actions=output:{gw}",
            FORWARD_PRIORITY + 20
        ),
        format!("table={e},priority=1000,ct_state=+trk+est,ip,actions=goto_table:{f}"),
        format!("table={e},priority=1000,ct_state=+trk+rel,ip,actions=goto_table:{f}"),
        format!("table={e},priority=0,actions=goto_table:{eb}"),
        format!("table={eb},priority=0,actions=goto_table:{i}"),
        format!("table={i},priority=0,actions=goto_table:{ib}"),
        format!("table={ib},priority=0,ip,actions={ADMIT}"),
    ];
    service_flows(&mut flows, cx.frontends);
    // To a Service without ready endpoints (no DNAT above): up to the
    // node's stack unjudged, where kube-proxy's REJECT answers.
    let mut vips: Vec<IpAddr> = cx.frontends.iter().map(|f| f.ip).collect();
    vips.sort();
    vips.dedup();
    for vip in vips.iter().filter(|a| a.is_ipv4()) {
        flows.push(format!(
            "table={e},priority={PASS_PRIORITY},ip,nw_dst={vip},actions=ct(commit,zone={z}),goto_table:{f}"
        ));
    }
    if !cx.police_host_to_pod {
        // The node's own traffic to a local pod leaves from the gateway's
        // address (the route to pods goes through it), as with Antrea.
        let gateway = IpAddr::V4(GATEWAY_IP);
        for node in cx
            .node_ips
            .iter()
            .filter(|a| a.is_ipv4())
            .chain(std::iter::once(&gateway))
        {
            flows.push(format!(
                "table={i},priority={PASS_PRIORITY},ip,nw_src={node},actions={ADMIT}"
            ));
        }
    }
    let to_ingress = format!("goto_table:{i}");
    let admit = ADMIT.to_string();
    for pod in pods {
        for ip in pod.ips.iter().filter(|ip| ip.is_ipv4()) {
            if let Some(list) = &pod.egress {
                let fields = ("nw_src", "nw_dst");
                let tables = (e, eb);
                direction_flows(&mut flows, tables, fields, *ip, &list.admin, &to_ingress);
                direction_flows(&mut flows, (eb, i), fields, *ip, &list.below, &to_ingress);
                flows.push(otherwise(eb, fields.0, *ip, list.otherwise, &to_ingress));
            }
            if let Some(list) = &pod.ingress {
                let fields = ("nw_dst", "nw_src");
                direction_flows(&mut flows, (i, ib), fields, *ip, &list.admin, &admit);
                direction_flows(&mut flows, (ib, f), fields, *ip, &list.below, &admit);
                flows.push(otherwise(ib, fields.0, *ip, list.otherwise, &admit));
            }
        }
    }
    flows
}

/// Service load balancing in OpenFlow, as AntreaProxy does it: a new
/// connection to `clusterIP:port` with ready endpoints picks one by a hash
/// of the client's address (OpenFlow `multipath`) into reg3, with the
/// frontend's number in reg4, and the DNAT table commits it
/// to conntrack DNATed to that endpoint. The policy tables then judge the
/// endpoint's address and port, wherever it is (a pod here, another node,
/// outside the cluster), and the entry's `ct(nat)` translates the
/// connection's later packets and replies. Its packets leave the switch
/// already DNATed, so the node's kube-proxy rules do not match them again.
/// Antrea's select group hashes each connection in the kernel; `multipath`
/// hashes in ovs-vswitchd, so a hash over the ports would make every new
/// connection's first packet an upcall, which drops without a reason: per
/// client, the kernel's cached flows judge its next connections.
fn service_flows(flows: &mut Vec<String>, frontends: &[Frontend]) {
    let (s, d, e, z) = (TABLE_SERVICE, TABLE_DNAT, TABLE_EGRESS, CT_ZONE);
    let balanced = frontends
        .iter()
        .filter(|f| f.ip.is_ipv4() && !f.endpoints.is_empty());
    for (number, f) in balanced.enumerate() {
        let l4 = f.protocol.nft();
        let endpoints: Vec<_> = f.endpoints.iter().filter(|(ip, _)| ip.is_ipv4()).collect();
        let n = endpoints.len();
        flows.push(format!(
            "table={s},priority={PASS_PRIORITY},ct_state=+new+trk,{l4},nw_dst={},tp_dst={},actions=load:{number}->NXM_NX_REG4[],multipath(nw_src,{number},modulo_n,{n},0,NXM_NX_REG3[0..15]),resubmit(,{d})",
            f.ip, f.port
        ));
        for (link, (ip, port)) in endpoints.into_iter().enumerate() {
            flows.push(format!(
                "table={d},priority={PASS_PRIORITY},{l4},reg4={number},reg3={link},actions=ct(commit,zone={z},nat(dst={ip}:{port}),table={e})"
            ));
        }
    }
}

/// One pod's rules in `table`, first match first: Allow does `allow`, Deny
/// drops, Pass goes on to `below` (the table after).
fn direction_flows(
    flows: &mut Vec<String>,
    (table, below): (u8, u8),
    (pod_field, peer_field): (&str, &str),
    pod_ip: IpAddr,
    rules: &[MatchRule],
    allow: &str,
) {
    for (rank, r) in rules.iter().enumerate() {
        let priority = RULE_PRIORITY
            .saturating_sub(rank as u16)
            .max(OTHERWISE_PRIORITY + 1);
        let m = &r.matches;
        // OpenFlow cannot subtract: the peers minus their exceptions, as
        // the prefixes that cover exactly the rest.
        let peers: Vec<String> = m
            .peers
            .iter()
            .filter(|(p, _)| p.is_ipv4())
            .flat_map(|(p, len)| subtract((*p, *len), &m.except))
            .map(|(p, len)| format!("{p}/{len}"))
            .collect();
        let ports: Vec<String> = match m.ports {
            None => vec!["ip".to_string()],
            Some((l4, lo, hi)) => port_masks(lo, hi)
                .into_iter()
                .map(|(v, m)| format!("{},tp_dst=0x{v:x}/0x{m:x}", l4.nft()))
                .collect(),
        };
        let actions = match r.action {
            Action::Allow => allow.to_string(),
            Action::Deny => "drop".to_string(),
            Action::Pass => format!("goto_table:{below}"),
        };
        for peer in &peers {
            for port in &ports {
                flows.push(format!(
                    "table={table},priority={priority},ct_state=+trk+new,{port},{pod_field}={pod_ip},{peer_field}={peer},actions={actions}"
                ));
            }
        }
    }
}

/// The end of a pod's list: allowed, or the drop (an empty action list).
fn otherwise(table: u8, pod_field: &str, pod_ip: IpAddr, action: Action, allow: &str) -> String {
    let actions = match action {
        Action::Deny => "drop",
        Action::Allow | Action::Pass => allow,
    };
    format!(
        "table={table},priority={OTHERWISE_PRIORITY},ct_state=+trk+new,ip,{pod_field}={pod_ip},actions={actions}"
    )
}

/// The prefixes covering exactly `net` minus `except`: halves of `net`
/// until each lies wholly outside every exception.
fn subtract(net: (IpAddr, u8), except: &[(IpAddr, u8)]) -> Vec<(IpAddr, u8)> {
    let (addr, len) = net;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    // Inside an exception: nothing left.
    if except
        .iter()
        .any(|(e, el)| *el <= len && in_prefix(addr, *e, *el))
    {
        return Vec::new();
    }
    // No exception inside: all of it.
    if !except
        .iter()
        .any(|(e, el)| *el > len && in_prefix(*e, addr, len))
        || len >= max
    {
        return vec![(mask(addr, len), len)];
    }
    let low = mask(addr, len);
    let high = match low {
        IpAddr::V4(v4) => IpAddr::V4((u32::from(v4) | (1 << (31 - u32::from(len)))).into()),
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) | (1 << (127 - u32::from(len)))).into()),
    };
    let mut out = subtract((low, len + 1), except);
    out.extend(subtract((high, len + 1), except));
    out
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = u32::MAX
                .checked_shl(32 - u32::from(len.min(32)))
                .unwrap_or(0);
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = u128::MAX
                .checked_shl(128 - u32::from(len.min(128)))
                .unwrap_or(0);
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
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
        let frontends = services::frontends(cluster).map_err(|e| LabError::Spec(e.to_string()))?;
        let node_ips: Vec<IpAddr> = self.nodes.iter().map(|n| IpAddr::V4(n.ip)).collect();
        let cx = PolicyContext {
            frontends: &frontends,
            node_ips: &node_ips,
            police_host_to_pod: options.police_host_to_pod,
            gateway_port: 0,
        };
        for n in &self.nodes {
            let lists = enforce::compile_first_match(cluster, &n.name, options)
                .map_err(|e| LabError::Spec(e.to_string()))?;
            let switch = self.switch(&n.name)?;
            let cx = PolicyContext {
                gateway_port: switch.gateway_port,
                ..cx
            };
            switch.set_flows(&policy_flows(&lists, &cx))?;
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
    fn exceptions_leave_the_prefixes_that_cover_exactly_the_rest() {
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let rest = subtract(
            (ip("10.244.0.0"), 16),
            &[(ip("10.244.1.0"), 24), (ip("10.244.200.7"), 32)],
        );
        for a in [
            "10.244.0.9",
            "10.244.1.3",
            "10.244.2.1",
            "10.244.200.7",
            "10.244.200.8",
            "10.245.0.1",
        ] {
            let covered = rest
                .iter()
                .filter(|(p, l)| in_prefix(ip(a), *p, *l))
                .count();
            let want = in_prefix(ip(a), ip("10.244.0.0"), 16)
                && !in_prefix(ip(a), ip("10.244.1.0"), 24)
                && a != "10.244.200.7";
            assert_eq!(covered, usize::from(want), "{a}: {rest:?}");
        }
        assert_eq!(
            subtract((ip("10.0.0.0"), 8), &[]),
            vec![(ip("10.0.0.0"), 8)]
        );
        assert!(subtract((ip("10.1.0.0"), 16), &[(ip("10.0.0.0"), 8)]).is_empty());
        assert!(rest.len() <= 2 * (32 - 16), "{}", rest.len());
    }

    /// The flows of `pods` run on a new connection's first packet from
    /// table 1 (after conntrack), as ovs-vswitchd picks flows: the highest
    /// priority that matches. Whether it reaches forwarding admitted.
    fn run(flows: &[String], src: &str, dst: &str, proto: &str, port: u16) -> bool {
        let mut table = TABLE_EGRESS;
        for _ in 0..10 {
            let best = flows
                .iter()
                .filter(|f| f.starts_with(&format!("table={table},")))
                .filter(|f| matches(f, src, dst, proto, port))
                .max_by_key(|f| priority(f))
                .unwrap_or_else(|| panic!("no flow in table {table} for {src} -> {dst}"));
            let actions = best.split("actions=").nth(1).unwrap();
            if actions == "drop" {
                return false;
            }
            if actions == ADMIT {
                return true;
            }
            if let Some(next) = actions.strip_prefix(&format!("ct(commit,zone={CT_ZONE}),")) {
                assert_eq!(next, format!("goto_table:{TABLE_FORWARD}"));
                return true;
            }
            let next: u8 = actions
                .strip_prefix("goto_table:")
                .unwrap()
                .parse()
                .unwrap();
            assert!(next > table, "{best}: tables only go forward");
            if next == TABLE_FORWARD {
                return true;
            }
            table = next;
        }
        panic!("too many tables");
    }

    fn priority(flow: &str) -> u16 {
        flow.split(',')
            .find_map(|f| f.strip_prefix("priority="))
            .unwrap()
            .parse()
            .unwrap()
    }

    fn matches(flow: &str, src: &str, dst: &str, proto: &str, port: u16) -> bool {
        let body = flow.split(",actions=").next().unwrap();
        body.split(',').all(|field| {
            let (k, v) = field.split_once('=').unwrap_or((field, ""));
            let addr = |a: &str| {
                let (p, l) = v.split_once('/').unwrap_or((v, "32"));
                in_prefix(a.parse().unwrap(), p.parse().unwrap(), l.parse().unwrap())
            };
            match k {
                "table" | "priority" | "ip" => true,
                "ct_state" => v == "+trk+new",
                "tcp" | "udp" | "sctp" => k == proto,
                "nw_src" => addr(src),
                "nw_dst" => addr(dst),
                "tp_dst" => {
                    let (val, m) = v.split_once('/').unwrap();
                    let hex =
                        |h: &str| u16::from_str_radix(h.trim_start_matches("0x"), 16).unwrap();
                    port & hex(m) == hex(val)
                }
                other => panic!("unexpected match {other} in {flow}"),
            }
        })
    }

    #[test]
    fn first_match_lists_become_priorities_with_deny_allow_and_pass() {
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let rule = |peer: &str, len, except: &[(&str, u8)], ports, action| MatchRule {
            matches: enforce::Allow {
                peers: vec![(ip(peer), len)],
                except: except.iter().map(|(e, l)| (ip(e), *l)).collect(),
                ports,
            },
            action,
        };
        use enforce::L4::{Tcp, Udp};
        let server = PodFirstMatch {
            pod: "x/server".into(),
            host_if: "server-1a2b3c".into(),
            ips: vec![ip("10.244.1.2")],
            ingress: Some(enforce::FirstMatch {
                admin: vec![
                    rule("10.244.7.0", 24, &[], Some((Tcp, 80, 80)), Action::Deny),
                    rule("10.244.8.0", 24, &[], None, Action::Pass),
                    rule(
                        "10.244.0.0",
                        16,
                        &[("10.244.9.0", 24)],
                        Some((Udp, 53, 53)),
                        Action::Allow,
                    ),
                ],
                below: vec![rule(
                    "10.244.0.0",
                    16,
                    &[],
                    Some((Tcp, 80, 81)),
                    Action::Allow,
                )],
                otherwise: Action::Deny,
            }),
            egress: Some(enforce::FirstMatch {
                admin: Vec::new(),
                below: vec![rule("192.0.2.0", 24, &[], None, Action::Deny)],
                otherwise: Action::Allow,
            }),
        };
        let frontend = |vip: &str, port, protocol, endpoints: &[(&str, u16)]| Frontend {
            service: "x/svc".into(),
            ip: ip(vip),
            port,
            protocol,
            endpoints: endpoints.iter().map(|(a, p)| (ip(a), *p)).collect(),
        };
        let frontends = [
            frontend("10.96.0.10", 53, Udp, &[]),
            frontend(
                "10.96.0.20",
                443,
                Tcp,
                &[("192.0.2.7", 6443), ("198.51.100.1", 6443)],
            ),
        ];
        let cx = PolicyContext {
            frontends: &frontends,
            node_ips: &[ip("172.18.0.2")],
            police_host_to_pod: false,
            gateway_port: 1,
        };
        let flows = policy_flows(&[server], &cx);
        let to_server =
            |src: &str, proto: &str, port: u16| run(&flows, src, "10.244.1.2", proto, port);
        // Denied by the Admin tier although allowed below it.
        assert!(!to_server("10.244.7.5", "tcp", 80));
        // Passed: the NetworkPolicy below decides.
        assert!(to_server("10.244.8.5", "tcp", 81));
        assert!(!to_server("10.244.8.5", "udp", 53), "passed, then isolated");
        // Allowed by the Admin tier although isolated below it.
        assert!(to_server("10.244.3.1", "udp", 53));
        assert!(
            !to_server("10.244.9.1", "udp", 53),
            "an exception of the Allow"
        );
        assert!(!to_server("198.51.100.1", "tcp", 80), "isolated");
        assert!(to_server("172.18.0.2", "tcp", 9), "the node itself");
        assert!(
            to_server(&GATEWAY_IP.to_string(), "tcp", 9),
            "the node from its gateway address (a hostNetwork pod's connect)"
        );
        // Egress: a Baseline-style Deny, then allowed.
        assert!(!run(&flows, "10.244.1.2", "192.0.2.7", "tcp", 443));
        assert!(run(&flows, "10.244.1.2", "198.51.100.1", "tcp", 443));
        assert!(
            run(&flows, "10.244.1.2", "10.96.0.10", "udp", 53),
            "a Service without endpoints: up to the node's REJECT"
        );
        // A Service with endpoints: balanced over both, DNATed in the
        // switch, then judged as the endpoint by the egress tables above.
        let balance = flows
            .iter()
            .find(|f| f.contains("nw_dst=10.96.0.20,tp_dst=443"))
            .unwrap();
        assert!(
            balance.starts_with(&format!("table={TABLE_SERVICE},"))
                && balance.contains(",ct_state=+new+trk,tcp,")
                && balance.contains(",modulo_n,2,0,NXM_NX_REG3[0..15])")
                && balance.ends_with(&format!("resubmit(,{TABLE_DNAT})")),
            "{balance}"
        );
        let number = balance
            .split("load:")
            .nth(1)
            .and_then(|r| r.split("->").next())
            .unwrap();
        for (link, backend) in ["192.0.2.7:6443", "198.51.100.1:6443"].iter().enumerate() {
            let dnat = format!(
                "table={TABLE_DNAT},priority={PASS_PRIORITY},tcp,reg4={number},reg3={link},actions=ct(commit,zone={CT_ZONE},nat(dst={backend}),table={TABLE_EGRESS})"
            );
            assert!(flows.contains(&dnat), "{dnat} in {flows:#?}");
        }
        assert!(!run(&flows, "10.244.1.2", "192.0.2.7", "tcp", 6443));
        assert!(run(&flows, "10.244.1.2", "198.51.100.1", "tcp", 6443));
        const { assert!(TABLE_SERVICE < TABLE_DNAT && TABLE_DNAT < TABLE_EGRESS) };
        // The Admin tier's Deny is a drop (an empty action list) above the
        // Pass, above the rest.
        let deny = flows
            .iter()
            .find(|f| f.contains("nw_src=10.244.7.0/24"))
            .unwrap();
        assert!(deny.ends_with("actions=drop"), "{deny}");
        let pass = flows
            .iter()
            .find(|f| f.contains("nw_src=10.244.8.0/24"))
            .unwrap();
        assert!(
            pass.ends_with(&format!("actions=goto_table:{TABLE_INGRESS_BELOW}")),
            "{pass}"
        );
        assert!(priority(deny) > priority(pass));
        assert!(
            ADMIT.contains(&format!("zone={CT_ZONE},"))
                && ADMIT.ends_with(&format!("table={TABLE_FORWARD})")),
            "{ADMIT}"
        );
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
