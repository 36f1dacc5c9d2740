//! `netwatch-agent`: the per-node daemon. Argument parsing and wiring only;
//! the work is in the `netwatch` library.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use export_flags::ExportArgs;
use netwatch::{
    attribution::AttributionConfig,
    capture::{
        hooks::{kfree_skb::Variant as KfreeSkbVariant, tc::Variant as TcVariant},
        load::{CaptureConfig, detect_cgroup2_root},
        reasons::DropReasons,
    },
    daemon::{self, DaemonConfig, IdentitySource},
    export::{ExportConfig, filter::FlowFilter, flowlog::FlowLogTarget},
    identity::KubeWatchConfig,
    logging::LogFormat,
    policy::EngineOptions,
};

/// netwatch's node agent: reports every pod flow this node drops, that times
/// out or that is refused, as one JSON line per flow.
///
/// Runs as root (or with CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN). Flow records go
/// to stdout (or --flow-log PATH); logs go to stderr.
///
/// Example: netwatch-agent --node-name node-1 --interfaces 'cali*' --connect-timeout 3
#[derive(Debug, Parser)]
#[command(name = "netwatch-agent", version, about, long_about)]
struct Args {
    /// This node's name in flow records [default: $NODE_NAME, else the hostname].
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,

    /// Glob of host-side pod interface names to attach to; repeat for several
    /// (an empty one stands for the defaults). Bridges, overlay and tunnel
    /// devices are never attached to, whatever their name: a bridge's ports
    /// are. With the defaults, Open vSwitch's veth ports are attached to
    /// whatever their name (Antrea, OVN-Kubernetes, Kube-OVN).
    /// [default: cali* lxc* veth* cni* eni* gke* azv*]
    #[arg(long = "interfaces", value_name = "GLOB")]
    interfaces: Vec<String>,

    /// Where flow records go: `stdout`, a file path (appended, rotated by
    /// --flow-log-max-size-mb), or `none`.
    #[arg(long, default_value = "stdout", value_name = "stdout|PATH|none")]
    flow_log: FlowLogTarget,

    /// A TCP SYN (or DNS query, SCTP INIT) unanswered for this many seconds
    /// is TIMED_OUT.
    #[arg(long, default_value_t = 3.0, value_name = "SECS")]
    connect_timeout: f64,

    /// Kernel drop reasons to report: names, `default`, `all`, `-NAME` to
    /// remove. Example: `default,NO_SOCKET`. `default` is the drops that come
    /// from a decision to block traffic: NETFILTER_DROP, TC_INGRESS,
    /// TC_EGRESS, BPF_CGROUP_EGRESS, BPF_CGROUP_INGRESS, IP_RPFILTER,
    /// XFRM_POLICY, IP_INNOROUTES, IP_OUTNOROUTES, NEIGH_FAILED,
    /// SOCKET_FILTER, and OPENVSWITCH: every reason of Open vSwitch's own
    /// (OVS_DROP_LAST_ACTION for an OpenFlow drop, 6.4+), counted as one
    /// subsystem. The agent logs the reasons in effect at start.
    #[arg(long, default_value = "default", value_name = "LIST")]
    drop_reasons: String,

    /// cgroup v2 directory for the socket hook (sock_ops)
    /// [default: the host's cgroup v2 mount]. `none` turns it off.
    #[arg(long, value_name = "DIR")]
    cgroup_root: Option<String>,

    /// Count only drops in this agent's network namespace: for several lab
    /// nodes sharing one kernel. Leave off on real nodes.
    #[arg(long)]
    own_netns_only: bool,

    /// Minimum seconds between two records of one flow after its first.
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    update_interval: f64,

    /// A flow quiet for this many seconds gets its final record.
    #[arg(long, default_value_t = 30.0, value_name = "SECS")]
    idle_timeout: f64,

    /// Flows tracked at once in user space (each until its final record).
    /// Past it the quietest flows get their final record early (counted in
    /// netwatch_evicted_flows_total). About 275 bytes per flow.
    #[arg(long, default_value_t = 65536, value_name = "N")]
    max_flows: usize,

