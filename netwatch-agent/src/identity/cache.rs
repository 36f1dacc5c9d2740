//! The identity cache: IP -> pod, service, node or reserved identity, as of a
//! given time.
//!
//! Built from [`ClusterSnapshot`]s. Each [`IdentityCache::update`] diffs the
//! new snapshot against what the cache held: pods that vanish, or whose IP
//! changes, are kept as tombstones for a grace period so flows reported late
//! still name them, and every IP keeps the history of the pods that held it
//! (its tenures) so a flow is attributed to the pod that held the IP at the
//! flow's time, not to whoever holds it now.
//!
//! Only the fields resolution needs are kept ([`PodIdentity`],
//! [`ServiceIdentity`]), so the cache stays small next to the snapshot.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    fmt,
    net::IpAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use netwatch_common::{IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

use super::endpoint::{Endpoint, ReservedIdentity, ServiceRef, Workload};
use crate::cluster::{Change, ChangeKind, ClusterSnapshot, LabelSet, PodRecord};

/// How long a vanished pod (or a pod's released IP) still resolves.
pub const DEFAULT_TOMBSTONE_GRACE: Duration = Duration::from_secs(5 * 60);

/// Ceiling on tombstones kept at once, whatever the churn: past it the
/// oldest go first, so a pathological delete storm cannot grow memory without
/// bound.
pub const DEFAULT_MAX_TOMBSTONES: usize = 100_000;

/// The label the Deployment controller puts on its ReplicaSets' pods; the
/// ReplicaSet is named `<deployment>-<pod-template-hash>`.
const POD_TEMPLATE_HASH: &str = "pod-template-hash";

/// Labels left out of the numeric identity, as Cilium's default label filter
/// does: they differ per rollout or per pod, and would give every pod of one
/// workload its own identity.
const IDENTITY_EXCLUDED_LABELS: &[&str] = &[
    POD_TEMPLATE_HASH,
    "controller-revision-hash",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "job-name",
    "controller-uid",
    "batch.kubernetes.io/job-name",
    "batch.kubernetes.io/controller-uid",
    "batch.kubernetes.io/job-completion-index",
];

/// The smallest numeric identity a pod gets; below are Cilium's reserved ones.
const MIN_POD_IDENTITY: u32 = 256;
/// The largest: Cilium's cluster-scoped identities stay below 2^24 (higher
/// ones are node-local CIDR identities).
const MAX_POD_IDENTITY: u32 = 0x00FF_FFFF;

/// How the cache is set up.
#[derive(Clone, Debug)]
pub struct IdentityConfig {
    /// The node this agent runs on (`spec.nodeName`), so its addresses
    /// resolve to `host` and other nodes' to `remote-node`.
    pub node_name: Option<String>,
    /// This node's own addresses, for when the snapshot has no Node object
    /// for it (standalone manifests). They resolve to `host`.
    pub local_node_ips: Vec<IpAddr>,
    /// How long vanished pods and released IPs still resolve.
    pub tombstone_grace: Duration,
    /// At most this many tombstones at once; the oldest go first.
    pub max_tombstones: usize,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            node_name: None,
            local_node_ips: Vec::new(),
            tombstone_grace: DEFAULT_TOMBSTONE_GRACE,
            max_tombstones: DEFAULT_MAX_TOMBSTONES,
        }
    }
}

/// A container port, for named-port resolution.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerPortInfo {
    pub name: Option<String>,
    pub port: u16,
    /// IP protocol number (6 TCP, 17 UDP, 132 SCTP).
    pub protocol: u8,
}

/// A container of a pod and its runtime ID (from `status.containerStatuses`,
/// without the `containerd://` prefix), to name the container a cgroup
/// belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerInfo {
    pub name: String,
    pub id: Option<String>,
}

/// What the cache keeps of a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodIdentity {
    /// `metadata.uid`; empty for manifest pods written without one.
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// The pod record's set, shared with the policy model.
    pub labels: LabelSet,
    /// Stable numeric identity from namespace and labels (see
    /// [`pod_identity_number`]).
    pub identity: u32,
    pub workload: Option<Workload>,
    pub node_name: Option<String>,
    pub host_network: bool,
    pub ips: Vec<IpAddr>,
    pub container_ports: Vec<ContainerPortInfo>,
    pub containers: Vec<ContainerInfo>,
    /// `status.phase`: Pending, Running, Succeeded, Failed, Unknown.
    pub phase: Option<String>,
    /// The pod's `Ready` condition is `True`.
    pub ready: bool,
    pub created: Option<SystemTime>,
    pub started: Option<SystemTime>,
    pub deletion: Option<SystemTime>,
}

impl PodIdentity {
    /// The flow-record endpoint for this pod at `ip` and `port`.
    pub fn endpoint(&self, ip: Option<IpAddr>, port: Option<u16>) -> Endpoint {
        Endpoint {
            identity: self.identity,
            namespace: self.namespace.as_str().into(),
            labels: self.endpoint_labels().into(),
            pod_name: self.name.as_str().into(),
            workloads: self.workload.iter().cloned().collect(),
            node_name: self.node_name.as_deref().unwrap_or_default().into(),
            ip,
            port,
            pod_uid: self.uid.as_str().into(),
            ..Endpoint::default()
        }
    }

    /// Hubble-style labels: `k8s:key=value` for each pod label plus
    /// `k8s:io.kubernetes.pod.namespace=<ns>`, sorted.
    pub fn endpoint_labels(&self) -> Vec<String> {
        let mut labels: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("k8s:{k}={v}"))
            .chain(std::iter::once(format!(
                "k8s:io.kubernetes.pod.namespace={}",
                self.namespace
            )))
            .collect();
        labels.sort_unstable();
        labels
    }

    /// The name of the container with this runtime ID.
    pub fn container_name(&self, container_id: &str) -> Option<&str> {
        self.containers
            .iter()
            .find(|c| c.id.as_deref() == Some(container_id))
            .map(|c| c.name.as_str())
    }

    /// Whether the pod holds its IPs: it has its own network namespace and
    /// has not finished (a Succeeded or Failed pod keeps `status.podIPs` but
    /// its IP is free for reuse).
    pub fn holds_ips(&self) -> bool {
        !self.host_network && !matches!(self.phase.as_deref(), Some("Succeeded" | "Failed"))
    }

    /// The key the cache files the pod under: its UID, or `namespace/name`
    /// for manifest pods without one.
    fn key(&self) -> String {
        if self.uid.is_empty() {
            format!("{}/{}", self.namespace, self.name)
        } else {
            self.uid.clone()
        }
    }
}

/// A service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortInfo {
    pub name: Option<String>,
    pub port: u16,
    /// IP protocol number (6 TCP, 17 UDP, 132 SCTP).
    pub protocol: u8,
}

/// What the cache keeps of a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceIdentity {
    pub service: ServiceRef,
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePortInfo>,
    /// `spec.selector`; `None` for services whose endpoints are managed by
    /// hand.
    pub selector: Option<BTreeMap<String, String>>,
    /// `spec.type`: ClusterIP, NodePort, LoadBalancer, ExternalName.
    pub service_type: String,
}

impl ServiceIdentity {
    /// Whether this is `default/kubernetes`, the API server's service.
    pub fn is_kube_apiserver(&self) -> bool {
        self.service.namespace == "default" && self.service.name == "kubernetes"
    }

    /// The flow-record endpoint for this service's cluster IP: the service
    /// and its namespace. The backend is unknown before DNAT, so the
    /// identity stays 0 (Cilium's `unknown`), except for the API server's
    /// service, which is `kube-apiserver`.
    pub fn endpoint(&self, ip: IpAddr, port: Option<u16>) -> Endpoint {
        let mut endpoint = if self.is_kube_apiserver() {
            Endpoint::reserved(ReservedIdentity::KubeApiserver, None, ip, port)
        } else {
            Endpoint::unresolved(ip, port)
        };
        endpoint.namespace = self.service.namespace.as_str().into();
        endpoint.with_service(self.service.clone())
    }

    fn port(&self, port: u16, protocol: u8) -> Option<&ServicePortInfo> {
        self.ports
            .iter()
            .find(|p| p.port == port && p.protocol == protocol)
    }
}

/// Whether a service can take connections: the answer to "why was this
/// connect refused?".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceReadiness {
    /// At least one endpoint is ready.
    Ready { service: ServiceRef, ready: usize },
    /// Endpoints exist or are expected, none is ready (e.g. every pod fails
    /// its readiness probe, or no pod matches the selector).
    NoReadyEndpoints {
        service: ServiceRef,
        not_ready: usize,
    },
    /// The service has neither a selector nor EndpointSlices: its endpoints
    /// are not known to netwatch.
    Unknown { service: ServiceRef },
}

impl ServiceReadiness {
    /// Whether the service has no ready endpoint for sure.
    pub fn has_no_ready_endpoints(&self) -> bool {
        matches!(self, ServiceReadiness::NoReadyEndpoints { .. })
    }

    pub fn service(&self) -> &ServiceRef {
        match self {
            ServiceReadiness::Ready { service, .. }
            | ServiceReadiness::NoReadyEndpoints { service, .. }
            | ServiceReadiness::Unknown { service } => service,
        }
    }
}

impl fmt::Display for ServiceReadiness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServiceReadiness::Ready { service, ready } => {
                let s = if *ready == 1 { "" } else { "s" };
                write!(f, "service {service} has {ready} ready endpoint{s}")
            }
            ServiceReadiness::NoReadyEndpoints { service, .. } => {
                write!(f, "service {service} has no ready endpoints")
            }
            ServiceReadiness::Unknown { service } => write!(
                f,
                "service {service} has no selector and no EndpointSlices; its endpoints are unknown"
            ),
        }
    }
}

