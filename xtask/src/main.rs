//! `cargo xtask`: netwatch's developer and CI tasks.

use std::{
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

mod bench;
mod binaries;
mod demo;
mod deploy;
mod fuzz;
mod memory;
mod setup;
mod soak;
mod test;
mod vmtest;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "netwatch's developer and CI tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh machine needs (Debian packages, nightly rust-src,
    /// bpf-linker). Idempotent; run as root.
    Setup,
    /// Set up, build, and run every test (unit, kernel, end-to-end), then the
    /// kernel matrix (vmtest, all kernels). Run as root. NETWATCH_VMTEST=0
    /// skips the matrix, for local iteration only.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Replay an incident scenario (default: the prod default-deny outage) in
    /// a NetworkPolicy-enforcing lab with the agent running: the live denied
    /// flows, why they are denied, the suggested fix, the metrics, then the
    /// fix applied. Run as root; Ctrl-C stops it and cleans up.
    Demo {
        /// Stop after this many seconds (the outage gets a third, the fix the rest).
        #[arg(long)]
        duration: Option<u64>,
        /// Which scenario under scenarios/ to replay.
        #[arg(long, default_value = "prod-default-deny")]
        scenario: String,
        /// The CNI datapath the lab emulates (the scenario's own when absent).
        #[arg(long, value_enum)]
        datapath: Option<netwatch_lab::Datapath>,
    },
    /// Measure what netwatch costs: datapath throughput with and without the
    /// agent (iperf3 in the lab), then the criterion benchmarks. Run as root.
    Bench {
        /// Alternating with/without pairs (after one warm-up pair).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Seconds per iperf3 run.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Only the datapath benchmark.
        #[arg(long, conflicts_with = "criterion_only")]
        datapath_only: bool,
        /// Only the criterion benchmarks.
        #[arg(long)]
        criterion_only: bool,
        /// Only the cost of netwatch's classifiers against a no-op
        /// classifier in the same run (kernel bpf_stats), as JSON; `cargo
        /// xtask vmtest --bench` runs it on each kernel of the matrix.
        #[arg(long, conflicts_with_all = ["datapath_only", "criterion_only"])]
        programs: bool,
        /// Only the flood benchmark: SYN floods of new denied flows at
        /// increasing rates (`--seconds` each); the highest rate the agent
        /// takes with zero loss, and its CPU.
        #[arg(long, conflicts_with_all = ["datapath_only", "criterion_only", "programs"])]
        flood: bool,
        /// Only the memory benchmark: the release agent's RSS with clusters
        /// of these many pods (policies in proportion), from --manifests
        /// and from an API server.
        #[arg(long, conflicts_with_all = ["datapath_only", "criterion_only", "programs", "flood"])]
        memory: bool,
        /// Cluster sizes for --memory, in pods.
        #[arg(long, value_delimiter = ',', default_value = "1000,10000,50000")]
        pods: Vec<usize>,
        /// For --memory: also measure with this many tracked flows (a SYN
        /// flood of distinct denied flows in a lab node), at the cluster
        /// sizes of --flows-at; 0 skips it.
        #[arg(long, default_value_t = 100_000)]
        flows: u64,
        /// Cluster sizes (pods) at which --flows is measured.
        #[arg(long, value_delimiter = ',', default_value = "10000")]
        flows_at: Vec<usize>,
    },
    /// Build a lab node from a scenario file and keep it up until Ctrl-C.
    Lab {
        /// A scenario folder (scenarios/NAME: its policies enforced, an agent
        /// per node), or a lab spec file (YAML: nodes, pods, nftables rules).
        scenario: Option<PathBuf>,
        /// Tear down after this many seconds instead of waiting for Ctrl-C.
        #[arg(long)]
        duration: Option<u64>,
        /// Only remove what crashed labs left behind, then exit.
        #[arg(long)]
        cleanup: bool,
    },
    /// The kernel matrix: the kernel-side integration tests on Debian's 5.10,
    /// 6.1 and 6.12 kernels under QEMU. Run as root.
    ///
    /// Debian's cloud kernels (pinned package versions, cached under
    /// target/vmtest/) boot under QEMU with software emulation; each runs the
    /// test executables `cargo test` built here, with this machine's root
    /// shared in read-only. Prints each kernel's results and a table, writes
    /// target/vmtest/results.json, and fails if any test failed or a VM did
    /// not boot or finish. 4 to 7 minutes per kernel on 2 cores. Root is
    /// needed for virtiofsd.
    #[command(name = "vmtest", after_help = VMTEST_HELP)]
    Vmtest {
        /// Which kernel: 5.10 (bullseye), 6.1 (bookworm), 6.12 (trixie) or all.
        /// Repeat for several.
        #[arg(long, default_value = "all", value_parser = ["5.10", "6.1", "6.12", "all"])]
        kernel: Vec<String>,
        /// After the tests, keep the VM up with a shell on this terminal
        /// (exit the shell to power it off); no timeout then.
        #[arg(long)]
        keep: bool,
        /// Seconds each VM may take in all before it is killed.
        #[arg(long, default_value_t = 1200)]
        timeout: u64,
        /// Rewrite README.md's kernel table from what the matrix saw (the
        /// run fails when it differs otherwise).
        #[arg(long)]
        update_readme: bool,
        /// Instead of the tests, measure netwatch's classifiers against a
        /// no-op classifier on each kernel (`cargo xtask bench --programs`
        /// in each guest) and print a table for BENCHMARKS.md.
        #[arg(long)]
        bench: bool,
        /// Extra arguments for every test executable (libtest's: a name
        /// filter, --nocapture, ...), after `--`.
        #[arg(last = true)]
        test_args: Vec<String>,
    },
    /// Run the cargo-fuzz targets under fuzz/ (nightly, libFuzzer): each
    /// for a fixed number of inputs (what `cargo xtask test` runs) or a time.
    /// A crash fails the task and leaves its input in fuzz/artifacts/.
    Fuzz {
        /// Inputs per target.
        #[arg(long, default_value_t = fuzz::CI_RUNS, conflicts_with = "seconds")]
        runs: u64,
        /// Seconds per target instead of a number of inputs.
        #[arg(long)]
        seconds: Option<u64>,
        /// Only these targets (default: all).
        targets: Vec<String>,
    },
    /// Long runs of what CI runs briefly: the soak test (denied-flow load,
    /// pod churn and API faults together; prints RSS, fds, CPU and every
    /// loss counter) for `--minutes`, then every fuzz target for
    /// `--fuzz-minutes` each. Run as root.
    Soak {
        /// Minutes the soak test runs (0: none).
        #[arg(long, default_value_t = 30)]
        minutes: u64,
        /// Minutes each fuzz target runs (0: no fuzzing).
        #[arg(long, default_value_t = 5)]
        fuzz_minutes: u64,
    },
    /// The Helm chart and the plain manifests under deploy/: render, check, template.
    Deploy {
        #[command(subcommand)]
        what: deploy::DeployCommand,
    },
}

