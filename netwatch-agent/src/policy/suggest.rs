//! The smallest NetworkPolicy that allows one denied flow and nothing else.
//!
//! For each denying direction: one policy in the isolated pod's namespace,
//! selecting that pod by its workload's stable labels, with one rule for the
//! other end (namespace by `kubernetes.io/metadata.name` plus pod labels, or
//! an ipBlock of the single address) and one port. Selectors are narrowed
//! until they pick only the pod's own workload, and the subject selector
//! only pods that are already isolated, so the policy isolates nothing new.
//! The result is checked by judging the flow again with it applied.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::evaluate::{EndpointKind, Peer, PolicyEngine, Resolved, Verdict};
use super::model::{Direction, NAMESPACE_NAME_LABEL, Protocol};
use super::selector::Labels;
use super::{EngineOptions, PolicyError};
use crate::cluster::ClusterSnapshot;

/// Labels that differ between pods of one workload or between rollouts;
/// a selector on them would break on the next rollout.
const UNSTABLE_LABELS: [&str; 9] = [
    "pod-template-hash",
    "controller-revision-hash",
    "pod-template-generation",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "controller-uid",
    "batch.kubernetes.io/controller-uid",
    "batch.kubernetes.io/job-completion-index",
    "job-name",
];

/// Policies that allow one flow, with notes for the reader.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Suggestion {
    /// Zero (the flow is already allowed), one or two policies.
    pub policies: Vec<NetworkPolicy>,
    /// What each policy does, and any compromise a reader must know about.
    pub notes: Vec<String>,
}

impl Suggestion {
    /// The policies as YAML documents for `kubectl apply -f -`, notes as
    /// comments.
    pub fn to_yaml(&self) -> String {
        render_suggestion(self)
    }
}

/// Renders a [`Suggestion`] as multi-document YAML with its notes as comments.
pub fn render_suggestion(suggestion: &Suggestion) -> String {
    let mut out = String::new();
    for note in &suggestion.notes {
        for line in note.lines() {
            out.push_str("# ");
            out.push_str(line);
            out.push('\n');
        }
    }
    for (i, policy) in suggestion.policies.iter().enumerate() {
        if i > 0 || !out.is_empty() {
            out.push_str("---\n");
        }
        // Serializing a typed object cannot fail; an empty document would
        // be visible if it ever did.
        out.push_str(&serde_yaml::to_string(policy).unwrap_or_default());
    }
    out
}

/// Suggests the least-privilege NetworkPolicies that turn `from` -> `to` on
/// `port`/`protocol` to ALLOWED without changing the verdict of any other
/// pair of workloads. Returns no policy when the flow is already allowed.
pub fn suggest(
    engine: &PolicyEngine,
    snapshot: &ClusterSnapshot,
    from: &Peer,
    to: &Peer,
    port: u16,
    protocol: Protocol,
) -> Result<Suggestion, PolicyError> {
    let verdict = engine.try_evaluate(from, to, port, protocol)?;
    let mut suggestion = Suggestion::default();
    if verdict.verdict == Verdict::Allowed {
        return Ok(suggestion);
    }
    let source = engine.resolve(from)?;
    let destination = engine.resolve(to)?;
    let workloads = Workloads::new(snapshot);
    for direction in [Direction::Egress, Direction::Ingress] {
        let denied = match direction {
            Direction::Egress => verdict.egress.verdict == Verdict::Denied,
            Direction::Ingress => verdict.ingress.verdict == Verdict::Denied,
        };
        if !denied {
            continue;
        }
        let (subject, other) = match direction {
            Direction::Egress => (&source, &destination),
            Direction::Ingress => (&destination, &source),
        };
        let policy = policy_for(
            engine,
            &workloads,
            direction,
            subject,
            other,
            port,
            protocol,
            &mut suggestion.notes,
        )?;
        suggestion.policies.push(policy);
    }

    // Prove it: the flow must now be allowed.
    let mut applied = snapshot.clone();
    applied
        .network_policies
        .extend(suggestion.policies.iter().cloned());
    let check = PolicyEngine::new(&applied, EngineOptions { ..engine.options() })?;
    let after = check.try_evaluate(from, to, port, protocol)?;
    if after.verdict != Verdict::Allowed {
        return Err(PolicyError::Suggest(format!(
            "the suggested policies would not allow the flow ({}); this is a bug in netwatch, please report it with the manifests",
            after.sentence()
        )));
    }
    Ok(suggestion)
}

