//! `netwatch observe`: denied flows from a running agent, recent and live,
//! with `hubble observe`'s filters. The agent filters (see
//! [`crate::export::server`] for the protocol); this side formats.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, IsTerminal, Write},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::PathBuf,
};

use chrono::{DateTime, Local, Utc};

use super::CliError;
use crate::{
    export::{
        filter::{FilterSet, FlowFilter},
        server::{DEFAULT_SOCKET, ObserveRequest, ObserveStatus},
    },
    flow::record::{FlowLogLine, FlowRecord, L4, Lifecycle, Verdict},
    identity::Endpoint,
};

/// Filters shared by `observe` and `top`, as `hubble observe` names them.
/// Repeating a flag, or giving a comma-separated list, widens it (any may
/// match); different flags must all match.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct FilterArgs {
    /// Verdicts: DROPPED, TIMED_OUT, REFUSED, POLICY_NOT_ENFORCED.
    #[arg(long, value_name = "VERDICT")]
    pub verdict: Vec<String>,
    /// Flows with either end in this namespace.
    #[arg(short = 'n', long, value_name = "NAMESPACE")]
    pub namespace: Vec<String>,
    /// Flows from this namespace.
    #[arg(long, value_name = "NAMESPACE")]
    pub from_namespace: Vec<String>,
    /// Flows to this namespace.
    #[arg(long, value_name = "NAMESPACE")]
    pub to_namespace: Vec<String>,
    /// Flows with either end a pod whose name starts with this
    /// ([namespace/]prefix, e.g. prod/api- or api-5d4e).
    #[arg(long, value_name = "[NS/]POD")]
    pub pod: Vec<String>,
    /// Flows from such a pod.
    #[arg(long, value_name = "[NS/]POD")]
    pub from_pod: Vec<String>,
    /// Flows to such a pod.
    #[arg(long, value_name = "[NS/]POD")]
    pub to_pod: Vec<String>,
    /// Flows with either end matching this label selector (app=web,tier!=db).
    #[arg(short = 'l', long, value_name = "SELECTOR")]
    pub label: Vec<String>,
    /// Flows from an endpoint matching this label selector.
    #[arg(long, value_name = "SELECTOR")]
    pub from_label: Vec<String>,
    /// Flows to an endpoint matching this label selector.
    #[arg(long, value_name = "SELECTOR")]
    pub to_label: Vec<String>,
    /// Flows with either end at this IP or in this CIDR.
    #[arg(long, value_name = "IP|CIDR")]
    pub ip: Vec<String>,
    /// Flows from this IP or CIDR.
    #[arg(long, value_name = "IP|CIDR")]
    pub from_ip: Vec<String>,
    /// Flows to this IP or CIDR.
    #[arg(long, value_name = "IP|CIDR")]
    pub to_ip: Vec<String>,
    /// Flows with either port equal to this.
    #[arg(long, value_name = "PORT")]
    pub port: Vec<String>,
    /// Flows from this source port.
    #[arg(long, value_name = "PORT")]
    pub from_port: Vec<String>,
    /// Flows to this destination port.
    #[arg(long, value_name = "PORT")]
    pub to_port: Vec<String>,
    /// tcp, udp, sctp, icmpv4 (icmp), icmpv6.
    #[arg(long, value_name = "PROTO")]
    pub protocol: Vec<String>,
    /// Kernel drop reason (NETFILTER_DROP, TC_INGRESS, ...) or refusal
    /// (TCP_RESET, ICMP_PORT_UNREACHABLE, ...).
    #[arg(long, value_name = "REASON")]
    pub reason: Vec<String>,
    /// ingress or egress.
    #[arg(long, value_name = "DIRECTION")]
    pub traffic_direction: Vec<String>,
}

