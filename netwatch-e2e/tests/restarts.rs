//! End-to-end: the agent SIGKILLed and restarted under a flood of denied
//! flows, as the OOM killer or a crash loop would.
//!
//! What a restart guarantees (README "Reliability"): the dead agent leaves
//! nothing in the kernel (its programs, links and maps go with its file
//! descriptors); the new agent starts from empty tables, so it reports only
//! packets it saw itself: a flow that ended before the kill is never
//! reported again, a flow whose packets straddle the restart gets a new
//! uuid (one NEW per uuid, always); flows after the restart are counted
//! exactly again. Packets between the kill and the new agent's attach are
//! not observed: this test measures that window and prints it.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    process::{Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use netwatch_lab::{Outcome, Probe};
use serde_json::Value;
use support::{Agent, lab};

const LAB: &str = r#"
nodes:
  - name: node-1
    nftables: |
      table inet lab {
        chain forward {
          type filter hook forward priority 0; policy accept;
          ip daddr 10.244.1.3 tcp dport 8080 counter drop comment "drop-api"
        }
      }
pods:
  - { name: web, namespace: prod, node: node-1, ip: 10.244.1.2 }
  - { name: api, namespace: prod, node: node-1, ip: 10.244.1.3, listen: ["8080/tcp"] }
"#;

/// SYNs per flood batch: one denied flow each (its own source port).
const BATCH: u32 = 20;

/// Program ids the agent logged at start.
fn program_ids(log: &str) -> Vec<u32> {
    let line = log
        .lines()
        .find(|l| l.contains("eBPF programs loaded"))
        .expect("programs line");
    line.split("programs=")
        .nth(1)
        .expect("programs=")
        .split_whitespace()
        .next()
        .unwrap_or("")
        .split(',')
        .filter_map(|kv| kv.split('=').nth(1)?.parse().ok())
        .collect()
}

