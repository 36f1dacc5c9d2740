//! TC programs on lab interfaces, seen and placed the way a CNI's would be,
//! with raw `bpf(2)` calls (independent of aya and of the agent):
//!
//! - [`attach_foreign`]: a stand-in for an eBPF CNI's program that ends the
//!   chain (`TC_ACT_OK`), as a tcx link (6.6+) or a cls_bpf filter on
//!   clsact at priority 1, handle 1 (where Cilium's legacy filters sit).
//! - [`programs_on`]: the programs on an interface, in the order they run,
//!   so tests can check netwatch is first and that a killed agent left
//!   nothing (tcx) or exactly one set (clsact) behind.
//!
//! Both act in the calling process's network namespace: run them on a lab
//! node through `netwatch-lab tc ...`.

use std::{
    ffi::CString,
    os::fd::{FromRawFd, OwnedFd, RawFd},
    process::Command,
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;
/// The stand-in's name, as `bpftool prog` and these listings show it.
pub const FOREIGN_NAME: &str = "lab_cni_pass";

pub(crate) fn bpf(cmd: libc::c_long, attr: &mut [u8]) -> std::io::Result<i64> {
    // SAFETY: attr is a zero-padded bpf_attr of the size we pass.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub(crate) fn put32(a: &mut [u8], off: usize, v: u32) {
    a[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

pub(crate) fn put64(a: &mut [u8], off: usize, v: u64) {
    a[off..off + 8].copy_from_slice(&v.to_ne_bytes());
}

fn get32(a: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(a[off..off + 4].try_into().unwrap_or([0; 4]))
}

/// `r0 = TC_ACT_OK (0); exit`: ends the TC chain, as a CNI's program does
/// once it has decided.
fn load_pass_program() -> Result<OwnedFd> {
    // mov64 r0, 0 ; exit
    let insns: [u64; 2] = [0x0000_0000_0000_00b7, 0x0000_0000_0000_0095];
    let license = CString::new("GPL")?;
    let mut attr = [0u8; 128];
    put32(&mut attr, 0, BPF_PROG_TYPE_SCHED_CLS);
    put32(&mut attr, 4, insns.len() as u32);
    put64(&mut attr, 8, insns.as_ptr() as u64);
    put64(&mut attr, 16, license.as_ptr() as u64);
    attr[48..48 + FOREIGN_NAME.len()].copy_from_slice(FOREIGN_NAME.as_bytes());
    let fd = bpf(BPF_PROG_LOAD, &mut attr).context("loading the stand-in CNI program")?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn ifindex(interface: &str) -> Result<u32> {
    let c = CString::new(interface)?;
    // SAFETY: valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!("no interface {interface} in this network namespace");
    }
    Ok(i)
}

/// How the stand-in is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TcMode {
    Tcx,
    Clsact,
}

/// The kernel's id of a loaded program.
pub fn program_id(fd: &OwnedFd) -> std::io::Result<u32> {
    let mut info = [0u8; 96];
    let mut attr = [0u8; 16];
    put32(&mut attr, 0, raw(fd));
    put32(&mut attr, 4, info.len() as u32);
    put64(&mut attr, 8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(get32(&info, 4))
}

/// Attach the stand-in CNI program to both directions of `interface`.
/// tcx links live as long as the returned fds; clsact filters stay until
/// the interface goes. The last fd is the program's own.
pub fn attach_foreign(interface: &str, mode: TcMode) -> Result<Vec<OwnedFd>> {
    let prog = load_pass_program()?;
    let mut held = attach_program(&prog, interface, mode)?;
    held.push(prog);
    Ok(held)
}

fn attach_program(prog: &OwnedFd, interface: &str, mode: TcMode) -> Result<Vec<OwnedFd>> {
    let index = ifindex(interface)?;
    match mode {
        TcMode::Tcx => {
            let mut links = Vec::new();
            for attach_type in [BPF_TCX_INGRESS, BPF_TCX_EGRESS] {
                let mut attr = [0u8; 64];
                put32(&mut attr, 0, raw(prog));
                put32(&mut attr, 4, index);
                put32(&mut attr, 8, attach_type);
                // flags 0: after the programs already there, as a CNI that
                // attached earlier would be.
                let fd = bpf(BPF_LINK_CREATE, &mut attr)
                    .with_context(|| format!("tcx attach on {interface}"))?;
                // SAFETY: a new fd from the kernel.
                links.push(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
            }
            Ok(links)
        }
        TcMode::Clsact => {
            // tc attaches pinned programs only: pin in a bpffs of a private
            // mount namespace, so nothing is left on the host's.
            private_bpffs()?;
            let pin = format!(
                "/sys/fs/bpf/netwatch-lab-{}-{interface}",
                std::process::id()
            );
            let path = CString::new(pin.clone())?;
            let mut attr = [0u8; 32];
            put64(&mut attr, 0, path.as_ptr() as u64);
            put32(&mut attr, 8, raw(prog));
            bpf(BPF_OBJ_PIN, &mut attr).with_context(|| format!("pinning at {pin}"))?;
            let result = (|| {
                let _ = Command::new("tc")
                    .args(["qdisc", "add", "dev", interface, "clsact"])
                    .output();
                for dir in ["ingress", "egress"] {
                    let out = Command::new("tc")
                        .args([
                            "filter",
                            "add",
                            "dev",
                            interface,
                            dir,
                            "prio",
                            "1",
                            "handle",
                            "1",
                            "bpf",
                            "object-pinned",
                            &pin,
                            "da",
                        ])
                        .output()
                        .context("running tc")?;
                    if !out.status.success() {
                        bail!(
                            "tc filter add on {interface} {dir}: {}",
                            String::from_utf8_lossy(&out.stderr).trim()
                        );
                    }
                }
                Ok(())
            })();
            let _ = std::fs::remove_file(&pin);
            result.map(|()| Vec::new())
        }
    }
}

/// A mount namespace of this process's own with a fresh bpffs at
/// /sys/fs/bpf (its pins vanish with the process).
pub(crate) fn private_bpffs() -> Result<()> {
    use std::sync::Once;
    static DONE: Once = Once::new();
    let mut result = Ok(());
    DONE.call_once(|| {
        let c = |s: &str| CString::new(s).unwrap_or_default();
        // SAFETY: plain syscalls with valid C strings.
        unsafe {
            if libc::unshare(libc::CLONE_NEWNS) != 0
                || libc::mount(
                    std::ptr::null(),
                    c("/").as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
                || libc::mount(
                    c("bpf").as_ptr(),
                    c("/sys/fs/bpf").as_ptr(),
                    c("bpf").as_ptr(),
                    0,
                    std::ptr::null(),
                ) != 0
            {
                result = Err(anyhow::anyhow!(
                    "a private bpffs for tc: {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
    });
    result
}

fn raw(fd: &OwnedFd) -> u32 {
    use std::os::fd::AsRawFd;
    fd.as_raw_fd() as u32
}

/// The programs on one interface, in the order they run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcPrograms {
    pub tcx_ingress: Vec<String>,
    pub tcx_egress: Vec<String>,
    /// cls_bpf filters on clsact, as `tc filter show` lists them (priority
    /// order; within one priority the latest added first).
    pub clsact_ingress: Vec<String>,
    pub clsact_egress: Vec<String>,
}

/// List the programs on `interface`.
pub fn programs_on(interface: &str) -> Result<TcPrograms> {
    let index = ifindex(interface)?;
    let mut out = TcPrograms::default();
    for (attach_type, list) in [
        (BPF_TCX_INGRESS, &mut out.tcx_ingress),
        (BPF_TCX_EGRESS, &mut out.tcx_egress),
    ] {
        // Kernels before 6.6 have no tcx: the query fails, the list is empty.
        if let Ok(ids) = tcx_query(index, attach_type) {
            for id in ids {
                list.push(program_name(id).unwrap_or_else(|_| format!("id {id}")));
            }
        }
    }
    for (dir, list) in [
        ("ingress", &mut out.clsact_ingress),
        ("egress", &mut out.clsact_egress),
    ] {
        let o = Command::new("tc")
            .args(["filter", "show", "dev", interface, dir])
            .output()
            .context("running tc")?;
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            // "filter protocol all pref 1 bpf chain 0 handle 0x1 NAME direct-action ..."
            let f: Vec<&str> = line.split_whitespace().collect();
            if let Some(i) = f.iter().position(|w| *w == "handle")
                && f.contains(&"bpf")
                && let Some(name) = f.get(i + 2)
                && f.get(i + 1).is_some()
            {
                // tc prints `NAME[:section]` or `pinned ...`; keep the name.
                let name = name.split(':').next().unwrap_or(name);
                list.push(name.to_string());
            }
        }
    }
    Ok(out)
}

fn tcx_query(ifindex: u32, attach_type: u32) -> std::io::Result<Vec<u32>> {
    let mut ids = [0u32; 64];
    let mut attr = [0u8; 72];
    put32(&mut attr, 0, ifindex);
    put32(&mut attr, 4, attach_type);
    put64(&mut attr, 16, ids.as_mut_ptr() as u64);
    put32(&mut attr, 24, ids.len() as u32);
    bpf(BPF_PROG_QUERY, &mut attr)?;
    let n = get32(&attr, 24) as usize;
    Ok(ids[..n.min(ids.len())].to_vec())
}

fn program_name(id: u32) -> std::io::Result<String> {
    let mut attr = [0u8; 16];
    put32(&mut attr, 0, id);
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)?;
    // SAFETY: a new fd from the kernel.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let mut info = [0u8; 96];
    let mut attr = [0u8; 16];
    put32(&mut attr, 0, raw(&fd));
    put32(&mut attr, 4, info.len() as u32);
    put64(&mut attr, 8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    // bpf_prog_info.name: 16 bytes at offset 64.
    let name = &info[64..80];
    let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    Ok(String::from_utf8_lossy(&name[..end]).into_owned())
}
