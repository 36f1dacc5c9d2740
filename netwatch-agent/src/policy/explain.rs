//! Why a flow is denied, in words: the near misses of each selecting policy
//! and the one-sentence summary.

use std::net::IpAddr;

use super::evaluate::{EndpointKind, Flow, FlowVerdict, PolicyEngine, Resolved, Verdict};
use super::model::{
    Direction, NAMESPACE_NAME_LABEL, NamespaceScope, PeerMatcher, PolicyRef, PolicyRule, PortSpec,
};
use super::selector::{CompiledSelector, render_labels};

/// What the other end is called from the point of view of `direction`.
fn role(direction: Direction) -> &'static str {
    match direction {
        Direction::Ingress => "source",
        Direction::Egress => "destination",
    }
}

/// One line per rule of `policy` in `direction` (or one saying it has none),
/// describing what matched and what did not. Only called for policies that
/// do not allow the flow.
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
            "{} has no {direction} rules: it allows no {direction} traffic to the pods it selects",
            p.reference
        )];
    }
    rules
        .iter()
        .enumerate()
        .map(|(i, rule)| {
            format!(
                "{} {direction} rule {}: {}",
                p.reference,
                i + 1,
                rule_miss(engine, &p.reference, rule, direction, flow)
            )
        })
        .collect()
}

fn rule_miss(
    engine: &PolicyEngine,
    policy: &PolicyRef,
    rule: &PolicyRule,
    direction: Direction,
    flow: &Flow<'_>,
) -> String {
    let other = flow.other(direction);
    let who = role(direction);
    let peers = if rule.peers.is_empty() {
        format!(
            "every {who} matches (no {} list)",
            if direction == Direction::Ingress {
                "from"
            } else {
                "to"
            }
        )
    } else if let Some(peer) = rule
        .peers
        .iter()
        .find(|m| engine.peer_matches(&policy.namespace, m, other, flow.family_hint))
    {
        format!("peer {peer} matches the {who}")
    } else {
        rule.peers
            .iter()
            .map(|m| peer_miss(engine, &policy.namespace, m, other, who, flow.family_hint))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let traffic = format!("{}/{}", flow.port, flow.protocol);
    let ports = if rule.ports.is_empty() {
        "every port matches (no ports list)".to_string()
    } else if let Some(m) = rule
        .ports
        .iter()
        .find(|m| PolicyEngine::port_matches(m, &flow.destination, flow.port, flow.protocol))
    {
        format!("port {traffic} matches {m}")
    } else {
        let listed: Vec<String> = rule
            .ports
            .iter()
            .map(|m| match &m.port {
                PortSpec::Named(name) => match flow
                    .destination
                    .pod
                    .and_then(|(_, pod)| pod.named_port(name, m.protocol))
                {
                    Some(n) => format!("{m} (= {n} on the destination)"),
                    None if flow.destination.kind == EndpointKind::Pod => {
                        format!(
                            "{m} (the destination has no {} container port named {name})",
                            m.protocol
                        )
                    }
                    None => format!("{m} (named ports only resolve on pods with container ports)"),
                },
                _ => m.to_string(),
            })
            .collect();
        format!("port {traffic} not in [{}]", listed.join(", "))
    };
    format!("{peers}; {ports}")
}

fn peer_miss(
    engine: &PolicyEngine,
    policy_namespace: &str,
    peer: &PeerMatcher,
    end: &Resolved<'_>,
    who: &str,
    hint: Option<IpAddr>,
) -> String {
    match peer {
        PeerMatcher::Pods {
            namespaces,
            pods,
            pod_selector_given,
        } => {
            let Some(ns) = &end.namespace else {
                let ip = end.given_ip.map(|ip| ip.to_string()).unwrap_or_default();
                return format!("peer {peer} selects pods, and the {who} {ip} is not a pod");
            };
            match namespaces {
                NamespaceScope::PolicyNamespace => {
                    if ns.name != policy_namespace {
                        format!(
                            "peer podSelector {pods} only selects pods in namespace {policy_namespace}, and the {who} is in {}",
                            ns.name
                        )
                    } else {
                        labels_miss(&format!("peer podSelector {pods}"), pods, end, who)
                    }
                }
                NamespaceScope::Selector(ns_selector) => {
                    if !ns_selector.matches(&ns.labels) {
                        if engine.model.namespaces_matching(ns_selector).is_empty() {
                            return format!(
                                "namespaceSelector {ns_selector} matches no namespace{}",
                                namespace_hint(engine, ns_selector)
                            );
                        }
                        format!(
                            "namespaceSelector {ns_selector} does not match {who} namespace {} labels {} ({})",
                            ns.name,
                            render_labels(&ns.labels),
                            ns_selector.mismatches(&ns.labels).join(", ")
                        )
                    } else if *pod_selector_given {
                        labels_miss(
                            &format!(
                                "namespaceSelector {ns_selector} matches namespace {}, but podSelector {pods}",
                                ns.name
                            ),
                            pods,
                            end,
                            who,
                        )
                    } else {
                        // Unreachable in practice: a matching namespace with no
                        // podSelector matches; say what we know.
                        format!("peer {peer} matches")
                    }
                }
            }
        }
        PeerMatcher::IpBlock(block) => match engine.block_address(end, hint) {
            Some(ip) => match block.excepted_by(ip) {
                Some(except) if block.cidr.contains(&ip) => {
                    format!(
                        "peer ipBlock {block}: the {who} IP {ip} is in {} but excepted by {except}",
                        block.cidr
                    )
                }
                _ => format!("peer ipBlock {block} does not contain the {who} IP {ip}"),
            },
            None if end.kind == EndpointKind::Pod
                && !engine.options.ipblock_matches_pods
                && end.address(hint).is_some() =>
            {
                format!(
                    "peer ipBlock {block} is not applied to pod IPs (--ipblock-matches-pods=false), and the {who} is a pod"
                )
            }
            None => format!("peer ipBlock {block} cannot match the {who}: it has no IP"),
        },
    }
}

fn labels_miss(what: &str, selector: &CompiledSelector, end: &Resolved<'_>, who: &str) -> String {
    format!(
        "{what} does not match {who} labels {} ({})",
        render_labels(&end.labels),
        selector.mismatches(&end.labels).join(", ")
    )
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
    if v.verdict == Verdict::Denied {
        let mut parts = Vec::new();
        if v.ingress.verdict == Verdict::Denied {
            parts.push(format!(
                "{} {} {dst} for ingress; no policy allows {src} on {traffic}",
                list(&v.ingress.denied_by),
                isolate_verb(v.ingress.denied_by.len())
            ));
        }
        if v.egress.verdict == Verdict::Denied {
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
    let egress = if v.egress.isolated {
        format!("egress allowed by {}", list(&v.egress.allowed_by))
    } else {
        format!("{src} is not isolated for egress")
    };
    let ingress = if v.ingress.isolated {
        format!("ingress allowed by {}", list(&v.ingress.allowed_by))
    } else {
        format!("{dst} is not isolated for ingress")
    };
    format!("{src} -> {dst} on {traffic} is allowed: {egress}; {ingress}")
}
