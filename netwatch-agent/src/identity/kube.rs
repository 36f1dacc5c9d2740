//! The live cluster as a channel of [`ClusterSnapshot`]s: kube-rs watchers
//! for every kind netwatch reads, including the cluster policies of
//! policy.networking.k8s.io (ClusterNetworkPolicy, AdminNetworkPolicy,
//! BaselineAdminNetworkPolicy), which are CRDs a cluster may not have: a
//! kind not installed is logged once, counts as listed and empty, and is
//! picked up when its CRD appears: one watch of CustomResourceDefinitions
//! (metadata only) wakes the kind's watcher as soon as its CRD is created,
//! with a slow poll as the fallback when that watch is not allowed.
//!
//! Each kind runs `watcher -> default_backoff -> modify(strip)`: the watcher
//! lists then watches, re-lists when the API says the watch is too old (410
//! Gone) or the connection drops, and backs off exponentially on errors;
//! `modify` drops every field netwatch does not use before the object is
//! kept, so a big cluster stays small in memory.
//!
//! The events go to one task that applies them to the published snapshot
//! with a [`SnapshotWriter`], the way kube's reflector `Writer` applies them
//! to a `Store` (an `Init`..`InitDone` re-list replaces a kind atomically),
//! batched over a debounce interval. Why not a reflector `Store` per kind:
//! [`ClusterSnapshot`] owns its objects, so publishing from stores would
//! keep every object twice and clone all of them per publish (about 0.4 s
//! for 10,000 stripped pods, see BENCHMARKS.md). Applied in place, a publish
//! costs what changed; the snapshot is copied only when a consumer still
//! holds the previous one.
//!
//! The agent never waits on this: capture runs whether or not the API
//! answers, and identity catches up when the snapshots arrive.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    fmt::Debug,
    path::Path,
    sync::Arc,
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::{
    api::{
        apps::v1::{
            DaemonSet, DaemonSetSpec, Deployment, DeploymentSpec, ReplicaSet, ReplicaSetSpec,
            StatefulSet, StatefulSetSpec,
        },
        batch::v1::{CronJob, CronJobSpec, Job, JobSpec},
        core::v1::{
            Container, ContainerStatus, Namespace, Node, NodeStatus, Pod, PodCondition, PodSpec,
            PodStatus, Service, ServiceSpec,
        },
        discovery::v1::{Endpoint as SliceEndpoint, EndpointSlice},
        networking::v1::NetworkPolicy,
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Config, Resource,
    api::{ListParams, VersionMatch, WatchEvent, WatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::watcher::Event,
};
use serde::de::DeserializeOwned;
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
    time::Instant,
};

use crate::cluster::{Change, ChangeKind, ClusterSnapshot, PodRecord};
use crate::policy::api::calico::{
    CalicoNetworkPolicy, CalicoTier, Crd, GlobalNetworkPolicy, StagedGlobalNetworkPolicy,
    StagedKubernetesNetworkPolicy, StagedNetworkPolicy,
};
use crate::policy::api::cluster::{
    AdminNetworkPolicy, BaselineAdminNetworkPolicy, ClusterNetworkPolicy,
};

/// How many events may wait for the publishing task before watchers pause.
const EVENT_QUEUE: usize = 4096;

/// Errors setting up the API client.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("cannot use kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes API configuration found: {0} (run netwatch-agent in a pod with a service \
         account, or pass --kubeconfig PATH)"
    )]
    Infer(#[source] kube::config::InferConfigError),
    #[error("cannot build a Kubernetes API client: {0}")]
    Client(#[source] kube::Error),
}

/// The User-Agent of every request: the API server's audit log and its
/// priority and fairness rules can name netwatch.
pub const USER_AGENT: &str = concat!("netwatch-agent/", env!("CARGO_PKG_VERSION"));

/// How long a TCP connection to the API server may take to open.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A client from `kubeconfig` when given, else inferred (`$KUBECONFIG`,
/// `~/.kube/config`, or the pod's service account in cluster), with
/// netwatch's User-Agent and a connect timeout. Requests and watch streams
/// get their own timeouts from [`KubeWatchConfig`].
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubeSourceError> {
    let mut config = match kubeconfig {
        Some(path) => {
            let to_error = |source| KubeSourceError::Kubeconfig {
                path: path.display().to_string(),
                source,
            };
            let file = Kubeconfig::read_from(path).map_err(to_error)?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(to_error)?
        }
        None => Config::infer().await.map_err(KubeSourceError::Infer)?,
    };
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_static(USER_AGENT),
    ));
    Client::try_from(config).map_err(KubeSourceError::Client)
}

/// How the watchers run.
#[derive(Clone, Debug)]
pub struct KubeWatchConfig {
    /// This agent's node. Pods on it keep their container statuses (to name
    /// the container behind a cgroup); other pods keep only what identifies
    /// them.
    pub node_name: Option<String>,
    /// How long to gather changes before publishing a snapshot.
    pub debounce: Duration,
    /// A list, or a watch request's answer (its headers), that takes longer
    /// than this is given up and retried: a connection that silently stops
    /// answering is not waited on for ever.
    pub request_timeout: Duration,
    /// A watch stream that brings nothing, not even a bookmark, for this long
    /// is taken for dead and re-opened from the last resourceVersion. The
    /// API server sends a bookmark about once a minute to watchers that ask
    /// for them, so a live quiet watch is not cut by the default.
    pub idle_timeout: Duration,
    /// `timeoutSeconds` of each watch request: the API server ends the watch
    /// after this long and the watcher re-opens it, cheaply, from its last
    /// resourceVersion.
    pub watch_timeout: Duration,
    /// Retries after a failure back off exponentially from 0.5 s up to this
    /// (with jitter), so a kind is back within this long of the API server.
    pub backoff_max: Duration,
}

