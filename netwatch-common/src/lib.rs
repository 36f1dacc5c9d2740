//! The kernel ABI of netwatch: keys, values and events that the eBPF programs
//! write and the agent reads.
//!
//! Every type here is `#[repr(C)]`, has explicit padding and no implicit holes,
//! so the two sides agree byte for byte. Multi-byte fields are in host byte
//! order unless a field's doc says otherwise; addresses are network-order bytes.
#![no_std]

/// IP version tag used in [`FlowKey::ip_version`].
pub const IP_V4: u8 = 4;
/// IP version tag used in [`FlowKey::ip_version`].
pub const IP_V6: u8 = 6;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_SCTP: u8 = 132;

/// TCP flag bits as they appear in the TCP header's flags byte.
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
    pub const ECE: u8 = 0x40;
    pub const CWR: u8 = 0x80;
}

/// One direction of one conversation: the 5-tuple plus the IP version.
///
/// IPv4 addresses occupy the first four bytes of the 16-byte fields; the rest
/// is zero. For ICMP and ICMPv6 the "ports" hold the message type
/// (`src_port`) and code (`dst_port`), so all echo requests between two hosts
/// aggregate into one flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub ip_version: u8,
    pub _pad: [u8; 2],
}

impl FlowKey {
    /// The same conversation seen from the other end.
    #[inline(always)]
    pub fn reversed(&self) -> FlowKey {
        FlowKey {
            src_addr: self.dst_addr,
            dst_addr: self.src_addr,
            src_port: self.dst_port,
            dst_port: self.src_port,
            proto: self.proto,
            ip_version: self.ip_version,
            _pad: [0; 2],
        }
    }
}

/// Key of the in-kernel drop table: a flow and the kernel's drop reason.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DropKey {
    pub flow: FlowKey,
    /// Numeric `enum skb_drop_reason` of the running kernel.
    pub reason: u32,
    pub _pad: u32,
}

/// Value of the in-kernel drop table: what one dropped flow cost so far.
/// Counters are updated with atomic adds, so they are exact.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropStats {
    pub packets: u64,
    pub bytes: u64,
    /// `bpf_ktime_get_ns()` of the first and the latest drop.
    pub first_ns: u64,
    pub last_ns: u64,
    /// Interface the skb was on when freed (0 when unknown).
    pub ifindex: u32,
    /// Inode number of the network namespace of that interface.
    pub netns: u32,
    /// The tunnel the packet was in when dropped (its first drop's), when
    /// it was an encapsulated pod packet; `flow` is then the inner one.
    pub outer: Outer,
    /// OR of the TCP flags of every dropped packet.
    pub tcp_flags: u8,
    pub _pad: [u8; 7],
}

/// How a pod packet was encapsulated between nodes ([`Outer::encap`]).
pub mod encap {
    /// Not encapsulated: the rest of [`super::Outer`] is zero.
    pub const NONE: u8 = 0;
    /// VXLAN over UDP 4789 (IANA) or 8472 (Linux's and flannel's default).
    pub const VXLAN: u8 = 1;
    /// Geneve over UDP 6081 (OVN-Kubernetes, Antrea, Cilium).
    pub const GENEVE: u8 = 2;
    /// IP in IP (protocol 4, Calico's IPIP mode) or IPv6 in IP (41).
    pub const IPIP: u8 = 3;
    /// UDP destination ports of the UDP encapsulations.
    pub const VXLAN_PORT: u16 = 4789;
    pub const VXLAN_LINUX_PORT: u16 = 8472;
    pub const GENEVE_PORT: u16 = 6081;
}

/// The outer header of an encapsulated packet: the nodes' addresses, and
/// the tunnel's protocol and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Outer {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    /// UDP destination port (VXLAN, Geneve); 0 for IPIP.
    pub dst_port: u16,
    /// IP protocol of the outer packet: 17 (UDP), 4 or 41 (IPIP).
    pub proto: u8,
    /// [`IP_V4`] or [`IP_V6`].
    pub ip_version: u8,
    /// One of [`encap`].
    pub encap: u8,
    pub _pad: [u8; 3],
}

/// Key of the drop aggregate, where drops go once the per-flow drop table
/// is full: a dropped flow without its source port (for ICMP: without its
/// type), and the drop reason. Every source, destination and port of a
/// flood is still told apart; only the source ports are summarised.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AggKey {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub dst_port: u16,
    pub proto: u8,
    pub ip_version: u8,
    pub reason: u32,
}

