//! Calico's own policies (projectcalico.org/v3 NetworkPolicy,
//! GlobalNetworkPolicy, Tier), compiled into the per-pod chains, written
//! from Calico's policy reference independently of netwatch-agent.
//!
//! When the manifests hold any Calico object, a pod's direction is judged
//! as Calico 3.30+ judges it:
//! - tiers by `order` (absent: last), then name: `kube-admin` (1000, holds
//!   the Admin tier's cluster policies, default action Pass), `default`
//!   (1,000,000: Calico policies without `tier`, and Kubernetes
//!   NetworkPolicies at order 1000), `kube-baseline` (10,000,000, the
//!   Baseline tier's, Pass), and the Tier objects (default action Deny
//!   unless `defaultAction: Pass`; a Tier object of a built-in name
//!   replaces its order and action);
//! - a tier applies to a pod's direction when one of its policies selects
//!   the pod for it; its policies by `order` (absent: last), then by the
//!   name Felix sorts by (`namespace/name`, Kubernetes NetworkPolicies as
//!   `namespace/knp.default.name`, global ones by name): the tie-break
//!   netwatch's engine documents;
//! - rules in order: Allow `return`s (allowed this way), Deny `drop`s,
//!   Pass `goto`s the next applying tier's chain, Log counts and goes on;
//! - no rule decided: the tier's end (a counted drop, or on to the next
//!   tier for `defaultAction: Pass`); after the last tier the profile
//!   allows.
//!
//! `types` defaults to Ingress, or Egress when the policy has egress rules
//! and no ingress rules, or both when it has both. Entity matches become
//! address matches on both ends of the packet: `nets` prefixes,
//! `notNets` and `notSelector` exclusions, and for `selector`,
//! `namespaceSelector` and `serviceAccounts` the addresses of the pods they
//! pick (in a namespaced policy without namespaceSelector, its namespace's).
//! Source `ports`/`notPorts` (numbers, ranges) become `th sport` matches.
//! Not compiled, refused by name: named source ports, `services`, `notICMP`,
//! named `notPorts` of egress rules (a per-destination exception an
//! nftables rule cannot say). Policies with `doNotTrack` or `preDNAT` act on
//! host endpoints only, so on no pod. Staged kinds are never enforced.

mod selector;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

pub use selector::{Sel, SelectorError};

use super::{
    Cidr, ClusterPod, Compiler, Direction, EnforceError, L4, Policy, PolicyChain, comment, join,
    split_families, tiers,
};
use crate::manifests::{CalicoEntity, CalicoPolicy, CalicoRule, Manifests, NumberOrName};

/// The order of the `default` tier and of Kubernetes NetworkPolicies in it.
const DEFAULT_TIER_ORDER: f64 = 1_000_000.0;
const KUBERNETES_POLICY_ORDER: f64 = 1000.0;

const NAMESPACE_LABEL: &str = "projectcalico.org/namespace";
const ORCHESTRATOR_LABEL: &str = "projectcalico.org/orchestrator";
const SERVICE_ACCOUNT_LABEL: &str = "projectcalico.org/serviceaccount";
const NAME_LABEL: &str = "projectcalico.org/name";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Allow,
    Deny,
    Pass,
    Log,
}

#[derive(Clone, Debug)]
enum CalicoPort {
    Range(u16, u16),
    Named(String),
}

#[derive(Clone, Debug, Default)]
struct Entity {
    nets: Option<Vec<Cidr>>,
    not_nets: Vec<Cidr>,
    selector: Option<Sel>,
    not_selector: Option<Sel>,
    namespace_selector: Option<Sel>,
    ports: Option<Vec<CalicoPort>>,
    not_ports: Vec<CalicoPort>,
    service_account_names: Option<Vec<String>>,
    service_account_selector: Option<Sel>,
}

impl Entity {
    fn selects_endpoints(&self) -> bool {
        self.selector.is_some()
            || self.namespace_selector.is_some()
            || self.service_account_names.is_some()
            || self.service_account_selector.is_some()
    }
}

#[derive(Clone, Debug)]
struct CompiledRule {
    index: usize,
    action: Action,
    protocol: Option<u8>,
    not_protocol: Option<u8>,
    icmp: Option<(Option<u8>, Option<u8>)>,
    ip_version: Option<u8>,
    source: Entity,
    destination: Entity,
}

/// A Calico NetworkPolicy or GlobalNetworkPolicy, validated.
#[derive(Clone, Debug)]
struct CompiledPolicy {
    kind: &'static str,
    namespace: Option<String>,
    name: String,
    tier: String,
    order: Option<f64>,
    selector: Sel,
    namespace_selector: Option<Sel>,
    service_account_selector: Option<Sel>,
    ingress: Option<Vec<CompiledRule>>,
    egress: Option<Vec<CompiledRule>>,
    host_only: bool,
}

