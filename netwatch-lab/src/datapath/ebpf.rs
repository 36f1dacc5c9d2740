//! The eBPF datapath (Cilium, Calico eBPF): the lab's own TC programs on
//! each node enforce the NetworkPolicies and deliver into pods with
//! `bpf_redirect_peer`, so the host side of the destination veth never sees
//! the packet leave (its egress hook is bypassed, as with Cilium's host
//! routing and netkit).
//!
//! Policies come from [`enforce::compile_first_match`], the same independent
//! evaluation the nftables enforcer renders (never the agent's engine):
//! per pod and direction an ordered list of (peers, ports, action), the
//! Admin tier's rules (Allow, Deny, Pass) before the NetworkPolicies' or
//! the Baseline tier's. They are compiled into straight-line compares, the
//! first match jumping to its action: no loops, forward jumps only, no
//! unreachable instruction, so every verifier from 5.10 accepts them. The programs are hand-assembled
//! and loaded with raw `bpf(2)` calls, as the stand-in in [`super::super::tcprog`].
//!
//! Per node, four programs share the connection tables (LRU hashes of
//! 5-tuples, one per address family: policies are stateful, replies and
//! established flows pass):
//!
//! - **from-pod**, tc ingress of every pod's host veth: the source pod's
//!   egress policy, then (to a local pod) the destination's ingress policy,
//!   then `bpf_redirect_peer` into the destination pod; to anything else,
//!   up the stack (`TC_ACT_OK`). Traffic to a Service's cluster IP goes up
//!   the stack unjudged and marked: its DNAT is the node's netfilter
//!   (services.rs) and a redirect would skip it; it is judged after DNAT.
//! - **to-pod**, tc egress of every pod's host veth: what reached a pod
//!   through the stack (after a Service's DNAT, or from the node itself,
//!   which is not policed unless `police_host_to_pod`).
//! - **uplink-in**, tc ingress of the node's uplink: traffic from other nodes
//!   and the world to local pods: their ingress policy, then
//!   `bpf_redirect_peer`.
//! - **uplink-out**, tc egress of the uplink: marked Service traffic leaving
//!   the node after DNAT: the source pod's egress policy.
//!
//! Denied packets end with `TC_ACT_SHOT` (the kernel's drop reason
//! `TC_INGRESS` / `TC_EGRESS`). IPv6 is judged and delivered as IPv4 is
//! (a transport header right after the IPv6 header; extension headers are
//! not followed), its neighbour discovery and multicast listener messages
//! pass unjudged, as ARP does. ICMP errors pass as related.
//! Connections replied to through the stack (Service traffic) keep going
//! through it, so the node un-DNATs their replies.

use std::{
    ffi::CString,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    process::Command,
};

use serde::{Deserialize, Serialize};

use std::process::Stdio;

use super::super::{
    ChildGuard, Direction, EnforceOptions, Lab, LabCluster, LabError,
    enforce::{self, Action, FirstMatch, L4, MatchRule, PodFirstMatch},
    services,
    tcprog::{self, TcMode},
};

/// Errors building or attaching the datapath's programs.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("bpf({what}): {source}")]
    Bpf {
        what: String,
        source: std::io::Error,
    },
    #[error("the verifier rejected the {hook} program: {source}\n{log}")]
    Verifier {
        hook: &'static str,
        source: std::io::Error,
        log: String,
    },
    #[error("no interface {0} in this network namespace")]
    NoInterface(String),
    #[error("tc on {interface}: {detail}")]
    Tc { interface: String, detail: String },
}

/// `skb->mark` bit of Service traffic sent up the stack unjudged.
pub const SERVICE_MARK: u32 = 0x0020_0000;
/// Program names, as `bpftool prog` and [`tcprog::programs_on`] list them.
pub const FROM_POD: &str = "lab_from_pod";
pub const TO_POD: &str = "lab_to_pod";
pub const UPLINK_IN: &str = "lab_uplink_in";
pub const UPLINK_OUT: &str = "lab_uplink_out";

/// One node's datapath: what the helper in the node's namespace loads.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NodeDatapath {
    /// The node's uplink interface.
    pub uplink: String,
    pub pods: Vec<PodRules>,
    /// Services' cluster IPs: their traffic goes through the stack.
    pub service_ips: Vec<IpAddr>,
    pub police_host_to_pod: bool,
}

/// A local pod's addresses and policy.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodRules {
    pub host_if: String,
    pub ip: Ipv4Addr,
    #[serde(default)]
    pub ipv6: Option<Ipv6Addr>,
    /// `None`: not policed in that direction.
    pub ingress: Option<Judge>,
    pub egress: Option<Judge>,
}

/// A pod's policy in one direction as the program compares it: the
/// first matching rule decides ([`enforce::FirstMatch`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Judge {
    /// The Admin tier: Allow, Deny, or Pass (on to `below`).
    pub admin: Vec<Rule>,
    /// NetworkPolicies' allows or the Baseline tier.
    pub below: Vec<Rule>,
    pub otherwise: Action,
}

/// One rule.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Rule {
    pub peers: Vec<(IpAddr, u8)>,
    pub except: Vec<(IpAddr, u8)>,
    /// (IP protocol, first port, last port); `None`: everything.
    pub ports: Option<(u8, u16, u16)>,
    pub action: Action,
}

impl PodRules {
    /// From the enforcer's evaluation; a pod without an IPv4 address has
    /// nothing this datapath polices.
    pub fn from_first_match(a: &PodFirstMatch) -> Option<PodRules> {
        let ip = a.ips.iter().find_map(|ip| match ip {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })?;
        let judge = |f: &Option<FirstMatch>| {
            f.as_ref().map(|f| Judge {
                admin: f.admin.iter().map(Rule::from_match).collect(),
                below: f.below.iter().map(Rule::from_match).collect(),
                otherwise: f.otherwise,
            })
        };
        Some(PodRules {
            host_if: a.host_if.clone(),
            ip,
            ipv6: a.ips.iter().find_map(|ip| match ip {
                IpAddr::V6(v6) => Some(*v6),
                IpAddr::V4(_) => None,
            }),
            ingress: judge(&a.ingress),
            egress: judge(&a.egress),
        })
    }

