//! Validation and compilation: the three kinds become one [`ClusterPolicy`]
//! shape (tier, priority, subject, ordered rules with one action each).
//!
//! The checks are the CRDs' own: required fields, enums, `minimum` and
//! `maximum`, `minItems` and `maxItems`, `maxLength`, "exactly one field"
//! (`minProperties`/`maxProperties` 1) for subjects, peers, protocols and
//! ports, `start < end` for v1alpha2 ranges, `isCIDR` for networks, no named
//! port next to a networks/nodes/domainNames peer, and `default` as the only
//! BaselineAdminNetworkPolicy name. Errors name the field
//! (`spec.egress[1].to[0].networks[2]`) and how to fix it.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::types::{
    AdminNetworkPolicy, AnpPort, BaselineAdminNetworkPolicy, ClusterNetworkPolicy, CnpProtocol,
    NamespacedPod, Peer, PortRange, Rule, Subject,
};
use crate::policy::model::{FieldProblem, Protocol, parse_cidr, validate_port_name};
use crate::policy::selector::CompiledSelector;
use crate::record::{PolicyKind, PolicyRef, Tier};

/// What a rule does with the traffic it matches. v1alpha2 says Accept,
/// v1alpha1 Allow: both are [`Action::Allow`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Deny,
    /// Skip the rest of this tier.
    Pass,
}

impl Action {
    /// The word the policy's own API uses.
    pub fn word(self, kind: PolicyKind) -> &'static str {
        match (self, kind) {
            (Action::Allow, PolicyKind::ClusterNetworkPolicy) => "Accept",
            (Action::Allow, _) => "Allow",
            (Action::Deny, _) => "Deny",
            (Action::Pass, _) => "Pass",
        }
    }
}

/// Who a policy applies to. Host-network pods never are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubjectMatcher {
    /// Every pod of the matching namespaces.
    Namespaces(CompiledSelector),
    /// Pods matching both selectors.
    Pods {
        namespaces: CompiledSelector,
        pods: CompiledSelector,
    },
}

impl fmt::Display for SubjectMatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubjectMatcher::Namespaces(ns) => write!(f, "namespaces {ns}"),
            SubjectMatcher::Pods { namespaces, pods } => {
                write!(f, "pods {pods} in namespaces {namespaces}")
            }
        }
    }
}

/// One entry of `from` / `to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterPeer {
    /// Every (non host-network) pod of the matching namespaces.
    Namespaces(CompiledSelector),
    /// Pods matching both selectors (not host-network ones).
    Pods {
        namespaces: CompiledSelector,
        pods: CompiledSelector,
    },
    /// The addresses in `status.addresses` of the matching Nodes.
    Nodes(CompiledSelector),
    /// CIDRs; they match pod addresses too.
    Networks(Vec<IpNet>),
    /// Domain names. netwatch sees addresses, not names: such a peer
    /// matches nothing here, and explain and lint say so.
    DomainNames(Vec<String>),
}

impl fmt::Display for ClusterPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClusterPeer::Namespaces(ns) => write!(f, "namespaces {ns}"),
            ClusterPeer::Pods { namespaces, pods } => {
                write!(f, "pods {pods} in namespaces {namespaces}")
            }
            ClusterPeer::Nodes(sel) => write!(f, "nodes {sel}"),
            ClusterPeer::Networks(nets) => {
                let list: Vec<String> = nets.iter().map(ToString::to_string).collect();
                write!(f, "networks [{}]", list.join(", "))
            }
            ClusterPeer::DomainNames(names) => write!(f, "domainNames [{}]", names.join(", ")),
        }
    }
}

/// One port entry: a protocol with a port range, or a named container port
/// of the destination pod (any protocol the pod declares it with).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterPort {
    Range {
        protocol: Protocol,
        start: u16,
        end: u16,
    },
    Named(String),
}

impl fmt::Display for ClusterPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClusterPort::Range {
                protocol,
                start,
                end,
            } if start == end => write!(f, "{start}/{protocol}"),
            ClusterPort::Range {
                protocol,
                start,
                end,
            } => write!(f, "{start}-{end}/{protocol}"),
            ClusterPort::Named(name) => write!(f, "named port {name}"),
        }
    }
}

/// One rule: if any peer and any port match, `action`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterRule {
    pub name: Option<String>,
    pub action: Action,
    /// At least one.
    pub peers: Vec<ClusterPeer>,
    /// Empty: every port of every protocol.
    pub ports: Vec<ClusterPort>,
}

/// A validated policy of any of the three kinds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterPolicy {
    /// Kind, tier and name (no rule).
    pub reference: PolicyRef,
    /// 0 to 1000 (a BaselineAdminNetworkPolicy has none: 0).
    pub priority: u32,
    pub subject: SubjectMatcher,
    pub ingress: Vec<ClusterRule>,
    pub egress: Vec<ClusterRule>,
}

