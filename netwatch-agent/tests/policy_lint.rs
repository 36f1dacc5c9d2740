//! `lint`: each check finds its mistake, stays quiet on the correct form,
//! and says how to fix it.

use netwatch::manifests;
use netwatch::policy::{Finding, LintCheck, LintOptions, Severity, lint, lint_with};

/// An application namespace with a Deployment (no Pods: as repositories
/// keep it), a Pod with ports, and cluster DNS.
const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: shop}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: web, ports: [{name: http, containerPort: 8080}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: api-0, namespace: shop, labels: {app: api}}
spec:
  containers: [{name: api, image: api, ports: [{name: grpc, containerPort: 9000}]}]
status: {podIP: 10.244.1.5}
---
apiVersion: v1
kind: Pod
metadata: {name: coredns-1, namespace: kube-system, labels: {k8s-app: kube-dns}}
status: {podIP: 10.244.0.10}
"#;

fn findings_with(policies: &str, options: &LintOptions) -> Vec<Finding> {
    let snapshot = manifests::load_str("m.yaml", &format!("{BASE}---\n{policies}")).unwrap();
    lint_with(&snapshot, options)
}

fn findings(policies: &str) -> Vec<Finding> {
    findings_with(policies, &LintOptions::default())
}

fn of(findings: &[Finding], check: LintCheck) -> Vec<&Finding> {
    findings.iter().filter(|f| f.check == check).collect()
}

fn policy(name: &str, spec: &str) -> String {
    let spec: String = spec.lines().map(|l| format!("  {l}\n")).collect();
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n{spec}---\n"
    )
}

const DNS_RULE: &str = "- to:\n  - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}\n    podSelector: {matchLabels: {k8s-app: kube-dns}}\n  ports: [{port: 53, protocol: UDP}, {port: 53, protocol: TCP}]";

#[test]
fn clean_manifests_have_no_findings() {
    let f = findings(&format!(
        "{}{}",
        policy(
            "default-deny",
            &format!("podSelector: {{}}\npolicyTypes: [Ingress, Egress]\negress:\n{DNS_RULE}")
        ),
        policy(
            "api-from-web",
            "podSelector: {matchLabels: {app: api}}\ningress:\n- from: [{podSelector: {matchLabels: {app: web}}}]\n  ports: [{port: grpc}]"
        )
    ));
    assert!(f.is_empty(), "{f:#?}");
    assert!(lint(&manifests::load_str("m.yaml", BASE).unwrap()).is_empty());
}

#[test]
fn default_deny_egress_without_dns_is_an_error() {
    let f = findings(&policy(
        "default-deny-egress",
        "podSelector: {}\npolicyTypes: [Egress]",
    ));
    let dns = of(&f, LintCheck::DnsEgress);
    assert_eq!(dns.len(), 1, "{f:#?}");
    assert_eq!(dns[0].severity, Severity::Error);
    assert_eq!(
        dns[0].policy.as_ref().unwrap().to_string(),
        "shop/default-deny-egress"
    );
    assert!(
        dns[0].message.contains("shop/api-0")
            && dns[0].message.contains("shop/deployment/web (template)"),
        "{}",
        dns[0].message
    );
    assert!(
        dns[0].message.contains("53/UDP and 53/TCP"),
        "{}",
        dns[0].message
    );
    assert!(
        dns[0]
            .fix
            .contains("kubernetes.io/metadata.name: kube-system")
            && dns[0].fix.contains("protocol: TCP, port: 53"),
        "{}",
        dns[0].fix
    );
}

#[test]
fn dns_over_udp_only_is_reported_for_tcp() {
    let rule = DNS_RULE.replace(", {port: 53, protocol: TCP}", "");
    let f = findings(&policy(
        "p",
        &format!("podSelector: {{}}\npolicyTypes: [Egress]\negress:\n{rule}"),
    ));
    let dns = of(&f, LintCheck::DnsEgress);
    assert_eq!(dns.len(), 1, "{f:#?}");
    assert!(
        dns[0].message.contains("53/TCP") && !dns[0].message.contains("53/UDP"),
        "{}",
        dns[0].message
    );
    assert!(
        dns[0].message.contains("DNS falls back to TCP"),
        "{}",
        dns[0].message
    );
}

#[test]
fn dns_allowed_by_an_ip_block_depends_on_the_cni_setting() {
    let p = policy(
        "p",
        "podSelector: {}\npolicyTypes: [Egress]\negress:\n- to: [{ipBlock: {cidr: 10.244.0.10/32}}]\n  ports: [{port: 53, protocol: UDP}, {port: 53, protocol: TCP}]",
    );
    let calico = findings(&p);
    assert!(of(&calico, LintCheck::DnsEgress).is_empty(), "{calico:#?}");
    let cilium = findings_with(
        &p,
        &LintOptions {
            ipblock_matches_pods: false,
            ..LintOptions::default()
        },
    );
    assert_eq!(of(&cilium, LintCheck::DnsEgress).len(), 1, "{cilium:#?}");
}

