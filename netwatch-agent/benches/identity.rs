//! Identity resolution at cluster scale: 10,000 pods (500 Deployments of 20
//! in 50 namespaces), 500 services with EndpointSlices, 100 nodes, and 1,000
//! pods churned so tombstones and reused IPs are in the tables.
//!
//! `cargo bench -p netwatch-agent --bench identity` prints the memory figures
//! first (counted by a global allocator), then criterion's timings.

use std::{
    hint::black_box,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, SystemTime},
};

use criterion::{BatchSize, Criterion, criterion_group};
use k8s_openapi::api::{
    apps::v1::ReplicaSet,
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::runtime::watcher::Event;
use netwatch::{
    cluster::{ClusterSnapshot, PodRecord},
    identity::{
        IdentityCache, IdentityConfig,
        kube::{
            ObjectEvent, SnapshotWriter, strip_endpoint_slice, strip_node, strip_pod, strip_service,
        },
    },
};
use serde_json::json;

#[path = "support/heap.rs"]
mod heap;
use heap::live_bytes;

const NAMESPACES: usize = 50;
const DEPLOYMENTS: usize = 500;
const REPLICAS: usize = 20;
const NODES: usize = 100;
const CHURNED: usize = 1_000;

fn pod_ip(index: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        10,
        1,
        (index / 250) as u8,
        (index % 250) as u8 + 1,
    ))
}

/// A pod as the API server sends it (annotations, managed fields, full spec
/// and status), so stripping has something to strip.
fn pod(index: usize, generation: usize) -> Pod {
    let deployment = index / REPLICAS;
    let namespace = format!("team-{}", deployment % NAMESPACES);
    let hash = format!("{:010x}", deployment * 7919 + generation);
    let app = format!("app-{deployment}");
    let node = format!("node-{}", index % NODES);
    serde_json::from_value(json!({
        "metadata": {
            "name": format!("{app}-{hash}-{index:05}-{generation}"),
            "namespace": namespace,
            "uid": format!("{:08x}-0000-4000-8000-{:012x}", index, generation),
            "resourceVersion": "123456",
            "creationTimestamp": "2025-01-01T00:00:00Z",
            "labels": {"app": app, "pod-template-hash": hash, "team": namespace, "version": "v1"},
            "annotations": {
                "kubectl.kubernetes.io/restartedAt": "2025-01-01T00:00:00Z",
                "prometheus.io/scrape": "true",
                "checksum/config": "x".repeat(64)
            },
            "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                               "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:labels": {}}}}],
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{app}-{hash}"),
                                 "uid": "rs", "controller": true, "blockOwnerDeletion": true}]
        },
        "spec": {
            "nodeName": node,
            "serviceAccountName": "default",
            "containers": [
                {"name": "app", "image": "registry.example.com/app:1.2.3",
                 "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                 "env": [{"name": "LOG_LEVEL", "value": "info"}, {"name": "PORT", "value": "8080"}],
                 "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                 "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}}},
                {"name": "sidecar", "image": "registry.example.com/proxy:0.9",
                 "ports": [{"name": "metrics", "containerPort": 9090}]}
            ],
            "volumes": [{"name": "config", "configMap": {"name": "app-config"}}],
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"}]
        },
        "status": {
            "phase": "Running",
            "hostIP": "192.168.0.1",
            "podIP": pod_ip(index).to_string(),
            "podIPs": [{"ip": pod_ip(index).to_string()}],
            "startTime": "2025-01-01T00:00:01Z",
            "qosClass": "Burstable",
            "conditions": [
                {"type": "Initialized", "status": "True"}, {"type": "Ready", "status": "True"},
                {"type": "ContainersReady", "status": "True"}, {"type": "PodScheduled", "status": "True"}
            ],
            "containerStatuses": [
                {"name": "app", "ready": true, "restartCount": 0, "image": "registry.example.com/app:1.2.3",
                 "imageID": "sha256:0123", "containerID": format!("containerd://{:064x}", index)},
                {"name": "sidecar", "ready": true, "restartCount": 0, "image": "registry.example.com/proxy:0.9",
                 "imageID": "sha256:4567", "containerID": format!("containerd://{:064x}", index + 1_000_000)}
            ]
        }
    }))
    .expect("pod JSON")
}

