//! Resolution plus attribution per new flow, at cluster scale: 10,000 pods
//! and 2,000 NetworkPolicies (50 namespaces of 200 pods and 40 policies),
//! what the agent does for every record it emits.
//!
//! `cargo bench -p netwatch-agent --bench attribution`

use std::{
    hint::black_box,
    time::{Duration, SystemTime},
};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use netwatch::{
    attribution::{Attribution, AttributionConfig},
    capture::{events::KernelEvent, reasons::DropReasons},
    cluster::{Change, ChangeKind, ChangeLog, ClusterSnapshot, Lineage},
    export::{ExportConfig, Exporters, flowlog::FlowLogTarget},
    flow::{
        assemble::{AssemblerConfig, FlowAssembler, Signal},
        record::FlowRecord,
    },
    manifests,
};
use netwatch_common::{FlowKey, IP_V4, IPPROTO_TCP, tcp_flags};

#[path = "support/heap.rs"]
mod heap;
use heap::live_bytes;

const NAMESPACES: usize = 50;
const PODS_PER_NAMESPACE: usize = 200;
const POLICIES_PER_NAMESPACE: usize = 40;
const APPS: usize = 20;

fn pod_ip(ns: usize, i: usize) -> [u8; 4] {
    [10, ns as u8, (i / 250) as u8, (i % 250 + 1) as u8]
}

/// The cluster as manifest text, loaded by the real loader.
fn cluster() -> ClusterSnapshot {
    let mut docs = Vec::new();
    for n in 0..NAMESPACES {
        docs.push(format!(
            r#"{{"apiVersion":"v1","kind":"Namespace","metadata":{{"name":"ns-{n}","labels":{{"team":"t{}"}}}}}}"#,
            n % 10
        ));
        for i in 0..PODS_PER_NAMESPACE {
            let [a, b, c, d] = pod_ip(n, i);
            docs.push(format!(
                r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"app-{app}-{i}","namespace":"ns-{n}","uid":"u-{n}-{i}","labels":{{"app":"app-{app}","tier":"t{tier}"}}}},"spec":{{"nodeName":"node-{node}","containers":[{{"name":"c","ports":[{{"name":"http","containerPort":8080}}]}}]}},"status":{{"phase":"Running","podIP":"{a}.{b}.{c}.{d}","conditions":[{{"type":"Ready","status":"True"}}]}}}}"#,
                app = i % APPS,
                tier = i % 3,
                node = i % 100,
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
    manifests::load_str(
        "synthetic.json",
        &format!(
            "{{\"apiVersion\":\"v1\",\"kind\":\"List\",\"items\":[{}]}}",
            docs.join(",")
        ),
    )
    .expect("synthetic manifests")
}

/// A DROPPED record from pod (ns, i) to pod (ns2, j):8080, as the assembler
/// makes it.
fn record(
    reasons: &DropReasons,
    from: (usize, usize),
    to: (usize, usize),
    sport: u16,
) -> FlowRecord {
    // A fresh assembler: records of one client port would be one connection.
    // First records at once (not held for a refusal), as the benches take them.
    let mut assembler = FlowAssembler::new(AssemblerConfig {
        refusal_grace: Duration::ZERO,
        ..AssemblerConfig::default()
    });
    let mut k = FlowKey {
        src_port: sport,
        dst_port: 8080,
        proto: IPPROTO_TCP,
        ip_version: IP_V4,
        ..FlowKey::default()
    };
    k.src_addr[..4].copy_from_slice(&pod_ip(from.0, from.1));
    k.dst_addr[..4].copy_from_slice(&pod_ip(to.0, to.1));
    let now = SystemTime::now();
    let drop = KernelEvent::Drop {
        time: now,
        flow: k,
        reason: 12,
        ifindex: 3,
        netns: 1,
        bytes: 60,
        tcp_flags: tcp_flags::SYN,
        outer: None,
    };
    assembler
        .handle(Signal::Kernel(drop), now, reasons, &|_| None)
        .pop()
        .expect("a first record")
}

