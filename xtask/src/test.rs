//! `cargo xtask test`: set up the machine, build, and run every test,
//! including the end-to-end tests against the real kernel (as root) and
//! the short soak (netwatch-e2e/tests/soak.rs, 1 minute), every fuzz target
//! for a fixed number of inputs, then the
//! kernel matrix (`cargo xtask vmtest`: the kernel-side tests on Debian's
//! 5.10, 6.1 and 6.12 kernels under QEMU).

use std::{process::Command, sync::atomic::AtomicBool, time::Duration};

use anyhow::{Result, bail};

/// `NETWATCH_VMTEST=0` skips the kernel matrix, for local iteration only:
/// CI and a plain `cargo xtask test` always run it.
const SKIP_MATRIX_ENV: &str = "NETWATCH_VMTEST";

pub fn test(extra: &[String], stop: &AtomicBool) -> Result<()> {
    crate::setup::setup()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the end-to-end tests load eBPF programs and build network namespaces: run as root");
    }
    // The end-to-end tests run the agent's and the lab's binaries: build
    // them first (netwatch-e2e cannot depend on binaries of other packages).
    cargo(&[
        "build",
        "--package",
        "netwatch-agent",
        "--package",
        "netwatch-lab",
        "--bins",
    ])?;
    let mut args = vec![
        "test",
        "--workspace",
        "--exclude",
        "netwatch-ebpf",
        "--no-fail-fast",
    ];
    args.extend(extra.iter().map(String::as_str));
    let host = cargo(&args);
    if let Err(e) = &host {
        eprintln!("xtask: {e}; the kernel matrix runs all the same");
    }
    if stop.load(std::sync::atomic::Ordering::SeqCst) {
        bail!("interrupted");
    }
    // Every fuzz target for a fixed number of inputs (README "Fuzzing").
    let fuzzed = crate::fuzz::fuzz(
        crate::fuzz::Budget::Runs {
            runs: crate::fuzz::CI_RUNS,
            cap_seconds: crate::fuzz::CI_CAP_SECONDS,
        },
        &[],
        stop,
    );
    if let Err(e) = &fuzzed {
        eprintln!("xtask: {e}; the kernel matrix runs all the same");
    }
    let host = match (host, fuzzed) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
        (Err(e), Err(f)) => Err(anyhow::anyhow!("{e}; and {f}")),
    };
    if stop.load(std::sync::atomic::Ordering::SeqCst) {
        bail!("interrupted");
    }
    let matrix = if std::env::var(SKIP_MATRIX_ENV).as_deref() == Ok("0") {
        eprintln!("xtask: {SKIP_MATRIX_ENV}=0: skipping the kernel matrix (never do this in CI)");
        Ok(())
    } else {
        eprintln!("xtask: the kernel matrix (cargo xtask vmtest --kernel all)");
        crate::vmtest::vmtest(
            &crate::vmtest::Options {
                kernels: vec!["all".into()],
                keep: false,
                // Per VM; 6.12 runs the most (OVS with a scenario): 18-19 min under TCG.
                timeout: Duration::from_secs(1800),
                test_args: Vec::new(),
                update_readme: false,
                bench: false,
            },
            stop,
        )
    };
    match (host, matrix) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(e), Ok(())) => Err(e),
        (Ok(()), Err(m)) => Err(m),
        (Err(e), Err(m)) => bail!("{e}; and {m}"),
    }
}

fn cargo(args: &[&str]) -> Result<()> {
    eprintln!("xtask: cargo {}", args.join(" "));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    if !Command::new(cargo).args(args).status()?.success() {
        bail!("cargo {} failed", args.join(" "));
    }
    Ok(())
}
