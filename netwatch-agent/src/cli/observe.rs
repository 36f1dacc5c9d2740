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

use super::{CliError, term};
use crate::{
    capture::{offsets::VMLINUX_BTF, reasons::DropReasons},
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
    /// Flows captured on nodes matching this name or pattern (node-*).
    #[arg(long, value_name = "NAME")]
    pub node_name: Vec<String>,
    /// Event type, as Hubble's: drop (DROPPED) or trace (TIMED_OUT,
    /// REFUSED, POLICY_NOT_ENFORCED).
    #[arg(short = 't', long = "type", value_name = "TYPE")]
    pub event_type: Vec<String>,
    /// Hubble's drop reason (POLICY_DENIED, INVALID_SOURCE_IP, ...), which
    /// kernel reasons map onto (README, "Hubble format").
    #[arg(long, value_name = "REASON")]
    pub drop_reason_desc: Vec<String>,
    /// Invert the next filter flag: leave out what it matches (as hubble
    /// observe; all --not flags together describe what is left out).
    #[arg(long, action = clap::ArgAction::Count)]
    pub not: u8,
    /// Flows in any namespace (the default; for hubble observe's muscle memory).
    #[arg(short = 'A', long, conflicts_with_all = ["namespace", "from_namespace", "to_namespace"])]
    pub all_namespaces: bool,
    /// (key, value) of the filter flags a --not inverts; filled from the
    /// command line's order (see [`negated_terms`]).
    #[arg(skip)]
    pub negated: Vec<(String, String)>,
}

/// The filter flags: (clap id, filter key).
const FILTER_FLAGS: [(&str, &str); 22] = [
    ("verdict", "verdict"),
    ("namespace", "namespace"),
    ("from_namespace", "from-namespace"),
    ("to_namespace", "to-namespace"),
    ("pod", "pod"),
    ("from_pod", "from-pod"),
    ("to_pod", "to-pod"),
    ("label", "label"),
    ("from_label", "from-label"),
    ("to_label", "to-label"),
    ("ip", "ip"),
    ("from_ip", "from-ip"),
    ("to_ip", "to-ip"),
    ("port", "port"),
    ("from_port", "from-port"),
    ("to_port", "to-port"),
    ("protocol", "protocol"),
    ("reason", "reason"),
    ("traffic_direction", "traffic-direction"),
    ("node_name", "node-name"),
    ("event_type", "type"),
    ("drop_reason_desc", "drop-reason-desc"),
];

/// The filter flag values that directly follow a `--not`, as (key, value):
/// clap keeps each argument's position, which the derived struct loses.
pub fn negated_terms(m: &clap::ArgMatches) -> Vec<(String, String)> {
    let nots: Vec<usize> = match m.indices_of("not") {
        Some(i) => i.collect(),
        None => return Vec::new(),
    };
    let mut out = Vec::new();
    for (id, key) in FILTER_FLAGS {
        let (Ok(Some(values)), Some(at)) = (m.try_get_many::<String>(id), m.indices_of(id)) else {
            continue;
        };
        for (v, i) in values.zip(at) {
            // `--not --flag value` (the value two places on) or
            // `--not --flag=value` (one place on).
            if nots.iter().any(|n| *n + 1 == i || *n + 2 == i) {
                out.push((key.to_string(), v.clone()));
            }
        }
    }
    out
}

impl FilterArgs {
    /// The filter these flags describe; bad values name the flag and list
    /// what is valid.
    pub fn to_filter(&self) -> Result<FlowFilter, CliError> {
        Ok(self.to_filters()?.0)
    }

