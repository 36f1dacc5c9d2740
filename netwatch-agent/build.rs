//! Builds the eBPF programs (netwatch-ebpf) with the nightly toolchain and
//! bpf-linker, so the object can be embedded in the agent. `AYA_BUILD_SKIP=1`
//! skips it (docs, clippy on machines without the toolchain, the fuzz
//! targets, which only need the parsers): an empty object is embedded
//! instead, which the agent refuses to load.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    if std::env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v == "true") {
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        let out = std::env::var_os("OUT_DIR").context("OUT_DIR not set")?;
        std::fs::write(std::path::Path::new(&out).join("netwatch"), [])
            .context("writing the empty eBPF object")?;
        return Ok(());
    }
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("reading the workspace metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "netwatch-ebpf")
        .ok_or_else(|| anyhow!("the netwatch-ebpf package is not in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent directory for {}", ebpf.manifest_path))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context("building the eBPF programs: run `cargo xtask setup` if the nightly toolchain, rust-src or bpf-linker is missing")
}
