//! `suggest`: applying the suggested policies turns the flow to ALLOWED and
//! changes no other pair's verdict (other than between the same workloads).

#[path = "policy_support/mod.rs"]
mod support;

use std::collections::BTreeMap;

use netwatch::cluster::ClusterSnapshot;
use netwatch::manifests;
use netwatch::policy::{EngineOptions, Peer, PolicyEngine, PolicyVerdict, Protocol, suggest};

const PORTS: [u16; 2] = [80, 81];
const PROTOCOLS: [Protocol; 2] = [Protocol::Tcp, Protocol::Udp];

fn p(s: &str) -> Peer {
    s.parse().unwrap()
}

/// Every ordered pair of distinct ends in `ends`, on PORTS x PROTOCOLS.
fn verdicts(
    engine: &PolicyEngine,
    ends: &[String],
) -> BTreeMap<(String, String, u16, Protocol), PolicyVerdict> {
    let mut out = BTreeMap::new();
    for from in ends {
        for to in ends {
            if from == to {
                continue;
            }
            for port in PORTS {
                for protocol in PROTOCOLS {
                    out.insert(
                        (from.clone(), to.clone(), port, protocol),
                        engine.decide(&p(from), &p(to), port, protocol),
                    );
                }
            }
        }
    }
    out
}

fn pods(engine: &PolicyEngine) -> Vec<String> {
    engine
        .pods()
        .into_iter()
        .map(|(ns, n)| format!("{ns}/{n}"))
        .collect()
}

/// Suggests for `from` -> `to`, applies, and returns the pairs whose verdict
/// changed, after checking the flow is allowed. Pairs between the same two
/// workloads on the same port are left out: replicas share selectors.
fn apply_and_diff(
    snapshot: &ClusterSnapshot,
    options: EngineOptions,
    from: &str,
    to: &str,
    port: u16,
    protocol: Protocol,
    extra_ends: &[&str],
) -> (
    Vec<(String, String, u16, Protocol)>,
    netwatch::policy::Suggestion,
) {
    let engine = PolicyEngine::new(snapshot, options).unwrap();
    let mut ends = pods(&engine);
    ends.extend(extra_ends.iter().map(|s| s.to_string()));
    let before = verdicts(&engine, &ends);
    let suggestion = suggest(&engine, snapshot, &p(from), &p(to), port, protocol).unwrap();
    assert!(
        !suggestion.policies.is_empty(),
        "{from} -> {to}: nothing suggested for a denied flow"
    );
    // What a user applies is the YAML: read it back as kubectl would.
    let yaml = suggestion.to_yaml();
    let applied_policies =
        manifests::load_str("suggestion.yaml", &yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    assert_eq!(applied_policies.network_policies, suggestion.policies);
    let mut applied = snapshot.clone();
    applied
        .network_policies
        .extend(applied_policies.network_policies);
    let after_engine = PolicyEngine::new(&applied, options).unwrap();
    assert_eq!(
        after_engine.decide(&p(from), &p(to), port, protocol),
        PolicyVerdict::Allowed,
        "{from} -> {to} {port}/{protocol} still denied with:\n{yaml}"
    );
    let after = verdicts(&after_engine, &ends);
    let changed = before
        .iter()
        .filter(|(k, v)| after[*k] != **v)
        .map(|(k, _)| k.clone())
        .filter(|k| {
            !(k.2 == port
                && k.3 == protocol
                && workload(&k.0) == workload(from)
                && workload(&k.1) == workload(to))
        })
        .collect();
    (changed, suggestion)
}

#[test]
fn every_denied_pair_of_every_conformance_case_gets_an_exact_fix() {
    let mut checked = 0;
    let mut failures = Vec::new();
    for case in support::cases() {
        for (i, step) in case.steps.iter().enumerate() {
            let snapshot = support::step_snapshot(&case, i);
            let options = EngineOptions {
                ipblock_matches_pods: step.ipblock_matches_pods.unwrap_or(true),
            };
            let engine = PolicyEngine::new(&snapshot, options).unwrap();
            let probe = &step.probes[0];
            let protocol = probe.protocol();
            for ((from, to), expected) in support::parse_table(&probe.reachability) {
                if expected != PolicyVerdict::Denied {
                    continue;
                }
                assert_eq!(
                    engine.decide(&p(&from), &p(&to), probe.port, protocol),
                    PolicyVerdict::Denied
                );
                let (changed, _) =
                    apply_and_diff(&snapshot, options, &from, &to, probe.port, protocol, &[]);
                checked += 1;
                if !changed.is_empty() {
                    failures.push(format!(
                        "{} step {}: {from} -> {to}: also changed {changed:?}",
                        case.file,
                        i + 1
                    ));
                }
            }
        }
    }
    assert!(checked > 500, "only {checked} denied pairs checked");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

const APP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Namespace
metadata: {name: data}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  template: {metadata: {labels: {app: web}}}
---
apiVersion: apps/v1
kind: ReplicaSet
metadata:
  name: web-7d9f
  namespace: shop
  ownerReferences: [{apiVersion: apps/v1, kind: Deployment, name: web, uid: u1, controller: true}]
spec:
  selector: {matchLabels: {app: web, pod-template-hash: 7d9f}}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-7d9f-aaaaa
  namespace: shop
  labels: {app: web, pod-template-hash: 7d9f, version: v2}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-7d9f, uid: u2, controller: true}]
