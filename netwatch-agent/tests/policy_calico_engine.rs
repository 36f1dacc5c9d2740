//! Calico's tiers inside the policy engine, loaded the way `--manifests`
//! loads them: tier order, Pass, end-of-tier deny and defaultAction, equal
//! orders, Kubernetes NetworkPolicies at order 1000 of the default tier,
//! the cluster policies in kube-admin, staged policies, the profile.

use netwatch::manifests;
use netwatch::policy::{
    EngineOptions, Outcome, Peer, PolicyEngine, PolicyKind, PolicyVerdict, Protocol, Tier,
};

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {team: a}}
---
apiVersion: v1
kind: Namespace
metadata: {name: dev, labels: {team: b}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: prod, labels: {app: web}}
spec: {containers: [{name: c, image: i}]}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: prod, labels: {app: api}}
spec: {containers: [{name: c, image: i, ports: [{containerPort: 8080, name: http}]}]}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: tool, namespace: dev, labels: {app: tool}}
spec: {containers: [{name: c, image: i}]}
status: {podIP: 10.0.1.1}
"#;

fn engine(policies: &str) -> PolicyEngine {
    let text = format!("{CLUSTER}---\n{policies}");
    let snapshot = manifests::load_str("test.yaml", &text).expect("manifests load");
    PolicyEngine::new(&snapshot, EngineOptions::default()).expect("engine builds")
}

fn peer(s: &str) -> Peer {
    s.parse().unwrap()
}

fn verdict(e: &PolicyEngine, from: &str, to: &str, port: u16) -> PolicyVerdict {
    let v = e.evaluate(&peer(from), &peer(to), port, Protocol::Tcp);
    // The fast path and the explaining path agree.
    assert_eq!(
        e.decide(&peer(from), &peer(to), port, Protocol::Tcp),
        v.verdict,
        "{from} -> {to}:{port}"
    );
    v.verdict
}

const ALLOW_API_NP: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-api, namespace: prod}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress: [{}]
"#;

fn security_tier(order: u64, default_action: &str) -> String {
    format!(
        "apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {{name: security}}\nspec: {{order: {order}, defaultAction: {default_action}}}\n"
    )
}

const DENY_DEV_TO_PROD: &str = r#"
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: security.deny-dev}
spec:
  tier: security
  order: 10
  selector: projectcalico.org/namespace == 'prod'
  types: [Ingress]
  ingress:
  - action: Deny
    source: {namespaceSelector: team == 'b'}
"#;

#[test]
fn tiers_are_walked_by_their_order() {
    // security (100) before default: its Deny decides, naming kind, tier, rule.
    let e = engine(&format!(
        "{}---\n{DENY_DEV_TO_PROD}---\n{ALLOW_API_NP}",
        security_tier(100, "Pass")
    ));
    let v = e.evaluate(&peer("dev/tool"), &peer("prod/api"), 8080, Protocol::Tcp);
    assert_eq!(v.verdict, PolicyVerdict::Denied);
    assert_eq!(v.ingress.decided_in, Some(Tier::calico("security")));
    let by = &v.ingress.denied_by[0];
    assert_eq!(by.kind, PolicyKind::CalicoGlobalNetworkPolicy);
    assert_eq!(by.name, "security.deny-dev");
    assert_eq!(by.rule.as_ref().map(|r| r.index), Some(0));
    assert_eq!(by.kind.as_str(), "GlobalNetworkPolicy.projectcalico.org");

    // The same tier ordered after default: the NetworkPolicy allows first.
    let e = engine(&format!(
        "{}---\n{DENY_DEV_TO_PROD}---\n{ALLOW_API_NP}",
        security_tier(2_000_000, "Pass")
    ));
    let v = e.evaluate(&peer("dev/tool"), &peer("prod/api"), 8080, Protocol::Tcp);
    assert_eq!(v.verdict, PolicyVerdict::Allowed);
    assert_eq!(v.ingress.decided_in, Some(Tier::calico("default")));
    assert_eq!(v.ingress.allowed_by[0].kind, PolicyKind::NetworkPolicy);
    // web is not selected by the NetworkPolicy: the security tier's Deny decides there.
    assert_eq!(
        verdict(&e, "dev/tool", "prod/web", 80),
        PolicyVerdict::Denied
    );
}

#[test]
fn pass_skips_to_the_next_tier_and_the_profile_allows_at_the_end() {
    let pass = r#"
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: security.pass-web}
spec:
  tier: security
  order: 1
  selector: app == 'api'
  ingress:
  - action: Pass
    source: {selector: app == 'web'}
  - action: Deny