impl Default for KubeWatchConfig {
    fn default() -> Self {
        KubeWatchConfig {
            node_name: None,
            debounce: Duration::from_millis(200),
            request_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(75),
            watch_timeout: Duration::from_secs(290),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// Retries of a kind the API forbids (403) or does not have (404, a CRD
/// not installed): these change only when someone fixes RBAC or installs
/// the CRD, so they are not worth a request every few seconds per node.
const SLOW_RETRY: Duration = Duration::from_secs(60);

/// Where one kind's view stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KindState {
    /// Not listed yet.
    Listing,
    /// Listed, and the watch is open: current.
    Synced,
    /// A CRD this cluster does not have: counts as listed and empty.
    Absent,
    /// The API refuses this kind (RBAC): its objects are unknown.
    Forbidden { message: String },
    /// The API cannot be reached or fails; the last known state is kept.
    Failing {
        since: std::time::Instant,
        error: String,
    },
}

impl KindState {
    /// Whether the kind's view is current.
    pub fn is_current(&self) -> bool {
        matches!(self, KindState::Synced | KindState::Absent)
    }
}

/// Every kind's state, by kind name (`Pod`, `NetworkPolicy`, ...).
pub type ApiStatus = std::collections::BTreeMap<String, KindState>;

/// What is wrong with the API source, for `/readyz`: `None` when every
/// kind is current, else each kind that is not and why.
pub fn describe_stale(status: &ApiStatus) -> Option<String> {
    let now = std::time::Instant::now();
    let stale: Vec<String> = status
        .iter()
        .filter(|(_, state)| !state.is_current())
        .map(|(kind, state)| match state {
            KindState::Listing => format!("{kind}: not listed yet"),
            KindState::Forbidden { message } => format!("{kind}: forbidden ({message})"),
            KindState::Failing { since, error } => format!(
                "{kind}: stale for {} s ({error})",
                now.saturating_duration_since(*since).as_secs()
            ),
            KindState::Synced | KindState::Absent => String::new(),
        })
        .collect();
    (!stale.is_empty()).then(|| stale.join("; "))
}

/// The running watchers: the latest snapshot, whether every kind has been
/// listed once, each kind's state, and the tasks (stopped when this is
/// dropped).
#[derive(Debug)]
pub struct KubeSnapshots {
    /// The latest snapshot; starts empty, updated at most once per debounce
    /// interval while the cluster changes.
    pub snapshots: watch::Receiver<Arc<ClusterSnapshot>>,
    /// `true` once every kind's initial list is done (or the kind is
    /// forbidden or not installed).
    pub ready: watch::Receiver<bool>,
    /// Each kind's state, updated as watches fail and recover.
    pub status: watch::Receiver<ApiStatus>,
    tasks: Vec<JoinHandle<()>>,
}

/// [`KubeSnapshots`] taken apart: snapshots, readiness, kinds, tasks.
pub(crate) type KubeParts = (
    watch::Receiver<Arc<ClusterSnapshot>>,
    watch::Receiver<bool>,
    watch::Receiver<ApiStatus>,
    Vec<JoinHandle<()>>,
);

impl KubeSnapshots {
    /// Takes the receivers and the tasks; the tasks then live as long as the
    /// returned handles are kept (dropping a `JoinHandle` does not stop it).
    pub(crate) fn into_parts(mut self) -> KubeParts {
        let tasks = std::mem::take(&mut self.tasks);
        (
            self.snapshots.clone(),
            self.ready.clone(),
            self.status.clone(),
            tasks,
        )
    }
}

impl Drop for KubeSnapshots {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A kind netwatch watches, and where it lives in a [`ClusterSnapshot`].
pub trait SnapshotKind:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static
{
    /// What the snapshot keeps of an object of this kind: the object
    /// itself, or a compact record of it (pods).
    type Stored: StoredObject + From<Self>;
    /// The snapshot's list of this kind.
    fn objects(snapshot: &mut ClusterSnapshot) -> &mut Vec<Self::Stored>;
    /// The writer's index of this kind.
    fn index(writer: &mut SnapshotWriter) -> &mut KindIndex<Self::Stored>;
    /// A watcher event of this kind as an [`ObjectEvent`], its object
    /// converted to what the snapshot keeps.
    fn wrap(event: Event<Self>) -> ObjectEvent;
}

/// What the snapshot writer reads of an object it keeps: where it is filed.
pub trait StoredObject: Debug + Send + 'static {
    /// (namespace, name), empty when unset.
    fn key(&self) -> (&str, &str);
    /// Its resourceVersion, to tell what a re-list changed.
    fn version(&self) -> Option<&str>;
}

impl<K: Resource + Debug + Send + 'static> StoredObject for K {
    fn key(&self) -> (&str, &str) {
        let meta = self.meta();
        (
            meta.namespace.as_deref().unwrap_or_default(),
            meta.name.as_deref().unwrap_or_default(),
        )
    }
    fn version(&self) -> Option<&str> {
        self.meta().resource_version.as_deref()
    }
}

impl StoredObject for PodRecord {
    fn key(&self) -> (&str, &str) {
        (self.namespace(), self.name().unwrap_or_default())
    }
    fn version(&self) -> Option<&str> {
        self.resource_version()
    }
}

/// `event` with its object converted.
fn convert<A, B: From<A>>(event: Event<A>) -> Event<B> {
    match event {
        Event::Apply(o) => Event::Apply(o.into()),
        Event::Delete(o) => Event::Delete(o.into()),
        Event::Init => Event::Init,
        Event::InitApply(o) => Event::InitApply(o.into()),
        Event::InitDone => Event::InitDone,
    }
}

/// The type a kind's objects are kept as: the kind, or the named record.
macro_rules! stored {
    ($kind:ident) => {
        $kind
    };
    ($kind:ident $stored:ident) => {
        $stored
    };
}

macro_rules! snapshot_kinds {
    ($($kind:ident $(as $stored:ident)? => $($field:ident).+),* $(,)?) => {
        /// A watcher event of any kind netwatch reads, with its object as
        /// the snapshot keeps it.
        // Unboxed: events live only until applied, and the typed kinds are
        // all large.
        #[allow(clippy::large_enum_variant)]
        #[derive(Debug)]
        pub enum ObjectEvent {
            $($kind(Event<stored!($kind $($stored)?)>),)*
        }

        /// Applies watcher events to a [`ClusterSnapshot`] in place, with the
        /// semantics of kube's reflector `Writer`: `Apply` inserts or
        /// replaces by namespace/name, `Delete` removes, and an
        /// `Init`..`InitDone` re-list is buffered and then replaces the kind
        /// whole.
        // One index per kind, named after it.
        #[allow(non_snake_case)]
        #[derive(Debug, Default)]
        pub struct SnapshotWriter {
            $($kind: KindIndex<stored!($kind $($stored)?)>,)*
        }

        impl SnapshotWriter {
            /// Applies one event. Only changes visible in the snapshot (an
            /// `Apply`, a `Delete`, the end of a re-list) touch it, through
            /// `snapshot()`, which is called at most once per change; returns
            /// whether the snapshot changed.
            pub fn apply<'s>(
                &mut self,
                event: ObjectEvent,
                snapshot: impl FnOnce() -> &'s mut ClusterSnapshot,
            ) -> bool {
                match event {
                    $(ObjectEvent::$kind(event) => apply_event::<$kind>(self, event, snapshot),)*
                }
            }

            /// Whether every kind has completed its initial list.
            pub fn all_listed(&self) -> bool {
                true $(&& self.$kind.listed)*
            }
        }

        $(impl SnapshotKind for $kind {
            type Stored = stored!($kind $($stored)?);
            fn objects(snapshot: &mut ClusterSnapshot) -> &mut Vec<Self::Stored> {
                &mut snapshot$(.$field)+
            }
            fn index(writer: &mut SnapshotWriter) -> &mut KindIndex<Self::Stored> {
                &mut writer.$kind
            }
            fn wrap(event: Event<Self>) -> ObjectEvent {
                ObjectEvent::$kind(convert(event))
            }
        })*
    };
}

snapshot_kinds! {
    Namespace => namespaces,
    Pod as PodRecord => pods,
    NetworkPolicy => network_policies,
    Service => services,
    EndpointSlice => endpoint_slices,
    Node => nodes,
    Deployment => deployments,
    ReplicaSet => replica_sets,
    StatefulSet => stateful_sets,
    DaemonSet => daemon_sets,
    Job => jobs,
    CronJob => cron_jobs,
    ClusterNetworkPolicy => cluster_network_policies,
    AdminNetworkPolicy => admin_network_policies,
    BaselineAdminNetworkPolicy => baseline_admin_network_policies,
    CalicoTier => calico.tiers,
    CalicoNetworkPolicy => calico.network_policies,
    GlobalNetworkPolicy => calico.global_network_policies,
    StagedNetworkPolicy => calico.staged_network_policies,
    StagedGlobalNetworkPolicy => calico.staged_global_network_policies,
    StagedKubernetesNetworkPolicy => calico.staged_kubernetes_network_policies,
    CrdTier => calico_crds.tiers,
    CrdNetworkPolicy => calico_crds.network_policies,
    CrdGlobalNetworkPolicy => calico_crds.global_network_policies,
    CrdStagedNetworkPolicy => calico_crds.staged_network_policies,
    CrdStagedGlobalNetworkPolicy => calico_crds.staged_global_network_policies,
    CrdStagedKubernetesNetworkPolicy => calico_crds.staged_kubernetes_network_policies,
}