/// What an IP is, at a given time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpResolution<'a> {
    /// The pod that held the IP then (live or tombstoned).
    Pod(&'a PodIdentity),
    /// A service's cluster IP (a flow seen before DNAT).
    Service(&'a ServiceIdentity),
    /// A node, the API server, or the world; `node_name` for node addresses.
    Reserved {
        identity: ReservedIdentity,
        node_name: Option<&'a str>,
    },
}

impl IpResolution<'_> {
    /// The flow-record endpoint for this resolution at `ip` and `port`.
    pub fn to_endpoint(&self, ip: IpAddr, port: Option<u16>) -> Endpoint {
        match self {
            IpResolution::Pod(pod) => pod.endpoint(Some(ip), port),
            IpResolution::Service(service) => service.endpoint(ip, port),
            IpResolution::Reserved {
                identity,
                node_name,
            } => Endpoint::reserved(*identity, *node_name, ip, port),
        }
    }
}

/// One pod's hold on one IP: from `start` until `end` (open while it holds it).
#[derive(Clone, Debug)]
struct Tenure {
    pod: Arc<PodIdentity>,
    key: String,
    start: SystemTime,
    end: Option<SystemTime>,
    /// When a closed tenure is forgotten.
    expires: Option<SystemTime>,
}

impl Tenure {
    fn covers(&self, at: SystemTime) -> bool {
        self.start <= at && self.end.is_none_or(|end| at < end)
    }

    /// How far `at` lies outside the tenure (zero inside).
    fn distance(&self, at: SystemTime) -> Duration {
        if at < self.start {
            self.start.duration_since(at).unwrap_or_default()
        } else {
            self.end
                .and_then(|end| at.duration_since(end).ok())
                .unwrap_or_default()
        }
    }
}

/// A live pod, with the resourceVersion it was built from.
#[derive(Clone, Debug)]
struct PodEntry {
    pod: Arc<PodIdentity>,
    resource_version: Option<String>,
    /// The update that last saw it.
    seen: u64,
}

#[derive(Clone, Debug)]
struct Tombstone {
    pod: Arc<PodIdentity>,
    expires: SystemTime,
}

#[derive(Clone, Debug)]
enum Expiring {
    Pod(String),
    Tenure { ip: IpAddr, key: String },
}

/// An EndpointSlice reduced to what readiness needs.
#[derive(Clone, Debug)]
struct SliceSummary {
    /// The slice's own name.
    name: String,
    /// `addressType`: IPv4, IPv6 or FQDN.
    address_type: String,
    /// Port names (with protocol) the slice serves; `None` or empty: all.
    ports: Option<Vec<(Option<String>, u8)>>,
    ready: usize,
    not_ready: usize,
}

/// Pod, service and node identities by IP, with history. See the module
/// docs.
///
/// ```no_run
/// # use std::time::SystemTime;
/// # use netwatch::{cluster::ClusterSnapshot, identity::{IdentityCache, IdentityConfig}};
/// let mut cache = IdentityCache::new(IdentityConfig {
///     node_name: Some("node-a".into()),
///     ..IdentityConfig::default()
/// });
/// # let snapshot = ClusterSnapshot::default();
/// cache.update(&snapshot, SystemTime::now()); // on every new snapshot
/// let ip = "10.0.1.7".parse().unwrap();
/// let endpoint = cache.endpoint(ip, Some(8080), SystemTime::now()); // per new flow
/// cache.expire(SystemTime::now()); // every few seconds
/// ```
#[derive(Debug, Default)]
pub struct IdentityCache {
    config: IdentityConfig,
    /// Live pods by key (UID, or `namespace/name` without one).
    pods: HashMap<String, PodEntry>,
    /// Bumped by every update, to find the pods a snapshot no longer has.
    generation: u64,
    /// Live pods by namespace, then name.
    pods_by_name: HashMap<String, HashMap<String, Arc<PodIdentity>>>,
    /// Pods that vanished, by key, until they expire.
    tombstones: HashMap<String, Tombstone>,
    /// Every pod IP's tenures, oldest first.
    tenures: HashMap<IpAddr, Vec<Tenure>>,
    /// The live pods holding each address (keys into `pods`): who holds
    /// an address is settled from these, without a scan of every pod.
    claims: HashMap<IpAddr, Vec<String>>,
    /// Keys of the live hostNetwork pods, whose addresses name their
    /// nodes: a node refresh reads these, not every pod.
    host_network_pods: std::collections::BTreeSet<String>,
    /// Tombstones and closed tenures in the order they expire.
    expiry: VecDeque<(SystemTime, Expiring)>,
    namespaces: HashMap<String, BTreeMap<String, String>>,
    services: HashMap<ServiceRef, Arc<ServiceIdentity>>,
    services_by_ip: HashMap<IpAddr, Arc<ServiceIdentity>>,
    slices: HashMap<ServiceRef, Vec<SliceSummary>>,
    /// (namespace, slice name) -> the service it serves.
    slice_service: HashMap<(String, String), ServiceRef>,
    /// API server addresses (from `default/kubernetes`'s EndpointSlices) and
    /// their ports.
    apiserver: HashMap<IpAddr, Vec<u16>>,
    node_ips: HashMap<IpAddr, String>,
}

impl IdentityCache {
    /// An empty cache; feed it with [`update`](Self::update).
    pub fn new(config: IdentityConfig) -> Self {
        IdentityCache {
            config,
            ..IdentityCache::default()
        }
    }

    pub fn config(&self) -> &IdentityConfig {
        &self.config
    }

    /// Brings the cache to `snapshot`, observed at `now`.
    ///
    /// Pods missing from the snapshot become tombstones; IPs a pod no longer
    /// holds end its tenure (at the pod's `deletionTimestamp` when that is
    /// earlier than `now`); expired tombstones are dropped.
    pub fn update(&mut self, snapshot: &ClusterSnapshot, now: SystemTime) {
        self.namespaces = snapshot
            .namespaces
            .iter()
            .filter_map(|ns| {
                let name = ns.metadata.name.clone()?;
                Some((name, ns.metadata.labels.clone().unwrap_or_default()))
            })
            .collect();

        let owners = Owners::from_snapshot(snapshot);
        self.update_pods(&snapshot.pods, &owners, now);
        self.update_services(snapshot);
        self.update_nodes(snapshot);
        self.expire(now);
    }

    fn update_pods(&mut self, snapshot_pods: &[PodRecord], owners: &Owners<'_>, now: SystemTime) {
        let grace = self.config.tombstone_grace;
        self.generation += 1;
        let generation = self.generation;

        // Refresh the live pods. An object whose resourceVersion is unchanged
        // is the same object: keep its identity and only re-derive the
        // workload (its ReplicaSet or Job may have arrived since), so a
        // steady cluster costs a lookup per pod, not a rebuild.
        let mut changed: Vec<Arc<PodIdentity>> = Vec::new();
        for pod in snapshot_pods {
            let Some(name) = pod.name() else {
                continue;
            };
            let key: Cow<'_, str> = match pod.uid() {
                "" => Cow::Owned(format!("{}/{name}", pod.namespace())),
                uid => Cow::Borrowed(uid),
            };
            let version = pod.resource_version();
            if let Some(entry) = self.pods.get_mut(key.as_ref())
                && version.is_some()
                && entry.resource_version.as_deref() == version
            {
                entry.seen = generation;
                let workload = owners.workload_of(pod);
                let current = entry
                    .pod
                    .workload
                    .as_ref()
                    .map(|w| (w.name.as_str(), w.kind.as_str()));
                if workload != current {
                    let mut refreshed = PodIdentity::clone(&entry.pod);
                    refreshed.workload = workload.map(owned_workload);
                    entry.pod = Arc::new(refreshed);
                    changed.push(Arc::clone(&entry.pod));
                }
                continue;
            }
            let Some(identity) = pod_identity(pod, owners) else {
                continue;
            };
            let identity = Arc::new(identity);
            changed.push(Arc::clone(&identity));
            self.insert_pod(
                key.into_owned(),
                PodEntry {
                    pod: identity,
                    resource_version: version.map(str::to_owned),
                    seen: generation,
                },
            );
        }

        // Vanished pods become tombstones.
        let vanished: Vec<String> = self
            .pods
            .iter()
            .filter(|(_, entry)| entry.seen != generation)
            .map(|(key, _)| key.clone())
            .collect();
        for key in vanished {
            let Some(entry) = self.remove_pod(&key) else {
                continue;
            };
            let old = entry.pod;
            if let Some(names) = self.pods_by_name.get_mut(&old.namespace) {
                if names.get(&old.name).is_some_and(|p| Arc::ptr_eq(p, &old)) {
                    names.remove(&old.name);
                }
                if names.is_empty() {
                    self.pods_by_name.remove(&old.namespace);
                }
            }
            let expires = now + grace;
            self.expiry.push_back((expires, Expiring::Pod(key.clone())));
            self.tombstones.insert(key, Tombstone { pod: old, expires });
        }
        for pod in changed {
            self.tombstones.remove(&pod.key());
            self.pods_by_name
                .entry(pod.namespace.clone())
                .or_default()
                .insert(pod.name.clone(), pod);
        }