    /// Entries of each in-kernel flow table.
    #[arg(long, default_value_t = 16384, value_name = "N")]
    table_entries: u32,

    /// Ring buffer size in bytes (power of two).
    #[arg(long, default_value_t = 256 * 1024, value_name = "BYTES")]
    ring_buffer_bytes: u32,

    /// How drops get their reason: `reason` (the kernel's own, 5.17+),
    /// `location` (the function that dropped, from /proc/kallsyms; needs
    /// CAP_SYSLOG), `auto` (reason where the kernel has it).
    #[arg(long, value_enum, default_value_t = KfreeSkbVariant::Auto, value_name = "MODE")]
    kfree_skb_variant: KfreeSkbVariant,

    /// Load every capture hook, print which run on this kernel and in which
    /// mode (and why the others do not) as JSON lines, and exit: 0 when all
    /// run, 2 when capture would be partial. Needs the agent's privileges.
    #[arg(long)]
    check_kernel: bool,

    /// How TC classifiers attach: `tcx` (6.6+, placed first), `clsact`
    /// (priority 1, replaced on restart), `auto` (tcx where the kernel has it).
    #[arg(long, value_enum, default_value_t = TcVariant::Auto, value_name = "MODE")]
    tc_variant: TcVariant,

    /// Kernel BTF to read struct offsets and drop reason names from.
    #[arg(long, default_value = "/sys/kernel/btf/vmlinux", value_name = "PATH")]
    btf: PathBuf,

    /// Standalone mode: Kubernetes manifests (files or directories: Namespaces,
    /// Pods, Services, NetworkPolicies, workloads) to name pods and judge
    /// policies with, reloaded when they change. Without it the agent watches
    /// the API server (in a pod, or with --kubeconfig).
    #[arg(long, value_name = "PATH", num_args = 1.., conflicts_with = "kubeconfig")]
    manifests: Vec<PathBuf>,

    /// Kubeconfig for the API server [default: in-cluster config when in a pod].
    #[arg(long, env = "KUBECONFIG", value_name = "PATH")]
    kubeconfig: Option<PathBuf>,

    /// Seconds a Kubernetes API list, or the answer to a watch request, may
    /// take before it is given up and retried (a connection that silently
    /// stops answering is not waited on).
    #[arg(long, default_value_t = 30.0, value_name = "SECS")]
    api_timeout: f64,

    /// Seconds a watch may bring nothing, not even a bookmark (the API
    /// server sends one about every minute), before it is taken for dead and
    /// re-opened.
    #[arg(long, default_value_t = 75.0, value_name = "SECS")]
    api_idle_timeout: f64,

    /// Seconds a flow waits for the first complete view of the cluster before
    /// it goes out unenriched (marked `unenriched`, and counted).
    #[arg(long, default_value_t = 2.0, value_name = "SECS")]
    identity_wait: f64,

    /// Seconds a deleted pod still names flows from its old IP.
    #[arg(long, default_value_t = 300.0, value_name = "SECS")]
    tombstone_grace: f64,

    /// Whether NetworkPolicy ipBlocks also match pod IPs (Calico: true,
    /// Cilium: false).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    ipblock_matches_pods: bool,

    /// A connection the NetworkPolicies deny but that was established is
    /// reported (POLICY_NOT_ENFORCED) at most once per this many seconds per
    /// (source, destination, port) identity.
    #[arg(long, default_value_t = 60.0, value_name = "SECS")]
    not_enforced_interval: f64,

    /// Stop after this many seconds (for scripts and tests).
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,

    /// Log filter (tracing's env-filter syntax), e.g. `info` or `netwatch=debug`.
    #[arg(long, env = "NETWATCH_LOG", default_value = "info")]
    log: String,

    /// Log lines on stderr: `text` (coloured only on a terminal, never with
    /// NO_COLOR set) or `json` (one object per line, for log pipelines).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, value_name = "FORMAT")]
    log_format: LogFormat,

    // Last: the exporters' flags are listed under their own heading in
    // --help, after the capture flags.
    #[command(flatten)]
    export: ExportArgs,
}