impl CompiledPolicy {
    fn rules(&self, d: Direction) -> Option<&[CompiledRule]> {
        match d {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }

    /// `GlobalNetworkPolicy default-deny (tier default)`.
    fn label(&self) -> String {
        let ns = self
            .namespace
            .as_deref()
            .map(|n| format!("{n}/"))
            .unwrap_or_default();
        format!("{} {ns}{} (tier {})", self.kind, self.name, self.tier)
    }
}

/// A member of a tier, in evaluation order.
#[derive(Clone, Debug)]
enum Member {
    Calico(Box<CompiledPolicy>),
    /// Index into the NetworkPolicies.
    Kubernetes(usize),
}

#[derive(Clone, Debug)]
struct Tier {
    name: String,
    order: Option<f64>,
    pass_at_end: bool,
    members: Vec<Member>,
}

/// Every Calico tier of a cluster, sorted, ready to compile per pod.
#[derive(Clone, Debug)]
pub(super) struct CalicoTiers {
    tiers: Vec<Tier>,
}

/// Absent orders after every number, then the name.
fn order_key(order: Option<f64>, name: &str) -> (bool, i64, u64, String) {
    let o = order.unwrap_or(0.0);
    // total order on finite floats (NaN refused at parse): integer part,
    // then the bits of the fraction, good for the orders people write.
    (
        order.is_none(),
        o.floor() as i64,
        ((o - o.floor()) * 1e9) as u64,
        name.to_string(),
    )
}

impl CalicoTiers {
    /// `None` when the manifests have no Calico object: the cluster is then
    /// judged Admin -> NetworkPolicy -> Baseline as before.
    pub fn parse(m: &Manifests, policies: &[Policy]) -> Result<Option<CalicoTiers>, EnforceError> {
        if m.calico_policies.is_empty() && m.calico_tiers.is_empty() && m.calico_staged.is_empty() {
            return Ok(None);
        }
        let mut tiers: BTreeMap<String, Tier> = BTreeMap::new();
        for (name, order, pass) in [
            ("kube-admin", 1000.0, true),
            ("default", DEFAULT_TIER_ORDER, false),
            ("kube-baseline", 10_000_000.0, true),
        ] {
            tiers.insert(
                name.into(),
                Tier {
                    name: name.into(),
                    order: Some(order),
                    pass_at_end: pass,
                    members: Vec::new(),
                },
            );
        }
        for t in &m.calico_tiers {
            let name = t.metadata.name.clone().unwrap_or_default();
            let err = |field: &str, detail: String| EnforceError::ClusterPolicy {
                kind: "Tier".into(),
                name: name.clone(),
                field: field.into(),
                detail,
            };
            let pass_at_end = match t.spec.default_action.as_deref() {
                None | Some("Deny") => false,
                Some("Pass") => true,
                Some(other) => {
                    return Err(err(
                        "spec.defaultAction",
                        format!("{other:?}: use Deny or Pass"),
                    ));
                }
            };
            if t.spec.order.is_some_and(|o| !o.is_finite()) {
                return Err(err("spec.order", "not a number".into()));
            }
            let tier = tiers.entry(name.clone()).or_insert_with(|| Tier {
                name,
                order: None,
                pass_at_end,
                members: Vec::new(),
            });
            tier.order = t.spec.order;
            tier.pass_at_end = pass_at_end;
        }
        // (tier, order, Felix's name, kind rank, namespace, name, member)
        type Sorted = (Option<f64>, String, u8, Option<String>, String, Member);
        let mut members: Vec<(String, Sorted)> = Vec::new();
        for p in &m.calico_policies {
            let c = compile_policy(p)?;
            let felix = match &c.namespace {
                Some(ns) => format!("{ns}/{}", c.name),
                None => c.name.clone(),
            };
            let rank = if c.kind == "NetworkPolicy" { 0 } else { 1 };
            members.push((
                c.tier.clone(),
                (
                    c.order,
                    felix,
                    rank,
                    c.namespace.clone(),
                    c.name.clone(),
                    Member::Calico(Box::new(c)),
                ),
            ));
        }
        for (i, p) in policies.iter().enumerate() {
            let (ns, name) = p.id.split_once('/').unwrap_or(("default", &p.id));
            members.push((
                "default".into(),
                (
                    Some(KUBERNETES_POLICY_ORDER),
                    format!("{ns}/knp.default.{name}"),
                    2,
                    Some(ns.to_string()),
                    name.to_string(),
                    Member::Kubernetes(i),
                ),
            ));
        }
        members.sort_by(|(_, a), (_, b)| {
            order_key(a.0, &a.1)
                .cmp(&order_key(b.0, &b.1))
                .then_with(|| (a.2, &a.3, &a.4).cmp(&(b.2, &b.3, &b.4)))
        });
        for (tier, (.., member)) in members {
            let Some(t) = tiers.get_mut(&tier) else {
                let (kind, name) = match &member {
                    Member::Calico(c) => (c.kind, c.label()),
                    Member::Kubernetes(_) => ("NetworkPolicy", tier.clone()),
                };
                return Err(EnforceError::ClusterPolicy {
                    kind: kind.into(),
                    name,
                    field: "spec.tier".into(),
                    detail: format!(
                        "tier {tier:?} does not exist: add a projectcalico.org/v3 Tier"
                    ),
                });
            };
            t.members.push(member);
        }
        let mut tiers: Vec<Tier> = tiers.into_values().collect();
        tiers.sort_by_key(|t| order_key(t.order, &t.name));
        Ok(Some(CalicoTiers { tiers }))
    }
}

fn protocol_number(value: &NumberOrName, field: &str, err: &ErrFn<'_>) -> Result<u8, EnforceError> {
    let n = match value {
        NumberOrName::Number(n) => *n,
        NumberOrName::Name(name) => match name.to_ascii_lowercase().as_str() {
            "tcp" => 6,
            "udp" => 17,
            "icmp" => 1,
            "icmpv6" => 58,
            "sctp" => 132,
            "udplite" => 136,
            other => other.parse().map_err(|_| {
                err(
                    field,
                    format!(
                        "{name:?}: use TCP, UDP, ICMP, ICMPv6, SCTP, UDPLite or a number 1-255"
                    ),
                )
            })?,
        },
    };
    u8::try_from(n)
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| err(field, format!("{n} is not a protocol number (1-255)")))
}

type ErrFn<'a> = dyn Fn(&str, String) -> EnforceError + 'a;

fn selector(text: Option<&str>, field: &str, err: &ErrFn<'_>) -> Result<Option<Sel>, EnforceError> {
    text.map(|t| Sel::parse(t).map_err(|e| err(field, e.to_string())))
        .transpose()
}

fn ports(
    list: &[NumberOrName],
    field: &str,
    err: &ErrFn<'_>,
) -> Result<Vec<CalicoPort>, EnforceError> {
    let mut out = Vec::new();
    for (i, p) in list.iter().enumerate() {
        let f = format!("{field}[{i}]");
        let number = |s: &str| -> Result<u16, EnforceError> {
            s.trim()
                .parse::<u16>()
                .map_err(|_| err(&f, format!("{s:?} is not a port number (0-65535)")))
        };
        out.push(match p {
            NumberOrName::Number(n) => {
                let n = u16::try_from(*n)
                    .map_err(|_| err(&f, format!("{n} is not a port number (0-65535)")))?;
                CalicoPort::Range(n, n)
            }
            NumberOrName::Name(text) => match text.split_once(':') {
                Some((a, b)) => {
                    let (a, b) = (number(a)?, number(b)?);
                    if a > b {
                        return Err(err(&f, format!("range {text:?} ends before it starts")));
                    }
                    CalicoPort::Range(a, b)
                }
                None if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) => {
                    let n = number(text)?;
                    CalicoPort::Range(n, n)
                }
                None if text.is_empty() => return Err(err(&f, "empty port".into())),
                None => CalicoPort::Named(text.clone()),
            },
        });
    }
    Ok(out)
}

