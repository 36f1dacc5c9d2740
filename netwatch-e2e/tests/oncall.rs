//! End-to-end, as root with the real agent in a lab node: what a new user
//! or on-call trips over first. `/readyz` in `--manifests` mode, logs
//! without colour off a terminal and as JSON, a FINAL record for a flow that
//! went quiet, a follower told that the agent stopped, and the Hubble
//! format from the live agent.

mod support;

use std::{
    fs,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use netwatch_lab::{ChildGuard, Lab, Outcome};
use serde_json::Value;
use support::{Agent, expect_probe, lab, target_binary, tcp, to};

const LAB: &str = r#"
nodes:
  - name: node-1
    nftables: |
      table inet cni {
        chain forward {
          type filter hook forward priority 0; policy accept;
          ip daddr 10.244.1.3 tcp dport 8080 counter drop comment "drop-api"
        }
      }
pods:
  - { name: web-7f9c4-abcde, namespace: prod, node: node-1, ip: 10.244.1.2 }
  - { name: api-5d4e8-fghij, namespace: prod, node: node-1, ip: 10.244.1.3, listen: ["8080/tcp"] }
"#;

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: prod }
---
apiVersion: v1
kind: Pod
metadata: { name: web-7f9c4-abcde, namespace: prod, labels: { app: web } }
spec: { nodeName: node-1, containers: [ { name: web, image: web } ] }
status: { phase: Running, podIP: 10.244.1.2 }
---
apiVersion: v1
kind: Pod
metadata: { name: api-5d4e8-fghij, namespace: prod, labels: { app: api } }
spec: { nodeName: node-1, containers: [ { name: api, image: api, ports: [ { containerPort: 8080 } ] } ] }
status: { phase: Running, podIP: 10.244.1.3 }
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: { name: default-deny-all, namespace: prod }
spec: { podSelector: {}, policyTypes: [ Ingress ] }
"#;

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

/// The agent started by hand (the harness sets NO_COLOR), stderr to a file
/// as `kubectl logs` collects it.
fn raw_agent(lab: &Lab, dir: &std::path::Path, extra: &[&str]) -> (ChildGuard, std::path::PathBuf) {
    let log = dir.join(format!("agent-{}.log", extra.len()));
    let cgroup = lab
        .node("node-1")
        .unwrap()
        .cgroup_root
        .to_string_lossy()
        .into_owned();
    let child = lab
        .on_node("node-1", &target_binary("netwatch-agent"))
        .unwrap()
        .args([
            "--own-netns-only",
            "--node-name",
            "node-1",
            "--interfaces",
            "cali*",
            "--cgroup-root",
            &cgroup,
        ])
        .args(["--flow-log", "none", "--api-socket", "none"])
        .args(extra)
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .expect("start netwatch-agent");
    (ChildGuard(child), log)
}

#[test]
fn manifests_mode_turns_ready_and_logs_are_plain_or_json_off_a_terminal() {
    let lab = lab(LAB);
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("cluster.yaml");
    fs::write(&manifests, MANIFESTS).unwrap();
    let m = manifests.to_str().unwrap();
    let netns = lab.node("node-1").unwrap().netns.clone();

    let (_agent, log) = raw_agent(
        &lab,
        dir.path(),
        &["--manifests", m, "--metrics-addr", "127.0.0.1:0"],
    );
    let addr = wait_until(
        Duration::from_secs(30),
        "metrics address in the log",
        || {
            let text = fs::read_to_string(&log).unwrap_or_default();
            let at =
                text.find("metrics listening on http://")? + "metrics listening on http://".len();
            text.contains("capturing")
                .then(|| text[at..].split('/').next().unwrap().trim().to_string())
        },
    );
    let readyz = || {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &netns,
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ])
            .arg(format!("http://{addr}/readyz"))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    wait_until(
        Duration::from_secs(10),
        "/readyz 200 in --manifests mode",
        || (readyz() == "200").then_some(()),
    );
    let text = fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains('\x1b'),
        "colour codes in a log file:\n{text}"
    );
    assert!(
        text.contains("counting kernel drops with these reasons"),
        "{text}"
    );

    let (mut json_agent, json_log) = raw_agent(
        &lab,
        dir.path(),
        &[
            "--metrics-addr",
            "none",
            "--log-format",
            "json",
            "--duration",
            "2",
        ],
    );
    let status = json_agent.0.wait().unwrap();
    assert!(status.success());
    let text = fs::read_to_string(&json_log).unwrap();
    assert!(text.lines().count() >= 2, "{text}");
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            v["level"].is_string() && v["message"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
    }
}