/// Value of the drop aggregate. Counters are updated with atomic adds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AggStats {
    pub packets: u64,
    pub bytes: u64,
    /// Distinct flows (source ports) counted here: a flow counts once while
    /// the kernel's recently-aggregated set (`AGG_SEEN`, LRU) remembers it.
    pub flows: u64,
    pub first_ns: u64,
    pub last_ns: u64,
    /// Interface and network namespace of the first drop.
    pub ifindex: u32,
    pub netns: u32,
    /// OR of the TCP flags of every dropped packet.
    pub tcp_flags: u8,
    pub _pad: [u8; 7],
}

/// What a pending handshake in [`PendingConn`] waits for.
pub mod pending_kind {
    /// A TCP SYN waiting for its SYN-ACK.
    pub const TCP_SYN: u8 = 1;
    /// A UDP query to port 53 waiting for a reply.
    pub const DNS_QUERY: u8 = 2;
    /// An SCTP INIT waiting for its INIT-ACK.
    pub const SCTP_INIT: u8 = 3;
}

/// Where a TC program saw a packet, relative to the pod behind the interface.
pub mod direction {
    pub const UNKNOWN: u8 = 0;
    /// TC ingress on the host side of a pod interface: the packet leaves the pod.
    pub const FROM_POD: u8 = 1;
    /// TC egress on the host side of a pod interface: the packet enters the pod.
    pub const TO_POD: u8 = 2;
}

/// Value of the handshake table, keyed by the initiator's [`FlowKey`]:
/// a connection attempt that has not been answered yet. User space scans this
/// table for entries older than the connect timeout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingConn {
    pub first_ns: u64,
    pub last_ns: u64,
    /// SYNs (or queries, or INITs) seen at the first observation point.
    pub packets: u64,
    pub bytes: u64,
    /// The interface and [`direction`] of the first sighting; later sightings
    /// elsewhere (the same SYN entering the destination pod) are not counted.
    pub ifindex: u32,
    pub direction: u8,
    /// One of [`pending_kind`].
    pub kind: u8,
    pub _pad: [u8; 2],
}

/// Value of the socket table, keyed by the connecting socket's [`FlowKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockConn {
    /// cgroup v2 id (the cgroup directory's inode number) of the process that
    /// called `connect()`.
    pub cgroup_id: u64,
    pub start_ns: u64,
    /// SYN retransmission timeouts so far.
    pub rto: u32,
    pub _pad: u32,
}

/// Key of the "established pair already reported" table: the destination
/// side of a connection without the ephemeral source port, so each
/// (client, server, port) pair is reported once per report interval.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PairKey {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub dst_port: u16,
    pub proto: u8,
    pub ip_version: u8,
    pub _pad: u32,
}

/// Kinds of [`Event`] sent through the ring buffer.
pub mod event_kind {
    /// The first drop of a new (flow, reason) in the drop table.
    pub const DROP: u8 = 1;
    /// A TCP RST answered a pending SYN (connection refused).
    pub const TCP_RESET: u8 = 2;
    /// An ICMP/ICMPv6 destination-unreachable answered a pending handshake
    /// or query; `Event::reason` holds `type << 8 | code`.
    pub const ICMP_UNREACH: u8 = 3;
    /// A handshake completed (SYN-ACK, DNS reply or INIT-ACK seen) for a pair
    /// not reported within the report interval.
    pub const ESTABLISHED: u8 = 4;
    /// An SCTP ABORT answered a pending INIT.
    pub const SCTP_ABORT: u8 = 5;
    /// sock_ops: the first SYN retransmission timeout of a connecting socket.
    pub const SOCK_RETRANS: u8 = 6;
    /// sock_ops: a connecting socket went SYN_SENT -> CLOSE without ever
    /// being established. `Event::count` holds the RTO count.
    pub const SOCK_FAILED: u8 = 7;
}

/// One message from the kernel to the agent. Fixed size, tagged by `kind`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub ts_ns: u64,
    /// cgroup v2 id of the socket's owner (sock_ops events), else 0.
    pub cgroup_id: u64,
    pub flow: FlowKey,
    /// Drop reason (DROP), `type << 8 | code` (ICMP_UNREACH), else 0.
    pub reason: u32,
    pub ifindex: u32,
    pub netns: u32,
    /// Packet length (DROP) or RTO count (SOCK_*).
    pub bytes: u32,
    pub count: u32,
    /// One of [`event_kind`].
    pub kind: u8,
    /// One of [`direction`] for TC events.
    pub direction: u8,
    pub tcp_flags: u8,
    pub _pad: [u8; 1],
    /// DROP of an encapsulated pod packet: its tunnel (`flow` is the inner).
    pub outer: Outer,
}

