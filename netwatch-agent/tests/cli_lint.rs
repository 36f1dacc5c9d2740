//! `netwatch lint`, run as a CI job runs it: findings with fixes, exit 1
//! when something is found, 0 when clean, 2 when the input is broken.

use std::process::{Command, Output};

use serde_json::Value;

fn netwatch(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_netwatch"))
        .args(args)
        .output()
        .expect("run netwatch")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

const APP: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\nspec:\n  selector: {matchLabels: {app: web}}\n  template: {metadata: {labels: {app: web}}}\n";

const DENY_EGRESS: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: default-deny-egress, namespace: shop}\nspec: {podSelector: {}, policyTypes: [Egress]}\n";

const WRONG_NS_LABEL: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: from-monitoring, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {name: kube-system}}}]\n";

const DNS: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-dns, namespace: shop}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}\n      podSelector: {matchLabels: {k8s-app: kube-dns}}\n    ports: [{port: 53, protocol: UDP}, {port: 53, protocol: TCP}]\n";

fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, content) in files {
        std::fs::write(dir.path().join(name), content).unwrap();
    }
    dir
}

#[test]
fn findings_are_listed_with_fixes_and_exit_1() {
    let dir = dir_with(&[
        ("app.yaml", APP),
        ("deny.yaml", DENY_EGRESS),
        ("ns.yaml", WRONG_NS_LABEL),
    ]);
    let lint_at = |columns: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_netwatch"))
            .args(["lint", "--manifests", &dir.path().display().to_string()])
            .env("COLUMNS", columns)
            .output()
            .unwrap()
    };
    // An 80-column terminal: prose is wrapped, nothing is lost.
    let narrow = text(&lint_at("80").stdout);
    assert!(narrow.lines().all(|l| l.chars().count() <= 80), "{narrow}");
    assert!(
        narrow.contains("  fix: add this egress rule to"),
        "{narrow}"
    );
    let o = lint_at("400");
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(out.contains("error[dns-egress] shop/default-deny-egress: shop/default-deny-egress isolates shop/deployment/web (template) for egress"), "{out}");
    assert!(out.contains("error[namespace-selector-matches-nothing] shop/from-monitoring: ingress rule 1, peer 1: namespaceSelector {name: kube-system} matches no namespace (kube-system has kubernetes.io/metadata.name=kube-system)"), "{out}");
    assert!(
        out.contains("  fix: add this egress rule to shop/default-deny-egress:\n         - to:\n"),
        "{out}"
    );
    assert!(out.contains("\n3 findings: 3 errors, 0 warnings"), "{out}");
}

