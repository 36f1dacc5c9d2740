//! `cargo xtask test`: set up the machine, build, and run every test,
//! including the end-to-end tests against the real kernel (as root).

use std::process::Command;

use anyhow::{Result, bail};

pub fn test(extra: &[String]) -> Result<()> {
    crate::setup::setup()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the end-to-end tests load eBPF programs and build network namespaces: run as root");
    }
    // The end-to-end tests run the agent binary: build it first.
    cargo(&["build", "--package", "netwatch-agent", "--bins"])?;
    let mut args = vec![
        "test",
        "--workspace",
        "--exclude",
        "netwatch-ebpf",
        "--no-fail-fast",
    ];
    args.extend(extra.iter().map(String::as_str));
    cargo(&args)?;
    Ok(())
}

fn cargo(args: &[&str]) -> Result<()> {
    eprintln!("xtask: cargo {}", args.join(" "));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    if !Command::new(cargo).args(args).status()?.success() {
        bail!("cargo {} failed", args.join(" "));
    }
    Ok(())
}
