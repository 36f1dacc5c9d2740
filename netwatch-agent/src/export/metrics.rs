//! Prometheus metrics: what the agent counts, and the `/metrics`,
//! `/healthz` and `/readyz` endpoints.
//!
//! Counters stay exact although a flow is reported several times (NEW,
//! UPDATE, FINAL records of one `uuid`): a flow is counted once, on its
//! first record, and packets and bytes are counted as the increase between
//! records of the same flow.
//!
//! The context labels (`source_*`, `destination_*`) are configurable, as
//! Hubble's `sourceContext` / `destinationContext` are. A cap bounds the
//! number of context series: past it, new label sets are folded into one
//! series whose context labels are `_other` (totals stay exact) and counted
//! in `netwatch_metrics_series_overflow_total`. Series naming a deleted pod
//! are removed after a grace period, as Hubble does, and so are series one
//! end of which only deleted pods gave.

use std::{
    borrow::Cow,
    collections::{HashMap, HashSet},
    convert::Infallible,
    hash::{Hash, Hasher},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes};
use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use super::KernelStats;
use crate::{
    flow::record::{FlowRecord, L4, Lifecycle, Verdict},
    identity::Endpoint,
    record::{PolicyKind, Tier, shared::SharedStr},
};

/// Errors configuring or serving metrics.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(
        "{flag}: unknown context {value:?}; valid: namespace, workload, pod, app, port (comma-separated), or none"
    )]
    UnknownContext { flag: &'static str, value: String },
    #[error(
        "{flag}: `port` is only valid in --metrics-destination-context (source ports are ephemeral)"
    )]
    SourcePort { flag: &'static str },
    #[error("{flag}: {value:?} is listed twice")]
    DuplicateContext { flag: &'static str, value: String },
    #[error(
        "--metrics-addr {value:?}: {reason}; expected HOST:PORT, :PORT or none (e.g. 0.0.0.0:9965, :9965, 127.0.0.1:0)"
    )]
    BadAddr { value: String, reason: String },
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("registering metric: {0}")]
    Register(#[from] prometheus::Error),
}

/// One dimension of a flow end that can become a label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ContextLabel {
    /// The pod's namespace.
    Namespace,
    /// The first owning workload's name (e.g. the Deployment), else the
    /// reserved identity (`world`, `host`, ...).
    Workload,
    /// The pod's name (high cardinality: series of deleted pods are removed
    /// after the grace period).
    Pod,
    /// The `app` (or `app.kubernetes.io/name`) label.
    App,
    /// The destination port (destination context only).
    Port,
}

impl ContextLabel {
    fn name(self) -> &'static str {
        match self {
            ContextLabel::Namespace => "namespace",
            ContextLabel::Workload => "workload",
            ContextLabel::Pod => "pod",
            ContextLabel::App => "app",
            ContextLabel::Port => "port",
        }
    }

    /// Parse a context list: `namespace,workload,port`, or `none`. Hubble's
    /// `|` separator is accepted too; each dimension becomes its own label.
    pub fn parse_list(
        flag: &'static str,
        s: &str,
        destination: bool,
    ) -> Result<Vec<ContextLabel>, MetricsError> {
        let s = s.trim();
        if s.is_empty() || s == "none" {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for item in s.split([',', '|']).map(str::trim) {
            let c = match item.to_ascii_lowercase().as_str() {
                "namespace" => ContextLabel::Namespace,
                "workload" | "workload-name" => ContextLabel::Workload,
                "pod" | "pod-name" => ContextLabel::Pod,
                "app" => ContextLabel::App,
                "port" => ContextLabel::Port,
                _ => {
                    return Err(MetricsError::UnknownContext {
                        flag,
                        value: item.to_string(),
                    });
                }
            };
            if c == ContextLabel::Port && !destination {
                return Err(MetricsError::SourcePort { flag });
            }
            if out.contains(&c) {
                return Err(MetricsError::DuplicateContext {
                    flag,
                    value: item.to_string(),
                });
            }
            out.push(c);
        }
        Ok(out)
    }

    /// The label value for one end, borrowed from the record (`port` is
    /// the end's port already written out).
    fn value<'a>(self, ep: &'a Endpoint, port: &'a str) -> &'a str {
        match self {
            ContextLabel::Namespace => ep.namespace.as_str(),
            ContextLabel::Workload => match ep.workloads.first() {
                Some(w) => w.name.as_str(),
                None => ep.reserved_identity().map(|r| r.name()).unwrap_or_default(),
            },
            ContextLabel::Pod => ep.pod_name.as_str(),
            ContextLabel::App => ep
                .labels
                .iter()
                .find_map(|l| {
                    l.strip_prefix("k8s:app=")
                        .or_else(|| l.strip_prefix("k8s:app.kubernetes.io/name="))
                })
                .unwrap_or_default(),
            ContextLabel::Port => port,
        }
    }
}

/// A port as label text, without allocating (`""` when there is none).
struct PortText {
    buf: [u8; 5],
    len: usize,
}

impl PortText {
    fn new(port: Option<u16>) -> PortText {
        let mut buf = [0u8; 5];
        let mut len = 0;
        if let Some(mut p) = port {
            let mut digits = [0u8; 5];
            loop {
                digits[len] = b'0' + (p % 10) as u8;
                len += 1;
                p /= 10;
                if p == 0 {
                    break;
                }
            }
            for i in 0..len {
                buf[i] = digits[len - 1 - i];
            }
        }
        PortText { buf, len }
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

/// Parse `--metrics-addr`: `HOST:PORT`, `:PORT` (all addresses) or `none`.
pub fn parse_metrics_addr(s: &str) -> Result<Option<SocketAddr>, MetricsError> {
    let s = s.trim();
    if s == "none" || s.is_empty() {
        return Ok(None);
    }
    let full = if s.starts_with(':') {
        format!("0.0.0.0{s}")
    } else {
        s.to_string()
    };
    full.parse::<SocketAddr>()
        .map(Some)
        .map_err(|e| MetricsError::BadAddr {
            value: s.to_string(),
            reason: e.to_string(),
        })
}

/// How metrics are labelled and bounded.
#[derive(Clone, Debug)]
pub struct MetricsConfig {
    pub source_context: Vec<ContextLabel>,
    pub destination_context: Vec<ContextLabel>,
    /// At most this many context series (label sets) across the flow metrics.
    pub max_series: usize,
    /// Series naming a deleted pod are removed this long after it goes.
    pub deleted_pod_grace: Duration,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            source_context: vec![ContextLabel::Namespace, ContextLabel::Workload],
            destination_context: vec![
                ContextLabel::Namespace,
                ContextLabel::Workload,
                ContextLabel::Port,
            ],
            max_series: 10_000,
            deleted_pod_grace: Duration::from_secs(60),
        }
    }
}

/// The label value of context series refused by the cardinality cap.
pub const OVERFLOW_LABEL: &str = "_other";

/// The flow metrics that carry context labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum FlowMetric {
    Drops,
    DropBytes,
    DeniedFlows,
    DnsFailures,
}

