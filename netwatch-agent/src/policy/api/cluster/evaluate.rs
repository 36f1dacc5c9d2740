//! The Admin and Baseline tiers: first matching rule by ascending priority,
//! rules in written order; near misses in words.

use std::borrow::Cow;
use std::fmt::Write;
use std::net::IpAddr;
use std::str::FromStr;

use super::compile::{
    Action, ClusterPeer, ClusterPolicy, ClusterPort, ClusterRule, SubjectMatcher,
    compile_admin_network_policy, compile_baseline_admin_network_policy,
    compile_cluster_network_policy,
};
use crate::cluster::ClusterSnapshot;
use crate::policy::PolicyError;
use crate::policy::evaluate::{EndpointKind, Flow, PolicyEngine, Resolved};
use crate::policy::model::{Direction, NamespaceModel, PolicyRef};
use crate::policy::selector::{CompiledSelector, Labels};
use crate::policy::tiers::PolicyTier;
use crate::policy::verdict::{Decision, Outcome, TierStep};
use crate::record::{PolicyKind, Tier};

/// A Node as `nodes` peers see it: labels and addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct NodeModel {
    pub name: String,
    pub labels: Labels,
    pub ips: Vec<IpAddr>,
}

/// Every cluster policy of a snapshot, compiled and in evaluation order:
/// Admin before Baseline, then priority, then ClusterNetworkPolicy before
/// AdminNetworkPolicy, then name.
#[derive(Clone, Debug, Default)]
pub(crate) struct ClusterPolicies {
    pub policies: Vec<ClusterPolicy>,
    pub nodes: Vec<NodeModel>,
}

impl ClusterPolicies {
    /// Compiles the snapshot's cluster policies; the first invalid one is an
    /// error naming it and the field.
    pub fn build(snapshot: &ClusterSnapshot) -> Result<Self, PolicyError> {
        let mut policies: Vec<ClusterPolicy> = Vec::new();
        fn invalid(
            kind: PolicyKind,
            tier: Tier,
            name: &Option<String>,
        ) -> impl FnOnce(crate::policy::FieldProblem) -> PolicyError {
            let name = name.clone().unwrap_or_default();
            move |problem| PolicyError::InvalidPolicy {
                policy: Box::new(PolicyRef::cluster(kind, tier, name)),
                problem: Box::new(problem),
            }
        }
        for p in &snapshot.cluster_network_policies {
            let tier = match p.spec.as_ref().and_then(|s| s.tier.as_deref()) {
                Some("Baseline") => Tier::Baseline,
                _ => Tier::Admin,
            };
            policies.push(compile_cluster_network_policy(p).map_err(invalid(
                PolicyKind::ClusterNetworkPolicy,
                tier,
                &p.metadata.name,
            ))?);
        }
        for p in &snapshot.admin_network_policies {
            policies.push(compile_admin_network_policy(p).map_err(invalid(
                PolicyKind::AdminNetworkPolicy,
                Tier::Admin,
                &p.metadata.name,
            ))?);
        }
        for p in &snapshot.baseline_admin_network_policies {
            policies.push(compile_baseline_admin_network_policy(p).map_err(invalid(
                PolicyKind::BaselineAdminNetworkPolicy,
                Tier::Baseline,
                &p.metadata.name,
            ))?);
        }
        // A later object of the same kind and name replaces the earlier.
        let mut by_name = std::collections::BTreeMap::new();
        for p in policies {
            by_name.insert((p.reference.kind, p.reference.name.clone()), p);
        }
        let mut policies: Vec<ClusterPolicy> = by_name.into_values().collect();
        policies.sort_by(|a, b| {
            (
                a.reference.tier,
                a.priority,
                a.reference.kind,
                &a.reference.name,
            )
                .cmp(&(
                    b.reference.tier,
                    b.priority,
                    b.reference.kind,
                    &b.reference.name,
                ))
        });
        let nodes = Self::nodes_of(snapshot);
        Ok(ClusterPolicies { policies, nodes })
    }

