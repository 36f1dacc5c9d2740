//! Flow assembler benchmark: what a new denied flow costs when the flow table
//! is full (every new flow forces an eviction) against the same table with
//! room to spare, in the same run.
//!
//! `cargo bench -p netwatch-agent --bench assembler`

use std::{
    hint::black_box,
    time::{Duration, SystemTime},
};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use netwatch::{
    capture::{events::KernelEvent, reasons::DropReasons},
    flow::assemble::{AssemblerConfig, FlowAssembler, Signal},
};
use netwatch_common::{FlowKey, IP_V4, IPPROTO_TCP, tcp_flags};

const TRACKED: u32 = 65_536;

/// The n-th flow: a distinct client address and port to one server.
fn flow(n: u32) -> FlowKey {
    let mut k = FlowKey {
        src_port: 1024 + (n % 60_000) as u16,
        dst_port: 8080,
        proto: IPPROTO_TCP,
        ip_version: IP_V4,
        ..FlowKey::default()
    };
    k.src_addr[..4].copy_from_slice(&(0x0a00_0000 + n).to_be_bytes());
    k.dst_addr[..4].copy_from_slice(&[10, 96, 0, 1]);
    k
}

fn at(n: u32) -> SystemTime {
    SystemTime::UNIX_EPOCH
        + Duration::from_secs(1_700_000_000)
        + Duration::from_micros(u64::from(n))
}

fn dropped(n: u32) -> Signal {
    Signal::Kernel(KernelEvent::Drop {
        time: at(n),
        flow: flow(n),
        reason: 12,
        ifindex: 7,
        netns: 1,
        bytes: 60,
        tcp_flags: tcp_flags::SYN,
        outer: None,
    })
}

/// An assembler tracking `TRACKED` flows, bounded at `max_flows`.
fn filled(max_flows: usize, reasons: &DropReasons) -> FlowAssembler {
    let mut a = FlowAssembler::new(AssemblerConfig {
        max_flows,
        // Each first record rendered in `handle`, not held for a refusal.
        refusal_grace: Duration::ZERO,
        ..AssemblerConfig::default()
    });
    for n in 0..TRACKED {
        a.handle(dropped(n), at(n), reasons, &|_| None);
    }
    a
}

fn new_flows(c: &mut Criterion) {
    let reasons = DropReasons::from_pairs([(12, "SKB_DROP_REASON_NETFILTER_DROP".to_string())]);
    let mut g = c.benchmark_group("assembler");
    g.sample_size(20);
    // 1,000 new flows per batch; the table is rebuilt outside the timing.
    for (name, max_flows) in [
        ("1000 new flows, table with room", 1 << 20),
        ("1000 new flows, table full", TRACKED as usize),
    ] {
        g.bench_function(name, |b| {
            b.iter_batched_ref(
                || filled(max_flows, &reasons),
                |a| {
                    for n in TRACKED..TRACKED + 1000 {
                        black_box(a.handle(dropped(n), at(n), &reasons, &|_| None));
                    }
                },
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, new_flows);
criterion_main!(benches);
