//! `cargo xtask bench`: what netwatch costs.
//!
//! Datapath: TCP throughput between two lab pods (iperf3) with and without
//! the agent attached, runs alternating A B A B ..., the median of the
//! pairwise with/without ratios reported (the machine's speed drifts; pairs
//! cancel most of it). While the agent runs, the kernel's own BPF statistics
//! give each program's cost per packet. Then the criterion benchmarks of the
//! policy engine and the identity cache (`cargo bench -p netwatch-agent`).
//!
//! Program cost ([`program_cost`], `cargo xtask bench --programs`, and in
//! each kernel of the matrix with `cargo xtask vmtest --bench`): netwatch's
//! two classifiers against a no-op classifier on the same interfaces in the
//! same run, each program's ns per run from the kernel's bpf_stats. The
//! ratio is what carries across machines (in the VMs the CPU is emulated,
//! so absolute nanoseconds are inflated alike for both).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use netwatch_lab::{ChildGuard, Lab, LabSpec, NodeSpec, PodSpec, tcprog::TcMode};

pub struct BenchOptions {
    pub runs: usize,
    pub seconds: u64,
    pub datapath: bool,
    pub criterion: bool,
}

pub fn bench(opts: &BenchOptions) -> Result<()> {
    crate::setup::setup()?;
    if opts.datapath {
        datapath(opts)?;
    }
    if opts.criterion {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        eprintln!("bench: cargo bench -p netwatch-agent");
        if !Command::new(cargo)
            .args(["bench", "-p", "netwatch-agent"])
            .status()?
            .success()
        {
            bail!("cargo bench failed");
        }
    }
    Ok(())
}

pub(crate) fn cargo_build_release() -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    if !Command::new(cargo)
        .args([
            "build",
            "--release",
            "-p",
            "netwatch-agent",
            "--bin",
            "netwatch-agent",
        ])
        .status()?
        .success()
    {
        bail!("building the agent failed");
    }
    Ok(crate::binaries::target_dir()?.join("release/netwatch-agent"))
}

/// Two pods on one node, for iperf3.
fn bench_lab() -> Result<Lab> {
    let spec = LabSpec {
        nodes: vec![NodeSpec {
            name: "node-1".into(),
            ..NodeSpec::default()
        }],
        pods: ["client", "server"]
            .iter()
            .enumerate()
            .map(|(i, name)| PodSpec {
                name: (*name).into(),
                namespace: "bench".into(),
                node: "node-1".into(),
                ip: format!("10.244.9.{}", i + 2).parse().expect("address"),
                ipv6: None,
                listen: Vec::new(),
                uid: None,
                host_network: false,
            })
            .collect(),
        world: Vec::new(),
        datapath: Default::default(),
    };
    Ok(Lab::up(
        &spec,
        &crate::binaries::beside_xtask("netwatch-lab")?,
    )?)
}

/// What netwatch's classifiers cost per run against a no-op classifier.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ProgramCost {
    pub kernel: String,
    /// How the classifiers were attached (tcx or clsact).
    pub tc_mode: String,
    pub seconds: u64,
    pub netwatch_runs: u64,
    pub netwatch_ns_per_run: f64,
    pub noop_runs: u64,
    pub noop_ns_per_run: f64,
}

