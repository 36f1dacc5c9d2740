//! TC classifiers on the host side of pod interfaces.
//!
//! They never change a packet's fate (always `TC_ACT_UNSPEC`, "next" under
//! tcx). Per packet they only read the headers; the handshake table is touched
//! only by SYN, SYN-ACK, RST, DNS, ICMP-unreachable and SCTP INIT/INIT-ACK/ABORT
//! packets, so bulk data costs a few loads and compares.

use core::mem::size_of;

use aya_ebpf::{Global, bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns, programs::TcContext};
use netwatch_common::{
    FlowKey, IP_V4, IP_V6, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP,
    PairKey, PendingConn, event_kind, loss, pending_kind, tcp_flags,
};

use crate::{
    atomic::atomic_add,
    emit,
    maps::{PENDING, REPORTED, UNTRACKED, count_loss},
};

/// Leave the packet to the next program / the stack.
pub const TC_ACT_UNSPEC: i32 = -1;

/// A completed handshake of a (client, server, port) pair is reported at most
/// once per this many nanoseconds. Set by the agent.
#[unsafe(no_mangle)]
static REPORT_INTERVAL_NS: Global<u64> = Global::new(60_000_000_000);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const DNS_PORT: u16 = 53;
const EEXIST: i32 = 17;

/// One parsed packet: its flow and where its L4 header starts.
struct Packet {
    key: FlowKey,
    l4: usize,
}

/// Entry point of both classifiers.
#[inline(always)]
pub fn observe(ctx: &TcContext, direction: u8) -> i32 {
    let _ = try_observe(ctx, direction);
    TC_ACT_UNSPEC
}

/// A pointer to `T` at `off` in the linear packet data, bounds-checked.
#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    // SAFETY: ptr_at checked that size_of::<T>() bytes at off are in the packet.
    ptr_at::<T>(ctx, off).map(|p| unsafe { p.read_unaligned() })
}

/// A reference to `N` packet bytes at `off`, bounds-checked, without copying.
#[inline(always)]
fn bytes<const N: usize>(ctx: &TcContext, off: usize) -> Option<&[u8; N]> {
    // SAFETY: ptr_at checked the bounds; u8 arrays have no alignment needs.
    ptr_at::<[u8; N]>(ctx, off).map(|p| unsafe { &*p })
}

fn try_observe(ctx: &TcContext, direction: u8) -> Option<()> {
    let ethertype = u16::from_be(read::<u16>(ctx, 12)?);
    let pkt = match ethertype {
        ETH_P_IP => parse_ipv4(ctx, ETH_HLEN)?,
        ETH_P_IPV6 => parse_ipv6(ctx, ETH_HLEN)?,
        _ => return None,
    };
    match pkt.key.proto {
        IPPROTO_TCP => {
            let flags = bytes::<14>(ctx, pkt.l4)?[13];
            if flags & tcp_flags::SYN != 0 {
                if flags & tcp_flags::ACK == 0 {
                    track(ctx, direction, &pkt.key, pending_kind::TCP_SYN);
                } else {
                    answered(ctx, direction, &pkt.key.reversed());
                }
            } else if flags & tcp_flags::RST != 0 {
                refused(
                    ctx,
                    direction,
                    &pkt.key.reversed(),
                    event_kind::TCP_RESET,
                    0,
                );
            }
        }
        IPPROTO_UDP => {
            if pkt.key.dst_port == DNS_PORT {
                track(ctx, direction, &pkt.key, pending_kind::DNS_QUERY);
            } else if pkt.key.src_port == DNS_PORT {
                answered(ctx, direction, &pkt.key.reversed());
            }
        }
        IPPROTO_ICMP => {
            let (ty, code) = (pkt.key.src_port as u8, pkt.key.dst_port as u8);
            // Destination unreachable, except "fragmentation needed" (path MTU).
            if ty == 3 && code != 4 {
                let inner = parse_ipv4(ctx, pkt.l4 + 8)?;
                let reason = u32::from(ty) << 8 | u32::from(code);
                refused(ctx, direction, &inner.key, event_kind::ICMP_UNREACH, reason);
            }
        }
        IPPROTO_ICMPV6 => {
            let (ty, code) = (pkt.key.src_port as u8, pkt.key.dst_port as u8);
            if ty == 1 {
                let inner = parse_ipv6(ctx, pkt.l4 + 8)?;
                let reason = u32::from(ty) << 8 | u32::from(code);
                refused(ctx, direction, &inner.key, event_kind::ICMP_UNREACH, reason);
            }
        }
        IPPROTO_SCTP => {
            // The first chunk follows the 12-byte common header.
            match read::<u8>(ctx, pkt.l4 + 12)? {
                1 => track(ctx, direction, &pkt.key, pending_kind::SCTP_INIT),
                2 => answered(ctx, direction, &pkt.key.reversed()),
                6 => refused(
                    ctx,
                    direction,
                    &pkt.key.reversed(),
                    event_kind::SCTP_ABORT,
                    0,
                ),
                _ => {}
            }
        }
        _ => {}
    }
    Some(())
}