// Calico's kinds under both groups (see `watch_cluster`).
type CrdTier = Crd<CalicoTier>;
type CrdNetworkPolicy = Crd<CalicoNetworkPolicy>;
type CrdGlobalNetworkPolicy = Crd<GlobalNetworkPolicy>;
type CrdStagedNetworkPolicy = Crd<StagedNetworkPolicy>;
type CrdStagedGlobalNetworkPolicy = Crd<StagedGlobalNetworkPolicy>;
type CrdStagedKubernetesNetworkPolicy = Crd<StagedKubernetesNetworkPolicy>;

/// Where each object of one kind sits in the snapshot's list, and the
/// re-list in progress.
#[derive(Debug)]
pub struct KindIndex<K> {
    positions: HashMap<String, usize>,
    relist: Option<Vec<K>>,
    listed: bool,
}

impl<K> Default for KindIndex<K> {
    fn default() -> Self {
        KindIndex {
            positions: HashMap::new(),
            relist: None,
            listed: false,
        }
    }
}

fn object_key(object: &impl StoredObject) -> String {
    let (namespace, name) = object.key();
    format!("{namespace}/{name}")
}

/// How consumers of the snapshot's [`crate::cluster::ChangeLog`] file a
/// change of kind `K`.
fn change_kind<K: SnapshotKind>() -> ChangeKind {
    match (K::group(&()).as_ref(), K::kind(&()).as_ref()) {
        ("", "Namespace") => ChangeKind::Namespace,
        ("", "Pod") => ChangeKind::Pod,
        ("", "Service") => ChangeKind::Service,
        ("", "Node") => ChangeKind::Node,
        ("discovery.k8s.io", "EndpointSlice") => ChangeKind::EndpointSlice,
        ("networking.k8s.io", "NetworkPolicy") => ChangeKind::NetworkPolicy,
        (
            "policy.networking.k8s.io",
            "ClusterNetworkPolicy" | "AdminNetworkPolicy" | "BaselineAdminNetworkPolicy",
        ) => ChangeKind::ClusterPolicy,
        ("apps", "ReplicaSet") | ("batch", "Job") => ChangeKind::PodOwner,
        ("apps", "Deployment" | "StatefulSet" | "DaemonSet") | ("batch", "CronJob") => {
            ChangeKind::Workload
        }
        ("projectcalico.org" | "crd.projectcalico.org", _) => ChangeKind::Calico,
        _ => ChangeKind::Other,
    }
}

fn change_of<K: SnapshotKind>(object: &K::Stored) -> Change {
    let (namespace, name) = object.key();
    Change {
        kind: change_kind::<K>(),
        namespace: namespace.to_owned(),
        name: Some(name.to_owned()),
        position: None,
    }
}

fn apply_event<'s, K: SnapshotKind>(
    writer: &mut SnapshotWriter,
    event: Event<K::Stored>,
    snapshot: impl FnOnce() -> &'s mut ClusterSnapshot,
) -> bool {
    let index = K::index(writer);
    match event {
        Event::Init => {
            index.relist = Some(Vec::new());
            false
        }
        Event::InitApply(object) => match &mut index.relist {
            Some(relist) => {
                relist.push(object);
                false
            }
            // An InitApply outside a re-list is an apply.
            None => apply_event::<K>(writer, Event::Apply(object), snapshot),
        },
        Event::InitDone => {
            let listed = index.relist.take().unwrap_or_default();
            let relisted = index.listed;
            let snapshot = snapshot();
            let objects = K::objects(snapshot);
            // A re-list after a watch gap (an expired resourceVersion, a
            // reconnect) mostly lists what the snapshot has: the objects
            // whose version differs, and those gone, are its changes. The
            // first list is the kind whole.
            let before: HashMap<String, Option<String>> = if relisted {
                index
                    .positions
                    .drain()
                    .filter_map(|(key, at)| {
                        Some((key, objects.get(at)?.version().map(str::to_owned)))
                    })
                    .collect()
            } else {
                HashMap::new()
            };
            objects.clear();
            index.positions.clear();
            for object in listed {
                let key = object_key(&object);
                match index.positions.get(&key) {
                    Some(&at) => objects[at] = object,
                    None => {
                        index.positions.insert(key, objects.len());
                        objects.push(object);
                    }
                }
            }
            index.listed = true;
            if !relisted {
                snapshot.changes.record(Change {
                    kind: change_kind::<K>(),
                    namespace: String::new(),
                    name: None,
                    position: None,
                });
                return true;
            }
            let mut changes = Vec::new();
            for (key, &at) in &index.positions {
                let version = objects[at].version();
                // Without versions to compare, an object counts as changed.
                if version.is_none() || before.get(key).map(Option::as_deref) != Some(version) {
                    changes.push(Change {
                        position: Some(at),
                        ..change_of::<K>(&objects[at])
                    });
                }
            }
            for key in before.keys().filter(|k| !index.positions.contains_key(*k)) {
                let (namespace, name) = key.split_once('/').unwrap_or(("", key));
                changes.push(Change {
                    kind: change_kind::<K>(),
                    namespace: namespace.to_owned(),
                    name: Some(name.to_owned()),
                    position: None,
                });
            }
            // In list order, deletions last: the log reads the same for the
            // same re-list.
            changes.sort_by(|a, b| {
                (a.position.unwrap_or(usize::MAX), &a.namespace, &a.name).cmp(&(
                    b.position.unwrap_or(usize::MAX),
                    &b.namespace,
                    &b.name,
                ))
            });
            let changed = !changes.is_empty();
            for change in changes {
                snapshot.changes.record(change);
            }
            changed
        }
        Event::Apply(object) => {
            let key = object_key(&object);
            let change = change_of::<K>(&object);
            let snapshot = snapshot();
            let objects = K::objects(snapshot);
            let position = match index.positions.get(&key) {
                Some(&at) if at < objects.len() => {
                    objects[at] = object;
                    at
                }
                _ => {
                    index.positions.insert(key, objects.len());
                    objects.push(object);
                    objects.len() - 1
                }
            };
            snapshot.changes.record(Change {
                position: Some(position),
                ..change
            });
            true
        }
        Event::Delete(object) => {
            let Some(at) = index.positions.remove(&object_key(&object)) else {
                return false;
            };
            let snapshot = snapshot();
            let objects = K::objects(snapshot);
            if at >= objects.len() {
                return false;
            }
            objects.swap_remove(at);
            if let Some(moved) = objects.get(at) {
                index.positions.insert(object_key(moved), at);
            }
            snapshot.changes.record(change_of::<K>(&object));
            true
        }
    }
}

