//! `netwatch-lab`: a lab from a spec file until Ctrl-C (`up`), the sweep of
//! crashed labs (`cleanup`), and what runs inside lab pods and nodes (the
//! other commands: the lab starts them through `ip netns exec` and a cgroup).
//! Tests and `cargo xtask` drive labs through the library.

use std::{
    io::{Read, Write},
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use netwatch_lab::{Lab, LabSpec, PodSpec, Probe, datapath, flood, probe, serve, tcprog};

#[derive(Parser)]
#[command(
    name = "netwatch-lab",
    about = "netwatch's lab: Kubernetes nodes and pods from network namespaces. `up` builds \
             one from a spec file; the other commands run inside lab pods and nodes"
)]
struct Cli {
    #[command(subcommand)]
    what: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the lab a spec file describes (YAML: nodes, pods, nftables
    /// rules) and keep it up until Ctrl-C; run as root.
    Up {
        spec: PathBuf,
        /// Tear down after this many seconds instead of waiting for Ctrl-C.
        #[arg(long)]
        duration: Option<u64>,
    },
    /// Remove what crashed labs left behind (network namespaces, cgroups,
    /// processes), then exit.
    Cleanup,
    /// The listeners of a pod (`tcp:80,udp:53,...`), until killed.
    Serve {
        #[arg(long)]
        listen: String,
    },
    /// One probe (JSON of netwatch_lab::Probe); prints its result as JSON.
    Probe {
        #[arg(long)]
        json: String,
    },
    /// An HTTP GET printed to stdout (inside a lab node: its loopback).
    Fetch { url: String },
    /// Attach a stand-in CNI program (ends the TC chain) to interfaces;
    /// prints `attached`, then holds tcx links until stdin closes or killed.
    TcForeign {
        #[arg(long, value_enum)]
        mode: tcprog::TcMode,
        interfaces: Vec<String>,
    },
    /// Attach a node's eBPF datapath (JSON of datapath::ebpf::NodeDatapath);
    /// prints `attached`, then holds tcx links until stdin closes or killed.
    EbpfDatapath {
        #[arg(long, value_enum)]
        mode: tcprog::TcMode,
        #[arg(long)]
        json: String,
    },
    /// A flood of new TCP flows (JSON of netwatch_lab::flood::Flood);
    /// prints what was sent as JSON.
    Flood {
        #[arg(long)]
        json: String,
    },
    /// The TC programs on an interface, in run order, as JSON.
    TcList {
        #[arg(long)]
        interface: String,
    },
}

fn main() -> Result<()> {
    match Cli::parse().what {
        Command::Up { spec, duration } => up(&spec, duration),
        Command::Cleanup => {
            let n = netwatch_lab::sweep_stale();
            eprintln!("netwatch-lab: removed {n} leftovers of crashed labs");
            Ok(())
        }
        Command::Serve { listen } => {
            let spec = PodSpec {
                name: "listener".into(),
                namespace: "lab".into(),
                node: String::new(),
                ip: std::net::Ipv4Addr::UNSPECIFIED,
                ipv6: None,
                listen: listen.split(',').map(str::to_string).collect(),
                uid: None,
                host_network: false,
            };
            let listeners = spec.listeners().map_err(anyhow::Error::msg)?;
            serve::serve(&listeners)?;
            Ok(())
        }
        Command::Fetch { url } => {
            print!("{}", probe::http_get(&url)?);
            Ok(())
        }
        Command::TcForeign { mode, interfaces } => {
            let mut held = Vec::new();
            let mut ids = Vec::new();
            for i in &interfaces {
                let fds = tcprog::attach_foreign(i, mode)?;
                if let Some(prog) = fds.last() {
                    ids.push(tcprog::program_id(prog)?.to_string());
                }
                held.extend(fds);
            }
            println!("attached {}", ids.join(","));
            std::io::stdout().flush()?;
            // Hold the tcx links until the test lets go.
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            drop(held);
            Ok(())
        }
        Command::EbpfDatapath { mode, json } => datapath::ebpf::helper(mode, &json),
        Command::Flood { json } => {
            let flood: flood::Flood = serde_json::from_str(&json)?;
            println!("{}", serde_json::to_string(&flood::send(&flood)?)?);
            Ok(())
        }
        Command::TcList { interface } => {
            println!(
                "{}",
                serde_json::to_string(&tcprog::programs_on(&interface)?)?
            );
            Ok(())
        }
        Command::Probe { json } => {
            let probe: Probe = serde_json::from_str(&json)?;
            println!("{}", serde_json::to_string(&probe::run(&probe))?);
            Ok(())
        }
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn up(path: &std::path::Path, duration: Option<u64>) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let spec: LabSpec = serde_yaml::from_str(&text)
        .with_context(|| format!("{}: not a lab spec", path.display()))?;
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let lab = Lab::up(&spec, &std::env::current_exe()?)?;
    eprintln!("lab {} is up:", lab.id);
    for n in &lab.nodes {
        eprintln!(
            "  node {}: netns {} cgroup {}",
            n.name,
            n.netns,
            n.cgroup_root.display()
        );
    }
    for p in &lab.pods {
        eprintln!(
            "  pod {} ip {} netns {} interface {} cgroup {}",
            p.spec.id(),
            p.spec.ip,
            p.netns,
            p.host_if,
            p.cgroup.display()
        );
    }
    eprintln!("Ctrl-C tears it down.");
    let deadline = duration.map(|d| Instant::now() + Duration::from_secs(d));
    while !STOP.load(Ordering::SeqCst) && deadline.is_none_or(|d| Instant::now() < d) {
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(lab);
    eprintln!("lab: torn down");
    Ok(())
}
