//! `netwatch-agent`'s flags, checked before anything needs privileges: a
//! bad value is named as such (not blamed on capabilities), and `--help`
//! says what the capture settings mean.

use std::process::{Command, Output};

use netwatch::capture::reasons::DEFAULT_REASONS;

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_netwatch-agent"))
        // Nothing to bind or write, whoever runs the test.
        .args([
            "--metrics-addr",
            "none",
            "--api-socket",
            "none",
            "--flow-log",
            "none",
            "--duration",
            "0.1",
        ])
        .args(args)
        .output()
        .expect("run netwatch-agent")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn bad_capture_values_are_named_before_privileges_are_needed() {
    for (args, want) in [
        (
            &["--table-entries", "0"][..],
            "--table-entries 0: must be at least 1",
        ),
        (
            &["--ring-buffer-bytes", "1000"][..],
            "--ring-buffer-bytes 1000: must be a power of two",
        ),
        (&["--drop-reasons", ""][..], "--drop-reasons is empty"),
        (
            &["--max-flows", "0"][..],
            "--max-flows 0: the agent must track at least one flow",
        ),
        (
            &["--connect-timeout", "0"][..],
            "--connect-timeout 0: must be a positive number",
        ),
        (
            &["--api-timeout", "0"][..],
            "--api-timeout 0: must be a positive number",
        ),
        (
            &["--api-socket-group", "no-such-group-netwatch"][..],
            "--api-socket-group \"no-such-group-netwatch\": no such group",
        ),
    ] {
        let o = agent(args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(e.contains(want), "{args:?}: {e}");
        assert!(!e.contains("CAP_BPF"), "not a capability problem: {e}");
    }
}

/// The observe API has no authentication: any address but loopback is
/// refused, with one line that says why, before privileges come into it.
#[test]
fn the_tcp_observe_api_refuses_every_address_but_loopback() {
    for addr in [
        "0.0.0.0:4245",
        "[::]:4245",
        "10.0.0.1:4245",
        "192.168.1.10:0",
    ] {
        let o = agent(&["--api-addr", addr]);
        assert_eq!(o.status.code(), Some(1), "{addr}: {}", stderr(&o));
        let e = stderr(&o);
        assert_eq!(e.trim().lines().count(), 1, "one line: {e}");
        assert!(
            e.contains(&format!("--api-addr {addr}")) && e.contains("only loopback"),
            "{addr}: {e}"
        );
        assert!(!e.contains("CAP_BPF"), "not a capability problem: {e}");
    }
}

#[test]
fn unknown_reasons_in_flow_log_filters_are_refused_with_the_valid_ones() {
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        return; // no BTF: reason names cannot be checked (and drop capture is off)
    }
    let o = agent(&["--flow-log-allow", "reason=BOGUS"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("--flow-log-allow \"reason=BOGUS\"")
            && e.contains("NETFILTER_DROP")
            && e.contains("TCP_RESET"),
        "{e}"
    );
    let o = agent(&["--drop-reasons", "default,NETFILTER_DROPP"]);
    assert!(
        stderr(&o).contains("unknown drop reason \"NETFILTER_DROPP\""),
        "{}",
        stderr(&o)
    );
}

#[test]
fn help_names_the_default_reasons_groups_capture_flags_and_offers_json_logs() {
    let o = Command::new(env!("CARGO_BIN_EXE_netwatch-agent"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&o.stdout);
    for r in DEFAULT_REASONS {
        assert!(help.contains(r), "--help should name default reason {r}");
    }
    let exporters = help.find("Exporters:").expect("an Exporters heading");
    for capture_flag in [
        "--connect-timeout",
        "--drop-reasons",
        "--table-entries",
        "--manifests",
        "--log-format",
    ] {
        let at = help
            .find(capture_flag)
            .unwrap_or_else(|| panic!("{capture_flag} in --help"));
        assert!(
            at < exporters,
            "{capture_flag} is listed under Exporters:\n{help}"
        );
    }
    assert!(help.contains("--flow-log-format"));
}