/// Starts the watchers for every kind on `client` and the task that applies
/// their events to the published snapshot. Needs a Tokio runtime; returns at
/// once.
///
/// Consumers should clone the `Arc` out of the channel, use it, and drop it:
/// a snapshot still held when the next batch arrives is copied once.
pub fn watch_cluster(client: Client, config: KubeWatchConfig) -> KubeSnapshots {
    let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
    let (status_tx, status) = watch::channel(ApiStatus::new());
    let (crds_tx, crds) = watch::channel(BTreeSet::new());
    let ctx = WatchContext {
        events: events_tx,
        status: Arc::new(status_tx),
        config: Arc::new(config.clone()),
        crds,
        optional_crds: Arc::new(std::sync::Mutex::new(BTreeSet::new())),
    };
    let node = config.node_name.clone();
    let mut tasks = vec![
        watch_kind(client.clone(), &ctx, strip_namespace),
        watch_kind(client.clone(), &ctx, move |pod: &mut Pod| {
            strip_pod(pod, node.as_deref())
        }),
        watch_kind(client.clone(), &ctx, |np: &mut NetworkPolicy| {
            strip_meta(&mut np.metadata)
        }),
        watch_kind(client.clone(), &ctx, strip_service),
        watch_kind(client.clone(), &ctx, strip_endpoint_slice),
        watch_kind(client.clone(), &ctx, strip_node),
        watch_kind(client.clone(), &ctx, strip_deployment),
        watch_kind(client.clone(), &ctx, strip_replica_set),
        watch_kind(client.clone(), &ctx, strip_stateful_set),
        watch_kind(client.clone(), &ctx, strip_daemon_set),
        watch_kind(client.clone(), &ctx, strip_job),
        watch_kind(client.clone(), &ctx, strip_cron_job),
        // The cluster policies are CRDs a cluster may not have installed.
        watch_optional_kind(client.clone(), &ctx, |p: &mut ClusterNetworkPolicy| {
            strip_meta(&mut p.metadata);
            p.status = None;
        }),
        watch_optional_kind(client.clone(), &ctx, |p: &mut AdminNetworkPolicy| {
            strip_meta(&mut p.metadata);
            p.status = None;
        }),
        watch_optional_kind(
            client.clone(),
            &ctx,
            |p: &mut BaselineAdminNetworkPolicy| {
                strip_meta(&mut p.metadata);
                p.status = None;
            },
        ),
    ];
    // Calico's policies: through the Calico API server (projectcalico.org/v3)
    // when it is installed, and from the CRDs Calico stores them in
    // (crd.projectcalico.org/v1); the engine uses the CRDs' view only when
    // the API server's is empty (both list the same objects). A kind not
    // installed is logged once and counts as empty, like the cluster policies.
    macro_rules! calico_watch {
        ($($kind:ty),*) => {
            $(tasks.push(watch_optional_kind(client.clone(), &ctx, |p: &mut $kind| {
                strip_meta(k8s_openapi::Metadata::metadata_mut(p))
            }));)*
        };
    }
    calico_watch!(
        CalicoTier,
        CalicoNetworkPolicy,
        GlobalNetworkPolicy,
        StagedNetworkPolicy,
        StagedGlobalNetworkPolicy,
        StagedKubernetesNetworkPolicy,
        CrdTier,
        CrdNetworkPolicy,
        CrdGlobalNetworkPolicy,
        CrdStagedNetworkPolicy,
        CrdStagedGlobalNetworkPolicy,
        CrdStagedKubernetesNetworkPolicy
    );

    // Every optional kind has registered its CRD's name by now.
    let wanted = ctx
        .optional_crds
        .lock()
        .map(|names| names.clone())
        .unwrap_or_default();
    tasks.push(tokio::spawn(watch_crds(
        Api::all(client.clone()),
        wanted,
        crds_tx,
        Arc::clone(&ctx.config),
    )));

    let (snapshot_tx, snapshots) = watch::channel(Arc::new(ClusterSnapshot::default()));
    let (ready_tx, ready) = watch::channel(false);
    tasks.push(tokio::spawn(publish_snapshots(
        events,
        snapshot_tx,
        ready_tx,
        config.debounce,
    )));

    KubeSnapshots {
        snapshots,
        ready,
        status,
        tasks,
    }
}

/// Applies the watchers' events to the published snapshot, a debounce
/// interval's worth at a time, and raises `ready` once every kind is listed.
async fn publish_snapshots(
    mut events: mpsc::Receiver<ObjectEvent>,
    snapshots: watch::Sender<Arc<ClusterSnapshot>>,
    ready: watch::Sender<bool>,
    debounce: Duration,
) {
    let mut writer = SnapshotWriter::default();
    let mut batch = Vec::new();
    while let Some(first) = events.recv().await {
        // Changes come in bursts (a rollout, a re-list): gather them.
        batch.push(first);
        let deadline = Instant::now() + debounce;
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(event) => batch.push(event),
                    None => break,
                },
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        snapshots.send_if_modified(|snapshot| {
            let mut changed = false;
            for event in batch.drain(..) {
                // Copy-on-write: cloned only if a consumer still holds it.
                changed |= writer.apply(event, || Arc::make_mut(&mut *snapshot));
            }
            changed
        });
        // A list gathers thousands of events of a few KB each (the typed
        // kinds are large): give that buffer back rather than keep it for
        // the next burst.
        if batch.capacity() > EVENT_QUEUE / 16 {
            batch = Vec::new();
        }
        if !*ready.borrow() && writer.all_listed() {
            tracing::info!("Kubernetes API: initial lists of every kind done");
            ready.send_replace(true);
        }
        if snapshots.is_closed() {
            // Every receiver is gone: nobody needs snapshots any more.
            return;
        }
    }
}

/// What every kind's watcher shares: where events go, where each kind's
/// state is published, and the timeouts.
struct WatchContext {
    events: mpsc::Sender<ObjectEvent>,
    status: Arc<watch::Sender<ApiStatus>>,
    config: Arc<KubeWatchConfig>,
    /// The installed CRDs among `optional_crds`, from [`watch_crds`].
    crds: watch::Receiver<BTreeSet<String>>,
    /// The CRD names of the optional kinds, collected as they start.
    optional_crds: Arc<std::sync::Mutex<BTreeSet<String>>>,
}

/// Runs one kind's watcher, sending its events to the publishing task and
/// logging each failure once until the watch recovers.
fn watch_kind<K: SnapshotKind>(
    client: Client,
    ctx: &WatchContext,
    strip: impl FnMut(&mut K) + Send + 'static,
) -> JoinHandle<()> {
    watch_kind_with(client, ctx, strip, false)
}

/// Like [`watch_kind`], for a kind defined by a CRD the cluster may not
/// have: while the API answers 404 the kind counts as listed and empty (so
/// readiness does not wait for it), logged once; the watcher keeps trying
/// now and then and picks the kind up once the CRD is installed.
fn watch_optional_kind<K: SnapshotKind>(
    client: Client,
    ctx: &WatchContext,
    strip: impl FnMut(&mut K) + Send + 'static,
) -> JoinHandle<()> {
    watch_kind_with(client, ctx, strip, true)
}

fn watch_kind_with<K: SnapshotKind>(
    client: Client,
    ctx: &WatchContext,
    strip: impl FnMut(&mut K) + Send + 'static,
    optional: bool,
) -> JoinHandle<()> {
    let kind = K::kind(&()).into_owned();
    ctx.status.send_modify(|s| {
        s.insert(kind.clone(), KindState::Listing);
    });
    // `<plural>.<group>`, as CustomResourceDefinitions are named.
    let crd = optional.then(|| format!("{}.{}", K::plural(&()), K::group(&())));
    if let (Some(name), Ok(mut names)) = (&crd, ctx.optional_crds.lock()) {
        names.insert(name.clone());
    }
    let watcher = KindWatcher {
        api: Api::all(client),
        kind,
        optional,
        crd,
        crds: ctx.crds.clone(),
        events: ctx.events.clone(),
        status: Arc::clone(&ctx.status),
        config: Arc::clone(&ctx.config),
        strip,
        listed: false,
        failing: None,
        backoff: Backoff::new(ctx.config.backoff_max),
    };
    tokio::spawn(watcher.run())
}

/// Exponential backoff from 0.5 s to a cap, each delay drawn between half
/// and all of its step, so thousands of agents that lost the API server at
/// the same moment do not come back in lockstep.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(500);

    fn new(max: Duration) -> Backoff {
        Backoff {
            next: Self::FIRST.min(max),
            max,
        }
    }

    fn delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        // Jitter from the clock's nanoseconds: good enough to spread nodes.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        step / 2 + step.mul_f64(f64::from(nanos % 1000) / 2000.0)
    }

    fn reset(&mut self) {
        self.next = Self::FIRST.min(self.max);
    }
}

/// Why a list or watch attempt ended.
enum Failure {
    /// The API answered with an error status.
    Api(Box<kube::core::Status>),
    /// No answer within the request timeout.
    Timeout(Duration),
    /// Connection refused or reset, a body that does not parse, ...
    Other(String),
}

impl Failure {
    fn code(&self) -> Option<u16> {
        match self {
            Failure::Api(status) => Some(status.code),
            _ => None,
        }
    }

