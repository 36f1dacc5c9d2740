//! The tiers, one point each, on a small cluster written inline: Admin
//! (ClusterNetworkPolicy tier Admin, AdminNetworkPolicy) -> NetworkPolicy ->
//! Baseline (ClusterNetworkPolicy tier Baseline, BaselineAdminNetworkPolicy)
//! -> allowed; first match by priority and rule order; Pass; subjects and
//! peers; what explain, suggest, the matrix and the manifest loader say.

use std::process::Command;

use netwatch::manifests;
use netwatch::policy::{
    EngineOptions, Peer, PolicyEngine, PolicyKind, PolicyVerdict, Protocol, Tier, suggest,
};

const TCP: Protocol = Protocol::Tcp;
const UDP: Protocol = Protocol::Udp;

/// prod (team=shop): web 10.1.0.1, api 10.1.0.2 (port http 8080/TCP);
/// data (team=data): postgres 10.3.0.1; kube-system: coredns 10.0.0.10;
/// ops: node-exporter, a host-network pod on node-1 (192.168.0.1).
const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {team: shop}}
---
apiVersion: v1
kind: Namespace
metadata: {name: data, labels: {team: data}}
---
apiVersion: v1
kind: Namespace
metadata: {name: ops}
---
apiVersion: v1
kind: Node
metadata: {name: node-1, labels: {role: worker}}
status: {addresses: [{type: InternalIP, address: 192.168.0.1}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: prod, labels: {app: web}}
status: {podIP: 10.1.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: prod, labels: {app: api}}
spec:
  containers:
  - {name: api, image: api, ports: [{name: http, containerPort: 8080}]}
status: {podIP: 10.1.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: postgres, namespace: data, labels: {app: postgres}}
status: {podIP: 10.3.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
status: {podIP: 10.0.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: node-exporter, namespace: ops, labels: {app: node-exporter}}
spec: {hostNetwork: true, containers: [{name: x, image: x}]}
status: {podIP: 192.168.0.1}
"#;

fn snapshot(policies: &str) -> netwatch::cluster::ClusterSnapshot {
    manifests::load_str("test.yaml", &format!("{CLUSTER}\n---\n{policies}"))
        .unwrap_or_else(|e| panic!("{e}"))
}

fn engine(policies: &str) -> PolicyEngine {
    PolicyEngine::new(&snapshot(policies), EngineOptions::default()).unwrap()
}

fn p(s: &str) -> Peer {
    s.parse().unwrap()
}

fn cnp(name: &str, tier: &str, priority: u32, body: &str) -> String {
    let body: String = body.lines().map(|l| format!("  {l}\n")).collect();
    format!(
        "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n  tier: {tier}\n  priority: {priority}\n{body}---\n"
    )
}

fn np(name: &str, namespace: &str, spec: &str) -> String {
    let spec: String = spec.lines().map(|l| format!("  {l}\n")).collect();
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{spec}---\n"
    )
}

const PROD_TO_DATA_DENY: &str = "subject: {namespaces: {matchLabels: {team: shop}}}\negress:\n- {name: no-data, action: Deny, to: [{namespaces: {matchLabels: {team: data}}}]}";

#[test]
fn an_admin_deny_overrides_a_network_policy_that_allows() {
    let policies = format!(
        "{}{}",
        np(
            "web-to-db",
            "prod",
            "podSelector: {matchLabels: {app: web}}\npolicyTypes: [Egress]\negress: [{to: [{namespaceSelector: {}}]}]"
        ),
        cnp("sensitive", "Admin", 10, PROD_TO_DATA_DENY)
    );
    let e = engine(&policies);
    let v = e.evaluate(&p("prod/web"), &p("data/postgres"), 5432, TCP);
    assert_eq!(v.verdict, PolicyVerdict::Denied);
    assert_eq!(v.egress.decided_in, Some(Tier::Admin));
    let by = &v.egress.denied_by[0];
    assert_eq!(by.kind, PolicyKind::ClusterNetworkPolicy);
    assert_eq!(by.tier, Tier::Admin);
    assert_eq!(by.name, "sensitive");
    assert_eq!(by.rule.as_ref().unwrap().name.as_deref(), Some("no-data"));
    assert!(
        v.sentence().contains(
            "ClusterNetworkPolicy sensitive rule 1 \"no-data\" (Admin tier) denies egress"
        ),
        "{}",
        v.sentence()
    );
    // The NetworkPolicy still decides what the Admin tier does not touch.
    assert_eq!(
        e.decide(&p("prod/web"), &p("prod/api"), 8080, TCP),
        PolicyVerdict::Allowed
    );
    let json = serde_json::to_value(&v).unwrap();
    assert_eq!(
        json["egress"]["denied_by"],
        serde_json::json!([{"name": "sensitive", "kind": "ClusterNetworkPolicy", "tier": "Admin", "rule": {"index": 0, "name": "no-data"}}])
    );
}

#[test]
fn pass_skips_the_rest_of_the_admin_tier_and_the_network_policy_decides() {
    let policies = format!(
        "{}{}{}",
        cnp(
            "delegate-prod",
            "Admin",
            5,
            "subject: {namespaces: {matchLabels: {team: shop}}}\ningress:\n- {name: same-ns, action: Pass, from: [{namespaces: {matchLabels: {team: shop}}}]}"
        ),
        cnp(
            "lockdown",
            "Admin",
            50,
            "subject: {namespaces: {}}\ningress:\n- {name: all, action: Deny, from: [{namespaces: {}}]}"
        ),
        np(
            "default-deny",
            "prod",
            "podSelector: {}\npolicyTypes: [Ingress]"
        )
    );
    let e = engine(&policies);
    let v = e.evaluate(&p("prod/web"), &p("prod/api"), 8080, TCP);
    assert_eq!(v.verdict, PolicyVerdict::Denied);
    assert_eq!(v.ingress.decided_in, Some(Tier::NetworkPolicy));
    let steps: Vec<(Tier, &str)> = v
        .ingress
        .tiers
        .iter()
        .map(|s| (s.tier, s.outcome.as_str()))
        .collect();
    assert_eq!(
        steps,
        [(Tier::Admin, "PASS"), (Tier::NetworkPolicy, "DENY")]
    );
    assert_eq!(
        v.ingress.tiers[0].describe(),
        "Admin: PASS by ClusterNetworkPolicy delegate-prod rule 1 \"same-ns\""
    );
    // From another namespace the Pass does not match: the lockdown decides.
    let v = e.evaluate(&p("data/postgres"), &p("prod/api"), 8080, TCP);
    assert_eq!(v.ingress.denied_by[0].name, "lockdown");
    assert_eq!(v.ingress.decided_in, Some(Tier::Admin));
    // A host-network pod is no namespaces peer: the lockdown does not see
    // it, and the NetworkPolicy decides.
    let v = e.evaluate(&p("ops/node-exporter"), &p("prod/api"), 8080, TCP);
    assert_eq!(v.ingress.denied_by[0].name, "default-deny");
}

#[test]
fn the_baseline_tier_decides_only_for_what_network_policies_leave_alone() {
    let banp = "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: BaselineAdminNetworkPolicy\nmetadata: {name: default}\nspec:\n  subject: {namespaces: {matchLabels: {team: shop}}}\n  egress:\n  - {name: dns, action: Allow, to: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: kube-system}}}], ports: [{portNumber: {protocol: UDP, port: 53}}]}\n  - {name: default-deny, action: Deny, to: [{networks: [0.0.0.0/0]}]}\n---\n";
    let e = engine(banp);
    let dns = e.evaluate(&p("prod/web"), &p("kube-system/coredns"), 53, UDP);
    assert_eq!(dns.verdict, PolicyVerdict::Allowed);
    assert_eq!(dns.egress.decided_in, Some(Tier::Baseline));
    assert_eq!(
        dns.egress.allowed_by[0].kind,
        PolicyKind::BaselineAdminNetworkPolicy
    );
    let v = e.evaluate(&p("prod/web"), &p("prod/api"), 8080, TCP);
    assert_eq!(v.verdict, PolicyVerdict::Denied);
    assert_eq!(v.egress.denied_by[0].rule.as_ref().unwrap().index, 1);
    // A NetworkPolicy that isolates web for egress takes over from the baseline.
    let e = engine(&format!(
        "{banp}{}",
        np(
            "web-out",
            "prod",
            "podSelector: {matchLabels: {app: web}}\npolicyTypes: [Egress]\negress: [{to: [{podSelector: {matchLabels: {app: api}}}]}]"
        )
    ));
    assert_eq!(
        e.decide(&p("prod/web"), &p("prod/api"), 8080, TCP),
        PolicyVerdict::Allowed
    );
    // ...and then denies the DNS the baseline allowed: NetworkPolicy comes first.
    assert_eq!(
        e.decide(&p("prod/web"), &p("kube-system/coredns"), 53, UDP),
        PolicyVerdict::Denied
    );
}

#[test]
fn the_lowest_priority_number_wins_then_rules_in_written_order() {
    let accept = "subject: {namespaces: {matchLabels: {team: shop}}}\negress:\n- {action: Accept, to: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: postgres}}}}]}";
    let deny = PROD_TO_DATA_DENY;
    let e = engine(&format!(
        "{}{}",
        cnp("a", "Admin", 10, accept),
        cnp("b", "Admin", 20, deny)
    ));
    assert_eq!(
        e.decide(&p("prod/web"), &p("data/postgres"), 5432, TCP),
        PolicyVerdict::Allowed
    );
    let e = engine(&format!(
        "{}{}",
        cnp("a", "Admin", 30, accept),
        cnp("b", "Admin", 20, deny)
    ));
    assert_eq!(
        e.decide(&p("prod/web"), &p("data/postgres"), 5432, TCP),
        PolicyVerdict::Denied
    );
    let both = "subject: {namespaces: {}}\negress:\n- {name: first, action: Deny, to: [{namespaces: {matchLabels: {team: data}}}]}\n- {name: second, action: Accept, to: [{namespaces: {}}]}";
    let v = engine(&cnp("ordered", "Admin", 1, both)).evaluate(
        &p("prod/web"),
        &p("data/postgres"),
        5432,
        TCP,
    );
    assert_eq!(v.verdict, PolicyVerdict::Denied);
    assert_eq!(
        v.egress.denied_by[0].rule.as_ref().unwrap().name.as_deref(),
        Some("first")
    );
}

#[test]
fn a_policy_without_rules_in_a_direction_does_not_isolate_it() {
    let e = engine(&cnp(
        "egress-only",
        "Admin",
        1,
        "subject: {namespaces: {}}\negress:\n- {action: Accept, to: [{namespaces: {matchLabels: {team: data}}}]}",
    ));
    let v = e.evaluate(&p("data/postgres"), &p("prod/api"), 8080, TCP);
    assert_eq!(v.verdict, PolicyVerdict::Allowed);
    assert_eq!(v.ingress.decided_in, None);
    assert!(!v.ingress.isolated);
}

#[test]
fn host_network_pods_are_never_subjects_nor_pod_peers_but_node_peers_match_them() {
    let e = engine(&cnp(
        "everything",
        "Admin",
        1,
        "subject: {namespaces: {}}\ningress:\n- {action: Deny, from: [{namespaces: {}}]}\negress:\n- {action: Deny, to: [{namespaces: {}}]}",
    ));
    // Not a subject: its egress is untouched; not a namespaces peer either.
    assert_eq!(
        e.decide(&p("ops/node-exporter"), &p("ops/node-exporter"), 1, TCP),
        PolicyVerdict::Allowed
    );
    let v = e.evaluate(&p("ops/node-exporter"), &p("prod/api"), 8080, TCP);
    assert_eq!(v.egress.verdict, PolicyVerdict::Allowed);
    assert_eq!(
        v.ingress.verdict,
        PolicyVerdict::Allowed,
        "{}",
        v.sentence()
    );
    assert_eq!(
        e.decide(&p("prod/web"), &p("ops/node-exporter"), 9100, TCP),
        PolicyVerdict::Allowed
    );
    let e = engine(&cnp(
        "no-nodes",
        "Admin",
        1,
        "subject: {namespaces: {}}\negress:\n- {action: Deny, to: [{nodes: {matchLabels: {role: worker}}}]}",
    ));
    assert_eq!(
        e.decide(&p("prod/web"), &p("ops/node-exporter"), 9100, TCP),
        PolicyVerdict::Denied
    );
    assert_eq!(
        e.decide(&p("prod/web"), &p("192.168.0.1"), 22, TCP),
        PolicyVerdict::Denied
    );
    assert_eq!(
        e.decide(&p("prod/web"), &p("192.168.0.2"), 22, TCP),
        PolicyVerdict::Allowed
    );
}

#[test]
fn networks_match_pod_addresses_whatever_the_ip_block_setting() {
    let policies = cnp(
        "no-10-3",
        "Admin",
        1,
        "subject: {namespaces: {}}\negress:\n- {action: Deny, to: [{networks: [10.3.0.0/16]}]}",
    );
    for ipblock_matches_pods in [true, false] {
        let e = PolicyEngine::new(
            &snapshot(&policies),
            EngineOptions {
                ipblock_matches_pods,
            },
        )
        .unwrap();
        assert_eq!(
            e.decide(&p("prod/web"), &p("data/postgres"), 5432, TCP),
            PolicyVerdict::Denied
        );
        assert_eq!(
            e.decide(&p("prod/web"), &p("prod/api"), 8080, TCP),
            PolicyVerdict::Allowed
        );
    }
}

#[test]
fn named_ports_resolve_on_the_destination_pod() {
    let e = engine(&cnp(
        "http-only",
        "Admin",
        1,
        "subject: {namespaces: {}}\ningress:\n- {action: Accept, from: [{namespaces: {}}], protocols: [{destinationNamedPort: http}]}\n- {action: Deny, from: [{namespaces: {}}]}",
    ));
    assert_eq!(
        e.decide(&p("prod/web"), &p("prod/api"), 8080, TCP),
        PolicyVerdict::Allowed
    );
    assert_eq!(
        e.decide(&p("prod/web"), &p("prod/api"), 8081, TCP),
        PolicyVerdict::Denied
    );
    assert_eq!(
        e.decide(&p("prod/web"), &p("prod/api"), 8080, UDP),
        PolicyVerdict::Denied
    );
    let v = e.evaluate(&p("prod/web"), &p("data/postgres"), 8080, TCP);
    assert!(
        v.ingress
            .near_misses
            .iter()
            .any(|m| m.contains("no TCP container port named http")),
        "{:?}",
        v.ingress.near_misses
    );
}

#[test]
fn equal_priorities_that_overlap_are_reported_not_guessed_silently() {
    let anp = "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: AdminNetworkPolicy\nmetadata: {name: anp-allow}\nspec:\n  priority: 7\n  subject: {namespaces: {}}\n  egress: [{name: all, action: Allow, to: [{namespaces: {}}]}]\n---\n";
    let e = engine(&format!(
        "{anp}{}",
        cnp("cnp-deny", "Admin", 7, PROD_TO_DATA_DENY)
    ));
    let v = e.evaluate(&p("prod/web"), &p("data/postgres"), 5432, TCP);
    let step = &v.egress.tiers[0];
    assert_eq!(step.undefined_order_with.len(), 1, "{step:?}");
    assert!(
        step.describe().contains("UNDEFINED ORDER"),
        "{}",
        step.describe()
    );
    let json = serde_json::to_value(&v).unwrap();
    assert!(
        json["egress"]["tiers"][0]["undefined_order_with"].is_array(),
        "{json}"
    );
    // Same action: no ambiguity in the verdict, nothing to report.
    let v = e.evaluate(&p("prod/web"), &p("prod/api"), 8080, TCP);
    assert!(v.egress.tiers[0].undefined_order_with.is_empty());
}

#[test]
fn domain_names_match_nothing_and_say_so() {
    let e = engine(&cnp(
        "allow-github",
        "Baseline",
        1,
        "subject: {namespaces: {}}\negress:\n- {action: Accept, to: [{domainNames: ['*.github.com']}]}\n- {action: Deny, to: [{networks: [0.0.0.0/0]}]}",
    ));
    let v = e.evaluate(&p("prod/web"), &p("140.82.112.3"), 443, TCP);
    assert_eq!(v.verdict, PolicyVerdict::Denied);
    assert!(
        v.egress
            .near_misses
            .iter()
            .any(|m| m.contains("is not evaluated")),
        "{:?}",
        v.egress.near_misses
    );
}

#[test]
fn invalid_cluster_policies_name_file_document_and_field() {
    let bad = cnp(
        "bad",
        "Admin",
        1,
        "subject: {namespaces: {}}\negress:\n- {action: Deny, to: [{networks: [10.0.0.0/8], nodes: {}}]}",
    );
    let err = manifests::load_str("policies.yaml", &bad)
        .unwrap_err()
        .to_string();
    assert!(err.contains("policies.yaml: document 1"), "{err}");
    assert!(err.contains("ClusterNetworkPolicy bad"), "{err}");
    assert!(err.contains("field spec.egress[0].to[0]"), "{err}");
    let banp = "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: BaselineAdminNetworkPolicy\nmetadata: {name: mine}\nspec: {subject: {namespaces: {}}}\n";
    let err = manifests::load_str("b.yaml", banp).unwrap_err().to_string();
    assert!(
        err.contains("field metadata.name") && err.contains("default"),
        "{err}"
    );
    let wrong_version = "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: ClusterNetworkPolicy\nmetadata: {name: x}\nspec: {}\n";
    let err = manifests::load_str("c.yaml", wrong_version)
        .unwrap_err()
        .to_string();
    assert!(err.contains("v1alpha2"), "{err}");
}

#[test]
fn suggest_overrides_an_admin_deny_above_it_and_proves_it() {
    let cluster = snapshot(&cnp("sensitive", "Admin", 10, PROD_TO_DATA_DENY));
    let e = PolicyEngine::new(&cluster, EngineOptions::default()).unwrap();
    let s = suggest(&e, &cluster, &p("prod/web"), &p("data/postgres"), 5432, TCP).unwrap();
    assert!(
        s.policies.is_empty(),
        "a NetworkPolicy cannot override the Admin tier"
    );
    assert_eq!(s.cluster_network_policies.len(), 1);
    let yaml = s.to_yaml();
    assert!(yaml.contains("priority: 9"), "{yaml}");
    assert!(yaml.contains("action: Pass"), "{yaml}");
    let mut applied = cluster.clone();
    applied.cluster_network_policies.extend(
        manifests::load_str("s.yaml", &yaml)
            .unwrap()
            .cluster_network_policies,
    );
    let after = PolicyEngine::new(&applied, EngineOptions::default()).unwrap();
    assert_eq!(
        after.decide(&p("prod/web"), &p("data/postgres"), 5432, TCP),
        PolicyVerdict::Allowed
    );
    // Only that workload pair and port.
    assert_eq!(
        after.decide(&p("prod/api"), &p("data/postgres"), 5432, TCP),
        PolicyVerdict::Denied
    );
    assert_eq!(
        after.decide(&p("prod/web"), &p("data/postgres"), 5433, TCP),
        PolicyVerdict::Denied
    );
}

#[test]
fn suggest_answers_a_baseline_deny_with_a_network_policy() {
    let cluster = snapshot(&cnp(
        "default-deny",
        "Baseline",
        100,
        "subject: {namespaces: {}}\ningress:\n- {action: Deny, from: [{namespaces: {}}]}",
    ));
    let e = PolicyEngine::new(&cluster, EngineOptions::default()).unwrap();
    let s = suggest(&e, &cluster, &p("prod/web"), &p("prod/api"), 8080, TCP).unwrap();
    assert_eq!(s.policies.len(), 1);
    assert!(s.cluster_network_policies.is_empty());
    assert!(
        s.notes.iter().any(|n| n.contains("Baseline tier")),
        "{:?}",
        s.notes
    );
}

#[test]
fn the_matrix_json_mixes_every_kind_in_the_same_row_format() {
    let dir = tempfile::tempdir().unwrap();
    let policies = format!(
        "{}{}apiVersion: policy.networking.k8s.io/v1alpha1\nkind: BaselineAdminNetworkPolicy\nmetadata: {{name: default}}\nspec:\n  subject: {{namespaces: {{}}}}\n  ingress: [{{action: Deny, from: [{{namespaces: {{matchLabels: {{team: data}}}}}}]}}]\n---\n{}",
        cnp("sensitive", "Admin", 10, PROD_TO_DATA_DENY),
        np(
            "api-in",
            "prod",
            "podSelector: {matchLabels: {app: api}}\ningress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]"
        ),
        "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: AdminNetworkPolicy\nmetadata: {name: ops-pass}\nspec:\n  priority: 3\n  subject: {namespaces: {matchLabels: {kubernetes.io/metadata.name: ops}}}\n  egress: [{action: Pass, to: [{networks: ['0.0.0.0/0']}]}]\n"
    );
    std::fs::write(dir.path().join("cluster.yaml"), CLUSTER).unwrap();
    std::fs::write(dir.path().join("policies.yaml"), &policies).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_netwatch"))
        .args(["explain", "--manifests"])
        .arg(dir.path())
        .args([
            "--matrix",
            "--ports",
            "5432,8080",
            "--protocols",
            "TCP,UDP",
            "-o",
            "json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    let e = engine(&policies);
    let pods = e.pods().len();
    assert_eq!(rows.len(), 2 * 2 * pods * (pods - 1));
    for row in rows {
        let keys: Vec<&str> = row
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys.len(), 5, "{row}");
        let want = e.decide(
            &p(row["from"].as_str().unwrap()),
            &p(row["to"].as_str().unwrap()),
            row["port"].as_u64().unwrap() as u16,
            row["protocol"].as_str().unwrap().parse().unwrap(),
        );
        assert_eq!(row["verdict"], want.as_str(), "{row}");
    }
    let cell = |from: &str, to: &str, port: u64| {
        rows.iter()
            .find(|r| {
                r["from"] == from && r["to"] == to && r["port"] == port && r["protocol"] == "TCP"
            })
            .unwrap()["verdict"]
            .clone()
    };
    assert_eq!(cell("prod/web", "data/postgres", 5432), "DENIED"); // Admin Deny
    assert_eq!(cell("data/postgres", "prod/web", 8080), "DENIED"); // Baseline Deny
    assert_eq!(cell("prod/web", "prod/api", 8080), "ALLOWED"); // NetworkPolicy
    assert_eq!(cell("data/postgres", "prod/api", 8080), "DENIED"); // NetworkPolicy isolates api
}

#[test]
fn lint_finds_the_mistakes_that_only_show_when_tiers_combine() {
    use netwatch::policy::{LintCheck, lint};
    let policies = format!(
        "{}{}{}{}{}",
        np(
            "web-to-db",
            "prod",
            "podSelector: {matchLabels: {app: web}}\npolicyTypes: [Egress]\negress: [{to: [{namespaceSelector: {}}], ports: [{port: 5432}]}]"
        ),
        cnp("sensitive", "Admin", 10, PROD_TO_DATA_DENY),
        cnp(
            "same-priority",
            "Admin",
            10,
            "subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: api}}}}\negress:\n- {action: Accept, to: [{namespaces: {}}]}"
        ),
        cnp(
            "useless-pass",
            "Baseline",
            1,
            "subject: {namespaces: {matchLabels: {team: shop}}}\ningress:\n- {name: pass-ops, action: Pass, from: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: data}}}]}"
        ),
        cnp(
            "typo",
            "Admin",
            500,
            "subject: {namespaces: {matchLabels: {team: shopp}}}\negress:\n- {action: Deny, to: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: nope}}}}]}"
        ),
    );
    let findings = lint(&snapshot(&policies));
    let of = |check: LintCheck| -> Vec<String> {
        findings
            .iter()
            .filter(|f| f.check == check)
            .map(|f| {
                format!(
                    "{}: {}",
                    f.policy
                        .as_ref()
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                    f.message
                )
            })
            .collect()
    };
    let shadow = of(LintCheck::ClusterDenyShadowsNetworkPolicy);
    assert_eq!(shadow.len(), 1, "{findings:#?}");
    assert!(
        shadow[0].contains("sensitive") && shadow[0].contains("prod/web-to-db"),
        "{shadow:?}"
    );
    let order = of(LintCheck::UndefinedPriorityOrder);
    assert_eq!(order.len(), 1, "{findings:#?}");
    assert!(order[0].contains("prod/api"), "{order:?}");
    let pass = of(LintCheck::PassChangesNothing);
    assert_eq!(pass.len(), 1, "{findings:#?}");
    assert!(pass[0].contains("useless-pass"), "{pass:?}");
    let nothing = of(LintCheck::ClusterSelectorMatchesNothing);
    assert!(
        nothing
            .iter()
            .any(|m| m.contains("typo") && m.contains("matches no namespace")),
        "{nothing:?}"
    );
    assert!(
        nothing
            .iter()
            .any(|m| m.contains("typo") && m.contains("selects no pod")),
        "{nothing:?}"
    );
    // The clean parts of the manifests raise nothing of these kinds.
    assert!(!format!("{findings:?}").contains("web-to-db\" has no effect"));
}
