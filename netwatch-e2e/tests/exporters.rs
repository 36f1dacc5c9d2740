//! End-to-end: the exporters of a real agent in a lab node, read the way a
//! user reads them: `/metrics` scraped over HTTP after known drops, the flow
//! log, `netwatch observe` and `netwatch top` against the live agent, a real
//! Prometheus server scraping the agent until the drop alert fires, and
//! promtool on the shipped rules.

mod support;

use std::{
    collections::HashMap,
    ffi::CString,
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use netwatch_lab::{ChildGuard, Lab, Outcome, Probe};
use serde_json::Value;
use support::{Agent, addr, dns, expect_probe, lab, records, target_binary, tcp, to, uuids};

const LAB: &str = r#"
nodes:
  - name: node-1
    nftables: |
      table inet lab {
        chain forward {
          type filter hook forward priority 0; policy accept;
          ip daddr 10.244.1.3 tcp dport 8080 counter drop comment "drop-api"
          ip daddr 10.244.1.4 udp dport 53 counter drop comment "drop-dns"
        }
      }
pods:
  - { name: web, namespace: prod, node: node-1, ip: 10.244.1.2 }
  - { name: api, namespace: prod, node: node-1, ip: 10.244.1.3, listen: ["8080/tcp", "9090/tcp"] }
  - { name: dns, namespace: kube-system, node: node-1, ip: 10.244.1.4, listen: ["53/udp"] }
"#;

/// An agent with its metrics on a kernel-chosen port and its observe API on
/// a socket of its own (tests run side by side).
struct ExportingAgent {
    agent: Agent,
    socket: PathBuf,
    metrics: SocketAddr,
    netns: String,
    _dir: tempfile::TempDir,
}

impl ExportingAgent {
    fn start(lab: &Lab, extra: &[&str]) -> ExportingAgent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("netwatch.sock");
        let socket_arg = socket.to_string_lossy().into_owned();
        let mut args = vec!["--metrics-addr", "127.0.0.1:0", "--api-socket", &socket_arg];
        args.extend_from_slice(extra);
        let mut agent = Agent::start(lab, "node-1", 3, &args);
        agent.wait_for_log(|l| {
            l.contains("metrics listening on http://") && l.contains("observe API listening")
        });
        let log = agent.log();
        let at = log.find("metrics listening on http://").unwrap()
            + "metrics listening on http://".len();
        let metrics: SocketAddr = log[at..]
            .split('/')
            .next()
            .unwrap()
            .parse()
            .expect("metrics address in the log");
        assert_ne!(metrics.port(), 0);
        let netns = lab.node("node-1").unwrap().netns.clone();
        ExportingAgent {
            agent,
            socket,
            metrics,
            netns,
            _dir: dir,
        }
    }

    fn get(&self, path: &str) -> (u16, String) {
        http_get(&self.netns, self.metrics, path)
    }

    /// The value of the sample of `name` whose labels include `labels`
    /// (summed over the samples that match).
    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200, "{body}");
        sample(&body, name, labels)
    }

    /// `netwatch <command> --server <this agent's socket> <args>`.
    fn netwatch(&self, command: &str, args: &[&str]) -> std::process::Output {
        Command::new(target_binary("netwatch"))
            .arg(command)
            .args(["--server", self.socket.to_str().unwrap()])
            .args(args)
            .env("NO_COLOR", "1")
            // These tests read whole lines; fitting to 80 columns is
            // tested on its own (netwatch-agent's unit tests).
            .env("COLUMNS", "250")
            .output()
            .unwrap_or_else(|e| panic!("run netwatch {command}: {e}"))
    }

    fn observe(&self, args: &[&str]) -> std::process::Output {
        self.netwatch("observe", args)
    }

    /// One round of `netwatch top -o json`.
    fn top_json(&self, args: &[&str]) -> std::process::Output {
        let mut all = vec!["--iterations", "1", "--interval", "0.5", "-o", "json"];
        all.extend_from_slice(args);
        self.netwatch("top", &all)
    }
}

/// Sum of the samples of `name` whose labels include `want`.
fn sample(exposition: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    let mut total = None;
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let (metric, labels) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        let labels: HashMap<&str, &str> = labels
            .split("\",")
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim_matches(','), v.trim_matches('"')))
            .collect();
        if want.iter().all(|(k, v)| labels.get(k) == Some(v)) {
            *total.get_or_insert(0.0) += value.parse::<f64>().unwrap();
        }
    }
    total
}

/// A plain HTTP GET from inside a network namespace (where the agent and
/// Prometheus listen on 127.0.0.1).
fn http_get(netns: &str, addr: SocketAddr, path: &str) -> (u16, String) {
    try_http_get(netns, addr, path)
        .unwrap_or_else(|e| panic!("GET http://{addr}{path} in {netns}: {e}"))
}

fn try_http_get(netns: &str, addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let netns = netns.to_string();
    let path = path.to_string();
    std::thread::spawn(move || -> Result<(u16, String), String> {
        enter_netns(&netns);
        let mut s =
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .map_err(|e| e.to_string())?;
        let mut text = String::new();
        s.read_to_string(&mut text).map_err(|e| e.to_string())?;
        let status: u16 = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or("no HTTP status")?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, dechunk(&body, &text)))
    })
    .join()
    .map_err(|_| "HTTP thread panicked".to_string())?
}

