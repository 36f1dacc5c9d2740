//! The NetworkPolicy mistakes behind real outages, found before they ship
//! (the cluster tiers' own checks are in [`super::api::cluster`]'s lint).
//!
//! Pods come from the manifests' Pods and, for workloads without Pods in the
//! manifests, from their pod templates (Deployment, StatefulSet, DaemonSet,
//! ReplicaSet, Job, CronJob): that is how most repositories hold them.
//! Checks that need pods only look at namespaces that have some, so partial
//! manifests do not produce false alarms.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;

use super::EngineOptions;
use super::evaluate::{Peer, PolicyEngine, Resolved};
use super::explain::namespace_hint;
use super::model::{
    CompiledPolicy, Direction, NAMESPACE_NAME_LABEL, NamespaceModel, NamespaceScope, PeerMatcher,
    PolicyRef, PolicyRule, PortSpec, Protocol, compile_policy,
};
use super::selector::{CompiledSelector, render_labels};
use crate::cluster::{ClusterSnapshot, PodRecord};

/// How bad a finding is. Both make `netwatch lint` exit 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Breaks traffic as written.
    Error,
    /// Probably not what was meant, or behaves differently between CNIs.
    Warning,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        })
    }
}

/// Which check found something (stable ids, for CI filters).
/// How lint and explain treat a namespace the manifests do not define.
pub const MISSING_NAMESPACE_RULE: &str = "a namespace with no Namespace object in the manifests is taken to exist with only its kubernetes.io/metadata.name label";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LintCheck {
    /// The API server would refuse the policy.
    InvalidPolicy,
    /// Pods isolated for egress cannot reach cluster DNS on 53/UDP and 53/TCP.
    DnsEgress,
    /// A namespaceSelector matches no namespace.
    NamespaceSelectorMatchesNothing,
    /// spec.podSelector selects no pod.
    PodSelectorMatchesNothing,
    /// A peer selector matches no pod.
    PeerSelectorMatchesNothing,
    /// A named port that no pod it could resolve on defines.
    NamedPortUndefined,
    /// Rules exist, but none can match: the policy only isolates.
    AllowsNothing,
    /// Rules in a direction policyTypes leaves out: they do nothing.
    RulesIgnoredByPolicyTypes,
    /// An ipBlock covers pod IPs, pod CIDRs or service IPs.
    IpBlockCoversCluster,
    /// An Admin-tier Deny denies traffic a NetworkPolicy allows.
    ClusterDenyShadowsNetworkPolicy,
    /// Two cluster policies of one tier and priority select the same pods.
    UndefinedPriorityOrder,
    /// A Pass rule no later rule of its tier would have matched.
    PassChangesNothing,
    /// A cluster policy's subject or peer selects nothing.
    ClusterSelectorMatchesNothing,
    /// A domainNames peer, which netwatch cannot judge.
    DomainNamesNotEvaluated,
    /// A Calico rule every flow of which an earlier rule decides.
    CalicoShadowedRule,
    /// Calico policies of one tier and order selecting the same pods.
    CalicoEqualOrder,
    /// A Calico policy or rule selector that picks no pod.
    CalicoSelectorMatchesNothing,
    /// A Calico policy denies pods' DNS.
    CalicoDnsEgress,
    /// A Pass into later tiers that have no policy for the endpoint.
    CalicoPassIntoEmptyTier,
}

impl fmt::Display for LintCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        f.write_str(&s)
    }
}

/// One mistake and how to fix it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    pub check: LintCheck,
    /// The policy at fault, when one is.
    pub policy: Option<PolicyRef>,
    pub message: String,
    pub fix: String,
}

/// Settings of [`lint_with`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LintOptions {
    /// As [`EngineOptions::ipblock_matches_pods`] (used by the DNS check).
    pub ipblock_matches_pods: bool,
    /// The DNS pods' namespace and labels, used when the manifests have no
    /// pod matching them. Default: `kube-system`, `k8s-app=kube-dns` (CoreDNS
    /// and kube-dns both carry it).
    pub dns_namespace: String,
    pub dns_labels: BTreeMap<String, String>,
}

