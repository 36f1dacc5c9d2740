//! Calico's own policies (projectcalico.org/v3) through the library API:
//! Calico's documented patterns, judged tier by tier, with the kind, tier,
//! policy and rule that decided.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use netwatch::policy::api::calico::{
    CalicoDirectionVerdict, CalicoEndpoint, CalicoFlow, CalicoKind, CalicoNetworkPolicy,
    CalicoObjects, CalicoOutcome, CalicoPolicies, CalicoPolicyRef, CalicoTier, CalicoWhatIf,
    GlobalNetworkPolicy, StagedGlobalNetworkPolicy, StagedKubernetesNetworkPolicy,
    StagedNetworkPolicy, StagedObjects,
};
use serde::Deserialize;

#[derive(Default)]
struct Objects {
    tiers: Vec<CalicoTier>,
    network_policies: Vec<CalicoNetworkPolicy>,
    global: Vec<GlobalNetworkPolicy>,
    kubernetes: Vec<NetworkPolicy>,
    staged: Vec<StagedNetworkPolicy>,
    staged_global: Vec<StagedGlobalNetworkPolicy>,
    staged_kubernetes: Vec<StagedKubernetesNetworkPolicy>,
}

fn read(yaml: &str) -> Result<Objects, String> {
    let mut objects = Objects::default();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_yaml::Value::deserialize(doc).map_err(|e| e.to_string())?;
        let kind = value["kind"].as_str().unwrap_or_default().to_string();
        let api = value["apiVersion"].as_str().unwrap_or_default().to_string();
        let e = |e: serde_yaml::Error| e.to_string();
        match (api.as_str(), kind.as_str()) {
            ("projectcalico.org/v3", "Tier") => objects
                .tiers
                .push(serde_yaml::from_value(value).map_err(e)?),
            ("projectcalico.org/v3", "NetworkPolicy") => objects
                .network_policies
                .push(serde_yaml::from_value(value).map_err(e)?),
            ("projectcalico.org/v3", "GlobalNetworkPolicy") => objects
                .global
                .push(serde_yaml::from_value(value).map_err(e)?),
            ("projectcalico.org/v3", "StagedNetworkPolicy") => objects
                .staged
                .push(serde_yaml::from_value(value).map_err(e)?),
            ("projectcalico.org/v3", "StagedGlobalNetworkPolicy") => objects
                .staged_global
                .push(serde_yaml::from_value(value).map_err(e)?),
            ("projectcalico.org/v3", "StagedKubernetesNetworkPolicy") => objects
                .staged_kubernetes
                .push(serde_yaml::from_value(value).map_err(e)?),
            ("networking.k8s.io/v1", "NetworkPolicy") => objects
                .kubernetes
                .push(serde_yaml::from_value(value).map_err(e)?),
            other => return Err(format!("unexpected {other:?}")),
        }
    }
    Ok(objects)
}

