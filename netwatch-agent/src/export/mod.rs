//! Exporters: everything that leaves the agent goes through [`Exporters`]:
//!
//! - [`flowlog`]: the flow log, Hubble's export shape, stdout or a rotated
//!   file, with allow/deny [`filter`]s;
//! - [`metrics`]: Prometheus metrics on `/metrics`, with `/healthz` and
//!   `/readyz`;
//! - [`server`]: the observe API behind `netwatch observe` and `netwatch top`;
//! - [`events`]: Kubernetes `PacketDrop` Events (opt-in).
//!
//! None of them can stall the capture loop: the flow log and events are
//! written by their own thread and task behind bounded queues, observe
//! clients have bounded queues, and whatever does not fit is counted.

pub mod events;
pub mod filter;
pub mod flowlog;
pub mod hubble;
pub mod metrics;
pub mod server;

use std::{net::SocketAddr, sync::Arc, time::Instant};

use crate::{capture::tables::Losses, flow::record::FlowRecord};
use events::{EventsConfig, PacketDropEvents};
use filter::FilterSet;
use flowlog::{FlowLog, FlowLogConfig, FlowLogError, FlowLogFormat, FlowLogTarget};
use metrics::{MetricsConfig, MetricsError, MetricsRegistry};
use server::{ApiConfig, ObserveHub, ObserveServer, ServerError};

/// How the exporters are set up (from the agent's flags).
#[derive(Clone, Debug)]
pub struct ExportConfig {
    /// This node's name (observe API status, Kubernetes Events).
    pub node_name: String,
    pub flow_log: FlowLogTarget,
    /// Rotate the flow log file at this size (0: never).
    pub flow_log_max_size_bytes: u64,
    /// Rotated flow log files kept.
    pub flow_log_max_backups: usize,
    /// Which records the flow log writes.
    pub flow_log_filters: FilterSet,
    /// netwatch's lines or valid Hubble (`--flow-log-format`).
    pub flow_log_format: FlowLogFormat,
    /// Where `/metrics`, `/healthz`, `/readyz` listen (`None`: off).
    pub metrics_addr: Option<SocketAddr>,
    pub metrics: MetricsConfig,
    /// The observe API (socket and/or loopback TCP).
    pub api: ApiConfig,
    /// Kubernetes `PacketDrop` Events (`None`: off).
    pub kubernetes_events: Option<EventsConfig>,
    /// The kubeconfig the Events are posted with (`--kubeconfig`; `None`:
    /// in-cluster config or `$KUBECONFIG`), as for the identity watches.
    pub kubeconfig: Option<std::path::PathBuf>,
}

impl Default for ExportConfig {
    fn default() -> Self {
        ExportConfig {
            node_name: String::new(),
            flow_log: FlowLogTarget::Stdout,
            flow_log_max_size_bytes: 10 * 1024 * 1024,
            flow_log_max_backups: 5,
            flow_log_filters: FilterSet::default(),
            flow_log_format: FlowLogFormat::Netwatch,
            metrics_addr: Some(SocketAddr::from(([0, 0, 0, 0], 9965))),
            metrics: MetricsConfig::default(),
            api: ApiConfig::default(),
            kubernetes_events: None,
            kubeconfig: None,
        }
    }
}

/// Errors starting or running the exporters.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    FlowLog(#[from] FlowLogError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("--kubernetes-events: {0}")]
    Kube(#[from] crate::identity::kube::KubeSourceError),
}

/// What the kernel side reports about itself, for export.
#[derive(Clone, Debug, Default)]
pub struct KernelStats {
    pub losses: Losses,
    /// Pod interfaces with classifiers attached.
    pub attached_interfaces: usize,
    /// Ring buffer records that could not be decoded.
    pub undecodable_events: u64,
    /// Flows the assembler finalised early because its table was full.
    pub evicted_flows: u64,
    /// Entries of the kernel's drop aggregate being reported.
    pub aggregate_entries: usize,
    /// Flows the assembler tracks now (bounded by `--max-flows`).
    pub tracked_flows: usize,
}

/// The agent's outputs.
pub struct Exporters {
    metrics: MetricsRegistry,
    flow_log: FlowLog,
    hub: Option<Arc<ObserveHub>>,
    server: Option<ObserveServer>,
    events: Option<PacketDropEvents>,
    /// Where metrics are served (the bound port when port 0 was asked).
    pub metrics_addr: Option<SocketAddr>,
    /// Where in the snapshots' change log [`Exporters::cluster_pods`] is.
    pods_applied: Option<crate::cluster::LogPosition>,
}