fn service(deployment: usize) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": format!("app-{deployment}"), "namespace": format!("team-{}", deployment % NAMESPACES)},
        "spec": {"clusterIP": format!("10.96.{}.{}", deployment / 250, deployment % 250 + 1),
                 "selector": {"app": format!("app-{deployment}")},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    }))
    .expect("service JSON")
}

fn slice(deployment: usize) -> EndpointSlice {
    let endpoints: Vec<_> = (0..REPLICAS)
        .map(|r| json!({"addresses": [pod_ip(deployment * REPLICAS + r).to_string()], "conditions": {"ready": true}}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": format!("app-{deployment}-x"), "namespace": format!("team-{}", deployment % NAMESPACES),
                     "labels": {"kubernetes.io/service-name": format!("app-{deployment}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints
    }))
    .expect("slice JSON")
}

fn node(index: usize) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": format!("node-{index}")},
        "status": {"addresses": [{"type": "InternalIP", "address": format!("192.168.{}.{}", index / 250, index % 250 + 1)}]}
    }))
    .expect("node JSON")
}

fn replica_set(deployment: usize) -> ReplicaSet {
    serde_json::from_value(json!({
        "metadata": {"name": format!("app-{deployment}-{:010x}", deployment * 7919), "namespace": format!("team-{}", deployment % NAMESPACES),
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": format!("app-{deployment}"), "uid": "d", "controller": true}]},
        "spec": {"selector": {}}
    }))
    .expect("replica set JSON")
}

/// The cluster as the API sends it: its pods, typed, and the other kinds;
/// `generation` > 0 replaces the first `CHURNED` pods by new ones on the
/// same IPs.
fn cluster(generation: usize) -> (Vec<Pod>, ClusterSnapshot) {
    let pods = (0..DEPLOYMENTS * REPLICAS)
        .map(|i| pod(i, if i < CHURNED { generation } else { 0 }))
        .collect();
    let rest = ClusterSnapshot {
        services: (0..DEPLOYMENTS).map(service).collect(),
        endpoint_slices: (0..DEPLOYMENTS).map(slice).collect(),
        nodes: (0..NODES).map(node).collect(),
        replica_sets: (0..DEPLOYMENTS).map(replica_set).collect(),
        ..ClusterSnapshot::default()
    };
    (pods, rest)
}

/// What the agent's reflectors keep of it: pods as records.
fn stripped((pods, mut snapshot): (Vec<Pod>, ClusterSnapshot)) -> ClusterSnapshot {
    snapshot.pods = pods
        .into_iter()
        .map(|mut p| {
            strip_pod(&mut p, Some("node-0"));
            PodRecord::from(p)
        })
        .collect();
    snapshot.services.iter_mut().for_each(strip_service);
    snapshot
        .endpoint_slices
        .iter_mut()
        .for_each(strip_endpoint_slice);
    snapshot.nodes.iter_mut().for_each(strip_node);
    snapshot
}

fn config() -> IdentityConfig {
    IdentityConfig {
        node_name: Some("node-0".into()),
        ..IdentityConfig::default()
    }
}

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_750_000_000 + secs)
}

/// A cache over the stripped cluster after one round of churn: 10,000 live
/// pods, 1,000 tombstones, 1,000 IPs with two tenures.
fn churned_cache() -> IdentityCache {
    let mut cache = IdentityCache::new(config());
    cache.update(&stripped(cluster(0)), at(0));
    cache.update(&stripped(cluster(1)), at(60));
    cache
}

