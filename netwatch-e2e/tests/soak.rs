//! Soak: steady denied-flow load, pod churn and API faults together, for
//! `NETWATCH_SOAK_MINUTES` minutes (1 when unset: the short form CI runs;
//! `cargo xtask soak --minutes N` runs it longer).
//!
//! - Load: `netwatch-lab flood` in a pod for the whole run, new denied TCP
//!   flows (one SYN each, all distinct) at a steady rate to four ports.
//! - Churn: every cycle a batch of pods is created (API first, then the
//!   sandbox, as a kubelet and CNI order it), each makes one denied
//!   connection of its own, and all are deleted; their IPs are reused by the
//!   next batch.
//! - API faults, one per cycle in turn: watches cut, watches expired (410
//!   ERROR events), every request failing 500, the server down, an HTTP 410
//!   to the pods watch, every request stalled.
//!
//! Printed at the start (after warm-up) and the end: the agent's RSS, open
//! fds, CPU time and every loss counter of /metrics. Asserted: RSS grows by
//! at most [`RSS_GROWTH_KIB`] and fds by at most [`FD_GROWTH`] after
//! warm-up; every loss counter is zero (none is expected: the flood stays
//! within the flow tables, so nothing is designed to be lost); every flood
//! flow is reported DROPPED, alone or in an aggregate, and the counts add up
//! to what was sent; every churn pod's denied connection has a record.
//!
//! Counters printed but not losses: `netwatch_deferred_drop_events_total`
//! (reported moments later by the drop table's scan),
//! `netwatch_unenriched_flows_total` (records written without names, e.g. of
//! a churn pod created while the API was down or stalled: the record is
//! there, its names are not), `netwatch_evicted_flows_total` (records
//! finalised early, not lost), `netwatch_metrics_series_overflow_total`
//! (folded into `_other`, totals exact).

mod support;

#[path = "support/fake_apiserver.rs"]
mod fake_apiserver;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io::{BufRead, BufReader},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use fake_apiserver::{FakeApiServer, NAMESPACES, PODS, pod, seed};
use netwatch_lab::{
    Lab, Outcome, PodSpec,
    flood::{Flood, Sent},
};
use serde_json::{Value, json};
use support::{Agent, helper, lab, node_http_get, slowed, tcp, wait_until};

const LAB: &str = r#"
nodes:
  - name: node-1
    nftables: |
      table inet lab {
        chain forward {
          type filter hook forward priority 0; policy accept;
          ip daddr 10.244.1.3 tcp dport 8080-8083 counter drop comment "soak-flood"
          ip daddr 10.244.1.100 tcp dport 10000-65000 counter drop comment "soak-churn"
        }
      }
pods:
  - { name: client, namespace: prod, node: node-1, ip: 10.244.1.2 }
  - { name: target, namespace: prod, node: node-1, ip: 10.244.1.3 }
  - { name: api, namespace: prod, node: node-1, ip: 10.244.1.100 }
"#;

const METRICS: &str = "127.0.0.1:9966";
/// New denied flows a second from the flood.
const FLOOD_RATE: u64 = 100;
const FLOOD_PORTS: u16 = 4;
/// Pods created and deleted each cycle.
const PER_BATCH: usize = 10;
/// A fault is held at least this long (the churn batch runs meanwhile).
const FAULT_HOLD: Duration = Duration::from_secs(5);
/// The bound on memory growth after warm-up: generous for allocator noise,
/// far below what a per-flow or per-pod leak gives over a run (the flood
/// alone is 6,000 flows a minute).
const RSS_GROWTH_KIB: u64 = 16 * 1024;
/// The warm-up of runs long enough to have one: longer than the longest
/// retention window the soak fills (identity tombstones and closed tenures,
/// 5 minutes; deleted pods' metric series, 60 s), so the RSS baseline is
/// taken once what is retained for deleted pods has stopped growing. Each
/// churn pod is denied on a port of its own (so its flows can be
/// accounted): 3 context series per pod (denied flows, drops, drop bytes),
/// removed 60 s after the pod goes. Shorter runs (CI's) warm up a third of
/// the run and check only the gross bound.
const WARMUP: Duration = Duration::from_secs(6 * 60);
const FD_GROWTH: usize = 8;
/// Longer than `--api-idle-timeout` (8 s) with a retry: what a fault left
/// (a stalled connection) is gone.
const QUIET: Duration = Duration::from_secs(15);