status: {podIP: 10.4.0.1}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-7d9f-bbbbb
  namespace: shop
  labels: {app: web, pod-template-hash: 7d9f, version: v2}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-7d9f, uid: u2, controller: true}]
status: {podIP: 10.4.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: admin, namespace: shop, labels: {app: admin, version: v2}}
status: {podIP: 10.4.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: api-1, namespace: shop, labels: {app: api}}
status: {podIP: 10.4.0.4}
---
apiVersion: v1
kind: Pod
metadata: {name: api-canary, namespace: shop, labels: {app: api, canary: "true"}}
status: {podIP: 10.4.0.5}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: pg, namespace: data}
spec:
  serviceName: pg
  selector: {matchLabels: {app: pg}}
  template: {metadata: {labels: {app: pg}}}
---
apiVersion: v1
kind: Pod
metadata:
  name: pg-0
  namespace: data
  labels: {app: pg, statefulset.kubernetes.io/pod-name: pg-0, controller-revision-hash: pg-5c}
  ownerReferences: [{apiVersion: apps/v1, kind: StatefulSet, name: pg, uid: u3, controller: true}]
status: {podIP: 10.5.0.1}
---
apiVersion: v1
kind: Pod
metadata:
  name: pg-1
  namespace: data
  labels: {app: pg, statefulset.kubernetes.io/pod-name: pg-1, controller-revision-hash: pg-5c}
  ownerReferences: [{apiVersion: apps/v1, kind: StatefulSet, name: pg, uid: u3, controller: true}]
