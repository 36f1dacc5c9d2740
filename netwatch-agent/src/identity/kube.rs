//! The live cluster as a channel of [`ClusterSnapshot`]s: kube-rs watchers
//! and reflectors for every kind netwatch reads.
//!
//! Each kind runs `watcher -> default_backoff -> modify(strip) -> reflect`:
//! the watcher lists then watches, re-lists when the API says the watch is
//! too old (410 Gone) or the connection drops, and backs off exponentially on
//! errors; `modify` drops every field netwatch does not use before the object
//! is stored, so a big cluster stays small in memory; the reflector keeps the
//! store. Whenever a store changes, a debounced task assembles a snapshot
//! from all stores and publishes it.
//!
//! The agent never waits on this: capture runs whether or not the API
//! answers, and identity catches up when the snapshots arrive.

use std::{collections::HashSet, fmt::Debug, hash::Hash, path::Path, sync::Arc, time::Duration};

use futures::{StreamExt, future::join_all};
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
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Config, Resource,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt, reflector,
        reflector::Store,
        watcher::{self, Event, watcher},
    },
};
use serde::de::DeserializeOwned;
use tokio::{
    sync::{Notify, watch},
    task::JoinHandle,
};

use crate::cluster::ClusterSnapshot;

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

/// A client from `kubeconfig` when given, else inferred (`$KUBECONFIG`,
/// `~/.kube/config`, or the pod's service account in cluster).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubeSourceError> {
    let config = match kubeconfig {
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
}

impl Default for KubeWatchConfig {
    fn default() -> Self {
        KubeWatchConfig {
            node_name: None,
            debounce: Duration::from_millis(200),
        }
    }
}