    fn describe(&self) -> String {
        match self {
            Failure::Api(s) => format!("{} {}: {}", s.code, s.reason, s.message),
            Failure::Timeout(after) => {
                format!("no answer within {} s", after.as_secs_f64())
            }
            Failure::Other(e) => e.clone(),
        }
    }

    /// Errors of the same cause are logged once per episode.
    fn class(&self) -> String {
        match self {
            Failure::Api(s) => format!("api {}", s.code),
            Failure::Timeout(_) => "timeout".to_owned(),
            Failure::Other(_) => "unreachable".to_owned(),
        }
    }
}

impl From<kube::Error> for Failure {
    fn from(error: kube::Error) -> Self {
        match error {
            kube::Error::Api(status) => Failure::Api(status),
            other => Failure::Other(other.to_string()),
        }
    }
}

/// Where the next list reads from.
enum ListFrom {
    /// The API server's watch cache, any version (`resourceVersion=0`): the
    /// first list, and after the cache said a version is gone.
    Cache,
    /// The watch cache, no older than what this watcher has seen.
    NotOlderThan(String),
    /// etcd (`resourceVersion` unset): after the cache could not serve one.
    Quorum,
}

/// One kind's list-then-watch loop. Like kube-rs's `watcher`, with what the
/// agent needs on top: lists from the watch cache, a 410 to the watch
/// request itself re-lists, request and idle timeouts, a capped backoff,
/// and each kind's state published for `/readyz` and the metrics.
struct KindWatcher<K: SnapshotKind, S> {
    api: Api<K>,
    kind: String,
    optional: bool,
    /// The CRD defining this kind (optional kinds only).
    crd: Option<String>,
    /// The installed CRDs, to pick the kind up as soon as its CRD appears.
    crds: watch::Receiver<BTreeSet<String>>,
    events: mpsc::Sender<ObjectEvent>,
    status: Arc<watch::Sender<ApiStatus>>,
    config: Arc<KubeWatchConfig>,
    strip: S,
    /// Whether an `Init`..`InitDone` was sent (a real list, or an empty one
    /// for a kind forbidden or not installed).
    listed: bool,
    /// The current failure episode: since when, and the causes logged.
    failing: Option<(std::time::Instant, HashSet<String>)>,
    backoff: Backoff,
}

/// The watch loop stopped: the publishing task is gone.
struct Closed;

impl<K: SnapshotKind, S: FnMut(&mut K) + Send + 'static> KindWatcher<K, S> {
    async fn run(mut self) {
        let mut from = ListFrom::Cache;
        loop {
            let version = match self.list(&from).await {
                Ok(Some(version)) => version,
                Ok(None) => return,
                Err(failure) => {
                    if failure.code() == Some(410) {
                        from = ListFrom::Quorum;
                    }
                    let pause = match self.failed(failure).await {
                        Ok(pause) => pause,
                        Err(Closed) => return,
                    };
                    self.pause(pause).await;
                    continue;
                }
            };
            match self.watch_from(version).await {
                Ok(version) => from = ListFrom::NotOlderThan(version),
                Err(Closed) => return,
            }
        }
    }

    /// Lists the kind and sends it as one re-list; `Some(resourceVersion)`
    /// to watch from, `None` when the publishing task is gone.
    async fn list(&mut self, from: &ListFrom) -> Result<Option<String>, Failure> {
        // No `limit`: the API server serves a list at a resourceVersion from
        // its watch cache only unpaginated (kube-rs drops the version when
        // a page size is set, which sends every list to etcd).
        let params = match from {
            ListFrom::Cache => ListParams::default().match_any(),
            ListFrom::NotOlderThan(version) => ListParams::default()
                .at(version)
                .matching(VersionMatch::NotOlderThan),
            ListFrom::Quorum => ListParams::default(),
        };
        let timeout = self.config.request_timeout;
        let list = match tokio::time::timeout(timeout, self.api.list(&params)).await {
            Err(_) => return Err(Failure::Timeout(timeout)),
            Ok(result) => result?,
        };
        let version = list
            .metadata
            .resource_version
            .clone()
            .filter(|v| !v.is_empty())
            .ok_or_else(|| Failure::Other("the list has no resourceVersion".into()))?;
        if !self.send(Event::Init).await {
            return Ok(None);
        }
        for mut object in list.items {
            (self.strip)(&mut object);
            if !self.send(Event::InitApply(object)).await {
                return Ok(None);
            }
        }
        if !self.send(Event::InitDone).await {
            return Ok(None);
        }
        self.listed = true;
        self.recovered();
        Ok(Some(version))
    }

    /// Watches from `version` until the watch must be re-listed; returns the
    /// last version seen. Failures that a re-watch can cure (the stream
    /// ends, goes silent, the connection fails) re-watch from the last
    /// version, after a backoff when the API answered with an error.
    async fn watch_from(&mut self, mut version: String) -> Result<String, Closed> {
        let params = WatchParams::default()
            .timeout(self.config.watch_timeout.as_secs().clamp(1, 3600) as u32);
        loop {
            let timeout = self.config.request_timeout;
            let started =
                match tokio::time::timeout(timeout, self.api.watch(&params, &version)).await {
                    Err(_) => Err(Failure::Timeout(timeout)),
                    Ok(result) => result.map_err(Failure::from),
                };
            let stream = match started {
                Ok(stream) => stream,
                // The version is older than the API server keeps: only a
                // re-list can continue (retrying the same version cannot).
                Err(failure) if failure.code() == Some(410) => {
                    self.gone(&failure);
                    return Ok(version);
                }
                Err(failure) => {
                    let pause = self.failed(failure).await?;
                    self.pause(pause).await;
                    continue;
                }
            };
            // The API answered: the kind is current again.
            self.recovered();
            let mut stream = std::pin::pin!(stream);
            loop {
                let next = tokio::time::timeout(self.config.idle_timeout, stream.next()).await;
                match next {
                    Err(_) => {
                        tracing::debug!(kind = %self.kind, "Kubernetes API: watch silent for {:?}; re-opening it", self.config.idle_timeout);
                        break;
                    }
                    // The server ended the watch (timeoutSeconds) or the
                    // connection dropped: re-watch from where it was.
                    Ok(None) => break,
                    Ok(Some(Ok(
                        WatchEvent::Added(mut object) | WatchEvent::Modified(mut object),
                    ))) => {
                        if let Some(v) = object.meta().resource_version.clone() {
                            version = v;
                        }
                        (self.strip)(&mut object);
                        if !self.send(Event::Apply(object)).await {
                            return Err(Closed);
                        }
                    }
                    Ok(Some(Ok(WatchEvent::Deleted(mut object)))) => {
                        if let Some(v) = object.meta().resource_version.clone() {
                            version = v;
                        }
                        (self.strip)(&mut object);
                        if !self.send(Event::Delete(object)).await {
                            return Err(Closed);
                        }
                    }
                    Ok(Some(Ok(WatchEvent::Bookmark(bookmark)))) => {
                        version = bookmark.metadata.resource_version;
                    }
                    Ok(Some(Ok(WatchEvent::Error(status)))) if status.code == 410 => {
                        self.gone(&Failure::Api(status));
                        return Ok(version);
                    }
                    Ok(Some(Ok(WatchEvent::Error(status)))) => {
                        let pause = self.failed(Failure::Api(status)).await?;
                        tokio::time::sleep(pause).await;
                        break;
                    }
                    // The stream broke (a reset connection): re-watch, after
                    // a short pause but without calling the kind stale; if
                    // the re-watch fails, that failure is what counts.
                    Ok(Some(Err(error))) => {
                        tracing::debug!(kind = %self.kind, %error, "Kubernetes API: watch stream broke; re-opening it");
                        tokio::time::sleep(self.backoff.delay()).await;
                        break;
                    }
                }
            }
        }
    }

    async fn send(&mut self, event: Event<K>) -> bool {
        self.events.send(K::wrap(event)).await.is_ok()
    }

    /// Waits `pause` before the next attempt; a kind whose CRD is missing
    /// waits only until the CRD appears.
    async fn pause(&mut self, pause: Duration) {
        let Some(crd) = self.crd.clone() else {
            return tokio::time::sleep(pause).await;
        };
        if self.crds.borrow_and_update().contains(&crd) {
            // Installed already (and still 404: being established), or a
            // failure unrelated to the CRD.
            return tokio::time::sleep(pause).await;
        }
        let crds = &mut self.crds;
        let appeared = async {
            // The guard `wait_for` returns is dropped here, not held.
            let appeared = crds.wait_for(|installed| installed.contains(&crd)).await;
            appeared.is_ok()
        };
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            appeared = appeared => if appeared {
                tracing::debug!(kind = %self.kind, crd = %crd, "Kubernetes API: the kind's CRD appeared; listing it");
            } else {
                // The CRD watch is gone: the sleep alone decides.
                tokio::time::sleep(pause).await;
            },
        }
    }

    fn set_state(&self, state: KindState) {
        self.status.send_if_modified(|s| {
            let entry = s.entry(self.kind.clone()).or_insert(KindState::Listing);
            // A failing kind keeps the start of its episode.
            let same = match (&*entry, &state) {
                (KindState::Failing { .. }, KindState::Failing { .. }) => true,
                (a, b) => a == b,
            };
            if !same {
                *entry = state;
            }
            !same
        });
    }

    /// The watch expired (410 Gone): re-list. Expected now and then (the
    /// API server keeps a few minutes of history), so logged at info.
    fn gone(&mut self, failure: &Failure) {
        tracing::info!(kind = %self.kind, error = %failure.describe(), "Kubernetes API: watch expired; re-listing");
    }

    /// A list or watch failed: log it (once per cause until the kind
    /// recovers), publish the kind's state, and say how long to wait.
    async fn failed(&mut self, failure: Failure) -> Result<Duration, Closed> {
        let code = failure.code();
        let (since, logged) = self
            .failing
            .get_or_insert_with(|| (std::time::Instant::now(), HashSet::new()));
        let since = *since;
        let first = logged.insert(failure.class());
        if self.optional && code == Some(404) {
            if first {
                tracing::info!(kind = %self.kind, "Kubernetes API: this kind is not installed (no CRD); its policies are absent until it is");
            }
            self.set_state(KindState::Absent);
            // Listed, and empty (once: the snapshot need not change again).
            if first {
                if !self.send(Event::Init).await || !self.send(Event::InitDone).await {
                    return Err(Closed);
                }
                self.listed = true;
            }
            // Served soon after its CRD is created: retry at the normal pace
            // then; else until the CRD appears (see `pause`).
            let installed = self
                .crd
                .as_ref()
                .is_some_and(|crd| self.crds.borrow().contains(crd));
            return Ok(if installed {
                self.backoff.delay()
            } else {
                SLOW_RETRY
            });
        }
        if code == Some(403) {
            if first {
                tracing::warn!(
                    kind = %self.kind,
                    error = %failure.describe(),
                    hint = "grant netwatch's service account list and watch on this kind cluster-wide (a ClusterRole bound to it)",
                    "Kubernetes API: forbidden; this kind stays unknown (other kinds go on), retried every {} s",
                    SLOW_RETRY.as_secs()
                );
            }
            self.set_state(KindState::Forbidden {
                message: failure.describe(),
            });
            // The other kinds must not wait for this one: it counts as
            // listed, empty, until RBAC allows it.
            if !self.listed {
                if !self.send(Event::Init).await || !self.send(Event::InitDone).await {
                    return Err(Closed);
                }
                self.listed = true;
            }
            return Ok(SLOW_RETRY);
        }
        if first {
            tracing::warn!(
                kind = %self.kind,
                error = %failure.describe(),
                hint = hint(code),
                "Kubernetes API: watch failed; keeping the last known state, retrying every {} s at most (logged once until it recovers)",
                self.config.backoff_max.as_secs_f64()
            );
        }
        self.set_state(KindState::Failing {
            since,
            error: failure.describe(),
        });
        Ok(self.backoff.delay())
    }

    /// A list or watch worked: the kind is current.
    fn recovered(&mut self) {
        self.backoff.reset();
        if let Some((since, logged)) = self.failing.take() {
            let was_absent = logged.contains("api 404") && self.optional;
            if was_absent {
                tracing::info!(kind = %self.kind, "Kubernetes API: this kind is installed now");
            } else {
                tracing::info!(
                    kind = %self.kind,
                    after_secs = since.elapsed().as_secs(),
                    "Kubernetes API: watch recovered"
                );
            }
        }
        self.set_state(KindState::Synced);
    }
}

