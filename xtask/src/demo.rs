//! `cargo xtask demo`: the prod default-deny outage, replayed on this machine.
//!
//! Builds what it needs, brings up a scenario's lab (NetworkPolicies enforced
//! the way a CNI does, services the way kube-proxy does), runs the agent in
//! standalone mode with the scenario's manifests, drives the application's
//! traffic every second, and shows what on-call would see: the live
//! denied-flow tail (`netwatch observe -f`), why each flow is denied
//! (`netwatch explain`), the smallest fix (`--suggest`) and the metrics. Then
//! it applies the fix and shows the denials stop. Runs until Ctrl-C (or
//! `--duration`), and always cleans up.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use netwatch_lab::{
    ChildGuard,
    scenario::{Scenario, ScenarioRun, Traffic},
};

pub struct DemoOptions {
    pub scenario: String,
    pub duration: Option<u64>,
    pub datapath: Option<netwatch_lab::Datapath>,
}

pub fn demo(opts: &DemoOptions, stop: &'static AtomicBool) -> Result<()> {
    crate::setup::setup()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo builds network namespaces and loads eBPF programs: run it as root");
    }
    let bins = crate::binaries::build()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    let dir = root.join(&opts.scenario);
    if !dir.join("scenario.yaml").exists() {
        let known: Vec<String> = netwatch_lab::scenario::discover(&root)?
            .into_iter()
            .map(|s| s.name)
            .collect();
        bail!(
            "no scenario {:?}; the scenarios are: {}",
            opts.scenario,
            known.join(", ")
        );
    }
    let mut scenario = Scenario::load(&dir)?;
    if let Some(datapath) = opts.datapath {
        scenario.spec.datapath = Some(datapath);
    }
    let started = Instant::now();
    let total = opts.duration.map(Duration::from_secs);
    let outage_for = total
        .map(|t| (t / 3).clamp(Duration::from_secs(6), Duration::from_secs(30)))
        .unwrap_or(Duration::from_secs(20));

    say(&format!("netwatch demo: scenario {}", scenario.name));
    println!("{}\n", scenario.spec.description.trim());
    let work = tempdir()?;
    let mut run = ScenarioRun::start(&scenario, &bins, &work, &[])
        .context("bringing up the scenario's lab")?;
    for n in &run.lab.nodes {
        println!(
            "node {} (network namespace {}), agent running, metrics on 127.0.0.1:9965 inside it",
            n.name, n.netns
        );
    }
    for p in &run.lab.pods {
        println!("  pod {:<55} {}", p.spec.id(), p.spec.ip);
    }
    let traffic = scenario
        .phases()
        .into_iter()
        .flat_map(|p| p.traffic)
        .collect::<Vec<_>>();
    let Some(agent) = run.agents.first() else {
        bail!("the scenario has no node")
    };
    let socket = agent.api_socket.clone();
    let node = agent.node.clone();

    say(
        "The application's traffic runs every second. What on-call sees (`netwatch observe -f --paths`):",
    );
    let outcomes = Mutex::new(Vec::new());
    let phase_stop = AtomicBool::new(false);
    std::thread::scope(|s| -> Result<()> {
        s.spawn(|| drive(&run, &traffic, &phase_stop, stop, &outcomes));
        let mut tail = observe(&bins.netwatch, &socket, true)?;
        wait(outage_for, stop);
        let _ = tail.0.kill();
        let _ = tail.0.wait();
        phase_stop.store(true, Ordering::SeqCst);
        Ok(())
    })?;
    if stop.load(Ordering::SeqCst) {
        return Ok(());
    }

    say("Why is it denied? (`netwatch explain`)");
    let denied: Vec<&Traffic> = traffic.iter().filter(|t| !t.expect_reached()).collect();
    for t in &denied {
        let (_, _, backend, port) = run.target(t)?;
        if backend.is_empty() {
            continue;
        }
        let proto = t.engine_protocol();
        println!(
            "$ netwatch explain --from {} --to {backend} --port {port} --protocol {proto}",
            t.from
        );
        let (_, text) = run.explain(&t.from, &backend, port, proto, &[])?;
        println!("{}", text.trim_end());
        println!();
    }

    let fixable: Vec<&Traffic> = traffic.iter().filter(|t| t.fix).collect();
    if !fixable.is_empty() {
        say("The smallest fix (`netwatch explain --suggest`): one policy per denied flow");
    }
    let fix_dir = work.join("fix");
    std::fs::create_dir_all(&fix_dir)?;
    for (i, t) in fixable.iter().enumerate() {
        let (_, _, backend, port) = run.target(t)?;
        let (_, yaml) =
            run.explain(&t.from, &backend, port, t.engine_protocol(), &["--suggest"])?;
        println!("{}", yaml.trim_end());
        std::fs::write(fix_dir.join(format!("fix-{i}.yaml")), &yaml)?;
    }

    say(&format!(
        "The metrics (`curl 127.0.0.1:9965/metrics` in {node}'s network namespace):"
    ));
    let metrics = run
        .lab
        .on_node(&node, &bins.helper)?
        .args(["fetch", "http://127.0.0.1:9965/metrics"])
        .output()
        .context("fetching the agent's metrics")?;
    for line in String::from_utf8_lossy(&metrics.stdout).lines() {
        if line.starts_with("netwatch_denied_flows_total")
            || line.starts_with("netwatch_policy_denials_total")
            || line.starts_with("netwatch_drops_total")
        {
            println!("  {line}");
        }
    }
    if fixable.is_empty() || stop.load(Ordering::SeqCst) {
        return Ok(());
    }

    say("Applying the suggested fix (as `kubectl apply` would). The tail from here on:");
    run.apply(&fix_dir)?;
    let before = count_denied(&run);
    let after_for = total.map(|t| {
        t.saturating_sub(started.elapsed())
            .max(Duration::from_secs(5))
    });
    outcomes.lock().map(|mut o| o.clear()).ok();
    let phase_stop = AtomicBool::new(false);
    std::thread::scope(|s| -> Result<()> {
        s.spawn(|| drive(&run, &traffic, &phase_stop, stop, &outcomes));
        let mut tail = observe(&bins.netwatch, &socket, false)?;
        match after_for {
            Some(d) => wait(d, stop),
            None => {
                println!("(running until Ctrl-C)");
                wait(Duration::MAX, stop)
            }
        }
        let _ = tail.0.kill();
        let _ = tail.0.wait();
        phase_stop.store(true, Ordering::SeqCst);
        Ok(())
    })?;
    let after = count_denied(&run).saturating_sub(before);
    let fixed_ok = outcomes
        .lock()
        .map(|o| {
            o.iter()
                .filter(|(t, ok): &&(String, bool)| fixable.iter().any(|f| f.label() == *t) && *ok)
                .count()
        })
        .unwrap_or(0);
    say(&format!(
        "After the fix: {after} new denied flow(s); the fixed flows went through {fixed_ok} time(s). Cleaning up."
    ));
    Ok(())
}

