//! `netwatch-agent`: the per-node daemon. Argument parsing and wiring only;
//! the work is in the `netwatch` library.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use netwatch::{
    capture::load::{CaptureConfig, detect_cgroup2_root},
    daemon::{self, DaemonConfig},
    export::{ExportConfig, flowlog::FlowLogTarget},
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

    /// Glob of host-side pod interface names to attach to; repeat for several.
    /// [default: cali* lxc* veth* cni* eni* gke* azv*]
    #[arg(long = "interfaces", value_name = "GLOB")]
    interfaces: Vec<String>,

    /// Where flow records go: `stdout` or a file path (appended).
    #[arg(long, default_value = "stdout", value_name = "stdout|PATH")]
    flow_log: FlowLogTarget,

    /// A TCP SYN (or DNS query, SCTP INIT) unanswered for this many seconds
    /// is TIMED_OUT.
    #[arg(long, default_value_t = 3.0, value_name = "SECS")]
    connect_timeout: f64,

    /// Kernel drop reasons to report: names, `default` (policy-like drops),
    /// `all`, `-NAME` to remove. Example: `default,NO_SOCKET`.
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

    /// Entries of each in-kernel flow table.
    #[arg(long, default_value_t = 16384, value_name = "N")]
    table_entries: u32,

    /// Ring buffer size in bytes (power of two).
    #[arg(long, default_value_t = 256 * 1024, value_name = "BYTES")]
    ring_buffer_bytes: u32,

    /// Kernel BTF to read struct offsets and drop reason names from.
    #[arg(long, default_value = "/sys/kernel/btf/vmlinux", value_name = "PATH")]
    btf: PathBuf,

    /// Stop after this many seconds (for scripts and tests).
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,

    /// Log filter (tracing's env-filter syntax), e.g. `info` or `netwatch=debug`.
    #[arg(long, env = "NETWATCH_LOG", default_value = "info")]
    log: String,
}

fn secs(v: f64, flag: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(v).map_err(|_| anyhow::anyhow!("--{flag} {v}: must be a positive number of seconds"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log).unwrap_or_else(|_| "info".into()))
        .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netwatch-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let node_name = match args.node_name {
        Some(n) if !n.is_empty() => n,
        _ => hostname(),
    };
    let cgroup_root = match args.cgroup_root.as_deref() {
        Some("none") => None,
        Some(dir) => Some(PathBuf::from(dir)),
        None => detect_cgroup2_root(),
    };
    let config = DaemonConfig {
        node_name,
        interfaces: args.interfaces,
        export: ExportConfig { flow_log: args.flow_log },
        connect_timeout: secs(args.connect_timeout, "connect-timeout")?,
        update_interval: secs(args.update_interval, "update-interval")?,
        idle_timeout: secs(args.idle_timeout, "idle-timeout")?,
        capture: CaptureConfig {
            btf_path: args.btf,
            drop_reasons: args.drop_reasons,
            cgroup_root,
            own_netns_only: args.own_netns_only,
            table_entries: args.table_entries,
            ring_buffer_bytes: args.ring_buffer_bytes,
            ..CaptureConfig::default()
        },
        run_for: args.duration.map(|d| secs(d, "duration")).transpose()?,
        manifests: Vec::new(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(daemon::run(config))?;
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown-node".into())
}
