//! `tp_btf/inet_sock_set_state` and `tp_btf/tcp_receive_reset`: a connecting
//! TCP socket's handshake answered (SYN_SENT -> ESTABLISHED) or refused (a
//! reset received in SYN_SENT), seen from the socket.
//!
//! Every datapath delivers to the socket, but not every one crosses both TC
//! hooks: with `bpf_redirect_peer` (Cilium's host routing, Calico eBPF,
//! netkit) the SYN-ACK or RST goes straight into the pod, skipping the host
//! side's egress hook, and a healthy connection would age into TIMED_OUT, a
//! refused one too. These programs settle the handshakes the TC classifiers
//! track (never start one), so on datapaths where TC sees the answer nothing
//! changes. IPv4 sockets (fields at fixed offsets) and IPv6 ones (address
//! offsets from kernel BTF, see `offsets.rs`).
//!
//! One variant on every kernel from 5.8 (tp_btf needs kernel BTF; both
//! tracepoints exist since 4.16).

use aya::{Btf, Ebpf, programs::BtfTracePoint};

use super::{chain, verifier_msg};

/// (program, tracepoint) pairs.
const PROGRAMS: [(&str, &str); 2] = [
    ("netwatch_sock_state", "inet_sock_set_state"),
    ("netwatch_tcp_reset", "tcp_receive_reset"),
];

/// The variant that runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    TpBtf,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::TpBtf => "tp_btf",
        }
    }
}

/// Why the socket-state hook is off.
#[derive(Debug, thiserror::Error)]
pub enum SockStateError {
    #[error("no kernel BTF to load tp_btf programs with")]
    NoBtf,
    #[error("{0}")]
    Load(String),
    #[error("attaching tp_btf/{tracepoint}: {why}")]
    Attach {
        tracepoint: &'static str,
        why: String,
    },
}

/// Load and attach both programs.
pub fn attach(ebpf: &mut Ebpf, btf: Option<&Btf>) -> Result<Mode, SockStateError> {
    let btf = btf.ok_or(SockStateError::NoBtf)?;
    for (name, tracepoint) in PROGRAMS {
        let prog: &mut BtfTracePoint = ebpf
            .program_mut(name)
            .ok_or_else(|| SockStateError::Load(format!("{name} missing from the object")))?
            .try_into()
            .map_err(|e| SockStateError::Load(format!("{e}")))?;
        prog.load(tracepoint, btf)
            .map_err(|e| SockStateError::Load(verifier_msg(tracepoint, &e)))?;
        prog.attach().map_err(|e| SockStateError::Attach {
            tracepoint,
            why: chain(&e),
        })?;
    }
    Ok(Mode::TpBtf)
}
