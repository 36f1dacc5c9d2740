//! Incident scenarios: a folder of Kubernetes manifests and a
//! `scenario.yaml` that says what traffic the application drives and what
//! netwatch must report. The runner builds a lab from the manifests, enforces
//! their NetworkPolicies, cluster policies (ClusterNetworkPolicy,
//! AdminNetworkPolicy, BaselineAdminNetworkPolicy) and Services the way a
//! CNI and kube-proxy do, runs
//! one agent per lab node in standalone mode, drives the traffic, and checks:
//!
//! - every probe ends as the scenario says (connected, timeout, refused);
//! - the flows the scenario lists appear in the right node's flow log, with
//!   their verdict, reason, pods, service and denying policies;
//! - the enforcer and the policy engine agree: every probe the engine
//!   (`netwatch explain`) denies was stopped by the kernel, every packet the
//!   kernel dropped under a policy is explained by the engine as denied;
//! - `netwatch lint` finds what the scenario says it finds;
//! - for traffic marked `fix: true`, the policy `netwatch explain --suggest`
//!   prints restores exactly those flows and changes no other verdict.
//!
//! A failed check is a line naming the flow; the run returns them all.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde::Deserialize;
use serde_json::Value;

use crate::{
    EnforceOptions, Lab, LabCluster, LabError, LabSpec, Manifests, Outcome, Probe, ProbeResult,
    manifests::ManifestError,
};

/// Errors loading or running a scenario (not failed checks: those are
/// collected in a [`Report`]).
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a scenario file: {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("scenario {scenario}: {detail}")]
    Invalid { scenario: String, detail: String },
    #[error(transparent)]
    Manifests(#[from] ManifestError),
    #[error(transparent)]
    Lab(#[from] LabError),
    #[error("lab enforcement: {0}")]
    Enforce(String),
    #[error("{0}")]
    Agent(String),
}

/// `scenario.yaml`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioSpec {
    #[serde(default)]
    pub description: String,
    /// Manifest files or folders, relative to the scenario folder.
    pub manifests: Vec<String>,
    /// Lab nodes and whether their CNI enforces policy (default: the nodes
    /// the pods name, all enforcing).
    #[serde(default)]
    pub nodes: Vec<ScenarioNode>,
    /// Listeners outside the cluster, on the lab's world router.
    #[serde(default)]
    pub world: Vec<String>,
    /// The datapath the lab emulates (routed unless set; `cargo xtask demo
    /// --datapath` overrides it).
    #[serde(default)]
    pub datapath: Option<crate::Datapath>,
    /// A single phase can be written at the top level.
    #[serde(default)]
    pub lint: Option<LintExpectation>,
    #[serde(default)]
    pub traffic: Vec<Traffic>,
    #[serde(default)]
    pub flows: Vec<FlowExpectation>,
    #[serde(default)]
    pub phases: Vec<Phase>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioNode {
    pub name: String,
    #[serde(default = "yes")]
    pub enforce: bool,
}

fn yes() -> bool {
    true
}

/// One step of a scenario: manifests applied, then traffic and checks.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    pub name: String,
    /// Manifest files or folders applied at the start of the phase (objects
    /// with the same kind, namespace and name are replaced).
    #[serde(default)]
    pub apply: Vec<String>,
    #[serde(default)]
    pub lint: Option<LintExpectation>,
    #[serde(default)]
    pub traffic: Vec<Traffic>,
    #[serde(default)]
    pub flows: Vec<FlowExpectation>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LintExpectation {
    /// Strings `netwatch lint`'s output must contain (it must also exit 1).
    #[serde(default)]
    pub findings_contain: Vec<String>,
}

/// What the client probes: `udp`, `tcp`, or a DNS query.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum TrafficProtocol {
    #[default]
    Tcp,
    Udp,
    Dns,
}

/// One kind of request the application makes, probed from the client pod.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Traffic {
    /// `namespace/pod`.
    pub from: String,
    /// A pod (`namespace/pod`), a service (`namespace/name`, its cluster IP)
    /// or an address; exactly one.
    #[serde(default)]
    pub to: Option<String>,
    #[serde(default)]
    pub to_service: Option<String>,
    #[serde(default)]
    pub to_ip: Option<IpAddr>,
    pub port: u16,
    #[serde(default)]
    pub protocol: TrafficProtocol,
    /// connected (TCP), answered (UDP, DNS), timeout, refused.
    pub expect: Expect,
    /// Apply `netwatch explain --suggest`'s policy for it in the fix phase.
    #[serde(default)]
    pub fix: bool,
    /// The policies deny it but nothing enforces that (POLICY_NOT_ENFORCED):
    /// left out of the enforcer/engine agreement check.
    #[serde(default)]
    pub not_enforced: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Expect {
    Connected,
    Answered,
    Timeout,
    Refused,
}

impl Expect {
    fn matches(self, o: Outcome) -> bool {
        matches!(
            (self, o),
            (Expect::Connected, Outcome::Connected)
                | (Expect::Answered, Outcome::Answered)
                | (Expect::Timeout, Outcome::TimedOut)
                | (Expect::Refused, Outcome::Refused)
        )
    }
    fn reached(self) -> bool {
        matches!(self, Expect::Connected | Expect::Answered)
    }
}

