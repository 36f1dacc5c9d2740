//! Lint of Calico policies, probing the snapshot's pods through Calico's
//! tiers: rules that never decide (shadowed), equal orders that leave the
//! order to names, selectors that pick nothing, a default deny that
//! forgets DNS, a Pass into tiers with no policy for the endpoint.
//!
//! Probes: every ordered pair of pods (the subject's direction), on the
//! ports the rules name plus 53, 80 and 443, TCP and UDP, and for rules of
//! protocol ICMP or ICMPv6 the types and codes they name (plus echo, and a
//! neighbouring type and code). A rule that matches no probe is not judged
//! (no false alarm from missing pods).

use std::collections::{BTreeMap, BTreeSet};

use super::engine::{CalicoEngine, policy_ref};
use super::evaluate::{
    CalicoEndpoint, CalicoFlow, CalicoKind, CalicoPolicies, CalicoPolicyRef,
    Direction as CalicoDirection,
};
use super::types::Action;
use crate::policy::evaluate::PolicyEngine;
use crate::policy::lint::{Finding, LintCheck, LintOptions, Severity};

/// Adds the Calico findings of an engine that judges by Calico's tiers.
pub(crate) fn lint(engine: &PolicyEngine, options: &LintOptions, findings: &mut Vec<Finding>) {
    let Some(calico) = engine.calico.as_deref() else {
        return;
    };
    let set = &calico.enforced;
    // Pods alike for Calico (namespace, labels, service account, ports)
    // are probed once.
    let mut seen = BTreeSet::new();
    let endpoints: Vec<CalicoEndpoint> = engine
        .model
        .pods
        .iter()
        .zip(&calico.endpoints)
        .filter(|(pod, _)| !pod.host_network)
        .filter(|(_, e)| {
            seen.insert((
                e.namespace.clone(),
                e.labels.clone(),
                e.service_account.clone(),
                e.named_ports.clone(),
                e.services.clone(),
            ))
        })
        .map(|(pod, e)| CalicoEndpoint {
            ip: pod.ips.first().copied(),
            ..e.clone()
        })
        .collect();
    selectors_matching_nothing(set, &endpoints, findings);
    equal_orders(set, &endpoints, findings);
    probes(engine, calico, set, &endpoints, options, findings);
}

fn is_calico(r: &CalicoPolicyRef) -> bool {
    r.kind.enforced() != CalicoKind::KubernetesNetworkPolicy
}

fn selectors_matching_nothing(
    set: &CalicoPolicies,
    endpoints: &[CalicoEndpoint],
    findings: &mut Vec<Finding>,
) {
    if endpoints.is_empty() {
        return;
    }
    for empty in set.selectors_matching_nothing(endpoints) {
        // NetworkPolicies have their own selector checks.
        if !is_calico(&empty.policy) {
            continue;
        }
        findings.push(Finding {
            severity: Severity::Warning,
            check: LintCheck::CalicoSelectorMatchesNothing,
            policy: Some(policy_ref(&empty.policy)),
            message: if empty.field.ends_with(".services") {
                format!(
                    "{} names Service {}, which no pod of the manifests backs",
                    empty.field, empty.selector
                )
            } else {
                format!(
                    "{} {:?} selects no pod of the manifests",
                    empty.field, empty.selector
                )
            },
            fix: "check the labels (Calico selectors: app == 'web', projectcalico.org/namespace == 'prod')".into(),
        });
    }
}

fn equal_orders(set: &CalicoPolicies, endpoints: &[CalicoEndpoint], findings: &mut Vec<Finding>) {
    for (index, (tier, _, _)) in set.tiers().into_iter().enumerate() {
        let mut by_order: BTreeMap<String, Vec<&CalicoPolicyRef>> = BTreeMap::new();
        for (r, order) in set.tier_policies(index) {
            let key = match order {
                Some(o) => format!("{o}"),
                None => "unset".into(),
            };
            by_order.entry(key).or_default().push(r);
        }
        for (order, refs) in by_order {
            for (i, a) in refs.iter().enumerate() {
                for b in &refs[i + 1..] {
                    // Only when both select a common pod: otherwise their order
                    // never matters.
                    let overlap = endpoints.iter().any(|e| {
                        [CalicoDirection::Ingress, CalicoDirection::Egress]
                            .into_iter()
                            .any(|d| {
                                let sel = set.selecting(index, e, d);
                                sel.contains(a) && sel.contains(b)
                            })
                    });
                    if !overlap || !(is_calico(a) || is_calico(b)) {
                        continue;
                    }
                    findings.push(Finding {
                        severity: Severity::Warning,
                        check: LintCheck::CalicoEqualOrder,
                        policy: Some(policy_ref(a)),
                        message: format!(
                            "{} and {} have the same order ({order}) in tier {tier} and select the same pods: which one goes first depends on their names",
                            policy_ref(a).policy_name(),
                            policy_ref(b).policy_name()
                        ),
                        fix: "give them different orders (a NetworkPolicy has order 1000)".into(),
                    });
                }
            }
        }
    }
}