    /// What this pod's rules decide for a new connection in direction `d`
    /// whose other end is `peer`: the lists the programs are assembled
    /// from, read as the programs compare them.
    pub fn allows(&self, d: Direction, peer: IpAddr, protocol: L4, port: u16) -> bool {
        let judge = match d {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        };
        let Some(judge) = judge else {
            return true;
        };
        let packet = (u32::from(proto_number(protocol)) << 16) | u32::from(port);
        let first = |rules: &[Rule]| {
            rules
                .iter()
                .find(|r| r.matches(peer, packet))
                .map(|r| r.action)
        };
        let decided = match first(&judge.admin) {
            Some(Action::Pass) | None => first(&judge.below).unwrap_or(judge.otherwise),
            Some(action) => action,
        };
        // A Pass below the Admin tier allows, as the program treats it.
        decided != Action::Deny
    }
}

impl Rule {
    fn from_match(m: &MatchRule) -> Rule {
        let a = &m.matches;
        Rule {
            peers: a.peers.clone(),
            except: a.except.clone(),
            ports: a.ports.map(|(l4, lo, hi)| (proto_number(l4), lo, hi)),
            action: m.action,
        }
    }

    /// `packet`: protocol << 16 | destination port, as the program's
    /// register holds it.
    fn matches(&self, peer: IpAddr, packet: u32) -> bool {
        let inside = |(net, len): &(IpAddr, u8)| in_prefix(peer, *net, *len);
        let ports = self.ports.is_none_or(|(proto, lo, hi)| {
            let base = u32::from(proto) << 16;
            (base | u32::from(lo)..=base | u32::from(hi)).contains(&packet)
        });
        ports && !self.except.iter().any(inside) && self.peers.iter().any(inside)
    }
}

fn proto_number(l4: L4) -> u8 {
    match l4 {
        L4::Tcp => 6,
        L4::Udp => 17,
        L4::Sctp => 132,
    }
}

fn in_prefix(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(ip), IpAddr::V4(net)) => {
            let m = u32::from(prefix_mask(len));
            u32::from(ip) & m == u32::from(net) & m
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) => {
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len.min(128)))
            };
            u128::from(ip) & m == u128::from(net) & m
        }
        _ => false,
    }
}

/// The lists of every pod wired on `node`, as [`Lab::enforce`] loads them
/// there (without a lab: pure, for comparisons with the nftables chains).
pub fn compile(
    cluster: &LabCluster,
    node: &str,
    options: &EnforceOptions,
) -> Result<Vec<PodRules>, enforce::EnforceError> {
    Ok(enforce::compile_first_match(cluster, node, options)?
        .iter()
        .filter_map(PodRules::from_first_match)
        .collect())
}

// ---------------------------------------------------------------------------
// A small assembler: eBPF instructions with forward labels.

#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    dst: u8,
    src: u8,
    off: i16,
    imm: i32,
}

impl Insn {
    fn encode(self) -> u64 {
        u64::from(self.code)
            | u64::from(self.dst | (self.src << 4)) << 8
            | u64::from(self.off as u16) << 16
            | u64::from(self.imm as u32) << 32
    }
}

#[derive(Clone, Copy)]
struct Label(usize);

// Opcode parts (include/uapi/linux/bpf_common.h, bpf.h).
const LDX_W: u8 = 0x61;
const LDX_H: u8 = 0x69;
const LDX_B: u8 = 0x71;
const LDX_DW: u8 = 0x79;
const STX_W: u8 = 0x63;
const ST_DW: u8 = 0x7a;
const ALU: u8 = 0x04;
const ALU64: u8 = 0x07;
const JMP: u8 = 0x05;
const JMP32: u8 = 0x06;
const X: u8 = 0x08;
const ADD: u8 = 0x00;
const OR: u8 = 0x40;
const AND: u8 = 0x50;
const LSH: u8 = 0x60;
const RSH: u8 = 0x70;
const MOV: u8 = 0xb0;
const JA: u8 = 0x00;
const JEQ: u8 = 0x10;
const JGT: u8 = 0x20;
const JNE: u8 = 0x50;
const JLT: u8 = 0xa0;
const JSLT: u8 = 0xc0;
const EXIT: u8 = JMP | 0x90;
const LD_IMM64: u8 = 0x18;

// Helpers.
const MAP_LOOKUP_ELEM: i32 = 1;
const MAP_UPDATE_ELEM: i32 = 2;
const SKB_LOAD_BYTES: i32 = 26;
// ETH_P_IPV6 as skb->protocol reads (big-endian in a u32).
const PROTOCOL_IPV6: i32 = 0xdd86;
const REDIRECT_PEER: i32 = 155;

// struct __sk_buff offsets.
const SKB_MARK: i16 = 8;
const SKB_PROTOCOL: i16 = 16;
const SKB_INGRESS_IFINDEX: i16 = 36;

// Stack layout (offsets from r10).
const BUF: i16 = -96; // IPv4 header, 20 bytes
const PORTS: i16 = -72; // 4 bytes of L4 header (ports, or ICMP type/code)
const FWD: i16 = -64; // conntrack key of this packet, 16 bytes
const REV: i16 = -48; // and of its reply
const VAL: i16 = -16;
// IPv6: the header's first 8 bytes at FWD6 - 8, so that its addresses are
// the start of the conntrack key at FWD6 (source, destination, ports,
// protocol: 40 bytes); the reply's key at REV6.
const FWD6: i16 = -200;
const REV6: i16 = -160;

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const ETH_HLEN: i32 = 14;

#[derive(Default)]
struct Asm {
    insns: Vec<Insn>,
    labels: Vec<Option<usize>>,
    fixups: Vec<(usize, Label)>,
}

