//! End-to-end: identity and policy attribution. The agent runs in standalone
//! mode (`--manifests`) against a lab node whose nftables rules stand in for
//! the CNI (drops) and kube-proxy (service DNAT, REJECT for services without
//! ready endpoints). Records must name pods, workloads, services and the
//! denying policies.

mod support;

use std::{os::unix::fs::MetadataExt, time::Duration};

use netwatch_lab::Outcome;
use serde_json::Value;
use support::{Agent, expect_probe, lab, records, tcp, to};

const LAB: &str = r#"
nodes:
  - name: node-1
    nftables: |
      table ip kubeproxy {
        chain prerouting {
          type nat hook prerouting priority -100; policy accept;
          ip daddr 10.96.0.20 tcp dport 80 dnat to 10.244.1.3:8080
        }
        chain filter {
          type filter hook forward priority -10; policy accept;
          ip daddr 10.96.0.30 tcp dport 80 reject with icmp type port-unreachable
        }
      }
      table inet cni {
        chain forward {
          type filter hook forward priority 0; policy accept;
          ip saddr 10.244.1.2 ip daddr 10.244.1.3 tcp dport 8080 counter drop comment "web-api"
          ip saddr 10.244.1.2 ip daddr 10.244.1.5 tcp dport 9090 counter drop comment "web-metrics"
        }
        chain output {
          type filter hook output priority 0; policy accept;
          ip daddr 10.244.1.4 tcp dport 5432 counter drop comment "host-db"
        }
      }
pods:
  - { name: web-7f9c4-abcde, namespace: prod, node: node-1, ip: 10.244.1.2, uid: "11111111-1111-4111-8111-111111111111" }
  - { name: api-5d4e8-fghij, namespace: prod, node: node-1, ip: 10.244.1.3, listen: ["8080/tcp"], uid: "22222222-2222-4222-8222-222222222222" }
  - { name: db-0, namespace: prod, node: node-1, ip: 10.244.1.4, listen: ["5432/tcp"], uid: "33333333-3333-4333-8333-333333333333" }
  - { name: metrics, namespace: prod, node: node-1, ip: 10.244.1.5, listen: ["9090/tcp"], uid: "55555555-5555-4555-8555-555555555555" }
  - { name: scraper, namespace: monitoring, node: node-1, ip: 100.64.1.2, host_network: true, uid: "44444444-4444-4444-8444-444444444444" }
"#;

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: prod }
---
apiVersion: v1
kind: Namespace
metadata: { name: monitoring }
---
apiVersion: v1
kind: Node
metadata: { name: node-1 }
status: { addresses: [ { type: InternalIP, address: 100.64.1.2 } ] }
---
apiVersion: apps/v1
kind: ReplicaSet
metadata:
  name: web-7f9c4
  namespace: prod
  ownerReferences: [ { apiVersion: apps/v1, kind: Deployment, name: web, uid: d1, controller: true } ]
spec: { selector: { matchLabels: { app: web } } }
---
apiVersion: v1
kind: Pod
metadata:
  name: web-7f9c4-abcde
  namespace: prod
  uid: 11111111-1111-4111-8111-111111111111
  labels: { app: web, pod-template-hash: 7f9c4 }
  ownerReferences: [ { apiVersion: apps/v1, kind: ReplicaSet, name: web-7f9c4, uid: r1, controller: true } ]
spec: { nodeName: node-1, containers: [ { name: web, image: web } ] }
status: { phase: Running, podIP: 10.244.1.2, conditions: [ { type: Ready, status: "True" } ] }
---
apiVersion: v1
kind: Pod
metadata:
  name: api-5d4e8-fghij
  namespace: prod
  uid: 22222222-2222-4222-8222-222222222222
  labels: { app: api, pod-template-hash: 5d4e8 }
  ownerReferences: [ { apiVersion: apps/v1, kind: ReplicaSet, name: api-5d4e8, uid: r2, controller: true } ]
spec: { nodeName: node-1, containers: [ { name: api, image: api, ports: [ { name: http, containerPort: 8080 } ] } ] }
status: { phase: Running, podIP: 10.244.1.3, conditions: [ { type: Ready, status: "True" } ] }
---
apiVersion: v1
kind: Pod
metadata:
  name: db-0
  namespace: prod
  uid: 33333333-3333-4333-8333-333333333333
  labels: { app: db }
  ownerReferences: [ { apiVersion: apps/v1, kind: StatefulSet, name: db, uid: s1, controller: true } ]
