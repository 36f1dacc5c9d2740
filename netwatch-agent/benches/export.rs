//! Exporter benchmarks: what publishing one flow record costs the capture
//! loop (metrics, flow log queue, observe ring and followers), the pieces of
//! it, and the memory a burst of 100,000 denied flows takes.
//!
//! `cargo bench -p netwatch-agent --bench export` prints the memory figures
//! first (live heap counted by a global allocator), then criterion's timings.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    hint::black_box,
    sync::atomic::{AtomicIsize, Ordering},
    time::{Duration, Instant},
};

use criterion::{Criterion, criterion_group};
use netwatch::{
    export::{
        ExportConfig, Exporters,
        filter::FlowFilter,
        flowlog::{FlowLogTarget, encode_line},
        metrics::{MetricsConfig, MetricsRegistry},
        server::{ApiConfig, ObserveRequest},
    },
    flow::record::FlowRecord,
};
use serde_json::json;

struct CountingAllocator;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);
static PEAK_BYTES: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed)
                + layout.size() as isize;
            PEAK_BYTES.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            let now = LIVE_BYTES.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            ) + new_size as isize
                - layout.size() as isize;
            PEAK_BYTES.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// A resolved denied flow, as the agent publishes it once identity is wired.
fn record(i: u64, lifecycle: &str) -> FlowRecord {
    serde_json::from_value(json!({
        "time": "2026-11-22T02:14:07.113Z", "uuid": format!("5b0d5f5e-0000-4000-8000-{i:012}"), "verdict": "DROPPED",
        "drop_reason_desc": "NETFILTER_DROP",
        "IP": {"source": "10.244.1.2", "destination": "10.244.1.3", "ipVersion": "IPv4"},
        "l4": {"TCP": {"source_port": 30000 + (i % 30000) as u16, "destination_port": 8000 + (i % 50) as u16, "flags": {"SYN": true}}},
        "source": {"identity": 4242, "namespace": format!("team-{}", i % 20), "pod_name": format!("web-7f9c-{}", i % 500),
                   "labels": ["k8s:app=web", "k8s:io.kubernetes.pod.namespace=prod"], "workloads": [{"name": format!("web-{}", i % 100), "kind": "Deployment"}],
                   "ip": "10.244.1.2", "port": 48420},
        "destination": {"identity": 4343, "namespace": "prod", "pod_name": "api-5d4e", "labels": ["k8s:app=api"],
                        "workloads": [{"name": "api", "kind": "Deployment"}], "ip": "10.244.1.3", "port": 8080},
        "Type": "L3_L4", "node_name": "node-1", "event_type": {"type": 1, "sub_type": 12},
        "traffic_direction": "INGRESS", "is_reply": false, "Summary": "TCP Flags: SYN; 3 packets dropped",
        "ingress_denied_by": [{"name": "default-deny-all", "namespace": "prod", "kind": "NetworkPolicy"}],
        "explanation": "prod/api-5d4e is isolated for ingress by prod/default-deny-all, which allows nothing",
        "lifecycle": lifecycle, "packets": 3, "bytes": 180,
        "first_seen": "2026-11-22T02:14:07.000Z", "last_seen": "2026-11-22T02:14:07.113Z",
        "observation_points": ["kfree_skb", "tc"]
    }))
    .expect("bench record")
}

fn config(dir: &std::path::Path) -> ExportConfig {
    ExportConfig {
        node_name: "node-1".into(),
        flow_log: FlowLogTarget::File(dir.join("flows.jsonl")),
        metrics_addr: None,
        api: ApiConfig {
            socket: Some(dir.join("netwatch.sock")),
            ..ApiConfig::default()
        },
        ..ExportConfig::default()
    }
}

