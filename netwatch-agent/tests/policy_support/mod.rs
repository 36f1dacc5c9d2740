//! Shared by the policy tests: the conformance cases (data files under
//! tests/data/policy/conformance) and the e2e suite's cluster.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use netwatch::cluster::ClusterSnapshot;
use netwatch::manifests;
use netwatch::policy::{PolicyVerdict, Protocol};
use serde::Deserialize;

pub fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/policy")
}

/// One conformance case file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    pub upstream: Option<String>,
    pub note: Option<String>,
    pub steps: Vec<Step>,
    #[serde(skip)]
    pub file: String,
}

/// A state of the cluster and what to probe in it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub description: Option<String>,
    /// Labels added to namespaces (the e2e suite's label updates).
    #[serde(default)]
    pub namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    /// Labels added to pods, by `namespace/pod`.
    #[serde(default)]
    pub pod_labels: BTreeMap<String, BTreeMap<String, String>>,
    pub ipblock_matches_pods: Option<bool>,
    /// NetworkPolicies, multi-document YAML.
    pub policies: String,
    pub probes: Vec<Probe>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    pub port: u16,
    pub protocol: String,
    pub reachability: String,
}

impl Probe {
    pub fn protocol(&self) -> Protocol {
        self.protocol.parse().expect("protocol")
    }
}

/// Every case file, sorted by name.
pub fn cases() -> Vec<Case> {
    let dir = data_dir().join("conformance");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("conformance data dir")
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().as_bytes()[0].is_ascii_digit())
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

/// The e2e cluster: namespaces x, y, z; pods a, b, c in each.
pub fn cluster() -> ClusterSnapshot {
    manifests::load(&[data_dir().join("conformance/cluster.yaml")]).expect("cluster.yaml loads")
}

/// The cluster of a step: labels updated, the step's policies in place.
pub fn step_snapshot(case: &Case, index: usize) -> ClusterSnapshot {
    let step = &case.steps[index];
    let mut snapshot = cluster();
    for (ns, labels) in &step.namespace_labels {
        let obj = snapshot
            .namespaces
            .iter_mut()
            .find(|n| n.metadata.name.as_deref() == Some(ns))
            .expect("namespace");
        obj.metadata
            .labels
            .get_or_insert_with(Default::default)
            .extend(labels.clone());
    }
    for (pod, labels) in &step.pod_labels {
        let (ns, name) = pod.split_once('/').unwrap();
        let obj = snapshot
            .pods
            .iter_mut()
            .find(|p| p.namespace() == ns && p.name() == Some(name))
            .expect("pod");
        let mut edited = obj.labels().clone();
        edited.extend(labels.clone());
        obj.set_labels(edited);
    }
    let policies = manifests::load_str(
        &format!("{} step {} policies", case.file, index + 1),
        &step.policies,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    snapshot.network_policies = policies.network_policies;
    snapshot
}

/// A truth table: (from, to) -> verdict, the diagonal left out.
pub fn parse_table(text: &str) -> BTreeMap<(String, String), PolicyVerdict> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines
        .next()
        .expect("header")
        .split_whitespace()
        .skip(1)
        .collect();
    let mut table = BTreeMap::new();
    for line in lines {
        let mut cells = line.split_whitespace();
        let from = cells.next().unwrap();
        let marks: Vec<&str> = cells.collect();
        assert_eq!(
            marks.len(),
            header.len(),
            "row {from} has {} cells",
            marks.len()
        );
        for (to, mark) in header.iter().zip(marks) {
            let verdict = match mark {
                "." => PolicyVerdict::Allowed,
                "X" => PolicyVerdict::Denied,
                "-" => {
                    assert_eq!(from, *to, "`-` off the diagonal");
                    continue;
                }
                other => panic!("unknown mark {other:?}"),
            };
            table.insert((from.to_string(), to.to_string()), verdict);
        }
    }
    table
}

/// Renders differences between two tables as `from -> to: expected X, got Y`.
pub fn diff(
    expected: &BTreeMap<(String, String), PolicyVerdict>,
    actual: &BTreeMap<(String, String), PolicyVerdict>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (key, want) in expected {
        match actual.get(key) {
            Some(got) if got == want => {}
            got => out.push(format!(
                "{} -> {}: expected {want}, got {got:?}",
                key.0, key.1
            )),
        }
    }
    for key in actual.keys() {
        if !expected.contains_key(key) {
            out.push(format!("{} -> {}: not expected in the table", key.0, key.1));
        }
    }
    out
}

/// Writes a snapshot's objects as one multi-document YAML file.
pub fn write_snapshot(snapshot: &ClusterSnapshot, path: &Path) {
    let mut text = String::new();
    for ns in &snapshot.namespaces {
        text.push_str("---\n");
        text.push_str(&serde_yaml::to_string(ns).unwrap());
    }
    for pod in &snapshot.pods {
        text.push_str("---\n");
        text.push_str(&serde_yaml::to_string(&pod.to_pod()).unwrap());
    }
    for np in &snapshot.network_policies {
        text.push_str("---\n");
        text.push_str(&serde_yaml::to_string(np).unwrap());
    }
    std::fs::write(path, text).unwrap();
}
