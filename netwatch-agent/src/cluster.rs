//! The Kubernetes objects netwatch works from, in one snapshot.
//!
//! Both sources produce the same [`ClusterSnapshot`]: [`crate::manifests`]
//! (YAML files, standalone mode and `netwatch explain`) and the API server's
//! watchers ([`crate::identity`]). The policy engine and the identity cache are
//! built from it, so they always agree on what the cluster looks like.

use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet},
    batch::v1::{CronJob, Job},
    core::v1::{Namespace, Node, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

mod labels;
mod pod;

pub use labels::LabelSet;
pub use pod::{PodContainer, PodOwner, PodPort, PodRecord};

use crate::policy::api::calico::{CalicoCrds, CalicoManifests};
use crate::policy::api::cluster::{
    AdminNetworkPolicy, BaselineAdminNetworkPolicy, ClusterNetworkPolicy,
};

/// Every object kind netwatch reads, as typed Kubernetes objects (pods as
/// compact records: they are most of a cluster).
#[derive(Clone, Debug, Default)]
pub struct ClusterSnapshot {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<PodRecord>,
    pub network_policies: Vec<NetworkPolicy>,
    /// policy.networking.k8s.io/v1alpha2, tiers Admin and Baseline.
    pub cluster_network_policies: Vec<ClusterNetworkPolicy>,
    /// policy.networking.k8s.io/v1alpha1, the Admin tier.
    pub admin_network_policies: Vec<AdminNetworkPolicy>,
    /// policy.networking.k8s.io/v1alpha1, the Baseline tier (only `default`).
    pub baseline_admin_network_policies: Vec<BaselineAdminNetworkPolicy>,
    /// projectcalico.org/v3: Tiers, NetworkPolicies, GlobalNetworkPolicies
    /// and the staged kinds. When any is present the engine judges flows
    /// by Calico's tiers (see [`crate::policy::api::calico`]).
    pub calico: CalicoManifests,
    /// The same kinds from Calico's CRDs (`crd.projectcalico.org/v1`, API
    /// mode): used when `calico` (the Calico API server's view) is empty.
    pub calico_crds: CalicoCrds,
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub nodes: Vec<Node>,
    pub deployments: Vec<Deployment>,
    pub replica_sets: Vec<ReplicaSet>,
    pub stateful_sets: Vec<StatefulSet>,
    pub daemon_sets: Vec<DaemonSet>,
    pub jobs: Vec<Job>,
    pub cron_jobs: Vec<CronJob>,
    /// Which objects changed, for consumers that apply changes instead of
    /// rebuilding (see [`ChangeLog`]).
    pub changes: ChangeLog,
}

/// What a source remembers of the snapshots it published, to publish a
/// fresh load of the whole cluster (a manifest reload) as changes of the
/// last one: a hash of each object, and the change log. Consumers then
/// apply what differs instead of rebuilding. About 100 bytes an object;
/// the objects themselves are not kept.
#[derive(Debug, Default)]
pub struct Lineage {
    log: ChangeLog,
    /// (list, namespace, name) -> hash of the object.
    objects: std::collections::HashMap<(ListKind, String, String), u64>,
    /// Hash of the kinds not applied object by object (Calico's); `None`
    /// before the first load.
    rest: Option<u64>,
}

/// The lists of a snapshot whose objects are followed one by one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum ListKind {
    Namespace,
    Pod,
    NetworkPolicy,
    Service,
    EndpointSlice,
    Node,
    ReplicaSet,
    Job,
    Deployment,
    StatefulSet,
    DaemonSet,
    CronJob,
    ClusterNetworkPolicy,
    AdminNetworkPolicy,
    BaselineAdminNetworkPolicy,
}

impl ListKind {
    fn change_kind(self) -> ChangeKind {
        match self {
            ListKind::Namespace => ChangeKind::Namespace,
            ListKind::Pod => ChangeKind::Pod,
            ListKind::NetworkPolicy => ChangeKind::NetworkPolicy,
            ListKind::Service => ChangeKind::Service,
            ListKind::EndpointSlice => ChangeKind::EndpointSlice,
            ListKind::Node => ChangeKind::Node,
            ListKind::ReplicaSet | ListKind::Job => ChangeKind::PodOwner,
            ListKind::Deployment
            | ListKind::StatefulSet
            | ListKind::DaemonSet
            | ListKind::CronJob => ChangeKind::Workload,
            ListKind::ClusterNetworkPolicy
            | ListKind::AdminNetworkPolicy
            | ListKind::BaselineAdminNetworkPolicy => ChangeKind::ClusterPolicy,
        }
    }
}