#[allow(clippy::too_many_arguments)]
fn policy_for(
    engine: &PolicyEngine,
    workloads: &Workloads<'_>,
    direction: Direction,
    subject: &Resolved<'_>,
    other: &Resolved<'_>,
    port: u16,
    protocol: Protocol,
    notes: &mut Vec<String>,
) -> Result<NetworkPolicy, PolicyError> {
    let Some(namespace) = subject.namespace.as_ref().map(|n| n.name.clone()) else {
        return Err(PolicyError::Suggest(
            "an address outside the pod network has no policies to change".into(),
        ));
    };
    let subject_name = display(subject);
    // The subject selector may only pick pods that are already isolated in
    // this direction (or it would isolate them) and that belong to the
    // subject's workload (or it would open them too).
    let subject_selector = single_out(engine, workloads, subject, |candidate| {
        !engine.isolating(candidate, direction).is_empty()
            && workloads.same_workload(subject, candidate)
    });
    let peer = match other.kind {
        EndpointKind::External => {
            let ip = other
                .given_ip
                .ok_or_else(|| PolicyError::Suggest("the other end has no address".into()))?;
            let prefix = if ip.is_ipv4() { 32 } else { 128 };
            NetworkPolicyPeer {
                ip_block: Some(IPBlock {
                    cidr: format!("{ip}/{prefix}"),
                    except: None,
                }),
                ..Default::default()
            }
        }
        _ => {
            let peer_selector = single_out(engine, workloads, other, |candidate| {
                workloads.same_workload(other, candidate)
            });
            if !peer_selector.leftovers.is_empty() {
                notes.push(format!(
                    "WARNING: no labels tell {} apart from {}; this policy allows them too. Give the workload a distinct label and run again.",
                    display(other),
                    peer_selector.leftovers.join(", ")
                ));
            }
            let ns = other
                .namespace
                .as_ref()
                .map(|n| n.name.clone())
                .unwrap_or_default();
            NetworkPolicyPeer {
                namespace_selector: Some(LabelSelector {
                    match_labels: Some(BTreeMap::from([(NAMESPACE_NAME_LABEL.to_string(), ns)])),
                    match_expressions: None,
                }),
                pod_selector: Some(peer_selector.selector),
                ip_block: None,
            }
        }
    };
    if !subject_selector.leftovers.is_empty() {
        notes.push(format!(
            "WARNING: no labels tell {subject_name} apart from {}; this policy selects them too. Give the workload a distinct label and run again.",
            subject_selector.leftovers.join(", ")
        ));
    }
    // DNS is UDP and TCP on 53 (TCP for large answers and zone transfers):
    // a fix that allows one leaves the other failing, which lint reports.
    let dns = port == 53 && matches!(protocol, Protocol::Udp | Protocol::Tcp);
    let protocols: &[Protocol] = if dns {
        &[Protocol::Udp, Protocol::Tcp]
    } else {
        std::slice::from_ref(&protocol)
    };
    let ports = Some(
        protocols
            .iter()
            .map(|p| NetworkPolicyPort {
                protocol: Some(p.as_str().to_string()),
                port: Some(IntOrString::Int(i32::from(port))),
                end_port: None,
            })
            .collect(),
    );
    let protocol = if dns { "UDP+TCP" } else { protocol.as_str() };
    let other_name = display(other);
    let (name, spec) = match direction {
        Direction::Ingress => (
            format!(
                "allow-{}-to-{}-{port}-{}-ingress",
                short_name(workloads, other),
                short_name(workloads, subject),
                protocol.replace('+', "-")
            ),
            NetworkPolicySpec {
                pod_selector: Some(subject_selector.selector),
                policy_types: Some(vec!["Ingress".into()]),
                ingress: Some(vec![NetworkPolicyIngressRule {
                    from: Some(vec![peer]),
                    ports,
                }]),
                egress: None,
            },
        ),
        Direction::Egress => (
            format!(
                "allow-{}-to-{}-{port}-{}-egress",
                short_name(workloads, subject),
                short_name(workloads, other),
                protocol.replace('+', "-")
            ),
            NetworkPolicySpec {
                pod_selector: Some(subject_selector.selector),
                policy_types: Some(vec!["Egress".into()]),
                egress: Some(vec![NetworkPolicyEgressRule {
                    to: Some(vec![peer]),
                    ports,
                }]),
                ingress: None,
            },
        ),
    };
    let name = dns_label(&name);
    notes.push(match direction {
        Direction::Ingress => format!(
            "{namespace}/{name}: lets {subject_name} accept {other_name} on {port}/{protocol} (ingress); other workloads and ports keep their verdicts"
        ),
        Direction::Egress => format!(
            "{namespace}/{name}: lets {subject_name} send to {other_name} on {port}/{protocol} (egress); other workloads and ports keep their verdicts"
        ),
    });
    Ok(NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace),
            ..Default::default()
        },
        spec: Some(spec),
    })
}