impl Asm {
    fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }
    fn bind(&mut self, l: Label) {
        self.labels[l.0] = Some(self.insns.len());
    }
    fn raw(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        self.insns.push(Insn {
            code,
            dst,
            src,
            off,
            imm,
        });
    }
    fn mov64(&mut self, dst: u8, src: u8) {
        self.raw(ALU64 | MOV | X, dst, src, 0, 0);
    }
    fn mov64_imm(&mut self, dst: u8, imm: i32) {
        self.raw(ALU64 | MOV, dst, 0, 0, imm);
    }
    fn mov32(&mut self, dst: u8, src: u8) {
        self.raw(ALU | MOV | X, dst, src, 0, 0);
    }
    fn alu32_imm(&mut self, op: u8, dst: u8, imm: i32) {
        self.raw(ALU | op, dst, 0, 0, imm);
    }
    fn alu32(&mut self, op: u8, dst: u8, src: u8) {
        self.raw(ALU | op | X, dst, src, 0, 0);
    }
    fn alu64_imm(&mut self, op: u8, dst: u8, imm: i32) {
        self.raw(ALU64 | op, dst, 0, 0, imm);
    }
    fn alu64(&mut self, op: u8, dst: u8, src: u8) {
        self.raw(ALU64 | op | X, dst, src, 0, 0);
    }
    fn ldx(&mut self, code: u8, dst: u8, src: u8, off: i16) {
        self.raw(code, dst, src, off, 0);
    }
    fn stx(&mut self, code: u8, dst: u8, off: i16, src: u8) {
        self.raw(code, dst, src, off, 0);
    }
    /// A jump to `to` if `dst op imm` (`class` JMP: 64-bit, JMP32: 32-bit).
    fn jmp_imm(&mut self, class: u8, op: u8, dst: u8, imm: i32, to: Label) {
        self.fixups.push((self.insns.len(), to));
        self.raw(class | op, dst, 0, 0, imm);
    }
    fn ja(&mut self, to: Label) {
        self.jmp_imm(JMP, JA, 0, 0, to);
    }
    fn call(&mut self, helper: i32) {
        self.raw(JMP | 0x80, 0, 0, 0, helper);
    }
    fn exit_with(&mut self, r0: i32) {
        self.mov64_imm(0, r0);
        self.raw(JMP | 0x90, 0, 0, 0, 0);
    }
    /// r`dst` = the map behind `fd` (two instructions).
    fn ld_map(&mut self, dst: u8, fd: RawFd) {
        self.raw(0x18, dst, 1, 0, fd);
        self.raw(0, 0, 0, 0, 0);
    }
    /// r`dst` = r10 + off.
    fn stack_ptr(&mut self, dst: u8, off: i16) {
        self.mov64(dst, 10);
        self.alu64_imm(ADD, dst, i32::from(off));
    }
    /// Whether any jump goes to `l`.
    fn used(&self, l: Label) -> bool {
        self.fixups.iter().any(|(_, to)| to.0 == l.0)
    }
    /// The program, without the instructions no path reaches (the
    /// verifier rejects them; a first-match list leaves some, e.g. the rules
    /// after one that matches everything).
    fn finish(mut self) -> Vec<u64> {
        let n = self.insns.len();
        let mut target = vec![None; n];
        for (at, l) in &self.fixups {
            target[*at] = Some(self.labels[l.0].unwrap_or(at + 1));
        }
        let mut reached = vec![false; n];
        let mut work = vec![0];
        while let Some(i) = work.pop() {
            if i >= n || reached[i] {
                continue;
            }
            reached[i] = true;
            let code = self.insns[i].code;
            if code == LD_IMM64 {
                // Two slots.
                if i + 1 < n {
                    reached[i + 1] = true;
                }
                work.push(i + 2);
                continue;
            }
            if code == EXIT {
                continue;
            }
            if let Some(t) = target[i] {
                work.push(t);
                if code == JMP | JA {
                    continue;
                }
            }
            work.push(i + 1);
        }
        let mut index = vec![0usize; n + 1];
        let mut kept = 0;
        for i in 0..n {
            index[i] = kept;
            kept += usize::from(reached[i]);
        }
        index[n] = kept;
        for i in 0..n {
            if let Some(t) = target[i] {
                self.insns[i].off = (index[t] as i64 - index[i] as i64 - 1) as i16;
            }
        }
        self.insns
            .into_iter()
            .zip(reached)
            .filter(|(_, r)| *r)
            .map(|(insn, _)| insn.encode())
            .collect()
    }
}

/// An address or mask as the program sees it: the packet's bytes read as a
/// native u32.
fn ne(ip: Ipv4Addr) -> i32 {
    u32::from_ne_bytes(ip.octets()) as i32
}

fn prefix_mask(len: u8) -> Ipv4Addr {
    Ipv4Addr::from(if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len.min(32)))
    })
}

/// Where a program sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    FromPod,
    ToPod,
    UplinkIn,
    UplinkOut,
}

impl Hook {
    fn name(self) -> &'static str {
        match self {
            Hook::FromPod => FROM_POD,
            Hook::ToPod => TO_POD,
            Hook::UplinkIn => UPLINK_IN,
            Hook::UplinkOut => UPLINK_OUT,
        }
    }
}

// Registers kept across helper calls.
const SKB: u8 = 6;
/// IPv4 addresses (IPv6's are on the stack, at the start of its key).
const SADDR: u8 = 7;
const DADDR: u8 = 8;
/// protocol << 16 | destination port (host order).
const PROTO_PORT: u8 = 9;

/// The address family a part of a program handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn of(ip: IpAddr) -> Family {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }
    fn host_len(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

/// One end of the packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Source,
    Destination,
}

/// Jump to `to` if the packet's `end` address lies in `net`/`len`; no code
/// for a prefix of the other family (it never matches).
fn jump_if_in(a: &mut Asm, f: Family, end: End, (net, len): (IpAddr, u8), to: Label) {
    if Family::of(net) != f {
        return;
    }
    if len == 0 {
        a.ja(to);
        return;
    }
    match net {
        IpAddr::V4(net) => {
            let reg = if end == End::Source { SADDR } else { DADDR };
            let m = ne(prefix_mask(len));
            a.mov32(1, reg);
            a.alu32_imm(AND, 1, m);
            a.jmp_imm(JMP32, JEQ, 1, ne(net) & m, to);
        }
        IpAddr::V6(net) => {
            // Word by word: every word but the last must be equal.
            let miss = a.label();
            let o = net.octets();
            let words = usize::from(len.min(128)).div_ceil(32);
            for i in 0..words {
                let bits = (usize::from(len) - 32 * i).min(32) as u8;
                let m = ne(prefix_mask(bits));
                let word = i32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
                a.ldx(LDX_W, 1, 10, v6_address(end) + 4 * i as i16);
                if bits < 32 {
                    a.alu32_imm(AND, 1, m);
                }
                if i + 1 < words {
                    a.jmp_imm(JMP32, JNE, 1, word & m, miss);
                } else {
                    a.jmp_imm(JMP32, JEQ, 1, word & m, to);
                }
            }
            a.bind(miss);
        }
    }
}

/// Jump to `to` unless the packet's `end` address is `ip`.
fn jump_unless(a: &mut Asm, end: End, ip: IpAddr, to: Label) {
    match ip {
        IpAddr::V4(v4) => {
            let reg = if end == End::Source { SADDR } else { DADDR };
            a.jmp_imm(JMP32, JNE, reg, ne(v4), to);
        }
        IpAddr::V6(v6) => {
            let o = v6.octets();
            for i in 0..4 {
                a.ldx(LDX_W, 1, 10, v6_address(end) + 4 * i as i16);
                let word = i32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
                a.jmp_imm(JMP32, JNE, 1, word, to);
            }
        }
    }
}

