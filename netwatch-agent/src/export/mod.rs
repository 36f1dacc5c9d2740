//! Exporters: everything that leaves the agent goes through [`Exporters`]:
//! the flow log ([`flowlog`]) today; metrics, the live observe API and
//! Kubernetes Events plug in here too.

pub mod flowlog;

use crate::{capture::tables::Losses, flow::record::FlowRecord};
use flowlog::{FlowLogError, FlowLogTarget, FlowLogWriter};

/// How the exporters are set up (from the agent's flags).
#[derive(Clone, Debug)]
pub struct ExportConfig {
    pub flow_log: FlowLogTarget,
}

impl Default for ExportConfig {
    fn default() -> Self {
        ExportConfig { flow_log: FlowLogTarget::Stdout }
    }
}

/// Errors starting or running the exporters.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    FlowLog(#[from] FlowLogError),
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
}

/// The agent's outputs.
pub struct Exporters {
    flow_log: FlowLogWriter,
}

impl Exporters {
    /// Open every output. Must be called within the tokio runtime.
    pub async fn start(config: &ExportConfig) -> Result<Exporters, ExportError> {
        Ok(Exporters { flow_log: FlowLogWriter::open(&config.flow_log)? })
    }

    /// One flow record, to every output.
    pub fn publish(&mut self, record: &FlowRecord) {
        if let Err(e) = self.flow_log.write(record) {
            tracing::error!("{e}");
        }
    }

    /// The kernel side's counters, refreshed every tick.
    pub fn kernel_stats(&mut self, _stats: &KernelStats) {}

    /// Whether the agent is ready (capturing and, when configured, enriched).
    pub fn set_ready(&mut self, _ready: bool) {}

    /// Flush buffered output (every tick and at shutdown).
    pub fn flush(&mut self) {
        if let Err(e) = self.flow_log.flush() {
            tracing::error!("{e}");
        }
    }
}
