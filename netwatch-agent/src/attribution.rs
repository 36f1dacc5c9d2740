//! Identity and policy attribution: a flow record's endpoints, services and
//! the NetworkPolicies behind its verdict.
//!
//! Every record the assembler emits passes through [`Attribution::enrich`]:
//!
//! - endpoints come from the [`IdentityCache`] at the flow's time (so a
//!   reused IP names the pod that held it then); the client is named by its
//!   socket's cgroup when sock_ops saw it, which is what names hostNetwork
//!   pods that share the node's IP;
//! - a flow addressed to a service's cluster IP names the service, and a
//!   refused or unanswered one to a service without ready endpoints says so;
//! - the [`PolicyEngine`] (through the [`VerdictCache`]) names the policies
//!   that deny it, or says that NetworkPolicy does not explain the drop.
//!
//! Completed handshakes go through [`Attribution::not_enforced`]: one that
//! the policies deny means the CNI does not enforce them for that pair.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, LazyLock},
    time::{Duration, SystemTime},
};

use tracing::{debug, warn};

use crate::{
    cluster::{Change, ClusterSnapshot, LabelSet, LogPosition},
    flow::record::{FlowRecord, L4, PolicyRef, StagedWhatIf, Verdict},
    identity::{
        CgroupIndex, Endpoint, IdentityCache, IdentityConfig, IpResolution, PodIdentity,
        ServiceReadiness, Workload,
    },
    policy::{
        self, EngineOptions, FlowVerdict, Peer, PolicyEngine, Protocol, VerdictCache, VerdictKey,
    },
    record::shared::{SharedList, SharedStr},
};

/// How attribution is set up.
#[derive(Clone, Debug)]
pub struct AttributionConfig {
    pub node_name: String,
    pub engine: EngineOptions,
    /// cgroup v2 root to resolve socket cgroups under; `None` skips it.
    pub cgroup_root: Option<PathBuf>,
    pub tombstone_grace: Duration,
    /// A (source, destination, port, protocol) identity pair is reported as
    /// POLICY_NOT_ENFORCED at most once per this interval.
    pub not_enforced_interval: Duration,
}

impl Default for AttributionConfig {
    fn default() -> Self {
        AttributionConfig {
            node_name: String::new(),
            engine: EngineOptions::default(),
            cgroup_root: None,
            tombstone_grace: Duration::from_secs(300),
            not_enforced_interval: Duration::from_secs(60),
        }
    }
}

/// The sentence for a drop the policies allow.
pub const NOT_EXPLAINED: &str =
    "not explained by NetworkPolicy: look at the CNI, host firewall or cloud security groups";

static NOT_EXPLAINED_TEXT: LazyLock<SharedStr> = LazyLock::new(|| NOT_EXPLAINED.into());
static LOST_ELSEWHERE: LazyLock<SharedStr> = LazyLock::new(|| {
    "NetworkPolicy allows this flow: the packets were lost elsewhere (another node's \
     firewall, a route, or the peer is down)"
        .into()
});

/// Past this many entries a per-record cache starts over (a bound on
/// memory; entries are cheap to rebuild).
const RECORD_CACHE_ENTRIES: usize = 16_384;

/// A pod's endpoint parts (namespace, labels, name, workloads, node, UID),
/// built once and shared by every record that names the pod. An entry is
/// used only while the pod still has what it was built from.
#[derive(Default)]
struct PodEndpoints {
    by_pod: hashbrown::HashMap<(String, String), PodEndpoint>,
}

struct PodEndpoint {
    uid: String,
    identity: u32,
    labels: LabelSet,
    workload: Option<Workload>,
    node_name: Option<String>,
    /// The endpoint without address and port.
    shared: Endpoint,
}

impl PodEndpoint {
    fn built_from(&self, pod: &PodIdentity) -> bool {
        self.identity == pod.identity
            && self.uid == pod.uid
            && self.labels == pod.labels
            && self.workload == pod.workload
            && self.node_name == pod.node_name
    }
}

/// A pod as (namespace, name), borrowed; hashes as the owned pair does.
#[derive(Hash)]
struct PodName<'a>(&'a str, &'a str);

impl hashbrown::Equivalent<(String, String)> for PodName<'_> {
    fn equivalent(&self, key: &(String, String)) -> bool {
        key.0 == self.0 && key.1 == self.1
    }
}