impl FilterArgs {
    /// The filter these flags describe; bad values name the flag and list
    /// what is valid.
    pub fn to_filter(&self) -> Result<FlowFilter, CliError> {
        let mut f = FlowFilter::any();
        let pairs: [(&str, &Vec<String>); 19] = [
            ("verdict", &self.verdict),
            ("namespace", &self.namespace),
            ("from-namespace", &self.from_namespace),
            ("to-namespace", &self.to_namespace),
            ("pod", &self.pod),
            ("from-pod", &self.from_pod),
            ("to-pod", &self.to_pod),
            ("label", &self.label),
            ("from-label", &self.from_label),
            ("to-label", &self.to_label),
            ("ip", &self.ip),
            ("from-ip", &self.from_ip),
            ("to-ip", &self.to_ip),
            ("port", &self.port),
            ("from-port", &self.from_port),
            ("to-port", &self.to_port),
            ("protocol", &self.protocol),
            ("reason", &self.reason),
            ("traffic-direction", &self.traffic_direction),
        ];
        for (key, values) in pairs {
            for v in values {
                f.set(key, v).map_err(|e| {
                    CliError::Usage(format!(
                        "--{}",
                        e.to_string().trim_start_matches("invalid ")
                    ))
                })?;
            }
        }
        Ok(f)
    }
}

/// `-o compact|json|table`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ObserveOutput {
    /// One line per flow, readable at a glance.
    #[default]
    Compact,
    /// The agent's flow log lines, as Hubble exports them.
    Json,
    /// Aligned columns.
    Table,
}

/// `--color auto|always|never`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorChoice {
    /// Colour when standard output is a terminal and NO_COLOR is unset.
    #[default]
    Auto,
    Always,
    Never,
}

impl ColorChoice {
    pub fn enabled(self) -> bool {
        match self {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => {
                std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
            }
        }
    }
}

/// Show denied flows from this node's agent: the latest, then live with -f
///
/// The agent filters; flags are `hubble observe`'s.
///
/// Examples:
///   netwatch observe --verdict DROPPED -n prod --last 50
///   netwatch observe -f --to-pod prod/api- --port 8080
///   netwatch observe --since 10m --reason NETFILTER_DROP -o json
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct ObserveArgs {
    /// The agent's observe API: a Unix socket path (unix://PATH) or a
    /// loopback HOST:PORT (tcp://HOST:PORT).
    #[arg(long, default_value = DEFAULT_SOCKET, value_name = "SOCKET|ADDR")]
    pub server: String,
    #[command(flatten)]
    pub filters: FilterArgs,
    /// Only flows newer than this: a duration (30s, 10m, 2h, 1d) or an
    /// RFC 3339 time.
    #[arg(long, value_name = "DURATION|TIME")]
    pub since: Option<String>,
    /// The last N matching buffered flows [default: 20, or 0 with --follow].
    #[arg(long, value_name = "N")]
    pub last: Option<usize>,
    /// Keep running and show new flows as they come.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = ObserveOutput::Compact)]
    pub output: ObserveOutput,
    /// Colour the compact output.
    #[arg(long, value_enum, default_value_t = ColorChoice::Auto)]
    pub color: ColorChoice,
    /// Instead of flows, show what is denied most (as `netwatch top`).
    #[arg(long)]
    pub summary: bool,
    /// Compact and table output: show every later record of a flow, not
    /// only those that change its verdict, reason or denying policies
    /// (-o json always shows every record).
    #[arg(long)]
    pub updates: bool,
}

/// Which later records of a flow the compact and table outputs show: a flow
/// keeps failing in the same way for as long as it retries, and one line per
/// flow (plus one per change) is what a follower can read.
#[derive(Default)]
struct ShownFlows {
    /// What was last shown of each flow, by record uuid.
    seen: HashMap<String, (Verdict, Option<String>, String)>,
}

impl ShownFlows {
    /// Bounds memory on a long follow; forgetting only means a later record
    /// of an old flow is shown once more.
    const MAX: usize = 65_536;

    fn worth_showing(&mut self, r: &FlowRecord) -> bool {
        let now = (r.verdict, reason_text(r), r.denied_by_labels().join(", "));
        let changed = self.seen.get(&r.uuid) != Some(&now);
        if r.lifecycle == Lifecycle::Final {
            self.seen.remove(&r.uuid);
        } else if changed {
            if self.seen.len() >= Self::MAX {
                self.seen.clear();
            }
            self.seen.insert(r.uuid.clone(), now);
        }
        changed
    }
}

/// Where the agent's observe API is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerAddr {
    Unix(PathBuf),
    Tcp(String),
}

