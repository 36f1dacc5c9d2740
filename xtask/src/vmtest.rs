//! `cargo xtask vmtest`: the kernel-side integration tests on other kernels.
//!
//! Each kernel of [`KERNELS`] (Debian's cloud kernels, pinned by package
//! version) boots under QEMU with software emulation (TCG; KVM fails on these
//! machines with an MSR error). The guest sees this machine's root file system
//! read-only through virtio-fs (Debian's cloud kernels have no 9p, but they do
//! have virtio-fs), so it runs the very test executables `cargo test` built
//! here, at their own absolute paths, with this machine's `ip`, `nft` and
//! `modprobe`. A small initramfs (busybox-static plus the virtio-fs modules)
//! mounts that share, lays tmpfs, proc, sysfs, cgroup2, bpffs and tracefs over
//! it and chroots in; a second, writable share of `target/vmtest/runs/<kernel>`
//! carries the test logs and exit codes back.
//!
//! Which tests run on which kernel is [`TESTS`]; everything downloaded or
//! generated is cached under `target/vmtest/`, so a second run needs no
//! network.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader, Read},
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// A Debian kernel package the matrix boots.
#[derive(Debug, Clone, Copy)]
pub struct KernelSpec {
    /// What `--kernel` calls it.
    pub name: &'static str,
    /// The Debian suite whose archive has the package.
    pub suite: &'static str,
    pub package: &'static str,
    /// Exact package version: newer uploads replace old ones in the archive,
    /// so when this one is gone, update it (and `sha256`) here.
    pub version: &'static str,
    /// SHA-256 of the .deb, as the suite's signed Packages index lists it.
    pub sha256: &'static str,
}

pub const KERNELS: &[KernelSpec] = &[
    KernelSpec {
        name: "5.10",
        suite: "bullseye",
        package: "linux-image-5.10.0-32-cloud-amd64-unsigned",
        version: "5.10.223-1",
        sha256: "b1fb8d34c26105a2ba1271a3df868a9eea460657df98c77fd08822ef4908c9db",
    },
    KernelSpec {
        name: "6.1",
        suite: "bookworm",
        package: "linux-image-6.1.0-47-cloud-amd64-unsigned",
        version: "6.1.170-3",
        sha256: "554cf5c453f93c86d9af849d98f21826fe9ea3d0eeec6a5c6ed603a5788ff054",
    },
    KernelSpec {
        name: "6.12",
        suite: "trixie",
        package: "linux-image-6.12.117+deb13-cloud-amd64-unsigned",
        version: "6.12.117-1",
        sha256: "4113a615a1f1535ed4356ca03d428c74536b00f6ccb58e049a2ffd6a1cb3f1ad",
    },
];

/// One integration test executable run in the guest: `cargo test -p
/// <package> --test <target> -- <filters>` on `kernels` (empty: all).
#[derive(Debug, Clone, Copy)]
pub struct TestEntry {
    pub package: &'static str,
    /// The `[[test]]` target (the file name under tests/).
    pub target: &'static str,
    /// libtest name filters (substrings; any may match); empty runs them all.
    pub filters: &'static [&'static str],
    /// libtest `--skip` filters.
    pub skip: &'static [&'static str],
    /// Kernel names of [`KERNELS`]; empty means every kernel.
    pub kernels: &'static [&'static str],
    /// `--test-threads`: TCG is slow, and the end-to-end tests time things.
    pub threads: usize,
}

/// Which integration tests run on which kernel: the one place to extend.
pub const TESTS: &[TestEntry] = &[
    // BPF_PROG_TEST_RUN on the classifier: the verifier of each kernel.
    TestEntry {
        package: "netwatch-agent",
        target: "classifier",
        filters: &[],
        skip: &[],
        kernels: &[],
        threads: 2,
    },
    // The real agent on a lab node: drops, refusals, timeouts, DNS, IPv6.
    TestEntry {
        package: "netwatch-e2e",
        target: "capture",
        filters: &[],
        skip: &[],
        kernels: &[],
        threads: 1,
    },
    // A flood beyond the drop table: the drop aggregate, the handshake
    // table's overflow, on each kernel's verifier.
    TestEntry {
        package: "netwatch-e2e",
        target: "flood",
        filters: &[],
        skip: &[],
        kernels: &[],
        threads: 1,
    },
    // Each hook's kernel variants: drops by location, hooks in metrics and
    // readyz, SIGKILL and restart, a CNI's program ending the chain.
    TestEntry {
        package: "netwatch-e2e",
        target: "kernel_variants",
        filters: &[],
        skip: &[],
        kernels: &[],
        threads: 1,
    },
    // The eBPF datapath's programs on each verifier (clsact before 6.6) and
    // the agent under bpf_redirect_peer; the scenarios and truth tables stay
    // on the host (minutes each under TCG).
    TestEntry {
        package: "netwatch-e2e",
        target: "datapath_ebpf",
        filters: &["the_"],
        skip: &[],
        kernels: &[],
        threads: 1,
    },
    // The Open vSwitch datapath: the host kernel has no openvswitch module.
    // 6.1 shows kernels before 6.4 (no OVS drop reasons, as 5.10), 6.12
    // those after...
    TestEntry {
        package: "netwatch-e2e",
        target: "datapath_ovs",
        filters: &[],
        skip: &["ovs_scenario"],
        kernels: &["6.1", "6.12"],
        threads: 1,
    },
    // ...and the scenarios on OVS, which need its drop reason (1.5-2 min
    // each under TCG, two at a time: they mostly wait).
    TestEntry {
        package: "netwatch-e2e",
        target: "datapath_ovs",
        filters: &["ovs_scenario"],
        skip: &[],
        kernels: &["6.12"],
        threads: 2,
    },
    // The bridge datapath (bridge, br_netfilter, VXLAN are modules there):
    // the overlay's three drop places, tunnels decoded by kfree_skb, and one
    // scenario end to end (all of them run on the host kernel). On 5.10:
    // the oldest verifier, and tunnels decoded on the drop-site variant
    // (6.1 and 6.12 passed them when they were added; 2.5 min a kernel).
    TestEntry {
        package: "netwatch-e2e",
        target: "datapath_bridge",
        filters: &[
            "drops_before_encapsulation",
            "geneve_and_ipip",
            "scenario_prod_default_deny",
        ],
        skip: &[],
        kernels: &["5.10"],
        threads: 1,
    },
];

/// What `netwatch-agent --check-kernel` said in the guest: one hook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookMode {
    pub hook: String,
    pub mode: String,
    #[serde(default)]
    pub off_because: Option<String>,
}

/// The README's kernel table for these results (the hooks' modes per
/// kernel, as the agent reported them inside each VM).
pub fn readme_kernel_table(results: &[KernelResult]) -> String {
    let mut t = String::from(
        "| kernel | kfree_skb | tc | sock_ops | sock_state |\n| --- | --- | --- | --- | --- |\n",
    );
    for r in results {
        let mode = |hook: &str| {
            r.hooks
                .iter()
                .find(|h| h.hook == hook)
                .map(|h| h.mode.clone())
                .unwrap_or_else(|| "?".into())
        };
        let distro = KERNELS
            .iter()
            .find(|k| k.name == r.kernel)
            .map(|k| match k.suite {
                "bullseye" => " (Debian 11)",
                "bookworm" => " (Debian 12)",
                "trixie" => " (Debian 13)",
                _ => "",
            })
            .unwrap_or("");
        let _ = writeln!(
            t,
            "| {}{distro} | {} | {} | {} | {} |",
            r.kernel,
            mode("kfree_skb"),
            mode("tc"),
            mode("sock_ops"),
            mode("sock_state")
        );
    }
    t
}

const README_BEGIN: &str = "<!-- kernel-matrix:begin -->\n";
const README_END: &str = "<!-- kernel-matrix:end -->";

/// The README's kernel table must say what the matrix saw; with `update`,
/// rewrite it instead.
pub fn check_readme(readme: &Path, results: &[KernelResult], update: bool) -> Result<()> {
    let text =
        fs::read_to_string(readme).with_context(|| format!("reading {}", readme.display()))?;
    let (Some(b), Some(e)) = (text.find(README_BEGIN), text.find(README_END)) else {
        bail!("{}: no kernel-matrix markers", readme.display());
    };
    let current = &text[b + README_BEGIN.len()..e];
    let want = readme_kernel_table(results);
    if current == want {
        return Ok(());
    }
    if update {
        let new = format!("{}{want}{}", &text[..b + README_BEGIN.len()], &text[e..]);
        fs::write(readme, new)?;
        eprintln!("vmtest: updated the kernel table in {}", readme.display());
        return Ok(());
    }
    bail!(
        "{}'s kernel table does not match the matrix; it should read:\n{want}(`cargo xtask vmtest --update-readme` rewrites it)",
        readme.display()
    )
}