fn build(yaml: &str) -> Result<CalicoPolicies, String> {
    let o = read(yaml)?;
    CalicoPolicies::build(CalicoObjects {
        tiers: &o.tiers,
        network_policies: &o.network_policies,
        global_network_policies: &o.global,
        kubernetes_network_policies: &o.kubernetes,
    })
    .map_err(|e| e.to_string())
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn pod(namespace: &str, pairs: &[(&str, &str)], ip: &str) -> CalicoEndpoint {
    let mut e = CalicoEndpoint::pod(
        namespace,
        labels(pairs),
        labels(&[("kubernetes.io/metadata.name", namespace)]),
    );
    e.ip = Some(ip.parse().unwrap());
    e
}

fn web() -> CalicoEndpoint {
    let mut e = pod("prod", &[("app", "web")], "10.0.0.10");
    e.service_account = Some("web-sa".into());
    e
}
fn api() -> CalicoEndpoint {
    let mut e = pod("prod", &[("app", "api")], "10.0.0.20");
    e.named_ports = vec![("http".into(), 6, 8080)];
    e
}
fn db() -> CalicoEndpoint {
    pod("prod", &[("app", "db")], "10.0.0.30")
}
fn dns() -> CalicoEndpoint {
    pod("kube-system", &[("k8s-app", "kube-dns")], "10.0.1.53")
}

fn tcp(source: CalicoEndpoint, destination: CalicoEndpoint, port: u16) -> CalicoFlow {
    CalicoFlow {
        source,
        destination,
        protocol: 6,
        port,
        icmp: None,
        source_port: None,
    }
}

fn udp(source: CalicoEndpoint, destination: CalicoEndpoint, port: u16) -> CalicoFlow {
    CalicoFlow {
        protocol: 17,
        ..tcp(source, destination, port)
    }
}

fn reference(
    kind: CalicoKind,
    tier: &str,
    namespace: Option<&str>,
    name: &str,
    rule: Option<usize>,
) -> CalicoPolicyRef {
    CalicoPolicyRef {
        kind,
        tier: tier.into(),
        namespace: namespace.map(str::to_string),
        name: name.into(),
        rule,
    }
}

fn walk(v: &CalicoDirectionVerdict) -> Vec<String> {
    v.tiers.iter().map(|s| s.describe()).collect()
}

const DEFAULT_DENY_WITH_DNS: &str = r#"
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata:
  name: default-deny
spec:
  selector: projectcalico.org/namespace not in {'kube-system', 'calico-system', 'calico-apiserver'}
  types:
  - Ingress
  - Egress
  egress:
  - action: Allow
    protocol: UDP
    destination:
      selector: k8s-app == "kube-dns"
      namespaceSelector: projectcalico.org/name == "kube-system"
      ports:
      - 53
  - action: Allow
    protocol: TCP
    destination:
      selector: k8s-app == "kube-dns"
      namespaceSelector: projectcalico.org/name == "kube-system"
      ports:
      - 53
"#;

#[test]
fn global_default_deny_with_a_dns_allow() {
    let policies = build(DEFAULT_DENY_WITH_DNS).unwrap();
    let (allowed, egress, ingress) = policies.judge_flow(&udp(web(), dns(), 53));
    assert!(allowed, "{:?}", walk(&egress));
    assert_eq!(
        egress.allowed_by(),
        Some(&reference(
            CalicoKind::CalicoGlobalNetworkPolicy,
            "default",
            None,
            "default-deny",
            Some(0)
        ))
    );
    // kube-system is outside the policy's selector: no tier applies.
    assert!(ingress.tiers.is_empty());
    let (allowed, _, _) = policies.judge_flow(&tcp(web(), dns(), 53));
    assert!(allowed);

    // Anything else from prod ends at the end of the default tier.
    let (allowed, egress, ingress) = policies.judge_flow(&tcp(web(), api(), 8080));
    assert!(!allowed);
    let deny = vec![reference(
        CalicoKind::CalicoGlobalNetworkPolicy,
        "default",
        None,
        "default-deny",
        None,
    )];
    assert_eq!(egress.denied_by(), deny);
    assert_eq!(ingress.denied_by(), deny);
    assert_eq!(
        walk(&egress),
        [
            "tier default: selected by CalicoGlobalNetworkPolicy default-deny (tier default), no rule decided -> end-of-tier DENY"
        ]
    );
    // DNS on another port or to another pod is not allowed.
    assert!(!policies.judge_flow(&udp(web(), dns(), 5353)).0);
    assert!(!policies.judge_flow(&udp(web(), api(), 53)).0);
}

const SECURITY_OVER_APP: &str = r#"
apiVersion: projectcalico.org/v3
kind: Tier
metadata:
  name: security
spec:
  order: 100
---
apiVersion: projectcalico.org/v3
kind: Tier
metadata:
  name: app
spec:
  order: 200
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata:
  name: security.db-guard
spec:
  tier: security
  order: 10
  selector: app == 'db'
  ingress:
  - action: Deny
    source:
      selector: app == 'web'
  - action: Pass
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata:
  name: app.allow-to-db
  namespace: prod
spec:
  tier: app
  selector: app == 'db'
  ingress:
  - action: Allow
    protocol: TCP
    destination:
      ports: [5432]
"#;

#[test]
fn a_security_tier_deny_wins_over_an_app_tier_allow() {
    let policies = build(SECURITY_OVER_APP).unwrap();
    let (allowed, _, ingress) = policies.judge_flow(&tcp(web(), db(), 5432));
    assert!(!allowed);
    assert_eq!(
        ingress.denied_by(),
        [reference(
            CalicoKind::CalicoGlobalNetworkPolicy,
            "security",
            None,
            "security.db-guard",
            Some(0)
        )]
    );
    // The app tier was never reached.
    assert_eq!(ingress.tiers.len(), 1);
}

#[test]
fn pass_hands_the_flow_to_the_next_tier() {
    let policies = build(SECURITY_OVER_APP).unwrap();
    let (allowed, _, ingress) = policies.judge_flow(&tcp(api(), db(), 5432));
    assert!(allowed, "{:?}", walk(&ingress));
    assert_eq!(
        walk(&ingress),
        [
            "tier security: PASS by CalicoGlobalNetworkPolicy security.db-guard (tier security) rule 2",
            "tier app: ALLOW by CalicoNetworkPolicy prod/app.allow-to-db (tier app) rule 1",
        ]
    );
    // Passed, then the app tier selects db and nothing allows 22: its end-of-tier deny.
    let (allowed, _, ingress) = policies.judge_flow(&tcp(api(), db(), 22));
    assert!(!allowed);
    assert_eq!(
        ingress.denied_by(),
        [reference(
            CalicoKind::CalicoNetworkPolicy,
            "app",
            Some("prod"),
            "app.allow-to-db",
            None
        )]
    );
}

const WITH_KUBERNETES: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: api-from-web
  namespace: prod
spec:
  podSelector:
    matchLabels:
      app: api
  ingress:
  - from:
    - podSelector:
        matchLabels:
          app: web
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata:
  name: no-admin-port
  namespace: prod
spec:
  order: 100
  selector: app == 'api'
  ingress:
  - action: Deny
    protocol: TCP
    destination:
      ports: ["9000:9100"]
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata:
  name: too-late
  namespace: prod
spec:
  order: 2000
  selector: app == 'api'
  ingress:
  - action: Deny
    protocol: TCP
    destination:
      ports: [http]
"#;

#[test]
fn kubernetes_network_policies_sit_in_the_default_tier_at_order_1000() {
    let policies = build(WITH_KUBERNETES).unwrap();
    // Order 100 < 1000: the Calico Deny comes first.
    let (allowed, _, ingress) = policies.judge_flow(&tcp(web(), api(), 9050));
    assert!(!allowed);
    assert_eq!(
        ingress.denied_by(),
        [reference(
            CalicoKind::CalicoNetworkPolicy,
            "default",
            Some("prod"),
            "no-admin-port",
            Some(0)
        )]
    );
    // The NetworkPolicy allows 8080 before the order-2000 Deny of the named port.
    let (allowed, _, ingress) = policies.judge_flow(&tcp(web(), api(), 8080));
    assert!(allowed, "{:?}", walk(&ingress));
    assert_eq!(
        ingress.allowed_by().map(|r| (r.kind, r.name.as_str())),
        Some((CalicoKind::KubernetesNetworkPolicy, "api-from-web"))
    );
    // From db, nothing allows: the order-2000 Deny matches the named port.
    let (allowed, _, ingress) = policies.judge_flow(&tcp(db(), api(), 8080));
    assert!(!allowed);
    assert_eq!(ingress.denied_by()[0].name, "too-late");
    // Another port from db: end-of-tier deny naming every selecting policy.
    let (allowed, _, ingress) = policies.judge_flow(&tcp(db(), api(), 7000));
    assert!(!allowed);
    let denied = ingress.denied_by();
    let names: Vec<&str> = denied.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["no-admin-port", "api-from-web", "too-late"]);
}

