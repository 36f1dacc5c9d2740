//! The Kubernetes e2e NetworkPolicy suite's cases, as truth tables in data
//! files (tests/data/policy/conformance), against the engine: the fast path
//! (`decide`), the explaining path (`evaluate`) and the connectivity matrix
//! must all give the table's verdict for every pair of distinct pods.

#[path = "policy_support/mod.rs"]
mod support;

use std::collections::BTreeMap;

use netwatch::policy::{EngineOptions, Peer, PolicyEngine, PolicyVerdict, connectivity_matrix};

fn pod(s: &str) -> Peer {
    s.parse().unwrap()
}

#[test]
fn the_e2e_cases_are_all_there() {
    let cases = support::cases();
    let upstream = cases.iter().filter(|c| c.upstream.is_some()).count();
    assert!(upstream >= 45, "only {upstream} upstream cases found");
    assert!(cases.len() >= 60, "only {} cases found", cases.len());
    let protocols: std::collections::BTreeSet<String> = cases
        .iter()
        .flat_map(|c| &c.steps)
        .flat_map(|s| &s.probes)
        .map(|p| p.protocol.clone())
        .collect();
    assert_eq!(
        protocols.into_iter().collect::<Vec<_>>(),
        ["SCTP", "TCP", "UDP"]
    );
}

#[test]
fn every_case_matches_its_truth_table() {
    let mut failures = Vec::new();
    let mut probes = 0;
    for case in support::cases() {
        for (i, step) in case.steps.iter().enumerate() {
            let snapshot = support::step_snapshot(&case, i);
            let options = EngineOptions {
                ipblock_matches_pods: step.ipblock_matches_pods.unwrap_or(true),
            };
            let engine = PolicyEngine::new(&snapshot, options)
                .unwrap_or_else(|e| panic!("{}: {e}", case.file));
            for probe in &step.probes {
                probes += 1;
                let expected = support::parse_table(&probe.reachability);
                assert_eq!(
                    expected.len(),
                    72,
                    "{}: a table covers 9x8 pairs",
                    case.file
                );
                let protocol = probe.protocol();
                let mut decided = BTreeMap::new();
                let mut explained = BTreeMap::new();
                for (from, to) in expected.keys() {
                    let key = (from.clone(), to.clone());
                    decided.insert(
                        key.clone(),
                        engine.decide(&pod(from), &pod(to), probe.port, protocol),
                    );
                    explained.insert(
                        key,
                        engine
                            .evaluate(&pod(from), &pod(to), probe.port, protocol)
                            .verdict,
                    );
                }
                let matrix: BTreeMap<(String, String), PolicyVerdict> =
                    connectivity_matrix(&engine, &[probe.port], &[protocol])
                        .into_iter()
                        .map(|e| ((e.from, e.to), e.verdict))
                        .collect();
                for (how, actual) in [
                    ("decide", &decided),
                    ("evaluate", &explained),
                    ("matrix", &matrix),
                ] {
                    let diff = support::diff(&expected, actual);
                    if !diff.is_empty() {
                        failures.push(format!(
                            "{} step {} ({}) {}/{} via {how}:\n  {}",
                            case.file,
                            i + 1,
                            step.description.as_deref().unwrap_or("-"),
                            probe.port,
                            probe.protocol,
                            diff.join("\n  ")
                        ));
                    }
                }
            }
        }
    }
    assert!(probes > 80, "only {probes} probes");
    assert!(
        failures.is_empty(),
        "{} failing probes:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
