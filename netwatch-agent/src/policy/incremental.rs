//! Applying one object's change to a built [`PolicyEngine`] instead of
//! rebuilding it, for the agent, which sees pods come and go all the time.
//!
//! - A pod joins or leaves its (namespace, labels) identity; the policies
//!   selecting an identity are computed once, when it first appears, and
//!   an identity no pod has any more is freed.
//! - A namespace's labels: its identities' selections are recomputed (a
//!   deleted one keeps only its name label, as pods still in it have).
//! - A NetworkPolicy: that policy alone is compiled, and the selections of
//!   its namespace's identities recomputed.
//!
//! What changes reach is returned as an [`Invalidation`], so a
//! [`VerdictCache`](super::VerdictCache) drops only the decisions it
//! touches.
//! - A cluster policy (ClusterNetworkPolicy, AdminNetworkPolicy,
//!   BaselineAdminNetworkPolicy): all of them are compiled again (a
//!   cluster has a handful) and every identity's selection recomputed.
//! - A node: the nodes cluster policies' `nodes` peers read.
//!
//! - With Calico's tiers in use: a Calico policy or a NetworkPolicy (they
//!   sit in Calico's default tier) is compiled alone and put in its place
//!   in its tier; a tier or a staged policy compiles Calico's policies
//!   again. A pod, its namespace's labels or its namespace's Services and
//!   EndpointSlices recompute the Calico endpoints of the pods they reach.
//!
//! The first Calico object, or the last one gone, switches how flows are
//! judged: the engine says so ([`Unapplied`]) and the caller rebuilds.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::api::calico::CalicoEndpoint;
use super::api::calico::engine::CalicoPolicyUpdate;
use super::api::calico::manifests::{
    NamespaceServices, endpoint_in, namespace_labels, service_backings,
};
use super::api::cluster::ClusterPolicies;
use super::evaluate::{PolicyEngine, SelectionIdentity};
use super::model::{
    CompiledPolicy, ContainerPortModel, NamespaceModel, PodModel, PolicyRef, compile_policy,
    pod_ports,
};
use super::{Labels, PolicyError};
use crate::cluster::{Change, ChangeKind, ClusterSnapshot, LabelSet, PodRecord};

/// Which cached verdicts a change can have changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Invalidation {
    /// Everything (a change of what verdicts are keyed by).
    pub all: bool,
    /// Verdicts with an end in these namespaces (their policies or labels
    /// changed).
    pub namespaces: HashSet<String>,
    /// Verdicts with an end of these identities (freed, their numbers may
    /// be reused).
    pub identities: HashSet<u32>,
}

impl Invalidation {
    pub fn is_empty(&self) -> bool {
        !self.all && self.namespaces.is_empty() && self.identities.is_empty()
    }

    fn merge(&mut self, other: Invalidation) {
        self.all |= other.all;
        self.namespaces.extend(other.namespaces);
        self.identities.extend(other.identities);
    }
}

/// Why the engine did not apply changes: rebuild it.
#[derive(Debug, PartialEq, Eq)]
pub enum Unapplied {
    /// Changes of kinds it does not apply one by one.
    Rebuild,
}

