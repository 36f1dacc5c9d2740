//! End-to-end: the agent in API mode (`--kubeconfig`, over real HTTP to
//! support/fake_apiserver.rs) on a cluster enforcing Calico's own policies.
//! The node's nftables rules stand in for Calico's dataplane (they drop
//! what the policies deny); the agent must name each drop with the Calico
//! kind, tier, policy and rule it read from the API: through the Calico API
//! server (projectcalico.org/v3) when it is installed, else from the
//! crd.projectcalico.org/v1 CRDs, and with Kubernetes NetworkPolicies only
//! when neither is. A policy added by a watch event mid-run is used, and a
//! CRD created after the agent started is picked up promptly (a watch of
//! CustomResourceDefinitions, not the 60 s retry).
//!
//! Deadlines are generous; nothing asserts a duration.

mod support;

#[path = "support/fake_apiserver.rs"]
mod fake_apiserver;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use fake_apiserver::{
    CALICO_GLOBAL_NETWORK_POLICIES, CALICO_NETWORK_POLICIES, COLLECTIONS,
    CRD_GLOBAL_NETWORK_POLICIES, CRD_NETWORK_POLICIES, CRDS, FakeApiServer, NETWORK_POLICIES, seed,
};
use netwatch_lab::{Lab, Outcome};
use serde_json::{Value, json};
use support::{Agent, lab, node_http_get, slowed, tcp, to, wait_until};

/// Calico's dataplane, as far as these tests need it: ingress to api on
/// 8080 and 9090, and egress from web to 7070, are dropped.
const LAB: &str = r#"
nodes:
  - name: node-1
    nftables: |
      table inet calico {
        chain forward {
          type filter hook forward priority 0; policy accept;
          ip daddr 10.244.1.3 tcp dport { 8080, 9090 } counter drop
          ip saddr 10.244.1.2 tcp dport 7070 counter drop
        }
      }
pods:
  - { name: web, namespace: prod, node: node-1, ip: 10.244.1.2 }
  - { name: api, namespace: prod, node: node-1, ip: 10.244.1.3, listen: ["8080/tcp", "9090/tcp"] }
  - { name: other, namespace: prod, node: node-1, ip: 10.244.1.4, listen: ["7070/tcp"] }
"#;

fn cluster(lab: &Lab) -> FakeApiServer {
    let node = lab.node("node-1").expect("node");
    let api = FakeApiServer::start(&node.netns);
    seed(
        &api,
        "node-1",
        &node.ip.to_string(),
        &[
            ("prod", "web", "10.244.1.2"),
            ("prod", "api", "10.244.1.3"),
            ("prod", "other", "10.244.1.4"),
        ],
    );
    api
}

/// Calico's objects under `api_version`: a `security` tier whose
/// GlobalNetworkPolicy denies ingress to api on 9090 and passes the rest,
/// and an app team's NetworkPolicy in the default tier that allows web on
/// 80 and denies 8080.
fn calico_objects(api_version: &str) -> Vec<(&'static str, Value)> {
    let v3 = api_version == "projectcalico.org/v3";
    let (tiers, gnps, nps) = if v3 {
        (
            "/apis/projectcalico.org/v3/tiers",
            CALICO_GLOBAL_NETWORK_POLICIES,
            CALICO_NETWORK_POLICIES,
        )
    } else {
        (
            "/apis/crd.projectcalico.org/v1/tiers",
            CRD_GLOBAL_NETWORK_POLICIES,
            CRD_NETWORK_POLICIES,
        )
    };
    vec![
        (
            tiers,
            json!({"apiVersion": api_version, "kind": "Tier",
                   "metadata": {"name": "security"}, "spec": {"order": 100}}),
        ),
        (
            gnps,
            json!({"apiVersion": api_version, "kind": "GlobalNetworkPolicy",
                   "metadata": {"name": "security.deny-api-metrics"},
                   "spec": {"tier": "security", "order": 10, "selector": "app == 'api'",
                            "types": ["Ingress"],
                            "ingress": [
                                {"action": "Deny", "protocol": "TCP",
                                 "destination": {"ports": [9090]}},
                                {"action": "Pass"}]}}),
        ),
        (
            nps,
            json!({"apiVersion": api_version, "kind": "NetworkPolicy",
                   "metadata": {"name": "api-ingress", "namespace": "prod"},
                   "spec": {"order": 100, "selector": "app == 'api'", "types": ["Ingress"],
                            "ingress": [
                                {"action": "Allow", "protocol": "TCP",
                                 "source": {"selector": "app == 'web'"},
                                 "destination": {"ports": [80]}},
                                {"action": "Deny", "protocol": "TCP",
                                 "destination": {"ports": [8080]}}]}}),
        ),
    ]
}