fn bpftool_json(args: &[&str]) -> Option<Value> {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

/// The maps the programs use (while they are loaded).
fn map_ids(programs: &[u32]) -> BTreeSet<u64> {
    programs
        .iter()
        .filter_map(|id| bpftool_json(&["prog", "show", "id", &id.to_string()]))
        .flat_map(|p| {
            p["map_ids"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|m| m.as_u64())
        })
        .collect()
}

/// What is still in the kernel of these programs and maps: programs, links
/// to them, maps. Waits a few seconds for the kernel to free them (links and
/// tracing programs go after an RCU grace period).
fn leftovers(programs: &[u32], maps: &BTreeSet<u64>) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut left = Vec::new();
        for id in programs {
            if bpftool_json(&["prog", "show", "id", &id.to_string()]).is_some() {
                left.push(format!("program {id}"));
            }
        }
        for id in maps {
            if bpftool_json(&["map", "show", "id", &id.to_string()]).is_some() {
                left.push(format!("map {id}"));
            }
        }
        if let Some(Value::Array(links)) = bpftool_json(&["link", "show"]) {
            for l in links {
                if l["prog_id"]
                    .as_u64()
                    .is_some_and(|p| programs.contains(&(p as u32)))
                {
                    left.push(format!("link {}", l["id"]));
                }
            }
        }
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One flood batch: its source port and when it was sent.
#[derive(Clone, Copy, Debug)]
struct Batch {
    port: u16,
    start: Instant,
    end: Instant,
}

/// The records of each source port to the api pod among `lines`.
fn by_port(lines: &[Value]) -> BTreeMap<u16, Vec<Value>> {
    let mut m: BTreeMap<u16, Vec<Value>> = BTreeMap::new();
    for l in lines {
        let f = &l["flow"];
        if f["IP"]["destination"] == "10.244.1.3" && f["l4"]["TCP"]["destination_port"] == 8080 {
            let port = f["l4"]["TCP"]["source_port"].as_u64().unwrap() as u16;
            m.entry(port).or_default().push(f.clone());
        }
    }
    m
}

#[test]
fn sigkill_and_restart_under_a_flood_leaves_nothing_behind_and_reports_each_flow_new_once() {
    let lab = lab(LAB);
    let dir = tempfile::tempdir().unwrap();
    let flow_log = dir.path().join("flows.jsonl");
    let flow_log_arg = flow_log.to_string_lossy().into_owned();
    let cold = Instant::now();
    let mut first = Agent::start(&lab, "node-1", 2, &["--flow-log", &flow_log_arg]);
    let cold = cold.elapsed();
    let programs = program_ids(&first.log());
    let maps = map_ids(&programs);
    assert!(
        !maps.is_empty(),
        "the programs' maps are seen: {programs:?}"
    );

    let batches = Mutex::new(Vec::<Batch>::new());
    let stop = AtomicBool::new(false);
    let (killed_at, ready_at, mut second) = std::thread::scope(|s| {
        s.spawn(|| {
            let mut port = 42_000u16;
            while !stop.load(Ordering::SeqCst) {
                let start = Instant::now();
                let r = lab
                    .probe(
                        "prod/web",
                        &Probe::SynFlood {
                            from: format!("10.244.1.2:{port}").parse().unwrap(),
                            to: "10.244.1.3:8080".parse().unwrap(),
                            count: BATCH,
                        },
                    )
                    .expect("flood");
                assert_eq!((r.outcome, r.sent), (Outcome::Sent, BATCH), "{r:?}");
                batches.lock().unwrap().push(Batch {
                    port,
                    start,
                    end: Instant::now(),
                });
                port += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        std::thread::sleep(support::slowed(Duration::from_secs(3)));
        first.kill();
        let killed_at = Instant::now();
        let second = Agent::start(&lab, "node-1", 2, &["--flow-log", &flow_log_arg]);
        let ready_at = Instant::now();
        std::thread::sleep(support::slowed(Duration::from_secs(3)));
        stop.store(true, Ordering::SeqCst);
        (killed_at, ready_at, second)
    });
    let left = leftovers(&programs, &maps);
    assert!(
        left.is_empty(),
        "the killed agent left in the kernel: {left:?}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    second.stop();
    let all: Vec<Value> = std::fs::read_to_string(&flow_log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let batches = batches.into_inner().unwrap();
    let dropped = lab.nft_counter("node-1", "drop-api").unwrap();
    assert_eq!(
        dropped,
        u64::from(BATCH) * batches.len() as u64,
        "every SYN reached the firewall"
    );

    // Each agent writes its own uuids; one NEW per uuid across both.
    let mut news: BTreeMap<String, usize> = BTreeMap::new();
    for l in &all {
        if l["flow"]["lifecycle"] == "NEW" {
            *news
                .entry(l["flow"]["uuid"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    let twice: Vec<_> = news.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "uuids reported NEW more than once: {twice:?}"
    );

    // The new agent's records have first_seen after the kill.
    let ports = by_port(&all);
    let kill_wall = (std::time::SystemTime::now() - killed_at.elapsed())
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    let seen_after_kill = |r: &Value| {
        r["first_seen"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .and_then(|t| t.timestamp_nanos_opt())
            .is_some_and(|t| t > kill_wall)
    };
    let mut unobserved = Vec::new();
    for b in &batches {
        let records = ports.get(&b.port).map(Vec::as_slice).unwrap_or(&[]);
        let uuids: BTreeSet<&str> = records.iter().filter_map(|r| r["uuid"].as_str()).collect();
        let margin = Duration::from_secs(1);
        if b.end + margin < killed_at {
            // Well before the kill: the first agent reported it, and the
            // second never reports it again.
            assert_eq!(
                uuids.len(),
                1,
                "port {} (sent {:?} before the kill) in the flow log: {records:#?}; ports reported: {:?}",
                b.port,
                killed_at - b.end,
                ports.keys().collect::<Vec<_>>()
            );
            assert!(
                records.iter().any(|r| r["lifecycle"] == "NEW"),
                "port {}: {records:#?}",
                b.port
            );
            assert!(
                !records.iter().any(seen_after_kill),
                "port {} ended before the kill and was reported by the new agent: {records:#?}",
                b.port
            );
        } else if b.start > ready_at + Duration::from_millis(500) {
            // After the restart: reported once, counted exactly.
            assert_eq!(uuids.len(), 1, "port {}: {records:#?}", b.port);
            let last = records.last().unwrap();
            assert_eq!(last["lifecycle"], "FINAL", "port {}: {last}", b.port);
            assert_eq!(
                last["packets"].as_u64(),
                Some(u64::from(BATCH)),
                "port {}: counts resume exactly after a restart: {last}",
                b.port
            );
        }
        if records.is_empty() {
            unobserved.push(*b);
        }
        // Two uuids for one port only for a flow sent across the kill.
        if uuids.len() > 1 {
            assert!(
                b.start < killed_at && b.end + Duration::from_secs(1) >= killed_at,
                "port {} got {} uuids: {records:#?}",
                b.port,
                uuids.len()
            );
        }
    }
    let window = match (unobserved.first(), unobserved.last()) {
        (Some(a), Some(z)) => z.end.duration_since(a.start),
        _ => Duration::ZERO,
    };
    eprintln!(
        "restart: {} batches, {} unobserved over {:?}; kill to new agent capturing: {:?} (a first start: {cold:?})",
        batches.len(),
        unobserved.len(),
        window,
        ready_at.duration_since(killed_at)
    );
    let log = second.log();
    assert!(!log.contains("panicked"), "{log}");
    eprintln!("{}", log.lines().take(12).collect::<Vec<_>>().join("\n"));
}