fn entity(e: &CalicoEntity, field: &str, err: &ErrFn<'_>) -> Result<Entity, EnforceError> {
    let nets =
        |list: &Option<Vec<String>>, name: &str| -> Result<Option<Vec<Cidr>>, EnforceError> {
            list.as_ref()
                .map(|l| {
                    l.iter()
                        .enumerate()
                        .map(|(i, n)| {
                            let text = if n.contains('/') {
                                n.clone()
                            } else {
                                match n.parse::<IpAddr>() {
                                    Ok(IpAddr::V4(_)) => format!("{n}/32"),
                                    Ok(IpAddr::V6(_)) => format!("{n}/128"),
                                    Err(_) => n.clone(),
                                }
                            };
                            Cidr::parse(&text).map_err(|d| err(&format!("{field}.{name}[{i}]"), d))
                        })
                        .collect()
                })
                .transpose()
        };
    if e.services.is_some() {
        return Err(err(
            &format!("{field}.services"),
            "service matches are not compiled by the lab".into(),
        ));
    }
    let sa = e.service_accounts.as_ref();
    Ok(Entity {
        nets: nets(&e.nets, "nets")?,
        not_nets: nets(&e.not_nets, "notNets")?.unwrap_or_default(),
        selector: selector(e.selector.as_deref(), &format!("{field}.selector"), err)?,
        not_selector: selector(
            e.not_selector.as_deref(),
            &format!("{field}.notSelector"),
            err,
        )?,
        namespace_selector: selector(
            e.namespace_selector.as_deref(),
            &format!("{field}.namespaceSelector"),
            err,
        )?,
        ports: e
            .ports
            .as_deref()
            .map(|p| ports(p, &format!("{field}.ports"), err))
            .transpose()?,
        not_ports: ports(
            e.not_ports.as_deref().unwrap_or_default(),
            &format!("{field}.notPorts"),
            err,
        )?,
        service_account_names: sa.and_then(|s| s.names.clone()),
        service_account_selector: selector(
            sa.and_then(|s| s.selector.as_deref()),
            &format!("{field}.serviceAccounts.selector"),
            err,
        )?,
    })
}

fn rule(
    r: &CalicoRule,
    index: usize,
    field: &str,
    egress: bool,
    err: &ErrFn<'_>,
) -> Result<CompiledRule, EnforceError> {
    let action = match r.action.as_str() {
        "Allow" => Action::Allow,
        "Deny" => Action::Deny,
        "Pass" => Action::Pass,
        "Log" => Action::Log,
        other => {
            return Err(err(
                &format!("{field}.action"),
                format!("{other:?}: use Allow, Deny, Pass or Log"),
            ));
        }
    };
    let protocol = r
        .protocol
        .as_ref()
        .map(|p| protocol_number(p, &format!("{field}.protocol"), err))
        .transpose()?;
    let has_ports = |e: &CalicoEntity| e.ports.is_some() || e.not_ports.is_some();
    if (has_ports(&r.source) || has_ports(&r.destination))
        && !matches!(protocol, Some(6 | 17 | 132 | 136))
    {
        return Err(err(
            &format!("{field}.protocol"),
            "ports need protocol TCP, UDP, SCTP or UDPLite".into(),
        ));
    }
    let source = entity(&r.source, &format!("{field}.source"), err)?;
    // Numbers and ranges become `th sport`; a named source port would be
    // a per-source-pod exception, like egress named notPorts.
    if source
        .ports
        .iter()
        .flatten()
        .chain(&source.not_ports)
        .any(|p| matches!(p, CalicoPort::Named(_)))
    {
        return Err(err(
            &format!("{field}.source"),
            "named source ports are not compiled by the lab".into(),
        ));
    }
    if r.not_icmp.is_some() {
        return Err(err(
            &format!("{field}.notICMP"),
            "notICMP is not compiled by the lab".into(),
        ));
    }
    if r.http.is_some() {
        return Err(err(
            &format!("{field}.http"),
            "HTTP matches need an L7 proxy: not compiled by the lab".into(),
        ));
    }
    if r.icmp.is_some() && !matches!(protocol, Some(1 | 58)) {
        return Err(err(
            &format!("{field}.icmp"),
            "icmp needs protocol ICMP or ICMPv6".into(),
        ));
    }
    if let Some(v) = r.ip_version.filter(|v| !matches!(v, 4 | 6)) {
        return Err(err(
            &format!("{field}.ipVersion"),
            format!("{v}: use 4 or 6"),
        ));
    }
    let destination = entity(&r.destination, &format!("{field}.destination"), err)?;
    if egress
        && destination
            .not_ports
            .iter()
            .any(|p| matches!(p, CalicoPort::Named(_)))
    {
        return Err(err(
            &format!("{field}.destination.notPorts"),
            "a named port in notPorts of an egress rule is not compiled by the lab".into(),
        ));
    }
    Ok(CompiledRule {
        index,
        action,
        protocol,
        not_protocol: r
            .not_protocol
            .as_ref()
            .map(|p| protocol_number(p, &format!("{field}.notProtocol"), err))
            .transpose()?,
        icmp: r.icmp.as_ref().map(|i| (i.icmp_type, i.code)),
        ip_version: r.ip_version,
        source,
        destination,
    })
}