impl PodEndpoints {
    fn endpoint(&mut self, pod: &PodIdentity, ip: Option<IpAddr>, port: Option<u16>) -> Endpoint {
        let name = PodName(&pod.namespace, &pod.name);
        let shared = match self.by_pod.get(&name) {
            Some(e) if e.built_from(pod) => e.shared.clone(),
            _ => {
                if self.by_pod.len() >= RECORD_CACHE_ENTRIES {
                    self.by_pod.clear();
                }
                let shared = pod.endpoint(None, None);
                self.by_pod.insert(
                    (pod.namespace.clone(), pod.name.clone()),
                    PodEndpoint {
                        uid: pod.uid.clone(),
                        identity: pod.identity,
                        labels: pod.labels.clone(),
                        workload: pod.workload.clone(),
                        node_name: pod.node_name.clone(),
                        shared: shared.clone(),
                    },
                );
                shared
            }
        };
        Endpoint { ip, port, ..shared }
    }
}

/// What a policy verdict writes into a record, shared by the records of
/// one pair of peers (and port, protocol, and source port where rules name
/// source ports): the sentence and near misses are written once.
struct AppliedVerdict {
    staged: Option<StagedWhatIf>,
    egress_allowed_by: SharedList<PolicyRef>,
    ingress_allowed_by: SharedList<PolicyRef>,
    egress_denied_by: SharedList<PolicyRef>,
    ingress_denied_by: SharedList<PolicyRef>,
    near_misses: SharedList<String>,
    /// When the policies deny: the sentence, and the side that drops.
    denied: Option<(SharedStr, &'static str)>,
}

/// The peers, source port (where rules name source ports), port and
/// protocol an [`AppliedVerdict`] was given for.
#[derive(Clone, Debug, PartialEq, Eq)]
struct AppliedKey {
    from: Peer,
    to: Peer,
    source_port: Option<u16>,
    port: u16,
    protocol: Protocol,
}

impl std::hash::Hash for AppliedKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        hash_applied(
            PeerView::of(&self.from),
            PeerView::of(&self.to),
            (self.source_port, self.port, self.protocol),
            h,
        );
    }
}

/// A peer borrowed from a record (or from a [`Peer`]): how a known pair is
/// found without allocating its names.
#[derive(Clone, Copy, Debug)]
enum PeerView<'a> {
    Pod(&'a str, &'a str),
    Ip(IpAddr),
    Hypothetical(&'a str, &'a BTreeMap<String, String>),
}

impl<'a> PeerView<'a> {
    fn of(peer: &'a Peer) -> PeerView<'a> {
        match peer {
            Peer::Pod { namespace, name } => PeerView::Pod(namespace, name),
            Peer::Ip(ip) => PeerView::Ip(*ip),
            Peer::Hypothetical { namespace, labels } => PeerView::Hypothetical(namespace, labels),
        }
    }

    fn to_peer(self) -> Peer {
        match self {
            PeerView::Pod(namespace, name) => Peer::Pod {
                namespace: namespace.to_string(),
                name: name.to_string(),
            },
            PeerView::Ip(ip) => Peer::Ip(ip),
            PeerView::Hypothetical(namespace, labels) => Peer::Hypothetical {
                namespace: namespace.to_string(),
                labels: labels.clone(),
            },
        }
    }

    fn is(self, peer: &Peer) -> bool {
        match (self, PeerView::of(peer)) {
            (PeerView::Pod(a, b), PeerView::Pod(c, d)) => a == c && b == d,
            (PeerView::Ip(a), PeerView::Ip(b)) => a == b,
            (PeerView::Hypothetical(a, b), PeerView::Hypothetical(c, d)) => a == c && b == d,
            _ => false,
        }
    }
}

impl std::hash::Hash for PeerView<'_> {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        match self {
            PeerView::Pod(namespace, name) => {
                h.write_u8(0);
                namespace.hash(h);
                name.hash(h);
            }
            PeerView::Ip(ip) => {
                h.write_u8(1);
                ip.hash(h);
            }
            PeerView::Hypothetical(namespace, labels) => {
                h.write_u8(2);
                namespace.hash(h);
                labels.hash(h);
            }
        }
    }
}

fn hash_applied<H: std::hash::Hasher>(
    from: PeerView<'_>,
    to: PeerView<'_>,
    rest: (Option<u16>, u16, Protocol),
    h: &mut H,
) {
    use std::hash::Hash;
    from.hash(h);
    to.hash(h);
    rest.hash(h);
}

