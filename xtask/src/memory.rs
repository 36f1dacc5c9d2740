//! `cargo xtask bench --memory`: the release agent's resident memory with
//! the cluster it is given, at 1k, 10k and 50k pods (policies in
//! proportion: 2,000 at 10,000 pods), in `--manifests` mode and in API mode
//! (a minimal API server in this process serving the same objects).
//!
//! The agent runs in a network namespace of its own (no interface matches
//! its `--interfaces`, so it attaches to nothing); once it has the cluster,
//! its VmRSS is sampled until it stops changing, then VmRSS and VmHWM
//! (the peak) are printed.
//!
//! With `--flows N` (100,000 by default) the agent is also measured holding
//! N tracked flows: it runs in the flood lab's node (the lab's two pods
//! added to the cluster), a SYN flood sends N distinct flows to ports the
//! node drops, and RSS is sampled once `netwatch_tracked_flows` says all N
//! are tracked (the idle timeout is an hour, so none leaves meanwhile).

use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use netwatch_lab::ChildGuard;
use serde_json::{Value, json};

const PODS_PER_NAMESPACE: usize = 200;
const POLICIES_PER_NAMESPACE: usize = 40;
const APPS: usize = 20;
const NETNS: &str = "nwmem-bench";

/// The cluster at `pods` pods (rounded to whole namespaces of 200): the
/// shape of `benches/attribution.rs` (50 namespaces at 10k pods, 60 label
/// sets per namespace, 40 policies per namespace with pod, namespace and
/// `matchExpressions` peers, named ports, port ranges, ipBlocks).
struct Cluster {
    namespaces: Vec<Value>,
    pods: Vec<Value>,
    policies: Vec<Value>,
}

fn cluster(pods: usize) -> Cluster {
    let namespaces = pods.div_ceil(PODS_PER_NAMESPACE);
    let mut c = Cluster {
        namespaces: Vec::new(),
        pods: Vec::new(),
        policies: Vec::new(),
    };
    for n in 0..namespaces {
        let ns = format!("ns-{n}");
        c.namespaces.push(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "resourceVersion": "1", "labels": {"team": format!("t{}", n % 10)}},
        }));
        for i in 0..PODS_PER_NAMESPACE {
            // 10.<n/250>.<n%250>.<i+1>: unique up to 62,500 namespaces.
            let ip = format!("10.{}.{}.{}", n / 250, n % 250, i + 1);
            c.pods.push(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "name": format!("app-{}-{i}", i % APPS), "namespace": ns,
                    "uid": format!("u-{n}-{i}"), "resourceVersion": "1",
                    "labels": {"app": format!("app-{}", i % APPS), "tier": format!("t{}", i % 3)},
                },
                "spec": {
                    "nodeName": format!("node-{}", i % 100),
                    "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}],
                },
                "status": {
                    "phase": "Running", "podIP": ip,
                    "conditions": [{"type": "Ready", "status": "True"}],
                },
            }));
        }
        c.policies.push(json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "default-deny", "namespace": ns, "resourceVersion": "1"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]},
        }));
        for p in 1..POLICIES_PER_NAMESPACE {
            c.policies.push(json!({
                "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": format!("allow-{p}"), "namespace": ns, "resourceVersion": "1"},
                "spec": {
                    "podSelector": {"matchLabels": {"app": format!("app-{}", p % APPS)}},
                    "ingress": [{
                        "from": [
                            {"podSelector": {"matchLabels": {"app": format!("app-{}", (p + 1) % APPS)}}},
                            {
                                "namespaceSelector": {"matchLabels": {"team": format!("t{}", p % 10)}},
                                "podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["t1", "t2"]}]},
                            },
                        ],
                        "ports": [{"port": "http"}, {"port": 9000, "endPort": 9100}],
                    }],
                    "egress": [{
                        "to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": [format!("10.{}.{}.0/24", n / 250, n % 250)]}}],
                        "ports": [{"port": 443}],
                    }],
                },
            }));
        }
    }
    c
}