"#;
    let deny_in_default = r#"
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: api-only-tool, namespace: prod}
spec:
  selector: app == 'api'
  ingress:
  - action: Allow
    source: {namespaceSelector: team == 'b'}
"#;
    // web -> api: Pass, then the default tier selects api and nothing
    // allows web: end-of-tier deny.
    let e = engine(&format!(
        "{}---\n{pass}---\n{deny_in_default}",
        security_tier(100, "Deny")
    ));
    let v = e.evaluate(&peer("prod/web"), &peer("prod/api"), 8080, Protocol::Tcp);
    assert_eq!(v.verdict, PolicyVerdict::Denied);
    assert!(matches!(v.ingress.tiers[0].outcome, Outcome::Pass(_)));
    assert_eq!(v.ingress.decided_in, Some(Tier::calico("default")));
    assert_eq!(v.ingress.denied_by[0].kind, PolicyKind::CalicoNetworkPolicy);
    assert!(v.ingress.denied_by[0].rule.is_none(), "end-of-tier deny");
    // tool -> api: security's second rule denies before the default tier.
    assert_eq!(
        verdict(&e, "dev/tool", "prod/api", 8080),
        PolicyVerdict::Denied
    );

    // Without the default tier's policy: Pass, then no tier -> profile allows.
    let e = engine(&format!("{}---\n{pass}", security_tier(100, "Deny")));
    let v = e.evaluate(&peer("prod/web"), &peer("prod/api"), 8080, Protocol::Tcp);
    assert_eq!(v.verdict, PolicyVerdict::Allowed);
    assert_eq!(v.ingress.decided_in, None);
}

#[test]
fn end_of_tier_deny_or_the_tier_default_action() {
    let only_web = r#"
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: security.api-from-web}
spec:
  tier: security
  selector: app == 'api'
  ingress:
  - action: Allow
    source: {selector: app == 'web'}
"#;
    let e = engine(&format!("{}---\n{only_web}", security_tier(100, "Deny")));
    assert_eq!(
        verdict(&e, "dev/tool", "prod/api", 8080),
        PolicyVerdict::Denied
    );
    assert_eq!(
        verdict(&e, "prod/web", "prod/api", 8080),
        PolicyVerdict::Allowed
    );
    // Egress is not in `types` (no egress rules): api's egress is not selected.
    assert_eq!(
        verdict(&e, "prod/api", "dev/tool", 80),
        PolicyVerdict::Allowed
    );
    let e = engine(&format!("{}---\n{only_web}", security_tier(100, "Pass")));
    assert_eq!(
        verdict(&e, "dev/tool", "prod/api", 8080),
        PolicyVerdict::Allowed
    );
}

#[test]
fn equal_orders_are_ordered_by_name() {
    let policies = |deny: &str, allow: &str| {
        format!(
            r#"
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {{name: {deny}, namespace: prod}}
spec:
  order: 100
  selector: app == 'api'
  ingress: [{{action: Deny}}]
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {{name: {allow}, namespace: prod}}
spec:
  order: 100
  selector: app == 'api'
  ingress: [{{action: Allow}}]
"#
        )
    };
    let e = engine(&policies("a-deny", "b-allow"));
    assert_eq!(
        verdict(&e, "prod/web", "prod/api", 8080),
        PolicyVerdict::Denied
    );
    let e = engine(&policies("b-deny", "a-allow"));
    assert_eq!(
        verdict(&e, "prod/web", "prod/api", 8080),
        PolicyVerdict::Allowed
    );
}

#[test]
fn kubernetes_network_policies_sit_at_order_1000_of_the_default_tier() {
    let deny = |order: u32| {
        format!(
            r#"
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {{name: deny-all, namespace: prod}}
spec:
  order: {order}
  selector: all()
  ingress: [{{action: Deny}}]
"#
        )
    };
    let e = engine(&format!("{}---\n{ALLOW_API_NP}", deny(999)));
    assert_eq!(
        verdict(&e, "prod/web", "prod/api", 8080),
        PolicyVerdict::Denied
    );
    let e = engine(&format!("{}---\n{ALLOW_API_NP}", deny(1001)));
    let v = e.evaluate(&peer("prod/web"), &peer("prod/api"), 8080, Protocol::Tcp);
    assert_eq!(v.verdict, PolicyVerdict::Allowed);
    assert_eq!(v.ingress.allowed_by[0].name, "allow-api");
    assert_eq!(v.ingress.allowed_by[0].tier, Tier::calico("default"));
    // web has no NetworkPolicy: the Calico Deny decides.
    assert_eq!(
        verdict(&e, "prod/api", "prod/web", 80),
        PolicyVerdict::Denied
    );
}

