//! Loading netwatch's eBPF object into the kernel and attaching the hooks
//! that do not depend on interfaces: `tp_btf/kfree_skb` and `sock_ops`
//! (each in [`super::hooks`], with its kernel variants).
//!
//! Each hook is optional: when one cannot be attached (no BTF, cgroup v1
//! only, ...) the agent says why in one line and keeps capturing with the
//! others. Only a failure to load anything at all is fatal.

use std::{collections::BTreeSet, os::unix::fs::MetadataExt, path::PathBuf, time::Duration};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::SchedClassifier,
};
use netwatch_common::{
    AggKey, AggStats, DropKey, DropStats, FlowKey, PendingConn, REASON_FILTER_LEN,
    REASON_SUBSYS_LEN, SockConn,
};
use tracing::{info, warn};

use super::{
    EBPF_OBJECT,
    hooks::{
        HookReport,
        kfree_skb::{self, KfreeSkbError},
        sock_ops, sock_state, tc,
    },
    offsets::KernelOffsets,
    reasons::{DropReasons, ReasonError},
};

/// How the kernel side is set up.
#[derive(Clone, Debug)]
pub struct CaptureConfig {
    /// Kernel BTF (offsets and drop reason names).
    pub btf_path: PathBuf,
    /// `--drop-reasons` (see [`DropReasons::parse_filter`]).
    pub drop_reasons: String,
    /// cgroup v2 directory to attach `sock_ops` to; `None` skips it.
    pub cgroup_root: Option<PathBuf>,
    /// Count only drops in this agent's network namespace (and the ones
    /// added with [`KernelCapture::allow_netns`]): for several lab nodes on one
    /// kernel. Off on a real node, where the whole kernel is the node's.
    pub own_netns_only: bool,
    /// A completed handshake of the same (client, server, port) is reported
    /// at most once per this interval.
    pub established_report_interval: Duration,
    /// Entries of each flow table (drops, the drop aggregate, pending
    /// handshakes, sockets); the aggregate's set of recently seen flows
    /// holds four times as many (at least 4096).
    pub table_entries: u32,
    /// Ring buffer size in bytes (a power of two, at least one page).
    pub ring_buffer_bytes: u32,
    /// How kfree_skb learns drop reasons (`--kfree-skb-variant`).
    pub kfree_skb_variant: kfree_skb::Variant,
    /// How TC classifiers attach (`--tc-variant`).
    pub tc_variant: tc::Variant,
    /// Kernel symbols, for drop sites on kernels without drop reasons.
    pub kallsyms_path: PathBuf,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            btf_path: PathBuf::from(super::offsets::VMLINUX_BTF),
            drop_reasons: "default".into(),
            cgroup_root: None,
            own_netns_only: false,
            established_report_interval: Duration::from_secs(60),
            table_entries: 16384,
            ring_buffer_bytes: 256 * 1024,
            kfree_skb_variant: kfree_skb::Variant::Auto,
            tc_variant: tc::Variant::Auto,
            kallsyms_path: PathBuf::from("/proc/kallsyms"),
        }
    }
}