/// Watches CustomResourceDefinitions, metadata only (a CRD's schema can be
/// hundreds of kilobytes), and publishes which of `wanted` are installed.
/// Field selectors cannot say "one of these names", so the names are
/// filtered here; clusters have tens to hundreds of CRDs, and their
/// metadata changes rarely. When the API refuses (an older ClusterRole
/// without customresourcedefinitions), the optional kinds fall back to
/// polling every [`SLOW_RETRY`]; this is retried as seldom.
async fn watch_crds(
    api: Api<CustomResourceDefinition>,
    wanted: BTreeSet<String>,
    installed: watch::Sender<BTreeSet<String>>,
    config: Arc<KubeWatchConfig>,
) {
    let mut backoff = Backoff::new(config.backoff_max);
    let mut logged = false;
    let params =
        WatchParams::default().timeout(config.watch_timeout.as_secs().clamp(1, 3600) as u32);
    loop {
        let timeout = config.request_timeout;
        let listed = tokio::time::timeout(
            timeout,
            api.list_metadata(&ListParams::default().match_any()),
        )
        .await;
        let listed = match listed {
            Ok(Ok(list)) => Ok(list),
            Err(_) => Err((
                format!("no answer within {} s", timeout.as_secs()),
                backoff.delay(),
            )),
            Ok(Err(kube::Error::Api(status))) if matches!(status.code, 401 | 403) => {
                Err((format!("{} {}", status.code, status.message), SLOW_RETRY))
            }
            Ok(Err(error)) => Err((error.to_string(), backoff.delay())),
        };
        let list = match listed {
            Ok(list) => list,
            Err((error, pause)) => {
                if !logged {
                    logged = true;
                    tracing::info!(
                        error = %error,
                        hint = "grant list and watch on customresourcedefinitions so that CRDs installed later are picked up at once",
                        "Kubernetes API: cannot watch CustomResourceDefinitions; kinds whose CRD is missing are retried every {} s",
                        SLOW_RETRY.as_secs()
                    );
                }
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        logged = false;
        backoff.reset();
        let names: BTreeSet<String> = list
            .items
            .iter()
            .filter_map(|crd| crd.metadata.name.clone())
            .filter(|name| wanted.contains(name))
            .collect();
        installed.send_if_modified(|current| {
            let changed = *current != names;
            *current = names;
            changed
        });
        let Some(version) = list.metadata.resource_version.clone() else {
            tokio::time::sleep(backoff.delay()).await;
            continue;
        };
        // Watch until it ends or fails, then re-list (cheap: metadata of
        // a few CRDs, from the watch cache).
        let started = tokio::time::timeout(timeout, api.watch_metadata(&params, &version)).await;
        let Ok(Ok(stream)) = started else {
            tokio::time::sleep(backoff.delay()).await;
            continue;
        };
        let mut stream = std::pin::pin!(stream);
        while let Ok(Some(Ok(event))) =
            tokio::time::timeout(config.idle_timeout, stream.next()).await
        {
            let (name, present) = match event {
                WatchEvent::Added(crd) | WatchEvent::Modified(crd) => {
                    (crd.metadata.name, crd.metadata.deletion_timestamp.is_none())
                }
                WatchEvent::Deleted(crd) => (crd.metadata.name, false),
                WatchEvent::Bookmark(_) => continue,
                WatchEvent::Error(_) => break,
            };
            let Some(name) = name.filter(|n| wanted.contains(n)) else {
                continue;
            };
            installed.send_if_modified(|current| {
                if present {
                    current.insert(name)
                } else {
                    current.remove(&name)
                }
            });
        }
        if installed.is_closed() {
            return;
        }
        tokio::time::sleep(backoff.delay()).await;
    }
}

fn hint(code: Option<u16>) -> &'static str {
    match code {
        Some(401) => "the service account token was rejected; check the agent's credentials",
        Some(429) => "the API server is shedding load (priority and fairness); retrying",
        _ => "capture continues; flows are named from the last known state until the API answers",
    }
}

/// Drops metadata netwatch never reads: annotations (often the biggest part,
/// `last-applied-configuration`), managed fields, finalizers.
fn strip_meta(meta: &mut ObjectMeta) {
    *meta = ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        uid: meta.uid.take(),
        labels: meta.labels.take(),
        owner_references: meta.owner_references.take(),
        creation_timestamp: meta.creation_timestamp.take(),
        deletion_timestamp: meta.deletion_timestamp.take(),
        resource_version: meta.resource_version.take(),
        ..ObjectMeta::default()
    };
}