impl ClusterPolicy {
    /// The rules of a direction (empty: the policy does not act on it).
    pub fn rules(&self, direction: crate::policy::Direction) -> &[ClusterRule] {
        match direction {
            crate::policy::Direction::Ingress => &self.ingress,
            crate::policy::Direction::Egress => &self.egress,
        }
    }

    /// `ClusterNetworkPolicy deny-db (Admin, priority 10)`.
    pub fn describe(&self) -> String {
        if self.reference.kind == PolicyKind::BaselineAdminNetworkPolicy {
            return format!("{} ({})", self.reference, self.reference.tier);
        }
        format!(
            "{} ({}, priority {})",
            self.reference, self.reference.tier, self.priority
        )
    }
}

fn problem(
    field: impl Into<String>,
    what: impl Into<String>,
    fix: impl Into<String>,
) -> FieldProblem {
    FieldProblem::new(field.into(), what.into(), fix.into())
}

/// The limits that differ between the versions.
struct Limits {
    rules: usize,
    peers: usize,
    ports: usize,
}

const V1ALPHA2_LIMITS: Limits = Limits {
    rules: 25,
    peers: 25,
    ports: 25,
};
const V1ALPHA1_LIMITS: Limits = Limits {
    rules: 100,
    peers: 100,
    ports: 100,
};

/// Validates and compiles a ClusterNetworkPolicy.
pub fn compile_cluster_network_policy(
    policy: &ClusterNetworkPolicy,
) -> Result<ClusterPolicy, FieldProblem> {
    let name = object_name(&policy.metadata.name)?;
    let Some(spec) = &policy.spec else {
        return Err(problem(
            "spec",
            "missing spec",
            "give it spec.tier, spec.priority, spec.subject and rules",
        ));
    };
    let tier = match spec.tier.as_deref() {
        Some("Admin") => Tier::Admin,
        Some("Baseline") => Tier::Baseline,
        Some(other) => {
            return Err(problem(
                "spec.tier",
                format!("unknown tier {other:?}"),
                "use Admin or Baseline (case-sensitive)",
            ));
        }
        None => {
            return Err(problem(
                "spec.tier",
                "missing tier",
                "add `tier: Admin` (before NetworkPolicies) or `tier: Baseline` (after them)",
            ));
        }
    };
    let priority = priority(spec.priority)?;
    let subject = subject(spec.subject.as_ref())?;
    let reference = PolicyRef::cluster(PolicyKind::ClusterNetworkPolicy, tier, name);
    let (ingress, egress) = rules(&spec.ingress, &spec.egress, Version::V1alpha2)?;
    Ok(ClusterPolicy {
        reference,
        priority,
        subject,
        ingress,
        egress,
    })
}

/// Validates and compiles an AdminNetworkPolicy.
pub fn compile_admin_network_policy(
    policy: &AdminNetworkPolicy,
) -> Result<ClusterPolicy, FieldProblem> {
    let name = object_name(&policy.metadata.name)?;
    let Some(spec) = &policy.spec else {
        return Err(problem(
            "spec",
            "missing spec",
            "give it spec.priority, spec.subject and rules",
        ));
    };
    no_field(
        spec.tier.is_some(),
        "spec.tier",
        "an AdminNetworkPolicy has no tier: it is the Admin tier",
    )?;
    let priority = priority(spec.priority)?;
    let subject = subject(spec.subject.as_ref())?;
    let reference = PolicyRef::cluster(PolicyKind::AdminNetworkPolicy, Tier::Admin, name);
    let (ingress, egress) = rules(
        &spec.ingress,
        &spec.egress,
        Version::V1alpha1 { admin: true },
    )?;
    Ok(ClusterPolicy {
        reference,
        priority,
        subject,
        ingress,
        egress,
    })
}

/// Validates and compiles a BaselineAdminNetworkPolicy (named `default`).
pub fn compile_baseline_admin_network_policy(
    policy: &BaselineAdminNetworkPolicy,
) -> Result<ClusterPolicy, FieldProblem> {
    let name = object_name(&policy.metadata.name)?;
    if name != "default" {
        return Err(problem(
            "metadata.name",
            format!(
                "a BaselineAdminNetworkPolicy must be named \"default\", not {name:?} (the cluster has at most one)"
            ),
            "rename it to `default`, merging its rules into the existing one if there is one",
        ));
    }
    let Some(spec) = &policy.spec else {
        return Err(problem(
            "spec",
            "missing spec",
            "give it spec.subject and rules",
        ));
    };
    no_field(
        spec.tier.is_some(),
        "spec.tier",
        "a BaselineAdminNetworkPolicy has no tier: it is the Baseline tier",
    )?;
    no_field(
        spec.priority.is_some(),
        "spec.priority",
        "a BaselineAdminNetworkPolicy has no priority: there is only one",
    )?;
    let subject = subject(spec.subject.as_ref())?;
    let reference =
        PolicyRef::cluster(PolicyKind::BaselineAdminNetworkPolicy, Tier::Baseline, name);
    let (ingress, egress) = rules(
        &spec.ingress,
        &spec.egress,
        Version::V1alpha1 { admin: false },
    )?;
    Ok(ClusterPolicy {
        reference,
        priority: 0,
        subject,
        ingress,
        egress,
    })
}