/// An [`AppliedKey`] borrowed from a record.
struct AppliedQuery<'a> {
    from: PeerView<'a>,
    to: PeerView<'a>,
    rest: (Option<u16>, u16, Protocol),
}

impl std::hash::Hash for AppliedQuery<'_> {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        hash_applied(self.from, self.to, self.rest, h);
    }
}

impl hashbrown::Equivalent<AppliedKey> for AppliedQuery<'_> {
    fn equivalent(&self, key: &AppliedKey) -> bool {
        self.rest == (key.source_port, key.port, key.protocol)
            && self.from.is(&key.from)
            && self.to.is(&key.to)
    }
}

/// Identity and policy state of the agent.
pub struct Attribution {
    config: AttributionConfig,
    identity: IdentityCache,
    cgroups: Option<CgroupIndex>,
    engine: Option<Arc<PolicyEngine>>,
    verdicts: VerdictCache,
    /// Whether a complete snapshot has arrived.
    synced: bool,
    not_enforced_seen: HashMap<VerdictKey, SystemTime>,
    /// The last policy error, logged once per change.
    policy_error: Option<String>,
    /// Where in the snapshots' change log the state is.
    applied: Option<LogPosition>,
    updates: UpdateCounts,
    pod_endpoints: PodEndpoints,
    /// Verdicts as written into records, by peers (see [`AppliedVerdict`]);
    /// emptied on every cluster update (the engine may change in place).
    applied_verdicts: hashbrown::HashMap<AppliedKey, Arc<AppliedVerdict>>,
}

/// How snapshots were taken in: change by change, or by a rebuild.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UpdateCounts {
    pub incremental: u64,
    pub rebuilds: u64,
}

impl Attribution {
    pub fn new(config: AttributionConfig) -> Attribution {
        let identity = IdentityCache::new(IdentityConfig {
            node_name: Some(config.node_name.clone()).filter(|n| !n.is_empty()),
            tombstone_grace: config.tombstone_grace,
            ..IdentityConfig::default()
        });
        let cgroups = config.cgroup_root.clone().map(CgroupIndex::new);
        Attribution {
            config,
            identity,
            cgroups,
            engine: None,
            verdicts: VerdictCache::default(),
            synced: false,
            not_enforced_seen: HashMap::new(),
            policy_error: None,
            applied: None,
            updates: UpdateCounts::default(),
            pod_endpoints: PodEndpoints::default(),
            applied_verdicts: hashbrown::HashMap::new(),
        }
    }

    /// Whether a complete view of the cluster has arrived.
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// A new snapshot. The changes it records since the last one are
    /// applied object by object where identity and policy state know how
    /// (see [`PolicyEngine::apply_changes`], [`IdentityCache::apply_changes`]),
    /// dropping only the cached verdicts they reach; anything else
    /// rebuilds both from the snapshot. `complete` says whether the source
    /// has listed everything once.
    pub fn update(&mut self, snapshot: &ClusterSnapshot, complete: bool, now: SystemTime) {
        let changes = self.applied.and_then(|at| snapshot.changes.since(at));
        self.applied = Some(snapshot.changes.position());
        // The engine changes only here (in place or rebuilt): what records
        // were given by peers must be judged again.
        self.applied_verdicts.clear();
        if changes.is_some_and(|changes| self.apply_changes(snapshot, &changes, now)) {
            self.updates.incremental += 1;
        } else {
            self.rebuild(snapshot, now);
            self.updates.rebuilds += 1;
        }
        self.synced |= complete;
    }

    /// Applies `changes` in place; `false` (with nothing changed) when only
    /// a rebuild can bring the state to `snapshot`.
    fn apply_changes(
        &mut self,
        snapshot: &ClusterSnapshot,
        changes: &[&Change],
        now: SystemTime,
    ) -> bool {
        // A re-list, or an engine kept after a policy error: rebuild.
        if changes.iter().any(|c| c.is_relist()) || self.policy_error.is_some() {
            return false;
        }
        let Some(engine) = self.engine.as_mut().and_then(Arc::get_mut) else {
            return false;
        };
        match engine.apply_changes(snapshot, changes) {
            Ok(Ok(reached)) => self.verdicts.invalidate(engine, &reached),
            Ok(Err(policy::Unapplied::Rebuild)) | Err(_) => return false,
        }
        // Only re-lists stop the identity cache, and they were ruled out.
        self.identity.apply_changes(snapshot, changes, now)
    }

