//! `tp_btf/kfree_skb`: every packet the kernel frees as dropped.
//!
//! Two kernel variants, picked at load time ([`Variant::Auto`]) or forced
//! with `--kfree-skb-variant`:
//!
//! | mode | kernels | where the drop reason comes from |
//! | --- | --- | --- |
//! | `reason` | 5.17+ | the tracepoint's `enum skb_drop_reason` argument, named from the kernel's BTF |
//! | `location` | 5.8 to 5.16 (and any kernel, when forced) | the tracepoint's `location`, the return address into the function that called `kfree_skb()`, looked up among a few [`DROP_SITE_FUNCTIONS`] found in `/proc/kallsyms` |
//!
//! The `location` variant gives the same names as the `reason` one for the
//! drops that matter to policy (a drop in `nf_hook_slow` is
//! `NETFILTER_DROP`), but it is coarser: it knows the function, not the
//! line, so everything a listed function drops gets that function's reason,
//! and a drop anywhere else is `NOT_SPECIFIED` (not counted by default).
//! Reading kernel addresses needs CAP_SYSLOG (or `kernel.kptr_restrict=0`).

use std::collections::BTreeMap;

use aya::{
    Btf, Ebpf,
    maps::{Array, MapData},
    programs::BtfTracePoint,
};
use netwatch_common::{DROP_SITES_LEN, DropSite};

use super::{super::reasons::DropReasons, verifier_msg};

pub const PROGRAM: &str = "netwatch_kfree_skb";

/// `--kfree-skb-variant`: which way to learn a drop's reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Variant {
    /// `reason` where the kernel passes one, else `location`.
    #[default]
    Auto,
    /// The kernel's own drop reason (5.17+).
    Reason,
    /// The calling function, from kernel symbols (any kernel).
    Location,
}

/// The variant that runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Reason,
    Location,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Reason => "reason",
            Mode::Location => "location",
        }
    }
}

/// Why drop capture is off.
#[derive(Debug, thiserror::Error)]
pub enum KfreeSkbError {
    #[error(transparent)]
    Offsets(#[from] super::super::offsets::OffsetError),
    #[error(transparent)]
    Reasons(#[from] super::super::reasons::ReasonError),
    #[error(
        "this kernel's kfree_skb passes no drop reason (before 5.17) and --kfree-skb-variant reason was asked for; use auto or location"
    )]
    NoReasonArgument,
    #[error("reading kernel symbols from {path}: {source}")]
    Symbols {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} shows every address as 0, so drop sites cannot be located on this kernel without drop reasons: \
         give netwatch-agent CAP_SYSLOG (or set kernel.kptr_restrict=0)"
    )]
    HiddenAddresses { path: String },
    #[error("none of the drop-site functions ({}) is in {path}", DROP_SITE_FUNCTIONS.iter().map(|(f, _)| *f).collect::<Vec<_>>().join(", "))]
    NoSites { path: String },
    #[error("kernel BTF could not be parsed for program loading")]
    NoProgramBtf,
    #[error("{0}")]
    Load(String),
    #[error("attaching tp_btf/kfree_skb: {0}")]
    Attach(String),
    #[error("eBPF map DROP_SITES: {0}")]
    Map(#[from] aya::maps::MapError),
}

/// Kernel functions that free the packets they drop with plain `kfree_skb()`
/// on kernels without drop reasons, and the reason each stands for. The
/// names are the modern kernels' `enum skb_drop_reason` names, so filters
/// and dashboards read the same on every kernel.
pub const DROP_SITE_FUNCTIONS: &[(&str, &str)] = &[
    // NF_DROP verdicts of iptables, nftables, ebtables and br_netfilter
    // (freed by the hook core on older kernels, by the table itself on
    // newer ones; the tables are often modules).
    ("nf_hook_slow", "NETFILTER_DROP"),
    ("nft_do_chain", "NETFILTER_DROP"),
    ("ipt_do_table", "NETFILTER_DROP"),
    ("ip6t_do_table", "NETFILTER_DROP"),
    ("ebt_do_table", "NETFILTER_DROP"),
    // TC_ACT_SHOT at TC ingress (sch_handle_ingress is inlined here).
    ("__netif_receive_skb_core", "TC_INGRESS"),
    // TC_ACT_SHOT at TC egress (sch_handle_egress is inlined here).
    ("__dev_queue_xmit", "TC_EGRESS"),
    // A cgroup egress program's drop.
    ("ip_finish_output", "BPF_CGROUP_EGRESS"),
    ("ip6_finish_output", "BPF_CGROUP_EGRESS"),
    // No socket for the packet (closed port), and the TCP/UDP receive path's
    // other discards.
    ("tcp_v4_rcv", "NO_SOCKET"),
    ("tcp_v6_rcv", "NO_SOCKET"),
    ("__udp4_lib_rcv", "NO_SOCKET"),
    ("__udp6_lib_rcv", "NO_SOCKET"),
];