impl ServerAddr {
    /// `unix://PATH`, `unix:PATH`, a path, `tcp://HOST:PORT` or `HOST:PORT`.
    pub fn parse(s: &str) -> Result<ServerAddr, CliError> {
        if let Some(p) = s
            .strip_prefix("unix://")
            .or_else(|| s.strip_prefix("unix:"))
        {
            return Ok(ServerAddr::Unix(PathBuf::from(p)));
        }
        if let Some(a) = s.strip_prefix("tcp://") {
            return Ok(ServerAddr::Tcp(a.to_string()));
        }
        if s.contains('/') {
            return Ok(ServerAddr::Unix(PathBuf::from(s)));
        }
        if s.rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            return Ok(ServerAddr::Tcp(s.to_string()));
        }
        Err(CliError::Usage(format!(
            "--server {s:?}: expected a Unix socket path (unix:///run/netwatch/netwatch.sock) or HOST:PORT (127.0.0.1:4245)"
        )))
    }
}

impl std::fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerAddr::Unix(p) => write!(f, "unix://{}", p.display()),
            ServerAddr::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

/// Parse `--since`: a duration ago (`30s`, `10m`, `2h`, `1d`) or an RFC 3339 time.
pub fn parse_since(s: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, CliError> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    let bad = || {
        CliError::Usage(format!(
            "--since {s:?}: expected a duration (30s, 10m, 2h, 1d) or an RFC 3339 time (2026-11-22T02:14:00Z)"
        ))
    };
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .ok_or_else(bad)?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().map_err(|_| bad())?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        _ => return Err(bad()),
    };
    let d = chrono::Duration::try_milliseconds((secs * 1000.0) as i64).ok_or_else(bad)?;
    Ok(now - d)
}

/// A connection to the agent's observe API, past the status line.
pub struct ObserveStream {
    reader: Box<dyn BufRead + Send>,
    /// What the agent said about itself.
    pub status: ObserveStatus,
}

/// One item the agent sends after the status line.
#[derive(Debug)]
pub enum ObserveItem {
    /// A flow record, with its line as received.
    Flow(Box<FlowRecord>, String),
    /// Everything buffered that matched has been sent.
    EndOfHistory,
    /// The agent dropped records this client did not take fast enough
    /// (total so far).
    Lost(u64),
}

impl ObserveStream {
    /// Connect to `server` and send `request`.
    pub fn connect(
        server: &ServerAddr,
        request: &ObserveRequest,
    ) -> Result<ObserveStream, CliError> {
        let unreachable = |e: std::io::Error| {
            CliError::Usage(format!(
                "cannot reach the agent at {server}: {e}. Is netwatch-agent running on this node? (--server picks its --api-socket or --api-addr)"
            ))
        };
        let mut line = serde_json::to_vec(request).map_err(|e| CliError::Usage(e.to_string()))?;
        line.push(b'\n');
        let reader: Box<dyn BufRead + Send> = match server {
            ServerAddr::Unix(p) => {
                let mut s = UnixStream::connect(p).map_err(unreachable)?;
                s.write_all(&line).map_err(unreachable)?;
                Box::new(BufReader::new(s))
            }
            ServerAddr::Tcp(a) => {
                let mut s = std::net::TcpStream::connect(a.as_str()).map_err(unreachable)?;
                s.write_all(&line).map_err(unreachable)?;
                Box::new(BufReader::new(s))
            }
        };
        let mut stream = ObserveStream {
            reader,
            status: ObserveStatus {
                status: String::new(),
                node_name: String::new(),
                buffered: 0,
                capacity: 0,
            },
        };
        let first = stream.read_line()?.ok_or_else(|| {
            CliError::Usage(format!("the agent at {server} closed the connection"))
        })?;
        let v: serde_json::Value = serde_json::from_str(&first).map_err(|e| {
            CliError::Usage(format!("the agent at {server} answered {first:?}: {e}"))
        })?;
        if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
            return Err(CliError::Usage(format!(
                "the agent refused the request: {e}"
            )));
        }
        stream.status = serde_json::from_value(v).map_err(|e| {
            CliError::Usage(format!("the agent at {server} answered {first:?}: {e}"))
        })?;
        Ok(stream)
    }

    fn read_line(&mut self) -> Result<Option<String>, CliError> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Ok(None),
            Ok(_) => Ok(Some(line.trim_end().to_string())),
            Err(e) => Err(CliError::Usage(format!("reading from the agent: {e}"))),
        }
    }

    /// The next item; `None` when the agent closed the connection.
    pub fn next_item(&mut self) -> Result<Option<ObserveItem>, CliError> {
        loop {
            let Some(line) = self.read_line()? else {
                return Ok(None);
            };
            if line.is_empty() {
                continue;
            }
            let v: serde_json::Value = match serde_json::from_str(&line) {
                Ok(v) => v,
                Err(e) => {
                    return Err(CliError::Usage(format!(
                        "the agent sent a line that is not JSON ({e}): {line}"
                    )));
                }
            };
            if v.get("end_of_history").is_some() {
                return Ok(Some(ObserveItem::EndOfHistory));
            }
            if let Some(n) = v.get("lost_records").and_then(|n| n.as_u64()) {
                return Ok(Some(ObserveItem::Lost(n)));
            }
            if v.get("flow").is_some() {
                match serde_json::from_value::<FlowLogLine>(v) {
                    Ok(l) => return Ok(Some(ObserveItem::Flow(Box::new(l.flow), line))),
                    Err(e) => tracing::warn!("skipping a record this netwatch cannot read: {e}"),
                }
            }
        }
    }
}

