//! The in-kernel tables as user space sees them: exact drop counters,
//! handshakes waiting for an answer, connecting sockets, loss counters.

use aya::maps::{HashMap as BpfHashMap, MapData, MapError, PerCpuArray};
use netwatch_common::{AggKey, AggStats, DropKey, DropStats, FlowKey, PendingConn, SockConn, loss};

use super::load::KernelMaps;

/// Why an in-kernel table could not be read.
#[derive(Debug, thiserror::Error)]
#[error("reading kernel table {table}: {source}")]
pub struct TableError {
    pub table: &'static str,
    #[source]
    pub source: MapError,
}

/// Loss counters summed over CPUs, by `netwatch_common::loss` index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Losses(pub [u64; loss::COUNT as usize]);

impl Losses {
    /// (source label, count) pairs for export.
    pub fn by_source(&self) -> [(&'static str, u64); 7] {
        let l = &self.0;
        [
            ("ringbuf_drops", l[loss::RINGBUF_DROP as usize]),
            ("ringbuf_tc", l[loss::RINGBUF_TC as usize]),
            ("ringbuf_sock", l[loss::RINGBUF_SOCK as usize]),
            ("table_full_drops", l[loss::TABLE_DROPS as usize]),
            ("table_full_pending", l[loss::TABLE_PENDING as usize]),
            ("table_full_socks", l[loss::TABLE_SOCKS as usize]),
            ("malformed_packets", l[loss::MALFORMED as usize]),
        ]
    }

    /// New drops whose ring buffer event did not fit: not lost, the drop
    /// table's scan reports them a moment later.
    pub fn deferred_drop_events(&self) -> u64 {
        self.0[loss::DROP_EVENT_DEFERRED as usize]
    }

    /// Events or flows the kernel could not deliver or track (malformed
    /// packets are counted but are not losses).
    pub fn total_lost(&self) -> u64 {
        self.by_source()
            .iter()
            .filter(|(s, _)| *s != "malformed_packets")
            .map(|(_, n)| n)
            .sum()
    }
}

/// The tables, owned by the flow side of the agent.
pub struct KernelTables {
    drops: BpfHashMap<MapData, DropKey, DropStats>,
    drop_aggregate: BpfHashMap<MapData, AggKey, AggStats>,
    pending: BpfHashMap<MapData, FlowKey, PendingConn>,
    socks: BpfHashMap<MapData, FlowKey, SockConn>,
    connect_cgroups: BpfHashMap<MapData, FlowKey, u64>,
    losses: PerCpuArray<MapData, u64>,
}

fn err(table: &'static str) -> impl Fn(MapError) -> TableError {
    move |source| TableError { table, source }
}

impl KernelTables {
    /// Split the maps: the ring buffer goes to the event reader.
    pub fn new(maps: KernelMaps) -> (KernelTables, aya::maps::RingBuf<MapData>) {
        let KernelMaps {
            events,
            drops,
            drop_aggregate,
            pending,
            socks,
            connect_cgroups,
            losses,
        } = maps;
        (
            KernelTables {
                drops,
                drop_aggregate,
                pending,
                socks,
                connect_cgroups,
                losses,
            },
            events,
        )
    }

    /// Every dropped flow the kernel is counting, one entry at a time: a
    /// flood fills the table, and a copy of it all would be tens of MB
    /// allocated and freed at every scan.
    pub fn for_each_drop(
        &self,
        mut each: impl FnMut(DropKey, DropStats),
    ) -> Result<(), TableError> {
        for entry in self.drops.iter() {
            let (key, stats) = entry.map_err(err("DROPS"))?;
            each(key, stats);
        }
        Ok(())
    }

    pub fn drop_stats(&self, key: &DropKey) -> Result<Option<DropStats>, TableError> {
        match self.drops.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(err("DROPS")(e)),
        }
    }

    pub fn remove_drop(&mut self, key: &DropKey) {
        let _ = self.drops.remove(key);
    }

    /// Every entry of the drop aggregate (drops of flows the drop table had
    /// no room for), one at a time.
    pub fn for_each_aggregate(
        &self,
        mut each: impl FnMut(AggKey, AggStats),
    ) -> Result<(), TableError> {
        for entry in self.drop_aggregate.iter() {
            let (key, stats) = entry.map_err(err("DROP_AGG"))?;
            each(key, stats);
        }
        Ok(())
    }

    pub fn remove_aggregate(&mut self, key: &AggKey) {
        let _ = self.drop_aggregate.remove(key);
    }

    /// Every handshake still waiting for an answer.
    /// Every handshake waiting for an answer, one at a time.
    pub fn for_each_pending(
        &self,
        mut each: impl FnMut(FlowKey, PendingConn),
    ) -> Result<(), TableError> {
        for entry in self.pending.iter() {
            let (key, conn) = entry.map_err(err("PENDING"))?;
            each(key, conn);
        }
        Ok(())
    }

    pub fn remove_pending(&mut self, key: &FlowKey) {
        let _ = self.pending.remove(key);
    }

    /// The cgroup of the process connecting from `key`, while its socket is
    /// still connecting.
    pub fn socket(&self, key: &FlowKey) -> Option<SockConn> {
        self.socks.get(key, 0).ok()
    }

    /// The cgroup of the process that opened the connection `key` (client
    /// first), while the kernel's recent-connects cache remembers it.
    pub fn connect_cgroup(&self, key: &FlowKey) -> Option<u64> {
        self.connect_cgroups.get(key, 0).ok()
    }

    /// Forget sockets that started connecting before `before_ns` (monotonic)
    /// and whose close we never saw (their cgroup was removed, say).
    pub fn expire_sockets(&mut self, before_ns: u64) -> Result<usize, TableError> {
        let stale: Vec<FlowKey> = self
            .socks
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, s)| s.start_ns < before_ns)
            .map(|(k, _)| k)
            .collect();
        for k in &stale {
            let _ = self.socks.remove(k);
        }
        Ok(stale.len())
    }

    pub fn losses(&self) -> Result<Losses, TableError> {
        let mut out = Losses::default();
        for i in 0..loss::COUNT {
            let per_cpu = self.losses.get(&i, 0).map_err(err("LOSSES"))?;
            out.0[i as usize] = per_cpu.iter().sum();
        }
        Ok(out)
    }
}
