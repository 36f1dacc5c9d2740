//! Policy engine speed on a large cluster: one verdict with 2,000
//! NetworkPolicies and 10,000 pods, the cache hit the agent takes for most
//! flows, and the engine rebuild the agent does on every change.
//!
//! Run: `cargo bench -p netwatch-agent --bench policy`. Medians are in
//! `target/criterion/<benchmark>/new/estimates.json` ("median").

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Namespace, Pod, PodIP, PodSpec, PodStatus,
};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use netwatch::cluster::{ClusterSnapshot, PodRecord};
use netwatch::policy::{EngineOptions, Peer, PolicyEngine, PolicyVerdict, Protocol, VerdictCache};

const APPS: usize = 20;

fn labels(pairs: &[(&str, String)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn selector(pairs: &[(&str, String)]) -> LabelSelector {
    LabelSelector {
        match_labels: Some(labels(pairs)),
        match_expressions: None,
    }
}

fn port(n: i32, end: Option<i32>, protocol: &str) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(IntOrString::Int(n)),
        end_port: end,
        protocol: Some(protocol.into()),
    }
}

/// `namespaces` namespaces of `pods_per_ns` pods (20 apps, 3 versions, 5
/// rollout hashes) and `policies_per_ns` policies each: a default deny, DNS,
/// then per-app policies mixing pod, namespace and ipBlock peers, port
/// ranges, named ports and matchExpressions.
fn cluster(namespaces: usize, pods_per_ns: usize, policies_per_ns: usize) -> ClusterSnapshot {
    let mut s = ClusterSnapshot::default();
    for n in 0..namespaces {
        let ns = format!("ns-{n}");
        s.namespaces.push(Namespace {
            metadata: ObjectMeta {
                name: Some(ns.clone()),
                labels: Some(labels(&[
                    ("team", format!("team-{}", n % 10)),
                    ("env", "prod".into()),
                ])),
                ..Default::default()
            },
            ..Default::default()
        });
        for j in 0..pods_per_ns {
            let ip = format!("10.{}.{}.{}", n % 250, j / 250, j % 250 + 1);
            s.pods.push(PodRecord::from(Pod {
                metadata: ObjectMeta {
                    name: Some(format!("pod-{j}")),
                    namespace: Some(ns.clone()),
                    labels: Some(labels(&[
                        ("app", format!("app-{}", j % APPS)),
                        ("version", format!("v{}", j % 3)),
                        ("pod-template-hash", format!("h{}", j % 5)),
                    ])),
                    ..Default::default()
                },
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: "main".into(),
                        ports: Some(vec![ContainerPort {
                            name: Some("http".into()),
                            container_port: 8080,
                            ..Default::default()
                        }]),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                status: Some(PodStatus {
                    pod_ip: Some(ip.clone()),
                    pod_ips: Some(vec![PodIP { ip }]),
                    ..Default::default()
                }),
            }));
        }
        for i in 0..policies_per_ns {
            let (name, spec) = match i {
                0 => (
                    "default-deny".to_string(),
                    NetworkPolicySpec {
                        pod_selector: Some(LabelSelector::default()),
                        policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
                        ..Default::default()
                    },
                ),
                1 => (
                    "allow-dns".to_string(),
                    NetworkPolicySpec {
                        pod_selector: Some(LabelSelector::default()),
                        policy_types: Some(vec!["Egress".into()]),
                        egress: Some(vec![NetworkPolicyEgressRule {
                            to: Some(vec![NetworkPolicyPeer {
                                namespace_selector: Some(selector(&[(
                                    "kubernetes.io/metadata.name",
                                    "kube-system".into(),
                                )])),
                                pod_selector: Some(selector(&[("k8s-app", "kube-dns".into())])),
                                ip_block: None,
                            }]),
                            ports: Some(vec![port(53, None, "UDP"), port(53, None, "TCP")]),
                        }]),
                        ..Default::default()
                    },
                ),
                _ => {
                    let app = (i - 2) % APPS;
                    (
                        format!("app-{app}-{i}"),
                        NetworkPolicySpec {
                            pod_selector: Some(LabelSelector {
                                match_labels: Some(labels(&[("app", format!("app-{app}"))])),
                                match_expressions: Some(vec![LabelSelectorRequirement {
                                    key: "version".into(),
                                    operator: "NotIn".into(),
                                    values: Some(vec!["v9".into()]),
                                }]),
                            }),
                            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
                            ingress: Some(vec![NetworkPolicyIngressRule {
                                from: Some(vec![
                                    NetworkPolicyPeer {
                                        pod_selector: Some(selector(&[(
                                            "app",
                                            format!("app-{}", (app + 1) % APPS),
                                        )])),
                                        ..Default::default()
                                    },
                                    NetworkPolicyPeer {
                                        namespace_selector: Some(selector(&[(
                                            "team",
                                            format!("team-{}", (n + 1) % 10),
                                        )])),
                                        pod_selector: Some(selector(&[(
                                            "app",
                                            format!("app-{app}"),
                                        )])),
                                        ip_block: None,
                                    },
                                    NetworkPolicyPeer {
                                        ip_block: Some(IPBlock {
                                            cidr: "192.168.0.0/16".into(),
                                            except: Some(vec!["192.168.1.0/24".into()]),
                                        }),
                                        ..Default::default()
                                    },
                                ]),
                                ports: Some(vec![
                                    NetworkPolicyPort {
                                        port: Some(IntOrString::String("http".into())),
                                        ..Default::default()
                                    },
                                    port(9000, Some(9100), "TCP"),
                                ]),
                            }]),
                            egress: Some(vec![NetworkPolicyEgressRule {
                                to: Some(vec![NetworkPolicyPeer {
                                    pod_selector: Some(LabelSelector::default()),
                                    ..Default::default()
                                }]),
                                ports: Some(vec![port(8080, None, "TCP")]),
                            }]),
                        },
                    )
                }
            };
            s.network_policies.push(NetworkPolicy {
                metadata: ObjectMeta {
                    name: Some(name),
                    namespace: Some(ns.clone()),
                    ..Default::default()
                },
                spec: Some(spec),
            });
        }
    }
    s
}

