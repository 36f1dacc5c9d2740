//! The agent's main loop: one task that owns the kernel side and the flow
//! assembler, fed by the ring buffer, link events and a ticker.
//!
//! ```text
//! ring buffer ──► KernelEvent ─┐
//! link events ──► TC attach    ├─► FlowAssembler ──► records ──► Attribution ──► Exporters
//! ticker ──► table scans ──────┘   (drop counts,      (identity, policy)
//!                                   unanswered handshakes)
//! snapshots (manifests / API) ──────────────────────────────────► Attribution
//! ```
//!
//! Capture starts before the cluster's identities are known: records wait at
//! most `identity_wait` for the first complete snapshot, then go out
//! unenriched (marked and counted).

use std::{
    collections::VecDeque,
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{debug, error, info, warn};

use crate::{
    attribution::{Attribution, AttributionConfig},
    capture::{
        events::{EventReader, KernelClock, KernelEvent, monotonic_ns},
        hooks::tc::{AttachOutcome, TcAttacher},
        interfaces::{AttachError, InterfacePatterns, LinkChange, watch_links},
        load::{CaptureConfig, KernelCapture, LoadError},
        netns::NetnsResolver,
        tables::{KernelTables, Losses},
    },
    export::{ExportConfig, ExportError, Exporters, KernelStats},
    flow::{
        assemble::{AssemblerConfig, FlowAssembler, Signal},
        record::{FlowRecord, L4},
    },
    identity::{KubeWatchConfig, SnapshotFeed, SnapshotSource, SourceError},
};
use netwatch_common::{FlowKey, IP_V4, IP_V6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

/// Where the cluster's identities and policies come from.
#[derive(Clone, Debug, Default)]
pub enum IdentitySource {
    /// None: flows are reported by address only.
    #[default]
    None,
    /// Standalone: manifest files, reloaded when they change.
    Manifests(Vec<PathBuf>),
    /// The API server: in-cluster config, or this kubeconfig; its timeouts
    /// (the node name is filled in from [`DaemonConfig::node_name`]).
    Kube {
        kubeconfig: Option<PathBuf>,
        watch: KubeWatchConfig,
    },
}

/// Everything the daemon needs to run.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub node_name: String,
    pub interfaces: Vec<String>,
    pub export: ExportConfig,
    pub connect_timeout: Duration,
    pub update_interval: Duration,
    pub idle_timeout: Duration,
    /// Flows tracked at once; past it the quietest are finalised early.
    pub max_flows: usize,
    pub capture: CaptureConfig,
    /// Stop after this long (tests, demos); `None` runs until SIGINT/SIGTERM.
    pub run_for: Option<Duration>,
    pub identity: IdentitySource,
    pub attribution: AttributionConfig,
    /// How long records wait for the first complete snapshot.
    pub identity_wait: Duration,
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
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("{0}; give --kubeconfig PATH, run in a pod, or use --manifests")]
    Kube(#[from] crate::identity::KubeSourceError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

async fn start_identity(
    source: &IdentitySource,
    node_name: &str,
) -> Result<Option<SnapshotFeed>, DaemonError> {
    let source = match source {
        IdentitySource::None => return Ok(None),
        IdentitySource::Manifests(paths) => SnapshotSource::manifests(paths.clone()),
        IdentitySource::Kube { kubeconfig, watch } => {
            let client = crate::identity::kube::client(kubeconfig.as_deref()).await?;
            SnapshotSource::kube(
                client,
                KubeWatchConfig {
                    node_name: Some(node_name.to_string()),
                    ..watch.clone()
                },
            )
        }
    };
    Ok(Some(source.start().await?))
}

/// Records waiting for the cluster's identities.
struct WaitingRoom {
    records: VecDeque<(Instant, FlowRecord)>,
    limit: usize,
}

/// The client's flow key of a record (the socket's view: before DNAT).
fn client_key(r: &FlowRecord) -> Option<FlowKey> {
    let (proto, ports) = match &r.l4 {
        L4::Tcp(p) => (IPPROTO_TCP, p),
        L4::Udp(p) => (IPPROTO_UDP, p),
        L4::Sctp(p) => (IPPROTO_SCTP, p),
        _ => return None,
    };
    let (dst, dport) = match &r.original_destination {
        Some(o) => (o.ip, o.port),
        None => (r.ip.destination, ports.destination_port),
    };
    let mut k = FlowKey {
        src_port: ports.source_port,
        dst_port: dport,
        proto,
        ..FlowKey::default()
    };
    match (r.ip.source, dst) {
        (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => {
            k.ip_version = IP_V4;
            k.src_addr[..4].copy_from_slice(&s.octets());
            k.dst_addr[..4].copy_from_slice(&d.octets());
        }
        (std::net::IpAddr::V6(s), std::net::IpAddr::V6(d)) => {
            k.ip_version = IP_V6;
            k.src_addr = s.octets();
            k.dst_addr = d.octets();
        }
        _ => return None,
    }
    Some(k)
}

/// Run until stopped. Capture starts before anything else is ready.
pub async fn run(config: DaemonConfig) -> Result<(), DaemonError> {
    let patterns = InterfacePatterns::new(&config.interfaces)?;
    // The kernel side first: it is what needs privileges, so a missing
    // capability is the first thing an operator hears about.
    let (mut capture, maps) = KernelCapture::load(&config.capture)?;
    // Say what is captured: a setting that silently counts nothing looks
    // exactly like a healthy quiet node.
    if !capture.reasons.is_empty() {
        let counted: Vec<String> = capture
            .reasons
            .parse_filter(&config.capture.drop_reasons)
            .map(|set| set.into_iter().map(|v| capture.reasons.name(v)).collect())
            .unwrap_or_default();
        if counted.is_empty() {
            warn!(drop_reasons = %config.capture.drop_reasons, "no kernel drop reason is counted: drops are not reported");
        } else {
            info!(drop_reasons = %counted.join(","), "counting kernel drops with these reasons");
        }
    }
    let mut outputs = Exporters::start(&config.export).await?;
    outputs.capture_hooks(&capture.hooks);
    let (mut tables, ring) = KernelTables::new(maps);
    let mut reader = EventReader::new(ring)?;
    let mut attacher = TcAttacher::new(patterns, capture.hooks.tc);
    // Capture runs from here on; identities fill in when they arrive.
    let mut feed = start_identity(&config.identity, &config.node_name).await?;
    let mut attribution = Attribution::new(config.attribution.clone());
    let mut waiting = WaitingRoom {
        records: VecDeque::new(),
        limit: 100_000,
    };
    let mut ready_open = true;
    let mut netns_resolver: Option<Option<NetnsResolver>> = None;
    let mut last_expire = Instant::now();
    let started = Instant::now();
    let mut warned_no_interface = false;
    // Memory freed by snapshot updates is handed back at most every few
    // seconds (a rollout applies many updates a second).
    let mut trim_due = false;
    let mut last_trim = Instant::now();
    match feed.as_mut() {
        None => warn!(
            "no identity source (--manifests or --kubeconfig, or run in a pod): flows are reported by address only"
        ),
        // The channel's first value counts as seen: apply it now.
        Some(f) => {
            let snapshot = f.snapshots.borrow_and_update().clone();
            let complete = *f.ready.borrow_and_update();
            attribution.update(&snapshot, complete, SystemTime::now());
            outputs.cluster_pods(&snapshot, attribution.identity());
            f.release(&snapshot);
            drop(snapshot);
            release_freed_memory();
        }
    }

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
        own_netns: capture.own_netns,
        max_flows: config.max_flows,
        ..AssemblerConfig::default()
    });
    let connect_timeout_ns = config.connect_timeout.as_nanos() as u64;
    // Scan often enough that a timeout is reported within a quarter of the
    // timeout, but never more than 10 times a second.
    let scan_every =
        (config.connect_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
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
    // Ready once capturing and, with an identity source, once it has synced.
    // The manifests source is complete with its first snapshot (applied
    // above), and no change may ever follow: readiness must not wait for one.
    outputs.set_ready(feed.is_none() || attribution.is_synced());

    loop {
        let sleep_until =
            deadline.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            r = reader.read(&clock, &mut events) => {
                if let Err(e) = r {
                    error!("reading the ring buffer: {e}");
                }
                handle_events(
                    &mut events,
                    &mut EventSinks {
                        assembler: &mut assembler,
                        attribution: &mut attribution,
                        waiting: &mut waiting,
                        tables: &tables,
                        outputs: &mut outputs,
                        capture: &mut capture,
                        attacher: &attacher,
                        btf_path: &config.capture.btf_path,
                        has_source: feed.is_some(),
                    },
                );
            }
            Some(change) = link_rx.recv() => {
                let peer = match &change {
                    LinkChange::Present { peer_netns, .. } => *peer_netns,
                    LinkChange::Gone { .. } => None,
                };
                let outcome = attacher.apply(&mut capture, change);
                // With --own-netns-only, the pod's namespace behind this
                // interface is the node's too.
                if let (true, AttachOutcome::Attached { name, .. }, Some(nsid)) =
                    (config.capture.own_netns_only, &outcome, peer)
                {
                    let resolver = netns_resolver.get_or_insert_with(|| NetnsResolver::new().ok());
                    match resolver.as_mut() {
                        Some(r) => match r.inode_of(nsid).await {
                            Some(inum) => {
                                if let Err(e) = capture.allow_netns(inum) {
                                    warn!(interface = %name, "cannot count drops in the pod's namespace: {e}");
                                }
                            }
                            None => debug!(interface = %name, nsid, "the pod's namespace is not visible; its own drops are not counted"),
                        },
                        None => debug!("no netlink socket for namespace ids"),
                    }
                }
            }
            Some(changed) = async {
                match feed.as_mut() {
                    Some(f) => Some(tokio::select! {
                        r = f.snapshots.changed() => r.is_ok(),
                        // A closed readiness channel just means readiness is final.
                        Ok(()) = f.ready.changed(), if ready_open => true,
                        else => true,
                    }),
                    None => std::future::pending().await,
                }
            } => {
                if let Some(f) = feed.as_mut() {
                    ready_open = f.ready.has_changed().is_ok();
                    if !changed {
                        error!("the identity source stopped; keeping the last snapshot");
                        feed = None;
                    } else {
                        let snapshot = f.snapshots.borrow_and_update().clone();
                        let complete = *f.ready.borrow_and_update();
                        attribution.update(&snapshot, complete, SystemTime::now());
                        outputs.cluster_pods(&snapshot, attribution.identity());
                        f.release(&snapshot);
                        trim_due = true;
                        if attribution.is_synced() {
                            release(&mut waiting, &mut attribution, &tables, &mut outputs);
                            outputs.set_ready(true);
                        }
                    }
                }
            }
            _ = ticker.tick() => {
                if clock_sampled.elapsed() > Duration::from_secs(60) {
                    clock = KernelClock::now();
                    clock_sampled = tokio::time::Instant::now();
                }
                let now = SystemTime::now();
                let names = |i: u32| attacher.name_of(i).map(str::to_string);
                let has_source = feed.is_some();
                let read = scan_tables(
                    &mut tables,
                    &clock,
                    connect_timeout_ns,
                    config.idle_timeout,
                    &mut |s, tables| {
                        let records = assembler.handle(s, now, &capture.reasons, &names);
                        route(records, &mut attribution, &mut waiting, tables, &mut outputs, has_source);
                    },
                );
                // Under a flood the records of a large scan come and go:
                // hand the memory they freed back.
                trim_due |= read >= LARGE_SCAN;
                let out = assembler.tick(now, &capture.reasons, &names);
                route(out.records, &mut attribution, &mut waiting, &tables, &mut outputs, feed.is_some());
                // Records that waited long enough for identities go out as they are.
                while waiting.records.front().is_some_and(|(t, _)| t.elapsed() >= config.identity_wait) {
                    if let Some((_, mut r)) = waiting.records.pop_front() {
                        r.unenriched = true;
                        outputs.publish(&r);
                    }
                }
                // Interfaces are listed within moments of start; none by
                // now means the globs match nothing on this node.
                if !warned_no_interface && attacher.is_empty() && started.elapsed() > Duration::from_secs(10) {
                    warned_no_interface = true;
                    warn!(
                        interfaces = ?config.interfaces,
                        "no interface matches --interfaces: no pod traffic is classified (handshakes, refusals); check the CNI's interface names (ip link)"
                    );
                }
                // Each API kind's state: /readyz, the stale and forbidden
                // gauges (a failing kind's age grows, so every tick).
                if let Some(status) = feed.as_ref().and_then(|f| f.api_status.as_ref()) {
                    outputs.api_status(&status.borrow());
                }
                if trim_due && last_trim.elapsed() > Duration::from_secs(5) {
                    release_freed_memory();
                    trim_due = false;
                    last_trim = Instant::now();
                }
                if last_expire.elapsed() > Duration::from_secs(5) {
                    attribution.expire(now);
                    last_expire = Instant::now();
                }
                for k in &out.finished_drop_keys {
                    tables.remove_drop(k);
                }
                for k in &out.finished_aggregates {
                    tables.remove_aggregate(k);
                }
                for k in &out.finished_pending_keys {
                    tables.remove_pending(k);
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
                    aggregate_entries: assembler.active_aggregates(),
                    tracked_flows: assembler.active_flows(),
                });
                outputs.flush();
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = tokio::time::sleep_until(sleep_until), if deadline.is_some() => break,
        }
    }

    info!("stopping: writing final records and detaching");
    // What the kernel wrote before the signal (a refusal's ICMP, a drop)
    // is still in the ring: read it, or those events are lost silently.
    reader.read_now(&clock, &mut events);
    handle_events(
        &mut events,
        &mut EventSinks {
            assembler: &mut assembler,
            attribution: &mut attribution,
            waiting: &mut waiting,
            tables: &tables,
            outputs: &mut outputs,
            capture: &mut capture,
            attacher: &attacher,
            btf_path: &config.capture.btf_path,
            has_source: feed.is_some(),
        },
    );
    let names = |i: u32| attacher.name_of(i).map(str::to_string);
    let now = SystemTime::now();
    let mut records = Vec::new();
    scan_tables(
        &mut tables,
        &clock,
        connect_timeout_ns,
        config.idle_timeout,
        &mut |s, _| records.extend(assembler.handle(s, now, &capture.reasons, &names)),
    );
    records.extend(assembler.finish_all(&capture.reasons, &names));
    route(
        records,
        &mut attribution,
        &mut waiting,
        &tables,
        &mut outputs,
        feed.is_some(),
    );
    for (_, mut r) in waiting.records.drain(..) {
        r.unenriched = true;
        outputs.publish(&r);
    }
    outputs.flush();
    link_task.abort();
    if let Ok(l) = tables.losses() {
        info!(lost = l.total_lost(), "kernel losses over the agent's life");
    }
    // Dropping the loaded object detaches every program and link.
    drop(capture);
    Ok(())
}

/// Table entries read in one scan past which the memory freed after it is
/// handed back to the kernel (at most every 5 s, as after cluster loads).
const LARGE_SCAN: usize = 4096;

/// Hands memory the allocator holds free back to the kernel. A snapshot's
/// load frees far more than it keeps (file text, parse trees, the previous
/// snapshot, lists as the API sent them), and glibc keeps freed memory
/// mapped in each thread's arena: without this the agent's RSS stays at
/// the load's peak.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Where a batch of kernel events goes: the assembler, then attribution and
/// the outputs.
struct EventSinks<'a> {
    assembler: &'a mut FlowAssembler,
    attribution: &'a mut Attribution,
    waiting: &'a mut WaitingRoom,
    tables: &'a KernelTables,
    outputs: &'a mut Exporters,
    capture: &'a mut KernelCapture,
    attacher: &'a TcAttacher,
    btf_path: &'a std::path::Path,
    has_source: bool,
}