/// A flow netwatch must report.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowExpectation {
    pub from: String,
    #[serde(default)]
    pub to: Option<String>,
    #[serde(default)]
    pub to_service: Option<String>,
    #[serde(default)]
    pub to_ip: Option<IpAddr>,
    pub port: u16,
    #[serde(default)]
    pub protocol: Option<String>,
    pub verdict: String,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub refusal: Option<String>,
    /// The service the client addressed (`namespace/name`).
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub destination_identity: Option<String>,
    #[serde(default)]
    pub egress_denied_by: Option<Vec<String>>,
    #[serde(default)]
    pub ingress_denied_by: Option<Vec<String>>,
    #[serde(default)]
    pub near_miss_contains: Option<String>,
    /// `traffic_direction`: the side whose policy stopped it.
    #[serde(default)]
    pub direction: Option<String>,
    #[serde(default)]
    pub explanation: Option<String>,
    /// The agent that reports it (default: the first node).
    #[serde(default)]
    pub node: Option<String>,
}

/// A scenario folder.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: String,
    pub dir: PathBuf,
    pub spec: ScenarioSpec,
}

impl Scenario {
    pub fn load(dir: &Path) -> Result<Scenario, ScenarioError> {
        let path = dir.join("scenario.yaml");
        let text = std::fs::read_to_string(&path).map_err(|source| ScenarioError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let spec: ScenarioSpec =
            serde_yaml::from_str(&text).map_err(|source| ScenarioError::Parse {
                path: path.display().to_string(),
                source,
            })?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Scenario {
            name,
            dir: dir.to_path_buf(),
            spec,
        })
    }

    /// The phases to run: the explicit ones, or the top-level one.
    pub fn phases(&self) -> Vec<Phase> {
        if !self.spec.phases.is_empty() {
            return self.spec.phases.clone();
        }
        vec![Phase {
            name: "main".into(),
            apply: Vec::new(),
            lint: self.spec.lint.clone(),
            traffic: self.spec.traffic.clone(),
            flows: self.spec.flows.clone(),
        }]
    }

    fn invalid(&self, detail: impl Into<String>) -> ScenarioError {
        ScenarioError::Invalid {
            scenario: self.name.clone(),
            detail: detail.into(),
        }
    }
}

/// The programs a run needs.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// The `netwatch-lab` binary (in-pod listeners and probes).
    pub helper: PathBuf,
    pub agent: PathBuf,
    /// The `netwatch` CLI.
    pub netwatch: PathBuf,
}

/// One agent on one lab node.
pub struct NodeAgent {
    pub node: String,
    child: Option<Child>,
    pub flow_log: PathBuf,
    pub log: PathBuf,
    pub api_socket: PathBuf,
}

impl NodeAgent {
    /// The flow log's records (`flow` objects) so far.
    pub fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.flow_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|v| v["flow"].clone())
            .collect()
    }

    /// SIGTERM and wait (final records are written).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A scenario's lab, enforcement and agents, up.
pub struct ScenarioRun {
    pub scenario: Scenario,
    /// Before `lab`: fields drop in order, and the agents must be gone
    /// before the lab removes the namespaces and cgroups they work in.
    pub agents: Vec<NodeAgent>,
    pub lab: Lab,
    pub cluster: LabCluster,
    /// The manifests the agents read (`--manifests`), one file per source.
    pub manifests_dir: PathBuf,
    bins: Binaries,
    workdir: PathBuf,
    enforcing: BTreeMap<String, bool>,
    applied: usize,
}

impl ScenarioRun {
    /// Build the lab from the scenario's base manifests, enforce, start the
    /// agents. `agent_args` are added to every agent's command line.
    pub fn start(
        scenario: &Scenario,
        bins: &Binaries,
        workdir: &Path,
        agent_args: &[String],
    ) -> Result<ScenarioRun, ScenarioError> {
        let manifests_dir = workdir.join("manifests");
        std::fs::create_dir_all(&manifests_dir).map_err(|source| ScenarioError::Read {
            path: manifests_dir.display().to_string(),
            source,
        })?;
        let mut manifests = Manifests::default();
        let mut copied = 0;
        for rel in &scenario.spec.manifests {
            let path = scenario.dir.join(rel);
            manifests.extend(Manifests::load(&path)?);
            copied += copy_manifests(&path, &manifests_dir, copied)?;
        }
        let (mut spec, _notes) = LabSpec::from_manifests(&manifests)?;
        spec.world = scenario.spec.world.clone();
        spec.datapath = scenario.spec.datapath.unwrap_or_default();
        let mut enforcing = BTreeMap::new();
        for n in &scenario.spec.nodes {
            if !spec.nodes.iter().any(|s| s.name == n.name) {
                spec.nodes.push(crate::NodeSpec {
                    name: n.name.clone(),
                    ..Default::default()
                });
            }
            enforcing.insert(n.name.clone(), n.enforce);
        }
        for n in &spec.nodes {
            enforcing.entry(n.name.clone()).or_insert(true);
        }
        let lab = Lab::up(&spec, &bins.helper)?;
        let cluster = LabCluster::new(manifests, lab.placements())
            .map_err(|e| ScenarioError::Enforce(e.to_string()))?;
        let mut run = ScenarioRun {
            scenario: scenario.clone(),
            lab,
            agents: Vec::new(),
            cluster,
            manifests_dir,
            bins: bins.clone(),
            workdir: workdir.to_path_buf(),
            enforcing,
            applied: copied,
        };
        run.enforce()?;
        let nodes: Vec<String> = run.lab.nodes.iter().map(|n| n.name.clone()).collect();
        // All agents load their programs at once: on an emulated CPU that
        // is most of a scenario's start.
        for node in nodes {
            let agent = run.spawn_agent(&node, agent_args)?;
            run.agents.push(agent);
        }
        for agent in &mut run.agents {
            let pods = run
                .lab
                .pods
                .iter()
                .filter(|p| p.spec.node == agent.node && !p.host_if.is_empty())
                .count();
            ScenarioRun::wait_ready(agent, pods)?;
        }
        Ok(run)
    }

