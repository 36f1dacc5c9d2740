//! End-to-end: the agent in hostile environments. It says what is missing
//! and how to fix it, in one line, never panics, keeps capturing what it can,
//! and leaves nothing in the kernel when it exits.

mod support;

use std::{
    os::unix::process::CommandExt,
    process::{Command, Stdio},
    time::Duration,
};

use netwatch_lab::Outcome;
use support::{Agent, expect_probe, lab, target_binary, tcp, to};

const LAB: &str = r#"
nodes: [ { name: node-1 } ]
pods:
  - { name: web, namespace: prod, node: node-1, ip: 10.244.1.2 }
  - { name: api, namespace: prod, node: node-1, ip: 10.244.1.3, listen: ["8080/tcp"] }
"#;

fn refused_flow_is_reported(lab: &netwatch_lab::Lab, agent: &Agent) {
    expect_probe(lab, "prod/web", tcp("10.244.1.3:7777", 2), Outcome::Refused);
    let f = agent.wait_for_flow(Duration::from_secs(3), to("10.244.1.3", 7777));
    assert_eq!(f["flow"]["verdict"], "REFUSED");
}

/// Program ids the agent logged at start.
fn program_ids(log: &str) -> Vec<u32> {
    let line = log
        .lines()
        .find(|l| l.contains("eBPF programs loaded"))
        .expect("programs line");
    let list = line
        .split("programs=")
        .nth(1)
        .expect("programs=")
        .split_whitespace()
        .next()
        .unwrap_or("");
    list.split(',')
        .filter_map(|kv| kv.split('=').nth(1)?.parse().ok())
        .collect()
}

/// Whether all these programs are gone within a few seconds: the kernel
/// frees a program after its last link, and tracing links are released
/// after an RCU grace period, so not at the instant the process exits.
fn programs_gone(ids: &[u32]) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if ids.iter().all(|id| !program_exists(*id)) {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn program_exists(id: u32) -> bool {
    Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[test]
fn without_kernel_btf_it_warns_once_and_keeps_capturing_with_tc() {
    let lab = lab(LAB);
    let mut agent = Agent::start(&lab, "node-1", 2, &["--btf", "/nonexistent/vmlinux"]);
    let log = agent.log();
    let warning: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("capture hook off") && l.contains("hook=\"kfree_skb\""))
        .collect();
    assert_eq!(warning.len(), 1, "{log}");
    assert!(
        warning[0].contains("/nonexistent/vmlinux") && warning[0].contains("CONFIG_DEBUG_INFO_BTF"),
        "{}",
        warning[0]
    );
    refused_flow_is_reported(&lab, &agent);
    agent.stop();
    assert!(!agent.log().contains("panicked"));
}

#[test]
fn without_privileges_it_exits_with_one_line_naming_the_capabilities() {
    let out = Command::new(target_binary("netwatch-agent"))
        .args(["--duration", "1", "--cgroup-root", "none"])
        .env("NO_COLOR", "1")
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run agent as nobody");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    let last = stderr.lines().last().unwrap_or("");
    assert!(
        last.starts_with("netwatch-agent: ") && last.contains("CAP_BPF") && last.contains("root"),
        "{stderr}"
    );
}

#[test]
fn bad_flags_are_named() {
    let out = Command::new(target_binary("netwatch-agent"))
        .args([
            "--drop-reasons",
            "default,NETFILTER_DROPP",
            "--duration",
            "1",
        ])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("NETFILTER_DROPP") && stderr.contains("this kernel knows"),
        "{stderr}"
    );

    let out = Command::new(target_binary("netwatch-agent"))
        .args(["--interfaces", "cali[", "--duration", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid --interfaces pattern \"cali[\"")
    );
}

#[test]
fn a_cgroup_root_that_is_not_cgroup_v2_turns_off_only_the_socket_hook() {
    let lab = lab(LAB);
    let mut agent = Agent::start(&lab, "node-1", 2, &["--cgroup-root", "/tmp"]);
    let log = agent.log();
    assert!(
        log.lines().any(|l| l.contains("capture hook off")
            && l.contains("hook=\"sock_ops\"")
            && l.contains("/tmp")),
        "{log}"
    );
    refused_flow_is_reported(&lab, &agent);
    agent.stop();
}

