//! The agent's main loop: one task that owns the kernel side and the flow
//! assembler, fed by the ring buffer, link events and a ticker.
//!
//! ```text
//! ring buffer ──► KernelEvent ─┐
//! link events ──► TC attach    ├─► FlowAssembler ──► records ──► flow log
//! ticker ──► table scans ──────┘   (drop counts, unanswered handshakes)
//! ```

use std::{
    path::PathBuf,
    time::{Duration, SystemTime},
};

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{error, info, warn};

use crate::{
    capture::{
        attach::{AttachError, InterfacePatterns, LinkChange, TcAttacher, watch_links},
        events::{EventReader, KernelClock, monotonic_ns},
        load::{CaptureConfig, KernelCapture, LoadError},
        tables::{KernelTables, Losses},
    },
    export::{ExportConfig, ExportError, Exporters, KernelStats},
    flow::{
        assemble::{AssemblerConfig, FlowAssembler, Signal},
        record::FlowRecord,
    },
};

/// Everything the daemon needs to run.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub node_name: String,
    pub interfaces: Vec<String>,
    pub export: ExportConfig,
    pub connect_timeout: Duration,
    pub update_interval: Duration,
    pub idle_timeout: Duration,
    pub capture: CaptureConfig,
    /// Stop after this long (tests, demos); `None` runs until SIGINT/SIGTERM.
    pub run_for: Option<Duration>,
    pub manifests: Vec<PathBuf>,
}

/// Why the daemon could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Run until stopped. Capture starts before anything else is ready.
pub async fn run(config: DaemonConfig) -> Result<(), DaemonError> {
    let patterns = InterfacePatterns::new(&config.interfaces)?;
    let mut outputs = Exporters::start(&config.export).await?;
    let (mut capture, maps) = KernelCapture::load(&config.capture)?;
    let (mut tables, ring) = KernelTables::new(maps);
    let mut reader = EventReader::new(ring)?;
    let mut attacher = TcAttacher::new(patterns);

    let (link_tx, mut link_rx) = mpsc::channel::<LinkChange>(1024);
    let link_task = tokio::spawn(async move {
        if let Err(e) = watch_links(link_tx).await {
            error!("interface discovery stopped: {e}; no new pod interfaces will be attached");
        }
    });

    let mut assembler = FlowAssembler::new(AssemblerConfig {
        node_name: config.node_name.clone(),
        update_interval: config.update_interval,
        idle_timeout: config.idle_timeout,
        connect_timeout: config.connect_timeout,
        ..AssemblerConfig::default()
    });
    let connect_timeout_ns = config.connect_timeout.as_nanos() as u64;
    // Scan often enough that a timeout is reported within a quarter of the
    // timeout, but never more than 10 times a second.
    let scan_every = (config.connect_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
    let mut ticker = tokio::time::interval(scan_every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let deadline = config.run_for.map(|d| tokio::time::Instant::now() + d);
    let mut clock = KernelClock::now();
    let mut clock_sampled = tokio::time::Instant::now();
    let mut events = Vec::with_capacity(256);
    let mut last_losses = Losses::default();
    info!(node = %config.node_name, "netwatch-agent capturing");

    loop {
        let sleep_until = deadline.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            r = reader.read(&clock, &mut events) => {
                if let Err(e) = r {
                    error!("reading the ring buffer: {e}");
                }
                let now = SystemTime::now();
                for e in events.drain(..) {
                    emit(&mut outputs, assembler.handle(Signal::Kernel(e), now, &capture.reasons, &|i| attacher.name_of(i).map(str::to_string)));
                }
            }
            Some(change) = link_rx.recv() => {
                attacher.apply(&mut capture, change);
            }
            _ = ticker.tick() => {
                if clock_sampled.elapsed() > Duration::from_secs(60) {
                    clock = KernelClock::now();
                    clock_sampled = tokio::time::Instant::now();
                }
                let now = SystemTime::now();
                let names = |i: u32| attacher.name_of(i).map(str::to_string);
                for s in scan_tables(&mut tables, &clock, connect_timeout_ns, config.idle_timeout) {
                    emit(&mut outputs, assembler.handle(s, now, &capture.reasons, &names));
                }
                let out = assembler.tick(now, &capture.reasons, &names);
                emit(&mut outputs, out.records);
                for k in &out.finished_drop_keys {
                    tables.remove_drop(k);
                }
                if let Ok(l) = tables.losses() {
                    if l.total_lost() > last_losses.total_lost() {
                        warn!(lost = ?l.by_source(), "the kernel could not deliver or track some events");
                    }
                    last_losses = l;
                }
                outputs.kernel_stats(&KernelStats {
                    losses: last_losses,
                    attached_interfaces: attacher.len(),
                    undecodable_events: reader.undecodable,
                    evicted_flows: assembler.evicted,
                });
                outputs.flush();
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = tokio::time::sleep_until(sleep_until), if deadline.is_some() => break,
        }
    }

    info!("stopping: writing final records and detaching");
    let names = |i: u32| attacher.name_of(i).map(str::to_string);
    let now = SystemTime::now();
    for s in scan_tables(&mut tables, &clock, connect_timeout_ns, config.idle_timeout) {
        emit(&mut outputs, assembler.handle(s, now, &capture.reasons, &names));
    }
    emit(&mut outputs, assembler.finish_all(&capture.reasons, &names));
    outputs.flush();
    link_task.abort();
    if let Ok(l) = tables.losses() {
        info!(lost = l.total_lost(), "kernel losses over the agent's life");
    }
    // Dropping the loaded object detaches every program and link.
    drop(capture);
    Ok(())
}

fn emit(out: &mut Exporters, records: Vec<FlowRecord>) {
    for r in records {
        out.publish(&r);
    }
}

/// Read the kernel tables: exact drop counts, and handshakes unanswered for
/// longer than the connect timeout (removed from the table once reported).
fn scan_tables(
    tables: &mut KernelTables,
    clock: &KernelClock,
    connect_timeout_ns: u64,
    idle_timeout: Duration,
) -> Vec<Signal> {
    let mut out = Vec::new();
    let now_ns = monotonic_ns();
    match tables.drops() {
        Ok(drops) => {
            let stale_ns = (idle_timeout + Duration::from_secs(10)).as_nanos() as u64;
            for (key, stats) in drops {
                out.push(Signal::DropCounts {
                    key,
                    stats,
                    first: clock.to_wall(stats.first_ns),
                    last: clock.to_wall(stats.last_ns),
                });
                // Entries the assembler no longer tracks (it handed them back,
                // or the flow was evicted) must not fill the table.
                if now_ns.saturating_sub(stats.last_ns) > stale_ns {
                    tables.remove_drop(&key);
                }
            }
        }
        Err(e) => warn!("{e}"),
    }
    match tables.pending() {
        Ok(pending) => {
            for (flow, p) in pending {
                if now_ns.saturating_sub(p.first_ns) >= connect_timeout_ns {
                    tables.remove_pending(&flow);
                    out.push(Signal::Unanswered {
                        flow,
                        pending: p,
                        first: clock.to_wall(p.first_ns),
                        last: clock.to_wall(p.last_ns),
                    });
                }
            }
        }
        Err(e) => warn!("{e}"),
    }
    // Sockets whose close we never saw.
    let _ = tables.expire_sockets(now_ns.saturating_sub(600_000_000_000));
    out
}