/// The running watchers: the latest snapshot, whether every kind has been
/// listed once, and the tasks (stopped when this is dropped).
#[derive(Debug)]
pub struct KubeSnapshots {
    /// The latest snapshot; starts empty, updated at most once per debounce
    /// interval while the cluster changes.
    pub snapshots: watch::Receiver<Arc<ClusterSnapshot>>,
    /// `true` once every kind's initial list is done.
    pub ready: watch::Receiver<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl KubeSnapshots {
    /// Takes the receivers and the tasks; the tasks then live as long as the
    /// returned handles are kept (dropping a `JoinHandle` does not stop it).
    pub(crate) fn into_parts(
        mut self,
    ) -> (
        watch::Receiver<Arc<ClusterSnapshot>>,
        watch::Receiver<bool>,
        Vec<JoinHandle<()>>,
    ) {
        let tasks = std::mem::take(&mut self.tasks);
        (self.snapshots.clone(), self.ready.clone(), tasks)
    }
}

impl Drop for KubeSnapshots {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// One reflector store per kind.
#[derive(Clone)]
struct Stores {
    namespaces: Store<Namespace>,
    pods: Store<Pod>,
    network_policies: Store<NetworkPolicy>,
    services: Store<Service>,
    endpoint_slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    deployments: Store<Deployment>,
    replica_sets: Store<ReplicaSet>,
    stateful_sets: Store<StatefulSet>,
    daemon_sets: Store<DaemonSet>,
    jobs: Store<Job>,
    cron_jobs: Store<CronJob>,
}

fn cloned<K: Clone + reflector::Lookup + 'static>(store: &Store<K>) -> Vec<K>
where
    K::DynamicType: Eq + Hash + Clone,
{
    store.state().iter().map(|k| K::clone(k)).collect()
}

impl Stores {
    fn snapshot(&self) -> ClusterSnapshot {
        ClusterSnapshot {
            namespaces: cloned(&self.namespaces),
            pods: cloned(&self.pods),
            network_policies: cloned(&self.network_policies),
            services: cloned(&self.services),
            endpoint_slices: cloned(&self.endpoint_slices),
            nodes: cloned(&self.nodes),
            deployments: cloned(&self.deployments),
            replica_sets: cloned(&self.replica_sets),
            stateful_sets: cloned(&self.stateful_sets),
            daemon_sets: cloned(&self.daemon_sets),
            jobs: cloned(&self.jobs),
            cron_jobs: cloned(&self.cron_jobs),
        }
    }
}

/// Starts the watchers for every kind on `client` and the task that turns
/// their stores into snapshots. Needs a Tokio runtime; returns at once.
pub fn watch_cluster(client: Client, config: KubeWatchConfig) -> KubeSnapshots {
    let changed = Arc::new(Notify::new());
    let mut tasks = Vec::new();
    let node = config.node_name.clone();

    macro_rules! reflect {
        ($kind:ty, $strip:expr) => {{
            let (store, task) = reflect::<$kind>(client.clone(), $strip, Arc::clone(&changed));
            tasks.push(task);
            store
        }};
    }
    let stores = Stores {
        namespaces: reflect!(Namespace, |ns: &mut Namespace| {
            strip_meta(&mut ns.metadata);
            ns.spec = None;
            ns.status = None;
        }),
        pods: reflect!(Pod, move |pod: &mut Pod| strip_pod(pod, node.as_deref())),
        network_policies: reflect!(NetworkPolicy, |np: &mut NetworkPolicy| strip_meta(
            &mut np.metadata
        )),
        services: reflect!(Service, strip_service),
        endpoint_slices: reflect!(EndpointSlice, strip_endpoint_slice),
        nodes: reflect!(Node, strip_node),
        deployments: reflect!(Deployment, |d: &mut Deployment| {
            strip_meta(&mut d.metadata);
            d.spec = d.spec.take().map(|s| DeploymentSpec {
                selector: s.selector,
                ..DeploymentSpec::default()
            });
            d.status = None;
        }),
        replica_sets: reflect!(ReplicaSet, |r: &mut ReplicaSet| {
            strip_meta(&mut r.metadata);
            r.spec = r.spec.take().map(|s| ReplicaSetSpec {
                selector: s.selector,
                ..ReplicaSetSpec::default()
            });
            r.status = None;
        }),
        stateful_sets: reflect!(StatefulSet, |s: &mut StatefulSet| {
            strip_meta(&mut s.metadata);
            s.spec = s.spec.take().map(|s| StatefulSetSpec {
                selector: s.selector,
                service_name: s.service_name,
                ..StatefulSetSpec::default()
            });
            s.status = None;
        }),
        daemon_sets: reflect!(DaemonSet, |d: &mut DaemonSet| {
            strip_meta(&mut d.metadata);
            d.spec = d.spec.take().map(|s| DaemonSetSpec {
                selector: s.selector,
                ..DaemonSetSpec::default()
            });
            d.status = None;
        }),
        jobs: reflect!(Job, |j: &mut Job| {
            strip_meta(&mut j.metadata);
            j.spec = j.spec.take().map(|s| JobSpec {
                selector: s.selector,
                ..JobSpec::default()
            });
            j.status = None;
        }),
        cron_jobs: reflect!(CronJob, |c: &mut CronJob| {
            strip_meta(&mut c.metadata);
            c.spec = c.spec.take().map(|s| CronJobSpec {
                schedule: s.schedule,
                ..CronJobSpec::default()
            });
            c.status = None;
        }),
    };

    let (snapshot_tx, snapshots) = watch::channel(Arc::new(ClusterSnapshot::default()));
    let (ready_tx, ready) = watch::channel(false);

    tasks.push(tokio::spawn(wait_until_listed(
        stores.clone(),
        ready_tx,
        Arc::clone(&changed),
    )));
    tasks.push(tokio::spawn(publish_snapshots(
        stores,
        snapshot_tx,
        changed,
        config.debounce,
    )));

    KubeSnapshots {
        snapshots,
        ready,
        tasks,
    }
}

/// Sets `ready` once every store has its initial list.
async fn wait_until_listed(stores: Stores, ready: watch::Sender<bool>, changed: Arc<Notify>) {
    let waits: Vec<futures::future::BoxFuture<'static, bool>> = {
        macro_rules! wait {
            ($($field:ident),*) => {
                vec![$({
                    let store = stores.$field.clone();
                    Box::pin(async move { store.wait_until_ready().await.is_ok() })
                        as futures::future::BoxFuture<'static, bool>
                }),*]
            };
        }
        wait!(
            namespaces,
            pods,
            network_policies,
            services,
            endpoint_slices,
            nodes,
            deployments,
            replica_sets,
            stateful_sets,
            daemon_sets,
            jobs,
            cron_jobs
        )
    };
    if join_all(waits).await.into_iter().all(|ok| ok) {
        tracing::info!("Kubernetes API: initial lists of every kind done");
        ready.send_replace(true);
        changed.notify_one();
    }
}

/// Publishes a snapshot after each burst of changes.
async fn publish_snapshots(
    stores: Stores,
    snapshots: watch::Sender<Arc<ClusterSnapshot>>,
    changed: Arc<Notify>,
    debounce: Duration,
) {
    loop {
        changed.notified().await;
        // Changes come in bursts (a rollout, a re-list): gather them.
        tokio::time::sleep(debounce).await;
        let snapshot = Arc::new(stores.snapshot());
        if snapshots.send(snapshot).is_err() {
            // Every receiver is gone: nobody needs snapshots any more.
            return;
        }
    }
}

/// Runs one kind's watcher into a store, notifying `changed` when the store
/// changes and logging each kind of error once until the watch recovers.
fn reflect<K>(
    client: Client,
    strip: impl FnMut(&mut K) + Send + 'static,
    changed: Arc<Notify>,
) -> (Store<K>, JoinHandle<()>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    let api: Api<K> = Api::all(client);
    let (store, writer) = reflector::store::<K>();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(strip)
        .reflect(writer);
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut failing: HashSet<String> = HashSet::new();
        while let Some(event) = stream.next().await {
            match event {
                Ok(Event::InitDone) => {
                    if !failing.is_empty() {
                        tracing::info!(kind = %kind, "Kubernetes API: watch recovered");
                        failing.clear();
                    }
                    changed.notify_one();
                }
                Ok(Event::Apply(_) | Event::Delete(_)) => changed.notify_one(),
                Ok(Event::Init | Event::InitApply(_)) => {}
                Err(error) => {
                    if failing.insert(error_class(&error)) {
                        tracing::warn!(
                            kind = %kind,
                            error = %error,
                            hint = hint(&error),
                            "Kubernetes API: watch failed; re-listing with backoff (logged once until it recovers)"
                        );
                    }
                }
            }
        }
    });
    (store, task)
}