/// Feeds what serde writes into a hasher, without a buffer.
struct HashWriter(std::collections::hash_map::DefaultHasher);

impl std::io::Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::hash::Hasher::write(&mut self.0, buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn digest(value: &impl serde::Serialize) -> u64 {
    let mut w = HashWriter(Default::default());
    // Writing to a hasher does not fail, and these kinds serialize.
    let _ = serde_json::to_writer(&mut w, value);
    std::hash::Hasher::finish(&w.0)
}

/// (namespace, name, hash) of each object.
fn hashed<T: serde::Serialize>(
    items: &[T],
    meta: impl Fn(&T) -> &ObjectMeta,
) -> Vec<(&str, &str, u64)> {
    items
        .iter()
        .map(|o| {
            let m = meta(o);
            (
                m.namespace.as_deref().unwrap_or_default(),
                m.name.as_deref().unwrap_or_default(),
                digest(o),
            )
        })
        .collect()
}

fn hashed_pods(pods: &[PodRecord]) -> Vec<(&str, &str, u64)> {
    pods.iter()
        .map(|p| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            std::hash::Hash::hash(p, &mut h);
            (
                p.namespace(),
                p.name().unwrap_or_default(),
                std::hash::Hasher::finish(&h),
            )
        })
        .collect()
}

impl Lineage {
    /// Gives `snapshot`, loaded afresh, a change log that goes on from the
    /// last snapshot given here, recording each object added, changed or
    /// removed since. Calico's kinds, not applied object by object, are
    /// recorded as a re-list when they changed, which rebuilds.
    /// The first snapshot starts the log.
    pub fn follow(&mut self, snapshot: &mut ClusterSnapshot) {
        let s = &*snapshot;
        let lists = [
            (ListKind::Namespace, hashed(&s.namespaces, |o| &o.metadata)),
            (ListKind::Pod, hashed_pods(&s.pods)),
            (
                ListKind::NetworkPolicy,
                hashed(&s.network_policies, |o| &o.metadata),
            ),
            (ListKind::Service, hashed(&s.services, |o| &o.metadata)),
            (
                ListKind::EndpointSlice,
                hashed(&s.endpoint_slices, |o| &o.metadata),
            ),
            (ListKind::Node, hashed(&s.nodes, |o| &o.metadata)),
            (
                ListKind::ReplicaSet,
                hashed(&s.replica_sets, |o| &o.metadata),
            ),
            (ListKind::Job, hashed(&s.jobs, |o| &o.metadata)),
            (
                ListKind::Deployment,
                hashed(&s.deployments, |o| &o.metadata),
            ),
            (
                ListKind::StatefulSet,
                hashed(&s.stateful_sets, |o| &o.metadata),
            ),
            (ListKind::DaemonSet, hashed(&s.daemon_sets, |o| &o.metadata)),
            (ListKind::CronJob, hashed(&s.cron_jobs, |o| &o.metadata)),
            (
                ListKind::ClusterNetworkPolicy,
                hashed(&s.cluster_network_policies, |o| &o.metadata),
            ),
            (
                ListKind::AdminNetworkPolicy,
                hashed(&s.admin_network_policies, |o| &o.metadata),
            ),
            (
                ListKind::BaselineAdminNetworkPolicy,
                hashed(&s.baseline_admin_network_policies, |o| &o.metadata),
            ),
        ];
        let mut objects = std::collections::HashMap::with_capacity(self.objects.len());
        let mut changed: Vec<(ListKind, String, String, Option<usize>)> = Vec::new();
        for (kind, items) in lists {
            for (i, (namespace, name, hash)) in items.into_iter().enumerate() {
                let key = (kind, namespace.to_owned(), name.to_owned());
                if self.objects.get(&key) != Some(&hash) {
                    changed.push((kind, key.1.clone(), key.2.clone(), Some(i)));
                }
                // The last object of a name wins, as in the loader.
                objects.insert(key, hash);
            }
        }
        // Removed objects, in a stable order.
        let mut removed: Vec<&(ListKind, String, String)> = self
            .objects
            .keys()
            .filter(|k| !objects.contains_key(*k))
            .collect();
        removed.sort_by(|a, b| (&a.1, &a.2).cmp(&(&b.1, &b.2)));
        changed.extend(
            removed
                .into_iter()
                .map(|(kind, ns, name)| (*kind, ns.clone(), name.clone(), None)),
        );
        // Calico's objects do not serialize as one value: their debug form
        // stands for them.
        let rest = digest(&format!("{:?}{:?}", s.calico, s.calico_crds));
        if self.rest.is_some() {
            for (kind, namespace, name, position) in changed {
                self.log.record(Change {
                    kind: kind.change_kind(),
                    namespace,
                    name: Some(name),
                    position,
                });
            }
            if self.rest != Some(rest) {
                self.log.record(Change {
                    kind: ChangeKind::Calico,
                    namespace: String::new(),
                    name: None,
                    position: None,
                });
            }
        }
        self.objects = objects;
        self.rest = Some(rest);
        snapshot.changes = self.log.clone();
    }
}

