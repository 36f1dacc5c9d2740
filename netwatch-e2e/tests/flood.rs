//! End-to-end: a flood of more new denied flows than the agent's per-flow
//! drop table holds (shrunk with `--table-entries` so the flood stays
//! small). Every flow is reported DROPPED, on its own or counted in an
//! aggregate record of its (source, destination, port); the counts add up to
//! what was sent; nothing is TIMED_OUT and nothing is counted lost.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use netwatch_lab::flood::{Flood, Sent};
use serde_json::Value;
use support::{Agent, helper, lab, node_http_get, slowed};

const LAB: &str = r#"
nodes:
  - name: node-1
    nftables: |
      table inet lab {
        chain forward {
          type filter hook forward priority 0; policy accept;
          ip daddr 10.244.1.3 tcp dport 8080-8082 counter drop comment "drop-flood"
        }
      }
pods:
  - { name: client, namespace: prod, node: node-1, ip: 10.244.1.2 }
  - { name: target, namespace: prod, node: node-1, ip: 10.244.1.3 }
"#;

/// Entries of each kernel table: the flood is more than ten times this.
const TABLE_ENTRIES: &str = "256";
const METRICS: &str = "127.0.0.1:9464";

/// What the flow log says about flows to one destination port: the latest
/// record of each flow (uuid).
#[derive(Debug, Default)]
struct PortTotals {
    /// Source ports of flows reported one by one.
    single: BTreeSet<u64>,
    /// Distinct flows the aggregate records stand for.
    aggregated: u64,
    aggregates: usize,
    packets: u64,
}

impl PortTotals {
    fn flows(&self) -> u64 {
        self.single.len() as u64 + self.aggregated
    }
}

fn latest_to_target(lines: &[Value]) -> Vec<&Value> {
    let mut latest: BTreeMap<&str, &Value> = BTreeMap::new();
    for l in lines {
        let f = &l["flow"];
        if f["IP"]["destination"] == "10.244.1.3"
            && let Some(u) = f["uuid"].as_str()
        {
            latest.insert(u, f);
        }
    }
    latest.into_values().collect()
}

fn totals(lines: &[Value]) -> BTreeMap<u64, PortTotals> {
    let mut out: BTreeMap<u64, PortTotals> = BTreeMap::new();
    for f in latest_to_target(lines) {
        let tcp = &f["l4"]["TCP"];
        let Some(port) = tcp["destination_port"].as_u64() else {
            continue;
        };
        let t = out.entry(port).or_default();
        t.packets += f["packets"].as_u64().unwrap_or(0);
        match f["aggregate"]["flows"].as_u64() {
            Some(n) => {
                t.aggregated += n;
                t.aggregates += 1;
            }
            None => {
                t.single.insert(tcp["source_port"].as_u64().unwrap_or(0));
            }
        }
    }
    out
}

