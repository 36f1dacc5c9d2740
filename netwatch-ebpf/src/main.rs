//! netwatch's kernel programs: entry points only. Each hook's logic lives in
//! its own module; every map is in `maps`.
#![no_std]
#![no_main]
// BPF's `lock add` instruction, for exact counters shared between CPUs.
#![feature(asm_experimental_arch)]

mod atomic;
mod drops;
mod emit;
mod maps;
mod sockops;
mod sockstate;
mod tc;

use aya_ebpf::{
    macros::{btf_tracepoint, cgroup_sock_addr, classifier, sock_ops},
    programs::{BtfTracePointContext, SockAddrContext, SockOpsContext, TcContext},
};
use netwatch_common::direction;

/// TC ingress on the host side of a pod interface: packets leaving the pod.
#[classifier]
pub fn netwatch_from_pod(ctx: TcContext) -> i32 {
    tc::observe(&ctx, direction::FROM_POD)
}

/// TC egress on the host side of a pod interface: packets entering the pod.
#[classifier]
pub fn netwatch_to_pod(ctx: TcContext) -> i32 {
    tc::observe(&ctx, direction::TO_POD)
}

/// Every dropped skb, with the kernel's drop reason.
#[btf_tracepoint(function = "kfree_skb")]
pub fn netwatch_kfree_skb(ctx: BtfTracePointContext) -> i32 {
    drops::on_kfree_skb(&ctx);
    0
}

/// A socket's TCP state change: a connecting socket's handshake answered.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn netwatch_sock_state(ctx: BtfTracePointContext) -> i32 {
    sockstate::on_set_state(&ctx);
    0
}

/// A reset received: a connecting socket's handshake refused.
#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn netwatch_tcp_reset(ctx: BtfTracePointContext) -> i32 {
    sockstate::on_receive_reset(&ctx);
    0
}

/// TCP connect outcomes by socket and cgroup.
#[sock_ops]
pub fn netwatch_sock_ops(ctx: SockOpsContext) -> u32 {
    sockops::on_sock_ops(&ctx)
}

/// connect() on IPv4 sockets: the caller's cgroup, for sock_ops.
#[cgroup_sock_addr(connect4)]
pub fn netwatch_connect4(ctx: SockAddrContext) -> i32 {
    sockops::on_connect(&ctx)
}

/// connect() on IPv6 sockets: the caller's cgroup, for sock_ops.
#[cgroup_sock_addr(connect6)]
pub fn netwatch_connect6(ctx: SockAddrContext) -> i32 {
    sockops::on_connect(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// kfree_skb and bpf_probe_read_kernel need a GPL-compatible license.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