fn mib(b: isize) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// 100,000 distinct denied flows, each a NEW and a FINAL record, published
/// as fast as the loop can, with the flow log on a file and one follower
/// that never reads.
fn burst_memory(rt: &tokio::runtime::Runtime) {
    let dir = tempfile::tempdir().expect("tempdir");
    let records: Vec<(FlowRecord, FlowRecord)> = (0..100_000)
        .map(|i| (record(i, "NEW"), record(i, "FINAL")))
        .collect();
    let mut exporters = rt
        .block_on(Exporters::start(&config(dir.path())))
        .expect("exporters");
    let hub = exporters.observe_hub().expect("observe on").clone();
    let _stalled = hub.subscribe(&ObserveRequest {
        follow: true,
        ..ObserveRequest::default()
    });
    let base = LIVE_BYTES.load(Ordering::Relaxed);
    PEAK_BYTES.store(base, Ordering::Relaxed);
    let start = Instant::now();
    for (new, fin) in &records {
        exporters.publish(new);
        exporters.publish(fin);
    }
    let took = start.elapsed();
    let peak = PEAK_BYTES.load(Ordering::Relaxed) - base;
    let after = LIVE_BYTES.load(Ordering::Relaxed) - base;
    let m = exporters.metrics().render();
    let metric = |name: &str| -> f64 {
        m.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit_once(' '))
            .map(|(_, v)| v.parse::<f64>().unwrap_or(0.0))
            .sum()
    };
    println!("burst: 100,000 denied flows (200,000 records) published in {took:?}");
    println!(
        "  heap above the exporters' start: peak {:.1} MiB, after the burst {:.1} MiB",
        mib(peak),
        mib(after)
    );
    println!(
        "  flow log: {} written so far, {} dropped (queue full); observe: {} dropped to the stalled follower; {} context series",
        metric("netwatch_flow_log_records_total"),
        metric("netwatch_flow_log_dropped_records_total"),
        metric("netwatch_observer_dropped_records_total"),
        exporters.metrics().context_series()
    );
    exporters.close();
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    burst_memory(&rt);

    let r = record(1, "NEW");
    c.bench_function("encode_line (one flow log line)", |b| {
        b.iter(|| black_box(encode_line(black_box(&r))))
    });
    let filter = FlowFilter::parse_expr(
        "verdict=DROPPED,TIMED_OUT from-namespace=team-1 to-label=app=api to-port=8080",
    )
    .expect("filter");
    c.bench_function("filter match (4 keys)", |b| {
        b.iter(|| black_box(filter.matches(black_box(&r))))
    });

    let mut metrics = MetricsRegistry::new(MetricsConfig::default()).expect("metrics");
    let update: Vec<FlowRecord> = (0..4096).map(|i| record(i, "UPDATE")).collect();
    for i in 0..4096 {
        metrics.observe(&record(i, "NEW"));
    }
    let mut k = 0;
    c.bench_function("metrics: a known flow's next record", |b| {
        b.iter(|| {
            metrics.observe(&update[k % update.len()]);
            k += 1;
        })
    });
    let mut fresh = 1_000_000u64;
    let mut firsts: Vec<FlowRecord> = (0..4096).map(|i| record(i, "NEW")).collect();
    c.bench_function("metrics: a new flow's first record", |b| {
        b.iter(|| {
            let r = &mut firsts[(fresh % 4096) as usize];
            r.uuid = format!("5b0d5f5e-0000-4000-8000-{fresh:012}");
            fresh += 1;
            metrics.observe(r);
        })
    });
    c.bench_function("record clone (what publish shares with the outputs)", |b| {
        b.iter(|| black_box(black_box(&r).clone()))
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let mut exporters = rt
        .block_on(Exporters::start(&config(dir.path())))
        .expect("exporters");
    let records: Vec<FlowRecord> = (0..4096)
        .map(|i| record(i, if i % 2 == 0 { "NEW" } else { "UPDATE" }))
        .collect();
    let mut i = 0;
    c.bench_function("publish (metrics + flow log queue + observe ring)", |b| {
        b.iter(|| {
            exporters.publish(&records[i % records.len()]);
            i += 1;
        })
    });
    let quiet_dir = tempfile::tempdir().expect("tempdir");
    let mut quiet = rt
        .block_on(Exporters::start(&ExportConfig {
            flow_log: FlowLogTarget::Off,
            ..config(quiet_dir.path())
        }))
        .expect("exporters");
    c.bench_function("publish, flow log off (metrics + observe ring)", |b| {
        b.iter(|| {
            quiet.publish(&records[i % records.len()]);
            i += 1;
        })
    });
    quiet.close();
    let hub = exporters.observe_hub().expect("observe on").clone();
    let _followers: Vec<_> = (0..4)
        .map(|_| {
            hub.subscribe(&ObserveRequest {
                filters: netwatch::export::filter::FilterSet {
                    allow: vec![FlowFilter::parse_expr("to-port=8001").expect("filter")],
                    deny: vec![],
                },
                follow: true,
                ..ObserveRequest::default()
            })
        })
        .collect();
    c.bench_function("publish with 4 filtering followers", |b| {
        b.iter(|| {
            exporters.publish(&records[i % records.len()]);
            i += 1;
        })
    });
    exporters.close();
}

criterion_group! {
    name = export;
    config = Criterion::default().measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    targets = benches
}

fn main() {
    export();
    Criterion::default().configure_from_args().final_summary();
}
