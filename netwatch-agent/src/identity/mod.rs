//! Identity: IP and cgroup -> pod, workload, service, node.
//!
//! - [`endpoint`]: the [`Endpoint`] every flow record carries, in Hubble's
//!   shape, and the [`ReservedIdentity`]s (host, remote-node, kube-apiserver,
//!   world).
//! - [`cache`]: the [`IdentityCache`], built from
//!   [`ClusterSnapshot`](crate::cluster::ClusterSnapshot)s: IP -> pod at a
//!   given time (IP reuse, tombstones), services and their readiness, nodes,
//!   workloads.
//! - [`cgroup`]: cgroup v2 id -> pod UID and container ([`CgroupIndex`]).
//! - [`kube`]: the API server's watchers and reflectors, stripped to what
//!   netwatch needs, as a channel of snapshots.
//! - [`source`]: the snapshot source the agent runs, API server or manifest
//!   files (reloaded when they change).
//!
//! The agent drives it like this: start a [`SnapshotSource`], and on every
//! snapshot it yields call [`IdentityCache::update`]; per new flow call
//! [`IdentityCache::endpoint`] (or [`IdentityCache::resolve`]) with the
//! flow's time, and [`CgroupIndex::resolve`] + [`IdentityCache::pod_by_uid`]
//! for sockets; every few seconds [`IdentityCache::expire`].

pub mod cache;
pub mod cgroup;
pub mod endpoint;
pub mod kube;
pub mod source;

pub use cache::{
    CacheStats, ContainerInfo, ContainerPortInfo, IdentityCache, IdentityConfig, IpResolution,
    PodIdentity, ServiceIdentity, ServicePortInfo, ServiceReadiness,
};
pub use cgroup::{CgroupDriver, CgroupError, CgroupIndex, ContainerRuntime, PodCgroup, QosClass};
pub use endpoint::{Endpoint, ReservedIdentity, ServiceRef, Workload};
pub use kube::{ApiStatus, KindState, KubeSnapshots, KubeSourceError, KubeWatchConfig};
pub use source::{SnapshotFeed, SnapshotSource, SourceError};