    /// Rebuilds identities and the policy engine from `snapshot`.
    fn rebuild(&mut self, snapshot: &ClusterSnapshot, now: SystemTime) {
        self.identity.update(snapshot, now);
        match PolicyEngine::new(snapshot, self.config.engine) {
            Ok(engine) => {
                self.engine = Some(Arc::new(engine));
                self.verdicts.clear();
                self.policy_error = None;
            }
            Err(e) => {
                // Keep judging with the last good policies; say why once.
                let msg = e.to_string();
                if self.policy_error.as_deref() != Some(msg.as_str()) {
                    warn!("NetworkPolicies not updated, the previous ones stay in use: {msg}");
                    self.policy_error = Some(msg);
                }
            }
        }
    }

    /// How many updates were applied change by change, and how many rebuilt.
    pub fn update_counts(&self) -> UpdateCounts {
        self.updates
    }

    /// The identity cache, as the last update left it.
    pub fn identity(&self) -> &IdentityCache {
        &self.identity
    }

    /// The verdict on a flow, through the verdict cache, as records get
    /// it; `None` before the policies are known.
    pub fn verdict(
        &self,
        from: &Peer,
        to: &Peer,
        source_port: Option<u16>,
        port: u16,
        protocol: Protocol,
    ) -> Option<FlowVerdict> {
        let engine = self.engine.as_deref()?;
        Some(
            self.verdicts
                .evaluate(engine, from, to, source_port, port, protocol),
        )
    }

    /// Forget tombstones and rate-limit state past their time.
    pub fn expire(&mut self, now: SystemTime) {
        self.identity.expire(now);
        let interval = self.config.not_enforced_interval;
        self.not_enforced_seen
            .retain(|_, t| now.duration_since(*t).unwrap_or_default() < interval);
    }

    /// Fill in endpoints, service and policy attribution of a record.
    pub fn enrich(&mut self, r: &mut FlowRecord) {
        let at: SystemTime = r.first_seen.into();
        let dport = r.destination.port;
        let sport = source_port(r);
        let (src_ip, dst_ip) = (r.ip.source, r.ip.destination);
        let client_pod = self.enrich_endpoints(r);

        // The service the client addressed, before DNAT or on its own.
        let protocol = l4_protocol(&r.l4);
        let addressed = r
            .original_destination
            .as_ref()
            .map(|o| (o.ip, Some(o.port)))
            .unwrap_or((dst_ip, dport));
        let service = match self.identity.resolve(addressed.0, addressed.1, at) {
            IpResolution::Service(s) => Some(s.clone()),
            _ => None,
        };
        if let Some(s) = &service {
            r.destination.service = Some(s.service.clone());
            if r.destination.namespace.is_empty() {
                r.destination.namespace = s.service.namespace.as_str().into();
            }
        }

        // A refused or unanswered connect to a service with no ready endpoint:
        // the classic failing readiness probe, not a policy.
        if matches!(r.verdict, Verdict::Refused | Verdict::TimedOut)
            && let (Some(_), Some(port), Some(proto)) = (&service, addressed.1, protocol)
            && let Some(readiness @ ServiceReadiness::NoReadyEndpoints { .. }) = self
                .identity
                .service_readiness(addressed.0, port, ip_protocol(proto))
        {
            r.explanation = Some(readiness.to_string().into());
            return;
        }

        let (Some(engine), Some(proto), Some(port)) = (self.engine.clone(), protocol, dport) else {
            return;
        };
        // A flow still addressed to a service IP has no known backend: the
        // policies apply to backends, so there is nothing to judge yet.
        if service.is_some()
            && r.original_destination.is_none()
            && r.destination.pod_name.is_empty()
        {
            return;
        }
        let query = AppliedQuery {
            from: self.peer_view(&engine, &r.source, client_pod.as_ref(), src_ip, at),
            to: self.peer_view(&engine, &r.destination, None, dst_ip, at),
            rest: (engine.source_port_key(sport), port, proto),
        };
        let applied = match self.applied_verdicts.get(&query) {
            Some(a) => a.clone(),
            None => {
                let key = AppliedKey {
                    from: query.from.to_peer(),
                    to: query.to.to_peer(),
                    source_port: query.rest.0,
                    port,
                    protocol: proto,
                };
                let verdict = self
                    .verdicts
                    .evaluate(&engine, &key.from, &key.to, sport, port, proto);
                let applied = Arc::new(AppliedVerdict::new(&verdict));
                if self.applied_verdicts.len() >= RECORD_CACHE_ENTRIES {
                    self.applied_verdicts.clear();
                }
                self.applied_verdicts.insert(key, applied.clone());
                applied
            }
        };
        applied.write(r);
    }

