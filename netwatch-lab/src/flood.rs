//! A flood of new TCP flows from a lab pod: SYNs written to a raw socket,
//! each flow from its own source port (and spread over a range of
//! destination ports), paced to a rate. The load of `cargo xtask bench
//! --flood` and of the flood end-to-end test; runs inside the pod as
//! `netwatch-lab flood`.
//!
//! Flow `i` comes from source port `1024 + i % 64512`: the first 64,512
//! flows each from their own source port (like hping3's), so no two of them
//! look like one connection seen before and after DNAT (same source port,
//! another destination). Destination ports rotate over `ports`, shifted by
//! one each round of source ports, so up to 64,512 flows per destination
//! port are all distinct, and which flows went where is known exactly.

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

/// Source ports used: 1024 to 65535.
pub const FIRST_SOURCE_PORT: u16 = 1024;
pub const SOURCE_PORTS: u64 = 65536 - FIRST_SOURCE_PORT as u64;

/// What to send.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Flood {
    pub to: Ipv4Addr,
    pub first_port: u16,
    /// Destination ports, from `first_port`.
    pub ports: u16,
    pub flows: u64,
    /// Flows (packets) per second; 0: as fast as the socket takes them.
    pub rate: u64,
}

/// What was sent.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sent {
    pub packets: u64,
    pub seconds: f64,
}

impl Flood {
    /// The (source port, destination port) of flow `i`.
    pub fn ports_of(&self, i: u64) -> (u16, u16) {
        let ports = u64::from(self.ports.max(1));
        let (round, j) = (i / SOURCE_PORTS, i % SOURCE_PORTS);
        let src = FIRST_SOURCE_PORT as u64 + j;
        (src as u16, self.first_port + ((j + round) % ports) as u16)
    }

    /// Flows sent to destination port `port`.
    pub fn flows_to(&self, port: u16) -> u64 {
        (0..self.flows)
            .filter(|i| self.ports_of(*i).1 == port)
            .count() as u64
    }

    fn check(&self) -> io::Result<()> {
        let ports = u64::from(self.ports.max(1));
        if self.flows > SOURCE_PORTS * ports
            || u32::from(self.first_port) + u32::from(self.ports) > 65536
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} flows over {ports} ports from {}: not all distinct",
                    self.flows, self.first_port
                ),
            ));
        }
        Ok(())
    }
}

/// Packets per sendmmsg call.
const BATCH: usize = 256;
const PACKET_LEN: usize = 40;

/// Send the flood (as root, in the pod's network namespace).
pub fn send(flood: &Flood) -> io::Result<Sent> {
    flood.check()?;
    let src = source_address(flood.to)?;
    // SAFETY: plain socket(2); the descriptor is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let result = send_on(fd, src, flood);
    // SAFETY: our descriptor.
    unsafe { libc::close(fd) };
    result
}

fn send_on(fd: i32, src: Ipv4Addr, flood: &Flood) -> io::Result<Sent> {
    let dst = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(flood.to.octets()),
        },
        sin_zero: [0; 8],
    };
    let mut packets = vec![[0u8; PACKET_LEN]; BATCH];
    let mut iovs: Vec<libc::iovec> = Vec::with_capacity(BATCH);
    let mut msgs: Vec<libc::mmsghdr> = Vec::with_capacity(BATCH);
    let started = Instant::now();
    let mut i = 0u64;
    while i < flood.flows {
        let n = (flood.flows - i).min(BATCH as u64) as usize;
        iovs.clear();
        msgs.clear();
        for (k, p) in packets.iter_mut().take(n).enumerate() {
            let (sport, dport) = flood.ports_of(i + k as u64);
            *p = syn(src, flood.to, sport, dport, (i + k as u64) as u32);
            iovs.push(libc::iovec {
                iov_base: p.as_mut_ptr().cast(),
                iov_len: PACKET_LEN,
            });
        }
        for iov in iovs.iter_mut() {
            // SAFETY: all-zero is a valid msghdr; pointers set below live
            // until the call returns.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = (&dst as *const libc::sockaddr_in).cast_mut().cast();
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
            msgs.push(h);
        }
        let mut done = 0;
        while done < n {
            // SAFETY: msgs[done..n] are valid headers.
            let r =
                unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr().add(done), (n - done) as u32, 0) };
            if r < 0 {
                let e = io::Error::last_os_error();
                // A full device queue: wait for it to drain, send again.
                if e.raw_os_error() == Some(libc::ENOBUFS) {
                    std::thread::sleep(Duration::from_micros(50));
                    continue;
                }
                return Err(e);
            }
            done += r as usize;
        }
        i += n as u64;
        if flood.rate > 0 {
            let due = Duration::from_secs_f64(i as f64 / flood.rate as f64);
            if let Some(ahead) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(ahead);
            }
        }
    }
    Ok(Sent {
        packets: i,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The address this host sends from towards `to`.
fn source_address(to: Ipv4Addr) -> io::Result<Ipv4Addr> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.connect(SocketAddrV4::new(to, 9))?;
    match s.local_addr()?.ip() {
        std::net::IpAddr::V4(a) => Ok(a),
        std::net::IpAddr::V6(_) => Err(io::Error::other("no IPv4 source address")),
    }
}

/// An IPv4 TCP SYN; the kernel fills in the IP checksum and length.
fn syn(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, seq: u32) -> [u8; PACKET_LEN] {
    let mut p = [0u8; PACKET_LEN];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(PACKET_LEN as u16).to_be_bytes());
    p[6] = 0x40; // don't fragment
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let t = &mut p[20..];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = 0x02; // SYN
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let sum = tcp_checksum(src, dst, &p[20..]);
    p[36..38].copy_from_slice(&sum.to_be_bytes());
    p
}

fn tcp_checksum(src: Ipv4Addr, dst: Ipv4Addr, segment: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&[0, 6]);
    add(&(segment.len() as u16).to_be_bytes());
    add(segment);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_are_distinct_and_counted_per_port() {
        let f = Flood {
            to: Ipv4Addr::new(10, 0, 0, 1),
            first_port: 8080,
            ports: 3,
            flows: 10,
            rate: 0,
        };
        let all: std::collections::BTreeSet<_> = (0..10).map(|i| f.ports_of(i)).collect();
        assert_eq!(all.len(), 10);
        assert_eq!(f.ports_of(0), (1024, 8080));
        assert_eq!(f.ports_of(4), (1028, 8081));
        let two_rounds = Flood {
            flows: SOURCE_PORTS * 2,
            ..f.clone()
        };
        assert_eq!(two_rounds.ports_of(SOURCE_PORTS), (1024, 8081));
        let all: std::collections::BTreeSet<_> = (0..two_rounds.flows)
            .map(|i| two_rounds.ports_of(i))
            .collect();
        assert_eq!(all.len() as u64, two_rounds.flows);
        assert_eq!(
            (f.flows_to(8080), f.flows_to(8081), f.flows_to(8082)),
            (4, 3, 3)
        );
        assert_eq!(f.flows_to(8083), 0);
        let too_many = Flood {
            flows: SOURCE_PORTS * 3 + 1,
            ..f
        };
        assert!(too_many.check().is_err());
    }

    #[test]
    fn tcp_checksum_verifies_to_zero() {
        let (s, d) = (Ipv4Addr::new(10, 244, 1, 2), Ipv4Addr::new(10, 244, 1, 3));
        let p = syn(s, d, 40000, 8080, 7);
        // Summing a segment with its checksum in place gives 0 (complemented).
        assert_eq!(tcp_checksum(s, d, &p[20..]), 0);
    }
}