        // Which pod holds each IP now (see `holder`).
        let ips: HashSet<IpAddr> = self
            .tenures
            .keys()
            .chain(self.claims.keys())
            .copied()
            .collect();
        for ip in ips {
            let holder = self.holder(ip);
            self.settle_tenures(ip, holder, now);
        }
    }

    /// Files a live pod under `key` (replacing the object there), and its
    /// addresses under it.
    fn insert_pod(&mut self, key: String, entry: PodEntry) {
        if let Some(old) = self.pods.remove(&key) {
            self.unclaim(&key, &old.pod);
        }
        if entry.pod.host_network {
            self.host_network_pods.insert(key.clone());
        } else {
            self.host_network_pods.remove(&key);
        }
        if entry.pod.holds_ips() {
            for ip in &entry.pod.ips {
                let claims = self.claims.entry(*ip).or_default();
                if !claims.contains(&key) {
                    claims.push(key.clone());
                }
            }
        }
        self.pods.insert(key, entry);
    }

    /// Forgets the live pod under `key`, and its address claims.
    fn remove_pod(&mut self, key: &str) -> Option<PodEntry> {
        let entry = self.pods.remove(key)?;
        self.unclaim(key, &entry.pod);
        self.host_network_pods.remove(key);
        Some(entry)
    }

    fn unclaim(&mut self, key: &str, pod: &PodIdentity) {
        for ip in &pod.ips {
            if let Some(claims) = self.claims.get_mut(ip) {
                claims.retain(|k| k != key);
                if claims.is_empty() {
                    self.claims.remove(ip);
                }
            }
        }
    }

    /// The live pod holding `ip`. Two live pods claiming one IP is a
    /// transient of the API (the old one not yet marked finished): the one
    /// that started last holds it; a tie goes to the smaller key, so a
    /// rebuild and a change agree.
    fn holder(&self, ip: IpAddr) -> Option<(String, Arc<PodIdentity>)> {
        let mut best: Option<(&String, &Arc<PodIdentity>)> = None;
        for key in self.claims.get(&ip)? {
            let Some(entry) = self.pods.get(key) else {
                continue;
            };
            let pod = &entry.pod;
            let replace = best.is_none_or(|(best_key, other)| {
                (pod_start(other), std::cmp::Reverse(best_key))
                    < (pod_start(pod), std::cmp::Reverse(key))
            });
            if replace {
                best = Some((key, pod));
            }
        }
        best.map(|(key, pod)| (key.clone(), Arc::clone(pod)))
    }

    /// Closes the tenure of a pod that no longer holds `ip`, refreshes the
    /// holder's, or opens one for a new holder.
    fn settle_tenures(
        &mut self,
        ip: IpAddr,
        holder: Option<(String, Arc<PodIdentity>)>,
        now: SystemTime,
    ) {
        let grace = self.config.tombstone_grace;
        let pods = &self.pods;
        let tenures = self.tenures.entry(ip).or_default();
        let mut held = false;
        for tenure in tenures.iter_mut().filter(|t| t.end.is_none()) {
            match &holder {
                Some((key, pod)) if *key == tenure.key => {
                    held = true;
                    if !Arc::ptr_eq(&tenure.pod, pod) {
                        tenure.pod = Arc::clone(pod);
                    }
                }
                _ => {
                    let last_seen = pods.get(&tenure.key).map_or(&tenure.pod, |e| &e.pod);
                    let end = last_seen
                        .deletion
                        .map_or(now, |d| d.min(now))
                        .max(tenure.start);
                    let expires = now + grace;
                    tenure.pod = Arc::clone(last_seen);
                    tenure.end = Some(end);
                    tenure.expires = Some(expires);
                    self.expiry.push_back((
                        expires,
                        Expiring::Tenure {
                            ip,
                            key: tenure.key.clone(),
                        },
                    ));
                }
            }
        }
        if let Some((key, pod)) = holder.filter(|_| !held) {
            // The cache may see a pod well after it got its IP; flows from
            // that gap belong to it, so its tenure starts at the pod's own
            // start time when that is earlier. An overlap with the previous
            // holder's tenure resolves to the previous holder (oldest first).
            let start = pod_start(&pod).map_or(now, |s| s.min(now));
            tenures.push(Tenure {
                pod,
                key,
                start,
                end: None,
                expires: None,
            });
            tenures.sort_by_key(|t| t.start);
        }
        if tenures.is_empty() {
            self.tenures.remove(&ip);
        }
    }

    fn update_services(&mut self, snapshot: &ClusterSnapshot) {
        let mut services = HashMap::with_capacity(snapshot.services.len());
        let mut by_ip = HashMap::with_capacity(snapshot.services.len());
        for svc in &snapshot.services {
            let Some(identity) = service_identity(svc) else {
                continue;
            };
            let identity = Arc::new(identity);
            for ip in &identity.cluster_ips {
                by_ip.insert(*ip, Arc::clone(&identity));
            }
            services.insert(identity.service.clone(), identity);
        }

        let mut slices: HashMap<ServiceRef, Vec<SliceSummary>> = HashMap::new();
        let mut slice_service = HashMap::new();
        let mut apiserver: HashMap<IpAddr, Vec<u16>> = HashMap::new();
        for slice in &snapshot.endpoint_slices {
            let Some((service, summary)) = slice_summary(slice) else {
                continue;
            };
            if is_apiserver(&service) {
                add_apiserver(&mut apiserver, slice);
            }
            slice_service.insert(
                (service.namespace.clone(), summary.name.clone()),
                service.clone(),
            );
            slices.entry(service).or_default().push(summary);
        }
        self.services = services;
        self.services_by_ip = by_ip;
        self.slices = slices;
        self.slice_service = slice_service;
        self.apiserver = apiserver;
    }

    /// Brings one service (`namespace/name`) to what `snapshot` has.
    fn apply_service(&mut self, snapshot: &ClusterSnapshot, change: &Change) {
        let Some(name) = change.name.as_deref() else {
            return;
        };
        let reference = ServiceRef {
            namespace: change_namespace(change).to_owned(),
            name: name.to_owned(),
        };
        if let Some(old) = self.services.remove(&reference) {
            for ip in &old.cluster_ips {
                if self
                    .services_by_ip
                    .get(ip)
                    .is_some_and(|s| Arc::ptr_eq(s, &old))
                {
                    self.services_by_ip.remove(ip);
                }
            }
        }
        let found = change.locate(&snapshot.services, |s| &s.metadata);
        if let Some(identity) = found.and_then(service_identity) {
            let identity = Arc::new(identity);
            for ip in &identity.cluster_ips {
                self.services_by_ip.insert(*ip, Arc::clone(&identity));
            }
            self.services.insert(reference, identity);
        }
    }

    /// Brings one EndpointSlice (`namespace/name`) to what `snapshot` has.
    fn apply_endpoint_slice(&mut self, snapshot: &ClusterSnapshot, change: &Change) {
        let Some(name) = change.name.as_deref() else {
            return;
        };
        let key = (change_namespace(change).to_owned(), name.to_owned());
        let mut apiserver_changed = false;
        if let Some(service) = self.slice_service.remove(&key) {
            apiserver_changed |= is_apiserver(&service);
            if let Some(list) = self.slices.get_mut(&service) {
                list.retain(|s| s.name != name);
                if list.is_empty() {
                    self.slices.remove(&service);
                }
            }
        }
        let found = change.locate(&snapshot.endpoint_slices, |s| &s.metadata);
        if let Some((service, summary)) = found.and_then(slice_summary) {
            apiserver_changed |= is_apiserver(&service);
            self.slice_service.insert(key, service.clone());
            self.slices.entry(service).or_default().push(summary);
        }
        if apiserver_changed {
            let mut apiserver = HashMap::new();
            for slice in &snapshot.endpoint_slices {
                if slice_summary(slice).is_some_and(|(service, _)| is_apiserver(&service)) {
                    add_apiserver(&mut apiserver, slice);
                }
            }
            self.apiserver = apiserver;
        }
    }

    /// Applies the changes `snapshot` records since the cache last saw it,
    /// object by object: pods, services, EndpointSlices, namespaces, nodes
    /// and pod owners. The result is what [`update`](Self::update) with
    /// the same snapshot would give. Returns `false`, having changed
    /// nothing, when a change is not one it applies (a re-list): call
    /// `update` then.
    pub fn apply_changes(
        &mut self,
        snapshot: &ClusterSnapshot,
        changes: &[&Change],
        now: SystemTime,
    ) -> bool {
        if changes.iter().any(|c| c.is_relist()) {
            return false;
        }
        // Pods of a changed ReplicaSet or Job, as changes of their own.
        let mut owned: Vec<Change> = Vec::new();
        let mut pods: Vec<&Change> = Vec::new();
        let mut nodes = false;
        for change in changes {
            match change.kind {
                ChangeKind::Pod => pods.push(change),
                ChangeKind::Service => self.apply_service(snapshot, change),
                ChangeKind::EndpointSlice => self.apply_endpoint_slice(snapshot, change),
                ChangeKind::Namespace => {
                    let name = change.name.as_deref().unwrap_or_default();
                    let found = change.locate(&snapshot.namespaces, |n| &n.metadata);
                    match found {
                        Some(ns) => {
                            self.namespaces.insert(
                                name.to_owned(),
                                ns.metadata.labels.clone().unwrap_or_default(),
                            );
                        }
                        None => {
                            self.namespaces.remove(name);
                        }
                    }
                }
                ChangeKind::Node => nodes = true,
                ChangeKind::PodOwner => {
                    // The pods it controls may name another workload now.
                    let owner = change.name.as_deref().unwrap_or_default();
                    let namespace = change_namespace(change);
                    for (i, pod) in snapshot.pods.iter().enumerate() {
                        if pod.namespace() == namespace
                            && pod.owner().is_some_and(|o| o.name == owner)
                            && let Some(name) = pod.name()
                        {
                            owned.push(Change {
                                kind: ChangeKind::Pod,
                                namespace: namespace.to_owned(),
                                name: Some(name.to_owned()),
                                position: Some(i),
                            });
                        }
                    }
                }
                ChangeKind::Workload => {}
                ChangeKind::NetworkPolicy
                | ChangeKind::ClusterPolicy
                | ChangeKind::Calico
                | ChangeKind::Other => {}
            }
        }
        pods.extend(owned.iter());
        if !pods.is_empty() {
            nodes |= self.apply_pods(snapshot, &pods, now);
        }
        if nodes {
            self.update_nodes(snapshot);
        }
        self.expire(now);
        true
    }

    /// Brings the pods `changes` name to what `snapshot` has, as
    /// `update_pods` would; returns whether a hostNetwork pod changed (the
    /// node addresses then need a refresh).
    fn apply_pods(
        &mut self,
        snapshot: &ClusterSnapshot,
        changes: &[&Change],
        now: SystemTime,
    ) -> bool {
        let grace = self.config.tombstone_grace;
        let found: Vec<(&Change, Option<&PodRecord>)> = changes
            .iter()
            .map(|c| (*c, c.find_pod(&snapshot.pods)))
            .collect();
        let owners = Owners::for_pods(snapshot, found.iter().filter_map(|(_, p)| *p));
        let mut affected: Vec<IpAddr> = Vec::new();
        let mut host_network = false;
        for (change, pod) in found {
            let namespace = change_namespace(change);
            let name = change.name.as_deref().unwrap_or_default();
            let old = self
                .pods_by_name
                .get(namespace)
                .and_then(|names| names.get(name))
                .cloned();
            let mut current: Option<Arc<PodIdentity>> = None;
            if let Some(pod) = pod {
                let key = match pod.uid() {
                    "" => format!("{namespace}/{name}"),
                    uid => uid.to_owned(),
                };
                let version = pod.resource_version();
                if let Some(entry) = self.pods.get_mut(&key)
                    && version.is_some()
                    && entry.resource_version.as_deref() == version
                {
                    let workload = owners.workload_of(pod);
                    let now_named = entry
                        .pod
                        .workload
                        .as_ref()
                        .map(|w| (w.name.as_str(), w.kind.as_str()));
                    if workload != now_named {
                        let mut refreshed = PodIdentity::clone(&entry.pod);
                        refreshed.workload = workload.map(owned_workload);
                        entry.pod = Arc::new(refreshed);
                    }
                    current = Some(Arc::clone(&entry.pod));
                } else if let Some(identity) = pod_identity(pod, &owners) {
                    let identity = Arc::new(identity);
                    self.insert_pod(
                        key,
                        PodEntry {
                            pod: Arc::clone(&identity),
                            resource_version: version.map(str::to_owned),
                            seen: self.generation,
                        },
                    );
                    current = Some(identity);
                }
            }
            // The previous object under this name, if it is another pod (or
            // gone), vanishes.
            if let Some(old) = &old {
                let key = old.key();
                let replaced = current.as_ref().is_none_or(|c| c.key() != key);
                if replaced && let Some(entry) = self.remove_pod(&key) {
                    if let Some(names) = self.pods_by_name.get_mut(namespace) {
                        names.remove(name);
                        if names.is_empty() {
                            self.pods_by_name.remove(namespace);
                        }
                    }
                    let expires = now + grace;
                    self.expiry.push_back((expires, Expiring::Pod(key.clone())));
                    self.tombstones.insert(
                        key,
                        Tombstone {
                            pod: entry.pod,
                            expires,
                        },
                    );
                }
                host_network |= old.host_network;
                affected.extend(old.ips.iter().copied());
            }
            if let Some(pod) = current {
                self.tombstones.remove(&pod.key());
                host_network |= pod.host_network;
                affected.extend(pod.ips.iter().copied());
                self.pods_by_name
                    .entry(pod.namespace.clone())
                    .or_default()
                    .insert(pod.name.clone(), pod);
            }
        }
        affected.sort_unstable();
        affected.dedup();
        for ip in affected {
            let holder = self.holder(ip);
            self.settle_tenures(ip, holder, now);
        }
        host_network
    }

    fn update_nodes(&mut self, snapshot: &ClusterSnapshot) {
        let mut node_ips = HashMap::new();
        for node in &snapshot.nodes {
            let Some(name) = &node.metadata.name else {
                continue;
            };
            let addresses = node
                .status
                .iter()
                .flat_map(|s| s.addresses.iter().flatten());
            for address in addresses {
                if matches!(address.type_.as_str(), "InternalIP" | "ExternalIP")
                    && let Ok(ip) = address.address.parse::<IpAddr>()
                {
                    node_ips.insert(ip, name.clone());
                }
            }
        }
        // A hostNetwork pod's IP is its node's: this names nodes that have no
        // Node object in the snapshot (standalone manifests).
        for pod in self
            .host_network_pods
            .iter()
            .filter_map(|key| self.pods.get(key))
            .map(|e| &e.pod)
        {
            if let Some(node) = &pod.node_name {
                for ip in &pod.ips {
                    node_ips.entry(*ip).or_insert_with(|| node.clone());
                }
            }
        }
        if let Some(node) = &self.config.node_name {
            for ip in &self.config.local_node_ips {
                node_ips.entry(*ip).or_insert_with(|| node.clone());
            }
        }
        self.node_ips = node_ips;
    }

    /// Forgets tombstones and closed tenures whose grace period is over, and
    /// the oldest ones past [`IdentityConfig::max_tombstones`]. Call it
    /// periodically (every few seconds); [`update`](Self::update) calls it
    /// too.
    pub fn expire(&mut self, now: SystemTime) {
        while let Some((at, _)) = self.expiry.front() {
            if *at > now && self.expiry.len() <= self.config.max_tombstones {
                break;
            }
            let Some((at, what)) = self.expiry.pop_front() else {
                break;
            };
            match what {
                Expiring::Pod(key) => {
                    // Skip entries superseded by a newer tombstone of the same pod.
                    if self.tombstones.get(&key).is_some_and(|t| t.expires == at) {
                        self.tombstones.remove(&key);
                    }
                }
                Expiring::Tenure { ip, key } => {
                    if let Some(tenures) = self.tenures.get_mut(&ip) {
                        tenures.retain(|t| !(t.key == key && t.expires == Some(at)));
                        if tenures.is_empty() {
                            self.tenures.remove(&ip);
                        }
                    }
                }
            }
        }
    }

    /// What `ip` was at time `at`: see [`resolve`](Self::resolve).
    pub fn resolve_ip(&self, ip: IpAddr, at: SystemTime) -> IpResolution<'_> {
        self.resolve(ip, None, at)
    }

    /// What `ip` (and `port`, when known) was at time `at`, in this order:
    ///
    /// 1. the pod that held the IP at `at` (tombstones included). When no
    ///    tenure covers `at` (clock skew between node and API server, a gap
    ///    between holders) the tenure nearest in time wins;
    /// 2. a service's cluster IP;
    /// 3. `kube-apiserver`: the API server's endpoint addresses (on its ports,
    ///    when a port is given);
    /// 4. `host` for this node's addresses, `remote-node` for other nodes';
    /// 5. `world`.
    ///
    /// hostNetwork pods share their node's address, so their IPs resolve to
    /// the node; their sockets resolve to the pod through cgroups instead.
    pub fn resolve(&self, ip: IpAddr, port: Option<u16>, at: SystemTime) -> IpResolution<'_> {
        if let Some(pod) = self.pod_at(ip, at) {
            return IpResolution::Pod(pod);
        }
        if let Some(service) = self.services_by_ip.get(&ip) {
            return IpResolution::Service(service);
        }
        let node_name = self.node_ips.get(&ip).map(String::as_str);
        if let Some(ports) = self.apiserver.get(&ip) {
            let on_apiserver_port = match port {
                Some(port) => ports.is_empty() || ports.contains(&port),
                None => true,
            };
            if on_apiserver_port || node_name.is_none() {
                return IpResolution::Reserved {
                    identity: ReservedIdentity::KubeApiserver,
                    node_name,
                };
            }
        }
        match node_name {
            Some(node) if self.config.node_name.as_deref() == Some(node) => {
                IpResolution::Reserved {
                    identity: ReservedIdentity::Host,
                    node_name: Some(node),
                }
            }
            Some(node) => IpResolution::Reserved {
                identity: ReservedIdentity::RemoteNode,
                node_name: Some(node),
            },
            None => IpResolution::Reserved {
                identity: ReservedIdentity::World,
                node_name: None,
            },
        }
    }

    /// The flow-record endpoint for `ip`:`port` at time `at`
    /// ([`resolve`](Self::resolve) then [`IpResolution::to_endpoint`]).
    pub fn endpoint(&self, ip: IpAddr, port: Option<u16>, at: SystemTime) -> Endpoint {
        self.resolve(ip, port, at).to_endpoint(ip, port)
    }

    /// The pod that held `ip` at `at`, live or tombstoned.
    pub fn pod_at(&self, ip: IpAddr, at: SystemTime) -> Option<&PodIdentity> {
        let tenures = self.tenures.get(&ip)?;
        tenures
            .iter()
            .find(|t| t.covers(at))
            .or_else(|| {
                // Nearest in time; on a tie the later tenure (the current holder).
                tenures.iter().rev().min_by_key(|t| t.distance(at))
            })
            .map(|t| &*t.pod)
    }

    /// A pod by `metadata.uid`, live or tombstoned.
    pub fn pod_by_uid(&self, uid: &str) -> Option<&PodIdentity> {
        self.pods
            .get(uid)
            .map(|e| &e.pod)
            .or_else(|| self.tombstones.get(uid).map(|t| &t.pod))
            .map(|p| &**p)
    }

    /// A live pod by namespace and name (what the policy engine's
    /// `Peer::Pod { namespace, name }` names).
    pub fn pod_by_name(&self, namespace: &str, name: &str) -> Option<&PodIdentity> {
        self.pods_by_name.get(namespace)?.get(name).map(|p| &**p)
    }

    /// The node a live pod runs on.
    pub fn node_name_of(&self, namespace: &str, name: &str) -> Option<&str> {
        self.pod_by_name(namespace, name)?.node_name.as_deref()
    }

    /// Live pods of a namespace.
    pub fn pods_in(&self, namespace: &str) -> impl Iterator<Item = &PodIdentity> {
        self.pods_by_name
            .get(namespace)
            .into_iter()
            .flat_map(|pods| pods.values().map(|p| &**p))
    }

    /// All live pods.
    pub fn pods(&self) -> impl Iterator<Item = &PodIdentity> {
        self.pods.values().map(|e| &*e.pod)
    }

    /// Whether the pod runs on this agent's node.
    pub fn is_local(&self, pod: &PodIdentity) -> bool {
        pod.node_name.is_some() && pod.node_name == self.config.node_name
    }

    /// A namespace's labels (for namespaceSelectors); `None` for a namespace
    /// the snapshot does not have.
    pub fn namespace_labels(&self, namespace: &str) -> Option<&BTreeMap<String, String>> {
        self.namespaces.get(namespace)
    }

    /// A service by namespace and name.
    pub fn service(&self, namespace: &str, name: &str) -> Option<&ServiceIdentity> {
        self.services
            .get(&ServiceRef {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            })
            .map(|s| &**s)
    }

    /// The service whose cluster IP is `ip`. With a port, only when the
    /// service exposes that port and protocol (`protocol` is the IP protocol
    /// number: 6 TCP, 17 UDP, 132 SCTP).
    pub fn service_at(&self, ip: IpAddr, port: Option<(u16, u8)>) -> Option<&ServiceIdentity> {
        let service = self.services_by_ip.get(&ip)?;
        match port {
            Some((port, protocol)) => service.port(port, protocol).map(|_| &**service),
            None => Some(service),
        }
    }

    /// Whether the service at cluster IP `ip` has ready endpoints for
    /// `port`/`protocol`; `None` when `ip` is no service's.
    ///
    /// Counts the ready endpoints of the service's EndpointSlices (of the
    /// IP's family, serving the port); without any slice, the Running pods
    /// matching the selector and their `Ready` condition.
    pub fn service_readiness(
        &self,
        ip: IpAddr,
        port: u16,
        protocol: u8,
    ) -> Option<ServiceReadiness> {
        let service = self.services_by_ip.get(&ip)?;
        Some(self.readiness_of(service, Some(&ip), service.port(port, protocol)))
    }

    /// [`service_readiness`](Self::service_readiness) by name, over all ports.
    pub fn service_readiness_by_name(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<ServiceReadiness> {
        let service = self.services.get(&ServiceRef {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })?;
        Some(self.readiness_of(service, None, None))
    }

    fn readiness_of(
        &self,
        service: &ServiceIdentity,
        ip: Option<&IpAddr>,
        port: Option<&ServicePortInfo>,
    ) -> ServiceReadiness {
        let reference = service.service.clone();
        let (ready, not_ready) = match self.slices.get(&service.service) {
            Some(slices) => {
                let family = ip.map(|ip| if ip.is_ipv4() { "IPv4" } else { "IPv6" });
                slices
                    .iter()
                    .filter(|s| family.is_none_or(|f| s.address_type == f))
                    .filter(|s| match (port, &s.ports) {
                        (Some(port), Some(ports)) if !ports.is_empty() => {
                            ports.iter().any(|(name, protocol)| {
                                *name == port.name && *protocol == port.protocol
                            })
                        }
                        _ => true,
                    })
                    .fold((0, 0), |(r, n), s| (r + s.ready, n + s.not_ready))
            }
            None => match service.selector.as_ref().filter(|s| !s.is_empty()) {
                Some(selector) => self
                    .pods_in(&service.service.namespace)
                    .filter(|pod| selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v)))
                    .filter(|pod| !matches!(pod.phase.as_deref(), Some("Succeeded" | "Failed")))
                    .fold((0, 0), |(r, n), pod| {
                        if pod.ready && pod.phase.as_deref() == Some("Running") {
                            (r + 1, n)
                        } else {
                            (r, n + 1)
                        }
                    }),
                None => return ServiceReadiness::Unknown { service: reference },
            },
        };
        if ready > 0 {
            ServiceReadiness::Ready {
                service: reference,
                ready,
            }
        } else {
            ServiceReadiness::NoReadyEndpoints {
                service: reference,
                not_ready,
            }
        }
    }

    /// Names of the namespaces in the snapshot.
    pub fn namespaces(&self) -> impl Iterator<Item = &str> {
        self.namespaces.keys().map(String::as_str)
    }

    /// Number of distinct IPs with a tenure (live or closed).
    pub fn tracked_ips(&self) -> usize {
        self.tenures.len()
    }

    /// Distinct API server addresses known.
    pub fn apiserver_ips(&self) -> HashSet<IpAddr> {
        self.apiserver.keys().copied().collect()
    }

    /// Counts, for metrics and memory accounting.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            pods: self.pods.len(),
            tombstones: self.tombstones.len(),
            ips: self.tenures.len(),
            closed_tenures: self
                .tenures
                .values()
                .flatten()
                .filter(|t| t.end.is_some())
                .count(),
            services: self.services.len(),
            nodes_ips: self.node_ips.len(),
        }
    }
}

