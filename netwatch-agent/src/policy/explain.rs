//! Why a flow is denied, in words: the near misses of each selecting policy
//! and the one-sentence summary.

use std::fmt::Write;
use std::net::IpAddr;

use super::evaluate::{EndpointKind, Flow, FlowVerdict, PolicyEngine, PolicyVerdict, Resolved};
use super::model::{
    Direction, NAMESPACE_NAME_LABEL, NamespaceScope, PeerMatcher, PolicyRef, PolicyRule, PortSpec,
};
use super::selector::CompiledSelector;
use crate::record::Tier;

/// What the other end is called from the point of view of `direction`.
fn role(direction: Direction) -> &'static str {
    match direction {
        Direction::Ingress => "source",
        Direction::Egress => "destination",
    }
}

/// One line per rule of `policy` in `direction` (or one saying it has none),
/// describing what matched and what did not. Only called for policies that
/// do not allow the flow. Each line is written into one buffer: this runs
/// for every denied flow the agent reports.
pub(crate) fn near_misses(
    engine: &PolicyEngine,
    policy: u32,
    direction: Direction,
    flow: &Flow<'_>,
) -> Vec<String> {
    let p = &engine.policies[policy as usize];
    let rules = p.rules(direction).unwrap_or_default();
    if rules.is_empty() {
        return vec![format!(
            "{} has no {direction} rules: it allows no {direction} traffic for the pods it selects",
            p.reference
        )];
    }
    rules
        .iter()
        .enumerate()
        .map(|(i, rule)| {
            let mut line = String::with_capacity(256);
            let _ = write!(line, "{} {direction} rule {}: ", p.reference, i + 1);
            rule_miss(&mut line, engine, &p.reference, rule, direction, flow);
            line
        })
        .collect()
}

fn rule_miss(
    out: &mut String,
    engine: &PolicyEngine,
    policy: &PolicyRef,
    rule: &PolicyRule,
    direction: Direction,
    flow: &Flow<'_>,
) {
    let other = flow.other(direction);
    let who = role(direction);
    if rule.peers.is_empty() {
        let list = if direction == Direction::Ingress {
            "from"
        } else {
            "to"
        };
        let _ = write!(out, "every {who} matches (no {list} list)");
    } else if let Some(peer) = rule
        .peers
        .iter()
        .find(|m| engine.peer_matches(policy.namespace_or_empty(), m, other, flow.family_hint))
    {
        let _ = write!(out, "peer {peer} matches the {who}");
    } else {
        for (i, m) in rule.peers.iter().enumerate() {
            if i > 0 {
                out.push_str("; ");
            }
            peer_miss(
                out,
                engine,
                policy.namespace_or_empty(),
                m,
                other,
                who,
                flow.family_hint,
            );
        }
    }
    out.push_str("; ");
    if rule.ports.is_empty() {
        out.push_str("every port matches (no ports list)");
    } else if let Some(m) = rule
        .ports
        .iter()
        .find(|m| PolicyEngine::port_matches(m, &flow.destination, flow.port, flow.protocol))
    {
        let _ = write!(out, "port {}/{} matches {m}", flow.port, flow.protocol);
    } else {
        let _ = write!(out, "port {}/{} not in [", flow.port, flow.protocol);
        for (i, m) in rule.ports.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            let _ = write!(out, "{m}");
            if let PortSpec::Named(name) = &m.port {
                let resolved = flow
                    .destination
                    .pod
                    .and_then(|(_, pod)| pod.named_port(name, m.protocol));
                let _ = match resolved {
                    Some(n) => write!(out, " (= {n} on the destination)"),
                    None if flow.destination.kind == EndpointKind::Pod => write!(
                        out,
                        " (the destination has no {} container port named {name})",
                        m.protocol
                    ),
                    None => write!(
                        out,
                        " (named ports only resolve on pods with container ports)"
                    ),
                };
            }
        }
        out.push(']');
    }
}