/// Counters that count records or events lost: each must stay 0.
const LOSS_COUNTERS: &[&str] = &[
    "netwatch_lost_events_total",
    "netwatch_flow_log_dropped_records_total",
    "netwatch_flow_log_write_errors_total",
    "netwatch_observer_dropped_records_total",
];
/// The context-labelled flow metrics (their series count against
/// `--metrics-max-series`).
const CONTEXT_METRICS: &[&str] = &[
    "netwatch_denied_flows_total",
    "netwatch_drops_total",
    "netwatch_drop_bytes_total",
    "netwatch_dns_failures_total",
];
/// Printed for the record; not losses (see the module's comment).
const OTHER_COUNTERS: &[&str] = &[
    "netwatch_evicted_flows_total",
    "netwatch_deferred_drop_events_total",
    "netwatch_unenriched_flows_total",
    "netwatch_metrics_series_overflow_total",
    "netwatch_drop_aggregate_entries",
    "netwatch_attached_interfaces",
];

fn minutes() -> f64 {
    std::env::var("NETWATCH_SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(1.0)
}

/// What the agent's process uses, from /proc.
#[derive(Debug, Clone, Copy)]
struct Usage {
    rss_kib: u64,
    fds: usize,
    /// Of `fds`.
    sockets: usize,
    cpu_seconds: f64,
}

fn usage(pid: u32) -> Usage {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let mut fds = 0;
    let mut sockets = 0;
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
    {
        fds += 1;
        let target = std::fs::read_link(e.path()).unwrap_or_default();
        sockets += usize::from(target.to_string_lossy().starts_with("socket:"));
    }
    // utime and stime: fields 14 and 15, after the parenthesised name.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<u64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Usage {
        rss_kib,
        fds,
        sockets,
        cpu_seconds: ticks as f64 / hz,
    }
}

/// Every series of the counters in `names`, as `name{labels} value`.
fn series(metrics: &str, names: &[&str]) -> BTreeMap<String, f64> {
    metrics
        .lines()
        .filter(|l| {
            names.iter().any(|n| {
                l.strip_prefix(n)
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
            })
        })
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn report(when: &str, u: Usage, metrics: &str) {
    eprintln!(
        "soak {when}: rss={} KiB fds={} (sockets {}) cpu={:.1} s",
        u.rss_kib, u.fds, u.sockets, u.cpu_seconds
    );
    for (k, v) in series(metrics, LOSS_COUNTERS) {
        eprintln!("soak {when}:   loss  {k} {v}");
    }
    for (k, v) in series(metrics, OTHER_COUNTERS) {
        eprintln!("soak {when}:   other {k} {v}");
    }
}

/// One fault, begun before a churn batch and ended after it.
#[derive(Debug, Clone, Copy)]
enum Fault {
    CutWatches,
    ExpireWatches,
    Fail500,
    Down,
    GoneOnPodsWatch,
    Stall,
}

const FAULTS: [Fault; 6] = [
    Fault::CutWatches,
    Fault::ExpireWatches,
    Fault::Fail500,
    Fault::Down,
    Fault::GoneOnPodsWatch,
    Fault::Stall,
];

fn begin(api: &mut FakeApiServer, fault: Fault) {
    match fault {
        Fault::CutWatches => api.cut_watches(),
        Fault::ExpireWatches => api.expire_watches(),
        Fault::Fail500 => api.fail_all(500),
        Fault::Down => api.down(),
        Fault::GoneOnPodsWatch => api.gone_on_next_watch(PODS),
        Fault::Stall => api.stall(),
    }
}

fn end(api: &mut FakeApiServer, fault: Fault) {
    match fault {
        Fault::Down => api.up(),
        Fault::Fail500 | Fault::Stall => api.heal(),
        Fault::CutWatches | Fault::ExpireWatches | Fault::GoneOnPodsWatch => {}
    }
}

fn attached(lab: &Lab) -> Option<usize> {
    node_http_get(lab, "node-1", &format!("http://{METRICS}/metrics"))
        .lines()
        .find_map(|l| l.strip_prefix("netwatch_attached_interfaces "))
        .and_then(|v| v.trim().parse().ok())
}

/// The latest record of each flow (uuid) to the flood's target, and the
/// destination ports of the churn pods' records, read from the flow log
/// line by line (it grows to hundreds of MiB in a long soak).
#[derive(Default)]
struct Accounting {
    /// uuid -> (destination port, source port or None for an aggregate,
    /// flows the record stands for).
    flood: HashMap<String, (u64, Option<u64>, u64)>,
    churn_ports: BTreeSet<u64>,
    not_dropped: Vec<String>,
}

fn account(agent: &Agent) -> Accounting {
    let file = std::fs::File::open(&agent.flow_log).expect("flow log");
    let mut acc = Accounting::default();
    for line in BufReader::new(file).lines() {
        let line = line.expect("read flow log");
        if line.trim().is_empty() {
            continue;
        }
        let l: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("flow log line is not JSON ({e}): {line}"));
        let f = &l["flow"];
        let tcp = &f["l4"]["TCP"];
        let Some(port) = tcp["destination_port"].as_u64() else {
            continue;
        };
        if f["IP"]["destination"] == "10.244.1.3" {
            if f["verdict"] != "DROPPED" {
                acc.not_dropped.push(line.clone());
            }
            let Some(uuid) = f["uuid"].as_str() else {
                continue;
            };
            let (src, flows) = match f["aggregate"]["flows"].as_u64() {
                Some(n) => (None, n),
                None => (tcp["source_port"].as_u64(), 1),
            };
            acc.flood.insert(uuid.to_string(), (port, src, flows));
        } else if f["IP"]["destination"] == "10.244.1.100" && f["verdict"] == "DROPPED" {
            acc.churn_ports.insert(port);
        }
    }
    acc
}

