//! `netwatch explain`, run as outside checks run it: the binary, its flags,
//! its output contract and exit codes.

#[path = "policy_support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn netwatch(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_netwatch"))
        .args(args)
        .output()
        .expect("run netwatch")
}

/// `netwatch explain --manifests MANIFESTS --from FROM --to TO --port PORT`,
/// then `extra`.
fn explain(manifests: &str, from: &str, to: &str, port: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "explain",
        "--manifests",
        manifests,
        "--from",
        from,
        "--to",
        to,
        "--port",
        port,
    ];
    args.extend(extra);
    netwatch(&args)
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

fn cluster() -> String {
    support::data_dir()
        .join("conformance/cluster.yaml")
        .display()
        .to_string()
}

/// A directory with the e2e cluster and `policies`.
fn manifests_dir(policies: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(cluster(), dir.path().join("cluster.yaml")).unwrap();
    let sub = dir.path().join("policies");
    std::fs::create_dir(&sub).unwrap();
    std::fs::write(sub.join("policies.yaml"), policies).unwrap();
    let path = dir.path().display().to_string();
    (dir, path)
}

const DENY_X_INGRESS: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-ingress, namespace: x}\nspec: {podSelector: {}, policyTypes: [Ingress]}\n";

#[test]
fn json_output_follows_the_contract() {
    let (_d, dir) = manifests_dir(DENY_X_INGRESS);
    let o = explain(&dir, "y/b", "x/a", "80", &["-o", "json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["verdict"], "DENIED");
    assert_eq!(v["source"]["kind"], "pod");
    assert_eq!(v["source"]["namespace"], "y");
    assert_eq!(v["source"]["name"], "b");
    assert_eq!(v["source"]["labels"]["pod"], "b");
    assert_eq!(v["source"]["ip"], "10.0.2.2");
    for dir in ["egress", "ingress"] {
        for key in [
            "isolated",
            "verdict",
            "allowed_by",
            "denied_by",
            "near_misses",
        ] {
            assert!(v[dir].get(key).is_some(), "{dir}.{key} missing in {v}");
        }
    }
    assert_eq!(
        v["ingress"]["denied_by"],
        serde_json::json!([{"namespace": "x", "name": "deny-ingress"}])
    );
    assert_eq!(v["egress"]["verdict"], "ALLOWED");
    assert_eq!(v["ipblock_matches_pods"], true);
}

#[test]
fn text_output_puts_the_verdict_first() {
    let (_d, dir) = manifests_dir(DENY_X_INGRESS);
    let o = explain(&dir, "y/b", "x/a", "80", &[]);
    assert_eq!(o.status.code(), Some(0));
    let text = stdout(&o);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("DENIED: y/b -> x/a on 80/TCP"));
    assert_eq!(
        lines.next(),
        Some("x/deny-ingress isolates x/a for ingress; no policy allows y/b on 80/TCP")
    );
    assert!(
        text.contains("ipBlock peers match pod IPs: yes (--ipblock-matches-pods=true)"),
        "{text}"
    );
    let o = explain(&dir, "x/a", "y/b", "80", &[]);
    assert!(
        stdout(&o).starts_with("ALLOWED: x/a -> y/b on 80/TCP\n"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn sources_and_destinations_can_be_ips_and_hypothetical_pods() {
    let policy = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a-from-web, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: web}}}, {ipBlock: {cidr: 192.0.2.0/24}}]\n";
    let (_d, dir) = manifests_dir(policy);
    let verdict = |from: &str, to: &str, protocol: &str| -> Value {
        let o = explain(
            &dir,
            from,
            to,
            "80",
            &["--protocol", protocol, "-o", "json"],
        );
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        serde_json::from_str(&stdout(&o)).unwrap()
    };
    let v = verdict("x:app=web,tier=frontend", "x/a", "TCP");
    assert_eq!(
        (v["verdict"].as_str(), v["source"]["kind"].as_str()),
        (Some("ALLOWED"), Some("hypothetical"))
    );
    assert!(v["source"].get("name").is_none());
    assert_eq!(verdict("x:", "x/a", "TCP")["verdict"], "DENIED");
    let v = verdict("192.0.2.9", "x/a", "udp");
    assert_eq!(
        (v["verdict"].as_str(), v["source"]["kind"].as_str()),
        (Some("ALLOWED"), Some("external"))
    );
    assert_eq!(verdict("198.51.100.1", "x/a", "SCTP")["verdict"], "DENIED");
    // A pod's IP is that pod.
    let v = verdict("10.0.1.2", "x/a", "TCP");
    assert_eq!(
        (v["source"]["kind"].as_str(), v["source"]["name"].as_str()),
        (Some("pod"), Some("b"))
    );
}

