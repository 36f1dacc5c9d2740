//! Probes: what a pod tries, and how it went. The probing code runs inside
//! the pod (network namespace and cgroup) as `netwatch-lab probe ...`, so
//! the kernel sees the attempt coming from the pod's own process.

use std::{
    io::ErrorKind,
    net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

/// One attempt by a pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Probe {
    /// A TCP connect() with a timeout.
    Tcp { to: SocketAddr, timeout_ms: u64 },
    /// A UDP datagram that expects an echo.
    Udp {
        to: SocketAddr,
        timeout_ms: u64,
        /// Send the datagram again after this long without an answer, from
        /// the same socket; 0: once.
        #[serde(default)]
        resend_ms: u64,
    },
    /// A DNS query for an A record.
    Dns {
        to: SocketAddr,
        timeout_ms: u64,
        /// As for `Udp`: a resolver retransmits its query.
        #[serde(default)]
        resend_ms: u64,
    },
    /// `count` raw TCP SYNs from `from` to `to`, one source port: a flood of
    /// one flow. Reports how many the kernel accepted.
    SynFlood {
        from: SocketAddrV4,
        to: SocketAddrV4,
        count: u32,
    },
}

impl Probe {
    pub fn tcp(to: SocketAddr, timeout: Duration) -> Probe {
        Probe::Tcp {
            to,
            timeout_ms: timeout.as_millis() as u64,
        }
    }
    pub fn udp(to: SocketAddr, timeout: Duration) -> Probe {
        Probe::Udp {
            to,
            timeout_ms: timeout.as_millis() as u64,
            resend_ms: 0,
        }
    }
    pub fn dns(to: SocketAddr, timeout: Duration) -> Probe {
        Probe::Dns {
            to,
            timeout_ms: timeout.as_millis() as u64,
            resend_ms: 0,
        }
    }

    /// A UDP or DNS probe that sends its datagram again after `after`
    /// without an answer, as resolvers and most UDP clients do (TCP's SYN
    /// is retransmitted by the kernel); other probes unchanged.
    pub fn resending_after(mut self, after: Duration) -> Probe {
        if let Probe::Udp { resend_ms, .. } | Probe::Dns { resend_ms, .. } = &mut self {
            *resend_ms = after.as_millis() as u64;
        }
        self
    }
}

/// How a probe went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// TCP handshake completed.
    Connected,
    /// UDP or DNS got an answer.
    Answered,
    /// RST, or ICMP port unreachable.
    Refused,
    /// No answer within the timeout.
    TimedOut,
    /// ICMP host/net unreachable or no route.
    Unreachable,
    /// Raw packets sent (SynFlood).
    Sent,
    Error,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeResult {
    pub outcome: Outcome,
    pub elapsed_ms: u64,
    /// Packets sent (SynFlood), else 0.
    #[serde(default)]
    pub sent: u32,
    #[serde(default)]
    pub detail: String,
}

/// Run a probe in this process (inside the pod).
pub fn run(probe: &Probe) -> ProbeResult {
    let start = Instant::now();
    let (outcome, sent, detail) = match probe {
        Probe::Tcp { to, timeout_ms } => {
            match TcpStream::connect_timeout(to, Duration::from_millis(*timeout_ms)) {
                Ok(_) => (Outcome::Connected, 0, String::new()),
                Err(e) => (classify(&e), 0, e.to_string()),
            }
        }
        Probe::Udp {
            to,
            timeout_ms,
            resend_ms,
        } => udp_exchange(*to, *timeout_ms, *resend_ms, b"netwatch-lab-probe"),
        Probe::Dns {
            to,
            timeout_ms,
            resend_ms,
        } => udp_exchange(*to, *timeout_ms, *resend_ms, &dns_query(0x4e57)),
        Probe::SynFlood { from, to, count } => match syn_flood(*from, *to, *count) {
            Ok(n) => (Outcome::Sent, n, String::new()),
            Err(e) => (Outcome::Error, 0, e.to_string()),
        },
    };
    ProbeResult {
        outcome,
        elapsed_ms: start.elapsed().as_millis() as u64,
        sent,
        detail,
    }
}

fn classify(e: &std::io::Error) -> Outcome {
    match e.kind() {
        ErrorKind::ConnectionRefused => Outcome::Refused,
        ErrorKind::TimedOut | ErrorKind::WouldBlock => Outcome::TimedOut,
        ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => Outcome::Unreachable,
        _ => match e.raw_os_error() {
            Some(libc::EHOSTUNREACH) | Some(libc::ENETUNREACH) => Outcome::Unreachable,
            _ => Outcome::Error,
        },
    }
}

