//! Flow assembly: kernel signals in, one record per denied flow out.
//!
//! Signals about one conversation (its drops under each reason, an
//! unanswered handshake, a refusal, the connecting socket) are merged by flow
//! key. A flow the node dropped and that later timed out stays one DROPPED
//! flow that says how many SYNs it cost. The first record of a flow goes out
//! at once; later ones at most every `update_interval` per flow, and a final
//! one when the flow has been quiet for `idle_timeout`.
//!
//! Time is passed in explicitly, so everything here is deterministic.

use std::{
    hash::BuildHasher,
    sync::{
        LazyLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

// hashbrown's hasher: flow keys are process-local, and SipHash was the
// largest cost of a new flow.
use hashbrown::{DefaultHashBuilder, HashMap, HashSet, HashTable, hash_table};

use netwatch_common::{
    AggKey, AggStats, DropKey, DropStats, FlowKey, IP_V4, IPPROTO_ICMP, IPPROTO_ICMPV6,
    IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, Outer, PendingConn, encap, pending_kind, tcp_flags,
};

use super::record::{
    Aggregate, Encapsulation, EventType, FlowRecord, Icmp, Interface, IpInfo, L4, Lifecycle,
    OriginalDestination, OuterHeader, Ports, TcpFlags, Verdict,
};
use crate::{
    capture::{
        events::{Crossing, KernelEvent, Refusal, addresses},
        reasons::DropReasons,
    },
    identity::Endpoint,
    record::shared::{SharedList, SharedStr},
};

/// Tuning of the assembler.
#[derive(Clone, Debug)]
pub struct AssemblerConfig {
    pub node_name: String,
    /// Minimum time between two records of one flow after the first.
    pub update_interval: Duration,
    /// A flow with no new signal for this long gets its final record.
    pub idle_timeout: Duration,
    /// How long a handshake may go unanswered before it counts as timed out
    /// (used in summaries; the scan itself lives with the table reader).
    pub connect_timeout: Duration,
    /// Flows tracked at once; beyond it the quietest flow is finalised early.
    pub max_flows: usize,
    /// Inode of the agent's network namespace: interface indexes are only
    /// named when they are this namespace's (0: take every index as ours).
    pub own_netns: u32,
    /// How long the first record of a connection attempt dropped by the
    /// firewall waits for a refusal (see [`FlowAssembler::handle`]); the
    /// wait ends at the first tick past it.
    pub refusal_grace: Duration,
}

impl Default for AssemblerConfig {
    fn default() -> Self {
        AssemblerConfig {
            node_name: String::new(),
            update_interval: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(3),
            max_flows: 65536,
            own_netns: 0,
            refusal_grace: Duration::from_millis(200),
        }
    }
}

/// One signal for the assembler.
#[derive(Clone, Debug)]
pub enum Signal {
    Kernel(KernelEvent),
    /// Exact counters of one (flow, reason) from the kernel's drop table.
    /// Also how a drop whose ring buffer event was lost still becomes a flow.
    DropCounts {
        key: DropKey,
        stats: DropStats,
        first: SystemTime,
        last: SystemTime,
    },
    /// Counters of one entry of the kernel's drop aggregate (drops of new
    /// flows that found the drop table full).
    AggregateCounts {
        key: AggKey,
        stats: AggStats,
        first: SystemTime,
        last: SystemTime,
    },
    /// A handshake older than the connect timeout, from the pending table.
    Unanswered {
        flow: FlowKey,
        pending: PendingConn,
        first: SystemTime,
        last: SystemTime,
    },
}

#[derive(Clone, Debug, Default)]
struct DropCounters {
    packets: u64,
    bytes: u64,
}

/// One tracked flow. A node may track 100,000 of them (the memory goal's
/// load), so what most flows never have sits behind `extras`, times are
/// `Stamp`s, booleans are bits, and the flow's key is the table's (not
/// repeated here): see `an_active_flow_stays_small`.
#[derive(Clone, Debug)]
struct ActiveFlow {
    /// The flow's UUID (v4), rendered into each record; two halves, as a
    /// `u128` would align the whole flow (and its table entry) to 16 bytes.
    uuid: [u64; 2],
    drops: Drops,
    /// Reason of the first kernel drop-table key that fed this flow, when
    /// that key is the flow's own or its reverse (`Marks::DROP_KEY_*`);
    /// the others are in `Extras::drop_keys`.
    drop_key_reason: u32,
    tcp_flags: u8,
    marks: Marks,
    attempts: u64,
    attempt_bytes: u64,
    refusal: Option<Refusal>,
    first_seen: Stamp,
    /// Latest signal time: both the record's `last_seen` and what idleness
    /// is measured from.
    last_seen: Stamp,
    last_emitted: Stamp,
    /// Since when its first record waits for a refusal that may follow the
    /// drop (when `Marks::HELD`).
    held_since: Stamp,
    ifindex: u32,
    /// Network namespace (inode) of `ifindex`: a drop may happen in a pod's
    /// namespace, where indexes mean other interfaces; 0 for this node's.
    netns: u32,
    direction: Crossing,
    points: Points,
    /// The connecting socket's cgroup (when `Marks::CGROUP`).
    cgroup_id: u64,
    extras: Option<Box<Extras>>,
}

/// What few flows have.
#[derive(Clone, Debug, Default)]
struct Extras {
    /// Destination as the client addressed it (a service IP, before DNAT),
    /// and as the node forwarded it (after DNAT), when not the flow key's
    /// (which `Marks::PRE_NAT_AS_KEY`/`POST_NAT_AS_KEY` say).
    pre_nat_dst: Option<([u8; 16], u16)>,
    post_nat_dst: Option<([u8; 16], u16)>,
    /// The tunnel its packets were dropped in, when a node dropped them
    /// encapsulated.
    outer: Option<Outer>,
    /// Distinct flows summarised, for an entry of the kernel's drop aggregate.
    aggregated_flows: Option<u64>,
    /// Kernel drop-table keys that fed this flow (to remove when it ends),
    /// after the one kept in place.
    drop_keys: Vec<(FlowKey, u32)>,
}

/// A flow's yes/no facts, one bit each.
#[derive(Clone, Copy, Debug, Default)]
struct Marks(u16);

impl Marks {
    /// A completed handshake (POLICY_NOT_ENFORCED), not a denied flow. The
    /// other verdicts follow from what was seen (see [`verdict_of`]).
    const ESTABLISHED: u16 = 1;
    const REPLY_DROPPED: u16 = 1 << 1;
    const TIMED_OUT: u16 = 1 << 2;
    const IS_DNS: u16 = 1 << 3;
    /// Changed since its last record.
    const DIRTY: u16 = 1 << 4;
    /// `held_since` is set.
    const HELD: u16 = 1 << 5;
    /// `cgroup_id` is set.
    const CGROUP: u16 = 1 << 6;
    /// The destination before (after) DNAT is the flow key's.
    const PRE_NAT_AS_KEY: u16 = 1 << 7;
    const POST_NAT_AS_KEY: u16 = 1 << 8;
    /// The first drop-table key is the flow key (its reverse), with reason
    /// `drop_key_reason`.
    const DROP_KEY_AS_KEY: u16 = 1 << 9;
    const DROP_KEY_REVERSED: u16 = 1 << 10;

    fn has(self, mark: u16) -> bool {
        self.0 & mark != 0
    }

    fn set(&mut self, mark: u16, on: bool) {
        if on {
            self.0 |= mark;
        } else {
            self.0 &= !mark;
        }
    }
}

/// A point in time as nanoseconds since the Unix epoch: half a
/// `SystemTime`, and exact for every time from 1970 to 2554 (earlier ones
/// count as the epoch, later ones as 2554).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
struct Stamp(u64);

impl Stamp {
    /// `last_emitted` of a flow without a record yet.
    const NEVER: Stamp = Stamp(0);

    fn of(time: SystemTime) -> Stamp {
        Stamp(
            time.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        )
    }

    fn time(self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_nanos(self.0)
    }

    /// How long before `now` this was (zero if after it).
    fn age(self, now: SystemTime) -> Duration {
        now.duration_since(self.time()).unwrap_or_default()
    }
}

impl ActiveFlow {
    fn is(&self, mark: u16) -> bool {
        self.marks.has(mark)
    }

    fn mark(&mut self, mark: u16) {
        self.marks.set(mark, true);
    }

    fn extras_mut(&mut self) -> &mut Extras {
        self.extras.get_or_insert_with(Box::default)
    }

    fn aggregated_flows(&self) -> Option<u64> {
        self.extras.as_ref().and_then(|e| e.aggregated_flows)
    }

    fn outer(&self) -> Option<&Outer> {
        self.extras.as_ref().and_then(|e| e.outer.as_ref())
    }

    fn cgroup_id(&self) -> Option<u64> {
        self.is(Marks::CGROUP).then_some(self.cgroup_id)
    }

    fn set_cgroup_id(&mut self, id: u64) {
        self.cgroup_id = id;
        self.mark(Marks::CGROUP);
    }

    fn held_since(&self) -> Option<SystemTime> {
        self.is(Marks::HELD).then(|| self.held_since.time())
    }

    /// Holds its first record from `now`, unless already held.
    fn hold(&mut self, now: SystemTime) {
        if !self.is(Marks::HELD) {
            self.held_since = Stamp::of(now);
            self.mark(Marks::HELD);
        }
    }

    /// Ends the wait for a refusal; whether it was waiting.
    fn release(&mut self) -> bool {
        let held = self.is(Marks::HELD);
        self.marks.set(Marks::HELD, false);
        held
    }

    /// The destination seen before (`Pre`) or after (`Post`) DNAT.
    fn nat_dst(&self, key: &FlowKey, side: NatSide) -> Option<([u8; 16], u16)> {
        let (as_key, kept) = match side {
            NatSide::Pre => (
                Marks::PRE_NAT_AS_KEY,
                self.extras.as_ref().and_then(|e| e.pre_nat_dst),
            ),
            NatSide::Post => (
                Marks::POST_NAT_AS_KEY,
                self.extras.as_ref().and_then(|e| e.post_nat_dst),
            ),
        };
        if self.is(as_key) {
            Some((key.dst_addr, key.dst_port))
        } else {
            kept
        }
    }

    /// Keeps `dst` as the destination seen on `side` of DNAT, unless one is.
    fn note_nat_dst(&mut self, key: &FlowKey, side: NatSide, dst: ([u8; 16], u16)) {
        if self.nat_dst(key, side).is_some() {
            return;
        }
        let as_key = match side {
            NatSide::Pre => Marks::PRE_NAT_AS_KEY,
            NatSide::Post => Marks::POST_NAT_AS_KEY,
        };
        if dst == (key.dst_addr, key.dst_port) {
            self.mark(as_key);
        } else {
            let e = self.extras_mut();
            match side {
                NatSide::Pre => e.pre_nat_dst = Some(dst),
                NatSide::Post => e.post_nat_dst = Some(dst),
            }
        }
    }

    /// The kernel drop-table keys that fed this flow (`key`), in the order
    /// they came.
    fn drop_keys(&self, key: &FlowKey) -> impl Iterator<Item = (FlowKey, u32)> {
        let first = if self.is(Marks::DROP_KEY_AS_KEY) {
            Some((*key, self.drop_key_reason))
        } else if self.is(Marks::DROP_KEY_REVERSED) {
            Some((key.reversed(), self.drop_key_reason))
        } else {
            None
        };
        let rest = self.extras.as_ref().map_or(&[][..], |e| &e.drop_keys[..]);
        first.into_iter().chain(rest.iter().copied())
    }

    /// A kernel drop-table key that fed this flow (`key`), once.
    fn note_drop_key(&mut self, key: &FlowKey, (flow, reason): (FlowKey, u32)) {
        if self.drop_keys(key).any(|k| k == (flow, reason)) {
            return;
        }
        let none_yet = self.drop_keys(key).next().is_none();
        if none_yet && flow == *key {
            self.drop_key_reason = reason;
            self.mark(Marks::DROP_KEY_AS_KEY);
        } else if none_yet && flow == key.reversed() {
            self.drop_key_reason = reason;
            self.mark(Marks::DROP_KEY_REVERSED);
        } else {
            let keys = &mut self.extras_mut().drop_keys;
            if keys.capacity() == keys.len() {
                keys.reserve_exact(1);
            }
            keys.push((flow, reason));
        }
    }
}

/// Merges signals into flows and decides when records go out.
pub struct FlowAssembler {
    config: AssemblerConfig,
    flows: HashMap<FlowKey, ActiveFlow>,
    /// Flows by the client's end of the connection (address, source port,
    /// protocol): a connection keeps its source port through DNAT, so the
    /// SYN seen at the client's interface (to a service IP) and its drop in
    /// the node's firewall (to the backend) meet here.
    by_client: ClientIndex,
    /// Flows created by the signal being handled, whose first record is due.
    fresh: Vec<FlowKey>,
    /// cgroups of connecting sockets seen before any other signal of their flow.
    socket_cgroups: HashMap<FlowKey, (u64, SystemTime)>,
    /// Flows finalised early because `max_flows` was reached.
    pub evicted: u64,
    /// Kernel drop-table keys of evicted flows, until the next tick hands
    /// them back for removal. Their counts were reported, so until then a
    /// table scan must not make a new flow of them.
    released: HashSet<(FlowKey, u32)>,
    /// Handshakes of evicted dropped flows, until the kernel's handshake
    /// table has forgotten them (the next tick).
    released_pending: HashSet<FlowKey>,
    /// Entries of the kernel's drop aggregate, each reported as one record
    /// (bounded by the kernel table).
    aggregates: HashMap<AggKey, ActiveFlow>,
    /// Flows whose first record waits for a refusal (see `refusal_grace`).
    held: Vec<FlowKey>,
    uuids: UuidSource,
    parts: RecordParts,
}

/// Version 4 UUIDs from a random seed and a counter: one `getrandom` call
/// per assembler rather than one per flow.
struct UuidSource {
    seed: (u64, u64),
    next: AtomicU64,
}

impl UuidSource {
    fn new() -> UuidSource {
        let seed = uuid::Uuid::new_v4().as_u64_pair();
        UuidSource {
            seed,
            next: AtomicU64::new(0),
        }
    }

    fn uuid(&self) -> u128 {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        // splitmix64's finaliser is a bijection: distinct counters give
        // distinct halves.
        let hi = mix64(self.seed.0.wrapping_add(n));
        let lo = mix64(self.seed.1 ^ n.rotate_left(32));
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&hi.to_be_bytes());
        bytes[8..].copy_from_slice(&lo.to_be_bytes());
        uuid::Builder::from_random_bytes(bytes)
            .into_uuid()
            .as_u128()
    }
}

fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Text that many records carry, shared instead of allocated per record.
#[derive(Default)]
struct RecordParts {
    node_name: SharedStr,
    /// Drop reason names by value, as last rendered.
    reasons: HashMap<u32, SharedStr>,
    /// Observation point lists, by set.
    points: [Option<SharedList<String>>; 8],
    /// Summaries without counts in them (a plain drop's), by what they
    /// say: protocol, TCP flags, ICMP type and code, DNS.
    summaries: HashMap<(u8, u8, (u16, u16), bool), SharedStr>,
}

/// Summaries kept at most (their keys are few in practice).
const SUMMARIES: usize = 1024;

impl RecordParts {
    fn points(&mut self, points: Points) -> SharedList<String> {
        let make = || points.names().map(str::to_string).collect();
        match self.points.get_mut(usize::from(points.0)) {
            Some(slot) => slot.get_or_insert_with(make).clone(),
            None => make(),
        }
    }

    /// The summary of a flow whose summary holds no counts.
    fn plain_summary(
        &mut self,
        key: &FlowKey,
        f: &ActiveFlow,
        make: impl FnOnce() -> String,
    ) -> SharedStr {
        let icmp = if matches!(key.proto, IPPROTO_ICMP | IPPROTO_ICMPV6) {
            (key.src_port, key.dst_port)
        } else {
            (0, 0)
        };
        let flags = if key.proto == IPPROTO_TCP {
            f.tcp_flags
        } else {
            0
        };
        let key = (key.proto, flags, icmp, f.is(Marks::IS_DNS));
        if let Some(s) = self.summaries.get(&key) {
            return s.clone();
        }
        let s = SharedStr::from(make());
        if self.summaries.len() < SUMMARIES {
            self.summaries.insert(key, s.clone());
        }
        s
    }

    fn reason(&mut self, reasons: &DropReasons, value: u32) -> SharedStr {
        let Some(name) = reasons.known_name(value) else {
            return reasons.name(value).into();
        };
        match self.reasons.get(&value) {
            Some(s) if *s == *name => s.clone(),
            _ => {
                let s = SharedStr::from(name);
                self.reasons.insert(value, s.clone());
                s
            }
        }
    }
}

static L3_L4: LazyLock<SharedStr> = LazyLock::new(|| "L3_L4".into());
static IPV4: LazyLock<SharedStr> = LazyLock::new(|| "IPv4".into());
static IPV6: LazyLock<SharedStr> = LazyLock::new(|| "IPv6".into());
static DIRECTIONS: LazyLock<[SharedStr; 3]> = LazyLock::new(|| {
    [
        "INGRESS".into(),
        "EGRESS".into(),
        "TRAFFIC_DIRECTION_UNKNOWN".into(),
    ]
});

/// What the assembler wants done after a tick.
#[derive(Debug, Default)]
pub struct TickOutput {
    pub records: Vec<FlowRecord>,
    /// Kernel drop-table entries of finished flows, to remove.
    pub finished_drop_keys: Vec<DropKey>,
    /// Kernel drop-aggregate entries whose final record went out, to remove.
    pub finished_aggregates: Vec<AggKey>,
    /// Kernel handshake-table entries of dropped flows evicted before their
    /// connect timeout, to remove: their final record said DROPPED, and
    /// the unanswered handshake must not come back as a TIMED_OUT flow.
    pub finished_pending_keys: Vec<FlowKey>,
}

impl FlowAssembler {
    pub fn new(config: AssemblerConfig) -> FlowAssembler {
        FlowAssembler {
            parts: RecordParts {
                node_name: config.node_name.as_str().into(),
                ..RecordParts::default()
            },
            config,
            flows: HashMap::new(),
            by_client: ClientIndex::default(),
            fresh: Vec::new(),
            socket_cgroups: HashMap::new(),
            evicted: 0,
            released: HashSet::new(),
            released_pending: HashSet::new(),
            aggregates: HashMap::new(),
            held: Vec::new(),
            uuids: UuidSource::new(),
        }
    }

    pub fn active_flows(&self) -> usize {
        self.flows.len()
    }

    /// Entries of the kernel's drop aggregate being reported.
    pub fn active_aggregates(&self) -> usize {
        self.aggregates.len()
    }

    /// Take one signal; returns the records to emit now (first records).
    ///
    /// A new flow's first record goes out at once, except one begun by a
    /// firewall's drop of a connection attempt: a REJECT drops the packet
    /// and answers it, and on a datapath where the answer takes a slower
    /// path back to the client than the drop takes to us (Open vSwitch
    /// sends it through ovs-vswitchd when no megaflow matches yet), the
    /// first record would say DROPPED for a flow that is REFUSED. Such a
    /// record waits `refusal_grace` (until the next tick past it) and goes
    /// out as soon as the refusal arrives.
    pub fn handle(
        &mut self,
        signal: Signal,
        now: SystemTime,
        reasons: &DropReasons,
        ifnames: &dyn Fn(u32) -> Option<String>,
    ) -> Vec<FlowRecord> {
        let mut out = Vec::new();
        match signal {
            // Link-local housekeeping (neighbour discovery, MLD, multicast
            // and broadcast) is not a conversation between pods: a node
            // drops plenty of it by design, and a DROPPED world -> world
            // record of it only hides the real denials.
            Signal::Kernel(KernelEvent::Drop { flow, .. }) if !is_pod_flow(&flow) => {}
            Signal::DropCounts { key, .. } if !is_pod_flow(&key.flow) => {}
            Signal::AggregateCounts { key, .. } if !is_pod_flow(&aggregate_flow(&key)) => {}
            Signal::AggregateCounts {
                key,
                stats,
                first,
                last,
            } => {
                let a = self.aggregates.entry(key).or_insert_with(|| {
                    let mut f = new_flow(&aggregate_flow(&key), first, self.uuids.uuid());
                    f.extras_mut().aggregated_flows = Some(0);
                    f.ifindex = stats.ifindex;
                    f.netns = stats.netns;
                    f.direction = Crossing::FromPod;
                    f.points.insert(Point::KfreeSkb);
                    f.last_emitted = Stamp::NEVER;
                    f
                });
                let flows = a.aggregated_flows();
                let c = a.drops.counters(key.reason);
                if c.packets != stats.packets || flows != Some(stats.flows) {
                    c.packets = stats.packets;
                    c.bytes = stats.bytes;
                    a.extras_mut().aggregated_flows = Some(stats.flows);
                    a.tcp_flags |= stats.tcp_flags;
                    touch(a, last);
                }
                if a.last_emitted == Stamp::NEVER {
                    out.push(render(
                        &aggregate_flow(&key),
                        a,
                        &self.config,
                        &mut self.parts,
                        reasons,
                        ifnames,
                        Lifecycle::New,
                    ));
                    a.marks.set(Marks::DIRTY, false);
                    a.last_emitted = Stamp::of(now);
                }
            }
            Signal::Kernel(KernelEvent::Drop {
                time,
                flow,
                reason,
                ifindex,
                netns,
                bytes,
                tcp_flags,
                outer,
            }) => {
                let (key, reply) = orient(&flow, tcp_flags);
                let grace = self.config.refusal_grace;
                let (key, f) = self.locate(key, NatSide::Post, time);
                if f.last_emitted == Stamp::NEVER
                    && f.refusal.is_none()
                    && !grace.is_zero()
                    && !reply
                    && opens_connection(&flow, tcp_flags)
                    && may_be_rejected(reasons, reason)
                {
                    f.hold(now);
                }
                f.note_drop_key(&key, (flow, reason));
                if let Some(outer) = outer
                    && f.outer().is_none()
                {
                    f.extras_mut().outer = Some(outer);
                }
                note_drop(f, reply, tcp_flags, ifindex, netns);
                let c = f.drops.counters(reason);
                // The event carries the first packet; the table scan brings exact totals.
                if c.packets == 0 {
                    c.packets = 1;
                    c.bytes = u64::from(bytes);
                }
                touch(f, time);
            }
            // Counts of an evicted flow, already reported.
            Signal::DropCounts { key, .. } if self.released.contains(&(key.flow, key.reason)) => {}
            Signal::DropCounts {
                key,
                stats,
                first,
                last,
            } => {
                let (fkey, reply) = orient(&key.flow, stats.tcp_flags);
                let (fkey, f) = self.locate(fkey, NatSide::Post, first);
                f.note_drop_key(&fkey, (key.flow, key.reason));
                if f.outer().is_none() && stats.outer.encap != encap::NONE {
                    f.extras_mut().outer = Some(stats.outer);
                }
                let c = f.drops.counters(key.reason);
                if c.packets != stats.packets || c.bytes != stats.bytes {
                    c.packets = stats.packets;
                    c.bytes = stats.bytes;
                    note_drop(f, reply, stats.tcp_flags, stats.ifindex, stats.netns);
                    let first = Stamp::of(first);
                    if first < f.first_seen {
                        f.first_seen = first;
                    }
                    touch(f, last);
                }
            }
            // The handshake of a dropped flow evicted meanwhile, reported.
            Signal::Unanswered { flow, .. } if self.released_pending.contains(&flow) => {}
            Signal::Unanswered {
                flow,
                pending,
                first,
                last,
            } => {
                let side = NatSide::of(Crossing::from(pending.direction));
                let (_, f) = self.locate(flow, side, first);
                f.mark(Marks::TIMED_OUT);
                f.attempts = f.attempts.max(pending.packets);
                f.attempt_bytes = f.attempt_bytes.max(pending.bytes);
                f.points.insert(Point::Tc);
                if pending.kind == pending_kind::DNS_QUERY {
                    f.mark(Marks::IS_DNS);
                }
                if pending.kind == pending_kind::TCP_SYN {
                    f.tcp_flags |= tcp_flags::SYN;
                }
                if f.ifindex == 0 {
                    f.ifindex = pending.ifindex;
                    f.direction = Crossing::from(pending.direction);
                }
                touch(f, last);
            }
            Signal::Kernel(KernelEvent::Refused {
                time,
                flow,
                how,
                ifindex,
                direction,
                attempts,
            }) => {
                // Answers reach the client reverse-NATed: its own view.
                let (key, f) = self.locate(flow, NatSide::Pre, time);
                f.refusal = Some(how);
                // The refusal a held first record waited for: out now.
                let released = f.release().then_some(key);
                f.attempts = f.attempts.max(u64::from(attempts));
                f.points.insert(Point::Tc);
                if flow.proto == IPPROTO_TCP {
                    f.tcp_flags |= tcp_flags::SYN;
                }
                if f.ifindex == 0 {
                    f.ifindex = ifindex;
                    f.direction = direction;
                }
                touch(f, time);
                self.fresh.extend(released);
            }
            Signal::Kernel(KernelEvent::SockRetransmit {
                time,
                flow,
                cgroup_id,
            }) => {
                if let Some(f) = self.flows.get_mut(&flow) {
                    if f.cgroup_id().is_none() {
                        f.set_cgroup_id(cgroup_id);
                        f.points.insert(Point::SockOps);
                        touch(f, time);
                    }
                } else {
                    self.socket_cgroups.insert(flow, (cgroup_id, time));
                }
            }
            Signal::Kernel(KernelEvent::SockFailed {
                time,
                flow,
                cgroup_id,
                retransmits,
            }) => {
                if let Some(f) = self.flows.get_mut(&flow) {
                    f.set_cgroup_id(cgroup_id);
                    f.points.insert(Point::SockOps);
                    touch(f, time);
                } else if retransmits > 0 {
                    // A connect the pod interfaces never saw (a hostNetwork pod,
                    // the node itself): the socket is the only witness.
                    let (_, f) = self.locate(flow, NatSide::Pre, time);
                    f.mark(Marks::TIMED_OUT);
                    f.attempts = u64::from(retransmits) + 1;
                    f.tcp_flags |= tcp_flags::SYN;
                    f.set_cgroup_id(cgroup_id);
                    f.points.insert(Point::SockOps);
                    touch(f, time);
                }
                self.socket_cgroups.remove(&flow);
            }
            // Completed handshakes are for policy attribution, not denied flows.
            Signal::Kernel(KernelEvent::Established { .. }) => {}
        }
        // Emit first records immediately: only flows this signal created, so
        // the cost per signal does not grow with the number of active flows.
        let keys = std::mem::take(&mut self.fresh);
        for k in keys {
            let Some(f) = self.flows.get_mut(&k) else {
                continue;
            };
            if let Some((cgroup_id, _)) = self.socket_cgroups.remove(&k) {
                if f.cgroup_id().is_none() {
                    f.set_cgroup_id(cgroup_id);
                }
                f.points.insert(Point::SockOps);
            }
            if f.is(Marks::HELD) {
                self.held.push(k);
                continue;
            }
            out.push(render(
                &k,
                f,
                &self.config,
                &mut self.parts,
                reasons,
                ifnames,
                Lifecycle::New,
            ));
            f.marks.set(Marks::DIRTY, false);
            f.last_emitted = Stamp::of(now);
        }
        self.enforce_bound(reasons, ifnames, &mut out);
        out
    }

    /// Rate-limited updates and final records of quiet flows.
    pub fn tick(
        &mut self,
        now: SystemTime,
        reasons: &DropReasons,
        ifnames: &dyn Fn(u32) -> Option<String>,
    ) -> TickOutput {
        let mut out = TickOutput::default();
        let grace = self.config.refusal_grace;
        // First records that waited long enough for a refusal.
        let flows = &mut self.flows;
        let config = &self.config;
        let parts = &mut self.parts;
        self.held.retain(|k| {
            let Some(f) = flows.get_mut(k) else {
                return false;
            };
            let Some(since) = f.held_since() else {
                return false;
            };
            if now.duration_since(since).unwrap_or_default() < grace {
                return true;
            }
            f.release();
            out.records.push(render(
                k,
                f,
                config,
                parts,
                reasons,
                ifnames,
                Lifecycle::New,
            ));
            f.marks.set(Marks::DIRTY, false);
            f.last_emitted = Stamp::of(now);
            false
        });
        let mut finished = Vec::new();
        for (k, f) in self.flows.iter_mut() {
            if f.is(Marks::HELD) {
                continue;
            }
            let quiet = f.last_seen.age(now) >= self.config.idle_timeout;
            if quiet {
                // Every flow ends with a FINAL record, also one whose last
                // update already had its final counts: a reader waiting for
                // the end of a flow must see it end.
                out.records.push(render(
                    k,
                    f,
                    &self.config,
                    &mut self.parts,
                    reasons,
                    ifnames,
                    Lifecycle::Final,
                ));
                finished.push(*k);
            } else if f.is(Marks::DIRTY) && f.last_emitted.age(now) >= self.config.update_interval {
                out.records.push(render(
                    k,
                    f,
                    &self.config,
                    &mut self.parts,
                    reasons,
                    ifnames,
                    Lifecycle::Update,
                ));
                f.marks.set(Marks::DIRTY, false);
                f.last_emitted = Stamp::of(now);
            }
        }
        for k in finished {
            if let Some(f) = self.flows.remove(&k) {
                self.by_client.remove(&k);
                out.finished_drop_keys.extend(f.drop_keys(&k).map(drop_key));
            }
        }
        out.finished_drop_keys
            .extend(self.released.drain().map(drop_key));
        out.finished_pending_keys
            .extend(self.released_pending.drain());
        self.aggregates.retain(|key, a| {
            let quiet = a.last_seen.age(now) >= self.config.idle_timeout;
            if quiet {
                out.records.push(render(
                    &aggregate_flow(key),
                    a,
                    &self.config,
                    &mut self.parts,
                    reasons,
                    ifnames,
                    Lifecycle::Final,
                ));
                out.finished_aggregates.push(*key);
            } else if a.is(Marks::DIRTY) && a.last_emitted.age(now) >= self.config.update_interval {
                out.records.push(render(
                    &aggregate_flow(key),
                    a,
                    &self.config,
                    &mut self.parts,
                    reasons,
                    ifnames,
                    Lifecycle::Update,
                ));
                a.marks.set(Marks::DIRTY, false);
                a.last_emitted = Stamp::of(now);
            }
            !quiet
        });
        let horizon = self.config.idle_timeout;
        self.socket_cgroups
            .retain(|_, (_, t)| now.duration_since(*t).unwrap_or_default() < horizon);
        out
    }

    /// Final records for every flow (at shutdown).
    pub fn finish_all(
        &mut self,
        reasons: &DropReasons,
        ifnames: &dyn Fn(u32) -> Option<String>,
    ) -> Vec<FlowRecord> {
        let mut out = Vec::new();
        self.by_client.clear();
        let flows = self.flows.drain();
        let aggregates = self
            .aggregates
            .drain()
            .map(|(k, a)| (aggregate_flow(&k), a));
        for (k, f) in flows.chain(aggregates) {
            out.push(render(
                &k,
                &f,
                &self.config,
                &mut self.parts,
                reasons,
                ifnames,
                Lifecycle::Final,
            ));
        }
        out
    }

    /// A one-record flow for a completed handshake the NetworkPolicies deny
    /// (`POLICY_NOT_ENFORCED`); `key` is the client's flow.
    pub fn established_record(
        &self,
        key: FlowKey,
        time: SystemTime,
        ifindex: u32,
        direction: Crossing,
        reasons: &DropReasons,
        ifnames: &dyn Fn(u32) -> Option<String>,
    ) -> FlowRecord {
        let mut f = new_flow(&key, time, self.uuids.uuid());
        f.mark(Marks::ESTABLISHED);
        f.attempts = 1;
        f.ifindex = ifindex;
        f.direction = direction;
        f.points.insert(Point::Tc);
        if key.proto == IPPROTO_TCP {
            f.tcp_flags = tcp_flags::SYN | tcp_flags::ACK;
        }
        // Rare: no drops, so no reason names to share.
        let mut parts = RecordParts {
            node_name: self.parts.node_name.clone(),
            ..RecordParts::default()
        };
        render(
            &key,
            &f,
            &self.config,
            &mut parts,
            reasons,
            ifnames,
            Lifecycle::New,
        )
    }

    /// The flow a signal about `key` belongs to, and its key: the same
    /// key, or the same connection seen on the other side of DNAT; created
    /// when new.
    ///
    /// Another key of the same client end (address, port, protocol) is that
    /// connection when the flow was not seen on this side of DNAT, or was
    /// seen there with this destination: a client port reused towards
    /// another destination (a scan, a retry storm, or simply the kernel's
    /// port choice, which is per destination) seen on the same side is
    /// another connection.
    fn locate(
        &mut self,
        key: FlowKey,
        side: NatSide,
        time: SystemTime,
    ) -> (FlowKey, &mut ActiveFlow) {
        let mut target = key;
        if !self.flows.contains_key(&key)
            && let Some(existing) = self.by_client.get(&ClientEnd::of(&key))
        {
            let other_side = self.flows.get(existing).is_some_and(|f| {
                f.last_seen.age(time) <= self.config.idle_timeout
                    && f.nat_dst(existing, side)
                        .is_none_or(|seen| seen == (key.dst_addr, key.dst_port))
            });
            if other_side && has_ports(&key) {
                target = *existing;
            }
        }
        if !self.flows.contains_key(&target) && has_ports(&key) {
            self.by_client.insert(key);
        }
        let f = self.flow_for(target, time);
        f.note_nat_dst(&target, side, (key.dst_addr, key.dst_port));
        (target, f)
    }

    fn flow_for(&mut self, key: FlowKey, time: SystemTime) -> &mut ActiveFlow {
        let fresh = &mut self.fresh;
        let uuids = &self.uuids;
        self.flows.entry(key).or_insert_with(|| {
            fresh.push(key);
            new_flow(&key, time, uuids.uuid())
        })
    }
}

fn new_flow(key: &FlowKey, time: SystemTime, uuid: u128) -> ActiveFlow {
    let time = Stamp::of(time);
    let mut marks = Marks::default();
    marks.set(Marks::IS_DNS, is_dns(key));
    marks.set(Marks::DIRTY, true);
    ActiveFlow {
        uuid: [(uuid >> 64) as u64, uuid as u64],
        drops: Drops::default(),
        drop_key_reason: 0,
        tcp_flags: 0,
        marks,
        attempts: 0,
        attempt_bytes: 0,
        refusal: None,
        first_seen: time,
        last_seen: time,
        last_emitted: Stamp::NEVER,
        held_since: Stamp::NEVER,
        ifindex: 0,
        netns: 0,
        direction: Crossing::Unknown,
        points: Points::default(),
        cgroup_id: 0,
        extras: None,
    }
}

/// A flow's drop counters by reason, in reason order: usually one, kept in
/// place; more in a slice sized to what it holds.
#[derive(Clone, Debug)]
enum Drops {
    One(u32, DropCounters),
    Many(Box<[(u32, DropCounters)]>),
}

impl Default for Drops {
    fn default() -> Self {
        Drops::Many(Box::default())
    }
}

impl Drops {
    /// The counters of `reason`, created at zero.
    fn counters(&mut self, reason: u32) -> &mut DropCounters {
        if let Drops::One(r, c) = self
            && *r != reason
        {
            *self = Drops::Many(Box::new([(*r, std::mem::take(c))]));
        }
        if let Drops::Many(v) = self
            && v.is_empty()
        {
            *self = Drops::One(reason, DropCounters::default());
        }
        match self {
            Drops::One(_, c) => c,
            Drops::Many(v) => {
                let i = match v.binary_search_by_key(&reason, |(r, _)| *r) {
                    Ok(i) => i,
                    Err(i) => {
                        let mut grown = std::mem::take(v).into_vec();
                        grown.reserve_exact(1);
                        grown.insert(i, (reason, DropCounters::default()));
                        *v = grown.into_boxed_slice();
                        i
                    }
                };
                &mut v[i].1
            }
        }
    }

    fn is_empty(&self) -> bool {
        matches!(self, Drops::Many(v) if v.is_empty())
    }

    fn len(&self) -> usize {
        match self {
            Drops::One(..) => 1,
            Drops::Many(v) => v.len(),
        }
    }

    fn iter(&self) -> impl Iterator<Item = (u32, &DropCounters)> {
        let (one, many) = match self {
            Drops::One(r, c) => (Some((*r, c)), &[][..]),
            Drops::Many(v) => (None, &v[..]),
        };
        one.into_iter().chain(many.iter().map(|(r, c)| (*r, c)))
    }
}

/// Where a flow was seen.
#[derive(Clone, Copy, Debug)]
enum Point {
    KfreeSkb,
    SockOps,
    Tc,
}

impl Point {
    const ALL: [Point; 3] = [Point::KfreeSkb, Point::SockOps, Point::Tc];

    fn name(self) -> &'static str {
        match self {
            Point::KfreeSkb => "kfree_skb",
            Point::SockOps => "sock_ops",
            Point::Tc => "tc",
        }
    }
}