/// Where an IPv6 packet's address is: its conntrack key starts with the
/// source and destination as the header has them.
fn v6_address(end: End) -> i16 {
    match end {
        End::Source => FWD6,
        End::Destination => FWD6 + 16,
    }
}

impl PodRules {
    /// The pod's address in `f`, if it has one.
    fn address(&self, f: Family) -> Option<IpAddr> {
        match f {
            Family::V4 => Some(IpAddr::V4(self.ip)),
            Family::V6 => self.ipv6.map(IpAddr::V6),
        }
    }
}

/// The policy of every local pod in one direction, for packets of `f`.
/// Falls through when allowed, jumps to `drop` when not.
fn policy(a: &mut Asm, dp: &NodeDatapath, f: Family, ingress: bool, drop: Label) {
    let (local, peer) = if ingress {
        (End::Destination, End::Source)
    } else {
        (End::Source, End::Destination)
    };
    let allowed = a.label();
    for pod in &dp.pods {
        let Some(judge) = (if ingress { &pod.ingress } else { &pod.egress }) else {
            continue;
        };
        let Some(address) = pod.address(f) else {
            continue;
        };
        let next_pod = a.label();
        jump_unless(a, local, address, next_pod);
        let below = a.label();
        rules(a, f, &judge.admin, peer, [allowed, drop, below]);
        a.bind(below);
        rules(a, f, &judge.below, peer, [allowed, drop, allowed]);
        a.ja(match judge.otherwise {
            Action::Deny => drop,
            Action::Allow | Action::Pass => allowed,
        });
        a.bind(next_pod);
    }
    a.bind(allowed);
}

/// First match: each rule jumps to its action's label (`[allow, deny,
/// pass]`) when the packet's protocol, port and `peer` address match;
/// falls through when none does.
fn rules(a: &mut Asm, f: Family, rules: &[Rule], peer: End, [allow, deny, pass]: [Label; 3]) {
    let of_family = |l: &[(IpAddr, u8)]| -> Vec<(IpAddr, u8)> {
        l.iter()
            .copied()
            .filter(|(ip, _)| Family::of(*ip) == f)
            .collect()
    };
    for r in rules {
        let peers = of_family(&r.peers);
        if peers.is_empty() {
            continue;
        }
        let to = match r.action {
            Action::Allow => allow,
            Action::Deny => deny,
            Action::Pass => pass,
        };
        let next_rule = a.label();
        if let Some((proto, lo, hi)) = r.ports {
            let base = i32::from(proto) << 16;
            a.jmp_imm(JMP, JLT, PROTO_PORT, base | i32::from(lo), next_rule);
            a.jmp_imm(JMP, JGT, PROTO_PORT, base | i32::from(hi), next_rule);
        }
        for except in of_family(&r.except) {
            jump_if_in(a, f, peer, except, next_rule);
        }
        for p in peers {
            jump_if_in(a, f, peer, p, to);
            if p.1 == 0 {
                break;
            }
        }
        a.bind(next_rule);
    }
}

/// Read an IPv4 packet: addresses into `SADDR`/`DADDR`, `PROTO_PORT`, and
/// the conntrack keys of it and its reply at `FWD` and `REV`.
fn parse_v4(a: &mut Asm, pass: Label) {
    a.raw(ST_DW, 10, 0, PORTS, 0);
    a.mov64(1, SKB);
    a.mov64_imm(2, ETH_HLEN);
    a.stack_ptr(3, BUF);
    a.mov64_imm(4, 20);
    a.call(SKB_LOAD_BYTES);
    a.jmp_imm(JMP, JSLT, 0, 0, pass);
    a.ldx(LDX_W, SADDR, 10, BUF + 12);
    a.ldx(LDX_W, DADDR, 10, BUF + 16);
    a.ldx(LDX_B, PROTO_PORT, 10, BUF + 9);
    // The L4 header: after the IPv4 header's ihl words.
    a.ldx(LDX_B, 2, 10, BUF);
    a.alu32_imm(AND, 2, 0x0f);
    a.alu32_imm(LSH, 2, 2);
    a.alu32_imm(ADD, 2, ETH_HLEN);
    load_ports(a, [6, 17, 132, 1]);
    // Conntrack keys: saddr, daddr, ports (as on the wire), protocol.
    a.stx(STX_W, 10, FWD, SADDR);
    a.stx(STX_W, 10, FWD + 4, DADDR);
    a.ldx(LDX_W, 1, 10, PORTS);
    a.stx(STX_W, 10, FWD + 8, 1);
    a.mov64(2, PROTO_PORT);
    a.alu64_imm(RSH, 2, 16);
    a.stx(STX_W, 10, FWD + 12, 2);
    a.stx(STX_W, 10, REV, DADDR);
    a.stx(STX_W, 10, REV + 4, SADDR);
    swap_ports(a);
    a.stx(STX_W, 10, REV + 8, 1);
    a.stx(STX_W, 10, REV + 12, 2);
}

/// Read an IPv6 packet (no extension headers: the next header is the
/// transport): the header's addresses land at `FWD6` as the start of its
/// conntrack key, then `PROTO_PORT` and the reply's key at `REV6`.
fn parse_v6(a: &mut Asm, pass: Label) {
    a.raw(ST_DW, 10, 0, PORTS, 0);
    a.mov64(1, SKB);
    a.mov64_imm(2, ETH_HLEN);
    a.stack_ptr(3, FWD6 - 8);
    a.mov64_imm(4, 40);
    a.call(SKB_LOAD_BYTES);
    a.jmp_imm(JMP, JSLT, 0, 0, pass);
    a.ldx(LDX_B, PROTO_PORT, 10, FWD6 - 8 + 6);
    a.mov64_imm(2, ETH_HLEN + 40);
    load_ports(a, [6, 17, 132, 58]);
    a.ldx(LDX_W, 1, 10, PORTS);
    a.stx(STX_W, 10, FWD6 + 32, 1);
    a.mov64(2, PROTO_PORT);
    a.alu64_imm(RSH, 2, 16);
    a.stx(STX_W, 10, FWD6 + 36, 2);
    for i in 0..4 {
        a.ldx(LDX_W, 3, 10, FWD6 + 16 + 4 * i);
        a.stx(STX_W, 10, REV6 + 4 * i, 3);
        a.ldx(LDX_W, 3, 10, FWD6 + 4 * i);
        a.stx(STX_W, 10, REV6 + 16 + 4 * i, 3);
    }
    swap_ports(a);
    a.stx(STX_W, 10, REV6 + 32, 1);
    a.stx(STX_W, 10, REV6 + 36, 2);
}