/// A GlobalNetworkPolicy of the security tier denying web's egress to 7070.
fn deny_egress_gnp(api_version: &str) -> Value {
    json!({"apiVersion": api_version, "kind": "GlobalNetworkPolicy",
           "metadata": {"name": "security.deny-web-7070"},
           "spec": {"tier": "security", "order": 5, "selector": "app == 'web'",
                    "types": ["Egress"],
                    "egress": [{"action": "Deny", "protocol": "TCP",
                                "destination": {"ports": [7070]}}]}})
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
        ],
    )
}

fn wait_ready(lab: &Lab, agent: &Agent) {
    wait_until(agent, "/readyz says ready", 60, || {
        node_http_get(lab, "node-1", "http://127.0.0.1:9965/readyz").starts_with("ready")
    });
}

/// Probes `from` -> `ip:port` (dropped: the probe times out) until the
/// agent's record of such a flow satisfies `named`, within `secs`; returns
/// that record's flow.
fn dropped_until(
    lab: &Lab,
    agent: &Agent,
    from: &str,
    ip: &str,
    port: u16,
    secs: u64,
    named: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + slowed(Duration::from_secs(secs));
    loop {
        let r = lab
            .probe(from, &tcp(&format!("{ip}:{port}"), 1))
            .expect("probe");
        assert_eq!(r.outcome, Outcome::TimedOut, "{from} -> {ip}:{port}: {r:?}");
        // The record follows the probe within the update interval.
        let wait = Instant::now() + slowed(Duration::from_secs(5));
        while Instant::now() < wait {
            if let Some(line) = agent.lines().into_iter().find(|l| {
                let f = &l["flow"];
                to(ip, port)(f) && f["verdict"] == "DROPPED" && named(f)
            }) {
                return line["flow"].clone();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let seen: Vec<Value> = agent
            .lines()
            .into_iter()
            .filter(|l| to(ip, port)(&l["flow"]))
            .map(|l| l["flow"].clone())
            .collect();
        assert!(
            Instant::now() < deadline,
            "no record of {from} -> {ip}:{port} named as expected within {secs} s; records:\n{seen:#?}\nagent log:\n{}",
            agent.log()
        );
    }
}

fn denied_by<'a>(flow: &'a Value, direction: &str) -> &'a [Value] {
    flow[format!("{direction}_denied_by")]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// Whether `flow` is denied in `direction` by a policy with this kind and
/// name.
fn denied_by_policy(flow: &Value, direction: &str, kind: &str, name: &str) -> bool {
    denied_by(flow, direction)
        .iter()
        .any(|p| p["kind"] == kind && p["name"] == name)
}

/// Every list of every kind the agent asked for was served from the watch
/// cache, as the other kinds are (any version, unpaginated), also the
/// Calico kinds that are not installed.
fn lists_from_the_watch_cache(api: &FakeApiServer) {
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
}

/// Drops named with Calico's kind, tier, policy and rule; a policy added
/// mid-run by a watch event names the next drop.
fn calico_names_drops(api: &FakeApiServer, lab: &Lab, agent: &Agent, api_version: &str) {
    let metrics = dropped_until(lab, agent, "prod/web", "10.244.1.3", 9090, 60, |f| {
        !denied_by(f, "ingress").is_empty()
    });
    let by = &denied_by(&metrics, "ingress")[0];
    assert_eq!(by["kind"], "GlobalNetworkPolicy.projectcalico.org", "{by}");
    assert_eq!(by["name"], "security.deny-api-metrics", "{by}");
    assert_eq!(by["tier"], "security", "{by}");
    assert_eq!(by["rule"]["index"], 0, "{by}");
    assert_eq!(metrics["destination"]["pod_name"], "api", "{metrics}");

    // 8080: the security tier passes; the app team's policy denies it in
    // the default tier with its second rule.
    let app = dropped_until(lab, agent, "prod/web", "10.244.1.3", 8080, 30, |f| {
        !denied_by(f, "ingress").is_empty()
    });
    let by = &denied_by(&app, "ingress")[0];
    assert_eq!(by["kind"], "NetworkPolicy.projectcalico.org", "{by}");
    assert_eq!(by["namespace"], "prod", "{by}");
    assert!(
        by["name"].as_str().unwrap_or("").ends_with("api-ingress"),
        "{by}"
    );
    assert_eq!(by["tier"], "default", "{by}");
    assert_eq!(by["rule"]["index"], 1, "{by}");

    // A GlobalNetworkPolicy added while the agent runs (a watch event).
    let gnps = if api_version == "projectcalico.org/v3" {
        CALICO_GLOBAL_NETWORK_POLICIES
    } else {
        CRD_GLOBAL_NETWORK_POLICIES
    };
    api.apply(gnps, deny_egress_gnp(api_version));
    let egress = dropped_until(lab, agent, "prod/web", "10.244.1.4", 7070, 60, |f| {
        denied_by_policy(
            f,
            "egress",
            "GlobalNetworkPolicy.projectcalico.org",
            "security.deny-web-7070",
        )
    });
    let by = &denied_by(&egress, "egress")[0];
    assert_eq!(by["tier"], "security", "{by}");
    assert_eq!(by["rule"]["index"], 0, "{by}");
}

#[test]
fn through_the_calico_api_server_drops_are_named_with_tier_policy_and_rule() {
    let lab = lab(LAB);
    let api = cluster(&lab);
    for (path, _, _) in COLLECTIONS {
        if path.starts_with("/apis/projectcalico.org/") {
            api.install(path);
        }
    }
    for (path, object) in calico_objects("projectcalico.org/v3") {
        api.apply(path, object);
    }
    let dir = tempfile::tempdir().unwrap();
    let mut agent = start_agent(&lab, &api, dir.path());
    wait_ready(&lab, &agent);
    calico_names_drops(&api, &lab, &agent, "projectcalico.org/v3");
    lists_from_the_watch_cache(&api);
    // The Calico kinds were watched from the API server, not only listed.
    let requests = api.requests();
    for path in [CALICO_GLOBAL_NETWORK_POLICIES, CALICO_NETWORK_POLICIES] {
        assert!(
            requests.iter().any(|r| r.path == path && r.is_watch()),
            "{path} watched"
        );
    }
    agent.stop();
}

#[test]
fn without_the_calico_api_server_the_crds_name_the_drops() {
    let lab = lab(LAB);
    let api = cluster(&lab);
    for (path, _, _) in COLLECTIONS {
        if path.starts_with("/apis/crd.projectcalico.org/") {
            api.install_crd(path);
        }
    }
    for (path, object) in calico_objects("crd.projectcalico.org/v1") {
        api.apply(path, object);
    }
    let dir = tempfile::tempdir().unwrap();
    let mut agent = start_agent(&lab, &api, dir.path());
    wait_ready(&lab, &agent);
    calico_names_drops(&api, &lab, &agent, "crd.projectcalico.org/v1");
    lists_from_the_watch_cache(&api);
    agent.stop();
}

/// Neither Calico group is installed: ready all the same, drops named by
/// the Kubernetes NetworkPolicy; then Calico's GlobalNetworkPolicy CRD is
/// created and its policy names the next drops long before the 60 s retry
/// of a kind not installed would have found it.
#[test]
fn without_calico_networkpolicies_name_drops_and_a_crd_created_later_is_picked_up() {
    let lab = lab(LAB);
    let api = cluster(&lab);
    api.apply(
        NETWORK_POLICIES,
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "metadata": {"name": "api-default-deny", "namespace": "prod"},
               "spec": {"podSelector": {"matchLabels": {"app": "api"}},
                        "policyTypes": ["Ingress"]}}),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut agent = start_agent(&lab, &api, dir.path());
    wait_ready(&lab, &agent);
    let f = dropped_until(&lab, &agent, "prod/web", "10.244.1.3", 8080, 60, |f| {
        !denied_by(f, "ingress").is_empty()
    });
    let by = &denied_by(&f, "ingress")[0];
    assert_eq!(by["kind"], "NetworkPolicy", "{by}");
    assert_eq!(by["name"], "api-default-deny", "{by}");
    lists_from_the_watch_cache(&api);
    // CRDs are watched (to pick up the missing kinds' CRDs).
    assert!(
        api.requests()
            .iter()
            .any(|r| r.path == CRDS && r.is_watch()),
        "CustomResourceDefinitions are watched"
    );
    assert!(
        agent.log().contains("not installed"),
        "the missing Calico kinds are named:\n{}",
        agent.log()
    );

    // Calico's GlobalNetworkPolicy CRD (and its Tier CRD) are created, then
    // a policy of that kind.
    api.install_crd("/apis/crd.projectcalico.org/v1/tiers");
    api.install_crd(CRD_GLOBAL_NETWORK_POLICIES);
    api.apply(
        "/apis/crd.projectcalico.org/v1/tiers",
        json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "Tier",
               "metadata": {"name": "security"}, "spec": {"order": 100}}),
    );
    api.apply(
        CRD_GLOBAL_NETWORK_POLICIES,
        deny_egress_gnp("crd.projectcalico.org/v1"),
    );
    // Within 30 s: the fallback retry comes 60 s after the first 404, so
    // only the CRD watch makes this in time.
    let f = dropped_until(&lab, &agent, "prod/web", "10.244.1.4", 7070, 30, |f| {
        denied_by_policy(
            f,
            "egress",
            "GlobalNetworkPolicy.projectcalico.org",
            "security.deny-web-7070",
        )
    });
    assert_eq!(denied_by(&f, "egress")[0]["tier"], "security", "{f:#}");
    assert!(
        agent.log().contains("installed now"),
        "the kind's arrival is logged:\n{}",
        agent.log()
    );
    agent.stop();
}