/// A set of [`Point`]s, one bit each.
#[derive(Clone, Copy, Debug, Default)]
struct Points(u8);

impl Points {
    fn insert(&mut self, p: Point) {
        self.0 |= 1 << p as u8;
    }

    /// The names, in name order (as records list them).
    fn names(self) -> impl Iterator<Item = &'static str> {
        Point::ALL
            .into_iter()
            .filter(move |p| self.0 & (1 << *p as u8) != 0)
            .map(Point::name)
    }
}

/// Whether the dropped packet `flow` (TCP flags `tcp`) opens a connection
/// that a REJECT would answer: a SYN, a UDP datagram, an SCTP packet.
fn opens_connection(flow: &FlowKey, tcp: u8) -> bool {
    match flow.proto {
        IPPROTO_TCP => tcp & tcp_flags::SYN != 0 && tcp & tcp_flags::ACK == 0,
        IPPROTO_UDP | IPPROTO_SCTP => true,
        _ => false,
    }
}

/// Whether a drop for `reason` can be a REJECT's: netfilter's drop, or a
/// kernel that does not say (no reasons before 5.17, or none given).
fn may_be_rejected(reasons: &DropReasons, reason: u32) -> bool {
    reason == 0
        || reasons.value("NETFILTER_DROP") == Some(reason)
        || reasons.value("NOT_SPECIFIED") == Some(reason)
}