/// `PORTS` = the first 4 bytes of the transport header at offset r2 for
/// the `protocols` (in `PROTO_PORT`, still the bare protocol), then
/// `PROTO_PORT` = protocol << 16 | destination port.
fn load_ports(a: &mut Asm, protocols: [i32; 4]) {
    let load = a.label();
    let done = a.label();
    for proto in protocols {
        a.jmp_imm(JMP, JEQ, PROTO_PORT, proto, load);
    }
    a.ja(done);
    a.bind(load);
    a.mov64(1, SKB);
    a.stack_ptr(3, PORTS);
    a.mov64_imm(4, 4);
    // On failure the helper zeroes the buffer: ports 0.
    a.call(SKB_LOAD_BYTES);
    a.bind(done);
    a.ldx(LDX_H, 1, 10, PORTS + 2);
    a.raw(ALU | 0xd0 | 0x08, 1, 0, 0, 16); // be16: to host order
    a.alu64_imm(LSH, PROTO_PORT, 16);
    a.alu64(OR, PROTO_PORT, 1);
}

/// r1 = the ports word of the reply (source and destination swapped), from
/// `PORTS`; r2 keeps the protocol.
fn swap_ports(a: &mut Asm) {
    a.ldx(LDX_W, 1, 10, PORTS);
    a.mov32(3, 1);
    a.alu32_imm(RSH, 3, 16);
    a.alu32_imm(LSH, 1, 16);
    a.alu32(OR, 1, 3);
}

/// The program for `hook`, using the conntrack maps `ct` (IPv4, IPv6) and
/// the pods' host interfaces' indexes (`ifindexes[i]` for `dp.pods[i]`).
fn program(hook: Hook, dp: &NodeDatapath, ct: [RawFd; 2], ifindexes: &[u32]) -> Vec<u64> {
    let mut a = Asm::default();
    let pass = a.label();
    let drop = a.label();
    a.mov64(SKB, 1);
    if hook == Hook::UplinkOut {
        // Direct traffic was judged at the pod's veth; only Service traffic
        // (judged after DNAT) is left.
        a.ldx(LDX_W, 1, SKB, SKB_MARK);
        a.alu32_imm(AND, 1, SERVICE_MARK as i32);
        a.jmp_imm(JMP32, JEQ, 1, 0, pass);
    }
    // skb->protocol is big-endian: 0x0800 reads 0x0008.
    let v6 = a.label();
    a.ldx(LDX_W, 1, SKB, SKB_PROTOCOL);
    a.jmp_imm(JMP32, JEQ, 1, PROTOCOL_IPV6, v6);
    a.jmp_imm(JMP32, JNE, 1, 0x0008, pass);
    parse_v4(&mut a, pass);
    judge(&mut a, hook, dp, Family::V4, ct[0], ifindexes, [pass, drop]);
    a.bind(v6);
    parse_v6(&mut a, pass);
    judge(&mut a, hook, dp, Family::V6, ct[1], ifindexes, [pass, drop]);
    a.bind(pass);
    a.exit_with(TC_ACT_OK);
    if a.used(drop) {
        a.bind(drop);
        a.exit_with(TC_ACT_SHOT);
    }
    a.finish()
}

/// A parsed packet of `f`: conntrack, policy, delivery. Ends in a jump to
/// `pass` or `drop` or an exit.
fn judge(
    a: &mut Asm,
    hook: Hook,
    dp: &NodeDatapath,
    f: Family,
    ct: RawFd,
    ifindexes: &[u32],
    [pass, drop]: [Label; 2],
) {
    let deliver = a.label();
    let established = a.label();
    let related = a.label();
    let allowed = a.label();
    let delivers = matches!(hook, Hook::FromPod | Hook::UplinkIn);
    let (fwd, rev) = match f {
        Family::V4 => (FWD, REV),
        Family::V6 => (FWD6, REV6),
    };
    for key in [fwd, rev] {
        a.ld_map(1, ct);
        a.stack_ptr(2, key);
        a.call(MAP_LOOKUP_ELEM);
        a.jmp_imm(JMP, JNE, 0, 0, established);
    }
    // ICMP errors belong to the connection they answer: related, as
    // nftables' ct state says. IPv6's neighbour discovery and multicast
    // listener messages are the link's own: never policed.
    let not_icmp = a.label();
    a.mov64(1, PROTO_PORT);
    a.alu64_imm(RSH, 1, 16);
    let (icmp, errors, link): (i32, &[i32], &[i32]) = match f {
        // Unreachable, time exceeded, parameter problem.
        Family::V4 => (1, &[3, 11, 12], &[]),
        // Unreachable, too big, time exceeded, parameter problem; MLD
        // (130-132, 143) and NDP (133-137).
        Family::V6 => (
            58,
            &[1, 2, 3, 4],
            &[130, 131, 132, 133, 134, 135, 136, 137, 143],
        ),
    };
    a.jmp_imm(JMP, JNE, 1, icmp, not_icmp);
    a.ldx(LDX_B, 1, 10, PORTS);
    for ty in errors {
        a.jmp_imm(JMP, JEQ, 1, *ty, related);
    }
    for ty in link {
        a.jmp_imm(JMP, JEQ, 1, *ty, pass);
    }
    a.bind(not_icmp);

    // New traffic: judge it. The conntrack value says how replies travel:
    // 0 redirected into the pod, 1 through the stack.
    let services: Vec<IpAddr> = dp
        .service_ips
        .iter()
        .copied()
        .filter(|ip| Family::of(*ip) == f)
        .collect();
    let through_stack = match hook {
        Hook::FromPod => {
            let to_service = a.label();
            for vip in &services {
                jump_if_in(a, f, End::Destination, (*vip, f.host_len()), to_service);
            }
            policy(a, dp, f, false, drop);
            policy(a, dp, f, true, drop);
            if a.used(to_service) {
                a.ja(allowed);
                // Service traffic goes up the stack for the node's DNAT (a
                // redirect here would skip it), marked to be judged after it.
                a.bind(to_service);
                a.ldx(LDX_W, 1, SKB, SKB_MARK);
                a.alu32_imm(OR, 1, SERVICE_MARK as i32);
                a.stx(STX_W, SKB, SKB_MARK, 1);
                a.ja(pass);
            }
            0
        }
        Hook::UplinkIn => {
            policy(a, dp, f, true, drop);
            0
        }
        Hook::ToPod => {
            // A Service's reply, un-DNATed by the node: its connection was
            // judged after DNAT, under the backend's address.
            for vip in &services {
                jump_if_in(a, f, End::Source, (*vip, f.host_len()), pass);
            }
            if !dp.police_host_to_pod {
                // Sent by the node itself (no input interface): the API lets
                // a pod's node reach it.
                a.ldx(LDX_W, 1, SKB, SKB_INGRESS_IFINDEX);
                a.jmp_imm(JMP32, JEQ, 1, 0, pass);
            }
            let ingress = a.label();
            a.ldx(LDX_W, 1, SKB, SKB_MARK);
            a.alu32_imm(AND, 1, SERVICE_MARK as i32);
            a.jmp_imm(JMP32, JEQ, 1, 0, ingress);
            policy(a, dp, f, false, drop);
            a.bind(ingress);
            policy(a, dp, f, true, drop);
            1
        }
        Hook::UplinkOut => {
            policy(a, dp, f, false, drop);
            1
        }
    };
    a.bind(allowed);
    a.raw(ST_DW, 10, 0, VAL, through_stack);
    a.ld_map(1, ct);
    a.stack_ptr(2, fwd);
    a.stack_ptr(3, VAL);
    a.mov64_imm(4, 0);
    a.call(MAP_UPDATE_ELEM);
    if delivers && through_stack == 0 {
        a.ja(deliver);
    } else {
        a.ja(pass);
    }

    a.bind(established);
    if !delivers {
        a.bind(related);
        a.ja(pass);
        return;
    }
    a.ldx(LDX_DW, 1, 0, 0);
    a.jmp_imm(JMP, JNE, 1, 0, pass);
    a.bind(related);
    // Into a local pod's namespace directly: the host side's egress hook
    // never sees it. No MAC rewrite is needed: the packet arrived addressed
    // to this host (PACKET_HOST) and keeps that type.
    a.bind(deliver);
    for (pod, ifindex) in dp.pods.iter().zip(ifindexes) {
        let Some(address) = pod.address(f) else {
            continue;
        };
        let next = a.label();
        jump_unless(a, End::Destination, address, next);
        a.mov64_imm(1, *ifindex as i32);
        a.mov64_imm(2, 0);
        a.call(REDIRECT_PEER);
        a.raw(JMP | 0x90, 0, 0, 0, 0);
        a.bind(next);
    }
    a.ja(pass);
}