/// The reason table of kernels without `enum skb_drop_reason`: the names of
/// [`DROP_SITE_FUNCTIONS`] numbered by netwatch, 0 for a drop elsewhere.
pub fn location_reasons() -> DropReasons {
    let mut names: Vec<&str> = vec!["NOT_SPECIFIED"];
    for (_, reason) in DROP_SITE_FUNCTIONS {
        if !names.contains(reason) {
            names.push(reason);
        }
    }
    DropReasons::from_pairs(
        names
            .into_iter()
            .enumerate()
            .map(|(i, n)| (i as u32, n.to_string())),
    )
}

/// One function's address range and its reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocatedSite {
    pub symbol: String,
    pub start: u64,
    pub end: u64,
    pub reason: String,
}

/// Find the drop-site functions in a kallsyms (or System.map) listing:
/// `ADDRESS TYPE NAME [MODULE]` per line (module symbols count: a module
/// loaded after the agent started is not seen). A function ends where the
/// next higher text symbol starts. Compiler-made copies (`name.cold`,
/// `name.constprop.0`, ...) count as the function. At most
/// [`DROP_SITES_LEN`] ranges, in [`DROP_SITE_FUNCTIONS`] order.
pub fn locate_sites(listing: &str) -> Vec<LocatedSite> {
    let mut text: Vec<(u64, &str)> = Vec::new();
    for line in listing.lines() {
        let mut f = line.split_whitespace();
        let (Some(addr), Some(ty), Some(name)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if !matches!(ty, "t" | "T" | "w" | "W") {
            continue;
        }
        let Ok(addr) = u64::from_str_radix(addr, 16) else {
            continue;
        };
        if addr != 0 {
            text.push((addr, name));
        }
    }
    text.sort_unstable();
    // The end of each symbol: the next strictly higher address.
    let mut ends: BTreeMap<u64, u64> = BTreeMap::new();
    for w in text.windows(2) {
        if w[1].0 > w[0].0 {
            ends.insert(w[0].0, w[1].0);
        }
    }
    let mut out = Vec::new();
    for (function, reason) in DROP_SITE_FUNCTIONS {
        for (addr, name) in &text {
            let base = name.split('.').next().unwrap_or(name);
            if base != *function {
                continue;
            }
            let Some(end) = ends
                .range(addr..)
                .next()
                .map(|(s, e)| if s == addr { *e } else { *addr })
            else {
                continue;
            };
            if end > *addr && out.len() < DROP_SITES_LEN as usize {
                out.push(LocatedSite {
                    symbol: name.to_string(),
                    start: *addr,
                    end,
                    reason: reason.to_string(),
                });
            }
        }
    }
    out
}

/// Whether every address of a kallsyms listing reads 0 (kptr_restrict).
pub fn addresses_hidden(listing: &str) -> bool {
    listing
        .lines()
        .take(1000)
        .filter_map(|l| l.split_whitespace().next())
        .all(|a| a.chars().all(|c| c == '0'))
}

/// The drop sites of the running kernel, as the eBPF table wants them.
pub fn kernel_sites(
    kallsyms: &std::path::Path,
    reasons: &DropReasons,
) -> Result<Vec<(LocatedSite, DropSite)>, KfreeSkbError> {
    let path = kallsyms.display().to_string();
    let listing = std::fs::read_to_string(kallsyms).map_err(|source| KfreeSkbError::Symbols {
        path: path.clone(),
        source,
    })?;
    if addresses_hidden(&listing) {
        return Err(KfreeSkbError::HiddenAddresses { path });
    }
    let sites = locate_sites(&listing);
    if sites.is_empty() {
        return Err(KfreeSkbError::NoSites { path });
    }
    Ok(sites
        .into_iter()
        .map(|s| {
            let table = DropSite {
                start: s.start,
                end: s.end,
                reason: reasons.value(&s.reason).unwrap_or(0),
                _pad: 0,
            };
            (s, table)
        })
        .collect())
}

/// Fill the eBPF drop-site table.
pub fn write_sites(ebpf: &mut Ebpf, sites: &[(LocatedSite, DropSite)]) -> Result<(), KfreeSkbError> {
    let Some(map) = ebpf.map_mut("DROP_SITES") else {
        return Err(KfreeSkbError::Load(
            "eBPF object has no DROP_SITES map: the agent and its embedded programs do not match"
                .into(),
        ));
    };
    let mut arr: Array<&mut MapData, DropSite> = Array::try_from(map)?;
    for (i, (_, site)) in sites.iter().enumerate() {
        arr.set(i as u32, *site, 0)?;
    }
    Ok(())
}

/// Load and attach the program (its globals were set at object load).
pub fn attach(ebpf: &mut Ebpf, btf: Option<&Btf>) -> Result<(), KfreeSkbError> {
    let btf = btf.ok_or(KfreeSkbError::NoProgramBtf)?;
    let prog: &mut BtfTracePoint = ebpf
        .program_mut(PROGRAM)
        .ok_or_else(|| KfreeSkbError::Load("program missing from the object".into()))?
        .try_into()
        .map_err(|e| KfreeSkbError::Load(format!("{e}")))?;
    prog.load("kfree_skb", btf)
        .map_err(|e| KfreeSkbError::Load(verifier_msg("kfree_skb", &e)))?;
    prog.attach()
        .map_err(|e| KfreeSkbError::Attach(super::chain(&e)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Excerpts of `/proc/kallsyms` (the symbols around the drop sites) of
    /// each kernel netwatch is tested on: the same functions must be found
    /// on each. Debian's packages ship no real System.map, so these come
    /// from the booted kernels (`cargo xtask vmtest` and the host).
    const MAPS: &[(&str, &str)] = &[
        ("5.10", include_str!("testdata/kallsyms-5.10.excerpt")),
        ("6.1", include_str!("testdata/kallsyms-6.1.excerpt")),
        ("6.12", include_str!("testdata/kallsyms-6.12.excerpt")),
        ("6.18", include_str!("testdata/kallsyms-6.18.excerpt")),
    ];

    #[test]
    fn nf_hook_slow_is_a_netfilter_drop_on_every_kernel() {
        for (kernel, map) in MAPS {
            let sites = locate_sites(map);
            let nf = sites
                .iter()
                .find(|s| s.symbol == "nf_hook_slow")
                .unwrap_or_else(|| panic!("{kernel}: nf_hook_slow not found: {sites:?}"));
            assert_eq!(nf.reason, "NETFILTER_DROP", "{kernel}");
            assert!(nf.end > nf.start, "{kernel}: {nf:?}");
            // It ends where the next function begins: a return address just
            // past the end is someone else's.
            let next = map
                .lines()
                .filter_map(|l| {
                    let mut f = l.split_whitespace();
                    let a = u64::from_str_radix(f.next()?, 16).ok()?;
                    Some(a)
                })
                .filter(|a| *a > nf.start)
                .min()
                .unwrap();
            assert_eq!(nf.end, next, "{kernel}");
            for (_, reason) in DROP_SITE_FUNCTIONS {
                assert!(location_reasons().value(reason).is_some(), "{reason}");
            }
        }
    }

    #[test]
    fn nftables_own_drop_site_is_found_where_nf_tables_is_a_module() {
        for (kernel, map) in MAPS {
            let sites = locate_sites(map);
            assert!(
                sites
                    .iter()
                    .any(|s| s.symbol == "nft_do_chain" && s.reason == "NETFILTER_DROP"),
                "{kernel}: {sites:?}"
            );
        }
    }

    #[test]
    fn tc_and_socket_sites_are_found_on_every_kernel() {
        for (kernel, map) in MAPS {
            let sites = locate_sites(map);
            let reasons: Vec<&str> = sites.iter().map(|s| s.reason.as_str()).collect();
            for want in ["TC_INGRESS", "TC_EGRESS", "NO_SOCKET"] {
                assert!(reasons.contains(&want), "{kernel}: {want} missing: {sites:?}");
            }
            assert!(sites.len() <= DROP_SITES_LEN as usize);
        }
    }

    #[test]
    fn copies_of_a_function_count_and_other_types_do_not() {
        let listing = "\
ffffffff81000000 T nf_hook_slow
ffffffff81000100 T nf_hook_slow_list
ffffffff81000200 t nf_hook_slow.cold
ffffffff81000240 t something_else
ffffffff81000300 d nf_hook_slow_data
";
        let sites = locate_sites(listing);
        #[allow(clippy::type_complexity)]
        let got: Vec<(&str, u64, u64)> = sites
            .iter()
            .map(|s| (s.symbol.as_str(), s.start, s.end))
            .collect();
        assert_eq!(
            got,
            vec![
                ("nf_hook_slow", 0xffffffff81000000, 0xffffffff81000100),
                ("nf_hook_slow.cold", 0xffffffff81000200, 0xffffffff81000240),
            ]
        );
    }

    #[test]
    fn hidden_addresses_are_told_apart() {
        assert!(addresses_hidden(
            "0000000000000000 T nf_hook_slow\n0000000000000000 t x\n"
        ));
        assert!(!addresses_hidden("ffffffff81000000 T nf_hook_slow\n"));
    }

    #[test]
    fn location_reasons_name_unmatched_drops_not_specified() {
        let r = location_reasons();
        assert_eq!(r.name(0), "NOT_SPECIFIED");
        let f = r.parse_filter("default").unwrap();
        assert!(f.contains(&r.value("NETFILTER_DROP").unwrap()));
        assert!(!f.contains(&0));
        assert!(!f.contains(&r.value("NO_SOCKET").unwrap()));
    }
}
