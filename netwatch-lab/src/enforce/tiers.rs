//! The Admin and Baseline tiers: ClusterNetworkPolicy
//! (policy.networking.k8s.io/v1alpha2) and AdminNetworkPolicy /
//! BaselineAdminNetworkPolicy (v1alpha1), validated and normalised into the
//! enforcer's peers and ports, written from the API's types and docs.
//!
//! Per direction of a pod the API judges: the Admin tier (ClusterNetworkPolicy
//! tier Admin and AdminNetworkPolicy) by ascending priority, rules in
//! written order, first match decides (Accept/Allow: allowed; Deny: denied;
//! Pass: skip the rest of the tier); then the pod's NetworkPolicies if they
//! isolate it; then the Baseline tier (ClusterNetworkPolicy tier Baseline and
//! the BaselineAdminNetworkPolicy `default`, Pass skipping the rest of it);
//! then allowed. A policy with no rules in a direction does not act there.
//! The compiler turns this into chains in [`super::Compiler::pod_chains`].

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::{Cidr, EnforceError, L4, Namespaces, Peer, PortMatch, Selector, port_number};
use crate::manifests::{TierPeer, TierPolicy, TierPort, TierPortRange, TierProtocol, TierRule};

/// Which of the two cluster tiers a policy is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Tier {
    Admin,
    Baseline,
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Admin => "Admin",
            Tier::Baseline => "Baseline",
        })
    }
}

/// What a matching rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Action {
    /// Accept (v1alpha2) or Allow (v1alpha1).
    Accept,
    Deny,
    Pass,
}

/// Who a cluster policy applies to: pods of the namespaces `namespaces`
/// selects that `pods` selects (empty: all of them).
#[derive(Clone, Debug)]
pub(super) struct Subject {
    pub namespaces: Selector,
    pub pods: Selector,
}

#[derive(Clone, Debug)]
pub(super) struct TierRuleSpec {
    pub index: usize,
    pub name: Option<String>,
    pub action: Action,
    /// Empty: the rule matches nothing (only domainNames peers, which an
    /// address-based enforcer cannot see).
    pub peers: Vec<Peer>,
    /// `[PortMatch::Any]` when the rule lists no ports.
    pub ports: Vec<PortMatch>,
}

/// A cluster policy, ready to compile.
#[derive(Clone, Debug)]
pub(super) struct ClusterPolicy {
    pub kind: &'static str,
    pub name: String,
    pub tier: Tier,
    pub priority: u32,
    pub subject: Subject,
    pub ingress: Vec<TierRuleSpec>,
    pub egress: Vec<TierRuleSpec>,
}

impl ClusterPolicy {
    pub fn rules(&self, d: super::Direction) -> &[TierRuleSpec] {
        match d {
            super::Direction::Ingress => &self.ingress,
            super::Direction::Egress => &self.egress,
        }
    }

    /// `ClusterNetworkPolicy deny-db (Admin)`: how comments name it.
    pub fn label(&self) -> String {
        format!("{} {} ({})", self.kind, self.name, self.tier)
    }

    /// The order the API evaluates a tier in: ascending priority. Where it
    /// leaves the order open (equal priorities), ClusterNetworkPolicy comes
    /// before AdminNetworkPolicy, then by name, as netwatch's engine
    /// documents; the BaselineAdminNetworkPolicy counts as priority 0.
    pub fn order(&self) -> (Tier, u32, u8, &str) {
        let kind = match self.kind {
            "ClusterNetworkPolicy" => 0,
            "AdminNetworkPolicy" => 1,
            _ => 2,
        };
        (self.tier, self.priority, kind, &self.name)
    }
}

/// Validate and normalise every cluster policy, sorted in evaluation order.
pub(super) fn parse_all(objects: &[TierPolicy]) -> Result<Vec<ClusterPolicy>, EnforceError> {
    let mut out = objects.iter().map(parse).collect::<Result<Vec<_>, _>>()?;
    out.sort_by(|a, b| a.order().cmp(&b.order()));
    Ok(out)
}