/// The request `observe` sends.
pub fn request(
    filters: &FilterArgs,
    since: Option<&str>,
    last: Option<usize>,
    follow: bool,
) -> Result<ObserveRequest, CliError> {
    let filter = filters.to_filter()?;
    let since = since.map(|s| parse_since(s, Utc::now())).transpose()?;
    let last = last.or(if since.is_some() {
        None
    } else if follow {
        Some(0)
    } else {
        Some(20)
    });
    Ok(ObserveRequest {
        filters: FilterSet::only(filter),
        last,
        since,
        follow,
    })
}

pub fn run(args: &ObserveArgs) -> Result<u8, CliError> {
    if args.summary {
        return super::top::run(&super::top::TopArgs::from_observe(args));
    }
    let server = ServerAddr::parse(&args.server)?;
    let req = request(&args.filters, args.since.as_deref(), args.last, args.follow)?;
    let mut stream = ObserveStream::connect(&server, &req)?;
    let color = args.color.enabled();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if args.output == ObserveOutput::Table {
        writeln!(out, "{}", table_header())?;
    }
    let mut shown = ShownFlows::default();
    while let Some(item) = stream.next_item()? {
        match item {
            ObserveItem::Flow(r, _)
                if args.output != ObserveOutput::Json
                    && !args.updates
                    && !shown.worth_showing(&r) => {}
            ObserveItem::Flow(r, line) => match args.output {
                ObserveOutput::Compact => writeln!(out, "{}", format_compact(&r, color))?,
                ObserveOutput::Json => writeln!(out, "{line}")?,
                ObserveOutput::Table => writeln!(out, "{}", format_table_row(&r))?,
            },
            ObserveItem::EndOfHistory => {}
            ObserveItem::Lost(n) => {
                out.flush()?;
                eprintln!(
                    "netwatch: the agent dropped {n} records this client did not read fast enough"
                );
            }
        }
        // Follow mode prints as flows come; history is flushed at the end.
        if args.follow {
            out.flush()?;
        }
    }
    out.flush()?;
    Ok(0)
}

/// `prod/web-7f9c`, the service a flow was addressed to when no backend is
/// known (`prod/api (service)`), or the address (with the reserved identity,
/// if any).
fn endpoint_name(ep: &Endpoint, ip: IpAddr) -> String {
    if !ep.pod_name.is_empty() {
        return format!("{}/{}", ep.namespace, ep.pod_name);
    }
    if let Some(svc) = &ep.service {
        return svc.to_string();
    }
    match ip {
        IpAddr::V6(v6) => format!("[{v6}]"),
        IpAddr::V4(v4) => v4.to_string(),
    }
}

fn reserved_suffix(ep: &Endpoint) -> String {
    match ep.reserved_identity() {
        _ if ep.pod_name.is_empty() && ep.service.is_some() => " (service)".into(),
        Some(r) if ep.pod_name.is_empty() => format!(" ({r})"),
        _ => String::new(),
    }
}

/// Later records of a flow say so, with its counts, so that a follower sees
/// one flow failing again and again rather than a stream of new failures.
fn lifecycle_text(r: &FlowRecord) -> String {
    let span = (r.last_seen - r.first_seen).num_milliseconds() as f64 / 1000.0;
    match r.lifecycle {
        Lifecycle::New => String::new(),
        Lifecycle::Update => format!(" [still failing: {} packets in {span:.1}s]", r.packets),
        Lifecycle::Final => format!(" [ended: {} packets in {span:.1}s]", r.packets),
    }
}