    /// The filters these flags describe: what to show, and what `--not`
    /// leaves out (`None` when nothing is negated).
    pub fn to_filters(&self) -> Result<(FlowFilter, Option<FlowFilter>), CliError> {
        if self.not > 0 && self.negated.len() < usize::from(self.not) {
            return Err(CliError::Usage(
                "--not inverts the filter flag that follows it (e.g. --not --to-port 53)".into(),
            ));
        }
        let mut f = FlowFilter::any();
        let mut left_out = FlowFilter::any();
        let pairs: [(&str, &Vec<String>); 22] = [
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
            ("node-name", &self.node_name),
            ("type", &self.event_type),
            ("drop-reason-desc", &self.drop_reason_desc),
        ];
        for (key, values) in pairs {
            for v in values {
                let negated = self.negated.iter().any(|(k, nv)| k == key && nv == v);
                let target = if negated { &mut left_out } else { &mut f };
                target.set(key, v).map_err(|e| {
                    CliError::Usage(format!(
                        "--{}",
                        e.to_string().trim_start_matches("invalid ")
                    ))
                })?;
            }
        }
        // Reason names are the kernel's; this node's BTF is world-readable.
        // Without it the agent is the judge (it refuses nothing it cannot
        // check either).
        if let Ok(reasons) = DropReasons::from_btf_file(std::path::Path::new(VMLINUX_BTF)) {
            for filter in [&f, &left_out] {
                filter.check_reasons(reasons.names()).map_err(|e| {
                    CliError::Usage(format!(
                        "--{}",
                        e.to_string().trim_start_matches("invalid ")
                    ))
                })?;
            }
        }
        Ok((f, (!left_out.is_empty()).then_some(left_out)))
    }

    /// The allow and deny lists for the agent.
    pub fn to_filter_set(&self) -> Result<FilterSet, CliError> {
        let (show, left_out) = self.to_filters()?;
        let mut set = FilterSet::only(show);
        set.deny.extend(left_out);
        Ok(set)
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
    /// Valid Hubble: each line an observer.GetFlowsResponse in protojson
    /// (netwatch's verdict and reason in Summary).
    Jsonpb,
    /// One block of `KEY: value` lines per flow, as hubble observe -o dict.
    Dict,
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
    /// Only flows up to this time: a duration ago (5m) or an RFC 3339 time.
    #[arg(long, value_name = "DURATION|TIME", conflicts_with = "follow")]
    pub until: Option<String>,
    /// The last N matching buffered flows [default: 20, or 0 with --follow].
    #[arg(long, value_name = "N")]
    pub last: Option<usize>,
    /// The first N matching buffered flows (the oldest).
    #[arg(long, value_name = "N", conflicts_with_all = ["last", "follow"])]
    pub first: Option<usize>,
    /// Keep running and show new flows as they come.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Compact and dict output: name the node each flow was captured on.
    #[arg(long)]
    pub print_node_name: bool,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = ObserveOutput::Compact)]
    pub output: ObserveOutput,
    /// Colour the compact output.
    #[arg(long, value_enum, default_value_t = ColorChoice::Auto)]
    pub color: ColorChoice,
    /// Instead of flows, show what is denied most (as `netwatch top`).
    #[arg(long)]
    pub summary: bool,
    /// One line per failing path (source and destination workloads, port,
    /// verdict, reason, policies) with its count of flows and packets,
    /// updated in place on a terminal, instead of a line per flow.
    #[arg(long, conflicts_with = "updates")]
    pub paths: bool,
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

/// `--paths`: one line per failing path, its counts kept current. A client
/// retrying a broken connection makes a new flow (a new source port) each
/// time; on-call wants to see the path once, and how much it fails.
struct FailingPaths {
    width: usize,
    color: bool,
    /// Redraw counts in place (a terminal), else print each path once.
    live: bool,
    /// Path lines in the order printed.
    lines: Vec<String>,
    by_key: HashMap<(super::top::GroupKey, String), PathCount>,
}

struct PathCount {
    line: usize,
    /// The latest packet count of each flow on the path.
    flows: HashMap<String, u64>,
    first: FlowRecord,
}

impl FailingPaths {
    fn new(width: usize, color: bool, live: bool) -> FailingPaths {
        FailingPaths {
            width,
            color,
            live,
            lines: Vec::new(),
            by_key: HashMap::new(),
        }
    }