fn compile_policy(p: &CalicoPolicy) -> Result<CompiledPolicy, EnforceError> {
    let global = p.kind == "GlobalNetworkPolicy";
    let kind = if global {
        "GlobalNetworkPolicy"
    } else {
        "NetworkPolicy"
    };
    let namespace = (!global).then(|| {
        p.metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into())
    });
    let name = p.metadata.name.clone().unwrap_or_default();
    let shown = match &namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name.clone(),
    };
    let err = |field: &str, detail: String| EnforceError::ClusterPolicy {
        kind: format!("{kind} ({})", crate::manifests::CALICO_API_VERSION),
        name: shown.clone(),
        field: field.into(),
        detail,
    };
    let spec = &p.spec;
    if !global {
        for (field, set) in [
            ("spec.namespaceSelector", spec.namespace_selector.is_some()),
            ("spec.doNotTrack", spec.do_not_track.is_some()),
            ("spec.preDNAT", spec.pre_dnat.is_some()),
            ("spec.applyOnForward", spec.apply_on_forward.is_some()),
        ] {
            if set {
                return Err(err(
                    field,
                    "only a GlobalNetworkPolicy has this field".into(),
                ));
            }
        }
    }
    if spec.order.is_some_and(|o| !o.is_finite()) {
        return Err(err("spec.order", "not a number".into()));
    }
    let rules = |list: &Option<Vec<CalicoRule>>, field: &str, egress: bool| {
        list.iter()
            .flatten()
            .enumerate()
            .map(|(i, r)| rule(r, i, &format!("spec.{field}[{i}]"), egress, &err))
            .collect::<Result<Vec<_>, _>>()
    };
    let ingress = rules(&spec.ingress, "ingress", false)?;
    let egress = rules(&spec.egress, "egress", true)?;
    let (mut has_ingress, mut has_egress) = match &spec.types {
        Some(_) => (false, false),
        // Calico's defaulting.
        None => match (!ingress.is_empty(), !egress.is_empty()) {
            (_, false) => (true, false),
            (false, true) => (false, true),
            (true, true) => (true, true),
        },
    };
    for (i, t) in spec.types.iter().flatten().enumerate() {
        match t.as_str() {
            "Ingress" => has_ingress = true,
            "Egress" => has_egress = true,
            other => {
                return Err(err(
                    &format!("spec.types[{i}]"),
                    format!("{other:?}: use Ingress or Egress"),
                ));
            }
        }
    }
    Ok(CompiledPolicy {
        kind,
        namespace,
        name: name.clone(),
        tier: spec.tier.clone().unwrap_or_else(|| "default".into()),
        order: spec.order,
        selector: selector(
            Some(spec.selector.as_deref().unwrap_or("")),
            "spec.selector",
            &err,
        )?
        .unwrap_or(Sel::All),
        namespace_selector: selector(
            spec.namespace_selector.as_deref(),
            "spec.namespaceSelector",
            &err,
        )?,
        service_account_selector: selector(
            spec.service_account_selector.as_deref(),
            "spec.serviceAccountSelector",
            &err,
        )?,
        ingress: has_ingress.then_some(ingress),
        egress: has_egress.then_some(egress),
        // Untracked and pre-DNAT policies apply to host endpoints only.
        host_only: spec.do_not_track == Some(true) || spec.pre_dnat == Some(true),
    })
}

/// The address side of one end of a packet, one alternative of many.
#[derive(Clone, Debug)]
struct AddressMatch {
    /// `Some(true)`: IPv6 only; `None`: either family.
    v6: Option<bool>,
    positive: Positive,
    /// Excluded prefixes, of the match's family.
    negative: Vec<Cidr>,
}

#[derive(Clone, Debug)]
enum Positive {
    Any,
    Prefix(Cidr),
    Hosts(Vec<IpAddr>),
}

/// One alternative of a rule's destination port.
#[derive(Clone, Debug)]
enum PortAlternative {
    Any,
    Range(u16, u16),
    /// A named port on egress: this number, to these destination pods.
    To(u16, Vec<IpAddr>),
}

fn l4_of(protocol: Option<u8>) -> Option<L4> {
    match protocol {
        Some(6) => Some(L4::Tcp),
        Some(17) => Some(L4::Udp),
        Some(132) => Some(L4::Sctp),
        _ => None,
    }
}

fn protocol_nft(p: u8) -> String {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        132 => "sctp".into(),
        n => n.to_string(),
    }
}

fn range_nft(a: u16, b: u16) -> String {
    if a == b {
        a.to_string()
    } else {
        format!("{a}-{b}")
    }
}