    /// The snapshot's nodes as `nodes` peers see them: name, labels and
    /// addresses.
    pub fn nodes_of(snapshot: &ClusterSnapshot) -> Vec<NodeModel> {
        snapshot
            .nodes
            .iter()
            .filter_map(|n| {
                Some(NodeModel {
                    name: n.metadata.name.clone()?,
                    labels: n.metadata.labels.clone().unwrap_or_default(),
                    ips: n
                        .status
                        .iter()
                        .flat_map(|s| s.addresses.iter().flatten())
                        .filter_map(|a| IpAddr::from_str(a.address.trim()).ok())
                        .collect(),
                })
            })
            .collect()
    }

    /// Whether an address can change a verdict (networks or nodes peers).
    pub fn uses_addresses(&self) -> bool {
        self.all_rules().any(|r| {
            r.peers
                .iter()
                .any(|p| matches!(p, ClusterPeer::Networks(_) | ClusterPeer::Nodes(_)))
        })
    }

    /// Whether any rule names a port.
    pub fn uses_named_ports(&self) -> bool {
        self.all_rules()
            .any(|r| r.ports.iter().any(|p| matches!(p, ClusterPort::Named(_))))
    }

    fn all_rules(&self) -> impl Iterator<Item = &ClusterRule> {
        self.policies
            .iter()
            .flat_map(|p| p.ingress.iter().chain(&p.egress))
    }

    /// The policies selecting a pod of `namespace` with `labels`, that have
    /// rules in ingress, and in egress; in evaluation order. Host-network
    /// pods are never selected.
    pub fn selecting(
        &self,
        namespace: &NamespaceModel,
        labels: &Labels,
        host_network: bool,
    ) -> (Vec<u32>, Vec<u32>) {
        let (mut ingress, mut egress) = (Vec::new(), Vec::new());
        if host_network {
            return (ingress, egress);
        }
        for (i, p) in self.policies.iter().enumerate() {
            if subject_matches(&p.subject, namespace, labels) {
                if !p.ingress.is_empty() {
                    ingress.push(i as u32);
                }
                if !p.egress.is_empty() {
                    egress.push(i as u32);
                }
            }
        }
        (ingress, egress)
    }

    /// The nodes that have `ip`.
    pub fn nodes_with(&self, ip: IpAddr) -> impl Iterator<Item = &NodeModel> {
        self.nodes.iter().filter(move |n| n.ips.contains(&ip))
    }
}

pub(crate) fn subject_matches(
    subject: &SubjectMatcher,
    namespace: &NamespaceModel,
    labels: &Labels,
) -> bool {
    match subject {
        SubjectMatcher::Namespaces(ns) => ns.matches(&namespace.labels),
        SubjectMatcher::Pods { namespaces, pods } => {
            namespaces.matches(&namespace.labels) && pods.matches(labels)
        }
    }
}

/// Whether `end` is a pod that `namespaces`/`pods` peers can select.
fn selectable_pod<'a>(end: &'a Resolved<'_>) -> Option<&'a NamespaceModel> {
    if end.kind == EndpointKind::External || end.pod.is_some_and(|(_, p)| p.host_network) {
        return None;
    }
    end.namespace.as_deref()
}

impl PolicyEngine {
    /// Whether one cluster peer matches `end` (the other end of the flow).
    pub(crate) fn cluster_peer_matches(
        &self,
        peer: &ClusterPeer,
        end: &Resolved<'_>,
        hint: Option<IpAddr>,
    ) -> bool {
        match peer {
            ClusterPeer::Namespaces(ns) => {
                selectable_pod(end).is_some_and(|n| ns.matches(&n.labels))
            }
            ClusterPeer::Pods { namespaces, pods } => selectable_pod(end)
                .is_some_and(|n| namespaces.matches(&n.labels) && pods.matches(&end.labels)),
            ClusterPeer::Networks(nets) => end
                .address(hint)
                .is_some_and(|ip| nets.iter().any(|n| n.contains(&ip))),
            ClusterPeer::Nodes(sel) => end
                .address(hint)
                .is_some_and(|ip| self.cluster.nodes_with(ip).any(|n| sel.matches(&n.labels))),
            ClusterPeer::DomainNames(_) => false,
        }
    }