fn report_memory() {
    let base = live_bytes();
    let raw = cluster(0);
    let raw_bytes = live_bytes() - base;
    let base = live_bytes();
    let small = stripped(raw.clone());
    let stripped_bytes = live_bytes() - base;
    drop(raw);

    let base = live_bytes();
    let mut cache = IdentityCache::new(config());
    cache.update(&small, at(0));
    let cache_bytes = live_bytes() - base;
    let churn = stripped(cluster(1));
    let base = live_bytes();
    cache.update(&churn, at(60));
    let churn_growth = live_bytes() - base;
    let stats = cache.stats();

    let mib = |b: isize| b as f64 / (1024.0 * 1024.0);
    println!(
        "identity memory, {} pods / {} services / {} nodes:",
        stats.pods, stats.services, NODES
    );
    println!(
        "  snapshot as sent by the API server : {:7.1} MiB",
        mib(raw_bytes)
    );
    println!(
        "  snapshot after stripping           : {:7.1} MiB",
        mib(stripped_bytes)
    );
    println!(
        "  IdentityCache                      : {:7.1} MiB",
        mib(cache_bytes)
    );
    println!(
        "  IdentityCache growth for {} tombstones + {} reused IPs: {:5.1} MiB",
        stats.tombstones,
        stats.closed_tenures,
        mib(churn_growth)
    );
}

fn benches(c: &mut Criterion) {
    let cache = churned_cache();
    let mut group = c.benchmark_group("identity");

    let mut i = 0usize;
    group.bench_function("resolve_ip/pod (10k pods)", |b| {
        b.iter(|| {
            i = (i + 7919) % (DEPLOYMENTS * REPLICAS);
            black_box(cache.resolve_ip(black_box(pod_ip(i)), at(120)));
        })
    });
    let mut i = 0usize;
    group.bench_function("resolve_ip/reused ip, old tenure", |b| {
        b.iter(|| {
            i = (i + 13) % CHURNED;
            black_box(cache.resolve_ip(black_box(pod_ip(i)), at(30)));
        })
    });
    let vip: IpAddr = "10.96.1.7".parse().expect("ip");
    group.bench_function("resolve_ip/service cluster ip", |b| {
        b.iter(|| black_box(cache.resolve_ip(black_box(vip), at(120))))
    });
    let outside: IpAddr = "8.8.8.8".parse().expect("ip");
    group.bench_function("resolve_ip/world", |b| {
        b.iter(|| black_box(cache.resolve_ip(black_box(outside), at(120))))
    });
    let mut i = 0usize;
    group.bench_function("endpoint/pod (resolve + build record)", |b| {
        b.iter(|| {
            i = (i + 7919) % (DEPLOYMENTS * REPLICAS);
            black_box(cache.endpoint(black_box(pod_ip(i)), Some(8080), at(120)));
        })
    });

    group.sample_size(10);
    let steady = stripped(cluster(0));
    // Publishing from reflector stores would clone every object per
    // publish (ClusterSnapshot owns them): the cost the API source avoids.
    group.bench_function("snapshot/clone 10k stripped pods", |b| {
        b.iter(|| black_box(steady.clone()))
    });
    // What it pays instead: a batch of changes applied in place.
    let mut writer = SnapshotWriter::default();
    let mut published = ClusterSnapshot::default();
    let mut list = vec![Event::Init];
    list.extend(steady.pods.iter().cloned().map(Event::InitApply));
    list.push(Event::InitDone);
    for event in list {
        writer.apply(ObjectEvent::Pod(event), || &mut published);
    }
    let changed: Vec<PodRecord> = stripped(cluster(2))
        .pods
        .into_iter()
        .take(CHURNED)
        .collect();
    group.bench_function("snapshot/apply 1k pod events to 10k pods", |b| {
        b.iter_batched(
            || changed.clone(),
            |pods| {
                for pod in pods {
                    writer.apply(ObjectEvent::Pod(Event::Apply(pod)), || &mut published);
                }
            },
            BatchSize::LargeInput,
        )
    });
    group.bench_function("update/10k pods, nothing changed", |b| {
        b.iter_batched(
            || {
                let mut cache = IdentityCache::new(config());
                cache.update(&steady, at(0));
                cache
            },
            |mut cache| {
                cache.update(&steady, at(1));
                cache
            },
            BatchSize::LargeInput,
        )
    });
    let churn = stripped(cluster(1));
    group.bench_function("update/10k pods, 1k replaced", |b| {
        b.iter_batched(
            || {
                let mut cache = IdentityCache::new(config());
                cache.update(&steady, at(0));
                cache
            },
            |mut cache| {
                cache.update(&churn, at(60));
                cache
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(identity, benches);

fn main() {
    report_memory();
    identity();
    Criterion::default().configure_from_args().final_summary();
}