/// Sizes of the cache's tables.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub pods: usize,
    pub tombstones: usize,
    pub ips: usize,
    pub closed_tenures: usize,
    pub services: usize,
    pub nodes_ips: usize,
}

/// The owner of each ReplicaSet and Job, to name the workload above them.
struct Owners<'a> {
    replica_sets: HashMap<(&'a str, &'a str), Option<&'a OwnerReference>>,
    jobs: HashMap<(&'a str, &'a str), Option<&'a OwnerReference>>,
}

impl<'a> Owners<'a> {
    fn from_snapshot(snapshot: &'a ClusterSnapshot) -> Self {
        fn index<'a>(
            metas: impl Iterator<Item = &'a ObjectMeta>,
        ) -> HashMap<(&'a str, &'a str), Option<&'a OwnerReference>> {
            metas
                .filter_map(|m| {
                    let name = m.name.as_deref()?;
                    Some(((namespace_of(m), name), controller_of(m)))
                })
                .collect()
        }
        Owners {
            replica_sets: index(snapshot.replica_sets.iter().map(|r| &r.metadata)),
            jobs: index(snapshot.jobs.iter().map(|j| &j.metadata)),
        }
    }

    /// Like [`Owners::from_snapshot`], for the owners of `pods` only.
    fn for_pods<'p>(
        snapshot: &'a ClusterSnapshot,
        pods: impl Iterator<Item = &'p PodRecord>,
    ) -> Self {
        let wanted: HashSet<(String, String)> = pods
            .filter_map(|p| Some((p.namespace().to_owned(), p.owner()?.name.clone())))
            .collect();
        let index = |metas: &mut dyn Iterator<Item = &'a ObjectMeta>| {
            metas
                .filter_map(|m| {
                    let name = m.name.as_deref()?;
                    let key = (namespace_of(m), name);
                    wanted
                        .iter()
                        .any(|(ns, n)| ns == key.0 && n == key.1)
                        .then(|| (key, controller_of(m)))
                })
                .collect::<HashMap<_, _>>()
        };
        Owners {
            replica_sets: index(&mut snapshot.replica_sets.iter().map(|r| &r.metadata)),
            jobs: index(&mut snapshot.jobs.iter().map(|j| &j.metadata)),
        }
    }

    /// The workload a pod belongs to: its controller, or the controller's
    /// controller for ReplicaSets (-> Deployment) and Jobs (-> CronJob).
    ///
    /// When the pod's ReplicaSet is not in the snapshot (not listed yet, or
    /// manifests that only have the pod), the Deployment is derived from
    /// the name: the Deployment controller names its ReplicaSets
    /// `<deployment>-<pod-template-hash>` and labels their pods with that
    /// hash, so stripping `-<hash>` gives the Deployment. A ReplicaSet
    /// without that suffix is reported as a ReplicaSet.
    fn workload_of<'s>(&'s self, pod: &'s PodRecord) -> Option<(&'s str, &'s str)> {
        let namespace = pod.namespace();
        let owner = pod.owner()?;
        let own = (owner.name.as_str(), owner.kind.as_str());
        let parent = |o: &'s OwnerReference| (o.name.as_str(), o.kind.as_str());
        Some(match owner.kind.as_str() {
            "ReplicaSet" => match self.replica_sets.get(&(namespace, owner.name.as_str())) {
                Some(Some(p)) => parent(p),
                Some(None) => own,
                None => {
                    let hash = pod.labels().get(POD_TEMPLATE_HASH);
                    let deployment = hash.and_then(|hash| {
                        owner
                            .name
                            .strip_suffix(hash.as_str())
                            .and_then(|rest| rest.strip_suffix('-'))
                            .filter(|name| !name.is_empty())
                    });
                    match deployment {
                        Some(name) => (name, "Deployment"),
                        None => own,
                    }
                }
            },
            "Job" => match self.jobs.get(&(namespace, owner.name.as_str())) {
                Some(Some(p)) => parent(p),
                _ => own,
            },
            _ => own,
        })
    }
}

