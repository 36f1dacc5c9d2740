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
    term,
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
            .as_ref()
            .map(|d| d.to_string())
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
        self.add_as(r, false);
    }

    /// Count a record from the agent's history (sent before
    /// `end_of_history`): its packets happened before this client was
    /// watching, so they set the flow's baseline and count toward totals,
    /// never toward the rates of the first refresh.
    pub fn add_history(&mut self, r: &FlowRecord) {
        self.add_as(r, true);
    }

    fn add_as(&mut self, r: &FlowRecord, history: bool) {
        if history {
            let e = self
                .flows
                .entry(r.uuid.clone())
                .or_insert_with(|| FlowEntry {
                    group: group_of(r),
                    packets: 0,
                    packets_then: 0,
                    new: false,
                    last_seen: r.last_seen,
                });
            e.packets = e.packets.max(r.packets);
            e.packets_then = e.packets;
            e.last_seen = e.last_seen.max(r.last_seen);
            e.group = group_of(r);
            return;
        }
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

/// The rows as an aligned table, as wide as the widest cells (up to
/// what each column wants) and no wider than `width` columns: a line that
/// wrapped would break the in-place redraw.
pub fn format_table(rows: &[TopRow], width: usize) -> String {
    const WANT: [usize; 8] = [32, 36, 11, 19, 22, 6, 9, 9];
    const MIN: [usize; 8] = [12, 14, 8, 7, 8, 5, 7, 6];
    const RIGHT: [bool; 8] = [false, false, false, false, false, true, true, true];
    let header = [
        "SOURCE",
        "DESTINATION",
        "PORT",
        "VERDICT",
        "REASON",
        "FLOWS",
        "PACKETS",
        "PKTS/S",
    ];
    let cells: Vec<[String; 8]> = rows
        .iter()
        .map(|r| {
            let port = match r.key.port {
                Some(p) => format!("{p}/{}", r.key.protocol),
                None => r.key.protocol.clone(),
            };
            [
                r.key.source.clone(),
                r.key.destination.clone(),
                port,
                r.key.verdict.clone(),
                r.key.reason.clone(),
                r.flows.to_string(),
                r.packets.to_string(),
                format!("{:.1}", r.packets_per_second),
            ]
        })
        .collect();
    let mut want = [0; 8];
    for (i, w) in want.iter_mut().enumerate() {
        *w = cells
            .iter()
            .map(|c| term::width(&c[i]))
            .chain([header[i].len()])
            .max()
            .unwrap_or(0)
            .min(if RIGHT[i] { usize::MAX } else { WANT[i] });
    }
    // Counts are never cut: a truncated number is a wrong number.
    let min: Vec<usize> = MIN
        .iter()
        .zip(want)
        .enumerate()
        .map(|(i, (m, w))| if RIGHT[i] { w } else { (*m).min(w) })
        .collect();
    let widths = term::fit_widths(&want, &min, width);
    let mut out = term::row(&header, &widths, &RIGHT);
    out.push('\n');
    for c in &cells {
        let src = term::shorten_endpoint(&c[0], widths[0]);
        let dst = term::shorten_endpoint(&c[1], widths[1]);
        let refs: Vec<&str> = [src.as_str(), dst.as_str()]
            .into_iter()
            .chain(c[2..].iter().map(String::as_str))
            .collect();
        out.push_str(&term::row(&refs, &widths, &RIGHT));
        out.push('\n');
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
    let mut live = false;
    let tty = std::io::stdout().is_terminal();
    let width = term::terminal_width();
    let mut lost = 0;
    let mut last_refresh = Instant::now();
    let mut next = last_refresh + interval;
    let mut done = 0;
    let stdout = std::io::stdout();
    loop {
        let wait = next.saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            Ok(Ok(ObserveItem::Flow(r, _))) if !live => summary.add_history(&r),
            Ok(Ok(ObserveItem::Flow(r, _))) => summary.add(&r),
            Ok(Ok(ObserveItem::Lost(n))) => lost = n,
            Ok(Ok(ObserveItem::EndOfHistory)) => {
                // Rates are measured from here: what came before was history.
                live = true;
                last_refresh = Instant::now();
                next = last_refresh + interval;
                continue;
            }
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
                let title = format!(
                    "netwatch top: {node}: denied flows in the last {}, {total} {}, refreshed every {:.1}s{}",
                    args.window,
                    if total == 1 { "group" } else { "groups" },
                    interval.as_secs_f64(),
                    if lost > 0 {
                        format!(
                            " ({lost} records lost: the agent dropped what this client did not read in time)"
                        )
                    } else {
                        String::new()
                    }
                );
                writeln!(out, "{}", term::wrap(&title, width))?;
                write!(out, "{}", format_table(&rows, width))?;
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
    fn history_counts_toward_totals_but_not_toward_the_first_rates() {
        let mut s = DeniedSummary::new(Duration::from_secs(60));
        let now: chrono::DateTime<Utc> = "2026-11-22T02:14:10Z".parse().unwrap();
        // 70 packets that happened before `top` started.
        s.add_history(&record(
            json!({"uuid": "a", "packets": 70, "lifecycle": "UPDATE"}),
        ));
        let rows = s.rows(now, Duration::from_secs(2));
        assert_eq!(
            (
                rows[0].packets,
                rows[0].packets_per_second,
                rows[0].flows_per_second
            ),
            (70, 0.0, 0.0)
        );
        // Then 4 more while watching: only those make a rate.
        s.add(&record(
            json!({"uuid": "a", "packets": 74, "lifecycle": "UPDATE"}),
        ));
        let rows = s.rows(now, Duration::from_secs(2));
        assert_eq!((rows[0].packets, rows[0].packets_per_second), (74, 2.0));
    }

    #[test]
    fn the_table_fits_the_terminal_so_the_redraw_does_not_wrap() {
        let row = TopRow {
            key: GroupKey {
                source: "payments-production/payments-processor-canary".into(),
                destination: "payments-production/ledger-writer-primary".into(),
                port: Some(8080),
                protocol: "TCP".into(),
                verdict: "POLICY_NOT_ENFORCED".into(),
                reason: "ICMP_ADMIN_PROHIBITED".into(),
            },
            flows: 123456,
            packets: 987654321,
            packets_per_second: 12345.6,
            flows_per_second: 1.0,
        };
        let table = format_table(&[row], 80);
        assert!(table.lines().all(|l| term::width(l) <= 80), "{table}");
        assert!(
            table.contains("987654321"),
            "numbers are never cut: {table}"
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
        let table = format_table(
            &[TopRow {
                key: g,
                flows: 1,
                packets: 3,
                packets_per_second: 1.5,
                flows_per_second: 0.5,
            }],
            80,
        );
        assert!(
            table.lines().nth(1).unwrap().contains("8080/TCP"),
            "{table}"
        );
    }
}
