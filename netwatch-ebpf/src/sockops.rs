//! `sock_ops` and cgroup `connect4`/`connect6` on the cgroup v2 root: the
//! outcome of every TCP connect() by socket, with the cgroup of the process
//! that called it. This is what names hostNetwork pods, which share the
//! node's IP.
//!
//! sock_ops may read the current task's cgroup only from Linux 6.4, so the
//! cgroup comes from the connect hooks instead, which run in the caller's
//! context on every kernel netwatch supports (5.8+): they remember it by
//! socket cookie, and sock_ops picks it up when the handshake starts. One
//! path on every kernel.

use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_get_socket_cookie, bpf_ktime_get_ns},
    programs::{SockAddrContext, SockOpsContext},
};
use netwatch_common::{FlowKey, IP_V4, IP_V6, IPPROTO_TCP, SockConn, event_kind, loss};

use crate::{
    emit,
    maps::{CONNECT_BY_COOKIE, CONNECT_CGROUPS, SOCKS, count_loss},
};

// UAPI values (include/uapi/linux/bpf.h, include/net/tcp_states.h).
const TCP_CONNECT_CB: u32 = 3;
const ACTIVE_ESTABLISHED_CB: u32 = 4;
const RTO_CB: u32 = 8;
const STATE_CB: u32 = 10;
const RTO_CB_FLAG: i32 = 1 << 0;
const STATE_CB_FLAG: i32 = 1 << 2;
const TCP_SYN_SENT: u32 = 2;
const TCP_CLOSE: u32 = 7;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// cgroup connect4/connect6: remember the caller's cgroup by socket cookie.
/// Always lets the connect proceed.
#[inline(always)]
pub fn on_connect(ctx: &SockAddrContext) -> i32 {
    // SAFETY: both helpers are allowed in cgroup sock_addr programs and take
    // the program's own context.
    let (cookie, cgroup) = unsafe {
        (
            bpf_get_socket_cookie(ctx.sock_addr.cast()),
            bpf_get_current_cgroup_id(),
        )
    };
    let _ = CONNECT_BY_COOKIE.insert(&cookie, &cgroup, 0);
    1
}

/// Entry point; always lets the socket operation proceed unchanged.
#[inline(always)]
pub fn on_sock_ops(ctx: &SockOpsContext) -> u32 {
    let _ = try_on_sock_ops(ctx);
    1
}

fn try_on_sock_ops(ctx: &SockOpsContext) -> Option<()> {
    let op = ctx.op();
    if op != TCP_CONNECT_CB && op != ACTIVE_ESTABLISHED_CB && op != RTO_CB && op != STATE_CB {
        return None;
    }
    let key = flow_of(ctx)?;
    match op {
        TCP_CONNECT_CB => {
            // Ask for retransmission-timeout and state-change callbacks.
            let _ = ctx.set_cb_flags(RTO_CB_FLAG | STATE_CB_FLAG);
            // SAFETY: the helper takes the program's own context.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
            // SAFETY: read-only lookup of a plain value.
            let cgroup_id = unsafe { CONNECT_BY_COOKIE.get(&cookie) }.copied().unwrap_or(0);
            let _ = CONNECT_BY_COOKIE.remove(&cookie);
            let conn = SockConn {
                cgroup_id,
                start_ns: unsafe { bpf_ktime_get_ns() },
                rto: 0,
                _pad: 0,
            };
            if SOCKS.insert(&key, &conn, 0).is_err() {
                count_loss(loss::TABLE_SOCKS);
            }
            let _ = CONNECT_CGROUPS.insert(&key, &conn.cgroup_id, 0);
        }
        ACTIVE_ESTABLISHED_CB => {
            let _ = SOCKS.remove(&key);
        }
        RTO_CB => {
            // SAFETY: reading a field of our own context.
            if unsafe { (*ctx.ops).state } != TCP_SYN_SENT {
                return None;
            }
            let p = SOCKS.get_ptr_mut(&key)?;
            // SAFETY: p points at a live map value.
            let conn = unsafe {
                (*p).rto += 1;
                *p
            };
            if conn.rto == 1 {
                send(&key, &conn, event_kind::SOCK_RETRANS);
            }
        }
        STATE_CB => {
            let (old, new) = (ctx.arg(0), ctx.arg(1));
            if new != TCP_CLOSE {
                return None;
            }
            let p = SOCKS.get_ptr(&key)?;
            // SAFETY: p points at a live map value.
            let conn = unsafe { *p };
            let _ = SOCKS.remove(&key);
            if old == TCP_SYN_SENT {
                send(&key, &conn, event_kind::SOCK_FAILED);
            }
        }
        _ => {}
    }
    Some(())
}

#[inline(always)]
fn send(key: &FlowKey, conn: &SockConn, kind: u8) {
    let now = unsafe { bpf_ktime_get_ns() };
    emit::send(loss::RINGBUF_SOCK, |e| {
        e.ts_ns = now;
        e.cgroup_id = conn.cgroup_id;
        e.flow = *key;
        e.count = conn.rto;
        e.kind = kind;
    });
}

/// The socket's flow, local end first. IPv4-mapped IPv6 becomes IPv4.
#[inline(always)]
fn flow_of(ctx: &SockOpsContext) -> Option<FlowKey> {
    let mut key = FlowKey {
        src_port: ctx.local_port() as u16,
        // remote_port is the big-endian port shifted into the upper half on
        // little-endian kernels (the kernel's ctx rewrite); reading the whole
        // u32 as big-endian yields the port on either endianness.
        dst_port: u32::from_be(ctx.remote_port()) as u16,
        proto: IPPROTO_TCP,
        ..FlowKey::default()
    };
    match ctx.family() {
        AF_INET => {
            key.ip_version = IP_V4;
            key.src_addr[..4].copy_from_slice(&ctx.local_ip4().to_ne_bytes());
            key.dst_addr[..4].copy_from_slice(&ctx.remote_ip4().to_ne_bytes());
        }
        AF_INET6 => {
            let (l, r) = (ctx.local_ip6(), ctx.remote_ip6());
            let mapped = |a: &[u32; 4]| a[0] == 0 && a[1] == 0 && a[2] == 0xffffu32.to_be();
            if mapped(&l) && mapped(&r) {
                key.ip_version = IP_V4;
                key.src_addr[..4].copy_from_slice(&l[3].to_ne_bytes());
                key.dst_addr[..4].copy_from_slice(&r[3].to_ne_bytes());
            } else {
                key.ip_version = IP_V6;
                for i in 0..4 {
                    key.src_addr[i * 4..i * 4 + 4].copy_from_slice(&l[i].to_ne_bytes());
                    key.dst_addr[i * 4..i * 4 + 4].copy_from_slice(&r[i].to_ne_bytes());
                }
            }
        }
        _ => return None,
    }
    Some(key)
}
