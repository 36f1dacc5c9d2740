//! `netwatch lint` for the cluster tiers: the mistakes that only show once
//! the tiers are combined.
//!
//! - A Deny (Admin tier) that shadows what a NetworkPolicy allows: the
//!   namespace owner's policy looks right and does nothing.
//! - Two policies of one tier and one priority whose subjects overlap: the
//!   API leaves their order undefined.
//! - A Pass that changes nothing: no later rule of its tier would have
//!   matched what it passes.
//! - Subjects and peers that select nothing (namespaces, pods, nodes).
//! - domainNames peers, which netwatch cannot judge.
//!
//! Flows are probed between the manifests' pods (and pod templates) on the
//! ports the rules and the NetworkPolicies name.

use std::collections::BTreeSet;

use super::compile::{Action, ClusterPeer, ClusterPolicy, ClusterPort, SubjectMatcher};
use super::evaluate::subject_matches;
use crate::policy::api::netpol::NETWORK_POLICY_TIER;
use crate::policy::evaluate::PolicyEngine;
use crate::policy::lint::{Finding, LintCheck, Severity};
use crate::policy::model::{Direction, PortSpec, Protocol};
use crate::policy::tiers::PolicyTier;
use crate::policy::verdict::Decision;
use crate::record::Tier;

/// Every finding about the engine's cluster policies.
pub(crate) fn lint(engine: &PolicyEngine, findings: &mut Vec<Finding>) {
    if engine.cluster.policies.is_empty() {
        return;
    }
    let linter = ClusterLinter {
        engine,
        pods: engine.model.sorted_pods(),
        ports: probe_ports(engine),
    };
    for (i, policy) in engine.cluster.policies.iter().enumerate() {
        linter.selects_nothing(policy, findings);
        for direction in [Direction::Ingress, Direction::Egress] {
            for (k, _) in policy.rules(direction).iter().enumerate() {
                linter.shadows_network_policy(i, k, direction, findings);
                linter.pass_changes_nothing(i, k, direction, findings);
            }
        }
    }
    linter.equal_priorities(findings);
}

struct ClusterLinter<'a> {
    engine: &'a PolicyEngine,
    pods: Vec<u32>,
    ports: Vec<(Protocol, u16)>,
}

/// Ports worth probing: every number the NetworkPolicies and the cluster
/// rules name (first port of ranges), every container port; 80/TCP if none.
fn probe_ports(engine: &PolicyEngine) -> Vec<(Protocol, u16)> {
    let mut ports = BTreeSet::new();
    for p in &engine.policies {
        for rule in p.ingress.iter().chain(p.egress.iter()).flatten() {
            for m in &rule.ports {
                if let PortSpec::Range { start, .. } = m.port {
                    ports.insert((m.protocol, start));
                }
            }
        }
    }
    for p in &engine.cluster.policies {
        for rule in p.ingress.iter().chain(&p.egress) {
            for port in &rule.ports {
                if let ClusterPort::Range {
                    protocol, start, ..
                } = port
                {
                    ports.insert((*protocol, *start));
                }
            }
        }
    }
    for pod in &engine.model.pods {
        for c in &pod.ports {
            ports.insert((c.protocol, c.port));
        }
    }
    if ports.is_empty() {
        ports.insert((Protocol::Tcp, 80));
    }
    ports.into_iter().collect()
}

fn finding(
    policy: &ClusterPolicy,
    severity: Severity,
    check: LintCheck,
    message: String,
    fix: String,
) -> Finding {
    Finding {
        severity,
        check,
        policy: Some(policy.reference.clone()),
        message,
        fix,
    }
}

