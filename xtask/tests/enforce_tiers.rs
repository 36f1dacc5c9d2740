//! The lab enforcer's Admin and Baseline tiers (ClusterNetworkPolicy,
//! AdminNetworkPolicy, BaselineAdminNetworkPolicy) checked three ways:
//!
//! - against kubernetes-sigs/network-policy-api's conformance tests, as
//!   transcribed in netwatch-agent/tests/data/policy/cluster-conformance:
//!   every probe of every step through the compiled nftables chains
//!   ([`CompiledCluster::decide`], which runs the rule text), no root needed;
//! - a subset of those probes with real packets: a lab built from the same
//!   cluster, the chains loaded into nftables, TCP and UDP probes;
//! - against netwatch's engine on random policy sets: `netwatch explain
//!   --matrix -o json` (the engine, a separate program) and the compiled
//!   chains must reach the same verdict on every pair, port and protocol.

mod support;

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use xtask::lab::{
    EnforceOptions, Lab, LabCluster, LabSpec, Manifests, Outcome, PodPlacement, Probe,
    enforce::{CompiledCluster, L4},
};

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    steps: Vec<Step>,
    #[serde(skip)]
    file: String,
}

#[derive(Debug, Deserialize)]
struct Step {
    description: Option<String>,
    #[serde(default)]
    namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    policies: String,
    probes: Vec<CorpusProbe>,
}

#[derive(Debug, Deserialize)]
struct CorpusProbe {
    from: String,
    to: String,
    port: u16,
    protocol: String,
    expect: String,
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../netwatch-agent/tests/data/policy/cluster-conformance")
}

fn cases() -> Vec<Case> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .expect("the conformance corpus")
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
            let mut case: Case = serde_yaml::from_str(&std::fs::read_to_string(&f).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            case.file = f.file_name().unwrap().to_string_lossy().into_owned();
            case
        })
        .collect()
}

/// The corpus cluster with a step's namespace labels and policies.
fn step_manifests(case: &Case, step: &Step) -> Manifests {
    let mut m = Manifests::load(&corpus_dir().join("cluster.yaml")).expect("cluster.yaml");
    for (ns, labels) in &step.namespace_labels {
        let n = m
            .namespaces
            .iter_mut()
            .find(|n| n.metadata.name.as_deref() == Some(ns))
            .expect("namespace");
        n.metadata.labels = Some(labels.clone());
    }
    m.extend(Manifests::parse(&case.file, &step.policies).unwrap_or_else(|e| panic!("{e}")));
    m
}

/// Pod-network pods spread over two nodes; hostNetwork pods are node traffic.
fn placements(m: &Manifests) -> Vec<PodPlacement> {
    m.pods
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let host = p
                .spec
                .as_ref()
                .and_then(|s| s.host_network)
                .unwrap_or(false);
            PodPlacement {
                namespace: p.metadata.namespace.clone().unwrap_or_default(),
                name: p.metadata.name.clone().unwrap_or_default(),
                node: format!("node-{}", 1 + i % 2),
                host_if: if host {
                    String::new()
                } else {
                    format!("cali{i:011}")
                },
                ips: Vec::new(),
                host_network: host,
            }
        })
        .collect()
}

fn address(cluster: &LabCluster, id: &str) -> IpAddr {
    cluster.pod(id).unwrap_or_else(|| panic!("no pod {id}")).ips[0]
}

