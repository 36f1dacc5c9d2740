//! `tp_btf/kfree_skb`: every skb the kernel frees as dropped, with the
//! kernel's own reason.
//!
//! Rust eBPF has no CO-RE relocations, so the offsets of the `sk_buff`,
//! `net_device`, `net` and `sock_common` fields read here are computed by the
//! agent from the running kernel's BTF and set as globals before load.
//! Per drop: one filter lookup, a few probe reads, one hash update; only the
//! first drop of a (flow, reason) reaches user space as an event.
//!
//! When the drop table is full (a flood of new flows), a new flow's drops go
//! to `DROP_AGG` by (source, destination, port, protocol, reason) with
//! packet and distinct-flow counts, which user space scans: every source,
//! destination and port is still reported, and never as a loss.
//!
//! Kernels before 5.17 pass no drop reason. There the reason comes from
//! where `kfree_skb()` was called: the tracepoint's `location` (a return
//! address) is looked up in `DROP_SITES`, a few function address ranges the
//! agent took from the running kernel's symbols (`nf_hook_slow` is a
//! netfilter drop, and so on). The agent can also force this variant on a
//! kernel that has reasons, which is how it is tested on every kernel.
//!
//! A dropped packet between nodes may be a pod packet in a tunnel (VXLAN,
//! Geneve, IPIP): then the flow is the inner one, and the outer header goes
//! along as [`Outer`], so a node firewall dropping the tunnel's UDP is
//! reported as the pod flow it broke. One level of encapsulation is decoded.

use aya_ebpf::{
    Global,
    bindings::BPF_NOEXIST,
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel},
    programs::BtfTracePointContext,
};
use netwatch_common::{
    AggKey, DROP_SITES_LEN, DropKey, DropStats, FlowKey, IP_V4, IP_V6, IPPROTO_ICMP,
    IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, Outer, REASON_SUBSYS_SHIFT, encap,
    event_kind, loss,
};

use crate::{
    atomic::atomic_add,
    emit,
    maps::{
        AGG_SCRATCH, AGG_SEEN, DROP_AGG, DROP_SCRATCH, DROP_SITES, DROPS, NETNS_ALLOW, PENDING,
        REASON_FILTER, SUBSYS_FILTER, UNTRACKED, count_loss,
    },
};

// Field offsets in bytes, from BTF (see the agent's capture::offsets).
#[unsafe(no_mangle)]
static SKB_HEAD: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static SKB_NETWORK_HEADER: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static SKB_PROTOCOL: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static SKB_LEN: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static SKB_DEV: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static SKB_SK: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static DEV_IFINDEX: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static DEV_ND_NET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub(crate) static NET_NS_INUM: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub(crate) static SOCK_NET: Global<u32> = Global::new(0);
/// 1 when the tracepoint passes a drop reason (kernels >= 5.17).
#[unsafe(no_mangle)]
static HAS_REASON: Global<u32> = Global::new(0);
/// Set by the agent once the offsets above are filled in; 0 keeps the
/// program inert rather than reading garbage.
#[unsafe(no_mangle)]
pub(crate) static OFFSETS_READY: Global<u32> = Global::new(0);
/// 1: count only drops in network namespaces listed in NETNS_ALLOW.
#[unsafe(no_mangle)]
pub(crate) static FILTER_NETNS: Global<u32> = Global::new(0);

const EEXIST: i32 = 17;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
/// Geneve's protocol type for an Ethernet frame.
const ETH_P_TEB: u16 = 0x6558;
const IPPROTO_IPIP: u8 = 4;
const IPPROTO_IPV6: u8 = 41;
const ETH_HLEN: usize = 14;
const UDP_HLEN: usize = 8;
const VXLAN_HLEN: usize = 8;
const GENEVE_HLEN: usize = 8;
/// `skb->network_header` when it was never set.
const HEADER_UNSET: u16 = 0xffff;

#[inline(always)]
pub(crate) fn at<T>(base: *const u8, off: u32) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel faults safely on a bad address.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(off as usize) as *const T).ok() }
}