// ---------------------------------------------------------------------------
// Loading and attaching (in the node's network namespace).

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;

fn bpf(cmd: libc::c_long, attr: &mut [u8], what: &str) -> Result<OwnedFd, EbpfError> {
    let fd = tcprog::bpf(cmd, attr).map_err(|source| EbpfError::Bpf {
        what: what.into(),
        source,
    })?;
    // SAFETY: a new fd from the kernel that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// A connection table: `key_size` 16 (IPv4) or 40 (IPv6).
fn conntrack_map(name: &str, key_size: u32) -> Result<OwnedFd, EbpfError> {
    let mut attr = [0u8; 72];
    tcprog::put32(&mut attr, 0, BPF_MAP_TYPE_LRU_HASH);
    tcprog::put32(&mut attr, 4, key_size);
    tcprog::put32(&mut attr, 8, 8);
    tcprog::put32(&mut attr, 12, 65536);
    let n = name.len().min(15);
    attr[28..28 + n].copy_from_slice(&name.as_bytes()[..n]);
    bpf(BPF_MAP_CREATE, &mut attr, &format!("map create {name}"))
}

fn load(hook: Hook, insns: &[u64]) -> Result<OwnedFd, EbpfError> {
    let license = CString::new("GPL").unwrap_or_default();
    let mut log = vec![0u8; 1 << 20];
    let attempt = |log_level: u32, log: &mut [u8]| {
        let mut attr = [0u8; 128];
        tcprog::put32(&mut attr, 0, BPF_PROG_TYPE_SCHED_CLS);
        tcprog::put32(&mut attr, 4, insns.len() as u32);
        tcprog::put64(&mut attr, 8, insns.as_ptr() as u64);
        tcprog::put64(&mut attr, 16, license.as_ptr() as u64);
        if log_level > 0 {
            tcprog::put32(&mut attr, 24, log_level);
            tcprog::put32(&mut attr, 28, log.len() as u32);
            tcprog::put64(&mut attr, 32, log.as_mut_ptr() as u64);
        }
        let name = hook.name().as_bytes();
        attr[48..48 + name.len().min(15)].copy_from_slice(&name[..name.len().min(15)]);
        tcprog::bpf(BPF_PROG_LOAD, &mut attr)
    };
    match attempt(0, &mut log) {
        // SAFETY: a new fd from the kernel.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }),
        Err(source) => {
            let _ = attempt(1, &mut log);
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            Err(EbpfError::Verifier {
                hook: hook.name(),
                source,
                log: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            })
        }
    }
}

fn ifindex(interface: &str) -> Result<u32, EbpfError> {
    let c = CString::new(interface).map_err(|_| EbpfError::NoInterface(interface.into()))?;
    // SAFETY: a valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        return Err(EbpfError::NoInterface(interface.into()));
    }
    Ok(i)
}

/// The node's programs, attached: tcx links live as long as this value;
/// clsact filters until replaced or the interface goes.
pub struct Attached {
    _fds: Vec<OwnedFd>,
}

/// Build `dp`'s programs and attach them in this network namespace: after
/// programs already there (as a CNI that started first or later would be),
/// replacing this lab's earlier ones on clsact.
pub fn attach(dp: &NodeDatapath, mode: TcMode) -> Result<Attached, EbpfError> {
    let ct = conntrack_map("lab_ct", 16)?;
    let ct6 = conntrack_map("lab_ct6", 40)?;
    let ifindexes = dp
        .pods
        .iter()
        .map(|p| ifindex(&p.host_if))
        .collect::<Result<Vec<_>, _>>()?;
    let mut fds = Vec::new();
    let pods: Vec<(u32, &str)> = ifindexes
        .iter()
        .zip(&dp.pods)
        .map(|(i, p)| (*i, p.host_if.as_str()))
        .collect();
    let uplink = [(ifindex(&dp.uplink)?, dp.uplink.as_str())];
    // (program, where, on ingress)
    let places = [
        (Hook::FromPod, pods.as_slice(), true),
        (Hook::ToPod, pods.as_slice(), false),
        (Hook::UplinkIn, uplink.as_slice(), true),
        (Hook::UplinkOut, uplink.as_slice(), false),
    ];
    for (hook, interfaces, ingress) in places {
        let maps = [ct.as_raw_fd(), ct6.as_raw_fd()];
        let prog = load(hook, &program(hook, dp, maps, &ifindexes))?;
        for (index, name) in interfaces {
            fds.extend(attach_one(&prog, *index, name, ingress, hook, mode)?);
        }
        fds.push(prog);
    }
    fds.push(ct);
    fds.push(ct6);
    Ok(Attached { _fds: fds })
}