    /// Whether one port entry matches the flow.
    pub(crate) fn cluster_port_matches(port: &ClusterPort, flow: &Flow<'_>) -> bool {
        match port {
            ClusterPort::Range {
                protocol,
                start,
                end,
            } => *protocol == flow.protocol && (*start..=*end).contains(&flow.port),
            ClusterPort::Named(name) => {
                flow.destination
                    .pod
                    .and_then(|(_, p)| p.named_port(name, flow.protocol))
                    == Some(flow.port)
            }
        }
    }

    pub(crate) fn cluster_rule_matches(
        &self,
        rule: &ClusterRule,
        direction: Direction,
        flow: &Flow<'_>,
    ) -> bool {
        let other = flow.other(direction);
        rule.peers
            .iter()
            .any(|p| self.cluster_peer_matches(p, other, flow.family_hint))
            && (rule.ports.is_empty()
                || rule
                    .ports
                    .iter()
                    .any(|p| Self::cluster_port_matches(p, flow)))
    }

    /// The first rule of policy `i` in `direction` matching the flow.
    pub(crate) fn cluster_first_match(
        &self,
        i: u32,
        direction: Direction,
        flow: &Flow<'_>,
    ) -> Option<(usize, Action)> {
        self.cluster.policies[i as usize]
            .rules(direction)
            .iter()
            .enumerate()
            .find(|(_, r)| self.cluster_rule_matches(r, direction, flow))
            .map(|(k, r)| (k, r.action))
    }

    /// The cluster policies of any tier selecting `subject` in `direction`.
    pub(crate) fn cluster_selecting<'a>(
        &'a self,
        subject: &Resolved<'_>,
        direction: Direction,
    ) -> Cow<'a, [u32]> {
        if self.cluster.policies.is_empty() {
            return Cow::Borrowed(&[]);
        }
        match (subject.kind, subject.pod, &subject.namespace) {
            (EndpointKind::External, _, _) | (_, _, None) => Cow::Borrowed(&[]),
            (_, Some((_, pod)), _) => {
                let id = &self.identities[pod.identity as usize];
                Cow::Borrowed(match direction {
                    Direction::Ingress => &id.cluster_ingress,
                    Direction::Egress => &id.cluster_egress,
                })
            }
            (_, None, Some(ns)) => {
                let (ingress, egress) = self.cluster.selecting(ns, &subject.labels, false);
                Cow::Owned(match direction {
                    Direction::Ingress => ingress,
                    Direction::Egress => egress,
                })
            }
        }
    }
}

/// The Admin or the Baseline tier.
pub(crate) struct ClusterTier {
    tier: Tier,
}

pub(crate) static ADMIN_TIER: ClusterTier = ClusterTier { tier: Tier::Admin };
pub(crate) static BASELINE_TIER: ClusterTier = ClusterTier {
    tier: Tier::Baseline,
};

impl ClusterTier {
    fn in_tier(&self, engine: &PolicyEngine, direction: Direction, flow: &Flow<'_>) -> Vec<u32> {
        engine
            .cluster_selecting(flow.subject(direction), direction)
            .iter()
            .copied()
            .filter(|&i| engine.cluster.policies[i as usize].reference.tier == self.tier)
            .collect()
    }
}

fn decision(action: Action) -> Decision {
    match action {
        Action::Allow => Decision::Allow,
        Action::Deny => Decision::Deny,
        Action::Pass => Decision::Pass,
    }
}

impl PolicyTier for ClusterTier {
    fn tier(&self) -> Tier {
        self.tier
    }

    fn decide(&self, engine: &PolicyEngine, direction: Direction, flow: &Flow<'_>) -> Decision {
        if engine.cluster.policies.is_empty() {
            return Decision::NotSelected;
        }
        for &i in engine
            .cluster_selecting(flow.subject(direction), direction)
            .iter()
        {
            if engine.cluster.policies[i as usize].reference.tier != self.tier {
                continue;
            }
            if let Some((_, action)) = engine.cluster_first_match(i, direction, flow) {
                return decision(action);
            }
        }
        Decision::NotSelected
    }