/// Parse an IPv4 header at `off` and the ports (or ICMP type and code) after it.
#[inline(always)]
fn parse_ipv4(ctx: &TcContext, off: usize) -> Option<Packet> {
    let hdr = bytes::<20>(ctx, off)?;
    if hdr[0] >> 4 != 4 {
        count_loss(loss::MALFORMED);
        return None;
    }
    let ihl = usize::from(hdr[0] & 0x0f) * 4;
    if ihl < 20 {
        count_loss(loss::MALFORMED);
        return None;
    }
    // A non-first fragment carries no L4 header.
    if u16::from_be_bytes([hdr[6], hdr[7]]) & 0x1fff != 0 {
        return None;
    }
    let mut key = FlowKey {
        proto: hdr[9],
        ip_version: IP_V4,
        ..FlowKey::default()
    };
    key.src_addr[..4].copy_from_slice(&hdr[12..16]);
    key.dst_addr[..4].copy_from_slice(&hdr[16..20]);
    let l4 = off + ihl;
    fill_ports(ctx, &mut key, l4)?;
    Some(Packet { key, l4 })
}

/// Parse an IPv6 header at `off`. Extension headers are not walked: a packet
/// with one is left alone (rare on pod interfaces).
#[inline(always)]
fn parse_ipv6(ctx: &TcContext, off: usize) -> Option<Packet> {
    let hdr = bytes::<40>(ctx, off)?;
    if hdr[0] >> 4 != 6 {
        count_loss(loss::MALFORMED);
        return None;
    }
    let mut key = FlowKey {
        proto: hdr[6],
        ip_version: IP_V6,
        ..FlowKey::default()
    };
    key.src_addr.copy_from_slice(&hdr[8..24]);
    key.dst_addr.copy_from_slice(&hdr[24..40]);
    let l4 = off + 40;
    fill_ports(ctx, &mut key, l4)?;
    Some(Packet { key, l4 })
}

#[inline(always)]
fn fill_ports(ctx: &TcContext, key: &mut FlowKey, l4: usize) -> Option<()> {
    match key.proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            let ports = bytes::<4>(ctx, l4)?;
            key.src_port = u16::from_be_bytes([ports[0], ports[1]]);
            key.dst_port = u16::from_be_bytes([ports[2], ports[3]]);
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let tc = bytes::<2>(ctx, l4)?;
            key.src_port = u16::from(tc[0]);
            key.dst_port = u16::from(tc[1]);
        }
        _ => {}
    }
    Some(())
}