/// Everything the agent exports to Prometheus, and the bookkeeping that
/// keeps counters exact and bounded.
pub struct MetricsRegistry {
    registry: Registry,
    config: MetricsConfig,
    context_names: Vec<String>,
    drops: IntCounterVec,
    drop_bytes: IntCounterVec,
    denied_flows: IntCounterVec,
    policy_denials: IntCounterVec,
    dns_failures: IntCounterVec,
    lost_events: IntCounterVec,
    unenriched: IntCounter,
    attached: IntGauge,
    ready_gauge: IntGauge,
    /// 1 for each API kind whose view is not current.
    identity_stale: IntGaugeVec,
    /// 1 for each API kind the API server forbids.
    api_forbidden: IntGaugeVec,
    hook_info: IntGaugeVec,
    evicted_flows: IntCounter,
    /// Entries of the kernel's drop aggregate being reported.
    aggregate_entries: IntGauge,
    tracked_flows: IntGauge,
    /// New drops whose ring buffer event did not fit (reported from the table).
    deferred_drop_events: IntCounter,
    series_overflow: IntCounter,
    /// Records the observe API could not deliver to a slow client.
    pub observer_dropped: IntCounter,
    /// Clients following the observe API.
    pub observer_clients: IntGauge,
    /// Flow log counters.
    pub flow_log: super::flowlog::FlowLogCounters,
    /// Kubernetes Events by outcome.
    pub kube_events: IntCounterVec,
    /// Per-flow state, by uuid, until its FINAL record.
    flows: FastMap<FlowId, FlowState>,
    /// Context series in use, with the pods they name and their counter (so
    /// a record finds its counter without formatting labels).
    series: FastMap<SeriesKey, Series>,
    /// `netwatch_policy_denials_total` series by (ingress, policy): their
    /// number (what flows remember having counted) and counter.
    policy_series: FastMap<PolicyKey, (u32, IntCounter)>,
    context_series: usize,
    /// Deleted pods whose series go at the deadline.
    pending_removals: Vec<(Instant, String, String)>,
    /// Pods of the last cluster snapshot (to see deletions).
    known_pods: Option<HashSet<(String, String)>>,
    last_losses: HashMap<&'static str, u64>,
    last_undecodable: u64,
    last_evicted: u64,
    last_deferred: u64,
    /// Shared with the HTTP endpoints.
    pub health: Arc<Health>,
}

impl MetricsRegistry {
    /// Which capture hooks run, in which mode: `netwatch_hook_info` and
    /// `/readyz`.
    pub fn capture_hooks(&self, hooks: &crate::capture::hooks::HookReport) {
        self.hook_info.reset();
        for s in hooks.states() {
            self.hook_info.with_label_values(&[s.hook, s.mode]).set(1);
        }
        self.health.set_partial(hooks.partial());
    }
}

/// hashbrown's map: its hasher is faster than SipHash for these
/// process-local keys, and it looks keys up by borrowed equivalents.
type FastMap<K, V> = hashbrown::HashMap<K, V>;

/// A context series: its metric and every label value, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SeriesKey {
    metric: FlowMetric,
    values: Vec<String>,
}

impl Hash for SeriesKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        hash_series(self.metric, self.values.iter().map(String::as_str), h);
    }
}

/// A [`SeriesKey`] borrowed from a record, to find a series without
/// allocating.
struct SeriesQuery<'a> {
    metric: FlowMetric,
    first: &'a [&'a str],
    ctx: &'a [&'a str],
}

impl<'a> SeriesQuery<'a> {
    fn values(&self) -> impl Iterator<Item = &'a str> + use<'a> {
        self.first.iter().chain(self.ctx).copied()
    }
}

impl Hash for SeriesQuery<'_> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        hash_series(self.metric, self.values(), h);
    }
}

impl hashbrown::Equivalent<SeriesKey> for SeriesQuery<'_> {
    fn equivalent(&self, key: &SeriesKey) -> bool {
        key.metric == self.metric
            && key.values.len() == self.first.len() + self.ctx.len()
            && key.values.iter().zip(self.values()).all(|(k, v)| k == v)
    }
}

fn hash_series<'a, H: Hasher>(
    metric: FlowMetric,
    values: impl Iterator<Item = &'a str>,
    h: &mut H,
) {
    metric.hash(h);
    for v in values {
        v.hash(h);
    }
}

/// A context series in use.
#[derive(Debug)]
struct Series {
    pods: SeriesPods,
    counter: IntCounter,
}

/// A pod as (namespace, name), borrowed; hashes as the owned pair does.
#[derive(Hash)]
struct PodRef<'a>(&'a str, &'a str);

impl hashbrown::Equivalent<(String, String)> for PodRef<'_> {
    fn equivalent(&self, key: &(String, String)) -> bool {
        key.0 == self.0 && key.1 == self.1
    }
}

/// A denying policy and the side it isolates (ingress?), without its rule.
type PolicyKey = (bool, PolicyKind, Tier, Option<String>, String);

/// A [`PolicyKey`] borrowed from a record; hashes as the owned key does.
#[derive(Hash)]
struct PolicyQuery<'a>(bool, PolicyKind, Tier, Option<&'a str>, &'a str);

impl hashbrown::Equivalent<PolicyKey> for PolicyQuery<'_> {
    fn equivalent(&self, key: &PolicyKey) -> bool {
        key.0 == self.0
            && key.1 == self.1
            && key.2 == self.2
            && key.3.as_deref() == self.3
            && key.4 == self.4
    }
}

/// At most this many context labels: five per end, no source port.
const MAX_CONTEXT: usize = 9;

/// What a record gives its context series, borrowed from it.
struct Context<'a> {
    values: [&'a str; MAX_CONTEXT],
    len: usize,
    /// Per end (source, destination) with context labels: its pod.
    referrers: [Option<(&'a str, &'a str)>; 2],
    /// Per end whose `pod` label names a pod: that pod.
    named: [Option<(&'a str, &'a str)>; 2],
}

impl<'a> Context<'a> {
    fn values(&self) -> &[&'a str] {
        &self.values[..self.len]
    }

    /// The pods a new series is tied to.
    fn pods(&self) -> SeriesPods {
        let owned = |p: Option<(&str, &str)>| p.map(|(ns, pod)| (ns.to_string(), pod.to_string()));
        SeriesPods {
            source: owned(self.named[0]),
            destination: owned(self.named[1]),
            referrers: self.referrers.map(|p| owned(p).into_iter().collect()),
        }
    }
}

/// The pods a context series is tied to.
#[derive(Clone, Debug, Default)]
struct SeriesPods {
    /// The pods its labels name (`pod` context): it goes when either does.
    source: Option<(String, String)>,
    destination: Option<(String, String)>,
    /// The pods at the source and at the destination of the flows counted
    /// into it (for an end with context labels): it goes when every pod of
    /// one end is deleted, as no pod is left to give that end's labels.
    /// Without this, series of labels no pod is named by (a Job's workload,
    /// a port only a deleted pod was denied on) outlived their pods and
    /// piled up to the cap.
    referrers: [hashbrown::HashSet<(String, String)>; 2],
}

/// A flow's uuid as the key of its state: the 16 bytes of a hyphenated
/// UUID (what the assembler writes; read case-insensitively), else the text.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum FlowId {
    Uuid(u128),
    Text(String),
}

impl FlowId {
    fn of(uuid: &str) -> FlowId {
        match uuid::Uuid::try_parse(uuid) {
            Ok(u) if uuid.len() == 36 => FlowId::Uuid(u.as_u128()),
            _ => FlowId::Text(uuid.to_string()),
        }
    }
}

#[derive(Debug, Default)]
struct FlowState {
    packets: u64,
    bytes: u64,
    /// The drop counters this flow counts into.
    drop_series: Option<DropSeries>,
    /// Denying policies already counted (their number in `policy_series`).
    counted_policies: Vec<u32>,
    unenriched_counted: bool,
}

/// A flow's drop counters, and what they were chosen by.
#[derive(Debug)]
struct DropSeries {
    reason: Option<SharedStr>,
    identities: (u32, u32),
    pods: (SharedStr, SharedStr),
    packets: IntCounter,
    bytes: IntCounter,
}

impl DropSeries {
    fn new(r: &FlowRecord, packets: IntCounter, bytes: IntCounter) -> DropSeries {
        DropSeries {
            reason: r.drop_reason_desc.clone(),
            identities: (r.source.identity, r.destination.identity),
            pods: (r.source.pod_name.clone(), r.destination.pod_name.clone()),
            packets,
            bytes,
        }
    }