/// Indexes of the per-CPU loss counters. Every event the kernel could not
/// deliver, and every flow it could not track, is counted in one of these.
pub mod loss {
    /// Ring buffer full when reporting a new drop (no longer counted: see
    /// [`DROP_EVENT_DEFERRED`]; kept so the index and the exported series stay).
    pub const RINGBUF_DROP: u32 = 0;
    /// Ring buffer full when reporting a TC signal (refused, established).
    pub const RINGBUF_TC: u32 = 1;
    /// Ring buffer full when reporting a socket signal.
    pub const RINGBUF_SOCK: u32 = 2;
    /// Drop table and drop aggregate both full: a new dropped flow could
    /// not be tracked at all.
    pub const TABLE_DROPS: u32 = 3;
    /// Handshake table full: a new connection attempt could not be tracked,
    /// and the node did not drop it right after (a dropped one is reported
    /// as a drop). Counted when the next untracked attempt on the same CPU
    /// comes; see the TC programs' `untracked`.
    pub const TABLE_PENDING: u32 = 4;
    /// Socket table full.
    pub const TABLE_SOCKS: u32 = 5;
    /// Packets too short or malformed to parse (not lost, but not tracked).
    pub const MALFORMED: u32 = 6;
    /// Ring buffer full when reporting a new drop. Not a loss: the drop is
    /// in the drop table, whose scan reports it (a moment later).
    pub const DROP_EVENT_DEFERRED: u32 = 7;
    pub const COUNT: u32 = 8;
}

/// One kernel function that frees dropped packets with plain `kfree_skb()`,
/// for kernels whose `kfree_skb` tracepoint carries no drop reason (before
/// 5.17): a drop whose return address (`location`) lies in
/// `[start, end)` gets `reason`. The agent fills the table from the running
/// kernel's symbols; empty slots (`start == end == 0`) match nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropSite {
    pub start: u64,
    pub end: u64,
    /// A value of the agent's own reason table for such kernels.
    pub reason: u32,
    pub _pad: u32,
}

/// Slots of the drop-site table (searched linearly by every drop on kernels
/// without drop reasons, so kept small).
pub const DROP_SITES_LEN: u32 = 32;

/// Number of entries of the core drop reason filter array (reasons below
/// 0x10000; the kernel has about 130).
pub const REASON_FILTER_LEN: u32 = 1024;

/// Drop reasons above 0xFFFF belong to a subsystem (the high 16 bits:
/// Open vSwitch is 3 on 6.4+ kernels) and are filtered per subsystem.
pub const REASON_SUBSYS_SHIFT: u32 = 16;
/// Entries of the per-subsystem filter (the kernel has 4 subsystems in 6.12).
pub const REASON_SUBSYS_LEN: u32 = 16;

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, and every bit pattern is valid.
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for DropKey {}
    unsafe impl aya::Pod for DropStats {}
    unsafe impl aya::Pod for PendingConn {}
    unsafe impl aya::Pod for SockConn {}
    unsafe impl aya::Pod for PairKey {}
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for DropSite {}
    unsafe impl aya::Pod for AggKey {}
    unsafe impl aya::Pod for AggStats {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    // The layout is an ABI: a change must be deliberate.
    #[test]
    fn sizes_are_stable() {
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<DropKey>(), 48);
        assert_eq!(size_of::<DropStats>(), 88);
        assert_eq!(size_of::<Outer>(), 40);
        assert_eq!(size_of::<PendingConn>(), 40);
        assert_eq!(size_of::<SockConn>(), 24);
        assert_eq!(size_of::<PairKey>(), 40);
        assert_eq!(size_of::<Event>(), 120);
        assert_eq!(size_of::<DropSite>(), 24);
        assert_eq!(size_of::<AggKey>(), 40);
        assert_eq!(size_of::<AggStats>(), 56);
    }

    #[test]
    fn reversed_swaps_ends() {
        let k = FlowKey {
            src_addr: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            dst_addr: [10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            src_port: 40000,
            dst_port: 80,
            proto: IPPROTO_TCP,
            ip_version: IP_V4,
            _pad: [0; 2],
        };
        let r = k.reversed();
        assert_eq!(r.src_addr, k.dst_addr);
        assert_eq!(r.dst_port, 40000);
        assert_eq!(r.reversed(), k);
    }
}