/// The kinds whose changes consumers can apply one object at a time; any
/// other kind is [`ChangeKind::Other`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    Namespace,
    Pod,
    Service,
    EndpointSlice,
    /// networking.k8s.io/v1 NetworkPolicy.
    NetworkPolicy,
    Node,
    /// policy.networking.k8s.io's cluster-scoped tiers:
    /// ClusterNetworkPolicy, AdminNetworkPolicy, BaselineAdminNetworkPolicy.
    ClusterPolicy,
    /// ReplicaSets and Jobs: they name the workload of their pods.
    PodOwner,
    /// Deployments, StatefulSets, DaemonSets, CronJobs: nothing reads them
    /// but the workload names pods already carry.
    Workload,
    /// Calico's kinds (tiers, policies, staged policies, from its API
    /// server or its CRDs), or all of them at once (a manifest reload):
    /// the policy engine compiles Calico's policies again.
    Calico,
    /// A kind consumers do not apply one by one: they rebuild.
    Other,
}

/// One object that changed (added, modified or deleted), or a whole kind
/// (a re-list) when `name` is `None`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub kind: ChangeKind,
    pub namespace: String,
    pub name: Option<String>,
    /// Where the object sat in its list when it changed: a hint, checked
    /// by name before use (later deletes move objects). `None` for an
    /// object that was gone (deleted, or missing from a re-list).
    pub position: Option<usize>,
}

impl Change {
    /// A whole kind that consumers follow object by object (a re-list
    /// whose differences were not recorded): they rebuild. Calico's kinds
    /// are compiled whole on any change, so for them it is a change like
    /// any other.
    pub fn is_relist(&self) -> bool {
        self.name.is_none() && self.kind != ChangeKind::Calico
    }

    /// Whether the kind's objects have no namespace.
    fn cluster_scoped(&self) -> bool {
        matches!(
            self.kind,
            ChangeKind::Namespace | ChangeKind::Node | ChangeKind::ClusterPolicy
        )
    }

    /// The object this change names, as `objects` (its kind's list in the
    /// snapshot the change was read from) has it: at its position hint, or
    /// found by a scan when later changes moved it; `None` when it is gone.
    /// [`ChangeLog::since`] gives an object's last change only, so a
    /// change without a position is an object gone, with no scan.
    pub fn locate<'s, T>(
        &self,
        objects: &'s [T],
        meta: impl Fn(&T) -> &ObjectMeta,
    ) -> Option<&'s T> {
        self.locate_by(objects, |o| {
            let m = meta(o);
            (
                m.namespace.as_deref().unwrap_or_default(),
                m.name.as_deref().unwrap_or_default(),
            )
        })
    }

    /// The pod this change names, as [`Change::locate`] finds an object
    /// (the last of the name wins, as in the loader).
    pub fn find_pod<'s>(&self, pods: &'s [PodRecord]) -> Option<&'s PodRecord> {
        self.locate_by(pods, |p| (p.namespace(), p.name().unwrap_or_default()))
    }

    /// [`Change::locate`] over objects read by `key`: (namespace, name).
    fn locate_by<'s, T>(
        &self,
        objects: &'s [T],
        key: impl Fn(&T) -> (&str, &str),
    ) -> Option<&'s T> {
        let name = self.name.as_deref()?;
        let at = self.position?;
        // Pods' records file a missing namespace under "default".
        let namespace = match self.namespace.as_str() {
            "" if self.kind == ChangeKind::Pod => "default",
            ns => ns,
        };
        let is = |o: &&T| {
            let (ns, n) = key(o);
            n == name && (self.cluster_scoped() || ns == namespace)
        };
        objects
            .get(at)
            .filter(is)
            .or_else(|| objects.iter().rev().find(is))
    }
}

