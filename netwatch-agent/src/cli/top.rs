//! `netwatch top`: what is denied most right now. Denied flows from the
//! agent, grouped by source workload, destination workload, port and
//! reason, with counts and rates, refreshed live.

use std::{
    collections::HashMap,
    io::{IsTerminal, Write},
    sync::mpsc,
    time::{Duration, Instant},
};

use chrono::Utc;
use serde::Serialize;

use super::{
    CliError,
    observe::{FilterArgs, ObserveArgs, ObserveItem, ObserveStream, ServerAddr},
};
use crate::{
    export::server::{DEFAULT_SOCKET, ObserveRequest},
    flow::record::FlowRecord,
    identity::Endpoint,
};

/// `-o table|json`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TopOutput {
    /// A table, redrawn in place on a terminal.
    #[default]
    Table,
    /// One JSON object per refresh.
    Json,
}

/// Show what is denied most right now, grouped and refreshed live
///
/// Denied flows grouped by source and destination workload, port and
/// reason, busiest first.
///
/// Examples:
///   netwatch top
///   netwatch top -n prod --verdict DROPPED --window 5m
///   netwatch top --iterations 1 -o json
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct TopArgs {
    /// The agent's observe API: a Unix socket path or a loopback HOST:PORT.
    #[arg(long, default_value = DEFAULT_SOCKET, value_name = "SOCKET|ADDR")]
    pub server: String,
    #[command(flatten)]
    pub filters: FilterArgs,
    /// Count flows seen within this window (a duration: 30s, 5m, 1h).
    #[arg(long, default_value = "60s", value_name = "DURATION")]
    pub window: String,
    /// Seconds between refreshes; rates are per second over this interval.
    #[arg(long, default_value_t = 2.0, value_name = "SECS")]
    pub interval: f64,
    /// Stop after this many refreshes (0: until interrupted).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub iterations: u64,
    /// Rows shown at most.
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub limit: usize,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = TopOutput::Table)]
    pub output: TopOutput,
}

impl TopArgs {
    /// `observe --summary`: the observe flags as `top` takes them.
    pub fn from_observe(a: &ObserveArgs) -> TopArgs {
        TopArgs {
            server: a.server.clone(),
            filters: a.filters.clone(),
            window: a.since.clone().unwrap_or_else(|| "60s".into()),
            interval: 2.0,
            iterations: if a.follow { 0 } else { 1 },
            limit: a.last.unwrap_or(20),
            output: if a.output == super::observe::ObserveOutput::Json {
                TopOutput::Json
            } else {
                TopOutput::Table
            },
        }
    }
}

/// What rows are grouped by.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct GroupKey {
    pub source: String,
    pub destination: String,
    pub port: Option<u16>,
    pub protocol: String,
    pub verdict: String,
    pub reason: String,
}

/// One row of the summary.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TopRow {
    #[serde(flatten)]
    pub key: GroupKey,
    /// Distinct flows in the window.
    pub flows: usize,
    /// Their packets (dropped, or handshake attempts).
    pub packets: u64,
    /// Packets per second over the last interval.
    pub packets_per_second: f64,
    /// New flows per second over the last interval.
    pub flows_per_second: f64,
}

/// `prod/web` (the workload), `prod/web-7f9c` (a pod without one), a
/// reserved identity (`world`), or the address.
fn workload_name(ep: &Endpoint, ip: std::net::IpAddr) -> String {
    if let Some(w) = ep.workloads.first() {
        return format!("{}/{}", ep.namespace, w.name);
    }
    if !ep.pod_name.is_empty() {
        return format!("{}/{}", ep.namespace, ep.pod_name);
    }
    if let Some(r) = ep.reserved_identity() {
        return format!("{r} {ip}");
    }
    ip.to_string()
}

/// The group a record counts toward.
pub fn group_of(r: &FlowRecord) -> GroupKey {
    GroupKey {
        source: workload_name(&r.source, r.ip.source),
        destination: workload_name(&r.destination, r.ip.destination),
        port: r.l4.ports().map(|p| p.destination_port),
        protocol: r.l4.protocol_name(),
        verdict: r.verdict.as_str().to_string(),
        reason: r
            .drop_reason_desc
            .clone()
            .or_else(|| r.refusal.clone())
            .unwrap_or_default(),
    }
}

struct FlowEntry {
    group: GroupKey,
    packets: u64,
    /// Packets at the previous refresh (for the rate).
    packets_then: u64,
    /// First seen after the previous refresh (for the flow rate).
    new: bool,
    last_seen: chrono::DateTime<Utc>,
}

/// Denied flows in a sliding window, grouped.
pub struct DeniedSummary {
    window: chrono::Duration,
    flows: HashMap<String, FlowEntry>,
}

impl DeniedSummary {
    pub fn new(window: Duration) -> DeniedSummary {
        DeniedSummary {
            window: chrono::Duration::from_std(window).unwrap_or(chrono::Duration::seconds(60)),
            flows: HashMap::new(),
        }
    }

