//! Flow filters: which flow records a reader wants.
//!
//! One language serves `netwatch observe` and `netwatch top` (as flags), the
//! observe API (as JSON, evaluated by the agent so a busy node never ships
//! everything to a client) and the flow log's allow and deny lists (as a
//! `key=value ...` expression). The keys are `hubble observe`'s flag names.
//!
//! Semantics follow Hubble's: inside one [`FlowFilter`], every key that is
//! set must match (AND) and each key matches when any of its values does
//! (OR). The either-side keys (`namespace`, `pod`, `label`, `ip`, `port`)
//! must all hold on the same end of the flow, source or destination; the
//! `from-*` keys apply to the source, the `to-*` keys to the destination.
//! A [`FilterSet`] admits a record when any allow filter matches (or there
//! are none) and no deny filter does.

use std::{fmt, net::IpAddr, str::FromStr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    flow::record::{FlowRecord, L4, Verdict},
    identity::Endpoint,
    record::Direction,
};

/// Every key a filter expression accepts, in the order `--help` lists them.
pub const FILTER_KEYS: &[&str] = &[
    "verdict",
    "namespace",
    "from-namespace",
    "to-namespace",
    "pod",
    "from-pod",
    "to-pod",
    "label",
    "from-label",
    "to-label",
    "ip",
    "from-ip",
    "to-ip",
    "port",
    "from-port",
    "to-port",
    "protocol",
    "reason",
    "traffic-direction",
    "node-name",
    "type",
    "drop-reason-desc",
];

/// Refusal kinds a `reason` may name besides kernel drop reasons.
pub const REFUSAL_REASONS: &[&str] = &[
    "TCP_RESET",
    "SCTP_ABORT",
    "ICMP_NET_UNREACHABLE",
    "ICMP_HOST_UNREACHABLE",
    "ICMP_PROTOCOL_UNREACHABLE",
    "ICMP_PORT_UNREACHABLE",
    "ICMP_ADMIN_PROHIBITED",
    "ICMP_UNREACHABLE",
    "ICMPV6_NO_ROUTE",
    "ICMPV6_ADMIN_PROHIBITED",
    "ICMPV6_ADDRESS_UNREACHABLE",
    "ICMPV6_PORT_UNREACHABLE",
    "ICMPV6_POLICY_REJECTED",
    "ICMPV6_UNREACHABLE",
];

/// A filter that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("unknown filter key {key:?}; valid keys: {}", FILTER_KEYS.join(", "))]
    UnknownKey { key: String },
    #[error("invalid {key} {value:?}: {reason}")]
    InvalidValue {
        key: String,
        value: String,
        reason: String,
    },
    #[error("filter term {term:?} is not key=value (e.g. verdict=DROPPED namespace=prod)")]
    NotKeyValue { term: String },
    #[error("filter JSON: {0}")]
    Json(String),
}

fn invalid(key: &str, value: &str, reason: impl Into<String>) -> FilterError {
    FilterError::InvalidValue {
        key: key.into(),
        value: value.into(),
        reason: reason.into(),
    }
}

/// Which of a record's `l4` variants a filter names (the L4 protocols
/// policies name are [`crate::record::Protocol`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum L4Kind {
    Tcp,
    Udp,
    Sctp,
    Icmpv4,
    Icmpv6,
}

impl L4Kind {
    pub const ALL: [L4Kind; 5] = [
        L4Kind::Tcp,
        L4Kind::Udp,
        L4Kind::Sctp,
        L4Kind::Icmpv4,
        L4Kind::Icmpv6,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            L4Kind::Tcp => "tcp",
            L4Kind::Udp => "udp",
            L4Kind::Sctp => "sctp",
            L4Kind::Icmpv4 => "icmpv4",
            L4Kind::Icmpv6 => "icmpv6",
        }
    }

    fn matches(self, l4: &L4) -> bool {
        matches!(
            (self, l4),
            (L4Kind::Tcp, L4::Tcp(_))
                | (L4Kind::Udp, L4::Udp(_))
                | (L4Kind::Sctp, L4::Sctp(_))
                | (L4Kind::Icmpv4, L4::Icmpv4(_))
                | (L4Kind::Icmpv6, L4::Icmpv6(_))
        )
    }
}