fn secs(v: f64, flag: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(v)
        .map_err(|_| anyhow::anyhow!("--{flag} {v}: must be a positive number of seconds"))
}

fn main() -> ExitCode {
    // glibc gives each thread that allocates its own arena (up to 8 per
    // core), each holding freed memory of its own; the agent's allocations
    // are few but large (cluster snapshots built on blocking threads), so
    // two arenas keep RSS close to the live heap at no measurable cost.
    // Buffers from 256 KiB up (manifest text, lists as the API sent them,
    // vectors of typed objects, big hash tables) get mappings of their own,
    // returned to the kernel when freed; a fixed threshold also stops glibc
    // raising it to the largest buffer freed so far (up to 32 MiB), after
    // which such buffers land in an arena and pin its pages under whatever
    // small allocation follows them (RSS then depends on allocation order).
    #[cfg(target_env = "gnu")]
    // SAFETY: before any thread exists; mallopt only sets tunables.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
    let args = Args::parse();
    // kube's client logs an ERROR per failed request, without the kind;
    // the agent logs each kind's failure once, and its recovery. A filter
    // that names kube itself is taken as is.
    let filter = if args.log.contains("kube") {
        args.log.clone()
    } else {
        format!("{},kube_client=off,kube_runtime=off", args.log)
    };
    netwatch::logging::init(
        tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| "info".into()),
        args.log_format,
        true,
    );
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netwatch-agent: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each cause once: the library's errors already
/// name their source in their own message, so `{:#}` would repeat it.
fn describe(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text = format!("{text}: {cause}");
        }
    }
    text
}

/// Check flag values before anything needs privileges, so a bad value is
/// named as such and not mistaken for a missing capability.
fn validate(args: &Args) -> anyhow::Result<()> {
    if args.table_entries == 0 {
        anyhow::bail!("--table-entries 0: must be at least 1 (default 16384)");
    }
    if !args.ring_buffer_bytes.is_power_of_two() || args.ring_buffer_bytes < 4096 {
        anyhow::bail!(
            "--ring-buffer-bytes {}: must be a power of two of at least 4096 (default 262144)",
            args.ring_buffer_bytes
        );
    }
    if args.drop_reasons.trim().is_empty() {
        anyhow::bail!(
            "--drop-reasons is empty: give `default`, `all`, reason names, or `-NAME` to remove one"
        );
    }
    if args.max_flows == 0 {
        anyhow::bail!("--max-flows 0: the agent must track at least one flow");
    }
    for (flag, v) in [
        ("connect-timeout", args.connect_timeout),
        ("update-interval", args.update_interval),
        ("idle-timeout", args.idle_timeout),
        ("identity-wait", args.identity_wait),
        ("api-timeout", args.api_timeout),
        ("api-idle-timeout", args.api_idle_timeout),
    ] {
        if !(v.is_finite() && v > 0.0) {
            anyhow::bail!("--{flag} {v}: must be a positive number of seconds");
        }
    }
    // The observe API has no authentication: loopback only, refused before
    // anything needs privileges.
    if let Some(addr) = args.export.api_addr().filter(|a| !a.ip().is_loopback()) {
        anyhow::bail!(
            "--api-addr {addr}: only loopback addresses (127.0.0.1, [::1]) are allowed; the observe API has no authentication"
        );
    }
    // Reason names are the running kernel's: its BTF is world-readable, so
    // `--drop-reasons` and the flow log filters' `reason=` are checked here.
    // Without BTF, drop capture is off anyway (the load step says so).
    if let Ok(reasons) = DropReasons::from_btf_file(&args.btf) {
        reasons.parse_filter(&args.drop_reasons)?;
        for (flag, list) in [
            ("flow-log-allow", args.export.flow_log_allow()),
            ("flow-log-deny", args.export.flow_log_deny()),
        ] {
            for f in list {
                if let Ok(filter) = FlowFilter::parse_expr(f) {
                    filter
                        .check_reasons(reasons.names())
                        .map_err(|e| anyhow::anyhow!("--{flag} {f:?}: {e}"))?;
                }
            }
        }
    }
    Ok(())
}

