//! The ring buffer, read asynchronously, decoded into typed kernel events.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use netwatch_common::{Event, FlowKey, IP_V4, Outer, encap, event_kind};
use tokio::io::unix::AsyncFd;

/// Which way a kernel signal crossed a pod interface (the policy side of
/// traffic is [`crate::record::Direction`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crossing {
    Unknown,
    /// TC ingress on the host side of a pod interface: leaving the pod.
    FromPod,
    /// TC egress on the host side of a pod interface: entering the pod.
    ToPod,
}

impl From<u8> for Crossing {
    fn from(v: u8) -> Self {
        match v {
            netwatch_common::direction::FROM_POD => Crossing::FromPod,
            netwatch_common::direction::TO_POD => Crossing::ToPod,
            _ => Crossing::Unknown,
        }
    }
}

/// How a handshake was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    TcpReset,
    /// ICMP/ICMPv6 destination unreachable with this type and code.
    IcmpUnreachable {
        icmp_type: u8,
        code: u8,
    },
    SctpAbort,
}

/// One decoded message from the kernel programs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelEvent {
    /// The first drop of a (flow, reason).
    Drop {
        time: SystemTime,
        flow: FlowKey,
        reason: u32,
        ifindex: u32,
        netns: u32,
        bytes: u32,
        tcp_flags: u8,
        /// The tunnel the packet was in (`flow` is then the inner one).
        outer: Option<Outer>,
    },
    Refused {
        time: SystemTime,
        flow: FlowKey,
        how: Refusal,
        ifindex: u32,
        direction: Crossing,
        /// Handshake packets (SYNs) sent before the refusal.
        attempts: u32,
    },
    Established {
        time: SystemTime,
        flow: FlowKey,
        ifindex: u32,
        direction: Crossing,
    },
    /// A connecting socket's first SYN retransmission.
    SockRetransmit {
        time: SystemTime,
        flow: FlowKey,
        cgroup_id: u64,
    },
    /// A connecting socket closed without ever being established.
    SockFailed {
        time: SystemTime,
        flow: FlowKey,
        cgroup_id: u64,
        retransmits: u32,
    },
}

impl KernelEvent {
    pub fn flow(&self) -> &FlowKey {
        match self {
            KernelEvent::Drop { flow, .. }
            | KernelEvent::Refused { flow, .. }
            | KernelEvent::Established { flow, .. }
            | KernelEvent::SockRetransmit { flow, .. }
            | KernelEvent::SockFailed { flow, .. } => flow,
        }
    }

    /// Decode one ring buffer record. `None` for a record of the wrong size
    /// or an unknown kind (counted by the caller).
    pub fn decode(bytes: &[u8], clock: &KernelClock) -> Option<KernelEvent> {
        if bytes.len() < std::mem::size_of::<Event>() {
            return None;
        }
        // SAFETY: length checked; Event is repr(C) and valid for any bytes.
        let e: Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let time = clock.to_wall(e.ts_ns);
        Some(match e.kind {
            event_kind::DROP => KernelEvent::Drop {
                time,
                flow: e.flow,
                reason: e.reason,
                ifindex: e.ifindex,
                netns: e.netns,
                bytes: e.bytes,
                tcp_flags: e.tcp_flags,
                outer: (e.outer.encap != encap::NONE).then_some(e.outer),
            },
            event_kind::TCP_RESET | event_kind::ICMP_UNREACH | event_kind::SCTP_ABORT => {
                let how = match e.kind {
                    event_kind::TCP_RESET => Refusal::TcpReset,
                    event_kind::SCTP_ABORT => Refusal::SctpAbort,
                    _ => Refusal::IcmpUnreachable {
                        icmp_type: (e.reason >> 8) as u8,
                        code: e.reason as u8,
                    },
                };
                KernelEvent::Refused {
                    time,
                    flow: e.flow,
                    how,
                    ifindex: e.ifindex,
                    direction: e.direction.into(),
                    attempts: e.count,
                }
            }
            event_kind::ESTABLISHED => KernelEvent::Established {
                time,
                flow: e.flow,
                ifindex: e.ifindex,
                direction: e.direction.into(),
            },
            event_kind::SOCK_RETRANS => KernelEvent::SockRetransmit {
                time,
                flow: e.flow,
                cgroup_id: e.cgroup_id,
            },
            event_kind::SOCK_FAILED => KernelEvent::SockFailed {
                time,
                flow: e.flow,
                cgroup_id: e.cgroup_id,
                retransmits: e.count,
            },
            _ => return None,
        })
    }
}

/// Converts `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct KernelClock {
    wall_at_zero: SystemTime,
}