    fn judge(&self, engine: &PolicyEngine, direction: Direction, flow: &Flow<'_>) -> TierStep {
        let mut step = TierStep {
            tier: self.tier,
            outcome: Outcome::NotSelected,
            undefined_order_with: Vec::new(),
        };
        let candidates = self.in_tier(engine, direction, flow);
        let Some((pos, i, k, action)) = candidates.iter().enumerate().find_map(|(pos, &i)| {
            engine
                .cluster_first_match(i, direction, flow)
                .map(|(k, a)| (pos, i, k, a))
        }) else {
            return step;
        };
        let policy = &engine.cluster.policies[i as usize];
        let rule = &policy.rules(direction)[k];
        let by = policy.reference.with_rule(k, rule.name.as_deref());
        step.outcome = match action {
            Action::Allow => Outcome::Allow(vec![by]),
            Action::Deny => Outcome::Deny(vec![by]),
            Action::Pass => Outcome::Pass(by),
        };
        for &j in &candidates[pos + 1..] {
            let other = &engine.cluster.policies[j as usize];
            if other.priority != policy.priority {
                break;
            }
            if let Some((kj, aj)) = engine.cluster_first_match(j, direction, flow)
                && aj != action
            {
                let r = &other.rules(direction)[kj];
                step.undefined_order_with
                    .push(other.reference.with_rule(kj, r.name.as_deref()));
            }
        }
        step
    }

    fn near_misses(
        &self,
        engine: &PolicyEngine,
        direction: Direction,
        flow: &Flow<'_>,
    ) -> Vec<String> {
        // Every rule up to and including the one that decided: the rules
        // that could have let the flow through and why they did not.
        let mut lines = Vec::new();
        for i in self.in_tier(engine, direction, flow) {
            let policy = &engine.cluster.policies[i as usize];
            for (k, rule) in policy.rules(direction).iter().enumerate() {
                let matched = engine.cluster_rule_matches(rule, direction, flow);
                if matched && rule.action == Action::Deny {
                    lines.push(format!(
                        "{} {direction} {} ({}) matches and denies",
                        policy.describe(),
                        policy
                            .reference
                            .with_rule(k, rule.name.as_deref())
                            .rule
                            .unwrap_or_default(),
                        rule.action.word(policy.reference.kind)
                    ));
                    return lines;
                }
                if !matched && rule.action != Action::Deny {
                    lines.push(rule_miss(engine, policy, k, rule, direction, flow));
                }
            }
        }
        lines
    }

    fn is_empty(&self, engine: &PolicyEngine) -> bool {
        !engine
            .cluster
            .policies
            .iter()
            .any(|p| p.reference.tier == self.tier)
    }
}

fn role(direction: Direction) -> &'static str {
    match direction {
        Direction::Ingress => "source",
        Direction::Egress => "destination",
    }
}

fn write_labels(out: &mut String, labels: &Labels) {
    out.push_str(&crate::policy::selector::render_labels(labels));
}

fn selector_miss(out: &mut String, what: &str, sel: &CompiledSelector, labels: &Labels) {
    let _ = write!(out, "{what} {sel} does not match ");
    write_labels(out, labels);
    out.push_str(" (");
    sel.write_mismatches(labels, out);
    out.push(')');
}