fn run(args: Args) -> anyhow::Result<()> {
    validate(&args)?;
    let node_name = match args.node_name {
        Some(n) if !n.is_empty() => n,
        _ => hostname(),
    };
    let cgroup_root = match args.cgroup_root.as_deref() {
        Some("none") => None,
        Some(dir) => Some(PathBuf::from(dir)),
        None => {
            let detected = detect_cgroup2_root();
            if detected.is_some() && netwatch::capture::load::in_private_cgroup_namespace() {
                tracing::warn!(
                    "this process is at the root of a private cgroup namespace: the cgroup mount it sees \
                     is its own, so socket capture would see only its own sockets; mount the node's \
                     cgroup v2 root and pass --cgroup-root (the Helm chart does)"
                );
            }
            detected
        }
    };
    // PacketDrop Events go to the same API server the identity watches.
    let events_kubeconfig = args.kubeconfig.clone();
    let identity = if !args.manifests.is_empty() {
        IdentitySource::Manifests(args.manifests)
    } else if args.kubeconfig.is_some() || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        IdentitySource::Kube {
            kubeconfig: args.kubeconfig,
            watch: KubeWatchConfig {
                request_timeout: secs(args.api_timeout, "api-timeout")?,
                idle_timeout: secs(args.api_idle_timeout, "api-idle-timeout")?,
                ..KubeWatchConfig::default()
            },
        }
    } else {
        IdentitySource::None
    };
    let attribution = AttributionConfig {
        node_name: node_name.clone(),
        engine: EngineOptions {
            ipblock_matches_pods: args.ipblock_matches_pods,
        },
        cgroup_root: cgroup_root.clone(),
        tombstone_grace: secs(args.tombstone_grace, "tombstone-grace")?,
        not_enforced_interval: secs(args.not_enforced_interval, "not-enforced-interval")?,
    };
    let config = DaemonConfig {
        export: args
            .export
            .config(args.flow_log, &node_name, events_kubeconfig)?,
        node_name,
        interfaces: args.interfaces,
        connect_timeout: secs(args.connect_timeout, "connect-timeout")?,
        update_interval: secs(args.update_interval, "update-interval")?,
        idle_timeout: secs(args.idle_timeout, "idle-timeout")?,
        max_flows: args.max_flows,
        capture: CaptureConfig {
            btf_path: args.btf,
            drop_reasons: args.drop_reasons,
            cgroup_root,
            own_netns_only: args.own_netns_only,
            table_entries: args.table_entries,
            ring_buffer_bytes: args.ring_buffer_bytes,
            kfree_skb_variant: args.kfree_skb_variant,
            tc_variant: args.tc_variant,
            ..CaptureConfig::default()
        },
        run_for: args.duration.map(|d| secs(d, "duration")).transpose()?,
        identity,
        attribution,
        identity_wait: secs(args.identity_wait, "identity-wait")?,
    };
    if args.check_kernel {
        return check_kernel(&config.capture);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(daemon::run(config))?;
    Ok(())
}

/// `--check-kernel`: what capture would run here.
fn check_kernel(capture: &CaptureConfig) -> anyhow::Result<()> {
    let (kernel, _maps) = netwatch::capture::load::KernelCapture::load(capture)?;
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    for s in kernel.hooks.states() {
        println!(
            "{}",
            serde_json::json!({
                "kernel": release.trim(),
                "hook": s.hook,
                "mode": s.mode,
                "off_because": s.off_because,
            })
        );
    }
    if kernel.hooks.partial().is_some() {
        std::process::exit(2);
    }
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown-node".into())
}

/// The exporters' flags: metrics, flow log, observe API, Kubernetes Events.
mod export_flags {
    use std::{net::SocketAddr, path::PathBuf, time::Duration};

    use super::ExportConfig;
    use netwatch::export::{
        events::EventsConfig,
        filter::{FilterSet, FlowFilter},
        flowlog::{FlowLogFormat, FlowLogTarget},
        metrics::{ContextLabel, MetricsConfig, parse_metrics_addr},
        server::ApiConfig,
    };