/// A key that groups errors of the same cause, so each is logged once.
fn error_class(error: &watcher::Error) -> String {
    let client_error = |e: &kube::Error| match e {
        kube::Error::Api(status) => format!("api {}", status.code),
        other => format!("{:?}", std::mem::discriminant(other)),
    };
    match error {
        watcher::Error::InitialListFailed(e) => format!("list {}", client_error(e)),
        watcher::Error::WatchStartFailed(e) => format!("watch-start {}", client_error(e)),
        watcher::Error::WatchFailed(e) => format!("watch {}", client_error(e)),
        watcher::Error::WatchError(status) => format!("watch-event {}", status.code),
        watcher::Error::NoResourceVersion => "no-resource-version".to_owned(),
    }
}

fn hint(error: &watcher::Error) -> &'static str {
    let code = match error {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code,
        watcher::Error::WatchError(s) => s.code,
        _ => 0,
    };
    match code {
        401 => "the service account token was rejected; check the agent's credentials",
        403 => {
            "grant netwatch's service account list and watch on this kind cluster-wide (a ClusterRole \
             bound to it)"
        }
        410 => "the watch fell too far behind; re-listing",
        _ => "capture continues; flows are enriched again once the API answers",
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

/// Keeps a pod's identity: labels, owners, node, host network, IPs,
/// container ports (merged into one container entry), phase, the Ready
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