/// Modules the tests and the lab may need, loaded (when the kernel has them)
/// before the tests; anything else is still autoloaded on demand.
const GUEST_MODULES: &[&str] = &[
    "ipv6",
    "veth",
    "bridge",
    "br_netfilter",
    "vxlan",
    "geneve",
    "openvswitch",
    "sctp",
    "nf_conntrack",
    "nf_nat",
    "nf_tables",
    "nft_ct",
    "nft_nat",
    "nft_chain_nat",
    "nft_masq",
    "nft_redir",
    "nft_reject",
    "nft_reject_inet",
    "nft_reject_ipv4",
    "nft_reject_ipv6",
    "nft_reject_bridge",
    "nft_fib",
    "nft_fib_inet",
    "nft_fib_ipv4",
    "nft_fib_ipv6",
    "nft_numgen",
    "nft_hash",
    "nft_limit",
    "nft_log",
    "nft_quota",
    "nft_socket",
    "nft_meta_bridge",
    "nf_conntrack_bridge",
    "sch_ingress",
    "cls_bpf",
    "act_bpf",
    "act_gact",
    "sch_netem",
];

/// What the initramfs loads to reach the host's root (virtio-fs over PCI).
const INITRAMFS_MODULES: &[&str] = &["virtio_pci", "fuse", "virtiofs"];

const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
const MIRROR: &str = "http://deb.debian.org/debian";
const BUSYBOX: &str = "/bin/busybox";
const VIRTIOFSD: &[&str] = &["/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"];
/// Where the guest sees its results share.
const GUEST_OUT: &str = "/run/vmtest/out";

pub struct Options {
    /// Kernel names; empty means all.
    pub kernels: Vec<String>,
    /// Keep each guest up with a shell on this terminal after its tests.
    pub keep: bool,
    /// Overall limit per VM.
    pub timeout: Duration,
    /// Extra arguments for every test executable.
    pub test_args: Vec<String>,
    /// Rewrite the README's kernel table from the results instead of
    /// failing when it differs.
    pub update_readme: bool,
    /// Measure the classifiers' cost on each kernel instead of testing.
    pub bench: bool,
}

// ---------------------------------------------------------------- selection

/// The kernels `names` asks for (`all` or empty: every one).
pub fn select_kernels(names: &[String]) -> Result<Vec<KernelSpec>> {
    if names.is_empty() || names.iter().any(|n| n == "all") {
        return Ok(KERNELS.to_vec());
    }
    names
        .iter()
        .map(|n| {
            KERNELS
                .iter()
                .find(|k| k.name == n)
                .copied()
                .with_context(|| {
                    format!(
                        "no kernel {n:?} in the matrix: pick one of {} or all",
                        KERNELS
                            .iter()
                            .map(|k| k.name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })
        })
        .collect()
}

/// The entries of `tests` that run on `kernel`.
pub fn tests_for<'a>(tests: &'a [TestEntry], kernel: &str) -> Vec<&'a TestEntry> {
    tests
        .iter()
        .filter(|t| t.kernels.is_empty() || t.kernels.contains(&kernel))
        .collect()
}

/// `package/target [filters] [--skip ...]`, as the subset is printed.
pub fn describe(t: &TestEntry) -> String {
    let mut s = format!("{}/{}", t.package, t.target);
    if t.filters.is_empty() {
        s.push_str(" (all tests)");
    } else {
        let _ = write!(s, " matching {}", t.filters.join(" | "));
    }
    for k in t.skip {
        let _ = write!(s, " --skip {k}");
    }
    s
}

// ------------------------------------------------------------ pure helpers

/// A one-suite APT sources list, signed by the Debian archive keyring.
pub fn sources_list(mirror: &str, suite: &str, keyring: &str) -> String {
    format!("deb [signed-by={keyring}] {mirror} {suite} main\n")
}

/// One step of `modprobe --show-depends` output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModStep {
    /// A module file to load, in this order.
    Insmod(PathBuf),
    /// Built into the kernel: nothing to load.
    Builtin(String),
}

/// Parse `modprobe --show-depends` (dependencies first, the module last).
pub fn parse_show_depends(text: &str) -> Result<Vec<ModStep>> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| {
            let mut words = l.split_whitespace();
            match (words.next(), words.next()) {
                (Some("insmod"), Some(path)) => Ok(ModStep::Insmod(PathBuf::from(path))),
                (Some("builtin"), Some(name)) => Ok(ModStep::Builtin(name.to_string())),
                _ => bail!("unexpected line from modprobe --show-depends: {l:?}"),
            }
        })
        .collect()
}

/// Module files to load for all of `steps`, each once, in dependency order.
pub fn load_order(steps: &[Vec<ModStep>]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for step in steps.iter().flatten() {
        if let ModStep::Insmod(p) = step
            && !out.contains(p)
        {
            out.push(p.clone());
        }
    }
    out
}

/// A string as one POSIX shell word.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:,@".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    Failed,
    Ignored,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestResult {
    pub name: String,
    pub result: Outcome,
    /// For a failure: what the test printed when it panicked (the assertion).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub message: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LibtestRun {
    pub tests: Vec<TestResult>,
    /// The `test result: ...` lines, one per test binary section.
    pub summaries: Vec<String>,
}

/// Longest failure message kept (the capture tests print whole agent logs).
const MESSAGE_MAX: usize = 4000;

/// Parse libtest's (pretty format) output: each test's outcome, the failure
/// messages, and the summary lines.
pub fn parse_libtest(output: &str) -> LibtestRun {
    let mut run = LibtestRun::default();
    let mut messages: BTreeMap<String, String> = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for line in output.lines() {
        if let Some(rest) = line.strip_prefix("---- ")
            && let Some(name) = rest.strip_suffix(" stdout ----")
        {
            if let Some((n, m)) = current.take() {
                messages.insert(n, m);
            }
            current = Some((name.to_string(), String::new()));
            continue;
        }
        if let Some((_, m)) = current.as_mut() {
            if line == "failures:" || line.starts_with("test result: ") {
                if let Some((n, m)) = current.take() {
                    messages.insert(n, m);
                }
            } else {
                m.push_str(line);
                m.push('\n');
                continue;
            }
        }
        if line.starts_with("test result: ") {
            run.summaries.push(line.trim().to_string());
            continue;
        }
        let Some(rest) = line.strip_prefix("test ") else {
            continue;
        };
        let Some((name, outcome)) = rest.rsplit_once(" ... ") else {
            continue;
        };
        let name = name.strip_suffix(" - should panic").unwrap_or(name);
        let result = match outcome.trim() {
            "ok" => Outcome::Ok,
            "FAILED" => Outcome::Failed,
            o if o.starts_with("ignored") => Outcome::Ignored,
            _ => continue,
        };
        run.tests.push(TestResult {
            name: name.to_string(),
            result,
            message: None,
        });
    }
    if let Some((n, m)) = current.take() {
        messages.insert(n, m);
    }
    for t in &mut run.tests {
        if t.result == Outcome::Failed
            && let Some(m) = messages.get(&t.name)
        {
            t.message = Some(panic_message(m));
        }
    }
    run
}

/// The panic message of a failed test's captured output: the lines after
/// `thread '...' panicked at ...:` up to libtest's backtrace note.
fn panic_message(captured: &str) -> String {
    let lines: Vec<&str> = captured.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.starts_with("thread '") && l.contains("panicked at"));
    let body: Vec<&str> = match start {
        Some(i) => {
            let mut v = vec![lines[i]];
            v.extend(
                lines[i + 1..]
                    .iter()
                    .take_while(|l| !l.starts_with("note: run with `RUST_BACKTRACE")),
            );
            v
        }
        None => lines,
    };
    let mut text = body.join("\n").trim().to_string();
    if text.len() > MESSAGE_MAX {
        let mut cut = MESSAGE_MAX;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("\n[... cut; the whole output is in the test log]");
    }
    text
}

/// A failure message in one line, for the terminal: the assertion (its
/// first line, cut at 160 characters) and `assert_eq!`'s left and right.
pub fn headline(message: &str) -> String {
    let mut lines = message.lines().peekable();
    if lines.peek().is_some_and(|l| l.starts_with("thread '")) {
        lines.next();
    }
    let all: Vec<&str> = lines.collect();
    let mut first = all.first().copied().unwrap_or("").trim().to_string();
    if first.chars().count() > 160 {
        first = first.chars().take(160).collect::<String>() + "...";
    }
    let side = |tag: &str| {
        all.iter()
            .rev()
            .find_map(|l| l.trim_start().strip_prefix(tag))
            .map(str::trim)
    };
    match (side("left:"), side("right:")) {
        (Some(l), Some(r)) => format!("{first} (left: {l}, right: {r})"),
        _ => first,
    }
}