#[test]
fn the_ipblock_setting_is_a_flag_and_stated_in_the_output() {
    let policy = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a-from-y, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{ipBlock: {cidr: 10.0.2.0/24}}]\n";
    let (_d, dir) = manifests_dir(policy);
    for (flag, verdict, yes) in [
        (None, "ALLOWED", true),
        (Some("--ipblock-matches-pods=true"), "ALLOWED", true),
        (Some("--ipblock-matches-pods"), "ALLOWED", true),
        (Some("--ipblock-matches-pods=false"), "DENIED", false),
    ] {
        let mut extra = vec!["-o", "json"];
        extra.extend(flag);
        let o = explain(&dir, "y/a", "x/a", "80", &extra);
        let v: Value = serde_json::from_str(&stdout(&o))
            .unwrap_or_else(|e| panic!("{flag:?}: {e}: {}", stderr(&o)));
        assert_eq!(v["verdict"], verdict, "{flag:?}");
        assert_eq!(v["ipblock_matches_pods"], yes, "{flag:?}");
    }
    let o = explain(
        &dir,
        "y/a",
        "x/a",
        "80",
        &["--ipblock-matches-pods", "false"],
    );
    assert!(
        stdout(&o).contains("ipBlock peers match pod IPs: no (--ipblock-matches-pods=false)"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn suggest_prints_only_yaml_that_allows_exactly_the_flow() {
    let (_d, dir) = manifests_dir(DENY_X_INGRESS);
    let matrix = |dirs: &[&str]| -> BTreeMap<(String, String, u64, String), String> {
        let mut args = vec!["explain", "--manifests"];
        args.extend(dirs);
        args.extend([
            "--matrix",
            "--ports",
            "80,81",
            "--protocols",
            "TCP,UDP",
            "-o",
            "json",
        ]);
        let o = netwatch(&args);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        let entries: Vec<Value> = serde_json::from_str(&stdout(&o)).unwrap();
        entries
            .into_iter()
            .map(|e| {
                (
                    (
                        e["from"].as_str().unwrap().to_string(),
                        e["to"].as_str().unwrap().to_string(),
                        e["port"].as_u64().unwrap(),
                        e["protocol"].as_str().unwrap().to_string(),
                    ),
                    e["verdict"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let before = matrix(&[&dir]);
    let o = explain(&dir, "y/b", "x/a", "80", &["--suggest"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let yaml = stdout(&o);
    assert!(
        stderr(&o).starts_with("DENIED: y/b -> x/a on 80/TCP"),
        "the explanation goes to stderr: {}",
        stderr(&o)
    );
    for line in yaml.lines() {
        assert!(
            line.starts_with('#')
                || line == "---"
                || line.starts_with(' ')
                || line.contains(':')
                || line.starts_with('-'),
            "prose on stdout: {line:?}"
        );
    }
    let fix = tempfile::NamedTempFile::with_suffix(".yaml").unwrap();
    std::fs::write(fix.path(), &yaml).unwrap();
    let fix_path = fix.path().display().to_string();
    let after = matrix(&[&dir, &fix_path]);
    let changed: Vec<_> = before
        .iter()
        .filter(|(k, v)| after[*k] != **v)
        .map(|(k, _)| k.clone())
        .collect();
    assert_eq!(
        changed,
        vec![("y/b".to_string(), "x/a".to_string(), 80, "TCP".to_string())],
        "{yaml}"
    );
    assert_eq!(
        after[&("y/b".to_string(), "x/a".to_string(), 80, "TCP".to_string())],
        "ALLOWED"
    );

    // Already allowed: nothing on stdout.
    let o = explain(&dir, "x/a", "y/b", "80", &["--suggest"]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(stdout(&o), "");
    assert!(
        stderr(&o).contains("nothing to suggest: the flow is already allowed"),
        "{}",
        stderr(&o)
    );
}

fn run_matrix(dir: &str, ports: &[u16], protocols: &[String], ipblock: Option<bool>) -> Vec<Value> {
    let ports = ports
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let protocols = protocols.join(",");
    let mut args = vec![
        "explain".to_string(),
        "--manifests".into(),
        dir.into(),
        "--matrix".into(),
        "--ports".into(),
        ports,
        "--protocols".into(),
        protocols,
        "-o".into(),
        "json".into(),
    ];
    if let Some(b) = ipblock {
        args.push(format!("--ipblock-matches-pods={b}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = netwatch(&args);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    serde_json::from_str(&stdout(&o)).unwrap()
}

#[test]
fn matrix_json_matches_every_conformance_table() {
    let mut failures = Vec::new();
    let mut runs = 0;
    for case in support::cases() {
        for (i, step) in case.steps.iter().enumerate() {
            let dir = tempfile::tempdir().unwrap();
            support::write_snapshot(
                &support::step_snapshot(&case, i),
                &dir.path().join("manifests.yaml"),
            );
            let ports: Vec<u16> = step.probes.iter().map(|p| p.port).collect();
            let protocols: Vec<String> = step.probes.iter().map(|p| p.protocol.clone()).collect();
            let entries = run_matrix(
                &dir.path().display().to_string(),
                &ports,
                &protocols,
                step.ipblock_matches_pods,
            );
            runs += 1;
            for e in &entries {
                let mut keys: Vec<&String> = e.as_object().unwrap().keys().collect();
                keys.sort();
                assert_eq!(keys, ["from", "port", "protocol", "to", "verdict"], "{e}");
                assert_ne!(e["from"], e["to"], "a pod to itself is left out");
            }
            for probe in &step.probes {
                let actual: BTreeMap<(String, String), netwatch::policy::PolicyVerdict> = entries
                    .iter()
                    .filter(|e| e["port"] == probe.port && e["protocol"] == probe.protocol.as_str())
                    .map(|e| {
                        let v = if e["verdict"] == "ALLOWED" {
                            netwatch::policy::PolicyVerdict::Allowed
                        } else {
                            netwatch::policy::PolicyVerdict::Denied
                        };
                        (
                            (
                                e["from"].as_str().unwrap().to_string(),
                                e["to"].as_str().unwrap().to_string(),
                            ),
                            v,
                        )
                    })
                    .collect();
                let diff = support::diff(&support::parse_table(&probe.reachability), &actual);
                if !diff.is_empty() {
                    failures.push(format!(
                        "{} step {} {}/{}:\n  {}",
                        case.file,
                        i + 1,
                        probe.port,
                        probe.protocol,
                        diff.join("\n  ")
                    ));
                }
            }
        }
    }
    assert!(runs > 60);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn matrix_defaults_to_ports_80_and_81_over_tcp_and_prints_a_grid() {
    let (_d, dir) = manifests_dir(DENY_X_INGRESS);
    let o = netwatch(&["explain", "--manifests", &dir, "--matrix", "-o", "json"]);
    let entries: Vec<Value> = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(entries.len(), 2 * 72);
    assert!(entries.iter().all(|e| e["protocol"] == "TCP"));
    assert!(
        stderr(&o).contains("ipBlock peers match pod IPs: yes"),
        "{}",
        stderr(&o)
    );

    let o = netwatch(&[
        "explain",
        "--manifests",
        &dir,
        "--matrix",
        "--ports",
        "80",
        "--protocols",
        "udp",
    ]);
    assert_eq!(o.status.code(), Some(0));
    let text = stdout(&o);
    assert!(text.contains("\n80/UDP\n"), "{text}");
    assert!(
        text.contains("    x/a x/b x/c y/a y/b y/c z/a z/b z/c\n"),
        "{text}"
    );
    assert!(
        text.contains("\nx/a -   X   X   .   .   .   .   .   .\n"),
        "{text}"
    );
    assert!(
        text.contains("\ny/a X   X   X   -   .   .   .   .   .\n"),
        "{text}"
    );
}

#[test]
fn manifests_can_come_from_stdin_and_several_paths() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_netwatch"))
        .args([
            "explain",
            "--manifests",
            &cluster(),
            "-",
            "--from",
            "y/a",
            "--to",
            "x/b",
            "--port",
            "80",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(DENY_X_INGRESS.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        stdout(&o).starts_with("DENIED"),
        "{}{}",
        stdout(&o),
        stderr(&o)
    );
}

fn assert_input_error(o: &Output, parts: &[&str]) {
    assert_eq!(
        o.status.code(),
        Some(2),
        "stdout: {}\nstderr: {}",
        stdout(o),
        stderr(o)
    );
    let err = stderr(o);
    assert!(!err.contains("panicked"), "{err}");
    for part in parts {
        assert!(err.contains(part), "{part:?} not in {err}");
    }
}

#[test]
fn bad_input_is_a_clear_error_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let bad_cidr = write(
        "bad-cidr.yaml",
        &format!(
            "{DENY_X_INGRESS}---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: x}}\nspec:\n  podSelector: {{}}\n  egress:\n  - to: [{{ipBlock: {{cidr: 10.0.0.300/8}}}}]\n"
        ),
    );
    let run = |path: &Path| explain(&path.display().to_string(), "x/a", "x/b", "80", &[]);
    let o = run(&bad_cidr);
    assert_input_error(
        &o,
        &[
            "bad-cidr.yaml",
            "document 2",
            "NetworkPolicy x/p",
            "spec.egress[0].to[0].ipBlock.cidr",
            "invalid CIDR",
            "fix:",
        ],
    );
    assert_eq!(stderr(&o).lines().count(), 1, "one line: {}", stderr(&o));

    let bad_op = write(
        "bad-op.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector:\n    matchExpressions: [{key: app, operator: Has}]\n",
    );
    assert_input_error(
        &run(&bad_op),
        &[
            "bad-op.yaml",
            "document 1",
            "spec.podSelector.matchExpressions[0].operator",
            "unknown operator \"Has\"",
        ],
    );

    let bad_yaml = write(
        "bad.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a\n",
    );
    assert_input_error(
        &run(&bad_yaml),
        &["bad.yaml:", "document 1 is not valid YAML"],
    );

    let bad_type = write(
        "bad-type.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x}\nspec: {containers: [{name: c, ports: [{containerPort: eighty}]}]}\n",
    );
    assert_input_error(
        &run(&bad_type),
        &[
            "bad-type.yaml",
            "document 1",
            "Pod x/a",
            "spec.containers[0].ports[0].containerPort",
        ],
    );

    let missing = dir.path().join("missing.yaml");
    assert_input_error(
        &run(&missing),
        &["missing.yaml", "check that the path exists"],
    );

    let c = cluster();
    assert_input_error(
        &explain(&c, "x/zz", "x/a", "80", &[]),
        &["pod x/zz is not in the manifests", "pods in x: a, b, c"],
    );
    assert_input_error(
        &explain(&c, "nonsense", "x/a", "80", &[]),
        &["--from", "namespace/pod"],
    );
    assert_input_error(&explain(&c, "x/a", "x/b", "0", &[]), &["--port"]);
    assert_input_error(
        &explain(&c, "x/a", "x/b", "80", &["--protocol", "ICMP"]),
        &["ICMP"],
    );
    assert_input_error(
        &netwatch(&["explain", "--manifests", &c, "--from", "x/a", "--to", "x/b"]),
        &["--port"],
    );
    assert_input_error(
        &netwatch(&["explain", "--manifests", &c, "--matrix", "--from", "x/a"]),
        &["--from"],
    );
    assert_input_error(
        &netwatch(&["explain", "--from", "x/a", "--to", "x/b", "--port", "80"]),
        &["--manifests"],
    );
}

#[test]
fn help_documents_the_forms_defaults_and_examples() {
    let o = netwatch(&["explain", "--help"]);
    assert_eq!(o.status.code(), Some(0));
    let help = stdout(&o);
    for part in [
        "--manifests",
        "namespace:key=value",
        "[default: 80,81]",
        "[default: TCP]",
        "--ipblock-matches-pods",
        "Calico",
        "Examples:",
        "--suggest | kubectl apply -f -",
    ] {
        assert!(help.contains(part), "{part:?} not in --help:\n{help}");
    }
    let o = netwatch(&["--help"]);
    assert!(stdout(&o).contains("explain") && stdout(&o).contains("lint"));
}

/// The prod-default-deny scenario: its cluster and the change that broke it.
fn scenario() -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/prod-default-deny");
    let out = std::env::temp_dir().join(format!(
        "netwatch-prod-default-deny-{}.yaml",
        std::process::id()
    ));
    let mut text = std::fs::read_to_string(dir.join("manifests/cluster.yaml")).unwrap();
    text.push_str("\n---\n");
    text.push_str(&std::fs::read_to_string(dir.join("change/policies.yaml")).unwrap());
    std::fs::write(&out, text).unwrap();
    out.display().to_string()
}

#[test]
fn a_service_destination_means_its_backends_and_the_fix_selects_pods() {
    let m = scenario();
    let web = "prod/web-7f9c4-q8z2m";
    for to in ["kube-system/kube-dns", "10.96.0.10"] {
        let o = explain(&m, web, to, "53", &["--protocol", "UDP"]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        assert!(
            stderr(&o)
                .contains("is service kube-system/kube-dns: judging its backend kube-system/"),
            "{}",
            stderr(&o)
        );
        assert!(stdout(&o).starts_with("DENIED"), "{}", stdout(&o));
        let s = explain(&m, web, to, "53", &["--protocol", "UDP", "--suggest"]);
        let yaml = stdout(&s);
        assert!(
            yaml.contains("namespaceSelector") && yaml.contains("k8s-app: kube-dns"),
            "{yaml}"
        );
        assert!(
            !yaml.contains("ipBlock") && !yaml.contains("DoesNotExist"),
            "no ipBlock of a cluster IP, no selector that selects nothing: {yaml}"
        );
    }
}

#[test]
fn exit_code_and_named_ports() {
    let m = scenario();
    let o = explain(
        &m,
        "prod:app=web",
        "kube-system/kube-dns",
        "53",
        &["--protocol", "UDP", "--exit-code"],
    );
    assert_eq!(
        o.status.code(),
        Some(1),
        "DENIED with --exit-code: {}",
        stderr(&o)
    );
    let o = explain(
        &m,
        "prod:app=web",
        "kube-system/kube-dns",
        "53",
        &["--protocol", "UDP"],
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "the verdict is in the output without it"
    );
    let o = explain(&m, "prod:app=web", "kube-system/kube-dns", "http", &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("\"http\" is a port name; give the number"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn text_output_fits_80_columns() {
    let m = scenario();
    let o = Command::new(env!("CARGO_BIN_EXE_netwatch"))
        .args([
            "explain",
            "--manifests",
            &m,
            "--from",
            "prod:app=web",
            "--to",
            "kube-system/kube-dns",
            "--port",
            "53",
            "--protocol",
            "UDP",
        ])
        .env("COLUMNS", "80")
        .output()
        .unwrap();
    let text = stdout(&o);
    assert!(text.lines().all(|l| l.chars().count() <= 80), "{text}");
    assert!(text.lines().count() > 3, "{text}");
}