impl PolicyEngine {
    /// Applies `changes` (see [`crate::cluster::ChangeLog`]) made to the
    /// snapshot it was built from, giving `snapshot` as it is now. On
    /// `Ok(Err(Unapplied))` nothing was changed: rebuild. A policy that
    /// does not compile is an error, as in [`PolicyEngine::new`], and
    /// leaves the engine unchanged.
    pub fn apply_changes(
        &mut self,
        snapshot: &ClusterSnapshot,
        changes: &[&Change],
    ) -> Result<Result<Invalidation, Unapplied>, PolicyError> {
        let applicable = changes.iter().all(|c| match c.kind {
            // Cluster policies are recompiled together, named or not,
            // and so are Calico's when the engine judges by them (when
            // Calico objects appear, Calico's tiers take over: that is
            // a rebuild).
            ChangeKind::ClusterPolicy => true,
            ChangeKind::Calico => self.calico.is_some(),
            ChangeKind::Pod
            | ChangeKind::NetworkPolicy
            | ChangeKind::Service
            | ChangeKind::EndpointSlice
            | ChangeKind::PodOwner
            | ChangeKind::Workload
            | ChangeKind::Namespace
            | ChangeKind::Node => c.name.is_some(),
            ChangeKind::Other => false,
        });
        if !applicable {
            return Ok(Err(Unapplied::Rebuild));
        }
        // Compile the changed policies first: one the API server would
        // refuse leaves the engine as it was.
        let mut compiled: Vec<Option<CompiledPolicy>> = Vec::new();
        for change in changes
            .iter()
            .filter(|c| c.kind == ChangeKind::NetworkPolicy)
        {
            let object = change.locate(&snapshot.network_policies, |p| &p.metadata);
            compiled.push(
                object
                    .map(|policy| {
                        compile_policy(policy).map_err(|problem| PolicyError::InvalidPolicy {
                            policy: Box::new(PolicyRef::of(policy)),
                            problem: Box::new(problem),
                        })
                    })
                    .transpose()?,
            );
        }
        // Every cluster policy, when any changed: a handful per cluster,
        // and their order (tier, priority, name) is global.
        let cluster = if changes.iter().any(|c| c.kind == ChangeKind::ClusterPolicy) {
            Some(ClusterPolicies::build(snapshot)?)
        } else {
            None
        };
        // Calico's tiers hold the NetworkPolicies too: a change of either
        // compiles the changed policies (or, for tiers and staged ones,
        // all of them) into them.
        let calico_changes: Vec<&Change> = changes
            .iter()
            .copied()
            .filter(|c| matches!(c.kind, ChangeKind::Calico | ChangeKind::NetworkPolicy))
            .collect();
        let calico_policies = match self.calico.as_deref() {
            Some(calico) if !calico_changes.is_empty() => {
                match calico
                    .update(snapshot, &calico_changes)
                    .map_err(|e| PolicyError::Calico(Box::new(e)))?
                {
                    // The Kubernetes tiers judge again.
                    CalicoPolicyUpdate::Gone => return Ok(Err(Unapplied::Rebuild)),
                    update => Some(update),
                }
            }
            _ => None,
        };
        let mut compiled = compiled.into_iter();
        let mut invalidation = Invalidation::default();
        let mut calico_endpoints = CalicoEndpointChanges::default();
        for change in changes {
            let namespace = namespace_of_change(change);
            let name = change.name.as_deref().unwrap_or_default();
            match change.kind {
                ChangeKind::Pod => {
                    let pod = change.find_pod(&snapshot.pods);
                    let before = self.model.pod(namespace, name).map(|(slot, _)| slot);
                    invalidation.merge(self.apply_pod(namespace, name, pod));
                    if self.calico.is_some() {
                        let after = self.model.pod(namespace, name).map(|(slot, _)| slot);
                        calico_endpoints.pod(namespace, before, after.zip(pod));
                    }
                }
                ChangeKind::Namespace => {
                    let object = change.locate(&snapshot.namespaces, |n| &n.metadata);
                    invalidation.merge(self.apply_namespace(name, object));
                    calico_endpoints.namespace(name);
                }
                ChangeKind::NetworkPolicy => {
                    let policy = compiled.next().flatten();
                    invalidation.merge(self.apply_policy(namespace, name, policy));
                }
                // Which Services a pod backs: Calico's rules can name them.
                ChangeKind::Service | ChangeKind::EndpointSlice => {
                    calico_endpoints.namespace(namespace);
                }
                // Workloads are not policy inputs; cluster policies, nodes
                // and Calico's policies are applied below, once a batch.
                _ => {}
            }
        }
        if self.calico.is_some() {
            invalidation.merge(self.apply_calico(snapshot, calico_endpoints, calico_policies));
        }
        if let Some(cluster) = cluster {
            // Compiled with the nodes as they are now.
            self.apply_cluster_policies(cluster);
            invalidation.all = true;
        } else if changes.iter().any(|c| c.kind == ChangeKind::Node) {
            // Cluster policies' `nodes` peers read the nodes' labels and
            // addresses.
            let nodes = ClusterPolicies::nodes_of(snapshot);
            if nodes != self.cluster.nodes {
                self.cluster.nodes = nodes;
                invalidation.all |= !self.cluster.policies.is_empty();
            }
        }
        Ok(Ok(invalidation))
    }

    /// The identity of (namespace, labels, host network), made when new.
    fn intern_identity(&mut self, namespace: u32, labels: &LabelSet, host: bool) -> u32 {
        if let Some(&id) = self.identity_index.get(&(namespace, labels.clone(), host)) {
            self.identity_pods[id as usize] += 1;
            return id;
        }
        let selection = self.selection(namespace, labels, host);
        let id = match self.free_identities.pop() {
            Some(id) => {
                self.identities[id as usize] = selection;
                self.identity_pods[id as usize] = 1;
                id
            }
            None => {
                self.identities.push(selection);
                self.identity_pods.push(1);
                (self.identities.len() - 1) as u32
            }
        };
        self.identity_index
            .insert((namespace, labels.clone(), host), id);
        id
    }