// ---------------------------------------------------------------- results

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuiteResult {
    pub package: String,
    pub target: String,
    pub filters: Vec<String>,
    /// The executable's exit code; None when it never finished (VM died or
    /// timed out).
    pub exit_code: Option<i32>,
    pub summary: Vec<String>,
    pub tests: Vec<TestResult>,
    /// Where the whole output is.
    pub log: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelResult {
    /// The matrix name (`5.10`).
    pub kernel: String,
    pub package: String,
    pub package_version: String,
    /// `uname -r` in the guest; None if it never booted.
    pub version: Option<String>,
    /// When this kernel's run ended (RFC 3339).
    pub finished: String,
    pub wall_seconds: f64,
    /// Why the VM did not complete its run, if it did not.
    pub error: Option<String>,
    pub modules_missing: Vec<String>,
    /// The capture hooks' modes on this kernel (`netwatch-agent --check-kernel`).
    #[serde(default)]
    pub hooks: Vec<HookMode>,
    /// `--bench`: what `cargo xtask bench --programs` measured in the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program_cost: Option<serde_json::Value>,
    pub suites: Vec<SuiteResult>,
    pub passed: usize,
    pub failed: usize,
    pub ignored: usize,
}

impl KernelResult {
    pub fn count(&mut self) {
        let all = self.suites.iter().flat_map(|s| &s.tests);
        let n = |o| all.clone().filter(|t| t.result == o).count();
        self.passed = n(Outcome::Ok);
        self.failed = n(Outcome::Failed);
        self.ignored = n(Outcome::Ignored);
    }

    /// Everything passed: booted, every executable finished with 0.
    pub fn ok(&self) -> bool {
        self.error.is_none()
            && self.failed == 0
            && self.suites.iter().all(|s| s.exit_code == Some(0))
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Results {
    pub kernels: Vec<KernelResult>,
}

impl Results {
    /// Replace (or add) these kernels' results; others' stay as they were,
    /// in the matrix's order.
    pub fn merge(&mut self, new: Vec<KernelResult>) {
        for k in new {
            self.kernels.retain(|o| o.kernel != k.kernel);
            self.kernels.push(k);
        }
        let rank = |name: &str| {
            KERNELS
                .iter()
                .position(|k| k.name == name)
                .unwrap_or(usize::MAX)
        };
        self.kernels.sort_by_key(|k| rank(&k.kernel));
    }
}

/// The final table: kernel -> passed / failed / ignored.
pub fn table(results: &[KernelResult]) -> String {
    let mut s = format!(
        "{:<7} {:<32} {:>6} {:>6} {:>7} {:>6}  status\n",
        "kernel", "uname -r", "passed", "failed", "ignored", "time"
    );
    for k in results {
        let status = match (&k.error, k.ok()) {
            (Some(e), _) => e.lines().next().unwrap_or("").to_string(),
            (None, true) => "ok".into(),
            (None, false) => "FAILED".into(),
        };
        let _ = writeln!(
            s,
            "{:<7} {:<32} {:>6} {:>6} {:>7} {:>5}s  {}",
            k.kernel,
            k.version.as_deref().unwrap_or("-"),
            k.passed,
            k.failed,
            k.ignored,
            k.wall_seconds.round(),
            status
        );
    }
    s
}

// ------------------------------------------------------------------- paths

struct Paths {
    /// target/vmtest
    root: PathBuf,
}

impl Paths {
    fn apt(&self, suite: &str) -> PathBuf {
        self.root.join("apt").join(suite)
    }
    fn debs(&self) -> PathBuf {
        self.root.join("debs")
    }
    fn kernel(&self, k: &KernelSpec) -> PathBuf {
        self.root.join("kernels").join(k.name)
    }
    fn run(&self, k: &KernelSpec) -> PathBuf {
        self.root.join("runs").join(k.name)
    }
    fn results(&self) -> PathBuf {
        self.root.join("results.json")
    }
    /// An empty directory the read-only view of `/` is bound onto (in
    /// virtiofsd's own mount namespace only).
    fn rootro(&self) -> PathBuf {
        self.root.join("rootro")
    }
}

// ---------------------------------------------------------------- commands

fn run_cmd(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("running {cmd:?} (is it installed? `cargo xtask setup`)"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn target_dir() -> Result<PathBuf> {
    #[derive(Deserialize)]
    struct Meta {
        target_directory: PathBuf,
    }
    let out = run_cmd(cargo().args(["metadata", "--format-version", "1", "--no-deps"]))?;
    let meta: Meta = serde_json::from_str(&out).context("reading cargo metadata")?;
    Ok(meta.target_directory)
}

// ------------------------------------------------------------------ fetch

/// The options that make apt use only `dir`'s one-suite sources list and
/// lists, leaving the machine's own apt state alone.
fn apt_options(dir: &Path) -> Vec<String> {
    vec![
        format!(
            "-oDir::Etc::sourcelist={}",
            dir.join("sources.list").display()
        ),
        "-oDir::Etc::sourceparts=-".into(),
        format!("-oDir::State::Lists={}", dir.join("lists").display()),
        format!("-oDir::Cache={}", dir.join("cache").display()),
        "-oAcquire::Languages=none".into(),
        "-qq".into(),
    ]
}

fn sha256(path: &Path) -> Result<String> {
    let out = run_cmd(Command::new("sha256sum").arg(path))?;
    out.split_whitespace()
        .next()
        .map(str::to_string)
        .context("sha256sum printed nothing")
}

fn deb_name(k: &KernelSpec) -> String {
    // apt-get download names files with the version's ':' escaped; these have none.
    format!("{}_{}_amd64.deb", k.package, k.version)
}

/// The pinned .deb, from the cache or downloaded with apt (signature checked
/// against the Debian archive keyring).
fn fetch_deb(paths: &Paths, k: &KernelSpec) -> Result<PathBuf> {
    let deb = paths.debs().join(deb_name(k));
    if deb.exists() && sha256(&deb)? == k.sha256 {
        return Ok(deb);
    }
    if !Path::new(KEYRING).exists() {
        bail!("{KEYRING} is missing: install debian-archive-keyring (`cargo xtask setup`)");
    }
    let apt = paths.apt(k.suite);
    fs::create_dir_all(apt.join("lists/partial"))?;
    fs::create_dir_all(apt.join("cache/archives/partial"))?;
    fs::create_dir_all(paths.debs())?;
    fs::write(
        apt.join("sources.list"),
        sources_list(MIRROR, k.suite, KEYRING),
    )?;
    eprintln!(
        "vmtest: {}: fetching {} {} from Debian {}",
        k.name, k.package, k.version, k.suite
    );
    let opts = apt_options(&apt);
    let update = Command::new("apt-get").args(&opts).arg("update").output()?;
    let err = String::from_utf8_lossy(&update.stderr);
    if !update.status.success() || err.contains("NO_PUBKEY") || err.contains("is not signed") {
        bail!(
            "apt-get update for Debian {} failed{}: {}",
            k.suite,
            if err.contains("NO_PUBKEY") {
                " (the installed debian-archive-keyring lacks this suite's key: upgrade it; \
                 never turn signature checks off)"
            } else {
                ""
            },
            err.trim()
        );
    }
    let got = Command::new("apt-get")
        .args(&opts)
        .args(["download", &format!("{}={}", k.package, k.version)])
        .current_dir(paths.debs())
        .output()?;
    if !got.status.success() {
        let available = Command::new("apt-cache")
            .args(&opts)
            .args(["madison", k.package])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let similar = Command::new("apt-cache")
            .args(&opts)
            .args([
                "search",
                "--names-only",
                "^linux-image-[0-9.+a-z-]*-cloud-amd64-unsigned$",
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        bail!(
            "Debian {suite} no longer has {pkg} version {ver} (the archive keeps only the newest \
             uploads): apt-get said: {err}\n  versions of {pkg} there now: {available}\n  cloud \
             kernels there now:\n{similar}\n  update the {name} entry of KERNELS in \
             xtask/src/vmtest.rs (package, version and the sha256 that `apt-cache show` lists)",
            suite = k.suite,
            pkg = k.package,
            ver = k.version,
            name = k.name,
            err = String::from_utf8_lossy(&got.stderr).trim(),
            available = if available.is_empty() {
                "none".into()
            } else {
                available
            },
        );
    }
    let sum =
        sha256(&deb).with_context(|| format!("apt-get download wrote no {}", deb.display()))?;
    if sum != k.sha256 {
        let _ = fs::remove_file(&deb);
        bail!(
            "{} has SHA-256 {sum}, not the pinned {}: update KERNELS in xtask/src/vmtest.rs if \
             Debian re-uploaded it",
            deb.display(),
            k.sha256
        );
    }
    Ok(deb)
}

/// An extracted kernel, ready to boot.
struct Prepared {
    vmlinuz: PathBuf,
    initramfs: PathBuf,
    /// A root holding `lib/modules/<release>` with modules.dep (for `modprobe -d`).
    modroot: PathBuf,
}

/// Download (if needed), extract, index the modules and build the initramfs,
/// once; later runs find it all under target/vmtest/kernels/<name>.
fn prepare(paths: &Paths, k: &KernelSpec) -> Result<Prepared> {
    let dir = paths.kernel(k);
    let stamp = dir.join("ready");
    let root = dir.join("root");
    let initramfs = dir.join("initramfs.cpio");
    let want = format!("{} {}\n", k.package, k.version);
    if fs::read_to_string(&stamp).ok().as_deref() != Some(want.as_str()) {
        let deb = fetch_deb(paths, k)?;
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        run_cmd(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
        // trixie ships modules under usr/lib/modules; kmod looks in lib/modules.
        if !root.join("lib").exists() && root.join("usr/lib/modules").exists() {
            std::os::unix::fs::symlink("usr/lib", root.join("lib"))?;
        }
        let release = release_of(&root)?;
        run_cmd(Command::new("depmod").arg("-b").arg(&root).arg(&release))?;
        build_initramfs(&root, &release, &dir.join("initramfs"), &initramfs)?;
        fs::write(&stamp, want)?;
    }
    let release = release_of(&root)?;
    Ok(Prepared {
        vmlinuz: root.join("boot").join(format!("vmlinuz-{release}")),
        initramfs,
        modroot: root,
    })
}

/// The kernel release (`uname -r`) of an extracted package.
fn release_of(root: &Path) -> Result<String> {
    let dir = root.join("lib/modules");
    let mut names: Vec<String> = fs::read_dir(&dir)
        .with_context(|| format!("{} has no kernel modules", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    match names.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!("expected one kernel under {}: {names:?}", dir.display()),
    }
}

/// busybox-static, the modules that reach virtio-fs (plain .ko: busybox's
/// insmod reads no compressed ones), and /init.
fn build_initramfs(root: &Path, release: &str, staging: &Path, out: &Path) -> Result<()> {
    let busybox = Path::new(BUSYBOX);
    let ldd = Command::new("ldd").arg(busybox).output();
    let is_static = ldd
        .map(|o| {
            let t = String::from_utf8_lossy(&o.stdout) + String::from_utf8_lossy(&o.stderr);
            t.contains("not a dynamic executable") || t.contains("statically linked")
        })
        .unwrap_or(false);
    if !busybox.exists() || !is_static {
        bail!("{BUSYBOX} is missing or not static: install busybox-static (`cargo xtask setup`)");
    }
    let _ = fs::remove_dir_all(staging);
    for d in ["bin", "sbin", "modules", "proc", "sys", "dev", "newroot"] {
        fs::create_dir_all(staging.join(d))?;
    }
    fs::copy(busybox, staging.join("bin/busybox"))?;
    let mut steps = Vec::new();
    for m in INITRAMFS_MODULES {
        let out = run_cmd(Command::new("modprobe").arg("-d").arg(root).args([
            "-S",
            release,
            "--show-depends",
            m,
        ]))
        .with_context(|| format!("kernel {release} has no {m}: it cannot reach the host's root"))?;
        steps.push(parse_show_depends(&out)?);
    }
    let mut order = String::new();
    for (i, path) in load_order(&steps).iter().enumerate() {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .context("module file name")?;
        let plain = name
            .strip_suffix(".xz")
            .or_else(|| name.strip_suffix(".zst"))
            .unwrap_or(name);
        let dest = format!("{i:02}-{plain}");
        let bytes = if name.ends_with(".xz") {
            decompress("xz", path)?
        } else if name.ends_with(".zst") {
            decompress("zstd", path)?
        } else {
            fs::read(path).with_context(|| format!("reading {}", path.display()))?
        };
        fs::write(staging.join("modules").join(&dest), bytes)?;
        order.push_str(&dest);
        order.push('\n');
    }
    fs::write(staging.join("modules/order"), order)?;
    let init = staging.join("init");
    fs::write(&init, INIT)?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;
    // An uncompressed newc archive: the kernel takes it as it is.
    let file = fs::File::create(out)?;
    let status = Command::new("sh")
        .args([
            "-c",
            "cd \"$1\" && find . -print0 | LC_ALL=C sort -z | cpio --null --quiet -o -H newc -R 0:0",
            "sh",
        ])
        .arg(staging)
        .stdout(file)
        .status()
        .context("running cpio (install cpio: `cargo xtask setup`)")?;
    if !status.success() {
        bail!("building the initramfs with cpio failed");
    }
    Ok(())
}

fn decompress(tool: &str, path: &Path) -> Result<Vec<u8>> {
    let out = Command::new(tool)
        .args(["-dc"])
        .arg(path)
        .output()
        .with_context(|| format!("running {tool}"))?;
    if !out.status.success() {
        bail!("{tool} -dc {} failed", path.display());
    }
    Ok(out.stdout)
}

/// The guest's /init (busybox sh): load the virtio-fs modules, mount the
/// host's root read-only, lay the writable and kernel file systems over it,
/// point the kernel's module autoloader at the host's kmod and this kernel's
/// modules, chroot in and run the generated run.sh, power off.
const INIT: &str = r#"#!/bin/busybox sh
# netwatch vmtest guest init (generated by cargo xtask vmtest).
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
die() { echo "vmtest-init: $*"; sync; poweroff -f; sleep 10; }
while read -r m; do
    insmod "/modules/$m" || die "insmod $m failed"
done < /modules/order
R=/newroot
mount -t virtiofs -o ro hostroot $R || die "cannot mount the host's root (virtio-fs tag hostroot)"
# A second view of the host's root, kept uncovered: a workspace under /tmp
# or /run (a CI checkout in /tmp, say) is bound back from it below.
mkdir -p /hostroot
mount -o bind $R /hostroot || die "cannot bind the host's root to /hostroot"
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
mount -t tmpfs -o mode=1777 tmpfs $R/tmp
mount -t tmpfs -o mode=1777 tmpfs $R/var/tmp
mount -t tmpfs -o mode=755 tmpfs $R/run
mkdir -p $R/run/netns $R/run/lock $R/run/vmtest/out
mount -t virtiofs results $R/run/vmtest/out || die "cannot mount the results share (virtio-fs tag results)"
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup || die "cannot mount cgroup2"
mount -t bpf bpf $R/sys/fs/bpf || die "cannot mount bpffs"
mount -t tracefs tracefs $R/sys/kernel/tracing || echo "vmtest-init: no tracefs"
mount -t debugfs debugfs $R/sys/kernel/debug || echo "vmtest-init: no debugfs"
# vmtest.env (written by the host) says where this kernel's modules are.
. $R/run/vmtest/out/vmtest.env
# The host paths the tests need (workspace, target dir), one per line: the
# tmpfs mounts above hide those that live under them.
while read -r p; do
    case "$p" in
    /tmp/*|/var/tmp/*|/run/*|/dev/shm/*)
        mkdir -p "$R$p" && mount -o bind "/hostroot$p" "$R$p" || die "cannot bind $p back over the tmpfs"
        ;;
    esac
done < $R/run/vmtest/out/keep
# The kernel's module autoloader runs in this (initramfs) root: hand it to
# the host's kmod, chrooted, with this kernel's modules.
mkdir -p /sbin
printf '#!/bin/sh\nexec chroot %s /sbin/modprobe -d %s "$@"\n' "$R" "$MODROOT" > /sbin/vmtest-modprobe
chmod 755 /sbin/vmtest-modprobe
echo /sbin/vmtest-modprobe > /proc/sys/kernel/modprobe
chroot $R /bin/sh /run/vmtest/out/run.sh
echo "vmtest-init: run.sh exited $?"
sync
poweroff -f
sleep 10
"#;

// ----------------------------------------------------------- test binaries

#[derive(Debug, Clone)]
struct Executable {
    target: String,
    path: PathBuf,
    /// The package directory: cargo runs a test there.
    cwd: PathBuf,
}

/// Build the agent's binaries and the selected test targets; the test
/// executables as cargo reports them.
fn build(entries: &[&TestEntry]) -> Result<Vec<Executable>> {
    eprintln!("vmtest: building the agent, the lab and the test executables");
    let st = cargo()
        .args([
            "build",
            "--package",
            "netwatch-agent",
            "--package",
            "netwatch-lab",
            "--bins",
        ])
        .status()?;
    if !st.success() {
        bail!("cargo build --package netwatch-agent --package netwatch-lab --bins failed");
    }
    let mut cmd = cargo();
    cmd.args(["test", "--no-run", "--message-format=json"]);
    let mut seen = Vec::new();
    for e in entries {
        if !seen.contains(&e.package) {
            cmd.args(["--package", e.package]);
            seen.push(e.package);
        }
    }
    for e in entries {
        cmd.args(["--test", e.target]);
    }
    cmd.stdout(Stdio::piped());
    let mut child = cmd.spawn().context("running cargo test --no-run")?;
    let mut out = String::new();
    child
        .stdout
        .take()
        .context("cargo's stdout")?
        .read_to_string(&mut out)?;
    if !child.wait()?.success() {
        bail!("cargo test --no-run failed: the test executables do not build");
    }
    parse_cargo_messages(&out)
}

fn parse_cargo_messages(out: &str) -> Result<Vec<Executable>> {
    #[derive(Deserialize)]
    struct Target {
        name: String,
        kind: Vec<String>,
    }
    #[derive(Deserialize)]
    struct Message {
        reason: String,
        target: Option<Target>,
        executable: Option<PathBuf>,
        manifest_path: Option<PathBuf>,
    }
    let mut exes = Vec::new();
    for line in out.lines().filter(|l| l.starts_with('{')) {
        let m: Message = serde_json::from_str(line).context("a cargo JSON message")?;
        if m.reason != "compiler-artifact" {
            continue;
        }
        let (Some(t), Some(path), Some(manifest)) = (m.target, m.executable, m.manifest_path)
        else {
            continue;
        };
        if t.kind.iter().any(|k| k == "test") {
            exes.push(Executable {
                target: t.name,
                cwd: manifest.parent().map(Path::to_path_buf).unwrap_or_default(),
                path,
            });
        }
    }
    Ok(exes)
}

// --------------------------------------------------------------- the guest

/// The script the guest runs (the host's /bin/sh, in the chroot): load the
/// modules, run each test executable with its output teed to the console and
/// the results share, and its exit code next to it.
fn run_script(
    modroot: &Path,
    suites: &[(&TestEntry, &Executable)],
    extra: &[String],
    keep: bool,
    bench: Option<&Path>,
) -> String {
    let mut s = String::from(
        "#!/bin/sh\n# Generated by cargo xtask vmtest: runs in the guest.\n\
         export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root NO_COLOR=1\n\
         # Emulated CPUs: the tests' waits (not their assertions) stretch.\n\
         export NETWATCH_TEST_SLOWDOWN=6\n",
    );
    let _ = writeln!(s, "OUT={GUEST_OUT}");
    s.push_str("uname -r > \"$OUT/uname\"\necho \"vmtest: guest kernel $(uname -r)\"\n");
    s.push_str("ip link set lo up\n");
    let _ = writeln!(s, "MODROOT={}", shell_quote(&modroot.to_string_lossy()));
    let _ = writeln!(
        s,
        "for m in {}; do\n    if ! err=$(modprobe -d \"$MODROOT\" \"$m\" 2>&1); then echo \"$m\" >> \"$OUT/modules.missing\"; echo \"vmtest: module $m: $err\"; fi\ndone",
        GUEST_MODULES.join(" ")
    );
    // What capture runs here, for the README's kernel table; and the
    // kernel's symbols, for the drop-site fixtures.
    if let Some((_, exe)) = suites.first()
        && let Some(dir) = exe.path.parent().and_then(Path::parent)
    {
        let agent = dir.join("netwatch-agent");
        let _ = writeln!(
            s,
            "{} --check-kernel --log error > \"$OUT/hooks.jsonl\" 2>&1\ncp /proc/kallsyms \"$OUT/kallsyms\"",
            shell_quote(&agent.to_string_lossy())
        );
    }
    // The kernel's own module autoloader (through the initramfs' wrapper):
    // `dummy` is loaded by nothing else.
    s.push_str(
        "if ip link add vmtest-probe type dummy 2>/dev/null; then ip link del vmtest-probe; \
         echo 'vmtest: module autoloading works'; else echo 'vmtest: module autoloading does \
         NOT work (ip link add type dummy failed)'; fi\n",
    );
    // --bench: the classifiers' cost against a no-op, instead of tests.
    if let Some(xtask) = bench {
        let _ = writeln!(
            s,
            "echo 'vmtest: program cost'\n{} bench --programs --seconds 5 > \"$OUT/bench.json\" 2> \"$OUT/bench.log\"; tail -3 \"$OUT/bench.log\"; cat \"$OUT/bench.json\"",
            shell_quote(&xtask.to_string_lossy())
        );
    }
    for (i, (entry, exe)) in suites.iter().enumerate() {
        let mut args = vec![format!("--test-threads={}", entry.threads.max(1))];
        args.extend(entry.filters.iter().map(|f| f.to_string()));
        for k in entry.skip {
            args.push("--skip".into());
            args.push(k.to_string());
        }
        args.extend(extra.iter().cloned());
        let argv: Vec<String> = std::iter::once(exe.path.to_string_lossy().into_owned())
            .chain(args)
            .map(|a| shell_quote(&a))
            .collect();
        let _ = writeln!(
            s,
            "echo \"vmtest: running {package}/{target}\"\ncd {cwd}\n{{ {argv} 2>&1; echo $? > \"$OUT/suite-{i}.rc\"; }} | tee \"$OUT/suite-{i}.log\"",
            package = entry.package,
            target = entry.target,
            cwd = shell_quote(&exe.cwd.to_string_lossy()),
            argv = argv.join(" "),
        );
    }
    s.push_str("echo done > \"$OUT/done\"\n");
    if keep {
        s.push_str(
            "echo 'vmtest: --keep: a shell in the guest; exit it to power the VM off (Ctrl-A X stops QEMU)'\n\
             cd /\n/bin/sh -i\n",
        );
    }
    s
}

/// Processes this run started, killed (with everything in their process
/// groups) when dropped: on success, failure, timeout, Ctrl-C or panic.
#[derive(Default)]
struct Processes(Vec<Child>);

impl Processes {
    /// Start `cmd`; its index in `self.0`.
    fn spawn(&mut self, cmd: &mut Command, own_group: bool) -> Result<usize> {
        if own_group {
            cmd.process_group(0);
        }
        // SAFETY: prctl is async-signal-safe; it only asks for SIGKILL when
        // this (xtask's main) thread goes away, so nothing outlives xtask.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
        self.0.push(child);
        Ok(self.0.len() - 1)
    }

    /// Kill the newest first: QEMU before the virtiofsd daemons it uses.
    fn kill_all(&mut self) {
        for c in self.0.iter_mut().rev() {
            if let Ok(None) = c.try_wait() {
                let pid = c.id() as i32;
                // SAFETY: signalling processes (and groups) we started.
                unsafe {
                    libc::kill(-pid, libc::SIGKILL);
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            let _ = c.wait();
        }
        self.0.clear();
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        self.kill_all();
    }
}

fn virtiofsd() -> Result<&'static str> {
    VIRTIOFSD
        .iter()
        .copied()
        .find(|p| Path::new(p).exists())
        .with_context(|| {
            format!(
                "no virtiofsd ({}): install qemu-system-x86 (`cargo xtask setup`)",
                VIRTIOFSD.join(" or ")
            )
        })
}

fn wait_for_socket(path: &Path, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        if Instant::now() > deadline {
            bail!(
                "virtiofsd did not create {} within 10 s: {}",
                path.display(),
                fs::read_to_string(log).unwrap_or_default().trim()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Boot `k` and run `suites` in it; everything the VM reported.
fn run_vm(
    paths: &Paths,
    k: &KernelSpec,
    prepared: &Prepared,
    suites: &[(&TestEntry, &Executable)],
    opts: &Options,
    stop: &AtomicBool,
) -> Result<(Option<String>, Option<String>)> {
    let run = paths.run(k);
    let _ = fs::remove_dir_all(&run);
    fs::create_dir_all(&run)?;
    fs::create_dir_all(paths.rootro())?;
    let out = run.join("out");
    fs::create_dir_all(&out)?;
    fs::write(
        out.join("vmtest.env"),
        format!(
            "MODROOT={}\n",
            shell_quote(&prepared.modroot.to_string_lossy())
        ),
    )?;
    // Workspace and target dir, bound back over the guest's tmpfs mounts
    // when they live under /tmp or /run.
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let mut keep = String::new();
    let target = paths.root.parent().unwrap_or(&paths.root);
    for p in [fs::canonicalize(&workspace)?, fs::canonicalize(target)?] {
        keep.push_str(&p.to_string_lossy());
        keep.push('\n');
    }
    fs::write(out.join("keep"), keep)?;
    fs::write(
        out.join("run.sh"),
        run_script(
            &prepared.modroot,
            suites,
            &opts.test_args,
            opts.keep,
            // This binary's directory, not its path: the build above may
            // have replaced the running file ("... (deleted)").
            opts.bench
                .then(|| {
                    std::env::current_exe()
                        .ok()?
                        .parent()
                        .map(|d| d.join("xtask"))
                })
                .flatten()
                .as_deref(),
        ),
    )?;

    let mut procs = Processes::default();
    let virtiofsd = virtiofsd()?;
    let root_sock = run.join("hostroot.sock");
    let out_sock = run.join("results.sock");
    // The host's root, read-only for real: a non-recursive bind of / made
    // read-only, in a mount namespace of virtiofsd's own (gone with it).
    let root_log = run.join("virtiofsd-hostroot.log");
    procs.spawn(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(
                "mount --bind / \"$1\" && mount -o remount,bind,ro \"$1\" && \
                 exec \"$3\" --socket-path=\"$2\" -o source=\"$1\" -o cache=always",
            )
            .arg("sh")
            .arg(paths.rootro())
            .arg(&root_sock)
            .arg(virtiofsd)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&root_log)?)
            .stderr(fs::File::create(&root_log)?),
        true,
    )?;
    let out_log = run.join("virtiofsd-results.log");
    procs.spawn(
        Command::new(virtiofsd)
            .arg(format!("--socket-path={}", out_sock.display()))
            .arg(format!("-osource={}", out.display()))
            .arg("-ocache=none")
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out_log)?)
            .stderr(fs::File::create(&out_log)?),
        true,
    )?;
    wait_for_socket(&root_sock, &root_log)?;
    wait_for_socket(&out_sock, &out_log)?;

    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "2G"])
        .args(["-object", "memory-backend-memfd,id=mem,size=2G,share=on"])
        .args(["-numa", "node,memdev=mem"])
        .args(["-nic", "none", "-display", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(&prepared.vmlinuz)
        .arg("-initrd")
        .arg(&prepared.initramfs)
        .args([
            "-append",
            // no_timer_check: under emulation on a loaded host the boot-time
            // IO-APIC timer check can fail and panic the kernel.
            "console=ttyS0 panic=-1 oops=panic random.trust_cpu=on loglevel=4 no_timer_check",
        ])
        .arg("-chardev")
        .arg(format!("socket,id=hostroot,path={}", root_sock.display()))
        .args(["-device", "vhost-user-fs-pci,chardev=hostroot,tag=hostroot"])
        .arg("-chardev")
        .arg(format!("socket,id=results,path={}", out_sock.display()))
        .args(["-device", "vhost-user-fs-pci,chardev=results,tag=results"]);
    let console = run.join("console.log");
    if opts.keep {
        // In this terminal's process group: QEMU reads the terminal.
        qemu.args(["-monitor", "none", "-serial", "mon:stdio"]);
        let q = procs.spawn(&mut qemu, false).context(
            "starting qemu-system-x86_64 (install qemu-system-x86: `cargo xtask setup`)",
        )?;
        while procs.0[q].try_wait()?.is_none() {
            if stop.load(Ordering::SeqCst) {
                procs.kill_all();
                bail!("interrupted: stopped the {} VM", k.name);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    } else {
        qemu.args(["-monitor", "none", "-serial", "stdio"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let q = procs.spawn(&mut qemu, true).context(
            "starting qemu-system-x86_64 (install qemu-system-x86: `cargo xtask setup`)",
        )?;
        let stdout = procs.0[q].stdout.take().context("qemu's stdout")?;
        let stderr = procs.0[q].stderr.take().context("qemu's stderr")?;
        let prefix = format!("[{}] ", k.name);
        let log = fs::File::create(&console)?;
        let copier = std::thread::spawn(move || copy_console(stdout, log, &prefix));
        let qemu_err = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = BufReader::new(stderr).read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + opts.timeout;
        let mut failure = None;
        let mut qemu_failed = false;
        loop {
            if let Some(status) = procs.0[q].try_wait()? {
                if !status.success() {
                    failure = Some(format!("QEMU exited with {status}"));
                    qemu_failed = true;
                }
                break;
            }
            if stop.load(Ordering::SeqCst) {
                procs.kill_all();
                bail!("interrupted: stopped the {} VM", k.name);
            }
            if Instant::now() > deadline {
                failure = Some(format!(
                    "timed out after {} s (--timeout): killed the VM",
                    opts.timeout.as_secs()
                ));
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        procs.kill_all();
        let _ = copier.join();
        let qemu_err = qemu_err.join().unwrap_or_default();
        if qemu_failed
            && let Some(f) = failure.as_mut()
            && !qemu_err.trim().is_empty()
        {
            let _ = write!(f, ": {}", qemu_err.trim());
        }
        let uname = fs::read_to_string(out.join("uname"))
            .ok()
            .map(|s| s.trim().to_string());
        if uname.is_none() && failure.is_none() {
            failure = Some(format!(
                "the VM did not boot to the tests; see {}",
                console.display()
            ));
        } else if failure.is_none() && !out.join("done").exists() {
            failure = Some(format!(
                "the guest stopped before its tests finished; see {}",
                console.display()
            ));
        }
        return Ok((uname, failure));
    }
    procs.kill_all();
    let uname = fs::read_to_string(out.join("uname"))
        .ok()
        .map(|s| s.trim().to_string());
    Ok((uname, None))
}

/// QEMU's serial console, to the console log and (prefixed) to stderr.
fn copy_console(from: impl Read, mut log: fs::File, prefix: &str) {
    use std::io::Write;
    let mut reader = BufReader::new(from);
    let mut line = Vec::new();
    while let Ok(n) = reader.read_until(b'\n', &mut line) {
        if n == 0 {
            break;
        }
        let _ = log.write_all(&line);
        let text = String::from_utf8_lossy(&line);
        eprint!("{prefix}{}", text.trim_end_matches(['\r', '\n']));
        eprintln!();
        line.clear();
    }
}

/// What the guest left in the results share.
/// The hooks' modes the guest's `--check-kernel` printed.
fn collect_hooks(paths: &Paths, k: &KernelSpec) -> Vec<HookMode> {
    fs::read_to_string(paths.run(k).join("out").join("hooks.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn collect(
    paths: &Paths,
    k: &KernelSpec,
    suites: &[(&TestEntry, &Executable)],
) -> (Vec<SuiteResult>, Vec<String>) {
    let out = paths.run(k).join("out");
    let missing = fs::read_to_string(out.join("modules.missing"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect();
    let results = suites
        .iter()
        .enumerate()
        .map(|(i, (entry, _))| {
            let log = out.join(format!("suite-{i}.log"));
            let text = fs::read_to_string(&log).unwrap_or_default();
            let parsed = parse_libtest(&text);
            SuiteResult {
                package: entry.package.into(),
                target: entry.target.into(),
                filters: entry.filters.iter().map(|f| f.to_string()).collect(),
                exit_code: fs::read_to_string(out.join(format!("suite-{i}.rc")))
                    .ok()
                    .and_then(|s| s.trim().parse().ok()),
                summary: parsed.summaries,
                tests: parsed.tests,
                log: log.display().to_string(),
            }
        })
        .collect();
    (results, missing)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

// ------------------------------------------------------------------- main

pub fn vmtest(opts: &Options, stop: &AtomicBool) -> Result<()> {
    let kernels = select_kernels(&opts.kernels)?;
    if !is_root() {
        bail!(
            "vmtest runs virtiofsd (it shares this machine's root read-only into the VMs), \
             which needs root: run it as root"
        );
    }
    let started = Instant::now();
    let paths = Paths {
        root: target_dir()?.join("vmtest"),
    };
    fs::create_dir_all(&paths.root)?;

    // Which tests run where, and the executables for all of them.
    let mut all: Vec<&TestEntry> = Vec::new();
    for k in kernels.iter().filter(|_| !opts.bench) {
        for t in tests_for(TESTS, k.name) {
            if !all.iter().any(|a| std::ptr::eq(*a, t)) {
                all.push(t);
            }
        }
    }
    let exes = build(&all)?;
    let exe_for = |t: &TestEntry| -> Result<Executable> {
        let found: Vec<&Executable> = exes.iter().filter(|e| e.target == t.target).collect();
        match found.as_slice() {
            [one] => Ok((*one).clone()),
            [] => bail!("cargo built no test executable {}/{}", t.package, t.target),
            _ => bail!("more than one test executable named {}", t.target),
        }
    };

    let mut results = Vec::new();
    for k in &kernels {
        if stop.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        let entries = if opts.bench {
            Vec::new()
        } else {
            tests_for(TESTS, k.name)
        };
        eprintln!(
            "vmtest: kernel {} ({} {}): running",
            k.name, k.package, k.version
        );
        for e in &entries {
            eprintln!("vmtest:   {}", describe(e));
        }
        let t0 = Instant::now();
        let mut result = KernelResult {
            kernel: k.name.into(),
            package: k.package.into(),
            package_version: k.version.into(),
            version: None,
            finished: String::new(),
            wall_seconds: 0.0,
            error: None,
            modules_missing: Vec::new(),
            hooks: Vec::new(),
            program_cost: None,
            suites: Vec::new(),
            passed: 0,
            failed: 0,
            ignored: 0,
        };
        let outcome = (|| -> Result<_> {
            let prepared = prepare(&paths, k)?;
            let picked: Vec<(&TestEntry, Executable)> = entries
                .iter()
                .map(|e| Ok((*e, exe_for(e)?)))
                .collect::<Result<_>>()?;
            let suites: Vec<(&TestEntry, &Executable)> =
                picked.iter().map(|(e, x)| (*e, x)).collect();
            let (uname, failure) = run_vm(&paths, k, &prepared, &suites, opts, stop)?;
            let (suite_results, missing) = collect(&paths, k, &suites);
            Ok((uname, failure, suite_results, missing))
        })();
        match outcome {
            Ok((uname, failure, suites, missing)) => {
                result.hooks = collect_hooks(&paths, k);
                result.program_cost =
                    fs::read_to_string(paths.run(k).join("out").join("bench.json"))
                        .ok()
                        .and_then(|t| serde_json::from_str(t.trim()).ok());
                result.version = uname;
                result.error = failure;
                result.suites = suites;
                result.modules_missing = missing;
            }
            Err(e) if stop.load(Ordering::SeqCst) => return Err(e),
            Err(e) => result.error = Some(format!("{e:#}")),
        }
        result.count();
        result.wall_seconds = t0.elapsed().as_secs_f64();
        result.finished =
            chrono::DateTime::<chrono::Utc>::from(std::time::SystemTime::now()).to_rfc3339();
        report_kernel(&result);
        results.push(result);
    }

    // Only whole runs make the record: a filtered or --keep run is partial.
    let recorded = opts.test_args.is_empty() && !opts.keep && !opts.bench;
    if recorded {
        let mut all_results: Results = fs::read_to_string(paths.results())
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        all_results.merge(results.clone());
        fs::write(
            paths.results(),
            serde_json::to_string_pretty(&all_results)? + "\n",
        )?;
    }
    eprintln!();
    eprint!("{}", table(&results));
    eprintln!(
        "vmtest: {} kernel(s) in {:.0} s; {}",
        results.len(),
        started.elapsed().as_secs_f64(),
        if recorded {
            format!("results in {}", paths.results().display())
        } else {
            "not recorded in results.json (extra test arguments or --keep)".into()
        }
    );
    let bad: Vec<&str> = results
        .iter()
        .filter(|r| !r.ok())
        .map(|r| r.kernel.as_str())
        .collect();
    if !bad.is_empty() {
        bail!("kernel matrix failed on {}", bad.join(", "));
    }
    if opts.bench {
        print_program_cost(&results)?;
        return Ok(());
    }
    // The README's table is checked when the whole matrix ran.
    if results.len() == KERNELS.len() {
        let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
        check_readme(&readme, &results, opts.update_readme)?;
    }
    Ok(())
}

/// `--bench`: the classifiers' cost per kernel, as a BENCHMARKS.md table.
fn print_program_cost(results: &[KernelResult]) -> Result<()> {
    println!("| kernel | TC mode | netwatch ns/run | no-op ns/run | netwatch / no-op | runs |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let mut missing = Vec::new();
    for r in results {
        let Some(c) = &r.program_cost else {
            missing.push(r.kernel.as_str());
            continue;
        };
        let f = |k: &str| c[k].as_f64().unwrap_or(0.0);
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.2} | {} |",
            c["kernel"].as_str().unwrap_or(&r.kernel),
            c["tc_mode"].as_str().unwrap_or("?"),
            f("netwatch_ns_per_run"),
            f("noop_ns_per_run"),
            f("netwatch_ns_per_run") / f("noop_ns_per_run").max(1.0),
            c["netwatch_runs"]
        );
    }
    if !missing.is_empty() {
        bail!(
            "no program cost from {} (see target/vmtest/runs/<kernel>/out/bench.log)",
            missing.join(", ")
        );
    }
    Ok(())
}

fn report_kernel(r: &KernelResult) {
    eprintln!();
    eprintln!(
        "vmtest: kernel {}: uname -r {}",
        r.kernel,
        r.version.as_deref().unwrap_or("(not booted)")
    );
    if !r.modules_missing.is_empty() {
        eprintln!(
            "vmtest:   modules this kernel lacks: {}",
            r.modules_missing.join(" ")
        );
    }
    for s in &r.suites {
        for line in &s.summary {
            eprintln!("vmtest:   {}/{}: {line}", s.package, s.target);
        }
        if s.exit_code.is_none() {
            eprintln!("vmtest:   {}/{}: did not finish", s.package, s.target);
        }
        for t in s.tests.iter().filter(|t| t.result == Outcome::Failed) {
            eprintln!(
                "vmtest:   FAILED {}: {}",
                t.name,
                headline(t.message.as_deref().unwrap_or("(no message)"))
            );
        }
    }
    if let Some(e) = &r.error {
        eprintln!("vmtest:   error: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_list_is_one_signed_suite() {
        assert_eq!(
            sources_list(MIRROR, "bullseye", KEYRING),
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
             http://deb.debian.org/debian bullseye main\n"
        );
    }

    #[test]
    fn show_depends_parses_in_order_and_dedups() {
        let virtiofs = "insmod /r/lib/modules/6.1/kernel/fs/fuse/fuse.ko \n\
                        insmod /r/lib/modules/6.1/kernel/drivers/virtio/virtio.ko\n\
                        insmod /r/lib/modules/6.1/kernel/drivers/virtio/virtio_ring.ko\n\
                        insmod /r/lib/modules/6.1/kernel/fs/fuse/virtiofs.ko opt=1\n";
        let pci = "insmod /r/lib/modules/6.1/kernel/drivers/virtio/virtio.ko\n\
                   builtin virtio_pci_modern_dev\n\
                   insmod /r/lib/modules/6.1/kernel/drivers/virtio/virtio_pci.ko\n";
        let a = parse_show_depends(virtiofs).unwrap();
        let b = parse_show_depends(pci).unwrap();
        assert_eq!(a.len(), 4);
        assert_eq!(b[1], ModStep::Builtin("virtio_pci_modern_dev".into()));
        let order = load_order(&[a, b]);
        let names: Vec<_> = order
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "fuse.ko",
                "virtio.ko",
                "virtio_ring.ko",
                "virtiofs.ko",
                "virtio_pci.ko"
            ]
        );
        // Built in (trixie): nothing to load.
        assert!(load_order(&[parse_show_depends("builtin virtiofs\n").unwrap()]).is_empty());
        assert!(parse_show_depends("modprobe: FATAL: Module x not found").is_err());
    }

    const LIBTEST: &str = "\nrunning 4 tests\n\
test allowed_traffic_gives_no_flow ... ok\n\
test ipv6_drop_is_seen ... FAILED\n\
test slow ... ignored, needs a day\n\
test nftables_drop_is_one_dropped_flow ... FAILED\n\
\n\
failures:\n\
\n\
---- ipv6_drop_is_seen stdout ----\n\
\n\
thread 'ipv6_drop_is_seen' panicked at xtask/tests/capture.rs:212:5:\n\
assertion `left == right` failed\n\
  left: (Some(\"TIMED_OUT\"), None)\n\
 right: (Some(\"DROPPED\"), Some(\"NETFILTER_DROP\"))\n\
note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n\
\n\
---- nftables_drop_is_one_dropped_flow stdout ----\n\
thread 'nftables_drop_is_one_dropped_flow' panicked at xtask/tests/capture.rs:70:5:\n\
{\"cgroup_id\": null}\n\
\n\
\n\
failures:\n\
    ipv6_drop_is_seen\n\
    nftables_drop_is_one_dropped_flow\n\
\n\
test result: FAILED. 1 passed; 2 failed; 1 ignored; 0 measured; 0 filtered out; finished in 41.20s\n\
\n";

    #[test]
    fn libtest_output_gives_outcomes_messages_and_summary() {
        let run = parse_libtest(LIBTEST);
        let outcomes: Vec<_> = run
            .tests
            .iter()
            .map(|t| (t.name.as_str(), t.result))
            .collect();
        assert_eq!(
            outcomes,
            [
                ("allowed_traffic_gives_no_flow", Outcome::Ok),
                ("ipv6_drop_is_seen", Outcome::Failed),
                ("slow", Outcome::Ignored),
                ("nftables_drop_is_one_dropped_flow", Outcome::Failed),
            ]
        );
        assert_eq!(
            run.summaries,
            [
                "test result: FAILED. 1 passed; 2 failed; 1 ignored; 0 measured; 0 filtered out; finished in 41.20s"
            ]
        );
        let m = run.tests[1].message.as_deref().unwrap();
        assert!(
            m.starts_with("thread 'ipv6_drop_is_seen' panicked at"),
            "{m}"
        );
        assert!(m.contains("right: (Some(\"DROPPED\")"), "{m}");
        assert!(!m.contains("RUST_BACKTRACE"), "{m}");
        assert_eq!(
            headline(m),
            "assertion `left == right` failed (left: (Some(\"TIMED_OUT\"), None), right: \
             (Some(\"DROPPED\"), Some(\"NETFILTER_DROP\")))"
        );
        assert_eq!(headline("thread 't' panicked at a.rs:1:1:\nboom"), "boom");
        assert_eq!(
            run.tests[3].message.as_deref(),
            Some(
                "thread 'nftables_drop_is_one_dropped_flow' panicked at xtask/tests/capture.rs:70:5:\n{\"cgroup_id\": null}"
            )
        );
        assert_eq!(run.tests[0].message, None);
    }

    #[test]
    fn libtest_output_of_a_crashed_run_keeps_what_finished() {
        let run = parse_libtest("running 3 tests\ntest a ... ok\ntest b ... ");
        assert_eq!(run.tests.len(), 1);
        assert!(run.summaries.is_empty());
    }

    fn kernel(name: &str, failed: usize) -> KernelResult {
        let mut k = KernelResult {
            kernel: name.into(),
            package: "linux-image-x".into(),
            package_version: "1".into(),
            version: Some(format!("{name}.0-cloud-amd64")),
            finished: "2026-01-01T00:00:00+00:00".into(),
            wall_seconds: 12.0,
            error: None,
            modules_missing: vec![],
            hooks: Vec::new(),
            program_cost: None,
            suites: vec![SuiteResult {
                package: "xtask".into(),
                target: "capture".into(),
                filters: vec![],
                exit_code: Some(if failed > 0 { 101 } else { 0 }),
                summary: vec![],
                tests: (0..2 + failed)
                    .map(|i| TestResult {
                        name: format!("t{i}"),
                        result: if i < 2 { Outcome::Ok } else { Outcome::Failed },
                        message: (i >= 2).then(|| "boom".into()),
                    })
                    .collect(),
                log: "log".into(),
            }],
            passed: 0,
            failed: 0,
            ignored: 0,
        };
        k.count();
        k
    }

    #[test]
    fn results_json_round_trips_and_merges_by_kernel_in_matrix_order() {
        let mut r = Results::default();
        r.merge(vec![kernel("6.12", 0), kernel("5.10", 1)]);
        assert_eq!(
            (r.kernels[0].kernel.as_str(), r.kernels[0].failed),
            ("5.10", 1)
        );
        assert!(!r.kernels[0].ok() && r.kernels[1].ok());
        // A later run of one kernel replaces only that kernel.
        r.merge(vec![kernel("5.10", 0)]);
        assert_eq!(r.kernels.len(), 2);
        assert!(r.kernels.iter().all(KernelResult::ok));
        let json = serde_json::to_value(&r).unwrap();
        let t = &json["kernels"][0]["suites"][0]["tests"][0];
        assert_eq!(t["name"], "t0");
        assert_eq!(t["result"], "ok");
        assert!(t.get("message").is_none());
        assert_eq!(json["kernels"][0]["version"], "5.10.0-cloud-amd64");
        assert_eq!(json["kernels"][0]["passed"], 2);
        let back: Results = serde_json::from_value(json).unwrap();
        assert_eq!(back, r);
        let failed = serde_json::to_value(kernel("6.1", 1)).unwrap();
        assert_eq!(failed["suites"][0]["tests"][2]["result"], "failed");
        assert_eq!(failed["suites"][0]["tests"][2]["message"], "boom");
    }

    #[test]
    fn readme_table_says_each_kernels_modes_and_a_stale_one_is_caught() {
        let mut r = KernelResult {
            kernel: "5.10".into(),
            package: String::new(),
            package_version: String::new(),
            version: None,
            finished: String::new(),
            wall_seconds: 0.0,
            error: None,
            modules_missing: Vec::new(),
            hooks: Vec::new(),
            program_cost: None,
            suites: Vec::new(),
            passed: 0,
            failed: 0,
            ignored: 0,
        };
        for (hook, mode) in [
            ("kfree_skb", "location"),
            ("tc", "clsact"),
            ("sock_ops", "sock_ops+connect"),
            ("sock_state", "tp_btf"),
        ] {
            r.hooks.push(HookMode {
                hook: hook.into(),
                mode: mode.into(),
                off_because: None,
            });
        }
        let t = readme_kernel_table(std::slice::from_ref(&r));
        assert!(
            t.ends_with("| 5.10 (Debian 11) | location | clsact | sock_ops+connect | tp_btf |\n"),
            "{t}"
        );
        let dir = tempfile::tempdir().unwrap();
        let readme = dir.path().join("README.md");
        fs::write(
            &readme,
            format!("x\n{README_BEGIN}| old |\n{README_END}\ny\n"),
        )
        .unwrap();
        let e = check_readme(&readme, std::slice::from_ref(&r), false).unwrap_err();
        assert!(e.to_string().contains("location | clsact"), "{e}");
        check_readme(&readme, std::slice::from_ref(&r), true).unwrap();
        check_readme(&readme, std::slice::from_ref(&r), false).unwrap();
        assert!(
            fs::read_to_string(&readme)
                .unwrap()
                .ends_with(&format!("{README_END}\ny\n"))
        );
    }

    #[test]
    fn table_shows_counts_and_errors() {
        let mut broken = kernel("6.1", 0);
        broken.error = Some("the VM did not boot to the tests\nmore".into());
        let t = table(&[kernel("5.10", 1), broken]);
        assert!(t.contains("5.10"), "{t}");
        assert!(t.lines().nth(1).unwrap().ends_with("FAILED"), "{t}");
        assert!(
            t.lines()
                .nth(2)
                .unwrap()
                .ends_with("the VM did not boot to the tests"),
            "{t}"
        );
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(
            shell_quote("/work/x/target/debug/deps/capture-1f"),
            "/work/x/target/debug/deps/capture-1f"
        );
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("--test-threads=1"), "--test-threads=1");
    }

    #[test]
    fn every_test_entry_names_known_kernels_and_selection_works() {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for t in TESTS {
            for k in t.kernels {
                assert!(KERNELS.iter().any(|x| x.name == *k), "{t:?}");
            }
            // The package's own test target: cargo would otherwise find it
            // in another selected package and the results would be
            // labelled wrongly.
            let file = workspace
                .join(t.package)
                .join("tests")
                .join(format!("{}.rs", t.target));
            assert!(file.exists(), "{t:?}: no {}", file.display());
            assert!(t.threads >= 1);
        }
        assert_eq!(select_kernels(&[]).unwrap().len(), KERNELS.len());
        assert_eq!(
            select_kernels(&["all".into()]).unwrap().len(),
            KERNELS.len()
        );
        assert_eq!(
            select_kernels(&["6.1".into()]).unwrap()[0].suite,
            "bookworm"
        );
        assert!(select_kernels(&["4.19".into()]).is_err());
        let only = [TestEntry {
            package: "p",
            target: "t",
            filters: &["x"],
            skip: &["y"],
            kernels: &["6.12"],
            threads: 1,
        }];
        assert!(tests_for(&only, "5.10").is_empty());
        assert_eq!(tests_for(&only, "6.12").len(), 1);
        assert_eq!(describe(&only[0]), "p/t matching x --skip y");
    }

    #[test]
    fn cargo_messages_give_test_executables_and_their_package_dirs() {
        let out = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/xtask#0.1.0","manifest_path":"/w/xtask/Cargo.toml","target":{"kind":["test"],"crate_types":["bin"],"name":"capture","src_path":"/w/xtask/tests/capture.rs"},"profile":{"test":true},"features":[],"filenames":["/w/target/debug/deps/capture-abc"],"executable":"/w/target/debug/deps/capture-abc","fresh":true}
{"reason":"compiler-artifact","package_id":"x","manifest_path":"/w/xtask/Cargo.toml","target":{"kind":["lib"],"name":"xtask"},"executable":null}
{"reason":"build-finished","success":true}"#;
        let exes = parse_cargo_messages(out).unwrap();
        assert_eq!(exes.len(), 1);
        assert_eq!(exes[0].target, "capture");
        assert_eq!(exes[0].cwd, Path::new("/w/xtask"));
        assert_eq!(exes[0].path, Path::new("/w/target/debug/deps/capture-abc"));
    }

    #[test]
    fn guest_script_runs_each_suite_with_its_filters_and_records_exit_codes() {
        let entry = TestEntry {
            package: "netwatch-e2e",
            target: "capture",
            filters: &["drop"],
            skip: &["ipv6"],
            kernels: &[],
            threads: 1,
        };
        let exe = Executable {
            target: "capture".into(),
            path: "/w/target/debug/deps/capture-abc".into(),
            cwd: "/w/xtask".into(),
        };
        let s = run_script(
            Path::new("/w/target/vmtest/kernels/5.10/root"),
            &[(&entry, &exe)],
            &["--nocapture".into()],
            false,
            None,
        );
        assert!(s.contains("cd /w/xtask\n"), "{s}");
        assert!(!s.contains("bench --programs"), "{s}");
        let b = run_script(
            Path::new("/m"),
            &[],
            &[],
            false,
            Some(Path::new("/w/target/debug/xtask")),
        );
        assert!(
            b.contains("/w/target/debug/xtask bench --programs --seconds 5 > \"$OUT/bench.json\""),
            "{b}"
        );
        assert!(
            s.contains("{ /w/target/debug/deps/capture-abc --test-threads=1 drop --skip ipv6 --nocapture 2>&1; echo $? > \"$OUT/suite-0.rc\"; } | tee \"$OUT/suite-0.log\""),
            "{s}"
        );
        assert!(
            s.contains("MODROOT=/w/target/vmtest/kernels/5.10/root"),
            "{s}"
        );
        assert!(s.trim_end().ends_with("echo done > \"$OUT/done\""), "{s}");
        assert!(run_script(Path::new("/m"), &[], &[], true, None).contains("/bin/sh -i"));
    }
}