    /// Whether `r` would still be labelled the same.
    fn still_labels(&self, r: &FlowRecord) -> bool {
        self.reason == r.drop_reason_desc
            && self.identities == (r.source.identity, r.destination.identity)
            && self.pods.0 == r.source.pod_name
            && self.pods.1 == r.destination.pod_name
    }
}

/// Flows tracked for exact deltas at most; the assembler tracks 65,536.
const MAX_TRACKED_FLOWS: usize = 262_144;

/// Liveness and readiness, shared with the HTTP server.
#[derive(Debug)]
pub struct Health {
    capturing: AtomicBool,
    /// What capture is missing (hooks off on this kernel), when anything.
    partial: std::sync::Mutex<Option<String>>,
    enrichment_ready: AtomicBool,
    /// Which API kinds are not current, and why (`None`: all are).
    identity_stale: std::sync::Mutex<Option<String>>,
    /// Last main-loop tick, seconds since the epoch.
    last_tick: AtomicU64,
    /// The main loop is considered stuck after this long without a tick.
    pub stall_after: Duration,
}

impl Health {
    fn new() -> Health {
        Health {
            capturing: AtomicBool::new(false),
            partial: std::sync::Mutex::new(None),
            enrichment_ready: AtomicBool::new(false),
            identity_stale: std::sync::Mutex::new(None),
            last_tick: AtomicU64::new(now_secs()),
            stall_after: Duration::from_secs(30),
        }
    }

    /// Ready: capturing, identity synced when the agent waits for it, and
    /// every API kind current (not stale, not forbidden).
    pub fn ready(&self) -> bool {
        self.capturing.load(Ordering::Relaxed)
            && self.enrichment_ready.load(Ordering::Relaxed)
            && self.identity_stale().is_none()
    }

    /// Say which API kinds are not current; `/readyz` is not ready while
    /// any is, and names them.
    pub fn set_identity_stale(&self, why: Option<String>) {
        if let Ok(mut s) = self.identity_stale.lock() {
            *s = why;
        }
    }

    fn identity_stale(&self) -> Option<String> {
        self.identity_stale.lock().ok().and_then(|s| s.clone())
    }

    pub fn set_capturing(&self, v: bool) {
        self.capturing.store(v, Ordering::Relaxed);
    }

    /// Say what capture is missing; `/readyz` repeats it.
    pub fn set_partial(&self, why: Option<String>) {
        if let Ok(mut p) = self.partial.lock() {
            *p = why;
        }
    }

    fn partial(&self) -> Option<String> {
        self.partial.lock().ok().and_then(|p| p.clone())
    }

    pub fn set_enrichment_ready(&self, v: bool) {
        self.enrichment_ready.store(v, Ordering::Relaxed);
    }

    fn tick(&self) {
        self.last_tick.store(now_secs(), Ordering::Relaxed);
    }

    /// Seconds since the main loop last ticked.
    pub fn since_tick(&self) -> u64 {
        now_secs().saturating_sub(self.last_tick.load(Ordering::Relaxed))
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `TCP`, `UDP`, ... as a label, allocating only for unparsed protocols.
fn protocol_label(l4: &L4) -> Cow<'static, str> {
    match l4 {
        L4::Tcp(_) => "TCP".into(),
        L4::Udp(_) => "UDP".into(),
        L4::Sctp(_) => "SCTP".into(),
        L4::Icmpv4(_) => "ICMPv4".into(),
        L4::Icmpv6(_) => "ICMPv6".into(),
        L4::Other { .. } => l4.protocol_name().into(),
    }
}

fn direction_label(r: &FlowRecord) -> &'static str {
    if r.traffic_direction.eq_ignore_ascii_case("ingress") {
        "ingress"
    } else if r.traffic_direction.eq_ignore_ascii_case("egress") {
        "egress"
    } else {
        "unknown"
    }
}

impl MetricsRegistry {
    /// Register every metric.
    pub fn new(config: MetricsConfig) -> Result<MetricsRegistry, MetricsError> {
        let registry = Registry::new();
        let mut context_names: Vec<String> = config
            .source_context
            .iter()
            .map(|c| format!("source_{}", c.name()))
            .collect();
        context_names.extend(
            config
                .destination_context
                .iter()
                .map(|c| format!("destination_{}", c.name())),
        );
        let ctx: Vec<&str> = context_names.iter().map(String::as_str).collect();
        let with_ctx = |first: &[&'static str]| -> Vec<&str> {
            first.iter().copied().chain(ctx.iter().copied()).collect()
        };

        let counter_vec =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, MetricsError> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let counter = |name: &str, help: &str| -> Result<IntCounter, MetricsError> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str| -> Result<IntGauge, MetricsError> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };

        let drops = counter_vec(
            "netwatch_drops_total",
            "Packets of denied flows the node dropped, by kernel drop reason.",
            &with_ctx(&["reason", "protocol", "direction"]),
        )?;
        let drop_bytes = counter_vec(
            "netwatch_drop_bytes_total",
            "Bytes (IP length) of the packets counted in netwatch_drops_total.",
            &with_ctx(&["reason", "protocol", "direction"]),
        )?;
        let denied_flows = counter_vec(
            "netwatch_denied_flows_total",
            "Distinct denied flows, by verdict (DROPPED, TIMED_OUT, REFUSED, POLICY_NOT_ENFORCED).",
            &with_ctx(&["verdict", "protocol"]),
        )?;
        let policy_denials = counter_vec(
            "netwatch_policy_denials_total",
            "Denied flows attributed to a policy, by the denying policy (its kind, namespace if any, and name) and the side it isolates.",
            &["direction", "policy_kind", "policy_namespace", "policy"],
        )?;
        let dns_failures = counter_vec(
            "netwatch_dns_failures_total",
            "DNS queries (port 53) dropped, unanswered or refused, counted once per flow.",
            &with_ctx(&["verdict"]),
        )?;
        let lost_events = counter_vec(
            "netwatch_lost_events_total",
            "Events the agent could not deliver or track, by where they were lost.",
            &["source"],
        )?;
        let unenriched = counter(
            "netwatch_unenriched_flows_total",
            "Flows reported before identity (pod, namespace) could be resolved.",
        )?;
        let attached = gauge(
            "netwatch_attached_interfaces",
            "Pod interfaces with the agent's TC classifiers attached.",
        )?;
        let ready_gauge = gauge(
            "netwatch_ready",
            "1 when the agent is capturing and, if configured, identity is synced.",
        )?;
        let identity_stale = IntGaugeVec::new(
            Opts::new(
                "netwatch_identity_stale",
                "1 for each Kubernetes kind whose view is not current (not listed yet, its watch failing, or forbidden): flows are named from the last known state.",
            ),
            &["kind"],
        )?;
        registry.register(Box::new(identity_stale.clone()))?;
        let api_forbidden = IntGaugeVec::new(
            Opts::new(
                "netwatch_api_forbidden",
                "1 for each Kubernetes kind the API server forbids the agent to list or watch (RBAC).",
            ),
            &["kind"],
        )?;
        registry.register(Box::new(api_forbidden.clone()))?;
        let evicted_flows = counter(
            "netwatch_evicted_flows_total",
            "Flows finalised early because the agent's flow table was full.",
        )?;
        let aggregate_entries = gauge(
            "netwatch_drop_aggregate_entries",
            "Entries of the kernel's drop aggregate: (source, destination, port, protocol, reason) summaries of new dropped flows that found the per-flow drop table full (a flood). Each is reported as a record with `aggregate.flows`.",
        )?;
        let tracked_flows = gauge(
            "netwatch_tracked_flows",
            "Flows the agent tracks now (each until its final record). Bounded by --max-flows: at the bound the quietest flows are finalised early (netwatch_evicted_flows_total).",
        )?;
        let deferred_drop_events = counter(
            "netwatch_deferred_drop_events_total",
            "New drops whose ring buffer event did not fit; not lost: the drop table's scan reports them moments later.",
        )?;
        let series_overflow = counter(
            "netwatch_metrics_series_overflow_total",
            "Observations folded into the `_other` context series because --metrics-max-series was reached.",
        )?;
        let observer_dropped = counter(
            "netwatch_observer_dropped_records_total",
            "Records not delivered to an observe client that did not keep up.",
        )?;
        let observer_clients = gauge(
            "netwatch_observer_clients",
            "Clients following flows over the observe API.",
        )?;
        let flow_log = super::flowlog::FlowLogCounters {
            written: counter(
                "netwatch_flow_log_records_total",
                "Records written to the flow log.",
            )?,
            dropped: counter(
                "netwatch_flow_log_dropped_records_total",
                "Records lost by the flow log: its writer was behind (slow or full disk) or a write failed.",
            )?,
            write_errors: counter(
                "netwatch_flow_log_write_errors_total",
                "Failed writes to the flow log.",
            )?,
            filtered: counter(
                "netwatch_flow_log_filtered_records_total",
                "Records the flow log's allow/deny filters kept out.",
            )?,
        };
        let kube_events = counter_vec(
            "netwatch_kubernetes_events_total",
            "PacketDrop Kubernetes Events by outcome: posted, rate_limited, dropped (queue full), failed (API error).",
            &["result"],
        )?;
        let hook_info = IntGaugeVec::new(
            Opts::new(
                "netwatch_hook_info",
                "Always 1: which capture hooks run and in which mode (off when a hook could not run on this kernel; the agent's log says why).",
            ),
            &["hook", "mode"],
        )?;
        registry.register(Box::new(hook_info.clone()))?;
        let build_info = IntGaugeVec::new(
            Opts::new(
                "netwatch_build_info",
                "Always 1; labels say which netwatch and which kernel.",
            ),
            &["version", "kernel"],
        )?;
        registry.register(Box::new(build_info.clone()))?;
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), &kernel])
            .set(1);
        for (source, _) in crate::capture::tables::Losses::default().by_source() {
            lost_events.with_label_values(&[source]).reset();
        }
        lost_events
            .with_label_values(&["undecodable_events"])
            .reset();
        for result in ["posted", "rate_limited", "dropped", "failed"] {
            kube_events.with_label_values(&[result]).reset();
        }

        Ok(MetricsRegistry {
            registry,
            config,
            context_names,
            drops,
            drop_bytes,
            denied_flows,
            policy_denials,
            dns_failures,
            lost_events,
            unenriched,
            hook_info,
            attached,
            ready_gauge,
            identity_stale,
            api_forbidden,
            evicted_flows,
            aggregate_entries,
            tracked_flows,
            deferred_drop_events,
            series_overflow,
            observer_dropped,
            observer_clients,
            flow_log,
            kube_events,
            flows: FastMap::new(),
            series: FastMap::new(),
            policy_series: FastMap::new(),
            context_series: 0,
            pending_removals: Vec::new(),
            known_pods: None,
            last_losses: HashMap::new(),
            last_undecodable: 0,
            last_evicted: 0,
            last_deferred: 0,
            health: Arc::new(Health::new()),
        })
    }

    /// The API source's kinds: the stale and forbidden gauges, and what
    /// `/readyz` says is stale.
    pub fn api_status(&self, status: &crate::identity::ApiStatus) {
        use crate::identity::KindState;
        for (kind, state) in status {
            self.identity_stale
                .with_label_values(&[kind.as_str()])
                .set(i64::from(!state.is_current()));
            self.api_forbidden
                .with_label_values(&[kind.as_str()])
                .set(i64::from(matches!(state, KindState::Forbidden { .. })));
        }
        self.health
            .set_identity_stale(crate::identity::kube::describe_stale(status));
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.ready_gauge.set(i64::from(self.health.ready()));
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// The registry, to serve or to gather from.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Names of the context labels, in order.
    pub fn context_label_names(&self) -> &[String] {
        &self.context_names
    }

    /// A record's context label values and pods, borrowed from it; `ports`
    /// are its source and destination ports as text.
    fn context<'a>(&self, r: &'a FlowRecord, ports: &'a [PortText; 2]) -> Context<'a> {
        let mut ctx = Context {
            values: [""; MAX_CONTEXT],
            len: 0,
            referrers: [None; 2],
            named: [None; 2],
        };
        let ends = [
            (&self.config.source_context, &r.source, ports[0].as_str()),
            (
                &self.config.destination_context,
                &r.destination,
                ports[1].as_str(),
            ),
        ];
        for (end, (contexts, ep, port)) in ends.into_iter().enumerate() {
            for c in contexts.iter().take(MAX_CONTEXT - ctx.len) {
                ctx.values[ctx.len] = c.value(ep, port);
                ctx.len += 1;
            }
            let pod = (!ep.pod_name.is_empty()).then(|| (&*ep.namespace, &*ep.pod_name));
            if !contexts.is_empty() {
                ctx.referrers[end] = pod;
            }
            if contexts.contains(&ContextLabel::Pod) {
                ctx.named[end] = pod;
            }
        }
        ctx
    }

    fn family(&self, metric: FlowMetric) -> &IntCounterVec {
        match metric {
            FlowMetric::Drops => &self.drops,
            FlowMetric::DropBytes => &self.drop_bytes,
            FlowMetric::DeniedFlows => &self.denied_flows,
            FlowMetric::DnsFailures => &self.dns_failures,
        }
    }

    /// The counter of `metric` with `first` labels and the context, folded
    /// into `_other` when the cap refuses a new series. A known series is
    /// found without allocating; it learns the record's pods as referrers.
    fn counter(&mut self, metric: FlowMetric, first: &[&str], ctx: &Context) -> IntCounter {
        let values = ctx.values();
        if values.is_empty() {
            return self.family(metric).with_label_values(first);
        }
        let query = SeriesQuery {
            metric,
            first,
            ctx: values,
        };
        if let Some(known) = self.series.get_mut(&query) {
            for (set, p) in known.pods.referrers.iter_mut().zip(ctx.referrers) {
                if let Some((ns, pod)) = p
                    && !set.contains(&PodRef(ns, pod))
                {
                    set.insert((ns.to_string(), pod.to_string()));
                }
            }
            return known.counter.clone();
        }
        if self.context_series >= self.config.max_series {
            self.series_overflow.inc();
            let mut l = first.to_vec();
            l.extend(std::iter::repeat_n(OVERFLOW_LABEL, values.len()));
            return self.family(metric).with_label_values(&l);
        }
        self.context_series += 1;
        let key = SeriesKey {
            metric,
            values: query.values().map(str::to_string).collect(),
        };
        let counter = self.family(metric).with_label_values(&key.values);
        self.series.insert(
            key,
            Series {
                pods: ctx.pods(),
                counter: counter.clone(),
            },
        );
        counter
    }

    /// The `netwatch_policy_denials_total` counter of a denying policy on
    /// one side, and its number.
    fn policy_counter(&mut self, ingress: bool, p: &crate::record::PolicyRef) -> (u32, IntCounter) {
        let query = PolicyQuery(ingress, p.kind, p.tier, p.namespace.as_deref(), &p.name);
        if let Some((n, c)) = self.policy_series.get(&query) {
            return (*n, c.clone());
        }
        let direction = if ingress { "ingress" } else { "egress" };
        let counter = self.policy_denials.with_label_values(&[
            direction,
            p.kind.as_str(),
            p.namespace_or_empty(),
            &p.name,
        ]);
        let n = self.policy_series.len() as u32;
        self.policy_series.insert(
            (ingress, p.kind, p.tier, p.namespace.clone(), p.name.clone()),
            (n, counter.clone()),
        );
        (n, counter)
    }

    /// Count one flow record.
    pub fn observe(&mut self, r: &FlowRecord) {
        // The flow's state is taken out while it is updated and put back
        // unless this is its last record.
        let id = FlowId::of(&r.uuid);
        let known = self.flows.get_mut(&id).map(std::mem::take);
        let first_record = known.is_none();
        if first_record && self.flows.len() >= MAX_TRACKED_FLOWS {
            // Should not happen (the assembler holds fewer flows); forget the
            // oldest knowledge rather than grow: counts of those flows'
            // later records may then be counted again.
            self.flows.clear();
        }
        let mut state = known.unwrap_or_default();
        let d_packets = r.packets.saturating_sub(state.packets);
        let d_bytes = r.bytes.saturating_sub(state.bytes);
        state.packets = state.packets.max(r.packets);
        state.bytes = state.bytes.max(r.bytes);

        let ports = match r.l4.ports() {
            Some(p) => [
                PortText::new(Some(p.source_port)),
                PortText::new(Some(p.destination_port)),
            ],
            None => [PortText::new(None), PortText::new(None)],
        };
        let mut ctx: Option<Context> = None;
        if r.verdict == Verdict::Dropped && (d_packets > 0 || d_bytes > 0) {
            // Later records of a flow reuse its series unless what labels
            // them changed (identity arrived late, another drop reason).
            if !state
                .drop_series
                .as_ref()
                .is_some_and(|d| d.still_labels(r))
            {
                let c = &*ctx.get_or_insert_with(|| self.context(r, &ports));
                let protocol = protocol_label(&r.l4);
                let first = [
                    r.drop_reason_desc.as_deref().unwrap_or("UNKNOWN"),
                    &protocol,
                    direction_label(r),
                ];
                let packets = self.counter(FlowMetric::Drops, &first, c);
                let bytes = self.counter(FlowMetric::DropBytes, &first, c);
                state.drop_series = Some(DropSeries::new(r, packets, bytes));
            }
            if let Some(d) = &state.drop_series {
                d.packets.inc_by(d_packets);
                d.bytes.inc_by(d_bytes);
            }
        }
        if first_record {
            let c = &*ctx.get_or_insert_with(|| self.context(r, &ports));
            let protocol = protocol_label(&r.l4);
            self.counter(FlowMetric::DeniedFlows, &[r.verdict.as_str(), &protocol], c)
                .inc();
            if r.is_dns {
                self.counter(FlowMetric::DnsFailures, &[r.verdict.as_str()], c)
                    .inc();
            }
        }
        let denied_by = r
            .egress_denied_by
            .iter()
            .map(|p| (false, p))
            .chain(r.ingress_denied_by.iter().map(|p| (true, p)));
        for (ingress, p) in denied_by {
            // One count per policy and side, whichever of its rules decided.
            let (n, counter) = self.policy_counter(ingress, p);
            if !state.counted_policies.contains(&n) {
                counter.inc();
                state.counted_policies.push(n);
            }
        }
        if r.unenriched && !state.unenriched_counted {
            state.unenriched_counted = true;
            self.unenriched.inc();
        }
        if r.lifecycle == Lifecycle::Final {
            self.flows.remove(&id);
        } else if let Some(slot) = self.flows.get_mut(&id) {
            *slot = state;
        } else {
            self.flows.insert(id, state);
        }
    }

    /// The kernel side's counters (cumulative), every tick; also runs the
    /// removal of deleted pods' series that are due.
    pub fn kernel_stats(&mut self, stats: &KernelStats) {
        self.health.tick();
        for (source, total) in stats.losses.by_source() {
            let last = self.last_losses.entry(source).or_insert(0);
            if total > *last {
                self.lost_events
                    .with_label_values(&[source])
                    .inc_by(total - *last);
            }
            *last = total;
        }
        if stats.undecodable_events > self.last_undecodable {
            self.lost_events
                .with_label_values(&["undecodable_events"])
                .inc_by(stats.undecodable_events - self.last_undecodable);
        }
        self.last_undecodable = stats.undecodable_events;
        if stats.evicted_flows > self.last_evicted {
            self.evicted_flows
                .inc_by(stats.evicted_flows - self.last_evicted);
        }
        self.last_evicted = stats.evicted_flows;
        let deferred = stats.losses.deferred_drop_events();
        if deferred > self.last_deferred {
            self.deferred_drop_events
                .inc_by(deferred - self.last_deferred);
        }
        self.last_deferred = deferred;
        self.aggregate_entries.set(stats.aggregate_entries as i64);
        self.tracked_flows.set(stats.tracked_flows as i64);
        self.attached.set(stats.attached_interfaces as i64);
        self.expire(Instant::now());
    }

    /// A pod was deleted: its series go after the grace period.
    pub fn pod_deleted(&mut self, namespace: &str, pod: &str) {
        self.pending_removals.push((
            Instant::now() + self.config.deleted_pod_grace,
            namespace.to_string(),
            pod.to_string(),
        ));
    }

    /// The pods that exist now: those of the previous call that are gone are
    /// deleted (their series go after the grace period). The first call only
    /// records the set.
    pub fn sync_pods(&mut self, pods: impl IntoIterator<Item = (String, String)>) {
        let now: HashSet<(String, String)> = pods.into_iter().collect();
        if let Some(before) = self.known_pods.take() {
            for (ns, pod) in before.difference(&now) {
                self.pod_deleted(ns, pod);
            }
        }
        self.known_pods = Some(now);
    }

    /// Like [`sync_pods`](Self::sync_pods) for the pods that changed since
    /// the last call, each with whether it exists now: a pod's change
    /// costs what it touches, not a pass over every pod.
    pub fn pods_changed(&mut self, pods: impl IntoIterator<Item = ((String, String), bool)>) {
        let Some(known) = self.known_pods.as_mut() else {
            // Nothing recorded yet: the set comes with the first sync.
            return;
        };
        let mut gone = Vec::new();
        for (pod, exists) in pods {
            if exists {
                known.insert(pod);
            } else if known.remove(&pod) {
                gone.push(pod);
            }
        }
        for (ns, pod) in gone {
            self.pod_deleted(&ns, &pod);
        }
    }

    /// Remove the series of deleted pods whose grace period ended by `now`.
    pub fn expire(&mut self, now: Instant) {
        if self.pending_removals.is_empty() {
            return;
        }
        let (due, later): (Vec<_>, Vec<_>) = self
            .pending_removals
            .drain(..)
            .partition(|(t, _, _)| *t <= now);
        self.pending_removals = later;
        if due.is_empty() {
            return;
        }
        let gone: HashSet<(String, String)> =
            due.into_iter().map(|(_, ns, pod)| (ns, pod)).collect();
        let names = |p: &Option<(String, String)>| p.as_ref().is_some_and(|p| gone.contains(p));
        let doomed: Vec<SeriesKey> = self
            .series
            .iter_mut()
            .filter_map(|(k, Series { pods, .. })| {
                let named = names(&pods.source) || names(&pods.destination);
                let mut orphaned = false;
                for end in &mut pods.referrers {
                    let had = !end.is_empty();
                    end.retain(|p| !gone.contains(p));
                    orphaned |= had && end.is_empty();
                }
                (named || orphaned).then(|| k.clone())
            })
            .collect();
        for key in doomed {
            let l: Vec<&str> = key.values.iter().map(String::as_str).collect();
            let _ = self.family(key.metric).remove_label_values(&l);
            self.series.remove(&key);
            self.context_series = self.context_series.saturating_sub(1);
        }
    }

    /// Context series currently exported.
    pub fn context_series(&self) -> usize {
        self.context_series
    }
}