type Rules = (Vec<ClusterRule>, Vec<ClusterRule>);

/// Which API a rule is written in: v1alpha2 (ClusterNetworkPolicy), or
/// v1alpha1 for the Admin (AdminNetworkPolicy) or Baseline
/// (BaselineAdminNetworkPolicy) tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    V1alpha2,
    V1alpha1 { admin: bool },
}

/// A policy's ingress and egress rules, in written order.
fn rules(
    ingress: &Option<Vec<Rule>>,
    egress: &Option<Vec<Rule>>,
    version: Version,
) -> Result<Rules, FieldProblem> {
    Ok((
        direction_rules(ingress.as_deref().unwrap_or_default(), true, version)?,
        direction_rules(egress.as_deref().unwrap_or_default(), false, version)?,
    ))
}

fn direction_rules(
    rules: &[Rule],
    ingress: bool,
    version: Version,
) -> Result<Vec<ClusterRule>, FieldProblem> {
    let (field, peers_field, other_field) = if ingress {
        ("spec.ingress", "from", "to")
    } else {
        ("spec.egress", "to", "from")
    };
    let (limits, wrong_ports, domain_names) = match version {
        Version::V1alpha2 => (&V1ALPHA2_LIMITS, ("ports", "protocols"), true),
        Version::V1alpha1 { admin } => (&V1ALPHA1_LIMITS, ("protocols", "ports"), admin),
    };
    max_items(rules.len(), limits.rules, field)?;
    let mut out = Vec::with_capacity(rules.len());
    for (i, rule) in rules.iter().enumerate() {
        let path = format!("{field}[{i}]");
        let (list, other, ports_set) = if ingress {
            (&rule.from, &rule.to, rule.ports.is_some())
        } else {
            (&rule.to, &rule.from, rule.ports.is_some())
        };
        if other.is_some() {
            return Err(problem(
                format!("{path}.{other_field}"),
                format!("an {} rule has no `{other_field}`", &field[5..]),
                format!("list its peers under `{peers_field}`"),
            ));
        }
        let misplaced = match version {
            Version::V1alpha2 => ports_set,
            Version::V1alpha1 { .. } => rule.protocols.is_some(),
        };
        if misplaced {
            return Err(problem(
                format!("{path}.{}", wrong_ports.0),
                format!("this API version has no `{}` in rules", wrong_ports.0),
                format!("name ports under `{}`", wrong_ports.1),
            ));
        }
        let action = match version {
            Version::V1alpha2 => cnp_action(rule.action.as_deref(), &path)?,
            Version::V1alpha1 { admin } => anp_action(rule.action.as_deref(), &path, admin)?,
        };
        let peers = peers(
            list.as_deref(),
            &path,
            peers_field,
            ingress,
            domain_names,
            limits,
        )?;
        let ports = match version {
            Version::V1alpha2 => cnp_protocols(rule.protocols.as_deref(), &path)?,
            Version::V1alpha1 { .. } => anp_ports(rule.ports.as_deref(), &path)?,
        };
        out.push(finish_rule(
            rule.name.as_deref(),
            action,
            peers,
            ports,
            &path,
        )?);
    }
    Ok(out)
}

/// A field the kind does not have (one spec type serves the three kinds).
fn no_field(set: bool, field: &str, why: &str) -> Result<(), FieldProblem> {
    if set {
        return Err(problem(field, why.to_string(), "remove it"));
    }
    Ok(())
}

fn object_name(name: &Option<String>) -> Result<String, FieldProblem> {
    match name.as_deref() {
        Some(n) if !n.is_empty() => Ok(n.to_string()),
        _ => Err(problem(
            "metadata.name",
            "the policy has no name",
            "give it `metadata.name`",
        )),
    }
}

fn priority(value: Option<i64>) -> Result<u32, FieldProblem> {
    match value {
        None => Err(problem(
            "spec.priority",
            "missing priority",
            "add `priority:` from 0 (evaluated first) to 1000",
        )),
        Some(p) if (0..=1000).contains(&p) => Ok(p as u32),
        Some(p) => Err(problem(
            "spec.priority",
            format!("priority {p} is out of range"),
            "use a priority from 0 (evaluated first) to 1000",
        )),
    }
}

fn selector(sel: &LabelSelector, field: &str) -> Result<CompiledSelector, FieldProblem> {
    CompiledSelector::compile(sel, field)
}

