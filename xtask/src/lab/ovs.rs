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
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::system::{LabError, io, ip_batch, run, slowed};

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
    /// Flows added on top of forwarding (drops), kept across re-renders.
    extra: Vec<String>,
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
            extra: Vec::new(),
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
    pub fn add_flows(&mut self, flows: &[String]) -> Result<(), LabError> {
        self.extra.extend(flows.iter().cloned());
        self.flows()
    }

    /// Replace the flows added with [`OvsSwitch::add_flows`].
    pub fn set_flows(&mut self, flows: &[String]) -> Result<(), LabError> {
        self.extra = flows.to_vec();
        self.flows()
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
        let out = run("ip", &["netns", "exec", &self.netns, "ovs-dpctl", "dump-flows"])?;
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
        let mut flows = self.extra.clone();
        // Table 0 holds drops added by hand and, with a policy, the way
        // into conntrack; the rest goes straight to forwarding.
        flows.push(format!("table=0,priority=0,actions=goto_table:{TABLE_FORWARD}"));
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

/// The MAC address of `interface` in `netns`.
pub fn mac_of(netns: &str, interface: &str) -> Result<String, LabError> {
    let out = run("ip", &["-n", netns, "-br", "link", "show", "dev", interface])?;
    out.split_whitespace()
        .find(|w| w.len() == 17 && w.matches(':').count() == 5)
        .map(str::to_string)
        .ok_or_else(|| LabError::Spec(format!("no MAC address for {interface} in {netns}")))
}

fn wait_for(path: &Path, what: &str) -> Result<(), LabError> {
    let deadline = Instant::now() + slowed(Duration::from_secs(10));
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(LabError::Spec(format!("{what} ({}) did not appear", path.display())));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