/// The cluster as one multi-document YAML file (one flow-style document
/// per object).
fn write_manifests(c: &Cluster, path: &Path) -> Result<u64> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for object in c.namespaces.iter().chain(&c.pods).chain(&c.policies) {
        writeln!(out, "---\n{object}")?;
    }
    out.flush()?;
    Ok(std::fs::metadata(path)?.len())
}

/// A network namespace for the agent, removed on drop.
struct Netns;

impl Netns {
    fn new() -> Result<Netns> {
        // One left by an interrupted run (usually none: quiet).
        let _ = Command::new("ip")
            .args(["netns", "del", NETNS])
            .stderr(Stdio::null())
            .status();
        if !Command::new("ip")
            .args(["netns", "add", NETNS])
            .status()?
            .success()
        {
            bail!("ip netns add {NETNS} failed (run as root)");
        }
        let ns = Netns;
        Command::new("ip")
            .args(["netns", "exec", NETNS, "ip", "link", "set", "lo", "up"])
            .status()?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", NETNS]).status();
    }
}

/// VmRSS and VmHWM of `pid`, in KiB.
fn rss(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Args every measured agent gets: no flow log, an API socket of its own.
fn agent_args(cmd: &mut Command, socket: &Path) {
    cmd.args([
        "--node-name",
        "node-1",
        "--own-netns-only",
        "--flow-log",
        "none",
        "--cgroup-root",
        "none",
        "--api-socket",
    ])
    .arg(socket)
    .env("NO_COLOR", "1")
    .stdout(Stdio::null());
}

/// Starts `cmd` (the agent, its args given), waits for `ready_line` in its
/// log, runs `loaded` (which may load the agent further: flows), then waits
/// for its RSS to settle (a minute at most), then reads its range over 10 s.
fn measure(
    mut cmd: Command,
    ready_line: &str,
    loaded: &mut dyn FnMut() -> Result<()>,
) -> Result<Measured> {
    let log = std::env::temp_dir().join(format!("netwatch-memory-{}.log", std::process::id()));
    let started = Instant::now();
    let child = cmd.stderr(std::fs::File::create(&log)?).spawn()?;
    let guard = ChildGuard(child);
    // `ip netns exec` execs the agent, and the lab enters the namespace
    // before exec: the child's pid is the agent's.
    let pid = guard.0.id();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(ready_line) {
            break;
        }
        if Instant::now() > deadline || rss(pid).is_none() {
            let _ = std::fs::remove_file(&log);
            bail!("the agent did not get ready:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Err(e) = loaded() {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_file(&log);
        return Err(e.context(format!("agent log:\n{text}")));
    }
    // Settled: unchanged over 8 s (the first snapshot is applied after the
    // ready line in API mode, and the metrics learn the pods; the daemon
    // hands freed memory back at most every 5 s).
    // An agent that never settles (under a flood it frees and hands back
    // memory at every large table scan) is read over a minute at most.
    let limit = (Instant::now() + Duration::from_secs(60)).min(deadline);
    let mut last = rss(pid).context("agent gone")?;
    let mut stable_since = Instant::now();
    let mut settled = started.elapsed().as_secs_f64();
    while stable_since.elapsed() < Duration::from_secs(8) && Instant::now() < limit {
        std::thread::sleep(Duration::from_millis(250));
        let now = rss(pid).context("agent gone")?;
        if now.0.abs_diff(last.0) > 256 {
            stable_since = Instant::now();
            settled = started.elapsed().as_secs_f64();
        }
        last = now;
    }
    // Then the range VmRSS moves in over 10 s.
    let (mut low, mut high) = (last.0, last.0);
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(250));
        let now = rss(pid).context("agent gone")?;
        (low, high) = (low.min(now.0), high.max(now.0));
        last = now;
    }
    drop(guard);
    let _ = std::fs::remove_file(&log);
    Ok(Measured {
        rss_kib: last.0,
        low_kib: low,
        high_kib: high,
        hwm_kib: last.1,
        seconds: settled,
        settled: stable_since.elapsed() >= Duration::from_secs(8),
    })
}