fn namespaced_pod(
    pods: &NamespacedPod,
    path: &str,
) -> Result<(CompiledSelector, CompiledSelector), FieldProblem> {
    let namespaces = match &pods.namespace_selector {
        Some(sel) => selector(sel, &format!("{path}.namespaceSelector"))?,
        None => CompiledSelector::everything(),
    };
    let Some(pod_selector) = &pods.pod_selector else {
        return Err(problem(
            format!("{path}.podSelector"),
            "missing podSelector",
            "add `podSelector: {}` for every pod of the namespaces, or labels to narrow it",
        ));
    };
    Ok((
        namespaces,
        selector(pod_selector, &format!("{path}.podSelector"))?,
    ))
}

fn subject(subject: Option<&Subject>) -> Result<SubjectMatcher, FieldProblem> {
    let fix = "set exactly one of `namespaces:` (every pod of the matching namespaces) or `pods:` (namespaceSelector and podSelector)";
    match subject {
        None => Err(problem("spec.subject", "missing subject", fix)),
        Some(Subject {
            namespaces: Some(ns),
            pods: None,
        }) => Ok(SubjectMatcher::Namespaces(selector(
            ns,
            "spec.subject.namespaces",
        )?)),
        Some(Subject {
            namespaces: None,
            pods: Some(pods),
        }) => {
            let (namespaces, pods) = namespaced_pod(pods, "spec.subject.pods")?;
            Ok(SubjectMatcher::Pods { namespaces, pods })
        }
        Some(Subject { namespaces, .. }) => Err(problem(
            "spec.subject",
            if namespaces.is_some() {
                "the subject sets both namespaces and pods"
            } else {
                "the subject is empty"
            },
            fix,
        )),
    }
}

fn max_items(len: usize, max: usize, field: &str) -> Result<(), FieldProblem> {
    if len > max {
        return Err(problem(
            field,
            format!("{len} items; the API allows at most {max}"),
            format!("keep at most {max}, e.g. by merging entries or splitting the policy"),
        ));
    }
    Ok(())
}

fn cnp_action(action: Option<&str>, path: &str) -> Result<Action, FieldProblem> {
    match action {
        Some("Accept") => Ok(Action::Allow),
        Some("Deny") => Ok(Action::Deny),
        Some("Pass") => Ok(Action::Pass),
        Some("Allow") => Err(problem(
            format!("{path}.action"),
            "ClusterNetworkPolicy (v1alpha2) says Accept, not Allow",
            "write `action: Accept`",
        )),
        Some(other) => Err(problem(
            format!("{path}.action"),
            format!("unknown action {other:?}"),
            "use Accept, Deny or Pass (case-sensitive)",
        )),
        None => Err(problem(
            format!("{path}.action"),
            "missing action",
            "add `action: Accept`, `Deny` or `Pass`",
        )),
    }
}

fn anp_action(action: Option<&str>, path: &str, admin: bool) -> Result<Action, FieldProblem> {
    let allowed = if admin {
        "Allow, Deny or Pass"
    } else {
        "Allow or Deny"
    };
    match action {
        Some("Allow") => Ok(Action::Allow),
        Some("Deny") => Ok(Action::Deny),
        Some("Pass") if admin => Ok(Action::Pass),
        Some("Pass") => Err(problem(
            format!("{path}.action"),
            "a BaselineAdminNetworkPolicy has no Pass action (nothing comes after it)",
            "use Allow or Deny",
        )),
        Some("Accept") => Err(problem(
            format!("{path}.action"),
            "v1alpha1 says Allow, not Accept",
            "write `action: Allow`",
        )),
        Some(other) => Err(problem(
            format!("{path}.action"),
            format!("unknown action {other:?}"),
            format!("use {allowed} (case-sensitive)"),
        )),
        None => Err(problem(
            format!("{path}.action"),
            "missing action",
            format!("add `action:` {allowed}"),
        )),
    }
}