/// One batch of kernel events (drained from `events`) into records.
fn handle_events(events: &mut Vec<KernelEvent>, s: &mut EventSinks<'_>) {
    let now = SystemTime::now();
    let attacher = s.attacher;
    let names = |i: u32| attacher.name_of(i).map(str::to_string);
    for e in events.drain(..) {
        if let KernelEvent::Established {
            time,
            flow,
            ifindex,
            direction,
        } = e
        {
            if s.attribution.is_synced() {
                let mut r = s.assembler.established_record(
                    flow,
                    time,
                    ifindex,
                    direction,
                    &s.capture.reasons,
                    &names,
                );
                r.cgroup_id = s.tables.connect_cgroup(&flow);
                if let Some(r) = s.attribution.not_enforced(r, now) {
                    s.outputs.publish(&r);
                }
            }
            continue;
        }
        // A subsystem's reason (Open vSwitch's) whose module was loaded
        // after start: read its names before the record.
        if let KernelEvent::Drop { reason, .. } = &e {
            s.capture.reasons.learn(*reason, s.btf_path);
        }
        let records = s
            .assembler
            .handle(Signal::Kernel(e), now, &s.capture.reasons, &names);
        route(
            records,
            s.attribution,
            s.waiting,
            s.tables,
            s.outputs,
            s.has_source,
        );
    }
}