/// The namespace of a changed object, as [`namespace_of`] reads it.
fn change_namespace(change: &Change) -> &str {
    match change.kind {
        ChangeKind::Namespace | ChangeKind::Node => "",
        _ if change.namespace.is_empty() => "default",
        _ => &change.namespace,
    }
}

fn is_apiserver(service: &ServiceRef) -> bool {
    service.namespace == "default" && service.name == "kubernetes"
}

/// The service an EndpointSlice serves and what readiness needs of it.
fn slice_summary(slice: &EndpointSlice) -> Option<(ServiceRef, SliceSummary)> {
    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("kubernetes.io/service-name"))?;
    let service = ServiceRef {
        namespace: namespace_of(&slice.metadata).to_owned(),
        name: service.clone(),
    };
    let ports = slice.ports.as_ref().map(|ports| {
        ports
            .iter()
            .map(|p| {
                (
                    p.name.clone().filter(|n| !n.is_empty()),
                    protocol_number(p.protocol.as_deref()),
                )
            })
            .collect::<Vec<_>>()
    });
    let (mut ready, mut not_ready) = (0, 0);
    for endpoint in &slice.endpoints {
        // The API: a nil `ready` condition means ready.
        let is_ready = endpoint
            .conditions
            .as_ref()
            .and_then(|c| c.ready)
            .unwrap_or(true);
        if is_ready {
            ready += 1;
        } else {
            not_ready += 1;
        }
    }
    Some((
        service,
        SliceSummary {
            name: slice.metadata.name.clone().unwrap_or_default(),
            address_type: slice.address_type.clone(),
            ports,
            ready,
            not_ready,
        },
    ))
}

/// The API server's addresses and ports from one of its slices.
fn add_apiserver(apiserver: &mut HashMap<IpAddr, Vec<u16>>, slice: &EndpointSlice) {
    let ports: Vec<u16> = slice
        .ports
        .iter()
        .flatten()
        .filter_map(|p| p.port.and_then(|p| u16::try_from(p).ok()))
        .collect();
    for endpoint in &slice.endpoints {
        for address in &endpoint.addresses {
            if let Ok(ip) = address.parse::<IpAddr>() {
                apiserver
                    .entry(ip)
                    .or_default()
                    .extend(ports.iter().copied());
            }
        }
    }
}

fn owned_workload((name, kind): (&str, &str)) -> Workload {
    Workload {
        name: name.to_owned(),
        kind: kind.to_owned(),
    }
}

/// The controlling owner reference, or the first owner when none is marked
/// controller.
fn controller_of(meta: &ObjectMeta) -> Option<&OwnerReference> {
    let owners = meta.owner_references.as_ref()?;
    owners
        .iter()
        .find(|o| o.controller == Some(true))
        .or_else(|| owners.first())
}

fn namespace_of(meta: &ObjectMeta) -> &str {
    meta.namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or("default")
}

