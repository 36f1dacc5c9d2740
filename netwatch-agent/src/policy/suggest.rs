//! The smallest NetworkPolicy that allows one denied flow and nothing else.
//!
//! For each denying direction: one policy in the isolated pod's namespace,
//! selecting that pod by its workload's stable labels, with one rule for the
//! other end (namespace by `kubernetes.io/metadata.name` plus pod labels, or
//! an ipBlock of the single address) and one port. Selectors are narrowed
//! until they pick only the pod's own workload, and the subject selector
//! only pods that are already isolated, so the policy isolates nothing new.
//! The result is checked by judging the flow again with it applied.
//!
//! Where a cluster policy decides, the fix goes where it decides: an
//! Admin-tier Deny gets a policy of its own kind in the Admin tier at the
//! closest free priority above it (Pass when the NetworkPolicy and Baseline
//! tiers then allow the flow, else Accept); a Baseline-tier Deny gets a
//! NetworkPolicy, which comes first.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::api::calico::CalicoNetworkPolicy;
use super::api::cluster::types::{
    AnpPort, AnpPortNumber, CnpPort, CnpProtocol, CnpProtocolPorts, NamespacedPod,
    Peer as ClusterPeerSpec, PolicySpec, Rule, Subject, V1ALPHA1, V1ALPHA2,
};
use super::api::cluster::{AdminNetworkPolicy, ClusterNetworkPolicy};
use super::evaluate::{
    DirectionVerdict, EndpointKind, Peer, PolicyEngine, PolicyVerdict, Resolved,
};
use super::model::{Direction, NAMESPACE_NAME_LABEL, Protocol};
use super::selector::Labels;
use super::{EngineOptions, PolicyError};
use crate::cluster::{ClusterSnapshot, PodRecord};
use crate::record::{PolicyKind, Tier};

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
    /// When an Admin-tier Deny decides: a ClusterNetworkPolicy that takes
    /// the flow out of it at a higher priority (Pass when the NetworkPolicy
    /// and Baseline tiers then allow it, else Accept).
    pub cluster_network_policies: Vec<ClusterNetworkPolicy>,
    /// The same, when the deciding Deny is an AdminNetworkPolicy's.
    pub admin_network_policies: Vec<AdminNetworkPolicy>,
    /// When a Calico tier decides: a Calico NetworkPolicy in that tier,
    /// ordered before every policy of it that selects the pod, allowing
    /// this workload pair and port.
    pub calico_network_policies: Vec<CalicoNetworkPolicy>,
    /// What each policy does, and any compromise a reader must know about.
    pub notes: Vec<String>,
}

impl Suggestion {
    /// Whether there is nothing to apply (the flow is already allowed).
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
            && self.cluster_network_policies.is_empty()
            && self.admin_network_policies.is_empty()
            && self.calico_network_policies.is_empty()
    }

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
    // Serializing a typed object cannot fail; an empty document would be
    // visible if it ever did.
    let documents = suggestion
        .cluster_network_policies
        .iter()
        .map(|p| serde_yaml::to_string(p).unwrap_or_default())
        .chain(
            suggestion
                .admin_network_policies
                .iter()
                .map(|p| serde_yaml::to_string(p).unwrap_or_default()),
        )
        .chain(suggestion.calico_network_policies.iter().map(calico_yaml))
        .chain(
            suggestion
                .policies
                .iter()
                .map(|p| serde_yaml::to_string(p).unwrap_or_default()),
        );
    for (i, document) in documents.enumerate() {
        if i > 0 || !out.is_empty() {
            out.push_str("---\n");
        }
        out.push_str(&document);
    }
    out
}