fn protocol_text(r: &FlowRecord) -> String {
    match &r.l4 {
        L4::Tcp(p) => {
            let flags = p
                .flags
                .as_ref()
                .map(|f| f.names().join(","))
                .unwrap_or_default();
            let dns = if r.is_dns { " DNS" } else { "" };
            if flags.is_empty() {
                format!("TCP{dns}")
            } else {
                format!("TCP{dns} {flags}")
            }
        }
        L4::Udp(_) if r.is_dns => "UDP DNS".into(),
        L4::Icmpv4(i) | L4::Icmpv6(i) => format!(
            "{} type {} code {}",
            r.l4.protocol_name(),
            i.icmp_type,
            i.code
        ),
        other => other.protocol_name(),
    }
}

fn reason_text(r: &FlowRecord) -> Option<String> {
    r.drop_reason_desc.clone().or_else(|| r.refusal.clone())
}

fn ends(r: &FlowRecord) -> (String, String) {
    let ports = r.l4.ports();
    let mut src = endpoint_name(&r.source, r.ip.source);
    if let Some(p) = ports.filter(|_| r.source.pod_name.is_empty()) {
        src.push_str(&format!(":{}", p.source_port));
    }
    src.push_str(&reserved_suffix(&r.source));
    let mut dst = endpoint_name(&r.destination, r.ip.destination);
    if let Some(p) = ports {
        dst.push_str(&format!(":{}", p.destination_port));
    }
    dst.push_str(&reserved_suffix(&r.destination));
    (src, dst)
}

fn verdict_colour(v: Verdict) -> &'static str {
    match v {
        Verdict::Dropped => "\x1b[31m",
        Verdict::TimedOut => "\x1b[33m",
        Verdict::Refused => "\x1b[35m",
        Verdict::PolicyNotEnforced => "\x1b[36m",
    }
}

/// One line per flow:
/// `Nov 22 02:14:07.113 prod/web-7f9c -> prod/api-5d4e:8080 TCP SYN DROPPED (NETFILTER_DROP) denied by prod/default-deny-all [ingress]`.
pub fn format_compact(r: &FlowRecord, color: bool) -> String {
    let time = r.time.with_timezone(&Local).format("%b %d %H:%M:%S%.3f");
    let (src, dst) = ends(r);
    let (c, bold, reset) = if color {
        (verdict_colour(r.verdict), "\x1b[1m", "\x1b[0m")
    } else {
        ("", "", "")
    };
    let mut line = format!(
        "{time} {bold}{src}{reset} -> {bold}{dst}{reset} {} {c}{}{reset}",
        protocol_text(r),
        r.verdict.as_str()
    );
    if let Some(reason) = reason_text(r) {
        line.push_str(&format!(" ({reason})"));
    }
    let policies = r.denied_by_labels().join(", ");
    if !policies.is_empty() {
        line.push_str(&format!(" denied by {policies}"));
    }
    line.push_str(&lifecycle_text(r));
    line
}

const TABLE_WIDTHS: [usize; 7] = [23, 30, 34, 14, 20, 22, 8];

/// The table's header line.
pub fn table_header() -> String {
    row(&[
        "TIME",
        "SOURCE",
        "DESTINATION",
        "PROTOCOL",
        "VERDICT",
        "REASON",
        "PACKETS",
        "POLICY",
    ])
}

fn row(cells: &[&str]) -> String {
    let mut line = String::new();
    for (i, c) in cells.iter().enumerate() {
        match TABLE_WIDTHS.get(i) {
            Some(w) => line.push_str(&format!("{c:<w$} ")),
            None => line.push_str(c),
        }
    }
    line.trim_end().to_string()
}

