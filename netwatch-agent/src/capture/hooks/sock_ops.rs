//! `sock_ops` with cgroup `connect4`/`connect6` on the cgroup v2 root: each
//! TCP connect()'s outcome and the cgroup of the process that made it (which
//! names hostNetwork pods).
//!
//! One variant on every kernel from 5.8: sock_ops may call
//! `bpf_get_current_cgroup_id` only from 6.4, so the connect hooks, which
//! run in the caller's context everywhere, record the cgroup by socket
//! cookie and sock_ops reads it from there.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{CgroupAttachMode, CgroupSockAddr, SockOps},
};

use super::{chain, verifier_msg};

const SOCK_OPS: &str = "netwatch_sock_ops";
const CONNECT4: &str = "netwatch_connect4";
const CONNECT6: &str = "netwatch_connect6";

/// The variant that runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// sock_ops for the outcome, connect4/connect6 for the cgroup.
    SockOpsConnect,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::SockOpsConnect => "sock_ops+connect",
        }
    }
}

/// Why socket capture is off.
#[derive(Debug, thiserror::Error)]
pub enum SockOpsError {
    #[error("no cgroup v2 root given (--cgroup-root)")]
    NoCgroupRoot,
    #[error("cannot open cgroup root {path}: {source}; set --cgroup-root to the cgroup v2 mount")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Load(String),
    #[error(
        "attaching {program} to {path}: {why}; it must be a cgroup v2 directory \
         (hybrid hosts mount cgroup v2 at /sys/fs/cgroup/unified)"
    )]
    Attach {
        program: &'static str,
        path: PathBuf,
        why: String,
    },
}

/// Load and attach the three programs to `root`. On failure none stays
/// attached (links are dropped with the object or replaced on retry).
pub fn attach(ebpf: &mut Ebpf, root: Option<&Path>) -> Result<Mode, SockOpsError> {
    let root = root.ok_or(SockOpsError::NoCgroupRoot)?;
    let open = || {
        File::open(root).map_err(|source| SockOpsError::Open {
            path: root.to_path_buf(),
            source,
        })
    };
    let attach_err = |program: &'static str, e: &dyn std::error::Error| SockOpsError::Attach {
        program,
        path: root.to_path_buf(),
        why: chain(e),
    };
    // The connect hooks first: by the time sock_ops sees a handshake start,
    // its cgroup is recorded.
    for name in [CONNECT4, CONNECT6] {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or_else(|| SockOpsError::Load(format!("{name} missing from the object")))?
            .try_into()
            .map_err(|e| SockOpsError::Load(format!("{e}")))?;
        prog.load()
            .map_err(|e| SockOpsError::Load(verifier_msg(name, &e)))?;
        // bpf_link based (kernels >= 5.7): coexists with a CNI's own
        // programs and takes no attach flag, hence `Single`.
        prog.attach(open()?, CgroupAttachMode::Single)
            .map_err(|e| attach_err(name, &e))?;
    }
    let prog: &mut SockOps = ebpf
        .program_mut(SOCK_OPS)
        .ok_or_else(|| SockOpsError::Load("sock_ops program missing from the object".into()))?
        .try_into()
        .map_err(|e| SockOpsError::Load(format!("{e}")))?;
    prog.load()
        .map_err(|e| SockOpsError::Load(verifier_msg("sock_ops", &e)))?;
    prog.attach(open()?, CgroupAttachMode::Single)
        .map_err(|e| attach_err("sock_ops", &e))?;
    Ok(Mode::SockOpsConnect)
}