fn peers(
    list: Option<&[Peer]>,
    path: &str,
    field: &str,
    ingress: bool,
    domain_names_allowed: bool,
    limits: &Limits,
) -> Result<Vec<ClusterPeer>, FieldProblem> {
    let list_path = format!("{path}.{field}");
    let list = match list {
        None => {
            return Err(problem(
                list_path,
                format!("missing {field}"),
                format!("list at least one peer in `{field}:` (`namespaces: {{}}` is every pod)"),
            ));
        }
        Some([]) => {
            return Err(problem(
                list_path,
                format!("{field} is empty"),
                format!("list at least one peer in `{field}:` (`namespaces: {{}}` is every pod)"),
            ));
        }
        Some(list) => list,
    };
    max_items(list.len(), limits.peers, &list_path)?;
    let mut out = Vec::with_capacity(list.len());
    for (j, peer) in list.iter().enumerate() {
        let p = format!("{list_path}[{j}]");
        let set = [
            peer.namespaces.is_some(),
            peer.pods.is_some(),
            peer.nodes.is_some(),
            peer.networks.is_some(),
            peer.domain_names.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        let kinds = if ingress {
            "namespaces or pods"
        } else if domain_names_allowed {
            "namespaces, pods, nodes, networks or domainNames"
        } else {
            "namespaces, pods, nodes or networks"
        };
        if set != 1 {
            return Err(problem(
                p,
                if set == 0 {
                    "the peer is empty".to_string()
                } else {
                    "the peer sets more than one field".to_string()
                },
                format!("set exactly one of {kinds}; use separate peers for more"),
            ));
        }
        let compiled = if let Some(ns) = &peer.namespaces {
            ClusterPeer::Namespaces(selector(ns, &format!("{p}.namespaces"))?)
        } else if let Some(pods) = &peer.pods {
            let (namespaces, pods) = namespaced_pod(pods, &format!("{p}.pods"))?;
            ClusterPeer::Pods { namespaces, pods }
        } else if ingress {
            let field = if peer.nodes.is_some() {
                "nodes"
            } else if peer.networks.is_some() {
                "networks"
            } else {
                "domainNames"
            };
            return Err(problem(
                format!("{p}.{field}"),
                format!("{field} peers exist only in egress rules"),
                "select ingress sources with namespaces or pods",
            ));
        } else if let Some(nodes) = &peer.nodes {
            ClusterPeer::Nodes(selector(nodes, &format!("{p}.nodes"))?)
        } else if let Some(networks) = &peer.networks {
            ClusterPeer::Networks(networks_of(networks, &format!("{p}.networks"))?)
        } else if let Some(names) = &peer.domain_names {
            if !domain_names_allowed {
                return Err(problem(
                    format!("{p}.domainNames"),
                    "a BaselineAdminNetworkPolicy has no domainNames peer",
                    "use networks (CIDRs), or an AdminNetworkPolicy",
                ));
            }
            ClusterPeer::DomainNames(domain_names(names, &format!("{p}.domainNames"))?)
        } else {
            unreachable_peer()
        };
        out.push(compiled);
    }
    Ok(out)
}

/// Only reached if a peer has exactly one field and it is none of the five.
fn unreachable_peer() -> ClusterPeer {
    ClusterPeer::Networks(Vec::new())
}

fn networks_of(list: &[String], path: &str) -> Result<Vec<IpNet>, FieldProblem> {
    if list.is_empty() {
        return Err(problem(
            path,
            "networks is empty",
            "list at least one CIDR, e.g. 0.0.0.0/0",
        ));
    }
    max_items(list.len(), 25, path)?;
    let mut out = Vec::with_capacity(list.len());
    for (k, text) in list.iter().enumerate() {
        let field = format!("{path}[{k}]");
        if text.len() > 43 {
            return Err(problem(
                field,
                "longer than 43 characters",
                "write one CIDR such as 10.0.0.0/8 or fd00::/8",
            ));
        }
        // isCIDR wants a prefix length; a bare address is refused.
        if !text.contains('/') && text.trim().parse::<IpAddr>().is_ok() {
            let len = if text.contains(':') { 128 } else { 32 };
            return Err(problem(
                field,
                format!("invalid CIDR {text:?}"),
                format!("write it with a prefix length, e.g. {}/{len}", text.trim()),
            ));
        }
        out.push(parse_cidr(text, &field)?);
    }
    Ok(out)
}

/// The CRD's pattern: optional `*.` then two or more DNS labels.
fn domain_names(list: &[String], path: &str) -> Result<Vec<String>, FieldProblem> {
    if list.is_empty() {
        return Err(problem(
            path,
            "domainNames is empty",
            "list at least one name, e.g. example.com or *.example.com",
        ));
    }
    max_items(list.len(), 25, path)?;
    for (k, name) in list.iter().enumerate() {
        let body = name.strip_prefix("*.").unwrap_or(name);
        let body = body.strip_suffix('.').unwrap_or(body);
        let labels: Vec<&str> = body.split('.').collect();
        let label_ok = |l: &&str| {
            let b = l.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_')
        };
        if labels.len() < 2 || !labels.iter().all(label_ok) {
            return Err(problem(
                format!("{path}[{k}]"),
                format!("invalid domain name {name:?}"),
                "write a name such as example.com, or *.example.com for its subdomains (`*` only as the first label)",
            ));
        }
    }
    Ok(list.to_vec())
}

fn port_number(n: Option<i64>, field: &str, what: &str) -> Result<u16, FieldProblem> {
    match n {
        None => Err(problem(
            field,
            format!("missing {what}"),
            "give a port from 1 to 65535",
        )),
        Some(n) => u16::try_from(n).ok().filter(|p| *p >= 1).ok_or_else(|| {
            problem(
                field,
                format!("port {n} is out of range"),
                "use a port from 1 to 65535",
            )
        }),
    }
}

fn range(
    r: &PortRange,
    path: &str,
    protocol: Protocol,
    strict: bool,
) -> Result<ClusterPort, FieldProblem> {
    let start = port_number(r.start, &format!("{path}.start"), "start")?;
    let end = port_number(r.end, &format!("{path}.end"), "end")?;
    // v1alpha2 says start < end; v1alpha1's CRD checks nothing, and a
    // range with start after end matches no port.
    if strict && start >= end {
        return Err(problem(
            path,
            format!("start {start} is not below end {end}"),
            "make start less than end, or use `number:` for one port",
        ));
    }
    Ok(ClusterPort::Range {
        protocol,
        start,
        end,
    })
}

/// The entries of a `protocols` (v1alpha2) or `ports` (v1alpha1) list, each
/// with its path; none when the list is absent (every port). An empty or
/// over-long list is refused as the CRDs do.
fn port_entries<'a, T>(
    list: Option<&'a [T]>,
    path: &str,
    field: &str,
    entry: &str,
    limit: usize,
) -> Result<Vec<(String, &'a T)>, FieldProblem> {
    let Some(list) = list else {
        return Ok(Vec::new());
    };
    let list_path = format!("{path}.{field}");
    if list.is_empty() {
        return Err(problem(
            list_path,
            format!("{field} is empty"),
            format!("list at least one {entry}, or remove `{field}` to match every port"),
        ));
    }
    max_items(list.len(), limit, &list_path)?;
    Ok(list
        .iter()
        .enumerate()
        .map(|(k, e)| (format!("{list_path}[{k}]"), e))
        .collect())
}

