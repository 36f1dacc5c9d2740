//! The Kubernetes e2e NetworkPolicy truth tables (tests/data/policy/
//! conformance) through the Calico evaluator: NetworkPolicies as Calico
//! runs them, Allow-only policies of the `default` tier at order 1000 with
//! the end-of-tier deny. It shares no matching code with the engine, so
//! agreeing with the tables checks its selectors, peers, ports, named
//! ports, ipBlocks and `types` defaulting. Calico's ipBlocks match pod
//! addresses, so steps that assume otherwise are left out.

#[path = "policy_support/mod.rs"]
mod support;

use std::collections::BTreeMap;

use netwatch::policy::PolicyVerdict as Verdict;
use netwatch::policy::api::calico::{CalicoFlow, CalicoObjects, CalicoPolicies, endpoints};

#[test]
fn the_e2e_truth_tables_hold_for_networkpolicies_in_calicos_default_tier() {
    let mut failures = Vec::new();
    let mut probes = 0;
    for case in support::cases() {
        for (i, step) in case.steps.iter().enumerate() {
            if step.ipblock_matches_pods == Some(false) {
                continue;
            }
            let snapshot = support::step_snapshot(&case, i);
            let policies = CalicoPolicies::build(CalicoObjects {
                kubernetes_network_policies: &snapshot.network_policies,
                ..CalicoObjects::default()
            })
            .unwrap_or_else(|e| panic!("{}: {e}", case.file));
            let pods = endpoints(&snapshot);
            for probe in &step.probes {
                probes += 1;
                let protocol = match probe.protocol.as_str() {
                    "UDP" => 17,
                    "SCTP" => 132,
                    _ => 6,
                };
                let expected = support::parse_table(&probe.reachability);
                let actual: BTreeMap<(String, String), Verdict> = expected
                    .keys()
                    .map(|(from, to)| {
                        let flow = CalicoFlow {
                            source: pods[from].clone(),
                            destination: pods[to].clone(),
                            protocol,
                            port: probe.port,
                            icmp: None,
                            source_port: None,
                        };
                        let verdict = if policies.judge_flow(&flow).0 {
                            Verdict::Allowed
                        } else {
                            Verdict::Denied
                        };
                        ((from.clone(), to.clone()), verdict)
                    })
                    .collect();
                let diff = support::diff(&expected, &actual);
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
    assert!(probes > 80, "only {probes} probes");
    assert!(
        failures.is_empty(),
        "{} failing probes:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