/// Keeps a pod's identity: labels, owners, node, host network, service
/// account, IPs, container ports (merged into one container entry), phase, the Ready
/// condition, and, for pods on `local_node` only, container names and IDs
/// (`status.containerStatuses`).
pub fn strip_pod(pod: &mut Pod, local_node: Option<&str>) {
    strip_meta(&mut pod.metadata);
    let spec = pod.spec.take().unwrap_or_default();
    let is_local = local_node.is_some() && spec.node_name.as_deref() == local_node;
    // A typed container spec is 2 KB even when empty, and netwatch needs
    // only the ports (named ports resolve pod-wide): keep one entry, named
    // after the first container, carrying every container's ports, and none
    // when the pod declares no port. Container names of local pods come from
    // their statuses.
    let first_name = spec.containers.first().map(|c| c.name.clone());
    let ports: Vec<_> = spec
        .containers
        .into_iter()
        .flat_map(|c| c.ports.unwrap_or_default())
        .collect();
    let containers = match first_name {
        Some(name) if !ports.is_empty() => vec![Container {
            name,
            ports: Some(ports),
            ..Container::default()
        }],
        _ => Vec::new(),
    };
    pod.spec = Some(PodSpec {
        containers,
        node_name: spec.node_name,
        host_network: spec.host_network,
        // Calico's serviceAccountSelector and serviceAccounts rules.
        service_account_name: spec.service_account_name,
        ..PodSpec::default()
    });
    pod.status = pod.status.take().map(|status| PodStatus {
        phase: status.phase,
        pod_ip: status.pod_ip,
        pod_ips: status.pod_ips,
        start_time: status.start_time,
        conditions: status.conditions.map(|conditions| {
            conditions
                .into_iter()
                .filter(|c| c.type_ == "Ready")
                .map(|c| PodCondition {
                    type_: c.type_,
                    status: c.status,
                    ..PodCondition::default()
                })
                .collect()
        }),
        container_statuses: status
            .container_statuses
            .filter(|_| is_local)
            .map(|statuses| {
                statuses
                    .into_iter()
                    .map(|s| ContainerStatus {
                        name: s.name,
                        container_id: s.container_id,
                        ready: s.ready,
                        ..ContainerStatus::default()
                    })
                    .collect()
            }),
        ..PodStatus::default()
    });
}

/// Keeps a namespace's name and labels.
fn strip_namespace(ns: &mut Namespace) {
    strip_meta(&mut ns.metadata);
    ns.spec = None;
    ns.status = None;
}

fn strip_deployment(d: &mut Deployment) {
    strip_meta(&mut d.metadata);
    d.spec = d.spec.take().map(|s| DeploymentSpec {
        selector: s.selector,
        ..DeploymentSpec::default()
    });
    d.status = None;
}

fn strip_replica_set(r: &mut ReplicaSet) {
    strip_meta(&mut r.metadata);
    r.spec = r.spec.take().map(|s| ReplicaSetSpec {
        selector: s.selector,
        ..ReplicaSetSpec::default()
    });
    r.status = None;
}

fn strip_stateful_set(s: &mut StatefulSet) {
    strip_meta(&mut s.metadata);
    s.spec = s.spec.take().map(|s| StatefulSetSpec {
        selector: s.selector,
        service_name: s.service_name,
        ..StatefulSetSpec::default()
    });
    s.status = None;
}

fn strip_daemon_set(d: &mut DaemonSet) {
    strip_meta(&mut d.metadata);
    d.spec = d.spec.take().map(|s| DaemonSetSpec {
        selector: s.selector,
        ..DaemonSetSpec::default()
    });
    d.status = None;
}

fn strip_job(j: &mut Job) {
    strip_meta(&mut j.metadata);
    j.spec = j.spec.take().map(|s| JobSpec {
        selector: s.selector,
        ..JobSpec::default()
    });
    j.status = None;
}

fn strip_cron_job(c: &mut CronJob) {
    strip_meta(&mut c.metadata);
    c.spec = c.spec.take().map(|s| CronJobSpec {
        schedule: s.schedule,
        ..CronJobSpec::default()
    });
    c.status = None;
}

/// The watchers' stripping applied to a whole snapshot (the manifests
/// source: the agent keeps what it reads, not the files' full objects).
/// Container statuses are kept for every pod: manifests carry them only
/// when their author wants containers named.
pub fn strip_snapshot(s: &mut ClusterSnapshot) {
    s.namespaces.iter_mut().for_each(strip_namespace);
    s.pods.iter_mut().for_each(PodRecord::strip);
    for np in &mut s.network_policies {
        strip_meta(&mut np.metadata);
    }
    s.services.iter_mut().for_each(strip_service);
    s.endpoint_slices.iter_mut().for_each(strip_endpoint_slice);
    s.nodes.iter_mut().for_each(strip_node);
    s.deployments.iter_mut().for_each(strip_deployment);
    s.replica_sets.iter_mut().for_each(strip_replica_set);
    s.stateful_sets.iter_mut().for_each(strip_stateful_set);
    s.daemon_sets.iter_mut().for_each(strip_daemon_set);
    s.jobs.iter_mut().for_each(strip_job);
    s.cron_jobs.iter_mut().for_each(strip_cron_job);
    for p in &mut s.cluster_network_policies {
        strip_meta(&mut p.metadata);
        p.status = None;
    }
    for p in &mut s.admin_network_policies {
        strip_meta(&mut p.metadata);
        p.status = None;
    }
    for p in &mut s.baseline_admin_network_policies {
        strip_meta(&mut p.metadata);
        p.status = None;
    }
    s.pods.shrink_to_fit();
    s.network_policies.shrink_to_fit();
}

/// Keeps cluster IPs, ports, selector and type.
pub fn strip_service(svc: &mut Service) {
    strip_meta(&mut svc.metadata);
    svc.spec = svc.spec.take().map(|s| ServiceSpec {
        cluster_ip: s.cluster_ip,
        cluster_ips: s.cluster_ips,
        ports: s.ports,
        selector: s.selector,
        type_: s.type_,
        ..ServiceSpec::default()
    });
    svc.status = None;
}