impl Default for LintOptions {
    fn default() -> Self {
        Self {
            ipblock_matches_pods: true,
            dns_namespace: "kube-system".into(),
            dns_labels: BTreeMap::from([("k8s-app".to_string(), "kube-dns".to_string())]),
        }
    }
}

/// Lints with [`LintOptions::default`].
pub fn lint(snapshot: &ClusterSnapshot) -> Vec<Finding> {
    lint_with(snapshot, &LintOptions::default())
}

/// Every finding, sorted by policy, then check.
pub fn lint_with(snapshot: &ClusterSnapshot, options: &LintOptions) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut linted = snapshot.clone();
    linted.network_policies.clear();
    for policy in &snapshot.network_policies {
        match compile_policy(policy) {
            Ok(_) => linted.network_policies.push(policy.clone()),
            Err(problem) => findings.push(Finding {
                severity: Severity::Error,
                check: LintCheck::InvalidPolicy,
                policy: Some(PolicyRef::of(policy)),
                message: format!("field {}: {}", problem.field, problem.problem),
                fix: problem.fix,
            }),
        }
    }
    let templates = template_pods(&linted);
    linted.pods.extend(templates);
    let engine = match PolicyEngine::new(
        &linted,
        EngineOptions {
            ipblock_matches_pods: options.ipblock_matches_pods,
        },
    ) {
        Ok(engine) => engine,
        // Every policy left compiled on its own; nothing else can fail.
        Err(e) => {
            findings.push(Finding {
                severity: Severity::Error,
                check: LintCheck::InvalidPolicy,
                policy: None,
                message: e.to_string(),
                fix: "fix the policy named above".into(),
            });
            return findings;
        }
    };
    let lint = Linter {
        engine: &engine,
        snapshot,
    };
    lint.dns_egress(options, &mut findings);
    for policy in &engine.policies {
        lint.policy(policy, &mut findings);
    }
    super::api::cluster::lint(&engine, &mut findings);
    super::api::calico::lint::lint(&engine, options, &mut findings);
    findings.sort_by(|a, b| {
        a.policy
            .cmp(&b.policy)
            .then(a.check.cmp(&b.check))
            .then(a.message.cmp(&b.message))
    });
    findings.dedup();
    findings
}

/// Name suffix marking a pod that stands for a workload's pod template.
const TEMPLATE_MARK: &str = " (template)";