/// Enrich and publish records, or park them until identities arrive.
fn route(
    records: Vec<FlowRecord>,
    attribution: &mut Attribution,
    waiting: &mut WaitingRoom,
    tables: &KernelTables,
    out: &mut Exporters,
    has_source: bool,
) {
    for mut r in records {
        if r.cgroup_id.is_none() {
            r.cgroup_id = client_key(&r).and_then(|k| tables.connect_cgroup(&k));
        }
        if has_source && !attribution.is_synced() {
            if waiting.records.len() >= waiting.limit
                && let Some((_, mut old)) = waiting.records.pop_front()
            {
                old.unenriched = true;
                out.publish(&old);
            }
            waiting.records.push_back((Instant::now(), r));
            continue;
        }
        if has_source {
            attribution.enrich(&mut r);
        }
        out.publish(&r);
    }
}

/// Identities arrived: enrich and publish everything that waited.
fn release(
    waiting: &mut WaitingRoom,
    attribution: &mut Attribution,
    tables: &KernelTables,
    out: &mut Exporters,
) {
    let parked: Vec<FlowRecord> = waiting.records.drain(..).map(|(_, r)| r).collect();
    route(parked, attribution, waiting, tables, out, true);
}

/// Read the kernel tables: exact drop counts, and handshakes unanswered for
/// longer than the connect timeout (removed from the table once reported).
/// Each entry's signal goes to `each` as it is read (with the tables, for
/// lookups); returns how many entries were read.
fn scan_tables(
    tables: &mut KernelTables,
    clock: &KernelClock,
    connect_timeout_ns: u64,
    idle_timeout: Duration,
    each: &mut dyn FnMut(Signal, &KernelTables),
) -> usize {
    let mut read = 0;
    let now_ns = monotonic_ns();
    let stale_ns = (idle_timeout + Duration::from_secs(10)).as_nanos() as u64;
    // Entries the assembler no longer tracks (it handed them back, or the
    // flow was evicted) must not fill the tables.
    let mut stale_drops = Vec::new();
    let mut stale_aggregates = Vec::new();
    let mut unanswered = Vec::new();
    {
        let t: &KernelTables = tables;
        let drops = t.for_each_drop(|key, stats| {
            read += 1;
            each(
                Signal::DropCounts {
                    key,
                    stats,
                    first: clock.to_wall(stats.first_ns),
                    last: clock.to_wall(stats.last_ns),
                },
                t,
            );
            if now_ns.saturating_sub(stats.last_ns) > stale_ns {
                stale_drops.push(key);
            }
        });
        if let Err(e) = drops {
            warn!("{e}");
        }
        let aggregates = t.for_each_aggregate(|key, stats| {
            read += 1;
            each(
                Signal::AggregateCounts {
                    key,
                    stats,
                    first: clock.to_wall(stats.first_ns),
                    last: clock.to_wall(stats.last_ns),
                },
                t,
            );
            if now_ns.saturating_sub(stats.last_ns) > stale_ns {
                stale_aggregates.push(key);
            }
        });
        if let Err(e) = aggregates {
            warn!("{e}");
        }
        let pending = t.for_each_pending(|flow, p| {
            read += 1;
            if now_ns.saturating_sub(p.first_ns) >= connect_timeout_ns {
                unanswered.push(flow);
                each(
                    Signal::Unanswered {
                        flow,
                        pending: p,
                        first: clock.to_wall(p.first_ns),
                        last: clock.to_wall(p.last_ns),
                    },
                    t,
                );
            }
        });
        if let Err(e) = pending {
            warn!("{e}");
        }
    }
    for key in &stale_drops {
        tables.remove_drop(key);
    }
    for key in &stale_aggregates {
        tables.remove_aggregate(key);
    }
    for flow in &unanswered {
        tables.remove_pending(flow);
    }
    // Sockets whose close we never saw.
    let _ = tables.expire_sockets(now_ns.saturating_sub(600_000_000_000));
    read
}