/// One table row.
pub fn format_table_row(r: &FlowRecord) -> String {
    let time = r
        .time
        .with_timezone(&Local)
        .format("%b %d %H:%M:%S%.3f")
        .to_string();
    let (src, dst) = ends(r);
    let reason = reason_text(r).unwrap_or_default();
    let packets = r.packets.to_string();
    let policies = r.denied_by_labels().join(", ");
    row(&[
        &time,
        &src,
        &dst,
        &protocol_text(r),
        r.verdict.as_str(),
        &reason,
        &packets,
        &policies,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::filter::tests::record;
    use serde_json::json;

    #[test]
    fn compact_line_reads_at_a_glance() {
        let r = record(
            json!({"ingress_denied_by": [{"name": "default-deny-all", "namespace": "prod", "kind": "NetworkPolicy"}]}),
        );
        let line = format_compact(&r, false);
        let (_, rest) = line.split_at(19);
        assert_eq!(
            rest,
            " prod/web-7f9c -> prod/api-5d4e:8080 TCP SYN DROPPED (NETFILTER_DROP) denied by prod/default-deny-all [ingress]"
        );
        assert!(line.starts_with("Nov 2"), "{line}");
        let coloured = format_compact(&r, true);
        assert!(coloured.contains("\x1b[31mDROPPED\x1b[0m"), "{coloured:?}");
    }

    #[test]
    fn compact_line_for_unresolved_and_reserved_ends() {
        let r = record(json!({
            "verdict": "REFUSED", "drop_reason_desc": null, "refusal": "TCP_RESET",
            "source": {"identity": 0, "namespace": null, "pod_name": null, "labels": null, "workloads": null},
            "destination": {"identity": 2, "namespace": null, "pod_name": null, "labels": ["reserved:world"], "workloads": null},
            "IP": {"source": "10.244.1.2", "destination": "fd00::9", "ipVersion": "IPv6"}
        }));
        let line = format_compact(&r, false);
        assert!(
            line.ends_with(
                " 10.244.1.2:48420 -> [fd00::9]:8080 (world) TCP SYN REFUSED (TCP_RESET)"
            ),
            "{line}"
        );
        let dns = record(
            json!({"verdict": "TIMED_OUT", "drop_reason_desc": null, "is_dns": true,
                                "l4": {"UDP": {"source_port": 5353, "destination_port": 53}}}),
        );
        assert!(format_compact(&dns, false).ends_with("prod/api-5d4e:53 UDP DNS TIMED_OUT"));
    }

    #[test]
    fn compact_line_marks_later_records_of_a_flow_with_their_counts() {
        let update = record(
            json!({"lifecycle": "UPDATE", "packets": 7, "last_seen": "2026-11-22T02:14:12.500Z"}),
        );
        assert!(
            format_compact(&update, false)
                .ends_with("DROPPED (NETFILTER_DROP) [still failing: 7 packets in 5.5s]"),
            "{}",
            format_compact(&update, false)
        );
        let last = record(
            json!({"lifecycle": "FINAL", "packets": 9, "last_seen": "2026-11-22T02:14:37.000Z"}),
        );
        assert!(
            format_compact(&last, false).ends_with(" [ended: 9 packets in 30.0s]"),
            "{}",
            format_compact(&last, false)
        );
        assert!(
            !format_compact(&record(json!({})), false).contains('['),
            "a NEW record has no suffix"
        );
    }

    #[test]
    fn a_flow_that_keeps_failing_the_same_way_is_shown_once_and_again_when_it_changes() {
        let mut shown = ShownFlows::default();
        let new = record(json!({}));
        let same = record(json!({"lifecycle": "UPDATE", "packets": 7}));
        let other_flow = record(json!({"uuid": "u-2", "lifecycle": "UPDATE"}));
        let denied = record(json!({"lifecycle": "UPDATE", "packets": 9,
            "ingress_denied_by": [{"name": "default-deny-all", "namespace": "prod", "kind": "NetworkPolicy"}]}));
        let last = record(json!({"lifecycle": "FINAL", "packets": 12,
            "ingress_denied_by": [{"name": "default-deny-all", "namespace": "prod", "kind": "NetworkPolicy"}]}));
        assert!(shown.worth_showing(&new));
        assert!(!shown.worth_showing(&same), "only its counts grew");
        assert!(
            shown.worth_showing(&other_flow),
            "a later record of a flow not shown yet (e.g. older than --last)"
        );
        assert!(shown.worth_showing(&denied), "the denying policy is new");
        assert!(!shown.worth_showing(&last), "ends as it was");
        assert!(
            !shown.seen.contains_key("u-1"),
            "a final record forgets the flow"
        );
        let refused =
            record(json!({"lifecycle": "FINAL", "verdict": "TIMED_OUT", "drop_reason_desc": null}));
        assert!(shown.worth_showing(&refused));
    }

    #[test]
    fn compact_line_names_the_service_when_no_backend_is_known() {
        let r = record(json!({
            "verdict": "REFUSED", "drop_reason_desc": null, "refusal": "ICMP_PORT_UNREACHABLE",
            "IP": {"destination": "10.96.0.20"},
            "destination": {"identity": 0, "pod_name": null, "labels": null, "workloads": null, "ip": "10.96.0.20",
                            "service": {"namespace": "prod", "name": "api"}}
        }));
        let line = format_compact(&r, false);
        assert!(
            line.contains(" prod/web-7f9c -> prod/api:8080 (service) TCP SYN REFUSED"),
            "{line}"
        );
    }

    #[test]
    fn table_rows_line_up_with_the_header() {
        let r = record(json!({}));
        let header = table_header();
        let line = format_table_row(&r);
        for col in ["SOURCE", "DESTINATION", "VERDICT", "PACKETS"] {
            let at = header.find(col).unwrap();
            assert_eq!(&line[at - 1..at], " ", "{header}\n{line}");
        }
        assert!(
            line.contains("prod/web-7f9c") && line.split_whitespace().any(|c| c == "3"),
            "{line}"
        );
    }

    #[test]
    fn since_takes_durations_and_times() {
        let now: DateTime<Utc> = "2026-11-22T02:14:00Z".parse().unwrap();
        assert_eq!(
            parse_since("10m", now).unwrap(),
            "2026-11-22T02:04:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        assert_eq!(
            parse_since("1.5h", now).unwrap(),
            "2026-11-22T00:44:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        assert_eq!(
            parse_since("2026-11-22T01:00:00Z", now).unwrap(),
            "2026-11-22T01:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        let e = parse_since("yesterday", now).unwrap_err().to_string();
        assert!(e.contains("--since") && e.contains("10m"), "{e}");
    }

    #[test]
    fn server_addresses() {
        assert_eq!(
            ServerAddr::parse("/run/netwatch/netwatch.sock").unwrap(),
            ServerAddr::Unix("/run/netwatch/netwatch.sock".into())
        );
        assert_eq!(
            ServerAddr::parse("unix:///tmp/x.sock").unwrap(),
            ServerAddr::Unix("/tmp/x.sock".into())
        );
        assert_eq!(
            ServerAddr::parse("127.0.0.1:4245").unwrap(),
            ServerAddr::Tcp("127.0.0.1:4245".into())
        );
        assert_eq!(
            ServerAddr::parse("tcp://[::1]:4245").unwrap(),
            ServerAddr::Tcp("[::1]:4245".into())
        );
        assert!(ServerAddr::parse("agent").is_err());
    }

    #[test]
    fn flags_become_one_filter_and_bad_values_name_the_flag() {
        let args = FilterArgs {
            verdict: vec!["dropped".into()],
            namespace: vec!["prod".into()],
            to_port: vec!["8080".into()],
            ..FilterArgs::default()
        };
        let f = args.to_filter().unwrap();
        assert!(f.matches(&record(json!({}))));
        assert!(!f.matches(&record(json!({"verdict": "REFUSED"}))));
        let bad = FilterArgs {
            verdict: vec!["FORWARDED".into()],
            ..FilterArgs::default()
        };
        let e = bad.to_filter().unwrap_err().to_string();
        assert!(
            e.starts_with("--verdict \"FORWARDED\"")
                && e.contains("DROPPED, TIMED_OUT, REFUSED, POLICY_NOT_ENFORCED"),
            "{e}"
        );
        let bad = FilterArgs {
            protocol: vec!["http".into()],
            ..FilterArgs::default()
        };
        assert!(
            bad.to_filter()
                .unwrap_err()
                .to_string()
                .contains("tcp, udp, sctp, icmpv4")
        );
    }

    #[test]
    fn last_defaults_like_hubble_observe() {
        let f = FilterArgs::default();
        assert_eq!(request(&f, None, None, false).unwrap().last, Some(20));
        assert_eq!(request(&f, None, None, true).unwrap().last, Some(0));
        assert_eq!(request(&f, Some("5m"), None, false).unwrap().last, None);
        assert_eq!(request(&f, None, Some(3), true).unwrap().last, Some(3));
    }
}
