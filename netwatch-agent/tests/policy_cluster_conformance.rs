//! kubernetes-sigs/network-policy-api's conformance tests, v1alpha2
//! (ClusterNetworkPolicy, v0.2.0) and v1alpha1 (AdminNetworkPolicy and
//! BaselineAdminNetworkPolicy, v0.1.7), transcribed into data files
//! (tests/data/policy/cluster-conformance): every connection each test
//! probes, in the cluster state the test has patched its policies into by
//! then, with the expected outcome. The engine's fast path (`decide`), its
//! explaining path (`evaluate`) and the connectivity matrix must all agree
//! with every probe.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use netwatch::cluster::ClusterSnapshot;
use netwatch::manifests;
use netwatch::policy::{
    EngineOptions, Peer, PolicyEngine, PolicyVerdict, Protocol, connectivity_matrix,
};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    api: String,
    upstream: String,
    features: Vec<String>,
    steps: Vec<Step>,
    #[serde(skip)]
    file: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Step {
    description: Option<String>,
    /// Namespace labels as the test set them (replacing the base's).
    #[serde(default)]
    namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    /// Every policy object at this point, multi-document YAML.
    policies: String,
    probes: Vec<Probe>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Probe {
    from: String,
    to: String,
    port: u16,
    protocol: String,
    expect: String,
}

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/policy/cluster-conformance")
}

fn cases() -> Vec<Case> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("v1alpha")
        })
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(&f).unwrap();
            let mut case: Case =
                serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            case.file = f.file_name().unwrap().to_string_lossy().into_owned();
            case
        })
        .collect()
}

fn step_snapshot(case: &Case, i: usize) -> ClusterSnapshot {
    let step = &case.steps[i];
    let mut snapshot = manifests::load(&[dir().join("cluster.yaml")]).expect("cluster.yaml loads");
    for (ns, labels) in &step.namespace_labels {
        let obj = snapshot
            .namespaces
            .iter_mut()
            .find(|n| n.metadata.name.as_deref() == Some(ns))
            .expect("namespace");
        obj.metadata.labels = Some(labels.clone());
    }
    let policies = manifests::load_str(&format!("{} step {}", case.file, i + 1), &step.policies)
        .unwrap_or_else(|e| panic!("{e}"));
    snapshot.network_policies = policies.network_policies;
    snapshot.cluster_network_policies = policies.cluster_network_policies;
    snapshot.admin_network_policies = policies.admin_network_policies;
    snapshot.baseline_admin_network_policies = policies.baseline_admin_network_policies;
    snapshot
}

#[test]
fn both_versions_and_every_upstream_test_are_there() {
    let cases = cases();
    let by_api: BTreeMap<&str, usize> = cases.iter().fold(BTreeMap::new(), |mut m, c| {
        *m.entry(c.api.as_str()).or_default() += 1;
        m
    });
    assert_eq!(by_api.get("v1alpha2"), Some(&24), "{by_api:?}");
    assert_eq!(by_api.get("v1alpha1"), Some(&24), "{by_api:?}");
    let probes: usize = cases
        .iter()
        .flat_map(|c| &c.steps)
        .map(|s| s.probes.len())
        .sum();
    assert!(probes >= 550, "only {probes} probes");
    let protocols: BTreeSet<&str> = cases
        .iter()
        .flat_map(|c| &c.steps)
        .flat_map(|s| &s.probes)
        .map(|p| p.protocol.as_str())
        .collect();
    assert_eq!(
        protocols.into_iter().collect::<Vec<_>>(),
        ["SCTP", "TCP", "UDP"]
    );
    for c in &cases {
        assert!(c.upstream.contains("conformance/tests/"), "{}", c.file);
        assert!(!c.features.is_empty(), "{}", c.file);
    }
}

#[test]
fn every_probe_of_every_upstream_test_gets_the_expected_outcome() {
    let mut failures = Vec::new();
    let mut probes = 0;
    for case in cases() {
        for (i, step) in case.steps.iter().enumerate() {
            let snapshot = step_snapshot(&case, i);
            let engine = PolicyEngine::new(&snapshot, EngineOptions::default())
                .unwrap_or_else(|e| panic!("{} step {}: {e}", case.file, i + 1));
            for probe in &step.probes {
                probes += 1;
                let protocol: Protocol = probe.protocol.parse().unwrap();
                let (from, to): (Peer, Peer) =
                    (probe.from.parse().unwrap(), probe.to.parse().unwrap());
                let want = match probe.expect.as_str() {
                    "allowed" => PolicyVerdict::Allowed,
                    "denied" => PolicyVerdict::Denied,
                    other => panic!("{}: expect {other:?}", case.file),
                };
                let explained = engine
                    .try_evaluate(&from, &to, probe.port, protocol)
                    .unwrap();
                let decided = engine.decide(&from, &to, probe.port, protocol);
                let matrix = connectivity_matrix(&engine, &[probe.port], &[protocol])
                    .into_iter()
                    .find(|e| e.from == probe.from && e.to == probe.to)
                    .map(|e| e.verdict);
                if explained.verdict != want || decided != want || matrix != Some(want) {
                    failures.push(format!(
                        "{} ({}) step {} [{}]: {} -> {} {}/{}: expected {want}, evaluate {} ({}), decide {decided}, matrix {matrix:?}",
                        case.file,
                        case.name,
                        i + 1,
                        step.description.as_deref().unwrap_or("-"),
                        probe.from,
                        probe.to,
                        probe.port,
                        probe.protocol,
                        explained.verdict,
                        explained.sentence(),
                    ));
                }
            }
        }
    }
    assert!(probes >= 550, "only {probes} probes");
    assert!(
        failures.is_empty(),
        "{} of {probes} probes fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
