//! End-to-end: the agent against a misbehaving Kubernetes API server over
//! real HTTP (support/fake_apiserver.rs), started with `--kubeconfig` as in
//! a cluster, with real flows from lab pods. Capture never stops; records
//! are named from the last known state while the API is away; what changed
//! meanwhile is named soon after it returns; `/readyz` and the metrics say
//! which kinds are stale or forbidden; a silently held connection is given
//! up by a timeout; an HTTP 410 to a watch request leads to a re-list.
//!
//! Deadlines are generous (no timing assertions); the bounds the README
//! documents are printed for the record.

mod support;

#[path = "support/fake_apiserver.rs"]
mod fake_apiserver;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use fake_apiserver::{COLLECTIONS, FakeApiServer, NETWORK_POLICIES, PODS, pod, seed};
use netwatch_lab::{Lab, Outcome};
use serde_json::Value;
use support::{Agent, expect_probe, lab, node_http_get, slowed, tcp, to, wait_until};

const LAB: &str = r#"
nodes: [ { name: node-1 } ]
pods:
  - { name: web, namespace: prod, node: node-1, ip: 10.244.1.2 }
  - { name: api, namespace: prod, node: node-1, ip: 10.244.1.3, listen: ["8080/tcp"] }
  - { name: late, namespace: prod, node: node-1, ip: 10.244.1.4 }
"#;

/// The API knows web and api; `late` exists in the lab but not (yet) in
/// the API.
fn cluster(lab: &Lab) -> FakeApiServer {
    let node = lab.node("node-1").expect("node");
    let api = FakeApiServer::start(&node.netns);
    seed(
        &api,
        "node-1",
        &node.ip.to_string(),
        &[("prod", "web", "10.244.1.2"), ("prod", "api", "10.244.1.3")],
    );
    api
}

fn start_agent(lab: &Lab, api: &FakeApiServer, dir: &Path) -> Agent {
    let kubeconfig = api.write_kubeconfig(dir);
    let kubeconfig = kubeconfig.to_string_lossy().into_owned();
    Agent::start(
        lab,
        "node-1",
        3,
        &[
            "--kubeconfig",
            &kubeconfig,
            "--metrics-addr",
            "127.0.0.1:9965",
            // Short, so that the stall is found within the test's patience;
            // the defaults are 30 s and 75 s.
            "--api-timeout",
            "3",
            "--api-idle-timeout",
            "8",
        ],
    )
}

fn get(lab: &Lab, path: &str) -> String {
    node_http_get(lab, "node-1", &format!("http://127.0.0.1:9965{path}"))
}