    /// A completed handshake (`r` from the assembler's one-shot record):
    /// the record back if the policies deny it, rate-limited per identity
    /// pair; `None` when they allow it or it was reported recently.
    pub fn not_enforced(&mut self, mut r: FlowRecord, now: SystemTime) -> Option<FlowRecord> {
        let engine = self.engine.clone()?;
        let proto = l4_protocol(&r.l4)?;
        let port = r.destination.port?;
        let at: SystemTime = r.first_seen.into();
        // The client's view of a handshake through a service (to the cluster
        // IP, before DNAT) is not what the policies judge: the same handshake
        // seen at the backend (after DNAT) is, and is reported from there.
        if matches!(
            self.identity.resolve(r.ip.destination, Some(port), at),
            IpResolution::Service(_)
        ) {
            return None;
        }
        let client_pod = self.enrich_endpoints(&mut r);
        let from = self.peer(&engine, &r.source, client_pod.as_ref(), r.ip.source, at);
        let to = self.peer(&engine, &r.destination, None, r.ip.destination, at);
        let sport = source_port(&r);
        let verdict = self
            .verdicts
            .evaluate(&engine, &from, &to, sport, port, proto);
        if verdict.verdict != policy::PolicyVerdict::Denied {
            return None;
        }
        // Only denied handshakes are rate-limited: the key is not needed for
        // the common, allowed case.
        // Per identity pair, whatever the source port (each connection has
        // its own).
        let key = engine.verdict_key(&from, &to, None, port, proto);
        if let Some(t) = self.not_enforced_seen.get(&key)
            && now.duration_since(*t).unwrap_or_default() < self.config.not_enforced_interval
        {
            return None;
        }
        self.not_enforced_seen.insert(key, now);
        AppliedVerdict::new(&verdict).write(&mut r);
        r.verdict = Verdict::PolicyNotEnforced;
        r.explanation = Some(SharedStr::from(format!(
            "{}; yet the connection was established: the CNI does not enforce NetworkPolicy for this \
             pair{}",
            verdict.sentence(),
            if client_pod.as_ref().is_some_and(|p| p.host_network) {
                " (the client is a hostNetwork pod, whose traffic counts as the node's)"
            } else {
                ""
            }
        )));
        Some(r)
    }

    /// Fill in both endpoints at the flow's time; returns the pod that owns
    /// the client's socket (by cgroup), which the policy peers need too.
    fn enrich_endpoints(&mut self, r: &mut FlowRecord) -> Option<PodIdentity> {
        let at: SystemTime = r.first_seen.into();
        let client_pod = r.cgroup_id.and_then(|id| self.pod_for_cgroup(id));
        r.source = match &client_pod {
            Some(pod) => self
                .pod_endpoints
                .endpoint(pod, Some(r.ip.source), r.source.port),
            None => self.endpoint(r.ip.source, r.source.port, at),
        };
        r.destination = self.endpoint(r.ip.destination, r.destination.port, at);
        client_pod
    }

    /// The endpoint at `ip` at `at`; a pod's parts are shared.
    fn endpoint(&mut self, ip: IpAddr, port: Option<u16>, at: SystemTime) -> Endpoint {
        match self.identity.resolve(ip, port, at) {
            IpResolution::Pod(pod) => self.pod_endpoints.endpoint(pod, Some(ip), port),
            other => other.to_endpoint(ip, port),
        }
    }

    /// The pod whose container owns a cgroup.
    fn pod_for_cgroup(&mut self, cgroup_id: u64) -> Option<PodIdentity> {
        let index = self.cgroups.as_mut()?;
        let uid = match index.resolve(cgroup_id) {
            Ok(Some(c)) => c.pod_uid.clone(),
            Ok(None) => return None,
            Err(e) => {
                debug!("cgroup {cgroup_id}: {e}");
                return None;
            }
        };
        self.identity.pod_by_uid(&uid).cloned()
    }