/// What [`measure`] read, in KiB.
struct Measured {
    rss_kib: u64,
    /// The lowest and highest VmRSS over the last 10 s.
    low_kib: u64,
    high_kib: u64,
    hwm_kib: u64,
    /// Until RSS stopped moving, or the minute given up after.
    seconds: f64,
    settled: bool,
}

/// Serves the cluster's pods, namespaces and policies (and an empty list
/// of every other kind) on 127.0.0.1 in the agent's namespace: lists
/// unpaginated, watches held open with nothing to say.
struct ApiServer {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl ApiServer {
    /// Listens in the network namespace `netns` (a name under /run/netns).
    fn start(c: &Cluster, netns: &str) -> Result<ApiServer> {
        let list = |kind: &str, api: &str, items: &[Value]| -> Arc<Vec<u8>> {
            Arc::new(
                serde_json::to_vec(&json!({
                    "apiVersion": api, "kind": kind,
                    "metadata": {"resourceVersion": "1"},
                    "items": items,
                }))
                .expect("json"),
            )
        };
        let pods = list("PodList", "v1", &c.pods);
        let namespaces = list("NamespaceList", "v1", &c.namespaces);
        let policies = list("NetworkPolicyList", "networking.k8s.io/v1", &c.policies);
        let netns = PathBuf::from("/run/netns").join(netns);
        let listener = std::thread::spawn(move || -> Result<TcpListener> {
            let ns = std::fs::File::open(&netns)?;
            // SAFETY: setns on this short-lived thread only.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns: {}", std::io::Error::last_os_error());
            }
            Ok(TcpListener::bind(("127.0.0.1", 0))?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("bind thread panicked"))??;
        let port = listener.local_addr()?.port();
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (pods, namespaces, policies, stopped) = (
                            Arc::clone(&pods),
                            Arc::clone(&namespaces),
                            Arc::clone(&policies),
                            Arc::clone(&stopped),
                        );
                        std::thread::spawn(move || {
                            let _ = serve(stream, &pods, &namespaces, &policies, &stopped);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(ApiServer { port, stop })
    }

    fn kubeconfig(&self, path: &Path) -> Result<()> {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: b\n  cluster:\n    server: http://127.0.0.1:{}\nusers:\n- name: b\n  user: {{}}\ncontexts:\n- name: b\n  context:\n    cluster: b\n    user: b\ncurrent-context: b\n",
                self.port
            ),
        )?;
        Ok(())
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(
    stream: TcpStream,
    pods: &[u8],
    namespaces: &[u8],
    policies: &[u8],
    stopped: &AtomicBool,
) -> Result<()> {
    stream.set_nonblocking(false)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut request = String::new();
        if reader.read_line(&mut request)? == 0 {
            return Ok(());
        }
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 || header == "\r\n" {
                break;
            }
        }
        let target = request.split_whitespace().nth(1).unwrap_or("/");
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        if query
            .split('&')
            .any(|kv| kv == "watch=true" || kv == "watch=1")
        {
            // Nothing ever changes: hold the watch open until stopped.
            out.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")?;
            while !stopped.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
            }
            return Ok(());
        }
        let empty;
        let body: &[u8] = match path {
            "/api/v1/pods" => pods,
            "/api/v1/namespaces" => namespaces,
            "/apis/networking.k8s.io/v1/networkpolicies" => policies,
            _ => {
                empty = serde_json::to_vec(&json!({
                    "apiVersion": "v1", "kind": "List",
                    "metadata": {"resourceVersion": "1"}, "items": [],
                }))?;
                &empty
            }
        };
        write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )?;
        out.write_all(body)?;
    }
}

/// One row of the result.
struct Row {
    pods: usize,
    policies: usize,
    flows: u64,
    mode: &'static str,
    measured: Measured,
}

