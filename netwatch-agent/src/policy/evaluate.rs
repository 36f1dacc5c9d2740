//! The policy engine: is a flow allowed, and by which policies.
//!
//! A pod is isolated in a direction when a policy of its namespace selects it
//! and has that direction in its effective policyTypes. A direction allows
//! the flow when the pod is not isolated there, or when a rule of a selecting
//! policy matches (any peer and any port). A flow needs both directions: the
//! source's egress and the destination's ingress. Addresses that are not pods
//! have no policies and are matched by ipBlocks only.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::ops::Deref;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use serde::ser::SerializeStruct;

use super::PolicyError;
use super::api::cluster::ClusterPolicies;
use super::explain;
use super::model::{
    ClusterModel, CompiledPolicy, Direction, NamespaceModel, NamespaceScope, PeerMatcher, PodModel,
    PolicyRef, PolicyRule, PortMatcher, PortSpec, Protocol, compile_policy,
};
use super::selector::Labels;
use super::verdict::{Decision, Outcome, TierStep};
use crate::cluster::{ClusterSnapshot, LabelSet};
use crate::record::Tier;

/// How the engine reads the parts of the API that CNIs implement differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineOptions {
    /// Whether an `ipBlock` also matches traffic from or to pod IPs. Calico:
    /// yes; Cilium: no (its CIDR rules only match addresses outside the
    /// cluster). Default: true.
    pub ipblock_matches_pods: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            ipblock_matches_pods: true,
        }
    }
}

/// One end of a flow, as a caller names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Peer {
    /// A pod of the snapshot.
    Pod { namespace: String, name: String },
    /// An address. If a pod of the snapshot has it, it is that pod; otherwise
    /// it is outside the pod network (a node, the world).
    Ip(IpAddr),
    /// A pod that does not exist yet: namespace and labels, no IP.
    Hypothetical {
        namespace: String,
        labels: BTreeMap<String, String>,
    },
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Pod { namespace, name } => write!(f, "{namespace}/{name}"),
            Peer::Ip(ip) => write!(f, "{ip}"),
            Peer::Hypothetical { namespace, labels } => {
                let pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                write!(f, "{namespace}:{}", pairs.join(","))
            }
        }
    }
}

/// Error of [`Peer::from_str`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "cannot read {text:?} as a peer: {why}; write namespace/pod, an IP address, or namespace:key=value,key=value"
)]
pub struct PeerSyntaxError {
    pub text: String,
    pub why: String,
}

impl FromStr for Peer {
    type Err = PeerSyntaxError;

    /// `namespace/pod`, an IPv4 or IPv6 address, or a hypothetical pod
    /// `namespace:key=value,key=value` (`namespace:` for one with no labels).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = |why: &str| PeerSyntaxError {
            text: text.to_string(),
            why: why.to_string(),
        };
        let t = text.trim();
        if let Ok(ip) = IpAddr::from_str(t) {
            return Ok(Peer::Ip(ip));
        }
        if let Some((namespace, name)) = t.split_once('/') {
            if namespace.is_empty() || name.is_empty() || name.contains('/') {
                return Err(err("namespace/pod needs both parts and one `/`"));
            }
            return Ok(Peer::Pod {
                namespace: namespace.to_string(),
                name: name.to_string(),
            });
        }
        if let Some((namespace, rest)) = t.split_once(':') {
            if namespace.is_empty() {
                return Err(err("the namespace before `:` is empty"));
            }
            let mut labels = BTreeMap::new();
            for pair in rest.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let (k, v) = pair
                    .split_once('=')
                    .ok_or_else(|| err(&format!("label {pair:?} has no `=`")))?;
                super::selector::validate_label_key(k, "label").map_err(|p| err(&p.problem))?;
                super::selector::validate_label_value(v, "label").map_err(|p| err(&p.problem))?;
                labels.insert(k.to_string(), v.to_string());
            }
            return Ok(Peer::Hypothetical {
                namespace: namespace.to_string(),
                labels,
            });
        }
        Err(err("it is not an IP address and has neither `/` nor `:`"))
    }
}

/// What the policies allow: ALLOWED or DENIED (what happened to a flow is
/// [`crate::record::Verdict`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PolicyVerdict {
    Allowed,
    Denied,
}

impl PolicyVerdict {
    /// `ALLOWED` / `DENIED`.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyVerdict::Allowed => "ALLOWED",
            PolicyVerdict::Denied => "DENIED",
        }
    }

    fn from_bool(allowed: bool) -> Self {
        if allowed {
            PolicyVerdict::Allowed
        } else {
            PolicyVerdict::Denied
        }
    }
}

impl fmt::Display for PolicyVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for PolicyVerdict {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// What an endpoint is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointKind {
    /// A pod of the snapshot.
    Pod,
    /// A pod asked about before it exists.
    Hypothetical,
    /// An address no pod has.
    External,
}