static CHANGE_LOG_ORIGINS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The last changes made to a snapshot, numbered. A consumer remembers the
/// [`ChangeLog::position`] it applied and asks for what happened since;
/// when the log cannot say (another source, or too many changes since),
/// it rebuilds from the snapshot. Snapshots published by the API source
/// carry one; a manifest reload starts a new log (a rebuild).
#[derive(Clone, Debug)]
pub struct ChangeLog {
    /// Which lineage of snapshots this log belongs to.
    origin: u64,
    revision: u64,
    /// (revision, change), oldest first.
    entries: std::collections::VecDeque<(u64, Change)>,
}

/// Changes kept: more than any debounce interval's worth in a steady
/// cluster; past it consumers rebuild.
const CHANGE_LOG_CAPACITY: usize = 2048;

impl Default for ChangeLog {
    fn default() -> Self {
        ChangeLog {
            origin: CHANGE_LOG_ORIGINS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            revision: 0,
            entries: std::collections::VecDeque::new(),
        }
    }
}

/// Where a consumer is in a [`ChangeLog`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogPosition {
    origin: u64,
    revision: u64,
}

impl ChangeLog {
    /// Notes one change.
    pub fn record(&mut self, change: Change) {
        self.revision += 1;
        if self.entries.len() >= CHANGE_LOG_CAPACITY {
            self.entries.pop_front();
        }
        self.entries.push_back((self.revision, change));
    }

    /// How many changes were recorded.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Where the log is now.
    pub fn position(&self) -> LogPosition {
        LogPosition {
            origin: self.origin,
            revision: self.revision,
        }
    }