const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

fn attach_one(
    prog: &OwnedFd,
    index: u32,
    interface: &str,
    ingress: bool,
    hook: Hook,
    mode: TcMode,
) -> Result<Vec<OwnedFd>, EbpfError> {
    match mode {
        TcMode::Tcx => {
            let mut attr = [0u8; 64];
            tcprog::put32(&mut attr, 0, prog.as_raw_fd() as u32);
            tcprog::put32(&mut attr, 4, index);
            tcprog::put32(
                &mut attr,
                8,
                if ingress {
                    BPF_TCX_INGRESS
                } else {
                    BPF_TCX_EGRESS
                },
            );
            Ok(vec![bpf(
                BPF_LINK_CREATE,
                &mut attr,
                &format!("tcx attach {} on {interface}", hook.name()),
            )?])
        }
        TcMode::Clsact => {
            let tc_err = |detail: String| EbpfError::Tc {
                interface: interface.into(),
                detail,
            };
            tcprog::private_bpffs().map_err(|e| tc_err(e.to_string()))?;
            let pin = format!(
                "/sys/fs/bpf/netwatch-lab-{}-{}-{interface}",
                std::process::id(),
                hook.name()
            );
            let path = CString::new(pin.clone()).map_err(|e| tc_err(e.to_string()))?;
            let mut attr = [0u8; 32];
            tcprog::put64(&mut attr, 0, path.as_ptr() as u64);
            tcprog::put32(&mut attr, 8, prog.as_raw_fd() as u32);
            tcprog::bpf(6, &mut attr).map_err(|e| tc_err(format!("pinning at {pin}: {e}")))?;
            let _ = Command::new("tc")
                .args(["qdisc", "add", "dev", interface, "clsact"])
                .output();
            let dir = if ingress { "ingress" } else { "egress" };
            // Priority 1, handle 1: where Cilium's filters sit; `replace`
            // swaps this lab's earlier program in one step.
            let out = Command::new("tc")
                .args([
                    "filter",
                    "replace",
                    "dev",
                    interface,
                    dir,
                    "prio",
                    "1",
                    "handle",
                    "1",
                    "bpf",
                    "object-pinned",
                    &pin,
                    "da",
                ])
                .output()
                .map_err(|e| tc_err(e.to_string()));
            let _ = std::fs::remove_file(&pin);
            let out = out?;
            if !out.status.success() {
                return Err(tc_err(
                    String::from_utf8_lossy(&out.stderr).trim().to_string(),
                ));
            }
            Ok(Vec::new())
        }
    }
}

// ---------------------------------------------------------------------------
// The lab's side: what each node loads, through `netwatch-lab
// ebpf-datapath` in the node's namespace (tcx links live with it).

impl Lab {
    /// The node's pods with no policy: the datapath before enforcement.
    fn ebpf_unpoliced(&self, node: &str) -> Result<NodeDatapath, LabError> {
        let n = self.node(node)?;
        Ok(NodeDatapath {
            uplink: UPLINK.into(),
            pods: self
                .pods
                .iter()
                .filter(|p| p.spec.node == n.name && !p.host_if.is_empty())
                .map(|p| PodRules {
                    host_if: p.host_if.clone(),
                    ip: p.spec.ip,
                    ipv6: p.spec.ipv6,
                    ingress: None,
                    egress: None,
                })
                .collect(),
            service_ips: Vec::new(),
            police_host_to_pod: false,
        })
    }

    /// Wire every node's datapath, policing nothing yet: present before
    /// any agent starts.
    pub(crate) fn ebpf_wire(&self) -> Result<(), LabError> {
        for n in &self.nodes {
            let dp = self.ebpf_unpoliced(&n.name)?;
            self.ebpf_load(&n.name, &dp)?;
        }
        Ok(())
    }

    /// Compile `cluster`'s policies for every node and swap them in.
    pub(crate) fn ebpf_enforce(
        &self,
        cluster: &LabCluster,
        options: &EnforceOptions,
    ) -> Result<(), LabError> {
        let mut service_ips: Vec<IpAddr> = services::frontends(cluster)
            .map_err(|e| LabError::Spec(e.to_string()))?
            .into_iter()
            .map(|f| f.ip)
            .collect();
        service_ips.sort();
        service_ips.dedup();
        let mut nodes = Vec::new();
        for n in &self.nodes {
            let compiled =
                compile(cluster, &n.name, options).map_err(|e| LabError::Spec(e.to_string()))?;
            let mut dp = self.ebpf_unpoliced(&n.name)?;
            for p in &mut dp.pods {
                if let Some(rules) = compiled.iter().find(|c| c.host_if == p.host_if).cloned() {
                    p.ingress = rules.ingress;
                    p.egress = rules.egress;
                }
            }
            dp.service_ips = service_ips.clone();
            dp.police_host_to_pod = options.police_host_to_pod;
            nodes.push((n.name.clone(), dp));
        }
        for (node, dp) in nodes {
            self.ebpf_load(&node, &dp)?;
        }
        Ok(())
    }

    /// Police nothing on `node` (its policy agent is not running).
    pub(crate) fn ebpf_stop_enforcing(&self, node: &str) -> Result<(), LabError> {
        let dp = self.ebpf_unpoliced(node)?;
        self.ebpf_load(node, &dp)
    }

    /// Load `dp` on `node`, replacing what was there.
    fn ebpf_load(&self, node: &str, dp: &NodeDatapath) -> Result<(), LabError> {
        use std::io::BufRead;
        let mode = if super::super::kernel_version() >= (6, 6) {
            "tcx"
        } else {
            "clsact"
        };
        let json = serde_json::to_string(dp).map_err(|e| LabError::Spec(e.to_string()))?;
        let mut cmd = self.on_node(node, &self.helper)?;
        cmd.args(["ebpf-datapath", "--mode", mode, "--json", &json])
            .stdout(Stdio::piped())
            .stdin(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| LabError::Spec(format!("netwatch-lab ebpf-datapath: {e}")))?;
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = std::io::BufReader::new(out).read_line(&mut line);
        }
        if line.trim() != "attached" {
            let _ = child.kill();
            let _ = child.wait();
            return Err(LabError::Spec(format!(
                "the eBPF datapath did not attach on node {node} (see the error above)"
            )));
        }
        // The new programs run; the old ones (tcx links held by the old
        // helper) go with it.
        let old = self
            .ebpf
            .lock()
            .map_err(|_| LabError::Spec("eBPF datapath holder poisoned".into()))?
            .insert(node.to_string(), ChildGuard(child));
        drop(old);
        Ok(())
    }
}

