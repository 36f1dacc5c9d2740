//! The API-server source against a mock API, the kube-rs way: a tower-test
//! service answers the watchers' list and watch requests with JSON, including
//! a refused list (403) and a watch that expires (410 Gone), and the test
//! checks the snapshots that come out. The same faults and more, over real
//! HTTP against the agent process, are in netwatch-e2e/tests/api_faults.rs.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use http::{Request, Response, StatusCode};
use kube::client::Body;
use netwatch::{
    cluster::ClusterSnapshot,
    identity::{
        IdentityCache, IdentityConfig, IpResolution, KindState, KubeWatchConfig,
        kube::{describe_stale, watch_cluster},
    },
};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// Every collection the watchers ask for, by API path.
const COLLECTIONS: &[(&str, &str, &str)] = &[
    ("/api/v1/namespaces", "v1", "NamespaceList"),
    ("/api/v1/pods", "v1", "PodList"),
    ("/api/v1/services", "v1", "ServiceList"),
    ("/api/v1/nodes", "v1", "NodeList"),
    (
        "/apis/discovery.k8s.io/v1/endpointslices",
        "discovery.k8s.io/v1",
        "EndpointSliceList",
    ),
    (
        "/apis/networking.k8s.io/v1/networkpolicies",
        "networking.k8s.io/v1",
        "NetworkPolicyList",
    ),
    ("/apis/apps/v1/deployments", "apps/v1", "DeploymentList"),
    ("/apis/apps/v1/replicasets", "apps/v1", "ReplicaSetList"),
    ("/apis/apps/v1/statefulsets", "apps/v1", "StatefulSetList"),
    ("/apis/apps/v1/daemonsets", "apps/v1", "DaemonSetList"),
    ("/apis/batch/v1/jobs", "batch/v1", "JobList"),
    ("/apis/batch/v1/cronjobs", "batch/v1", "CronJobList"),
    // Installed in this mock cluster:
    (
        "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies",
        "policy.networking.k8s.io/v1alpha2",
        "ClusterNetworkPolicyList",
    ),
    // Not installed (404): must not hold readiness back.
    (
        "/apis/policy.networking.k8s.io/v1alpha1/adminnetworkpolicies",
        "policy.networking.k8s.io/v1alpha1",
        "AdminNetworkPolicyList",
    ),
    (
        "/apis/policy.networking.k8s.io/v1alpha1/baselineadminnetworkpolicies",
        "policy.networking.k8s.io/v1alpha1",
        "BaselineAdminNetworkPolicyList",
    ),
    // The CRDs, watched (metadata only) to pick up a kind installed later.
    (
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
        "apiextensions.k8s.io/v1",
        "CustomResourceDefinitionList",
    ),
    // Calico's kinds, installed and empty (tests/identity_kube_calico.rs
    // serves them).
    (
        "/apis/projectcalico.org/v3/tiers",
        "projectcalico.org/v3",
        "TierList",
    ),
    (
        "/apis/projectcalico.org/v3/networkpolicies",
        "projectcalico.org/v3",
        "NetworkPolicyList",
    ),
    (
        "/apis/projectcalico.org/v3/globalnetworkpolicies",
        "projectcalico.org/v3",
        "GlobalNetworkPolicyList",
    ),
    (
        "/apis/projectcalico.org/v3/stagednetworkpolicies",
        "projectcalico.org/v3",
        "StagedNetworkPolicyList",
    ),
    (
        "/apis/projectcalico.org/v3/stagedglobalnetworkpolicies",
        "projectcalico.org/v3",
        "StagedGlobalNetworkPolicyList",
    ),
    (
        "/apis/projectcalico.org/v3/stagedkubernetesnetworkpolicies",
        "projectcalico.org/v3",
        "StagedKubernetesNetworkPolicyList",
    ),
    (
        "/apis/crd.projectcalico.org/v1/tiers",
        "crd.projectcalico.org/v1",
        "TierList",
    ),
    (
        "/apis/crd.projectcalico.org/v1/networkpolicies",
        "crd.projectcalico.org/v1",
        "NetworkPolicyList",
    ),
    (
        "/apis/crd.projectcalico.org/v1/globalnetworkpolicies",
        "crd.projectcalico.org/v1",
        "GlobalNetworkPolicyList",
    ),
    (
        "/apis/crd.projectcalico.org/v1/stagednetworkpolicies",
        "crd.projectcalico.org/v1",
        "StagedNetworkPolicyList",
    ),
    (
        "/apis/crd.projectcalico.org/v1/stagedglobalnetworkpolicies",
        "crd.projectcalico.org/v1",
        "StagedGlobalNetworkPolicyList",
    ),
    (
        "/apis/crd.projectcalico.org/v1/stagedkubernetesnetworkpolicies",
        "crd.projectcalico.org/v1",
        "StagedKubernetesNetworkPolicyList",
    ),
];