/// Where the measured agent learns the cluster.
#[derive(Clone, Copy)]
enum Source {
    Manifests,
    Api,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::Manifests => "manifests",
            Source::Api => "api",
        }
    }

    /// The log line after which the agent holds the cluster.
    fn ready_line(self) -> &'static str {
        match self {
            Source::Manifests => "netwatch-agent capturing",
            Source::Api => "initial lists of every kind done",
        }
    }
}

/// The cluster given to the agent in one of both ways; the API server (if
/// any) lives as long as this.
struct Given {
    args: Vec<String>,
    _server: Option<ApiServer>,
}

fn give(c: &Cluster, source: Source, netns: &str, dir: &Path) -> Result<Given> {
    Ok(match source {
        Source::Manifests => {
            let file = dir.join("cluster.yaml");
            write_manifests(c, &file)?;
            Given {
                args: vec!["--manifests".into(), file.display().to_string()],
                _server: None,
            }
        }
        Source::Api => {
            let server = ApiServer::start(c, netns)?;
            let kubeconfig = dir.join("kubeconfig");
            server.kubeconfig(&kubeconfig)?;
            Given {
                args: vec!["--kubeconfig".into(), kubeconfig.display().to_string()],
                _server: Some(server),
            }
        }
    })
}

pub fn memory(sizes: &[usize], api: bool, flows: u64, flows_at: &[usize]) -> Result<()> {
    // NETWATCH_AGENT_BIN: measure another build (a comparison with an
    // older commit) instead of building this tree's.
    let agent = match std::env::var_os("NETWATCH_AGENT_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => crate::bench::cargo_build_release()?,
    };
    let dir = std::env::temp_dir().join(format!("netwatch-memory-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("api.sock");
    let sources: &[Source] = if api {
        &[Source::Manifests, Source::Api]
    } else {
        &[Source::Manifests]
    };
    let mut rows = Vec::new();
    {
        let _netns = Netns::new()?;
        // The agent with an empty cluster: what the cluster state adds is above it.
        for &pods in std::iter::once(&0).chain(sizes) {
            let c = cluster(pods);
            for &source in sources {
                eprintln!(
                    "memory: {pods} pods, {} policies: {}",
                    c.policies.len(),
                    source.name()
                );
                let given = give(&c, source, NETNS, &dir)?;
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", NETNS]).arg(&agent);
                agent_args(&mut cmd, &socket);
                cmd.args([
                    "--interfaces",
                    "nwmem-none*",
                    "--metrics-addr",
                    "127.0.0.1:0",
                ])
                .args(&given.args);
                let measured = measure(cmd, source.ready_line(), &mut || Ok(()))?;
                rows.push(Row {
                    pods,
                    policies: c.policies.len(),
                    flows: 0,
                    mode: source.name(),
                    measured,
                });
            }
        }
    }
    if flows > 0 && !flows_at.is_empty() {
        let spec: netwatch_lab::LabSpec = serde_yaml::from_str(crate::bench::FLOOD_LAB)?;
        let lab = netwatch_lab::Lab::up(&spec, &crate::binaries::build()?.helper)?;
        let netns = lab.node("node-1")?.netns.clone();
        for &pods in flows_at {
            let mut c = cluster(pods);
            with_flood_pods(&mut c);
            for &source in sources {
                eprintln!(
                    "memory: {pods} pods, {} policies, {flows} flows: {}",
                    c.policies.len(),
                    source.name()
                );
                let given = give(&c, source, &netns, &dir)?;
                let mut cmd = lab.on_node("node-1", &agent)?;
                agent_args(&mut cmd, &socket);
                // Room for every flow in the kernel's per-flow tables (not
                // the aggregate) and in user space, and no flow finishes
                // while RSS is sampled.
                let table = (flows + flows / 4).next_power_of_two();
                cmd.args(["--interfaces", "cali*", "--metrics-addr"])
                    .arg(crate::bench::FLOOD_METRICS)
                    .args(["--idle-timeout", "3600", "--max-flows"])
                    .arg((flows + flows / 4).to_string())
                    .arg("--table-entries")
                    .arg(table.to_string())
                    .args(&given.args);
                let measured = measure(cmd, source.ready_line(), &mut || {
                    flood_and_track(&lab, flows)
                })?;
                rows.push(Row {
                    pods,
                    policies: c.policies.len(),
                    flows,
                    mode: source.name(),
                    measured,
                });
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "| pods | policies | tracked flows | source | VmRSS | VmRSS over 10 s | VmHWM (peak) | settled after |"
    );
    println!("| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |");
    let mib = |kib: u64| kib as f64 / 1024.0;
    for r in &rows {
        let m = &r.measured;
        println!(
            "| {} | {} | {} | {} | {:.1} MiB | {:.1}-{:.1} MiB | {:.1} MiB | {} |",
            r.pods,
            r.policies,
            r.flows,
            r.mode,
            mib(m.rss_kib),
            mib(m.low_kib),
            mib(m.high_kib),
            mib(m.hwm_kib),
            if m.settled {
                format!("{:.1} s", m.seconds)
            } else {
                "did not settle".into()
            }
        );
    }
    Ok(())
}

/// The flood lab's client and target as pods of the cluster, so the
/// flood's flows are attributed (both ends named, policies judged) as on a
/// node.
fn with_flood_pods(c: &mut Cluster) {
    c.namespaces.push(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "bench", "resourceVersion": "1"},
    }));
    for (name, ip) in [("client", "10.244.9.2"), ("target", "10.244.9.3")] {
        c.pods.push(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": name, "namespace": "bench", "uid": format!("u-bench-{name}"),
                "resourceVersion": "1", "labels": {"app": name},
            },
            "spec": {"nodeName": "node-1", "containers": [{"name": "c"}]},
            "status": {
                "phase": "Running", "podIP": ip,
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }));
    }
}