    /// Count one record (any lifecycle: the latest counts of its flow win).
    pub fn add(&mut self, r: &FlowRecord) {
        match self.flows.get_mut(&r.uuid) {
            Some(e) => {
                e.packets = e.packets.max(r.packets);
                e.last_seen = e.last_seen.max(r.last_seen);
                e.group = group_of(r);
            }
            None => {
                self.flows.insert(
                    r.uuid.clone(),
                    FlowEntry {
                        group: group_of(r),
                        packets: r.packets,
                        packets_then: 0,
                        new: true,
                        last_seen: r.last_seen,
                    },
                );
            }
        }
    }

    /// The rows at `now`, busiest first; `elapsed` is the time since the
    /// previous call (rates are over it). Forgets flows older than the window.
    pub fn rows(&mut self, now: chrono::DateTime<Utc>, elapsed: Duration) -> Vec<TopRow> {
        let cutoff = now - self.window;
        self.flows.retain(|_, e| e.last_seen >= cutoff);
        let secs = elapsed.as_secs_f64().max(0.001);
        let mut groups: HashMap<GroupKey, TopRow> = HashMap::new();
        for e in self.flows.values_mut() {
            let row = groups.entry(e.group.clone()).or_insert_with(|| TopRow {
                key: e.group.clone(),
                flows: 0,
                packets: 0,
                packets_per_second: 0.0,
                flows_per_second: 0.0,
            });
            row.flows += 1;
            row.packets += e.packets;
            row.packets_per_second += e.packets.saturating_sub(e.packets_then) as f64 / secs;
            if e.new {
                row.flows_per_second += 1.0 / secs;
            }
            e.packets_then = e.packets;
            e.new = false;
        }
        let mut rows: Vec<TopRow> = groups.into_values().collect();
        rows.sort_by(|a, b| {
            b.packets_per_second
                .total_cmp(&a.packets_per_second)
                .then(b.packets.cmp(&a.packets))
                .then(b.flows.cmp(&a.flows))
                .then(a.key.cmp(&b.key))
        });
        rows
    }
}

/// The rows as an aligned table.
pub fn format_table(rows: &[TopRow]) -> String {
    let mut out = format!(
        "{:<32} {:<36} {:<11} {:<20} {:<22} {:>6} {:>9} {:>9}\n",
        "SOURCE", "DESTINATION", "PORT", "VERDICT", "REASON", "FLOWS", "PACKETS", "PKTS/S"
    );
    for r in rows {
        let port = match r.key.port {
            Some(p) => format!("{p}/{}", r.key.protocol),
            None => r.key.protocol.clone(),
        };
        out.push_str(&format!(
            "{:<32} {:<36} {:<11} {:<20} {:<22} {:>6} {:>9} {:>9.1}\n",
            r.key.source,
            r.key.destination,
            port,
            r.key.verdict,
            r.key.reason,
            r.flows,
            r.packets,
            r.packets_per_second
        ));
    }
    out
}

fn parse_window(s: &str) -> Result<Duration, CliError> {
    let now = Utc::now();
    let then = super::observe::parse_since(s, now).map_err(|_| {
        CliError::Usage(format!(
            "--window {s:?}: expected a duration such as 30s, 5m or 1h"
        ))
    })?;
    (now - then)
        .to_std()
        .map_err(|_| CliError::Usage(format!("--window {s:?}: must be a positive duration")))
}