/// An entry that must set exactly one of `fields`.
fn exactly_one(set: &[bool], path: &str, entry: &str, fields: &str) -> Result<(), FieldProblem> {
    match set.iter().filter(|b| **b).count() {
        1 => Ok(()),
        n => Err(problem(
            path,
            if n == 0 {
                format!("the {entry} entry is empty")
            } else {
                format!("the {entry} entry sets more than one field")
            },
            format!("set exactly one of {fields}; use separate entries for more"),
        )),
    }
}

fn cnp_protocols(
    list: Option<&[CnpProtocol]>,
    path: &str,
) -> Result<Vec<ClusterPort>, FieldProblem> {
    let mut out = Vec::new();
    for (p, entry) in port_entries(list, path, "protocols", "protocol", V1ALPHA2_LIMITS.ports)? {
        exactly_one(
            &[
                entry.tcp.is_some(),
                entry.udp.is_some(),
                entry.sctp.is_some(),
                entry.destination_named_port.is_some(),
            ],
            &p,
            "protocol",
            "tcp, udp, sctp or destinationNamedPort",
        )?;
        if let Some(name) = &entry.destination_named_port {
            validate_port_name(name, &format!("{p}.destinationNamedPort"))?;
            out.push(ClusterPort::Named(name.clone()));
            continue;
        }
        let (protocol, ports, field) = match (&entry.tcp, &entry.udp, &entry.sctp) {
            (Some(t), _, _) => (Protocol::Tcp, t, "tcp"),
            (_, Some(u), _) => (Protocol::Udp, u, "udp"),
            (_, _, Some(s)) => (Protocol::Sctp, s, "sctp"),
            _ => continue,
        };
        let pp = format!("{p}.{field}");
        let Some(port) = &ports.destination_port else {
            return Err(problem(
                pp,
                format!("{field} is empty"),
                format!("give `{field}: {{destinationPort: {{number: N}}}}` or a range"),
            ));
        };
        let dp = format!("{pp}.destinationPort");
        match (port.number, &port.range) {
            (Some(n), None) => {
                let n = port_number(Some(n), &format!("{dp}.number"), "number")?;
                out.push(ClusterPort::Range {
                    protocol,
                    start: n,
                    end: n,
                });
            }
            (None, Some(r)) => {
                if r.protocol.is_some() {
                    return Err(problem(
                        format!("{dp}.range.protocol"),
                        "a v1alpha2 range has no protocol (it comes from tcp/udp/sctp)",
                        "remove it",
                    ));
                }
                out.push(range(r, &format!("{dp}.range"), protocol, true)?);
            }
            (None, None) => {
                return Err(problem(
                    dp,
                    "destinationPort is empty",
                    "set `number:` or `range: {start, end}`",
                ));
            }
            (Some(_), Some(_)) => {
                return Err(problem(
                    dp,
                    "destinationPort sets both number and range",
                    "set exactly one of them",
                ));
            }
        }
    }
    Ok(out)
}

fn protocol_v1alpha1(p: Option<&str>, field: &str) -> Result<Protocol, FieldProblem> {
    match p {
        None => Ok(Protocol::Tcp),
        Some(text) => Protocol::from_api(text).ok_or_else(|| {
            problem(
                field,
                format!("unknown protocol {text:?}"),
                "use TCP, UDP or SCTP (upper case); leave it out for TCP",
            )
        }),
    }
}