/// One end of a flow as judged: what it resolved to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub kind: EndpointKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Absent for IPs and hypothetical pods.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub ip: Option<IpAddr>,
    /// The namespace has no Namespace object in the manifests: it is taken
    /// to have only its `kubernetes.io/metadata.name` label.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub namespace_assumed: bool,
}

impl fmt::Display for Endpoint {
    /// `ns/pod`, `ns:{app=web}` for hypothetical pods, or the IP.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.kind, &self.namespace, &self.name, self.ip) {
            (EndpointKind::Pod, Some(ns), Some(name), _) => write!(f, "{ns}/{name}"),
            (EndpointKind::Hypothetical, Some(ns), _, _)
            | (EndpointKind::Pod, Some(ns), None, _) => {
                let pairs: Vec<String> = self
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                write!(f, "{ns}:{{{}}}", pairs.join(","))
            }
            (_, _, _, Some(ip)) => write!(f, "{ip}"),
            _ => f.write_str("?"),
        }
    }
}

/// The verdict of one direction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DirectionVerdict {
    /// Whether a policy selects the pod for this direction.
    pub isolated: bool,
    pub verdict: PolicyVerdict,
    /// Every policy with a rule that matches the flow.
    pub allowed_by: Vec<PolicyRef>,
    /// When nothing allows the flow: every policy that isolates the pod here.
    pub denied_by: Vec<PolicyRef>,
    /// Per selecting policy and rule, what matched and what did not.
    pub near_misses: Vec<String>,
    /// The tier that decided (Admin, NetworkPolicy or Baseline); `None`
    /// when none did and the direction is allowed by default.
    pub decided_in: Option<Tier>,
    /// The walkthrough: what each tier said, in evaluation order, up to
    /// the one that decided.
    pub tiers: Vec<TierStep>,
}

impl Default for DirectionVerdict {
    /// Not isolated, so allowed.
    fn default() -> Self {
        Self {
            isolated: false,
            verdict: PolicyVerdict::Allowed,
            allowed_by: Vec::new(),
            denied_by: Vec::new(),
            near_misses: Vec::new(),
            decided_in: None,
            tiers: Vec::new(),
        }
    }
}

/// The part of a verdict that depends only on the identities of the two ends
/// (namespace, labels, and where it matters IP and container ports), so it
/// can be cached and shared between flows of the same workloads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyDecision {
    pub verdict: PolicyVerdict,
    pub egress: DirectionVerdict,
    pub ingress: DirectionVerdict,
    pub ipblock_matches_pods: bool,
}

/// The verdict on one flow: `source` -> `destination` on a port.
///
/// Dereferences to its [`PolicyDecision`] (`v.verdict`, `v.ingress.denied_by`).
/// Serializes to the `netwatch explain -o json` contract:
/// `{"verdict", "source", "destination", "egress", "ingress", "ipblock_matches_pods"}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowVerdict {
    pub source: Endpoint,
    pub destination: Endpoint,
    pub port: u16,
    pub protocol: Protocol,
    /// The source port the flow was judged with (`None`: unknown).
    pub source_port: Option<u16>,
    pub decision: Arc<PolicyDecision>,
    /// With staged Calico policies: the verdict once they are enforced
    /// (what-if only; `decision` is what is enforced).
    pub staged: Option<Arc<PolicyDecision>>,
}

impl Deref for FlowVerdict {
    type Target = PolicyDecision;
    fn deref(&self) -> &PolicyDecision {
        &self.decision
    }
}

impl Serialize for FlowVerdict {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("FlowVerdict", 10)?;
        st.serialize_field("verdict", &self.decision.verdict)?;
        st.serialize_field("source", &self.source)?;
        st.serialize_field("destination", &self.destination)?;
        st.serialize_field("port", &self.port)?;
        st.serialize_field("protocol", &self.protocol)?;
        if let Some(source_port) = self.source_port {
            st.serialize_field("source_port", &source_port)?;
        }
        st.serialize_field("egress", &self.decision.egress)?;
        st.serialize_field("ingress", &self.decision.ingress)?;
        st.serialize_field("ipblock_matches_pods", &self.decision.ipblock_matches_pods)?;
        if let Some(staged) = &self.staged {
            st.serialize_field("staged", &StagedJson(staged, self.decision.verdict))?;
        }
        st.end()
    }
}

/// `{"verdict", "would_deny_if_enforced", "egress", "ingress"}`.
struct StagedJson<'a>(&'a PolicyDecision, PolicyVerdict);

impl Serialize for StagedJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Staged", 4)?;
        st.serialize_field("verdict", &self.0.verdict)?;
        st.serialize_field(
            "would_deny_if_enforced",
            &(self.1 == PolicyVerdict::Allowed && self.0.verdict == PolicyVerdict::Denied),
        )?;
        st.serialize_field("egress", &self.0.egress)?;
        st.serialize_field("ingress", &self.0.ingress)?;
        st.end()
    }
}