/// A selector and the pods it picks that it should not have.
struct SingledOut {
    selector: LabelSelector,
    leftovers: Vec<String>,
}

/// The most stable selector that picks `target` (and its workload) and no
/// pod `acceptable` refuses, among: the workload's own selector, the pod's
/// stable labels, all its labels, all its labels plus `DoesNotExist` for the
/// keys that only other pods have.
fn single_out(
    engine: &PolicyEngine,
    workloads: &Workloads<'_>,
    target: &Resolved<'_>,
    acceptable: impl Fn(&Resolved<'_>) -> bool,
) -> SingledOut {
    let labels: &Labels = &target.labels;
    let namespace = target
        .namespace
        .as_ref()
        .map(|n| n.name.as_str())
        .unwrap_or_default();
    let in_namespace: Vec<Resolved<'_>> = engine
        .model
        .pod_index
        .get(namespace)
        .into_iter()
        .flat_map(|m| m.values())
        .filter(|&&i| Some(i) != target.pod.map(|(t, _)| t))
        .map(|&i| engine.resolved_pod(i, &engine.model.pods[i as usize], None))
        .collect();
    let refused = |sel: &Labels, absent: &BTreeSet<String>| -> Vec<&Resolved<'_>> {
        in_namespace
            .iter()
            .filter(|p| {
                sel.iter().all(|(k, v)| p.labels.get(k) == Some(v))
                    && absent.iter().all(|k| !p.labels.contains_key(k))
            })
            .filter(|p| !acceptable(p))
            .collect()
    };
    let stable: Labels = labels
        .iter()
        .filter(|(k, _)| !UNSTABLE_LABELS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut candidates: Vec<Labels> = Vec::new();
    if let Some(workload_labels) = workloads.selector_of(target) {
        candidates.push(workload_labels);
    }
    candidates.push(stable);
    candidates.push(labels.clone());
    let none = BTreeSet::new();
    for candidate in &candidates {
        if refused(candidate, &none).is_empty() {
            return SingledOut {
                selector: match_labels(candidate, &none),
                leftovers: Vec::new(),
            };
        }
    }
    let absent: BTreeSet<String> = refused(labels, &none)
        .iter()
        .flat_map(|p| p.labels.keys())
        .filter(|k| !labels.contains_key(*k))
        .cloned()
        .collect();
    let leftovers = refused(labels, &absent)
        .iter()
        .map(|p| display(p))
        .collect();
    SingledOut {
        selector: match_labels(labels, &absent),
        leftovers,
    }
}

fn match_labels(labels: &Labels, absent: &BTreeSet<String>) -> LabelSelector {
    LabelSelector {
        match_labels: (!labels.is_empty()).then(|| labels.clone()),
        match_expressions: (!absent.is_empty()).then(|| {
            absent
                .iter()
                .map(|k| LabelSelectorRequirement {
                    key: k.clone(),
                    operator: "DoesNotExist".into(),
                    values: None,
                })
                .collect()
        }),
    }
}

fn display(end: &Resolved<'_>) -> String {
    match (end.kind, &end.namespace, &end.name) {
        (EndpointKind::External, _, _) => end.given_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        (_, Some(ns), Some(name)) => format!("{}/{name}", ns.name),
        (_, Some(ns), None) => {
            let pairs: Vec<String> = end.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("{}:{{{}}}", ns.name, pairs.join(","))
        }
        _ => "?".into(),
    }
}

/// A name for a policy: the workload's name, else the pod's, else a label.
fn short_name(workloads: &Workloads<'_>, end: &Resolved<'_>) -> String {
    if end.kind == EndpointKind::External {
        return end
            .given_ip
            .map(|ip| ip.to_string().replace(['.', ':'], "-"))
            .unwrap_or_else(|| "external".into());
    }
    if let Some((_, name)) = workloads.owner_of(end) {
        return name.to_string();
    }
    if let Some(name) = &end.name {
        return name.to_string();
    }
    ["app.kubernetes.io/name", "app", "k8s-app", "name"]
        .iter()
        .find_map(|k| end.labels.get(*k).cloned())
        .unwrap_or_else(|| "pod".into())
}

/// Lower case, `[a-z0-9-]`, at most 63 characters: a valid object name.
fn dns_label(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        let c = c.to_ascii_lowercase();
        let c = if c.is_ascii_alphanumeric() { c } else { '-' };
        if !(c == '-' && (out.is_empty() || out.ends_with('-'))) {
            out.push(c);
        }
    }
    out.truncate(63);
    out.trim_end_matches('-').to_string()
}