fn anp_ports(list: Option<&[AnpPort]>, path: &str) -> Result<Vec<ClusterPort>, FieldProblem> {
    let mut out = Vec::new();
    for (p, entry) in port_entries(list, path, "ports", "port", V1ALPHA1_LIMITS.ports)? {
        exactly_one(
            &[
                entry.port_number.is_some(),
                entry.named_port.is_some(),
                entry.port_range.is_some(),
            ],
            &p,
            "port",
            "portNumber, portRange or namedPort",
        )?;
        if let Some(n) = &entry.port_number {
            let protocol =
                protocol_v1alpha1(n.protocol.as_deref(), &format!("{p}.portNumber.protocol"))?;
            let port = port_number(n.port, &format!("{p}.portNumber.port"), "port")?;
            out.push(ClusterPort::Range {
                protocol,
                start: port,
                end: port,
            });
        } else if let Some(r) = &entry.port_range {
            let protocol =
                protocol_v1alpha1(r.protocol.as_deref(), &format!("{p}.portRange.protocol"))?;
            out.push(range(r, &format!("{p}.portRange"), protocol, false)?);
        } else if let Some(name) = &entry.named_port {
            validate_port_name(name, &format!("{p}.namedPort"))?;
            out.push(ClusterPort::Named(name.clone()));
        }
    }
    Ok(out)
}