/// A Pod for each workload pod template no Pod of the manifests stands for.
fn template_pods(snapshot: &ClusterSnapshot) -> Vec<PodRecord> {
    use k8s_openapi::api::core::v1::PodTemplateSpec;
    let mut out = Vec::new();
    let owned_by_deployment: BTreeSet<(String, String)> = snapshot
        .replica_sets
        .iter()
        .filter(|rs| {
            rs.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.kind == "Deployment")
        })
        .filter_map(|rs| {
            Some((
                rs.metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into()),
                rs.metadata.name.clone()?,
            ))
        })
        .collect();
    let mut add = |kind: &str, meta: &ObjectMeta, template: Option<&PodTemplateSpec>| {
        let (Some(name), Some(template)) = (&meta.name, template) else {
            return;
        };
        let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
        let labels = template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        // A Pod of the manifests with these labels already stands for it.
        let covered = snapshot.pods.iter().any(|p| {
            p.namespace() == namespace
                && !labels.is_empty()
                && labels.iter().all(|(k, v)| p.labels().get(k) == Some(v))
        });
        if covered
            || (kind == "ReplicaSet"
                && owned_by_deployment.contains(&(namespace.clone(), name.clone())))
        {
            return;
        }
        out.push(
            Pod {
                metadata: ObjectMeta {
                    name: Some(format!(
                        "{}/{name}{TEMPLATE_MARK}",
                        kind.to_ascii_lowercase()
                    )),
                    namespace: Some(namespace),
                    labels: Some(labels),
                    ..Default::default()
                },
                spec: template.spec.clone().or_else(|| Some(PodSpec::default())),
                status: None,
            }
            .into(),
        );
    };
    for d in &snapshot.deployments {
        add(
            "Deployment",
            &d.metadata,
            d.spec.as_ref().map(|s| &s.template),
        );
    }
    for d in &snapshot.stateful_sets {
        add(
            "StatefulSet",
            &d.metadata,
            d.spec.as_ref().map(|s| &s.template),
        );
    }
    for d in &snapshot.daemon_sets {
        add(
            "DaemonSet",
            &d.metadata,
            d.spec.as_ref().map(|s| &s.template),
        );
    }
    for d in &snapshot.replica_sets {
        add(
            "ReplicaSet",
            &d.metadata,
            d.spec.as_ref().and_then(|s| s.template.as_ref()),
        );
    }
    for d in &snapshot.jobs {
        add("Job", &d.metadata, d.spec.as_ref().map(|s| &s.template));
    }
    for d in &snapshot.cron_jobs {
        add(
            "CronJob",
            &d.metadata,
            d.spec
                .as_ref()
                .and_then(|s| s.job_template.spec.as_ref())
                .map(|s| &s.template),
        );
    }
    out
}

struct Linter<'a> {
    engine: &'a PolicyEngine,
    snapshot: &'a ClusterSnapshot,
}

/// `x/web` for a pod, `x/deployment/web (template)` for a template.
fn pod_label(engine: &PolicyEngine, idx: u32) -> String {
    let p = &engine.model.pods[idx as usize];
    format!(
        "{}/{}",
        engine.model.namespaces[p.namespace as usize].name, p.name
    )
}

fn names(list: &[String], max: usize) -> String {
    if list.len() <= max {
        list.join(", ")
    } else {
        format!("{} and {} more", list[..max].join(", "), list.len() - max)
    }
}