impl FlowVerdict {
    /// One sentence for a human: for a denied flow, the policies that isolate
    /// each denying side and what they do not allow; for an allowed flow,
    /// the policies that allow it or that neither end is isolated.
    pub fn sentence(&self) -> String {
        explain::sentence(self)
    }
}

static GENERATION: AtomicU64 = AtomicU64::new(1);

/// Pods sharing namespace and labels: the same policies select them.
#[derive(Clone, Debug)]
pub(crate) struct SelectionIdentity {
    /// Index of its namespace in the model.
    pub namespace: u32,
    pub ingress: Vec<u32>,
    pub egress: Vec<u32>,
    /// Cluster policies (both tiers, evaluation order) with the pod as
    /// subject and rules in that direction.
    pub cluster_ingress: Vec<u32>,
    pub cluster_egress: Vec<u32>,
}

/// NetworkPolicies compiled against the pods and namespaces of one snapshot.
/// Cheap to query, `Send + Sync`; rebuild it when the snapshot changes.
#[derive(Debug)]
pub struct PolicyEngine {
    pub(crate) model: ClusterModel,
    /// Sorted by namespace, then name.
    pub(crate) policies: Vec<CompiledPolicy>,
    pub(crate) policies_by_namespace: HashMap<String, Vec<u32>>,
    /// ClusterNetworkPolicies, AdminNetworkPolicies and the
    /// BaselineAdminNetworkPolicy, in evaluation order.
    pub(crate) cluster: ClusterPolicies,
    pub(crate) identities: Vec<SelectionIdentity>,
    /// (namespace, labels, host network) -> identity, and how many pods
    /// each identity has: what changes of single pods keep up to date
    /// (see [`super::incremental`]).
    pub(crate) identity_index: HashMap<(u32, LabelSet, bool), u32>,
    pub(crate) identity_pods: Vec<u32>,
    /// Identities no pod has any more, and pod slots of deleted pods,
    /// for reuse.
    pub(crate) free_identities: Vec<u32>,
    pub(crate) free_pods: Vec<u32>,
    pub(crate) port_class_index: HashMap<Vec<super::model::ContainerPortModel>, u32>,
    /// Per pod: an index of its set of container ports (named ports resolve
    /// against it), so cache keys can tell pods with other ports apart.
    pub(crate) port_classes: Vec<u32>,
    pub(crate) options: EngineOptions,
    pub(crate) generation: u64,
    /// Whether a pod's IP can change a verdict (ipBlocks that match pods).
    pub(crate) ip_sensitive: bool,
    pub(crate) named_ports_used: bool,
    /// Whether a rule matches source ports (enforced or staged).
    pub(crate) source_ports_used: bool,
    /// Calico's tiers, when the snapshot has Calico objects.
    pub(crate) calico: Option<Box<super::api::calico::engine::CalicoEngine>>,
}

/// A peer resolved against the model.
#[derive(Clone, Debug)]
pub(crate) struct Resolved<'a> {
    pub kind: EndpointKind,
    pub namespace: Option<Cow<'a, NamespaceModel>>,
    pub labels: Cow<'a, Labels>,
    pub name: Option<Cow<'a, str>>,
    pub pod: Option<(u32, &'a PodModel)>,
    /// The address the caller gave, if it gave one.
    pub given_ip: Option<IpAddr>,
}

impl Resolved<'_> {
    fn endpoint(&self, ip: Option<IpAddr>) -> Endpoint {
        Endpoint {
            kind: self.kind,
            namespace: self.namespace.as_ref().map(|n| n.name.clone()),
            name: self.name.as_ref().map(|n| n.to_string()),
            labels: self.labels.clone().into_owned(),
            ip,
            namespace_assumed: self.namespace.as_ref().is_some_and(|n| !n.defined),
        }
    }

    /// The address this end has in a flow whose family `hint` gives.
    pub fn address(&self, hint: Option<IpAddr>) -> Option<IpAddr> {
        self.given_ip
            .or_else(|| self.pod.and_then(|(_, p)| p.ip_like(hint)))
    }
}

/// Both ends of a flow and its port, resolved.
pub(crate) struct Flow<'a> {
    pub source: Resolved<'a>,
    pub destination: Resolved<'a>,
    pub port: u16,
    pub protocol: Protocol,
    /// The source port, when known; only Calico rules' source `ports` and
    /// `notPorts` read it.
    pub source_port: Option<u16>,
    /// Picks the address family of the flow: the address given by the
    /// caller, else the destination's primary IP, else the source's.
    pub family_hint: Option<IpAddr>,
}