/// Sum of a counter's series in a Prometheus exposition.
fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// Sends `flood` from the lab's client; every packet went out.
fn send(lab: &netwatch_lab::Lab, flood: &Flood) {
    let client = lab.pod("prod/client").unwrap();
    let out = lab
        .in_pod(client, &helper())
        .args(["flood", "--json", &serde_json::to_string(flood).unwrap()])
        .output()
        .expect("run the flood");
    assert!(
        out.status.success(),
        "flood: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sent: Sent = serde_json::from_slice(&out.stdout).expect("flood output");
    assert_eq!(sent.packets, flood.flows);
}

#[test]
fn flood_beyond_the_flow_table_is_reported_whole_as_dropped_and_nothing_is_lost() {
    let lab = lab(LAB);
    let mut agent = Agent::start(
        &lab,
        "node-1",
        2,
        &[
            "--table-entries",
            TABLE_ENTRIES,
            "--metrics-addr",
            METRICS,
            // Flows stay open until the agent stops: the aggregate gauge is
            // read while they are.
            "--idle-timeout",
            "600",
        ],
    );
    let flood = Flood {
        to: "10.244.1.3".parse().unwrap(),
        first_port: 8080,
        ports: 3,
        flows: 3000,
        rate: 20_000,
    };
    send(&lab, &flood);
    let ports: Vec<u16> = (8080..8083).collect();

    // Wait (generously) until every flow is accounted for.
    let wait = slowed(Duration::from_secs(60));
    let deadline = Instant::now() + wait;
    loop {
        let t = totals(&agent.lines());
        if ports.iter().all(|p| {
            t.get(&u64::from(*p))
                .is_some_and(|t| t.flows() == flood.flows_to(*p))
        }) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after {wait:?} the flows reported per port are {:?}, sent {:?}\nagent log:\n{}",
            t.iter()
                .map(|(p, t)| (p, t.flows(), t.aggregates))
                .collect::<Vec<_>>(),
            ports
                .iter()
                .map(|p| (p, flood.flows_to(*p)))
                .collect::<Vec<_>>(),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let metrics = node_http_get(&lab, "node-1", &format!("http://{METRICS}/metrics"));
    let lines = agent.stop();
    let dropped = lab.nft_counter("node-1", "drop-flood").unwrap();
    assert_eq!(dropped, flood.flows, "the firewall dropped every SYN");

    let records = latest_to_target(&lines);
    for f in &records {
        assert_eq!(f["verdict"], "DROPPED", "{f:#}");
        assert_eq!(f["drop_reason_desc"], "NETFILTER_DROP", "{f:#}");
        assert_eq!(f["IP"]["source"], "10.244.1.2", "{f:#}");
    }
    assert!(
        lines
            .iter()
            .all(|l| l["flow"]["IP"]["destination"] != "10.244.1.3"
                || l["flow"]["verdict"] == "DROPPED"),
        "no record of the flood says anything but DROPPED (no TIMED_OUT)"
    );
    let t = totals(&lines);
    assert_eq!(
        t.keys().copied().collect::<Vec<_>>(),
        ports.iter().map(|p| u64::from(*p)).collect::<Vec<_>>(),
        "every (source, destination, port) is reported"
    );
    let mut single = 0;
    for p in &ports {
        let pt = &t[&u64::from(*p)];
        assert_eq!(pt.flows(), flood.flows_to(*p), "port {p}: {pt:?}");
        assert_eq!(pt.packets, flood.flows_to(*p), "one SYN per flow: {pt:?}");
        single += pt.single.len();
    }
    let table: usize = TABLE_ENTRIES.parse().unwrap();
    assert!(
        single <= table,
        "{single} flows tracked one by one in a table of {table}"
    );
    assert!(
        t.values().any(|pt| pt.aggregates > 0),
        "the table overflowed into the aggregate: {t:?}"
    );
    for f in records.iter().filter(|f| !f["aggregate"].is_null()) {
        assert_eq!(f["l4"]["TCP"]["source_port"], 0, "{f:#}");
        assert!(f["aggregate"]["flows"].as_u64().unwrap() >= 1, "{f:#}");
    }

    // Nothing lost: not in the kernel, not in the flow log.
    assert!(
        agent
            .log()
            .contains("kernel losses over the agent's life lost=0"),
        "{}",
        agent.log()
    );
    assert_eq!(
        metric_sum(&metrics, "netwatch_lost_events_total"),
        Some(0.0),
        "{metrics}"
    );
    assert_eq!(
        metric_sum(&metrics, "netwatch_flow_log_dropped_records_total"),
        Some(0.0)
    );
    assert!(
        metric_sum(&metrics, "netwatch_drop_aggregate_entries").unwrap_or(0.0) >= 1.0,
        "{metrics}"
    );
}

/// `--max-flows` bounds what the agent tracks in user space: a flood of
/// 600 new flows against a bound of 100 is still reported whole (the
/// quietest flows get their final record early, counted as evicted), and
/// `netwatch_tracked_flows` says how many are tracked.
#[test]
fn the_user_space_flow_bound_finalises_early_and_loses_nothing() {
    let lab = lab(LAB);
    let mut agent = Agent::start(
        &lab,
        "node-1",
        2,
        &[
            "--max-flows",
            "100",
            "--metrics-addr",
            METRICS,
            "--idle-timeout",
            "600",
        ],
    );
    let flood = Flood {
        to: "10.244.1.3".parse().unwrap(),
        first_port: 8080,
        ports: 1,
        flows: 600,
        rate: 5_000,
    };
    send(&lab, &flood);
    let wait = slowed(Duration::from_secs(60));
    let deadline = Instant::now() + wait;
    while totals(&agent.lines())
        .get(&8080)
        .is_none_or(|t| t.flows() < flood.flows)
    {
        assert!(
            Instant::now() < deadline,
            "after {wait:?}: {:?}\n{}",
            totals(&agent.lines()).get(&8080),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let metrics = node_http_get(&lab, "node-1", &format!("http://{METRICS}/metrics"));
    let lines = agent.stop();
    let t = &totals(&lines)[&8080];
    assert_eq!(
        t.single.len() as u64,
        flood.flows,
        "one record per flow: {t:?}"
    );
    assert_eq!(t.aggregates, 0, "the kernel's table had room: {t:?}");
    for f in latest_to_target(&lines) {
        assert_eq!(f["verdict"], "DROPPED", "{f:#}");
    }
    let tracked = metric_sum(&metrics, "netwatch_tracked_flows").expect("tracked gauge");
    assert!(
        (1.0..=100.0).contains(&tracked),
        "tracked {tracked} with --max-flows 100\n{metrics}"
    );
    let evicted = metric_sum(&metrics, "netwatch_evicted_flows_total").unwrap_or(0.0);
    assert!(
        evicted >= (flood.flows - 100) as f64,
        "at least 500 of 600 flows finalised early, {evicted} counted\n{metrics}"
    );
    assert_eq!(
        metric_sum(&metrics, "netwatch_lost_events_total"),
        Some(0.0),
        "{metrics}"
    );
}