#[test]
fn a_quiet_flow_ends_with_final_and_a_follower_hears_the_agent_stop() {
    let lab = lab(LAB);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let s = socket.to_str().unwrap();
    let mut agent = Agent::start(
        &lab,
        "node-1",
        2,
        &["--api-socket", s, "--idle-timeout", "3"],
    );
    let mut follower = ChildGuard(
        Command::new(target_binary("netwatch"))
            .args(["observe", "-f", "--server", s])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    expect_probe(
        &lab,
        "prod/web-7f9c4-abcde",
        tcp("10.244.1.3:8080", 2),
        Outcome::TimedOut,
    );
    let new = agent.wait_for_flow(Duration::from_secs(10), to("10.244.1.3", 8080));
    let uuid = new["flow"]["uuid"].as_str().unwrap().to_string();
    // Its retries stop; once quiet for the idle timeout, its last record is FINAL.
    let last = agent.wait_for_flow(Duration::from_secs(20), |f| {
        f["uuid"] == uuid.as_str() && f["lifecycle"] == "FINAL"
    });
    assert!(last["flow"]["packets"].as_u64().unwrap() >= 1);

    agent.stop();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = follower.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "observe -f still running after the agent stopped"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(follower.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("closed the connection"), "{err}");
}

const HUBBLE_VERDICTS: [&str; 8] = [
    "VERDICT_UNKNOWN",
    "FORWARDED",
    "DROPPED",
    "ERROR",
    "AUDIT",
    "REDIRECTED",
    "TRACED",
    "TRANSLATED",
];

/// What a strict Hubble reader would refuse in a line: netwatch-only keys
/// and values. (The full schema check is netwatch-agent/tests/hubble_schema.rs.)
fn assert_hubble(line: &Value) {
    let top: Vec<&String> = line.as_object().unwrap().keys().collect();
    assert!(
        top.iter()
            .all(|k| ["flow", "node_name", "time"].contains(&k.as_str())),
        "{line}"
    );
    let f = &line["flow"];
    assert!(
        HUBBLE_VERDICTS.contains(&f["verdict"].as_str().unwrap()),
        "{line}"
    );
    for netwatch_only in [
        "lifecycle",
        "packets",
        "first_seen",
        "observation_points",
        "explanation",
        "refusal",
    ] {
        assert!(f.get(netwatch_only).is_none(), "{netwatch_only} in {line}");
    }
    for end in ["source", "destination"] {
        for k in f[end].as_object().unwrap().keys() {
            assert!(
                [
                    "ID",
                    "identity",
                    "cluster_name",
                    "namespace",
                    "labels",
                    "pod_name",
                    "workloads"
                ]
                .contains(&k.as_str()),
                "{end}.{k} in {line}"
            );
        }
    }
    assert!(
        f["Summary"]
            .as_str()
            .unwrap()
            .contains("netwatch: verdict="),
        "{line}"
    );
}

#[test]
fn the_live_agent_writes_and_serves_valid_hubble() {
    let lab = lab(LAB);
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("cluster.yaml");
    fs::write(&manifests, MANIFESTS).unwrap();
    let socket = dir.path().join("api.sock");
    let s = socket.to_str().unwrap();
    let agent = Agent::start(
        &lab,
        "node-1",
        2,
        &[
            "--api-socket",
            s,
            "--manifests",
            manifests.to_str().unwrap(),
            "--flow-log-format",
            "hubble",
        ],
    );
    expect_probe(
        &lab,
        "prod/web-7f9c4-abcde",
        tcp("10.244.1.3:8080", 2),
        Outcome::TimedOut,
    );
    let line = agent.wait_for_flow(Duration::from_secs(10), to("10.244.1.3", 8080));
    assert_eq!(line["flow"]["verdict"], "DROPPED");
    assert_eq!(line["flow"]["drop_reason_desc"], "POLICY_DENIED");
    assert_eq!(line["flow"]["destination"]["pod_name"], "api-5d4e8-fghij");
    assert_eq!(
        line["flow"]["ingress_denied_by"][0]["name"],
        "default-deny-all"
    );
    for l in agent.lines() {
        assert_hubble(&l);
    }
    let out = Command::new(target_binary("netwatch"))
        .args(["observe", "--server", s, "-o", "jsonpb", "--last", "50"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().count() >= 1);
    for l in text.lines() {
        assert_hubble(&serde_json::from_str(l).unwrap());
    }
}