/// A Calico policy as calicoctl prints it (no null fields).
fn calico_yaml(policy: &CalicoNetworkPolicy) -> String {
    fn strip(v: serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(map) => serde_json::Value::Object(
                map.into_iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| (k, strip(v)))
                    .collect(),
            ),
            serde_json::Value::Array(items) => {
                serde_json::Value::Array(items.into_iter().map(strip).collect())
            }
            other => other,
        }
    }
    serde_json::to_value(policy)
        .map(strip)
        .ok()
        .and_then(|v| serde_yaml::to_string(&v).ok())
        .unwrap_or_default()
}

/// What kind of policy `--suggest` proposes where a Calico tier decides.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SuggestKind {
    /// A projectcalico.org/v3 NetworkPolicy in the deciding tier.
    #[default]
    Calico,
    /// A networking.k8s.io/v1 NetworkPolicy (Calico's default tier, order
    /// 1000): only a fix when nothing earlier denies.
    #[value(name = "networkpolicy")]
    NetworkPolicy,
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
    suggest_kind(
        engine,
        snapshot,
        from,
        to,
        port,
        protocol,
        SuggestKind::Calico,
    )
}

/// [`suggest`], choosing what to propose where a Calico tier decides.
pub fn suggest_kind(
    engine: &PolicyEngine,
    snapshot: &ClusterSnapshot,
    from: &Peer,
    to: &Peer,
    port: u16,
    protocol: Protocol,
    kind: SuggestKind,
) -> Result<Suggestion, PolicyError> {
    let verdict = engine.try_evaluate(from, to, port, protocol)?;
    let mut suggestion = Suggestion::default();
    if verdict.verdict == PolicyVerdict::Allowed {
        return Ok(suggestion);
    }
    let source = engine.resolve(from)?;
    let destination = engine.resolve(to)?;
    let workloads = Workloads::new(snapshot);
    for direction in [Direction::Egress, Direction::Ingress] {
        let denied = match direction {
            Direction::Egress => verdict.egress.verdict == PolicyVerdict::Denied,
            Direction::Ingress => verdict.ingress.verdict == PolicyVerdict::Denied,
        };
        if !denied {
            continue;
        }
        let (subject, other) = match direction {
            Direction::Egress => (&source, &destination),
            Direction::Ingress => (&destination, &source),
        };
        let decided = match direction {
            Direction::Egress => &verdict.egress,
            Direction::Ingress => &verdict.ingress,
        };
        // Where the Deny happens is where the fix goes: a NetworkPolicy
        // cannot override the Admin tier; the Baseline tier yields to any
        // NetworkPolicy that selects the pod.
        let isolates_new = match decided.decided_in {
            Some(Tier::Calico(tier)) if kind == SuggestKind::Calico => {
                let policy = calico_policy_for(
                    engine,
                    direction,
                    subject,
                    other,
                    port,
                    protocol,
                    tier.as_str(),
                    &mut suggestion.notes,
                )?;
                suggestion.calico_network_policies.push(policy);
                continue;
            }
            Some(Tier::Admin) => {
                let ctx = Override {
                    engine,
                    snapshot,
                    workloads: &workloads,
                    from,
                    to,
                    port,
                    protocol,
                };
                ctx.admin_override(direction, decided, subject, other, &mut suggestion)?;
                continue;
            }
            Some(Tier::Baseline) => {
                suggestion.notes.push(format!(
                    "{} (Baseline tier) denies this {direction}; a NetworkPolicy selecting the pod decides before the Baseline tier",
                    decided
                        .denied_by
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
                engine.isolating(subject, direction).is_empty()
            }
            _ => false,
        };
        let policy = policy_for(
            engine,
            &workloads,
            direction,
            subject,
            other,
            port,
            protocol,
            isolates_new,
            &mut suggestion.notes,
        )?;
        suggestion.policies.push(policy);
    }

    // Prove it: the flow must now be allowed.
    let applied = with_suggestion(snapshot, &suggestion);
    let check = PolicyEngine::new(&applied, EngineOptions { ..engine.options() })?;
    let after = check.try_evaluate(from, to, port, protocol)?;
    if after.verdict != PolicyVerdict::Allowed && engine.calico_in_use() {
        return Err(PolicyError::Suggest(format!(
            "a NetworkPolicy (order 1000 of Calico's default tier) cannot allow this flow ({}); drop --suggest-kind networkpolicy for a Calico policy in the deciding tier",
            after.sentence()
        )));
    }
    if after.verdict != PolicyVerdict::Allowed {
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
    isolates_new: bool,
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
        (isolates_new || !engine.isolating(candidate, direction).is_empty())
            && workloads.same_workload(subject, candidate)
    });
    if isolates_new {
        notes.push(format!(
            "WARNING: {subject_name} is not isolated for {direction} yet: this NetworkPolicy isolates it, so its other {direction} traffic is then decided by NetworkPolicies (denied unless one allows it) instead of the Baseline tier"
        ));
    }
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

/// The snapshot with a suggestion applied.
fn with_suggestion(snapshot: &ClusterSnapshot, suggestion: &Suggestion) -> ClusterSnapshot {
    let mut applied = snapshot.clone();
    applied
        .network_policies
        .extend(suggestion.policies.iter().cloned());
    applied
        .cluster_network_policies
        .extend(suggestion.cluster_network_policies.iter().cloned());
    applied
        .admin_network_policies
        .extend(suggestion.admin_network_policies.iter().cloned());
    applied
        .calico
        .network_policies
        .extend(suggestion.calico_network_policies.iter().cloned());
    applied
}

/// A Calico selector for labels: `app == 'web' && tier == 'front'`.
fn calico_selector(labels: &Labels) -> String {
    let stable: Vec<String> = labels
        .iter()
        .filter(|(k, _)| !UNSTABLE_LABELS.contains(&k.as_str()))
        .map(|(k, v)| format!("{k} == '{v}'"))
        .collect();
    if stable.is_empty() {
        "all()".into()
    } else {
        stable.join(" && ")
    }
}

/// A Calico NetworkPolicy in `tier`, in the subject's namespace, ordered
/// before every policy of the tier that selects the subject, allowing
/// exactly the other end on this port.
#[allow(clippy::too_many_arguments)]
fn calico_policy_for(
    engine: &PolicyEngine,
    direction: Direction,
    subject: &Resolved<'_>,
    other: &Resolved<'_>,
    port: u16,
    protocol: Protocol,
    tier: &str,
    notes: &mut Vec<String>,
) -> Result<CalicoNetworkPolicy, PolicyError> {
    use super::api::calico::types::{
        EntityRule, PolicySpec as CalicoSpec, PolicyType, PortSpec, ProtocolSpec,
        Rule as CalicoRule,
    };
    let Some(namespace) = subject.namespace.as_ref().map(|n| n.name.clone()) else {
        return Err(PolicyError::Suggest(
            "an address outside the pod network has no policies to change".into(),
        ));
    };
    let min_order = engine.calico_min_order(tier, subject, direction);
    let order = match min_order {
        Some(o) if o >= 1.0 => o - 1.0,
        Some(o) => o / 2.0,
        None => 100.0,
    };
    let peer = match (other.kind, &other.namespace) {
        (EndpointKind::External, _) | (_, None) => EntityRule {
            nets: other.given_ip.map(|ip| {
                vec![match ip {
                    std::net::IpAddr::V4(_) => format!("{ip}/32"),
                    std::net::IpAddr::V6(_) => format!("{ip}/128"),
                }]
            }),
            ..EntityRule::default()
        },
        (_, Some(ns)) => EntityRule {
            selector: Some(calico_selector(&other.labels)),
            namespace_selector: Some(format!("projectcalico.org/name == '{}'", ns.name)),
            ..EntityRule::default()
        },
    };
    let ports = Some(vec![PortSpec::Number(port)]);
    let (source, destination) = match direction {
        Direction::Ingress => (
            peer,
            EntityRule {
                ports,
                ..EntityRule::default()
            },
        ),
        Direction::Egress => (EntityRule::default(), EntityRule { ports, ..peer }),
    };
    let rule = CalicoRule {
        action: super::api::calico::CalicoAction::Allow,
        protocol: Some(ProtocolSpec::Name(protocol.to_string())),
        not_protocol: None,
        icmp: None,
        not_icmp: None,
        ip_version: None,
        source,
        destination,
        metadata: None,
    };
    let name = dns_label(&format!(
        "allow-{}-{}-{port}",
        display(subject).replace('/', "-"),
        match direction {
            Direction::Ingress => "from",
            Direction::Egress => "to",
        }
    ));
    let name = dns_label(&format!(
        "{name}-{}",
        display(other).replace(['/', '.', ':'], "-")
    ));
    let (ingress, egress, types) = match direction {
        Direction::Ingress => (Some(vec![rule]), None, PolicyType::Ingress),
        Direction::Egress => (None, Some(vec![rule]), PolicyType::Egress),
    };
    notes.push(format!(
        "{direction} of {} is decided in Calico tier {tier}: a Calico NetworkPolicy there at order {order} (before every policy of the tier selecting the pod) allows {} on {port}/{protocol}",
        display(subject),
        display(other)
    ));
    Ok(CalicoNetworkPolicy {
        api_version: Some("projectcalico.org/v3".into()),
        kind: Some("NetworkPolicy".into()),
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace),
            ..ObjectMeta::default()
        },
        spec: CalicoSpec {
            tier: (tier != "default").then(|| tier.to_string()),
            order: Some(order),
            selector: Some(calico_selector(&subject.labels)),
            types: Some(vec![types]),
            ingress,
            egress,
            ..CalicoSpec::default()
        },
    })
}

