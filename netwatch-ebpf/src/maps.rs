//! Every map of netwatch's kernel programs, with its bound.
//!
//! Tables are plain (preallocated) hash maps, not LRU: when one is full the
//! insert fails and the loss is counted, instead of an old entry vanishing
//! unnoticed. User space removes entries once it has reported them. The agent
//! may resize any of them at load time (`EbpfLoader::map_max_entries`).

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use netwatch_common::{
    AggKey, AggStats, DROP_SITES_LEN, DropKey, DropSite, DropStats, FlowKey, PairKey, PendingConn,
    REASON_FILTER_LEN, REASON_SUBSYS_LEN, SockConn, loss,
};

/// New dropped flows and connection state changes, in order, to user space.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Dropped flows by (flow, kernel drop reason), with exact counters.
#[map]
pub static DROPS: HashMap<DropKey, DropStats> = HashMap::with_max_entries(16384, 0);

/// Drops that found the per-flow table full, by (source, destination,
/// destination port, protocol, reason), with packets and distinct flows:
/// a flood of new flows is summarised here instead of lost.
#[map]
pub static DROP_AGG: HashMap<AggKey, AggStats> = HashMap::with_max_entries(16384, 0);

/// Flows recently counted in [`DROP_AGG`], so a flow's further packets do
/// not count as new flows there, and stay in the aggregate rather than
/// starting a per-flow entry when the table has room again. A cache (LRU):
/// forgetting one only counts it twice.
#[map]
pub static AGG_SEEN: LruHashMap<DropKey, u8> = LruHashMap::with_max_entries(65536, 0);

/// Per CPU: the last handshake opener the full handshake table could not
/// take (`ip_version` 0: none). Its drop, which follows on the same CPU
/// when the node drops it, clears it: only an opener that was not dropped
/// is a loss.
#[map]
pub static UNTRACKED: PerCpuArray<FlowKey> = PerCpuArray::with_max_entries(1, 0);

/// Handshakes (TCP SYN, DNS query, SCTP INIT) seen on pod interfaces and not
/// answered yet, keyed by the initiator's flow.
#[map]
pub static PENDING: HashMap<FlowKey, PendingConn> = HashMap::with_max_entries(16384, 0);

/// Connecting sockets (sock_ops), keyed by the socket's flow.
#[map]
pub static SOCKS: HashMap<FlowKey, SockConn> = HashMap::with_max_entries(16384, 0);

/// cgroup of the process behind each recent connect(), by the socket's flow.
/// A cache (LRU): it lets user space name the client of a connection after
/// the socket table has forgotten it (established ones especially).
#[map]
pub static CONNECT_CGROUPS: LruHashMap<FlowKey, u64> = LruHashMap::with_max_entries(16384, 0);

/// (client, server, port) pairs whose completed handshake was reported, with
/// the time of the report. A cache: an evicted entry is only reported again.
#[map]
pub static REPORTED: LruHashMap<PairKey, u64> = LruHashMap::with_max_entries(16384, 0);

/// Per-CPU loss counters, indexed by `netwatch_common::loss`.
#[map]
pub static LOSSES: PerCpuArray<u64> = PerCpuArray::with_max_entries(loss::COUNT, 0);

/// Which kernel drop reasons are counted: 1 at a reason's index counts it.
#[map]
pub static REASON_FILTER: Array<u8> = Array::with_max_entries(REASON_FILTER_LEN, 0);

/// Which subsystems' drop reasons (reason >> 16, e.g. Open vSwitch's) are
/// counted: 1 at a subsystem's index counts all of its reasons.
#[map]
pub static SUBSYS_FILTER: Array<u8> = Array::with_max_entries(REASON_SUBSYS_LEN, 0);

/// Drop sites (kernel function address ranges) by reason, for kernels whose
/// kfree_skb passes no reason. See `drops`.
#[map]
pub static DROP_SITES: Array<DropSite> = Array::with_max_entries(DROP_SITES_LEN, 0);

/// cgroup v2 id of the process that called connect() on a socket, by socket
/// cookie, written by the cgroup connect4/connect6 programs and read by
/// sock_ops when the handshake starts (sock_ops itself may call
/// bpf_get_current_cgroup_id only from Linux 6.4). A cache: LRU.
#[map]
pub static CONNECT_BY_COOKIE: LruHashMap<u64, u64> = LruHashMap::with_max_entries(16384, 0);

/// Network namespaces (by inode number) whose drops count, when the
/// `FILTER_NETNS` global is set.
#[map]
pub static NETNS_ALLOW: HashMap<u32, u8> = HashMap::with_max_entries(1024, 0);

/// Per-CPU scratch for the drop being recorded (its table value and
/// tunnel), kept off the 512-byte stack.
#[map]
pub static DROP_SCRATCH: PerCpuArray<DropStats> = PerCpuArray::with_max_entries(1, 0);

/// An aggregate's key and new value, as built for one drop.
#[repr(C)]
pub struct AggScratch {
    pub key: AggKey,
    pub stats: AggStats,
}

/// Per-CPU scratch for [`DROP_AGG`]'s key and value, kept off the stack
/// (kfree_skb's own frame leaves no room for them).
#[map]
pub static AGG_SCRATCH: PerCpuArray<AggScratch> = PerCpuArray::with_max_entries(1, 0);

/// Count one lost or untracked event.
#[inline(always)]
pub fn count_loss(index: u32) {
    if let Some(counter) = LOSSES.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no other writer while this program runs here.
        unsafe { *counter += 1 };
    }
}