/// One probe: protocol number, destination port, ICMP type and code,
/// source port (`None`: unknown).
type Probe = (u8, u16, Option<(u8, u8)>, Option<u16>);

fn probes(
    engine: &PolicyEngine,
    calico: &CalicoEngine,
    set: &CalicoPolicies,
    endpoints: &[CalicoEndpoint],
    options: &LintOptions,
    findings: &mut Vec<Finding>,
) {
    let mut ports = set.probe_ports();
    ports.extend([53, 80, 443]);
    // The ports pods serve their Services on (rules' `services`).
    ports.extend(
        endpoints
            .iter()
            .flat_map(|e| &e.services)
            .flat_map(|s| s.ports.iter().map(|&(_, port)| port)),
    );
    // (protocol, port, ICMP type and code): TCP and UDP on every port, and
    // the ICMP types and codes the rules name.
    // Source ports: unknown, and both ends of the rules' source port
    // ranges (else a rule after a source `notPorts` one would look
    // shadowed).
    let source_ports: Vec<Option<u16>> = std::iter::once(None)
        .chain(set.probe_source_ports().into_iter().map(Some))
        .collect();
    let probe_set: Vec<Probe> = ports
        .iter()
        .flat_map(|&port| {
            source_ports
                .iter()
                .flat_map(move |&sport| [(6u8, port, None, sport), (17, port, None, sport)])
        })
        .chain(
            set.probe_icmp()
                .into_iter()
                .map(|(protocol, t, c)| (protocol, 0, Some((t, c)), None)),
        )
        .collect();
    let tiers = set.tiers();
    // Per rule: matched some probe, decided some probe.
    let mut matched: BTreeSet<CalicoPolicyRef> = BTreeSet::new();
    let mut decided: BTreeSet<CalicoPolicyRef> = BTreeSet::new();
    let mut shadowed_by: BTreeMap<CalicoPolicyRef, CalicoPolicyRef> = BTreeMap::new();
    let mut pass_into_nothing: BTreeMap<CalicoPolicyRef, String> = BTreeMap::new();
    let cluster_tiers = !engine.cluster.policies.is_empty();
    for subject in endpoints {
        for peer in endpoints {
            if std::ptr::eq(subject, peer) {
                continue;
            }
            for direction in [CalicoDirection::Ingress, CalicoDirection::Egress] {
                for &(protocol, port, icmp, source_port) in &probe_set {
                    let (source, destination) = match direction {
                        CalicoDirection::Ingress => (peer, subject),
                        CalicoDirection::Egress => (subject, peer),
                    };
                    let flow = CalicoFlow {
                        source: source.clone(),
                        destination: destination.clone(),
                        protocol,
                        port,
                        icmp,
                        source_port,
                    };
                    for (index, _) in tiers.iter().enumerate() {
                        let rules = set.matching_rules(index, direction, &flow);
                        let Some((first, action)) = rules.iter().find(|(_, a)| *a != Action::Log)
                        else {
                            if set.selecting(index, subject, direction).is_empty() {
                                continue;
                            }
                            break; // end of tier
                        };
                        for (r, a) in &rules {
                            if *a == Action::Log {
                                continue;
                            }
                            matched.insert(r.clone());
                            if r != first {
                                shadowed_by
                                    .entry(r.clone())
                                    .or_insert_with(|| first.clone());
                            }
                        }
                        decided.insert(first.clone());
                        if *action != Action::Pass {
                            break;
                        }
                        let later = (index + 1..tiers.len())
                            .any(|j| !set.selecting(j, subject, direction).is_empty());
                        if !later && !cluster_tiers {
                            pass_into_nothing.entry(first.clone()).or_insert_with(|| {
                                format!(
                                    "{} -> {} {}",
                                    endpoint_name(source),
                                    endpoint_name(destination),
                                    probe_name(protocol, port, icmp)
                                )
                            });
                        }
                        // Pass: on to the next tier.
                    }
                }
            }
        }
    }
    for rule in matched.difference(&decided) {
        if !is_calico(rule) {
            continue;
        }
        let by = &shadowed_by[rule];
        findings.push(Finding {
            severity: Severity::Warning,
            check: LintCheck::CalicoShadowedRule,
            policy: Some(policy_ref(rule)),
            message: format!(
                "{} never decides: every flow it matches is decided first by {}",
                policy_ref(rule),
                policy_ref(by)
            ),
            fix: "give the policy a lower order than the one that shadows it, or narrow the earlier rule".into(),
        });
    }
    for (pass, example) in pass_into_nothing {
        findings.push(Finding {
            severity: Severity::Warning,
            check: LintCheck::CalicoPassIntoEmptyTier,
            policy: Some(policy_ref(&pass)),
            message: format!(
                "{} passes traffic to later tiers, but no later tier has a policy for the endpoint: the profile allows it (e.g. {example})",
                policy_ref(&pass)
            ),
            fix: "use Allow if that is meant, or add the policy the later tier is expected to have".into(),
        });
    }
    dns(engine, calico, options, findings);
}