/// Keeps endpoints' addresses, conditions, node and target, and the ports.
pub fn strip_endpoint_slice(slice: &mut EndpointSlice) {
    strip_meta(&mut slice.metadata);
    for endpoint in &mut slice.endpoints {
        *endpoint = SliceEndpoint {
            addresses: std::mem::take(&mut endpoint.addresses),
            conditions: endpoint.conditions.take(),
            node_name: endpoint.node_name.take(),
            target_ref: endpoint.target_ref.take(),
            ..SliceEndpoint::default()
        };
    }
}

/// Keeps the node's name and addresses.
pub fn strip_node(node: &mut Node) {
    strip_meta(&mut node.metadata);
    node.metadata.labels = None;
    node.metadata.owner_references = None;
    node.spec = None;
    node.status = node.status.take().map(|s| NodeStatus {
        addresses: s.addresses,
        ..NodeStatus::default()
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named_pod(namespace: &str, name: &str, ip: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": namespace},
            "status": {"podIP": ip}
        }))
        .unwrap()
    }

    fn pods(snapshot: &ClusterSnapshot) -> Vec<(String, String)> {
        let mut pods: Vec<(String, String)> = snapshot
            .pods
            .iter()
            .map(|p| {
                (
                    p.name().unwrap().to_owned(),
                    p.pod_ip().unwrap().to_string(),
                )
            })
            .collect();
        pods.sort();
        pods
    }

    fn apply(
        writer: &mut SnapshotWriter,
        snapshot: &mut ClusterSnapshot,
        event: Event<Pod>,
    ) -> bool {
        writer.apply(Pod::wrap(event), || snapshot)
    }

    #[test]
    fn snapshot_writer_applies_watch_events_like_a_reflector() {
        let mut writer = SnapshotWriter::default();
        let mut snapshot = ClusterSnapshot::default();
        let pair = |n: &str, ip: &str| (n.to_owned(), ip.to_owned());

        // The initial list is buffered, then lands whole.
        assert!(!apply(&mut writer, &mut snapshot, Event::Init));
        for (name, ip) in [("a", "10.0.0.1"), ("b", "10.0.0.2"), ("c", "10.0.0.3")] {
            assert!(!apply(
                &mut writer,
                &mut snapshot,
                Event::InitApply(named_pod("prod", name, ip))
            ));
        }
        assert!(snapshot.pods.is_empty());
        assert!(apply(&mut writer, &mut snapshot, Event::InitDone));
        assert_eq!(pods(&snapshot).len(), 3);

        // Apply replaces by namespace/name; the same name elsewhere is another object.
        apply(
            &mut writer,
            &mut snapshot,
            Event::Apply(named_pod("prod", "b", "10.0.0.22")),
        );
        apply(
            &mut writer,
            &mut snapshot,
            Event::Apply(named_pod("dev", "b", "10.0.1.2")),
        );
        assert_eq!(snapshot.pods.len(), 4);
        // Deleting the first moves the last into its place; the index follows.
        assert!(apply(
            &mut writer,
            &mut snapshot,
            Event::Delete(named_pod("prod", "a", ""))
        ));
        assert!(!apply(
            &mut writer,
            &mut snapshot,
            Event::Delete(named_pod("prod", "a", ""))
        ));
        apply(
            &mut writer,
            &mut snapshot,
            Event::Apply(named_pod("dev", "b", "10.0.1.22")),
        );
        assert_eq!(
            pods(&snapshot),
            [
                pair("b", "10.0.0.22"),
                pair("b", "10.0.1.22"),
                pair("c", "10.0.0.3")
            ]
        );

        // A re-list (after 410 Gone) replaces everything.
        assert!(!writer.all_listed(), "other kinds are not listed");
        apply(&mut writer, &mut snapshot, Event::Init);
        apply(
            &mut writer,
            &mut snapshot,
            Event::InitApply(named_pod("prod", "z", "10.0.0.9")),
        );
        assert_eq!(
            snapshot.pods.len(),
            3,
            "the old state stays until the re-list is done"
        );
        apply(&mut writer, &mut snapshot, Event::InitDone);
        assert_eq!(pods(&snapshot), [pair("z", "10.0.0.9")]);
        apply(
            &mut writer,
            &mut snapshot,
            Event::Delete(named_pod("prod", "z", "")),
        );
        assert!(snapshot.pods.is_empty());
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(5));
        let delays: Vec<Duration> = (0..12).map(|_| b.delay()).collect();
        // 0.5, 1, 2, 4, then 5 s steps; each delay between half and all of it.
        for (d, step) in delays.iter().zip([0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]) {
            let step = Duration::from_secs_f64(step);
            assert!(*d >= step / 2 && *d <= step, "{d:?} for a {step:?} step");
        }
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(5)));
        b.reset();
        assert!(b.delay() <= Duration::from_millis(500));
    }

    #[test]
    fn stale_kinds_are_named_with_why() {
        let mut status = ApiStatus::new();
        status.insert("Pod".into(), KindState::Synced);
        status.insert("AdminNetworkPolicy".into(), KindState::Absent);
        assert_eq!(describe_stale(&status), None);
        status.insert(
            "NetworkPolicy".into(),
            KindState::Forbidden {
                message: "403 Forbidden: no".into(),
            },
        );
        status.insert(
            "Service".into(),
            KindState::Failing {
                since: std::time::Instant::now(),
                error: "no answer within 30 s".into(),
            },
        );
        let text = describe_stale(&status).unwrap();
        assert_eq!(
            text,
            "NetworkPolicy: forbidden (403 Forbidden: no); Service: stale for 0 s (no answer within 30 s)"
        );
    }

    #[test]
    fn strip_pod_keeps_identity_and_drops_the_rest() {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "web-1", "namespace": "prod", "uid": "u1",
                "labels": {"app": "web"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}"},
                "managedFields": [{"manager": "kubectl"}],
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5d4f", "uid": "r1", "controller": true}]
            },
            "spec": {
                "nodeName": "node-a",
                "containers": [{"name": "web", "image": "nginx", "env": [{"name": "A", "value": "b"}],
                                "ports": [{"name": "http", "containerPort": 80}]},
                               {"name": "sidecar", "image": "envoy", "ports": [{"name": "admin", "containerPort": 9901}]},
                               {"name": "log", "image": "fluent-bit"}],
                "volumes": [{"name": "v", "emptyDir": {}}]
            },
            "status": {
                "phase": "Running", "podIP": "10.0.0.5", "podIPs": [{"ip": "10.0.0.5"}],
                "conditions": [{"type": "Ready", "status": "True", "message": "x"},
                               {"type": "PodScheduled", "status": "True"}],
                "containerStatuses": [{"name": "web", "containerID": "containerd://abc", "image": "nginx",
                                       "imageID": "sha", "ready": true, "restartCount": 3}]
            }
        }))
        .unwrap();
        let mut remote = pod.clone();
        strip_pod(&mut pod, Some("node-a"));
        let json = serde_json::to_value(&pod).unwrap();
        assert!(json["metadata"].get("annotations").is_none());
        assert!(json["metadata"].get("managedFields").is_none());
        assert_eq!(json["metadata"]["labels"]["app"], "web");
        assert_eq!(json["metadata"]["ownerReferences"][0]["name"], "web-5d4f");
        // Every container's ports, in one entry.
        assert_eq!(
            json["spec"]["containers"],
            serde_json::json!([{"name": "web", "ports": [
                {"name": "http", "containerPort": 80},
                {"name": "admin", "containerPort": 9901}
            ]}])
        );
        assert!(json["spec"].get("volumes").is_none());
        assert_eq!(json["status"]["conditions"].as_array().unwrap().len(), 1);
        assert_eq!(
            json["status"]["containerStatuses"][0]["containerID"],
            "containerd://abc"
        );

        // A pod on another node keeps no container statuses.
        strip_pod(&mut remote, Some("node-b"));
        assert!(remote.status.unwrap().container_statuses.is_none());
    }
}