/// The flow an aggregate entry is reported as: source port 0 (for ICMP,
/// whose type sits in the source port: type 0).
fn aggregate_flow(key: &AggKey) -> FlowKey {
    FlowKey {
        src_addr: key.src_addr,
        dst_addr: key.dst_addr,
        src_port: 0,
        dst_port: key.dst_port,
        proto: key.proto,
        ip_version: key.ip_version,
        _pad: [0; 2],
    }
}

impl FlowAssembler {
    /// Finalise the quietest flows once more than `max_flows` are tracked.
    ///
    /// Evicts down to 1/64 below the bound in one pass, so a table kept full
    /// by a flood of new flows costs one scan per `max_flows / 64` new flows
    /// rather than one per flow.
    fn enforce_bound(
        &mut self,
        reasons: &DropReasons,
        ifnames: &dyn Fn(u32) -> Option<String>,
        out: &mut Vec<FlowRecord>,
    ) {
        if self.flows.len() <= self.config.max_flows {
            return;
        }
        let target = self.config.max_flows - self.config.max_flows / 64;
        let excess = self.flows.len() - target;
        let mut by_age: Vec<(Stamp, FlowKey)> =
            self.flows.iter().map(|(k, f)| (f.last_seen, *k)).collect();
        by_age.select_nth_unstable_by_key(excess - 1, |(t, _)| *t);
        by_age.truncate(excess);
        // Final records of the evicted flows, oldest first.
        by_age.sort_unstable_by_key(|(t, _)| *t);
        for (_, k) in by_age {
            if let Some(f) = self.flows.remove(&k) {
                self.by_client.remove(&k);
                out.push(render(
                    &k,
                    &f,
                    &self.config,
                    &mut self.parts,
                    reasons,
                    ifnames,
                    Lifecycle::Final,
                ));
                let before = self.released.len();
                self.released.extend(f.drop_keys(&k));
                if self.released.len() > before && has_ports(&k) {
                    // Its handshake, as the client's interface saw it
                    // (before DNAT) and as the flow is keyed.
                    self.released_pending.insert(k);
                    if let Some((addr, port)) = f.nat_dst(&k, NatSide::Pre) {
                        self.released_pending.insert(FlowKey {
                            dst_addr: addr,
                            dst_port: port,
                            ..k
                        });
                    }
                }
                self.evicted += 1;
            }
        }
    }
}