    #[derive(Debug, clap::Args)]
    #[command(next_help_heading = "Exporters")]
    pub struct ExportArgs {
        /// Flow log lines: `netwatch` (richer: netwatch's verdicts, kernel
        /// drop reasons, explanations) or `hubble` (each line a valid Hubble
        /// observer.GetFlowsResponse; netwatch's verdict and reason in Summary).
        #[arg(long, value_enum, default_value_t = FlowLogFormat::Netwatch, value_name = "FORMAT")]
        flow_log_format: FlowLogFormat,

        /// Rotate the flow log file when it reaches this size (MiB); the old
        /// file becomes PATH.1, PATH.1 becomes PATH.2, ... 0 never rotates.
        #[arg(long, default_value_t = 10, value_name = "MIB")]
        flow_log_max_size_mb: u64,

        /// Rotated flow log files kept (PATH.1 ... PATH.N).
        #[arg(long, default_value_t = 5, value_name = "N")]
        flow_log_max_backups: usize,

        /// Write only records matching this filter; repeat to allow more
        /// (any may match). Keys are `netwatch observe`'s filter flags:
        /// verdict, namespace, from-/to-namespace, pod, from-/to-pod, label,
        /// from-/to-label, ip, from-/to-ip, port, from-/to-port, protocol,
        /// reason, traffic-direction. Example: 'verdict=DROPPED,TIMED_OUT namespace=prod'
        #[arg(long, value_name = "FILTER")]
        flow_log_allow: Vec<String>,

        /// Never write records matching this filter; repeat for more.
        /// Example: 'to-port=53 verdict=TIMED_OUT'
        #[arg(long, value_name = "FILTER")]
        flow_log_deny: Vec<String>,

        /// Serve /metrics, /healthz and /readyz here: HOST:PORT, :PORT, or
        /// `none`. Port 0 picks a free port (the log says which).
        #[arg(long, default_value = "0.0.0.0:9965", value_name = "ADDR")]
        metrics_addr: String,

        /// Labels of the flow metrics naming the source: a comma-separated
        /// list of namespace, workload, pod, app, or `none`.
        #[arg(long, default_value = "namespace,workload", value_name = "LIST")]
        metrics_source_context: String,

        /// Labels naming the destination: namespace, workload, pod, app,
        /// port, or `none`.
        #[arg(long, default_value = "namespace,workload,port", value_name = "LIST")]
        metrics_destination_context: String,

        /// At most this many labelled series across the flow metrics; past
        /// it, new label sets are counted under `_other` (and in
        /// netwatch_metrics_series_overflow_total).
        #[arg(long, default_value_t = 10_000, value_name = "N")]
        metrics_max_series: usize,

        /// Seconds after a pod is deleted that the series naming it (or one
        /// end of which only deleted pods gave) are removed.
        #[arg(long, default_value_t = 60.0, value_name = "SECS")]
        metrics_deleted_pod_grace: f64,

        /// The observe API's Unix socket (what `netwatch observe` and
        /// `netwatch top` connect to), or `none`.
        #[arg(long, default_value = netwatch::export::server::DEFAULT_SOCKET, value_name = "PATH|none")]
        api_socket: String,

        /// The observe API socket's group, by name or number: its members may
        /// read flows (the socket is mode 0660) [default: the agent's own].
        #[arg(long, value_name = "GROUP")]
        api_socket_group: Option<String>,

        /// Also serve the observe API on TCP, loopback only (e.g. 127.0.0.1:4245;
        /// port 0 picks a free port).
        #[arg(long, value_name = "ADDR")]
        api_addr: Option<SocketAddr>,

        /// Recent records kept for `netwatch observe --last/--since`.
        #[arg(long, default_value_t = 4096, value_name = "N")]
        observe_buffer: usize,

        /// Records queued per following observe client; a client that falls
        /// further behind loses records, and is told how many.
        #[arg(long, default_value_t = 1024, value_name = "N")]
        observe_client_queue: usize,

