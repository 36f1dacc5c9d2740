//! TCP handshake outcomes from the connecting socket's side, for datapaths
//! that bypass a TC hook: with `bpf_redirect_peer` (Cilium's host routing,
//! netkit) a SYN-ACK or RST is delivered into the pod without crossing the
//! host side's egress hook, so the TC classifiers never see the answer.
//! Every datapath passes the socket:
//!
//! - `tp_btf/inet_sock_set_state`: SYN_SENT -> ESTABLISHED answers the
//!   pending handshake of the socket's flow;
//! - `tp_btf/tcp_receive_reset`: a reset received in SYN_SENT refuses it.
//!
//! Both only settle handshakes the TC classifiers already track (the PENDING
//! table), reported at the interface where the SYN was seen. IPv4 sockets:
//! `sock_common`'s IPv4 fields sit at fixed offsets on every kernel. IPv6
//! sockets: `skc_v6_daddr` and `skc_v6_rcv_saddr` move between kernels (and
//! are absent without CONFIG_IPV6), so the agent passes their offsets from
//! the kernel's BTF; an IPv6 socket connected to a v4-mapped address sends
//! IPv4 packets and is keyed as IPv4, as the classifiers saw its SYN.

use aya_ebpf::{Global, helpers::bpf_probe_read_kernel_buf, programs::BtfTracePointContext};
use netwatch_common::{FlowKey, IP_V4, IP_V6, IPPROTO_TCP, event_kind};

use crate::{
    drops::{FILTER_NETNS, NET_NS_INUM, OFFSETS_READY, SOCK_NET, at},
    maps::{NETNS_ALLOW, PENDING},
    tc::{answered_on, refused_on},
};

// include/net/tcp_states.h
const TCP_ESTABLISHED: u64 = 1;
const TCP_SYN_SENT: u64 = 2;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
// struct sock_common: skc_daddr, skc_rcv_saddr, (hash), skc_dport, skc_num,
// skc_family, skc_state. Unchanged since 2.6.
const SKC_DADDR: u32 = 0;
const SKC_RCV_SADDR: u32 = 4;
const SKC_DPORT: u32 = 12;
const SKC_NUM: u32 = 14;
const SKC_FAMILY: u32 = 16;
const SKC_STATE: u32 = 18;

/// `offsetof(struct sock_common, skc_v6_daddr)` and `skc_v6_rcv_saddr`,
/// set by the agent from kernel BTF; 0 (they never sit at 0): unknown, IPv6
/// sockets are left alone.
#[unsafe(no_mangle)]
static SKC_V6_DADDR: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static SKC_V6_RCV_SADDR: Global<u32> = Global::new(0);

#[inline(always)]
pub fn on_set_state(ctx: &BtfTracePointContext) {
    // (const struct sock *sk, const int oldstate, const int newstate)
    let (old, new) = (ctx.arg::<u64>(1) & 0xff, ctx.arg::<u64>(2) & 0xff);
    if old != TCP_SYN_SENT || new != TCP_ESTABLISHED {
        return;
    }
    let _ = settle(ctx.arg(0), None);
}

#[inline(always)]
pub fn on_receive_reset(ctx: &BtfTracePointContext) {
    let sk: *const u8 = ctx.arg(0);
    if at::<u8>(sk, SKC_STATE).map(u64::from) != Some(TCP_SYN_SENT) {
        return;
    }
    let _ = settle(sk, Some(event_kind::TCP_RESET));
}

/// Answer (`refusal` None) or refuse the handshake `sk` is making.
#[inline(always)]
fn settle(sk: *const u8, refusal: Option<u8>) -> Option<()> {
    let family = at::<u16>(sk, SKC_FAMILY)?;
    if family != AF_INET && family != AF_INET6 {
        return None;
    }
    if FILTER_NETNS.load() != 0 {
        // Only this node's pods' sockets (lab nodes share one kernel).
        if OFFSETS_READY.load() == 0 {
            return None;
        }
        let net: *const u8 = at(sk, SOCK_NET.load())?;
        let inum: u32 = at(net, NET_NS_INUM.load())?;
        // SAFETY: read-only lookup.
        unsafe { NETNS_ALLOW.get(&inum) }?;
    }
    let mut key = FlowKey {
        src_port: at::<u16>(sk, SKC_NUM)?,
        dst_port: u16::from_be(at::<u16>(sk, SKC_DPORT)?),
        proto: IPPROTO_TCP,
        ip_version: IP_V4,
        ..FlowKey::default()
    };
    if family == AF_INET6 {
        let (daddr, saddr) = (SKC_V6_DADDR.load(), SKC_V6_RCV_SADDR.load());
        if daddr == 0 || saddr == 0 {
            return None;
        }
        // SAFETY: bpf_probe_read_kernel faults safely on a bad address.
        unsafe { bpf_probe_read_kernel_buf(sk.wrapping_add(daddr as usize), &mut key.dst_addr) }
            .ok()?;
        if v4_mapped(&key.dst_addr) {
            // tcp_v6_connect hands a v4-mapped peer to tcp_v4_connect, which
            // fills the IPv4 fields read below.
            key.dst_addr = [0; 16];
        } else {
            // SAFETY: as above.
            unsafe {
                bpf_probe_read_kernel_buf(sk.wrapping_add(saddr as usize), &mut key.src_addr)
            }
            .ok()?;
            key.ip_version = IP_V6;
        }
    }
    if key.ip_version == IP_V4 {
        key.src_addr[..4].copy_from_slice(&at::<[u8; 4]>(sk, SKC_RCV_SADDR)?);
        key.dst_addr[..4].copy_from_slice(&at::<[u8; 4]>(sk, SKC_DADDR)?);
    }
    // SAFETY: read of a plain value; the entry may go meanwhile, then the
    // settle below finds nothing.
    let p = unsafe { PENDING.get(&key) }?;
    let (ifindex, direction) = (p.ifindex, p.direction);
    match refusal {
        None => answered_on(ifindex, direction, &key),
        Some(kind) => refused_on(ifindex, direction, &key, kind, 0),
    }
    Some(())
}

/// `::ffff:a.b.c.d`.
#[inline(always)]
fn v4_mapped(a: &[u8; 16]) -> bool {
    let word = |i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    word(0) == 0 && word(4) == 0 && word(8) == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}