pub fn run(args: &TopArgs) -> Result<u8, CliError> {
    let server = ServerAddr::parse(&args.server)?;
    let window = parse_window(&args.window)?;
    let interval = Duration::try_from_secs_f64(args.interval)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            CliError::Usage(format!(
                "--interval {}: must be a positive number of seconds",
                args.interval
            ))
        })?;
    let filters = args.filters.to_filter_set()?;
    let chrono_window = chrono::Duration::from_std(window)
        .map_err(|_| CliError::Usage("--window is too long".into()))?;
    let request = ObserveRequest {
        filters,
        last: None,
        since: Some(Utc::now() - chrono_window),
        follow: true,
        ..ObserveRequest::default()
    };
    let mut stream = ObserveStream::connect(&server, &request)?;
    let node = stream.status.node_name.clone();
    // A reader thread feeds records; this one refreshes on a timer.
    let (tx, rx) = mpsc::channel::<Result<ObserveItem, CliError>>();
    std::thread::spawn(move || {
        loop {
            match stream.next_item() {
                Ok(Some(item)) => {
                    if tx.send(Ok(item)).is_err() {
                        return;
                    }
                }
                Ok(None) => {
                    let _ = tx.send(Err(CliError::Usage(
                        "the agent closed the connection".into(),
                    )));
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        }
    });
    let mut summary = DeniedSummary::new(window);
    let tty = std::io::stdout().is_terminal();
    let mut lost = 0;
    let mut last_refresh = Instant::now();
    let mut next = last_refresh + interval;
    let mut done = 0;
    let stdout = std::io::stdout();
    loop {
        let wait = next.saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            Ok(Ok(ObserveItem::Flow(r, _))) => summary.add(&r),
            Ok(Ok(ObserveItem::Lost(n))) => lost = n,
            Ok(Ok(ObserveItem::EndOfHistory)) => {}
            Ok(Err(e)) => return Err(e),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(CliError::Usage("the agent closed the connection".into()));
            }
        }
        if Instant::now() < next {
            continue;
        }
        let elapsed = last_refresh.elapsed();
        last_refresh = Instant::now();
        next = last_refresh + interval;
        let mut rows = summary.rows(Utc::now(), elapsed);
        let total = rows.len();
        rows.truncate(args.limit);
        let mut out = stdout.lock();
        match args.output {
            TopOutput::Json => {
                let v = serde_json::json!({
                    "time": Utc::now(), "node_name": node, "window_seconds": window.as_secs_f64(),
                    "interval_seconds": elapsed.as_secs_f64(), "groups": total, "lost_records": lost, "rows": rows,
                });
                writeln!(out, "{v}")?;
            }
            TopOutput::Table => {
                if tty {
                    write!(out, "\x1b[H\x1b[2J")?;
                }
                writeln!(
                    out,
                    "netwatch top: {node}: denied flows in the last {}, {total} groups, refreshed every {:.1}s{}",
                    args.window,
                    interval.as_secs_f64(),
                    if lost > 0 {
                        format!(
                            " ({lost} records lost: the agent dropped what this client did not read in time)"
                        )
                    } else {
                        String::new()
                    }
                )?;
                write!(out, "{}", format_table(&rows))?;
                if !tty {
                    writeln!(out)?;
                }
            }
        }
        out.flush()?;
        done += 1;
        if args.iterations > 0 && done >= args.iterations {
            return Ok(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::filter::tests::record;
    use serde_json::json;

    #[test]
    fn groups_by_workloads_port_and_reason_with_counts_and_rates() {
        let mut s = DeniedSummary::new(Duration::from_secs(60));
        let now: chrono::DateTime<Utc> = "2026-11-22T02:14:10Z".parse().unwrap();
        // Two replicas of web to api: one group. Counts of one flow's records are not added up.
        s.add(&record(json!({"uuid": "a", "packets": 2})));
        s.add(&record(
            json!({"uuid": "a", "lifecycle": "UPDATE", "packets": 10}),
        ));
        s.add(&record(
            json!({"uuid": "b", "packets": 5, "source": {"pod_name": "web-other"}}),
        ));
        s.add(&record(
            json!({"uuid": "c", "verdict": "TIMED_OUT", "drop_reason_desc": null, "packets": 1}),
        ));
        let rows = s.rows(now, Duration::from_secs(2));
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (
                rows[0].key.source.as_str(),
                rows[0].key.destination.as_str()
            ),
            ("prod/web", "prod/api")
        );
        assert_eq!(
            (rows[0].key.port, rows[0].key.reason.as_str()),
            (Some(8080), "NETFILTER_DROP")
        );
        assert_eq!((rows[0].flows, rows[0].packets), (2, 15));
        assert_eq!(rows[0].packets_per_second, 7.5);
        assert_eq!(rows[0].flows_per_second, 1.0);
        assert_eq!(rows[1].key.verdict, "TIMED_OUT");
        // Next refresh: only the increase counts toward the rate.
        s.add(&record(
            json!({"uuid": "a", "lifecycle": "UPDATE", "packets": 14}),
        ));
        let rows = s.rows(now, Duration::from_secs(2));
        assert_eq!(
            (
                rows[0].packets,
                rows[0].packets_per_second,
                rows[0].flows_per_second
            ),
            (19, 2.0, 0.0)
        );
    }

    #[test]
    fn flows_older_than_the_window_are_forgotten() {
        let mut s = DeniedSummary::new(Duration::from_secs(60));
        s.add(&record(
            json!({"uuid": "old", "last_seen": "2026-11-22T02:00:00Z"}),
        ));
        s.add(&record(
            json!({"uuid": "new", "last_seen": "2026-11-22T02:14:00Z"}),
        ));
        let rows = s.rows(
            "2026-11-22T02:14:30Z".parse().unwrap(),
            Duration::from_secs(1),
        );
        assert_eq!(rows.iter().map(|r| r.flows).sum::<usize>(), 1);
    }

    #[test]
    fn unresolved_ends_are_grouped_by_address() {
        let r = record(
            json!({"source": {"identity": 0, "namespace": null, "pod_name": null, "labels": null, "workloads": null},
                              "destination": {"identity": 2, "labels": ["reserved:world"], "namespace": null, "pod_name": null, "workloads": null}}),
        );
        let g = group_of(&r);
        assert_eq!(
            (g.source.as_str(), g.destination.as_str()),
            ("10.244.1.2", "world 10.244.1.3")
        );
        let table = format_table(&[TopRow {
            key: g,
            flows: 1,
            packets: 3,
            packets_per_second: 1.5,
            flows_per_second: 0.5,
        }]);
        assert!(
            table.lines().nth(1).unwrap().contains("8080/TCP"),
            "{table}"
        );
    }
}