impl Compiler<'_> {
    /// The pod's service account (`default` when the spec names none).
    fn service_account(&self, pod: &ClusterPod) -> String {
        self.cluster
            .manifests
            .pods
            .iter()
            .find(|p| {
                p.metadata.name.as_deref() == Some(&pod.name)
                    && p.metadata.namespace.as_deref().unwrap_or("default") == pod.namespace
            })
            .and_then(|p| p.spec.as_ref()?.service_account_name.clone())
            .unwrap_or_else(|| "default".into())
    }

    /// The labels Calico selectors see on a pod: its own and Calico's.
    fn calico_labels(&self, pod: &ClusterPod) -> BTreeMap<String, String> {
        let mut labels = pod.labels.clone();
        labels.insert(NAMESPACE_LABEL.into(), pod.namespace.clone());
        labels.insert(ORCHESTRATOR_LABEL.into(), "k8s".into());
        labels.insert(SERVICE_ACCOUNT_LABEL.into(), self.service_account(pod));
        labels
    }

    /// A namespace's labels as namespaceSelectors see them.
    fn calico_namespace_labels(&self, namespace: &str) -> BTreeMap<String, String> {
        let mut labels = self.cluster.namespace_labels(namespace);
        labels.insert(NAME_LABEL.into(), namespace.into());
        labels
    }

    fn service_account_labels(&self, pod: &ClusterPod) -> BTreeMap<String, String> {
        BTreeMap::from([(NAME_LABEL.to_string(), self.service_account(pod))])
    }

    fn policy_selects(&self, p: &CompiledPolicy, pod: &ClusterPod, d: Direction) -> bool {
        if p.rules(d).is_none() || p.host_only || !pod.is_policy_pod() {
            return false;
        }
        if p.namespace.as_ref().is_some_and(|ns| *ns != pod.namespace) {
            return false;
        }
        if let Some(sel) = &p.namespace_selector
            && !sel.matches(&self.calico_namespace_labels(&pod.namespace))
        {
            return false;
        }
        if let Some(sel) = &p.service_account_selector
            && !sel.matches(&self.service_account_labels(pod))
        {
            return false;
        }
        p.selector.matches(&self.calico_labels(pod))
    }

    /// Whether an entity's selecting part picks `pod`.
    fn entity_selects(&self, e: &Entity, policy_namespace: Option<&str>, pod: &ClusterPod) -> bool {
        match &e.namespace_selector {
            // global() in a rule's namespaceSelector: non-namespaced
            // endpoints (host endpoints, global network sets), no pod.
            Some(Sel::Global) => return false,
            Some(sel) => {
                if !sel.matches(&self.calico_namespace_labels(&pod.namespace)) {
                    return false;
                }
            }
            None => {
                if policy_namespace.is_some_and(|ns| ns != pod.namespace) {
                    return false;
                }
            }
        }
        if let Some(sel) = &e.selector
            && !sel.matches(&self.calico_labels(pod))
        {
            return false;
        }
        if let Some(names) = &e.service_account_names
            && !names.contains(&self.service_account(pod))
        {
            return false;
        }
        if let Some(sel) = &e.service_account_selector
            && !sel.matches(&self.service_account_labels(pod))
        {
            return false;
        }
        true
    }

    /// The address alternatives of an entity (empty: it matches nothing).
    fn entity_addresses(&self, e: &Entity, policy_namespace: Option<&str>) -> Vec<AddressMatch> {
        let pods = || self.cluster.pods.iter().filter(|p| p.is_policy_pod());
        let excluded: Vec<IpAddr> = match &e.not_selector {
            Some(sel) => pods()
                .filter(|p| sel.matches(&self.calico_labels(p)))
                .flat_map(|p| p.ips.iter().copied())
                .collect(),
            None => Vec::new(),
        };
        let in_nets = |ip: &IpAddr| {
            e.nets
                .as_ref()
                .is_none_or(|nets| nets.iter().any(|n| n.contains(*ip)))
                && !e.not_nets.iter().any(|n| n.contains(*ip))
        };
        if e.selects_endpoints() {
            let ips: Vec<IpAddr> = pods()
                .filter(|p| self.entity_selects(e, policy_namespace, p))
                .flat_map(|p| p.ips.iter().copied())
                .filter(|ip| in_nets(ip) && !excluded.contains(ip))
                .collect();
            return split_families(&ips)
                .into_iter()
                .map(|(family, ips)| AddressMatch {
                    v6: Some(family == "ip6"),
                    positive: Positive::Hosts(ips),
                    negative: Vec::new(),
                })
                .collect();
        }
        let mut negative = e.not_nets.clone();
        for ip in BTreeSet::from_iter(excluded) {
            let len = if ip.is_ipv4() { 32 } else { 128 };
            negative.extend(Cidr::parse(&format!("{ip}/{len}")));
        }
        let of_family = |v6: bool| -> Vec<Cidr> {
            negative
                .iter()
                .copied()
                .filter(|c| c.addr.is_ipv6() == v6)
                .collect()
        };
        match &e.nets {
            Some(nets) => nets
                .iter()
                .map(|n| AddressMatch {
                    v6: Some(n.addr.is_ipv6()),
                    positive: Positive::Prefix(*n),
                    negative: of_family(n.addr.is_ipv6()),
                })
                .collect(),
            None if negative.is_empty() => vec![AddressMatch {
                v6: None,
                positive: Positive::Any,
                negative: Vec::new(),
            }],
            None => [false, true]
                .into_iter()
                .map(|v6| AddressMatch {
                    v6: Some(v6),
                    positive: Positive::Any,
                    negative: of_family(v6),
                })
                .collect(),
        }
    }

    /// A rule's destination port alternatives and `!=` exclusions for
    /// `pod` in `d` (the destination is the pod on ingress, the peer on
    /// egress).
    fn port_alternatives(
        &self,
        pod: &ClusterPod,
        d: Direction,
        r: &CompiledRule,
    ) -> (Vec<PortAlternative>, Vec<(u16, u16)>) {
        let l4 = l4_of(r.protocol);
        let named_here =
            |name: &str| -> Vec<u16> { l4.map(|l| pod.named_port(name, l)).unwrap_or_default() };
        let alternatives = match &r.destination.ports {
            None => vec![PortAlternative::Any],
            Some(list) => {
                let mut out = Vec::new();
                for p in list {
                    match (p, d) {
                        (CalicoPort::Range(a, b), _) => out.push(PortAlternative::Range(*a, *b)),
                        (CalicoPort::Named(name), Direction::Ingress) => out.extend(
                            named_here(name)
                                .into_iter()
                                .map(|n| PortAlternative::Range(n, n)),
                        ),
                        (CalicoPort::Named(name), Direction::Egress) => {
                            let mut by_port: BTreeMap<u16, Vec<IpAddr>> = BTreeMap::new();
                            for dest in self.cluster.pods.iter().filter(|p| p.is_policy_pod()) {
                                for n in l4.map(|l| dest.named_port(name, l)).unwrap_or_default() {
                                    by_port
                                        .entry(n)
                                        .or_default()
                                        .extend(dest.ips.iter().copied());
                                }
                            }
                            out.extend(
                                by_port
                                    .into_iter()
                                    .map(|(n, ips)| PortAlternative::To(n, ips)),
                            );
                        }
                    }
                }
                out
            }
        };
        let mut excluded = Vec::new();
        for p in &r.destination.not_ports {
            match p {
                CalicoPort::Range(a, b) => excluded.push((*a, *b)),
                // Egress named notPorts are refused at parse time.
                CalicoPort::Named(name) => {
                    excluded.extend(named_here(name).into_iter().map(|n| (n, n)))
                }
            }
        }
        (alternatives, excluded)
    }

    /// nft match expressions (one rule each) for a Calico rule of `policy`
    /// on `pod`'s traffic in `d`. Empty: the rule cannot match.
    fn calico_rule_matches(
        &self,
        pod: &ClusterPod,
        d: Direction,
        policy: &CompiledPolicy,
        r: &CompiledRule,
    ) -> Vec<String> {
        let ns = policy.namespace.as_deref();
        let sources = self.entity_addresses(&r.source, ns);
        let destinations = self.entity_addresses(&r.destination, ns);
        let (ports, excluded) = self.port_alternatives(pod, d, r);
        let mut fixed = Vec::new();
        if let Some(v) = r.ip_version {
            fixed.push(format!("meta nfproto ipv{v}"));
        }
        if let Some(p) = r.protocol {
            fixed.push(format!("meta l4proto {}", protocol_nft(p)));
        }
        if let Some(p) = r.not_protocol {
            fixed.push(format!("meta l4proto != {}", protocol_nft(p)));
        }
        if let Some((t, c)) = r.icmp {
            let family = if r.protocol == Some(58) {
                "icmpv6"
            } else {
                "icmp"
            };
            if let Some(t) = t {
                fixed.push(format!("{family} type {t}"));
            }
            if let Some(c) = c {
                fixed.push(format!("{family} code {c}"));
            }
        }
        let compatible = |a: Option<bool>, b: Option<bool>| a.is_none() || b.is_none() || a == b;
        // (family, clause) per port alternative.
        let mut port_clauses: Vec<(Option<bool>, String)> = Vec::new();
        for port in &ports {
            match port {
                PortAlternative::Any => port_clauses.push((None, String::new())),
                PortAlternative::Range(a, b) => {
                    port_clauses.push((None, format!("th dport {}", range_nft(*a, *b))))
                }
                PortAlternative::To(n, ips) => {
                    for (family, ips) in split_families(ips) {
                        port_clauses.push((
                            Some(family == "ip6"),
                            format!("{family} daddr {{ {} }} th dport {n}", join(&ips)),
                        ));
                    }
                }
            }
        }
        // Source ports: one alternative per range of `ports` (none: the
        // rule matches nothing), every range of `notPorts` excluded.
        let source_clauses: Vec<String> = match &r.source.ports {
            None => vec![String::new()],
            Some(list) => list
                .iter()
                .filter_map(|p| match p {
                    CalicoPort::Range(a, b) => Some(format!("th sport {}", range_nft(*a, *b))),
                    // Refused at parse time.
                    CalicoPort::Named(_) => None,
                })
                .collect(),
        };
        let source_excluded: Vec<String> = r
            .source
            .not_ports
            .iter()
            .filter_map(|p| match p {
                CalicoPort::Range(a, b) => Some(format!("th sport != {}", range_nft(*a, *b))),
                CalicoPort::Named(_) => None,
            })
            .collect();
        let mut out = Vec::new();
        for s in &sources {
            for t in &destinations {
                for ((v6, clause), source_clause) in port_clauses
                    .iter()
                    .flat_map(|c| source_clauses.iter().map(move |sc| (c, sc)))
                {
                    // ipVersion, the addresses and a named port's pods
                    // must agree on the family.
                    let family = r.ip_version.map(|v| v == 6);
                    let families = [s.v6, t.v6, *v6, family];
                    if families
                        .iter()
                        .any(|a| families.iter().any(|b| !compatible(*a, *b)))
                    {
                        continue;
                    }
                    let mut parts = fixed.clone();
                    parts.extend(address_clauses(s, "saddr"));
                    parts.extend(address_clauses(t, "daddr"));
                    if !clause.is_empty() {
                        parts.push(clause.clone());
                    }
                    for (a, b) in &excluded {
                        parts.push(format!("th dport != {}", range_nft(*a, *b)));
                    }
                    if !source_clause.is_empty() {
                        parts.push(source_clause.clone());
                    }
                    parts.extend(source_excluded.iter().cloned());
                    out.push(parts.join(" "));
                }
            }
        }
        out
    }

    /// The pod's chains for `d` under Calico's tiers: the entry chain, which
    /// goes to the first tier that applies, and one chain per such tier.
    pub(super) fn calico_chains(
        &mut self,
        pod: &ClusterPod,
        host_if: &str,
        d: Direction,
        policies: &[Policy],
        cluster_policies: &[tiers::ClusterPolicy],
        calico: &CalicoTiers,
    ) -> Vec<PolicyChain> {
        let id = pod.id();
        let entry = format!("{}/{id}", d.field());
        let namespace_labels = self.cluster.namespace_labels(&pod.namespace);
        let acting: Vec<&tiers::ClusterPolicy> = cluster_policies
            .iter()
            .filter(|p| {
                !p.rules(d).is_empty()
                    && p.subject.namespaces.matches(&namespace_labels)
                    && p.subject.pods.matches(&pod.labels)
            })
            .collect();
        // The tiers that apply: (tier, cluster policies, members selecting).
        let mut applying = Vec::new();
        for t in &calico.tiers {
            let cluster: Vec<&tiers::ClusterPolicy> = match t.name.as_str() {
                "kube-admin" => acting
                    .iter()
                    .copied()
                    .filter(|p| p.tier == tiers::Tier::Admin)
                    .collect(),
                "kube-baseline" => acting
                    .iter()
                    .copied()
                    .filter(|p| p.tier == tiers::Tier::Baseline)
                    .collect(),
                _ => Vec::new(),
            };
            let members: Vec<&Member> = t
                .members
                .iter()
                .filter(|m| match m {
                    Member::Calico(p) => self.policy_selects(p, pod, d),
                    Member::Kubernetes(i) => {
                        let p = &policies[*i];
                        p.namespace == pod.namespace
                            && p.selector.matches(&pod.labels)
                            && p.rules(d).is_some()
                            && pod.is_policy_pod()
                    }
                })
                .collect();
            if !cluster.is_empty() || !members.is_empty() {
                applying.push((t, cluster, members));
            }
        }
        let chain_name = |t: &Tier| format!("{entry}/tier-{}", t.name);
        let mut labels: Vec<String> = Vec::new();
        let mut chains = Vec::new();
        let entry_rules = match applying.first() {
            Some((t, ..)) => vec![format!("goto {}", chain_name(t))],
            None => Vec::new(),
        };
        for (k, (t, cluster, members)) in applying.iter().enumerate() {
            let next = applying.get(k + 1).map(|(n, ..)| chain_name(n));
            let pass = match &next {
                Some(n) => format!("goto {n}"),
                None => "return".to_string(),
            };
            let mut rules = Vec::new();
            // Pass goes to the next tier; past the last, the profile allows.
            for p in cluster {
                labels.push(p.label());
                self.tier_rules(pod, d, p, next.as_deref(), &mut rules);
            }
            for m in members {
                match m {
                    Member::Calico(p) => {
                        labels.push(p.label());
                        for r in p.rules(d).unwrap_or_default() {
                            let (verdict, word) = match r.action {
                                Action::Allow => ("return".to_string(), "Allow"),
                                Action::Deny => ("drop".to_string(), "Deny"),
                                Action::Pass => (pass.clone(), "Pass"),
                                Action::Log => (String::new(), "Log"),
                            };
                            let text = comment(&format!(
                                "{} {}[{}] {word} {id}",
                                p.label(),
                                d.field(),
                                r.index
                            ));
                            for m in self.calico_rule_matches(pod, d, p, r) {
                                let sep = if m.is_empty() { "" } else { " " };
                                let space = if verdict.is_empty() { "" } else { " " };
                                rules.push(format!(
                                    "{m}{sep}counter{space}{verdict} comment \"{text}\""
                                ));
                            }
                        }
                    }
                    Member::Kubernetes(i) => {
                        let p = &policies[*i];
                        labels.push(format!("NetworkPolicy {} (tier {})", p.id, t.name));
                        self.network_policy_allows(pod, d, p, &mut rules);
                    }
                }
            }
            if !members.is_empty() && !t.pass_at_end {
                rules.push(format!(
                    "counter drop comment \"{}\"",
                    comment(&end_of_tier_comment(&t.name, &id, d))
                ));
            } else if next.is_some() {
                rules.push(pass.clone());
            }
            chains.push((chain_name(t), false, rules));
        }
        let isolated_by: Vec<String> = policies
            .iter()
            .filter(|p| {
                p.namespace == pod.namespace
                    && p.selector.matches(&pod.labels)
                    && p.rules(d).is_some()
            })
            .map(|p| p.id.clone())
            .collect();
        std::iter::once((entry, true, entry_rules))
            .chain(chains)
            .map(|(name, is_entry, rules)| PolicyChain {
                name,
                pod: id.clone(),
                host_if: host_if.to_string(),
                ips: pod.ips.clone(),
                direction: d,
                isolated_by: isolated_by.clone(),
                cluster_policies: labels.clone(),
                entry: is_entry,
                rules,
            })
            .collect()
    }
}