    /// What policies select pods of (namespace, labels, host network).
    pub(crate) fn selection(
        &self,
        namespace: u32,
        labels: &BTreeMap<String, String>,
        host: bool,
    ) -> SelectionIdentity {
        let ns = &self.model.namespaces[namespace as usize];
        let (ingress, egress) = self.selecting_policies(&ns.name, labels);
        let (cluster_ingress, cluster_egress) = self.cluster.selecting(ns, labels, host);
        SelectionIdentity {
            namespace,
            ingress,
            egress,
            cluster_ingress,
            cluster_egress,
        }
    }

    /// Brings pod `namespace/name` to `pod` (`None`: gone).
    fn apply_pod(&mut self, namespace: &str, name: &str, pod: Option<&PodRecord>) -> Invalidation {
        let mut invalidation = Invalidation::default();
        let existing = self
            .model
            .pod_index
            .get(namespace)
            .and_then(|m| m.get(name))
            .copied();
        if let Some(slot) = existing {
            // Leave the slot empty: no name, no address, no identity.
            let old = std::mem::replace(
                &mut self.model.pods[slot as usize],
                PodModel {
                    namespace: 0,
                    name: String::new(),
                    labels: Default::default(),
                    ips: Vec::new(),
                    ports: Vec::new(),
                    host_network: true,
                    identity: u32::MAX,
                },
            );
            if let Some(names) = self.model.pod_index.get_mut(namespace) {
                names.remove(name);
                if names.is_empty() {
                    self.model.pod_index.remove(namespace);
                }
            }
            if !old.host_network {
                for ip in &old.ips {
                    if let Some(claims) = self.model.ip_claims.get_mut(ip) {
                        if let Some(at) = claims.iter().position(|&s| s == slot) {
                            claims.swap_remove(at);
                        }
                        if claims.is_empty() {
                            self.model.ip_claims.remove(ip);
                        }
                    }
                }
            }
            let id = old.identity;
            self.identity_pods[id as usize] -= 1;
            if self.identity_pods[id as usize] == 0 {
                self.identity_index
                    .remove(&(old.namespace, old.labels, old.host_network));
                self.free_identities.push(id);
                invalidation.identities.insert(id);
            }
            self.free_pods.push(slot);
        }
        if let Some(pod) = pod {
            // A namespace new to the model changes what explanations say
            // of namespace selectors.
            invalidation.all |= !self.model.namespace_index.contains_key(namespace);
            let ns = self.model.namespace_id(namespace);
            let ips = pod.ips().to_vec();
            let ports = pod_ports(pod);
            let host_network = pod.host_network();
            let labels = pod.label_set().clone();
            let identity = self.intern_identity(ns, &labels, host_network);
            let class = self.port_class(&ports);
            let model = PodModel {
                namespace: ns,
                name: name.to_owned(),
                labels,
                ips,
                ports,
                host_network,
                identity,
            };
            let slot = match self.free_pods.pop() {
                Some(slot) => {
                    self.model.pods[slot as usize] = model;
                    self.port_classes[slot as usize] = class;
                    slot
                }
                None => {
                    self.model.pods.push(model);
                    self.port_classes.push(class);
                    (self.model.pods.len() - 1) as u32
                }
            };
            self.model
                .pod_index
                .entry(namespace.to_owned())
                .or_default()
                .insert(name.to_owned(), slot);
            let model = &mut self.model;
            let added = &model.pods[slot as usize];
            if !added.host_network {
                for ip in &added.ips {
                    model.ip_claims.entry(*ip).or_default().push(slot);
                }
            }
        }
        invalidation
    }

    /// The index of a set of container ports, made when new.
    fn port_class(&mut self, ports: &[ContainerPortModel]) -> u32 {
        if let Some(&class) = self.port_class_index.get(ports) {
            return class;
        }
        let class = self.port_class_index.len() as u32;
        self.port_class_index.insert(ports.to_vec(), class);
        class
    }