impl ClusterLinter<'_> {
    fn pod_name(&self, idx: u32) -> String {
        let p = &self.engine.model.pods[idx as usize];
        format!(
            "{}/{}",
            self.engine.model.namespaces[p.namespace as usize].name, p.name
        )
    }

    /// The pods `policy` applies to.
    fn subjects(&self, policy: &ClusterPolicy) -> Vec<u32> {
        self.pods
            .iter()
            .copied()
            .filter(|&i| {
                let pod = &self.engine.model.pods[i as usize];
                !pod.host_network
                    && subject_matches(
                        &policy.subject,
                        &self.engine.model.namespaces[pod.namespace as usize],
                        &pod.labels,
                    )
            })
            .collect()
    }

    /// (from, to) pod pairs a rule of `policy` in `direction` is about.
    fn flows(&self, policy: &ClusterPolicy, direction: Direction) -> Vec<(u32, u32)> {
        let subjects = self.subjects(policy);
        let mut out = Vec::new();
        for &s in &subjects {
            for &o in &self.pods {
                if s == o {
                    continue;
                }
                out.push(match direction {
                    Direction::Egress => (s, o),
                    Direction::Ingress => (o, s),
                });
            }
        }
        out
    }

    fn shadows_network_policy(
        &self,
        i: usize,
        k: usize,
        direction: Direction,
        findings: &mut Vec<Finding>,
    ) {
        let engine = self.engine;
        let policy = &engine.cluster.policies[i];
        let rule = &policy.rules(direction)[k];
        if rule.action != Action::Deny || policy.reference.tier != Tier::Admin {
            return;
        }
        for (from, to) in self.flows(policy, direction) {
            for &(protocol, port) in &self.ports {
                let source = engine.resolved_pod(from, &engine.model.pods[from as usize], None);
                let destination = engine.resolved_pod(to, &engine.model.pods[to as usize], None);
                let flow = engine.flow(source, destination, port, protocol);
                if NETWORK_POLICY_TIER.decide(engine, direction, &flow) != Decision::Allow {
                    continue;
                }
                let verdict = engine.direction_verdict(direction, &flow);
                let decided_here = verdict.denied_by.first().is_some_and(|r| {
                    r.policy() == policy.reference && r.rule.as_ref().is_some_and(|r| r.index == k)
                });
                if !decided_here {
                    continue;
                }
                let allowing: Vec<String> = NETWORK_POLICY_TIER
                    .judge(engine, direction, &flow)
                    .outcome
                    .policies()
                    .iter()
                    .map(ToString::to_string)
                    .collect();
                findings.push(finding(
                    policy,
                    Severity::Warning,
                    LintCheck::ClusterDenyShadowsNetworkPolicy,
                    format!(
                        "{direction} {} denies {} -> {} on {port}/{protocol}, which NetworkPolicy {} allows: the NetworkPolicy has no effect there",
                        policy.reference.with_rule(k, rule.name.as_deref()).rule.unwrap_or_default(),
                        self.pod_name(from),
                        self.pod_name(to),
                        allowing.join(", ")
                    ),
                    "if the traffic is meant to flow, add an Admin-tier Pass (or Accept) for it at a higher priority (`netwatch explain --suggest` writes one); otherwise delete the NetworkPolicy rule so the two agree".into(),
                ));
                return;
            }
        }
    }

    fn pass_changes_nothing(
        &self,
        i: usize,
        k: usize,
        direction: Direction,
        findings: &mut Vec<Finding>,
    ) {
        let engine = self.engine;
        let policy = &engine.cluster.policies[i];
        let rule = &policy.rules(direction)[k];
        if rule.action != Action::Pass {
            return;
        }
        let mut matched_any = false;
        for (from, to) in self.flows(policy, direction) {
            for &(protocol, port) in &self.ports {
                let source = engine.resolved_pod(from, &engine.model.pods[from as usize], None);
                let destination = engine.resolved_pod(to, &engine.model.pods[to as usize], None);
                let flow = engine.flow(source, destination, port, protocol);
                if !engine.cluster_rule_matches(rule, direction, &flow) {
                    continue;
                }
                matched_any = true;
                // Would a later rule of this tier have matched it?
                let later = engine
                    .cluster_selecting(flow.subject(direction), direction)
                    .iter()
                    .copied()
                    .filter(|&j| {
                        engine.cluster.policies[j as usize].reference.tier == policy.reference.tier
                    })
                    .any(|j| {
                        let other = &engine.cluster.policies[j as usize];
                        other.rules(direction).iter().enumerate().any(|(kj, r)| {
                            let after = (j as usize, kj) > (i, k);
                            after && engine.cluster_rule_matches(r, direction, &flow)
                        })
                    });
                if later {
                    return;
                }
            }
        }
        if !matched_any {
            return; // reported as selecting nothing, if it does
        }
        findings.push(finding(
            policy,
            Severity::Warning,
            LintCheck::PassChangesNothing,
            format!(
                "{direction} {} (Pass) changes nothing: no later rule of the {} tier matches the flows it passes",
                policy.reference.with_rule(k, rule.name.as_deref()).rule.unwrap_or_default(),
                policy.reference.tier
            ),
            "delete it, or move it above the rule it is meant to skip".into(),
        ));
    }

    fn equal_priorities(&self, findings: &mut Vec<Finding>) {
        let policies = &self.engine.cluster.policies;
        for (i, a) in policies.iter().enumerate() {
            for b in &policies[i + 1..] {
                if a.reference.tier != b.reference.tier || a.priority != b.priority {
                    continue;
                }
                if a.reference.kind == crate::record::PolicyKind::BaselineAdminNetworkPolicy
                    || b.reference.kind == crate::record::PolicyKind::BaselineAdminNetworkPolicy
                {
                    continue;
                }
                let both = [Direction::Ingress, Direction::Egress]
                    .into_iter()
                    .any(|d| !a.rules(d).is_empty() && !b.rules(d).is_empty());
                let subjects_a: BTreeSet<u32> = self.subjects(a).into_iter().collect();
                let shared: Vec<String> = self
                    .subjects(b)
                    .into_iter()
                    .filter(|p| subjects_a.contains(p))
                    .map(|p| self.pod_name(p))
                    .collect();
                if !both || shared.is_empty() {
                    continue;
                }
                findings.push(finding(
                    a,
                    Severity::Warning,
                    LintCheck::UndefinedPriorityOrder,
                    format!(
                        "{} and {} are both {} tier, priority {}, and both select {}: the API leaves their order undefined, so a CNI may apply either",
                        a.reference,
                        b.reference,
                        a.reference.tier,
                        a.priority,
                        shared.into_iter().take(3).collect::<Vec<_>>().join(", ")
                    ),
                    "give them different priorities (lower is evaluated first)".into(),
                ));
            }
        }
    }

    fn selects_nothing(&self, policy: &ClusterPolicy, findings: &mut Vec<Finding>) {
        let engine = self.engine;
        let namespaces_match = |sel: &crate::policy::CompiledSelector| {
            engine
                .model
                .namespaces
                .iter()
                .any(|n| sel.matches(&n.labels))
        };
        let subject_ns = match &policy.subject {
            SubjectMatcher::Namespaces(ns) => ns,
            SubjectMatcher::Pods { namespaces, .. } => namespaces,
        };
        if !namespaces_match(subject_ns) {
            findings.push(finding(
                policy,
                Severity::Warning,
                LintCheck::ClusterSelectorMatchesNothing,
                format!(
                    "subject {} matches no namespace: the policy applies to nothing{}",
                    policy.subject,
                    crate::policy::explain::namespace_hint(engine, subject_ns)
                ),
                "match the labels of the namespaces you mean (every namespace has kubernetes.io/metadata.name=<name>)".into(),
            ));
        } else if !self.pods.is_empty() && self.subjects(policy).is_empty() {
            findings.push(finding(
                policy,
                Severity::Warning,
                LintCheck::ClusterSelectorMatchesNothing,
                format!("subject {} selects no pod in the manifests", policy.subject),
                "match the labels of the pods you mean; host-network pods are never subjects"
                    .into(),
            ));
        }
        for direction in [Direction::Ingress, Direction::Egress] {
            for (k, rule) in policy.rules(direction).iter().enumerate() {
                let name = policy
                    .reference
                    .with_rule(k, rule.name.as_deref())
                    .rule
                    .unwrap_or_default();
                for peer in &rule.peers {
                    let problem = match peer {
                        ClusterPeer::Namespaces(sel) if !namespaces_match(sel) => {
                            Some(format!("peer {peer} matches no namespace"))
                        }
                        ClusterPeer::Pods { namespaces, .. } if !namespaces_match(namespaces) => {
                            Some(format!("peer {peer} matches no namespace"))
                        }
                        ClusterPeer::Pods { namespaces, pods } if !self.pods.is_empty() => {
                            let any = self.pods.iter().any(|&i| {
                                let pod = &engine.model.pods[i as usize];
                                !pod.host_network
                                    && namespaces.matches(
                                        &engine.model.namespaces[pod.namespace as usize].labels,
                                    )
                                    && pods.matches(&pod.labels)
                            });
                            (!any).then(|| format!("peer {peer} selects no pod in the manifests"))
                        }
                        ClusterPeer::Nodes(sel) if !engine.cluster.nodes.is_empty() => {
                            (!engine.cluster.nodes.iter().any(|n| sel.matches(&n.labels)))
                                .then(|| format!("peer {peer} selects no Node in the manifests"))
                        }
                        ClusterPeer::DomainNames(_) => {
                            findings.push(finding(
                                policy,
                                Severity::Warning,
                                LintCheck::DomainNamesNotEvaluated,
                                format!("{direction} {name}: peer {peer} cannot be judged by netwatch (it sees addresses, not the names clients resolved); explain treats it as matching nothing"),
                                "check these flows on the cluster; for a fixed set of addresses, networks peers can be judged".into(),
                            ));
                            None
                        }
                        _ => None,
                    };
                    if let Some(problem) = problem {
                        findings.push(finding(
                            policy,
                            Severity::Warning,
                            LintCheck::ClusterSelectorMatchesNothing,
                            format!("{direction} {name}: {problem}"),
                            "match the labels of the namespaces, pods or nodes you mean".into(),
                        ));
                    }
                }
            }
        }
    }
}