/// Which side of the node's DNAT a signal saw a destination on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NatSide {
    /// As the client addressed it: its own interface (TC from the pod),
    /// answers delivered back to it, its socket.
    Pre,
    /// As forwarded: the node's firewall (kfree_skb), the server's interface.
    Post,
}

impl NatSide {
    fn of(direction: Crossing) -> NatSide {
        match direction {
            Crossing::ToPod => NatSide::Post,
            _ => NatSide::Pre,
        }
    }
}

/// The client's end of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ClientEnd {
    addr: [u8; 16],
    port: u16,
    proto: u8,
}

impl ClientEnd {
    fn of(key: &FlowKey) -> ClientEnd {
        ClientEnd {
            addr: key.src_addr,
            port: key.src_port,
            proto: key.proto,
        }
    }
}

/// Flow keys by their client's end: the keys alone, hashed by that end
/// (a map from the end to the key would hold it twice).
#[derive(Default)]
struct ClientIndex {
    keys: HashTable<FlowKey>,
    hasher: DefaultHashBuilder,
}

impl ClientIndex {
    fn get(&self, end: &ClientEnd) -> Option<&FlowKey> {
        self.keys
            .find(self.hasher.hash_one(end), |k| ClientEnd::of(k) == *end)
    }

    /// Indexes `key` by its client's end, in place of the key there.
    fn insert(&mut self, key: FlowKey) {
        let end = ClientEnd::of(&key);
        let hasher = &self.hasher;
        match self.keys.entry(
            hasher.hash_one(end),
            |k| ClientEnd::of(k) == end,
            |k| hasher.hash_one(ClientEnd::of(k)),
        ) {
            hash_table::Entry::Occupied(mut o) => *o.get_mut() = key,
            hash_table::Entry::Vacant(v) => {
                v.insert(key);
            }
        }
    }

    /// Forgets `key` (a finished flow's), not another key its client end
    /// indexes now.
    fn remove(&mut self, key: &FlowKey) {
        if let Ok(o) = self
            .keys
            .find_entry(self.hasher.hash_one(ClientEnd::of(key)), |k| k == key)
        {
            o.remove();
        }
    }

    fn clear(&mut self) {
        self.keys.clear();
    }
}

fn has_ports(key: &FlowKey) -> bool {
    matches!(key.proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP) && key.src_port != 0
}

/// What a drop seen by kfree_skb (as an event or in the table) says about
/// its flow, whichever way it arrived.
fn note_drop(f: &mut ActiveFlow, reply: bool, tcp: u8, ifindex: u32, netns: u32) {
    if reply {
        f.mark(Marks::REPLY_DROPPED);
    }
    f.tcp_flags |= tcp;
    f.points.insert(Point::KfreeSkb);
    if f.ifindex == 0 {
        f.ifindex = ifindex;
        f.netns = netns;
        f.direction = Crossing::FromPod;
    }
}

/// The record's view of a tunnel header from the kernel.
fn outer_header(o: &Outer) -> OuterHeader {
    let as_key = FlowKey {
        src_addr: o.src_addr,
        dst_addr: o.dst_addr,
        ip_version: o.ip_version,
        ..FlowKey::default()
    };
    let (source, destination) = addresses(&as_key);
    let encapsulation = match o.encap {
        encap::VXLAN => Encapsulation::Vxlan,
        encap::GENEVE => Encapsulation::Geneve,
        _ => Encapsulation::Ipip,
    };
    OuterHeader {
        source,
        destination,
        protocol: if o.proto == IPPROTO_UDP {
            "UDP".into()
        } else {
            "IPIP".into()
        },
        port: (o.proto == IPPROTO_UDP).then_some(o.dst_port),
        encapsulation,
    }
}