impl FromStr for L4Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.to_ascii_lowercase();
        let s = if s == "icmp" { "icmpv4".to_string() } else { s };
        L4Kind::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| "valid: tcp, udp, sctp, icmpv4 (icmp), icmpv6".into())
    }
}

/// `[namespace/]name-prefix`: a pod by the start of its name, as
/// `hubble observe --pod` takes it. Without a namespace it matches in any
/// namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodPattern {
    pub namespace: Option<String>,
    pub name_prefix: String,
}

impl PodPattern {
    fn matches(&self, ep: &Endpoint) -> bool {
        if ep.pod_name.is_empty() {
            return false;
        }
        if self
            .namespace
            .as_ref()
            .is_some_and(|ns| *ns != ep.namespace)
        {
            return false;
        }
        ep.pod_name.starts_with(&self.name_prefix)
    }
}

impl FromStr for PodPattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (ns, name) = match s.split_once('/') {
            Some((ns, name)) => (Some(ns), name),
            None => (None, s),
        };
        if ns == Some("") || (ns.is_none() && name.is_empty()) {
            return Err(
                "expected [namespace/]pod-name-prefix, e.g. prod/web or prod/ or web-7f".into(),
            );
        }
        Ok(PodPattern {
            namespace: ns.map(str::to_string),
            name_prefix: name.to_string(),
        })
    }
}

impl fmt::Display for PodPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{ns}/{}", self.name_prefix),
            None => f.write_str(&self.name_prefix),
        }
    }
}

/// One term of a label selector.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum LabelTerm {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

/// A Kubernetes-style equality selector over the endpoint's labels:
/// `app=web,tier!=db,team,!canary` (all terms must hold). Keys may carry a
/// source prefix (`k8s:app=web`, `reserved:world`); without one, `k8s:` is
/// meant.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LabelSelector {
    text: String,
    terms: Vec<LabelTerm>,
}

fn label_key(k: &str) -> String {
    let k = k.trim();
    if k.contains(':') {
        k.to_string()
    } else {
        format!("k8s:{k}")
    }
}

impl LabelSelector {
    fn matches(&self, ep: &Endpoint) -> bool {
        let value_of = |key: &str| -> Option<&str> {
            ep.labels.iter().find_map(|l| match l.split_once('=') {
                Some((k, v)) if k == key => Some(v),
                None if l == key => Some(""),
                _ => None,
            })
        };
        self.terms.iter().all(|t| match t {
            LabelTerm::Equals(k, v) => value_of(k) == Some(v.as_str()),
            LabelTerm::NotEquals(k, v) => value_of(k) != Some(v.as_str()),
            LabelTerm::Exists(k) => value_of(k).is_some(),
            LabelTerm::NotExists(k) => value_of(k).is_none(),
        })
    }
}

impl FromStr for LabelSelector {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        for term in s.split(',').map(str::trim) {
            if term.is_empty() {
                return Err("empty selector term; expected key=value, key!=value, key or !key, comma-separated".into());
            }
            let t = if let Some((k, v)) = term.split_once("!=") {
                LabelTerm::NotEquals(label_key(k), v.trim().to_string())
            } else if let Some((k, v)) = term.split_once('=') {
                LabelTerm::Equals(label_key(k), v.trim_start_matches('=').trim().to_string())
            } else if let Some(k) = term.strip_prefix('!') {
                LabelTerm::NotExists(label_key(k))
            } else {
                LabelTerm::Exists(label_key(term))
            };
            let key = match &t {
                LabelTerm::Equals(k, _)
                | LabelTerm::NotEquals(k, _)
                | LabelTerm::Exists(k)
                | LabelTerm::NotExists(k) => k,
            };
            if key.ends_with(':') {
                return Err(format!("term {term:?} has no label key"));
            }
            terms.push(t);
        }
        Ok(LabelSelector {
            text: s.to_string(),
            terms,
        })
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// What one end of a flow must look like. Every set field must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct EndpointMatch {
    namespaces: Vec<String>,
    pods: Vec<PodPattern>,
    labels: Vec<LabelSelector>,
    ips: Vec<IpNet>,
    ports: Vec<u16>,
}

