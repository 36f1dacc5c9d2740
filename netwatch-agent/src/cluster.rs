//! The Kubernetes objects netwatch works from, in one snapshot.
//!
//! Both sources produce the same [`ClusterSnapshot`]: [`crate::manifests`]
//! (YAML files, standalone mode and `netwatch explain`) and the API server's
//! watchers ([`crate::identity`]). The policy engine and the identity cache are
//! built from it, so they always agree on what the cluster looks like.

use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet},
    batch::v1::{CronJob, Job},
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};

use crate::policy::api::calico::{CalicoCrds, CalicoManifests};
use crate::policy::api::cluster::{
    AdminNetworkPolicy, BaselineAdminNetworkPolicy, ClusterNetworkPolicy,
};

/// Every object kind netwatch reads, as typed Kubernetes objects.
#[derive(Clone, Debug, Default)]
pub struct ClusterSnapshot {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
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
    /// ReplicaSets and Jobs: they name the workload of their pods.
    PodOwner,
    /// Deployments, StatefulSets, DaemonSets, CronJobs: nothing reads them
    /// but the workload names pods already carry.
    Workload,
    /// Cluster-scoped tiers, Calico: consumers rebuild.
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
    /// by name before use (later deletes move objects).
    pub position: Option<usize>,
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
        Some(
            self.entries
                .iter()
                .filter(|(r, _)| *r > from.revision)
                .map(|(_, c)| c)
                .collect(),
        )
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
}
