//! Each point of the networking.k8s.io/v1 semantics, one test each, on small
//! clusters written inline as the manifests a user would keep.

use netwatch::manifests;
use netwatch::policy::{
    EndpointKind, EngineOptions, Peer, PolicyEngine, PolicyError, PolicyRef, PolicyVerdict,
    Protocol,
};

const TCP: Protocol = Protocol::Tcp;
const UDP: Protocol = Protocol::Udp;
const SCTP: Protocol = Protocol::Sctp;

/// Namespaces prod (team=shop) and ops (team=infra); pods:
/// prod/web (app=web, tier=frontend) 10.1.0.1 / fd00::1,
/// prod/api (app=api) 10.1.0.2 / fd00::2, container ports http 8080/TCP,
///   metrics 9090/TCP, dns 53/UDP, sig 3868/SCTP,
/// prod/db (app=db) without an IP,
/// ops/probe (app=probe) 10.2.0.1.
const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {team: shop}}
---
apiVersion: v1
kind: Namespace
metadata: {name: ops, labels: {team: infra}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: prod, labels: {app: web, tier: frontend}}
status: {podIP: 10.1.0.1, podIPs: [{ip: 10.1.0.1}, {ip: "fd00::1"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: prod, labels: {app: api}}
spec:
  containers:
  - name: api
    image: api
    ports:
    - {name: http, containerPort: 8080}
    - {name: metrics, containerPort: 9090, protocol: TCP}
    - {name: dns, containerPort: 53, protocol: UDP}
    - {name: sig, containerPort: 3868, protocol: SCTP}
status: {podIP: 10.1.0.2, podIPs: [{ip: 10.1.0.2}, {ip: "fd00::2"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: prod, labels: {app: db}}
---
apiVersion: v1
kind: Pod
metadata: {name: probe, namespace: ops, labels: {app: probe}}
status: {podIP: 10.2.0.1}
"#;

fn engine_with(policies: &str, options: EngineOptions) -> PolicyEngine {
    let snapshot =
        manifests::load_str("test.yaml", &format!("{CLUSTER}\n---\n{policies}")).unwrap();
    PolicyEngine::new(&snapshot, options).unwrap()
}

fn engine(policies: &str) -> PolicyEngine {
    engine_with(policies, EngineOptions::default())
}

fn p(s: &str) -> Peer {
    s.parse().unwrap()
}

fn verdict(e: &PolicyEngine, from: &str, to: &str, port: u16, protocol: Protocol) -> PolicyVerdict {
    let fast = e.decide(&p(from), &p(to), port, protocol);
    let full = e.evaluate(&p(from), &p(to), port, protocol);
    assert_eq!(
        fast, full.verdict,
        "decide and evaluate disagree on {from} -> {to} {port}/{protocol}"
    );
    fast
}

fn allowed(e: &PolicyEngine, from: &str, to: &str, port: u16, protocol: Protocol) -> bool {
    verdict(e, from, to, port, protocol) == PolicyVerdict::Allowed
}

fn policy(name: &str, namespace: &str, spec: &str) -> String {
    let spec: String = spec.lines().map(|l| format!("  {l}\n")).collect();
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{spec}---\n"
    )
}

fn r(namespace: &str, name: &str) -> PolicyRef {
    PolicyRef::network_policy(namespace, name)
}

// --- isolation and directions ---

#[test]
fn without_policies_everything_is_allowed_and_nothing_is_isolated() {
    let e = engine("");
    let v = e.evaluate(&p("prod/web"), &p("prod/api"), 80, TCP);
    assert_eq!(v.verdict, PolicyVerdict::Allowed);
    assert!(!v.egress.isolated && !v.ingress.isolated);
    assert!(
        v.sentence().contains("no NetworkPolicy isolates"),
        "{}",
        v.sentence()
    );
}

#[test]
fn a_policy_isolates_only_the_pods_it_selects_in_its_namespace_and_direction() {
    let e = engine(&policy(
        "deny-api",
        "prod",
        "podSelector: {matchLabels: {app: api}}",
    ));
    assert!(!allowed(&e, "prod/web", "prod/api", 80, TCP));
    assert!(
        allowed(&e, "prod/api", "prod/web", 80, TCP),
        "egress of api is not isolated"
    );
    assert!(
        allowed(&e, "prod/web", "prod/db", 80, TCP),
        "db is not selected"
    );
    let v = e.evaluate(&p("prod/web"), &p("prod/api"), 80, TCP);
    assert!(v.ingress.isolated && !v.egress.isolated);
    assert_eq!(v.ingress.denied_by, vec![r("prod", "deny-api")]);
}

#[test]
fn both_directions_must_allow() {
    let e = engine(&format!(
        "{}{}",
        policy(
            "web-egress-to-api",
            "prod",
            "podSelector: {matchLabels: {app: web}}\npolicyTypes: [Egress]\negress:\n- to:\n  - podSelector: {matchLabels: {app: api}}"
        ),
        policy(
            "api-ingress-none",
            "prod",
            "podSelector: {matchLabels: {app: api}}\npolicyTypes: [Ingress]"
        )
    ));
    let v = e.evaluate(&p("prod/web"), &p("prod/api"), 8080, TCP);
    assert_eq!(v.egress.verdict, PolicyVerdict::Allowed);
    assert_eq!(v.egress.allowed_by, vec![r("prod", "web-egress-to-api")]);
    assert_eq!(v.ingress.verdict, PolicyVerdict::Denied);
    assert_eq!(v.verdict, PolicyVerdict::Denied);
    assert!(
        !allowed(&e, "prod/web", "prod/db", 80, TCP),
        "web's egress only allows api"
    );
}

#[test]
fn any_selecting_policy_with_a_matching_rule_allows() {
    let e = engine(&format!(
        "{}{}",
        policy("deny", "prod", "podSelector: {}\npolicyTypes: [Ingress]"),
        policy(
            "allow-web",
            "prod",
            "podSelector: {matchLabels: {app: api}}\ningress:\n- from:\n  - podSelector: {matchLabels: {app: web}}"
        )
    ));
    let v = e.evaluate(&p("prod/web"), &p("prod/api"), 8080, TCP);
    assert_eq!(v.verdict, PolicyVerdict::Allowed);
    assert_eq!(v.ingress.allowed_by, vec![r("prod", "allow-web")]);
    assert!(v.ingress.denied_by.is_empty());
    let v = e.evaluate(&p("prod/db"), &p("prod/api"), 8080, TCP);
    assert_eq!(
        v.ingress.denied_by,
        vec![r("prod", "allow-web"), r("prod", "deny")]
    );
}

// --- policyTypes ---

#[test]
fn policy_types_default_to_ingress_only_without_egress_rules() {
    let e = engine(&policy(
        "p",
        "prod",
        "podSelector: {matchLabels: {app: web}}",
    ));
    assert!(
        !allowed(&e, "prod/api", "prod/web", 80, TCP),
        "ingress isolated"
    );
    assert!(
        allowed(&e, "prod/web", "prod/api", 80, TCP),
        "egress not isolated"
    );
}

#[test]
fn policy_types_include_egress_when_there_are_egress_rules() {
    let e = engine(&policy(
        "p",
        "prod",
        "podSelector: {matchLabels: {app: web}}\negress:\n- ports:\n  - port: 53\n    protocol: UDP",
    ));
    assert!(
        !allowed(&e, "prod/web", "prod/api", 80, TCP),
        "egress isolated: only 53/UDP"
    );
    assert!(allowed(&e, "prod/web", "prod/api", 53, UDP));
    assert!(
        !allowed(&e, "prod/api", "prod/web", 80, TCP),
        "ingress isolated too (Ingress always)"
    );
}

#[test]
fn explicit_policy_types_win() {
    // Egress only: ingress stays open although ingress rules are absent.
    let e = engine(&policy(
        "p",
        "prod",
        "podSelector: {matchLabels: {app: web}}\npolicyTypes: [Egress]",
    ));
    assert!(allowed(&e, "prod/api", "prod/web", 80, TCP));
    assert!(!allowed(&e, "prod/web", "prod/api", 80, TCP));
    // Ingress only: egress rules are ignored.
    let e = engine(&policy(
        "p",
        "prod",
        "podSelector: {matchLabels: {app: web}}\npolicyTypes: [Ingress]\ningress: [{}]\negress:\n- ports: [{port: 1}]",
    ));
    assert!(allowed(&e, "prod/web", "prod/api", 80, TCP));
}

// --- rule lists ---

#[test]
fn a_missing_and_an_empty_rule_list_both_match_nothing() {
    for spec in [
        "policyTypes: [Ingress]",
        "policyTypes: [Ingress]\ningress: []",
    ] {
        let e = engine(&policy(
            "p",
            "prod",
            &format!("podSelector: {{matchLabels: {{app: api}}}}\n{spec}"),
        ));
        assert!(!allowed(&e, "prod/web", "prod/api", 80, TCP), "{spec}");
        assert!(!allowed(&e, "10.9.9.9", "prod/api", 80, TCP), "{spec}");
    }
}

#[test]
fn a_rule_without_peers_matches_every_peer_including_external_addresses() {
    let e = engine(&policy(
        "p",
        "prod",
        "podSelector: {matchLabels: {app: api}}\ningress:\n- ports: [{port: 8080}]",
    ));
    assert!(allowed(&e, "prod/web", "prod/api", 8080, TCP));
    assert!(allowed(&e, "ops/probe", "prod/api", 8080, TCP));
    assert!(allowed(&e, "203.0.113.9", "prod/api", 8080, TCP));
    assert!(!allowed(&e, "203.0.113.9", "prod/api", 8081, TCP));
}

#[test]
fn a_rule_without_ports_matches_every_port_and_protocol() {
    let e = engine(&policy(
        "p",
        "prod",
        "podSelector: {matchLabels: {app: api}}\ningress:\n- from:\n  - podSelector: {matchLabels: {app: web}}",
    ));
    for (port, proto) in [(1, TCP), (65535, TCP), (53, UDP), (3868, SCTP)] {
        assert!(
            allowed(&e, "prod/web", "prod/api", port, proto),
            "{port}/{proto}"
        );
    }
}

// --- peers ---

#[test]
fn a_pod_selector_alone_selects_pods_of_the_policy_namespace_only() {
    let e = engine(&policy(
        "p",
        "prod",
        "podSelector: {matchLabels: {app: api}}\ningress:\n- from:\n  - podSelector: {}",
    ));
    assert!(allowed(&e, "prod/web", "prod/api", 80, TCP));
    assert!(!allowed(&e, "ops/probe", "prod/api", 80, TCP));
    // A pod in another namespace with matching labels is still not selected.
    assert!(!allowed(&e, "ops:app=web", "prod/api", 80, TCP));
}

#[test]
fn a_namespace_selector_alone_selects_every_pod_of_matching_namespaces() {
    let e = engine(&policy(
        "p",
        "prod",
        "podSelector: {matchLabels: {app: api}}\ningress:\n- from:\n  - namespaceSelector: {matchLabels: {team: infra}}",
    ));
    assert!(allowed(&e, "ops/probe", "prod/api", 80, TCP));
    assert!(
        allowed(&e, "ops:", "prod/api", 80, TCP),
        "a pod without labels in ops"
    );
    assert!(!allowed(&e, "prod/web", "prod/api", 80, TCP));
}

#[test]
fn an_empty_namespace_selector_selects_all_namespaces() {
    let e = engine(&policy(
        "p",
        "prod",
        "podSelector: {matchLabels: {app: api}}\ningress:\n- from:\n  - namespaceSelector: {}",
    ));
    assert!(allowed(&e, "ops/probe", "prod/api", 80, TCP));
    assert!(allowed(&e, "prod/web", "prod/api", 80, TCP));
    assert!(
        allowed(&e, "newns:app=x", "prod/api", 80, TCP),
        "namespaces not in the manifests too"
    );
    assert!(
        !allowed(&e, "203.0.113.9", "prod/api", 80, TCP),
        "not addresses outside the pod network"
    );
}

#[test]
fn namespace_and_pod_selectors_in_one_peer_are_anded() {
    let e = engine(&policy(
        "p",
        "prod",
        "podSelector: {matchLabels: {app: api}}\ningress:\n- from:\n  - namespaceSelector: {matchLabels: {team: infra}}\n    podSelector: {matchLabels: {app: probe}}",
    ));
    assert!(allowed(&e, "ops/probe", "prod/api", 80, TCP));
    assert!(
        !allowed(&e, "ops:app=other", "prod/api", 80, TCP),
        "namespace matches, pod does not"
    );
    assert!(
        !allowed(&e, "prod:app=probe", "prod/api", 80, TCP),
        "pod matches, namespace does not"
    );
}

#[test]
fn separate_peers_are_ored() {
    let e = engine(&policy(
        "p",
        "prod",
        "podSelector: {matchLabels: {app: api}}\ningress:\n- from:\n  - namespaceSelector: {matchLabels: {team: infra}}\n  - podSelector: {matchLabels: {app: web}}",
    ));
    assert!(allowed(&e, "ops/probe", "prod/api", 80, TCP));
    assert!(allowed(&e, "prod/web", "prod/api", 80, TCP));
    assert!(!allowed(&e, "prod/db", "prod/api", 80, TCP));
}

#[test]
fn match_expressions_in_not_in_exists_does_not_exist() {
    let cases = [
        (
            "{key: tier, operator: In, values: [frontend, edge]}",
            true,
            false,
        ),
        (
            "{key: tier, operator: NotIn, values: [frontend]}",
            false,
            true,
        ),
        ("{key: tier, operator: Exists}", true, false),
        ("{key: tier, operator: DoesNotExist}", false, true),
    ];
    for (expr, web, db) in cases {
        let e = engine(&policy(
            "p",
            "prod",
            &format!(
                "podSelector: {{matchLabels: {{app: api}}}}\ningress:\n- from:\n  - podSelector:\n      matchExpressions: [{expr}]"
            ),
        ));
        assert_eq!(
            allowed(&e, "prod/web", "prod/api", 80, TCP),
            web,
            "web with {expr}"
        );
        assert_eq!(
            allowed(&e, "prod/db", "prod/api", 80, TCP),
            db,
            "db with {expr}"
        );
    }
}

#[test]
fn match_labels_and_match_expressions_are_anded() {
    let e = engine(&policy(
        "p",
        "prod",
        "podSelector: {matchLabels: {app: api}}\ningress:\n- from:\n  - podSelector:\n      matchLabels: {app: web}\n      matchExpressions: [{key: tier, operator: In, values: [backend]}]",
    ));
    assert!(!allowed(&e, "prod/web", "prod/api", 80, TCP));
    assert!(allowed(
        &e,
        "prod:app=web,tier=backend",
        "prod/api",
        80,
        TCP
    ));
}

#[test]
fn the_namespace_name_label_is_implied_also_for_namespaces_without_an_object() {
    let e = engine(&policy(
        "p",
        "prod",
        "podSelector: {matchLabels: {app: api}}\ningress:\n- from:\n  - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: ops}}",
    ));
    assert!(allowed(&e, "ops/probe", "prod/api", 80, TCP));
    let e = engine(&policy(
        "p",
        "prod",
        "podSelector: {matchLabels: {app: api}}\ningress:\n- from:\n  - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: elsewhere}}",
    ));
    assert!(allowed(&e, "elsewhere:app=x", "prod/api", 80, TCP));
}

// --- ipBlock ---

#[test]
fn ip_blocks_with_except_ipv4() {
    let e = engine(&policy(
        "p",
        "prod",
        "podSelector: {matchLabels: {app: api}}\ningress:\n- from:\n  - ipBlock: {cidr: 203.0.113.0/24, except: [203.0.113.128/25]}",
    ));
    assert!(allowed(&e, "203.0.113.1", "prod/api", 80, TCP));
    assert!(!allowed(&e, "203.0.113.200", "prod/api", 80, TCP));
    assert!(!allowed(&e, "198.51.100.1", "prod/api", 80, TCP));
    assert!(
        !allowed(&e, "2001:db8::1", "prod/api", 80, TCP),
        "an IPv6 address is in no IPv4 block"
    );
}

#[test]
fn ip_blocks_with_except_ipv6() {
    let e = engine(&policy(
        "p",
        "prod",
        "podSelector: {matchLabels: {app: api}}\negress:\n- to:\n  - ipBlock: {cidr: '2001:db8::/32', except: ['2001:db8:bad::/48']}\npolicyTypes: [Egress]",
    ));
    assert!(allowed(&e, "prod/api", "2001:db8:1::1", 443, TCP));
    assert!(!allowed(&e, "prod/api", "2001:db8:bad::1", 443, TCP));
    assert!(!allowed(&e, "prod/api", "203.0.113.1", 443, TCP));
}

#[test]
fn ip_blocks_match_pod_ips_by_default_and_not_when_told_so() {
    let spec = policy(
        "p",
        "prod",
        "podSelector: {matchLabels: {app: api}}\ningress:\n- from:\n  - ipBlock: {cidr: 10.1.0.0/16}",
    );
    let calico = engine_with(
        &spec,
        EngineOptions {
            ipblock_matches_pods: true,
        },
    );
    let cilium = engine_with(
        &spec,
        EngineOptions {
            ipblock_matches_pods: false,
        },
    );
    assert!(allowed(&calico, "prod/web", "prod/api", 80, TCP));
    assert!(!allowed(&cilium, "prod/web", "prod/api", 80, TCP));
    // The address of a pod is that pod, in either mode.
    assert!(allowed(&calico, "10.1.0.1", "prod/api", 80, TCP));
    assert!(!allowed(&cilium, "10.1.0.1", "prod/api", 80, TCP));
    // An address no pod has is outside the cluster: matched in both modes.
    assert!(allowed(&cilium, "10.1.9.9", "prod/api", 80, TCP));
    let v = cilium.evaluate(&p("prod/web"), &p("prod/api"), 80, TCP);
    assert!(!v.ipblock_matches_pods);
    let json = serde_json::to_value(&v).unwrap();
    assert_eq!(json["ipblock_matches_pods"], false);
    assert!(
        v.ingress.near_misses[0].contains("--ipblock-matches-pods=false"),
        "{:?}",
        v.ingress.near_misses
    );
}

#[test]
fn ip_blocks_cannot_match_pods_without_an_ip_or_hypothetical_pods() {
    let e = engine(&policy(
        "p",
        "prod",
        "podSelector: {matchLabels: {app: api}}\ningress:\n- from:\n  - ipBlock: {cidr: 0.0.0.0/0}",
    ));
    assert!(allowed(&e, "prod/web", "prod/api", 80, TCP));
    assert!(!allowed(&e, "prod/db", "prod/api", 80, TCP), "db has no IP");
    assert!(
        !allowed(&e, "prod:app=web", "prod/api", 80, TCP),
        "a hypothetical pod has no IP"
    );
    let v = e.evaluate(&p("prod/db"), &p("prod/api"), 80, TCP);
    assert!(
        v.ingress.near_misses[0].contains("it has no IP"),
        "{:?}",
        v.ingress.near_misses
    );
}

#[test]
fn the_flow_family_follows_the_address_given() {
    // web has 10.1.0.1 and fd00::1: an IPv6 block matches when asked by
    // its IPv6 address, not for the pod's primary (IPv4) address.
    let e = engine(&policy(
        "p",
        "prod",
        "podSelector: {matchLabels: {app: api}}\ningress:\n- from:\n  - ipBlock: {cidr: 'fd00::/64'}",
    ));
    assert!(allowed(&e, "fd00::1", "prod/api", 80, TCP));
    assert!(!allowed(&e, "prod/web", "prod/api", 80, TCP));
    let v = e.evaluate(&p("fd00::1"), &p("prod/api"), 80, TCP);
    assert_eq!(v.source.kind, EndpointKind::Pod);
    assert_eq!(v.source.name.as_deref(), Some("web"));
    assert_eq!(
        v.destination.ip,
        Some("fd00::2".parse().unwrap()),
        "destination in the flow's family"
    );
}

// --- ports ---

#[test]
fn numeric_ports_default_to_tcp() {
    let e = engine(&policy(
        "p",
        "prod",
        "podSelector: {matchLabels: {app: api}}\ningress:\n- ports: [{port: 8080}]",
    ));
    assert!(allowed(&e, "prod/web", "prod/api", 8080, TCP));
    assert!(!allowed(&e, "prod/web", "prod/api", 8080, UDP));
    assert!(!allowed(&e, "prod/web", "prod/api", 8080, SCTP));
    assert!(!allowed(&e, "prod/web", "prod/api", 8081, TCP));
}

#[test]
fn end_port_ranges_are_inclusive() {
    let e = engine(&policy(
        "p",
        "prod",
        "podSelector: {matchLabels: {app: api}}\ningress:\n- ports: [{port: 8000, endPort: 8080, protocol: UDP}]",
    ));
    assert!(!allowed(&e, "prod/web", "prod/api", 7999, UDP));
    assert!(allowed(&e, "prod/web", "prod/api", 8000, UDP));
    assert!(allowed(&e, "prod/web", "prod/api", 8080, UDP));
    assert!(!allowed(&e, "prod/web", "prod/api", 8081, UDP));
    assert!(!allowed(&e, "prod/web", "prod/api", 8000, TCP));
}

#[test]
fn a_protocol_without_a_port_matches_every_port_of_that_protocol() {
    let e = engine(&policy(
        "p",
        "prod",
        "podSelector: {matchLabels: {app: api}}\ningress:\n- ports: [{protocol: SCTP}]",
    ));
    assert!(allowed(&e, "prod/web", "prod/api", 1, SCTP));
    assert!(allowed(&e, "prod/web", "prod/api", 3868, SCTP));
    assert!(!allowed(&e, "prod/web", "prod/api", 3868, TCP));
}

#[test]
fn named_ports_resolve_on_the_destination_pod_with_their_protocol() {
    let e = engine(&policy(
        "p",
        "prod",
        "podSelector: {matchLabels: {app: api}}\ningress:\n- ports:\n  - port: http\n  - {port: dns, protocol: UDP}\n  - {port: sig, protocol: SCTP}\n  - {port: metrics, protocol: UDP}",
    ));
    assert!(
        allowed(&e, "prod/web", "prod/api", 8080, TCP),
        "http = 8080/TCP (protocol defaults on both sides)"
    );
    assert!(!allowed(&e, "prod/web", "prod/api", 8080, UDP));
    assert!(allowed(&e, "prod/web", "prod/api", 53, UDP));
    assert!(allowed(&e, "prod/web", "prod/api", 3868, SCTP));
    assert!(
        !allowed(&e, "prod/web", "prod/api", 9090, TCP),
        "metrics is named for TCP; the rule asks for UDP"
    );
    assert!(!allowed(&e, "prod/web", "prod/api", 9090, UDP));
}

#[test]
fn a_named_port_that_resolves_to_nothing_matches_nothing() {
    let e = engine(&policy(
        "p",
        "prod",
        "podSelector: {}\ningress:\n- ports: [{port: http}]",
    ));
    assert!(allowed(&e, "prod/api", "prod/api", 8080, TCP));
    // web and db have no container port named http.
    assert!(!allowed(&e, "prod/api", "prod/web", 8080, TCP));
    assert!(
        !allowed(&e, "prod/api", "prod:app=new", 8080, TCP),
        "a hypothetical pod has no container ports"
    );
    let v = e.evaluate(&p("prod/api"), &p("prod/web"), 8080, TCP);
    assert!(
        v.ingress.near_misses[0].contains("no TCP container port named http"),
        "{:?}",
        v.ingress.near_misses
    );
}

#[test]
fn egress_named_ports_resolve_on_the_destination_and_never_on_addresses() {
    let e = engine(&policy(
        "p",
        "prod",
        "podSelector: {matchLabels: {app: web}}\npolicyTypes: [Egress]\negress:\n- ports: [{port: http}]",
    ));
    assert!(allowed(&e, "prod/web", "prod/api", 8080, TCP));
    assert!(!allowed(&e, "prod/web", "prod/api", 9090, TCP));
    assert!(!allowed(&e, "prod/web", "203.0.113.1", 8080, TCP));
}

// --- addresses outside the pod network ---

#[test]
fn external_addresses_are_judged_by_ip_blocks_only() {
    let e = engine(&policy(
        "p",
        "prod",
        "podSelector: {matchLabels: {app: web}}\npolicyTypes: [Ingress, Egress]\ningress:\n- from:\n  - namespaceSelector: {}\n  - podSelector: {}\negress:\n- to:\n  - namespaceSelector: {}\n  - ipBlock: {cidr: 198.51.100.0/24}",
    ));
    assert!(
        !allowed(&e, "192.0.2.10", "prod/web", 443, TCP),
        "selectors do not match a node or the world"
    );
    assert!(allowed(&e, "prod/web", "198.51.100.7", 443, TCP));
    assert!(!allowed(&e, "prod/web", "192.0.2.10", 443, TCP));
    let v = e.evaluate(&p("192.0.2.10"), &p("prod/web"), 443, TCP);
    assert_eq!(v.source.kind, EndpointKind::External);
    assert!(!v.egress.isolated, "an address has no policies");
}

#[test]
fn two_external_addresses_are_never_isolated() {
    let e = engine(&policy(
        "p",
        "prod",
        "podSelector: {}\npolicyTypes: [Ingress, Egress]",
    ));
    assert!(allowed(&e, "192.0.2.1", "192.0.2.2", 80, TCP));
}

// --- hypothetical pods ---

#[test]
fn hypothetical_pods_are_selected_by_policies_and_match_peers() {
    let e = engine(&format!(
        "{}{}",
        policy(
            "deny-frontends",
            "prod",
            "podSelector: {matchLabels: {tier: frontend}}\npolicyTypes: [Ingress, Egress]"
        ),
        policy(
            "api-from-web",
            "prod",
            "podSelector: {matchLabels: {app: api}}\ningress:\n- from:\n  - podSelector: {matchLabels: {app: web}}"
        )
    ));
    assert!(
        !allowed(&e, "prod:app=web,tier=frontend", "prod/api", 80, TCP),
        "egress isolated by deny-frontends"
    );
    assert!(allowed(&e, "prod:app=web", "prod/api", 80, TCP));
    assert!(!allowed(&e, "prod:app=other", "prod/api", 80, TCP));
    assert!(
        !allowed(&e, "prod/api", "prod:tier=frontend", 80, TCP),
        "ingress isolated by deny-frontends"
    );
    let v = e.evaluate(&p("prod:app=web,tier=frontend"), &p("prod/api"), 80, TCP);
    assert_eq!(v.source.kind, EndpointKind::Hypothetical);
    assert_eq!(v.source.name, None);
    assert_eq!(v.egress.denied_by, vec![r("prod", "deny-frontends")]);
}

// --- explanations ---

#[test]
fn near_misses_say_what_matched_and_what_did_not() {
    let e = engine(&policy(
        "allow-frontend",
        "prod",
        "podSelector: {matchLabels: {app: api}}\ningress:\n- from:\n  - podSelector: {matchLabels: {app: web, tier: frontend}}\n  ports: [{port: 80}, {port: 443}]\n- from:\n  - namespaceSelector: {matchLabels: {name: kube-system}}",
    ));
    let v = e.evaluate(&p("prod:app=web"), &p("prod/api"), 8080, TCP);
    assert_eq!(v.verdict, PolicyVerdict::Denied);
    let misses = &v.ingress.near_misses;
    assert_eq!(misses.len(), 2, "{misses:?}");
    assert_eq!(
        misses[0],
        "prod/allow-frontend ingress rule 1: peer podSelector {app: web, tier: frontend} does not match source labels {app: web} (missing tier=frontend); port 8080/TCP not in [80/TCP, 443/TCP]"
    );
    assert!(
        misses[1].contains("namespaceSelector {name: kube-system} matches no namespace (kube-system has kubernetes.io/metadata.name=kube-system)"),
        "{}",
        misses[1]
    );
    assert!(
        misses[1].ends_with("every port matches (no ports list)"),
        "{}",
        misses[1]
    );
    // A rule whose peer matches but port does not says so.
    let v = e.evaluate(&p("prod:app=web,tier=frontend"), &p("prod/api"), 8080, TCP);
    assert!(
        v.ingress.near_misses[0].contains(
            "peer podSelector {app: web, tier: frontend} matches the source; port 8080/TCP not in"
        ),
        "{:?}",
        v.ingress.near_misses
    );
}

#[test]
fn the_sentence_names_the_isolating_policies_and_the_flow() {
    let e = engine(&policy(
        "default-deny-all",
        "prod",
        "podSelector: {}\npolicyTypes: [Ingress]",
    ));
    let v = e.evaluate(&p("prod/web"), &p("prod/api"), 8080, TCP);
    assert_eq!(
        v.sentence(),
        "prod/default-deny-all isolates prod/api for ingress; no policy allows prod/web on 8080/TCP"
    );
    let e = engine(&format!(
        "{}{}",
        policy(
            "default-deny-all",
            "prod",
            "podSelector: {}\npolicyTypes: [Ingress, Egress]"
        ),
        policy(
            "web-out",
            "prod",
            "podSelector: {matchLabels: {app: web}}\npolicyTypes: [Egress]\negress: [{}]"
        )
    ));
    let v = e.evaluate(&p("prod/web"), &p("prod/api"), 8080, TCP);
    assert_eq!(v.egress.allowed_by, vec![r("prod", "web-out")]);
    let v = e.evaluate(&p("prod/api"), &p("prod/web"), 8080, TCP);
    assert_eq!(
        v.sentence(),
        "prod/default-deny-all isolates prod/web for ingress; no policy allows prod/api on 8080/TCP; and prod/default-deny-all isolates prod/api for egress; no policy allows egress to prod/web on 8080/TCP"
    );
    let e = engine(&policy(
        "api-in",
        "prod",
        "podSelector: {matchLabels: {app: api}}\ningress: [{}]",
    ));
    let v = e.evaluate(&p("prod/web"), &p("prod/api"), 8080, TCP);
    assert_eq!(
        v.sentence(),
        "prod/web -> prod/api on 8080/TCP is allowed: prod/web is not isolated for egress; ingress allowed by prod/api-in"
    );
}

#[test]
fn the_json_form_is_the_explain_contract() {
    let e = engine(&policy(
        "deny",
        "prod",
        "podSelector: {matchLabels: {app: api}}",
    ));
    let json = serde_json::to_value(e.evaluate(&p("10.1.0.1"), &p("prod/api"), 80, TCP)).unwrap();
    assert_eq!(json["verdict"], "DENIED");
    assert_eq!(
        json["source"],
        serde_json::json!({"kind": "pod", "namespace": "prod", "name": "web", "labels": {"app": "web", "tier": "frontend"}, "ip": "10.1.0.1"})
    );
    assert_eq!(json["destination"]["kind"], "pod");
    assert_eq!(json["ingress"]["isolated"], true);
    assert_eq!(json["ingress"]["verdict"], "DENIED");
    assert_eq!(
        json["ingress"]["denied_by"],
        serde_json::json!([{"namespace": "prod", "name": "deny"}])
    );
    assert_eq!(json["ingress"]["allowed_by"], serde_json::json!([]));
    assert!(json["ingress"]["near_misses"].is_array());
    assert_eq!(json["egress"]["verdict"], "ALLOWED");
    assert_eq!(json["egress"]["isolated"], false);
    assert_eq!(json["ipblock_matches_pods"], true);
    let json =
        serde_json::to_value(e.evaluate(&p("192.0.2.1"), &p("prod:app=x"), 80, TCP)).unwrap();
    assert_eq!(
        json["source"],
        serde_json::json!({"kind": "external", "labels": {}, "ip": "192.0.2.1"})
    );
    assert_eq!(
        json["destination"],
        serde_json::json!({"kind": "hypothetical", "namespace": "prod", "labels": {"app": "x"}, "ip": null})
    );
}

// --- errors ---

#[test]
fn unknown_pods_are_an_error_listing_the_namespace_pods() {
    let e = engine("");
    let err = e
        .try_evaluate(&p("prod/nope"), &p("prod/api"), 80, TCP)
        .unwrap_err();
    assert!(matches!(err, PolicyError::UnknownPod { .. }));
    let text = err.to_string();
    assert!(
        text.contains("prod/nope") && text.contains("pods in prod: api, db, web"),
        "{text}"
    );
}

#[test]
fn an_invalid_policy_in_a_live_snapshot_names_policy_and_field() {
    let mut snapshot = manifests::load_str("c.yaml", CLUSTER).unwrap();
    let np: k8s_openapi::api::networking::v1::NetworkPolicy = serde_yaml::from_str(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: prod}\nspec:\n  podSelector: {}\n  ingress:\n  - from:\n    - ipBlock: {cidr: 10.0.0.0/8, except: [192.168.0.0/16]}\n",
    )
    .unwrap();
    snapshot.network_policies.push(np);
    let err = PolicyEngine::new(&snapshot, EngineOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("NetworkPolicy prod/bad: field spec.ingress[0].from[0].ipBlock.except[0]:"),
        "{err}"
    );
    assert!(err.contains("not a strict subset"), "{err}");
}

#[test]
fn the_engine_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<PolicyEngine>();
    check::<netwatch::policy::VerdictCache>();
}