#[test]
fn json_output_is_an_array_of_findings() {
    let dir = dir_with(&[("app.yaml", APP), ("deny.yaml", DENY_EGRESS)]);
    let o = netwatch(&[
        "lint",
        "--manifests",
        &dir.path().display().to_string(),
        "-o",
        "json",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let v: Value = serde_json::from_str(&text(&o.stdout)).unwrap();
    let findings = v.as_array().unwrap();
    assert_eq!(findings.len(), 1, "{v}");
    let f = &findings[0];
    assert_eq!(f["severity"], "error");
    assert_eq!(f["check"], "dns-egress");
    assert_eq!(
        f["policy"],
        serde_json::json!({"namespace": "shop", "name": "default-deny-egress"})
    );
    assert!(f["message"].as_str().unwrap().contains("53/UDP and 53/TCP"));
    assert!(f["fix"].as_str().unwrap().contains("k8s-app: kube-dns"));
}

#[test]
fn clean_manifests_exit_0() {
    let dir = dir_with(&[
        ("app.yaml", APP),
        ("deny.yaml", DENY_EGRESS),
        ("dns.yaml", DNS),
    ]);
    let o = netwatch(&["lint", "--manifests", &dir.path().display().to_string()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stdout));
    assert_eq!(text(&o.stdout), "no problems found in 2 NetworkPolicies\n");
    let o = netwatch(&[
        "lint",
        "--manifests",
        &dir.path().display().to_string(),
        "-o",
        "json",
    ]);
    assert_eq!((o.status.code(), text(&o.stdout).trim()), (Some(0), "[]"));
}

#[test]
fn the_dns_pods_can_be_named() {
    let dir = dir_with(&[
        ("app.yaml", APP),
        ("deny.yaml", DENY_EGRESS),
        ("dns.yaml", &DNS.replace("kube-dns", "coredns")),
    ]);
    let path = dir.path().display().to_string();
    assert_eq!(
        netwatch(&["lint", "--manifests", &path]).status.code(),
        Some(1)
    );
    let o = netwatch(&[
        "lint",
        "--manifests",
        &path,
        "--dns-labels",
        "k8s-app=coredns",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stdout));
}

#[test]
fn broken_manifests_exit_2_with_one_line() {
    let dir = dir_with(&[(
        "bad.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  podSelector: {}\n  ingress:\n  - ports: [{port: 80, endPort: 70}]\n",
    )]);
    let o = netwatch(&["lint", "--manifests", &dir.path().display().to_string()]);
    assert_eq!(o.status.code(), Some(2));
    let err = text(&o.stderr);
    assert!(err.contains("bad.yaml: document 1 (NetworkPolicy shop/p): field spec.ingress[0].ports[0].endPort: endPort 70 is below port 80"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn help_lists_the_checks_and_exit_codes() {
    let o = netwatch(&["lint", "--help"]);
    let help = text(&o.stdout);
    for part in [
        "dns-egress",
        "namespace-selector-matches-nothing",
        "named-port-undefined",
        "ipblock-covers-cluster",
        "Exit status: 0 nothing found, 1 something found, 2",
    ] {
        assert!(help.contains(part), "{part:?} not in:\n{help}");
    }
}

#[test]
fn one_policy_is_one_networkpolicy() {
    let dir = dir_with(&[("app.yaml", APP), ("dns.yaml", DNS)]);
    let o = netwatch(&["lint", "--manifests", &dir.path().display().to_string()]);
    assert_eq!(
        text(&o.stdout).trim(),
        "no problems found in 1 NetworkPolicy"
    );
}

#[test]
fn a_misspelt_field_is_an_error_not_a_clean_bill() {
    let misspelt = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-web, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingres:\n  - from: [{podSelector: {}}]\n";
    let dir = dir_with(&[("app.yaml", APP), ("np.yaml", misspelt)]);
    let out = netwatch(&["lint", "-f", dir.path().to_str().unwrap()]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "broken input: {err}");
    assert!(
        err.contains("np.yaml") && err.contains("spec.ingres") && err.contains("did you mean `ingress`?"),
        "{err}"
    );
    assert!(!text(&out.stdout).contains("no problems"), "{}", text(&out.stdout));
}

/// One rule for a namespace the manifests do not define, in lint and
/// explain alike: it exists with only its kubernetes.io/metadata.name label.
#[test]
fn a_namespace_not_in_the_manifests_is_assumed_as_explain_assumes_it() {
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, labels: {app: web}}\nspec: {containers: [{name: c, image: x}]}\nstatus: {podIP: 10.0.0.2}\n";
    let policy = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: from-monitoring, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: monitoring}}}]\n";
    let dir = dir_with(&[("pod.yaml", pod), ("np.yaml", policy)]);
    let files = dir.path().to_str().unwrap();
    let lint = netwatch(&["lint", "-f", files]);
    // Prose is wrapped to the terminal: compare with spaces folded.
    let fold = |t: String| t.split_whitespace().collect::<Vec<_>>().join(" ");
    let findings = fold(text(&lint.stdout));
    assert!(
        findings.contains("names namespace monitoring, which is not in the manifests")
            && findings.contains("taken to exist with only its kubernetes.io/metadata.name label"),
        "{findings}"
    );
    assert!(!findings.contains("allows-nothing"), "the rule can match: {findings}");
    let explain = netwatch(&[
        "explain", "-f", files, "--from", "monitoring:app=prom", "--to", "shop/web", "--port", "80",
    ]);
    let out = fold(text(&explain.stdout));
    assert!(out.starts_with("ALLOWED"), "{out}");
    assert!(
        out.contains("namespace monitoring is not in the manifests")
            && out.contains("taken to exist with only its"),
        "explain states the same rule: {out}"
    );
}