    /// Count `r`; returns what to write: a new path's line, or (on a
    /// terminal) the escape sequence that rewrites a known path's line.
    fn add(&mut self, r: &FlowRecord) -> String {
        let key = (super::top::group_of(r), policy_text(r));
        let next_line = self.lines.len();
        let entry = self.by_key.entry(key).or_insert_with(|| PathCount {
            line: next_line,
            flows: HashMap::new(),
            first: r.clone(),
        });
        let before = (entry.flows.len(), entry.flows.values().sum::<u64>());
        let packets = entry.flows.entry(r.uuid.clone()).or_default();
        *packets = (*packets).max(r.packets);
        let after = (entry.flows.len(), entry.flows.values().sum::<u64>());
        let (index, text) = (entry.line, self.render(&self.by_key_line(r)));
        if index == next_line {
            self.lines.push(text.clone());
            return format!("{text}\n");
        }
        if !self.live || before == after {
            return String::new();
        }
        self.lines[index] = text.clone();
        let up = self.lines.len() - index;
        format!("\x1b[{up}A\r\x1b[2K{text}\x1b[{up}B\r")
    }

    fn by_key_line(&self, r: &FlowRecord) -> (FlowRecord, usize, u64) {
        let key = (super::top::group_of(r), policy_text(r));
        let e = &self.by_key[&key];
        (e.first.clone(), e.flows.len(), e.flows.values().sum())
    }

    /// The path's line: its first flow as compact shows it, without the
    /// per-flow counts, then the path's own, cut to one terminal line.
    fn render(&self, (first, flows, packets): &(FlowRecord, usize, u64)) -> String {
        let mut r = first.clone();
        r.lifecycle = Lifecycle::New;
        let counts = format!(
            " [{flows} {}, {packets} {}]",
            if *flows == 1 { "flow" } else { "flows" },
            if *packets == 1 { "packet" } else { "packets" }
        );
        let body_width = self.width.saturating_sub(term::width(&counts));
        let plain = format_compact_for(&r, false, body_width, "").replace('\n', " ");
        let plain = term::truncate(&plain, body_width) + &counts;
        if self.color {
            let v = r.verdict.as_str();
            plain.replacen(v, &format!("{}{v}\x1b[0m", verdict_colour(r.verdict)), 1)
        } else {
            plain
        }
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
        let unreachable = |e: std::io::Error| connect_error(server, &e);
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
        ObserveStream::from_reader(reader, &server.to_string())
    }

    /// Read the status line from an agent's answer already connected to
    /// `reader` (`server` names it in errors).
    pub fn from_reader(
        reader: Box<dyn BufRead + Send>,
        server: &str,
    ) -> Result<ObserveStream, CliError> {
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

/// Why the agent could not be reached, in words that say what to do: a
/// permission problem is not an agent that is down.
pub fn connect_error(server: &ServerAddr, e: &std::io::Error) -> CliError {
    use std::os::unix::fs::MetadataExt;
    if e.kind() == std::io::ErrorKind::PermissionDenied
        && let ServerAddr::Unix(path) = server
    {
        let who = match std::fs::metadata(path) {
            Ok(m) => format!(
                " (owner {}, group {}, mode {:04o}): run it as root, as {}, or as a member of group {}",
                account_name("/etc/passwd", m.uid()),
                account_name("/etc/group", m.gid()),
                m.mode() & 0o7777,
                account_name("/etc/passwd", m.uid()),
                account_name("/etc/group", m.gid()),
            ),
            // The directory itself is closed to this user.
            Err(_) => format!(
                ": this user cannot open {}; run it as root (sudo netwatch ...) or in the agent's pod (kubectl exec)",
                path.parent().unwrap_or(path).display()
            ),
        };
        return CliError::Usage(format!(
            "permission denied on the agent's socket {}{who}",
            path.display()
        ));
    }
    CliError::Usage(format!(
        "cannot reach the agent at {server}: {e}. Is netwatch-agent running on this node? (--server picks its --api-socket or --api-addr)"
    ))
}

/// The name of `id` in a passwd or group file, else the number.
fn account_name(file: &str, id: u32) -> String {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                let mut cols = l.split(':');
                let name = cols.next()?;
                let num = cols.nth(1)?;
                (num.parse::<u32>().ok()? == id).then(|| name.to_string())
            })
        })
        .unwrap_or_else(|| id.to_string())
}