/// Who owns a pod, from ownerReferences through the snapshot's workloads.
struct Workloads<'a> {
    snapshot: &'a ClusterSnapshot,
    pods: BTreeMap<(&'a str, &'a str), &'a Pod>,
}

impl<'a> Workloads<'a> {
    fn new(snapshot: &'a ClusterSnapshot) -> Self {
        let pods = snapshot
            .pods
            .iter()
            .filter_map(|p| {
                Some((
                    (
                        p.metadata.namespace.as_deref().unwrap_or("default"),
                        p.metadata.name.as_deref()?,
                    ),
                    p,
                ))
            })
            .collect();
        Self { snapshot, pods }
    }

    /// The top controller of a pod of the snapshot: (kind, name).
    fn owner_of(&self, end: &Resolved<'_>) -> Option<(&'a str, &'a str)> {
        let (_, pod) = end.pod?;
        let ns = end.namespace.as_ref()?.name.as_str();
        let object = self.pods.get(&(ns, pod.name.as_str()))?;
        let owner = object
            .metadata
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.controller == Some(true))?;
        if owner.kind == "ReplicaSet" {
            // Deployment -> ReplicaSet -> Pod: name the Deployment.
            let rs = self.snapshot.replica_sets.iter().find(|r| {
                r.metadata.name.as_deref() == Some(&owner.name)
                    && r.metadata.namespace.as_deref().unwrap_or("default") == ns
            });
            if let Some(dep) = rs.and_then(|r| {
                r.metadata
                    .owner_references
                    .iter()
                    .flatten()
                    .find(|o| o.controller == Some(true))
            }) && dep.kind == "Deployment"
            {
                return Some(("Deployment", dep.name.as_str()));
            }
        }
        Some((owner.kind.as_str(), owner.name.as_str()))
    }

    /// The owner's `spec.selector.matchLabels`, when the snapshot has the
    /// owner and its selector is plain labels the pod carries.
    fn selector_of(&self, end: &Resolved<'_>) -> Option<Labels> {
        let (kind, name) = self.owner_of(end)?;
        let ns = end.namespace.as_ref()?.name.as_str();
        let same = |meta: &ObjectMeta| {
            meta.name.as_deref() == Some(name)
                && meta.namespace.as_deref().unwrap_or("default") == ns
        };
        let s = self.snapshot;
        let selector = match kind {
            "Deployment" => s
                .deployments
                .iter()
                .find(|d| same(&d.metadata))
                .and_then(|d| d.spec.as_ref())
                .map(|sp| &sp.selector),
            "ReplicaSet" => s
                .replica_sets
                .iter()
                .find(|d| same(&d.metadata))
                .and_then(|d| d.spec.as_ref())
                .map(|sp| &sp.selector),
            "StatefulSet" => s
                .stateful_sets
                .iter()
                .find(|d| same(&d.metadata))
                .and_then(|d| d.spec.as_ref())
                .map(|sp| &sp.selector),
            "DaemonSet" => s
                .daemon_sets
                .iter()
                .find(|d| same(&d.metadata))
                .and_then(|d| d.spec.as_ref())
                .map(|sp| &sp.selector),
            _ => None,
        }?;
        let labels = selector.match_labels.clone().filter(|l| !l.is_empty())?;
        let usable = selector
            .match_expressions
            .as_ref()
            .is_none_or(Vec::is_empty)
            && labels.iter().all(|(k, v)| {
                end.labels.get(k) == Some(v) && !UNSTABLE_LABELS.contains(&k.as_str())
            });
        usable.then_some(labels)
    }

    /// Whether `candidate` belongs to the same workload as `target`: the
    /// same pod, the same controller, or (without controllers) the same
    /// stable labels.
    fn same_workload(&self, target: &Resolved<'_>, candidate: &Resolved<'_>) -> bool {
        if let (Some((a, _)), Some((b, _))) = (target.pod, candidate.pod)
            && a == b
        {
            return true;
        }
        match (self.owner_of(target), self.owner_of(candidate)) {
            (Some(a), Some(b)) => a == b,
            (None, None) => {
                let stable = |l: &Labels| -> Labels {
                    l.iter()
                        .filter(|(k, _)| !UNSTABLE_LABELS.contains(&k.as_str()))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect()
                };
                stable(&target.labels) == stable(&candidate.labels)
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_names_are_valid_object_names() {
        assert_eq!(
            dns_label("Web_API-ingress-from-10.0.0.1-80-TCP"),
            "web-api-ingress-from-10-0-0-1-80-tcp"
        );
        assert_eq!(dns_label(&"a".repeat(80)).len(), 63);
        assert_eq!(dns_label("--x--y--"), "x-y");
    }
}