/// What an Admin-tier override is built from.
struct Override<'a> {
    engine: &'a PolicyEngine,
    snapshot: &'a ClusterSnapshot,
    workloads: &'a Workloads<'a>,
    from: &'a Peer,
    to: &'a Peer,
    port: u16,
    protocol: Protocol,
}

impl Override<'_> {
    /// A policy of the deciding Deny's own kind, in the Admin tier at the
    /// closest free priority above it, selecting only the subject's
    /// workload and, as peer, only the other end's, on this one port: Pass
    /// when the later tiers then allow the flow, else Accept.
    fn admin_override(
        &self,
        direction: Direction,
        decided: &DirectionVerdict,
        subject: &Resolved<'_>,
        other: &Resolved<'_>,
        suggestion: &mut Suggestion,
    ) -> Result<(), PolicyError> {
        let engine = self.engine;
        let Some(deny) = decided.denied_by.first() else {
            return Err(PolicyError::Suggest("no deciding rule".into()));
        };
        let Some(denying) = engine
            .cluster
            .policies
            .iter()
            .find(|p| p.reference.kind == deny.kind && p.reference.name == deny.name)
        else {
            return Err(PolicyError::Suggest(format!(
                "{deny} is not in the manifests"
            )));
        };
        if denying.priority == 0 {
            return Err(PolicyError::Suggest(format!(
                "{deny} has priority 0: no policy can come before it (an equal priority leaves the order undefined); narrow that rule's peers or ports instead"
            )));
        }
        // The closest priority above the Deny that no other Admin-tier
        // policy uses, so the order is defined.
        let taken = |q: u32| {
            engine
                .cluster
                .policies
                .iter()
                .any(|p| p.reference.tier == Tier::Admin && p.priority == q)
        };
        let priority = (0..denying.priority)
            .rev()
            .find(|&q| !taken(q))
            .unwrap_or(denying.priority - 1);
        if taken(priority) {
            suggestion.notes.push(format!(
                "WARNING: every priority above {} is taken; at {priority} the order against the other policy there is undefined",
                denying.priority
            ));
        }
        let Some(namespace) = subject.namespace.as_ref().map(|n| n.name.clone()) else {
            return Err(PolicyError::Suggest(
                "an address outside the pod network has no policies to change".into(),
            ));
        };
        let subject_selector = single_out(engine, self.workloads, subject, |c| {
            self.workloads.same_workload(subject, c)
        });
        let peer = match other.kind {
            EndpointKind::External => {
                let ip = other
                    .given_ip
                    .ok_or_else(|| PolicyError::Suggest("the other end has no address".into()))?;
                let prefix = if ip.is_ipv4() { 32 } else { 128 };
                ClusterPeerSpec {
                    networks: Some(vec![format!("{ip}/{prefix}")]),
                    ..Default::default()
                }
            }
            _ => {
                let selected = single_out(engine, self.workloads, other, |c| {
                    self.workloads.same_workload(other, c)
                });
                let ns = other
                    .namespace
                    .as_ref()
                    .map(|n| n.name.clone())
                    .unwrap_or_default();
                ClusterPeerSpec {
                    pods: Some(NamespacedPod {
                        namespace_selector: Some(name_selector(&ns)),
                        pod_selector: Some(selected.selector),
                    }),
                    ..Default::default()
                }
            }
        };
        let subject_spec = Subject {
            namespaces: None,
            pods: Some(NamespacedPod {
                namespace_selector: Some(name_selector(&namespace)),
                pod_selector: Some(subject_selector.selector),
            }),
        };
        let name = dns_label(&format!(
            "{}-{}-{}-{}-{}",
            if direction == Direction::Egress {
                "egress"
            } else {
                "ingress"
            },
            short_name(self.workloads, subject),
            short_name(self.workloads, other),
            self.port,
            self.protocol.as_str()
        ));
        let mut chosen = None;
        for action in ["Pass", "Allow"] {
            let mut candidate = suggestion.clone();
            self.push(
                &mut candidate,
                deny.kind,
                &name,
                priority,
                &subject_spec,
                &peer,
                direction,
                action,
            );
            let check = PolicyEngine::new(
                &with_suggestion(self.snapshot, &candidate),
                engine.options(),
            )?;
            let after = check.try_evaluate(self.from, self.to, self.port, self.protocol)?;
            let this_side = match direction {
                Direction::Egress => &after.egress,
                Direction::Ingress => &after.ingress,
            };
            if this_side.verdict == PolicyVerdict::Allowed {
                chosen = Some((candidate, action));
                break;
            }
        }
        let Some((candidate, action)) = chosen else {
            return Err(PolicyError::Suggest(format!(
                "no Admin-tier rule above {deny} allows the flow; this is a bug in netwatch, please report it with the manifests"
            )));
        };
        *suggestion = candidate;
        suggestion.notes.push(format!(
            "{deny} (Admin tier, priority {}) denies this {direction}; no NetworkPolicy can override it. {} {name} at priority {priority} {} it for this workload pair and port only{}",
            denying.priority,
            deny.kind,
            if action == "Pass" {
                "passes"
            } else {
                "accepts"
            },
            if action == "Pass" {
                " (Pass: the namespace's NetworkPolicies and the Baseline tier decide, and they allow it)"
            } else {
                ""
            }
        ));
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn push(
        &self,
        suggestion: &mut Suggestion,
        kind: PolicyKind,
        name: &str,
        priority: u32,
        subject: &Subject,
        peer: &ClusterPeerSpec,
        direction: Direction,
        action: &str,
    ) {
        let metadata = ObjectMeta {
            name: Some(name.to_string()),
            ..Default::default()
        };
        let rule_name = Some(format!(
            "{}-{}-{}",
            action.to_ascii_lowercase(),
            self.port,
            self.protocol.as_str().to_ascii_lowercase()
        ));
        if kind == PolicyKind::ClusterNetworkPolicy {
            let ports = CnpProtocolPorts {
                destination_port: Some(CnpPort {
                    number: Some(i64::from(self.port)),
                    range: None,
                }),
            };
            let protocols = Some(vec![match self.protocol {
                Protocol::Tcp => CnpProtocol {
                    tcp: Some(ports),
                    ..Default::default()
                },
                Protocol::Udp => CnpProtocol {
                    udp: Some(ports),
                    ..Default::default()
                },
                Protocol::Sctp => CnpProtocol {
                    sctp: Some(ports),
                    ..Default::default()
                },
            }]);
            let action = if action == "Allow" { "Accept" } else { action };
            let mut spec = PolicySpec {
                tier: Some("Admin".into()),
                priority: Some(i64::from(priority)),
                subject: Some(subject.clone()),
                ingress: None,
                egress: None,
            };
            match direction {
                Direction::Ingress => {
                    spec.ingress = Some(vec![Rule {
                        name: rule_name,
                        action: Some(action.into()),
                        from: Some(vec![peer.clone()]),
                        protocols,
                        ..Rule::default()
                    }])
                }
                Direction::Egress => {
                    spec.egress = Some(vec![Rule {
                        name: rule_name,
                        action: Some(action.into()),
                        to: Some(vec![peer.clone()]),
                        protocols,
                        ..Rule::default()
                    }])
                }
            }
            suggestion
                .cluster_network_policies
                .push(ClusterNetworkPolicy {
                    api_version: V1ALPHA2.into(),
                    kind: "ClusterNetworkPolicy".into(),
                    metadata,
                    spec: Some(spec),
                    status: None,
                    kind_marker: Default::default(),
                });
        } else {
            let ports = Some(vec![AnpPort {
                port_number: Some(AnpPortNumber {
                    protocol: Some(self.protocol.as_str().into()),
                    port: Some(i64::from(self.port)),
                }),
                ..Default::default()
            }]);
            let mut spec = PolicySpec {
                tier: None,
                priority: Some(i64::from(priority)),
                subject: Some(subject.clone()),
                ingress: None,
                egress: None,
            };
            match direction {
                Direction::Ingress => {
                    spec.ingress = Some(vec![Rule {
                        name: rule_name,
                        action: Some(action.into()),
                        from: Some(vec![peer.clone()]),
                        ports,
                        ..Rule::default()
                    }])
                }
                Direction::Egress => {
                    spec.egress = Some(vec![Rule {
                        name: rule_name,
                        action: Some(action.into()),
                        to: Some(vec![peer.clone()]),
                        ports,
                        ..Rule::default()
                    }])
                }
            }
            suggestion.admin_network_policies.push(AdminNetworkPolicy {
                api_version: V1ALPHA1.into(),
                kind: "AdminNetworkPolicy".into(),
                metadata,
                spec: Some(spec),
                status: None,
                kind_marker: Default::default(),
            });
        }
    }
}

/// `{matchLabels: {kubernetes.io/metadata.name: <namespace>}}`.
fn name_selector(namespace: &str) -> LabelSelector {
    LabelSelector {
        match_labels: Some(BTreeMap::from([(
            NAMESPACE_NAME_LABEL.to_string(),
            namespace.to_string(),
        )])),
        match_expressions: None,
    }
}

/// Who owns a pod, from ownerReferences through the snapshot's workloads.
struct Workloads<'a> {
    snapshot: &'a ClusterSnapshot,
    pods: BTreeMap<(&'a str, &'a str), &'a PodRecord>,
}

impl<'a> Workloads<'a> {
    fn new(snapshot: &'a ClusterSnapshot) -> Self {
        let pods = snapshot
            .pods
            .iter()
            .filter_map(|p| Some(((p.namespace(), p.name()?), p)))
            .collect();
        Self { snapshot, pods }
    }

    /// The top controller of a pod of the snapshot: (kind, name).
    fn owner_of(&self, end: &Resolved<'_>) -> Option<(&'a str, &'a str)> {
        let (_, pod) = end.pod?;
        let ns = end.namespace.as_ref()?.name.as_str();
        let object = self.pods.get(&(ns, pod.name.as_str()))?;
        let owner = object.controller()?;
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