fn parse(object: &TierPolicy) -> Result<ClusterPolicy, EnforceError> {
    let name = object.metadata.name.clone().unwrap_or_default();
    let (kind, v1alpha2) = match object.kind.as_str() {
        "ClusterNetworkPolicy" => ("ClusterNetworkPolicy", true),
        "AdminNetworkPolicy" => ("AdminNetworkPolicy", false),
        _ => ("BaselineAdminNetworkPolicy", false),
    };
    let baseline_kind = kind == "BaselineAdminNetworkPolicy";
    let err = |field: &str, detail: String| EnforceError::ClusterPolicy {
        kind: kind.into(),
        name: name.clone(),
        field: field.into(),
        detail,
    };
    let spec = &object.spec;
    if baseline_kind && name != "default" {
        return Err(err(
            "metadata.name",
            format!("{name:?}: the only BaselineAdminNetworkPolicy is named `default`"),
        ));
    }
    let tier = match (v1alpha2, spec.tier.as_deref()) {
        (true, Some("Admin")) => Tier::Admin,
        (true, Some("Baseline")) => Tier::Baseline,
        (true, Some(other)) => {
            return Err(err(
                "spec.tier",
                format!("{other:?}: use Admin or Baseline"),
            ));
        }
        (true, None) => return Err(err("spec.tier", "missing: Admin or Baseline".into())),
        (false, Some(_)) => {
            return Err(err(
                "spec.tier",
                "v1alpha1 has no tier (the kind is the tier)".into(),
            ));
        }
        (false, None) if baseline_kind => Tier::Baseline,
        (false, None) => Tier::Admin,
    };
    let priority = match (baseline_kind, spec.priority) {
        (true, None) => 0,
        (true, Some(_)) => {
            return Err(err(
                "spec.priority",
                "a BaselineAdminNetworkPolicy has no priority".into(),
            ));
        }
        (false, Some(p)) if (0..=1000).contains(&p) => p as u32,
        (false, Some(p)) => {
            return Err(err("spec.priority", format!("{p} is not within 0-1000")));
        }
        (false, None) => return Err(err("spec.priority", "missing (0-1000)".into())),
    };
    let subject = match &spec.subject {
        None => return Err(err("spec.subject", "missing".into())),
        Some(s) => match (&s.namespaces, &s.pods) {
            (Some(ns), None) => Subject {
                namespaces: selector(Some(ns), "spec.subject.namespaces", &err)?,
                pods: Selector::default(),
            },
            (None, Some(p)) => Subject {
                namespaces: selector(
                    p.namespace_selector.as_ref(),
                    "spec.subject.pods.namespaceSelector",
                    &err,
                )?,
                pods: selector(
                    p.pod_selector.as_ref(),
                    "spec.subject.pods.podSelector",
                    &err,
                )?,
            },
            _ => {
                return Err(err(
                    "spec.subject",
                    "set exactly one of namespaces or pods".into(),
                ));
            }
        },
    };
    let rules = |list: &[TierRule], ingress: bool| {
        list.iter()
            .enumerate()
            .map(|(i, r)| {
                let direction = if ingress { "ingress" } else { "egress" };
                parse_rule(
                    r,
                    &format!("spec.{direction}[{i}]"),
                    i,
                    ingress,
                    v1alpha2,
                    baseline_kind,
                    &err,
                )
            })
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(ClusterPolicy {
        kind,
        name: name.clone(),
        tier,
        priority,
        ingress: rules(&spec.ingress, true)?,
        egress: rules(&spec.egress, false)?,
        subject,
    })
}

type ErrFn<'a> = dyn Fn(&str, String) -> EnforceError + 'a;

fn selector(
    sel: Option<&LabelSelector>,
    field: &str,
    err: &ErrFn<'_>,
) -> Result<Selector, EnforceError> {
    Selector::parse(sel, &|f: String, d: String| err(&f, d), field)
}

fn parse_rule(
    rule: &TierRule,
    field: &str,
    index: usize,
    ingress: bool,
    v1alpha2: bool,
    baseline_kind: bool,
    err: &ErrFn<'_>,
) -> Result<TierRuleSpec, EnforceError> {
    let action = match (v1alpha2, rule.action.as_deref()) {
        (true, Some("Accept")) | (false, Some("Allow")) => Action::Accept,
        (_, Some("Deny")) => Action::Deny,
        (_, Some("Pass")) if !baseline_kind => Action::Pass,
        (_, other) => {
            let valid = match (v1alpha2, baseline_kind) {
                (true, _) => "Accept, Deny or Pass",
                (false, false) => "Allow, Deny or Pass",
                (false, true) => "Allow or Deny",
            };
            return Err(err(
                &format!("{field}.action"),
                format!("{other:?}: use {valid}"),
            ));
        }
    };
    let (peers_field, peers, wrong) = if ingress {
        ("from", &rule.from, rule.to.is_some())
    } else {
        ("to", &rule.to, rule.from.is_some())
    };
    if wrong {
        return Err(err(
            field,
            format!(
                "an {} rule lists its peers under `{peers_field}`",
                if ingress { "ingress" } else { "egress" }
            ),
        ));
    }
    let peers = match peers.as_deref() {
        None | Some([]) => {
            return Err(err(
                &format!("{field}.{peers_field}"),
                "a rule needs at least one peer".into(),
            ));
        }
        Some(list) => list,
    };
    let mut out_peers = Vec::new();
    let mut addresses_only = false;
    for (j, p) in peers.iter().enumerate() {
        let f = format!("{field}.{peers_field}[{j}]");
        let (parsed, by_address) = parse_peer(p, &f, ingress, baseline_kind, err)?;
        addresses_only |= by_address;
        out_peers.extend(parsed);
    }
    let ports = match (v1alpha2, &rule.protocols, &rule.ports) {
        (true, _, Some(_)) => {
            return Err(err(
                &format!("{field}.ports"),
                "v1alpha2 names ports under `protocols`".into(),
            ));
        }
        (false, Some(_), _) => {
            return Err(err(
                &format!("{field}.protocols"),
                "v1alpha1 names ports under `ports`".into(),
            ));
        }
        (true, Some(list), None) => protocols(list, &format!("{field}.protocols"), err)?,
        (false, None, Some(list)) => ports(list, &format!("{field}.ports"), err)?,
        _ => vec![PortMatch::Any],
    };
    if addresses_only && ports.iter().any(|p| matches!(p, PortMatch::Named(..))) {
        return Err(err(
            field,
            "a named port cannot be used with networks, nodes or domainNames peers: they have no container ports".into(),
        ));
    }
    Ok(TierRuleSpec {
        index,
        name: rule.name.clone(),
        action,
        peers: out_peers,
        ports,
    })
}

/// A peer's enforcer peers, and whether it is an address peer (networks,
/// nodes, domainNames), which named ports cannot go with.
fn parse_peer(
    p: &TierPeer,
    field: &str,
    ingress: bool,
    baseline_kind: bool,
    err: &ErrFn<'_>,
) -> Result<(Vec<Peer>, bool), EnforceError> {
    let set = [
        p.namespaces.is_some(),
        p.pods.is_some(),
        p.nodes.is_some(),
        p.networks.is_some(),
        p.domain_names.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if set != 1 {
        return Err(err(
            field,
            "set exactly one of namespaces, pods, nodes, networks or domainNames".into(),
        ));
    }
    if ingress && (p.nodes.is_some() || p.networks.is_some() || p.domain_names.is_some()) {
        return Err(err(
            field,
            "ingress peers are namespaces or pods only".into(),
        ));
    }
    if let Some(ns) = &p.namespaces {
        let namespaces = selector(Some(ns), &format!("{field}.namespaces"), err)?;
        return Ok((
            vec![Peer::Pods {
                namespaces: Namespaces::Matching(namespaces),
                pods: Selector::default(),
            }],
            false,
        ));
    }
    if let Some(pods) = &p.pods {
        return Ok((
            vec![Peer::Pods {
                namespaces: Namespaces::Matching(selector(
                    pods.namespace_selector.as_ref(),
                    &format!("{field}.pods.namespaceSelector"),
                    err,
                )?),
                pods: selector(
                    pods.pod_selector.as_ref(),
                    &format!("{field}.pods.podSelector"),
                    err,
                )?,
            }],
            false,
        ));
    }
    if let Some(nodes) = &p.nodes {
        return Ok((
            vec![Peer::Nodes(selector(
                Some(nodes),
                &format!("{field}.nodes"),
                err,
            )?)],
            true,
        ));
    }
    if let Some(networks) = &p.networks {
        if networks.is_empty() {
            return Err(err(
                &format!("{field}.networks"),
                "list at least one CIDR".into(),
            ));
        }
        let mut out = Vec::new();
        for (k, n) in networks.iter().enumerate() {
            let cidr = Cidr::parse(n).map_err(|d| err(&format!("{field}.networks[{k}]"), d))?;
            out.push(Peer::Network(cidr));
        }
        return Ok((out, true));
    }
    if baseline_kind {
        return Err(err(
            &format!("{field}.domainNames"),
            "a BaselineAdminNetworkPolicy has no domainNames peer".into(),
        ));
    }
    // domainNames: the enforcer, like netwatch, judges addresses and never
    // sees which name a client resolved, so such a peer matches nothing.
    Ok((Vec::new(), true))
}

/// A port range. v1alpha2 requires start below end; v1alpha1 checks
/// nothing, and a range whose start is after its end matches no port.
fn range(
    l4: L4,
    start: i32,
    end: i32,
    field: &str,
    v1alpha2: bool,
    err: &ErrFn<'_>,
) -> Result<Option<PortMatch>, EnforceError> {
    let a = port_number(start).map_err(|d| err(&format!("{field}.start"), d))?;
    let b = port_number(end).map_err(|d| err(&format!("{field}.end"), d))?;
    if v1alpha2 && a >= b {
        return Err(err(field, format!("start {a} is not below end {b}")));
    }
    Ok((a <= b).then_some(PortMatch::Range(l4, a, b)))
}

/// A named port: the destination pod's container port of that name, with
/// whatever protocol the pod declares it.
fn named(name: &str, field: &str, err: &ErrFn<'_>) -> Result<Vec<PortMatch>, EnforceError> {
    if name.is_empty() {
        return Err(err(field, "empty port name".into()));
    }
    Ok([L4::Tcp, L4::Udp, L4::Sctp]
        .into_iter()
        .map(|l4| PortMatch::Named(l4, name.to_string()))
        .collect())
}

fn protocols(
    list: &[TierProtocol],
    field: &str,
    err: &ErrFn<'_>,
) -> Result<Vec<PortMatch>, EnforceError> {
    if list.is_empty() {
        return Err(err(field, "list at least one protocol".into()));
    }
    let mut out = Vec::new();
    for (k, p) in list.iter().enumerate() {
        let f = format!("{field}[{k}]");
        let chosen: Vec<(L4, &str, _)> = [
            (L4::Tcp, "tcp", &p.tcp),
            (L4::Udp, "udp", &p.udp),
            (L4::Sctp, "sctp", &p.sctp),
        ]
        .into_iter()
        .filter_map(|(l4, name, d)| d.as_ref().map(|d| (l4, name, d)))
        .collect();
        match (chosen.as_slice(), &p.destination_named_port) {
            ([], Some(name)) => out.extend(named(name, &format!("{f}.destinationNamedPort"), err)?),
            ([(l4, name, d)], None) => {
                let df = format!("{f}.{name}.destinationPort");
                let Some(port) = &d.destination_port else {
                    return Err(err(&df, "missing: number or range".into()));
                };
                out.push(match (port.number, &port.range) {
                    (Some(n), None) => {
                        let n = port_number(n).map_err(|d| err(&format!("{df}.number"), d))?;
                        PortMatch::Range(*l4, n, n)
                    }
                    (
                        None,
                        Some(TierPortRange {
                            protocol: None,
                            start,
                            end,
                        }),
                    ) => match range(*l4, *start, *end, &format!("{df}.range"), true, err)? {
                        Some(r) => r,
                        None => continue,
                    },
                    (None, Some(_)) => {
                        return Err(err(
                            &format!("{df}.range.protocol"),
                            "v1alpha2 ranges take the protocol from tcp/udp/sctp".into(),
                        ));
                    }
                    _ => {
                        return Err(err(&df, "set exactly one of number or range".into()));
                    }
                });
            }
            _ => {
                return Err(err(
                    &f,
                    "set exactly one of tcp, udp, sctp or destinationNamedPort".into(),
                ));
            }
        }
    }
    Ok(out)
}

fn ports(list: &[TierPort], field: &str, err: &ErrFn<'_>) -> Result<Vec<PortMatch>, EnforceError> {
    if list.is_empty() {
        return Err(err(field, "list at least one port".into()));
    }
    let l4 = |p: Option<&str>, f: &str| L4::from_api(p).map_err(|d| err(f, d));
    let mut out = Vec::new();
    for (k, p) in list.iter().enumerate() {
        let f = format!("{field}[{k}]");
        match (&p.port_number, &p.port_range, &p.named_port) {
            (Some(n), None, None) => {
                let proto = l4(n.protocol.as_deref(), &format!("{f}.portNumber.protocol"))?;
                let port =
                    port_number(n.port).map_err(|d| err(&format!("{f}.portNumber.port"), d))?;
                out.push(PortMatch::Range(proto, port, port));
            }
            (None, Some(r), None) => {
                let proto = l4(r.protocol.as_deref(), &format!("{f}.portRange.protocol"))?;
                out.extend(range(
                    proto,
                    r.start,
                    r.end,
                    &format!("{f}.portRange"),
                    false,
                    err,
                )?);
            }
            (None, None, Some(name)) => out.extend(named(name, &format!("{f}.namedPort"), err)?),
            _ => {
                return Err(err(
                    &f,
                    "set exactly one of portNumber, portRange or namedPort".into(),
                ));
            }
        }
    }
    Ok(out)
}