/// The request `observe` sends.
pub fn request(
    filters: &FilterArgs,
    since: Option<&str>,
    last: Option<usize>,
    follow: bool,
) -> Result<ObserveRequest, CliError> {
    let filters = filters.to_filter_set()?;
    let since = since.map(|s| parse_since(s, Utc::now())).transpose()?;
    let last = last.or(if since.is_some() {
        None
    } else if follow {
        Some(0)
    } else {
        Some(20)
    });
    Ok(ObserveRequest {
        filters,
        last,
        since,
        follow,
        ..ObserveRequest::default()
    })
}

pub fn run(args: &ObserveArgs) -> Result<u8, CliError> {
    if args.summary {
        return super::top::run(&super::top::TopArgs::from_observe(args));
    }
    let server = ServerAddr::parse(&args.server)?;
    let mut req = request(&args.filters, args.since.as_deref(), args.last, args.follow)?;
    if let Some(n) = args.first {
        req.first = Some(n);
        req.last = None;
    }
    if let Some(u) = &args.until {
        req.until = Some(parse_since(u, Utc::now()).map_err(|_| {
            CliError::Usage(format!(
                "--until {u:?}: expected a duration ago (5m, 2h) or an RFC 3339 time (2026-11-22T02:14:00Z)"
            ))
        })?);
    }
    if args.paths && args.output != ObserveOutput::Compact {
        return Err(CliError::Usage(
            "--paths is a mode of the compact output (-o compact)".into(),
        ));
    }
    let mut stream = ObserveStream::connect(&server, &req)?;
    let color = args.color.enabled();
    let width = term::terminal_width();
    let widths = table_widths(width);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if args.output == ObserveOutput::Table {
        writeln!(out, "{}", table_header_for(&widths))?;
    }
    let mut paths = FailingPaths::new(width, color, stdout.is_terminal());
    let mut shown = ShownFlows::default();
    let mut history_done = false;
    loop {
        let Some(item) = stream.next_item()? else {
            out.flush()?;
            // Without -f the agent closes after the history; anything else
            // is the agent going away, which a follower must hear about.
            if args.follow || !history_done {
                return Err(CliError::AgentGone(server.to_string()));
            }
            break;
        };
        history_done |= matches!(item, ObserveItem::EndOfHistory);
        match item {
            ObserveItem::Flow(r, _) if args.paths => {
                write!(out, "{}", paths.add(&r))?;
            }
            ObserveItem::Flow(r, _)
                if !matches!(args.output, ObserveOutput::Json | ObserveOutput::Jsonpb)
                    && !args.updates
                    && !shown.worth_showing(&r) => {}
            ObserveItem::Flow(r, line) => match args.output {
                ObserveOutput::Compact => {
                    let node = if args.print_node_name {
                        format!(" [{}]", r.node_name)
                    } else {
                        String::new()
                    };
                    writeln!(out, "{}", format_compact_for(&r, color, width, &node))?
                }
                ObserveOutput::Json => writeln!(out, "{line}")?,
                ObserveOutput::Jsonpb => {
                    writeln!(out, "{}", crate::export::hubble::to_get_flows_response(&r))?
                }
                ObserveOutput::Dict => write!(out, "{}", format_dict(&r, args.print_node_name))?,
                ObserveOutput::Table => writeln!(out, "{}", format_table_row_for(&r, &widths))?,
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
    r.drop_reason_desc
        .as_ref()
        .map(|d| d.to_string())
        .or_else(|| r.refusal.clone())
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

/// Calico's staged policies' what-if, when they would change the
/// decision: `staged: would deny if enforced by StagedGlobalNetworkPolicy.projectcalico.org security.x rule 0 [egress]`.
pub fn staged_text(r: &FlowRecord) -> Option<String> {
    let staged = r.staged.as_ref()?;
    let what = if staged.would_deny_if_enforced {
        "would deny if enforced".to_string()
    } else {
        format!("would be {} if enforced", staged.verdict)
    };
    let by = staged.labels();
    Some(if by.is_empty() {
        format!("staged: {what}")
    } else {
        format!("staged: {what} by {}", by.join(", "))
    })
}

fn verdict_colour(v: Verdict) -> &'static str {
    match v {
        Verdict::Dropped => "\x1b[31m",
        Verdict::TimedOut => "\x1b[33m",
        Verdict::Refused => "\x1b[35m",
        Verdict::PolicyNotEnforced => "\x1b[36m",
    }
}

/// The denying policies, each once with the directions it denies, egress
/// first (the order a CNI checks them in):
/// `prod/default-deny-all [egress+ingress], prod/api-only [ingress]`.
pub fn policy_text(r: &FlowRecord) -> String {
    let mut seen: Vec<(String, Vec<&str>)> = Vec::new();
    let sides = r
        .egress_denied_by
        .iter()
        .map(|p| (p, "egress"))
        .chain(r.ingress_denied_by.iter().map(|p| (p, "ingress")));
    for (p, side) in sides {
        let name = match &p.namespace {
            Some(ns) => format!("{ns}/{}", p.name),
            None => format!("{} {}", p.kind.as_str(), p.name),
        };
        match seen.iter_mut().find(|(n, _)| *n == name) {
            Some((_, s)) => s.push(side),
            None => seen.push((name, vec![side])),
        }
    }
    seen.into_iter()
        .map(|(n, s)| format!("{n} [{}]", s.join("+")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One line per flow:
/// `Nov 22 02:14:07.113 prod/web-7f9c -> prod/api-5d4e:8080 TCP SYN DROPPED (NETFILTER_DROP) denied by prod/default-deny-all [ingress]`.
pub fn format_compact(r: &FlowRecord, color: bool) -> String {
    format_compact_for(r, color, usize::MAX, "")
}

/// [`format_compact`] fitted to `width` columns: pod names shortened first,
/// then what follows the verdict on indented continuation lines. `node` is
/// put after the time (`--print-node-name`).
pub fn format_compact_for(r: &FlowRecord, color: bool, width: usize, node: &str) -> String {
    let local = r.time.with_timezone(&Local);
    let mut time = local.format("%b %d %H:%M:%S%.3f").to_string();
    let (full_src, full_dst) = ends(r);
    let (c, bold, reset) = if color {
        (verdict_colour(r.verdict), "\x1b[1m", "\x1b[0m")
    } else {
        ("", "", "")
    };
    let mut verdict = r.verdict.as_str().to_string();
    let policies = policy_text(r);
    // The reason leads what follows the verdict: when the line cannot fit,
    // it goes below with the policies rather than costing the names.
    let mut tail = reason_text(r)
        .map(|reason| format!(" ({reason})"))
        .unwrap_or_default();
    if !policies.is_empty() {
        tail.push_str(&format!(" denied by {policies}"));
    }
    if let Some(staged) = staged_text(r) {
        tail.push_str(&format!(" ({staged})"));
    }
    tail.push_str(&lifecycle_text(r));
    let proto = protocol_text(r);
    let head =
        |time: &str, src: &str, dst: &str| format!("{time}{node} {src} -> {dst} {proto} {verdict}");
    // Too wide: first the date goes (the time stays), then pod names are
    // shortened until the line fits or they are as short as is useful.
    if term::width(&head(&time, &full_src, &full_dst)) + term::width(&tail) > width {
        time = local.format("%H:%M:%S%.3f").to_string();
    }
    let fit = |room: usize| {
        let (mut src, mut dst) = (full_src.clone(), full_dst.clone());
        for max in [32, 26, 20, 16] {
            if term::width(&head(&time, &src, &dst)) <= room {
                break;
            }
            src = term::shorten_endpoint(&full_src, max);
            dst = shorten_destination(&full_dst, max);
        }
        (src, dst)
    };
    // One line if shortening gets it there; else the head alone fits and
    // the rest goes below, so names need not be cut as much.
    let (mut src, mut dst) = fit(width.saturating_sub(term::width(&tail)));
    if term::width(&head(&time, &src, &dst)) + term::width(&tail) > width {
        (src, dst) = fit(width);
    }
    let plain_head = head(&time, &src, &dst);
    verdict = format!("{c}{verdict}{reset}");
    let line = format!("{time}{node} {bold}{src}{reset} -> {bold}{dst}{reset} {proto} {verdict}");
    if term::width(&plain_head) + term::width(&tail) <= width || tail.is_empty() {
        return line + &tail;
    }
    // Still too wide: the policies and counts go on their own lines.
    let rest = term::wrap(&format!("    {}", tail.trim_start()), width);
    format!("{}\n{rest}", term::wrap(&line, width))
}

/// A destination `ns/pod:port (identity)` shortened around its pod name.
fn shorten_destination(dst: &str, max: usize) -> String {
    let (name, suffix) = match dst.find(':') {
        Some(i) if !dst.starts_with('[') => dst.split_at(i),
        _ => (dst, ""),
    };
    format!("{}{suffix}", term::shorten_endpoint(name, max))
}

/// Columns of the table: what each wants, and the least it is useful at.
const TABLE_WANT: [usize; 8] = [19, 30, 34, 12, 19, 22, 7, 40];
const TABLE_MIN: [usize; 8] = [12, 10, 12, 7, 7, 6, 7, 6];
const TABLE_RIGHT: [bool; 8] = [false, false, false, false, false, false, true, false];

/// The table's column widths for a terminal `width` columns wide.
pub fn table_widths(width: usize) -> Vec<usize> {
    term::fit_widths(&TABLE_WANT, &TABLE_MIN, width)
}

/// The table's header line.
pub fn table_header() -> String {
    table_header_for(&TABLE_WANT)
}

/// The header for these column widths.
pub fn table_header_for(widths: &[usize]) -> String {
    term::row(
        &[
            "TIME",
            "SOURCE",
            "DESTINATION",
            "PROTOCOL",
            "VERDICT",
            "REASON",
            "PACKETS",
            "POLICY",
        ],
        widths,
        &TABLE_RIGHT,
    )
}

/// One table row.
pub fn format_table_row(r: &FlowRecord) -> String {
    format_table_row_for(r, &TABLE_WANT)
}

/// One table row for these column widths.
pub fn format_table_row_for(r: &FlowRecord, widths: &[usize]) -> String {
    let local = r.time.with_timezone(&Local);
    let time = if widths[0] >= 19 {
        local.format("%b %d %H:%M:%S%.3f").to_string()
    } else {
        local.format("%H:%M:%S%.3f").to_string()
    };
    let (src, dst) = ends(r);
    let src = term::shorten_endpoint(&src, widths[1]);
    let dst = shorten_destination(&dst, widths[2]);
    let reason = reason_text(r).unwrap_or_default();
    let packets = r.packets.to_string();
    let policies = policy_text(r);
    // A full policy column would be truncated from the end; no policy
    // column at all would hide it: keep its width, cut with an ellipsis.
    term::row(
        &[
            &time,
            &src,
            &dst,
            &protocol_text(r),
            r.verdict.as_str(),
            &reason,
            &packets,
            &policies,
        ],
        widths,
        &TABLE_RIGHT,
    )
}

/// `-o dict`: one `KEY: value` block per flow, as hubble observe prints it.
pub fn format_dict(r: &FlowRecord, node: bool) -> String {
    let (src, dst) = ends(r);
    let mut rows: Vec<(&str, String)> = vec![(
        "TIMESTAMP",
        r.time.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
    )];
    if node {
        rows.push(("NODE", r.node_name.to_string()));
    }
    rows.push(("SOURCE", src));
    rows.push(("DESTINATION", dst));
    rows.push((
        "TYPE",
        if r.event_type.kind == 1 {
            "drop"
        } else {
            "trace"
        }
        .into(),
    ));
    rows.push(("VERDICT", r.verdict.as_str().into()));
    if let Some(reason) = reason_text(r) {
        rows.push(("DROP REASON", reason));
    }
    rows.push((
        "SUMMARY",
        format!("{} {}", protocol_text(r), lifecycle_text(r).trim())
            .trim()
            .to_string(),
    ));
    let policies = policy_text(r);
    if !policies.is_empty() {
        rows.push(("DENIED BY", policies));
    }
    if let Some(staged) = staged_text(r) {
        rows.push(("STAGED", staged));
    }
    let mut out = String::new();
    for (k, v) in rows {
        out.push_str(&format!("{k:>11}: {v}\n"));
    }
    out.push_str("------------\n");
    out
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
    fn a_permission_problem_is_named_with_who_may_read_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("netwatch.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let server = ServerAddr::Unix(sock.clone());
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let e = connect_error(&server, &denied).to_string();
        assert!(
            e.starts_with("permission denied on the agent's socket")
                && e.contains("group ")
                && e.contains("mode ")
                && !e.contains("Is netwatch-agent running"),
            "{e}"
        );
        let gone = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert!(
            connect_error(&server, &gone)
                .to_string()
                .contains("Is netwatch-agent running")
        );
        assert_eq!(account_name("/etc/passwd", 0), "root");
    }

    #[test]
    fn unknown_drop_reasons_are_refused_with_the_valid_ones() {
        if !std::path::Path::new(VMLINUX_BTF).exists() {
            return; // no kernel BTF: the agent judges reasons
        }
        let bad = FilterArgs {
            reason: vec!["BOGUS".into()],
            ..FilterArgs::default()
        };
        let e = bad.to_filter().unwrap_err().to_string();
        assert!(
            e.starts_with("--reason \"BOGUS\"")
                && e.contains("NETFILTER_DROP")
                && e.contains("TCP_RESET"),
            "{e}"
        );
        for good in ["netfilter_drop", "TCP_RESET", "SKB_DROP_REASON_IP_RPFILTER"] {
            let ok = FilterArgs {
                reason: vec![good.into()],
                ..FilterArgs::default()
            };
            assert!(ok.to_filter().is_ok(), "{good}");
        }
    }

    /// `netwatch observe ARGS` parsed as the binary does, `--not` included.
    fn observe_args(args: &[&str]) -> Result<ObserveArgs, clap::Error> {
        use clap::{CommandFactory, FromArgMatches, Parser};
        #[derive(Parser)]
        struct Cmd {
            #[command(flatten)]
            observe: ObserveArgs,
        }
        let m = Cmd::command()
            .try_get_matches_from(std::iter::once("observe").chain(args.iter().copied()))?;
        let mut a = Cmd::from_arg_matches(&m)?.observe;
        a.filters.negated = negated_terms(&m);
        Ok(a)
    }

    #[test]
    fn hubble_observe_flags_are_accepted_with_hubbles_meaning() {
        let a = observe_args(&[
            "--verdict",
            "DROPPED",
            "--not",
            "--to-port",
            "53",
            "--to-port",
            "8080",
        ])
        .unwrap();
        let set = a.filters.to_filter_set().unwrap();
        let dns = record(json!({"l4": {"UDP": {"source_port": 5353, "destination_port": 53}}}));
        let api = record(json!({}));
        assert!(!set.admits(&dns), "--not --to-port 53 leaves DNS out");
        assert!(set.admits(&api));
        let a = observe_args(&["--not", "--namespace=prod"]).unwrap();
        assert!(!a.filters.to_filter_set().unwrap().admits(&api));
        // --not with nothing after it is an error, not a silent no-op.
        let a = observe_args(&["--to-port", "53", "--not"]).unwrap();
        assert!(a.filters.to_filter_set().is_err());

        let a = observe_args(&[
            "-A",
            "--node-name",
            "node-*",
            "--type",
            "drop",
            "--drop-reason-desc",
            "POLICY_DENIED",
            "--first",
            "5",
            "--until",
            "2026-11-22T03:00:00Z",
            "--print-node-name",
            "-o",
            "jsonpb",
        ])
        .unwrap();
        assert_eq!(
            (a.first, a.output, a.print_node_name),
            (Some(5), ObserveOutput::Jsonpb, true)
        );
        let set = a.filters.to_filter_set().unwrap();
        assert!(
            set.admits(&api),
            "node-1, a drop, NETFILTER_DROP is POLICY_DENIED"
        );
        assert!(!set.admits(&record(json!({"node_name": "other"}))));
        assert!(!set.admits(&record(
            json!({"verdict": "TIMED_OUT", "drop_reason_desc": null,
            "event_type": {"type": 4, "sub_type": 0}})
        )));
        assert!(observe_args(&["-o", "dict"]).is_ok());
        assert!(
            observe_args(&["-A", "-n", "prod"]).is_err(),
            "-A conflicts with -n"
        );
        assert!(observe_args(&["--first", "3", "-f"]).is_err());

        let e = observe_args(&["--type", "l7"])
            .unwrap()
            .filters
            .to_filter()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("netwatch has no l7 events") && e.contains("drop, trace"),
            "{e}"
        );
        let e = observe_args(&["--drop-reason-desc", "NETFILTER_DROP"])
            .unwrap()
            .filters
            .to_filter()
            .unwrap_err()
            .to_string();
        assert!(e.contains("POLICY_DENIED") && e.contains("--reason"), "{e}");
    }

    #[test]
    fn every_output_fits_an_80_column_terminal() {
        let long = record(json!({
            "source": {"pod_name": "payments-processor-7f9c4c8d9b-q8z2m", "namespace": "payments"},
            "destination": {"pod_name": "ledger-writer-5d4e8f7a6b-h7t3c", "namespace": "payments"},
            "lifecycle": "UPDATE", "packets": 120,
            "egress_denied_by": [{"name": "default-deny-all-traffic", "namespace": "payments", "kind": "NetworkPolicy"}],
            "ingress_denied_by": [{"name": "default-deny-all-traffic", "namespace": "payments", "kind": "NetworkPolicy"}]
        }));
        let compact = format_compact_for(&long, false, 80, "");
        assert!(compact.lines().all(|l| term::width(l) <= 80), "{compact}");
        let joined = compact.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            joined.contains("DROPPED (NETFILTER_DROP) denied by payments/default-deny-all-traffic [egress+ingress]"),
            "nothing is lost, the policy named once: {compact}"
        );
        assert!(
            compact.contains("q8z2m") && compact.contains("h7t3c"),
            "the replicas stay told apart: {compact}"
        );
        let widths = table_widths(80);
        for line in [
            table_header_for(&widths),
            format_table_row_for(&long, &widths),
        ] {
            assert!(term::width(&line) <= 80, "{line}");
        }
        let mut paths = FailingPaths::new(80, false, true);
        let first = paths.add(&long);
        assert!(
            first.ends_with(" [1 flow, 120 packets]\n") && term::width(first.trim_end()) <= 80,
            "{first}"
        );
        let mut retry = long.clone();
        retry.uuid = "u-2".into();
        retry.packets = 3;
        let redraw = paths.add(&retry);
        assert!(
            redraw.starts_with("\x1b[1A\r") && redraw.contains("[2 flows, 123 packets]"),
            "{redraw:?}"
        );
        assert_eq!(paths.lines.len(), 1, "one line per failing path");
        let mut piped = FailingPaths::new(80, false, false);
        piped.add(&long);
        assert_eq!(
            piped.add(&retry),
            "",
            "not a terminal: the path was already shown"
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