fn benches(c: &mut Criterion) {
    let before = live_bytes();
    let snapshot = cluster();
    let with_snapshot = live_bytes();
    let mut attribution = Attribution::new(AttributionConfig {
        node_name: "node-1".into(),
        ..AttributionConfig::default()
    });
    let start = std::time::Instant::now();
    attribution.update(&snapshot, true, SystemTime::now());
    let build = start.elapsed();
    let with_attribution = live_bytes();
    let mib = |b: isize| b as f64 / 1048576.0;
    eprintln!(
        "heap: snapshot of {} pods and {} policies (as loaded from manifests) {:.1} MiB; identity cache + policy engine {:.1} MiB; one update {:.0} ms",
        snapshot.pods.len(),
        snapshot.network_policies.len(),
        mib(with_snapshot - before),
        mib(with_attribution - with_snapshot),
        build.as_secs_f64() * 1000.0,
    );

    let reasons = DropReasons::from_pairs([(12, "SKB_DROP_REASON_NETFILTER_DROP".to_string())]);
    let mut group = c.benchmark_group("attribution");
    group.measurement_time(Duration::from_secs(5));

    // Pairs of distinct identities (3,000 label sets, 9 million pairs): the
    // verdict cache almost always misses.
    let mut n = 0usize;
    group.bench_function(
        "enrich new flow, cold verdict cache (10k pods, 2k policies)",
        |b| {
            b.iter_batched(
                || {
                    n += 1;
                    let from = (n % NAMESPACES, (n * 7) % PODS_PER_NAMESPACE);
                    let to = ((n / 3) % NAMESPACES, (n * 13) % PODS_PER_NAMESPACE);
                    record(&reasons, from, to, 10_000 + (n % 50_000) as u16)
                },
                |mut r| {
                    attribution.enrich(&mut r);
                    black_box(r)
                },
                BatchSize::SmallInput,
            )
        },
    );
    // Replicas of the same workloads: the verdict comes from the cache.
    let mut m = 0usize;
    group.bench_function(
        "enrich new flow, warm verdict cache (10k pods, 2k policies)",
        |b| {
            b.iter_batched(
                || {
                    m += 1;
                    record(
                        &reasons,
                        (1, (m * APPS) % PODS_PER_NAMESPACE),
                        (2, (m * APPS + 1) % PODS_PER_NAMESPACE),
                        20_000 + (m % 40_000) as u16,
                    )
                },
                |mut r| {
                    attribution.enrich(&mut r);
                    black_box(r)
                },
                BatchSize::SmallInput,
            )
        },
    );
    group.finish();
}

/// Services and their EndpointSlices, one per app and namespace (1,000 of
/// each), for the update benchmarks.
fn with_services(mut snapshot: ClusterSnapshot) -> ClusterSnapshot {
    for n in 0..NAMESPACES {
        for app in 0..APPS {
            snapshot.services.push(
                serde_json::from_value(serde_json::json!({
                    "metadata": {"name": format!("app-{app}"), "namespace": format!("ns-{n}")},
                    "spec": {
                        "clusterIP": format!("10.96.{n}.{}", app + 1),
                        "selector": {"app": format!("app-{app}")},
                        "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
                    },
                }))
                .expect("a service"),
            );
            let endpoints: Vec<serde_json::Value> = (0..PODS_PER_NAMESPACE / APPS)
                .map(|k| {
                    let [a, b, c, d] = pod_ip(n, app + k * APPS);
                    serde_json::json!({"addresses": [format!("{a}.{b}.{c}.{d}")], "conditions": {"ready": true}})
                })
                .collect();
            snapshot.endpoint_slices.push(
                serde_json::from_value(serde_json::json!({
                    "metadata": {
                        "name": format!("app-{app}-x"), "namespace": format!("ns-{n}"),
                        "labels": {"kubernetes.io/service-name": format!("app-{app}")},
                    },
                    "addressType": "IPv4",
                    "ports": [{"name": "http", "port": 8080}],
                    "endpoints": endpoints,
                }))
                .expect("an EndpointSlice"),
            );
        }
    }
    snapshot
}

/// A namespace's `team` label flips.
fn namespace_change(snapshot: &mut ClusterSnapshot, n: usize) {
    let at = n % NAMESPACES;
    let ns = &mut snapshot.namespaces[at];
    let team = format!("t{}", (at + n % 2) % 10);
    ns.metadata
        .labels
        .get_or_insert_default()
        .insert("team".into(), team);
    let name = ns.metadata.name.clone();
    snapshot.changes.record(Change {
        kind: ChangeKind::Namespace,
        namespace: String::new(),
        name,
        position: Some(at),
    });
}

/// A Service's port flips.
fn service_change(snapshot: &mut ClusterSnapshot, n: usize) {
    let at = (n * 7) % snapshot.services.len();
    let svc = &mut snapshot.services[at];
    if let Some(spec) = svc.spec.as_mut()
        && let Some(port) = spec.ports.as_mut().and_then(|p| p.first_mut())
    {
        port.port = if n.is_multiple_of(2) { 80 } else { 8080 };
    }
    let (namespace, name) = (svc.metadata.namespace.clone(), svc.metadata.name.clone());
    snapshot.changes.record(Change {
        kind: ChangeKind::Service,
        namespace: namespace.unwrap_or_default(),
        name,
        position: Some(at),
    });
}

