//! Kubernetes Events: a Warning `PacketDrop` event on the source pod of a
//! dropped flow, so `kubectl describe pod` shows it (off by default,
//! `--kubernetes-events`).
//!
//! Rate-limited as Hubble does: at most one event per flow (source pod,
//! destination address, port and protocol) per interval (2 minutes by
//! default), and at most a fixed number per minute in all, so a storm of
//! drops never floods the API server. Posting happens on a task of its own
//! behind a bounded queue; what does not fit, or fails, is counted in
//! `netwatch_kubernetes_events_total{result}`.

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Event;
use kube::api::{Api, PostParams};
use prometheus::IntCounterVec;
use tokio::sync::mpsc;

use crate::flow::record::{FlowRecord, Lifecycle, Verdict};

/// The event reason, as Hubble's.
pub const REASON: &str = "PacketDrop";

/// How events are limited.
#[derive(Clone, Debug)]
pub struct EventsConfig {
    /// At most one event per flow key per interval.
    pub interval: Duration,
    /// At most this many events per minute in all.
    pub max_per_minute: u32,
    /// Events waiting to be posted at most.
    pub queue: usize,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            interval: Duration::from_secs(120),
            max_per_minute: 60,
            queue: 256,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct EventKey {
    namespace: String,
    pod: String,
    destination: IpAddr,
    port: u16,
    protocol: String,
}

/// Emits `PacketDrop` events for dropped flows.
pub struct PacketDropEvents {
    tx: mpsc::Sender<(String, Event)>,
    config: EventsConfig,
    node_name: String,
    last_sent: HashMap<EventKey, Instant>,
    /// Start of the current minute, and events in it.
    window: (Instant, u32),
    outcomes: IntCounterVec,
}

impl PacketDropEvents {
    /// Start posting through `client`. Must be called within the tokio runtime.
    pub fn start(
        client: kube::Client,
        node_name: &str,
        config: EventsConfig,
        outcomes: IntCounterVec,
    ) -> PacketDropEvents {
        let (tx, mut rx) = mpsc::channel::<(String, Event)>(config.queue.max(1));
        let posted = outcomes.clone();
        tokio::spawn(async move {
            let mut failing = false;
            while let Some((namespace, event)) = rx.recv().await {
                let api: Api<Event> = Api::namespaced(client.clone(), &namespace);
                match api.create(&PostParams::default(), &event).await {
                    Ok(_) => {
                        posted.with_label_values(&["posted"]).inc();
                        failing = false;
                    }
                    Err(e) => {
                        posted.with_label_values(&["failed"]).inc();
                        if !failing {
                            failing = true;
                            tracing::warn!(
                                "cannot post Kubernetes Events: {e}; the agent's ServiceAccount needs `create` on `events` \
                                 (counted in netwatch_kubernetes_events_total{{result=\"failed\"}})"
                            );
                        }
                    }
                }
            }
        });
        PacketDropEvents {
            tx,
            config,
            node_name: node_name.to_string(),
            last_sent: HashMap::new(),
            window: (Instant::now(), 0),
            outcomes,
        }
    }

    /// Consider one record; queues an event when it is due. Never waits.
    pub fn observe(&mut self, r: &FlowRecord, now: Instant) {
        // The first record of a dropped flow from a known pod.
        if r.verdict != Verdict::Dropped || r.lifecycle != Lifecycle::New {
            return;
        }
        let src = &r.source;
        if src.pod_name.is_empty() || src.namespace.is_empty() {
            return;
        }
        let key = EventKey {
            namespace: src.namespace.to_string(),
            pod: src.pod_name.to_string(),
            destination: r.ip.destination,
            port: r.l4.ports().map(|p| p.destination_port).unwrap_or(0),
            protocol: r.l4.protocol_name(),
        };
        if self
            .last_sent
            .get(&key)
            .is_some_and(|t| now.duration_since(*t) < self.config.interval)
        {
            self.outcomes.with_label_values(&["rate_limited"]).inc();
            return;
        }
        if now.duration_since(self.window.0) >= Duration::from_secs(60) {
            self.window = (now, 0);
        }
        if self.window.1 >= self.config.max_per_minute {
            self.outcomes.with_label_values(&["rate_limited"]).inc();
            return;
        }
        if self.last_sent.len() >= 10_000 {
            let interval = self.config.interval;
            self.last_sent
                .retain(|_, t| now.duration_since(*t) < interval);
        }
        let event = packet_drop_event(r, &self.node_name);
        match self.tx.try_send((key.namespace.clone(), event)) {
            Ok(()) => {
                self.window.1 += 1;
                self.last_sent.insert(key, now);
            }
            Err(_) => self.outcomes.with_label_values(&["dropped"]).inc(),
        }
    }
}

/// The one-line message: what was dropped, why, and by which policy.
pub fn message(r: &FlowRecord) -> String {
    let dst = &r.destination;
    let port =
        r.l4.ports()
            .map(|p| format!(":{}", p.destination_port))
            .unwrap_or_default();
    let to = if dst.pod_name.is_empty() {
        format!("{}{port}", fmt_ip(r.ip.destination))
    } else {
        format!("{}/{}{port}", dst.namespace, dst.pod_name)
    };
    let mut m = format!("{} to {to} dropped", r.l4.protocol_name());
    if let Some(reason) = &r.drop_reason_desc {
        m.push_str(&format!(" ({reason})"));
    }
    let policies = r.denied_by_labels();
    if !policies.is_empty() {
        m.push_str(&format!(", denied by {}", policies.join(", ")));
    }
    if let Some(e) = &r.explanation {
        m.push_str(&format!(": {e}"));
    }
    m
}

fn fmt_ip(ip: IpAddr) -> String {
    match ip {
        IpAddr::V6(v6) => format!("[{v6}]"),
        IpAddr::V4(v4) => v4.to_string(),
    }
}

/// The core/v1 Event for a dropped flow, on its source pod.
pub fn packet_drop_event(r: &FlowRecord, node_name: &str) -> Event {
    let src = &r.source;
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let mut involved = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod", "namespace": src.namespace, "name": src.pod_name,
    });
    if !src.pod_uid.is_empty() {
        involved["uid"] = src.pod_uid.as_str().into();
    }
    let v = serde_json::json!({
        "metadata": {"generateName": format!("{}.", src.pod_name), "namespace": src.namespace},
        "involvedObject": involved,
        "reason": REASON,
        "type": "Warning",
        "message": message(r),
        "source": {"component": "netwatch-agent", "host": node_name},
        "reportingComponent": "netwatch-agent",
        "reportingInstance": node_name,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    });
    serde_json::from_value(v).unwrap_or_default()
}