/// Serve `/metrics`, `/healthz` and `/readyz` on `addr`; returns the bound
/// address (the port is chosen by the kernel when `addr` has port 0).
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    health: Arc<Health>,
    ready_gauge_refresh: Arc<dyn Fn() + Send + Sync>,
) -> Result<SocketAddr, MetricsError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| MetricsError::Bind { addr, source })?;
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("metrics endpoint: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let registry = registry.clone();
            let health = health.clone();
            let refresh = ready_gauge_refresh.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        refresh();
                        // Read-only endpoints: nothing but GET (and HEAD).
                        let resp =
                            if matches!(*req.method(), hyper::Method::GET | hyper::Method::HEAD) {
                                respond(req.uri().path(), &registry, &health)
                            } else {
                                text(
                                    StatusCode::METHOD_NOT_ALLOWED,
                                    "text/plain",
                                    "only GET is served here\n",
                                )
                            };
                        async move { Ok::<_, Infallible>(resp) }
                    });
                let io = hyper_util::rt::TokioIo::new(stream);
                // A scraper that stalls gets cut off rather than holding a task.
                let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
                let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
            });
        }
    });
    Ok(local)
}

fn text(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

fn respond(path: &str, registry: &Registry, health: &Health) -> Response<Full<Bytes>> {
    match path {
        "/metrics" => {
            let mut buf = Vec::new();
            let encoder = TextEncoder::new();
            match encoder.encode(&registry.gather(), &mut buf) {
                Ok(()) => text(StatusCode::OK, encoder.format_type(), buf),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("encoding metrics: {e}\n"),
                ),
            }
        }
        "/healthz" => {
            let since = health.since_tick();
            if since <= health.stall_after.as_secs() {
                text(StatusCode::OK, "text/plain", "ok\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("main loop has not ticked for {since} s\n"),
                )
            }
        }
        "/readyz" => {
            // A hook this kernel cannot run does not hold readiness back
            // (it never will run here); the body says what is missing.
            if health.ready() {
                match health.partial() {
                    None => text(StatusCode::OK, "text/plain", "ready\n"),
                    Some(why) => text(
                        StatusCode::OK,
                        "text/plain",
                        format!("ready; capture is partial: {why}\n"),
                    ),
                }
            } else if !health.capturing.load(Ordering::Relaxed) {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready: capture is not running yet\n",
                )
            } else if let Some(stale) = health.identity_stale() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!(
                        "not ready: identity is stale or incomplete (capture goes on): {stale}\n"
                    ),
                )
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready: waiting for identity to sync\n",
                )
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /metrics, /healthz or /readyz\n",
        ),
    }
}