#[test]
fn end_of_tier_deny_and_a_pass_default_action() {
    let yaml = r#"
apiVersion: projectcalico.org/v3
kind: Tier
metadata:
  name: platform
spec:
  order: 50
  defaultAction: Pass
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata:
  name: platform.monitoring
spec:
  tier: platform
  selector: all()
  ingress:
  - action: Allow
    source:
      namespaceSelector: projectcalico.org/name == 'monitoring'
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata:
  name: api-ingress
  namespace: prod
spec:
  selector: app == 'api'
  ingress:
  - action: Allow
    source:
      serviceAccounts:
        names: [web-sa]
"#;
    let policies = build(yaml).unwrap();
    let scraper = pod("monitoring", &[("app", "prometheus")], "10.0.2.2");
    assert!(policies.judge_flow(&tcp(scraper, db(), 9090)).0);
    // platform passes at its end; default allows by service account.
    let (allowed, _, ingress) = policies.judge_flow(&tcp(web(), api(), 8080));
    assert!(allowed, "{:?}", walk(&ingress));
    assert!(matches!(
        ingress.tiers[0].outcome,
        CalicoOutcome::EndOfTierPass(_)
    ));
    // db: only the platform tier selects it, which passes; then the profile allows.
    assert!(policies.judge_flow(&tcp(api(), db(), 5432)).0);
    // api from db (no service account): default tier's end-of-tier deny.
    let (allowed, _, ingress) = policies.judge_flow(&tcp(db(), api(), 8080));
    assert!(!allowed);
    assert!(matches!(
        ingress.tiers.last().unwrap().outcome,
        CalicoOutcome::EndOfTierDeny(_)
    ));
}