    /// [`Attribution::peer`], borrowed from the record or the identity
    /// cache.
    fn peer_view<'a>(
        &'a self,
        engine: &PolicyEngine,
        endpoint: &'a Endpoint,
        socket_pod: Option<&PodIdentity>,
        ip: IpAddr,
        at: SystemTime,
    ) -> PeerView<'a> {
        if socket_pod.is_some_and(|p| p.host_network) || endpoint.pod_name.is_empty() {
            return PeerView::Ip(ip);
        }
        if engine.knows_pod(&endpoint.namespace, &endpoint.pod_name) {
            return PeerView::Pod(&endpoint.namespace, &endpoint.pod_name);
        }
        match self.identity.pod_at(ip, at) {
            Some(p) => PeerView::Hypothetical(&p.namespace, &p.labels),
            None => PeerView::Ip(ip),
        }
    }

    /// How the engine should see one end of a flow.
    fn peer(
        &self,
        engine: &PolicyEngine,
        endpoint: &Endpoint,
        socket_pod: Option<&PodIdentity>,
        ip: IpAddr,
        at: SystemTime,
    ) -> Peer {
        // hostNetwork pods' traffic is the node's: policies see its address.
        if socket_pod.is_some_and(|p| p.host_network) {
            return Peer::Ip(ip);
        }
        if endpoint.pod_name.is_empty() {
            return Peer::Ip(ip);
        }
        let pod = Peer::Pod {
            namespace: endpoint.namespace.to_string(),
            name: endpoint.pod_name.to_string(),
        };
        if engine.check_peer(&pod).is_ok() {
            return pod;
        }
        // A pod deleted since (a tombstone): judge it by what it was.
        match self.identity.pod_at(ip, at) {
            Some(p) => Peer::Hypothetical {
                namespace: p.namespace.clone(),
                labels: p.labels.labels().clone(),
            },
            None => Peer::Ip(ip),
        }
    }
}

fn l4_protocol(l4: &L4) -> Option<Protocol> {
    match l4 {
        L4::Tcp(_) => Some(Protocol::Tcp),
        L4::Udp(_) => Some(Protocol::Udp),
        L4::Sctp(_) => Some(Protocol::Sctp),
        _ => None,
    }
}

fn ip_protocol(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => netwatch_common::IPPROTO_TCP,
        Protocol::Udp => netwatch_common::IPPROTO_UDP,
        Protocol::Sctp => netwatch_common::IPPROTO_SCTP,
    }
}

/// The staged policies' what-if for a record: only when enforcing them
/// would change the verdict or the policies that decide it.
fn staged_what_if(
    enforced: &policy::PolicyDecision,
    staged: &policy::PolicyDecision,
) -> Option<StagedWhatIf> {
    let same = staged.verdict == enforced.verdict
        && staged.egress.denied_by == enforced.egress.denied_by
        && staged.ingress.denied_by == enforced.ingress.denied_by
        && staged.egress.allowed_by == enforced.egress.allowed_by
        && staged.ingress.allowed_by == enforced.ingress.allowed_by;
    if same {
        return None;
    }
    Some(StagedWhatIf {
        verdict: staged.verdict.as_str().into(),
        would_deny_if_enforced: enforced.verdict == policy::PolicyVerdict::Allowed
            && staged.verdict == policy::PolicyVerdict::Denied,
        egress_denied_by: staged.egress.denied_by.clone(),
        ingress_denied_by: staged.ingress.denied_by.clone(),
        egress_allowed_by: staged.egress.allowed_by.clone(),
        ingress_allowed_by: staged.ingress.allowed_by.clone(),
    })
}

/// Write a policy verdict into a record.
/// The source port policies judge the record by: unknown for an aggregate
/// (it stands for many source ports and carries 0).
fn source_port(r: &FlowRecord) -> Option<u16> {
    r.source.port.filter(|_| r.aggregate.is_none())
}

impl AppliedVerdict {
    fn new(v: &FlowVerdict) -> AppliedVerdict {
        let denied = (v.verdict == policy::PolicyVerdict::Denied).then(|| {
            // The side whose policy stops the packet: a CNI checks the
            // source's egress before the destination's ingress, so when
            // both deny the drop happens at egress.
            let side = if v.egress.verdict == policy::PolicyVerdict::Denied {
                "EGRESS"
            } else {
                "INGRESS"
            };
            (SharedStr::from(v.sentence()), side)
        });
        AppliedVerdict {
            staged: v
                .staged
                .as_deref()
                .and_then(|staged| staged_what_if(&v.decision, staged)),
            egress_allowed_by: v.egress.allowed_by.clone().into(),
            ingress_allowed_by: v.ingress.allowed_by.clone().into(),
            egress_denied_by: v.egress.denied_by.clone().into(),
            ingress_denied_by: v.ingress.denied_by.clone().into(),
            near_misses: v
                .egress
                .near_misses
                .iter()
                .map(|m| format!("egress: {m}"))
                .chain(
                    v.ingress
                        .near_misses
                        .iter()
                        .map(|m| format!("ingress: {m}")),
                )
                .collect(),
            denied,
        }
    }