fn pod(name: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": "prod", "uid": format!("uid-{name}"), "resourceVersion": "1",
            "labels": {"app": name},
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "x".repeat(4096)},
            "managedFields": [{"manager": "kubectl", "operation": "Apply"}]
        },
        "spec": {"nodeName": "node-a", "serviceAccountName": format!("{name}-sa"),
                 "containers": [{"name": "app", "image": "busybox", "command": ["sleep", "1d"],
                                                         "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                   "conditions": [{"type": "Ready", "status": "True"}]}
    })
}

fn list(api_version: &str, kind: &str, resource_version: &str, items: Vec<Value>) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": api_version, "kind": kind,
        "metadata": {"resourceVersion": resource_version},
        "items": items
    }))
    .unwrap()
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

/// What the mock API serves, and what it was asked.
struct MockApi {
    /// Pod lists, served in turn (the last one repeats).
    pod_lists: Vec<Vec<Value>>,
    /// How many times each collection was listed.
    lists: HashMap<String, usize>,
}

/// Answers requests until the client goes away. Pod watches are answered
/// with the bodies the test sends on `pod_watches`, one per watch request;
/// other watches are held open, as an idle API server does.
async fn serve(mut handle: Handle, api: Arc<Mutex<MockApi>>, pod_watches: mpsc::Receiver<Vec<u8>>) {
    let pod_watches = Arc::new(tokio::sync::Mutex::new(pod_watches));
    let mut idle_watches = Vec::new();
    while let Some((request, send)) = handle.next_request().await {
        let path = request.uri().path().to_owned();
        let query = request.uri().query().unwrap_or_default().to_owned();
        let Some((_, api_version, kind)) = COLLECTIONS.iter().find(|(p, _, _)| *p == path) else {
            panic!("unexpected request {} {}", request.method(), request.uri());
        };
        if query.contains("watch=true") {
            if path == "/api/v1/pods" {
                let pod_watches = Arc::clone(&pod_watches);
                tokio::spawn(async move {
                    if let Some(body) = pod_watches.lock().await.recv().await {
                        send.send_response(Response::new(Body::from(body)));
                    }
                });
            } else {
                idle_watches.push(send);
            }
            continue;
        }
        let count = {
            let mut api = api.lock().unwrap();
            let count = api.lists.entry(path.clone()).or_default();
            *count += 1;
            *count
        };
        let response = match path.as_str() {
            "/api/v1/pods" => {
                let api = api.lock().unwrap();
                let pods = api.pod_lists[(count - 1).min(api.pod_lists.len() - 1)].clone();
                Response::new(Body::from(list(
                    api_version,
                    kind,
                    &format!("{count}00"),
                    pods,
                )))
            }
            // The first CronJob list is refused (RBAC not applied yet); the
            // watcher must back off and list again.
            "/apis/batch/v1/cronjobs" if count == 1 => Response::builder()
                .status(StatusCode::FORBIDDEN)
                .body(Body::from(
                    serde_json::to_vec(&status(403, "Forbidden", "cronjobs.batch is forbidden"))
                        .unwrap(),
                ))
                .unwrap(),
            "/api/v1/namespaces" => Response::new(Body::from(list(
                api_version,
                kind,
                "1",
                vec![
                    json!({"metadata": {"name": "prod", "labels": {"team": "pay"}, "resourceVersion": "1"}}),
                ],
            ))),
            "/api/v1/services" => Response::new(Body::from(list(
                api_version,
                kind,
                "1",
                vec![json!({
                    "metadata": {"name": "payment", "namespace": "prod", "resourceVersion": "1"},
                    "spec": {"clusterIP": "10.96.0.20", "selector": {"app": "payment"},
                             "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
                             "sessionAffinity": "None", "internalTrafficPolicy": "Cluster"}
                })],
            ))),
            "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies" => {
                Response::new(Body::from(list(
                    api_version,
                    kind,
                    "1",
                    vec![json!({
                        "apiVersion": api_version, "kind": "ClusterNetworkPolicy",
                        "metadata": {"name": "deny-db", "resourceVersion": "1"},
                        "spec": {"tier": "Admin", "priority": 10, "subject": {"namespaces": {}},
                                 "egress": [{"action": "Deny", "to": [{"namespaces": {"matchLabels": {"team": "data"}}}]}]}
                    })],
                )))
            }
            p if p.starts_with("/apis/policy.networking.k8s.io/v1alpha1/") => Response::builder()
                .status(StatusCode::NOT_FOUND)
                .body(Body::from(
                    serde_json::to_vec(&status(
                        404,
                        "NotFound",
                        "the server could not find the requested resource",
                    ))
                    .unwrap(),
                ))
                .unwrap(),
            _ => Response::new(Body::from(list(api_version, kind, "1", vec![]))),
        };
        send.send_response(response);
    }
}