/// Probe the traffic every second until told to stop.
fn drive(
    run: &ScenarioRun,
    traffic: &[Traffic],
    phase_stop: &AtomicBool,
    stop: &AtomicBool,
    outcomes: &Mutex<Vec<(String, bool)>>,
) {
    while !phase_stop.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) {
        let tick = Instant::now();
        std::thread::scope(|s| {
            for t in traffic {
                s.spawn(move || {
                    if let Ok(r) = run.probe(t) {
                        let ok = matches!(
                            r.outcome,
                            netwatch_lab::Outcome::Connected | netwatch_lab::Outcome::Answered
                        );
                        if let Ok(mut o) = outcomes.lock() {
                            o.push((t.label(), ok));
                        }
                    }
                });
            }
        });
        if let Some(rest) = Duration::from_secs(1).checked_sub(tick.elapsed()) {
            std::thread::sleep(rest);
        }
    }
}

fn count_denied(run: &ScenarioRun) -> usize {
    run.agents
        .iter()
        .map(|a| {
            a.records()
                .iter()
                .filter(|r| r["lifecycle"] == "NEW")
                .count()
        })
        .sum()
}

/// `netwatch observe` on the agent's socket: `-f` (and with `last`, the
/// recent history first).
fn observe(netwatch: &Path, socket: &Path, with_history: bool) -> Result<ChildGuard> {
    let mut cmd = Command::new(netwatch);
    // One line per failing path, its count kept current: on-call reads
    // which paths fail, not every retry.
    cmd.arg("observe")
        .arg("--server")
        .arg(socket)
        .arg("-f")
        .arg("--paths");
    if !with_history {
        cmd.args(["--last", "0"]);
    }
    let child = cmd
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .context("running netwatch observe")?;
    Ok(ChildGuard(child))
}

fn wait(d: Duration, stop: &AtomicBool) {
    let until = Instant::now().checked_add(d);
    while !stop.load(Ordering::SeqCst) && until.is_none_or(|u| Instant::now() < u) {
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn say(s: &str) {
    println!("\n=== {s}");
}

fn tempdir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("netwatch-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