fn finish_rule(
    name: Option<&str>,
    action: Action,
    peers: Vec<ClusterPeer>,
    ports: Vec<ClusterPort>,
    path: &str,
) -> Result<ClusterRule, FieldProblem> {
    if let Some(n) = name
        && n.chars().count() > 100
    {
        return Err(problem(
            format!("{path}.name"),
            "the rule name is longer than 100 characters",
            "shorten it",
        ));
    }
    let addresses_only = peers.iter().any(|p| {
        matches!(
            p,
            ClusterPeer::Networks(_) | ClusterPeer::Nodes(_) | ClusterPeer::DomainNames(_)
        )
    });
    if addresses_only && ports.iter().any(|p| matches!(p, ClusterPort::Named(_))) {
        return Err(problem(
            path,
            "a named port cannot be used with networks, nodes or domainNames peers: they have no container ports",
            "use port numbers, or move the networks/nodes/domainNames peers to a rule of their own",
        ));
    }
    Ok(ClusterRule {
        name: name.filter(|n| !n.is_empty()).map(str::to_string),
        action,
        peers,
        ports,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cnp(yaml: &str) -> Result<ClusterPolicy, FieldProblem> {
        let p: ClusterNetworkPolicy = serde_yaml::from_str(&format!(
            "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: p}}\n{yaml}"
        ))
        .unwrap();
        compile_cluster_network_policy(&p)
    }

    fn anp(yaml: &str) -> Result<ClusterPolicy, FieldProblem> {
        let p: AdminNetworkPolicy = serde_yaml::from_str(&format!(
            "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: AdminNetworkPolicy\nmetadata: {{name: p}}\n{yaml}"
        ))
        .unwrap();
        compile_admin_network_policy(&p)
    }

    #[test]
    fn a_cluster_network_policy_compiles_its_rules_in_order() {
        let p = cnp("spec:\n  tier: Admin\n  priority: 10\n  subject: {namespaces: {}}\n  egress:\n  - {name: a, action: Pass, to: [{networks: [10.0.0.1/8]}], protocols: [{tcp: {destinationPort: {number: 80}}}, {udp: {destinationPort: {range: {start: 50, end: 60}}}}]}\n  - {action: Deny, to: [{namespaces: {}}]}\n").unwrap();
        assert_eq!(p.priority, 10);
        assert_eq!(p.reference.tier, Tier::Admin);
        assert_eq!(p.egress.len(), 2);
        assert_eq!(p.egress[0].action, Action::Pass);
        assert_eq!(
            p.egress[0].peers,
            vec![ClusterPeer::Networks(vec!["10.0.0.0/8".parse().unwrap()])]
        );
        assert_eq!(p.egress[0].ports[1].to_string(), "50-60/UDP");
        assert!(p.egress[1].ports.is_empty() && p.ingress.is_empty());
    }

    #[test]
    fn the_crd_limits_are_enforced_with_the_field() {
        let head = "spec:\n  tier: Admin\n  priority: 1\n  subject: {namespaces: {}}\n";
        let cases = [
            (
                "spec:\n  tier: admin\n  priority: 1\n  subject: {namespaces: {}}\n",
                "spec.tier",
            ),
            (
                "spec:\n  tier: Admin\n  priority: 1001\n  subject: {namespaces: {}}\n",
                "spec.priority",
            ),
            (
                "spec:\n  tier: Admin\n  subject: {namespaces: {}}\n",
                "spec.priority",
            ),
            (
                "spec:\n  tier: Admin\n  priority: 1\n  subject: {namespaces: {}, pods: {podSelector: {}}}\n",
                "spec.subject",
            ),
            (
                "spec:\n  tier: Admin\n  priority: 1\n  subject: {}\n",
                "spec.subject",
            ),
            (
                &format!("{head}  ingress: [{{action: Allow, from: [{{namespaces: {{}}}}]}}]\n"),
                "spec.ingress[0].action",
            ),
            (
                &format!("{head}  ingress: [{{action: Deny, from: []}}]\n"),
                "spec.ingress[0].from",
            ),
            (
                &format!(
                    "{head}  ingress: [{{action: Deny, from: [{{networks: [10.0.0.0/8]}}]}}]\n"
                ),
                "spec.ingress[0].from[0].networks",
            ),
            (
                &format!(
                    "{head}  egress: [{{action: Deny, to: [{{namespaces: {{}}, pods: {{podSelector: {{}}}}}}]}}]\n"
                ),
                "spec.egress[0].to[0]",
            ),
            (
                &format!("{head}  egress: [{{action: Deny, to: [{{networks: [10.0.0.1]}}]}}]\n"),
                "spec.egress[0].to[0].networks[0]",
            ),
            (
                &format!(
                    "{head}  egress: [{{action: Deny, to: [{{networks: [10.0.0.0/8]}}], protocols: [{{destinationNamedPort: http}}]}}]\n"
                ),
                "spec.egress[0]",
            ),
            (
                &format!(
                    "{head}  egress: [{{action: Deny, to: [{{namespaces: {{}}}}], protocols: [{{tcp: {{destinationPort: {{range: {{start: 90, end: 80}}}}}}}}]}}]\n"
                ),
                "spec.egress[0].protocols[0].tcp.destinationPort.range",
            ),
            (
                &format!(
                    "{head}  egress: [{{action: Deny, to: [{{namespaces: {{}}}}], protocols: [{{tcp: {{}}}}]}}]\n"
                ),
                "spec.egress[0].protocols[0].tcp",
            ),
            (
                &format!(
                    "{head}  egress: [{{action: Deny, to: [{{namespaces: {{}}}}], protocols: [{{tcp: {{destinationPort: {{number: 80}}}}, udp: {{destinationPort: {{number: 80}}}}}}]}}]\n"
                ),
                "spec.egress[0].protocols[0]",
            ),
            (
                &format!(
                    "{head}  egress: [{{action: Deny, to: [{{domainNames: ['*example']}}]}}]\n"
                ),
                "spec.egress[0].to[0].domainNames[0]",
            ),
        ];
        for (yaml, field) in cases {
            let err = cnp(yaml).unwrap_err();
            assert_eq!(err.field, field, "{yaml}");
        }
        let many: String = (0..26)
            .map(|_| "  - {action: Deny, from: [{namespaces: {}}]}\n")
            .collect();
        assert_eq!(
            cnp(&format!("{head}  ingress:\n{many}")).unwrap_err().field,
            "spec.ingress"
        );
    }

    #[test]
    fn v1alpha1_ports_default_to_tcp_and_baseline_must_be_default() {
        let p = anp("spec:\n  priority: 5\n  subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: db}}}}\n  ingress:\n  - {action: Pass, from: [{namespaces: {}}], ports: [{portNumber: {port: 5432}}, {portRange: {protocol: UDP, start: 1, end: 9}}, {namedPort: dns}]}\n").unwrap();
        assert_eq!(p.ingress[0].ports[0].to_string(), "5432/TCP");
        assert_eq!(p.ingress[0].ports[1].to_string(), "1-9/UDP");
        assert_eq!(p.ingress[0].ports[2], ClusterPort::Named("dns".into()));
        let err = anp("spec:\n  priority: 5\n  subject: {namespaces: {}}\n  ingress: [{action: Accept, from: [{namespaces: {}}]}]\n").unwrap_err();
        assert_eq!(err.field, "spec.ingress[0].action");
        let banp: BaselineAdminNetworkPolicy = serde_yaml::from_str("apiVersion: policy.networking.k8s.io/v1alpha1\nkind: BaselineAdminNetworkPolicy\nmetadata: {name: other}\nspec: {subject: {namespaces: {}}}\n").unwrap();
        assert_eq!(
            compile_baseline_admin_network_policy(&banp)
                .unwrap_err()
                .field,
            "metadata.name"
        );
        let banp: BaselineAdminNetworkPolicy = serde_yaml::from_str("apiVersion: policy.networking.k8s.io/v1alpha1\nkind: BaselineAdminNetworkPolicy\nmetadata: {name: default}\nspec: {subject: {namespaces: {}}, egress: [{action: Pass, to: [{namespaces: {}}]}]}\n").unwrap();
        assert_eq!(
            compile_baseline_admin_network_policy(&banp)
                .unwrap_err()
                .field,
            "spec.egress[0].action"
        );
    }
}