    /// Write the verdict into a record.
    fn write(&self, r: &mut FlowRecord) {
        r.staged = self.staged.clone();
        r.egress_allowed_by = self.egress_allowed_by.clone();
        r.ingress_allowed_by = self.ingress_allowed_by.clone();
        r.egress_denied_by = self.egress_denied_by.clone();
        r.ingress_denied_by = self.ingress_denied_by.clone();
        r.near_misses = self.near_misses.clone();
        if let Some((sentence, side)) = &self.denied {
            r.explanation = Some(sentence.clone());
            r.traffic_direction = (*side).into();
        } else if r.verdict == Verdict::Dropped {
            r.explanation = Some(NOT_EXPLAINED_TEXT.clone());
        } else if r.verdict == Verdict::TimedOut {
            r.explanation = Some(LOST_ELSEWHERE.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use kube::runtime::watcher::Event;

    use super::*;
    use crate::cluster::PodRecord;
    use crate::identity::kube::{ObjectEvent, SnapshotWriter};

    /// Labels no other test uses: the label sets in use are the process's.
    fn cart_labels() -> BTreeMap<String, String> {
        [("app", "label-sets-test-cart"), ("tier", "back")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    fn cart(name: &str, ip: &str) -> PodRecord {
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "shop", "uid": name, "resourceVersion": "1",
                         "labels": cart_labels()},
            "spec": {"nodeName": "node-1", "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "podIP": ip}
        }))
        .expect("valid pod");
        PodRecord::from(pod)
    }

    #[test]
    fn pods_identities_and_policy_models_share_one_label_set_freed_after_the_last_pod() {
        let mut writer = SnapshotWriter::default();
        let mut snapshot = ClusterSnapshot::default();
        writer.apply(ObjectEvent::Pod(Event::Init), || &mut snapshot);
        for pod in [cart("cart-1", "10.1.0.1"), cart("cart-2", "10.1.0.2")] {
            writer.apply(ObjectEvent::Pod(Event::InitApply(pod)), || &mut snapshot);
        }
        writer.apply(ObjectEvent::Pod(Event::InitDone), || &mut snapshot);
        let mut attribution = Attribution::new(AttributionConfig {
            node_name: "node-1".into(),
            tombstone_grace: Duration::from_secs(30),
            ..AttributionConfig::default()
        });
        let mut now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        attribution.update(&snapshot, true, now);

        // One map for both pods, their identities and their policy models.
        let set = snapshot.pods[0].label_set().clone();
        assert!(LabelSet::same(&set, snapshot.pods[1].label_set()));
        for name in ["cart-1", "cart-2"] {
            let identity = attribution
                .identity()
                .pod_by_name("shop", name)
                .expect("identity");
            assert!(LabelSet::same(&set, &identity.labels));
        }
        let engine = attribution.engine.as_ref().expect("engine");
        assert_eq!(engine.model.pods.len(), 2);
        assert!(
            engine
                .model
                .pods
                .iter()
                .all(|p| LabelSet::same(&set, &p.labels))
        );
        drop(set);

        // Deleted one by one, applied change by change.
        for name in ["cart-1", "cart-2"] {
            let gone = snapshot
                .pods
                .iter()
                .find(|p| p.name() == Some(name))
                .cloned()
                .expect("listed");
            writer.apply(ObjectEvent::Pod(Event::Delete(gone)), || &mut snapshot);
            now += Duration::from_secs(1);
            attribution.update(&snapshot, true, now);
            // Tombstones keep what the pods were, for late flows.
            assert!(LabelSet::in_use(&cart_labels()).is_some());
        }
        assert_eq!(attribution.update_counts().incremental, 2);
        now += Duration::from_secs(60);
        attribution.expire(now);
        assert!(LabelSet::in_use(&cart_labels()).is_none());
    }
}