        /// Post a Warning `PacketDrop` Kubernetes Event on the source pod of
        /// dropped flows (needs `create` on `events`).
        #[arg(long)]
        kubernetes_events: bool,

        /// At most one Event per flow (source pod, destination, port) per this many seconds.
        #[arg(long, default_value_t = 120.0, value_name = "SECS")]
        kubernetes_events_interval: f64,
    }

    /// A group's id from its name or number.
    fn group_id(group: &str) -> anyhow::Result<u32> {
        if let Ok(gid) = group.parse() {
            return Ok(gid);
        }
        let name = std::ffi::CString::new(group)
            .map_err(|_| anyhow::anyhow!("--api-socket-group {group:?}: not a group name"))?;
        // SAFETY: called once at start, before any other thread looks groups
        // up; the result is copied out at once.
        let entry = unsafe { libc::getgrnam(name.as_ptr()) };
        if entry.is_null() {
            anyhow::bail!("--api-socket-group {group:?}: no such group on this host");
        }
        // SAFETY: non-null, returned by getgrnam just above.
        Ok(unsafe { (*entry).gr_gid })
    }

    impl ExportArgs {
        pub fn flow_log_allow(&self) -> &[String] {
            &self.flow_log_allow
        }

        pub fn flow_log_deny(&self) -> &[String] {
            &self.flow_log_deny
        }

        pub fn api_addr(&self) -> Option<SocketAddr> {
            self.api_addr
        }

        pub fn config(
            self,
            flow_log: FlowLogTarget,
            node_name: &str,
            kubeconfig: Option<PathBuf>,
        ) -> anyhow::Result<ExportConfig> {
            let filters = |flag: &str, list: &[String]| -> anyhow::Result<Vec<FlowFilter>> {
                list.iter()
                    .map(|f| {
                        FlowFilter::parse_expr(f)
                            .map_err(|e| anyhow::anyhow!("--{flag} {f:?}: {e}"))
                    })
                    .collect()
            };
            let secs = |v: f64, flag: &str| {
                Duration::try_from_secs_f64(v).map_err(|_| {
                    anyhow::anyhow!("--{flag} {v}: must be a positive number of seconds")
                })
            };
            Ok(ExportConfig {
                kubeconfig,
                node_name: node_name.to_string(),
                flow_log,
                flow_log_max_size_bytes: self.flow_log_max_size_mb.saturating_mul(1024 * 1024),
                flow_log_max_backups: self.flow_log_max_backups,
                flow_log_format: self.flow_log_format,
                flow_log_filters: FilterSet {
                    allow: filters("flow-log-allow", &self.flow_log_allow)?,
                    deny: filters("flow-log-deny", &self.flow_log_deny)?,
                },
                metrics_addr: parse_metrics_addr(&self.metrics_addr)?,
                metrics: MetricsConfig {
                    source_context: ContextLabel::parse_list(
                        "--metrics-source-context",
                        &self.metrics_source_context,
                        false,
                    )?,
                    destination_context: ContextLabel::parse_list(
                        "--metrics-destination-context",
                        &self.metrics_destination_context,
                        true,
                    )?,
                    max_series: self.metrics_max_series,
                    deleted_pod_grace: secs(
                        self.metrics_deleted_pod_grace,
                        "metrics-deleted-pod-grace",
                    )?,
                },
                api: ApiConfig {
                    socket: (self.api_socket != "none").then(|| PathBuf::from(&self.api_socket)),
                    socket_group: self.api_socket_group.as_deref().map(group_id).transpose()?,
                    tcp: self.api_addr,
                    buffer_records: self.observe_buffer.max(1),
                    client_queue: self.observe_client_queue.max(1),
                },
                kubernetes_events: self
                    .kubernetes_events
                    .then(|| {
                        secs(
                            self.kubernetes_events_interval,
                            "kubernetes-events-interval",
                        )
                    })
                    .transpose()?
                    .map(|interval| EventsConfig {
                        interval,
                        ..EventsConfig::default()
                    }),
            })
        }
    }
}