spec: { nodeName: node-1, containers: [ { name: db, image: postgres, ports: [ { containerPort: 5432 } ] } ] }
status: { phase: Running, podIP: 10.244.1.4, conditions: [ { type: Ready, status: "True" } ] }
---
apiVersion: v1
kind: Pod
metadata:
  name: metrics
  namespace: prod
  uid: 55555555-5555-4555-8555-555555555555
  labels: { app: metrics }
spec: { nodeName: node-1, containers: [ { name: m, image: m, ports: [ { containerPort: 9090 } ] } ] }
status: { phase: Running, podIP: 10.244.1.5, conditions: [ { type: Ready, status: "True" } ] }
---
apiVersion: v1
kind: Pod
metadata:
  name: scraper
  namespace: monitoring
  uid: 44444444-4444-4444-8444-444444444444
  labels: { app: scraper }
spec: { nodeName: node-1, hostNetwork: true, containers: [ { name: s, image: s } ] }
status: { phase: Running, podIP: 100.64.1.2, conditions: [ { type: Ready, status: "True" } ] }
---
apiVersion: v1
kind: Service
metadata: { name: api, namespace: prod }
spec: { clusterIP: 10.96.0.20, selector: { app: api }, ports: [ { port: 80, targetPort: 8080 } ] }
---
apiVersion: v1
kind: Service
metadata: { name: payment, namespace: prod }
spec: { clusterIP: 10.96.0.30, selector: { app: payment }, ports: [ { port: 80, targetPort: 8080 } ] }
---
apiVersion: v1
kind: Pod
metadata:
  name: payment-0
  namespace: prod
  labels: { app: payment }
spec: { nodeName: node-1, containers: [ { name: p, image: p } ] }
status: { phase: Running, podIP: 10.244.1.9, conditions: [ { type: Ready, status: "False" } ] }
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: { name: default-deny-all, namespace: prod }
spec: { podSelector: {}, policyTypes: [ Ingress ] }
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: { name: allow-metrics-scrape, namespace: prod }
spec:
  podSelector: { matchLabels: { app: metrics } }
  ingress: [ { ports: [ { port: 9090 } ] } ]
"#;

fn start(lab: &netwatch_lab::Lab, dir: &tempfile::TempDir) -> Agent {
    let manifests = dir.path().join("cluster.yaml");
    std::fs::write(&manifests, MANIFESTS).unwrap();
    Agent::start(
        lab,
        "node-1",
        4,
        &["--manifests", manifests.to_str().unwrap()],
    )
}

fn last_of(lines: &[Value], pred: impl Fn(&Value) -> bool) -> &Value {
    records(lines, pred)
        .into_iter()
        .last()
        .unwrap_or_else(|| panic!("no such record in {lines:#?}"))
}

