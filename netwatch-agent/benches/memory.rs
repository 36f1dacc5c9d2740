//! Live heap of what the agent keeps, at 10,000 pods and 2,000
//! NetworkPolicies (the cluster of `benches/attribution.rs`) and with
//! 100,000 tracked flows: the parts of the RSS `cargo xtask bench --memory`
//! measures on the running agent, and the flow table it cannot fill there.
//!
//! `cargo bench -p netwatch-agent --bench memory`

use std::time::{Duration, SystemTime};

use netwatch::{
    attribution::{Attribution, AttributionConfig},
    capture::{events::KernelEvent, reasons::DropReasons},
    flow::assemble::{AssemblerConfig, FlowAssembler, Signal},
    identity::{IdentityCache, IdentityConfig, kube::strip_snapshot},
    manifests,
    policy::{EngineOptions, PolicyEngine},
};
use netwatch_common::{FlowKey, IP_V4, IPPROTO_TCP, tcp_flags};

#[path = "support/heap.rs"]
mod heap;
use heap::live_bytes;

const NAMESPACES: usize = 50;
const PODS_PER_NAMESPACE: usize = 200;
const POLICIES_PER_NAMESPACE: usize = 40;
const APPS: usize = 20;
const FLOWS: u32 = 100_000;

/// The cluster of `benches/attribution.rs`, as manifest text.
fn manifest_text() -> String {
    let mut docs = Vec::new();
    for n in 0..NAMESPACES {
        docs.push(format!(
            r#"{{"apiVersion":"v1","kind":"Namespace","metadata":{{"name":"ns-{n}","labels":{{"team":"t{}"}}}}}}"#,
            n % 10
        ));
        for i in 0..PODS_PER_NAMESPACE {
            docs.push(format!(
                r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"app-{app}-{i}","namespace":"ns-{n}","uid":"u-{n}-{i}","labels":{{"app":"app-{app}","tier":"t{tier}"}}}},"spec":{{"nodeName":"node-{node}","containers":[{{"name":"c","ports":[{{"name":"http","containerPort":8080}}]}}]}},"status":{{"phase":"Running","podIP":"10.{n}.{c}.{d}","conditions":[{{"type":"Ready","status":"True"}}]}}}}"#,
                app = i % APPS,
                tier = i % 3,
                node = i % 100,
                c = i / 250,
                d = i % 250 + 1,
            ));
        }
        docs.push(format!(
            r#"{{"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy","metadata":{{"name":"default-deny","namespace":"ns-{n}"}},"spec":{{"podSelector":{{}},"policyTypes":["Ingress","Egress"]}}}}"#
        ));
        for p in 1..POLICIES_PER_NAMESPACE {
            let app = p % APPS;
            let from = (p + 1) % APPS;
            docs.push(format!(
                r#"{{"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy","metadata":{{"name":"allow-{p}","namespace":"ns-{n}"}},"spec":{{"podSelector":{{"matchLabels":{{"app":"app-{app}"}}}},"ingress":[{{"from":[{{"podSelector":{{"matchLabels":{{"app":"app-{from}"}}}}}},{{"namespaceSelector":{{"matchLabels":{{"team":"t{t}"}}}},"podSelector":{{"matchExpressions":[{{"key":"tier","operator":"In","values":["t1","t2"]}}]}}}}],"ports":[{{"port":"http"}},{{"port":9000,"endPort":9100}}]}}],"egress":[{{"to":[{{"ipBlock":{{"cidr":"10.0.0.0/8","except":["10.{n}.0.0/16"]}}}}],"ports":[{{"port":443}}]}}]}}}}"#,
                t = p % 10,
            ));
        }
    }
    format!(
        "{{\"apiVersion\":\"v1\",\"kind\":\"List\",\"items\":[{}]}}",
        docs.join(",")
    )
}

/// The n-th flow: a distinct client address and port to one server, denied.
fn dropped(n: u32) -> Signal {
    let mut k = FlowKey {
        src_port: 1024 + (n % 60_000) as u16,
        dst_port: 8080,
        proto: IPPROTO_TCP,
        ip_version: IP_V4,
        ..FlowKey::default()
    };
    k.src_addr[..4].copy_from_slice(&(0x0a00_0000 + n).to_be_bytes());
    k.dst_addr[..4].copy_from_slice(&[10, 96, 0, 1]);
    Signal::Kernel(KernelEvent::Drop {
        time: SystemTime::now(),
        flow: k,
        reason: 12,
        ifindex: 7,
        netns: 1,
        bytes: 60,
        tcp_flags: tcp_flags::SYN,
        outer: None,
    })
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to filter here.
    let mib = |b: isize| b as f64 / 1048576.0;

    let text = manifest_text();
    let before = live_bytes();
    let mut snapshot = manifests::load_str("synthetic.json", &text).expect("synthetic manifests");
    let loaded = live_bytes();
    drop(text);
    strip_snapshot(&mut snapshot);
    let stripped = live_bytes();
    let identity_before = live_bytes();
    let mut identity = IdentityCache::new(IdentityConfig {
        node_name: Some("node-1".into()),
        ..IdentityConfig::default()
    });
    identity.update(&snapshot, SystemTime::now());
    let with_identity = live_bytes();
    let engine = PolicyEngine::new(&snapshot, EngineOptions::default()).expect("valid policies");
    let with_engine = live_bytes();
    drop((identity, engine));
    let mut attribution = Attribution::new(AttributionConfig {
        node_name: "node-1".into(),
        ..AttributionConfig::default()
    });
    let attribution_before = live_bytes();
    attribution.update(&snapshot, true, SystemTime::now());
    let with_attribution = live_bytes();
    println!(
        "heap at {} pods, {} policies: snapshot as loaded {:.1} MiB, stripped {:.1} MiB \
         (a typed Pod is {} bytes before what it points to, a pod record {}); \
         identity cache {:.1} MiB; \
         policy engine {:.1} MiB; both in Attribution {:.1} MiB",
        snapshot.pods.len(),
        snapshot.network_policies.len(),
        mib(loaded - before),
        mib(stripped - before),
        std::mem::size_of::<k8s_openapi::api::core::v1::Pod>(),
        std::mem::size_of::<netwatch::cluster::PodRecord>(),
        mib(with_identity - identity_before),
        mib(with_engine - with_identity),
        mib(with_attribution - attribution_before),
    );
    drop(attribution);

    let reasons = DropReasons::from_pairs([(12, "SKB_DROP_REASON_NETFILTER_DROP".to_string())]);
    let before = live_bytes();
    let mut assembler = FlowAssembler::new(AssemblerConfig {
        max_flows: FLOWS as usize,
        idle_timeout: Duration::from_secs(3600),
        refusal_grace: Duration::ZERO,
        ..AssemblerConfig::default()
    });
    let now = SystemTime::now();
    for n in 0..FLOWS {
        // The records go out (and are dropped) as the daemon publishes them.
        drop(assembler.handle(dropped(n), now, &reasons, &|_| None));
    }
    let tracked = live_bytes();
    println!(
        "heap of the flow assembler tracking {} flows: {:.1} MiB ({:.0} bytes per flow)",
        assembler.active_flows(),
        mib(tracked - before),
        (tracked - before) as f64 / f64::from(FLOWS),
    );
}
