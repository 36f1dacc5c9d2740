//! Every incident scenario under scenarios/, end to end: lab, enforcement,
//! one agent per node, the application's traffic, and every check the
//! scenario states (probe outcomes, flows with their pods, services and
//! denying policies, lint, enforcer/engine agreement, the suggested fix).

mod support;

use netwatch_lab::scenario::discover;
use support::{run_scenario, scenarios_dir};

fn run(name: &str) {
    run_scenario(name, None, |_| {});
}

#[test]
fn every_scenario_folder_has_a_test() {
    let tested = [
        "admin-deny-sensitive",
        "baseline-default-deny",
        "calico-deny-shadows-allow",
        "calico-gnp-forgets-dns",
        "calico-staged-preview",
        "dns-wrong-label",
        "egress-apiserver-world",
        "label-mismatch",
        "least-privilege",
        "no-ready-endpoints",
        "pass-to-networkpolicy",
        "policy-not-enforced",
        "prod-default-deny",
    ];
    let found: Vec<String> = discover(&scenarios_dir())
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(found, tested, "add a test below for each new scenario");
}

#[test]
fn calico_deny_shadows_allow() {
    run("calico-deny-shadows-allow");
}

#[test]
fn calico_gnp_forgets_dns() {
    run("calico-gnp-forgets-dns");
}

/// The staged phase end to end, then what on-call runs before applying:
/// `netwatch explain` on the staged manifests previews the drop.
#[test]
fn calico_staged_preview() {
    run("calico-staged-preview");
    let dir = scenarios_dir().join("calico-staged-preview");
    let out = std::process::Command::new(support::target_binary("netwatch"))
        .arg("explain")
        .arg("--manifests")
        .arg(dir.join("../prod-default-deny/manifests"))
        .arg("--manifests")
        .arg(dir.join("staged"))
        .args([
            "--from",
            "prod/web-7f9c4-q8z2m",
            "--to",
            "prod/db-0",
            "--port",
            "5432",
        ])
        .output()
        .expect("netwatch explain");
    let text = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(out.status.success(), "{text}");
    assert!(text.starts_with("ALLOWED"), "enforcement unchanged: {text}");
    assert!(
        text.contains("would be DENIED if enforced")
            && text.contains("StagedNetworkPolicy.projectcalico.org prod/lock-db"),
        "{text}"
    );
}

#[test]
fn prod_default_deny() {
    run("prod-default-deny");
}

#[test]
fn dns_wrong_label() {
    run("dns-wrong-label");
}

#[test]
fn label_mismatch() {
    run("label-mismatch");
}

#[test]
fn no_ready_endpoints() {
    run("no-ready-endpoints");
}

#[test]
fn egress_apiserver_world() {
    run("egress-apiserver-world");
}

#[test]
fn policy_not_enforced() {
    run("policy-not-enforced");
}

#[test]
fn least_privilege() {
    run("least-privilege");
}

#[test]
fn admin_deny_sensitive() {
    run("admin-deny-sensitive");
}

#[test]
fn baseline_default_deny() {
    run("baseline-default-deny");
}

#[test]
fn pass_to_networkpolicy() {
    run("pass-to-networkpolicy");
}
