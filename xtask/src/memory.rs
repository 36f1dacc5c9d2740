//! `cargo xtask bench --memory`: the release agent's resident memory with
//! the cluster it is given, at 1k, 10k and 50k pods (policies in
//! proportion: 2,000 at 10,000 pods), in `--manifests` mode and in API mode
//! (a minimal API server in this process serving the same objects).
//!
//! The agent runs in a network namespace of its own (no interface matches
//! its `--interfaces`, so it attaches to nothing); once it has the cluster,
//! its VmRSS is sampled until it stops changing, then VmRSS and VmHWM
//! (the peak) are printed.

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
        let _ = Command::new("ip").args(["netns", "del", NETNS]).status();
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

/// Starts the agent with `source_args`, waits for `ready_line` in its log,
/// then for its RSS to settle; returns (VmRSS, VmHWM) in KiB and the load
/// time.
fn measure(agent: &Path, source_args: &[String], ready_line: &str) -> Result<(u64, u64, f64)> {
    let dir = std::env::temp_dir();
    let log = dir.join(format!("netwatch-memory-{}.log", std::process::id()));
    let socket = dir.join(format!("netwatch-memory-{}.sock", std::process::id()));
    let started = Instant::now();
    let child = Command::new("ip")
        .args(["netns", "exec", NETNS])
        .arg(agent)
        .args([
            "--node-name",
            "node-1",
            "--interfaces",
            "nwmem-none*",
            "--own-netns-only",
            "--flow-log",
            "none",
            "--cgroup-root",
            "none",
            "--metrics-addr",
            "127.0.0.1:0",
            "--api-socket",
        ])
        .arg(&socket)
        .args(source_args)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let guard = ChildGuard(child);
    // `ip netns exec` execs the agent: the child's pid is the agent's.
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
    // Settled: unchanged over 8 s (the first snapshot is applied after the
    // ready line in API mode, and the metrics learn the pods; the daemon
    // hands freed memory back at most every 5 s).
    let mut last = rss(pid).context("agent gone")?;
    let mut stable_since = Instant::now();
    let mut loaded = started.elapsed().as_secs_f64();
    while stable_since.elapsed() < Duration::from_secs(8) {
        std::thread::sleep(Duration::from_millis(250));
        let now = rss(pid).context("agent gone")?;
        if now.0.abs_diff(last.0) > 256 {
            stable_since = Instant::now();
            loaded = started.elapsed().as_secs_f64();
        }
        last = now;
        if Instant::now() > deadline {
            break;
        }
    }
    drop(guard);
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_file(&socket);
    Ok((last.0, last.1, loaded))
}

/// Serves the cluster's pods, namespaces and policies (and an empty list
/// of every other kind) on 127.0.0.1 in the agent's namespace: lists
/// unpaginated, watches held open with nothing to say.
struct ApiServer {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl ApiServer {
    fn start(c: &Cluster) -> Result<ApiServer> {
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
        let netns = PathBuf::from("/run/netns").join(NETNS);
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
    mode: &'static str,
    rss_kib: u64,
    hwm_kib: u64,
    seconds: f64,
}

pub fn memory(sizes: &[usize], api: bool) -> Result<()> {
    // NETWATCH_AGENT_BIN: measure another build (a comparison with an
    // older commit) instead of building this tree's.
    let agent = match std::env::var_os("NETWATCH_AGENT_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => crate::bench::cargo_build_release()?,
    };
    let _netns = Netns::new()?;
    let dir = std::env::temp_dir().join(format!("netwatch-memory-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut rows = Vec::new();
    // The agent with an empty cluster: what the cluster state adds is above it.
    for &pods in std::iter::once(&0).chain(sizes) {
        let c = cluster(pods);
        let file = dir.join(format!("cluster-{pods}.yaml"));
        let bytes = write_manifests(&c, &file)?;
        eprintln!(
            "memory: {pods} pods, {} policies ({:.1} MB of YAML): --manifests",
            c.policies.len(),
            bytes as f64 / 1e6
        );
        let (rss_kib, hwm_kib, seconds) = measure(
            &agent,
            &["--manifests".into(), file.display().to_string()],
            "netwatch-agent capturing",
        )?;
        rows.push(Row {
            pods,
            policies: c.policies.len(),
            mode: "manifests",
            rss_kib,
            hwm_kib,
            seconds,
        });
        let _ = std::fs::remove_file(&file);
        if api {
            eprintln!("memory: {pods} pods: API");
            let server = ApiServer::start(&c)?;
            let kubeconfig = dir.join("kubeconfig");
            server.kubeconfig(&kubeconfig)?;
            let (rss_kib, hwm_kib, seconds) = measure(
                &agent,
                &["--kubeconfig".into(), kubeconfig.display().to_string()],
                "initial lists of every kind done",
            )?;
            rows.push(Row {
                pods,
                policies: c.policies.len(),
                mode: "api",
                rss_kib,
                hwm_kib,
                seconds,
            });
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!("| pods | policies | source | VmRSS | VmHWM (peak) | settled after |");
    println!("| ---: | ---: | --- | ---: | ---: | ---: |");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.1} MiB | {:.1} MiB | {:.1} s |",
            r.pods,
            r.policies,
            r.mode,
            r.rss_kib as f64 / 1024.0,
            r.hwm_kib as f64 / 1024.0,
            r.seconds
        );
    }
    Ok(())
}
