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
}