#[allow(clippy::too_many_arguments)]
fn peer_miss(
    out: &mut String,
    engine: &PolicyEngine,
    policy_namespace: &str,
    peer: &PeerMatcher,
    end: &Resolved<'_>,
    who: &str,
    hint: Option<IpAddr>,
) {
    let _ = match peer {
        PeerMatcher::Pods {
            namespaces,
            pods,
            pod_selector_given,
        } => {
            let Some(ns) = &end.namespace else {
                let ip = end.given_ip.map(|ip| ip.to_string()).unwrap_or_default();
                let _ = write!(
                    out,
                    "peer {peer} selects pods, and the {who} {ip} is not a pod"
                );
                return;
            };
            match namespaces {
                NamespaceScope::PolicyNamespace if ns.name != policy_namespace => write!(
                    out,
                    "peer podSelector {pods} only selects pods in namespace {policy_namespace}, and the {who} is in {}",
                    ns.name
                ),
                NamespaceScope::PolicyNamespace => {
                    let _ = write!(out, "peer podSelector {pods}");
                    labels_miss(out, pods, end, who);
                    Ok(())
                }
                NamespaceScope::Selector(ns_selector) if !ns_selector.matches(&ns.labels) => {
                    if !engine
                        .model
                        .namespaces
                        .iter()
                        .any(|n| ns_selector.matches(&n.labels))
                    {
                        let _ = write!(out, "namespaceSelector {ns_selector} matches no namespace");
                        out.push_str(&namespace_hint(engine, ns_selector));
                        return;
                    }
                    let _ = write!(
                        out,
                        "namespaceSelector {ns_selector} does not match {who} namespace {} labels ",
                        ns.name
                    );
                    write_labels(out, &ns.labels);
                    out.push_str(" (");
                    write_mismatches(out, ns_selector, &ns.labels);
                    out.push(')');
                    Ok(())
                }
                NamespaceScope::Selector(ns_selector) if *pod_selector_given => {
                    let _ = write!(
                        out,
                        "namespaceSelector {ns_selector} matches namespace {}, but podSelector {pods}",
                        ns.name
                    );
                    labels_miss(out, pods, end, who);
                    Ok(())
                }
                // A matching namespace without a podSelector matches; only
                // reached if called for a peer that matched.
                NamespaceScope::Selector(_) => write!(out, "peer {peer} matches"),
            }
        }
        PeerMatcher::IpBlock(block) => match engine.block_address(end, hint) {
            Some(ip) => match block.excepted_by(ip) {
                Some(except) if block.cidr.contains(&ip) => write!(
                    out,
                    "peer ipBlock {block}: the {who} IP {ip} is in {} but excepted by {except}",
                    block.cidr
                ),
                _ => write!(
                    out,
                    "peer ipBlock {block} does not contain the {who} IP {ip}"
                ),
            },
            None if end.kind == EndpointKind::Pod
                && !engine.options.ipblock_matches_pods
                && end.address(hint).is_some() =>
            {
                write!(
                    out,
                    "peer ipBlock {block} is not applied to pod IPs (--ipblock-matches-pods=false), and the {who} is a pod"
                )
            }
            None => write!(
                out,
                "peer ipBlock {block} cannot match the {who}: it has no IP"
            ),
        },
    };
}

/// ` does not match source labels {app: web} (missing tier=frontend)`.
fn labels_miss(out: &mut String, selector: &CompiledSelector, end: &Resolved<'_>, who: &str) {
    let _ = write!(out, " does not match {who} labels ");
    write_labels(out, &end.labels);
    out.push_str(" (");
    write_mismatches(out, selector, &end.labels);
    out.push(')');
}

fn write_labels(out: &mut String, labels: &super::selector::Labels) {
    out.push('{');
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(k);
        out.push_str(": ");
        out.push_str(v);
    }
    out.push('}');
}

fn write_mismatches(
    out: &mut String,
    selector: &CompiledSelector,
    labels: &super::selector::Labels,
) {
    selector.write_mismatches(labels, out);
}

/// ` (kube-system has kubernetes.io/metadata.name=kube-system)` when the
/// selector asks for a value that is the name of a namespace: the classic
/// `name: kube-system` mistake.
pub(crate) fn namespace_hint(engine: &PolicyEngine, selector: &CompiledSelector) -> String {
    let hints: Vec<String> = selector
        .wanted_values()
        .filter(|(key, _)| *key != NAMESPACE_NAME_LABEL)
        .filter(|(_, value)| engine.model.namespace(value).is_some())
        .map(|(_, value)| format!("{value} has {NAMESPACE_NAME_LABEL}={value}"))
        .collect();
    if hints.is_empty() {
        String::new()
    } else {
        format!(" ({})", hints.join("; "))
    }
}

