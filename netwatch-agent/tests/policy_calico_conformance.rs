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

use netwatch::cluster::ClusterSnapshot;
use netwatch::policy::Verdict;
use netwatch::policy::api::calico::{CalicoEndpoint, CalicoFlow, CalicoObjects, CalicoPolicies};

fn endpoints(snapshot: &ClusterSnapshot) -> BTreeMap<String, CalicoEndpoint> {
    let namespace_labels = |ns: &str| {
        let mut labels: BTreeMap<String, String> = snapshot
            .namespaces
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(ns))
            .and_then(|n| n.metadata.labels.clone())
            .unwrap_or_default();
        labels.insert("kubernetes.io/metadata.name".into(), ns.into());
        labels
    };
    snapshot
        .pods
        .iter()
        .map(|pod| {
            let ns = pod.metadata.namespace.clone().unwrap_or_default();
            let name = pod.metadata.name.clone().unwrap_or_default();
            let mut e = CalicoEndpoint::pod(
                &ns,
                pod.metadata.labels.clone().unwrap_or_default(),
                namespace_labels(&ns),
            );
            e.ip = pod
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse().ok());
            for container in pod.spec.iter().flat_map(|s| &s.containers) {
                for port in container.ports.iter().flatten() {
                    if let Some(port_name) = &port.name {
                        let protocol = match port.protocol.as_deref() {
                            Some("UDP") => 17,
                            Some("SCTP") => 132,
                            _ => 6,
                        };
                        e.named_ports.push((
                            port_name.clone(),
                            protocol,
                            port.container_port as u16,
                        ));
                    }
                }
            }
            (format!("{ns}/{name}"), e)
        })
        .collect()
}

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
