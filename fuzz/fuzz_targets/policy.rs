//! The policy model and its evaluation: arbitrary NetworkPolicy manifests
//! over a fixed set of pods. Compiling never panics, and for every pair of
//! peers the fast verdict (`decide`) is the explained one (`evaluate`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use netwatch::{
    manifests,
    policy::{EngineOptions, Peer, PolicyEngine},
    record::Protocol,
};

const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: prod, labels: { team: a } }
---
apiVersion: v1
kind: Namespace
metadata: { name: dev }
---
apiVersion: v1
kind: Pod
metadata: { name: web, namespace: prod, labels: { app: web, tier: frontend } }
spec: { containers: [ { name: c, ports: [ { name: http, containerPort: 8080 } ] } ] }
status: { podIP: 10.0.0.1 }
---
apiVersion: v1
kind: Pod
metadata: { name: api, namespace: prod, labels: { app: api } }
spec: { containers: [ { name: c, ports: [ { name: http, containerPort: 9090, protocol: UDP } ] } ] }
status: { podIP: 10.0.0.2 }
---
apiVersion: v1
kind: Pod
metadata: { name: tool, namespace: dev }
status: { podIP: 10.0.1.1 }
"#;

/// A port, a protocol, an address, whether ipBlocks match pods, then the
/// policies' text (last: it takes the rest of the input).
type Input<'a> = (u16, u8, [u8; 4], bool, &'a str);

fuzz_target!(|input: Input| {
    let (port, protocol, address, ipblock_matches_pods, policies) = input;
    let text = format!("{PODS}\n---\n{policies}");
    let Ok(snapshot) = manifests::load_str("fuzz.yaml", &text) else {
        return;
    };
    let options = EngineOptions {
        ipblock_matches_pods,
    };
    let Ok(engine) = PolicyEngine::new(&snapshot, options) else {
        return;
    };
    let protocol = match protocol % 3 {
        0 => Protocol::Tcp,
        1 => Protocol::Udp,
        _ => Protocol::Sctp,
    };
    let peers = [
        "prod/web".parse::<Peer>().unwrap(),
        "prod/api".parse().unwrap(),
        "dev/tool".parse().unwrap(),
        Peer::Ip(std::net::Ipv4Addr::from(address).into()),
    ];
    for from in &peers {
        for to in &peers {
            let fast = engine.decide(from, to, port, protocol);
            let full = engine.evaluate(from, to, port, protocol);
            assert_eq!(
                fast, full.verdict,
                "decide and evaluate disagree on {from} -> {to} {port}/{protocol:?}"
            );
            let _ = full.sentence();
        }
    }
});