fn names(policies: &Value) -> Vec<String> {
    policies
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    format!(
                        "{}/{}",
                        p["namespace"].as_str().unwrap_or(""),
                        p["name"].as_str().unwrap_or("")
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_denied_flow_through_a_service_names_both_pods_workloads_the_service_and_the_policy() {
    let lab = lab(LAB);
    let dir = tempfile::tempdir().unwrap();
    let mut agent = start(&lab, &dir);
    expect_probe(
        &lab,
        "prod/web-7f9c4-abcde",
        tcp("10.96.0.20:80", 3),
        Outcome::TimedOut,
    );
    let lines = agent.stop();
    let f = last_of(&lines, to("10.244.1.3", 8080));
    assert_eq!(f["verdict"], "DROPPED");
    assert_eq!(f["source"]["pod_name"], "web-7f9c4-abcde");
    assert_eq!(f["source"]["namespace"], "prod");
    assert_eq!(f["source"]["workloads"][0]["name"], "web");
    assert_eq!(f["source"]["workloads"][0]["kind"], "Deployment");
    assert!(
        f["source"]["labels"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l == "k8s:app=web")
    );
    assert_eq!(f["destination"]["pod_name"], "api-5d4e8-fghij");
    assert_eq!(f["destination"]["workloads"][0]["name"], "api");
    assert_eq!(
        f["destination"]["service"]["name"], "api",
        "addressed through the service: {f:#}"
    );
    assert_eq!(f["original_destination"]["ip"], "10.96.0.20");
    assert_eq!(f["original_destination"]["port"], 80);
    assert_eq!(
        names(&f["ingress_denied_by"]),
        vec!["prod/default-deny-all"]
    );
    assert_eq!(f["traffic_direction"], "INGRESS");
    let why = f["explanation"].as_str().unwrap();
    assert!(
        why.contains("prod/default-deny-all") && why.contains("prod/api-5d4e8-fghij"),
        "{why}"
    );
    assert_eq!(
        records(&lines, |r| r["IP"]["destination"] == "10.96.0.20").len(),
        0,
        "one flow, not two"
    );
}

#[test]
fn a_drop_the_policies_allow_is_said_to_be_outside_networkpolicy() {
    let lab = lab(LAB);
    let dir = tempfile::tempdir().unwrap();
    let mut agent = start(&lab, &dir);
    expect_probe(
        &lab,
        "prod/web-7f9c4-abcde",
        tcp("10.244.1.5:9090", 2),
        Outcome::TimedOut,
    );
    let lines = agent.stop();
    let f = last_of(&lines, to("10.244.1.5", 9090));
    assert_eq!(f["verdict"], "DROPPED");
    assert_eq!(
        names(&f["ingress_allowed_by"]),
        vec!["prod/allow-metrics-scrape"]
    );
    assert!(f.get("ingress_denied_by").is_none());
    assert!(
        f["explanation"]
            .as_str()
            .unwrap()
            .starts_with("not explained by NetworkPolicy"),
        "{f:#}"
    );
}

#[test]
fn a_hostnetwork_pod_is_named_by_its_cgroup() {
    let lab = lab(LAB);
    let dir = tempfile::tempdir().unwrap();
    let mut agent = start(&lab, &dir);
    expect_probe(
        &lab,
        "monitoring/scraper",
        tcp("10.244.1.4:5432", 3),
        Outcome::TimedOut,
    );
    let lines = agent.stop();
    let f = last_of(&lines, to("10.244.1.4", 5432));
    assert_eq!(f["IP"]["source"], "100.64.1.2", "the node's address");
    let scraper = lab.pod("monitoring/scraper").unwrap();
    assert_eq!(
        f["cgroup_id"].as_u64(),
        Some(std::fs::metadata(&scraper.cgroup).unwrap().ino())
    );
    assert_eq!(
        f["source"]["pod_name"], "scraper",
        "named by its cgroup, not as the host: {f:#}"
    );
    assert_eq!(f["source"]["namespace"], "monitoring");
    assert_eq!(f["destination"]["pod_name"], "db-0");
    assert_eq!(f["destination"]["workloads"][0]["kind"], "StatefulSet");
}

#[test]
fn an_established_connection_the_policies_deny_is_policy_not_enforced() {
    let lab = lab(LAB);
    let dir = tempfile::tempdir().unwrap();
    let mut agent = start(&lab, &dir);
    for _ in 0..3 {
        let r = lab
            .probe("prod/api-5d4e8-fghij", &tcp("10.244.1.4:5432", 2))
            .unwrap();
        assert_eq!(
            r.outcome,
            Outcome::Connected,
            "nothing in the lab enforces the policy"
        );
    }
    let f = agent.wait_for_flow(Duration::from_secs(3), to("10.244.1.4", 5432));
    let lines = agent.stop();
    let f = &f["flow"];
    assert_eq!(f["verdict"], "POLICY_NOT_ENFORCED");
    assert_eq!(f["source"]["pod_name"], "api-5d4e8-fghij");
    assert_eq!(f["destination"]["pod_name"], "db-0");
    assert_eq!(
        names(&f["ingress_denied_by"]),
        vec!["prod/default-deny-all"]
    );
    assert!(
        f["explanation"]
            .as_str()
            .unwrap()
            .contains("does not enforce")
    );
    assert_eq!(
        records(&lines, to("10.244.1.4", 5432)).len(),
        1,
        "rate-limited: one report for three connections"
    );
}

#[test]
fn a_refusal_by_a_service_without_ready_endpoints_says_so() {
    let lab = lab(LAB);
    let dir = tempfile::tempdir().unwrap();
    let mut agent = start(&lab, &dir);
    expect_probe(
        &lab,
        "prod/web-7f9c4-abcde",
        tcp("10.96.0.30:80", 2),
        Outcome::Refused,
    );
    let lines = agent.stop();
    let f = last_of(&lines, to("10.96.0.30", 80));
    assert_eq!(f["verdict"], "REFUSED");
    assert_eq!(f["refusal"], "ICMP_PORT_UNREACHABLE");
    assert_eq!(f["destination"]["service"]["name"], "payment");
    assert_eq!(
        f["explanation"],
        "service prod/payment has no ready endpoints"
    );
    assert!(f.get("ingress_denied_by").is_none(), "not a policy drop");
}

#[test]
fn with_the_api_server_unreachable_capture_goes_on_and_records_go_out_unenriched() {
    let lab = lab(LAB);
    let dir = tempfile::tempdir().unwrap();
    // A kubeconfig whose API server refuses every connection.
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters: [ { name: c, cluster: { server: \"https://127.0.0.1:9\", insecure-skip-tls-verify: true } } ]\n\
         users: [ { name: u, user: { token: t } } ]\ncontexts: [ { name: x, context: { cluster: c, user: u } } ]\ncurrent-context: x\n",
    )
    .unwrap();
    let mut agent = Agent::start(
        &lab,
        "node-1",
        4,
        &[
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--identity-wait",
            "1",
        ],
    );
    expect_probe(
        &lab,
        "prod/web-7f9c4-abcde",
        tcp("10.244.1.5:9090", 2),
        Outcome::TimedOut,
    );
    // Reported by address after the identity wait, marked.
    let f = agent.wait_for_flow(Duration::from_secs(4), to("10.244.1.5", 9090));
    assert_eq!(f["flow"]["verdict"], "DROPPED");
    assert_eq!(f["flow"]["unenriched"], true);
    assert!(f["flow"]["source"].get("pod_name").is_none());
    let lines = agent.stop();
    assert!(
        lines.iter().all(|l| l["flow"]["unenriched"] == true),
        "nothing could be enriched"
    );
    assert!(!agent.log().contains("panicked"));
}

#[test]
fn manifests_are_reloaded_when_they_change() {
    let lab = lab(LAB);
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("cluster.yaml");
    // First without the default-deny policy: the drop is not NetworkPolicy's.
    let without_deny = MANIFESTS
        .replace("name: default-deny-all", "name: unrelated")
        .replace(
            "podSelector: {}, policyTypes: [ Ingress ]",
            "podSelector: { matchLabels: { app: nothing } }, policyTypes: [ Ingress ]",
        );
    std::fs::write(&manifests, &without_deny).unwrap();
    let mut agent = Agent::start(
        &lab,
        "node-1",
        4,
        &[
            "--manifests",
            manifests.to_str().unwrap(),
            "--idle-timeout",
            "1",
        ],
    );
    lab.probe("prod/web-7f9c4-abcde", &tcp("10.244.1.3:8080", 1))
        .unwrap();
    let first = agent.wait_for_flow(Duration::from_secs(3), to("10.244.1.3", 8080));
    assert!(
        first["flow"]["explanation"]
            .as_str()
            .unwrap()
            .starts_with("not explained by NetworkPolicy"),
        "{first:#}"
    );
    // Apply the policy (as `kubectl apply` would): the next flow is attributed to it.
    std::thread::sleep(Duration::from_millis(1100));
    std::fs::write(&manifests, MANIFESTS).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    lab.probe("prod/web-7f9c4-abcde", &tcp("10.244.1.3:8080", 1))
        .unwrap();
    let second = agent.wait_for_flow(Duration::from_secs(3), |f| {
        to("10.244.1.3", 8080)(f) && f["uuid"] != first["flow"]["uuid"] && f["lifecycle"] == "NEW"
    });
    assert_eq!(
        names(&second["flow"]["ingress_denied_by"]),
        vec!["prod/default-deny-all"]
    );
    agent.stop();
}