/// A NetworkPolicy selects another app.
fn policy_change(snapshot: &mut ClusterSnapshot, n: usize) {
    let at = (n * 13) % snapshot.network_policies.len();
    let policy = &mut snapshot.network_policies[at];
    if let Some(spec) = policy.spec.as_mut() {
        let app = format!("app-{}", n % APPS);
        spec.pod_selector
            .get_or_insert_default()
            .match_labels
            .get_or_insert_default()
            .insert("app".into(), app);
    }
    let (namespace, name) = (
        policy.metadata.namespace.clone(),
        policy.metadata.name.clone(),
    );
    snapshot.changes.record(Change {
        kind: ChangeKind::NetworkPolicy,
        namespace: namespace.unwrap_or_default(),
        name,
        position: Some(at),
    });
}

/// Calico's policies for the Calico benchmarks: a tier ahead of the
/// default one with a global policy per app (its service account, the
/// Services it backs), and a namespaced policy in each of 10 namespaces;
/// `variant` moves one global policy's port.
fn with_calico(snapshot: &mut ClusterSnapshot, variant: usize) {
    let calico = &mut snapshot.calico;
    calico.tiers = vec![
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "security"},
            "spec": {"order": 100, "defaultAction": "Pass"},
        }))
        .expect("a Calico tier"),
    ];
    calico.global_network_policies = (0..APPS)
        .map(|app| {
            let port = if app == 0 { 8080 + variant % 2 } else { 8080 };
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("security.app-{app}")},
                "spec": {
                    "tier": "security",
                    "order": app,
                    "selector": format!("app == 'app-{app}'"),
                    "types": ["Ingress", "Egress"],
                    "ingress": [{"action": "Deny", "protocol": "TCP",
                        "source": {"serviceAccounts": {"names": ["intruder"]}},
                        "destination": {"ports": [port]}}],
                    "egress": [{"action": "Pass", "protocol": "TCP",
                        "destination": {"services": {"name": format!("app-{app}"), "namespace": "ns-0"}}}],
                },
            }))
            .expect("a GlobalNetworkPolicy")
        })
        .collect();
    calico.network_policies = (0..10)
        .map(|ns| {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "allow-same-namespace", "namespace": format!("ns-{ns}")},
                "spec": {
                    "order": 10,
                    "selector": "all()",
                    "types": ["Ingress"],
                    "ingress": [{"action": "Allow", "source": {"selector": "all()"}}],
                },
            }))
            .expect("a Calico NetworkPolicy")
        })
        .collect();
    snapshot.changes.record(Change {
        kind: ChangeKind::Calico,
        namespace: String::new(),
        name: Some("security.app-0".into()),
        position: Some(0),
    });
}

