//! Running the system tools the lab is built with (iproute2, nftables),
//! with errors that name the command and say what it printed.

use std::process::{Child, Command, Output, Stdio};

/// A child process, killed and reaped when the guard goes (also when a
/// test or task fails).
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Errors building, driving or tearing down a lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("the lab needs root (network namespaces, veths, nftables, cgroups): run as root")]
    NotRoot,
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error(
        "`{command}` could not start: {source}. Is it installed? `cargo xtask setup` installs the lab's tools"
    )]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("lab scenario: {0}")]
    Spec(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("lab helper in pod {pod}: {detail}")]
    Helper { pod: String, detail: String },
}

pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
    let context = context.into();
    move |source| LabError::Io { context, source }
}

/// Run a command to completion; its stdout on success.
pub fn run(program: &str, args: &[&str]) -> Result<String, LabError> {
    run_with_input(program, args, None)
}

/// Run a command feeding `input` on stdin.
pub fn run_with_input(
    program: &str,
    args: &[&str],
    input: Option<&str>,
) -> Result<String, LabError> {
    let command = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| LabError::Spawn {
            command: command.clone(),
            source,
        })?;
    if let Some(text) = input {
        use std::io::Write;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(text.as_bytes())
                .map_err(io(format!("writing to {program}")))?;
        }
    }
    let Output {
        status,
        stdout,
        stderr,
    } = child
        .wait_with_output()
        .map_err(io(format!("waiting for {program}")))?;
    if !status.success() {
        return Err(LabError::Command {
            command,
            status: status.to_string(),
            stderr: String::from_utf8_lossy(&stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&stdout).into_owned())
}

/// `ip -n <netns> -batch -` with one iproute2 command per line.
pub fn ip_batch(netns: &str, lines: &[String]) -> Result<(), LabError> {
    let input = lines.join("\n") + "\n";
    run_with_input("ip", &["-n", netns, "-batch", "-"], Some(&input)).map(|_| ())
}

/// Set sysctls inside a network namespace.
pub fn sysctl_in(netns: &str, settings: &[&str]) -> Result<(), LabError> {
    let mut args = vec!["netns", "exec", netns, "sysctl", "-qw"];
    args.extend_from_slice(settings);
    run("ip", &args).map(|_| ())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The running kernel's (major, minor), from `/proc/sys/kernel/osrelease`.
pub fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut it = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    let minor = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    (major, minor)
}

/// How long to wait for something that takes `d` on a real machine: longer
/// under software emulation (`cargo xtask vmtest` sets
/// NETWATCH_TEST_SLOWDOWN in its guests, whose CPUs are emulated).
pub fn slowed(d: std::time::Duration) -> std::time::Duration {
    let factor: u32 = std::env::var("NETWATCH_TEST_SLOWDOWN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    d * factor
}