impl EndpointMatch {
    fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.pods.is_empty()
            && self.labels.is_empty()
            && self.ips.is_empty()
            && self.ports.is_empty()
    }

    fn matches(&self, ep: &Endpoint, ip: IpAddr, port: Option<u16>) -> bool {
        (self.namespaces.is_empty() || self.namespaces.iter().any(|n| *n == ep.namespace))
            && (self.pods.is_empty() || self.pods.iter().any(|p| p.matches(ep)))
            && (self.labels.is_empty() || self.labels.iter().any(|l| l.matches(ep)))
            && (self.ips.is_empty() || self.ips.iter().any(|n| n.contains(&ip)))
            && (self.ports.is_empty() || port.is_some_and(|p| self.ports.contains(&p)))
    }
}

/// A flow filter: the conjunction of everything set in it.
///
/// Build one with [`FlowFilter::set`] (`key`, `value`) or parse an expression
/// with [`FlowFilter::parse_expr`]; on the wire it is a JSON object of
/// `key: [values]` (see [`FlowFilter::to_json`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowFilter {
    verdicts: Vec<Verdict>,
    protocols: Vec<L4Kind>,
    reasons: Vec<String>,
    directions: Vec<Direction>,
    /// Node name patterns (`*` wildcards), as `hubble observe --node-name`.
    node_names: Vec<glob::Pattern>,
    /// Hubble event types: 1 (drop) or 4 (trace).
    event_types: Vec<i32>,
    /// Hubble `DropReason` names (`hubble observe --drop-reason-desc`).
    hubble_reasons: Vec<String>,
    either: EndpointMatch,
    from: EndpointMatch,
    to: EndpointMatch,
    /// The (key, value) pairs it was built from, for the wire and messages.
    terms: Vec<(String, String)>,
}

impl FlowFilter {
    /// A filter that matches everything.
    pub fn any() -> FlowFilter {
        FlowFilter::default()
    }

