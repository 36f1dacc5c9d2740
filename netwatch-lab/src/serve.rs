//! The listeners a lab pod runs (`netwatch-lab serve`): TCP accepts and
//! closes, UDP echoes, UDP 53 answers DNS.

use std::{
    io::Write,
    net::{SocketAddr, TcpListener, UdpSocket},
    thread,
};

use super::{probe::dns_answer, spec::Proto};

/// Bind every listener (dual-stack), print `ready`, serve forever.
pub fn serve(listeners: &[(u16, Proto)]) -> std::io::Result<()> {
    let mut threads = Vec::new();
    for &(port, proto) in listeners {
        let addr: SocketAddr = SocketAddr::from(([0u16; 8], port));
        match proto {
            Proto::Tcp => {
                let l = TcpListener::bind(addr)
                    .or_else(|_| TcpListener::bind(SocketAddr::from(([0u8; 4], port))))?;
                threads.push(thread::spawn(move || {
                    for conn in l.incoming() {
                        // Accepting completes the handshake; closing is enough.
                        drop(conn);
                    }
                }));
            }
            Proto::Udp => {
                let s = UdpSocket::bind(addr)
                    .or_else(|_| UdpSocket::bind(SocketAddr::from(([0u8; 4], port))))?;
                threads.push(thread::spawn(move || {
                    let mut buf = [0u8; 1500];
                    while let Ok((n, peer)) = s.recv_from(&mut buf) {
                        let reply = if port == 53 {
                            dns_answer(&buf[..n])
                        } else {
                            Some(buf[..n].to_vec())
                        };
                        if let Some(r) = reply {
                            let _ = s.send_to(&r, peer);
                        }
                    }
                }));
            }
        }
    }
    println!("ready");
    std::io::stdout().flush()?;
    for t in threads {
        let _ = t.join();
    }
    // No listeners: wait to be killed, so the pod's cgroup stays populated.
    loop {
        thread::park();
    }
}