#[test]
fn types_default_as_calico_defaults_them() {
    let yaml = r#"
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata:
  name: web-egress
  namespace: prod
spec:
  selector: app == 'web'
  egress:
  - action: Allow
    destination:
      nets: [10.0.0.0/24]
      notNets: [10.0.0.30/32]
"#;
    let policies = build(yaml).unwrap();
    assert!(policies.judge_flow(&tcp(web(), api(), 8080)).0);
    assert!(!policies.judge_flow(&tcp(web(), db(), 5432)).0);
    let outside: IpAddr = "192.0.2.1".parse().unwrap();
    assert!(
        !policies
            .judge_flow(&tcp(web(), CalicoEndpoint::external(outside), 443))
            .0
    );
    // Egress rules and no ingress rules: types defaults to [Egress] only
    // (Calico's defaulting), so web's ingress is not selected.
    assert!(policies.judge_flow(&tcp(api(), web(), 80)).0);
    // Explicit types win.
    let both = yaml.replace("  egress:\n", "  types: [Ingress, Egress]\n  egress:\n");
    let policies = build(&both).unwrap();
    assert!(!policies.judge_flow(&tcp(api(), web(), 80)).0);
    // Ingress and egress rules: both.
    let with_ingress = yaml.replace(
        "  egress:\n",
        "  ingress:\n  - action: Allow\n    source: {selector: app == 'db'}\n  egress:\n",
    );
    let policies = build(&with_ingress).unwrap();
    assert!(!policies.judge_flow(&tcp(api(), web(), 80)).0);
    // No rules at all: Ingress.
    let none = "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: x, namespace: prod}\nspec: {selector: app == 'web'}\n";
    let policies = build(none).unwrap();
    assert!(!policies.judge_flow(&tcp(api(), web(), 80)).0);
    assert!(policies.judge_flow(&tcp(web(), api(), 8080)).0);
}

