//! The connectivity table between every pair of pods: the truth table a CI
//! job compares a policy change against.

use serde::Serialize;

use super::evaluate::{PolicyEngine, PolicyVerdict};
use super::model::Protocol;

/// One cell of the table. Serializes to
/// `{"from": "x/a", "to": "y/b", "port": 80, "protocol": "TCP", "verdict": "ALLOWED"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MatrixEntry {
    pub from: String,
    pub to: String,
    pub port: u16,
    pub protocol: Protocol,
    pub verdict: PolicyVerdict,
    /// With staged Calico policies: the verdict once they are enforced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub staged_verdict: Option<PolicyVerdict>,
}

/// Every ordered pair of distinct pods, for each port and protocol, ordered
/// by port, protocol, source, destination (pods sorted by namespace/name).
/// A pod to itself is left out: the API does not say what loopback does.
pub fn connectivity_matrix(
    engine: &PolicyEngine,
    ports: &[u16],
    protocols: &[Protocol],
) -> Vec<MatrixEntry> {
    let pods = engine.model.sorted_pods();
    let names: Vec<String> = pods
        .iter()
        .map(|&i| {
            let p = &engine.model.pods[i as usize];
            format!(
                "{}/{}",
                engine.model.namespaces[p.namespace as usize].name, p.name
            )
        })
        .collect();
    let mut entries = Vec::with_capacity(
        ports.len() * protocols.len() * pods.len() * pods.len().saturating_sub(1),
    );
    for &port in ports {
        for &protocol in protocols {
            for (fi, &from) in pods.iter().enumerate() {
                for (ti, &to) in pods.iter().enumerate() {
                    if fi == ti {
                        continue;
                    }
                    entries.push(MatrixEntry {
                        from: names[fi].clone(),
                        to: names[ti].clone(),
                        port,
                        protocol,
                        verdict: engine.decide_pods(from, to, port, protocol),
                        staged_verdict: engine.staged_pods(from, to, port, protocol),
                    });
                }
            }
        }
    }
    entries
}