#[test]
fn namespace_selectors_on_missing_labels_are_found_with_the_name_label_hint() {
    let f = findings(&policy(
        "from-system",
        "podSelector: {matchLabels: {app: api}}\ningress:\n- from: [{namespaceSelector: {matchLabels: {name: kube-system}}}]",
    ));
    let ns = of(&f, LintCheck::NamespaceSelectorMatchesNothing);
    assert_eq!(ns.len(), 1, "{f:#?}");
    assert_eq!(ns[0].severity, Severity::Error);
    assert!(ns[0].message.contains("namespaceSelector {name: kube-system} matches no namespace (kube-system has kubernetes.io/metadata.name=kube-system)"), "{}", ns[0].message);
    assert!(
        ns[0].fix.contains("kubernetes.io/metadata.name: NAME"),
        "{}",
        ns[0].fix
    );
    // Its only rule can never match: the policy just isolates.
    assert_eq!(of(&f, LintCheck::AllowsNothing).len(), 1, "{f:#?}");

    let f = findings(&policy(
        "from-payments",
        "podSelector: {matchLabels: {app: api}}\ningress:\n- from: [{namespaceSelector: {matchLabels: {team: payments}}}]",
    ));
    let ns = of(&f, LintCheck::NamespaceSelectorMatchesNothing);
    assert_eq!(
        ns[0].severity,
        Severity::Warning,
        "no namespace named like the value: maybe just not in these manifests"
    );
    let f = findings(&policy(
        "from-shop",
        "podSelector: {matchLabels: {app: api}}\ningress:\n- from: [{namespaceSelector: {matchLabels: {team: shop}}}]",
    ));
    assert!(f.is_empty(), "{f:#?}");
}

#[test]
fn pod_selectors_that_select_nothing_are_found_counting_workload_templates() {
    let f = findings(&policy("typo", "podSelector: {matchLabels: {app: wbe}}"));
    let p = of(&f, LintCheck::PodSelectorMatchesNothing);
    assert_eq!(p.len(), 1, "{f:#?}");
    assert!(
        p[0].message
            .contains("spec.podSelector {app: wbe} selects no pod in shop"),
        "{}",
        p[0].message
    );
    assert!(
        p[0].fix.contains("{app: web}") && p[0].fix.contains("{app: api}"),
        "{}",
        p[0].fix
    );
    // The Deployment's template is a pod for this purpose.
    assert!(findings(&policy("web", "podSelector: {matchLabels: {app: web}}")).is_empty());
    // A namespace with no pods in the manifests is not judged.
    let text = format!(
        "{BASE}---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: empty}}\nspec: {{podSelector: {{matchLabels: {{app: x}}}}}}\n"
    );
    assert!(lint(&manifests::load_str("m.yaml", &text).unwrap()).is_empty());
}

#[test]
fn peer_selectors_that_match_no_pod_are_found() {
    let f = findings(&policy(
        "p",
        "podSelector: {matchLabels: {app: api}}\ningress:\n- from: [{podSelector: {matchLabels: {app: frontend}}}]",
    ));
    let p = of(&f, LintCheck::PeerSelectorMatchesNothing);
    assert_eq!(p.len(), 1, "{f:#?}");
    assert!(
        p[0].message
            .contains("ingress rule 1, peer 1: podSelector {app: frontend} matches no pod in shop"),
        "{}",
        p[0].message
    );
    assert_eq!(of(&f, LintCheck::AllowsNothing).len(), 1);
}