#[inline(always)]
pub fn on_kfree_skb(ctx: &BtfTracePointContext) {
    let _ = try_on_kfree_skb(ctx);
}

fn try_on_kfree_skb(ctx: &BtfTracePointContext) -> Option<()> {
    if OFFSETS_READY.load() == 0 {
        return None;
    }
    // kfree_skb(skb, location, reason[, rx_sk]); the enum sits in a u64 slot.
    let reason = if HAS_REASON.load() != 0 {
        ctx.arg::<u64>(2) as u32
    } else {
        site_reason(ctx.arg::<u64>(1))
    };
    if !counted(reason) {
        return None;
    }
    let skb: *const u8 = ctx.arg(0);

    let dev: *const u8 = at(skb, SKB_DEV.load())?;
    let (ifindex, net) = if dev.is_null() {
        // Locally generated packets can be freed before a device is set:
        // take the namespace from the socket instead.
        let sk: *const u8 = at(skb, SKB_SK.load())?;
        let net: *const u8 = if sk.is_null() {
            core::ptr::null()
        } else {
            at(sk, SOCK_NET.load())?
        };
        (0u32, net)
    } else {
        let ifindex: i32 = at(dev, DEV_IFINDEX.load())?;
        (ifindex as u32, at::<*const u8>(dev, DEV_ND_NET.load())?)
    };
    let netns: u32 = if net.is_null() {
        0
    } else {
        at(net, NET_NS_INUM.load())?
    };
    if FILTER_NETNS.load() != 0 {
        // SAFETY: read-only lookup.
        unsafe { NETNS_ALLOW.get(&netns) }?;
    }

    let protocol = u16::from_be(at::<u16>(skb, SKB_PROTOCOL.load())?);
    let head: *const u8 = at(skb, SKB_HEAD.load())?;
    let nh: u16 = at(skb, SKB_NETWORK_HEADER.load())?;
    if head.is_null() || nh == HEADER_UNSET {
        return None;
    }
    let mut ip = head.wrapping_add(usize::from(nh));
    let mut version = match protocol {
        ETH_P_IP => IP_V4,
        ETH_P_IPV6 => IP_V6,
        _ => return None,
    };
    let scratch = DROP_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot; nothing else runs on it meanwhile.
    unsafe { (*scratch).outer.encap = encap::NONE };
    // The packet, and at most once the packet inside its tunnel.
    let mut depth = 0;
    let (key, tcp_flags) = loop {
        let (key, tcp_flags, l4) = match version {
            IP_V4 => parse_ipv4(ip)?,
            _ => parse_ipv6(ip)?,
        };
        let inner = if depth == 0 { tunnel(&key, l4) } else { None };
        let Some((inner, kind)) = inner else {
            break (key, tcp_flags);
        };
        // SAFETY: as above.
        unsafe { set_outer(&mut (*scratch).outer, &key, kind) };
        version = at::<u8>(inner, 0)? >> 4;
        ip = inner;
        depth += 1;
    };
    let len: u32 = at(skb, SKB_LEN.load())?;
    if record(key, reason, len, tcp_flags, ifindex, netns, scratch) {
        settle_untracked(&key);
    }
    Some(())
}

/// A handshake opener the full handshake table could not take was dropped
/// here: the drop reports it, so it is no loss.
#[inline(always)]
fn settle_untracked(flow: &FlowKey) {
    if let Some(slot) = UNTRACKED.get_ptr_mut(0) {
        // SAFETY: this CPU's slot.
        unsafe {
            if (*slot).ip_version != 0 && *slot == *flow {
                (*slot).ip_version = 0;
            }
        }
    }
}

/// Whether drops with `reason` are counted: core reasons one by one, a
/// subsystem's (Open vSwitch's OVS_DROP_*) all together.
#[inline(always)]
fn counted(reason: u32) -> bool {
    let subsys = reason >> REASON_SUBSYS_SHIFT;
    if subsys != 0 {
        return SUBSYS_FILTER.get(subsys).copied().unwrap_or(0) != 0;
    }
    REASON_FILTER.get(reason).copied().unwrap_or(0) != 0
}

