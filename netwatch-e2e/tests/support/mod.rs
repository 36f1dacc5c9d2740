//! Shared harness of the end-to-end tests: build a lab, run the real agent
//! in a lab node, read what it reported the way a user would.
#![allow(dead_code)]

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use netwatch_lab::{
    Datapath, Lab, LabSpec, Outcome, Probe,
    scenario::{Binaries, Scenario, check},
};
use serde_json::Value;

/// The `netwatch-lab` binary (runs listeners and probes inside lab pods).
pub fn helper() -> PathBuf {
    target_binary("netwatch-lab")
}

/// target/<profile>/<name>, next to this test's own deps/ directory.
pub fn target_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build -p netwatch-agent -p netwatch-lab --bins`; `cargo xtask test` does)",
        bin.display()
    );
    bin
}

pub fn lab(spec_yaml: &str) -> Lab {
    let spec: LabSpec = serde_yaml::from_str(spec_yaml).expect("lab spec");
    Lab::up(&spec, &helper()).expect("lab up (are you root?)")
}

/// `ip:port` (`[v6]:port`) as a socket address.
pub fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A TCP connect to `to` (`ip:port`), given up after `secs`.
pub fn tcp(to: &str, secs: u64) -> Probe {
    Probe::tcp(addr(to), Duration::from_secs(secs))
}

/// A DNS query to `to` (`ip:port`), given up after `secs`.
pub fn dns(to: &str, secs: u64) -> Probe {
    Probe::dns(addr(to), Duration::from_secs(secs))
}

/// Run `probe` from lab pod `from` (`namespace/name`); its outcome must be `want`.
pub fn expect_probe(lab: &Lab, from: &str, probe: Probe, want: Outcome) {
    let r = lab.probe(from, &probe).expect("probe");
    assert_eq!(r.outcome, want, "{from}: {probe:?}: {r:?}");
}

/// A netwatch-agent running in a lab node; killed when dropped.
pub struct Agent {
    child: Option<Child>,
    pub flow_log: PathBuf,
    pub stderr_log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    /// Start the agent in `node` and wait until it has attached to
    /// `interfaces` pod interfaces.
    pub fn start(lab: &Lab, node: &str, interfaces: usize, extra: &[&str]) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        let flow_log = dir.path().join("flows.jsonl");
        let stderr_log = dir.path().join("agent.log");
        let n = lab.node(node).expect("node");
        let cgroup_root = n.cgroup_root.to_string_lossy().into_owned();
        let flow_log_arg = flow_log.to_string_lossy().into_owned();
        // Each agent its own observe socket: tests run side by side.
        let api_socket = dir.path().join("api.sock").to_string_lossy().into_owned();
        // Defaults for tests; any of them can be overridden through `extra`.
        let defaults: [(&str, &str); 10] = [
            ("--node-name", node),
            ("--flow-log", &flow_log_arg),
            ("--interfaces", "cali*"),
            ("--api-socket", &api_socket),
            ("--cgroup-root", &cgroup_root),
            ("--connect-timeout", "1"),
            ("--update-interval", "1"),
            ("--idle-timeout", "3"),
            ("--metrics-addr", "none"),
            ("--log", "info"),
        ];
        let mut args: Vec<&str> = vec!["--own-netns-only"];
        for (flag, value) in defaults {
            if !extra.contains(&flag) {
                args.extend_from_slice(&[flag, value]);
            }
        }
        args.extend_from_slice(extra);
        let stderr = fs::File::create(&stderr_log).expect("agent log");
        let child = lab
            .on_node(node, &target_binary("netwatch-agent"))
            .expect("node")
            .args(&args)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start netwatch-agent");
        let mut agent = Agent {
            child: Some(child),
            flow_log,
            stderr_log,
            _dir: dir,
        };
        agent.wait_for_log(|log| {
            log.matches("attached TC classifiers").count() >= interfaces
                && log.contains("capturing")
        });
        agent
    }

    /// The agent's stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    pub fn wait_for_log(&mut self, ready: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + slowed(Duration::from_secs(30));
        loop {
            let log = self.log();
            if ready(&log) {
                return;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("netwatch-agent exited ({status}) before it was ready:\n{log}");
            }
            assert!(
                Instant::now() < deadline,
                "netwatch-agent not ready after 30 s:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Flow log lines so far: complete lines only, as the agent may be
    /// writing the last one while it runs.
    pub fn lines(&self) -> Vec<Value> {
        let text = fs::read_to_string(&self.flow_log).unwrap_or_default();
        let complete = text.rfind('\n').map_or(0, |i| i + 1);
        text[..complete]
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("flow log line is not JSON ({e}): {l}"))
            })
            .collect()
    }

    /// Wait until a flow log line satisfies `pred`; panic with the log after `timeout`.
    pub fn wait_for_flow(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let timeout = slowed(timeout);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.lines().into_iter().find(|l| pred(&l["flow"])) {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "no matching flow after {timeout:?}; flow log:\n{}\nagent log:\n{}",
                fs::read_to_string(&self.flow_log).unwrap_or_default(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, as the OOM killer or a node crash would: nothing runs on
    /// the way out.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, wait for exit (final records are written), return the log lines.
    pub fn stop(&mut self) -> Vec<Value> {
        if let Some(mut c) = self.child.take() {
            // SAFETY: sending a signal to our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(status)) = c.try_wait() {
                    assert!(
                        status.success(),
                        "agent exited with {status}:\n{}",
                        self.log()
                    );
                    break;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    panic!("agent did not stop within 10 s of SIGTERM:\n{}", self.log());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.lines()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub use netwatch_lab::slowed;

/// GET `path` from the agent's metrics server on `node`'s loopback.
pub fn node_http_get(lab: &Lab, node: &str, url: &str) -> String {
    let out = lab
        .on_node(node, &helper())
        .expect("node")
        .args(["fetch", url])
        .output()
        .expect("netwatch-lab fetch");
    assert!(
        out.status.success(),
        "GET {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Records (the `flow` objects) matching `pred`, in log order.
pub fn records(lines: &[Value], pred: impl Fn(&Value) -> bool) -> Vec<&Value> {
    lines
        .iter()
        .map(|l| &l["flow"])
        .filter(|f| pred(f))
        .collect()
}

/// Distinct flow uuids among `records`.
pub fn uuids(records: &[&Value]) -> Vec<String> {
    let mut v: Vec<String> = records
        .iter()
        .filter_map(|r| r["uuid"].as_str().map(str::to_string))
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Does a flow record go to `ip:port`?
pub fn to(ip: &str, port: u16) -> impl Fn(&Value) -> bool {
    let ip = ip.to_string();
    move |f: &Value| {
        f["IP"]["destination"] == ip.as_str()
            && ["TCP", "UDP", "SCTP"]
                .iter()
                .any(|p| f["l4"][p]["destination_port"] == port)
    }
}

/// Stop `agent`; the final record of each flow to `ip:port`.
pub fn final_records(agent: &mut Agent, ip: &str, port: u16) -> Vec<Value> {
    let lines = agent.stop();
    let all = records(&lines, to(ip, port));
    uuids(&all)
        .into_iter()
        .filter_map(|u| {
            all.iter()
                .rev()
                .find(|r| r["uuid"] == u.as_str())
                .map(|r| (*r).clone())
        })
        .collect()
}

/// The scenarios' folder (`scenarios/` at the workspace root).
pub fn scenarios_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios")
}

/// Run `scenarios/<name>` with every check it states: on `datapath` (the
/// scenario's own when `None`), after `adjust` has changed what a datapath
/// legitimately changes (the kernel's drop reason).
pub fn run_scenario(name: &str, datapath: Option<Datapath>, adjust: impl FnOnce(&mut Scenario)) {
    let mut scenario = Scenario::load(&scenarios_dir().join(name)).expect("scenario");
    if datapath.is_some() {
        scenario.spec.datapath = datapath;
    }
    adjust(&mut scenario);
    let bins = Binaries {
        helper: helper(),
        agent: target_binary("netwatch-agent"),
        netwatch: target_binary("netwatch"),
    };
    let work = tempfile::tempdir().expect("tempdir");
    let mode = scenario.spec.datapath.unwrap_or_default();
    let report = check(&scenario, &bins, work.path())
        .unwrap_or_else(|e| panic!("scenario {name} could not run on the {mode:?} datapath: {e}"));
    eprintln!("{report}");
    assert!(report.checks > 0, "scenario {name} checked nothing");
    assert!(report.is_clean(), "{report}");
}

/// Waits (generously: `secs`, stretched under emulation) until `done`;
/// panics naming `what`, with the agent's log.
pub fn wait_until(agent: &Agent, what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let limit = slowed(Duration::from_secs(secs));
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "not within {limit:?}: {what}\nagent log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
