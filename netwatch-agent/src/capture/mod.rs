//! The kernel side seen from user space: load the programs ([`load`]), one
//! module per hook with its kernel variants ([`hooks`]), find pod interfaces
//! ([`interfaces`]) for the TC classifiers, read the ring buffer
//! ([`events`]) and the in-kernel tables ([`tables`]); name drop reasons from
//! the running kernel ([`reasons`]) and read struct offsets from its BTF
//! ([`offsets`]).

pub mod events;
pub mod hooks;
pub mod interfaces;
pub mod load;
pub mod netns;
pub mod offsets;
pub mod reasons;
pub mod tables;

/// The eBPF object built by build.rs from netwatch-ebpf.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netwatch"));