/// A gauge's value for `kind`, from /metrics.
fn gauge(lab: &Lab, metric: &str, kind: &str) -> Option<i64> {
    let want = format!("{metric}{{kind=\"{kind}\"}} ");
    get(lab, "/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(&want).and_then(|v| v.trim().parse().ok()))
}

fn wait_ready(lab: &Lab, agent: &Agent) {
    wait_until(agent, "/readyz says ready", 60, || {
        get(lab, "/readyz").starts_with("ready")
    });
}

/// A refused connection from `from` to api:`port`, as the agent reports it.
fn refused_flow(lab: &Lab, agent: &Agent, from: &str, port: u16) -> Value {
    expect_probe(
        lab,
        from,
        tcp(&format!("10.244.1.3:{port}"), 2),
        Outcome::Refused,
    );
    agent.wait_for_flow(Duration::from_secs(10), to("10.244.1.3", port))["flow"].clone()
}

fn pod_name(endpoint: &Value) -> &str {
    endpoint["pod_name"].as_str().unwrap_or("")
}

/// Log lines that mention `kind` and contain `text`.
fn log_lines(agent: &Agent, kind: &str, text: &str) -> usize {
    agent
        .log()
        .lines()
        .filter(|l| l.contains(&format!("kind={kind}")) && l.contains(text))
        .count()
}

#[test]
fn an_api_outage_keeps_names_and_a_pod_added_meanwhile_is_named_after_the_return() {
    let lab = lab(LAB);
    let mut api = cluster(&lab);
    let dir = tempfile::tempdir().unwrap();
    let mut agent = start_agent(&lab, &api, dir.path());
    wait_ready(&lab, &agent);

    // Every kind's first list is served from the watch cache (any version,
    // unpaginated), and every request names netwatch.
    let requests = api.requests();
    for (path, _, _) in COLLECTIONS {
        let first = requests
            .iter()
            .find(|r| r.path == *path && !r.is_watch())
            .unwrap_or_else(|| panic!("{path} was never listed"));
        assert_eq!(
            first.query.get("resourceVersion").map(String::as_str),
            Some("0"),
            "{path}: {first:?}"
        );
        assert_eq!(
            first.query.get("resourceVersionMatch").map(String::as_str),
            Some("NotOlderThan"),
            "{path}: {first:?}"
        );
        assert!(!first.query.contains_key("limit"), "{path}: {first:?}");
    }
    for r in &requests {
        assert!(r.user_agent.starts_with("netwatch-agent/"), "{r:?}");
    }
    // Watches ask for bookmarks and a server-side timeout.
    let watch = requests.iter().find(|r| r.is_watch()).expect("a watch");
    assert_eq!(watch.query["allowWatchBookmarks"], "true", "{watch:?}");
    assert!(watch.query.contains_key("timeoutSeconds"), "{watch:?}");

    let f = refused_flow(&lab, &agent, "prod/web", 7001);
    assert_eq!(
        (pod_name(&f["source"]), pod_name(&f["destination"])),
        ("web", "api")
    );
    assert_eq!(gauge(&lab, "netwatch_identity_stale", "Pod"), Some(0));

    // The API server goes away for tens of seconds.
    api.down();
    let down_at = Instant::now();
    wait_until(&agent, "/readyz says identity is stale", 60, || {
        let r = get(&lab, "/readyz");
        r.starts_with("not ready") && r.contains("stale") && r.contains("Pod")
    });
    assert_eq!(gauge(&lab, "netwatch_identity_stale", "Pod"), Some(1));
    // Meanwhile a pod is added.
    api.apply(PODS, pod("node-1", "prod", "late", "10.244.1.4"));
    // Capture goes on, named from the last known state.
    let f = refused_flow(&lab, &agent, "prod/web", 7002);
    assert_eq!(
        (pod_name(&f["source"]), pod_name(&f["destination"])),
        ("web", "api")
    );
    // The new pod is unknown until the API is back.
    let f = refused_flow(&lab, &agent, "prod/late", 7003);
    assert_ne!(pod_name(&f["source"]), "late");

    let outage = slowed(Duration::from_secs(20));
    std::thread::sleep(outage.saturating_sub(down_at.elapsed()));
    api.up();
    let back = Instant::now();
    // The pod added during the outage is named soon after the return
    // (README: within the 5 s backoff cap plus a round trip).
    let deadline = back + slowed(Duration::from_secs(60));
    let mut port = 7100;
    let named_after = loop {
        let f = refused_flow(&lab, &agent, "prod/late", port);
        if pod_name(&f["source"]) == "late" {
            break back.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "the pod added during the outage is still not named 60 s after the API returned:\n{}",
            agent.log()
        );
        port += 1;
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!("named {named_after:?} after the API server returned");
    wait_ready(&lab, &agent);
    assert_eq!(gauge(&lab, "netwatch_identity_stale", "Pod"), Some(0));

    // One warning per kind for the whole outage, and its recovery; nothing
    // from kube's client per retry.
    let failed = log_lines(&agent, "Pod", "watch failed");
    assert_eq!(
        failed,
        1,
        "one warning per kind per outage:\n{}",
        agent.log()
    );
    assert!(
        log_lines(&agent, "Pod", "watch recovered") >= 1,
        "{}",
        agent.log()
    );
    assert!(
        !agent.log().contains("kube_client"),
        "kube's client logs per retry:\n{}",
        agent.log()
    );
    agent.stop();
}

#[test]
fn a_forbidden_kind_is_named_and_does_not_stop_pods_being_named() {
    let lab = lab(LAB);
    let api = cluster(&lab);
    api.forbid(NETWORK_POLICIES);
    let dir = tempfile::tempdir().unwrap();
    let mut agent = start_agent(&lab, &api, dir.path());

    // Pods are named although NetworkPolicies are refused from the start.
    let f = refused_flow(&lab, &agent, "prod/web", 7001);
    assert_eq!(
        (pod_name(&f["source"]), pod_name(&f["destination"])),
        ("web", "api")
    );
    assert_ne!(f["unenriched"], true, "{f}");

    // The kind is named in the log (once), a metric and /readyz.
    wait_until(&agent, "the log names the forbidden kind", 30, || {
        log_lines(&agent, "NetworkPolicy", "forbidden") >= 1
    });
    assert_eq!(
        log_lines(&agent, "NetworkPolicy", "forbidden"),
        1,
        "{}",
        agent.log()
    );
    wait_until(
        &agent,
        "netwatch_api_forbidden names NetworkPolicy",
        30,
        || gauge(&lab, "netwatch_api_forbidden", "NetworkPolicy") == Some(1),
    );
    assert_eq!(gauge(&lab, "netwatch_api_forbidden", "Pod"), Some(0));
    assert_eq!(gauge(&lab, "netwatch_identity_stale", "Pod"), Some(0));
    let readyz = get(&lab, "/readyz");
    assert!(
        readyz.starts_with("not ready") && readyz.contains("NetworkPolicy: forbidden"),
        "{readyz}"
    );
    assert!(
        !readyz.contains("Pod:"),
        "only the forbidden kind is blamed: {readyz}"
    );
    agent.stop();
}

#[test]
fn gone_failing_and_stalled_watches_recover() {
    let lab = lab(LAB);
    let api = cluster(&lab);
    let dir = tempfile::tempdir().unwrap();
    let mut agent = start_agent(&lab, &api, dir.path());
    wait_ready(&lab, &agent);

    // An HTTP 410 answer to the watch request itself: the next request for
    // pods is a list (from the cache, no older than what the agent had),
    // not the same watch again.
    let before = api.requests().len();
    api.gone_on_next_watch(PODS);
    let after_gone = |api: &FakeApiServer| -> Vec<fake_apiserver::Seen> {
        api.requests()[before..]
            .iter()
            .filter(|r| r.path == PODS)
            .cloned()
            .collect()
    };
    wait_until(&agent, "pods re-listed after HTTP 410", 30, || {
        after_gone(&api).len() >= 2
    });
    let pods = after_gone(&api);
    assert!(pods[0].is_watch(), "{pods:?}");
    assert!(
        !pods[1].is_watch(),
        "a 410 must lead to a re-list: {pods:?}"
    );
    assert_eq!(
        pods[1].query["resourceVersionMatch"], "NotOlderThan",
        "{pods:?}"
    );

    // A 410 ERROR event in the watch stream: re-list too.
    let before = api.requests().len();
    api.expire_watches();
    wait_until(&agent, "pods re-listed after a 410 event", 30, || {
        api.requests()[before..]
            .iter()
            .any(|r| r.path == PODS && !r.is_watch())
    });
    wait_ready(&lab, &agent);

    // 500 for everything: stale, then current again.
    api.fail_all(500);
    wait_until(&agent, "/readyz says stale on 500s", 60, || {
        get(&lab, "/readyz").contains("stale")
    });
    api.heal();
    wait_ready(&lab, &agent);
    assert!(
        log_lines(&agent, "Pod", "watch recovered") >= 1,
        "{}",
        agent.log()
    );

    // A stall: requests never answered, open watches silent, connections
    // held open for ever (also once the server is healthy again).
    api.stall();
    wait_until(&agent, "/readyz says stale in a stall", 60, || {
        get(&lab, "/readyz").contains("stale")
    });
    assert!(
        agent.log().contains("no answer within"),
        "the timeout is named:\n{}",
        agent.log()
    );
    api.apply(PODS, pod("node-1", "prod", "late", "10.244.1.4"));
    api.heal();
    let healed = Instant::now();
    let deadline = healed + slowed(Duration::from_secs(60));
    let mut port = 7200;
    loop {
        let f = refused_flow(&lab, &agent, "prod/late", port);
        if pod_name(&f["source"]) == "late" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a pod added during a stall is not named 60 s after the server answers again:\n{}",
            agent.log()
        );
        port += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("named {:?} after the stall ended", healed.elapsed());
    wait_ready(&lab, &agent);
    agent.stop();
}

/// `--kubernetes-events` posts to the API server `--kubeconfig` names, as
/// the identity watches do (it used the in-cluster or default config, and
/// a node started with `--kubeconfig` could not start at all).
#[test]
fn packet_drop_events_go_to_the_kubeconfig_api_server() {
    let lab = lab(LAB);
    lab.nft(
        "node-1",
        "table inet lab {\n chain forward {\n  type filter hook forward priority 0; policy accept;\n  ip daddr 10.244.1.3 tcp dport 9999 counter drop\n }\n}\n",
    )
    .expect("nft");
    let api = cluster(&lab);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.write_kubeconfig(dir.path());
    let kubeconfig = kubeconfig.to_string_lossy().into_owned();
    let agent = Agent::start(
        &lab,
        "node-1",
        3,
        &[
            "--kubeconfig",
            &kubeconfig,
            "--kubernetes-events",
            "--metrics-addr",
            "127.0.0.1:9965",
        ],
    );
    wait_ready(&lab, &agent);
    expect_probe(
        &lab,
        "prod/web",
        tcp("10.244.1.3:9999", 2),
        Outcome::TimedOut,
    );
    let f = agent.wait_for_flow(Duration::from_secs(10), |r| {
        to("10.244.1.3", 9999)(r) && r["verdict"] == "DROPPED"
    })["flow"]
        .clone();
    assert_eq!(pod_name(&f["source"]), "web", "{f:#}");
    wait_until(
        &agent,
        "a PacketDrop Event reaches the fake API server",
        30,
        || {
            api.requests()
                .iter()
                .any(|r| r.path == "/api/v1/namespaces/prod/events")
        },
    );
    let posted: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/events"))
        .collect();
    assert!(
        posted
            .iter()
            .all(|r| r.user_agent.starts_with("netwatch-agent/")),
        "{posted:?}"
    );
}