/// Errors loading the kernel side.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "loading eBPF programs failed: {0}. netwatch needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN \
         (or root; on kernels 5.8 to 5.10 also CAP_SYS_RESOURCE, for the memlock limit) and a kernel \
         >= 5.8 with BPF enabled"
    )]
    Load(#[source] aya::EbpfError),
    #[error("eBPF object has no {0}: the agent and its embedded programs do not match (rebuild)")]
    Missing(&'static str),
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error(transparent)]
    Reasons(#[from] ReasonError),
    #[error("--ring-buffer-bytes {0} must be a power of two of at least 4096")]
    RingBufferSize(u32),
}

/// The loaded object: programs, their links, and the maps the agent reads.
pub struct KernelCapture {
    ebpf: Ebpf,
    pub reasons: DropReasons,
    pub hooks: HookReport,
    /// Inode number of this process's network namespace.
    pub own_netns: u32,
}

/// Maps handed to the reading side of the agent.
pub struct KernelMaps {
    pub events: RingBuf<MapData>,
    pub drops: BpfHashMap<MapData, DropKey, DropStats>,
    pub drop_aggregate: BpfHashMap<MapData, AggKey, AggStats>,
    pub pending: BpfHashMap<MapData, FlowKey, PendingConn>,
    pub socks: BpfHashMap<MapData, FlowKey, SockConn>,
    pub connect_cgroups: BpfHashMap<MapData, FlowKey, u64>,
    pub losses: PerCpuArray<MapData, u64>,
}

impl KernelCapture {
    /// Load the programs, attach `kfree_skb` and `sock_ops`, and hand out
    /// the maps. TC programs are loaded here and attached per interface by
    /// [`super::attach`].
    pub fn load(config: &CaptureConfig) -> Result<(KernelCapture, KernelMaps), LoadError> {
        if !config.ring_buffer_bytes.is_power_of_two() || config.ring_buffer_bytes < 4096 {
            return Err(LoadError::RingBufferSize(config.ring_buffer_bytes));
        }
        raise_memlock_limit();

        // Offsets and reason names come from the same BTF; without it the
        // drop hook stays off and everything else still works.
        let kernel = KernelOffsets::from_btf_file(&config.btf_path);
        let aya_btf = Btf::parse_file(&config.btf_path, aya::Endianness::default()).ok();
        let (offsets, drop_setup) = match kernel {
            Ok((offsets, btf)) => (Some(offsets), kfree_skb_setup(config, &offsets, &btf)),
            Err(e) => (None, Err(KfreeSkbError::from(e))),
        };
        let (mut reasons, sites, mut kfree_status) = match drop_setup {
            Ok((mode, reasons, sites)) => (reasons, sites, Ok(mode)),
            Err(e) => (DropReasons::default(), Vec::new(), Err(e)),
        };
        // Subsystem reasons of modules loaded now; later ones are read when
        // their first drop arrives (see the daemon's event loop).
        reasons.read_module_reasons(&config.btf_path);
        let filter = if reasons.is_empty() {
            BTreeSet::new()
        } else {
            reasons.parse_filter(&config.drop_reasons)?
        };
        let own_netns = std::fs::metadata("/proc/self/ns/net")
            .map(|m| m.ino() as u32)
            .unwrap_or(0);

        let o = offsets.unwrap_or_default();
        let ready: u32 = (offsets.is_some() && kfree_status.is_ok()).into();
        let has_reason: u32 = matches!(kfree_status, Ok(kfree_skb::Mode::Reason)).into();
        let filter_netns: u32 = config.own_netns_only.into();
        let interval_ns = config.established_report_interval.as_nanos() as u64;
        let mut loader = EbpfLoader::new();
        loader
            .btf(aya_btf.as_ref())
            .override_global("SKB_HEAD", &o.skb_head, true)
            .override_global("SKB_NETWORK_HEADER", &o.skb_network_header, true)
            .override_global("SKB_PROTOCOL", &o.skb_protocol, true)
            .override_global("SKB_LEN", &o.skb_len, true)
            .override_global("SKB_DEV", &o.skb_dev, true)
            .override_global("SKB_SK", &o.skb_sk, true)
            .override_global("DEV_IFINDEX", &o.dev_ifindex, true)
            .override_global("DEV_ND_NET", &o.dev_nd_net, true)
            .override_global("NET_NS_INUM", &o.net_ns_inum, true)
            .override_global("SOCK_NET", &o.sock_net, true)
            .override_global("SKC_V6_DADDR", &o.sock_v6_daddr, true)
            .override_global("SKC_V6_RCV_SADDR", &o.sock_v6_rcv_saddr, true)
            .override_global("HAS_REASON", &has_reason, true)
            .override_global("OFFSETS_READY", &ready, true)
            .override_global("FILTER_NETNS", &filter_netns, true)
            .override_global("REPORT_INTERVAL_NS", &interval_ns, true)
            .map_max_entries("DROPS", config.table_entries)
            .map_max_entries("DROP_AGG", config.table_entries)
            // Remembers the flows of a flood's aggregate, so each counts once.
            .map_max_entries("AGG_SEEN", config.table_entries.saturating_mul(4).max(4096))
            .map_max_entries("PENDING", config.table_entries)
            .map_max_entries("SOCKS", config.table_entries)
            .map_max_entries("REPORTED", config.table_entries)
            .map_max_entries("CONNECT_CGROUPS", config.table_entries)
            .map_max_entries("EVENTS", config.ring_buffer_bytes);
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(LoadError::Load)?;

        // Reason filter and namespace filter before any hook runs.
        {
            let map = ebpf
                .map_mut("REASON_FILTER")
                .ok_or(LoadError::Missing("REASON_FILTER"))?;
            let mut arr: Array<&mut MapData, u8> =
                Array::try_from(map).map_err(|source| LoadError::Map {
                    name: "REASON_FILTER",
                    source,
                })?;
            for v in filter.iter().filter(|v| **v < REASON_FILTER_LEN) {
                arr.set(*v, 1u8, 0).map_err(|source| LoadError::Map {
                    name: "REASON_FILTER",
                    source,
                })?;
            }
        }
        {
            let map = ebpf
                .map_mut("SUBSYS_FILTER")
                .ok_or(LoadError::Missing("SUBSYS_FILTER"))?;
            let mut arr: Array<&mut MapData, u8> =
                Array::try_from(map).map_err(|source| LoadError::Map {
                    name: "SUBSYS_FILTER",
                    source,
                })?;
            for s in DropReasons::subsystems_of(&filter)
                .into_iter()
                .filter(|s| *s < REASON_SUBSYS_LEN)
            {
                arr.set(s, 1u8, 0).map_err(|source| LoadError::Map {
                    name: "SUBSYS_FILTER",
                    source,
                })?;
            }
        }
        if kfree_status.is_ok()
            && let Err(e) = kfree_skb::write_sites(&mut ebpf, &sites)
        {
            kfree_status = Err(e);
        }
        let mut capture = KernelCapture {
            ebpf,
            reasons,
            hooks: HookReport {
                kfree_skb: kfree_status,
                sock_ops: Err(sock_ops::SockOpsError::NoCgroupRoot),
                sock_state: Err(sock_state::SockStateError::NoBtf),
                tc: tc::Mode::pick(config.tc_variant),
            },
            own_netns,
        };
        if config.own_netns_only {
            capture.allow_netns(own_netns)?;
        }

        for name in [tc::FROM_POD, tc::TO_POD] {
            let prog: &mut SchedClassifier = capture
                .ebpf
                .program_mut(name)
                .ok_or(LoadError::Missing("TC program"))?
                .try_into()
                .map_err(|source| LoadError::Program { name, source })?;
            prog.load()
                .map_err(|source| LoadError::Program { name, source })?;
        }

        if capture.hooks.kfree_skb.is_ok()
            && let Err(e) = kfree_skb::attach(&mut capture.ebpf, aya_btf.as_ref())
        {
            capture.hooks.kfree_skb = Err(e);
        }
        if let Ok(mode) = &capture.hooks.kfree_skb {
            for (site, _) in &sites {
                info!(
                    symbol = %site.symbol,
                    reason = %site.reason,
                    "drop site (kfree_skb location variant)"
                );
            }
            info!(
                reasons = filter.len(),
                counted = %filter.iter().map(|v| capture.reasons.name(*v)).collect::<Vec<_>>().join(","),
                "drop capture (tp_btf/kfree_skb) attached, mode {}",
                mode.as_str()
            );
        }
        capture.hooks.sock_ops = sock_ops::attach(&mut capture.ebpf, config.cgroup_root.as_deref());
        if capture.hooks.sock_ops.is_ok() {
            info!(cgroup = ?config.cgroup_root, "socket capture (sock_ops, connect4, connect6) attached");
        }
        capture.hooks.sock_state = sock_state::attach(&mut capture.ebpf, aya_btf.as_ref());
        if capture.hooks.sock_state.is_ok() {
            info!("socket state capture (tp_btf/inet_sock_set_state, tcp_receive_reset) attached");
        }
        for state in capture.hooks.states() {
            match &state.off_because {
                None => info!(hook = state.hook, mode = state.mode, "capture hook on"),
                Some(why) => warn!(hook = state.hook, "capture hook off: {why}"),
            }
        }

        let ids: Vec<String> = capture
            .ebpf
            .programs()
            .filter_map(|(name, p)| p.info().ok().map(|i| format!("{name}={}", i.id())))
            .collect();
        info!(programs = %ids.join(","), "eBPF programs loaded (they go away when the agent exits)");
        let maps = capture.take_maps()?;
        Ok((capture, maps))
    }

    /// Count drops in network namespace `inum` too (with `own_netns_only`).
    pub fn allow_netns(&mut self, inum: u32) -> Result<(), LoadError> {
        let map = self
            .ebpf
            .map_mut("NETNS_ALLOW")
            .ok_or(LoadError::Missing("NETNS_ALLOW"))?;
        let mut m: BpfHashMap<&mut MapData, u32, u8> =
            BpfHashMap::try_from(map).map_err(|source| LoadError::Map {
                name: "NETNS_ALLOW",
                source,
            })?;
        m.insert(inum, 1, 0).map_err(|source| LoadError::Map {
            name: "NETNS_ALLOW",
            source,
        })
    }

    /// The TC program for one direction, for [`super::attach`].
    pub fn classifier(&mut self, name: &'static str) -> Option<&mut SchedClassifier> {
        self.ebpf.program_mut(name)?.try_into().ok()
    }

    fn take_maps(&mut self) -> Result<KernelMaps, LoadError> {
        fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, LoadError>
        where
            T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
        {
            let map = ebpf.take_map(name).ok_or(LoadError::Missing(name))?;
            T::try_from(map).map_err(|source| LoadError::Map { name, source })
        }
        Ok(KernelMaps {
            events: take(&mut self.ebpf, "EVENTS")?,
            drops: take(&mut self.ebpf, "DROPS")?,
            drop_aggregate: take(&mut self.ebpf, "DROP_AGG")?,
            pending: take(&mut self.ebpf, "PENDING")?,
            socks: take(&mut self.ebpf, "SOCKS")?,
            connect_cgroups: take(&mut self.ebpf, "CONNECT_CGROUPS")?,
            losses: take(&mut self.ebpf, "LOSSES")?,
        })
    }
}

/// The kfree_skb variant for this kernel and config: its mode, reason table
/// and (for the location variant) drop sites.
#[allow(clippy::type_complexity)]
fn kfree_skb_setup(
    config: &CaptureConfig,
    offsets: &KernelOffsets,
    btf: &btf_rs::Btf,
) -> Result<
    (
        kfree_skb::Mode,
        DropReasons,
        Vec<(kfree_skb::LocatedSite, netwatch_common::DropSite)>,
    ),
    KfreeSkbError,
> {
    use kfree_skb::{Mode, Variant};
    let mode = match (config.kfree_skb_variant, offsets.has_reason) {
        (Variant::Reason, false) => return Err(KfreeSkbError::NoReasonArgument),
        (Variant::Reason, true) | (Variant::Auto, true) => Mode::Reason,
        (Variant::Location, _) | (Variant::Auto, false) => Mode::Location,
    };
    match mode {
        Mode::Reason => Ok((mode, DropReasons::from_btf(btf)?, Vec::new())),
        Mode::Location => {
            let reasons = kfree_skb::location_reasons();
            let sites = kfree_skb::kernel_sites(&config.kallsyms_path, &reasons)?;
            Ok((mode, reasons, sites))
        }
    }
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK. Best effort.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK (only matters on kernels < 5.11)");
    }
}

/// Whether this process sits at the root of its own cgroup namespace (as
/// in a container with a private cgroup namespace): the cgroup mount it
/// sees is then its own subtree, not the node's, and sock_ops attached there
/// sees only this container's sockets.
pub fn in_private_cgroup_namespace() -> bool {
    std::fs::read_to_string("/proc/self/cgroup")
        .map(|s| s.lines().any(|l| l.trim() == "0::/"))
        .unwrap_or(false)
}

/// The cgroup v2 mount of this host: `/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones.
pub fn detect_cgroup2_root() -> Option<PathBuf> {
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    for candidate in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        let Ok(c) = std::ffi::CString::new(candidate) else {
            continue;
        };
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: valid C string and out-pointer.
        if unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0
            && st.f_type as i64 == CGROUP2_SUPER_MAGIC
        {
            return Some(PathBuf::from(candidate));
        }
    }
    None
}