/// Flows reported per flood port: single flows (distinct source ports) plus
/// what aggregates stand for.
fn flood_totals(acc: &Accounting) -> BTreeMap<u64, u64> {
    let mut single: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    let mut aggregated: BTreeMap<u64, u64> = BTreeMap::new();
    for (port, src, flows) in acc.flood.values() {
        match src {
            Some(s) => {
                single.entry(*port).or_default().insert(*s);
            }
            None => *aggregated.entry(*port).or_default() += flows,
        }
    }
    let mut out = aggregated;
    for (port, s) in single {
        *out.entry(port).or_default() += s.len() as u64;
    }
    out
}

fn start_flood(lab: &Lab, flood: &Flood) -> Child {
    let client = lab.pod("prod/client").expect("client pod");
    lab.in_pod(client, &helper())
        .args(["flood", "--json", &serde_json::to_string(flood).unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the flood")
}

#[test]
fn soak_under_load_churn_and_api_faults_keeps_memory_flat_and_loses_nothing() {
    let minutes = minutes();
    let run = Duration::from_secs_f64(minutes * 60.0);
    let warmup = if run >= WARMUP + Duration::from_secs(120) {
        WARMUP
    } else {
        run / 3
    };
    eprintln!("soak: {minutes} min, warm-up {warmup:?}");

    let mut lab = lab(LAB);
    let node = lab.node("node-1").expect("node").clone();
    let mut api = FakeApiServer::start(&node.netns);
    seed(
        &api,
        "node-1",
        &node.ip.to_string(),
        &[
            ("prod", "client", "10.244.1.2"),
            ("prod", "target", "10.244.1.3"),
            ("prod", "api", "10.244.1.100"),
        ],
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
        3,
        &[
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--metrics-addr",
            METRICS,
            // Stalled connections given up within the cycle.
            "--api-timeout",
            "3",
            "--api-idle-timeout",
            "8",
            // The whole run's records stay in one file, to account for them.
            "--flow-log-max-size-mb",
            "0",
        ],
    );
    let pid = agent.pid().expect("agent running");
    let metrics = |lab: &Lab| node_http_get(lab, "node-1", &format!("http://{METRICS}/metrics"));
    report("start", usage(pid), &metrics(&lab));

    let flood = Flood {
        to: "10.244.1.3".parse().unwrap(),
        first_port: 8080,
        ports: FLOOD_PORTS,
        flows: (FLOOD_RATE as f64 * run.as_secs_f64()) as u64,
        rate: FLOOD_RATE,
    };
    let mut flood_child = start_flood(&lab, &flood);

    let started = Instant::now();
    let mut warm: Option<(Usage, String)> = None;
    let mut churn_ports: Vec<(String, u64)> = Vec::new();
    let mut cycle = 0usize;
    let mut progress = Duration::from_secs(60);
    while started.elapsed() < run {
        let fault = FAULTS[cycle % FAULTS.len()];
        let held = Instant::now();
        begin(&mut api, fault);
        let specs: Vec<(PodSpec, u16)> = (0..PER_BATCH)
            .map(|i| {
                let port = 10_000 + (cycle * PER_BATCH + i) % 55_000;
                (
                    PodSpec {
                        name: format!("job-{cycle}-{i}"),
                        namespace: "jobs".into(),
                        node: "node-1".into(),
                        ip: format!("10.244.1.{}", 10 + i).parse().unwrap(),
                        ipv6: None,
                        listen: Vec::new(),
                        uid: None,
                        host_network: false,
                    },
                    port as u16,
                )
            })
            .collect();
        for (p, _) in &specs {
            api.apply(PODS, pod("node-1", "jobs", &p.name, &p.ip.to_string()));
        }
        for (p, _) in &specs {
            lab.add_pod(p).unwrap_or_else(|e| panic!("{}: {e}", p.id()));
        }
        wait_until(&agent, "the batch's interfaces attached", 60, || {
            attached(&lab) == Some(PER_BATCH + 3)
        });
        std::thread::scope(|s| {
            for (p, port) in &specs {
                let lab = &lab;
                s.spawn(move || {
                    let r = lab
                        .probe(&p.id(), &tcp(&format!("10.244.1.100:{port}"), 1))
                        .expect("probe");
                    assert_eq!(r.outcome, Outcome::TimedOut, "{}: {r:?}", p.id());
                });
            }
        });
        for (p, port) in &specs {
            lab.remove_pod(&p.id()).unwrap_or_else(|e| panic!("{e}"));
            api.delete(PODS, "jobs", &p.name);
            churn_ports.push((p.id(), u64::from(*port)));
        }
        if let Some(rest) = FAULT_HOLD.checked_sub(held.elapsed()) {
            std::thread::sleep(rest);
        }
        end(&mut api, fault);
        cycle += 1;
        if warm.is_none() && started.elapsed() >= warmup {
            // Stalled connections given up, watches re-opened: the open
            // sockets are the steady state's, not a fault's.
            std::thread::sleep(QUIET);
            let u = usage(pid);
            let m = metrics(&lab);
            report("after warm-up", u, &m);
            warm = Some((u, m));
        }
        // RSS and context series every minute, to see whether growth
        // levels off and what follows it.
        if started.elapsed() >= progress {
            let u = usage(pid);
            let context_series = series(&metrics(&lab), CONTEXT_METRICS).len();
            eprintln!(
                "soak at {:.0} min: rss={} KiB fds={} cpu={:.1} s context_series={context_series}",
                started.elapsed().as_secs_f64() / 60.0,
                u.rss_kib,
                u.fds,
                u.cpu_seconds
            );
            progress += Duration::from_secs(60);
        }
        if let Ok(Some(status)) = flood_child.try_wait() {
            assert!(status.success(), "the flood exited early: {status}");
        }
    }
    api.heal();
    wait_until(&agent, "the gauge back to the three live pods", 60, || {
        attached(&lab) == Some(3)
    });
    let out = flood_child.wait_with_output().expect("the flood");
    assert!(
        out.status.success(),
        "flood: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sent: Sent = serde_json::from_slice(&out.stdout).expect("flood output");
    assert_eq!(sent.packets, flood.flows);
    // Idle flows ended and reported, and the API quiet, before the figures
    // are taken.
    std::thread::sleep(QUIET);
    let end_usage = usage(pid);
    let end_metrics = metrics(&lab);
    report("end", end_usage, &end_metrics);
    eprintln!(
        "soak: {cycle} churn cycles ({} pods), {} flood flows in {:.0} s",
        churn_ports.len(),
        sent.packets,
        sent.seconds
    );

    let ports: Vec<u64> = (8080..8080 + u64::from(FLOOD_PORTS)).collect();
    let want: BTreeMap<u64, u64> = ports
        .iter()
        .map(|p| (*p, flood.flows_to(*p as u16)))
        .collect();
    // Wait (generously) until every flood flow is in the flow log; what is
    // missing then shows in the assertion below.
    let deadline = Instant::now() + slowed(Duration::from_secs(120));
    while flood_totals(&account(&agent)) != want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(2));
    }
    agent.stop();
    let acc = account(&agent);
    assert_eq!(flood_totals(&acc), want, "flows reported per port vs sent");
    assert!(
        acc.not_dropped.is_empty(),
        "flood records not DROPPED: {:#?}",
        &acc.not_dropped[..acc.not_dropped.len().min(5)]
    );
    assert_eq!(
        lab.nft_counter("node-1", "soak-flood").unwrap(),
        flood.flows,
        "the firewall dropped every flood SYN"
    );
    let missing: Vec<&(String, u64)> = churn_ports
        .iter()
        .filter(|(_, port)| !acc.churn_ports.contains(port))
        .collect();
    assert!(
        missing.is_empty(),
        "churn pods whose denied connection has no record: {missing:?}"
    );

    let losses = series(&end_metrics, LOSS_COUNTERS);
    assert!(
        losses
            .keys()
            .any(|k| k.starts_with("netwatch_lost_events_total")),
        "no loss counter in /metrics:\n{end_metrics}"
    );
    let nonzero: Vec<_> = losses.iter().filter(|(_, v)| **v != 0.0).collect();
    assert!(nonzero.is_empty(), "losses: {nonzero:?}");
    assert!(
        agent
            .log()
            .contains("kernel losses over the agent's life lost=0"),
        "{}",
        agent.log()
    );
    let (warm_usage, _) = warm.expect("the run outlasted its warm-up");
    assert!(
        end_usage.rss_kib <= warm_usage.rss_kib + RSS_GROWTH_KIB,
        "RSS grew from {} KiB after warm-up to {} KiB (bound: +{RSS_GROWTH_KIB} KiB)",
        warm_usage.rss_kib,
        end_usage.rss_kib
    );
    assert!(
        end_usage.fds <= warm_usage.fds + FD_GROWTH,
        "open fds grew from {warm_usage:?} after warm-up to {end_usage:?}"
    );
}