/// When the pod started, by the earliest timestamp it has.
fn pod_start(pod: &PodIdentity) -> Option<SystemTime> {
    match (pod.created, pod.started) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `"TCP"`/`"UDP"`/`"SCTP"` as an IP protocol number; the API's default is
/// TCP.
pub fn protocol_number(protocol: Option<&str>) -> u8 {
    match protocol {
        Some(p) if p.eq_ignore_ascii_case("UDP") => IPPROTO_UDP,
        Some(p) if p.eq_ignore_ascii_case("SCTP") => IPPROTO_SCTP,
        _ => IPPROTO_TCP,
    }
}

/// The stable numeric identity of pods with these labels in this namespace:
/// FNV-1a over the namespace and the sorted labels (without the per-rollout
/// ones, see `IDENTITY_EXCLUDED_LABELS`), folded into `[256, 2^24)`.
///
/// Unlike Cilium's allocated identities this needs no coordination between
/// agents: every node computes the same number for the same labels. Two label
/// sets can collide (about 3 pairs expected among 10,000 distinct sets); the
/// labels in the flow record stay exact.
pub fn pod_identity_number(namespace: &str, labels: &BTreeMap<String, String>) -> u32 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(PRIME);
        }
    };
    feed(namespace.as_bytes());
    for (k, v) in labels {
        if IDENTITY_EXCLUDED_LABELS.contains(&k.as_str()) {
            continue;
        }
        feed(&[0]);
        feed(k.as_bytes());
        feed(b"=");
        feed(v.as_bytes());
    }
    let span = u64::from(MAX_POD_IDENTITY - MIN_POD_IDENTITY + 1);
    // The remainder is below 2^24, so it fits.
    MIN_POD_IDENTITY + (hash % span) as u32
}

fn pod_identity(pod: &PodRecord, owners: &Owners<'_>) -> Option<PodIdentity> {
    let name = pod.name()?.to_owned();
    let namespace = pod.namespace().to_owned();
    let labels = pod.label_set().clone();
    let container_ports = pod
        .ports()
        .iter()
        .filter(|p| !p.init)
        .map(|p| ContainerPortInfo {
            name: p.name.clone(),
            port: p.port,
            protocol: p.protocol.number(),
        })
        .collect();
    let containers = pod
        .containers()
        .iter()
        .map(|c| ContainerInfo {
            name: c.name.clone(),
            id: c.id.clone(),
        })
        .collect();
    Some(PodIdentity {
        uid: pod.uid().to_owned(),
        identity: pod_identity_number(&namespace, &labels),
        workload: owners.workload_of(pod).map(owned_workload),
        node_name: pod.node_name().map(str::to_owned),
        host_network: pod.host_network(),
        ips: pod.ips().to_vec(),
        container_ports,
        containers,
        phase: pod.phase().map(str::to_owned),
        ready: pod.ready(),
        created: pod.created(),
        started: pod.started(),
        deletion: pod.deletion(),
        name,
        namespace,
        labels,
    })
}