fn touch(f: &mut ActiveFlow, time: SystemTime) {
    f.mark(Marks::DIRTY);
    f.last_seen = f.last_seen.max(Stamp::of(time));
}

/// The initiator's orientation of a dropped packet's flow, and whether the
/// packet was a reply (a SYN-ACK, or a DNS answer).
fn orient(flow: &FlowKey, tcp: u8) -> (FlowKey, bool) {
    let syn_ack = tcp & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN | tcp_flags::ACK;
    let dns_answer = (flow.proto == IPPROTO_UDP || flow.proto == IPPROTO_TCP)
        && flow.src_port == 53
        && flow.dst_port != 53;
    if syn_ack || dns_answer {
        (flow.reversed(), true)
    } else {
        (*flow, false)
    }
}

fn is_dns(key: &FlowKey) -> bool {
    (key.proto == IPPROTO_UDP || key.proto == IPPROTO_TCP) && key.dst_port == 53
}

fn drop_key((flow, reason): (FlowKey, u32)) -> DropKey {
    DropKey {
        flow,
        reason,
        _pad: 0,
    }
}

/// The refusal's name in records.
pub fn refusal_name(r: &Refusal) -> String {
    match r {
        Refusal::TcpReset => "TCP_RESET".into(),
        Refusal::SctpAbort => "SCTP_ABORT".into(),
        Refusal::IcmpUnreachable { icmp_type, code } => {
            let v6 = *icmp_type == 1;
            let what = match (v6, code) {
                (false, 0) => "NET_UNREACHABLE",
                (false, 1) => "HOST_UNREACHABLE",
                (false, 2) => "PROTOCOL_UNREACHABLE",
                (false, 3) => "PORT_UNREACHABLE",
                (false, 9) | (false, 10) | (false, 13) => "ADMIN_PROHIBITED",
                (true, 0) => "NO_ROUTE",
                (true, 1) => "ADMIN_PROHIBITED",
                (true, 3) => "ADDRESS_UNREACHABLE",
                (true, 4) => "PORT_UNREACHABLE",
                (true, 5) | (true, 6) => "POLICY_REJECTED",
                _ => "UNREACHABLE",
            };
            format!("{}_{what}", if v6 { "ICMPV6" } else { "ICMP" })
        }
    }
}

/// The verdict from everything seen: an active refusal (RST, ICMP
/// unreachable, ABORT) is what the client experienced, so it wins over the
/// drop that produced it (a firewall REJECT both drops and answers); then a
/// drop on this node; else the handshake simply went unanswered.
fn verdict_of(f: &ActiveFlow) -> Verdict {
    if f.is(Marks::ESTABLISHED) {
        Verdict::PolicyNotEnforced
    } else if f.refusal.is_some() {
        Verdict::Refused
    } else if !f.drops.is_empty() {
        Verdict::Dropped
    } else {
        Verdict::TimedOut
    }
}

/// Whether a flow can be a conversation between endpoints: not addressed
/// to a multicast or broadcast group, not from the unspecified address, and
/// not ICMPv6 neighbour discovery or multicast listener messages.
pub fn is_pod_flow(k: &FlowKey) -> bool {
    use std::net::IpAddr;
    // ICMPv6 types (RFC 4443, 4861, 3810): MLD query, report, done (130-132),
    // router and neighbour solicitation/advertisement, redirect (133-137),
    // MLDv2 report (143). The key holds an ICMP type in its source port.
    const ICMPV6_LINK_LOCAL_TYPES: [u16; 9] = [130, 131, 132, 133, 134, 135, 136, 137, 143];
    if k.proto == IPPROTO_ICMPV6 && ICMPV6_LINK_LOCAL_TYPES.contains(&k.src_port) {
        return false;
    }
    let (src, dst) = addresses(k);
    let group = match dst {
        IpAddr::V4(d) => d.is_multicast() || d.is_broadcast(),
        IpAddr::V6(d) => d.is_multicast(),
    };
    !group && !src.is_unspecified()
}

fn render(
    key: &FlowKey,
    f: &ActiveFlow,
    config: &AssemblerConfig,
    parts: &mut RecordParts,
    reasons: &DropReasons,
    ifnames: &dyn Fn(u32) -> Option<String>,
    lifecycle: Lifecycle,
) -> FlowRecord {
    // The destination as forwarded when known (the backend), else as
    // addressed; the addressed one is kept as `original_destination`.
    let flow_key = key;
    let mut key = *key;
    let mut original = None;
    if let Some((addr, port)) = f.nat_dst(flow_key, NatSide::Post) {
        if let Some(pre) = f
            .nat_dst(flow_key, NatSide::Pre)
            .filter(|p| *p != (addr, port))
        {
            let mut pre_key = *flow_key;
            (pre_key.dst_addr, pre_key.dst_port) = pre;
            original = Some(OriginalDestination {
                ip: addresses(&pre_key).1,
                port: pre.1,
            });
        }
        (key.dst_addr, key.dst_port) = (addr, port);
    }
    let f_key = key;
    let (src, dst) = addresses(&f_key);
    let flags = TcpFlags::from_bits(f.tcp_flags);
    let ports = Ports {
        source_port: f_key.src_port,
        destination_port: f_key.dst_port,
        flags: None,
    };
    let l4 = match flow_key.proto {
        IPPROTO_TCP => L4::Tcp(Ports {
            flags: Some(flags.clone()),
            ..ports
        }),
        IPPROTO_UDP => L4::Udp(ports),
        IPPROTO_SCTP => L4::Sctp(ports),
        IPPROTO_ICMP => L4::Icmpv4(Icmp {
            icmp_type: flow_key.src_port as u8,
            code: flow_key.dst_port as u8,
        }),
        IPPROTO_ICMPV6 => L4::Icmpv6(Icmp {
            icmp_type: flow_key.src_port as u8,
            code: flow_key.dst_port as u8,
        }),
        other => L4::Other { protocol: other },
    };
    let has_ports = l4.ports().is_some();
    // An aggregate's source ports are many: its endpoint names none.
    let source_port = (has_ports && f.aggregated_flows().is_none()).then_some(f_key.src_port);
    let (packets, bytes) = if f.drops.is_empty() {
        (f.attempts, f.attempt_bytes)
    } else {
        f.drops
            .iter()
            .map(|(_, c)| c)
            .fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes))
    };
    // The main reason: the one that dropped the most packets.
    let main_reason = f
        .drops
        .iter()
        .max_by_key(|(_, c)| c.packets)
        .map(|(r, _)| r);
    let drop_reason_desc = main_reason.map(|r| parts.reason(reasons, r));
    let drop_reasons = if f.drops.len() > 1 {
        f.drops.iter().map(|(r, _)| reasons.name(r)).collect()
    } else {
        Vec::new()
    };
    let verdict = verdict_of(f);
    // A plain drop's summary names no counts: shared.
    let summary =
        if verdict == Verdict::Dropped && f.aggregated_flows().is_none() && !f.is(Marks::TIMED_OUT)
        {
            parts.plain_summary(flow_key, f, || {
                summary(f, verdict, &l4, &flags, packets, config)
            })
        } else {
            summary(f, verdict, &l4, &flags, packets, config).into()
        };
    let event_type = match (verdict, main_reason) {
        (Verdict::Dropped, Some(r)) => EventType {
            kind: 1,
            sub_type: r as i32,
        },
        _ => EventType {
            kind: 4,
            sub_type: 0,
        },
    };
    let traffic_direction = match (verdict, f.direction) {
        // A handshake completed into the server's pod: its ingress.
        (Verdict::PolicyNotEnforced, _) => 0,
        // Seen leaving a pod, or its connect never answered: the source's
        // egress, until policy attribution says which side denies.
        (_, Crossing::FromPod | Crossing::ToPod) => 1,
        (_, Crossing::Unknown) => 2,
    };
    FlowRecord {
        time: f.last_seen.time().into(),
        uuid: uuid::Uuid::from_u64_pair(f.uuid[0], f.uuid[1]).to_string(),
        verdict,
        // Also on a REFUSED flow whose refusal came with a drop (a REJECT).
        drop_reason_desc,
        ip: IpInfo {
            source: src,
            destination: dst,
            ip_version: if flow_key.ip_version == IP_V4 {
                IPV4.clone()
            } else {
                IPV6.clone()
            },
        },
        l4,
        source: Endpoint::unresolved(src, source_port),
        destination: Endpoint::unresolved(dst, has_ports.then_some(f_key.dst_port)),
        original_destination: original,
        outer: f.outer().map(outer_header),
        flow_type: L3_L4.clone(),
        node_name: parts.node_name.clone(),
        event_type,
        traffic_direction: DIRECTIONS[traffic_direction].clone(),
        is_reply: f.is(Marks::REPLY_DROPPED)
            && f.attempts == 0
            && !f.drops.is_empty()
            && f.tcp_flags & tcp_flags::SYN == 0,
        // An interface is (network namespace, index): only this
        // namespace's indexes have names here.
        interface: (f.ifindex != 0).then(|| Interface {
            index: f.ifindex,
            name: (config.own_netns == 0 || f.netns == 0 || f.netns == config.own_netns)
                .then(|| ifnames(f.ifindex))
                .flatten()
                .unwrap_or_default(),
        }),
        summary,
        egress_allowed_by: Default::default(),
        ingress_allowed_by: Default::default(),
        egress_denied_by: Default::default(),
        ingress_denied_by: Default::default(),
        lifecycle,
        packets,
        bytes,
        first_seen: f.first_seen.time().into(),
        last_seen: f.last_seen.time().into(),
        drop_reasons,
        refusal: f.refusal.as_ref().map(refusal_name),
        timed_out: f.is(Marks::TIMED_OUT),
        is_dns: f.is(Marks::IS_DNS),
        observation_points: parts.points(f.points),
        cgroup_id: f.cgroup_id(),
        explanation: None,
        near_misses: Default::default(),
        unenriched: false,
        aggregate: f.aggregated_flows().map(|flows| Aggregate { flows }),
        staged: None,
    }
}

