//! Churn, as a rollout or a CronJob gives it: hundreds of short-lived pods
//! created and deleted on a node under denied traffic, their veths named as
//! Calico names them, their IPs reused by the next pods. The agent runs with
//! `--kubeconfig` against the fake API server (support/fake_apiserver.rs),
//! which sees each pod added before its sandbox and deleted after it, as a
//! kubelet and CNI order it.
//!
//! Asserted: a record for the denied flow of every short-lived pod, named as
//! the pod that held the IP at the time (not the one holding it later); the
//! attached-interfaces gauge back to the live count; no tcx link left behind
//! for a vanished interface; memory not growing with the number of pods that
//! came and went (a leak detector with a generous bound, not a benchmark).

mod support;

#[path = "support/fake_apiserver.rs"]
mod fake_apiserver;

use std::collections::BTreeMap;

use fake_apiserver::{FakeApiServer, NAMESPACES, PODS, pod, seed};
use netwatch_lab::{Lab, Outcome, PodSpec};
use serde_json::json;
use support::{Agent, lab, node_http_get, tcp, wait_until};

const LAB: &str = r#"
nodes:
  - name: node-1
    nftables: |
      table inet lab {
        chain forward {
          type filter hook forward priority 0; policy accept;
          ip daddr 10.244.1.100 tcp dport 9000-9999 counter drop comment "denied"
        }
      }
pods:
  - { name: api, namespace: prod, node: node-1, ip: 10.244.1.100, listen: ["8080/tcp"] }
"#;

const BATCHES: usize = 10;
const PER_BATCH: usize = 20;

/// Pod `i` of batch `b`: its name, its (reused) address, the denied port
/// only it connects to.
fn churn_pod(b: usize, i: usize) -> (String, String, u16) {
    (
        format!("job-{b}-{i}"),
        format!("10.244.1.{}", 10 + i),
        (9000 + b * PER_BATCH + i) as u16,
    )
}

fn attached(lab: &Lab) -> Option<usize> {
    node_http_get(lab, "node-1", "http://127.0.0.1:9965/metrics")
        .lines()
        .find_map(|l| l.strip_prefix("netwatch_attached_interfaces "))
        .and_then(|v| v.trim().parse().ok())
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// tcx links on interfaces that no longer exist: the kernel detaches such
/// a link when its device goes, but it lives on while a process holds it.
fn detached_tcx_links() -> Vec<String> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "link", "show"])
        .output()
        .expect("bpftool (cargo xtask setup installs it)");
    let links: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    links
        .into_iter()
        .filter(|l| l["type"] == "tcx" && l["ifindex"].as_u64().unwrap_or(0) == 0)
        .map(|l| l.to_string())
        .collect()
}

#[test]
fn short_lived_pods_are_named_as_the_pod_that_held_the_ip_and_leave_nothing_behind() {
    let mut lab = lab(LAB);
    let node = lab.node("node-1").expect("node").clone();
    let api = FakeApiServer::start(&node.netns);
    seed(
        &api,
        "node-1",
        &node.ip.to_string(),
        &[("prod", "api", "10.244.1.100")],
    );
    api.apply(
        NAMESPACES,
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": "jobs", "labels": {"kubernetes.io/metadata.name": "jobs"}}}),
    );
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.write_kubeconfig(dir.path());
    let mut agent = Agent::start(
        &lab,
        "node-1",
        1,
        &[
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--metrics-addr",
            "127.0.0.1:9965",
        ],
    );
    let pid = agent.pid().expect("agent running");
    let tcx = netwatch_lab::kernel_version() >= (6, 6);
    let mut rss_after_warmup = 0;
    for b in 0..BATCHES {
        let specs: Vec<PodSpec> = (0..PER_BATCH)
            .map(|i| {
                let (name, ip, _) = churn_pod(b, i);
                PodSpec {
                    name,
                    namespace: "jobs".into(),
                    node: "node-1".into(),
                    ip: ip.parse().unwrap(),
                    ipv6: None,
                    listen: Vec::new(),
                    uid: None,
                    host_network: false,
                }
            })
            .collect();
        // The API has the pod (scheduled, IP assigned) before its first
        // packet, as the kubelet reports it once the sandbox is up.
        for p in &specs {
            api.apply(PODS, pod("node-1", "jobs", &p.name, &p.ip.to_string()));
        }
        for p in &specs {
            lab.add_pod(p).unwrap_or_else(|e| panic!("{}: {e}", p.id()));
        }
        wait_until(&agent, "the batch's interfaces attached", 60, || {
            attached(&lab) == Some(PER_BATCH + 1)
        });
        // Each pod's connection to its own denied port, all at once.
        std::thread::scope(|s| {
            for (i, p) in specs.iter().enumerate() {
                let lab = &lab;
                let (_, _, port) = churn_pod(b, i);
                s.spawn(move || {
                    let r = lab
                        .probe(&p.id(), &tcp(&format!("10.244.1.100:{port}"), 1))
                        .expect("probe");
                    assert_eq!(r.outcome, Outcome::TimedOut, "{}: {r:?}", p.id());
                });
            }
        });
        for p in &specs {
            lab.remove_pod(&p.id()).unwrap_or_else(|e| panic!("{e}"));
            api.delete(PODS, "jobs", &p.name);
        }
        if b == 1 {
            rss_after_warmup = rss_kib(pid);
        }
    }
    wait_until(&agent, "the gauge back to the one live pod", 60, || {
        attached(&lab) == Some(1)
    });
    // Every short-lived pod's denied flow, by its own port.
    let want = BATCHES * PER_BATCH;
    let mut by_port: BTreeMap<u64, serde_json::Value> = BTreeMap::new();
    wait_until(&agent, "a record for every short-lived pod", 60, || {
        for l in agent.lines() {
            let f = &l["flow"];
            if f["IP"]["destination"] == "10.244.1.100"
                && let Some(port) = f["l4"]["TCP"]["destination_port"].as_u64()
                && (9000..9000 + want as u64).contains(&port)
            {
                by_port.insert(port, f.clone());
            }
        }
        by_port.len() == want
    });
    let rss_end = rss_kib(pid);
    for b in 0..BATCHES {
        for i in 0..PER_BATCH {
            let (name, ip, port) = churn_pod(b, i);
            let f = &by_port[&u64::from(port)];
            assert_eq!(f["verdict"], "DROPPED", "{name}: {f:#}");
            assert_eq!(f["IP"]["source"], ip.as_str(), "{f:#}");
            assert_eq!(
                (
                    f["source"]["namespace"].as_str(),
                    f["source"]["pod_name"].as_str()
                ),
                (Some("jobs"), Some(name.as_str())),
                "the pod that held {ip} then, not a later one: {f:#}"
            );
        }
    }
    if tcx {
        let left = detached_tcx_links();
        assert!(
            left.is_empty(),
            "tcx links of vanished interfaces: {left:#?}"
        );
    }
    // 180 pods came and went after the warm-up; a per-pod leak of even
    // 64 KiB would show. (Tombstones are bounded by count and age.)
    eprintln!("agent RSS: {rss_after_warmup} KiB after 2 batches, {rss_end} KiB after {BATCHES}");
    assert!(
        rss_end <= rss_after_warmup + 12 * 1024,
        "RSS grew from {rss_after_warmup} KiB to {rss_end} KiB over {} pods",
        (BATCHES - 2) * PER_BATCH
    );
    let _ = agent.stop();
}
