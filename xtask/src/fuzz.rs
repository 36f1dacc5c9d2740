//! `cargo xtask fuzz` and the fuzzing part of `cargo xtask soak`: every
//! cargo-fuzz target under fuzz/ (libFuzzer, nightly), each for a fixed
//! number of runs (CI) or a time (soak), starting from the seeds under
//! fuzz/seeds/ and the corpus earlier runs left in fuzz/corpus/.
//!
//! A crash leaves its input in fuzz/artifacts/TARGET/ and fails the task;
//! the fix lands with that input as a regression test in the normal suites.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{Context, Result, bail};

/// The targets, in the order they run (fuzz/Cargo.toml's `[[bin]]`s).
pub const TARGETS: &[&str] = &[
    "calico_selector",
    "filter",
    "observe_request",
    "flow_stream",
    "manifests",
    "policy",
];

/// How the targets are built (`run` must repeat them, or it rebuilds).
/// No sanitizer: the parsers the targets reach are safe Rust, where a bug
/// is a panic, which libFuzzer catches without one (sanitizer coverage
/// still guides it); the address sanitizer's build of the agent's
/// dependencies took over 50 minutes on 2 cores. `--dev` with the fuzz
/// workspace's `[profile.dev]` (opt-level 1, no debug info).
/// `AYA_BUILD_SKIP=1` spares the eBPF object: the targets only need the
/// parsers.
const BUILD_FLAGS: &[&str] = &["--dev", "--sanitizer", "none"];

/// How long each target runs.
#[derive(Clone, Copy, Debug)]
pub enum Budget {
    /// This many inputs (CI: the same work on every machine), with a time
    /// cap in seconds so that a slow machine still finishes.
    Runs { runs: u64, cap_seconds: u64 },
    /// This many seconds.
    Seconds(u64),
}

/// Runs in CI (`cargo xtask test`), per target: the same work on every
/// machine; see README "Fuzzing" for what it takes.
pub const CI_RUNS: u64 = 100_000;
/// ... capped per target, so that a slow machine still finishes.
pub const CI_CAP_SECONDS: u64 = 60;

pub fn fuzz(budget: Budget, only: &[String], stop: &AtomicBool) -> Result<()> {
    let root = workspace_root()?;
    let dir = root.join("fuzz");
    let target_dir = target_dir(&root);
    let targets: Vec<&str> = TARGETS
        .iter()
        .copied()
        .filter(|t| only.is_empty() || only.iter().any(|o| o == t))
        .collect();
    if targets.is_empty() {
        bail!(
            "no fuzz target named {only:?}; they are {}",
            TARGETS.join(", ")
        );
    }
    eprintln!("xtask: building the fuzz targets (nightly, coverage only: {BUILD_FLAGS:?})");
    let built = Command::new("cargo")
        .current_dir(&dir)
        .env("AYA_BUILD_SKIP", "1")
        .args(["+nightly", "fuzz", "build"])
        .args(BUILD_FLAGS)
        .arg("--target-dir")
        .arg(&target_dir)
        .status()
        .context("running cargo fuzz (cargo xtask setup installs it)")?;
    if !built.success() {
        bail!("cargo fuzz build failed");
    }
    let mut crashed = Vec::new();
    for target in targets {
        if stop.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        let corpus = dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        let mut cmd = Command::new("cargo");
        cmd.current_dir(&dir)
            .env("AYA_BUILD_SKIP", "1")
            .args(["+nightly", "fuzz", "run"])
            .args(BUILD_FLAGS)
            .arg("--target-dir")
            .arg(&target_dir)
            .arg(target)
            .arg(&corpus);
        let seeds = dir.join("seeds").join(target);
        if seeds.is_dir() {
            cmd.arg(&seeds);
        }
        cmd.arg("--");
        match budget {
            Budget::Runs { runs, cap_seconds } => {
                cmd.arg(format!("-runs={runs}"))
                    .arg(format!("-max_total_time={cap_seconds}"));
            }
            Budget::Seconds(s) => {
                cmd.arg(format!("-max_total_time={s}"));
            }
        }
        // libFuzzer's periodic status lines are noise in CI logs.
        cmd.args(["-print_final_stats=1", "-verbosity=0"]);
        eprintln!("xtask: fuzz {target} ({budget:?})");
        let status = cmd.status().context("running cargo fuzz run")?;
        if !status.success() {
            crashed.push(target);
        }
    }
    if !crashed.is_empty() {
        bail!(
            "fuzz targets failed: {} (inputs in fuzz/artifacts/<target>/; reproduce with \
             `cd fuzz && cargo +nightly fuzz run <target> <input>`, then add the input as a \
             regression test)",
            crashed.join(", ")
        );
    }
    Ok(())
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

/// The fuzz build's own directory under the workspace's target directory
/// (instrumented builds must not mix with the normal ones).
fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("fuzz")
}