/// The node's uplink, as the lab names it.
const UPLINK: &str = "uplink0";

/// `netwatch-lab ebpf-datapath`: attach, say `attached`, hold the links
/// until stdin closes.
pub fn helper(mode: TcMode, json: &str) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let dp: NodeDatapath = serde_json::from_str(json)?;
    // Before 5.11 maps and programs are charged to RLIMIT_MEMLOCK (64 KiB
    // by default), which the connection table alone exceeds.
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct it is given; no other effect.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        eprintln!(
            "lab: cannot lift RLIMIT_MEMLOCK ({}); kernels before 5.11 may refuse the datapath's maps",
            std::io::Error::last_os_error()
        );
    }
    let held = attach(&dp, mode)?;
    println!("attached");
    std::io::stdout().flush()?;
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    drop(held);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dp() -> NodeDatapath {
        NodeDatapath {
            uplink: "uplink0".into(),
            pods: vec![PodRules {
                host_if: "cali0".into(),
                ip: "10.244.1.2".parse().unwrap(),
                ipv6: Some("fd00:244:1::2".parse().unwrap()),
                ingress: Some(Judge {
                    admin: vec![
                        rule("10.244.7.0/24", Some((6, 80, 80)), Action::Deny),
                        rule("10.244.8.0/24", None, Action::Pass),
                        rule("10.244.0.0/16", Some((17, 53, 53)), Action::Allow),
                        rule("fd00:244:7::/48", None, Action::Deny),
                        rule("fd00:244:8::/48", Some((6, 80, 80)), Action::Allow),
                    ],
                    below: vec![Rule {
                        peers: vec![("10.244.0.0".parse().unwrap(), 16)],
                        except: vec![("10.244.9.0".parse().unwrap(), 24)],
                        ports: Some((6, 80, 80)),
                        action: Action::Allow,
                    }],
                    otherwise: Action::Deny,
                }),
                egress: Some(Judge {
                    admin: Vec::new(),
                    // Everything after the first rule is unreachable.
                    below: vec![
                        rule("0.0.0.0/0", None, Action::Deny),
                        rule("10.0.0.0/8", None, Action::Allow),
                    ],
                    otherwise: Action::Allow,
                }),
            }],
            service_ips: vec!["10.96.0.10".parse().unwrap()],
            police_host_to_pod: false,
        }
    }

    fn rule(cidr: &str, ports: Option<(u8, u16, u16)>, action: Action) -> Rule {
        let (net, len) = cidr.split_once('/').unwrap();
        Rule {
            peers: vec![(net.parse().unwrap(), len.parse().unwrap())],
            except: Vec::new(),
            ports,
            action,
        }
    }

    #[test]
    fn the_first_matching_rule_decides_and_pass_goes_below_the_admin_tier() {
        let pod = &dp().pods[0];
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let ingress = |peer: &str, l4, port| pod.allows(Direction::Ingress, ip(peer), l4, port);
        // Denied by the Admin tier, although allowed below it.
        assert!(!ingress("10.244.7.5", L4::Tcp, 80));
        // Passed: the NetworkPolicy allow below decides.
        assert!(ingress("10.244.8.5", L4::Tcp, 80));
        assert!(!ingress("10.244.8.5", L4::Udp, 53), "passed, then isolated");
        // Allowed by the Admin tier, although isolated below it.
        assert!(ingress("10.244.1.9", L4::Udp, 53));
        assert!(!ingress("10.244.9.1", L4::Tcp, 80), "except");
        assert!(!ingress("192.0.2.1", L4::Tcp, 80));
        assert!(!pod.allows(Direction::Egress, ip("192.0.2.1"), L4::Tcp, 1));
        // IPv6 against the IPv6 rules only: the IPv4 ones never match it.
        assert!(!ingress("fd00:244:7::5", L4::Tcp, 80));
        assert!(ingress("fd00:244:8::5", L4::Tcp, 80));
        assert!(!ingress("fd00:244:8::5", L4::Tcp, 81), "isolated below");
        assert!(pod.allows(Direction::Egress, ip("2001:db8::1"), L4::Tcp, 1));
    }

    #[test]
    fn jumps_only_go_forward_and_land_inside_and_every_instruction_is_reached() {
        for hook in [Hook::FromPod, Hook::ToPod, Hook::UplinkIn, Hook::UplinkOut] {
            let p = program(hook, &dp(), [3, 4], &[7]);
            let mut reached = vec![false; p.len()];
            reached[0] = true;
            for (i, insn) in p.iter().enumerate() {
                let code = *insn as u8;
                let class = code & 0x07;
                let op = code & 0xf0;
                if !reached[i] {
                    panic!("{hook:?}: instruction {i} is unreachable");
                }
                if code == LD_IMM64 {
                    reached[i + 1] = true;
                    if i + 2 < p.len() {
                        reached[i + 2] = true;
                    }
                    continue;
                }
                if (class == JMP || class == JMP32) && op != 0x80 && op != 0x90 {
                    let off = (*insn >> 16) as u16 as i16;
                    assert!(off >= 0, "{hook:?}: backward jump at {i}");
                    let to = i + 1 + off as usize;
                    assert!(to < p.len(), "{hook:?}: jump out at {i}");
                    reached[to] = true;
                    if code == JMP | JA {
                        continue;
                    }
                }
                if code != EXIT && i + 1 < p.len() {
                    reached[i + 1] = true;
                }
            }
            // Ends in exit.
            assert_eq!(*p.last().unwrap() as u8, EXIT);
        }
    }

    #[test]
    fn addresses_compare_as_the_packet_bytes_read() {
        let ip: Ipv4Addr = "10.244.1.2".parse().unwrap();
        assert_eq!(ne(ip).to_ne_bytes(), [10, 244, 1, 2]);
        assert_eq!(
            (ne("10.244.9.77".parse().unwrap()) & ne(prefix_mask(24))).to_ne_bytes(),
            [10, 244, 9, 0]
        );
        assert_eq!(ne(prefix_mask(0)), 0);
    }
}