fn p(s: &str) -> Peer {
    s.parse().unwrap()
}

fn verdicts(c: &mut Criterion) {
    // 100 namespaces x 100 pods, 20 policies each: 10,000 pods, 2,000 policies.
    let snapshot = cluster(100, 100, 20);
    assert_eq!(
        (snapshot.pods.len(), snapshot.network_policies.len()),
        (10_000, 2_000)
    );
    let engine = PolicyEngine::new(&snapshot, EngineOptions::default()).unwrap();

    // app-3 -> app-2 on http: allowed by app-2's ingress and app-3's egress.
    let (allowed_from, allowed_to) = (p("ns-50/pod-3"), p("ns-50/pod-2"));
    assert_eq!(
        engine.decide(&allowed_from, &allowed_to, 8080, Protocol::Tcp),
        PolicyVerdict::Allowed
    );
    // app-7 -> app-2: denied, with near misses for every rule.
    let (denied_from, denied_to) = (p("ns-50/pod-7"), p("ns-50/pod-2"));
    let denied = engine.evaluate(&denied_from, &denied_to, 8080, Protocol::Tcp);
    assert_eq!(denied.verdict, PolicyVerdict::Denied);
    assert!(!denied.ingress.near_misses.is_empty());
    let external = p("192.168.7.7");

    let mut g = c.benchmark_group("policy/10k-pods-2k-policies");
    g.bench_function("evaluate-denied-with-explanation", |b| {
        b.iter(|| {
            black_box(engine.evaluate(
                black_box(&denied_from),
                black_box(&denied_to),
                8080,
                Protocol::Tcp,
            ))
        })
    });
    g.bench_function("evaluate-allowed", |b| {
        b.iter(|| {
            black_box(engine.evaluate(
                black_box(&allowed_from),
                black_box(&allowed_to),
                8080,
                Protocol::Tcp,
            ))
        })
    });
    g.bench_function("evaluate-from-external-ip", |b| {
        b.iter(|| {
            black_box(engine.evaluate(
                black_box(&external),
                black_box(&allowed_to),
                8080,
                Protocol::Tcp,
            ))
        })
    });
    g.bench_function("decide-denied", |b| {
        b.iter(|| {
            black_box(engine.decide(
                black_box(&denied_from),
                black_box(&denied_to),
                8080,
                Protocol::Tcp,
            ))
        })
    });
    g.bench_function("decide-allowed", |b| {
        b.iter(|| {
            black_box(engine.decide(
                black_box(&allowed_from),
                black_box(&allowed_to),
                8080,
                Protocol::Tcp,
            ))
        })
    });
    let cache = VerdictCache::new(100_000);
    cache.evaluate(&engine, &denied_from, &denied_to, None, 8080, Protocol::Tcp);
    let replica = p("ns-50/pod-27"); // same labels as pod-7: a cache hit
    g.bench_function("cache-hit-denied", |b| {
        b.iter(|| {
            black_box(cache.evaluate(
                &engine,
                black_box(&replica),
                black_box(&denied_to),
                None,
                8080,
                Protocol::Tcp,
            ))
        })
    });
    g.finish();

    let mut g = c.benchmark_group("policy/build");
    g.sample_size(10);
    g.bench_function("engine-new-10k-pods-2k-policies", |b| {
        b.iter(|| {
            black_box(PolicyEngine::new(black_box(&snapshot), EngineOptions::default()).unwrap())
        })
    });
    // Dense: 10 namespaces of 1,000 pods and 200 policies; each pod is
    // selected by 10 policies besides the namespace-wide ones.
    let dense = cluster(10, 1_000, 200);
    assert_eq!(
        (dense.pods.len(), dense.network_policies.len()),
        (10_000, 2_000)
    );
    g.bench_function("engine-new-dense-10-namespaces", |b| {
        b.iter(|| {
            black_box(PolicyEngine::new(black_box(&dense), EngineOptions::default()).unwrap())
        })
    });
    g.finish();

    let dense_engine = PolicyEngine::new(&dense, EngineOptions::default()).unwrap();
    let (d_from, d_to, a_from) = (p("ns-5/pod-7"), p("ns-5/pod-2"), p("ns-5/pod-3"));
    assert_eq!(
        dense_engine.decide(&d_from, &d_to, 8080, Protocol::Tcp),
        PolicyVerdict::Denied
    );
    assert_eq!(
        dense_engine.decide(&a_from, &d_to, 8080, Protocol::Tcp),
        PolicyVerdict::Allowed
    );
    let mut g = c.benchmark_group("policy/dense-10-namespaces");
    g.bench_function("evaluate-denied-with-explanation", |b| {
        b.iter(|| {
            black_box(dense_engine.evaluate(
                black_box(&d_from),
                black_box(&d_to),
                8080,
                Protocol::Tcp,
            ))
        })
    });
    g.bench_function("decide-allowed", |b| {
        b.iter(|| {
            black_box(dense_engine.decide(
                black_box(&a_from),
                black_box(&d_to),
                8080,
                Protocol::Tcp,
            ))
        })
    });
    g.finish();
}

criterion_group!(benches, verdicts);
criterion_main!(benches);