#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: reading a field of the context the kernel handed us.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// A handshake opener (SYN, DNS query, INIT): remember it until answered.
#[inline(never)]
fn track(ctx: &TcContext, direction: u8, key: &FlowKey, kind: u8) {
    let now = unsafe { bpf_ktime_get_ns() };
    let ifindex = ifindex(ctx);
    let len = ctx.len();
    if let Some(p) = PENDING.get_ptr_mut(key) {
        // SAFETY: p points at a live map value; counters use atomic adds.
        unsafe {
            (*p).last_ns = now;
            // Count each packet once: at the interface where it was first seen.
            if (*p).ifindex == ifindex && (*p).direction == direction {
                atomic_add(&mut (*p).packets, 1);
                atomic_add(&mut (*p).bytes, u64::from(len));
            }
        }
        return;
    }
    let entry = PendingConn {
        first_ns: now,
        last_ns: now,
        packets: 1,
        bytes: u64::from(len),
        ifindex,
        direction,
        kind,
        _pad: [0; 2],
    };
    if let Err(e) = PENDING.insert(key, &entry, u64::from(BPF_NOEXIST)) {
        // EEXIST: another CPU inserted it first; that is not a loss.
        if e != -EEXIST {
            untracked(key);
        }
    }
}

/// The handshake table is full: remember `key` on this CPU until its drop
/// (see `drops::settle_untracked`); the previous one, never dropped, was lost.
#[inline(always)]
fn untracked(key: &FlowKey) {
    let Some(slot) = UNTRACKED.get_ptr_mut(0) else {
        count_loss(loss::TABLE_PENDING);
        return;
    };
    // SAFETY: this CPU's slot.
    unsafe {
        if (*slot).ip_version != 0 {
            count_loss(loss::TABLE_PENDING);
        }
        *slot = *key;
    }
}

/// A handshake answer (SYN-ACK, DNS reply, INIT-ACK) for `key`, the
/// initiator's flow.
#[inline(always)]
fn answered(ctx: &TcContext, direction: u8, key: &FlowKey) {
    answered_on(ifindex(ctx), direction, key);
}

/// [`answered`], seen on interface `ifindex` in `direction` (the socket
/// hooks pass where the handshake was first seen).
#[inline(never)]
pub(crate) fn answered_on(ifindex: u32, direction: u8, key: &FlowKey) {
    let Some(p) = PENDING.get_ptr(key) else {
        return;
    };
    // SAFETY: p points at a live map value.
    let packets = unsafe { (*p).packets };
    // Only the CPU that removes the entry reports it.
    if PENDING.remove(key).is_err() {
        return;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let pair = PairKey {
        src_addr: key.src_addr,
        dst_addr: key.dst_addr,
        dst_port: key.dst_port,
        proto: key.proto,
        ip_version: key.ip_version,
        _pad: 0,
    };
    // SAFETY: LRU value read; a concurrent update only makes us report twice.
    if let Some(last) = unsafe { REPORTED.get(&pair) } {
        if now.wrapping_sub(*last) < REPORT_INTERVAL_NS.load() {
            return;
        }
    }
    let _ = REPORTED.insert(&pair, &now, 0);
    emit::send(loss::RINGBUF_TC, |e| {
        e.ts_ns = now;
        e.flow = *key;
        e.ifindex = ifindex;
        e.count = packets as u32;
        e.kind = event_kind::ESTABLISHED;
        e.direction = direction;
    });
}

/// A refusal (RST, ICMP unreachable, ABORT) answering the pending handshake
/// of `key`, the initiator's flow.
#[inline(always)]
fn refused(ctx: &TcContext, direction: u8, key: &FlowKey, kind: u8, reason: u32) {
    refused_on(ifindex(ctx), direction, key, kind, reason);
}

/// [`refused`], seen on interface `ifindex` in `direction`.
#[inline(never)]
pub(crate) fn refused_on(ifindex: u32, direction: u8, key: &FlowKey, kind: u8, reason: u32) {
    let Some(p) = PENDING.get_ptr(key) else {
        return;
    };
    // SAFETY: p points at a live map value.
    let (packets, bytes) = unsafe { ((*p).packets, (*p).bytes) };
    if PENDING.remove(key).is_err() {
        return;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    emit::send(loss::RINGBUF_TC, |e| {
        e.ts_ns = now;
        e.flow = *key;
        e.reason = reason;
        e.ifindex = ifindex;
        e.bytes = bytes as u32;
        e.count = packets as u32;
        e.kind = kind;
        e.direction = direction;
    });
}