/// The inner IP header of a tunnel packet whose outer flow is `key` and
/// whose L4 header (0 when there is none) starts at `l4`, and the kind of
/// tunnel; `None` when it is no tunnel packet netwatch decodes.
#[inline(always)]
fn tunnel(key: &FlowKey, l4: usize) -> Option<(*const u8, u8)> {
    if l4 == 0 {
        return None;
    }
    let l4 = l4 as *const u8;
    match key.proto {
        IPPROTO_IPIP | IPPROTO_IPV6 => Some((l4, encap::IPIP)),
        IPPROTO_UDP => match key.dst_port {
            encap::VXLAN_PORT | encap::VXLAN_LINUX_PORT => {
                // The I flag: a valid VNI follows.
                let flags: u8 = at(l4, UDP_HLEN as u32)?;
                if flags & 0x08 == 0 {
                    return None;
                }
                let inner = ethernet(l4.wrapping_add(UDP_HLEN + VXLAN_HLEN))?;
                Some((inner, encap::VXLAN))
            }
            encap::GENEVE_PORT => {
                let h: [u8; 4] = at(l4, UDP_HLEN as u32)?;
                let options = usize::from(h[0] & 0x3f) * 4;
                let body = l4.wrapping_add(UDP_HLEN + GENEVE_HLEN + options);
                let inner = match u16::from_be_bytes([h[2], h[3]]) {
                    ETH_P_TEB => ethernet(body)?,
                    ETH_P_IP | ETH_P_IPV6 => body,
                    _ => return None,
                };
                Some((inner, encap::GENEVE))
            }
            _ => None,
        },
        _ => None,
    }
}

/// The IP header of the untagged Ethernet frame at `frame`.
#[inline(always)]
fn ethernet(frame: *const u8) -> Option<*const u8> {
    let t: [u8; 2] = at(frame, 12)?;
    match u16::from_be_bytes(t) {
        ETH_P_IP | ETH_P_IPV6 => Some(frame.wrapping_add(ETH_HLEN)),
        _ => None,
    }
}

#[inline(always)]
fn set_outer(outer: &mut Outer, key: &FlowKey, kind: u8) {
    outer.src_addr = key.src_addr;
    outer.dst_addr = key.dst_addr;
    outer.dst_port = key.dst_port;
    outer.proto = key.proto;
    outer.ip_version = key.ip_version;
    outer.encap = kind;
}

/// The reason of the drop site containing `location`; 0 (not counted unless
/// asked for) when it is in none of them.
#[inline(never)]
fn site_reason(location: u64) -> u32 {
    for i in 0..DROP_SITES_LEN {
        let Some(site) = DROP_SITES.get(i) else {
            break;
        };
        if location >= site.start && location < site.end {
            return site.reason;
        }
    }
    0
}

/// The flow and TCP flags of an IPv4 packet whose header starts at `ip`.
#[inline(always)]
fn parse_ipv4(ip: *const u8) -> Option<(FlowKey, u8, usize)> {
    let hdr: [u8; 20] = at(ip, 0)?;
    if hdr[0] >> 4 != 4 || hdr[0] & 0x0f < 5 {
        count_loss(loss::MALFORMED);
        return None;
    }
    let mut key = FlowKey {
        proto: hdr[9],
        ip_version: IP_V4,
        ..FlowKey::default()
    };
    key.src_addr[..4].copy_from_slice(&hdr[12..16]);
    key.dst_addr[..4].copy_from_slice(&hdr[16..20]);
    let first_fragment = u16::from_be_bytes([hdr[6], hdr[7]]) & 0x1fff == 0;
    let mut flags = 0;
    let mut l4 = 0;
    if first_fragment {
        let p = ip.wrapping_add(usize::from(hdr[0] & 0x0f) * 4);
        flags = fill_l4(p, &mut key);
        l4 = p as usize;
    }
    Some((key, flags, l4))
}