fn service_identity(svc: &Service) -> Option<ServiceIdentity> {
    let meta = &svc.metadata;
    let name = meta.name.clone()?;
    let spec = svc.spec.as_ref();
    let mut cluster_ips: Vec<IpAddr> = Vec::new();
    let listed = spec
        .into_iter()
        .flat_map(|s| s.cluster_ips.iter().flatten());
    for ip in spec
        .and_then(|s| s.cluster_ip.as_ref())
        .into_iter()
        .chain(listed)
    {
        // "None" (headless) and "" do not parse, and are left out.
        if let Ok(ip) = ip.parse::<IpAddr>()
            && !cluster_ips.contains(&ip)
        {
            cluster_ips.push(ip);
        }
    }
    let ports = spec
        .into_iter()
        .flat_map(|s| s.ports.iter().flatten())
        .filter_map(|p| {
            Some(ServicePortInfo {
                name: p.name.clone().filter(|n| !n.is_empty()),
                port: u16::try_from(p.port).ok()?,
                protocol: protocol_number(p.protocol.as_deref()),
            })
        })
        .collect();
    Some(ServiceIdentity {
        service: ServiceRef {
            namespace: namespace_of(meta).to_owned(),
            name,
        },
        cluster_ips,
        ports,
        selector: spec.and_then(|s| s.selector.clone()),
        service_type: spec
            .and_then(|s| s.type_.clone())
            .unwrap_or_else(|| "ClusterIP".to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::{
        apps::v1::ReplicaSet,
        batch::v1::Job,
        core::v1::{Namespace, Node, Pod},
        discovery::v1::EndpointSlice,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use serde_json::{Value, json};

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn rfc3339(at: SystemTime) -> String {
        let ts = k8s_openapi::jiff::Timestamp::try_from(at).unwrap();
        ts.to_string()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A running, ready pod; `extra` is merged into the object.
    fn pod(
        namespace: &str,
        name: &str,
        uid: &str,
        pod_ip: &str,
        labels: Value,
        extra: Value,
    ) -> Pod {
        let mut value = json!({
            "metadata": {"name": name, "namespace": namespace, "uid": uid, "labels": labels},
            "spec": {"nodeName": "node-a", "containers": [{"name": "app"}]},
            "status": {
                "phase": "Running", "podIP": pod_ip, "podIPs": [{"ip": pod_ip}],
                "conditions": [{"type": "Ready", "status": "True"}]
            }
        });
        merge(&mut value, extra);
        serde_json::from_value(value).unwrap()
    }

    fn merge(base: &mut Value, extra: Value) {
        match (base, extra) {
            (Value::Object(base), Value::Object(extra)) => {
                for (k, v) in extra {
                    merge(base.entry(k).or_insert(Value::Null), v);
                }
            }
            (base, extra) => *base = extra,
        }
    }

    fn snapshot(pods: Vec<Pod>) -> ClusterSnapshot {
        ClusterSnapshot {
            pods: pods.into_iter().map(PodRecord::from).collect(),
            ..ClusterSnapshot::default()
        }
    }

    /// The name of the pod `addr` resolves to at second `secs`, if a pod.
    fn pod_at(cache: &IdentityCache, addr: &str, secs: u64) -> Option<String> {
        match cache.resolve_ip(ip(addr), t(secs)) {
            IpResolution::Pod(p) => Some(p.name.clone()),
            _ => None,
        }
    }

    /// The `extra` of a pod created at second `secs`.
    fn created_at(secs: u64) -> Value {
        json!({"metadata": {"creationTimestamp": rfc3339(t(secs))}})
    }

    fn cache() -> IdentityCache {
        IdentityCache::new(IdentityConfig {
            node_name: Some("node-a".into()),
            ..IdentityConfig::default()
        })
    }

    #[test]
    fn reused_ip_resolves_to_the_pod_that_held_it_at_the_flow_time() {
        let mut cache = cache();
        let x = "10.0.0.9";
        let old = pod(
            "prod",
            "old",
            "u-old",
            x,
            json!({"app": "old"}),
            created_at(0),
        );
        cache.update(&snapshot(vec![old.clone()]), t(10));
        // Deletion requested at t(95) with the pod gone by t(100).
        let mut deleting = old.clone();
        deleting.metadata.deletion_timestamp =
            Some(Time(k8s_openapi::jiff::Timestamp::try_from(t(95)).unwrap()));
        cache.update(&snapshot(vec![deleting]), t(96));
        cache.update(&snapshot(vec![]), t(100));
        let new = pod(
            "prod",
            "new",
            "u-new",
            x,
            json!({"app": "new"}),
            created_at(110),
        );
        cache.update(&snapshot(vec![new]), t(120));

        assert_eq!(pod_at(&cache, x, 5).as_deref(), Some("old"));
        assert_eq!(pod_at(&cache, x, 94).as_deref(), Some("old"));
        // The new pod is known from its creation, before the cache saw it.
        assert_eq!(pod_at(&cache, x, 111).as_deref(), Some("new"));
        assert_eq!(pod_at(&cache, x, 500).as_deref(), Some("new"));
        // In the gap between holders the nearer tenure wins.
        assert_eq!(pod_at(&cache, x, 97).as_deref(), Some("old"));
        assert_eq!(pod_at(&cache, x, 108).as_deref(), Some("new"));
    }

    #[test]
    fn overlapping_tenures_go_to_the_previous_holder() {
        let mut cache = cache();
        let x = "10.0.0.9";
        let old = pod("prod", "old", "u-old", x, json!({}), created_at(0));
        cache.update(&snapshot(vec![old]), t(0));
        // The new pod was created (t(40)) before the old one let the IP go (t(50)).
        let new = pod("prod", "new", "u-new", x, json!({}), created_at(40));
        cache.update(&snapshot(vec![]), t(50));
        cache.update(&snapshot(vec![new]), t(60));
        assert_eq!(pod_at(&cache, x, 45).as_deref(), Some("old"));
        assert_eq!(pod_at(&cache, x, 55).as_deref(), Some("new"));
    }

    #[test]
    fn a_finished_pod_releases_its_ip_while_still_listed() {
        let mut cache = cache();
        let x = "10.0.0.9";
        let job = pod("batch", "job-1", "u-job", x, json!({}), json!({}));
        cache.update(&snapshot(vec![job.clone()]), t(0));
        let mut done = job;
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        let web = pod("prod", "web", "u-web", x, json!({}), json!({}));
        cache.update(&snapshot(vec![done, web]), t(30));
        assert_eq!(pod_at(&cache, x, 31).as_deref(), Some("web"));
        assert_eq!(pod_at(&cache, x, 10).as_deref(), Some("job-1"));
    }

    #[test]
    fn tombstones_resolve_for_the_grace_period_then_expire() {
        let mut cache = IdentityCache::new(IdentityConfig {
            tombstone_grace: Duration::from_secs(60),
            ..IdentityConfig::default()
        });
        let gone = pod("prod", "gone", "u-gone", "10.0.0.3", json!({}), json!({}));
        cache.update(&snapshot(vec![gone]), t(0));
        cache.update(&snapshot(vec![]), t(10));
        assert!(
            cache.pod_by_name("prod", "gone").is_none(),
            "not live any more"
        );
        assert_eq!(
            cache.pod_by_uid("u-gone").map(|p| p.name.as_str()),
            Some("gone")
        );
        assert_eq!(pod_at(&cache, "10.0.0.3", 5).as_deref(), Some("gone"));
        assert_eq!(cache.stats().tombstones, 1);

        cache.expire(t(69));
        assert!(cache.pod_by_uid("u-gone").is_some());
        cache.expire(t(70));
        assert!(cache.pod_by_uid("u-gone").is_none());
        assert_eq!(
            cache.resolve_ip(ip("10.0.0.3"), t(5)),
            IpResolution::Reserved {
                identity: ReservedIdentity::World,
                node_name: None
            }
        );
        assert_eq!(cache.stats(), CacheStats::default());
    }

    #[test]
    fn a_pod_that_comes_back_is_no_tombstone() {
        let mut cache = cache();
        let p = pod("prod", "p", "u-p", "10.0.0.3", json!({}), json!({}));
        cache.update(&snapshot(vec![p.clone()]), t(0));
        cache.update(&snapshot(vec![]), t(1));
        cache.update(&snapshot(vec![p]), t(2));
        assert_eq!(cache.stats().tombstones, 0);
        assert!(cache.pod_by_name("prod", "p").is_some());
        assert_eq!(pod_at(&cache, "10.0.0.3", 3).as_deref(), Some("p"));
    }

    #[test]
    fn tombstones_are_capped() {
        let mut cache = IdentityCache::new(IdentityConfig {
            max_tombstones: 10,
            ..IdentityConfig::default()
        });
        for round in 0..20u64 {
            let p = pod(
                "prod",
                &format!("p{round}"),
                &format!("u{round}"),
                &format!("10.0.1.{round}"),
                json!({}),
                json!({}),
            );
            cache.update(&snapshot(vec![p]), t(round * 2));
        }
        cache.update(&snapshot(vec![]), t(100));
        let stats = cache.stats();
        // Each pod left a tombstone and a closed tenure: 40 entries, capped at 10.
        assert!(stats.tombstones + stats.closed_tenures <= 10, "{stats:?}");
        // The most recent survive.
        assert!(cache.pod_by_uid("u19").is_some());
        assert!(cache.pod_by_uid("u0").is_none());
    }

    #[test]
    fn pod_endpoint_names_workload_node_labels_and_uid() {
        let mut cache = cache();
        let rs: ReplicaSet = serde_json::from_value(json!({
            "metadata": {"name": "payment-7d9c5b", "namespace": "prod", "uid": "rs1",
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "payment", "uid": "d1", "controller": true}]},
            "spec": {"selector": {}}
        }))
        .unwrap();
        let p = pod(
            "prod",
            "payment-7d9c5b-x1",
            "u-pay",
            "10.0.0.7",
            json!({"app": "payment", "pod-template-hash": "7d9c5b"}),
            json!({
                "metadata": {"ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "payment-7d9c5b", "uid": "rs1", "controller": true}]}
            }),
        );
        let snap = ClusterSnapshot {
            pods: vec![p.into()],
            replica_sets: vec![rs],
            ..ClusterSnapshot::default()
        };
        cache.update(&snap, t(0));
        let ep = cache.endpoint(ip("10.0.0.7"), Some(8080), t(1));
        assert_eq!(ep.pod_name, "payment-7d9c5b-x1");
        assert_eq!(ep.namespace, "prod");
        assert_eq!(ep.pod_uid, "u-pay");
        assert_eq!(ep.node_name, "node-a");
        assert_eq!(ep.port, Some(8080));
        assert_eq!(
            ep.workloads,
            vec![Workload {
                name: "payment".into(),
                kind: "Deployment".into()
            }]
        );
        assert_eq!(
            ep.labels,
            vec![
                "k8s:app=payment",
                "k8s:io.kubernetes.pod.namespace=prod",
                "k8s:pod-template-hash=7d9c5b"
            ]
        );
        assert!(ep.identity >= 256);
        assert_eq!(
            cache.node_name_of("prod", "payment-7d9c5b-x1"),
            Some("node-a")
        );
    }

    fn owned_by(kind: &str, name: &str, labels: Value) -> Pod {
        pod(
            "prod",
            &format!("{name}-pod"),
            &format!("u-{kind}-{name}"),
            "10.0.2.1",
            labels,
            json!({
                "metadata": {"ownerReferences": [{"apiVersion": "v1", "kind": kind, "name": name, "uid": "o", "controller": true}]}
            }),
        )
    }

    fn workload_of(snap: ClusterSnapshot) -> Option<Workload> {
        let mut cache = cache();
        cache.update(&snap, t(0));
        cache.pods().next().unwrap().workload.clone()
    }

    #[test]
    fn workloads_follow_owner_references() {
        let w = |name: &str, kind: &str| {
            Some(Workload {
                name: name.into(),
                kind: kind.into(),
            })
        };
        // ReplicaSet unknown: the Deployment is the name without `-<pod-template-hash>`.
        assert_eq!(
            workload_of(snapshot(vec![owned_by(
                "ReplicaSet",
                "api-5f7b8c9d4",
                json!({"pod-template-hash": "5f7b8c9d4"})
            )])),
            w("api", "Deployment")
        );
        // ReplicaSet unknown and no hash suffix: reported as the ReplicaSet.
        assert_eq!(
            workload_of(snapshot(vec![owned_by("ReplicaSet", "bare-rs", json!({}))])),
            w("bare-rs", "ReplicaSet")
        );
        // A known ReplicaSet without owner is the workload itself.
        let rs: ReplicaSet = serde_json::from_value(json!({
            "metadata": {"name": "bare-5f7b8c9d4", "namespace": "prod"}, "spec": {"selector": {}}
        }))
        .unwrap();
        assert_eq!(
            workload_of(ClusterSnapshot {
                pods: vec![
                    owned_by(
                        "ReplicaSet",
                        "bare-5f7b8c9d4",
                        json!({"pod-template-hash": "5f7b8c9d4"})
                    )
                    .into()
                ],
                replica_sets: vec![rs],
                ..ClusterSnapshot::default()
            }),
            w("bare-5f7b8c9d4", "ReplicaSet")
        );
        // Job -> CronJob when the Job is known.
        let job: Job = serde_json::from_value(json!({
            "metadata": {"name": "backup-28930140", "namespace": "prod",
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "CronJob", "name": "backup", "uid": "c", "controller": true}]},
            "spec": {"template": {}}
        }))
        .unwrap();
        assert_eq!(
            workload_of(ClusterSnapshot {
                pods: vec![owned_by("Job", "backup-28930140", json!({})).into()],
                jobs: vec![job],
                ..ClusterSnapshot::default()
            }),
            w("backup", "CronJob")
        );
        assert_eq!(
            workload_of(snapshot(vec![owned_by("Job", "once", json!({}))])),
            w("once", "Job")
        );
        assert_eq!(
            workload_of(snapshot(vec![owned_by("StatefulSet", "db", json!({}))])),
            w("db", "StatefulSet")
        );
        assert_eq!(
            workload_of(snapshot(vec![owned_by("DaemonSet", "agent", json!({}))])),
            w("agent", "DaemonSet")
        );
        assert_eq!(
            workload_of(snapshot(vec![pod(
                "prod",
                "bare",
                "u",
                "10.0.2.1",
                json!({}),
                json!({})
            )])),
            None
        );
    }

    #[test]
    fn identity_number_is_stable_across_rollouts_and_distinct_across_namespaces() {
        let labels = |hash: &str| -> BTreeMap<String, String> {
            [("app", "web"), ("pod-template-hash", hash)]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        };
        let a = pod_identity_number("prod", &labels("aaa"));
        assert_eq!(a, pod_identity_number("prod", &labels("bbb")));
        assert_ne!(a, pod_identity_number("staging", &labels("aaa")));
        let mut other = labels("aaa");
        other.insert("app".into(), "api".into());
        assert_ne!(a, pod_identity_number("prod", &other));
        assert!((MIN_POD_IDENTITY..=MAX_POD_IDENTITY).contains(&a));
    }

    fn services_snapshot(ready: Value) -> ClusterSnapshot {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": "payment", "namespace": "prod"},
            "spec": {"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"], "selector": {"app": "payment"},
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}
        }))
        .unwrap();
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "payment-abc", "namespace": "prod", "labels": {"kubernetes.io/service-name": "payment"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.0.0.7"], "conditions": {"ready": ready.clone()}},
                {"addresses": ["10.0.0.8"], "conditions": {"ready": ready}}
            ]
        }))
        .unwrap();
        ClusterSnapshot {
            services: vec![svc],
            endpoint_slices: vec![slice],
            ..ClusterSnapshot::default()
        }
    }

    #[test]
    fn cluster_ip_names_the_service_and_readiness_comes_from_endpoint_slices() {
        let mut cache = cache();
        cache.update(&services_snapshot(json!(false)), t(0));
        let vip = ip("10.96.0.20");
        let ep = cache.endpoint(vip, Some(80), t(0));
        assert_eq!(
            ep.service,
            Some(ServiceRef {
                namespace: "prod".into(),
                name: "payment".into()
            })
        );
        assert_eq!(ep.namespace, "prod");
        assert_eq!(ep.identity, 0);
        assert_eq!(
            cache
                .service_at(vip, Some((80, IPPROTO_TCP)))
                .map(|s| s.service.name.as_str()),
            Some("payment")
        );
        assert!(cache.service_at(vip, Some((81, IPPROTO_TCP))).is_none());
        assert!(cache.service_at(vip, Some((80, IPPROTO_UDP))).is_none());

        let readiness = cache.service_readiness(vip, 80, IPPROTO_TCP).unwrap();
        assert!(readiness.has_no_ready_endpoints());
        assert_eq!(
            readiness.to_string(),
            "service prod/payment has no ready endpoints"
        );

        cache.update(&services_snapshot(json!(true)), t(1));
        let readiness = cache.service_readiness(vip, 80, IPPROTO_TCP).unwrap();
        assert_eq!(
            readiness,
            ServiceReadiness::Ready {
                service: readiness.service().clone(),
                ready: 2
            }
        );
        assert_eq!(
            readiness.to_string(),
            "service prod/payment has 2 ready endpoints"
        );

        // An unset `ready` means ready.
        cache.update(&services_snapshot(Value::Null), t(2));
        assert!(
            !cache
                .service_readiness(vip, 80, IPPROTO_TCP)
                .unwrap()
                .has_no_ready_endpoints()
        );
        assert!(
            cache
                .service_readiness(ip("10.96.0.21"), 80, IPPROTO_TCP)
                .is_none()
        );
    }

    #[test]
    fn without_slices_readiness_comes_from_the_selected_pods() {
        let mut snap = services_snapshot(json!(true));
        snap.endpoint_slices.clear();
        let mut unready = pod(
            "prod",
            "payment-1",
            "u1",
            "10.0.0.7",
            json!({"app": "payment"}),
            json!({}),
        );
        unready
            .status
            .as_mut()
            .unwrap()
            .conditions
            .as_mut()
            .unwrap()[0]
            .status = "False".into();
        let other = pod(
            "prod",
            "web-1",
            "u2",
            "10.0.0.8",
            json!({"app": "web"}),
            json!({}),
        );
        snap.pods = vec![unready.clone().into(), other.into()];
        let mut cache = cache();
        cache.update(&snap, t(0));
        let readiness = cache
            .service_readiness(ip("10.96.0.20"), 80, IPPROTO_TCP)
            .unwrap();
        assert_eq!(
            readiness.to_string(),
            "service prod/payment has no ready endpoints"
        );
        assert_eq!(
            readiness,
            ServiceReadiness::NoReadyEndpoints {
                service: readiness.service().clone(),
                not_ready: 1
            }
        );

        let mut ready = unready;
        ready.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].status = "True".into();
        snap.pods[0] = ready.into();
        cache.update(&snap, t(1));
        assert!(matches!(
            cache.service_readiness_by_name("prod", "payment"),
            Some(ServiceReadiness::Ready { ready: 1, .. })
        ));

        // No selector and no slices: unknown, never a false "no ready endpoints".
        snap.services[0].spec.as_mut().unwrap().selector = None;
        cache.update(&snap, t(2));
        assert!(matches!(
            cache.service_readiness_by_name("prod", "payment"),
            Some(ServiceReadiness::Unknown { .. })
        ));
    }

    #[test]
    fn nodes_apiserver_and_world() {
        let node = |name: &str, internal: &str| -> Node {
            serde_json::from_value(json!({
                "metadata": {"name": name},
                "status": {"addresses": [{"type": "InternalIP", "address": internal}, {"type": "Hostname", "address": name}]}
            }))
            .unwrap()
        };
        let kubernetes: Service = serde_json::from_value(json!({
            "metadata": {"name": "kubernetes", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "https", "port": 443}]}
        }))
        .unwrap();
        let apiserver_slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "kubernetes", "namespace": "default", "labels": {"kubernetes.io/service-name": "kubernetes"}},
            "addressType": "IPv4",
            "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["192.168.0.2"]}]
        }))
        .unwrap();
        let host_net = pod(
            "kube-system",
            "kube-proxy-x",
            "u-kp",
            "192.168.0.9",
            json!({}),
            json!({
                "spec": {"hostNetwork": true, "nodeName": "node-c"}
            }),
        );
        let snap = ClusterSnapshot {
            nodes: vec![node("node-a", "192.168.0.1"), node("node-b", "192.168.0.2")],
            services: vec![kubernetes],
            endpoint_slices: vec![apiserver_slice],
            pods: vec![host_net.into()],
            ..ClusterSnapshot::default()
        };
        let mut cache = cache();
        cache.update(&snap, t(0));
        let reserved = |ip_: &str, port: Option<u16>| cache.endpoint(ip(ip_), port, t(0));

        let host = reserved("192.168.0.1", None);
        assert_eq!((host.identity, host.node_name.as_str()), (1, "node-a"));
        assert_eq!(host.labels, vec!["reserved:host"]);
        // node-b runs the API server: on its port it is kube-apiserver, elsewhere remote-node.
        let api = reserved("192.168.0.2", Some(6443));
        assert_eq!((api.identity, api.node_name.as_str()), (7, "node-b"));
        let kubelet = reserved("192.168.0.2", Some(10250));
        assert_eq!(
            (kubelet.identity, kubelet.node_name.as_str()),
            (6, "node-b")
        );
        // The kubernetes service's cluster IP is the API server too.
        let vip = reserved("10.96.0.1", Some(443));
        assert_eq!(vip.identity, 7);
        assert_eq!(
            vip.service.as_ref().map(|s| s.to_string()).as_deref(),
            Some("default/kubernetes")
        );
        // A hostNetwork pod's IP is its node's, and does not name the pod.
        let kp = reserved("192.168.0.9", None);
        assert_eq!(
            (kp.identity, kp.node_name.as_str(), kp.pod_name.as_str()),
            (6, "node-c", "")
        );
        assert_eq!(cache.pod_by_uid("u-kp").map(|p| p.host_network), Some(true));
        // Anything else is the world.
        assert_eq!(
            reserved("1.1.1.1", Some(443)).labels,
            vec!["reserved:world"]
        );
    }

    #[test]
    fn namespace_and_pod_views_for_the_policy_engine() {
        let ns: Namespace = serde_json::from_value(json!({
            "metadata": {"name": "prod", "labels": {"kubernetes.io/metadata.name": "prod", "team": "pay"}}
        }))
        .unwrap();
        let mut manifest_pod = pod(
            "prod",
            "web",
            "",
            "10.0.0.4",
            json!({"app": "web"}),
            json!({}),
        );
        manifest_pod.metadata.uid = None;
        let snap = ClusterSnapshot {
            namespaces: vec![ns],
            pods: vec![manifest_pod.into()],
            ..ClusterSnapshot::default()
        };
        let mut cache = cache();
        cache.update(&snap, t(0));
        assert_eq!(
            cache
                .namespace_labels("prod")
                .and_then(|l| l.get("team"))
                .map(String::as_str),
            Some("pay")
        );
        assert!(cache.namespace_labels("other").is_none());
        let web = cache.pod_by_name("prod", "web").unwrap();
        assert_eq!(web.labels.get("app").map(String::as_str), Some("web"));
        assert!(cache.is_local(web));
        // A manifest pod without a UID still resolves, with no UID in the record.
        let ep = cache.endpoint(ip("10.0.0.4"), None, t(0));
        assert_eq!((ep.pod_name.as_str(), ep.pod_uid.as_str()), ("web", ""));
    }
}