#[test]
fn every_probe_of_the_upstream_conformance_tests_through_the_compiled_chains() {
    let mut failures = Vec::new();
    let mut probes = 0;
    let cases = cases();
    assert_eq!(cases.len(), 48, "24 v1alpha2 and 24 v1alpha1 tests");
    for case in &cases {
        for (i, step) in case.steps.iter().enumerate() {
            let m = step_manifests(case, step);
            let placed = placements(&m);
            let cluster = LabCluster::new(m, placed).unwrap_or_else(|e| panic!("{e}"));
            let compiled = CompiledCluster::new(&cluster, &EnforceOptions::default())
                .unwrap_or_else(|e| panic!("{} step {}: {e}", case.file, i + 1));
            for p in &step.probes {
                probes += 1;
                let protocol = L4::from_api(Some(&p.protocol)).unwrap();
                let decision = compiled
                    .decide(&p.from, address(&cluster, &p.to), protocol, p.port)
                    .unwrap_or_else(|e| panic!("{}: {e}", case.file));
                let want = p.expect == "allowed";
                if decision.allowed() != want {
                    failures.push(format!(
                        "{} ({}) step {} [{}]: {} -> {} {}/{}: expected {}, the chains: {decision:?}",
                        case.file,
                        case.name,
                        i + 1,
                        step.description.as_deref().unwrap_or("-"),
                        p.from,
                        p.to,
                        p.port,
                        p.protocol,
                        p.expect
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

/// Real packets: the corpus cluster as a lab (pods on two nodes; the
/// host-network centaurs left out, their addresses are the suite's), the
/// steps of a few upstream tests loaded in turn, every TCP and UDP probe to
/// a pod sent for real.
#[test]
fn a_subset_of_the_conformance_probes_with_real_packets() {
    let chosen = [
        "v1alpha2-cnp-admin-tier-gress.yaml",
        "v1alpha2-cnp-baseline-tier-gress.yaml",
        "v1alpha2-cnp-admin-tier-integration.yaml",
        "v1alpha1-admin-network-policy-integration.yaml",
        "v1alpha1-baseline-admin-network-policy-egress-udp.yaml",
        "v1alpha1-admin-network-policy-gress.yaml",
    ];
    let cases: Vec<Case> = cases()
        .into_iter()
        .filter(|c| chosen.contains(&c.file.as_str()))
        .collect();
    assert_eq!(cases.len(), chosen.len());
    let mut base = Manifests::load(&corpus_dir().join("cluster.yaml")).unwrap();
    base.pods.retain(|p| {
        !p.spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false)
    });
    for (i, p) in base.pods.iter_mut().enumerate() {
        p.spec.as_mut().unwrap().node_name = Some(format!("node-{}", 1 + i % 2));
    }
    let (spec, _) = LabSpec::from_manifests(&base).unwrap_or_else(|e| panic!("{e}"));
    let lab = Lab::up(&spec, &support::helper()).expect("lab up (are you root?)");
    let mut failures = Vec::new();
    let mut sent = 0;
    for case in &cases {
        for (i, step) in case.steps.iter().enumerate() {
            let mut m = base.clone();
            let full = step_manifests(case, step);
            m.namespaces = full.namespaces;
            m.network_policies = full.network_policies;
            m.tier_policies = full.tier_policies;
            let cluster = LabCluster::new(m, lab.placements()).unwrap();
            lab.enforce(&cluster, &EnforceOptions::default())
                .unwrap_or_else(|e| panic!("{} step {}: {e}", case.file, i + 1));
            for p in &step.probes {
                let Some(to) = cluster.pod(&p.to).filter(|t| !t.host_network) else {
                    continue;
                };
                let target = SocketAddr::new(to.ips[0], p.port);
                let probe = match p.protocol.as_str() {
                    "TCP" => Probe::tcp(target, TIMEOUT),
                    "UDP" => Probe::udp(target, TIMEOUT),
                    _ => continue,
                };
                sent += 1;
                let mut got = lab.probe(&p.from, &probe).expect("probe").outcome;
                if got == Outcome::TimedOut && p.expect == "allowed" {
                    let retry = match p.protocol.as_str() {
                        "TCP" => Probe::tcp(target, RETRY),
                        _ => Probe::udp(target, RETRY),
                    };
                    got = lab.probe(&p.from, &retry).expect("probe").outcome;
                }
                // Reached: the pod answered, or refused (nothing listens on
                // that port: the packet got through all the same).
                let reached = got != Outcome::TimedOut && got != Outcome::Error;
                let want = p.expect == "allowed";
                if reached != want {
                    failures.push(format!(
                        "{} step {}: {} -> {} {}/{}: expected {}, got {got:?}",
                        case.file,
                        i + 1,
                        p.from,
                        p.to,
                        p.port,
                        p.protocol,
                        p.expect
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {sent} real probes disagree with upstream:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(sent >= 100, "only {sent} probes sent");
}

const TIMEOUT: Duration = Duration::from_secs(1);
const RETRY: Duration = Duration::from_secs(3);