/// Measure [`ProgramCost`] on this kernel: a stand-in no-op classifier on
/// both directions of both pods' interfaces, the agent's classifiers before
/// it, iperf3 between the pods for `seconds`, bpf_stats on meanwhile.
pub fn program_cost(seconds: u64) -> Result<ProgramCost> {
    let agent_bin = crate::binaries::beside_xtask("netwatch-agent")?;
    let lab = bench_lab()?;
    let server = lab.pod("bench/server")?;
    let _iperf_server = ChildGuard(
        lab.in_pod(server, Path::new("iperf3"))
            .args(["-s", "-B", "10.244.9.3"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 -s (cargo xtask setup installs iperf3)")?,
    );
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")?
        .trim()
        .to_string();
    let tcx = netwatch_lab::kernel_version() >= (6, 6);
    let mode = if tcx { TcMode::Tcx } else { TcMode::Clsact };
    let interfaces: Vec<&str> = lab.pods.iter().map(|p| p.host_if.as_str()).collect();
    let noop = lab.attach_foreign_tc("node-1", &interfaces, mode)?;
    let (_agent, ids) = start_agent(&lab, &agent_bin)?;
    std::thread::sleep(Duration::from_millis(500));
    let _ = Command::new("sysctl")
        .args(["-qw", "kernel.bpf_stats_enabled=1"])
        .status();
    let measured = (|| {
        let (a0, b0) = (prog_stats(&ids), prog_stats(&noop.program_ids));
        throughput(&lab, seconds)?;
        let (a1, b1) = (prog_stats(&ids), prog_stats(&noop.program_ids));
        Ok::<_, anyhow::Error>((a0.zip(a1), b0.zip(b1)))
    })();
    let _ = Command::new("sysctl")
        .args(["-qw", "kernel.bpf_stats_enabled=0"])
        .status();
    let (Some(((t0, c0), (t1, c1))), Some(((u0, d0), (u1, d1)))) = measured? else {
        bail!("bpftool gave no run statistics (is bpftool installed?)");
    };
    let (runs, noop_runs) = (c1.saturating_sub(c0), d1.saturating_sub(d0));
    if runs == 0 || noop_runs == 0 {
        bail!("the programs did not run: netwatch {runs}, no-op {noop_runs} runs");
    }
    Ok(ProgramCost {
        kernel: release,
        tc_mode: if tcx { "tcx" } else { "clsact" }.into(),
        seconds,
        netwatch_runs: runs,
        netwatch_ns_per_run: t1.saturating_sub(t0) as f64 / runs as f64,
        noop_runs,
        noop_ns_per_run: u1.saturating_sub(u0) as f64 / noop_runs as f64,
    })
}

fn datapath(opts: &BenchOptions) -> Result<()> {
    let agent_bin = cargo_build_release()?;
    let lab = bench_lab()?;
    let server = lab.pod("bench/server")?;
    let mut iperf_server = ChildGuard(
        lab.in_pod(server, Path::new("iperf3"))
            .args(["-s", "-B", "10.244.9.3"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 -s (cargo xtask setup installs iperf3)")?,
    );
    std::thread::sleep(Duration::from_millis(500));
    let _ = &mut iperf_server;

    let mut without = Vec::new();
    let mut with = Vec::new();
    // Shares of one CPU while iperf3 runs: what the agent costs, measured
    // directly rather than read off noisy throughput.
    let mut agent_share = Vec::new();
    // One warm-up run of each, not counted. bpf_stats stays off here: its
    // own clock reads would slow the with-agent runs.
    for round in 0..=opts.runs {
        let a = throughput(&lab, opts.seconds)?;
        let run = with_agent(&lab, &agent_bin, opts.seconds, false)?;
        if round == 0 {
            continue;
        }
        eprintln!(
            "bench: run {round}: without {:.2} Gbit/s, with {:.2} Gbit/s",
            a / 1e9,
            run.bits_per_second / 1e9
        );
        without.push(a);
        with.push(run.bits_per_second);
        agent_share.extend(run.agent_share);
    }
    // Then the kernel programs' own cost, with bpf_stats on.
    let mut per_packet = Vec::new();
    let mut kernel_share = Vec::new();
    let _ = Command::new("sysctl")
        .args(["-qw", "kernel.bpf_stats_enabled=1"])
        .status();
    for _ in 0..3 {
        let run = with_agent(&lab, &agent_bin, opts.seconds, true);
        if let Ok(AgentRun {
            programs: Some((ns, count)),
            wall,
            ..
        }) = &run
            && *count > 0
        {
            per_packet.push(*ns as f64 / *count as f64);
            kernel_share.push(*ns as f64 / 1e9 / wall * 100.0);
        }
        if run.is_err() {
            break;
        }
    }
    let _ = Command::new("sysctl")
        .args(["-qw", "kernel.bpf_stats_enabled=0"])
        .status();
    drop(iperf_server);
    let latencies = first_record_latency(&lab, &agent_bin, 30)?;
    drop(lab);

    let ratios: Vec<f64> = with.iter().zip(&without).map(|(w, wo)| w / wo).collect();
    let md = |v: &[f64]| median(v);
    println!("## Datapath overhead\n");
    println!(
        "Command: `cargo xtask bench --runs {} --seconds {}` (iperf3 TCP between two lab pods on one node, {} alternating pairs after one warm-up pair)\n",
        opts.runs, opts.seconds, opts.runs
    );
    println!("| figure | min | median | max |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| without agent (Gbit/s) | {:.2} | {:.2} | {:.2} |",
        min(&without) / 1e9,
        md(&without) / 1e9,
        max(&without) / 1e9
    );
    println!(
        "| with agent (Gbit/s) | {:.2} | {:.2} | {:.2} |",
        min(&with) / 1e9,
        md(&with) / 1e9,
        max(&with) / 1e9
    );
    println!(
        "| with / without (pairwise) | {:.3} | {:.3} | {:.3} |",
        min(&ratios),
        md(&ratios),
        max(&ratios)
    );
    if !per_packet.is_empty() {
        println!(
            "| netwatch's programs (ns per run, kernel bpf_stats, 3 extra runs) | {:.0} | {:.0} | {:.0} |",
            min(&per_packet),
            md(&per_packet),
            max(&per_packet)
        );
        println!(
            "| netwatch's programs (% of one CPU, same 3 runs) | {:.2} | {:.2} | {:.2} |",
            min(&kernel_share),
            md(&kernel_share),
            max(&kernel_share)
        );
    }
    if !agent_share.is_empty() {
        println!(
            "| netwatch-agent process (% of one CPU, /proc utime+stime) | {:.2} | {:.2} | {:.2} |",
            min(&agent_share),
            md(&agent_share),
            max(&agent_share)
        );
    }
    println!("\nTarget: median with/without >= 0.99.");
    println!("\n## First-record latency\n");
    println!(
        "Command: `cargo xtask bench` (same run). One UDP datagram dropped by the lab node's nftables per flow, {} flows; time from the kernel's drop timestamp (the record's `first_seen`) to the record being readable in the flow log file.\n",
        latencies.len()
    );
    println!("| figure | min | median | max |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| drop -> NEW record in the flow log (ms) | {:.1} | {:.1} | {:.1} |",
        min(&latencies),
        median(&latencies),
        max(&latencies)
    );
    println!("\nTarget: the first record of a flow is out within 100 ms of its first drop.");
    Ok(())
}

/// Milliseconds from each flow's first drop (kernel time) to its first
/// record in the flow log.
fn first_record_latency(lab: &Lab, agent_bin: &Path, samples: usize) -> Result<Vec<f64>> {
    lab.nft(
        "node-1",
        "table inet bench_drop {\n  chain f { type filter hook forward priority 0; udp dport 9999 drop; }\n}\n",
    )?;
    let dir = std::env::temp_dir().join(format!("netwatch-bench-latency-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // The agent (its guard) is gone when this returns, also on an error.
    let out = first_record_latency_in(lab, agent_bin, samples, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    out
}

fn first_record_latency_in(
    lab: &Lab,
    agent_bin: &Path,
    samples: usize,
    dir: &Path,
) -> Result<Vec<f64>> {
    let flow_log = dir.join("flows.jsonl");
    let log = dir.join("agent.log");
    let _agent = ChildGuard(
        lab.on_node("node-1", agent_bin)?
            .args([
                "--node-name",
                "node-1",
                "--interfaces",
                "cali*",
                "--own-netns-only",
                "--cgroup-root",
                "none",
                "--metrics-addr",
                "none",
            ])
            .arg("--api-socket")
            .arg(dir.join("api.sock"))
            .arg("--flow-log")
            .arg(&flow_log)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(&log)
        .unwrap_or_default()
        .matches("attached TC classifiers")
        .count()
        < 2
    {
        if Instant::now() > deadline {
            bail!("the agent did not attach within 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut out = Vec::new();
    let mut seen = 0;
    for _ in 0..samples {
        let probe = netwatch_lab::Probe::udp("10.244.9.3:9999".parse()?, Duration::from_millis(50));
        // The probe waits for an answer that never comes: send it from another
        // thread so that the file is watched while it waits.
        std::thread::scope(|s| -> Result<()> {
            let sender = s.spawn(|| {
                lab.probe("bench/client", &probe)
                    .map(|_| ())
                    .map_err(anyhow::Error::from)
            });
            // Poll the file tightly for the next NEW record.
            let until = Instant::now() + Duration::from_secs(5);
            loop {
                let text = std::fs::read_to_string(&flow_log).unwrap_or_default();
                let news: Vec<serde_json::Value> = text
                    .lines()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .filter(|v| v["flow"]["lifecycle"] == "NEW")
                    .collect();
                if news.len() > seen {
                    let now = std::time::SystemTime::now();
                    for v in &news[seen..] {
                        let first = v["flow"]["first_seen"].as_str().unwrap_or("");
                        if let Some(t) = parse_rfc3339(first)
                            && let Ok(d) = now.duration_since(t)
                        {
                            out.push(d.as_secs_f64() * 1000.0);
                        }
                    }
                    seen = news.len();
                    break;
                }
                if Instant::now() > until {
                    bail!("no record for a dropped datagram within 5 s");
                }
                std::thread::sleep(Duration::from_micros(500));
            }
            sender
                .join()
                .map_err(|_| anyhow::anyhow!("the probe thread panicked"))?
        })?;
    }
    Ok(out)
}

/// `2026-11-22T13:17:08.559606911Z` (the agent's format) as a SystemTime.
fn parse_rfc3339(s: &str) -> Option<std::time::SystemTime> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(std::time::SystemTime::from)
}

/// The agent attached to the lab node, and the ids of its TC programs.
fn start_agent(lab: &Lab, bin: &Path) -> Result<(ChildGuard, Vec<u32>)> {
    let log = std::env::temp_dir().join(format!("netwatch-bench-{}.log", std::process::id()));
    let child = lab
        .on_node("node-1", bin)?
        .args([
            "--node-name",
            "node-1",
            "--interfaces",
            "cali*",
            "--own-netns-only",
            "--flow-log",
            "/dev/null",
            "--cgroup-root",
            "none",
        ])
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let guard = ChildGuard(child);
    // Longer under emulated CPUs (vmtest's guests set the factor).
    let wait = netwatch_lab::slowed(Duration::from_secs(20));
    let deadline = Instant::now() + wait;
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.matches("attached TC classifiers").count() >= 2 {
            let ids = text
                .lines()
                .find(|l| l.contains("eBPF programs loaded"))
                .and_then(|l| l.split("programs=").nth(1))
                .map(|s| {
                    s.split_whitespace()
                        .next()
                        .unwrap_or("")
                        .split(',')
                        .filter(|kv| kv.contains("_pod="))
                        .filter_map(|kv| kv.split('=').nth(1)?.parse().ok())
                        .collect()
                })
                .unwrap_or_default();
            let _ = std::fs::remove_file(&log);
            return Ok((guard, ids));
        }
        if Instant::now() > deadline {
            let _ = std::fs::remove_file(&log);
            bail!(
                "the agent did not attach within {} s:\n{text}",
                wait.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One iperf3 run with the agent attached.
struct AgentRun {
    bits_per_second: f64,
    wall: f64,
    /// The agent process's share of one CPU, in percent.
    agent_share: Option<f64>,
    /// Run time (ns) and runs of its programs, when bpf_stats is on.
    programs: Option<(u64, u64)>,
}

fn with_agent(lab: &Lab, agent_bin: &Path, seconds: u64, stats: bool) -> Result<AgentRun> {
    let (agent, ids) = start_agent(lab, agent_bin)?;
    let before = stats.then(|| prog_stats(&ids)).flatten();
    let cpu_before = process_cpu_seconds(agent.0.id());
    let started = Instant::now();
    let bits_per_second = throughput(lab, seconds)?;
    let wall = started.elapsed().as_secs_f64();
    let after = stats.then(|| prog_stats(&ids)).flatten();
    let cpu_after = process_cpu_seconds(agent.0.id());
    let programs = match (before, after) {
        (Some((t0, c0)), Some((t1, c1))) => Some((t1.saturating_sub(t0), c1.saturating_sub(c0))),
        _ => None,
    };
    Ok(AgentRun {
        bits_per_second,
        wall,
        agent_share: cpu_before
            .zip(cpu_after)
            .map(|(a, b)| (b - a) / wall * 100.0),
        programs,
    })
}

/// User plus system CPU seconds a process has used so far.
fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the line, in clock ticks.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks / hz as f64)
}

/// Total (run_time_ns, run_cnt) of the given programs.
fn prog_stats(ids: &[u32]) -> Option<(u64, u64)> {
    let mut total = (0, 0);
    for id in ids {
        let out = Command::new("bpftool")
            .args(["prog", "show", "id", &id.to_string(), "-j"])
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        // Absent until the program has run at least once.
        total.0 += v["run_time_ns"].as_u64().unwrap_or(0);
        total.1 += v["run_cnt"].as_u64().unwrap_or(0);
    }
    Some(total)
}

/// Bits per second of one iperf3 run from client to server.
fn throughput(lab: &Lab, seconds: u64) -> Result<f64> {
    let client = lab.pod("bench/client")?;
    let out = lab
        .in_pod(client, Path::new("iperf3"))
        .args(["-c", "10.244.9.3", "-t", &seconds.to_string(), "-J"])
        .output()
        .context("running iperf3 -c")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 -J output")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| {
            format!(
                "iperf3 reported no throughput: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
}

/// The flood lab: a client and a target pod, the node's firewall dropping
/// every TCP port from 10000 of the target.
pub(crate) const FLOOD_LAB: &str = r#"
nodes:
  - name: node-1
    nftables: |
      table inet lab {
        chain forward {
          type filter hook forward priority 0; policy accept;
          ip daddr 10.244.9.3 tcp dport 10000-30000 counter drop comment "drop-flood"
        }
      }
pods:
  - { name: client, namespace: bench, node: node-1, ip: 10.244.9.2 }
  - { name: target, namespace: bench, node: node-1, ip: 10.244.9.3 }
"#;

pub(crate) const FLOOD_METRICS: &str = "127.0.0.1:9464";

/// New denied flows per second tried, in order.
const FLOOD_RATES: [u64; 7] = [25_000, 50_000, 100_000, 150_000, 200_000, 300_000, 400_000];

/// `cargo xtask bench --flood`: SYN floods of new flows (each from its own
/// source port) to ports the node drops, at increasing rates, each for
/// `seconds`, against the release agent with its default tables. A rate is
/// taken with zero loss when the flow log accounts for every flow sent
/// (records of single flows plus the `aggregate.flows` of aggregate
/// records) and the agent's loss counters and the flow log's dropped
/// records did not move.
/// `stop` (Ctrl-C, SIGTERM) ends the sweep early: the agent and the lab are
/// dropped, not orphaned.
pub fn flood(seconds: u64, stop: &std::sync::atomic::AtomicBool) -> Result<()> {
    let stopped = || stop.load(std::sync::atomic::Ordering::SeqCst);
    crate::setup::setup()?;
    let agent_bin = cargo_build_release()?;
    let spec: LabSpec = serde_yaml::from_str(FLOOD_LAB)?;
    let lab = Lab::up(&spec, &crate::binaries::build()?.helper)?;
    let dir = std::env::temp_dir().join(format!("netwatch-flood-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let flow_log = dir.join("flows.jsonl");
    let log = dir.join("agent.log");
    let child = lab
        .on_node("node-1", &agent_bin)?
        .args([
            "--node-name",
            "node-1",
            "--interfaces",
            "cali*",
            "--own-netns-only",
            "--cgroup-root",
            "none",
            "--update-interval",
            "1",
            "--metrics-addr",
            FLOOD_METRICS,
        ])
        .arg("--flow-log")
        .arg(&flow_log)
        // One file for the whole sweep: the tail below follows one path by
        // offset, and a rotation would hide records from it.
        .args(["--flow-log-max-size-mb", "0"])
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let agent = ChildGuard(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("capturing")
        || std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("attached TC classifiers")
            .count()
            < 2
    {
        if stopped() {
            bail!("interrupted");
        }
        if Instant::now() > deadline {
            bail!(
                "the agent did not start:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut tail = FlowLogTail::new(flow_log);
    let client = lab.pod("bench/client")?;
    let mut rows = Vec::new();
    let mut first_port = 10000u16;
    for rate in FLOOD_RATES {
        if stopped() {
            bail!("interrupted");
        }
        let flows = rate * seconds;
        let ports = flows.div_ceil(netwatch_lab::flood::SOURCE_PORTS) as u16;
        let flood = netwatch_lab::flood::Flood {
            to: "10.244.9.3".parse()?,
            first_port,
            ports,
            flows,
            rate,
        };
        first_port += ports;
        let lost_before = flood_losses(&lab)?;
        let cpu_before = process_cpu_seconds(agent.0.id());
        let started = Instant::now();
        let out = lab
            .in_pod(client, &crate::binaries::beside_xtask("netwatch-lab")?)
            .args(["flood", "--json", &serde_json::to_string(&flood)?])
            .output()?;
        if !out.status.success() {
            bail!("flood: {}", String::from_utf8_lossy(&out.stderr));
        }
        let sent: netwatch_lab::flood::Sent = serde_json::from_slice(&out.stdout)?;
        // Until every flow is accounted for, or 30 s without progress.
        let mut reported = 0;
        let mut progress = Instant::now();
        while reported < flows && progress.elapsed() < Duration::from_secs(30) && !stopped() {
            std::thread::sleep(Duration::from_millis(500));
            let now = tail.flows_to(first_port - ports, first_port)?;
            if now > reported {
                progress = Instant::now();
            }
            reported = now;
        }
        let wall = started.elapsed().as_secs_f64();
        let cpu = process_cpu_seconds(agent.0.id())
            .zip(cpu_before)
            .map(|(a, b)| a - b);
        let lost = flood_losses(&lab)?.saturating_sub(lost_before);
        eprintln!(
            "bench: flood at {rate}/s: sent {} in {:.2} s, reported {reported}, lost {lost}",
            sent.packets, sent.seconds
        );
        rows.push(FloodRow {
            rate,
            achieved: sent.packets as f64 / sent.seconds,
            flows,
            reported,
            lost,
            cpu_share: cpu.map(|c| c / wall * 100.0),
            cpu_per_100k: cpu.map(|c| c / flows as f64 * 100_000.0),
        });
    }
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
    drop(lab);

    println!(
        "Command: `cargo xtask bench --flood --seconds {seconds}` (raw-socket SYNs from one lab pod, each flow its own source port, to TCP ports the node's nftables drops; release agent, default tables)\n"
    );
    println!(
        "| target new flows/s | sent new flows/s | flows | reported | lost | agent CPU (% of one core, send + drain) | agent CPU s per 100k flows |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for r in &rows {
        println!(
            "| {} | {:.0} | {} | {} | {} | {} | {} |",
            r.rate,
            r.achieved,
            r.flows,
            r.reported,
            r.lost,
            r.cpu_share.map_or("-".into(), |c| format!("{c:.0}")),
            r.cpu_per_100k.map_or("-".into(), |c| format!("{c:.2}")),
        );
    }
    let best = rows
        .iter()
        .filter(|r| r.lost == 0 && r.reported == r.flows)
        .map(|r| r.achieved)
        .fold(0.0, f64::max);
    println!("\nHighest rate of new denied flows taken with zero loss: {best:.0}/s");
    Ok(())
}

struct FloodRow {
    rate: u64,
    achieved: f64,
    flows: u64,
    reported: u64,
    lost: u64,
    cpu_share: Option<f64>,
    cpu_per_100k: Option<f64>,
}

/// Events the agent counted lost, and records its flow log dropped.
fn flood_losses(lab: &Lab) -> Result<u64> {
    let out = lab
        .on_node("node-1", &crate::binaries::beside_xtask("netwatch-lab")?)?
        .args(["fetch", &format!("http://{FLOOD_METRICS}/metrics")])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut total = 0.0;
    for l in text.lines().filter(|l| {
        l.starts_with("netwatch_lost_events_total")
            || l.starts_with("netwatch_flow_log_dropped_records_total")
    }) {
        if let Some(v) = l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            // By source, so a loss in the table can be told from another.
            if v > 0.0 {
                eprintln!("bench: {l}");
            }
            total += v;
        }
    }
    Ok(total as u64)
}

/// The flow log read as it grows: the latest record of each flow.
struct FlowLogTail {
    path: PathBuf,
    offset: u64,
    partial: String,
    /// uuid -> (destination port, flows the record stands for).
    latest: std::collections::HashMap<String, (u16, u64)>,
}

impl FlowLogTail {
    fn new(path: PathBuf) -> FlowLogTail {
        FlowLogTail {
            path,
            offset: 0,
            partial: String::new(),
            latest: std::collections::HashMap::new(),
        }
    }

    /// Flows reported to destination ports `from..to`.
    fn flows_to(&mut self, from: u16, to: u16) -> Result<u64> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(&self.path)?;
        f.seek(SeekFrom::Start(self.offset))?;
        let mut chunk = String::new();
        self.offset += f.read_to_string(&mut chunk)? as u64;
        self.partial.push_str(&chunk);
        let complete = self.partial.rfind('\n').map_or(0, |i| i + 1);
        for line in self.partial[..complete].lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let flow = &v["flow"];
            let (Some(uuid), Some(port)) = (
                flow["uuid"].as_str(),
                flow["l4"]["TCP"]["destination_port"].as_u64(),
            ) else {
                continue;
            };
            if flow["verdict"] != "DROPPED" {
                continue;
            }
            let n = flow["aggregate"]["flows"].as_u64().unwrap_or(1);
            self.latest.insert(uuid.to_string(), (port as u16, n));
        }
        self.partial.drain(..complete);
        Ok(self
            .latest
            .values()
            .filter(|(p, _)| (from..to).contains(p))
            .map(|(_, n)| n)
            .sum())
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}
fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}
fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_timestamps_parse_to_the_right_instant() {
        let t = parse_rfc3339("2000-03-01T00:00:01.5Z").unwrap();
        assert_eq!(
            t.duration_since(std::time::UNIX_EPOCH).unwrap(),
            Duration::from_millis(951_868_801_500)
        );
        let t = parse_rfc3339("2026-11-22T13:17:08.559606911Z").unwrap();
        assert_eq!(
            t.duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos(),
            559_606_911
        );
        assert!(parse_rfc3339("yesterday").is_none());
    }

    #[test]
    fn cpu_time_of_a_process_grows_as_it_works() {
        let pid = std::process::id();
        let before = process_cpu_seconds(pid).expect("our own /proc stat");
        let until = Instant::now() + Duration::from_millis(300);
        let mut x = 0u64;
        while Instant::now() < until {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        let after = process_cpu_seconds(pid).expect("our own /proc stat");
        assert!(after > before, "{before} -> {after} after {x} spins");
        assert!(process_cpu_seconds(u32::MAX).is_none());
    }
}
