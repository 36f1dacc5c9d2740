//! The observe API's request line from arbitrary bytes, parsed as the agent
//! parses it: never panics; what parses serializes to a request that parses
//! to the same thing; subscribing with it and publishing records never
//! panics, and each record is either queued or counted lost.
#![no_main]

#[path = "../common/sample.rs"]
mod sample;

use std::sync::{Arc, atomic::Ordering};

use libfuzzer_sys::fuzz_target;
use netwatch::export::server::{ApiConfig, ObserveHub, ObserveRequest};

fuzz_target!(|line: &[u8]| {
    let Ok(text) = std::str::from_utf8(line) else {
        return;
    };
    let Ok(request) = serde_json::from_str::<ObserveRequest>(text.trim()) else {
        return;
    };
    let wire = serde_json::to_string(&request).expect("a request serializes");
    let back: ObserveRequest = serde_json::from_str(&wire)
        .unwrap_or_else(|e| panic!("{text:?}: its wire form {wire} does not parse: {e}"));
    assert_eq!(back, request, "{text:?} -> {wire}");

    let config = ApiConfig {
        socket: None,
        buffer_records: 4,
        client_queue: 2,
        ..ApiConfig::default()
    };
    let dropped = prometheus::IntCounter::new("dropped", "dropped").unwrap();
    let clients = prometheus::IntGauge::new("clients", "clients").unwrap();
    let hub = ObserveHub::new(&config, "node-1", dropped.clone(), clients);
    let records: Vec<_> = sample::records().into_iter().map(Arc::new).collect();
    for r in &records {
        hub.publish(r);
    }
    let mut sub = hub.subscribe(&request);
    let mut admitted = 0;
    for _ in 0..3 {
        for r in &records {
            hub.publish(r);
            admitted += u64::from(request.filters.admits(r));
        }
    }
    if let Some(live) = sub.live.as_mut() {
        let mut queued = 0;
        while live.try_recv().is_ok() {
            queued += 1;
        }
        let lost = sub.lost.load(Ordering::Relaxed);
        assert_eq!(
            queued + lost,
            admitted,
            "every admitted record queued or counted"
        );
        assert_eq!(dropped.get(), lost);
    }
});