impl Linter<'_> {
    /// Pods (and templates) of `namespace`, by index.
    fn pods_in(&self, namespace: &str) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .engine
            .model
            .pod_index
            .get(namespace)
            .map(|m| m.values().copied().collect())
            .unwrap_or_default();
        ids.sort_unstable();
        ids
    }

    fn resolved(&self, idx: u32) -> Resolved<'_> {
        self.engine
            .resolved_pod(idx, &self.engine.model.pods[idx as usize], None)
    }

    fn dns_egress(&self, options: &LintOptions, findings: &mut Vec<Finding>) {
        let engine = self.engine;
        let dns_selector = CompiledSelector::from_labels(&options.dns_labels);
        let dns_pods: Vec<u32> = self
            .pods_in(&options.dns_namespace)
            .into_iter()
            .filter(|&i| dns_selector.matches(&engine.model.pods[i as usize].labels))
            .collect();
        let hypothetical = Peer::Hypothetical {
            namespace: options.dns_namespace.clone(),
            labels: options.dns_labels.clone(),
        };
        // Pods grouped by the set of policies that isolate them for egress.
        let mut groups: BTreeMap<Vec<u32>, Vec<(u32, Vec<Protocol>)>> = BTreeMap::new();
        for idx in engine.model.sorted_pods() {
            let pod = &engine.model.pods[idx as usize];
            let isolating = engine.identities[pod.identity as usize].egress.clone();
            if isolating.is_empty() {
                continue;
            }
            let mut missing = Vec::new();
            for protocol in [Protocol::Udp, Protocol::Tcp] {
                let reaches = |dst: Resolved<'_>| {
                    let flow = engine.flow(self.resolved(idx), dst, 53, protocol);
                    isolating
                        .iter()
                        .any(|&p| engine.policy_allows(p, Direction::Egress, &flow))
                };
                let ok = if dns_pods.is_empty() {
                    engine.resolve(&hypothetical).map(reaches).unwrap_or(false)
                } else {
                    dns_pods.iter().any(|&d| reaches(self.resolved(d)))
                };
                if !ok {
                    missing.push(protocol);
                }
            }
            if !missing.is_empty() {
                groups.entry(isolating).or_default().push((idx, missing));
            }
        }
        let dns_name = format!(
            "the DNS pods ({} {})",
            options.dns_namespace,
            options
                .dns_labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        for (policies, pods) in groups {
            let refs: Vec<String> = policies
                .iter()
                .map(|&p| engine.policies[p as usize].reference.to_string())
                .collect();
            let pod_names: Vec<String> = pods.iter().map(|(i, _)| pod_label(engine, *i)).collect();
            // UDP first: it is what DNS uses until an answer is too large.
            let missing: Vec<String> = [Protocol::Udp, Protocol::Tcp]
                .into_iter()
                .filter(|p| pods.iter().any(|(_, m)| m.contains(p)))
                .map(|p| format!("53/{p}"))
                .collect();
            let verb = if refs.len() == 1 {
                "isolates"
            } else {
                "isolate"
            };
            findings.push(Finding {
                severity: Severity::Error,
                check: LintCheck::DnsEgress,
                policy: Some(engine.policies[policies[0] as usize].reference.clone()),
                message: format!(
                    "{} {verb} {} for egress, and no rule allows them {} to {dns_name}: name lookups will fail{}",
                    refs.join(", "),
                    names(&pod_names, 5),
                    missing.join(" and "),
                    if missing.len() == 1 && missing[0] == "53/TCP" { " for large answers (DNS falls back to TCP)" } else { "" }
                ),
                fix: format!(
                    "add this egress rule to {}:\n  - to:\n    - namespaceSelector:\n        matchLabels: {{{NAMESPACE_NAME_LABEL}: {}}}\n      podSelector:\n        matchLabels: {}\n    ports:\n    - {{protocol: UDP, port: 53}}\n    - {{protocol: TCP, port: 53}}",
                    refs[0],
                    options.dns_namespace,
                    render_labels(&options.dns_labels),
                ),
            });
        }
    }

    fn policy(&self, policy: &CompiledPolicy, findings: &mut Vec<Finding>) {
        let engine = self.engine;
        let r = &policy.reference;
        let mut push = |severity, check, message: String, fix: String| {
            findings.push(Finding {
                severity,
                check,
                policy: Some(r.clone()),
                message,
                fix,
            });
        };
        for (direction, count) in [
            (Direction::Ingress, policy.ignored_ingress_rules),
            (Direction::Egress, policy.ignored_egress_rules),
        ] {
            if count > 0 {
                let listed = if direction == Direction::Ingress {
                    "Egress"
                } else {
                    "Ingress"
                };
                let cap = if direction == Direction::Ingress {
                    "Ingress"
                } else {
                    "Egress"
                };
                push(
                    Severity::Error,
                    LintCheck::RulesIgnoredByPolicyTypes,
                    format!(
                        "its {count} {direction} rule(s) do nothing: policyTypes lists only {listed}"
                    ),
                    format!("add {cap} to spec.policyTypes, or delete the {direction} rules"),
                );
            }
        }

        // spec.podSelector selects no pod.
        let own_pods = self.pods_in(r.namespace_or_empty());
        let selected: Vec<u32> = own_pods
            .iter()
            .copied()
            .filter(|&i| {
                policy
                    .pod_selector
                    .matches(&engine.model.pods[i as usize].labels)
            })
            .collect();
        if !own_pods.is_empty() && selected.is_empty() {
            push(
                Severity::Warning,
                LintCheck::PodSelectorMatchesNothing,
                format!(
                    "spec.podSelector {} selects no pod in {}: the policy has no effect",
                    policy.pod_selector,
                    r.namespace_or_empty()
                ),
                format!(
                    "match the labels of the pods you mean; pods in {} have {}",
                    r.namespace_or_empty(),
                    self.label_sets(&own_pods)
                ),
            );
        }

        let mut live_rules = 0usize;
        let mut total_rules = 0usize;
        for direction in [Direction::Ingress, Direction::Egress] {
            for (i, rule) in policy
                .rules(direction)
                .unwrap_or_default()
                .iter()
                .enumerate()
            {
                total_rules += 1;
                let where_ = format!("{direction} rule {}", i + 1);
                let (dead_peers, peer_findings) = self.rule_peers(policy, rule, &where_, direction);
                let (dead_ports, port_findings) =
                    self.rule_ports(rule, &where_, direction, &selected, policy);
                for (severity, check, message, fix) in
                    peer_findings.into_iter().chain(port_findings)
                {
                    push(severity, check, message, fix);
                }
                if !(dead_peers || dead_ports) {
                    live_rules += 1;
                }
            }
        }
        if total_rules > 0 && live_rules == 0 {
            push(
                Severity::Error,
                LintCheck::AllowsNothing,
                "none of its rules can match (see the other findings): it only isolates the pods it selects, which denies all their traffic in its directions".to_string(),
                "fix the selectors and ports of its rules; if a default deny is meant, write it without rules".to_string(),
            );
        }
    }

    /// Distinct label sets of some pods, for hints.
    fn label_sets(&self, pods: &[u32]) -> String {
        let sets: BTreeSet<String> = pods
            .iter()
            .map(|&i| render_labels(&self.engine.model.pods[i as usize].labels))
            .collect();
        let sets: Vec<String> = sets.into_iter().collect();
        names(&sets, 5)
    }

    /// Findings on a rule's peers; true when every peer provably matches nothing.
    #[allow(clippy::type_complexity)]
    fn rule_peers(
        &self,
        policy: &CompiledPolicy,
        rule: &PolicyRule,
        where_: &str,
        direction: Direction,
    ) -> (bool, Vec<(Severity, LintCheck, String, String)>) {
        let engine = self.engine;
        let mut out = Vec::new();
        let mut dead = 0;
        for (j, peer) in rule.peers.iter().enumerate() {
            let at = format!("{where_}, peer {}", j + 1);
            match peer {
                PeerMatcher::Pods {
                    namespaces, pods, ..
                } => {
                    let namespaces: Vec<String> = match namespaces {
                        NamespaceScope::PolicyNamespace => {
                            vec![policy.reference.namespace_or_empty().to_string()]
                        }
                        NamespaceScope::Selector(sel) => {
                            let mut matched: Vec<String> = engine
                                .model
                                .namespaces_matching(sel)
                                .into_iter()
                                .map(str::to_string)
                                .collect();
                            // The one rule for missing namespaces (explain
                            // applies it too): a namespace the manifests do
                            // not define exists with only its name label.
                            // So a selector that names it by that label
                            // matches it.
                            if matched.is_empty() {
                                let assumed: Vec<String> = sel
                                    .wanted_values()
                                    .filter(|(key, _)| *key == NAMESPACE_NAME_LABEL)
                                    .map(|(_, name)| name.to_string())
                                    .filter(|name| engine.model.namespace(name).is_none())
                                    .filter(|name| {
                                        sel.matches(&NamespaceModel::implicit(name).labels)
                                    })
                                    .collect();
                                for name in &assumed {
                                    out.push((
                                        Severity::Warning,
                                        LintCheck::NamespaceSelectorMatchesNothing,
                                        format!(
                                            "{at}: namespaceSelector {sel} names namespace {name}, which is not in the manifests: {}",
                                            MISSING_NAMESPACE_RULE
                                        ),
                                        format!("add the Namespace {name} to the manifests if it has other labels, or check the name"),
                                    ));
                                }
                                matched = assumed;
                            }
                            if matched.is_empty() {
                                let hint = namespace_hint(engine, sel);
                                let fix = if hint.is_empty() {
                                    "label the namespace you mean (kubectl label namespace NAME key=value), or fix the selector".to_string()
                                } else {
                                    format!(
                                        "select namespaces by name with `{NAMESPACE_NAME_LABEL}: NAME`, which the API server sets on every namespace{hint}"
                                    )
                                };
                                out.push((
                                    if hint.is_empty() {
                                        Severity::Warning
                                    } else {
                                        Severity::Error
                                    },
                                    LintCheck::NamespaceSelectorMatchesNothing,
                                    format!(
                                        "{at}: namespaceSelector {sel} matches no namespace{hint}"
                                    ),
                                    fix,
                                ));
                                dead += 1;
                                continue;
                            }
                            matched
                        }
                    };
                    let candidates: Vec<u32> =
                        namespaces.iter().flat_map(|ns| self.pods_in(ns)).collect();
                    if candidates.is_empty() {
                        continue; // No pods of these namespaces in the manifests: cannot tell.
                    }
                    if !candidates
                        .iter()
                        .any(|&i| pods.matches(&engine.model.pods[i as usize].labels))
                    {
                        out.push((
                            Severity::Warning,
                            LintCheck::PeerSelectorMatchesNothing,
                            format!(
                                "{at}: podSelector {pods} matches no pod in {}",
                                names(&namespaces, 5)
                            ),
                            format!(
                                "match the labels of the pods you mean; pods there have {}",
                                self.label_sets(&candidates)
                            ),
                        ));
                        dead += 1;
                    }
                }
                PeerMatcher::IpBlock(block) => {
                    if let Some(message) = self.block_covers_cluster(block) {
                        out.push((
                            Severity::Warning,
                            LintCheck::IpBlockCoversCluster,
                            format!("{at}: ipBlock {block} {message}"),
                            format!(
                                "select pods with podSelector/namespaceSelector instead, and keep the cluster's pod and service ranges out of the {} ipBlock with `except`",
                                direction
                            ),
                        ));
                    }
                }
            }
        }
        (!rule.peers.is_empty() && dead == rule.peers.len(), out)
    }

    /// Why an ipBlock covers cluster addresses, if it does.
    fn block_covers_cluster(&self, block: &super::model::IpBlockMatcher) -> Option<String> {
        let engine = self.engine;
        let mut pods: Vec<String> = Vec::new();
        for idx in engine.model.sorted_pods() {
            let p = &engine.model.pods[idx as usize];
            if p.host_network {
                continue;
            }
            if let Some(ip) = p.ips.iter().find(|ip| block.matches(**ip)) {
                pods.push(format!("{} {ip}", pod_label(engine, idx)));
            }
        }
        let mut cidrs: Vec<String> = Vec::new();
        for node in &self.snapshot.nodes {
            let spec = node.spec.as_ref();
            let listed = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
            let single = spec.and_then(|s| s.pod_cidr.clone());
            for text in listed.into_iter().chain(single).collect::<BTreeSet<_>>() {
                let Ok(net) = IpNet::from_str(&text) else {
                    continue;
                };
                let overlaps =
                    block.cidr.contains(&net.network()) || net.contains(&block.cidr.network());
                let excepted = block.except.iter().any(|e| e.contains(&net));
                if overlaps && !excepted {
                    cidrs.push(format!(
                        "{} {net}",
                        node.metadata.name.as_deref().unwrap_or("node")
                    ));
                }
            }
        }
        let mut services: Vec<String> = Vec::new();
        for svc in &self.snapshot.services {
            let spec = svc.spec.as_ref();
            let ips = spec
                .and_then(|s| s.cluster_ips.clone())
                .unwrap_or_default()
                .into_iter()
                .chain(spec.and_then(|s| s.cluster_ip.clone()));
            let mut seen = BTreeSet::new();
            for text in ips {
                let Ok(ip) = IpAddr::from_str(&text) else {
                    continue;
                };
                if seen.insert(ip) && block.matches(ip) {
                    services.push(format!(
                        "{}/{} {ip}",
                        svc.metadata.namespace.as_deref().unwrap_or("default"),
                        svc.metadata.name.as_deref().unwrap_or("?")
                    ));
                }
            }
        }
        if pods.is_empty() && cidrs.is_empty() && services.is_empty() {
            return None;
        }
        let mut parts = Vec::new();
        if !pods.is_empty() {
            parts.push(format!("pod IPs ({})", names(&pods, 3)));
        }
        if !cidrs.is_empty() {
            parts.push(format!("node pod CIDRs ({})", names(&cidrs, 3)));
        }
        if !services.is_empty() {
            parts.push(format!(
                "service IPs ({}; Services are translated to pod IPs before policies apply, so these never match)",
                names(&services, 3)
            ));
        }
        Some(format!(
            "covers {}: whether an ipBlock matches pod traffic differs between CNIs (Calico: yes, Cilium: no)",
            parts.join(", ")
        ))
    }

    /// Findings on a rule's named ports; true when every port is a named
    /// port that provably resolves nowhere.
    #[allow(clippy::type_complexity)]
    fn rule_ports(
        &self,
        rule: &PolicyRule,
        where_: &str,
        direction: Direction,
        selected: &[u32],
        policy: &CompiledPolicy,
    ) -> (bool, Vec<(Severity, LintCheck, String, String)>) {
        let engine = self.engine;
        let mut out = Vec::new();
        let mut dead = 0;
        // Where a named port resolves: the destination pods. For ingress the
        // policy's own pods; for egress the pods its peers pick.
        let destinations: Vec<u32> = match direction {
            Direction::Ingress => selected.to_vec(),
            Direction::Egress => {
                if rule.peers.is_empty() {
                    engine.model.sorted_pods()
                } else {
                    engine
                        .model
                        .sorted_pods()
                        .into_iter()
                        .filter(|&i| {
                            let end = self.resolved(i);
                            rule.peers.iter().any(|p| {
                                !matches!(p, PeerMatcher::IpBlock(_))
                                    && engine.peer_matches(
                                        policy.reference.namespace_or_empty(),
                                        p,
                                        &end,
                                        None,
                                    )
                            })
                        })
                        .collect()
                }
            }
        };
        let only_blocks = !rule.peers.is_empty()
            && rule
                .peers
                .iter()
                .all(|p| matches!(p, PeerMatcher::IpBlock(_)));
        for (k, port) in rule.ports.iter().enumerate() {
            let PortSpec::Named(name) = &port.port else {
                continue;
            };
            let at = format!("{where_}, port {}", k + 1);
            if direction == Direction::Egress && only_blocks {
                out.push((
                    Severity::Warning,
                    LintCheck::NamedPortUndefined,
                    format!("{at}: named port {port} on a rule whose peers are all ipBlocks: names resolve only on pods, so it matches no address outside the cluster"),
                    "use the port number".to_string(),
                ));
                dead += 1;
                continue;
            }
            if destinations.is_empty() {
                continue;
            }
            let defined = destinations.iter().any(|&i| {
                engine.model.pods[i as usize]
                    .named_port(name, port.protocol)
                    .is_some()
            });
            if !defined {
                let whose = if direction == Direction::Ingress {
                    "pod this policy selects"
                } else {
                    "destination pod"
                };
                out.push((
                    Severity::Warning,
                    LintCheck::NamedPortUndefined,
                    format!("{at}: named port {port}: no {whose} has a {} container port named {name}, so it matches nothing", port.protocol),
                    format!(
                        "use the port number, or name the container port `{name}` (protocol {}) in the pods' spec",
                        port.protocol
                    ),
                ));
                dead += 1;
            }
        }
        (!rule.ports.is_empty() && dead == rule.ports.len(), out)
    }
}