#[test]
fn named_ports_no_pod_defines_are_found() {
    let f = findings(&policy(
        "p",
        "podSelector: {matchLabels: {app: api}}\ningress:\n- ports: [{port: http}]",
    ));
    let p = of(&f, LintCheck::NamedPortUndefined);
    assert_eq!(p.len(), 1, "{f:#?}");
    assert!(
        p[0].message
            .contains("no pod this policy selects has a TCP container port named http"),
        "{}",
        p[0].message
    );
    // Right name, wrong protocol.
    let f = findings(&policy(
        "p",
        "podSelector: {matchLabels: {app: api}}\ningress:\n- ports: [{port: grpc, protocol: UDP}]",
    ));
    assert_eq!(of(&f, LintCheck::NamedPortUndefined).len(), 1, "{f:#?}");
    // Egress: resolved on the destinations the rule picks.
    let ok = findings(&policy(
        "p",
        &format!(
            "podSelector: {{matchLabels: {{app: web}}}}\npolicyTypes: [Egress]\negress:\n{DNS_RULE}\n- to: [{{podSelector: {{matchLabels: {{app: api}}}}}}]\n  ports: [{{port: grpc}}]"
        ),
    ));
    assert!(ok.is_empty(), "{ok:#?}");
    let bad = findings(&policy(
        "p",
        &format!(
            "podSelector: {{matchLabels: {{app: web}}}}\npolicyTypes: [Egress]\negress:\n{DNS_RULE}\n- to: [{{podSelector: {{matchLabels: {{app: api}}}}}}]\n  ports: [{{port: http}}]"
        ),
    ));
    assert_eq!(of(&bad, LintCheck::NamedPortUndefined).len(), 1, "{bad:#?}");
    let blocks = findings(&policy(
        "p",
        &format!(
            "podSelector: {{matchLabels: {{app: web}}}}\npolicyTypes: [Egress]\negress:\n{DNS_RULE}\n- to: [{{ipBlock: {{cidr: 203.0.113.0/24}}}}]\n  ports: [{{port: https}}]"
        ),
    ));
    let p = of(&blocks, LintCheck::NamedPortUndefined);
    assert!(
        p[0].message.contains("peers are all ipBlocks"),
        "{}",
        p[0].message
    );
}

#[test]
fn rules_in_a_direction_policy_types_leave_out_are_found() {
    let f = findings(&policy(
        "p",
        "podSelector: {matchLabels: {app: api}}\npolicyTypes: [Ingress]\ningress: [{}]\negress:\n- to: [{podSelector: {}}]",
    ));
    let p = of(&f, LintCheck::RulesIgnoredByPolicyTypes);
    assert_eq!(p.len(), 1, "{f:#?}");
    assert!(
        p[0].message
            .contains("egress rule(s) do nothing: policyTypes lists only Ingress"),
        "{}",
        p[0].message
    );
    assert!(
        p[0].fix.contains("add Egress to spec.policyTypes"),
        "{}",
        p[0].fix
    );
}

#[test]
fn a_default_deny_without_rules_is_not_a_policy_that_allows_nothing_by_mistake() {
    let f = findings(&policy("deny", "podSelector: {matchLabels: {app: api}}"));
    assert!(of(&f, LintCheck::AllowsNothing).is_empty(), "{f:#?}");
}

#[test]
fn ip_blocks_covering_pods_nodes_or_services_are_found() {
    let extra = "apiVersion: v1\nkind: Node\nmetadata: {name: node-1}\nspec: {podCIDR: 10.244.1.0/24}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop}\nspec: {clusterIP: 10.96.0.20}\n---\n";
    let f = findings(&format!(
        "{extra}{}",
        policy(
            "p",
            "podSelector: {matchLabels: {app: api}}\ningress:\n- from: [{ipBlock: {cidr: 10.0.0.0/8}}]"
        )
    ));
    let p = of(&f, LintCheck::IpBlockCoversCluster);
    assert_eq!(p.len(), 1, "{f:#?}");
    let m = &p[0].message;
    assert!(
        m.contains("pod IPs (") && m.contains("shop/api-0 10.244.1.5"),
        "{m}"
    );
    assert!(m.contains("node pod CIDRs (node-1 10.244.1.0/24)"), "{m}");
    assert!(m.contains("service IPs (shop/api 10.96.0.20"), "{m}");
    assert!(m.contains("Calico: yes, Cilium: no"), "{m}");
    // Excepting the cluster ranges, or an outside range, is fine.
    let f = findings(&format!(
        "{extra}{}",
        policy(
            "p",
            "podSelector: {matchLabels: {app: api}}\ningress:\n- from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.244.0.0/16, 10.96.0.0/12]}}]"
        )
    ));
    assert!(of(&f, LintCheck::IpBlockCoversCluster).is_empty(), "{f:#?}");
    let f = findings(&format!(
        "{extra}{}",
        policy(
            "p",
            "podSelector: {matchLabels: {app: api}}\ningress:\n- from: [{ipBlock: {cidr: 203.0.113.0/24}}]"
        )
    ));
    assert!(f.is_empty(), "{f:#?}");
}

#[test]
fn invalid_policies_in_a_live_snapshot_are_findings() {
    let mut snapshot = manifests::load_str("m.yaml", BASE).unwrap();
    snapshot.network_policies.push(
        serde_yaml::from_str("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: shop}\nspec:\n  podSelector: {matchExpressions: [{key: app, operator: Equals, values: [a]}]}\n").unwrap(),
    );
    let f = lint(&snapshot);
    let p = of(&f, LintCheck::InvalidPolicy);
    assert_eq!(p.len(), 1, "{f:#?}");
    assert!(
        p[0].message
            .contains("spec.podSelector.matchExpressions[0].operator"),
        "{}",
        p[0].message
    );
}
