//! The programs xtask's tasks start: the agent, the CLI and the lab's
//! in-pod `netwatch-lab`, built by cargo next to xtask itself.

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};
use netwatch_lab::scenario::Binaries;

/// `cargo build` (debug) of the binaries labs and scenarios run.
pub fn build() -> Result<Binaries> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("xtask: building netwatch-agent, netwatch and netwatch-lab");
    if !Command::new(&cargo)
        .args([
            "build",
            "--package",
            "netwatch-agent",
            "--package",
            "netwatch-lab",
            "--bins",
        ])
        .status()?
        .success()
    {
        bail!("building netwatch-agent and netwatch-lab failed");
    }
    let target = target_dir()?.join("debug");
    Ok(Binaries {
        helper: target.join("netwatch-lab"),
        agent: target.join("netwatch-agent"),
        netwatch: target.join("netwatch"),
    })
}

/// The workspace's target directory (`CARGO_TARGET_DIR` or `target/`).
pub fn target_dir() -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let meta = Command::new(&cargo)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&meta.stdout)?;
    Ok(PathBuf::from(
        v["target_directory"]
            .as_str()
            .context("cargo metadata: target_directory")?,
    ))
}

/// `name`, built beside this xtask binary (in a VM guest nothing is built:
/// the host's build is used as it is).
pub fn beside_xtask(name: &str) -> Result<PathBuf> {
    let bin = std::env::current_exe()?
        .parent()
        .map(|d| d.join(name))
        .context("target directory")?;
    if !bin.exists() {
        bail!(
            "{} is missing: cargo build -p netwatch-agent -p netwatch-lab --bins",
            bin.display()
        );
    }
    Ok(bin)
}