status: {podIP: 10.5.0.2}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: data}
spec: {podSelector: {}, policyTypes: [Ingress, Egress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-egress-dns-only, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress:
  - ports: [{port: 53, protocol: UDP}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: stable-api-ingress, namespace: shop}
spec:
  podSelector:
    matchLabels: {app: api}
    matchExpressions: [{key: canary, operator: DoesNotExist}]
  ingress:
  - from: [{podSelector: {matchLabels: {app: admin}}}]
"#;

fn app() -> ClusterSnapshot {
    manifests::load_str("app.yaml", APP).unwrap()
}

fn workload(pod: &str) -> &str {
    match pod {
        "shop/web-7d9f-aaaaa" | "shop/web-7d9f-bbbbb" => "web",
        "data/pg-0" | "data/pg-1" => "pg",
        other => other,
    }
}

#[test]
fn both_directions_are_fixed_with_workload_selectors_and_only_the_two_workloads_change() {
    let snapshot = app();
    let (changed, suggestion) = apply_and_diff(
        &snapshot,
        EngineOptions::default(),
        "shop/web-7d9f-aaaaa",
        "data/pg-0",
        5432,
        Protocol::Tcp,
        &[],
    );
    assert_eq!(
        suggestion.policies.len(),
        2,
        "egress of web and ingress of pg are both denied"
    );
    let egress = &suggestion.policies[0];
    assert_eq!(egress.metadata.namespace.as_deref(), Some("shop"));
    let spec = egress.spec.as_ref().unwrap();
    assert_eq!(
        spec.policy_types.as_deref(),
        Some(&["Egress".to_string()][..])
    );
    // The Deployment's selector, not the pod's unstable pod-template-hash.
    assert_eq!(
        spec.pod_selector.as_ref().unwrap().match_labels,
        Some(BTreeMap::from([("app".into(), "web".into())]))
    );
    let to = &spec.egress.as_ref().unwrap()[0].to.as_ref().unwrap()[0];
    assert_eq!(
        to.namespace_selector.as_ref().unwrap().match_labels,
        Some(BTreeMap::from([(
            "kubernetes.io/metadata.name".into(),
            "data".into()
        )]))
    );
    assert_eq!(
        to.pod_selector.as_ref().unwrap().match_labels,
        Some(BTreeMap::from([("app".into(), "pg".into())]))
    );
    let ingress = suggestion.policies[1].spec.as_ref().unwrap();
    assert_eq!(
        ingress.policy_types.as_deref(),
        Some(&["Ingress".to_string()][..])
    );
    assert_eq!(
        ingress.ingress.as_ref().unwrap()[0]
            .ports
            .as_ref()
            .unwrap()
            .len(),
        1,
        "one port"
    );
    // The port under test is not in PORTS, so nothing of 80/81 may change.
    assert!(changed.is_empty(), "{changed:?}");
    // And on the port itself, only web replicas -> pg replicas opened.
    let mut applied = snapshot.clone();
    applied.network_policies.extend(suggestion.policies.clone());
    let before = PolicyEngine::new(&snapshot, EngineOptions::default()).unwrap();
    let after = PolicyEngine::new(&applied, EngineOptions::default()).unwrap();
    for from in pods(&before) {
        for to in pods(&before) {
            let (b, a) = (
                before.decide(&p(&from), &p(&to), 5432, Protocol::Tcp),
                after.decide(&p(&from), &p(&to), 5432, Protocol::Tcp),
            );
            if from != to && a != b {
                assert_eq!(
                    (workload(&from), workload(&to)),
                    ("web", "pg"),
                    "{from} -> {to} changed"
                );
            }
        }
    }
    assert_eq!(
        after.decide(
            &p("shop/web-7d9f-bbbbb"),
            &p("data/pg-1"),
            5432,
            Protocol::Tcp
        ),
        PolicyVerdict::Allowed
    );
    assert_eq!(
        after.decide(&p("shop/admin"), &p("data/pg-0"), 5432, Protocol::Tcp),
        PolicyVerdict::Denied,
        "admin shares version=v2 only"
    );
}

#[test]
fn the_subject_selector_never_isolates_a_pod_that_was_not_isolated() {
    let snapshot = app();
    // api-1 is isolated (stable-api-ingress); api-canary, with the same app
    // label, is not: a selector on app=api alone would isolate it.
    let (changed, suggestion) = apply_and_diff(
        &snapshot,
        EngineOptions::default(),
        "shop:app=batch",
        "shop/api-1",
        81,
        Protocol::Udp,
        &["shop:app=batch"],
    );
    assert_eq!(suggestion.policies.len(), 1);
    assert!(changed.is_empty(), "{changed:?}");
    let selector = suggestion.policies[0]
        .spec
        .as_ref()
        .unwrap()
        .pod_selector
        .clone()
        .unwrap();
    let exprs = selector.match_expressions.unwrap();
    assert_eq!(
        (exprs[0].key.as_str(), exprs[0].operator.as_str()),
        ("canary", "DoesNotExist")
    );
}

#[test]
fn external_addresses_get_a_single_address_ip_block() {
    let snapshot = app();
    let (changed, suggestion) = apply_and_diff(
        &snapshot,
        EngineOptions::default(),
        "203.0.113.7",
        "data/pg-0",
        80,
        Protocol::Tcp,
        &["203.0.113.7", "203.0.113.8"],
    );
    assert!(changed.is_empty(), "{changed:?}");
    let from = &suggestion.policies[0]
        .spec
        .as_ref()
        .unwrap()
        .ingress
        .as_ref()
        .unwrap()[0]
        .from
        .as_ref()
        .unwrap()[0];
    assert_eq!(from.ip_block.as_ref().unwrap().cidr, "203.0.113.7/32");
    let (_, suggestion) = apply_and_diff(
        &snapshot,
        EngineOptions::default(),
        "shop/web-7d9f-aaaaa",
        "2001:db8::7",
        443,
        Protocol::Tcp,
        &[],
    );
    let to = &suggestion.policies[0]
        .spec
        .as_ref()
        .unwrap()
        .egress
        .as_ref()
        .unwrap()[0]
        .to
        .as_ref()
        .unwrap()[0];
    assert_eq!(to.ip_block.as_ref().unwrap().cidr, "2001:db8::7/128");
}

#[test]
fn hypothetical_pods_are_selected_by_their_labels() {
    let snapshot = app();
    let (changed, suggestion) = apply_and_diff(
        &snapshot,
        EngineOptions::default(),
        "shop:app=worker,track=new",
        "data/pg-0",
        80,
        Protocol::Tcp,
        &[],
    );
    assert!(changed.is_empty(), "{changed:?}");
    let egress = suggestion
        .policies
        .iter()
        .find(|np| np.metadata.namespace.as_deref() == Some("shop"));
    assert!(
        egress.is_none(),
        "a new pod with these labels is not isolated for egress: nothing to open there"
    );
    let from = &suggestion.policies[0]
        .spec
        .as_ref()
        .unwrap()
        .ingress
        .as_ref()
        .unwrap()[0]
        .from
        .as_ref()
        .unwrap()[0];
    assert_eq!(
        from.pod_selector.as_ref().unwrap().match_labels,
        Some(BTreeMap::from([
            ("app".into(), "worker".into()),
            ("track".into(), "new".into())
        ]))
    );
}

#[test]
fn nothing_is_suggested_for_an_allowed_flow() {
    let snapshot = app();
    let engine = PolicyEngine::new(&snapshot, EngineOptions::default()).unwrap();
    let s = suggest(
        &engine,
        &snapshot,
        &p("shop/admin"),
        &p("shop/api-1"),
        80,
        Protocol::Tcp,
    )
    .unwrap();
    assert!(s.policies.is_empty());
    assert_eq!(s.to_yaml(), "");
}

#[test]
fn the_yaml_is_ready_for_kubectl_with_prose_only_in_comments() {
    let snapshot = app();
    let engine = PolicyEngine::new(&snapshot, EngineOptions::default()).unwrap();
    let s = suggest(
        &engine,
        &snapshot,
        &p("shop/web-7d9f-aaaaa"),
        &p("data/pg-0"),
        5432,
        Protocol::Tcp,
    )
    .unwrap();
    let yaml = s.to_yaml();
    for doc in yaml.split("---\n").filter(|d| {
        d.lines()
            .any(|l| !l.starts_with('#') && !l.trim().is_empty())
    }) {
        let value: serde_yaml::Value = serde_yaml::from_str(doc).unwrap();
        assert_eq!(value["apiVersion"], "networking.k8s.io/v1");
        assert_eq!(value["kind"], "NetworkPolicy");
    }
    assert!(yaml.starts_with("# "), "{yaml}");
    let names: Vec<&str> = s
        .policies
        .iter()
        .map(|np| np.metadata.name.as_deref().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "allow-web-to-pg-5432-tcp-egress",
            "allow-web-to-pg-5432-tcp-ingress"
        ]
    );
}

#[test]
fn a_dns_fix_allows_udp_and_tcp_53() {
    let snapshot = manifests::load_str(
        "dns.yaml",
        r#"
apiVersion: v1
kind: Namespace
metadata: {name: prod}
---
apiVersion: v1
kind: Namespace
metadata: {name: kube-system}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: prod, labels: {app: web}}
status: {podIP: 10.244.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: coredns-0, namespace: kube-system, labels: {k8s-app: kube-dns}}
status: {podIP: 10.244.1.4}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: prod}
spec: {podSelector: {}, policyTypes: [Egress]}
"#,
    )
    .unwrap();
    let engine = PolicyEngine::new(&snapshot, EngineOptions::default()).unwrap();
    let (web, dns) = (p("prod/web-0"), p("kube-system/coredns-0"));
    let s = suggest(&engine, &snapshot, &web, &dns, 53, Protocol::Udp).unwrap();
    let yaml = s.to_yaml();
    assert!(
        yaml.contains("protocol: UDP") && yaml.contains("protocol: TCP"),
        "{yaml}"
    );
    let mut applied = snapshot.clone();
    applied.network_policies.extend(s.policies);
    let after = PolicyEngine::new(&applied, EngineOptions::default()).unwrap();
    for protocol in [Protocol::Udp, Protocol::Tcp] {
        assert_eq!(
            after.decide(&web, &dns, 53, protocol),
            PolicyVerdict::Allowed,
            "{protocol:?}"
        );
    }
}