impl MetricsRegistry {
    /// A closure that refreshes `netwatch_ready` from the health state before
    /// a scrape.
    pub fn ready_refresher(&self) -> Arc<dyn Fn() + Send + Sync> {
        let gauge = self.ready_gauge.clone();
        let health = self.health.clone();
        Arc::new(move || gauge.set(i64::from(health.ready())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::filter::tests::record;
    use serde_json::json;

    fn value(reg: &MetricsRegistry, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        for fam in reg.registry().gather() {
            if fam.name() != name {
                continue;
            }
            for m in fam.get_metric() {
                let ls: HashMap<&str, &str> = m
                    .get_label()
                    .iter()
                    .map(|l| (l.name(), l.value()))
                    .collect();
                if labels.iter().all(|(k, v)| ls.get(k) == Some(v)) {
                    let c = m.get_counter();
                    let g = m.get_gauge();
                    return Some(
                        if fam.get_field_type() == prometheus::proto::MetricType::COUNTER {
                            c.get_value()
                        } else {
                            g.get_value()
                        },
                    );
                }
            }
        }
        None
    }

    fn series(reg: &MetricsRegistry, name: &str) -> usize {
        reg.registry()
            .gather()
            .iter()
            .filter(|f| f.name() == name)
            .map(|f| f.get_metric().len())
            .sum()
    }

    #[test]
    fn packets_and_bytes_are_the_increase_between_records_of_one_flow() {
        let mut m = MetricsRegistry::new(MetricsConfig::default()).unwrap();
        m.observe(&record(
            json!({"lifecycle": "NEW", "packets": 1, "bytes": 60}),
        ));
        m.observe(&record(
            json!({"lifecycle": "UPDATE", "packets": 3, "bytes": 180}),
        ));
        m.observe(&record(
            json!({"lifecycle": "FINAL", "packets": 4, "bytes": 240}),
        ));
        let l = [
            ("reason", "NETFILTER_DROP"),
            ("protocol", "TCP"),
            ("direction", "ingress"),
            ("source_namespace", "prod"),
            ("source_workload", "web"),
            ("destination_namespace", "prod"),
            ("destination_workload", "api"),
            ("destination_port", "8080"),
        ];
        assert_eq!(value(&m, "netwatch_drops_total", &l), Some(4.0));
        assert_eq!(value(&m, "netwatch_drop_bytes_total", &l), Some(240.0));
        assert_eq!(
            value(
                &m,
                "netwatch_denied_flows_total",
                &[("verdict", "DROPPED"), ("destination_workload", "api")]
            ),
            Some(1.0)
        );
        // A second flow of the same pair counts as a second flow.
        m.observe(&record(json!({"uuid": "u-2", "packets": 2, "bytes": 120})));
        assert_eq!(
            value(&m, "netwatch_denied_flows_total", &[("verdict", "DROPPED")]),
            Some(2.0)
        );
        assert_eq!(value(&m, "netwatch_drops_total", &l), Some(6.0));
    }

    #[test]
    fn drops_after_identity_arrives_count_under_the_named_series() {
        let mut m = MetricsRegistry::new(MetricsConfig::default()).unwrap();
        let anonymous = json!({"identity": 0, "namespace": null, "pod_name": null, "labels": null, "workloads": null});
        m.observe(&record(json!({"unenriched": true, "packets": 2, "bytes": 120, "source": anonymous.clone(), "destination": anonymous})));
        m.observe(&record(
            json!({"lifecycle": "UPDATE", "packets": 5, "bytes": 300}),
        ));
        assert_eq!(
            value(&m, "netwatch_drops_total", &[("destination_workload", "")]),
            Some(2.0)
        );
        assert_eq!(
            value(
                &m,
                "netwatch_drops_total",
                &[("destination_workload", "api")]
            ),
            Some(3.0)
        );
        // Same labels again: the cached series.
        m.observe(&record(
            json!({"lifecycle": "FINAL", "packets": 6, "bytes": 360}),
        ));
        assert_eq!(
            value(
                &m,
                "netwatch_drops_total",
                &[("destination_workload", "api")]
            ),
            Some(4.0)
        );
        assert_eq!(
            value(&m, "netwatch_denied_flows_total", &[]),
            Some(1.0),
            "still one flow"
        );
    }

    #[test]
    fn timed_out_and_refused_flows_are_denied_flows_not_drops() {
        let mut m = MetricsRegistry::new(MetricsConfig::default()).unwrap();
        m.observe(&record(
            json!({"uuid": "t", "verdict": "TIMED_OUT", "drop_reason_desc": null, "packets": 3}),
        ));
        m.observe(&record(json!({"uuid": "r", "verdict": "REFUSED", "drop_reason_desc": null, "refusal": "TCP_RESET"})));
        assert_eq!(series(&m, "netwatch_drops_total"), 0);
        assert_eq!(
            value(
                &m,
                "netwatch_denied_flows_total",
                &[("verdict", "TIMED_OUT")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(&m, "netwatch_denied_flows_total", &[("verdict", "REFUSED")]),
            Some(1.0)
        );
    }

    #[test]
    fn policy_denials_dns_failures_and_unenriched_flows_are_counted_once_per_flow() {
        let mut m = MetricsRegistry::new(MetricsConfig::default()).unwrap();
        let deny =
            json!([{"name": "default-deny-all", "namespace": "prod", "kind": "NetworkPolicy"}]);
        let dns = json!({"uuid": "d", "is_dns": true, "l4": {"UDP": {"source_port": 40000, "destination_port": 53}}});
        m.observe(&record(
            json!({"uuid": "p", "ingress_denied_by": deny.clone()}),
        ));
        m.observe(&record(
            json!({"uuid": "p", "lifecycle": "UPDATE", "packets": 5, "ingress_denied_by": deny}),
        ));
        m.observe(&record(dns.clone()));
        m.observe(&record(
            json!({"uuid": "d", "lifecycle": "FINAL", "is_dns": true}),
        ));
        m.observe(&record(json!({"uuid": "x", "unenriched": true})));
        m.observe(&record(
            json!({"uuid": "x", "unenriched": true, "lifecycle": "UPDATE"}),
        ));
        assert_eq!(
            value(
                &m,
                "netwatch_policy_denials_total",
                &[
                    ("direction", "ingress"),
                    ("policy_namespace", "prod"),
                    ("policy", "default-deny-all")
                ]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &m,
                "netwatch_dns_failures_total",
                &[("verdict", "DROPPED"), ("destination_port", "53")]
            ),
            Some(1.0)
        );
        assert_eq!(value(&m, "netwatch_unenriched_flows_total", &[]), Some(1.0));
    }

    #[test]
    fn context_labels_follow_the_configuration() {
        let config = MetricsConfig {
            source_context: ContextLabel::parse_list("--metrics-source-context", "app,pod", false)
                .unwrap(),
            destination_context: ContextLabel::parse_list(
                "--metrics-destination-context",
                "none",
                true,
            )
            .unwrap(),
            ..MetricsConfig::default()
        };
        let mut m = MetricsRegistry::new(config).unwrap();
        assert_eq!(m.context_label_names(), ["source_app", "source_pod"]);
        m.observe(&record(json!({})));
        assert_eq!(
            value(
                &m,
                "netwatch_drops_total",
                &[("source_app", "web"), ("source_pod", "web-7f9c")]
            ),
            Some(3.0)
        );
        let text = m.render();
        assert!(!text.contains("destination_namespace"), "{text}");
        // Reserved identities name the workload.
        let mut m = MetricsRegistry::new(MetricsConfig::default()).unwrap();
        m.observe(&record(json!({"destination": {"identity": 2, "labels": ["reserved:world"], "namespace": null, "pod_name": null, "workloads": null}})));
        assert_eq!(
            value(
                &m,
                "netwatch_drops_total",
                &[
                    ("destination_workload", "world"),
                    ("destination_namespace", "")
                ]
            ),
            Some(3.0)
        );
    }

    #[test]
    fn bad_context_names_the_flag_and_lists_valid_values() {
        let e = ContextLabel::parse_list("--metrics-source-context", "namespace,colour", false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--metrics-source-context")
                && e.contains("namespace, workload, pod, app, port"),
            "{e}"
        );
        let e = ContextLabel::parse_list("--metrics-source-context", "port", false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("only valid in --metrics-destination-context"),
            "{e}"
        );
        assert!(
            ContextLabel::parse_list(
                "--metrics-destination-context",
                "namespace|workload|port",
                true
            )
            .is_ok()
        );
        assert!(
            ContextLabel::parse_list("--metrics-destination-context", "pod,pod", true).is_err()
        );
    }

    #[test]
    fn the_cap_folds_new_series_into_other_and_keeps_totals_exact() {
        let config = MetricsConfig {
            max_series: 3,
            ..MetricsConfig::default()
        };
        let mut m = MetricsRegistry::new(config).unwrap();
        // Each flow to a different pod port is a new label set for
        // drops, drop bytes and denied flows: 3 series per flow.
        for port in 1..=10u16 {
            m.observe(&record(json!({"uuid": format!("u{port}"), "l4": {"TCP": {"source_port": 40000, "destination_port": port}}})));
        }
        assert_eq!(m.context_series(), 3);
        assert_eq!(
            value(&m, "netwatch_drops_total", &[("destination_port", "1")]),
            Some(3.0)
        );
        assert_eq!(
            value(
                &m,
                "netwatch_drops_total",
                &[("destination_port", OVERFLOW_LABEL)]
            ),
            Some(27.0)
        );
        assert_eq!(
            value(
                &m,
                "netwatch_denied_flows_total",
                &[("destination_port", OVERFLOW_LABEL)]
            ),
            Some(9.0)
        );
        assert_eq!(
            value(&m, "netwatch_metrics_series_overflow_total", &[]),
            Some(27.0)
        );
        assert!(series(&m, "netwatch_drops_total") <= 2);
    }

    #[test]
    fn series_of_deleted_pods_go_after_the_grace_period() {
        let config = MetricsConfig {
            destination_context: vec![ContextLabel::Namespace, ContextLabel::Pod],
            deleted_pod_grace: Duration::from_secs(60),
            ..MetricsConfig::default()
        };
        let mut m = MetricsRegistry::new(config).unwrap();
        m.observe(&record(json!({"uuid": "a"})));
        m.observe(&record(
            json!({"uuid": "b", "destination": {"pod_name": "api-other"}}),
        ));
        assert_eq!(series(&m, "netwatch_drops_total"), 2);
        m.pod_deleted("prod", "api-5d4e");
        m.expire(Instant::now() + Duration::from_secs(30));
        assert_eq!(
            series(&m, "netwatch_drops_total"),
            2,
            "still in its grace period"
        );
        m.expire(Instant::now() + Duration::from_secs(61));
        assert_eq!(series(&m, "netwatch_drops_total"), 1);
        assert_eq!(
            value(
                &m,
                "netwatch_drops_total",
                &[("destination_pod", "api-other")]
            ),
            Some(3.0)
        );
        assert_eq!(
            value(
                &m,
                "netwatch_drops_total",
                &[("destination_pod", "api-5d4e")]
            ),
            None
        );
    }

    #[test]
    fn series_one_end_of_which_only_deleted_pods_gave_go_with_them() {
        // The default context names no pod. Short-lived pods (as Jobs or
        // the soak's churn give), each denied on a port of its own to a live
        // pod: their series must not outlive them, or they pile up to the
        // cap.
        let config = MetricsConfig {
            deleted_pod_grace: Duration::from_secs(60),
            ..MetricsConfig::default()
        };
        let mut m = MetricsRegistry::new(config).unwrap();
        let pod = |ns: &str, name: &str| (ns.to_string(), name.to_string());
        let job = |i: u16, workload: &str| {
            record(json!({
                "uuid": format!("job-{i}"), "lifecycle": "FINAL",
                "l4": {"TCP": {"source_port": 40000, "destination_port": 10000 + i, "flags": {"SYN": true}}},
                "source": {"namespace": "jobs", "pod_name": format!("job-{i}"),
                           "workloads": [{"name": workload, "kind": "Job"}]},
            }))
        };
        m.observe(&record(json!({"uuid": "steady"})));
        let baseline = m.context_series();
        assert_eq!(baseline, 3, "drops, drop bytes, denied flows");
        let steady_pods = [pod("prod", "web-7f9c"), pod("prod", "api-5d4e")];
        let mut all = steady_pods.to_vec();
        for i in 0..200 {
            all.push(pod("jobs", &format!("job-{i}")));
        }
        all.push(pod("jobs", "cron-live"));
        m.sync_pods(all);
        for i in 0..200 {
            m.observe(&job(i, &format!("job-{i}")));
        }
        // A series a live pod counts into too stays.
        let mut live = job(0, "job-0");
        live.uuid = "cron-live".into();
        live.source.pod_name = "cron-live".into();
        m.observe(&live);
        assert_eq!(m.context_series(), baseline + 3 * 200);

        m.sync_pods(
            steady_pods
                .iter()
                .cloned()
                .chain([pod("jobs", "cron-live")]),
        );
        m.expire(Instant::now() + Duration::from_secs(30));
        assert_eq!(m.context_series(), baseline + 3 * 200, "grace period");
        m.expire(Instant::now() + Duration::from_secs(61));
        assert_eq!(m.context_series(), baseline + 3);
        assert_eq!(m.series.len(), m.context_series());
        assert_eq!(
            series(&m, "netwatch_denied_flows_total"),
            2,
            "the steady pod's and the live Job pod's"
        );
        assert_eq!(
            value(
                &m,
                "netwatch_denied_flows_total",
                &[("source_workload", "job-0"), ("destination_port", "10000")]
            ),
            Some(2.0)
        );
        assert_eq!(
            value(
                &m,
                "netwatch_drops_total",
                &[("source_workload", "web"), ("destination_port", "8080")]
            ),
            Some(3.0)
        );
    }

    #[test]
    fn pods_missing_from_the_next_snapshot_are_deleted() {
        let config = MetricsConfig {
            source_context: vec![ContextLabel::Pod],
            deleted_pod_grace: Duration::ZERO,
            ..MetricsConfig::default()
        };
        let mut m = MetricsRegistry::new(config).unwrap();
        let pod = |ns: &str, name: &str| (ns.to_string(), name.to_string());
        m.sync_pods([pod("prod", "web-7f9c"), pod("prod", "web-other")]);
        m.observe(&record(json!({"uuid": "a"})));
        m.observe(&record(
            json!({"uuid": "b", "source": {"pod_name": "web-other"}}),
        ));
        m.sync_pods([pod("prod", "web-other")]);
        m.expire(Instant::now() + Duration::from_secs(1));
        assert_eq!(
            value(&m, "netwatch_drops_total", &[("source_pod", "web-7f9c")]),
            None
        );
        assert_eq!(
            value(&m, "netwatch_drops_total", &[("source_pod", "web-other")]),
            Some(3.0)
        );
    }

    #[test]
    fn pods_changed_deletes_only_the_pods_that_are_gone() {
        let config = MetricsConfig {
            source_context: vec![ContextLabel::Pod],
            deleted_pod_grace: Duration::ZERO,
            ..MetricsConfig::default()
        };
        let mut m = MetricsRegistry::new(config).unwrap();
        let pod = |ns: &str, name: &str| (ns.to_string(), name.to_string());
        m.sync_pods([pod("prod", "web-7f9c")]);
        // A pod that appears later is known, and so deleted when it goes.
        m.pods_changed([(pod("prod", "web-other"), true)]);
        m.observe(&record(json!({"uuid": "a"})));
        m.observe(&record(
            json!({"uuid": "b", "source": {"pod_name": "web-other"}}),
        ));
        // A changed pod that still exists, and one gone.
        m.pods_changed([
            (pod("prod", "web-7f9c"), true),
            (pod("prod", "web-other"), false),
        ]);
        m.expire(Instant::now() + Duration::from_secs(1));
        assert_eq!(
            value(&m, "netwatch_drops_total", &[("source_pod", "web-other")]),
            None
        );
        assert!(
            value(&m, "netwatch_drops_total", &[("source_pod", "web-7f9c")]).is_some(),
            "a pod that only changed keeps its series"
        );
    }

    #[test]
    fn kernel_losses_are_exported_as_increases_by_source() {
        let mut m = MetricsRegistry::new(MetricsConfig::default()).unwrap();
        let mut stats = KernelStats {
            attached_interfaces: 4,
            tracked_flows: 17,
            ..KernelStats::default()
        };
        stats.losses.0[0] = 5;
        m.kernel_stats(&stats);
        stats.losses.0[0] = 7;
        stats.undecodable_events = 2;
        m.kernel_stats(&stats);
        assert_eq!(
            value(
                &m,
                "netwatch_lost_events_total",
                &[("source", "ringbuf_drops")]
            ),
            Some(7.0)
        );
        assert_eq!(
            value(
                &m,
                "netwatch_lost_events_total",
                &[("source", "undecodable_events")]
            ),
            Some(2.0)
        );
        assert_eq!(
            value(
                &m,
                "netwatch_lost_events_total",
                &[("source", "table_full_drops")]
            ),
            Some(0.0)
        );
        assert_eq!(value(&m, "netwatch_attached_interfaces", &[]), Some(4.0));
        assert_eq!(value(&m, "netwatch_tracked_flows", &[]), Some(17.0));
    }

    #[test]
    fn exposition_follows_naming_conventions() {
        let mut m = MetricsRegistry::new(MetricsConfig::default()).unwrap();
        m.observe(&record(json!({})));
        let text = m.render();
        assert!(
            text.contains("# TYPE netwatch_drops_total counter"),
            "{text}"
        );
        assert!(text.contains("# TYPE netwatch_attached_interfaces gauge"));
        assert!(text.contains("netwatch_build_info{kernel="));
        for fam in m.registry().gather() {
            let name = fam.name();
            assert!(name.starts_with("netwatch_"), "{name}");
            if fam.get_field_type() == prometheus::proto::MetricType::COUNTER {
                assert!(name.ends_with("_total"), "{name}");
            }
        }
    }

    #[test]
    fn metrics_addr_accepts_port_only_and_none() {
        assert_eq!(
            parse_metrics_addr(":9965").unwrap(),
            Some("0.0.0.0:9965".parse().unwrap())
        );
        assert_eq!(
            parse_metrics_addr("127.0.0.1:0").unwrap(),
            Some("127.0.0.1:0".parse().unwrap())
        );
        assert_eq!(parse_metrics_addr("none").unwrap(), None);
        let e = parse_metrics_addr("localhost").unwrap_err().to_string();
        assert!(e.contains("--metrics-addr") && e.contains(":9965"), "{e}");
    }

    #[test]
    fn health_endpoints_report_capture_and_identity() {
        let h = Health::new();
        let reg = Registry::new();
        assert_eq!(
            respond("/readyz", &reg, &h).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        h.set_capturing(true);
        assert_eq!(
            respond("/readyz", &reg, &h).status(),
            StatusCode::SERVICE_UNAVAILABLE,
            "identity not synced"
        );
        h.set_enrichment_ready(true);
        assert_eq!(respond("/readyz", &reg, &h).status(), StatusCode::OK);
        h.set_partial(Some("sock_ops off: no cgroup v2 root given".into()));
        let r = respond("/readyz", &reg, &h);
        assert_eq!(
            r.status(),
            StatusCode::OK,
            "a hook off does not hold readiness back"
        );
        let body = futures::executor::block_on(http_body_util::BodyExt::collect(r.into_body()))
            .unwrap()
            .to_bytes();
        assert_eq!(
            &body[..],
            b"ready; capture is partial: sock_ops off: no cgroup v2 root given\n"
        );
        assert_eq!(respond("/healthz", &reg, &h).status(), StatusCode::OK);
        h.last_tick.store(now_secs() - 120, Ordering::Relaxed);
        assert_eq!(
            respond("/healthz", &reg, &h).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(respond("/nope", &reg, &h).status(), StatusCode::NOT_FOUND);
    }
}