/// Sends `flows` distinct denied flows from the lab's client, then waits
/// until the agent tracks all of them (`netwatch_tracked_flows`).
fn flood_and_track(lab: &netwatch_lab::Lab, flows: u64) -> Result<()> {
    let flood = netwatch_lab::flood::Flood {
        to: "10.244.9.3".parse()?,
        first_port: 10000,
        ports: flows.div_ceil(netwatch_lab::flood::SOURCE_PORTS) as u16,
        flows,
        rate: 25_000,
    };
    let helper = crate::binaries::beside_xtask("netwatch-lab")?;
    let out = lab
        .in_pod(lab.pod("bench/client")?, &helper)
        .args(["flood", "--json", &serde_json::to_string(&flood)?])
        .output()?;
    if !out.status.success() {
        bail!("flood: {}", String::from_utf8_lossy(&out.stderr));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut metrics = String::new();
    while Instant::now() < deadline {
        let out = lab
            .on_node("node-1", &helper)?
            .args([
                "fetch",
                &format!("http://{}/metrics", crate::bench::FLOOD_METRICS),
            ])
            .output()?;
        metrics = String::from_utf8_lossy(&out.stdout).into_owned();
        let tracked = metrics
            .lines()
            .find_map(|l| l.strip_prefix("netwatch_tracked_flows "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0) as u64;
        if tracked >= flows {
            eprintln!("memory: the agent tracks {tracked} flows");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let counters: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            !l.starts_with('#')
                && (l.starts_with("netwatch_tracked")
                    || l.starts_with("netwatch_lost")
                    || l.starts_with("netwatch_evicted")
                    || l.starts_with("netwatch_drop_aggregate")
                    || l.starts_with("netwatch_deferred")
                    || l.starts_with("netwatch_denied_flows"))
        })
        .collect();
    bail!(
        "the agent does not track all {flows} flows after 120 s:\n{}",
        counters.join("\n")
    )
}