    /// Namespace `name`'s labels are now `object`'s (`None`: deleted, so
    /// only its name label, as a rebuild gives a namespace its pods or
    /// policies still name; one nothing names stays in the model unused).
    fn apply_namespace(
        &mut self,
        name: &str,
        object: Option<&k8s_openapi::api::core::v1::Namespace>,
    ) -> Invalidation {
        let id = self.model.namespace_id(name);
        let model = object
            .and_then(NamespaceModel::from_object)
            .unwrap_or_else(|| NamespaceModel::implicit(name));
        let mut invalidation = Invalidation::default();
        if self.model.namespaces[id as usize].labels != model.labels
            || self.model.namespaces[id as usize].defined != model.defined
        {
            self.model.namespaces[id as usize] = model;
            self.reselect(id);
            // Explanations read every namespace's labels ("matches no
            // namespace"): every cached one may change.
            invalidation.all = true;
        }
        invalidation
    }

    /// Recomputes the selections of namespace `id`'s identities.
    fn reselect(&mut self, id: u32) {
        let keys: Vec<(LabelSet, bool, u32)> = self
            .identity_index
            .iter()
            .filter(|((ns, _, _), _)| *ns == id)
            .map(|((_, labels, host), identity)| (labels.clone(), *host, *identity))
            .collect();
        for (labels, host, identity) in keys {
            self.identities[identity as usize] = self.selection(id, &labels, host);
        }
    }

    /// NetworkPolicy `namespace/name` is now `compiled` (`None`: deleted).
    fn apply_policy(
        &mut self,
        namespace: &str,
        name: &str,
        compiled: Option<CompiledPolicy>,
    ) -> Invalidation {
        let reference = compiled
            .as_ref()
            .map(|c| c.reference.clone())
            .unwrap_or_else(|| PolicyRef::network_policy(namespace, name));
        let at = self
            .policies
            .binary_search_by(|p| p.reference.cmp(&reference));
        // Indices at or after `from` move by `shift`.
        let (from, shift): (u32, i64) = match (at, compiled) {
            (Ok(i), Some(c)) => {
                self.policies[i] = c;
                (u32::MAX, 0)
            }
            (Ok(i), None) => {
                self.policies.remove(i);
                (i as u32, -1)
            }
            (Err(i), Some(c)) => {
                self.policies.insert(i, c);
                (i as u32, 1)
            }
            (Err(_), None) => return Invalidation::default(),
        };
        if shift != 0 {
            for identity in &mut self.identities {
                for list in [&mut identity.ingress, &mut identity.egress] {
                    // A removed policy's own index goes with it below.
                    list.retain(|&p| !(shift < 0 && p == from));
                    for p in list.iter_mut().filter(|p| **p >= from) {
                        *p = (i64::from(*p) + shift) as u32;
                    }
                }
            }
            self.policies_by_namespace.clear();
            for (i, p) in self.policies.iter().enumerate() {
                self.policies_by_namespace
                    .entry(p.reference.namespace_or_empty().to_string())
                    .or_default()
                    .push(i as u32);
            }
        }
        let mut invalidation = Invalidation::default();
        invalidation.all |= !self
            .model
            .namespace_index
            .contains_key(reference.namespace_or_empty());
        let ns = self.model.namespace_id(reference.namespace_or_empty());
        self.reselect(ns);
        invalidation
            .namespaces
            .insert(reference.namespace_or_empty().to_owned());
        invalidation.all |= self.refresh_cache_keys();
        invalidation
    }

    /// The cluster policies are now `cluster` (nodes included): every
    /// identity's cluster selections are recomputed (their NetworkPolicy
    /// selections do not change).
    fn apply_cluster_policies(&mut self, cluster: ClusterPolicies) {
        self.cluster = cluster;
        for ((namespace, labels, host), &id) in &self.identity_index {
            let ns = &self.model.namespaces[*namespace as usize];
            let (ingress, egress) = self.cluster.selecting(ns, labels, *host);
            let identity = &mut self.identities[id as usize];
            identity.cluster_ingress = ingress;
            identity.cluster_egress = egress;
        }
        self.refresh_cache_keys();
    }

    /// Recomputes what verdicts are keyed by, which may change with the
    /// policies; returns whether it changed.
    fn refresh_cache_keys(&mut self) -> bool {
        let ip_sensitive = (self.options.ipblock_matches_pods
            && self.policies.iter().any(CompiledPolicy::has_ip_blocks))
            || self.cluster.uses_addresses();
        let named_ports_used = self.policies.iter().any(CompiledPolicy::has_named_ports)
            || self.cluster.uses_named_ports();
        let changed =
            ip_sensitive != self.ip_sensitive || named_ports_used != self.named_ports_used;
        self.ip_sensitive = ip_sensitive;
        self.named_ports_used = named_ports_used;
        changed
    }
}