#[test]
fn admin_network_policies_are_the_kube_admin_tier() {
    let anp = r#"
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: deny-dev}
spec:
  priority: 10
  subject: {namespaces: {matchLabels: {team: a}}}
  ingress:
  - action: Deny
    from: [{namespaces: {matchLabels: {team: b}}}]
"#;
    let allow = |tier_order: u64| {
        format!(
            r#"{}---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {{name: security.allow-tool}}
spec:
  tier: security
  selector: app == 'api'
  ingress:
  - action: Allow
    source: {{selector: app == 'tool'}}
"#,
            security_tier(tier_order, "Pass")
        )
    };
    // security (100) comes before kube-admin (1000).
    let e = engine(&format!("{anp}---\n{}", allow(100)));
    assert_eq!(
        verdict(&e, "dev/tool", "prod/api", 8080),
        PolicyVerdict::Allowed
    );
    // After it: the AdminNetworkPolicy denies.
    let e = engine(&format!("{anp}---\n{}", allow(5000)));
    let v = e.evaluate(&peer("dev/tool"), &peer("prod/api"), 8080, Protocol::Tcp);
    assert_eq!(v.verdict, PolicyVerdict::Denied);
    assert_eq!(v.ingress.decided_in, Some(Tier::Admin));
    assert_eq!(v.ingress.denied_by[0].kind, PolicyKind::AdminNetworkPolicy);
}

#[test]
fn staged_policies_are_a_what_if_not_enforced() {
    let staged = r#"
apiVersion: projectcalico.org/v3
kind: StagedGlobalNetworkPolicy
metadata: {name: default-deny}
spec:
  selector: projectcalico.org/namespace == 'prod'
  types: [Ingress]
"#;
    let e = engine(staged);
    let v = e.evaluate(&peer("dev/tool"), &peer("prod/api"), 8080, Protocol::Tcp);
    assert_eq!(v.verdict, PolicyVerdict::Allowed, "staged is not enforced");
    let s = v.staged.as_ref().expect("a staged verdict");
    assert_eq!(s.verdict, PolicyVerdict::Denied, "would deny if enforced");
    assert_eq!(
        s.ingress.denied_by[0].kind,
        PolicyKind::StagedGlobalNetworkPolicy
    );
    let json = serde_json::to_value(&v).unwrap();
    assert_eq!(json["staged"]["would_deny_if_enforced"], true);
}

#[test]
fn without_a_selecting_policy_the_profile_allows() {
    let e = engine(DENY_DEV_TO_PROD.replace("  tier: security\n", "").as_str());
    let v = e.evaluate(&peer("prod/web"), &peer("dev/tool"), 80, Protocol::Tcp);
    assert_eq!(v.verdict, PolicyVerdict::Allowed);
    assert!(v.egress.tiers.is_empty() && v.ingress.tiers.is_empty());
    assert!(e.calico_in_use());
}

#[test]
fn a_policy_in_a_missing_tier_is_refused() {
    let text = format!("{CLUSTER}---\n{DENY_DEV_TO_PROD}");
    let snapshot = manifests::load_str("test.yaml", &text).unwrap();
    let err = PolicyEngine::new(&snapshot, EngineOptions::default()).unwrap_err();
    assert!(err.to_string().contains("security"), "{err}");
}

#[test]
fn bad_calico_documents_name_the_file_document_and_field() {
    let bad = "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: x}\nspec:\n  selector: app == 'a\n";
    let err = manifests::load_str("bad.yaml", &format!("{CLUSTER}---\n{bad}"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("bad.yaml"), "{err}");
    assert!(err.contains("document 6"), "{err}");
    assert!(err.contains("spec.selector"), "{err}");
    let typo = "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: x, namespace: prod}\nspec:\n  ingres: []\n";
    let err = manifests::load_str("typo.yaml", typo)
        .unwrap_err()
        .to_string();
    assert!(err.contains("ingres"), "{err}");
}

fn verdict_from_port(e: &PolicyEngine, from: &str, to: &str, sport: Option<u16>) -> PolicyVerdict {
    e.evaluate_with_source_port(&peer(from), &peer(to), sport, 8080, Protocol::Tcp)
        .verdict
}

const DENY_HIGH_SOURCE_PORTS: &str = r#"
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: deny-high-sports}
spec:
  selector: app == 'api'
  types: [Ingress]
  ingress:
  - action: Deny
    protocol: TCP
    source: {ports: ["30000:40000"]}
  - action: Allow
