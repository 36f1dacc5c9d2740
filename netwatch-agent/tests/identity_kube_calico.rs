//! API mode with Calico: the watchers read projectcalico.org/v3 through the
//! Calico API server when it is installed, else the crd.projectcalico.org/v1
//! CRDs; a group that is not installed (404) is empty and does not hold
//! readiness back. Against a mock API (tower-test), as identity_kube.rs.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use kube::client::Body;
use netwatch::cluster::ClusterSnapshot;
use netwatch::identity::{KubeWatchConfig, kube::watch_cluster};
use netwatch::policy::{EngineOptions, Peer, PolicyEngine, PolicyKind, PolicyVerdict, Protocol};
use serde_json::{Value, json};
use tokio::sync::watch;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn list(items: Vec<Value>) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "v1", "kind": "List",
        "metadata": {"resourceVersion": "1"},
        "items": items
    }))
    .unwrap()
}

fn not_found() -> Response<Body> {
    Response::builder()
        .status(StatusCode::NOT_FOUND)
        .body(Body::from(
            serde_json::to_vec(
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "message": "the server could not find the requested resource",
                "reason": "NotFound", "code": 404}),
            )
            .unwrap(),
        ))
        .unwrap()
}

fn pod(name: &str, ip: &str, app: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "prod", "uid": format!("uid-{name}"),
                     "resourceVersion": "1", "labels": {"app": app}},
        "spec": {"nodeName": "node-a", "containers": [{"name": "c", "image": "i"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    })
}

/// A GlobalNetworkPolicy denying ingress to api, in the tier `security`.
fn calico_objects(api_version: &str) -> (Value, Value) {
    (
        json!({"apiVersion": api_version, "kind": "Tier",
               "metadata": {"name": "security", "resourceVersion": "1"},
               "spec": {"order": 100}}),
        json!({"apiVersion": api_version, "kind": "GlobalNetworkPolicy",
               "metadata": {"name": "deny-api", "resourceVersion": "1"},
               "spec": {"tier": "security", "selector": "app == 'api'",
                        "ingress": [{"action": "Deny"}]}}),
    )
}

/// Serves pods and the Calico objects under `group` (`projectcalico.org/v3`
/// or `crd.projectcalico.org/v1`); the other Calico group is not installed.
async fn serve(mut handle: Handle, group: &'static str) {
    let mut idle = Vec::new();
    while let Some((request, send)) = handle.next_request().await {
        let path = request.uri().path().to_owned();
        if request
            .uri()
            .query()
            .unwrap_or_default()
            .contains("watch=true")
        {
            idle.push(send);
            continue;
        }
        let calico = |resource: &str| format!("/apis/{group}/{resource}");
        let (tier, gnp) = calico_objects(group);
        let response = if path == "/api/v1/pods" {
            Response::new(Body::from(list(vec![
                pod("web", "10.0.0.1", "web"),
                pod("api", "10.0.0.2", "api"),
            ])))
        } else if path == calico("tiers") {
            Response::new(Body::from(list(vec![tier])))
        } else if path == calico("globalnetworkpolicies") {
            Response::new(Body::from(list(vec![gnp])))
        } else if path.starts_with("/apis/projectcalico.org/")
            || path.starts_with("/apis/crd.projectcalico.org/")
            || path.starts_with("/apis/policy.networking.k8s.io/")
        {
            if path.starts_with(&format!("/apis/{group}/")) {
                Response::new(Body::from(list(vec![])))
            } else {
                not_found()
            }
        } else {
            Response::new(Body::from(list(vec![])))
        };
        send.send_response(response);
    }
}

async fn snapshot_where(
    snapshots: &mut watch::Receiver<Arc<ClusterSnapshot>>,
    done: impl Fn(&ClusterSnapshot) -> bool,
) -> Arc<ClusterSnapshot> {
    let wait = snapshots.wait_for(|s| done(s));
    let snapshot = tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .expect("a snapshot within 30 s")
        .expect("snapshots open");
    Arc::clone(&snapshot)
}

async fn engine_from(group: &'static str) -> (Arc<ClusterSnapshot>, PolicyEngine) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    tokio::spawn(serve(handle, group));
    let feed = watch_cluster(
        client,
        KubeWatchConfig {
            node_name: Some("node-a".into()),
            debounce: Duration::from_millis(50),
            ..KubeWatchConfig::default()
        },
    );
    let mut ready = feed.ready.clone();
    tokio::time::timeout(Duration::from_secs(30), ready.wait_for(|r| *r))
        .await
        .expect("ready within 30 s: a Calico group that is not installed holds nothing back")
        .unwrap();
    let mut snapshots = feed.snapshots.clone();
    let snapshot = snapshot_where(&mut snapshots, |s| {
        s.pods.len() == 2
            && (s.calico.global_network_policies.len() == 1
                || s.calico_crds.global_network_policies.len() == 1)
    })
    .await;
    let engine = PolicyEngine::new(&snapshot, EngineOptions::default()).expect("engine");
    (snapshot, engine)
}

fn check(engine: &PolicyEngine) {
    let v = engine.evaluate(
        &"prod/web".parse::<Peer>().unwrap(),
        &"prod/api".parse::<Peer>().unwrap(),
        80,
        Protocol::Tcp,
    );
    assert_eq!(v.verdict, PolicyVerdict::Denied);
    assert_eq!(
        v.ingress.denied_by[0].kind,
        PolicyKind::CalicoGlobalNetworkPolicy
    );
    assert_eq!(v.ingress.denied_by[0].tier.as_str(), "security");
}

#[tokio::test]
async fn the_calico_api_server_is_read_when_installed() {
    let (snapshot, engine) = engine_from("projectcalico.org/v3").await;
    assert_eq!(snapshot.calico.tiers.len(), 1);
    assert!(snapshot.calico_crds.global_network_policies.is_empty());
    check(&engine);
}

#[tokio::test]
async fn without_the_api_server_the_crds_are_read() {
    let (snapshot, engine) = engine_from("crd.projectcalico.org/v1").await;
    assert!(snapshot.calico.global_network_policies.is_empty());
    assert_eq!(snapshot.calico_crds.tiers.len(), 1);
    check(&engine);
}