    /// (Re)load the enforcer's rules and the service proxy on every node.
    fn enforce(&mut self) -> Result<(), ScenarioError> {
        self.lab
            .enforce(&self.cluster, &EnforceOptions::default())
            .map_err(|e| ScenarioError::Enforce(e.to_string()))?;
        // Nodes whose CNI is "not running": no policy table at all.
        for (node, on) in &self.enforcing {
            if !on {
                self.lab.stop_enforcing(node)?;
            }
        }
        self.lab
            .proxy_services(&self.cluster)
            .map_err(|e| ScenarioError::Enforce(e.to_string()))?;
        Ok(())
    }

    fn spawn_agent(&self, node: &str, extra: &[String]) -> Result<NodeAgent, ScenarioError> {
        let dir = self.workdir.join(node);
        std::fs::create_dir_all(&dir).map_err(|source| ScenarioError::Read {
            path: dir.display().to_string(),
            source,
        })?;
        let flow_log = dir.join("flows.jsonl");
        let log = dir.join("agent.log");
        let api_socket = dir.join("api.sock");
        let lab_node = self.lab.node(node)?;
        let stderr = std::fs::File::create(&log).map_err(|source| ScenarioError::Read {
            path: log.display().to_string(),
            source,
        })?;
        let child = self
            .lab
            .on_node(node, &self.bins.agent)?
            // The default interface patterns: they must find each
            // datapath's pod interfaces (and only those) by themselves.
            .args(["--node-name", node, "--own-netns-only"])
            .arg("--manifests")
            .arg(&self.manifests_dir)
            .arg("--flow-log")
            .arg(&flow_log)
            .arg("--api-socket")
            .arg(&api_socket)
            .arg("--cgroup-root")
            .arg(&lab_node.cgroup_root)
            .args([
                "--metrics-addr",
                "127.0.0.1:9965",
                "--connect-timeout",
                "1",
                "--update-interval",
                "1",
                "--idle-timeout",
                "3",
            ])
            .args(extra)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| ScenarioError::Agent(format!("starting netwatch-agent on {node}: {e}")))?;
        Ok(NodeAgent {
            node: node.to_string(),
            child: Some(child),
            flow_log,
            log,
            api_socket,
        })
    }

    /// Until `agent` captures on its node's `pods` pod interfaces.
    fn wait_ready(agent: &mut NodeAgent, pods: usize) -> Result<(), ScenarioError> {
        let node = agent.node.clone();
        // Stretched under emulation (the VM matrix): loading BTF and the
        // programs takes the agent most of this there.
        let wait = crate::slowed(Duration::from_secs(30));
        let deadline = Instant::now() + wait;
        loop {
            let text = std::fs::read_to_string(&agent.log).unwrap_or_default();
            if text.contains("capturing") && text.matches("attached TC classifiers").count() >= pods
            {
                return Ok(());
            }
            if let Some(c) = agent.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                return Err(ScenarioError::Agent(format!(
                    "netwatch-agent on {node} exited ({status}):\n{text}"
                )));
            }
            if Instant::now() > deadline {
                return Err(ScenarioError::Agent(format!(
                    "netwatch-agent on {node} not ready after {} s:\n{text}",
                    wait.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Apply more manifests (a phase's change or a fix): the lab re-enforces,
    /// the agents reload their manifests.
    pub fn apply(&mut self, path: &Path) -> Result<(), ScenarioError> {
        let mut manifests = self.cluster.manifests.clone();
        manifests.extend(Manifests::load(path)?);
        self.applied += copy_manifests(path, &self.manifests_dir, self.applied)?;
        self.cluster = LabCluster::new(manifests, self.lab.placements())
            .map_err(|e| ScenarioError::Enforce(e.to_string()))?;
        self.enforce()?;
        // The agents poll their manifests every second.
        std::thread::sleep(Duration::from_millis(2500));
        Ok(())
    }

    /// Where a traffic item goes: the probed address and port, and the
    /// backend (pod or address) and port the policies judge.
    pub fn target(&self, t: &Traffic) -> Result<(IpAddr, u16, String, u16), ScenarioError> {
        // Scenarios probe over IPv4 (a pod's first address if it has none).
        let pod_ip = |id: &str| -> Result<IpAddr, ScenarioError> {
            self.cluster
                .pod(id)
                .and_then(|p| {
                    p.ips
                        .iter()
                        .copied()
                        .find(IpAddr::is_ipv4)
                        .or(p.ips.first().copied())
                })
                .ok_or_else(|| {
                    self.scenario
                        .invalid(format!("no pod {id} with an address in the manifests"))
                })
        };
        match (&t.to, &t.to_service, &t.to_ip) {
            (Some(pod), None, None) => Ok((pod_ip(pod)?, t.port, pod.clone(), t.port)),
            (None, None, Some(ip)) => Ok((*ip, t.port, ip.to_string(), t.port)),
            (None, Some(svc), None) => {
                let frontends = crate::services::frontends(&self.cluster)
                    .map_err(|e| ScenarioError::Enforce(e.to_string()))?;
                let proto = match t.protocol {
                    TrafficProtocol::Tcp => "tcp",
                    TrafficProtocol::Udp | TrafficProtocol::Dns => "udp",
                };
                let f = frontends
                    .iter()
                    .find(|f| {
                        f.service == *svc
                            && f.port == t.port
                            && f.protocol.nft() == proto
                            && f.ip.is_ipv4()
                    })
                    .ok_or_else(|| {
                        self.scenario
                            .invalid(format!("service {svc} has no {proto} port {}", t.port))
                    })?;
                // The policies judge the backend: a pod, or an address (the API server).
                match f.endpoints.first() {
                    Some((ip, port)) => {
                        let peer = self
                            .cluster
                            .pods
                            .iter()
                            .find(|p| p.ips.contains(ip))
                            .map(|p| p.id())
                            .unwrap_or_else(|| ip.to_string());
                        Ok((f.ip, t.port, peer, *port))
                    }
                    None => Ok((f.ip, t.port, String::new(), 0)),
                }
            }
            _ => Err(self.scenario.invalid(format!(
                "traffic from {}: give exactly one of to, to_service, to_ip",
                t.from
            ))),
        }
    }

    /// Probe one traffic item.
    pub fn probe(&self, t: &Traffic) -> Result<ProbeResult, ScenarioError> {
        let (ip, port, _, _) = self.target(t)?;
        let to = SocketAddr::new(ip, port);
        // Clients retransmit: the kernel a SYN after 1 s (then 3 s), a
        // resolver its query. On Open vSwitch the first packet of a new
        // megaflow is judged in ovs-vswitchd, where a drop never reaches
        // kfree_skb: a retransmission is the packet whose drop the kernel
        // names. A slow switch (a loaded VM) may not have installed the
        // megaflow by the first one, so there the probe waits for a second.
        let timeout = match self.lab.datapath {
            crate::Datapath::Ovs => Duration::from_secs(4),
            _ => Duration::from_secs(2),
        };
        let probe = match t.protocol {
            TrafficProtocol::Tcp => Probe::tcp(to, timeout),
            TrafficProtocol::Udp => Probe::udp(to, timeout),
            TrafficProtocol::Dns => Probe::dns(to, timeout),
        }
        .resending_after(Duration::from_secs(1));
        Ok(self.lab.probe(&t.from, &probe)?)
    }

    /// `netwatch explain` on the current manifests, as JSON.
    pub fn explain(
        &self,
        from: &str,
        to: &str,
        port: u16,
        protocol: &str,
        extra: &[&str],
    ) -> Result<(Value, String), ScenarioError> {
        let out = Command::new(&self.bins.netwatch)
            .arg("explain")
            .arg("--manifests")
            .arg(&self.manifests_dir)
            .args([
                "--from",
                from,
                "--to",
                to,
                "--port",
                &port.to_string(),
                "--protocol",
                protocol,
            ])
            .args(extra)
            .output()
            .map_err(|e| ScenarioError::Agent(format!("running netwatch explain: {e}")))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(ScenarioError::Agent(format!(
                "netwatch explain --from {from} --to {to} --port {port} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let json = serde_json::from_str(&stdout).unwrap_or(Value::Null);
        Ok((json, stdout))
    }

    /// `netwatch explain --matrix -o json` on the current manifests.
    fn matrix(&self, ports: &str, protocols: &str) -> Result<Vec<Value>, ScenarioError> {
        let out = Command::new(&self.bins.netwatch)
            .arg("explain")
            .arg("--manifests")
            .arg(&self.manifests_dir)
            .args([
                "--matrix",
                "--ports",
                ports,
                "--protocols",
                protocols,
                "-o",
                "json",
            ])
            .output()
            .map_err(|e| ScenarioError::Agent(format!("running netwatch explain --matrix: {e}")))?;
        Ok(serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap_or_default())
    }

    pub fn agent(&self, node: &str) -> Option<&NodeAgent> {
        self.agents.iter().find(|a| a.node == node)
    }
}

/// Copy a manifest file or folder into the agents' manifests folder, with a
/// sequence prefix so later files win; returns how many files were copied.
fn copy_manifests(src: &Path, dst: &Path, start: usize) -> Result<usize, ScenarioError> {
    let mut files = Vec::new();
    collect_files(src, &mut files);
    files.sort();
    for (i, f) in files.iter().enumerate() {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let to = dst.join(format!("{:03}-{name}", start + i));
        std::fs::copy(f, &to).map_err(|source| ScenarioError::Read {
            path: f.display().to_string(),
            source,
        })?;
    }
    Ok(files.len())
}

fn collect_files(p: &Path, out: &mut Vec<PathBuf>) {
    if p.is_dir() {
        if let Ok(d) = std::fs::read_dir(p) {
            for e in d.flatten() {
                collect_files(&e.path(), out);
            }
        }
    } else if matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    ) {
        out.push(p.to_path_buf());
    }
}

/// What a scenario check found wrong.
#[derive(Debug, Default)]
pub struct Report {
    pub scenario: String,
    pub failures: Vec<String>,
    pub checks: usize,
}

impl Report {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        self.checks += 1;
        if !ok {
            self.failures.push(what());
        }
    }

    pub fn is_clean(&self) -> bool {
        self.failures.is_empty()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "scenario {}: {} checks, {} failed",
            self.scenario,
            self.checks,
            self.failures.len()
        )?;
        for x in &self.failures {
            writeln!(f, "  FAIL {x}")?;
        }
        Ok(())
    }
}

impl Traffic {
    /// `from -> to:port PROTOCOL`, for messages.
    pub fn label(&self) -> String {
        let to = self
            .to
            .clone()
            .or(self.to_service.clone().map(|s| format!("service {s}")))
            .or(self.to_ip.map(|i| i.to_string()))
            .unwrap_or_default();
        format!("{} -> {to}:{} {:?}", self.from, self.port, self.protocol)
    }

    /// Whether the client is expected to get through.
    pub fn expect_reached(&self) -> bool {
        self.expect.reached()
    }

    /// The protocol as the policy engine names it.
    pub fn engine_protocol(&self) -> &'static str {
        match self.protocol {
            TrafficProtocol::Tcp => "TCP",
            TrafficProtocol::Udp | TrafficProtocol::Dns => "UDP",
        }
    }
}

/// A record's policy list as scenarios write it: `namespace/name` for a
/// NetworkPolicy; `Kind name (Tier) rule N "rule-name"` for the cluster
/// kinds (N counting from 1, the rule when the record names one).
fn policy_names(v: &Value) -> Vec<String> {
    let name = |p: &Value| {
        let kind = p["kind"].as_str().unwrap_or("NetworkPolicy");
        if kind == "NetworkPolicy" || kind.is_empty() {
            return format!(
                "{}/{}",
                p["namespace"].as_str().unwrap_or(""),
                p["name"].as_str().unwrap_or("")
            );
        }
        let mut s = format!(
            "{kind} {} ({})",
            p["name"].as_str().unwrap_or(""),
            p["tier"].as_str().unwrap_or("")
        );
        if let Some(index) = p["rule"]["index"].as_u64() {
            let _ = write!(s, " rule {}", index + 1);
            if let Some(n) = p["rule"]["name"].as_str() {
                let _ = write!(s, " {n:?}");
            }
        }
        s
    };
    let mut names: Vec<String> = v
        .as_array()
        .map(|a| a.iter().map(name).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// Run a whole scenario and report every failed check.
pub fn check(
    scenario: &Scenario,
    bins: &Binaries,
    workdir: &Path,
) -> Result<Report, ScenarioError> {
    let mut report = Report {
        scenario: scenario.name.clone(),
        ..Report::default()
    };
    let started = Instant::now();
    // Progress on stderr (libtest shows it with a failure): where a slow
    // run spends its time, on an emulated CPU above all.
    let step = |what: &str| {
        eprintln!(
            "scenario {}: {what} (+{:.1} s)",
            scenario.name,
            started.elapsed().as_secs_f64()
        )
    };
    let mut run = ScenarioRun::start(scenario, bins, workdir, &[])?;
    step("lab up, policies enforced, agents capturing");
    let phases = scenario.phases();
    let mut fixable = Vec::new();
    let mut all_traffic = Vec::new();
    for phase in &phases {
        for a in &phase.apply {
            run.apply(&scenario.dir.join(a))?;
        }
        if let Some(lint) = &phase.lint {
            check_lint(&run, lint, &phase.name, &mut report)?;
        }
        step(&format!("[{}] applied", phase.name));
        probe_all(&run, &phase.traffic, &phase.name, &mut report)?;
        step(&format!("[{}] probed", phase.name));
        agreement(&run, &phase.traffic, &phase.name, &mut report)?;
        step(&format!("[{}] engine agreement checked", phase.name));
        if !phase.flows.is_empty() {
            // Let the agents write what they saw (timeouts, final counts).
            std::thread::sleep(Duration::from_millis(2500));
            check_flows(&run, &phase.flows, &phase.name, &mut report)?;
            step(&format!("[{}] records checked", phase.name));
        }
        fixable.extend(phase.traffic.iter().filter(|t| t.fix).cloned());
        all_traffic = phase.traffic.clone();
    }
    if !fixable.is_empty() {
        check_fix(&mut run, &fixable, &all_traffic, &mut report)?;
        step("[fix] checked");
    }
    for a in &mut run.agents {
        a.stop();
    }
    step("agents stopped");
    explained_drops(&run, &mut report);
    let expected: Vec<FlowExpectation> = phases.iter().flat_map(|p| p.flows.clone()).collect();
    no_unexpected_not_enforced(&run, &expected, &mut report);
    Ok(report)
}

/// Probe every traffic item (in parallel) and check its outcome.
fn probe_all(
    run: &ScenarioRun,
    traffic: &[Traffic],
    phase: &str,
    report: &mut Report,
) -> Result<(), ScenarioError> {
    let results: Vec<Result<ProbeResult, ScenarioError>> = std::thread::scope(|s| {
        let handles: Vec<_> = traffic
            .iter()
            .map(|t| s.spawn(move || run.probe(t)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(ScenarioError::Agent("probe thread panicked".into())))
            })
            .collect()
    });
    for (t, r) in traffic.iter().zip(results) {
        let r = r?;
        report.check(t.expect.matches(r.outcome), || {
            format!(
                "[{phase}] {}: expected {:?}, the client saw {:?} ({})",
                t.label(),
                t.expect,
                r.outcome,
                r.detail
            )
        });
    }
    Ok(())
}

/// Every probe the engine denies was stopped; every probe it allows went
/// through (unless a service had no ready endpoint to take it).
fn agreement(
    run: &ScenarioRun,
    traffic: &[Traffic],
    phase: &str,
    report: &mut Report,
) -> Result<(), ScenarioError> {
    for t in traffic.iter().filter(|t| !t.not_enforced) {
        let (_, _, backend, port) = run.target(t)?;
        if backend.is_empty() {
            continue; // a service without ready endpoints: kube-proxy's refusal, not policy
        }
        let (v, _) = run.explain(
            &t.from,
            &backend,
            port,
            t.engine_protocol(),
            &["-o", "json"],
        )?;
        let denied = v["verdict"] == "DENIED";
        report.check(denied != t.expect.reached(), || {
            format!(
                "[{phase}] enforcer and engine disagree on {} (backend {backend}:{port}): the engine says {}, the kernel's outcome was {:?}",
                t.label(),
                v["verdict"],
                t.expect
            )
        });
    }
    Ok(())
}

fn check_lint(
    run: &ScenarioRun,
    lint: &LintExpectation,
    phase: &str,
    report: &mut Report,
) -> Result<(), ScenarioError> {
    let out = Command::new(&run.bins.netwatch)
        .arg("lint")
        .arg("--manifests")
        .arg(&run.manifests_dir)
        .output()
        .map_err(|e| ScenarioError::Agent(format!("running netwatch lint: {e}")))?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    report.check(out.status.code() == Some(1), || {
        format!(
            "[{phase}] netwatch lint should exit 1, exited {:?}:\n{text}",
            out.status.code()
        )
    });
    for needle in &lint.findings_contain {
        report.check(text.contains(needle.as_str()), || {
            format!("[{phase}] netwatch lint does not mention {needle:?}:\n{text}")
        });
    }
    Ok(())
}

/// Find the record a flow expectation describes in its node's flow log.
fn check_flows(
    run: &ScenarioRun,
    flows: &[FlowExpectation],
    phase: &str,
    report: &mut Report,
) -> Result<(), ScenarioError> {
    for e in flows {
        let node = e.node.clone().unwrap_or_else(|| {
            run.lab
                .nodes
                .first()
                .map(|n| n.name.clone())
                .unwrap_or_default()
        });
        let Some(agent) = run.agent(&node) else {
            report.check(false, || format!("[{phase}] no agent on node {node}"));
            continue;
        };
        let (from_ns, from_pod) = e.from.split_once('/').unwrap_or(("", e.from.as_str()));
        let matches_to = |f: &Value| -> bool {
            if let Some(to) = &e.to {
                let (ns, pod) = to.split_once('/').unwrap_or(("", to));
                f["destination"]["namespace"] == ns && f["destination"]["pod_name"] == pod
            } else if let Some(svc) = &e.to_service {
                let (ns, name) = svc.split_once('/').unwrap_or(("", svc));
                f["destination"]["service"]["namespace"] == ns
                    && f["destination"]["service"]["name"] == name
            } else if let Some(ip) = e.to_ip {
                f["IP"]["destination"] == ip.to_string().as_str()
            } else {
                false
            }
        };
        let port_of = |f: &Value| {
            ["TCP", "UDP", "SCTP"]
                .iter()
                .find_map(|p| f["l4"][p]["destination_port"].as_u64())
        };
        let candidates: Vec<Value> = agent
            .records()
            .into_iter()
            .filter(|f| f["source"]["namespace"] == from_ns && f["source"]["pod_name"] == from_pod)
            .filter(|f| matches_to(f) && port_of(f) == Some(u64::from(e.port)))
            .filter(|f| f["verdict"] == e.verdict.as_str())
            .filter(|f| {
                e.protocol
                    .as_ref()
                    .is_none_or(|p| f["l4"].get(p.as_str()).is_some())
            })
            .collect();
        let label = format!(
            "[{phase}] {} flow {} -> {}:{} on {node}",
            e.verdict,
            e.from,
            e.to.clone()
                .or(e.to_service.clone())
                .or(e.to_ip.map(|i| i.to_string()))
                .unwrap_or_default(),
            e.port
        );
        let Some(f) = candidates.last() else {
            let seen: Vec<String> = agent
                .records()
                .iter()
                .map(|f| {
                    format!(
                        "{} {}/{} -> {} {}/{} {}",
                        f["verdict"],
                        f["source"]["namespace"],
                        f["source"]["pod_name"],
                        f["IP"]["destination"],
                        f["destination"]["namespace"],
                        f["destination"]["pod_name"],
                        f["l4"]
                    )
                })
                .collect();
            report.check(false, || {
                format!(
                    "{label}: not reported; the agent reported:\n    {}",
                    seen.join("\n    ")
                )
            });
            continue;
        };
        if let Some(r) = &e.reason {
            report.check(f["drop_reason_desc"] == r.as_str(), || {
                format!(
                    "{label}: drop reason {} (expected {r})",
                    f["drop_reason_desc"]
                )
            });
        }
        if let Some(r) = &e.refusal {
            report.check(f["refusal"] == r.as_str(), || {
                format!("{label}: refusal {} (expected {r})", f["refusal"])
            });
        }
        if let Some(s) = &e.service {
            let got = format!(
                "{}/{}",
                f["destination"]["service"]["namespace"]
                    .as_str()
                    .unwrap_or(""),
                f["destination"]["service"]["name"].as_str().unwrap_or("")
            );
            report.check(got == *s, || {
                format!("{label}: service {got} (expected {s})")
            });
        }
        if let Some(id) = &e.destination_identity {
            let labels = f["destination"]["labels"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let want = format!("reserved:{id}");
            report.check(labels.iter().any(|l| l == want.as_str()), || {
                format!("{label}: destination labels {labels:?} lack {want}")
            });
        }
        for (field, want) in [
            ("egress_denied_by", &e.egress_denied_by),
            ("ingress_denied_by", &e.ingress_denied_by),
        ] {
            if let Some(want) = want {
                let mut want = want.clone();
                want.sort();
                let got = policy_names(&f[field]);
                report.check(got == want, || {
                    format!("{label}: {field} {got:?} (expected {want:?})")
                });
            }
        }
        if let Some(d) = &e.direction {
            report.check(f["traffic_direction"] == d.as_str(), || {
                format!(
                    "{label}: traffic_direction {} (expected {d})",
                    f["traffic_direction"]
                )
            });
        }
        if let Some(needle) = &e.near_miss_contains {
            let misses = f["near_misses"].to_string();
            report.check(misses.contains(needle.as_str()), || {
                format!("{label}: no near miss mentions {needle:?}: {misses}")
            });
        }
        if let Some(x) = &e.explanation {
            report.check(f["explanation"] == x.as_str(), || {
                format!("{label}: explanation {} (expected {x:?})", f["explanation"])
            });
        }
        check_observe(run, agent, e, f, &label, report)?;
        check_metrics(run, &node, e, f, &label, report)?;
    }
    Ok(())
}

/// On-call's view: `netwatch observe` with the filters they would type finds
/// the flow.
fn check_observe(
    run: &ScenarioRun,
    agent: &NodeAgent,
    e: &FlowExpectation,
    f: &Value,
    label: &str,
    report: &mut Report,
) -> Result<(), ScenarioError> {
    let port = e.port.to_string();
    let out = Command::new(&run.bins.netwatch)
        .arg("observe")
        .arg("--server")
        .arg(&agent.api_socket)
        .args([
            "-o",
            "json",
            "--last",
            "10000",
            "--verdict",
            &e.verdict,
            "--from-pod",
            &e.from,
            "--to-port",
            &port,
        ])
        .output()
        .map_err(|err| ScenarioError::Agent(format!("running netwatch observe: {err}")))?;
    let uuid = f["uuid"].as_str().unwrap_or("");
    let text = String::from_utf8_lossy(&out.stdout);
    let found = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .any(|l| l["flow"]["uuid"] == uuid);
    report.check(out.status.success() && found, || {
        format!(
            "{label}: `netwatch observe --verdict {} --from-pod {} --to-port {port}` does not show it ({}): {}",
            e.verdict,
            e.from,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    Ok(())
}

/// The alerting view: the agent's metrics count the flow, and each denying
/// policy.
fn check_metrics(
    run: &ScenarioRun,
    node: &str,
    e: &FlowExpectation,
    f: &Value,
    label: &str,
    report: &mut Report,
) -> Result<(), ScenarioError> {
    // A scrape can fail on a loaded (emulated) machine: retry a few times
    // before judging what it says.
    let mut metrics = String::new();
    for attempt in 0..5 {
        let out = run
            .lab
            .on_node(node, &run.bins.helper)?
            .args(["fetch", "http://127.0.0.1:9965/metrics"])
            .output()
            .map_err(|err| ScenarioError::Agent(format!("fetching metrics on {node}: {err}")))?;
        if out.status.success() {
            metrics = String::from_utf8_lossy(&out.stdout).into_owned();
            break;
        }
        metrics = format!(
            "(scrape {} failed: {})",
            attempt + 1,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let (from_ns, _) = e.from.split_once('/').unwrap_or(("", ""));
    let counted = |name: &str, labels: &[String]| {
        metrics.lines().any(|l| {
            l.starts_with(name)
                && labels.iter().all(|want| l.contains(want.as_str()))
                && l.rsplit(' ')
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .is_some_and(|v| v >= 1.0)
        })
    };
    let flow_labels = vec![
        format!("verdict=\"{}\"", e.verdict),
        format!("source_namespace=\"{from_ns}\""),
    ];
    report.check(
        counted("netwatch_denied_flows_total{", &flow_labels),
        || {
            let present: Vec<&str> = metrics
                .lines()
                .filter(|l| l.starts_with("netwatch_denied_flows_total{") || l.starts_with("(scrape"))
                .collect();
            format!(
                "{label}: netwatch_denied_flows_total has no series with {flow_labels:?} >= 1; it has:\n      {}",
                present.join("\n      ")
            )
        },
    );
    for (field, direction) in [
        ("egress_denied_by", "egress"),
        ("ingress_denied_by", "ingress"),
    ] {
        for p in f[field].as_array().into_iter().flatten() {
            let want = vec![
                format!("direction=\"{direction}\""),
                format!(
                    "policy_kind=\"{}\"",
                    p["kind"].as_str().unwrap_or("NetworkPolicy")
                ),
                format!("policy=\"{}\"", p["name"].as_str().unwrap_or("")),
                format!(
                    "policy_namespace=\"{}\"",
                    p["namespace"].as_str().unwrap_or("")
                ),
            ];
            report.check(counted("netwatch_policy_denials_total{", &want), || {
                format!("{label}: netwatch_policy_denials_total has no series with {want:?} >= 1")
            });
        }
    }
    Ok(())
}

/// Every policy drop the kernel made is one the engine explains as denied.
fn explained_drops(run: &ScenarioRun, report: &mut Report) {
    for a in &run.agents {
        for f in a.records() {
            if f["verdict"] == "DROPPED"
                && run
                    .lab
                    .datapath
                    .policy_drop_reasons()
                    .contains(&f["drop_reason_desc"].as_str().unwrap_or_default())
                && f["unenriched"] != true
            {
                let denied =
                    f.get("egress_denied_by").is_some() || f.get("ingress_denied_by").is_some();
                report.check(denied, || {
                    format!(
                        "enforcer and engine disagree: {} dropped {}/{} -> {}/{} ({}) but the engine allows it: {}",
                        a.node,
                        f["source"]["namespace"].as_str().unwrap_or(""),
                        f["source"]["pod_name"].as_str().unwrap_or(&f["IP"]["source"].to_string()),
                        f["destination"]["namespace"].as_str().unwrap_or(""),
                        f["destination"]["pod_name"].as_str().unwrap_or(&f["IP"]["destination"].to_string()),
                        f["l4"],
                        f["explanation"]
                    )
                });
            }
        }
    }
}

/// A POLICY_NOT_ENFORCED record is a security finding: one the scenario
/// does not expect is a false alarm (or a real hole in the lab's enforcer).
fn no_unexpected_not_enforced(
    run: &ScenarioRun,
    expected: &[FlowExpectation],
    report: &mut Report,
) {
    for a in &run.agents {
        for f in a
            .records()
            .into_iter()
            .filter(|f| f["verdict"] == "POLICY_NOT_ENFORCED")
        {
            let from = format!(
                "{}/{}",
                f["source"]["namespace"].as_str().unwrap_or(""),
                f["source"]["pod_name"].as_str().unwrap_or("")
            );
            let wanted = expected
                .iter()
                .any(|e| e.verdict == "POLICY_NOT_ENFORCED" && e.from == from);
            report.check(wanted, || {
                format!(
                    "unexpected POLICY_NOT_ENFORCED on {}: {from} -> {} {}: {}",
                    a.node, f["IP"]["destination"], f["l4"], f["explanation"]
                )
            });
        }
    }
}

/// Apply `netwatch explain --suggest`'s policies for the fixable traffic:
/// exactly those flows open, nothing else changes.
fn check_fix(
    run: &mut ScenarioRun,
    fixable: &[Traffic],
    traffic: &[Traffic],
    report: &mut Report,
) -> Result<(), ScenarioError> {
    let mut ports: Vec<u16> = Vec::new();
    let mut fixed_pairs = Vec::new();
    for t in traffic {
        let (_, _, backend, port) = run.target(t)?;
        if !backend.is_empty() && !ports.contains(&port) {
            ports.push(port);
        }
        if t.fix {
            fixed_pairs.push((t.from.clone(), backend, port, t.engine_protocol()));
        }
    }
    let ports_arg = ports
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let before = run.matrix(&ports_arg, "TCP,UDP")?;
    let fix_dir = run.workdir.join("fix");
    std::fs::create_dir_all(&fix_dir).map_err(|source| ScenarioError::Read {
        path: fix_dir.display().to_string(),
        source,
    })?;
    for (i, t) in fixable.iter().enumerate() {
        let (_, _, backend, port) = run.target(t)?;
        let (_, yaml) =
            run.explain(&t.from, &backend, port, t.engine_protocol(), &["--suggest"])?;
        std::fs::write(fix_dir.join(format!("fix-{i}.yaml")), yaml).map_err(|source| {
            ScenarioError::Read {
                path: fix_dir.display().to_string(),
                source,
            }
        })?;
    }
    run.apply(&fix_dir)?;
    let after = run.matrix(&ports_arg, "TCP,UDP")?;
    let key = |e: &Value| {
        (
            e["from"].to_string(),
            e["to"].to_string(),
            e["port"].to_string(),
            e["protocol"].to_string(),
        )
    };
    let before_map: BTreeMap<_, _> = before
        .iter()
        .map(|e| (key(e), e["verdict"].clone()))
        .collect();
    let mut changed = String::new();
    for e in &after {
        let k = key(e);
        let was = before_map.get(&k);
        if was != Some(&e["verdict"]) {
            // A DNS fix allows 53 over UDP and TCP on purpose (TCP carries
            // large answers): the other protocol of a fixed DNS pair counts
            // as fixed too.
            let is_fixed = fixed_pairs.iter().any(|(f, b, p, proto)| {
                e["from"] == f.as_str()
                    && e["to"] == b.as_str()
                    && e["port"] == *p
                    && (e["protocol"] == *proto || e["port"] == 53)
            });
            if !is_fixed {
                let _ = writeln!(
                    changed,
                    "    {} -> {} {}/{}: {:?} -> {}",
                    e["from"], e["to"], e["port"], e["protocol"], was, e["verdict"]
                );
            }
        }
    }
    report.check(changed.is_empty(), || {
        format!("[fix] the suggested policies changed other verdicts:\n{changed}")
    });
    report.check(!after.is_empty(), || {
        "[fix] netwatch explain --matrix printed nothing".into()
    });
    // The fixed traffic now goes through; the rest is as before.
    let expected: Vec<Traffic> = traffic
        .iter()
        .map(|t| {
            let mut t = t.clone();
            if t.fix {
                t.expect = match t.protocol {
                    TrafficProtocol::Tcp => Expect::Connected,
                    _ => Expect::Answered,
                };
            }
            t
        })
        .collect();
    probe_all(run, &expected, "fix", report)?;
    agreement(run, &expected, "fix", report)
}

/// The scenarios under `dir` (each folder with a scenario.yaml), by name.
pub fn discover(dir: &Path) -> Result<Vec<Scenario>, ScenarioError> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|source| ScenarioError::Read {
        path: dir.display().to_string(),
        source,
    })?;
    for e in entries.flatten() {
        if e.path().join("scenario.yaml").exists() {
            out.push(Scenario::load(&e.path())?);
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}
