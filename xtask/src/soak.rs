//! `cargo xtask soak`: the long forms of what CI runs briefly. The soak
//! test (netwatch-e2e/tests/soak.rs: denied-flow load, pod churn and API
//! faults together) for `--minutes`, then every fuzz target for
//! `--fuzz-minutes`. Run as root.

use std::{process::Command, sync::atomic::AtomicBool};

use anyhow::{Context, Result, bail};

/// The soak test reads its duration from this variable (1 minute unset:
/// the short form `cargo xtask test` runs).
pub const MINUTES_ENV: &str = "NETWATCH_SOAK_MINUTES";

pub fn soak(minutes: u64, fuzz_minutes: u64, stop: &AtomicBool) -> Result<()> {
    if minutes > 0 {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        // The test runs the agent's and the lab's binaries.
        let built = Command::new(&cargo)
            .args([
                "build",
                "-p",
                "netwatch-agent",
                "-p",
                "netwatch-lab",
                "--bins",
            ])
            .status()
            .context("running cargo build")?;
        if !built.success() {
            bail!("cargo build failed");
        }
        eprintln!("xtask: soak for {minutes} min (netwatch-e2e/tests/soak.rs)");
        let ran = Command::new(&cargo)
            .args([
                "test",
                "-p",
                "netwatch-e2e",
                "--test",
                "soak",
                "--",
                "--nocapture",
            ])
            .env(MINUTES_ENV, minutes.to_string())
            .status()
            .context("running cargo test")?;
        if !ran.success() {
            bail!("the soak failed (its figures and the failed assertion are above)");
        }
    }
    if fuzz_minutes > 0 {
        crate::fuzz::fuzz(crate::fuzz::Budget::Seconds(fuzz_minutes * 60), &[], stop)?;
    }
    Ok(())
}
