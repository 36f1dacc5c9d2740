//! The kernel side seen from user space: loading, attaching, reading.

/// The eBPF object built by build.rs from netwatch-ebpf.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netwatch"));
