//! `netwatch explain` with Calico policies (projectcalico.org/v3) mixed
//! with Kubernetes NetworkPolicies, run as outside checks run it.

use std::process::{Command, Output};

use serde_json::Value;

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {team: a}}
---
apiVersion: v1
kind: Namespace
metadata: {name: kube-system}
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
spec: {containers: [{name: c, image: i}]}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec: {containers: [{name: c, image: i}]}
status: {podIP: 10.0.9.9}
"#;

/// Calico's documented pattern: a default deny in a security tier that
/// allows DNS, and an app team's NetworkPolicy in the default tier.
const POLICIES: &str = r#"
apiVersion: projectcalico.org/v3
kind: Tier
metadata: {name: security}
spec: {order: 100}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: security.dns-then-pass}
spec:
  tier: security
  order: 10
  selector: projectcalico.org/namespace == 'prod'
  types: [Ingress, Egress]
  egress:
  - action: Allow
    protocol: UDP
    destination:
      selector: k8s-app == 'kube-dns'
      ports: [53]
  - action: Pass
  ingress:
  - action: Pass
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: default-deny}
spec:
  order: 2000
  selector: projectcalico.org/namespace == 'prod'
  types: [Ingress, Egress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-to-api, namespace: prod}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 80}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-egress, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress: [{to: [{podSelector: {matchLabels: {app: api}}}]}]
"#;

fn write_manifests(extra: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("all.yaml");
    std::fs::write(&path, format!("{CLUSTER}---\n{POLICIES}{extra}")).unwrap();
    let p = path.display().to_string();
    (dir, p)
}

fn netwatch(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_netwatch"))
        .args(args)
        .output()
        .expect("run netwatch")
}

fn text(o: &[u8]) -> String {
    String::from_utf8(o.to_vec()).unwrap()
}