fn udp_exchange(
    to: SocketAddr,
    timeout_ms: u64,
    resend_ms: u64,
    payload: &[u8],
) -> (Outcome, u32, String) {
    let bind: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse().unwrap_or(to)
    } else {
        "[::]:0".parse().unwrap_or(to)
    };
    let result = (|| -> std::io::Result<usize> {
        let sock = UdpSocket::bind(bind)?;
        sock.connect(to)?;
        let mut buf = [0u8; 512];
        sock.send(payload)?;
        if resend_ms > 0 && resend_ms < timeout_ms {
            sock.set_read_timeout(Some(Duration::from_millis(resend_ms)))?;
            match sock.recv(&mut buf) {
                Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => {
                    sock.send(payload)?;
                }
                answered_or_refused => return answered_or_refused,
            }
        }
        let left = timeout_ms.saturating_sub(if resend_ms < timeout_ms { resend_ms } else { 0 });
        sock.set_read_timeout(Some(Duration::from_millis(left.max(1))))?;
        sock.recv(&mut buf)
    })();
    match result {
        Ok(_) => (Outcome::Answered, 0, String::new()),
        Err(e) => (classify(&e), 0, e.to_string()),
    }
}

/// A plain HTTP/1.0 GET of `http://host:port/path`; the body.
pub fn http_get(url: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let bad = || {
        std::io::Error::new(
            ErrorKind::InvalidInput,
            format!("{url}: expected http://host:port/path"),
        )
    };
    let rest = url.strip_prefix("http://").ok_or_else(bad)?;
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let addr: SocketAddr = host.parse().map_err(|_| bad())?;
    // Stretched under emulation, where an agent under load answers slowly.
    let mut s = TcpStream::connect_timeout(&addr, crate::slowed(Duration::from_secs(3)))?;
    s.set_read_timeout(Some(crate::slowed(Duration::from_secs(5))))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    Ok(resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or(resp))
}

/// A DNS query for `probe.netwatch.lab` A.
pub fn dns_query(id: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(40);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD, 1 question
    for label in ["probe", "netwatch", "lab"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]); // root, type A, class IN
    q
}

/// The answer the lab's resolver gives any query: 192.0.2.1.
pub fn dns_answer(query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    let mut a = query.to_vec();
    a[2] = 0x81; // QR, RD
    a[3] = 0x80; // RA
    a[6] = 0;
    a[7] = 1; // one answer
    a.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 192, 0, 2, 1]);
    Some(a)
}

fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One SYN, IPv4 header included.
fn syn_packet(from: SocketAddrV4, to: SocketAddrV4, seq: u32) -> Vec<u8> {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&from.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&to.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&from.ip().octets());
    pseudo.extend_from_slice(&to.ip().octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    let mut sum_input = pseudo.clone();
    sum_input.extend_from_slice(&tcp);
    let c = checksum(&sum_input, 0);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());

    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[4..6].copy_from_slice(&((seq & 0xffff) as u16).to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&from.ip().octets());
    ip[16..20].copy_from_slice(&to.ip().octets());
    let c = checksum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&tcp);
    ip
}

fn syn_flood(from: SocketAddrV4, to: SocketAddrV4, count: u32) -> std::io::Result<u32> {
    // SAFETY: plain socket syscalls on a descriptor we own.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut dst: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    dst.sin_family = libc::AF_INET as libc::sa_family_t;
    dst.sin_addr.s_addr = u32::from_ne_bytes(to.ip().octets());
    let mut sent = 0;
    let mut result = Ok(());
    for i in 0..count {
        let pkt = syn_packet(from, to, 1_000_000 + i);
        loop {
            let n = unsafe {
                libc::sendto(
                    fd,
                    pkt.as_ptr().cast(),
                    pkt.len(),
                    0,
                    (&dst as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                )
            };
            if n == pkt.len() as isize {
                sent += 1;
                break;
            }
            let e = std::io::Error::last_os_error();
            // Queue full: the veth will drain it; try again shortly.
            if e.raw_os_error() == Some(libc::ENOBUFS) {
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            result = Err(e);
            break;
        }
        if result.is_err() {
            break;
        }
    }
    unsafe { libc::close(fd) };
    result.map(|()| sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syn_packet_checksums_verify() {
        let p = syn_packet(
            "10.0.0.1:40000".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
            7,
        );
        assert_eq!(checksum(&p[..20], 0), 0, "IP header checksum");
        let mut pseudo = vec![10, 0, 0, 1, 10, 0, 0, 2, 0, 6, 0, 20];
        pseudo.extend_from_slice(&p[20..]);
        assert_eq!(checksum(&pseudo, 0), 0, "TCP checksum");
        assert_eq!(p[33], 0x02, "SYN only");
    }

    #[test]
    fn dns_answer_echoes_the_id_and_sets_qr() {
        let q = dns_query(0xabcd);
        let a = dns_answer(&q).unwrap();
        assert_eq!(&a[..2], &[0xab, 0xcd]);
        assert_eq!(a[2] & 0x80, 0x80);
        assert_eq!(&a[6..8], &[0, 1]);
    }
}