#[cfg(test)]
mod incremental_tests {
    //! `update` reuses identities of unchanged objects; these check that what
    //! changes still shows.
    use super::*;
    use k8s_openapi::api::{apps::v1::ReplicaSet, core::v1::Pod};
    use serde_json::json;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn pod(name: &str, uid: &str, version: &str, labels: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "prod", "uid": uid, "resourceVersion": version,
                "labels": labels,
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-rs", "uid": "r", "controller": true}]},
            "spec": {"containers": []},
            "status": {"phase": "Running", "podIP": "10.0.0.1"}
        }))
        .unwrap()
    }

    fn snapshot(pods: Vec<Pod>, replica_sets: Vec<ReplicaSet>) -> ClusterSnapshot {
        ClusterSnapshot {
            pods: pods.into_iter().map(PodRecord::from).collect(),
            replica_sets,
            ..ClusterSnapshot::default()
        }
    }

    #[test]
    fn an_owner_arriving_later_updates_an_unchanged_pod() {
        let mut cache = IdentityCache::default();
        let web = pod("web-1", "u1", "7", json!({"app": "web"}));
        cache.update(&snapshot(vec![web.clone()], vec![]), at(0));
        assert_eq!(
            cache
                .pod_by_uid("u1")
                .and_then(|p| p.workload.clone())
                .map(|w| w.kind),
            Some("ReplicaSet".to_owned())
        );
        let rs: ReplicaSet = serde_json::from_value(json!({
            "metadata": {"name": "web-rs", "namespace": "prod",
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": "d", "controller": true}]},
            "spec": {"selector": {}}
        }))
        .unwrap();
        cache.update(&snapshot(vec![web], vec![rs]), at(1));
        let workload = cache
            .pod_by_name("prod", "web-1")
            .and_then(|p| p.workload.clone());
        assert_eq!(
            workload,
            Some(Workload {
                name: "web".into(),
                kind: "Deployment".into()
            })
        );
        let ep = cache.endpoint("10.0.0.1".parse().unwrap(), None, at(2));
        assert_eq!(ep.workloads[0].kind, "Deployment");
    }

    #[test]
    fn a_new_resource_version_rebuilds_the_pod() {
        let mut cache = IdentityCache::default();
        cache.update(
            &snapshot(vec![pod("web-1", "u1", "7", json!({"app": "web"}))], vec![]),
            at(0),
        );
        cache.update(
            &snapshot(
                vec![pod(
                    "web-1",
                    "u1",
                    "8",
                    json!({"app": "web", "tier": "front"}),
                )],
                vec![],
            ),
            at(1),
        );
        let labels = &cache.pod_by_name("prod", "web-1").unwrap().labels;
        assert_eq!(labels.get("tier").map(String::as_str), Some("front"));
        let ep = cache.endpoint("10.0.0.1".parse().unwrap(), None, at(2));
        assert!(
            ep.labels.contains(&"k8s:tier=front".to_owned()),
            "{:?}",
            ep.labels
        );
    }

    #[test]
    fn a_recreated_pod_of_the_same_name_replaces_the_old_one() {
        let mut cache = IdentityCache::default();
        cache.update(
            &snapshot(vec![pod("db-0", "old", "1", json!({}))], vec![]),
            at(0),
        );
        cache.update(
            &snapshot(vec![pod("db-0", "new", "2", json!({}))], vec![]),
            at(1),
        );
        assert_eq!(
            cache.pod_by_name("prod", "db-0").map(|p| p.uid.as_str()),
            Some("new")
        );
        assert_eq!(
            cache.pod_by_uid("old").map(|p| p.uid.as_str()),
            Some("old"),
            "tombstone"
        );
        cache.update(&snapshot(vec![], vec![]), at(2));
        assert!(cache.pod_by_name("prod", "db-0").is_none());
        assert_eq!(cache.pods().count(), 0);
    }
}