impl KernelClock {
    /// Sample both clocks now. Re-sample now and then: NTP steps the wall clock.
    pub fn now() -> KernelClock {
        let mono = monotonic_ns();
        let wall = SystemTime::now();
        KernelClock {
            wall_at_zero: wall
                .checked_sub(Duration::from_nanos(mono))
                .unwrap_or(SystemTime::UNIX_EPOCH),
        }
    }

    pub fn to_wall(&self, mono_ns: u64) -> SystemTime {
        self.wall_at_zero + Duration::from_nanos(mono_ns)
    }
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The addresses of a flow key as `IpAddr`s.
pub fn addresses(key: &FlowKey) -> (IpAddr, IpAddr) {
    if key.ip_version == IP_V4 {
        let s: [u8; 4] = [
            key.src_addr[0],
            key.src_addr[1],
            key.src_addr[2],
            key.src_addr[3],
        ];
        let d: [u8; 4] = [
            key.dst_addr[0],
            key.dst_addr[1],
            key.dst_addr[2],
            key.dst_addr[3],
        ];
        (IpAddr::V4(Ipv4Addr::from(s)), IpAddr::V4(Ipv4Addr::from(d)))
    } else {
        (
            IpAddr::V6(Ipv6Addr::from(key.src_addr)),
            IpAddr::V6(Ipv6Addr::from(key.dst_addr)),
        )
    }
}

/// Reads the ring buffer without blocking the runtime.
pub struct EventReader {
    ring: AsyncFd<RingBuf<MapData>>,
    /// Records that could not be decoded.
    pub undecodable: u64,
}

impl EventReader {
    pub fn new(ring: RingBuf<MapData>) -> io::Result<EventReader> {
        // SAFETY: the RingBuf owns its map fd for as long as the AsyncFd
        // owns the RingBuf, and as_raw_fd always returns that fd.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(EventReader {
            ring,
            undecodable: 0,
        })
    }

    /// Wait until the kernel has written something, then drain everything
    /// there is into `out`.
    pub async fn read(
        &mut self,
        clock: &KernelClock,
        out: &mut Vec<KernelEvent>,
    ) -> io::Result<()> {
        let mut guard = self.ring.readable_mut().await?;
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            match KernelEvent::decode(&item, clock) {
                Some(e) => out.push(e),
                None => self.undecodable += 1,
            }
        }
        guard.clear_ready();
        Ok(())
    }

    /// Drain whatever the ring holds now, without waiting: at shutdown,
    /// what the kernel wrote after the last wake-up.
    pub fn read_now(&mut self, clock: &KernelClock, out: &mut Vec<KernelEvent>) {
        let ring = self.ring.get_mut();
        while let Some(item) = ring.next() {
            match KernelEvent::decode(&item, clock) {
                Some(e) => out.push(e),
                None => self.undecodable += 1,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netwatch_common::{IPPROTO_TCP, direction};

    fn raw(e: &Event) -> Vec<u8> {
        // SAFETY: Event is repr(C) plain data.
        unsafe {
            std::slice::from_raw_parts(
                (e as *const Event).cast::<u8>(),
                std::mem::size_of::<Event>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn decodes_icmp_refusal_with_type_and_code() {
        let clock = KernelClock {
            wall_at_zero: SystemTime::UNIX_EPOCH,
        };
        let mut e = Event {
            ts_ns: 5_000_000_000,
            kind: event_kind::ICMP_UNREACH,
            reason: 3 << 8 | 13,
            count: 2,
            direction: direction::TO_POD,
            ..Event::default()
        };
        e.flow.proto = IPPROTO_TCP;
        match KernelEvent::decode(&raw(&e), &clock).unwrap() {
            KernelEvent::Refused {
                how,
                attempts,
                direction,
                time,
                ..
            } => {
                assert_eq!(
                    how,
                    Refusal::IcmpUnreachable {
                        icmp_type: 3,
                        code: 13
                    }
                );
                assert_eq!(attempts, 2);
                assert_eq!(direction, Crossing::ToPod);
                assert_eq!(time, SystemTime::UNIX_EPOCH + Duration::from_secs(5));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn short_or_unknown_records_are_rejected() {
        let clock = KernelClock::now();
        assert_eq!(KernelEvent::decode(&[0u8; 10], &clock), None);
        let e = Event {
            kind: 200,
            ..Event::default()
        };
        assert_eq!(KernelEvent::decode(&raw(&e), &clock), None);
    }

    #[test]
    fn ipv4_addresses_come_from_the_first_four_bytes() {
        let mut k = FlowKey {
            ip_version: IP_V4,
            ..FlowKey::default()
        };
        k.src_addr[..4].copy_from_slice(&[10, 1, 2, 3]);
        k.dst_addr[..4].copy_from_slice(&[10, 1, 2, 4]);
        let (s, d) = addresses(&k);
        assert_eq!(s.to_string(), "10.1.2.3");
        assert_eq!(d.to_string(), "10.1.2.4");
    }
}