impl<'a> Flow<'a> {
    pub fn subject(&self, direction: Direction) -> &Resolved<'a> {
        match direction {
            Direction::Ingress => &self.destination,
            Direction::Egress => &self.source,
        }
    }

    pub fn other(&self, direction: Direction) -> &Resolved<'a> {
        match direction {
            Direction::Ingress => &self.source,
            Direction::Egress => &self.destination,
        }
    }
}

impl PolicyEngine {
    /// Compiles every NetworkPolicy of `snapshot` and indexes its pods.
    /// Fails on the first policy the API server would refuse, naming it and
    /// the field.
    pub fn new(
        snapshot: &ClusterSnapshot,
        options: EngineOptions,
    ) -> Result<PolicyEngine, PolicyError> {
        let model = ClusterModel::build(snapshot);
        let mut by_ref: BTreeMap<PolicyRef, CompiledPolicy> = BTreeMap::new();
        for policy in &snapshot.network_policies {
            let compiled =
                compile_policy(policy).map_err(|problem| PolicyError::InvalidPolicy {
                    policy: Box::new(PolicyRef::of(policy)),
                    problem: Box::new(problem),
                })?;
            // A later object of the same name replaces the earlier, as
            // `kubectl apply` of both would.
            by_ref.insert(compiled.reference.clone(), compiled);
        }
        let policies: Vec<CompiledPolicy> = by_ref.into_values().collect();
        let mut policies_by_namespace: HashMap<String, Vec<u32>> = HashMap::new();
        for (i, p) in policies.iter().enumerate() {
            policies_by_namespace
                .entry(p.reference.namespace_or_empty().to_string())
                .or_default()
                .push(i as u32);
        }
        let cluster = ClusterPolicies::build(snapshot)?;
        // Cluster `networks` match pod addresses whatever the ipBlock setting.
        let ip_sensitive = (options.ipblock_matches_pods
            && policies.iter().any(CompiledPolicy::has_ip_blocks))
            || cluster.uses_addresses();
        let named_ports_used =
            policies.iter().any(CompiledPolicy::has_named_ports) || cluster.uses_named_ports();
        let model_pods: Vec<(String, String)> = model
            .pods
            .iter()
            .map(|p| {
                (
                    model.namespaces[p.namespace as usize].name.clone(),
                    p.name.clone(),
                )
            })
            .collect();
        let calico = super::api::calico::engine::CalicoEngine::build(snapshot, &model_pods)
            .map_err(|e| PolicyError::Calico(Box::new(e)))?
            .map(Box::new);
        // Calico's nets, service accounts and named ports make a verdict
        // depend on the pod itself: cache per pod (its IP).
        let ip_sensitive = ip_sensitive || calico.is_some();
        let named_ports_used = named_ports_used || calico.is_some();
        let source_ports_used = calico.as_deref().is_some_and(|c| c.uses_source_ports());

        let mut engine = PolicyEngine {
            model,
            policies,
            policies_by_namespace,
            cluster,
            identities: Vec::new(),
            identity_index: HashMap::new(),
            identity_pods: Vec::new(),
            free_identities: Vec::new(),
            free_pods: Vec::new(),
            port_class_index: HashMap::new(),
            port_classes: Vec::new(),
            options,
            generation: GENERATION.fetch_add(1, Ordering::Relaxed),
            ip_sensitive,
            named_ports_used,
            source_ports_used,
            calico,
        };
        engine.index_identities();
        Ok(engine)
    }

    /// Groups pods by (namespace, labels) and computes once per group which
    /// policies select it: that is the expensive part of a verdict.
    fn index_identities(&mut self) {
        // Host-network pods are never subjects of cluster policies, so they
        // are an identity of their own.
        let mut index: HashMap<(u32, LabelSet, bool), u32> = HashMap::new();
        let mut identities = Vec::new();
        let mut counts: Vec<u32> = Vec::new();
        let mut pod_identity = Vec::with_capacity(self.model.pods.len());
        for pod in &self.model.pods {
            let key = (pod.namespace, pod.labels.clone(), pod.host_network);
            let id = match index.get(&key) {
                Some(&id) => id,
                None => {
                    identities.push(self.selection(pod.namespace, &pod.labels, pod.host_network));
                    counts.push(0);
                    let id = (identities.len() - 1) as u32;
                    index.insert(key, id);
                    id
                }
            };
            pod_identity.push(id);
        }
        // Pods replaced by a later one of the same name are no pod: only
        // the named ones count.
        for &slot in self.model.pod_index.values().flat_map(|m| m.values()) {
            counts[pod_identity[slot as usize] as usize] += 1;
        }
        let mut classes: HashMap<Vec<super::model::ContainerPortModel>, u32> = HashMap::new();
        let port_classes: Vec<u32> = self
            .model
            .pods
            .iter()
            .map(|p| {
                let next = classes.len() as u32;
                *classes.entry(p.ports.clone()).or_insert(next)
            })
            .collect();
        for (pod, id) in self.model.pods.iter_mut().zip(pod_identity) {
            pod.identity = id;
        }
        self.identities = identities;
        self.identity_index = index;
        self.identity_pods = counts;
        self.port_classes = port_classes;
        self.port_class_index = classes;
        // Slots of replaced duplicates are free; their identity keeps a
        // count of zero until reused by name.
        let live: std::collections::HashSet<u32> = self
            .model
            .pod_index
            .values()
            .flat_map(|m| m.values().copied())
            .collect();
        self.free_pods = (0..self.model.pods.len() as u32)
            .filter(|s| !live.contains(s))
            .collect();
    }