fn summary(
    f: &ActiveFlow,
    verdict: Verdict,
    l4: &L4,
    flags: &TcpFlags,
    packets: u64,
    config: &AssemblerConfig,
) -> String {
    let mut s = match l4 {
        L4::Tcp(_) => format!("TCP Flags: {}", flags.names().join(", ")),
        L4::Icmpv4(i) | L4::Icmpv6(i) => format!(
            "{} type {} code {}",
            l4.protocol_name(),
            i.icmp_type,
            i.code
        ),
        other => other.protocol_name(),
    };
    if f.is(Marks::IS_DNS) {
        s = format!("DNS query ({s})");
    }
    match verdict {
        Verdict::Dropped => {
            if let Some(flows) = f.aggregated_flows() {
                s.push_str(&format!(
                    "; {flows} flow{} from any source port, {packets} packets dropped",
                    if flows == 1 { "" } else { "s" }
                ));
            }
            if f.is(Marks::TIMED_OUT) {
                s.push_str(&format!("; {packets} packets dropped, never answered"));
            }
        }
        Verdict::TimedOut => s.push_str(&format!(
            "; {} attempt{} unanswered for {}s",
            f.attempts,
            if f.attempts == 1 { "" } else { "s" },
            config.connect_timeout.as_secs()
        )),
        Verdict::Refused => {
            if let Some(r) = &f.refusal {
                s.push_str(&format!("; refused with {}", refusal_name(r)));
            }
        }
        Verdict::PolicyNotEnforced => s.push_str("; connection established"),
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use netwatch_common::IP_V4;

    fn reasons() -> DropReasons {
        DropReasons::from_pairs([(12, "SKB_DROP_REASON_NETFILTER_DROP".to_string())])
    }

    fn key(sport: u16, dport: u16, proto: u8) -> FlowKey {
        let mut k = FlowKey {
            src_port: sport,
            dst_port: dport,
            proto,
            ip_version: IP_V4,
            ..FlowKey::default()
        };
        k.src_addr[..4].copy_from_slice(&[10, 0, 0, 1]);
        k.dst_addr[..4].copy_from_slice(&[10, 0, 0, 2]);
        k
    }

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + s)
    }

    fn no_names(_: u32) -> Option<String> {
        None
    }

    fn drop_event(k: FlowKey, at: SystemTime) -> Signal {
        Signal::Kernel(KernelEvent::Drop {
            time: at,
            flow: k,
            reason: 12,
            ifindex: 7,
            netns: 1,
            bytes: 60,
            tcp_flags: tcp_flags::SYN,
            outer: None,
        })
    }

    /// A table scan's exact counts of `k`'s drops (reason 12) between `first` and `last`.
    fn drop_counts(k: FlowKey, stats: DropStats, first: SystemTime, last: SystemTime) -> Signal {
        Signal::DropCounts {
            key: DropKey {
                flow: k,
                reason: 12,
                _pad: 0,
            },
            stats,
            first,
            last,
        }
    }

    /// An entry of the kernel's drop aggregate: `flows` flows from 10.0.0.1
    /// to 10.0.0.2:8080, `packets` SYNs.
    fn aggregate_counts(flows: u64, packets: u64, first: u64, last: u64) -> Signal {
        let k = key(0, 8080, IPPROTO_TCP);
        Signal::AggregateCounts {
            key: AggKey {
                src_addr: k.src_addr,
                dst_addr: k.dst_addr,
                dst_port: 8080,
                proto: IPPROTO_TCP,
                ip_version: IP_V4,
                reason: 12,
            },
            stats: AggStats {
                packets,
                bytes: packets * 60,
                flows,
                tcp_flags: tcp_flags::SYN,
                ifindex: 7,
                ..AggStats::default()
            },
            first: t(first),
            last: t(last),
        }
    }

    #[test]
    fn an_aggregate_is_one_dropped_record_that_says_how_many_flows_it_stands_for() {
        let mut a = FlowAssembler::new(AssemblerConfig {
            update_interval: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(10),
            ..Default::default()
        });
        let out = a.handle(aggregate_counts(40, 41, 0, 0), t(0), &reasons(), &no_names);
        assert_eq!(out.len(), 1);
        let r = &out[0];
        assert_eq!(r.verdict, Verdict::Dropped);
        assert_eq!(r.lifecycle, Lifecycle::New);
        assert_eq!(r.aggregate, Some(Aggregate { flows: 40 }));
        assert_eq!((r.packets, r.bytes), (41, 41 * 60));
        assert_eq!(r.l4.ports().map(|p| p.source_port), Some(0));
        assert_eq!(r.source.port, None, "an aggregate has no one source port");
        assert_eq!(
            r.summary,
            "TCP Flags: SYN; 40 flows from any source port, 41 packets dropped"
        );
        assert_eq!(a.active_aggregates(), 1);
        // The same counts again: nothing new to say.
        assert!(
            a.handle(aggregate_counts(40, 41, 0, 0), t(1), &reasons(), &no_names)
                .is_empty()
        );
        assert!(a.tick(t(2), &reasons(), &no_names).records.is_empty());
        // More flows: an update, same uuid.
        a.handle(aggregate_counts(90, 95, 0, 2), t(2), &reasons(), &no_names);
        let out = a.tick(t(3), &reasons(), &no_names);
        assert_eq!(out.records.len(), 1);
        assert_eq!(out.records[0].uuid, r.uuid);
        assert_eq!(out.records[0].aggregate, Some(Aggregate { flows: 90 }));
        assert_eq!(out.records[0].lifecycle, Lifecycle::Update);
        // Quiet: a final record, and the kernel entry is handed back.
        let out = a.tick(t(13), &reasons(), &no_names);
        assert_eq!(out.records.len(), 1);
        assert_eq!(out.records[0].lifecycle, Lifecycle::Final);
        assert_eq!(out.finished_aggregates.len(), 1);
        assert_eq!(a.active_aggregates(), 0);
    }

    fn refusal(k: FlowKey, at: SystemTime) -> Signal {
        Signal::Kernel(KernelEvent::Refused {
            time: at,
            flow: k,
            how: Refusal::IcmpUnreachable {
                icmp_type: 3,
                code: 3,
            },
            ifindex: 7,
            direction: Crossing::ToPod,
            attempts: 1,
        })
    }

    #[test]
    fn a_rejected_attempt_whose_answer_comes_after_the_drop_is_one_refused_record() {
        let mut a = FlowAssembler::new(AssemblerConfig::default());
        let k = key(40010, 80, IPPROTO_TCP);
        let at = t(0);
        assert!(
            a.handle(drop_event(k, at), at, &reasons(), &no_names)
                .is_empty(),
            "the first record of a firewall's drop waits for a refusal"
        );
        let later = at + Duration::from_millis(50);
        let out = a.handle(refusal(k, later), later, &reasons(), &no_names);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].verdict, Verdict::Refused);
        assert_eq!(out[0].lifecycle, Lifecycle::New);
        // Nothing more to say at the next tick: the record went out.
        let tick = a.tick(at + Duration::from_secs(1), &reasons(), &no_names);
        assert!(tick.records.is_empty(), "{:?}", tick.records);
    }

    #[test]
    fn a_drop_no_refusal_follows_goes_out_at_the_first_tick_past_the_grace() {
        let mut a = FlowAssembler::new(AssemblerConfig::default());
        let k = key(40011, 80, IPPROTO_TCP);
        let at = t(0);
        assert!(
            a.handle(drop_event(k, at), at, &reasons(), &no_names)
                .is_empty()
        );
        let early = a.tick(at + Duration::from_millis(100), &reasons(), &no_names);
        assert!(early.records.is_empty(), "{:?}", early.records);
        let due = a.tick(at + Duration::from_millis(250), &reasons(), &no_names);
        assert_eq!(due.records.len(), 1);
        assert_eq!(due.records[0].verdict, Verdict::Dropped);
        assert_eq!(due.records[0].lifecycle, Lifecycle::New);
        // A refusal after the record: an update, same flow.
        let late = at + Duration::from_millis(300);
        assert!(
            a.handle(refusal(k, late), late, &reasons(), &no_names)
                .is_empty()
        );
        let upd = a.tick(at + Duration::from_secs(6), &reasons(), &no_names);
        assert_eq!(upd.records.len(), 1);
        assert_eq!(upd.records[0].uuid, due.records[0].uuid);
        assert_eq!(upd.records[0].verdict, Verdict::Refused);
    }

    #[test]
    fn drops_a_reject_cannot_have_made_go_out_at_once() {
        let reasons = DropReasons::from_pairs([
            (12, "SKB_DROP_REASON_NETFILTER_DROP".to_string()),
            (70, "SKB_DROP_REASON_TC_INGRESS".to_string()),
        ]);
        let mut a = FlowAssembler::new(AssemblerConfig::default());
        // Another reason than netfilter's.
        let k = key(40012, 80, IPPROTO_TCP);
        let Signal::Kernel(KernelEvent::Drop {
            time,
            flow,
            ifindex,
            netns,
            bytes,
            tcp_flags,
            outer,
            ..
        }) = drop_event(k, t(0))
        else {
            unreachable!()
        };
        let tc = Signal::Kernel(KernelEvent::Drop {
            time,
            flow,
            reason: 70,
            ifindex,
            netns,
            bytes,
            tcp_flags,
            outer,
        });
        let out = a.handle(tc, t(0), &reasons, &no_names);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].drop_reason_desc.as_deref(), Some("TC_INGRESS"));
        // Not a connection attempt: an ACK of an established connection.
        let k = key(40013, 80, IPPROTO_TCP);
        let ack = Signal::Kernel(KernelEvent::Drop {
            time: t(0),
            flow: k,
            reason: 12,
            ifindex: 7,
            netns: 1,
            bytes: 52,
            tcp_flags: tcp_flags::ACK,
            outer: None,
        });
        assert_eq!(a.handle(ack, t(0), &reasons, &no_names).len(), 1);
    }

    #[test]
    fn first_drop_is_emitted_at_once_with_reason_name() {
        let mut a = FlowAssembler::new(AssemblerConfig {
            node_name: "n1".into(),
            refusal_grace: Duration::ZERO,
            ..Default::default()
        });
        let out = a.handle(
            drop_event(key(40000, 8080, IPPROTO_TCP), t(0)),
            t(0),
            &reasons(),
            &no_names,
        );
        assert_eq!(out.len(), 1);
        let r = &out[0];
        assert_eq!(r.verdict, Verdict::Dropped);
        assert_eq!(r.drop_reason_desc.as_deref(), Some("NETFILTER_DROP"));
        assert_eq!(r.lifecycle, Lifecycle::New);
        assert_eq!(
            r.l4,
            L4::Tcp(Ports {
                source_port: 40000,
                destination_port: 8080,
                flags: Some(TcpFlags {
                    syn: true,
                    ..Default::default()
                })
            })
        );
        assert_eq!(r.node_name, "n1");
        assert_eq!(r.summary, "TCP Flags: SYN");
    }

    #[test]
    fn neighbour_discovery_and_multicast_drops_are_not_pod_flows() {
        let mut a = FlowAssembler::new(AssemblerConfig::default());
        let v6 = |src: &str, dst: &str, proto: u8, sport: u16, dport: u16| {
            let mut k = FlowKey {
                src_port: sport,
                dst_port: dport,
                proto,
                ip_version: netwatch_common::IP_V6,
                ..FlowKey::default()
            };
            k.src_addr = src.parse::<std::net::Ipv6Addr>().unwrap().octets();
            k.dst_addr = dst.parse::<std::net::Ipv6Addr>().unwrap().octets();
            k
        };
        let noise = [
            v6("::", "ff02::16", IPPROTO_ICMPV6, 143, 0), // MLDv2 report
            v6("::", "ff02::1:ff00:2", IPPROTO_ICMPV6, 135, 0), // DAD solicitation
            v6("fe80::1", "fd00::9", IPPROTO_ICMPV6, 135, 0), // unicast NUD
            v6("fe80::1", "ff02::fb", IPPROTO_UDP, 5353, 5353), // mDNS
        ];
        for k in noise {
            assert!(!is_pod_flow(&k), "{k:?}");
            assert!(
                a.handle(drop_event(k, t(0)), t(0), &reasons(), &no_names)
                    .is_empty(),
                "{k:?}"
            );
        }
        let mut bcast = key(68, 67, IPPROTO_UDP);
        bcast.dst_addr[..4].copy_from_slice(&[255, 255, 255, 255]);
        assert!(!is_pod_flow(&bcast));
        assert_eq!(a.active_flows(), 0);
        // A pod's own ICMPv6 echo, or TCP over IPv6, stays.
        assert!(is_pod_flow(&v6(
            "fd00::2",
            "fd00::9",
            IPPROTO_ICMPV6,
            128,
            0
        )));
        assert!(is_pod_flow(&v6(
            "fd00::2",
            "fd00::9",
            IPPROTO_TCP,
            40000,
            443
        )));
        assert!(is_pod_flow(&key(40000, 8080, IPPROTO_TCP)));
    }

    #[test]
    fn a_flow_whose_counts_stop_changing_still_ends_with_a_final_record() {
        let mut a = FlowAssembler::new(AssemblerConfig {
            update_interval: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(10),
            refusal_grace: Duration::ZERO,
            ..Default::default()
        });
        let k = key(40000, 8080, IPPROTO_TCP);
        let new = a.handle(drop_event(k, t(0)), t(0), &reasons(), &no_names);
        let stats = DropStats {
            packets: 4,
            bytes: 240,
            tcp_flags: tcp_flags::SYN,
            ifindex: 7,
            ..DropStats::default()
        };
        a.handle(
            drop_counts(k, stats, t(0), t(2)),
            t(2),
            &reasons(),
            &no_names,
        );
        // The update carries the final counts; later scans see no change.
        let update = a.tick(t(3), &reasons(), &no_names).records;
        assert_eq!(update.len(), 1);
        assert_eq!(
            (update[0].lifecycle, update[0].packets),
            (Lifecycle::Update, 4)
        );
        a.handle(
            drop_counts(k, stats, t(0), t(2)),
            t(6),
            &reasons(),
            &no_names,
        );
        assert!(a.tick(t(6), &reasons(), &no_names).records.is_empty());
        let last = a.tick(t(13), &reasons(), &no_names).records;
        assert_eq!(
            last.len(),
            1,
            "quiet for the idle timeout: its FINAL record"
        );
        assert_eq!(
            (last[0].lifecycle, last[0].packets, last[0].uuid.as_str()),
            (Lifecycle::Final, 4, new[0].uuid.as_str())
        );
        assert_eq!(a.active_flows(), 0);
    }

    #[test]
    fn drop_then_timeout_is_one_dropped_flow_with_exact_counts() {
        let cfg = AssemblerConfig {
            update_interval: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            refusal_grace: Duration::ZERO,
            ..Default::default()
        };
        let mut a = FlowAssembler::new(cfg);
        let k = key(40000, 8080, IPPROTO_TCP);
        let first = a.handle(drop_event(k, t(0)), t(0), &reasons(), &no_names);
        let uuid = first[0].uuid.clone();
        // Table scan: three SYNs dropped.
        let stats = DropStats {
            packets: 3,
            bytes: 180,
            tcp_flags: tcp_flags::SYN,
            ifindex: 7,
            ..DropStats::default()
        };
        a.handle(
            drop_counts(k, stats, t(0), t(3)),
            t(3),
            &reasons(),
            &no_names,
        );
        let pending = PendingConn {
            packets: 3,
            bytes: 180,
            kind: pending_kind::TCP_SYN,
            ..PendingConn::default()
        };
        let none = a.handle(
            Signal::Unanswered {
                flow: k,
                pending,
                first: t(0),
                last: t(3),
            },
            t(4),
            &reasons(),
            &no_names,
        );
        assert!(none.is_empty(), "no second first-record");
        // Rate limit: nothing before update_interval, an update after.
        assert!(a.tick(t(4), &reasons(), &no_names).records.is_empty());
        let upd = a.tick(t(6), &reasons(), &no_names).records;
        assert_eq!(upd.len(), 1);
        let r = &upd[0];
        assert_eq!(
            (r.uuid.as_str(), r.verdict, r.packets, r.bytes, r.timed_out),
            (uuid.as_str(), Verdict::Dropped, 3, 180, true)
        );
        assert_eq!(r.lifecycle, Lifecycle::Update);
        // Quiet: forgotten, kernel entries handed back for removal.
        let fin = a.tick(t(40), &reasons(), &no_names);
        assert_eq!(fin.records.len(), 1, "the flow ends with a FINAL record");
        assert_eq!(
            (fin.records[0].lifecycle, fin.records[0].packets),
            (Lifecycle::Final, 3),
            "with the counts of its last update"
        );
        assert!(
            fin.finished_drop_keys
                .iter()
                .any(|d| d.flow == k && d.reason == 12)
        );
        assert_eq!(a.active_flows(), 0);
    }

    #[test]
    fn unanswered_handshake_alone_is_timed_out() {
        let mut a = FlowAssembler::new(AssemblerConfig::default());
        let k = key(40001, 53, IPPROTO_UDP);
        let pending = PendingConn {
            packets: 2,
            bytes: 120,
            kind: pending_kind::DNS_QUERY,
            direction: netwatch_common::direction::FROM_POD,
            ifindex: 4,
            ..PendingConn::default()
        };
        let out = a.handle(
            Signal::Unanswered {
                flow: k,
                pending,
                first: t(0),
                last: t(1),
            },
            t(4),
            &reasons(),
            &no_names,
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].verdict, Verdict::TimedOut);
        assert!(out[0].is_dns);
        assert_eq!(out[0].packets, 2);
        assert_eq!(out[0].drop_reason_desc, None);
        assert_eq!(out[0].traffic_direction, "EGRESS");
        assert!(
            out[0].summary.starts_with("DNS query (UDP)"),
            "{}",
            out[0].summary
        );
    }

    #[test]
    fn rst_is_refused_and_icmp_codes_are_named() {
        let mut a = FlowAssembler::new(AssemblerConfig::default());
        let k = key(40002, 9, IPPROTO_TCP);
        let out = a.handle(
            Signal::Kernel(KernelEvent::Refused {
                time: t(0),
                flow: k,
                how: Refusal::TcpReset,
                ifindex: 3,
                direction: Crossing::ToPod,
                attempts: 1,
            }),
            t(0),
            &reasons(),
            &no_names,
        );
        assert_eq!(out[0].verdict, Verdict::Refused);
        assert_eq!(out[0].refusal.as_deref(), Some("TCP_RESET"));
        assert_eq!(
            refusal_name(&Refusal::IcmpUnreachable {
                icmp_type: 3,
                code: 3
            }),
            "ICMP_PORT_UNREACHABLE"
        );
        assert_eq!(
            refusal_name(&Refusal::IcmpUnreachable {
                icmp_type: 1,
                code: 1
            }),
            "ICMPV6_ADMIN_PROHIBITED"
        );
    }

    #[test]
    fn socket_cgroup_joins_the_flow_seen_later() {
        let mut a = FlowAssembler::new(AssemblerConfig {
            refusal_grace: Duration::ZERO,
            ..Default::default()
        });
        let k = key(40003, 80, IPPROTO_TCP);
        a.handle(
            Signal::Kernel(KernelEvent::SockRetransmit {
                time: t(1),
                flow: k,
                cgroup_id: 4242,
            }),
            t(1),
            &reasons(),
            &no_names,
        );
        let out = a.handle(drop_event(k, t(0)), t(1), &reasons(), &no_names);
        assert_eq!(out[0].cgroup_id, Some(4242));
        assert!(out[0].observation_points.contains(&"sock_ops".to_string()));
    }

    #[test]
    fn lost_ring_buffer_event_is_recovered_from_the_table() {
        let mut a = FlowAssembler::new(AssemblerConfig::default());
        let k = key(40004, 443, IPPROTO_TCP);
        let stats = DropStats {
            packets: 5,
            bytes: 300,
            tcp_flags: tcp_flags::SYN,
            ..DropStats::default()
        };
        let out = a.handle(
            drop_counts(k, stats, t(0), t(2)),
            t(2),
            &reasons(),
            &no_names,
        );
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].verdict, out[0].packets), (Verdict::Dropped, 5));
    }

    #[test]
    fn interfaces_are_named_only_in_the_agents_own_network_namespace() {
        let names = |i: u32| (i == 7).then(|| "veth0a1b2c3d".to_string());
        let config = AssemblerConfig {
            own_netns: 1,
            refusal_grace: Duration::ZERO,
            ..Default::default()
        };
        // Index 7 in this node's namespace (the drop event's netns is 1).
        let mut a = FlowAssembler::new(config.clone());
        let out = a.handle(
            drop_event(key(40010, 80, IPPROTO_TCP), t(0)),
            t(0),
            &reasons(),
            &names,
        );
        let i = out[0].interface.as_ref().unwrap();
        assert_eq!((i.index, i.name.as_str()), (7, "veth0a1b2c3d"));
        // The same index in a pod's namespace is another interface: unnamed.
        let mut a = FlowAssembler::new(config);
        let Signal::Kernel(KernelEvent::Drop {
            time,
            flow,
            reason,
            ifindex,
            bytes,
            tcp_flags,
            outer,
            ..
        }) = drop_event(key(40011, 80, IPPROTO_TCP), t(0))
        else {
            unreachable!()
        };
        let in_pod = Signal::Kernel(KernelEvent::Drop {
            time,
            flow,
            reason,
            ifindex,
            netns: 99,
            bytes,
            tcp_flags,
            outer,
        });
        let out = a.handle(in_pod, t(0), &reasons(), &names);
        let i = out[0].interface.as_ref().unwrap();
        assert_eq!((i.index, i.name.as_str()), (7, ""));
    }

    #[test]
    fn reply_drop_merges_into_the_initiators_flow() {
        let mut a = FlowAssembler::new(AssemblerConfig::default());
        let k = key(40005, 80, IPPROTO_TCP);
        a.handle(drop_event(k, t(0)), t(0), &reasons(), &no_names);
        let synack = Signal::Kernel(KernelEvent::Drop {
            time: t(1),
            flow: k.reversed(),
            reason: 12,
            ifindex: 7,
            netns: 1,
            bytes: 60,
            tcp_flags: tcp_flags::SYN | tcp_flags::ACK,
            outer: None,
        });
        let out = a.handle(synack, t(1), &reasons(), &no_names);
        assert!(out.is_empty(), "same flow, no new first record");
        assert_eq!(a.active_flows(), 1);
    }

    #[test]
    fn connection_seen_before_and_after_dnat_is_one_flow() {
        let mut a = FlowAssembler::new(AssemblerConfig::default());
        // The client's SYN to the service IP goes unanswered at its interface...
        let mut svc = key(40006, 80, IPPROTO_TCP);
        svc.dst_addr[..4].copy_from_slice(&[10, 96, 0, 10]);
        let pending = PendingConn {
            packets: 2,
            kind: pending_kind::TCP_SYN,
            direction: netwatch_common::direction::FROM_POD,
            ..PendingConn::default()
        };
        a.handle(
            Signal::Unanswered {
                flow: svc,
                pending,
                first: t(0),
                last: t(1),
            },
            t(3),
            &reasons(),
            &no_names,
        );
        // ...and the node's firewall dropped it after DNAT, to the backend pod.
        let mut backend = key(40006, 8080, IPPROTO_TCP);
        backend.dst_addr[..4].copy_from_slice(&[10, 0, 0, 9]);
        a.handle(drop_event(backend, t(0)), t(3), &reasons(), &no_names);
        assert_eq!(a.active_flows(), 1, "one connection, one flow");
        let out = a.finish_all(&reasons(), &no_names);
        let r = &out[0];
        assert_eq!(
            (r.verdict, r.ip.destination.to_string()),
            (Verdict::Dropped, "10.0.0.9".to_string())
        );
        let orig = r
            .original_destination
            .as_ref()
            .expect("the address the client used");
        assert_eq!(
            (orig.ip.to_string(), orig.port),
            ("10.96.0.10".to_string(), 80)
        );
        assert_eq!(r.l4.ports().map(|p| p.destination_port), Some(8080));
    }

    /// A client port reused towards other destinations, each dropped on
    /// the same side of DNAT (a scan from few source ports), is one flow
    /// per destination, not one connection seen through DNAT.
    #[test]
    fn a_client_port_reused_towards_other_destinations_is_other_flows() {
        let mut a = FlowAssembler::new(AssemblerConfig::default());
        for port in [8080, 8081, 8082] {
            a.handle(
                drop_event(key(40010, port, IPPROTO_TCP), t(0)),
                t(1),
                &reasons(),
                &no_names,
            );
        }
        assert_eq!(a.active_flows(), 3, "one flow per destination port");
        let out = a.finish_all(&reasons(), &no_names);
        let mut ports: Vec<u16> = out
            .iter()
            .filter_map(|r| r.l4.ports().map(|p| p.destination_port))
            .collect();
        ports.sort_unstable();
        assert_eq!(ports, [8080, 8081, 8082]);
        assert!(out.iter().all(|r| r.original_destination.is_none()));
    }

    #[test]
    fn a_denied_handshake_that_completed_is_one_record() {
        let a = FlowAssembler::new(AssemblerConfig::default());
        let r = a.established_record(
            key(40007, 5432, IPPROTO_TCP),
            t(0),
            3,
            Crossing::ToPod,
            &reasons(),
            &no_names,
        );
        assert_eq!(
            (r.verdict, r.lifecycle, r.traffic_direction.as_str()),
            (Verdict::PolicyNotEnforced, Lifecycle::New, "INGRESS")
        );
        assert!(r.summary.contains("SYN, ACK"));
    }

    /// An assembler bounded at 2 flows, after dropped flows from 5 client
    /// ports (41000 to 41004, one second apart): the first 3 evicted.
    fn bounded_by_two_after_five_drops() -> FlowAssembler {
        let mut a = FlowAssembler::new(AssemblerConfig {
            max_flows: 2,
            ..Default::default()
        });
        for p in 0..5 {
            a.handle(
                drop_event(key(41000 + p, 80, IPPROTO_TCP), t(u64::from(p))),
                t(u64::from(p)),
                &reasons(),
                &no_names,
            );
        }
        a
    }

    #[test]
    fn table_is_bounded() {
        let a = bounded_by_two_after_five_drops();
        assert_eq!(a.active_flows(), 2);
        assert_eq!(a.evicted, 3);
    }

    /// A dropped flow evicted before its connect timeout was reported
    /// DROPPED: its unanswered handshake (5.10's drop hook leaves it in the
    /// kernel's table) does not come back as a TIMED_OUT flow, and the
    /// tick hands the handshake's entry back for removal.
    #[test]
    fn an_evicted_dropped_flow_does_not_come_back_timed_out() {
        let mut a = bounded_by_two_after_five_drops();
        let evicted = key(41000, 80, IPPROTO_TCP);
        let pending = PendingConn {
            packets: 1,
            kind: pending_kind::TCP_SYN,
            direction: netwatch_common::direction::FROM_POD,
            ..PendingConn::default()
        };
        let records = a.handle(
            Signal::Unanswered {
                flow: evicted,
                pending,
                first: t(0),
                last: t(0),
            },
            t(6),
            &reasons(),
            &no_names,
        );
        assert!(records.is_empty(), "{records:?}");
        assert_eq!(a.active_flows(), 2, "no flow made again");
        let out = a.tick(t(7), &reasons(), &no_names);
        assert!(out.finished_pending_keys.contains(&evicted));
        assert!(out.records.iter().all(|r| r.verdict != Verdict::TimedOut));
    }
    #[test]
    fn a_full_table_evicts_the_quietest_flows_in_a_batch() {
        let mut a = FlowAssembler::new(AssemblerConfig {
            max_flows: 128,
            ..Default::default()
        });
        for p in 0..129 {
            a.handle(
                drop_event(key(41000 + p, 80, IPPROTO_TCP), t(u64::from(p))),
                t(u64::from(p)),
                &reasons(),
                &no_names,
            );
        }
        // 129 > 128: down to 126 (1/64 below the bound) in one pass.
        assert_eq!((a.active_flows(), a.evicted), (126, 3));
        for p in 0..3 {
            assert!(
                !a.flows.contains_key(&key(41000 + p, 80, IPPROTO_TCP)),
                "the quietest go first"
            );
        }
        // The next two new flows fit without another pass.
        for p in 129..131 {
            a.handle(
                drop_event(key(41000 + p, 80, IPPROTO_TCP), t(u64::from(p))),
                t(u64::from(p)),
                &reasons(),
                &no_names,
            );
        }
        assert_eq!((a.active_flows(), a.evicted), (128, 3));
    }

    #[test]
    fn an_evicted_flow_is_not_revived_by_the_next_table_scan() {
        let mut a = FlowAssembler::new(AssemblerConfig {
            max_flows: 1,
            ..Default::default()
        });
        let old = key(41000, 80, IPPROTO_TCP);
        let stats = DropStats {
            packets: 4,
            bytes: 240,
            tcp_flags: tcp_flags::SYN,
            ..DropStats::default()
        };
        let first = a.handle(
            drop_counts(old, stats, t(0), t(1)),
            t(1),
            &reasons(),
            &no_names,
        );
        assert_eq!(first.len(), 1);
        // A newer flow pushes it out of the table.
        a.handle(
            drop_event(key(41001, 80, IPPROTO_TCP), t(2)),
            t(2),
            &reasons(),
            &no_names,
        );
        assert_eq!(a.evicted, 1);
        // The kernel's table still holds its counts until told otherwise:
        // already reported, they are no new flow.
        let again = a.handle(
            drop_counts(old, stats, t(0), t(1)),
            t(3),
            &reasons(),
            &no_names,
        );
        assert!(again.is_empty(), "reported again: {again:?}");
        let out = a.tick(t(3), &reasons(), &no_names);
        assert!(
            out.finished_drop_keys
                .iter()
                .any(|k| k.flow == old && k.reason == 12),
            "the evicted flow's kernel entry is handed back: {:?}",
            out.finished_drop_keys
        );
    }

    /// The memory goal (issue 13: 64 MiB of RSS with 100,000 tracked
    /// flows) rests on a small state per flow: the flow table holds its key
    /// and this in each entry, with up to twice the entries' room. It was
    /// 336 bytes (four `SystemTime`s, `Option`s and the key inline, aligned
    /// to 16 by a `u128`); whatever grows it costs that much per tracked
    /// flow, so measure it first (`cargo bench -p netwatch-agent --bench memory`).
    #[test]
    fn an_active_flow_stays_small() {
        assert!(
            size_of::<ActiveFlow>() <= 128,
            "an ActiveFlow is {} bytes",
            size_of::<ActiveFlow>()
        );
        assert_eq!(
            align_of::<ActiveFlow>(),
            8,
            "no 16-byte alignment padding each table entry"
        );
        // The client-end index holds only the flow's key.
        assert_eq!(size_of::<FlowKey>(), 40);
    }

    #[test]
    fn every_drop_table_key_that_fed_a_flow_is_handed_back_once_in_order() {
        let finished = |signals: Vec<Signal>| {
            let mut a = FlowAssembler::new(AssemblerConfig::default());
            for s in signals {
                a.handle(s, t(0), &reasons(), &no_names);
            }
            let out = a.tick(t(100), &reasons(), &no_names);
            assert_eq!(a.active_flows(), 0);
            out.finished_drop_keys
                .iter()
                .map(|k| (k.flow, k.reason))
                .collect::<Vec<_>>()
        };
        let synack = |k: FlowKey, reason: u32| {
            Signal::Kernel(KernelEvent::Drop {
                time: t(0),
                flow: k.reversed(),
                reason,
                ifindex: 7,
                netns: 1,
                bytes: 60,
                tcp_flags: tcp_flags::SYN | tcp_flags::ACK,
                outer: None,
            })
        };
        let k = key(40100, 80, IPPROTO_TCP);
        let other_reason = match drop_event(k, t(0)) {
            Signal::Kernel(KernelEvent::Drop {
                time,
                flow,
                ifindex,
                netns,
                bytes,
                tcp_flags,
                outer,
                ..
            }) => Signal::Kernel(KernelEvent::Drop {
                time,
                flow,
                reason: 13,
                ifindex,
                netns,
                bytes,
                tcp_flags,
                outer,
            }),
            other => other,
        };
        let stats = DropStats {
            packets: 2,
            bytes: 120,
            tcp_flags: tcp_flags::SYN,
            ..DropStats::default()
        };
        // Its own key (twice: event and table), its reply's, another reason.
        assert_eq!(
            finished(vec![
                drop_event(k, t(0)),
                drop_counts(k, stats, t(0), t(0)),
                synack(k, 12),
                other_reason,
            ]),
            vec![(k, 12), (k.reversed(), 12), (k, 13)]
        );
        // Only its reply was dropped.
        assert_eq!(finished(vec![synack(k, 12)]), vec![(k.reversed(), 12)]);
        // Seen before DNAT, dropped after it (to the backend), both ways.
        let mut svc = key(40101, 80, IPPROTO_TCP);
        svc.dst_addr[..4].copy_from_slice(&[10, 96, 0, 10]);
        let mut backend = key(40101, 8080, IPPROTO_TCP);
        backend.dst_addr[..4].copy_from_slice(&[10, 0, 0, 9]);
        let unanswered = Signal::Unanswered {
            flow: svc,
            pending: PendingConn {
                packets: 2,
                kind: pending_kind::TCP_SYN,
                direction: netwatch_common::direction::FROM_POD,
                ..PendingConn::default()
            },
            first: t(0),
            last: t(0),
        };
        assert_eq!(
            finished(vec![
                unanswered,
                drop_event(backend, t(0)),
                synack(backend, 12)
            ]),
            vec![(backend, 12), (backend.reversed(), 12)]
        );
    }

    #[test]
    fn records_keep_the_nanoseconds_of_signal_times() {
        let mut a = FlowAssembler::new(AssemblerConfig::default());
        let k = key(40102, 80, IPPROTO_TCP);
        let first = t(0) + Duration::from_nanos(123_456_789);
        let last = t(2) + Duration::from_nanos(987_654_321);
        let stats = DropStats {
            packets: 2,
            bytes: 120,
            tcp_flags: tcp_flags::SYN,
            ..DropStats::default()
        };
        a.handle(
            drop_counts(k, stats, first, last),
            t(3),
            &reasons(),
            &no_names,
        );
        let r = &a.finish_all(&reasons(), &no_names)[0];
        assert_eq!(
            (r.first_seen, r.last_seen, r.time),
            (first.into(), last.into(), last.into())
        );
    }
}