/// The namespace of a changed namespaced object, as the engine files it.
/// The pod slots whose Calico endpoint a batch may have changed.
#[derive(Default)]
struct CalicoEndpointChanges<'s> {
    /// Slots a pod left, with its namespace (emptied unless a pod took
    /// them again).
    emptied: Vec<(u32, &'s str)>,
    /// Slots with a pod, as the snapshot has it now.
    pods: Vec<(u32, &'s PodRecord)>,
    /// Namespaces whose labels or Services changed: every pod of them.
    namespaces: Vec<String>,
}

impl<'s> CalicoEndpointChanges<'s> {
    fn pod(
        &mut self,
        namespace: &'s str,
        before: Option<u32>,
        after: Option<(u32, &'s PodRecord)>,
    ) {
        // A pod back in its own slot is compared with what it was.
        if let Some(slot) = before.filter(|&b| after.is_none_or(|(a, _)| a != b)) {
            self.emptied.push((slot, namespace));
        }
        self.pods.extend(after);
    }

    fn namespace(&mut self, name: &str) {
        if !self.namespaces.iter().any(|n| n == name) {
            self.namespaces.push(name.to_owned());
        }
    }
}

impl PolicyEngine {
    /// Brings Calico's side up to date after a batch: its policies when
    /// they were compiled again, and the endpoints of the pods the batch
    /// reached. A changed endpoint (service account, Services, ports,
    /// namespace labels) changes the verdicts with an end in its
    /// namespace, even when the pod keeps its identity.
    fn apply_calico(
        &mut self,
        snapshot: &ClusterSnapshot,
        changes: CalicoEndpointChanges<'_>,
        policies: Option<CalicoPolicyUpdate>,
    ) -> Invalidation {
        let mut invalidation = Invalidation::default();
        let Some(calico) = self.calico.as_deref_mut() else {
            return invalidation;
        };
        if let Some(update) = policies {
            let keyed_by_source_ports = self.source_ports_used;
            match update {
                CalicoPolicyUpdate::InPlace {
                    prepared,
                    namespaces,
                    global,
                } => {
                    calico.enforced.apply(prepared);
                    invalidation.all |= global;
                    invalidation.namespaces.extend(namespaces);
                }
                CalicoPolicyUpdate::Recompiled(sets) => {
                    calico.replace_policies(sets);
                    invalidation.all = true;
                }
                CalicoPolicyUpdate::Gone => {}
            }
            // Verdict keys carry source ports only while a rule names them.
            self.source_ports_used = calico.uses_source_ports();
            invalidation.all |= self.source_ports_used != keyed_by_source_ports;
        }
        // Each namespace's labels and Services once a batch.
        let mut namespaces: HashMap<String, (Labels, NamespaceServices<'_>)> = HashMap::new();
        let mut context = |ns: &str| {
            namespaces
                .entry(ns.to_owned())
                .or_insert_with(|| {
                    (
                        namespace_labels(snapshot, ns),
                        NamespaceServices::of(snapshot, ns),
                    )
                })
                .clone()
        };
        for &(slot, ns) in &changes.emptied {
            if !changes.pods.iter().any(|(s, _)| *s == slot) {
                calico.set_endpoint(slot, CalicoEndpoint::default());
            }
            // Its identity may live on in other pods, and a new pod of it
            // may take its address with another service account.
            invalidation.namespaces.insert(ns.to_owned());
        }
        for (slot, pod) in changes.pods {
            let ns = pod.namespace();
            let (labels, services) = context(ns);
            if calico.set_endpoint(slot, endpoint_in(pod, labels, &services)) {
                invalidation.namespaces.insert(ns.to_owned());
            }
        }
        // A namespace's pods keep what is theirs (labels, address, ports,
        // service account): only the namespace's part is computed again.
        for ns in &changes.namespaces {
            let Some(slots) = self.model.pod_index.get(ns.as_str()) else {
                continue;
            };
            let (labels, services) = context(ns);
            for &slot in slots.values() {
                let Some(old) = calico.endpoints.get(slot as usize) else {
                    continue;
                };
                let mut endpoint = old.clone();
                endpoint.namespace_labels = labels.clone();
                endpoint.services = service_backings(&services, &endpoint.labels, &endpoint);
                if calico.set_endpoint(slot, endpoint) {
                    invalidation.namespaces.insert(ns.clone());
                }
            }
        }
        invalidation
    }
}

fn namespace_of_change(change: &Change) -> &str {
    if change.namespace.is_empty() {
        "default"
    } else {
        &change.namespace
    }
}