    /// The policies of `namespace` selecting `labels`, for ingress and egress.
    pub(crate) fn selecting_policies(
        &self,
        namespace: &str,
        labels: &Labels,
    ) -> (Vec<u32>, Vec<u32>) {
        let mut ingress = Vec::new();
        let mut egress = Vec::new();
        for &i in self
            .policies_by_namespace
            .get(namespace)
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let p = &self.policies[i as usize];
            if p.pod_selector.matches(labels) {
                if p.ingress.is_some() {
                    ingress.push(i);
                }
                if p.egress.is_some() {
                    egress.push(i);
                }
            }
        }
        (ingress, egress)
    }

    /// The options the engine was built with.
    pub fn options(&self) -> EngineOptions {
        self.options
    }

    /// Number of compiled NetworkPolicies.
    pub fn policy_count(&self) -> usize {
        self.policies.len()
    }

    /// Number of compiled cluster policies (ClusterNetworkPolicy,
    /// AdminNetworkPolicy, BaselineAdminNetworkPolicy).
    pub fn cluster_policy_count(&self) -> usize {
        self.cluster.policies.len()
    }

    /// A number that changes every time an engine is built (caches use it to
    /// notice a rebuild).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Every pod of the snapshot as `(namespace, name)`, sorted.
    pub fn pods(&self) -> Vec<(String, String)> {
        self.model
            .sorted_pods()
            .into_iter()
            .map(|i| {
                let p = &self.model.pods[i as usize];
                (
                    self.model.namespaces[p.namespace as usize].name.clone(),
                    p.name.clone(),
                )
            })
            .collect()
    }

    pub(crate) fn resolve<'a>(&'a self, peer: &'a Peer) -> Result<Resolved<'a>, PolicyError> {
        match peer {
            Peer::Pod { namespace, name } => {
                let Some((idx, pod)) = self.model.pod(namespace, name) else {
                    return Err(self.unknown_pod(namespace, name));
                };
                Ok(self.resolved_pod(idx, pod, None))
            }
            Peer::Ip(ip) => match self.model.pod_at(ip) {
                Some(idx) => Ok(self.resolved_pod(idx, &self.model.pods[idx as usize], Some(*ip))),
                None => Ok(Resolved {
                    kind: EndpointKind::External,
                    namespace: None,
                    labels: Cow::Owned(Labels::new()),
                    name: None,
                    pod: None,
                    given_ip: Some(*ip),
                }),
            },
            Peer::Hypothetical { namespace, labels } => Ok(Resolved {
                kind: EndpointKind::Hypothetical,
                namespace: Some(match self.model.namespace(namespace) {
                    Some(ns) => Cow::Borrowed(ns),
                    None => Cow::Owned(NamespaceModel::implicit(namespace)),
                }),
                labels: Cow::Borrowed(labels),
                name: None,
                pod: None,
                given_ip: None,
            }),
        }
    }

    fn unknown_pod(&self, namespace: &str, name: &str) -> PolicyError {
        let mut known: Vec<&str> = self
            .model
            .pod_index
            .get(namespace)
            .map(|m| m.keys().map(String::as_str).collect())
            .unwrap_or_default();
        known.sort_unstable();
        PolicyError::UnknownPod {
            namespace: namespace.to_string(),
            name: name.to_string(),
            known: if known.is_empty() {
                format!("the manifests have no pod in namespace {namespace}")
            } else {
                format!("pods in {namespace}: {}", known.join(", "))
            },
        }
    }

    pub(crate) fn resolved_pod<'a>(
        &'a self,
        idx: u32,
        pod: &'a PodModel,
        given_ip: Option<IpAddr>,
    ) -> Resolved<'a> {
        Resolved {
            kind: EndpointKind::Pod,
            namespace: Some(Cow::Borrowed(
                &self.model.namespaces[pod.namespace as usize],
            )),
            labels: Cow::Borrowed(&pod.labels),
            name: Some(Cow::Borrowed(pod.name.as_str())),
            pod: Some((idx, pod)),
            given_ip,
        }
    }

    pub(crate) fn flow<'a>(
        &self,
        source: Resolved<'a>,
        destination: Resolved<'a>,
        port: u16,
        protocol: Protocol,
    ) -> Flow<'a> {
        let family_hint = source
            .given_ip
            .or(destination.given_ip)
            .or_else(|| destination.pod.and_then(|(_, p)| p.ips.first().copied()))
            .or_else(|| source.pod.and_then(|(_, p)| p.ips.first().copied()));
        Flow {
            source,
            destination,
            port,
            protocol,
            source_port: None,
            family_hint,
        }
    }

    /// The policies that isolate `subject` in `direction`.
    pub(crate) fn isolating<'a>(
        &'a self,
        subject: &Resolved<'_>,
        direction: Direction,
    ) -> Cow<'a, [u32]> {
        match (subject.kind, subject.pod, &subject.namespace) {
            (EndpointKind::External, _, _) | (_, _, None) => Cow::Borrowed(&[]),
            (_, Some((_, pod)), _) => {
                let id = &self.identities[pod.identity as usize];
                Cow::Borrowed(match direction {
                    Direction::Ingress => &id.ingress,
                    Direction::Egress => &id.egress,
                })
            }
            (_, None, Some(ns)) => {
                let (ingress, egress) = self.selecting_policies(&ns.name, &subject.labels);
                Cow::Owned(match direction {
                    Direction::Ingress => ingress,
                    Direction::Egress => egress,
                })
            }
        }
    }

    /// The address of `end` an ipBlock is compared with, if any: external
    /// addresses always, pods only when ipBlocks match pods.
    pub(crate) fn block_address(&self, end: &Resolved<'_>, hint: Option<IpAddr>) -> Option<IpAddr> {
        match end.kind {
            EndpointKind::External => end.given_ip,
            EndpointKind::Pod if self.options.ipblock_matches_pods => end.address(hint),
            _ => None,
        }
    }

    /// Whether one peer entry matches `end`.
    #[inline]
    pub(crate) fn peer_matches(
        &self,
        policy_namespace: &str,
        peer: &PeerMatcher,
        end: &Resolved<'_>,
        hint: Option<IpAddr>,
    ) -> bool {
        match peer {
            PeerMatcher::Pods {
                namespaces, pods, ..
            } => {
                let Some(ns) = &end.namespace else {
                    return false;
                };
                let ns_ok = match namespaces {
                    NamespaceScope::PolicyNamespace => ns.name == policy_namespace,
                    NamespaceScope::Selector(sel) => sel.matches(&ns.labels),
                };
                ns_ok && pods.matches(&end.labels)
            }
            PeerMatcher::IpBlock(block) => self
                .block_address(end, hint)
                .is_some_and(|ip| block.matches(ip)),
        }
    }

    /// Whether one port entry matches the flow; named ports resolve against
    /// the destination pod's container ports (name and protocol).
    #[inline]
    pub(crate) fn port_matches(
        port_matcher: &PortMatcher,
        destination: &Resolved<'_>,
        port: u16,
        protocol: Protocol,
    ) -> bool {
        if port_matcher.protocol != protocol {
            return false;
        }
        match &port_matcher.port {
            PortSpec::Any => true,
            PortSpec::Range { start, end } => (*start..=*end).contains(&port),
            PortSpec::Named(name) => {
                destination
                    .pod
                    .and_then(|(_, p)| p.named_port(name, protocol))
                    == Some(port)
            }
        }
    }

    pub(crate) fn rule_matches(
        &self,
        policy_namespace: &str,
        rule: &PolicyRule,
        direction: Direction,
        flow: &Flow<'_>,
    ) -> bool {
        let other = flow.other(direction);
        (rule.peers.is_empty()
            || rule
                .peers
                .iter()
                .any(|p| self.peer_matches(policy_namespace, p, other, flow.family_hint)))
            && (rule.ports.is_empty()
                || rule
                    .ports
                    .iter()
                    .any(|p| Self::port_matches(p, &flow.destination, flow.port, flow.protocol)))
    }

    /// Whether `policy` has a rule in `direction` matching the flow.
    pub(crate) fn policy_allows(&self, policy: u32, direction: Direction, flow: &Flow<'_>) -> bool {
        let p = &self.policies[policy as usize];
        p.rules(direction)
            .unwrap_or_default()
            .iter()
            .any(|r| self.rule_matches(p.reference.namespace_or_empty(), r, direction, flow))
    }

    /// The fast path: the first tier that allows or denies decides; a
    /// direction no tier decides is allowed.
    pub(crate) fn direction_allows(&self, direction: Direction, flow: &Flow<'_>) -> bool {
        if let Some(calico) = self.calico.as_deref() {
            return self
                .calico_direction_verdict(calico, &calico.enforced, direction, flow)
                .verdict
                == PolicyVerdict::Allowed;
        }
        for tier in self.tiers() {
            match tier.decide(self, direction, flow) {
                Decision::Allow => return true,
                Decision::Deny => return false,
                Decision::Pass | Decision::NotSelected => {}
            }
        }
        true
    }

    /// The explaining path: the walkthrough of the tiers, the policies
    /// that decided, and for a denial the near misses of the deciding tier.
    /// Cluster tiers without any policy are left out of the walkthrough.
    pub(crate) fn direction_verdict(
        &self,
        direction: Direction,
        flow: &Flow<'_>,
    ) -> DirectionVerdict {
        if let Some(calico) = self.calico.as_deref() {
            return self.calico_direction_verdict(calico, &calico.enforced, direction, flow);
        }
        let mut verdict = DirectionVerdict::default();
        for tier in self.tiers() {
            if tier.tier() != Tier::NetworkPolicy && tier.is_empty(self) {
                continue;
            }
            let step = tier.judge(self, direction, flow);
            let done = step.outcome.is_final();
            match &step.outcome {
                Outcome::Allow(by) => {
                    verdict.isolated = true;
                    verdict.verdict = PolicyVerdict::Allowed;
                    verdict.allowed_by = by.clone();
                    verdict.decided_in = Some(tier.tier());
                }
                Outcome::Deny(by) => {
                    verdict.isolated = true;
                    verdict.verdict = PolicyVerdict::Denied;
                    verdict.denied_by = by.clone();
                    verdict.near_misses = tier.near_misses(self, direction, flow);
                    verdict.decided_in = Some(tier.tier());
                }
                Outcome::Pass(_) | Outcome::NotSelected => {}
            }
            verdict.tiers.push(step);
            if done {
                break;
            }
        }
        verdict
    }

    pub(crate) fn decide_flow(&self, flow: &Flow<'_>) -> PolicyDecision {
        let egress = self.direction_verdict(Direction::Egress, flow);
        let ingress = self.direction_verdict(Direction::Ingress, flow);
        PolicyDecision {
            verdict: PolicyVerdict::from_bool(
                egress.verdict == PolicyVerdict::Allowed
                    && ingress.verdict == PolicyVerdict::Allowed,
            ),
            egress,
            ingress,
            ipblock_matches_pods: self.options.ipblock_matches_pods,
        }
    }

    pub(crate) fn flow_verdict(
        &self,
        flow: &Flow<'_>,
        decision: Arc<PolicyDecision>,
    ) -> FlowVerdict {
        FlowVerdict {
            source: flow.source.endpoint(flow.source.address(flow.family_hint)),
            destination: flow
                .destination
                .endpoint(flow.destination.address(flow.family_hint)),
            port: flow.port,
            protocol: flow.protocol,
            source_port: flow.source_port,
            decision,
            staged: self.staged_decision_of(flow).map(Arc::new),
        }
    }

    /// Judges `from` -> `to` on `port`/`protocol`, with the policies that
    /// allow or deny each direction and, for a denying direction, the near
    /// misses. A pod the snapshot does not have is judged as a pod of its
    /// namespace with no labels and no IP; use [`PolicyEngine::try_evaluate`]
    /// to refuse it instead.
    ///
    /// The source port is unknown here: Calico rules' source `ports` match
    /// nothing and their source `notPorts` exclude nothing; see
    /// [`PolicyEngine::evaluate_with_source_port`].
    pub fn evaluate(&self, from: &Peer, to: &Peer, port: u16, protocol: Protocol) -> FlowVerdict {
        self.evaluate_with_source_port(from, to, None, port, protocol)
    }

    /// Like [`PolicyEngine::evaluate`], for a flow from `source_port`
    /// (`None`: unknown), which Calico rules' source `ports` and `notPorts`
    /// match.
    pub fn evaluate_with_source_port(
        &self,
        from: &Peer,
        to: &Peer,
        source_port: Option<u16>,
        port: u16,
        protocol: Protocol,
    ) -> FlowVerdict {
        let source = self.resolve_lenient(from);
        let destination = self.resolve_lenient(to);
        let mut flow = self.flow(source, destination, port, protocol);
        flow.source_port = source_port;
        let decision = Arc::new(self.decide_flow(&flow));
        self.flow_verdict(&flow, decision)
    }

    /// Like [`PolicyEngine::evaluate`], but a pod missing from the snapshot is
    /// an error that lists the pods of its namespace.
    pub fn try_evaluate(
        &self,
        from: &Peer,
        to: &Peer,
        port: u16,
        protocol: Protocol,
    ) -> Result<FlowVerdict, PolicyError> {
        self.try_evaluate_with_source_port(from, to, None, port, protocol)
    }

    /// Like [`PolicyEngine::try_evaluate`], for a flow from `source_port`.
    pub fn try_evaluate_with_source_port(
        &self,
        from: &Peer,
        to: &Peer,
        source_port: Option<u16>,
        port: u16,
        protocol: Protocol,
    ) -> Result<FlowVerdict, PolicyError> {
        let source = self.resolve(from)?;
        let destination = self.resolve(to)?;
        let mut flow = self.flow(source, destination, port, protocol);
        flow.source_port = source_port;
        let decision = Arc::new(self.decide_flow(&flow));
        Ok(self.flow_verdict(&flow, decision))
    }

    /// Whether some rule matches source ports (Calico's source `ports` or
    /// `notPorts`): only then can a flow's source port change its verdict.
    pub fn uses_source_ports(&self) -> bool {
        self.source_ports_used
    }

    /// Checks that `peer` names something the engine knows (a pod of the
    /// snapshot, any IP, any hypothetical pod).
    pub fn check_peer(&self, peer: &Peer) -> Result<(), PolicyError> {
        self.resolve(peer).map(|_| ())
    }

    /// Whether the snapshot has the pod `namespace`/`name` (what
    /// [`PolicyEngine::check_peer`] accepts of a [`Peer::Pod`]).
    pub fn knows_pod(&self, namespace: &str, name: &str) -> bool {
        self.model.pod(namespace, name).is_some()
    }

    pub(crate) fn resolve_lenient<'a>(&'a self, peer: &'a Peer) -> Resolved<'a> {
        match (peer, self.resolve(peer)) {
            (_, Ok(r)) => r,
            (Peer::Pod { namespace, name }, Err(_)) => Resolved {
                kind: EndpointKind::Pod,
                namespace: Some(match self.model.namespace(namespace) {
                    Some(ns) => Cow::Borrowed(ns),
                    None => Cow::Owned(NamespaceModel::implicit(namespace)),
                }),
                labels: Cow::Owned(Labels::new()),
                name: Some(Cow::Borrowed(name.as_str())),
                pod: None,
                given_ip: None,
            },
            // Only pods can fail to resolve.
            (_, Err(_)) => Resolved {
                kind: EndpointKind::External,
                namespace: None,
                labels: Cow::Owned(Labels::new()),
                name: None,
                pod: None,
                given_ip: None,
            },
        }
    }

    /// The verdict alone, without explanations: the fast path.
    /// The source port is unknown here, as in [`PolicyEngine::evaluate`].
    pub fn decide(&self, from: &Peer, to: &Peer, port: u16, protocol: Protocol) -> PolicyVerdict {
        let source = self.resolve_lenient(from);
        let destination = self.resolve_lenient(to);
        let flow = self.flow(source, destination, port, protocol);
        PolicyVerdict::from_bool(
            self.direction_allows(Direction::Egress, &flow)
                && self.direction_allows(Direction::Ingress, &flow),
        )
    }

    /// The verdict between two pods of the snapshot, by index.
    pub(crate) fn decide_pods(
        &self,
        from: u32,
        to: u32,
        port: u16,
        protocol: Protocol,
    ) -> PolicyVerdict {
        let source = self.resolved_pod(from, &self.model.pods[from as usize], None);
        let destination = self.resolved_pod(to, &self.model.pods[to as usize], None);
        let flow = self.flow(source, destination, port, protocol);
        PolicyVerdict::from_bool(
            self.direction_allows(Direction::Egress, &flow)
                && self.direction_allows(Direction::Ingress, &flow),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_from_the_three_cli_forms() {
        assert_eq!(
            "x/a".parse::<Peer>().unwrap(),
            Peer::Pod {
                namespace: "x".into(),
                name: "a".into()
            }
        );
        assert_eq!(
            "10.0.0.1".parse::<Peer>().unwrap(),
            Peer::Ip("10.0.0.1".parse().unwrap())
        );
        assert_eq!(
            "fd00::1".parse::<Peer>().unwrap(),
            Peer::Ip("fd00::1".parse().unwrap())
        );
        let Peer::Hypothetical { namespace, labels } =
            "prod:app=web,tier=frontend".parse::<Peer>().unwrap()
        else {
            panic!()
        };
        assert_eq!(namespace, "prod");
        assert_eq!(labels.len(), 2);
        assert_eq!(labels["tier"], "frontend");
        let Peer::Hypothetical { labels, .. } = "prod:".parse::<Peer>().unwrap() else {
            panic!()
        };
        assert!(labels.is_empty());
        for bad in ["", "x", "/a", "x/", "x/a/b", ":app=web", "x:app", "x:a b=c"] {
            assert!(bad.parse::<Peer>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn peers_display_as_they_parse() {
        for text in ["x/a", "10.0.0.1", "prod:app=web,tier=frontend"] {
            assert_eq!(text.parse::<Peer>().unwrap().to_string(), text);
        }
    }
}