/// What one change costs the agent: applied in place, against a rebuild
/// from the snapshot, in the same run.
fn updates(c: &mut Criterion) {
    let mut snapshot = with_services(cluster());
    let mut attribution = Attribution::new(AttributionConfig {
        node_name: "node-1".into(),
        ..AttributionConfig::default()
    });
    let now = SystemTime::now();
    attribution.update(&snapshot, true, now);
    let mut group = c.benchmark_group("cluster update");
    group.measurement_time(Duration::from_secs(5));

    group.sample_size(10);
    group.bench_function("full rebuild (10k pods, 2k policies)", |b| {
        b.iter(|| {
            // A new log: what a manifest reload, a re-list or a
            // non-incremental change does.
            snapshot.changes = ChangeLog::default();
            attribution.update(&snapshot, true, now);
        })
    });
    group.sample_size(100);

    let originals: Vec<Vec<std::net::IpAddr>> =
        snapshot.pods.iter().map(|p| p.ips().to_vec()).collect();
    // A rollout step: one pod gets a new template hash (a new identity the
    // first time) and another address, then back.
    let pod_change = |snapshot: &mut ClusterSnapshot, n: usize| {
        let at = (n * 37) % snapshot.pods.len();
        let pod = &mut snapshot.pods[at];
        let hash = if n.is_multiple_of(2) { "a" } else { "b" };
        let mut labels = pod.labels().clone();
        labels.insert("pod-template-hash".into(), hash.into());
        pod.set_labels(labels);
        pod.set_resource_version(Some(n.to_string()));
        pod.set_ips(if n.is_multiple_of(2) {
            originals[at].clone()
        } else {
            vec![std::net::IpAddr::from([
                10,
                200,
                (at / 250) as u8,
                (at % 250 + 1) as u8,
            ])]
        });
        let (namespace, name) = (pod.namespace().to_owned(), pod.name().map(str::to_owned));
        snapshot.changes.record(Change {
            kind: ChangeKind::Pod,
            namespace,
            name,
            position: Some(at),
        });
    };
    let mut n = 0usize;
    group.bench_function("one pod change (10k pods, 2k policies)", |b| {
        b.iter(|| {
            n += 1;
            pod_change(&mut snapshot, n);
            attribution.update(&snapshot, true, now);
        })
    });

    // A pod deleted, then created again (the last of the list, so no other
    // pod moves).
    let mut gone: Option<netwatch::cluster::PodRecord> = None;
    group.bench_function("one pod deleted or created (10k pods, 2k policies)", |b| {
        b.iter(|| {
            let (change_of, position) = match gone.take() {
                Some(pod) => {
                    snapshot.pods.push(pod);
                    (snapshot.pods.last(), Some(snapshot.pods.len() - 1))
                }
                None => {
                    gone = snapshot.pods.pop();
                    (gone.as_ref(), None)
                }
            };
            let pod = change_of.expect("a pod");
            let change = Change {
                kind: ChangeKind::Pod,
                namespace: pod.namespace().to_owned(),
                name: pod.name().map(str::to_owned),
                position,
            };
            snapshot.changes.record(change);
            attribution.update(&snapshot, true, now);
        })
    });
    if let Some(pod) = gone.take() {
        let change = Change {
            kind: ChangeKind::Pod,
            namespace: pod.namespace().to_owned(),
            name: pod.name().map(str::to_owned),
            position: Some(snapshot.pods.len()),
        };
        snapshot.pods.push(pod);
        snapshot.changes.record(change);
        attribution.update(&snapshot, true, now);
    }

    // The daemon's whole update: attribution, then the exporters' list of
    // pods (a deleted pod's metric series retire).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let mut outputs = runtime
        .block_on(Exporters::start(&ExportConfig {
            node_name: "node-1".into(),
            flow_log: FlowLogTarget::Off,
            metrics_addr: None,
            ..ExportConfig::default()
        }))
        .expect("exporters");
    outputs.cluster_pods(&snapshot, attribution.identity());
    group.bench_function("one pod change, daemon (10k pods, 2k policies)", |b| {
        b.iter(|| {
            n += 1;
            pod_change(&mut snapshot, n);
            attribution.update(&snapshot, true, now);
            outputs.cluster_pods(&snapshot, attribution.identity());
        })
    });
    // The exporters' pod list from a snapshot it cannot follow by its
    // change log: a pass over every pod, what each update did before.
    let other = ClusterSnapshot {
        changes: ChangeLog::default(),
        ..snapshot.clone()
    };
    let mut flip = false;
    group.bench_function("exporters' pod list, full pass (10k pods)", |b| {
        b.iter(|| {
            flip = !flip;
            let s = if flip { &other } else { &snapshot };
            outputs.cluster_pods(s, attribution.identity());
        })
    });
    drop(other);
    outputs.cluster_pods(&snapshot, attribution.identity());

    let mut n = 0usize;
    group.bench_function("one namespace label change (10k pods, 2k policies)", |b| {
        b.iter(|| {
            n += 1;
            namespace_change(&mut snapshot, n);
            attribution.update(&snapshot, true, now);
        })
    });

    let mut n = 0usize;
    group.bench_function("one service change (10k pods, 2k policies)", |b| {
        b.iter(|| {
            n += 1;
            service_change(&mut snapshot, n);
            attribution.update(&snapshot, true, now);
        })
    });

    let mut n = 0usize;
    group.bench_function("one policy change (10k pods, 2k policies)", |b| {
        b.iter(|| {
            n += 1;
            policy_change(&mut snapshot, n);
            attribution.update(&snapshot, true, now);
        })
    });
    // An AdminNetworkPolicy added, then changed: its subject moves between
    // two namespaces' pods of one app.
    let rebuilds = attribution.update_counts().rebuilds;
    let mut n = 0usize;
    group.bench_function(
        "one AdminNetworkPolicy change (10k pods, 2k policies)",
        |b| {
            b.iter(|| {
                n += 1;
                let policy = serde_json::from_value(serde_json::json!({
                    "metadata": {"name": "deny-app-0"},
                    "spec": {
                        "priority": 10,
                        "subject": {"pods": {
                            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": format!("ns-{}", n % 2)}},
                            "podSelector": {"matchLabels": {"app": "app-0"}},
                        }},
                        "ingress": [{"name": "deny", "action": "Deny", "from": [{"namespaces": {}}]}],
                    },
                }))
                .expect("an AdminNetworkPolicy");
                snapshot.admin_network_policies = vec![policy];
                snapshot.changes.record(Change {
                    kind: ChangeKind::ClusterPolicy,
                    namespace: String::new(),
                    name: Some("deny-app-0".into()),
                    position: Some(0),
                });
                attribution.update(&snapshot, true, now);
            })
        },
    );
    assert_eq!(
        attribution.update_counts().rebuilds,
        rebuilds,
        "a cluster policy change rebuilt: the figure would not be an update's"
    );
    snapshot.admin_network_policies.clear();
    snapshot.changes.record(Change {
        kind: ChangeKind::ClusterPolicy,
        namespace: String::new(),
        name: Some("deny-app-0".into()),
        position: None,
    });
    attribution.update(&snapshot, true, now);

    // A manifest reload with a pod or two changed: the whole cluster
    // loaded afresh, recorded as changes of the previous load by hashing
    // every object, then applied (the load itself is not counted).
    let mut lineage = Lineage::default();
    let mut base = ClusterSnapshot {
        changes: ChangeLog::default(),
        ..snapshot.clone()
    };
    lineage.follow(&mut base);
    attribution.update(&base, true, now);
    drop(base);
    group.sample_size(10);
    group.bench_function(
        "manifest reload, a pod changed (10k pods, 2k policies)",
        |b| {
            b.iter_batched(
                || {
                    n += 1;
                    let mut loaded = ClusterSnapshot {
                        changes: ChangeLog::default(),
                        ..snapshot.clone()
                    };
                    pod_change(&mut loaded, n);
                    loaded
                },
                |mut loaded| {
                    lineage.follow(&mut loaded);
                    attribution.update(&loaded, true, now);
                    loaded
                },
                BatchSize::LargeInput,
            )
        },
    );
    group.finish();

    // The same changes while Calico's tiers judge (its first object is a
    // rebuild, then every change below is applied in place).
    let mut group = c.benchmark_group("cluster update, Calico");
    group.measurement_time(Duration::from_secs(5));
    with_calico(&mut snapshot, 0);
    attribution.update(&snapshot, true, now);
    let rebuilds = attribution.update_counts().rebuilds;
    let mut n = 0usize;
    group.bench_function("one pod change (10k pods, 2k policies)", |b| {
        b.iter(|| {
            n += 1;
            pod_change(&mut snapshot, n);
            attribution.update(&snapshot, true, now);
        })
    });
    group.bench_function("one namespace label change (10k pods, 2k policies)", |b| {
        b.iter(|| {
            n += 1;
            namespace_change(&mut snapshot, n);
            attribution.update(&snapshot, true, now);
        })
    });
    group.bench_function("one service change (10k pods, 2k policies)", |b| {
        b.iter(|| {
            n += 1;
            service_change(&mut snapshot, n);
            attribution.update(&snapshot, true, now);
        })
    });
    group.sample_size(10);
    group.bench_function("one NetworkPolicy change (10k pods, 2k policies)", |b| {
        b.iter(|| {
            n += 1;
            policy_change(&mut snapshot, n);
            attribution.update(&snapshot, true, now);
        })
    });
    // The two versions of one GlobalNetworkPolicy the change alternates
    // between (made before timing: a watch event brings the object made).
    let versions: Vec<_> = (0..2)
        .map(|variant| {
            let mut s = ClusterSnapshot::default();
            with_calico(&mut s, variant);
            s.calico.global_network_policies[0].clone()
        })
        .collect();
    group.bench_function("one Calico policy change (10k pods, 2k policies)", |b| {
        b.iter(|| {
            n += 1;
            snapshot.calico.global_network_policies[0] = versions[n % 2].clone();
            snapshot.changes.record(Change {
                kind: ChangeKind::Calico,
                namespace: String::new(),
                name: Some("security.app-0".into()),
                position: Some(0),
            });
            attribution.update(&snapshot, true, now);
        })
    });
    assert_eq!(
        attribution.update_counts().rebuilds,
        rebuilds,
        "a change under Calico rebuilt: the figures would not be an update's"
    );
    group.bench_function("full rebuild (10k pods, 2k policies)", |b| {
        b.iter(|| {
            snapshot.changes = ChangeLog::default();
            attribution.update(&snapshot, true, now);
        })
    });
    group.finish();
}

criterion_group!(attribution_benches, benches, updates);
criterion_main!(attribution_benches);