/// The comment of a tier's end-of-tier drop of a pod's direction.
pub fn end_of_tier_comment(tier: &str, pod: &str, d: Direction) -> String {
    format!("end of tier {tier}: {pod} {d} denied")
}

/// `ip saddr 10.0.0.0/8 ip saddr != 10.1.0.0/16` and the like.
fn address_clauses(m: &AddressMatch, field: &str) -> Vec<String> {
    let family = match m.v6 {
        Some(true) => "ip6",
        Some(false) => "ip",
        None => return Vec::new(),
    };
    let mut out = Vec::new();
    match &m.positive {
        Positive::Any => {}
        Positive::Prefix(c) => out.push(format!("{family} {field} {c}")),
        Positive::Hosts(ips) => out.push(format!("{family} {field} {{ {} }}", join(ips))),
    }
    for n in &m.negative {
        out.push(format!("{family} {field} != {n}"));
    }
    if out.is_empty() {
        out.push(format!(
            "meta nfproto {}",
            if family == "ip" { "ipv4" } else { "ipv6" }
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::super::{CompiledCluster, EnforceOptions, L4, LabCluster, PodPlacement};
    use crate::manifests::Manifests;

    const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: x, labels: { env: prod } }
---
apiVersion: v1
kind: Namespace
metadata: { name: y }
---
apiVersion: v1
kind: Pod
metadata: { name: web, namespace: x, labels: { app: web } }
spec: { serviceAccountName: web, containers: [ { name: c, ports: [ { name: http, containerPort: 80 } ] } ] }
status: { podIP: 10.0.1.1 }
---
apiVersion: v1
kind: Pod
metadata: { name: api, namespace: x, labels: { app: api } }
spec: { containers: [ { name: c, ports: [ { name: http, containerPort: 8080 } ] } ] }
status: { podIP: 10.0.1.2 }
---
apiVersion: v1
kind: Pod
metadata: { name: dns, namespace: y, labels: { app: dns } }
spec: { containers: [ { name: c, ports: [ { name: dns, containerPort: 53, protocol: UDP } ] } ] }
status: { podIP: 10.0.2.1 }
"#;

    fn compiled(policies: &str) -> (LabCluster, CompiledCluster) {
        try_compiled(policies).unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_compiled(policies: &str) -> Result<(LabCluster, CompiledCluster), String> {
        let m = Manifests::parse("t.yaml", &format!("{PODS}\n---\n{policies}")).unwrap();
        let placed = m
            .pods
            .iter()
            .enumerate()
            .map(|(i, p)| PodPlacement {
                namespace: p.metadata.namespace.clone().unwrap(),
                name: p.metadata.name.clone().unwrap(),
                node: format!("node-{}", i % 2),
                host_if: format!("cali{i:011}"),
                ips: Vec::new(),
                host_network: false,
            })
            .collect();
        let cluster = LabCluster::new(m, placed).unwrap();
        let c = CompiledCluster::new(&cluster, &EnforceOptions::default())
            .map_err(|e| e.to_string())?;
        Ok((cluster, c))
    }

    fn allowed(c: &(LabCluster, CompiledCluster), from: &str, to: &str, l4: L4, port: u16) -> bool {
        let to: IpAddr = c.0.pod(to).unwrap().ips[0];
        c.1.decide(from, to, l4, port).unwrap().allowed()
    }

    const DEFAULT_DENY: &str = r#"
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: { name: default-deny }
spec:
  selector: projectcalico.org/namespace == 'x'
  types: [Ingress, Egress]
"#;

    #[test]
    fn a_global_default_deny_drops_at_the_end_of_the_default_tier() {
        let c = compiled(DEFAULT_DENY);
        assert!(!allowed(&c, "x/web", "y/dns", L4::Udp, 53));
        assert!(!allowed(&c, "x/web", "x/api", L4::Tcp, 8080));
        // y is selected by nothing: the profile allows.
        assert!(allowed(&c, "y/dns", "y/dns", L4::Udp, 53));
        let d =
            c.1.decide("x/web", c.0.pod("y/dns").unwrap().ips[0], L4::Udp, 53)
                .unwrap();
        assert_eq!(
            d.egress,
            Some(super::super::Judgement::Dropped {
                by: super::end_of_tier_comment("default", "x/web", super::Direction::Egress)
            })
        );
        // DNS allowed at a lower order decides first.
        let dns = format!(
            "{DEFAULT_DENY}---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{ name: allow-dns }}\nspec:\n  order: 10\n  selector: all()\n  types: [Egress]\n  egress: [ {{ action: Allow, protocol: UDP, destination: {{ ports: [dns], namespaceSelector: \"kubernetes.io/metadata.name == 'y'\" }} }} ]\n"
        );
        let c = compiled(&dns);
        assert!(allowed(&c, "x/web", "y/dns", L4::Udp, 53));
        assert!(!allowed(&c, "x/web", "y/dns", L4::Tcp, 53));
    }

    #[test]
    fn deny_pass_log_and_orders() {
        let policies = r#"
apiVersion: projectcalico.org/v3
kind: Tier
metadata: { name: security }
spec: { order: 100 }
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: { name: sec }
spec:
  tier: security
  selector: app == 'api'
  ingress:
  - { action: Log }
  - { action: Deny, protocol: TCP, source: { serviceAccounts: { names: [web] } }, destination: { ports: ["8000:8079"] } }
  - { action: Pass, source: { nets: [10.0.0.0/16], notNets: [10.0.2.0/24] } }
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: { name: b-allow, namespace: x }
spec:
  order: 5
  selector: app == 'api'
  ingress: [ { action: Allow, protocol: TCP, destination: { ports: [http], notPorts: [8081] } } ]
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: { name: a-deny, namespace: x }
spec:
  order: 5
  selector: app == 'api'
  ingress: [ { action: Deny, source: { selector: app == 'web' }, protocol: 6, destination: { ports: [8080] } } ]
"#;
        let c = compiled(policies);
        // web -> api 8080: passed by security, a-deny (same order, name first) denies.
        assert!(!allowed(&c, "x/web", "x/api", L4::Tcp, 8080));
        // web -> api 8000: the service-account Deny in security.
        assert!(!allowed(&c, "x/web", "x/api", L4::Tcp, 8000));
        // dns (10.0.2.1) is not passed: the end of tier security denies.
        assert!(!allowed(&c, "y/dns", "x/api", L4::Tcp, 8080));
        // api -> api 8080: passed, b-allow allows the named port.
        assert!(allowed(&c, "x/api", "x/api", L4::Tcp, 8080));
        assert!(!allowed(&c, "x/api", "x/api", L4::Udp, 8080));
    }

    #[test]
    fn bad_calico_policies_are_refused_naming_the_field() {
        let e = try_compiled(
            "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: { name: p, namespace: x }\nspec: { selector: \"app == 'x\" }\n",
        )
        .err()
        .unwrap();
        assert!(
            e.contains("x/p") && e.contains("spec.selector") && e.contains("column"),
            "{e}"
        );
        for (spec, field) in [
            ("{ tier: nope }", "spec.tier"),
            (
                "{ ingress: [ { action: Accept } ] }",
                "spec.ingress[0].action",
            ),
            (
                "{ ingress: [ { action: Allow, destination: { ports: [80] } } ] }",
                "spec.ingress[0].protocol",
            ),
            ("{ namespaceSelector: all() }", "spec.namespaceSelector"),
        ] {
            let e = try_compiled(&format!(
                "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {{ name: p, namespace: x }}\nspec: {spec}\n"
            ))
            .err()
            .unwrap();
            assert!(e.contains(field), "{spec}: {e}");
        }
    }

    #[test]
    fn source_ports_and_not_ports_match_the_source_port() {
        let c = compiled(
            r#"
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: { name: sports, namespace: x }
spec:
  selector: app == 'api'
  ingress:
  - { action: Deny, protocol: TCP, source: { ports: ["30000:40000"] } }
  - { action: Deny, protocol: TCP, source: { notPorts: [1024:65535] } }
  - { action: Allow }
"#,
        );
        let api = c.0.pod("x/api").unwrap().ips[0];
        let from = |sport| {
            c.1.decide_from_port("x/web", sport, api, L4::Tcp, 8080)
                .unwrap()
                .allowed()
        };
        assert!(!from(Some(35000)), "in the Deny's source ports");
        assert!(!from(Some(30000)) && !from(Some(40000)), "the range's ends");
        assert!(from(Some(45000)), "outside them");
        assert!(!from(Some(80)), "a privileged source port: not in notPorts");
        // Unknown, as the engine takes it: ports match nothing, notPorts
        // exclude nothing, so the second Deny decides.
        assert!(!from(None));
        let d =
            c.1.decide_from_port("x/web", Some(35000), api, L4::Tcp, 8080)
                .unwrap();
        assert!(
            matches!(&d.ingress, Some(super::super::Judgement::Dropped { by }) if by.contains("ingress[0]")),
            "{d:?}"
        );

        // Named source ports are refused by name.
        let e = try_compiled(
            "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: { name: p, namespace: x }\nspec: { ingress: [ { action: Allow, protocol: TCP, source: { ports: [http] } } ] }\n",
        )
        .err()
        .unwrap();
        assert!(
            e.contains("spec.ingress[0].source") && e.contains("named source ports"),
            "{e}"
        );
    }

    #[test]
    fn staged_policies_are_loaded_and_never_enforced() {
        let c = compiled(
            "apiVersion: projectcalico.org/v3\nkind: StagedGlobalNetworkPolicy\nmetadata: { name: lock }\nspec: { stagedAction: Set, selector: all(), types: [Ingress, Egress] }\n",
        );
        assert_eq!(c.0.manifests.calico_staged.len(), 1);
        assert!(allowed(&c, "x/web", "x/api", L4::Tcp, 8080));
    }
}