    /// Whether nothing is set (matches every record).
    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    /// Add one `key` = `value` condition. `key` is one of [`FILTER_KEYS`];
    /// repeating a key widens it (OR). For every key but the label keys, a
    /// comma-separated value is several values.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), FilterError> {
        let key = key.trim().trim_start_matches("--");
        let value = value.trim();
        let values: Vec<&str> = if key.ends_with("label") {
            vec![value]
        } else {
            value
                .split(',')
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .collect()
        };
        if values.is_empty() || (values.len() == 1 && values[0].is_empty()) {
            return Err(invalid(key, value, "empty value"));
        }
        for v in values {
            self.set_one(key, v)?;
        }
        // In key order (stable within a key), the order of the JSON form (an
        // object): a filter and its wire form are the same filter.
        let at = self.terms.partition_point(|(k, _)| k.as_str() <= key);
        self.terms.insert(at, (key.to_string(), value.to_string()));
        Ok(())
    }

    fn set_one(&mut self, key: &str, v: &str) -> Result<(), FilterError> {
        let (side, field) = match key.split_once('-') {
            Some(("from", f)) => (Some(true), f),
            Some(("to", f)) => (Some(false), f),
            _ => (None, key),
        };
        let ep = match side {
            Some(true) => &mut self.from,
            Some(false) => &mut self.to,
            None => &mut self.either,
        };
        match field {
            "verdict" if side.is_none() => self.verdicts.push(v.parse().map_err(|e: String| {
                invalid(
                    key,
                    v,
                    e.split("; ")
                        .nth(1)
                        .unwrap_or("valid: DROPPED, TIMED_OUT, REFUSED, POLICY_NOT_ENFORCED"),
                )
            })?),
            "protocol" if side.is_none() => self
                .protocols
                .push(v.parse().map_err(|e: String| invalid(key, v, e))?),
            "traffic-direction" if side.is_none() => self
                .directions
                .push(v.parse().map_err(|e: String| invalid(key, v, e))?),
            "reason" if side.is_none() => {
                let name = v.to_ascii_uppercase();
                let name = name
                    .strip_prefix("SKB_DROP_REASON_")
                    .unwrap_or(&name)
                    .to_string();
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(invalid(
                        key,
                        v,
                        format!(
                            "expected a kernel drop reason name (e.g. NETFILTER_DROP, TC_INGRESS, IP_RPFILTER) or a refusal ({})",
                            REFUSAL_REASONS.join(", ")
                        ),
                    ));
                }
                self.reasons.push(name);
            }
            "node-name" if side.is_none() => self.node_names.push(
                glob::Pattern::new(v)
                    .map_err(|e| invalid(key, v, format!("a node name or pattern (node-*): {e}")))?,
            ),
            "type" if side.is_none() => self.event_types.push(match v.to_ascii_lowercase().as_str() {
                "drop" => 1,
                "trace" => 4,
                other => {
                    return Err(invalid(
                        key,
                        v,
                        format!(
                            "netwatch has no {other} events: its records are drops (drop: DROPPED) and traces of failed or unenforced handshakes (trace: TIMED_OUT, REFUSED, POLICY_NOT_ENFORCED); valid: drop, trace"
                        ),
                    ));
                }
            }),
            "drop-reason-desc" if side.is_none() => {
                let name = v.to_ascii_uppercase();
                if !super::hubble::DROP_REASON_NAMES.contains(&name.as_str()) {
                    return Err(invalid(
                        key,
                        v,
                        format!(
                            "expected a Hubble drop reason ({}); kernel drop reasons are --reason",
                            super::hubble::DROP_REASON_NAMES.join(", ")
                        ),
                    ));
                }
                self.hubble_reasons.push(name);
            }
            "namespace" => {
                if v.contains('/') {
                    return Err(invalid(
                        key,
                        v,
                        "a namespace name has no '/'; for a pod use --pod namespace/name",
                    ));
                }
                ep.namespaces.push(v.to_string());
            }
            "pod" => ep
                .pods
                .push(v.parse().map_err(|e: String| invalid(key, v, e))?),
            "label" => ep
                .labels
                .push(v.parse().map_err(|e: String| invalid(key, v, e))?),
            "ip" => {
                let net = match v.parse::<IpNet>() {
                    Ok(n) => n,
                    Err(_) => v.parse::<IpAddr>().map(IpNet::from).map_err(|_| {
                        invalid(
                            key,
                            v,
                            "expected an IP address or CIDR, e.g. 10.244.1.3 or 10.244.0.0/16",
                        )
                    })?,
                };
                ep.ips.push(net);
            }
            "port" => ep.ports.push(
                v.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| invalid(key, v, "expected a port number 1-65535"))?,
            ),
            _ => {
                return Err(FilterError::UnknownKey {
                    key: key.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Parse `key=value key=value ...` (whitespace-separated; keys as in
    /// [`FILTER_KEYS`], with or without `--`), or the JSON form.
    ///
    /// Example: `verdict=DROPPED,TIMED_OUT namespace=prod to-port=53`.
    pub fn parse_expr(expr: &str) -> Result<FlowFilter, FilterError> {
        let expr = expr.trim();
        if expr.starts_with('{') {
            return FlowFilter::from_json(expr);
        }
        let mut f = FlowFilter::default();
        for term in expr.split_whitespace() {
            let (k, v) = term
                .split_once('=')
                .ok_or_else(|| FilterError::NotKeyValue {
                    term: term.to_string(),
                })?;
            f.set(k, v)?;
        }
        Ok(f)
    }

    /// The JSON form: `{"verdict": ["DROPPED"], "to-port": ["53"]}`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        for (k, v) in &self.terms {
            let e = map
                .entry(k.clone())
                .or_insert_with(|| serde_json::Value::Array(Vec::new()));
            if let serde_json::Value::Array(a) = e {
                a.push(serde_json::Value::String(v.clone()));
            }
        }
        serde_json::Value::Object(map)
    }

    /// Parse the JSON form (what [`FlowFilter::to_json`] writes); a value may
    /// be a string or a list of strings.
    pub fn from_json(text: &str) -> Result<FlowFilter, FilterError> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| FilterError::Json(e.to_string()))?;
        FlowFilter::from_value(&v)
    }

    fn from_value(v: &serde_json::Value) -> Result<FlowFilter, FilterError> {
        let obj = v.as_object().ok_or_else(|| {
            FilterError::Json("a filter is a JSON object of key: [values]".into())
        })?;
        let mut f = FlowFilter::default();
        for (k, vals) in obj {
            let list: Vec<&serde_json::Value> = match vals {
                serde_json::Value::Array(a) => a.iter().collect(),
                other => vec![other],
            };
            for item in list {
                let s = match item {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Number(n) => n.to_string(),
                    _ => return Err(invalid(k, &item.to_string(), "expected a string")),
                };
                f.set(k, &s)?;
            }
        }
        Ok(f)
    }

    /// Refuse `reason` terms that name neither a drop reason of the kernel
    /// (`known`) nor a refusal: they would silently match nothing.
    pub fn check_reasons<'a>(
        &self,
        known: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), FilterError> {
        let known: std::collections::BTreeSet<&str> = known.into_iter().collect();
        for r in &self.reasons {
            if !known.contains(r.as_str()) && !REFUSAL_REASONS.contains(&r.as_str()) {
                return Err(invalid(
                    "reason",
                    r,
                    format!(
                        "this kernel's drop reasons: {}; refusals: {}",
                        known.iter().copied().collect::<Vec<_>>().join(", "),
                        REFUSAL_REASONS.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Whether `record` passes this filter.
    pub fn matches(&self, r: &FlowRecord) -> bool {
        if !self.verdicts.is_empty() && !self.verdicts.contains(&r.verdict) {
            return false;
        }
        if !self.node_names.is_empty() && !self.node_names.iter().any(|p| p.matches(&r.node_name)) {
            return false;
        }
        if !self.event_types.is_empty() && !self.event_types.contains(&r.event_type.kind) {
            return false;
        }
        if !self.hubble_reasons.is_empty()
            && !super::hubble::record_drop_reason(r)
                .is_some_and(|h| self.hubble_reasons.iter().any(|w| w == h))
        {
            return false;
        }
        if !self.protocols.is_empty() && !self.protocols.iter().any(|p| p.matches(&r.l4)) {
            return false;
        }
        if !self.directions.is_empty() {
            let d = r.traffic_direction.to_ascii_lowercase();
            if !self.directions.iter().any(|x| match x {
                Direction::Ingress => d == "ingress",
                Direction::Egress => d == "egress",
            }) {
                return false;
            }
        }
        if !self.reasons.is_empty() && !self.reasons.iter().any(|want| record_has_reason(r, want)) {
            return false;
        }
        let (sport, dport) = match r.l4.ports() {
            Some(p) => (Some(p.source_port), Some(p.destination_port)),
            None => (None, None),
        };
        let src = (&r.source, r.ip.source, sport);
        let dst = (&r.destination, r.ip.destination, dport);
        if !self.from.is_empty() && !self.from.matches(src.0, src.1, src.2) {
            return false;
        }
        if !self.to.is_empty() && !self.to.matches(dst.0, dst.1, dst.2) {
            return false;
        }
        self.either.is_empty()
            || self.either.matches(src.0, src.1, src.2)
            || self.either.matches(dst.0, dst.1, dst.2)
    }
}

fn record_has_reason(r: &FlowRecord, want: &str) -> bool {
    r.drop_reason_desc.as_deref() == Some(want)
        || r.drop_reasons.iter().any(|x| x == want)
        || r.refusal.as_deref() == Some(want)
}

impl fmt::Display for FlowFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.terms.iter().map(|(k, v)| format!("{k}={v}")).collect();
        f.write_str(&parts.join(" "))
    }
}

impl Serialize for FlowFilter {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl<'de> Deserialize<'de> for FlowFilter {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        FlowFilter::from_value(&v).map_err(serde::de::Error::custom)
    }
}

/// Allow and deny lists: a record passes when any allow filter matches (or
/// there is none) and no deny filter matches.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilterSet {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<FlowFilter>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<FlowFilter>,
}

impl FilterSet {
    /// A set that admits what `filter` matches (everything when it is empty).
    pub fn only(filter: FlowFilter) -> FilterSet {
        FilterSet {
            allow: if filter.is_empty() {
                vec![]
            } else {
                vec![filter]
            },
            deny: vec![],
        }
    }

    /// Whether `record` passes.
    pub fn admits(&self, record: &FlowRecord) -> bool {
        (self.allow.is_empty() || self.allow.iter().any(|f| f.matches(record)))
            && !self.deny.iter().any(|f| f.matches(record))
    }

    /// Whether it admits everything.
    pub fn is_empty(&self) -> bool {
        self.allow.iter().all(FlowFilter::is_empty) && self.deny.is_empty()
    }

    /// [`FlowFilter::check_reasons`] on every filter.
    pub fn check_reasons<'a>(
        &self,
        known: impl IntoIterator<Item = &'a str> + Clone,
    ) -> Result<(), FilterError> {
        self.allow
            .iter()
            .chain(&self.deny)
            .try_for_each(|f| f.check_reasons(known.clone()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// A record from the fields a test cares about, the rest defaulted.
    pub(crate) fn record(patch: serde_json::Value) -> FlowRecord {
        let mut base = json!({
            "time": "2026-11-22T02:14:07.113Z", "uuid": "u-1", "verdict": "DROPPED",
            "drop_reason_desc": "NETFILTER_DROP",
            "IP": {"source": "10.244.1.2", "destination": "10.244.1.3", "ipVersion": "IPv4"},
            "l4": {"TCP": {"source_port": 48420, "destination_port": 8080, "flags": {"SYN": true}}},
            "source": {"identity": 4242, "namespace": "prod", "pod_name": "web-7f9c", "labels": ["k8s:app=web", "k8s:io.kubernetes.pod.namespace=prod"],
                       "workloads": [{"name": "web", "kind": "Deployment"}], "ip": "10.244.1.2", "port": 48420},
            "destination": {"identity": 4343, "namespace": "prod", "pod_name": "api-5d4e", "labels": ["k8s:app=api", "k8s:tier=backend"],
                            "workloads": [{"name": "api", "kind": "Deployment"}], "ip": "10.244.1.3", "port": 8080},
            "Type": "L3_L4", "node_name": "node-1", "event_type": {"type": 1, "sub_type": 12},
            "traffic_direction": "INGRESS", "is_reply": false, "Summary": "TCP Flags: SYN",
            "lifecycle": "NEW", "packets": 3, "bytes": 180,
            "first_seen": "2026-11-22T02:14:07.000Z", "last_seen": "2026-11-22T02:14:07.113Z",
            "observation_points": ["kfree_skb"]
        });
        merge(&mut base, patch);
        serde_json::from_value(base).expect("test record")
    }

    fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    if v.is_null() {
                        a.remove(&k);
                    } else if k == "l4" {
                        // One protocol key: replace, do not merge.
                        a.insert(k, v);
                    } else {
                        merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                    }
                }
            }
            (a, b) => *a = b,
        }
    }

    fn f(expr: &str) -> FlowFilter {
        FlowFilter::parse_expr(expr).unwrap_or_else(|e| panic!("{expr}: {e}"))
    }

    #[test]
    fn empty_filter_matches_everything() {
        assert!(f("").matches(&record(json!({}))));
        assert!(FilterSet::default().admits(&record(json!({}))));
    }

    #[test]
    fn verdict_values_are_ored_and_case_insensitive() {
        let r = record(json!({"verdict": "TIMED_OUT"}));
        assert!(f("verdict=dropped,timed_out").matches(&r));
        assert!(f("verdict=DROPPED verdict=TIMED_OUT").matches(&r));
        assert!(!f("verdict=DROPPED").matches(&r));
    }

    #[test]
    fn namespace_and_pod_must_hold_on_the_same_end() {
        let r = record(json!({"destination": {"namespace": "db", "pod_name": "pg-0"}}));
        // web is in prod, pg-0 in db.
        assert!(f("namespace=prod pod=web").matches(&r));
        assert!(f("namespace=db pod=pg").matches(&r));
        assert!(
            !f("namespace=prod pod=pg").matches(&r),
            "prod and pg- are on different ends"
        );
        assert!(f("pod=prod/web-7").matches(&r));
        assert!(!f("pod=db/web").matches(&r));
    }

    #[test]
    fn from_and_to_keys_apply_to_their_end() {
        let r = record(json!({}));
        assert!(f("from-pod=prod/web to-pod=prod/api").matches(&r));
        assert!(!f("from-pod=prod/api").matches(&r));
        assert!(f("from-label=app=web to-label=app=api,tier=backend").matches(&r));
        assert!(!f("to-label=app=api,tier=frontend").matches(&r));
        assert!(f("from-namespace=prod to-port=8080").matches(&r));
        assert!(!f("from-port=8080").matches(&r));
        assert!(f("from-ip=10.244.1.0/24 to-ip=10.244.1.3").matches(&r));
        assert!(!f("to-ip=10.244.1.2").matches(&r));
    }

    #[test]
    fn label_selectors_support_prefixes_inequality_and_existence() {
        let r = record(json!({}));
        assert!(f("label=k8s:app=api").matches(&r));
        assert!(f("to-label=tier").matches(&r));
        assert!(f("to-label=!canary").matches(&r));
        assert!(!f("to-label=!tier").matches(&r));
        assert!(f("to-label=app!=web").matches(&r));
        assert!(!f("from-label=app!=web").matches(&r));
        let world = record(
            json!({"destination": {"labels": ["reserved:world"], "namespace": null, "pod_name": null}}),
        );
        assert!(f("to-label=reserved:world").matches(&world));
    }

    #[test]
    fn port_protocol_reason_and_direction() {
        let r = record(json!({}));
        assert!(
            f("port=8080 protocol=TCP reason=netfilter_drop traffic-direction=ingress").matches(&r)
        );
        assert!(f("port=48420").matches(&r), "either end's port");
        assert!(!f("protocol=udp").matches(&r));
        assert!(!f("reason=TC_INGRESS").matches(&r));
        let refused =
            record(json!({"verdict": "REFUSED", "drop_reason_desc": null, "refusal": "TCP_RESET"}));
        assert!(f("reason=TCP_RESET").matches(&refused));
        let multi = record(json!({"drop_reasons": ["NETFILTER_DROP", "IP_RPFILTER"]}));
        assert!(f("reason=SKB_DROP_REASON_IP_RPFILTER").matches(&multi));
    }

    #[test]
    fn unenriched_endpoints_never_match_identity_keys_but_match_ips() {
        let r = record(
            json!({"source": {"identity": 0, "namespace": null, "pod_name": null, "labels": null, "workloads": null},
                              "destination": {"identity": 0, "namespace": null, "pod_name": null, "labels": null, "workloads": null}}),
        );
        assert!(!f("namespace=prod").matches(&r));
        assert!(!f("label=app").matches(&r));
        assert!(f("ip=10.244.1.3 port=8080").matches(&r));
    }

    #[test]
    fn allow_and_deny_lists() {
        let set = FilterSet {
            allow: vec![f("verdict=DROPPED"), f("verdict=REFUSED")],
            deny: vec![f("to-port=53")],
        };
        assert!(set.admits(&record(json!({}))));
        assert!(set.admits(&record(json!({"verdict": "REFUSED"}))));
        assert!(!set.admits(&record(json!({"verdict": "TIMED_OUT"}))));
        assert!(!set.admits(&record(
            json!({"l4": {"UDP": {"source_port": 5000, "destination_port": 53}}})
        )));
    }

    #[test]
    fn bad_input_names_the_key_and_lists_valid_values() {
        let e = FlowFilter::parse_expr("verdict=FORWARDED")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("verdict") && e.contains("DROPPED, TIMED_OUT, REFUSED, POLICY_NOT_ENFORCED"),
            "{e}"
        );
        let e = FlowFilter::parse_expr("protocol=icmp7")
            .unwrap_err()
            .to_string();
        assert!(e.contains("tcp, udp, sctp"), "{e}");
        let e = FlowFilter::parse_expr("colour=red")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown filter key \"colour\"") && e.contains("from-pod"),
            "{e}"
        );
        let e = FlowFilter::parse_expr("port=http").unwrap_err().to_string();
        assert!(e.contains("1-65535"), "{e}");
        assert!(
            FlowFilter::parse_expr("verdict")
                .unwrap_err()
                .to_string()
                .contains("key=value")
        );
        assert!(FlowFilter::parse_expr("pod=/web").is_err());
        assert!(
            FlowFilter::parse_expr("traffic-direction=sideways")
                .unwrap_err()
                .to_string()
                .contains("ingress, egress")
        );
        assert!(FlowFilter::parse_expr("reason=not a reason").is_err());
        assert!(FlowFilter::parse_expr("to-verdict=DROPPED").is_err());
    }

    #[test]
    fn json_form_round_trips() {
        let filter = f(
            "verdict=DROPPED,TIMED_OUT to-label=app=api,tier=backend from-pod=prod/web port=8080",
        );
        let text = serde_json::to_string(&filter).unwrap();
        let back: FlowFilter = serde_json::from_str(&text).unwrap();
        // The same terms (JSON objects do not keep key order).
        assert_eq!(back.to_json(), filter.to_json());
        assert_eq!(
            FlowFilter::parse_expr(&text).unwrap().to_json(),
            filter.to_json()
        );
        let r = record(json!({}));
        assert!(back.matches(&r));
        let err = serde_json::from_str::<FlowFilter>(r#"{"verdict": ["NOPE"]}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("DROPPED"), "{err}");
    }

    /// Found by the `filter` fuzz target (its own seed): the terms kept in
    /// the order typed came back from the JSON form in key order, so a
    /// filter and its wire form compared unequal.
    #[test]
    fn json_form_round_trips_to_an_equal_filter_whatever_the_order_typed() {
        for expr in [
            "verdict=DROPPED,TIMED_OUT namespace=prod to-port=53",
            "namespace=prod verdict=DROPPED namespace=dev",
        ] {
            let filter = f(expr);
            let wire = filter.to_json().to_string();
            assert_eq!(
                FlowFilter::from_json(&wire).unwrap(),
                filter,
                "{expr} -> {wire}"
            );
        }
        assert_eq!(
            f("verdict=DROPPED namespace=prod namespace=dev").to_string(),
            "namespace=prod namespace=dev verdict=DROPPED"
        );
    }
}