fn list(refs: &[PolicyRef]) -> String {
    refs.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn isolate_verb(n: usize) -> &'static str {
    if n == 1 { "isolates" } else { "isolate" }
}

/// See [`FlowVerdict::sentence`].
pub(crate) fn sentence(v: &FlowVerdict) -> String {
    let (src, dst) = (v.source.to_string(), v.destination.to_string());
    let traffic = format!("{}/{}", v.port, v.protocol);
    if v.verdict == PolicyVerdict::Denied {
        let mut parts = Vec::new();
        // A cluster policy's Deny rule decides by itself; no isolation.
        for (d, side) in [(&v.ingress, "ingress"), (&v.egress, "egress")] {
            if d.verdict == PolicyVerdict::Denied
                && let Some(tier @ (Tier::Admin | Tier::Baseline)) = d.decided_in
            {
                parts.push(format!(
                    "{} ({tier} tier) denies {side} {src} -> {dst} on {traffic}",
                    list(&d.denied_by)
                ));
            }
        }
        // A Calico tier: a Deny rule, or the end-of-tier deny of the
        // policies that selected the pod.
        for (d, side) in [(&v.ingress, "ingress"), (&v.egress, "egress")] {
            if d.verdict == PolicyVerdict::Denied
                && let Some(Tier::Calico(tier)) = d.decided_in
            {
                let end_of_tier = d.denied_by.iter().all(|r| r.rule.is_none());
                parts.push(if end_of_tier {
                    format!(
                        "{} {} {} for {side} in Calico tier {} and no rule there allows {src} -> {dst} on {traffic}: end-of-tier deny",
                        list(&d.denied_by),
                        if d.denied_by.len() == 1 { "selects" } else { "select" },
                        if side == "ingress" { &dst } else { &src },
                        tier.as_str()
                    )
                } else {
                    format!(
                        "{} (Calico tier {}) denies {side} {src} -> {dst} on {traffic}",
                        list(&d.denied_by),
                        tier.as_str()
                    )
                });
            }
        }
        let by_network_policy = |d: &super::evaluate::DirectionVerdict| {
            d.verdict == PolicyVerdict::Denied && d.decided_in == Some(Tier::NetworkPolicy)
        };
        if by_network_policy(&v.ingress) {
            parts.push(format!(
                "{} {} {dst} for ingress; no policy allows {src} on {traffic}",
                list(&v.ingress.denied_by),
                isolate_verb(v.ingress.denied_by.len())
            ));
        }
        if by_network_policy(&v.egress) {
            parts.push(format!(
                "{} {} {src} for egress; no policy allows egress to {dst} on {traffic}",
                list(&v.egress.denied_by),
                isolate_verb(v.egress.denied_by.len())
            ));
        }
        return parts.join("; and ");
    }
    if !v.egress.isolated && !v.ingress.isolated {
        return format!(
            "{src} -> {dst} on {traffic} is allowed: no NetworkPolicy isolates {src} for egress or {dst} for ingress"
        );
    }
    let by_tier = |d: &super::evaluate::DirectionVerdict| match d.decided_in {
        Some(tier @ (Tier::Admin | Tier::Baseline)) => format!(" ({tier} tier)"),
        Some(Tier::Calico(tier)) => format!(" (Calico tier {})", tier.as_str()),
        _ => String::new(),
    };
    let egress = if v.egress.isolated {
        format!(
            "egress allowed by {}{}",
            list(&v.egress.allowed_by),
            by_tier(&v.egress)
        )
    } else {
        format!("{src} is not isolated for egress")
    };
    let ingress = if v.ingress.isolated {
        format!(
            "ingress allowed by {}{}",
            list(&v.ingress.allowed_by),
            by_tier(&v.ingress)
        )
    } else {
        format!("{dst} is not isolated for ingress")
    };
    format!("{src} -> {dst} on {traffic} is allowed: {egress}; {ingress}")
}
