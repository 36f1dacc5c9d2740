//! `cargo xtask setup`: everything a fresh machine needs, idempotently.
//!
//! Debian packages the tests and the lab use, the nightly toolchain's
//! `rust-src` (for `-Z build-std=core`), and `bpf-linker` built against the
//! nightly toolchain's own libLLVM (no system LLVM matches it), and
//! cargo-fuzz for the fuzz targets.

use std::{path::Path, process::Command};

use anyhow::{Context, Result, bail};

/// Debian packages: the lab (iproute2, nftables, procps' sysctl), the
/// benchmark (iperf3), diagnostics (bpftool), the alerting tests
/// (prometheus, promtool), and the kernel matrix (`cargo xtask vmtest`: QEMU
/// and its virtiofsd, busybox-static and cpio for the initramfs, kmod for
/// module dependencies, the archive keyring that signs the kernel packages),
/// and Open vSwitch for the lab's ovs datapath (run in the VMs).
pub const PACKAGES: &[&str] = &[
    "iproute2",
    "nftables",
    "procps",
    "iperf3",
    "bpftool",
    "prometheus",
    "netcat-openbsd",
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "kmod",
    "debian-archive-keyring",
    "openvswitch-switch",
];

/// Where bpf-linker finds libLLVM. Its path is baked into the binary as an
/// rpath, so it must be stable (not /tmp).
pub const LLVM_PREFIX: &str = "/opt/netwatch/llvm";
pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// cargo-fuzz, for `cargo xtask fuzz` (the nightly toolchain builds the
/// targets with libFuzzer and the address sanitizer, nothing else needed).
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";

pub fn setup() -> Result<()> {
    packages()?;
    rust_src()?;
    bpf_linker()?;
    cargo_fuzz()?;
    eprintln!("setup: done");
    Ok(())
}

fn status(cmd: &mut Command) -> Result<bool> {
    Ok(cmd
        .status()
        .with_context(|| format!("running {cmd:?}"))?
        .success())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        eprintln!("setup: Debian packages present");
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "setup must install {} and needs root: run it as root",
            missing.join(" ")
        );
    }
    eprintln!("setup: installing {}", missing.join(" "));
    if !status(Command::new("apt-get").args(["update", "-q"]))? {
        bail!("apt-get update failed");
    }
    let mut install = Command::new("apt-get");
    install
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing);
    if !status(&mut install)? {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}

fn rust_src() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        bail!(
            "no nightly Rust toolchain: the eBPF programs need one (rustup toolchain install nightly \
             --profile minimal --component rust-src)"
        );
    }
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("setup: nightly rust-src present");
        return Ok(());
    }
    eprintln!("setup: adding rust-src to the nightly toolchain");
    if !status(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))? {
        bail!("rustup component add rust-src --toolchain nightly failed");
    }
    Ok(())
}

fn bpf_linker() -> Result<()> {
    if let Ok(v) = output(Command::new("bpf-linker").arg("--version"))
        && v.contains(BPF_LINKER_VERSION)
    {
        eprintln!("setup: bpf-linker {BPF_LINKER_VERSION} present");
        return Ok(());
    }
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let version = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("cannot tell the nightly toolchain's LLVM version")?
        .to_string();
    let prefix_lib = Path::new(LLVM_PREFIX).join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    let mut linked = false;
    for entry in std::fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("libLLVM") && name.contains(".so") {
            // The soname bpf-linker asks for, and the name the linker looks for.
            for link in [prefix_lib.join(&name), prefix_lib.join("libLLVM.so")] {
                let _ = std::fs::remove_file(&link);
                std::os::unix::fs::symlink(entry.path(), &link)
                    .with_context(|| format!("linking {}", link.display()))?;
            }
            linked = true;
        }
    }
    if !linked {
        bail!(
            "the nightly toolchain at {} ships no libLLVM",
            lib.display()
        );
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {major} (about a minute)"
    );
    let mut install = Command::new("cargo");
    install.env("LLVM_PREFIX", LLVM_PREFIX).args([
        "install",
        "bpf-linker",
        "--locked",
        "--version",
        BPF_LINKER_VERSION,
        "--no-default-features",
        "--features",
        &format!("llvm-{major}"),
    ]);
    if !status(&mut install)? {
        bail!("cargo install bpf-linker failed");
    }
    Ok(())
}

fn cargo_fuzz() -> Result<()> {
    if let Ok(v) = output(Command::new("cargo").args(["fuzz", "--version"]))
        && v.contains(CARGO_FUZZ_VERSION)
    {
        eprintln!("setup: cargo-fuzz {CARGO_FUZZ_VERSION} present");
        return Ok(());
    }
    eprintln!("setup: installing cargo-fuzz {CARGO_FUZZ_VERSION} (a few minutes)");
    if !status(Command::new("cargo").args([
        "install",
        "cargo-fuzz",
        "--locked",
        "--version",
        CARGO_FUZZ_VERSION,
    ]))? {
        bail!("cargo install cargo-fuzz failed");
    }
    Ok(())
}