    /// The changes after `from`, oldest first; `None` when the log does
    /// not have them all.
    pub fn since(&self, from: LogPosition) -> Option<Vec<&Change>> {
        if from.origin != self.origin || from.revision > self.revision {
            return None;
        }
        if from.revision == self.revision {
            return Some(Vec::new());
        }
        let first = self.entries.front()?.0;
        if first > from.revision + 1 {
            return None;
        }
        // Each change brings its object to what the snapshot has: only an
        // object's last change counts (see [`Change::locate`]).
        let mut seen = std::collections::HashSet::new();
        let mut changes: Vec<&Change> = self
            .entries
            .iter()
            .rev()
            .take_while(|(r, _)| *r > from.revision)
            .map(|(_, c)| c)
            .filter(|c| c.name.is_none() || seen.insert((c.kind, &c.namespace, &c.name)))
            .collect();
        changes.reverse();
        Some(changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> Change {
        Change {
            kind: ChangeKind::Pod,
            namespace: "x".into(),
            name: Some(name.into()),
            position: None,
        }
    }

    fn pod_object(name: &str, ip: &str) -> PodRecord {
        serde_json::from_value::<k8s_openapi::api::core::v1::Pod>(serde_json::json!({
            "metadata": {"name": name, "namespace": "x"},
            "status": {"podIP": ip},
        }))
        .unwrap()
        .into()
    }

    #[test]
    fn a_reload_is_recorded_as_the_objects_that_differ() {
        let mut lineage = Lineage::default();
        let mut first = ClusterSnapshot {
            pods: vec![pod_object("a", "10.0.0.1"), pod_object("b", "10.0.0.2")],
            ..ClusterSnapshot::default()
        };
        lineage.follow(&mut first);
        let at = first.changes.position();
        assert_eq!(first.changes.since(at), Some(vec![]));
        // a changed, b gone, c new; the same objects again change nothing.
        let mut second = ClusterSnapshot {
            pods: vec![
                pod_object("c", "10.0.0.3"),
                pod_object("a", "10.0.0.9"),
                pod_object("d", "10.0.0.4"),
            ],
            ..ClusterSnapshot::default()
        };
        lineage.follow(&mut second);
        let changes: Vec<(Option<String>, Option<usize>)> = second
            .changes
            .since(at)
            .expect("the same lineage")
            .into_iter()
            .map(|c| {
                assert_eq!((c.kind, c.namespace.as_str()), (ChangeKind::Pod, "x"));
                (c.name.clone(), c.position)
            })
            .collect();
        assert_eq!(
            changes,
            vec![
                (Some("c".into()), Some(0)),
                (Some("a".into()), Some(1)),
                (Some("d".into()), Some(2)),
                (Some("b".into()), None),
            ]
        );
        let at = second.changes.position();
        let mut third = second.clone();
        lineage.follow(&mut third);
        assert_eq!(third.changes.since(at), Some(vec![]));
        // A cluster policy: followed object by object, as its kind.
        let mut fourth = ClusterSnapshot {
            admin_network_policies: vec![
                serde_json::from_value(serde_json::json!({
                    "metadata": {"name": "deny-all"},
                    "spec": {"priority": 1, "subject": {"namespaces": {}}},
                }))
                .expect("an AdminNetworkPolicy"),
            ],
            ..second.clone()
        };
        lineage.follow(&mut fourth);
        let changes = fourth.changes.since(at).expect("the same lineage");
        assert!(
            matches!(changes.as_slice(), [c] if c.kind == ChangeKind::ClusterPolicy
                && c.name.as_deref() == Some("deny-all")),
            "{changes:?}"
        );
        // A kind not followed object by object (Calico's): a re-list,
        // which rebuilds.
        let at = fourth.changes.position();
        let mut fifth = fourth.clone();
        fifth.calico.tiers.push(Default::default());
        lineage.follow(&mut fifth);
        let changes = fifth.changes.since(at).expect("the same lineage");
        assert!(
            matches!(changes.as_slice(), [c] if c.kind == ChangeKind::Calico && c.name.is_none()),
            "{changes:?}"
        );
    }

    #[test]
    fn a_change_log_gives_what_happened_since_a_position_or_nothing_when_it_cannot() {
        let mut log = ChangeLog::default();
        let start = log.position();
        assert_eq!(log.since(start), Some(vec![]));
        log.record(pod("a"));
        let middle = log.position();
        log.record(pod("b"));
        let names = |changes: Vec<&Change>| -> Vec<String> {
            changes.iter().filter_map(|c| c.name.clone()).collect()
        };
        assert_eq!(
            log.since(start).map(names),
            Some(vec!["a".into(), "b".into()])
        );
        assert_eq!(log.since(middle).map(names), Some(vec!["b".into()]));
        // Another lineage (a manifest reload, another source): rebuild.
        assert_eq!(ChangeLog::default().since(middle), None);
        // A copy goes on from the same position (the API source's
        // copy-on-write).
        let mut copy = log.clone();
        copy.record(pod("c"));
        assert_eq!(
            copy.since(middle).map(names),
            Some(vec!["b".into(), "c".into()])
        );
        // Past its capacity the oldest changes are gone: rebuild.
        for i in 0..CHANGE_LOG_CAPACITY {
            log.record(pod(&i.to_string()));
        }
        assert_eq!(log.since(start), None);
        assert_eq!(log.since(middle), None);
        let recent = log.position();
        log.record(pod("d"));
        assert_eq!(log.since(recent).map(names), Some(vec!["d".into()]));
    }

    #[test]
    fn only_an_objects_last_change_is_given_and_one_without_a_position_is_gone() {
        let mut log = ChangeLog::default();
        let start = log.position();
        let at = |name: &str, position| Change {
            position,
            ..pod(name)
        };
        log.record(at("a", Some(0)));
        log.record(at("b", Some(1)));
        log.record(at("a", None));
        log.record(at("b", Some(0)));
        let changes = log.since(start).expect("the same log");
        assert_eq!(changes, vec![&at("a", None), &at("b", Some(0))]);
        // "a" was deleted: even a pod of that name in the list (which no
        // snapshot the log describes would have) is not scanned for.
        let pods = [pod_object("b", "10.0.0.2"), pod_object("a", "10.0.0.1")];
        assert!(changes[0].find_pod(&pods).is_none());
        // "b" is at its hint; a stale hint is corrected by a scan.
        let found = |c: &Change| c.find_pod(&pods).and_then(|p| p.name().map(str::to_owned));
        assert_eq!(found(changes[1]).as_deref(), Some("b"));
        assert_eq!(found(&at("a", Some(0))).as_deref(), Some("a"));
        // Typed objects alike.
        let namespaces: Vec<Namespace> = ["b", "a"]
            .iter()
            .map(|n| serde_json::from_value(serde_json::json!({"metadata": {"name": n}})).unwrap())
            .collect();
        let namespace = |name: &str, position| Change {
            kind: ChangeKind::Namespace,
            namespace: String::new(),
            name: Some(name.into()),
            position,
        };
        let locate = |c: &Change| {
            c.locate(&namespaces, |n| &n.metadata)
                .and_then(|n| n.metadata.name.clone())
        };
        assert_eq!(locate(&namespace("a", None)), None);
        assert_eq!(locate(&namespace("a", Some(0))).as_deref(), Some("a"));
        assert_eq!(locate(&namespace("b", Some(0))).as_deref(), Some("b"));
    }
}