/// Waits (up to 30 s) until a snapshot satisfies `done`.
async fn snapshot_where(
    snapshots: &mut watch::Receiver<Arc<ClusterSnapshot>>,
    what: &str,
    done: impl Fn(&ClusterSnapshot) -> bool,
) -> Arc<ClusterSnapshot> {
    let found = {
        let wait = snapshots.wait_for(|s| done(s));
        match tokio::time::timeout(Duration::from_secs(30), wait).await {
            Ok(Ok(snapshot)) => Some(Arc::clone(&snapshot)),
            Ok(Err(_)) => panic!("snapshot channel closed while waiting for {what}"),
            Err(_) => None,
        }
    };
    found.unwrap_or_else(|| {
        panic!(
            "no snapshot with {what} within 30 s; last pods: {:?}",
            pod_names(&snapshots.borrow())
        )
    })
}

fn pod_names(snapshot: &ClusterSnapshot) -> Vec<String> {
    let mut names: Vec<String> = snapshot
        .pods
        .iter()
        .filter_map(|p| p.name().map(str::to_owned))
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn watchers_list_watch_relist_after_410_and_a_forbidden_kind_holds_nothing_back() {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let api = Arc::new(Mutex::new(MockApi {
        pod_lists: vec![
            vec![pod("alpha", "10.0.0.1")],
            // After the watch expires, the re-list finds alpha gone and gamma new.
            vec![pod("gamma", "10.0.0.3")],
        ],
        lists: HashMap::new(),
    }));
    let (pod_watch_tx, pod_watch_rx) = mpsc::channel(4);
    tokio::spawn(serve(handle, Arc::clone(&api), pod_watch_rx));

    let feed = watch_cluster(
        client,
        KubeWatchConfig {
            node_name: Some("node-a".into()),
            debounce: Duration::from_millis(50),
            ..KubeWatchConfig::default()
        },
    );
    let mut snapshots = feed.snapshots.clone();
    let mut ready = feed.ready.clone();

    // Every kind is listed once; CronJobs are refused (403) and must not
    // hold the others back: the kind counts as listed, empty, and is named
    // as forbidden.
    tokio::time::timeout(Duration::from_secs(30), ready.wait_for(|r| *r))
        .await
        .expect("ready within 30 s")
        .unwrap();
    assert_eq!(
        api.lock().unwrap().lists.get("/apis/batch/v1/cronjobs"),
        Some(&1)
    );
    let mut kinds = feed.status.clone();
    tokio::time::timeout(
        Duration::from_secs(30),
        kinds.wait_for(|s| matches!(s.get("CronJob"), Some(KindState::Forbidden { .. }))),
    )
    .await
    .expect("CronJob named forbidden")
    .unwrap();
    let stale = describe_stale(&kinds.borrow()).expect("a forbidden kind is not current");
    assert!(stale.contains("CronJob: forbidden"), "{stale}");
    assert!(!stale.contains("Pod"), "{stale}");

    let first = snapshot_where(&mut snapshots, "alpha", |s| pod_names(s) == ["alpha"]).await;
    assert_eq!(first.namespaces.len(), 1);
    assert_eq!(first.services.len(), 1);
    // The installed cluster-policy CRD is read; the missing ones are empty
    // and did not hold readiness back.
    assert_eq!(first.cluster_network_policies.len(), 1);
    assert_eq!(
        first.cluster_network_policies[0].metadata.name.as_deref(),
        Some("deny-db")
    );
    assert!(first.admin_network_policies.is_empty());
    assert!(first.baseline_admin_network_policies.is_empty());
    // Pods are kept as records (no annotations, managed fields or images),
    // other objects stripped.
    let alpha = &first.pods[0];
    assert_eq!(alpha.ports()[0].port, 8080);
    assert_eq!(alpha.labels()["app"], "alpha");
    // Calico's serviceAccountSelector and serviceAccounts match on it.
    assert_eq!(alpha.service_account(), Some("alpha-sa"));
    let service = first.services[0].spec.as_ref().unwrap();
    assert_eq!(service.cluster_ip.as_deref(), Some("10.96.0.20"));
    assert_eq!(service.session_affinity, None);

    // A watch event adds beta.
    let added = json!({"type": "ADDED", "object": pod("beta", "10.0.0.2")});
    pod_watch_tx
        .send(format!("{added}\n").into_bytes())
        .await
        .unwrap();
    snapshot_where(&mut snapshots, "alpha and beta", |s| {
        pod_names(s) == ["alpha", "beta"]
    })
    .await;

    // The next watch expires: the watcher must re-list, and the store must
    // become exactly the new list (alpha and beta gone, gamma in).
    let expired = json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version: 100 (250)")});
    pod_watch_tx
        .send(format!("{expired}\n").into_bytes())
        .await
        .unwrap();
    let relisted =
        snapshot_where(&mut snapshots, "gamma only", |s| pod_names(s) == ["gamma"]).await;
    assert_eq!(api.lock().unwrap().lists.get("/api/v1/pods"), Some(&2));

    // And what comes out resolves.
    let mut cache = IdentityCache::new(IdentityConfig {
        node_name: Some("node-a".into()),
        ..IdentityConfig::default()
    });
    cache.update(&relisted, SystemTime::now());
    let ip: IpAddr = "10.0.0.3".parse().unwrap();
    match cache.resolve_ip(ip, SystemTime::now()) {
        IpResolution::Pod(pod) => assert_eq!(
            (pod.namespace.as_str(), pod.name.as_str()),
            ("prod", "gamma")
        ),
        other => panic!("10.0.0.3 should be pod prod/gamma, got {other:?}"),
    }
    assert_eq!(
        cache
            .namespace_labels("prod")
            .and_then(|l| l.get("team"))
            .map(String::as_str),
        Some("pay")
    );
}