impl Exporters {
    /// Open every output. Must be called within the tokio runtime.
    pub async fn start(config: &ExportConfig) -> Result<Exporters, ExportError> {
        let metrics = MetricsRegistry::new(config.metrics.clone())?;
        let flow_log = FlowLog::start(
            &FlowLogConfig {
                target: config.flow_log.clone(),
                max_size_bytes: config.flow_log_max_size_bytes,
                max_backups: config.flow_log_max_backups,
                filters: config.flow_log_filters.clone(),
                format: config.flow_log_format,
                ..FlowLogConfig::default()
            },
            metrics.flow_log.clone(),
        )?;
        // A port that cannot be bound leaves metrics off, loudly: capture and
        // the flow log go on (and Prometheus sees the target down).
        let metrics_addr = match config.metrics_addr {
            Some(addr) => {
                match metrics::serve(
                    addr,
                    metrics.registry().clone(),
                    metrics.health.clone(),
                    metrics.ready_refresher(),
                )
                .await
                {
                    Ok(bound) => {
                        tracing::info!(addr = %bound, "metrics listening on http://{bound}/metrics (also /healthz, /readyz)");
                        Some(bound)
                    }
                    Err(e) => {
                        tracing::error!("{e}; metrics are off (--metrics-addr)");
                        None
                    }
                }
            }
            None => None,
        };
        let (hub, server) = if config.api.socket.is_some() || config.api.tcp.is_some() {
            let hub = Arc::new(ObserveHub::new(
                &config.api,
                &config.node_name,
                metrics.observer_dropped.clone(),
                metrics.observer_clients.clone(),
            ));
            let server = ObserveServer::start(&config.api, hub.clone()).await?;
            (Some(hub), Some(server))
        } else {
            (None, None)
        };
        let events = match &config.kubernetes_events {
            Some(ec) => {
                // The identity's client: --kubeconfig and the User-Agent.
                let client = crate::identity::kube::client(config.kubeconfig.as_deref()).await?;
                tracing::info!(
                    "posting PacketDrop Kubernetes Events (at most one per flow per {:?})",
                    ec.interval
                );
                Some(PacketDropEvents::start(
                    client,
                    &config.node_name,
                    ec.clone(),
                    metrics.kube_events.clone(),
                ))
            }
            None => None,
        };
        Ok(Exporters {
            metrics,
            flow_log,
            hub,
            server,
            events,
            metrics_addr,
            pods_applied: None,
        })
    }

    /// One flow record, to every output. Never waits on a reader.
    pub fn publish(&mut self, record: &FlowRecord) {
        self.metrics.observe(record);
        if let Some(events) = &mut self.events {
            events.observe(record, Instant::now());
        }
        let shared = Arc::new(record.clone());
        self.flow_log.write(&shared);
        if let Some(hub) = &self.hub {
            hub.publish(&shared);
        }
    }

    /// Which capture hooks run, once at start.
    pub fn capture_hooks(&mut self, hooks: &crate::capture::hooks::HookReport) {
        self.metrics.capture_hooks(hooks);
    }

    /// The kernel side's counters, refreshed every tick.
    pub fn kernel_stats(&mut self, stats: &KernelStats) {
        self.metrics.kernel_stats(stats);
    }

    /// Whether the agent is ready: the daemon calls it once capture runs
    /// (`true` when there is no identity source to wait for, else `false`)
    /// and with `true` when identity has synced. `/readyz` and
    /// `netwatch_ready` say not ready until then.
    pub fn set_ready(&mut self, ready: bool) {
        self.metrics.health.set_capturing(true);
        self.metrics.health.set_enrichment_ready(ready);
    }

    /// The API source's kinds: `netwatch_identity_stale{kind}`,
    /// `netwatch_api_forbidden{kind}`, and `/readyz` (not ready while any
    /// kind is stale, forbidden or not listed yet, naming each).
    pub fn api_status(&mut self, status: &crate::identity::ApiStatus) {
        self.metrics.api_status(status);
    }

    /// A pod was deleted: metric series naming it go after the grace period.
    pub fn pod_deleted(&mut self, namespace: &str, pod: &str) {
        self.metrics.pod_deleted(namespace, pod);
    }

    /// The cluster as identity sees it now (`identity` updated with
    /// `snapshot`): pods gone since the previous snapshot are
    /// [`Exporters::pod_deleted`]. Pods the snapshot's change log names are
    /// looked up in `identity`; only a new log or a re-list of pods passes
    /// over every pod.
    pub fn cluster_pods(
        &mut self,
        snapshot: &crate::cluster::ClusterSnapshot,
        identity: &crate::identity::IdentityCache,
    ) {
        use crate::cluster::ChangeKind;
        let changes = self
            .pods_applied
            .and_then(|at| snapshot.changes.since(at))
            .filter(|c| {
                c.iter()
                    .all(|c| c.kind != ChangeKind::Pod || c.name.is_some())
            });
        self.pods_applied = Some(snapshot.changes.position());
        match changes {
            Some(changes) => {
                let pods = changes
                    .iter()
                    .filter(|c| c.kind == ChangeKind::Pod)
                    .filter_map(|c| {
                        let name = c.name.clone()?;
                        let namespace = if c.namespace.is_empty() {
                            "default"
                        } else {
                            &c.namespace
                        };
                        let exists = identity.pod_by_name(namespace, &name).is_some();
                        // Filed as the full pass files it: the loaders give
                        // every pod a namespace, "default" when it had none.
                        Some(((namespace.to_owned(), name), exists))
                    });
                self.metrics.pods_changed(pods);
            }
            None => {
                let pods = snapshot
                    .pods
                    .iter()
                    .filter_map(|p| Some((p.namespace().to_owned(), p.name()?.to_owned())));
                self.metrics.sync_pods(pods);
            }
        }
    }

    /// Flush buffered output (every tick and at shutdown). The flow log
    /// writer flushes by itself whenever its queue runs empty, so this only
    /// matters for outputs added later.
    pub fn flush(&mut self) {}

    /// Stop: write what the flow log has queued (waiting a few seconds at
    /// most) and remove the observe socket.
    pub fn close(&mut self) {
        self.flow_log.close(std::time::Duration::from_secs(5));
        self.server = None;
    }

    /// The metrics, for tests and benchmarks.
    pub fn metrics(&self) -> &MetricsRegistry {
        &self.metrics
    }

    /// The observe API's ring and followers, when it is on.
    pub fn observe_hub(&self) -> Option<&Arc<ObserveHub>> {
        self.hub.as_ref()
    }
}

impl Drop for Exporters {
    fn drop(&mut self) {
        self.close();
    }
}