/// hyper answers small bodies in one piece, large ones chunked.
fn dechunk(body: &str, whole: &str) -> String {
    if !whole
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return body.to_string();
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&after[..n]);
        rest = &after[n + 2..];
    }
    out
}

/// Move this thread into a lab node's network namespace.
fn enter_netns(netns: &str) {
    let path = CString::new(format!("/run/netns/{netns}")).unwrap();
    // SAFETY: plain syscalls on a path we own; setns affects only this thread.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        assert!(fd >= 0, "open {netns}: {}", std::io::Error::last_os_error());
        assert_eq!(
            libc::setns(fd, libc::CLONE_NEWNET),
            0,
            "setns {netns}: {}",
            std::io::Error::last_os_error()
        );
        libc::close(fd);
    }
}

fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One dropped TCP flow (to 8080), one refused (to 7777), one dropped DNS query.
fn make_denied_flows(lab: &Lab) {
    expect_probe(
        lab,
        "prod/web",
        tcp("10.244.1.3:8080", 2),
        Outcome::TimedOut,
    );
    expect_probe(lab, "prod/web", tcp("10.244.1.3:7777", 2), Outcome::Refused);
    expect_probe(lab, "prod/web", dns("10.244.1.4:53", 2), Outcome::TimedOut);
}

#[test]
fn metrics_count_known_drops_exactly() {
    let lab = lab(LAB);
    let a = ExportingAgent::start(&lab, &[]);
    make_denied_flows(&lab);
    let syns = lab.nft_counter("node-1", "drop-api").unwrap();
    let queries = lab.nft_counter("node-1", "drop-dns").unwrap();
    assert!(syns >= 2 && queries >= 1, "{syns} {queries}");
    let to_api = [
        ("reason", "NETFILTER_DROP"),
        ("protocol", "TCP"),
        ("destination_port", "8080"),
    ];
    // Later records of the flow carry the last retransmissions.
    wait_until(
        Duration::from_secs(15),
        "drops to 8080 equal the firewall's counter",
        || (a.metric("netwatch_drops_total", &to_api) == Some(syns as f64)).then_some(()),
    );
    assert_eq!(
        a.metric("netwatch_drop_bytes_total", &to_api),
        Some(syns as f64 * 60.0),
        "SYNs with options are 60 bytes"
    );
    let to_dns = [
        ("reason", "NETFILTER_DROP"),
        ("protocol", "UDP"),
        ("destination_port", "53"),
    ];
    wait_until(Duration::from_secs(15), "DNS drops", || {
        (a.metric("netwatch_drops_total", &to_dns) == Some(queries as f64)).then_some(())
    });
    // One flow each, though each flow had several records.
    let lines = a.agent.lines();
    assert!(
        records(&lines, to("10.244.1.3", 8080)).len() >= 2,
        "NEW and later records: {lines:#?}"
    );
    assert_eq!(
        a.metric(
            "netwatch_denied_flows_total",
            &[("verdict", "DROPPED"), ("destination_port", "8080")]
        ),
        Some(1.0)
    );
    assert_eq!(
        a.metric(
            "netwatch_denied_flows_total",
            &[("verdict", "REFUSED"), ("destination_port", "7777")]
        ),
        Some(1.0)
    );
    assert_eq!(
        a.metric("netwatch_denied_flows_total", &[("verdict", "DROPPED")]),
        Some(2.0)
    );
    assert_eq!(
        a.metric("netwatch_dns_failures_total", &[("verdict", "DROPPED")]),
        Some(1.0)
    );
    assert_eq!(a.metric("netwatch_attached_interfaces", &[]), Some(3.0));
    assert_eq!(a.metric("netwatch_lost_events_total", &[]), Some(0.0));
    assert_eq!(
        a.metric("netwatch_observer_dropped_records_total", &[]),
        Some(0.0)
    );
    assert!(a.metric("netwatch_flow_log_records_total", &[]).unwrap() >= 3.0);
    let (_, body) = a.get("/metrics");
    assert!(
        body.contains("# TYPE netwatch_drops_total counter"),
        "{body}"
    );
    assert!(body.contains("netwatch_build_info{kernel="), "{body}");
    assert_eq!(a.get("/healthz").0, 200);
    assert_eq!(
        a.get("/readyz"),
        (200, "ready\n".to_string()),
        "standalone without identity: ready once capturing"
    );
    assert_eq!(a.get("/nope").0, 404);
}