#[test]
fn log_goes_on_and_protocols_by_number_and_icmp() {
    let yaml = r#"
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata:
  name: db
  namespace: prod
spec:
  selector: app == 'db'
  ingress:
  - action: Log
  - action: Allow
    protocol: 1
    icmp:
      type: 8
  - action: Allow
    protocol: 17
    notProtocol: TCP
    destination:
      notPorts: [53]
"#;
    let policies = build(yaml).unwrap();
    let mut ping = tcp(api(), db(), 0);
    ping.protocol = 1;
    ping.icmp = Some((8, 0));
    let (allowed, _, ingress) = policies.judge_flow(&ping);
    assert!(allowed);
    assert_eq!(ingress.tiers[0].logged[0].rule, Some(0));
    assert_eq!(ingress.allowed_by().unwrap().rule, Some(1));
    ping.icmp = Some((0, 0));
    assert!(!policies.judge_flow(&ping).0);
    assert!(policies.judge_flow(&udp(api(), db(), 123)).0);
    assert!(!policies.judge_flow(&udp(api(), db(), 53)).0);
    assert!(!policies.judge_flow(&tcp(api(), db(), 123)).0);
}

#[test]
fn invalid_policies_are_refused_with_the_field() {
    let bad_selector = DEFAULT_DENY_WITH_DNS.replace(
        "selector: k8s-app == \"kube-dns\"\n      namespaceSelector",
        "selector: k8s-app == \"kube-dns\" &&\n      namespaceSelector",
    );
    let e = build(&bad_selector).unwrap_err();
    assert_eq!(
        e,
        "CalicoGlobalNetworkPolicy default-deny: spec.egress[0].destination.selector: selector \"k8s-app == \\\"kube-dns\\\" &&\": column 25: expected an expression after &&"
    );
    let typo = DEFAULT_DENY_WITH_DNS.replace("  types:", "  typse:");
    assert!(build(&typo).unwrap_err().contains("unknown field `typse`"));
    let no_tier = SECURITY_OVER_APP.replace(
        "kind: Tier\nmetadata:\n  name: app\n",
        "kind: Tier\nmetadata:\n  name: apps\n",
    );
    let e = build(&no_tier).unwrap_err();
    assert!(e.contains("spec.tier: tier \"app\" does not exist"), "{e}");
    let ports_without_protocol = WITH_KUBERNETES.replace(
        "    protocol: TCP\n    destination:\n      ports: [\"9000",
        "    destination:\n      ports: [\"9000",
    );
    let e = build(&ports_without_protocol).unwrap_err();
    assert!(
        e.contains("spec.ingress[0].protocol: ports need protocol"),
        "{e}"
    );
}

fn what_if(yaml: &str) -> Result<CalicoWhatIf, String> {
    let o = read(yaml)?;
    CalicoWhatIf::build(
        CalicoObjects {
            tiers: &o.tiers,
            network_policies: &o.network_policies,
            global_network_policies: &o.global,
            kubernetes_network_policies: &o.kubernetes,
        },
        &StagedObjects {
            network_policies: &o.staged,
            global_network_policies: &o.staged_global,
            kubernetes_network_policies: &o.staged_kubernetes,
        },
    )
    .map_err(|e| e.to_string())
}