const VMTEST_HELP: &str = "Which integration tests run on which kernel is the TESTS list in \
xtask/src/vmtest.rs. Everything downloaded or generated (the .deb, the extracted kernel and \
modules, the initramfs) is cached under target/vmtest/, so later runs need no network; each \
kernel's console and test logs are under target/vmtest/runs/<kernel>/.";

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Ctrl-C and SIGTERM set STOP; the task then cleans up and exits.
fn install_stop_handler() {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::setup(),
        Task::Test { args } => {
            install_stop_handler();
            test::test(&args, &STOP)
        }
        Task::Demo {
            duration,
            scenario,
            datapath,
        } => {
            install_stop_handler();
            demo::demo(
                &demo::DemoOptions {
                    scenario,
                    duration,
                    datapath,
                },
                &STOP,
            )
        }
        Task::Bench {
            memory: true,
            pods,
            flows,
            flows_at,
            ..
        } => memory::memory(&pods, true, flows, &flows_at),
        Task::Bench {
            seconds,
            flood: true,
            ..
        } => {
            install_stop_handler();
            bench::flood(seconds, &STOP)
        }
        Task::Bench {
            seconds,
            programs: true,
            ..
        } => {
            let cost = bench::program_cost(seconds)?;
            println!("{}", serde_json::to_string(&cost)?);
            Ok(())
        }
        Task::Bench {
            runs,
            seconds,
            datapath_only,
            criterion_only,
            programs: false,
            flood: false,
            ..
        } => bench::bench(&bench::BenchOptions {
            runs,
            seconds,
            datapath: !criterion_only,
            criterion: !datapath_only,
        }),
        Task::Lab {
            scenario,
            duration,
            cleanup,
        } => run_lab(scenario, duration, cleanup),
        Task::Vmtest {
            kernel,
            keep,
            timeout,
            test_args,
            update_readme,
            bench,
        } => {
            install_stop_handler();
            vmtest::vmtest(
                &vmtest::Options {
                    kernels: kernel,
                    keep,
                    timeout: Duration::from_secs(timeout),
                    test_args,
                    update_readme,
                    bench,
                },
                &STOP,
            )
        }
        Task::Fuzz {
            runs,
            seconds,
            targets,
        } => {
            install_stop_handler();
            let budget = match seconds {
                Some(s) => fuzz::Budget::Seconds(s),
                None => fuzz::Budget::Runs {
                    runs,
                    cap_seconds: fuzz::CI_CAP_SECONDS,
                },
            };
            fuzz::fuzz(budget, &targets, &STOP)
        }
        Task::Soak {
            minutes,
            fuzz_minutes,
        } => {
            install_stop_handler();
            soak::soak(minutes, fuzz_minutes, &STOP)
        }
        Task::Deploy { what } => deploy::run(what),
    }
}