/// The flow and TCP flags of an IPv6 packet, walking up to four extension
/// headers (hop-by-hop, routing, fragment, destination options).
#[inline(always)]
fn parse_ipv6(ip: *const u8) -> Option<(FlowKey, u8, usize)> {
    let hdr: [u8; 40] = at(ip, 0)?;
    if hdr[0] >> 4 != 6 {
        count_loss(loss::MALFORMED);
        return None;
    }
    let mut key = FlowKey {
        ip_version: IP_V6,
        ..FlowKey::default()
    };
    key.src_addr.copy_from_slice(&hdr[8..24]);
    key.dst_addr.copy_from_slice(&hdr[24..40]);
    let mut next = hdr[6];
    let mut off: u32 = 40;
    let mut has_l4 = true;
    for _ in 0..4 {
        match next {
            0 | 43 | 60 => {
                let ext: [u8; 2] = at(ip, off)?;
                next = ext[0];
                off += (u32::from(ext[1]) + 1) * 8;
            }
            44 => {
                let ext: [u8; 4] = at(ip, off)?;
                next = ext[0];
                off += 8;
                if u16::from_be_bytes([ext[2], ext[3]]) & 0xfff8 != 0 {
                    has_l4 = false;
                }
            }
            _ => break,
        }
    }
    key.proto = next;
    let mut flags = 0;
    let mut l4 = 0;
    if has_l4 {
        let p = ip.wrapping_add(off as usize);
        flags = fill_l4(p, &mut key);
        l4 = p as usize;
    }
    Some((key, flags, l4))
}

/// Fill ports (or ICMP type/code) from the L4 header at `l4`; return the TCP
/// flags byte (0 for other protocols). A short read leaves the ports zero.
#[inline(always)]
fn fill_l4(l4: *const u8, key: &mut FlowKey) -> u8 {
    match key.proto {
        IPPROTO_TCP => {
            if let Some(h) = at::<[u8; 14]>(l4, 0) {
                key.src_port = u16::from_be_bytes([h[0], h[1]]);
                key.dst_port = u16::from_be_bytes([h[2], h[3]]);
                return h[13];
            }
        }
        IPPROTO_UDP | IPPROTO_SCTP => {
            if let Some(h) = at::<[u8; 4]>(l4, 0) {
                key.src_port = u16::from_be_bytes([h[0], h[1]]);
                key.dst_port = u16::from_be_bytes([h[2], h[3]]);
            }
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            if let Some(h) = at::<[u8; 2]>(l4, 0) {
                key.src_port = u16::from(h[0]);
                key.dst_port = u16::from(h[1]);
            }
        }
        _ => {}
    }
    0
}

/// Count the drop in the drop table, or in the aggregate once the table is
/// full; report the first one of a (flow, reason). False when it could be
/// counted nowhere.
#[inline(always)]
fn record(
    flow: FlowKey,
    reason: u32,
    len: u32,
    tcp_flags: u8,
    ifindex: u32,
    netns: u32,
    stats: *mut DropStats,
) -> bool {
    let key = DropKey {
        flow,
        reason,
        _pad: 0,
    };
    let now = unsafe { bpf_ktime_get_ns() };
    if add(&key, len, tcp_flags, now) {
        return true;
    }
    // SAFETY: this CPU's scratch slot (its `outer` already filled in).
    let stats = unsafe {
        (*stats).packets = 1;
        (*stats).bytes = u64::from(len);
        (*stats).first_ns = now;
        (*stats).last_ns = now;
        (*stats).ifindex = ifindex;
        (*stats).netns = netns;
        (*stats).tcp_flags = tcp_flags;
        &*stats
    };
    // A flow that overflowed into the aggregate stays there, so it is
    // reported once, not in both places.
    // SAFETY: read-only lookup.
    if unsafe { AGG_SEEN.get(&key) }.is_some() {
        return aggregate(&key, stats);
    }
    match DROPS.insert(&key, stats, u64::from(BPF_NOEXIST)) {
        // A full ring buffer loses nothing: the table scan reports the entry.
        Ok(()) => emit::send(loss::DROP_EVENT_DEFERRED, |e| {
            e.ts_ns = now;
            e.flow = flow;
            e.reason = reason;
            e.ifindex = ifindex;
            e.netns = netns;
            e.bytes = len;
            e.count = 1;
            e.kind = event_kind::DROP;
            e.tcp_flags = tcp_flags;
            e.outer = stats.outer;
        }),
        // Another CPU created the entry between our lookup and insert.
        Err(e) if e == -EEXIST => {
            add(&key, len, tcp_flags, now);
        }
        Err(_) => return aggregate(&key, stats),
    }
    true
}