#[test]
fn explain_walks_the_calico_tiers_and_names_kind_tier_policy_rule() {
    let (_dir, file) = write_manifests("");
    let o = netwatch(&[
        "explain",
        "--manifests",
        &file,
        "--from",
        "prod/api",
        "--to",
        "prod/web",
        "--port",
        "80",
        "-o",
        "json",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["verdict"], "DENIED");
    // api's egress: security passes, default-deny (order 2000) selects it
    // and nothing allows: end-of-tier deny in tier default.
    let egress = &v["egress"];
    assert_eq!(egress["decided_in"], "default");
    let by = &egress["denied_by"][0];
    assert_eq!(by["kind"], "GlobalNetworkPolicy.projectcalico.org");
    assert_eq!(by["name"], "default-deny");
    assert_eq!(by["tier"], "default");
    assert_eq!(egress["tiers"][0]["tier"], "security");
    assert_eq!(egress["tiers"][0]["outcome"], "PASS");
    assert_eq!(egress["tiers"][0]["policies"][0]["rule"]["index"], 1);

    let o = netwatch(&[
        "explain",
        "--manifests",
        &file,
        "--from",
        "prod/api",
        "--to",
        "prod/web",
        "--port",
        "80",
    ]);
    // Whitespace normalized: the text is wrapped to the terminal.
    let out = text(&o.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(out.starts_with("DENIED"), "{out}");
    assert!(out.contains("end-of-tier deny"), "the sentence: {out}");
    assert!(out.contains("tier security: PASS by GlobalNetworkPolicy.projectcalico.org security.dns-then-pass rule 2"), "{out}");
    assert!(out.contains("end-of-tier DENY"), "{out}");

    // The app team's NetworkPolicy (default tier, order 1000) allows web -> api:80
    // before default-deny (order 2000).
    let o = netwatch(&[
        "explain",
        "--manifests",
        &file,
        "--from",
        "prod/web",
        "--to",
        "prod/api",
        "--port",
        "80",
        "-o",
        "json",
    ]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["verdict"], "ALLOWED", "{v}");
    assert_eq!(v["ingress"]["allowed_by"][0]["name"], "web-to-api");
    assert_eq!(v["ingress"]["allowed_by"][0]["tier"], "default");

    // DNS is allowed by the security tier's first rule.
    let o = netwatch(&[
        "explain",
        "--manifests",
        &file,
        "--from",
        "prod/web",
        "--to",
        "kube-system/coredns",
        "--port",
        "53",
        "--protocol",
        "UDP",
        "-o",
        "json",
    ]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["verdict"], "ALLOWED", "{v}");
    assert_eq!(v["egress"]["allowed_by"][0]["rule"]["index"], 0);
}

#[test]
fn matrix_json_includes_calico_policies() {
    let (_dir, file) = write_manifests("");
    let o = netwatch(&[
        "explain",
        "--manifests",
        &file,
        "--matrix",
        "--ports",
        "53,80",
        "--protocols",
        "TCP,UDP",
        "-o",
        "json",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let cells: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    let cell = |from: &str, to: &str, port: u64, proto: &str| {
        cells
            .iter()
            .find(|c| {
                c["from"] == from && c["to"] == to && c["port"] == port && c["protocol"] == proto
            })
            .unwrap_or_else(|| panic!("{from} {to} {port} {proto}"))["verdict"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(cell("prod/web", "prod/api", 80, "TCP"), "ALLOWED");
    assert_eq!(cell("prod/web", "prod/api", 53, "TCP"), "DENIED");
    assert_eq!(cell("prod/api", "prod/web", 80, "TCP"), "DENIED");
    assert_eq!(
        cell("prod/web", "kube-system/coredns", 53, "UDP"),
        "ALLOWED"
    );
    assert_eq!(cell("prod/web", "kube-system/coredns", 53, "TCP"), "DENIED");
    // coredns is not selected by anything: the profile allows its egress,
    // prod's ingress is denied at the end of the default tier.
    assert_eq!(cell("kube-system/coredns", "prod/web", 80, "TCP"), "DENIED");
    assert!(cells.iter().all(|c| c.get("staged_verdict").is_none()));
}

#[test]
fn staged_policies_preview_would_deny_if_enforced() {
    let staged = r#"---
apiVersion: projectcalico.org/v3
kind: StagedNetworkPolicy
metadata: {name: lock-api, namespace: prod}
spec:
  order: 1
  selector: app == 'api'
  types: [Ingress]
  ingress: [{action: Deny}]
"#;
    let (_dir, file) = write_manifests(staged);
    let o = netwatch(&[
        "explain",
        "--manifests",
        &file,
        "--from",
        "prod/web",
        "--to",
        "prod/api",
        "--port",
        "80",
    ]);
    let out = text(&o.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(out.starts_with("ALLOWED"), "{out}");
    assert!(
        out.contains("staged policies (not enforced): would be DENIED if enforced"),
        "{out}"
    );
    assert!(
        out.contains("StagedNetworkPolicy.projectcalico.org prod/lock-api rule 1"),
        "{out}"
    );
    let o = netwatch(&[
        "explain",
        "--manifests",
        &file,
        "--matrix",
        "--ports",
        "80",
        "-o",
        "json",
    ]);
    let cells: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    let c = cells
        .iter()
        .find(|c| c["from"] == "prod/web" && c["to"] == "prod/api")
        .unwrap();
    assert_eq!(c["verdict"], "ALLOWED");
    assert_eq!(c["staged_verdict"], "DENIED");
}

#[test]
fn a_bad_calico_policy_names_file_document_and_field() {
    let bad = "---\napiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: x, namespace: prod}\nspec:\n  ingress:\n  - action: Allow\n    source: {selector: \"app in {'a'\"}\n";
    let (_dir, file) = write_manifests(bad);
    let o = netwatch(&[
        "explain",
        "--manifests",
        &file,
        "--from",
        "prod/web",
        "--to",
        "prod/api",
        "--port",
        "80",
    ]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("all.yaml"), "{err}");
    assert!(err.contains("document 11"), "{err}");
    assert!(err.contains("spec.ingress[0].source.selector"), "{err}");
}

/// `explain` of one flow as JSON, with the manifests in `files`.
fn verdict_of(files: &[&str], from: &str, to: &str, port: &str) -> String {
    let mut args = vec!["explain"];
    for f in files {
        args.extend(["--manifests", f]);
    }
    args.extend(["--from", from, "--to", to, "--port", port, "-o", "json"]);
    let o = netwatch(&args);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v["verdict"].as_str().unwrap().to_string()
}

/// An app team's Calico NetworkPolicy at order 10 that denies everything
/// into api except from nobody: only a Calico policy before it can fix
/// web -> api:8080.
const EARLY_DENY: &str = r#"---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: api-lockdown, namespace: prod}
spec:
  order: 10
  selector: app == 'api'
  ingress: [{action: Deny, source: {selector: app == 'web'}}]
"#;

#[test]
fn suggest_proposes_a_calico_policy_in_the_deciding_tier_and_verifies_it() {
    let (dir, file) = write_manifests(EARLY_DENY);
    assert_eq!(
        verdict_of(&[&file], "prod/web", "prod/api", "8080"),
        "DENIED"
    );
    let o = netwatch(&[
        "explain",
        "--manifests",
        &file,
        "--from",
        "prod/web",
        "--to",
        "prod/api",
        "--port",
        "8080",
        "--suggest",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let yaml = text(&o.stdout);
    assert!(yaml.contains("apiVersion: projectcalico.org/v3"), "{yaml}");
    assert!(yaml.contains("order: 9"), "before api-lockdown: {yaml}");
    // Applied, the flow is allowed; the reverse direction is not opened.
    let fix = dir.path().join("fix.yaml");
    std::fs::write(&fix, &yaml).unwrap();
    let fix = fix.display().to_string();
    assert_eq!(
        verdict_of(&[&file, &fix], "prod/web", "prod/api", "8080"),
        "ALLOWED"
    );
    assert_eq!(
        verdict_of(&[&file, &fix], "prod/web", "prod/api", "8081"),
        "DENIED"
    );
    assert_eq!(
        verdict_of(&[&file, &fix], "prod/api", "prod/web", "8080"),
        "DENIED"
    );

    // A NetworkPolicy sits at order 1000: it cannot beat order 10, and says so.
    let o = netwatch(&[
        "explain",
        "--manifests",
        &file,
        "--from",
        "prod/web",
        "--to",
        "prod/api",
        "--port",
        "8080",
        "--suggest",
        "--suggest-kind",
        "networkpolicy",
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("order 1000"),
        "{}",
        text(&o.stderr)
    );

    // Where default-deny (order 2000) decides, a NetworkPolicy is enough.
    let (dir, file) = write_manifests("");
    let o = netwatch(&[
        "explain",
        "--manifests",
        &file,
        "--from",
        "prod/web",
        "--to",
        "prod/api",
        "--port",
        "8080",
        "--suggest",
        "--suggest-kind",
        "networkpolicy",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let yaml = text(&o.stdout);
    assert!(yaml.contains("apiVersion: networking.k8s.io/v1"), "{yaml}");
    let fix = dir.path().join("fix.yaml");
    std::fs::write(&fix, &yaml).unwrap();
    let fix = fix.display().to_string();
    assert_eq!(
        verdict_of(&[&file, &fix], "prod/web", "prod/api", "8080"),
        "ALLOWED"
    );
}

fn lint_json(extra: &str) -> Vec<Value> {
    let (_dir, file) = write_manifests(extra);
    let o = netwatch(&["lint", "--manifests", &file, "-o", "json"]);
    serde_json::from_slice::<Value>(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", text(&o.stdout)))
        .as_array()
        .unwrap()
        .clone()
}

fn has(findings: &[Value], check: &str, name: &str) -> bool {
    findings
        .iter()
        .any(|f| f["check"] == check && f["policy"]["name"] == name)
}

#[test]
fn lint_finds_calico_mistakes() {
    let app_allow = r#"---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: api-from-web, namespace: prod}
spec:
  order: 100
  selector: app == 'api'
  ingress: [{action: Allow, source: {selector: app == 'web'}}]
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: api-same-order, namespace: prod}
spec:
  order: 100
  selector: app == 'api'
  ingress: [{action: Allow, source: {selector: app == 'nothing'}}]
"#;
    let findings = lint_json(&format!("{EARLY_DENY}{app_allow}"));
    // The app team's allow never decides: api-lockdown (order 10) denies first.
    assert!(
        has(&findings, "calico-shadowed-rule", "api-from-web"),
        "{findings:#?}"
    );
    assert!(
        has(&findings, "calico-equal-order", "api-from-web"),
        "{findings:#?}"
    );
    assert!(
        has(
            &findings,
            "calico-selector-matches-nothing",
            "api-same-order"
        ),
        "{findings:#?}"
    );
    // The security tier allows DNS: no DNS finding.
    assert!(
        !findings.iter().any(|f| f["check"] == "calico-dns-egress"),
        "{findings:#?}"
    );

    // The same default deny without the DNS allow: pods lose DNS.
    let no_dns = POLICIES.replace(
        "  - action: Allow\n    protocol: UDP\n    destination:\n      selector: k8s-app == 'kube-dns'\n      ports: [53]\n",
        "",
    );
    assert_ne!(no_dns, POLICIES);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("all.yaml");
    std::fs::write(&path, format!("{CLUSTER}---\n{no_dns}")).unwrap();
    let o = netwatch(&[
        "lint",
        "--manifests",
        &path.display().to_string(),
        "-o",
        "json",
    ]);
    let findings: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        has(&findings, "calico-dns-egress", "default-deny"),
        "{findings:#?}"
    );
}

#[test]
fn lint_finds_a_pass_into_tiers_with_no_policy() {
    let only_pass = r#"
apiVersion: projectcalico.org/v3
kind: Tier
metadata: {name: security}
spec: {order: 100}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: security.pass-all}
spec:
  tier: security
  selector: app == 'api'
  ingress: [{action: Pass}]
"#;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("all.yaml");
    std::fs::write(&path, format!("{CLUSTER}---\n{only_pass}")).unwrap();
    let o = netwatch(&[
        "lint",
        "--manifests",
        &path.display().to_string(),
        "-o",
        "json",
    ]);
    let findings: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        has(
            &findings,
            "calico-pass-into-empty-tier",
            "security.pass-all"
        ),
        "{findings:#?}"
    );
}

/// ICMP rules are probed with the types and codes they name: a Deny of
/// all ICMP before an Allow of echo requests shadows the Allow. Calico
/// refuses ICMP fields without an ICMP protocol, and a code without a
/// type; so does netwatch, naming the field.
#[test]
fn lint_probes_icmp_types_and_codes() {
    let shadowed = r#"---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: api-icmp, namespace: prod}
spec:
  order: 50
  selector: app == 'api'
  ingress:
  - {action: Deny, protocol: ICMP}
  - {action: Allow, protocol: ICMP, icmp: {type: 8}}
"#;
    let findings = lint_json(shadowed);
    let finding = findings
        .iter()
        .find(|f| f["check"] == "calico-shadowed-rule" && f["policy"]["name"] == "api-icmp")
        .unwrap_or_else(|| panic!("the echo Allow is shadowed: {findings:#?}"));
    assert_eq!(finding["policy"]["rule"]["index"], 1, "{finding:#}");

    // The other order: the echo Allow decides echo requests, the Deny the
    // rest; nothing is shadowed.
    let ordered = shadowed.replace(
        "  - {action: Deny, protocol: ICMP}\n  - {action: Allow, protocol: ICMP, icmp: {type: 8}}\n",
        "  - {action: Allow, protocol: ICMP, icmp: {type: 8}}\n  - {action: Deny, protocol: ICMP}\n",
    );
    assert_ne!(ordered, shadowed);
    let findings = lint_json(&ordered);
    assert!(
        !findings
            .iter()
            .any(|f| f["check"] == "calico-shadowed-rule" && f["policy"]["name"] == "api-icmp"),
        "{findings:#?}"
    );

    for (rule, field, problem) in [
        (
            "{action: Allow, protocol: TCP, icmp: {type: 8}}",
            "spec.ingress[0].icmp",
            "need protocol ICMP or ICMPv6",
        ),
        (
            "{action: Allow, protocol: ICMP, notICMP: {code: 0}}",
            "spec.ingress[0].notICMP.code",
            "needs a type",
        ),
    ] {
        let bad = format!(
            "---\napiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {{name: x, namespace: prod}}\nspec:\n  selector: app == 'api'\n  ingress:\n  - {rule}\n"
        );
        let (_dir, file) = write_manifests(&bad);
        let o = netwatch(&["lint", "--manifests", &file]);
        assert!(!o.status.success(), "{rule} accepted");
        let err = text(&o.stderr);
        assert!(
            err.contains(field) && err.contains(problem),
            "{rule}: {err}"
        );
    }
}

/// An app team's Deny of clients on source ports 30000-40000 into api,
/// before the NetworkPolicy that allows web -> api:80.
const DENY_SOURCE_PORTS: &str = r#"---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: deny-sports, namespace: prod}
spec:
  order: 5
  selector: app == 'api'
  ingress: [{action: Deny, protocol: TCP, source: {ports: ["30000:40000"]}}]
"#;

/// `explain` of web -> api:80 as JSON, with `extra` args.
fn explain_json(file: &str, extra: &[&str]) -> Value {
    let mut args = vec![
        "explain",
        "--manifests",
        file,
        "--from",
        "prod/web",
        "--to",
        "prod/api",
        "--port",
        "80",
        "-o",
        "json",
    ];
    args.extend(extra);
    let o = netwatch(&args);
    assert!(o.status.success(), "{}", text(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn explain_judges_calico_source_ports_with_the_clients_source_port() {
    let (_dir, file) = write_manifests(DENY_SOURCE_PORTS);
    let v = explain_json(&file, &["--source-port", "35000"]);
    assert_eq!(v["verdict"], "DENIED", "{v:#}");
    assert_eq!(v["source_port"], 35000, "{v:#}");
    assert_eq!(v["ingress"]["denied_by"][0]["name"], "deny-sports", "{v:#}");
    let v = explain_json(&file, &["--source-port", "45000"]);
    assert_eq!(v["verdict"], "ALLOWED", "{v:#}");
    // Without --source-port the source port is unknown: the rule's source
    // ports match nothing.
    let v = explain_json(&file, &[]);
    assert_eq!(v["verdict"], "ALLOWED", "{v:#}");
    assert!(v.get("source_port").is_none(), "{v:#}");

    let o = netwatch(&[
        "explain",
        "--manifests",
        &file,
        "--from",
        "prod/web",
        "--to",
        "prod/api",
        "--port",
        "80",
        "--source-port",
        "35000",
    ]);
    let out = text(&o.stdout);
    assert!(out.starts_with("DENIED"), "{out}");
    assert!(out.contains("from source port 35000"), "{out}");
    assert!(out.contains("deny-sports"), "{out}");

    // The matrix takes no source port.
    let o = netwatch(&[
        "explain",
        "--manifests",
        &file,
        "--matrix",
        "--source-port",
        "1",
    ]);
    assert!(!o.status.success());
}

#[test]
fn explain_judges_calico_source_not_ports() {
    // Deny every client except those on source ports 30000-40000.
    let only_some = r#"---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: deny-other-sports, namespace: prod}
spec:
  order: 5
  selector: app == 'api'
  ingress: [{action: Deny, protocol: TCP, source: {notPorts: ["30000:40000"]}}]
"#;
    let (_dir, file) = write_manifests(only_some);
    let v = explain_json(&file, &["--source-port", "45000"]);
    assert_eq!(v["verdict"], "DENIED", "{v:#}");
    assert_eq!(
        v["ingress"]["denied_by"][0]["name"], "deny-other-sports",
        "{v:#}"
    );
    let v = explain_json(&file, &["--source-port", "35000"]);
    assert_eq!(v["verdict"], "ALLOWED", "{v:#}");
}

#[test]
fn lint_probes_the_source_ports_rules_name() {
    // The Allow decides the TCP flows from 30000-40000: not shadowed (with
    // an unknown source port only, the Deny would take every TCP flow).
    let findings = lint_json(
        r#"---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: sports, namespace: prod}
spec:
  order: 5
  selector: app == 'api'
  ingress:
  - {action: Deny, protocol: TCP, source: {notPorts: ["30000:40000"]}}
  - {action: Allow, protocol: TCP}
"#,
    );
    assert!(
        !has(&findings, "calico-shadowed-rule", "sports"),
        "{findings:#?}"
    );
}