/// `ClusterNetworkPolicy allow-web (Admin, priority 10) ingress rule 1 "web" (Accept): ...`
pub(crate) fn rule_miss(
    engine: &PolicyEngine,
    policy: &ClusterPolicy,
    k: usize,
    rule: &ClusterRule,
    direction: Direction,
    flow: &Flow<'_>,
) -> String {
    let mut out = String::with_capacity(256);
    let r = policy.reference.with_rule(k, rule.name.as_deref());
    let _ = write!(
        out,
        "{} {direction} {} ({}): ",
        policy.describe(),
        r.rule.unwrap_or_default(),
        rule.action.word(policy.reference.kind)
    );
    let other = flow.other(direction);
    let who = role(direction);
    if let Some(peer) = rule
        .peers
        .iter()
        .find(|p| engine.cluster_peer_matches(p, other, flow.family_hint))
    {
        let _ = write!(out, "peer {peer} matches the {who}");
    } else {
        for (i, peer) in rule.peers.iter().enumerate() {
            if i > 0 {
                out.push_str("; ");
            }
            peer_miss(&mut out, engine, peer, other, who, flow.family_hint);
        }
    }
    out.push_str("; ");
    if rule.ports.is_empty() {
        out.push_str("every port matches (no ports listed)");
    } else if let Some(p) = rule
        .ports
        .iter()
        .find(|p| PolicyEngine::cluster_port_matches(p, flow))
    {
        let _ = write!(out, "port {}/{} matches {p}", flow.port, flow.protocol);
    } else {
        let _ = write!(out, "port {}/{} not in [", flow.port, flow.protocol);
        for (i, p) in rule.ports.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            let _ = write!(out, "{p}");
            if let ClusterPort::Named(name) = p {
                match flow
                    .destination
                    .pod
                    .and_then(|(_, pod)| pod.named_port(name, flow.protocol))
                {
                    Some(n) => {
                        let _ = write!(out, " (= {n}/{} on the destination)", flow.protocol);
                    }
                    None => {
                        let _ = write!(
                            out,
                            " (the destination has no {} container port named {name})",
                            flow.protocol
                        );
                    }
                }
            }
        }
        out.push(']');
    }
    out
}

fn peer_miss(
    out: &mut String,
    engine: &PolicyEngine,
    peer: &ClusterPeer,
    end: &Resolved<'_>,
    who: &str,
    hint: Option<IpAddr>,
) {
    let address = end.address(hint);
    match peer {
        ClusterPeer::Namespaces(_) | ClusterPeer::Pods { .. } => {
            if end.pod.is_some_and(|(_, p)| p.host_network) {
                let _ = write!(
                    out,
                    "peer {peer} never selects host-network pods, and the {who} is one"
                );
                return;
            }
            let Some(ns) = selectable_pod(end) else {
                let ip = address.map(|ip| ip.to_string()).unwrap_or_default();
                let _ = write!(
                    out,
                    "peer {peer} selects pods, and the {who} {ip} is not a pod"
                );
                return;
            };
            match peer {
                ClusterPeer::Namespaces(sel) => selector_miss(
                    out,
                    &format!("namespaces selector (the {who} namespace {})", ns.name),
                    sel,
                    &ns.labels,
                ),
                ClusterPeer::Pods { namespaces, .. } if !namespaces.matches(&ns.labels) => {
                    selector_miss(
                        out,
                        &format!("pods namespaceSelector (the {who} namespace {})", ns.name),
                        namespaces,
                        &ns.labels,
                    )
                }
                ClusterPeer::Pods { pods, .. } => selector_miss(
                    out,
                    &format!("pods podSelector (the {who} labels)"),
                    pods,
                    &end.labels,
                ),
                _ => {}
            }
        }
        ClusterPeer::Networks(_) => match address {
            Some(ip) => {
                let _ = write!(out, "peer {peer} does not contain the {who} address {ip}");
            }
            None => {
                let _ = write!(out, "peer {peer} cannot match the {who}: it has no address");
            }
        },
        ClusterPeer::Nodes(sel) => match address {
            Some(ip) => {
                let nodes: Vec<&str> = engine
                    .cluster
                    .nodes_with(ip)
                    .map(|n| n.name.as_str())
                    .collect();
                if nodes.is_empty() {
                    let _ = write!(
                        out,
                        "peer {peer}: the {who} address {ip} is no Node's address in the manifests"
                    );
                } else {
                    let _ = write!(
                        out,
                        "peer {peer}: the {who} address {ip} belongs to node {}, whose labels do not match {sel}",
                        nodes.join(", ")
                    );
                }
            }
            None => {
                let _ = write!(out, "peer {peer} cannot match the {who}: it has no address");
            }
        },
        ClusterPeer::DomainNames(_) => {
            let _ = write!(
                out,
                "peer {peer} is not evaluated: netwatch judges addresses and does not see the names clients resolved (treated as matching nothing)"
            );
        }
    }
}
