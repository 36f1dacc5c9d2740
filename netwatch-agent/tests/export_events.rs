//! PacketDrop Kubernetes Events against a mock API server (tower-test): the
//! request the agent sends, and the rate limits that keep a drop storm from
//! flooding the API server.

use std::time::{Duration, Instant};

use http::{Request, Response};
use kube::client::Body;
use netwatch::{
    export::events::{EventsConfig, PacketDropEvents},
    flow::record::FlowRecord,
};
use prometheus::{IntCounterVec, Opts};
use serde_json::{Value, json};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn record(uuid: &str, dst_port: u16, lifecycle: &str) -> FlowRecord {
    serde_json::from_value(json!({
        "time": "2026-11-22T02:14:07.113Z", "uuid": uuid, "verdict": "DROPPED", "drop_reason_desc": "NETFILTER_DROP",
        "IP": {"source": "10.244.1.2", "destination": "10.244.1.3", "ipVersion": "IPv4"},
        "l4": {"TCP": {"source_port": 48420, "destination_port": dst_port, "flags": {"SYN": true}}},
        "source": {"identity": 4242, "namespace": "prod", "pod_name": "web-7f9c", "pod_uid": "uid-web", "ip": "10.244.1.2"},
        "destination": {"identity": 4343, "namespace": "prod", "pod_name": "api-5d4e", "ip": "10.244.1.3"},
        "Type": "L3_L4", "node_name": "node-1", "event_type": {"type": 1, "sub_type": 12},
        "traffic_direction": "INGRESS", "is_reply": false, "Summary": "TCP Flags: SYN",
        "ingress_denied_by": [{"name": "default-deny-all", "namespace": "prod", "kind": "NetworkPolicy"}],
        "lifecycle": lifecycle, "packets": 1, "bytes": 60,
        "first_seen": "2026-11-22T02:14:07.000Z", "last_seen": "2026-11-22T02:14:07.113Z", "observation_points": ["kfree_skb"]
    }))
    .unwrap()
}

fn outcomes() -> IntCounterVec {
    IntCounterVec::new(Opts::new("events", "events"), &["result"]).unwrap()
}

/// Answer the next request with 201 and return (method, path, body).
async fn next_request(handle: &mut Handle) -> (String, String, Value) {
    let (req, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .expect("a request in time")
        .expect("request");
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let bytes = http_body_util::BodyExt::collect(req.into_body())
        .await
        .unwrap()
        .to_bytes();
    let body: Value = serde_json::from_slice(&bytes).unwrap();
    let mut answer = body.clone();
    answer["metadata"]["name"] = "web-7f9c.1".into();
    send.send_response(
        Response::builder()
            .status(201)
            .body(Body::from(serde_json::to_vec(&answer).unwrap()))
            .unwrap(),
    );
    (method, path, body)
}

#[tokio::test]
async fn a_dropped_flow_posts_one_warning_event_on_the_source_pod() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let counts = outcomes();
    let mut events =
        PacketDropEvents::start(client, "node-1", EventsConfig::default(), counts.clone());
    let now = Instant::now();
    events.observe(&record("a", 8080, "NEW"), now);
    let (method, path, body) = next_request(&mut handle).await;
    assert_eq!(
        (method.as_str(), path.as_str()),
        ("POST", "/api/v1/namespaces/prod/events")
    );
    assert_eq!(body["type"], "Warning");
    assert_eq!(body["reason"], "PacketDrop");
    assert_eq!(
        body["involvedObject"],
        json!({"apiVersion": "v1", "kind": "Pod", "namespace": "prod", "name": "web-7f9c", "uid": "uid-web"})
    );
    assert_eq!(
        body["message"],
        "TCP to prod/api-5d4e:8080 dropped (NETFILTER_DROP), denied by prod/default-deny-all [ingress]"
    );
    assert_eq!(body["source"]["host"], "node-1");
    assert_eq!(body["reportingComponent"], "netwatch-agent");
    assert_eq!(body["metadata"]["generateName"], "web-7f9c.");
    // Posted, counted.
    tokio::time::timeout(Duration::from_secs(5), async {
        while counts.with_label_values(&["posted"]).get() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn events_are_rate_limited_per_flow_and_in_all() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let counts = outcomes();
    let config = EventsConfig {
        interval: Duration::from_secs(120),
        max_per_minute: 3,
        queue: 16,
    };
    let mut events = PacketDropEvents::start(client, "node-1", config, counts.clone());
    let t0 = Instant::now();
    // The same flow key (pod, destination, port) again within the interval:
    // one event. Later records of a flow never post.
    events.observe(&record("a", 8080, "NEW"), t0);
    events.observe(&record("b", 8080, "NEW"), t0 + Duration::from_secs(1));
    events.observe(&record("a", 8080, "UPDATE"), t0 + Duration::from_secs(2));
    // Other ports are other flows, up to 3 a minute in all.
    for port in 1..=5 {
        events.observe(
            &record(&format!("p{port}"), port, "NEW"),
            t0 + Duration::from_secs(3),
        );
    }
    let mut posted_ports = Vec::new();
    for _ in 0..3 {
        let (_, _, body) = next_request(&mut handle).await;
        posted_ports.push(
            body["message"]
                .as_str()
                .unwrap()
                .split(':')
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(posted_ports, ["8080", "1", "2"]);
    assert_eq!(
        counts.with_label_values(&["rate_limited"]).get(),
        1 + 3,
        "the repeat of 8080 and ports 3-5"
    );
    // After the interval, the flow may post again.
    events.observe(&record("c", 8080, "NEW"), t0 + Duration::from_secs(121));
    let (_, _, body) = next_request(&mut handle).await;
    assert!(body["message"].as_str().unwrap().contains(":8080 "));
}

#[tokio::test]
async fn flows_without_a_source_pod_post_nothing_and_api_errors_are_counted() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let counts = outcomes();
    let mut events =
        PacketDropEvents::start(client, "node-1", EventsConfig::default(), counts.clone());
    let mut unresolved = record("u", 8080, "NEW");
    unresolved.source.pod_name = Default::default();
    unresolved.source.namespace = Default::default();
    events.observe(&unresolved, Instant::now());
    events.observe(&record("f", 9090, "NEW"), Instant::now());
    let (req, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .unwrap()
        .unwrap();
    assert!(req.uri().path().ends_with("/namespaces/prod/events"));
    let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403,
                        "message": "events is forbidden"});
    send.send_response(
        Response::builder()
            .status(403)
            .body(Body::from(serde_json::to_vec(&status).unwrap()))
            .unwrap(),
    );
    tokio::time::timeout(Duration::from_secs(5), async {
        while counts.with_label_values(&["failed"]).get() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(counts.with_label_values(&["posted"]).get(), 0);
}