#[test]
fn staged_policies_are_a_what_if() {
    let yaml = r#"
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata:
  name: block-web
  namespace: prod
spec:
  selector: app == 'api'
  ingress:
  - action: Deny
    source:
      selector: app == 'web'
  - action: Allow
---
apiVersion: projectcalico.org/v3
kind: StagedNetworkPolicy
metadata:
  name: block-web
  namespace: prod
spec:
  stagedAction: Delete
---
apiVersion: projectcalico.org/v3
kind: StagedGlobalNetworkPolicy
metadata:
  name: default-deny
spec:
  selector: projectcalico.org/namespace == 'prod' && app != 'api'
  types: [Ingress, Egress]
---
apiVersion: projectcalico.org/v3
kind: StagedKubernetesNetworkPolicy
metadata:
  name: db-from-api
  namespace: prod
spec:
  podSelector:
    matchLabels:
      app: db
  ingress:
  - from:
    - podSelector:
        matchLabels:
          app: api
"#;
    let w = what_if(yaml).unwrap();
    // The forgotten DNS: allowed today, denied by the staged default deny.
    let preview = w.preview(&udp(web(), dns(), 53));
    assert!(preview.would_deny(), "{preview:?}");
    assert_eq!(
        preview.egress.denied_by(),
        [reference(
            CalicoKind::StagedGlobalNetworkPolicy,
            "default",
            None,
            "default-deny",
            None
        )]
    );
    // Denied today by block-web; the staged Delete removes it, and api
    // is outside the staged default deny.
    let preview = w.preview(&tcp(web(), api(), 8080));
    assert!(!preview.enforced_allowed);
    assert!(
        !preview.would_allow(),
        "web's egress is under the staged default deny"
    );
    assert!(!preview.staged_allowed);
    // ...while api's own ingress, with block-web deleted, would allow it.
    assert!(preview.ingress.allowed && preview.ingress.tiers.is_empty());
    assert!(!preview.egress.allowed);
    let preview = w.preview(&tcp(api(), db(), 5432));
    assert!(
        preview.enforced_allowed && preview.staged_allowed,
        "{preview:?}"
    );
    assert_eq!(
        preview.ingress.allowed_by().map(|r| r.kind),
        Some(CalicoKind::StagedKubernetesNetworkPolicy)
    );
    // Staged policies change nothing enforced.
    assert!(w.enforced.judge_flow(&udp(web(), dns(), 53)).0);
    let unknown_action = yaml.replace("stagedAction: Delete", "stagedAction: Remove");
    assert!(what_if(&unknown_action).unwrap_err().contains("Remove"));
}

#[test]
fn lint_finds_selectors_that_select_nothing() {
    let yaml = r#"
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata:
  name: typo
spec:
  selector: app == 'wbe'
  ingress:
  - action: Allow
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata:
  name: api
  namespace: prod
spec:
  selector: app == 'api'
  ingress:
  - action: Allow
    source:
      namespaceSelector: projectcalico.org/name == 'monitoring'
  - action: Allow
    source:
      selector: app == 'web'
"#;
    let policies = build(yaml).unwrap();
    let endpoints = [web(), api(), db(), dns()];
    let found: Vec<(String, String, String)> = policies
        .selectors_matching_nothing(&endpoints)
        .into_iter()
        .map(|f| (f.policy.name, f.field, f.selector))
        .collect();
    assert_eq!(
        found,
        [
            (
                "api".to_string(),
                "spec.ingress[0].source".to_string(),
                "projectcalico.org/name == 'monitoring'".to_string()
            ),
            (
                "typo".to_string(),
                "spec.selector".to_string(),
                "app == 'wbe'".to_string()
            ),
        ]
    );
}

#[test]
fn manifests_read_calico_documents_and_skip_the_rest() {
    let text = format!(
        "{SECURITY_OVER_APP}\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: prod\n---\napiVersion: crd.projectcalico.org/v1\nkind: GlobalNetworkPolicy\nmetadata:\n  name: from-crd\nspec:\n  selector: has(app)\n"
    );
    let m = netwatch::policy::api::calico::CalicoManifests::read_str("p.yaml", &text).unwrap();
    assert_eq!(
        (
            m.tiers.len(),
            m.network_policies.len(),
            m.global_network_policies.len()
        ),
        (2, 1, 2)
    );
    assert!(CalicoPolicies::build(m.objects(&[])).is_ok());
    let typo = text.replace(
        "  ingress:\n  - action: Deny",
        "  ingres:\n  - action: Deny",
    );
    let e = netwatch::policy::api::calico::CalicoManifests::read_str("p.yaml", &typo)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("p.yaml: document 3: GlobalNetworkPolicy: unknown field `ingres`"),
        "{e}"
    );
}