#[test]
fn interfaces_vanishing_mid_attach_do_not_stop_the_agent() {
    let lab = lab(LAB);
    let agent = Agent::start(&lab, "node-1", 2, &[]);
    let netns = lab.node("node-1").unwrap().netns.clone();
    for i in 0..40 {
        let name = format!("calix{i:04}");
        let _ = Command::new("ip")
            .args([
                "-n",
                &netns,
                "link",
                "add",
                &name,
                "type",
                "veth",
                "peer",
                "name",
                &format!("peer{i:04}"),
            ])
            .status();
        let _ = Command::new("ip")
            .args(["-n", &netns, "link", "set", &name, "up"])
            .status();
        let _ = Command::new("ip")
            .args(["-n", &netns, "link", "del", &name])
            .status();
    }
    std::thread::sleep(Duration::from_millis(500));
    refused_flow_is_reported(&lab, &agent);
    let log = agent.log();
    assert!(!log.contains("panicked"), "{log}");
    assert!(
        log.contains("forgot interface interface=calix"),
        "vanished interfaces are forgotten:\n{log}"
    );
}

#[test]
fn nothing_is_left_in_the_kernel_after_sigterm_or_sigkill() {
    let lab = lab(LAB);
    // A clean stop.
    let mut agent = Agent::start(&lab, "node-1", 2, &[]);
    let ids = program_ids(&agent.log());
    assert_eq!(
        ids.len(),
        8,
        "TC from/to pod, kfree_skb, sock_ops, connect4, connect6, inet_sock_set_state, tcp_receive_reset"
    );
    assert!(ids.iter().all(|id| program_exists(*id)));
    agent.stop();
    assert!(
        programs_gone(&ids),
        "programs (and so their links) are gone after exit"
    );
    // Killed without a chance to clean up: the links are fd-based, so the
    // kernel drops them with the process.
    let agent = Agent::start(&lab, "node-1", 2, &[]);
    let ids = program_ids(&agent.log());
    drop(agent); // SIGKILL
    assert!(programs_gone(&ids), "programs are gone after SIGKILL");
    // And no qdisc was added to the pod interfaces (tcx needs none).
    let netns = &lab.node("node-1").unwrap().netns;
    let qdiscs = String::from_utf8(
        Command::new("ip")
            .args(["-n", netns, "-j", "qdisc", "show"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(!qdiscs.contains("clsact"), "{qdiscs}");
}

#[test]
fn inside_a_private_cgroup_namespace_the_guessed_cgroup_root_is_flagged() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    // The agent in its own cgroup namespace, as in a pod without the node's
    // cgroup mount: what it would auto-detect is its own subtree.
    let out = Command::new("unshare")
        .arg("--cgroup")
        .arg(target_binary("netwatch-agent"))
        .args([
            "--duration",
            "1",
            "--metrics-addr",
            "none",
            "--interfaces",
            "nomatch*",
            "--api-socket",
        ])
        .arg(&socket)
        .env("NO_COLOR", "1")
        .output()
        .expect("unshare (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("private cgroup namespace") && stderr.contains("--cgroup-root"),
        "{stderr}"
    );
}

/// What the agent exposes: the observe socket is the owner's and the
/// configured group's only, and the metrics server answers nothing but
/// GET on its three paths.
#[test]
fn the_observe_socket_is_group_only_and_the_endpoints_serve_only_their_paths() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let lab = lab(LAB);
    let agent = Agent::start(
        &lab,
        "node-1",
        2,
        &[
            "--api-socket-group",
            "65534",
            "--metrics-addr",
            "127.0.0.1:9965",
        ],
    );
    let socket = agent.flow_log.with_file_name("api.sock");
    let meta = std::fs::metadata(&socket).expect("the observe socket");
    assert_eq!(meta.permissions().mode() & 0o777, 0o660, "{socket:?}");
    assert_eq!(meta.gid(), 65534, "{socket:?}");
    assert_eq!(meta.uid(), 0, "{socket:?}");

    let get = |path: &str| {
        support::node_http_get(&lab, "node-1", &format!("http://127.0.0.1:9965{path}"))
    };
    assert!(get("/metrics").contains("netwatch_build_info"));
    assert!(get("/healthz").starts_with("ok"));
    for path in [
        "/",
        "/metrics/",
        "/metricsx",
        "/debug/pprof",
        "/../etc/passwd",
        "/readyz/../metrics",
        "//metrics",
    ] {
        let body = get(path);
        assert!(body.starts_with("not found"), "{path}: {body}");
        assert!(!body.contains("netwatch_"), "{path}: {body}");
    }
}