"#;

#[test]
fn a_deny_on_source_ports_denies_flows_from_those_ports_only() {
    let e = engine(DENY_HIGH_SOURCE_PORTS);
    assert!(e.uses_source_ports());
    assert_eq!(
        verdict_from_port(&e, "prod/web", "prod/api", Some(35000)),
        PolicyVerdict::Denied
    );
    assert_eq!(
        verdict_from_port(&e, "prod/web", "prod/api", Some(45000)),
        PolicyVerdict::Allowed
    );
    // The range's ends are in it.
    assert_eq!(
        verdict_from_port(&e, "prod/web", "prod/api", Some(30000)),
        PolicyVerdict::Denied
    );
    assert_eq!(
        verdict_from_port(&e, "prod/web", "prod/api", Some(40001)),
        PolicyVerdict::Allowed
    );
    // Unknown source port: the source ports match nothing.
    assert_eq!(
        verdict_from_port(&e, "prod/web", "prod/api", None),
        PolicyVerdict::Allowed
    );
    let v = e.evaluate_with_source_port(
        &peer("prod/web"),
        &peer("prod/api"),
        Some(35000),
        8080,
        Protocol::Tcp,
    );
    assert_eq!(v.ingress.denied_by.len(), 1);
    assert_eq!(v.ingress.denied_by[0].name, "deny-high-sports");
    assert_eq!(
        v.ingress.denied_by[0].rule.as_ref().map(|r| r.index),
        Some(0)
    );
}

#[test]
fn source_not_ports_exclude_the_flows_from_those_ports() {
    let e = engine(
        r#"
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: allow-ephemeral, namespace: prod}
spec:
  selector: app == 'api'
  ingress:
  - action: Allow
    protocol: TCP
    source: {notPorts: ["1:1023"]}
"#,
    );
    assert!(e.uses_source_ports());
    assert_eq!(
        verdict_from_port(&e, "prod/web", "prod/api", Some(50000)),
        PolicyVerdict::Allowed
    );
    // A privileged source port is excluded: end of tier.
    assert_eq!(
        verdict_from_port(&e, "prod/web", "prod/api", Some(80)),
        PolicyVerdict::Denied
    );
    // Unknown: the notPorts exclude nothing.
    assert_eq!(
        verdict_from_port(&e, "prod/web", "prod/api", None),
        PolicyVerdict::Allowed
    );
}

#[test]
fn named_source_ports_are_the_source_pods_container_ports() {
    let e = engine(
        r#"
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: deny-from-http}
spec:
  selector: app == 'web'
  types: [Ingress]
  ingress:
  - action: Deny
    protocol: TCP
    source: {ports: [http]}
  - action: Allow
"#,
    );
    // api's container port http is 8080; web has no named port.
    let from_api = |sport| {
        e.evaluate_with_source_port(
            &peer("prod/api"),
            &peer("prod/web"),
            Some(sport),
            80,
            Protocol::Tcp,
        )
        .verdict
    };
    assert_eq!(from_api(8080), PolicyVerdict::Denied);
    assert_eq!(from_api(8081), PolicyVerdict::Allowed);
}

#[test]
fn the_verdict_cache_tells_source_ports_apart_only_when_a_rule_reads_them() {
    use netwatch::policy::VerdictCache;
    let e = engine(DENY_HIGH_SOURCE_PORTS);
    let cache = VerdictCache::new(100);
    let (web, api) = (peer("prod/web"), peer("prod/api"));
    let judge = |sport| {
        cache
            .evaluate(&e, &web, &api, Some(sport), 8080, Protocol::Tcp)
            .verdict
    };
    assert_eq!(judge(35000), PolicyVerdict::Denied);
    assert_eq!(judge(45000), PolicyVerdict::Allowed);
    assert_eq!(judge(35001), PolicyVerdict::Denied);
    assert_eq!(cache.stats().entries, 3);

    // Without source-port rules every source port shares one entry.
    let plain = engine(ALLOW_API_NP);
    assert!(!plain.uses_source_ports());
    let cache = VerdictCache::new(100);
    for sport in [35000, 45000, 50000] {
        cache.evaluate(&plain, &web, &api, Some(sport), 8080, Protocol::Tcp);
    }
    assert_eq!(cache.stats().entries, 1);
    assert_eq!(cache.stats().hits, 2);
}