/// `on 80/TCP`, `ICMP type 8 code 0`.
fn probe_name(protocol: u8, port: u16, icmp: Option<(u8, u8)>) -> String {
    match (protocol, icmp) {
        (1, Some((t, c))) => format!("ICMP type {t} code {c}"),
        (58, Some((t, c))) => format!("ICMPv6 type {t} code {c}"),
        (6, _) => format!("on {port}/TCP"),
        (17, _) => format!("on {port}/UDP"),
        (p, _) => format!("on {port}/protocol {p}"),
    }
}

fn endpoint_name(e: &CalicoEndpoint) -> String {
    match (&e.namespace, e.ip) {
        (Some(ns), Some(ip)) => format!("{ns}/{ip}"),
        (Some(ns), None) => ns.clone(),
        (None, Some(ip)) => ip.to_string(),
        (None, None) => "?".into(),
    }
}

/// A Calico deny (end-of-tier or Deny rule) on pods' egress to DNS.
fn dns(
    engine: &PolicyEngine,
    calico: &CalicoEngine,
    options: &LintOptions,
    findings: &mut Vec<Finding>,
) {
    use crate::policy::{Peer, PolicyVerdict, Protocol};
    let dns_peer = |engine: &PolicyEngine| -> Peer {
        engine
            .pods()
            .into_iter()
            .find(|(ns, name)| {
                *ns == options.dns_namespace
                    && engine.model.pod(ns, name).is_some_and(|(_, p)| {
                        options
                            .dns_labels
                            .iter()
                            .all(|(k, v)| p.labels.get(k) == Some(v))
                    })
            })
            .map(|(namespace, name)| Peer::Pod { namespace, name })
            .unwrap_or_else(|| Peer::Hypothetical {
                namespace: options.dns_namespace.clone(),
                labels: options.dns_labels.clone(),
            })
    };
    let to = dns_peer(engine);
    let mut by_policy: BTreeMap<crate::record::PolicyRef, Vec<String>> = BTreeMap::new();
    for (ns, name) in engine.pods() {
        if ns == options.dns_namespace {
            continue;
        }
        let from = Peer::Pod {
            namespace: ns.clone(),
            name: name.clone(),
        };
        let v = engine.evaluate(&from, &to, 53, Protocol::Udp);
        if v.egress.verdict != PolicyVerdict::Denied {
            continue;
        }
        let calico_deny = v
            .egress
            .denied_by
            .iter()
            .filter(|r| r.kind.is_calico())
            .cloned();
        for r in calico_deny {
            by_policy
                .entry(r.policy())
                .or_default()
                .push(format!("{ns}/{name}"));
        }
    }
    let _ = calico;
    for (policy, pods) in by_policy {
        findings.push(Finding {
            severity: Severity::Error,
            check: LintCheck::CalicoDnsEgress,
            policy: Some(policy.clone()),
            message: format!(
                "{policy} denies DNS (53/UDP to {} {}) for {}",
                options.dns_namespace,
                options
                    .dns_labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(","),
                pods.join(", ")
            ),
            fix: "allow egress to k8s-app == 'kube-dns' on 53 UDP and TCP before the deny (Calico's documented pattern: a DNS allow in the same tier)".into(),
        });
    }
}