fn run_lab(scenario: Option<PathBuf>, duration: Option<u64>, cleanup: bool) -> Result<()> {
    if cleanup {
        let n = netwatch_lab::sweep_stale();
        eprintln!("lab: removed {n} leftovers of crashed labs");
        return Ok(());
    }
    let Some(path) = scenario else {
        bail!("give a scenario: cargo xtask lab scenarios/NAME (or a lab spec file; or --cleanup)");
    };
    if path.join("scenario.yaml").exists() {
        return run_scenario_lab(&path, duration);
    }
    // A plain lab spec: `netwatch-lab up` builds it and holds it until Ctrl-C
    // (which reaches it too: same process group).
    install_stop_handler();
    let helper = binaries::build()?.helper;
    let mut cmd = std::process::Command::new(&helper);
    cmd.arg("up").arg(&path);
    if let Some(d) = duration {
        cmd.args(["--duration", &d.to_string()]);
    }
    let status = cmd.status()?;
    if !status.success() {
        bail!("netwatch-lab up {}: {status}", path.display());
    }
    Ok(())
}

/// A scenario's lab with its policies enforced and an agent per node, up
/// until Ctrl-C, for poking at by hand.
fn run_scenario_lab(dir: &std::path::Path, duration: Option<u64>) -> Result<()> {
    install_stop_handler();
    let bins = binaries::build()?;
    let scenario = netwatch_lab::scenario::Scenario::load(dir)?;
    let work = std::env::temp_dir().join(format!("netwatch-lab-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let run = netwatch_lab::scenario::ScenarioRun::start(&scenario, &bins, &work, &[])?;
    eprintln!(
        "scenario {} is up (policies enforced, services proxied):",
        scenario.name
    );
    for n in &run.lab.nodes {
        eprintln!("  node {}: netns {}", n.name, n.netns);
    }
    for p in &run.lab.pods {
        eprintln!(
            "  pod {:<50} {:<15} netns {}",
            p.spec.id(),
            p.spec.ip,
            p.netns
        );
    }
    for a in &run.agents {
        eprintln!(
            "  agent on {}: flow log {}, log {}",
            a.node,
            a.flow_log.display(),
            a.log.display()
        );
        eprintln!(
            "    netwatch observe --server {} -f",
            a.api_socket.display()
        );
    }
    eprintln!(
        "  manifests the agents read: {}",
        run.manifests_dir.display()
    );
    eprintln!("Try `ip netns exec <pod netns> nc -zv <ip> <port>`. Ctrl-C tears it down.");
    let deadline = duration.map(|d| Instant::now() + Duration::from_secs(d));
    while !STOP.load(Ordering::SeqCst) && deadline.is_none_or(|d| Instant::now() < d) {
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(run);
    let _ = std::fs::remove_dir_all(&work);
    eprintln!("lab: torn down");
    Ok(())
}