/// Count a drop (`drop`: its packet, as a new drop-table value) of a flow
/// the per-flow table has no room for in the aggregate of its (source,
/// destination, port, protocol, reason).
#[inline(never)]
fn aggregate(key: &DropKey, drop: &DropStats) -> bool {
    let flow = &key.flow;
    let Some(scratch) = AGG_SCRATCH.get_ptr_mut(0) else {
        count_loss(loss::TABLE_DROPS);
        return false;
    };
    // SAFETY: this CPU's scratch slot; nothing else runs on it meanwhile.
    let (agg, entry) = unsafe {
        let s = &mut *scratch;
        s.key = AggKey {
            src_addr: flow.src_addr,
            dst_addr: flow.dst_addr,
            dst_port: flow.dst_port,
            proto: flow.proto,
            ip_version: flow.ip_version,
            reason: key.reason,
        };
        (&s.key, &mut s.stats)
    };
    // One insert decides whether this flow is new here, race-free.
    let new_flow = AGG_SEEN.insert(key, &1, u64::from(BPF_NOEXIST)).is_ok();
    if !add_aggregate(agg, drop, new_flow) {
        entry.packets = 1;
        entry.bytes = drop.bytes;
        entry.flows = u64::from(new_flow);
        entry.first_ns = drop.first_ns;
        entry.last_ns = drop.last_ns;
        entry.ifindex = drop.ifindex;
        entry.netns = drop.netns;
        entry.tcp_flags = drop.tcp_flags;
        match DROP_AGG.insert(agg, entry, u64::from(BPF_NOEXIST)) {
            Ok(()) => {}
            Err(e) if e == -EEXIST => {
                add_aggregate(agg, drop, new_flow);
            }
            Err(_) => {
                count_loss(loss::TABLE_DROPS);
                return false;
            }
        }
    }
    // The drop is reported, but not as a flow of its own: its handshake
    // must not wait in the pending table to be reported as unanswered
    // (TIMED_OUT) after the connect timeout.
    let _ = PENDING.remove(flow);
    true
}

#[inline(always)]
fn add_aggregate(agg: &AggKey, drop: &DropStats, new_flow: bool) -> bool {
    let Some(p) = DROP_AGG.get_ptr_mut(agg) else {
        return false;
    };
    // SAFETY: p points at a live map value; counters use atomic adds.
    unsafe {
        atomic_add(&mut (*p).packets, 1);
        atomic_add(&mut (*p).bytes, drop.bytes);
        if new_flow {
            atomic_add(&mut (*p).flows, 1);
        }
        (*p).last_ns = drop.last_ns;
        (*p).tcp_flags |= drop.tcp_flags;
    }
    true
}

/// Add one packet to an existing entry; false when there is none.
#[inline(always)]
fn add(key: &DropKey, len: u32, tcp_flags: u8, now: u64) -> bool {
    let Some(p) = DROPS.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: p points at a live map value; the counters use atomic adds so
    // concurrent drops on several CPUs are all counted.
    unsafe {
        atomic_add(&mut (*p).packets, 1);
        atomic_add(&mut (*p).bytes, u64::from(len));
        (*p).last_ns = now;
        (*p).tcp_flags |= tcp_flags;
    }
    true
}