#[test]
fn flow_log_is_hubble_shaped_and_filtered_by_allow_and_deny_lists() {
    let lab = lab(LAB);
    let mut a = ExportingAgent::start(
        &lab,
        &[
            "--flow-log-allow",
            "verdict=DROPPED,REFUSED",
            "--flow-log-deny",
            "to-port=53",
        ],
    );
    make_denied_flows(&lab);
    a.agent
        .wait_for_flow(Duration::from_secs(5), to("10.244.1.3", 7777));
    wait_until(Duration::from_secs(10), "the DNS flow filtered out", || {
        a.metric("netwatch_flow_log_filtered_records_total", &[])
            .filter(|n| *n >= 1.0)
    });
    let lines = a.agent.stop();
    assert!(!lines.is_empty());
    for l in &lines {
        // Hubble's export shape: flow, node_name, time.
        assert_eq!(l["node_name"], "node-1", "{l}");
        assert!(l["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{l}");
        let f = &l["flow"];
        assert!(
            ["DROPPED", "REFUSED"].contains(&f["verdict"].as_str().unwrap()),
            "{f}"
        );
        assert_ne!(
            f["l4"]["UDP"]["destination_port"], 53,
            "denied by --flow-log-deny: {f}"
        );
        assert_eq!(f["IP"]["source"], "10.244.1.2");
        assert_eq!(f["Type"], "L3_L4");
    }
    assert_eq!(uuids(&records(&lines, to("10.244.1.3", 8080))).len(), 1);
    assert_eq!(uuids(&records(&lines, to("10.244.1.3", 7777))).len(), 1);
    assert!(records(&lines, to("10.244.1.4", 53)).is_empty());
    // The socket goes with the agent.
    assert!(!a.socket.exists());
}

#[test]
fn observe_shows_the_last_flows_filtered_by_the_agent() {
    let lab = lab(LAB);
    let a = ExportingAgent::start(&lab, &[]);
    make_denied_flows(&lab);
    a.agent
        .wait_for_flow(Duration::from_secs(5), to("10.244.1.4", 53));

    let json_lines = |out: &std::process::Output| -> Vec<Value> {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON line"))
            .collect()
    };
    // --verdict: only the refused flow.
    let lines = json_lines(&a.observe(&["--verdict", "REFUSED", "-o", "json"]));
    assert!(!lines.is_empty());
    assert!(
        lines.iter().all(|l| l["flow"]["verdict"] == "REFUSED"
            && l["flow"]["l4"]["TCP"]["destination_port"] == 7777),
        "{lines:#?}"
    );
    // --protocol and --port; --from-ip.
    let lines = json_lines(&a.observe(&[
        "--protocol",
        "udp",
        "--port",
        "53",
        "--from-ip",
        "10.244.1.0/24",
        "-o",
        "json",
    ]));
    assert!(
        !lines.is_empty()
            && lines
                .iter()
                .all(|l| l["flow"]["l4"]["UDP"]["destination_port"] == 53),
        "{lines:#?}"
    );
    // --to-ip with --to-port that nothing matches: nothing.
    let lines =
        json_lines(&a.observe(&["--to-ip", "10.244.1.4", "--to-port", "8080", "-o", "json"]));
    assert!(lines.is_empty(), "{lines:#?}");
    // --last 1: exactly one, the newest.
    let all = json_lines(&a.observe(&["-o", "json", "--last", "100"]));
    let last = json_lines(&a.observe(&["-o", "json", "--last", "1"]));
    assert_eq!(last.len(), 1);
    assert_eq!(last[0], *all.last().unwrap());
    // --since in the future: nothing; --since 10m: everything.
    assert_eq!(
        json_lines(&a.observe(&["-o", "json", "--since", "10m"])).len(),
        all.len()
    );
    // --reason.
    let lines = json_lines(&a.observe(&["--reason", "TCP_RESET", "-o", "json"]));
    assert!(!lines.is_empty() && lines.iter().all(|l| l["flow"]["refusal"] == "TCP_RESET"));

    // Compact: one line per record, readable.
    let out = a.observe(&["--to-port", "8080"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().expect("a compact line");
    assert!(
        first.contains(" 10.244.1.2:")
            && first.contains(" -> 10.244.1.3:8080 TCP SYN DROPPED (NETFILTER_DROP)"),
        "{text}"
    );
    assert!(!text.contains('\x1b'), "no colour when not a terminal");
    // Table: a header, then rows.
    let out = a.observe(&["--to-port", "8080", "-o", "table"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines().next().unwrap().starts_with("TIME") && text.contains("NETFILTER_DROP"),
        "{text}"
    );

    // On a terminal (a pty from script(1)), the verdict is coloured.
    let cmd = format!(
        "{} observe --server {} --to-port 8080",
        target_binary("netwatch").display(),
        a.socket.display()
    );
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env_remove("NO_COLOR")
        // script(1)'s pty has no size here: the width comes from COLUMNS.
        .env("COLUMNS", "250")
        .output()
        .expect("script(1)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("\x1b[31mDROPPED\x1b[0m (NETFILTER_DROP)"),
        "{text:?}"
    );

    // Bad input: a clear error naming the flag and the valid values.
    let out = a.observe(&["--verdict", "FORWARDED"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--verdict")
            && err.contains("DROPPED, TIMED_OUT, REFUSED, POLICY_NOT_ENFORCED"),
        "{err}"
    );
    let out = a.observe(&["--protocol", "http"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("tcp, udp, sctp"),
        "{out:?}"
    );
    let out = Command::new(target_binary("netwatch"))
        .args(["observe", "--server", "/nonexistent/netwatch.sock"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("cannot reach the agent at unix:///nonexistent/netwatch.sock"),
        "{out:?}"
    );
}

#[test]
fn observe_follow_streams_new_flows_as_they_happen() {
    let lab = lab(LAB);
    let a = ExportingAgent::start(&lab, &[]);
    // A flow before following: not shown (no --last with -f).
    expect_probe(
        &lab,
        "prod/web",
        tcp("10.244.1.3:7777", 2),
        Outcome::Refused,
    );
    a.agent
        .wait_for_flow(Duration::from_secs(5), to("10.244.1.3", 7777));
    let mut child = ChildGuard(
        Command::new(target_binary("netwatch"))
            .args([
                "observe",
                "--server",
                a.socket.to_str().unwrap(),
                "-f",
                "-o",
                "json",
                "--to-ip",
                "10.244.1.3",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // Following: wait until the agent counts the client, then make a new flow.
    wait_until(Duration::from_secs(5), "the follower is registered", || {
        a.metric("netwatch_observer_clients", &[])
            .filter(|n| *n == 1.0)
    });
    expect_probe(
        &lab,
        "prod/web",
        tcp("10.244.1.3:8080", 1),
        Outcome::TimedOut,
    );
    // A flow to elsewhere is filtered out by the agent.
    let _ = lab
        .probe(
            "prod/web",
            &Probe::dns(addr("10.244.1.4:53"), Duration::from_secs(1)),
        )
        .unwrap();
    let line = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("a live record within 5 s");
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        v["flow"]["l4"]["TCP"]["destination_port"], 8080,
        "the new flow, not the earlier one: {line}"
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    while let Ok(l) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        let v: Value = serde_json::from_str(&l).unwrap();
        assert_eq!(
            v["flow"]["IP"]["destination"], "10.244.1.3",
            "the agent filtered: {l}"
        );
    }
    // A vanished client is forgotten at the next record.
    drop(child);
    let _ = lab
        .probe(
            "prod/web",
            &Probe::tcp(addr("10.244.1.3:7777"), Duration::from_secs(1)),
        )
        .unwrap();
    wait_until(Duration::from_secs(5), "the follower is gone", || {
        a.metric("netwatch_observer_clients", &[])
            .filter(|n| *n == 0.0)
    });
}

#[test]
fn top_groups_denied_flows_with_counts() {
    let lab = lab(LAB);
    let a = ExportingAgent::start(&lab, &[]);
    make_denied_flows(&lab);
    let syns = lab.nft_counter("node-1", "drop-api").unwrap();
    // Wait for the last retransmission to be reported.
    wait_until(Duration::from_secs(15), "drops reported", || {
        (a.metric("netwatch_drops_total", &[("destination_port", "8080")]) == Some(syns as f64))
            .then_some(())
    });
    let out = a.top_json(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let rows = v["rows"].as_array().unwrap();
    let api = rows
        .iter()
        .find(|r| r["destination"] == "10.244.1.3" && r["port"] == 8080)
        .unwrap_or_else(|| panic!("{v:#}"));
    assert_eq!(
        (
            api["source"].as_str(),
            api["verdict"].as_str(),
            api["reason"].as_str()
        ),
        (Some("10.244.1.2"), Some("DROPPED"), Some("NETFILTER_DROP"))
    );
    assert_eq!(
        (api["flows"].as_u64(), api["packets"].as_u64()),
        (Some(1), Some(syns))
    );
    assert!(
        rows.iter()
            .any(|r| r["verdict"] == "REFUSED" && r["reason"] == "TCP_RESET")
    );
    assert_eq!(v["node_name"], "node-1");
    // The table form, as on-call reads it.
    let out = Command::new(target_binary("netwatch"))
        .args([
            "observe",
            "--summary",
            "--server",
            a.socket.to_str().unwrap(),
            "--verdict",
            "DROPPED",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("SOURCE") && text.contains("8080/TCP") && !text.contains("TCP_RESET"),
        "{text}"
    );
}

/// Prometheus running in the lab node's namespace; killed when dropped.
struct PrometheusServer {
    _child: ChildGuard,
    addr: SocketAddr,
    netns: String,
    _dir: tempfile::TempDir,
}

impl PrometheusServer {
    fn start(lab: &Lab, target: SocketAddr, rules: &Path) -> PrometheusServer {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [{}]\nscrape_configs:\n  - job_name: netwatch-agent\n    static_configs:\n      - targets: ['{target}']\n",
                rules.display()
            ),
        )
        .unwrap();
        let addr: SocketAddr = "127.0.0.1:9090".parse().unwrap();
        let log = fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = lab
            .on_node("node-1", Path::new("/usr/bin/prometheus"))
            .unwrap()
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus (cargo xtask setup installs it)");
        let netns = lab.node("node-1").unwrap().netns.clone();
        let p = PrometheusServer {
            _child: ChildGuard(child),
            addr,
            netns,
            _dir: dir,
        };
        wait_until(Duration::from_secs(30), "prometheus ready", || {
            try_http_get(&p.netns, p.addr, "/-/ready")
                .ok()
                .filter(|(s, _)| *s == 200)
        });
        p
    }

    fn api(&self, path: &str) -> Value {
        let (status, body) = http_get(&self.netns, self.addr, path);
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus")
}

#[test]
fn prometheus_scrapes_the_agent_and_the_drop_alert_fires() {
    let lab = lab(LAB);
    let a = ExportingAgent::start(&lab, &[]);
    // The shipped rules, with the 1 minute `for` of the drop alert cut to 5 s
    // to keep the test short (promtool tests the shipped timing).
    let shipped = fs::read_to_string(deploy_dir().join("netwatch-rules.yaml")).unwrap();
    let marker = "      - alert: NetwatchPolicyDrops";
    let (head, rest) = shipped.split_at(shipped.find(marker).expect("the drop alert"));
    let rules = format!("{head}{}", rest.replacen("for: 1m", "for: 5s", 1));
    let dir = tempfile::tempdir().unwrap();
    let rules_path = dir.path().join("netwatch-rules.yaml");
    fs::write(&rules_path, rules).unwrap();
    let prom = PrometheusServer::start(&lab, a.metrics, &rules_path);

    // Denied traffic keeps coming, as in an incident.
    let stop = Arc::new(AtomicBool::new(false));
    let helper = support::helper();
    let web = lab.pod("prod/web").unwrap().clone();
    let probes = {
        let stop = stop.clone();
        let cmd = move || lab_probe_cmd(&helper, &web);
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let _ = cmd().status();
            }
        })
    };
    let firing = wait_until(
        Duration::from_secs(90),
        "NetwatchPolicyDrops firing in Prometheus",
        || {
            let v = prom.api("/api/v1/alerts");
            v["data"]["alerts"]
                .as_array()?
                .iter()
                .find(|al| {
                    al["labels"]["alertname"] == "NetwatchPolicyDrops" && al["state"] == "firing"
                })
                .cloned()
        },
    );
    stop.store(true, Ordering::Relaxed);
    let _ = probes.join();
    assert_eq!(firing["labels"]["reason"], "NETFILTER_DROP", "{firing:#}");
    assert_eq!(firing["labels"]["severity"], "warning");
    assert!(
        firing["annotations"]["summary"]
            .as_str()
            .unwrap()
            .contains("packets/s (NETFILTER_DROP)"),
        "{firing:#}"
    );
    // Prometheus holds the agent's counter, labelled as the agent exports it.
    let q = prom.api("/api/v1/query?query=sum%20by%20(destination_port)%20(netwatch_drops_total)");
    let result = q["data"]["result"].as_array().unwrap();
    assert!(
        result
            .iter()
            .any(|r| r["metric"]["destination_port"] == "8080"),
        "{q:#}"
    );
    let up = prom.api("/api/v1/query?query=up%7Bjob%3D%22netwatch-agent%22%7D");
    assert_eq!(up["data"]["result"][0]["value"][1], "1", "{up:#}");
    // Every dashboard query is valid PromQL against this Prometheus, and the
    // drop panels show the lab's drops.
    let dash: Value = serde_json::from_str(
        &fs::read_to_string(deploy_dir().join("../grafana/netwatch-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut with_data = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$namespace", ".*")
                .replace("$__rate_interval", "1m")
                .replace("$__range", "5m");
            let v = prom.api(&format!("/api/v1/query?query={}", percent_encode(&expr)));
            assert_eq!(v["status"], "success", "{}: {expr}\n{v:#}", panel["title"]);
            if !v["data"]["result"].as_array().unwrap().is_empty() {
                with_data += 1;
            }
        }
    }
    assert!(
        with_data >= 4,
        "dashboard queries returning lab data: {with_data}"
    );
    // The agent is ready, so the not-ready alert is not firing.
    let alerts = prom.api("/api/v1/alerts");
    assert!(
        !alerts["data"]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|al| al["labels"]["alertname"] == "NetwatchAgentNotReady"),
        "{alerts:#}"
    );
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// One short TCP probe to the dropped port from the web pod.
fn lab_probe_cmd(helper: &Path, web: &netwatch_lab::LabPod) -> Command {
    let probe = serde_json::to_string(&Probe::tcp(
        addr("10.244.1.3:8080"),
        Duration::from_millis(1500),
    ))
    .unwrap();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &web.netns])
        .arg(helper)
        .args(["probe", "--json", &probe])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

#[test]
fn promtool_checks_and_unit_tests_the_shipped_rules() {
    let dir = deploy_dir();
    let out = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(dir.join("netwatch-rules.yaml"))
        .output()
        .expect("promtool");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("promtool")
        .current_dir(&dir)
        .args(["test", "rules", "netwatch-rules.test.yaml"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && text.contains("SUCCESS"), "{text}");
    // The dashboard is valid JSON and queries only metrics the agent exports.
    let dash: Value = serde_json::from_str(
        &fs::read_to_string(dir.join("../grafana/netwatch-dashboard.json")).unwrap(),
    )
    .unwrap();
    let exprs: Vec<String> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect();
    assert!(exprs.len() >= 8);
    let known = [
        "netwatch_drops_total",
        "netwatch_denied_flows_total",
        "netwatch_dns_failures_total",
        "netwatch_policy_denials_total",
        "netwatch_lost_events_total",
        "netwatch_flow_log_dropped_records_total",
        "netwatch_observer_dropped_records_total",
        "netwatch_unenriched_flows_total",
        "netwatch_ready",
    ];
    for e in &exprs {
        for word in e
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("netwatch_"))
        {
            assert!(
                known.contains(&word),
                "dashboard queries {word}, which the agent does not export: {e}"
            );
        }
    }
}

const NAMED_LAB: &str = r#"
nodes:
  - name: node-1
    nftables: |
      table inet cni {
        chain forward {
          type filter hook forward priority 0; policy accept;
          ip daddr 10.244.1.3 tcp dport 8080 counter drop comment "drop-api"
          ip daddr 10.244.1.4 udp dport 53 counter drop comment "drop-dns"
        }
      }
pods:
  - { name: web-7f9c4-abcde, namespace: prod, node: node-1, ip: 10.244.1.2 }
  - { name: api-5d4e8-fghij, namespace: prod, node: node-1, ip: 10.244.1.3, listen: ["8080/tcp"] }
  - { name: coredns-0, namespace: kube-system, node: node-1, ip: 10.244.1.4, listen: ["53/udp"] }
"#;

const NAMED_MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: prod }
---
apiVersion: v1
kind: Namespace
metadata: { name: kube-system }
---
apiVersion: apps/v1
kind: ReplicaSet
metadata:
  name: web-7f9c4
  namespace: prod
  ownerReferences: [ { apiVersion: apps/v1, kind: Deployment, name: web, uid: d1, controller: true } ]
spec: { selector: { matchLabels: { app: web } } }
---
apiVersion: apps/v1
kind: ReplicaSet
metadata:
  name: api-5d4e8
  namespace: prod
  ownerReferences: [ { apiVersion: apps/v1, kind: Deployment, name: api, uid: d2, controller: true } ]
spec: { selector: { matchLabels: { app: api } } }
---
apiVersion: v1
kind: Pod
metadata:
  name: web-7f9c4-abcde
  namespace: prod
  labels: { app: web }
  ownerReferences: [ { apiVersion: apps/v1, kind: ReplicaSet, name: web-7f9c4, uid: r1, controller: true } ]
spec: { nodeName: node-1, containers: [ { name: web, image: web } ] }
status: { phase: Running, podIP: 10.244.1.2, conditions: [ { type: Ready, status: "True" } ] }
---
apiVersion: v1
kind: Pod
metadata:
  name: api-5d4e8-fghij
  namespace: prod
  labels: { app: api, tier: backend }
  ownerReferences: [ { apiVersion: apps/v1, kind: ReplicaSet, name: api-5d4e8, uid: r2, controller: true } ]
spec: { nodeName: node-1, containers: [ { name: api, image: api, ports: [ { containerPort: 8080 } ] } ] }
status: { phase: Running, podIP: 10.244.1.3, conditions: [ { type: Ready, status: "True" } ] }
---
apiVersion: v1
kind: Pod
metadata:
  name: coredns-0
  namespace: kube-system
  labels: { k8s-app: kube-dns }
spec: { nodeName: node-1, containers: [ { name: dns, image: coredns, ports: [ { containerPort: 53, protocol: UDP } ] } ] }
status: { phase: Running, podIP: 10.244.1.4, conditions: [ { type: Ready, status: "True" } ] }
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: { name: default-deny-all, namespace: prod }
spec: { podSelector: {}, policyTypes: [ Ingress ] }
"#;

#[test]
fn with_pod_identity_observe_filters_by_namespace_pod_and_label_and_metrics_name_workloads_and_policies()
 {
    let lab = lab(NAMED_LAB);
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("cluster.yaml");
    fs::write(&manifests, NAMED_MANIFESTS).unwrap();
    let a = ExportingAgent::start(
        &lab,
        &[
            "--manifests",
            manifests.to_str().unwrap(),
            "--metrics-destination-context",
            "namespace,workload,pod,port",
        ],
    );
    expect_probe(
        &lab,
        "prod/web-7f9c4-abcde",
        tcp("10.244.1.3:8080", 2),
        Outcome::TimedOut,
    );
    expect_probe(
        &lab,
        "prod/web-7f9c4-abcde",
        dns("10.244.1.4:53", 2),
        Outcome::TimedOut,
    );
    let named = |port: u16, pod: &'static str| {
        move |f: &Value| {
            to(
                if port == 53 {
                    "10.244.1.4"
                } else {
                    "10.244.1.3"
                },
                port,
            )(f) && f["destination"]["pod_name"] == pod
        }
    };
    a.agent
        .wait_for_flow(Duration::from_secs(10), named(8080, "api-5d4e8-fghij"));
    a.agent
        .wait_for_flow(Duration::from_secs(10), named(53, "coredns-0"));

    let flows = |args: &[&str]| -> Vec<Value> {
        let mut all = vec!["-o", "json", "--last", "100"];
        all.extend_from_slice(args);
        let out = a.observe(&all);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["flow"].clone())
            .collect()
    };
    let ports = |fs: &[Value]| -> Vec<u64> {
        let mut p: Vec<u64> = fs
            .iter()
            .filter_map(|f| {
                f["l4"]["TCP"]["destination_port"]
                    .as_u64()
                    .or(f["l4"]["UDP"]["destination_port"].as_u64())
            })
            .collect();
        p.sort();
        p.dedup();
        p
    };
    assert_eq!(ports(&flows(&["-n", "kube-system"])), [53]);
    assert_eq!(
        ports(&flows(&["--namespace", "prod"])),
        [53, 8080],
        "the DNS flow's source is in prod"
    );
    assert_eq!(ports(&flows(&["--to-namespace", "prod"])), [8080]);
    assert_eq!(ports(&flows(&["--to-pod", "prod/api-"])), [8080]);
    assert_eq!(ports(&flows(&["--pod", "prod/web-7f9c4"])), [53, 8080]);
    assert_eq!(
        ports(&flows(&["--from-pod", "prod/api-"])),
        Vec::<u64>::new()
    );
    assert_eq!(ports(&flows(&["--from-label", "app=web"])), [53, 8080]);
    assert_eq!(
        ports(&flows(&["--to-label", "app=api,tier=backend"])),
        [8080]
    );
    assert_eq!(ports(&flows(&["-l", "k8s-app=kube-dns"])), [53]);
    assert_eq!(
        ports(&flows(&["--label", "app=nothing"])),
        Vec::<u64>::new()
    );

    // The compact line names pods and the denying policy.
    let out = a.observe(&["--to-port", "8080"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines().any(|l| l.ends_with(
            " prod/web-7f9c4-abcde -> prod/api-5d4e8-fghij:8080 TCP SYN DROPPED (NETFILTER_DROP) denied by prod/default-deny-all [ingress]"
        )),
        "{text}"
    );

    // Metrics: workloads as context labels, the policy named, counts exact.
    let syns = lab.nft_counter("node-1", "drop-api").unwrap();
    let labels = [
        ("source_namespace", "prod"),
        ("source_workload", "web"),
        ("destination_namespace", "prod"),
        ("destination_workload", "api"),
        ("destination_pod", "api-5d4e8-fghij"),
        ("destination_port", "8080"),
        ("direction", "ingress"),
    ];
    wait_until(
        Duration::from_secs(15),
        "drops to prod/api named and exact",
        || (a.metric("netwatch_drops_total", &labels) == Some(syns as f64)).then_some(()),
    );
    assert_eq!(
        a.metric(
            "netwatch_policy_denials_total",
            &[
                ("direction", "ingress"),
                ("policy_namespace", "prod"),
                ("policy", "default-deny-all")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        a.metric(
            "netwatch_dns_failures_total",
            &[
                ("source_workload", "web"),
                ("destination_namespace", "kube-system")
            ]
        ),
        Some(1.0)
    );

    // top groups by workload.
    let out = a.top_json(&["-n", "prod"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    assert!(
        v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["source"] == "prod/web"
                && r["destination"] == "prod/api"
                && r["port"] == 8080),
        "{v:#}"
    );
}

#[test]
fn bad_exporter_flags_are_named_with_the_valid_values() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let run = |args: &[&str]| -> String {
        let out = Command::new(target_binary("netwatch-agent"))
            .args([
                "--duration",
                "1",
                "--api-socket",
                socket.to_str().unwrap(),
                "--metrics-addr",
                "none",
            ])
            .args(args)
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!stderr.contains("panicked"), "{stderr}");
        stderr
    };
    let e = run(&["--metrics-source-context", "namespace,colour"]);
    assert!(
        e.contains("--metrics-source-context") && e.contains("namespace, workload, pod, app, port"),
        "{e}"
    );
    let e = run(&["--metrics-source-context", "port"]);
    assert!(
        e.contains("only valid in --metrics-destination-context"),
        "{e}"
    );
    let e = run(&["--flow-log-allow", "verdict=FORWARDED"]);
    assert!(
        e.contains("--flow-log-allow")
            && e.contains("DROPPED, TIMED_OUT, REFUSED, POLICY_NOT_ENFORCED"),
        "{e}"
    );
    let e = run(&["--flow-log-deny", "colour=red"]);
    assert!(
        e.contains("unknown filter key \"colour\"") && e.contains("from-pod"),
        "{e}"
    );
    let e = run(&["--api-addr", "0.0.0.0:4245"]);
    assert!(
        e.contains("--api-addr 0.0.0.0:4245") && e.contains("loopback"),
        "{e}"
    );
    let out = Command::new(target_binary("netwatch-agent"))
        .args(["--duration", "1", "--metrics-addr", "localhost"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("--metrics-addr \"localhost\"") && e.contains(":9965"),
        "{e}"
    );
}

#[test]
fn an_unbindable_socket_or_port_turns_off_only_that_output() {
    let lab = lab(LAB);
    // Something else holds a port in the node's namespace.
    let netns = lab.node("node-1").unwrap().netns.clone();
    let squatter = std::thread::spawn(move || {
        enter_netns(&netns);
        std::net::TcpListener::bind("127.0.0.1:0").unwrap()
    })
    .join()
    .unwrap();
    let taken = squatter.local_addr().unwrap().to_string();
    let mut agent = Agent::start(
        &lab,
        "node-1",
        3,
        &[
            "--metrics-addr",
            &taken,
            "--api-socket",
            "/proc/netwatch/netwatch.sock",
        ],
    );
    let log = agent.log();
    assert!(
        log.contains(&format!("cannot listen for metrics on {taken}"))
            && log.contains("metrics are off (--metrics-addr)"),
        "{log}"
    );
    assert!(
        log.contains("cannot listen on /proc/netwatch/netwatch.sock")
            && log.contains("--api-socket"),
        "{log}"
    );
    // Capture and the flow log go on.
    expect_probe(
        &lab,
        "prod/web",
        tcp("10.244.1.3:7777", 2),
        Outcome::Refused,
    );
    agent.wait_for_flow(Duration::from_secs(5), to("10.244.1.3", 7777));
    agent.stop();
}

#[test]
fn a_follower_that_stops_reading_loses_records_and_capture_goes_on() {
    let lab = lab(LAB);
    let a = ExportingAgent::start(&lab, &[]);
    // A client that asks to follow everything, then reads nothing.
    let mut stalled = std::os::unix::net::UnixStream::connect(&a.socket).unwrap();
    stalled.write_all(b"{\"follow\": true}\n").unwrap();
    wait_until(Duration::from_secs(5), "the follower is registered", || {
        a.metric("netwatch_observer_clients", &[])
            .filter(|n| *n == 1.0)
    });
    // 2,000 DNS flows (2,000 source ports) to the resolver the node drops.
    const FLOWS: usize = 2000;
    dns_flows(&lab, FLOWS);
    // Every flow is counted although one client is stuck.
    wait_until(Duration::from_secs(30), "all DNS flows counted", || {
        (a.metric("netwatch_denied_flows_total", &[("destination_port", "53")])
            == Some(FLOWS as f64))
        .then_some(())
    });
    let dropped = wait_until(
        Duration::from_secs(30),
        "records dropped to the stalled client",
        || {
            a.metric("netwatch_observer_dropped_records_total", &[])
                .filter(|n| *n > 0.0)
        },
    );
    assert_eq!(a.metric("netwatch_lost_events_total", &[]), Some(0.0));
    wait_until(
        Duration::from_secs(30),
        "the flow log has every flow",
        || (uuids(&records(&a.agent.lines(), to("10.244.1.4", 53))).len() == FLOWS).then_some(()),
    );
    assert_eq!(
        a.metric("netwatch_flow_log_dropped_records_total", &[]),
        Some(0.0)
    );
    // When the client reads again, it is told how many it lost.
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut told = None;
    for line in BufReader::new(&stalled).lines() {
        let Ok(line) = line else { break };
        let v: Value = serde_json::from_str(&line).unwrap();
        if let Some(n) = v["lost_records"].as_u64() {
            told = Some(n);
            break;
        }
    }
    let told = told.expect("a lost_records line");
    assert!(
        told as f64 >= dropped,
        "told {told}, the agent counted {dropped}"
    );
}

/// A tmpfs mounted for the test; unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(bytes: usize) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={bytes}"),
                "netwatch-test",
                dir.path().to_str().unwrap(),
            ])
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount tmpfs");
        SmallDisk { dir }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .args(["-l", self.dir.path().to_str().unwrap()])
            .status();
    }
}

/// Send one DNS query from each of `n` source ports of the web pod to the
/// resolver the node drops: `n` denied flows.
fn dns_flows(lab: &Lab, n: usize) {
    let web = lab.pod("prod/web").unwrap().netns.clone();
    std::thread::spawn(move || {
        enter_netns(&web);
        let query = netwatch_lab::probe::dns_query(7);
        let sockets: Vec<std::net::UdpSocket> = (0..n)
            .map(|_| std::net::UdpSocket::bind("0.0.0.0:0").unwrap())
            .collect();
        for s in &sockets {
            s.send_to(&query, "10.244.1.4:53").unwrap();
        }
    })
    .join()
    .unwrap();
}

#[test]
fn a_full_disk_loses_flow_log_lines_counted_exactly_and_capture_goes_on() {
    let lab = lab(LAB);
    let disk = SmallDisk::mount(16 * 1024);
    let path = disk.dir.path().join("flows.jsonl");
    let a = ExportingAgent::start(&lab, &["--flow-log", path.to_str().unwrap()]);
    const FLOWS: usize = 300;
    dns_flows(&lab, FLOWS);
    wait_until(Duration::from_secs(30), "all flows counted", || {
        (a.metric("netwatch_denied_flows_total", &[("destination_port", "53")])
            == Some(FLOWS as f64))
        .then_some(())
    });
    // The writer thread settles after the metrics: wait until every NEW
    // record is accounted for, as written or as counted lost.
    let (written, dropped) = wait_until(
        Duration::from_secs(20),
        "every NEW record written or counted lost",
        || {
            let written = a.metric("netwatch_flow_log_records_total", &[])?;
            let dropped = a.metric("netwatch_flow_log_dropped_records_total", &[])?;
            (dropped > 0.0 && written + dropped >= FLOWS as f64).then_some((written, dropped))
        },
    );
    assert!(
        written < FLOWS as f64,
        "a 16 KiB disk cannot hold {FLOWS} records: {written} written, {dropped} lost"
    );
    assert!(
        a.metric("netwatch_flow_log_write_errors_total", &[])
            .unwrap()
            >= 1.0
    );
    // Every line counted as written is whole in the file; the rest are counted as lost.
    let text = fs::read(&path).unwrap();
    let whole = text.iter().filter(|b| **b == b'\n').count() as f64;
    assert_eq!(
        whole,
        a.metric("netwatch_flow_log_records_total", &[]).unwrap()
    );
    let log = a.agent.log();
    assert_eq!(
        log.matches("No space left on device").count(),
        1,
        "reported once: {log}"
    );
}
