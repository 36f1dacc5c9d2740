//! End-to-end: each capture hook's kernel variants, on the running kernel
//! (the host's, and each kernel of `cargo xtask vmtest`). A variant a
//! kernel would not pick by itself is forced with the agent's
//! `--kfree-skb-variant` / `--tc-variant`, so every variant that can run
//! here is tested here.

mod support;

use std::time::{Duration, Instant};

use netwatch_lab::{Lab, Outcome, kernel_version, tcprog::TcMode};
use support::{Agent, expect_probe, final_records, lab, node_http_get, tcp, to};

const TWO_PODS: &str = r#"
nodes:
  - name: node-1
    nftables: |
      table inet lab {
        chain forward {
          type filter hook forward priority 0; policy accept;
          ip daddr 10.244.1.3 tcp dport 8080 counter drop comment "drop-api"
        }
      }
pods:
  - { name: web, namespace: prod, node: node-1, ip: 10.244.1.2 }
  - { name: api, namespace: prod, node: node-1, ip: 10.244.1.3, listen: ["9090/tcp"] }
"#;

fn interfaces(lab: &Lab) -> Vec<String> {
    lab.pods.iter().map(|p| p.host_if.clone()).collect()
}

/// tcx exists from 6.6.
fn has_tcx() -> bool {
    kernel_version() >= (6, 6)
}

#[test]
fn location_variant_names_a_netfilter_drop_as_the_kernel_reason_does() {
    let lab = lab(TWO_PODS);
    let mut agent = Agent::start(&lab, "node-1", 2, &["--kfree-skb-variant", "location"]);
    let log = agent.log();
    assert!(
        log.contains("mode location") && log.contains("nf_hook_slow"),
        "the agent says which variant runs and which drop sites it found:\n{log}"
    );
    expect_probe(
        &lab,
        "prod/web",
        tcp("10.244.1.3:8080", 3),
        Outcome::TimedOut,
    );
    agent.wait_for_flow(Duration::from_secs(5), to("10.244.1.3", 8080));
    let flows = final_records(&mut agent, "10.244.1.3", 8080);
    let syns = lab.nft_counter("node-1", "drop-api").unwrap();
    assert_eq!(flows.len(), 1, "{flows:#?}");
    assert_eq!(
        flows[0]["verdict"], "DROPPED",
        "never TIMED_OUT: {:#}",
        flows[0]
    );
    assert_eq!(flows[0]["drop_reason_desc"], "NETFILTER_DROP");
    assert_eq!(
        flows[0]["packets"].as_u64(),
        Some(syns),
        "every dropped SYN counted"
    );
}

#[test]
fn hooks_and_modes_are_in_the_metrics_and_readyz() {
    let lab = lab(TWO_PODS);
    let mut agent = Agent::start(&lab, "node-1", 2, &["--metrics-addr", "127.0.0.1:19965"]);
    agent.wait_for_log(|l| l.contains("metrics listening"));
    let metrics = node_http_get(&lab, "node-1", "http://127.0.0.1:19965/metrics");
    let (kfree, tc) = if kernel_version() >= (5, 17) {
        ("reason", if has_tcx() { "tcx" } else { "clsact" })
    } else {
        ("location", "clsact")
    };
    for (hook, mode) in [
        ("kfree_skb", kfree),
        ("tc", tc),
        ("sock_ops", "sock_ops+connect"),
        ("sock_state", "tp_btf"),
    ] {
        let series = format!("netwatch_hook_info{{hook=\"{hook}\",mode=\"{mode}\"}} 1");
        assert!(metrics.contains(&series), "{series} missing:\n{metrics}");
    }
    assert!(
        !metrics.contains("mode=\"off\""),
        "every hook runs on this kernel:\n{metrics}"
    );
    let ready = node_http_get(&lab, "node-1", "http://127.0.0.1:19965/readyz");
    assert_eq!(ready.trim(), "ready", "full capture: {ready}");
    let log = agent.log();
    for hook in ["kfree_skb", "tc", "sock_ops", "sock_state"] {
        assert!(
            log.lines()
                .any(|l| l.contains("capture hook on") && l.contains(hook)),
            "one log line for {hook}:\n{log}"
        );
    }
    agent.stop();

    // A hook turned off is named, and readiness says capture is partial.
    let mut agent = Agent::start(
        &lab,
        "node-1",
        2,
        &["--metrics-addr", "127.0.0.1:19965", "--cgroup-root", "none"],
    );
    agent.wait_for_log(|l| l.contains("metrics listening"));
    let metrics = node_http_get(&lab, "node-1", "http://127.0.0.1:19965/metrics");
    assert!(
        metrics.contains("netwatch_hook_info{hook=\"sock_ops\",mode=\"off\"} 1"),
        "{metrics}"
    );
    let ready = node_http_get(&lab, "node-1", "http://127.0.0.1:19965/readyz");
    assert!(
        ready.starts_with("ready; capture is partial: sock_ops off"),
        "{ready}"
    );
    agent.stop();
}

/// Wait (a tcx link goes after an RCU grace period) until `check` holds.
fn eventually(what: &str, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match check() {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => panic!("{what}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn count(names: &[String], name: &str) -> usize {
    names
        .iter()
        .filter(|n| name.starts_with(n.as_str()) && !n.is_empty())
        .count()
}

/// SIGKILL and restart: exactly one set of netwatch classifiers per
/// interface afterwards, with the given TC variant.
fn restart_leaves_one_set(variant: &str) {
    let lab = lab(TWO_PODS);
    let ifs = interfaces(&lab);
    let mut agent = Agent::start(&lab, "node-1", 2, &["--tc-variant", variant]);
    agent.kill();
    let tcx = variant == "tcx";
    for i in &ifs {
        eventually(&format!("{i} after SIGKILL"), || {
            let p = lab.tc_programs("node-1", i).map_err(|e| e.to_string())?;
            let left = count(&p.tcx_ingress, "netwatch_from_pod")
                + count(&p.tcx_egress, "netwatch_to_pod");
            // tcx links die with the agent; clsact filters stay (and are
            // replaced by the next agent).
            if tcx && left != 0 {
                return Err(format!("tcx programs left behind: {p:?}"));
            }
            Ok(())
        });
    }
    let mut agent = Agent::start(&lab, "node-1", 2, &["--tc-variant", variant]);
    for i in &ifs {
        let p = lab.tc_programs("node-1", i).unwrap();
        let (ing, eg) = if tcx {
            (&p.tcx_ingress, &p.tcx_egress)
        } else {
            (&p.clsact_ingress, &p.clsact_egress)
        };
        assert_eq!(count(ing, "netwatch_from_pod"), 1, "{i}: {p:?}");
        assert_eq!(count(eg, "netwatch_to_pod"), 1, "{i}: {p:?}");
    }
    // And it captures: a closed port is REFUSED.
    expect_probe(&lab, "prod/web", tcp("10.244.1.3:7", 3), Outcome::Refused);
    agent.wait_for_flow(Duration::from_secs(5), |f| {
        to("10.244.1.3", 7)(f) && f["verdict"] == "REFUSED"
    });
    agent.stop();
}

#[test]
fn sigkill_and_restart_leave_one_set_of_clsact_filters() {
    restart_leaves_one_set("clsact");
}

#[test]
fn sigkill_and_restart_leave_no_tcx_links_behind() {
    if !has_tcx() {
        eprintln!("skipped: no tcx before Linux 6.6 (clsact is tested instead)");
        return;
    }
    restart_leaves_one_set("tcx");
}

/// A CNI's program that ends the chain, attached before the agent starts,
/// hides nothing: netwatch runs first.
fn foreign_program_hides_nothing(mode: TcMode, variant: &str) {
    let lab = lab(TWO_PODS);
    let ifs = interfaces(&lab);
    let names: Vec<&str> = ifs.iter().map(String::as_str).collect();
    let _cni = lab
        .attach_foreign_tc("node-1", &names, mode)
        .expect("stand-in CNI program");
    let mut agent = Agent::start(&lab, "node-1", 2, &["--tc-variant", variant]);
    for i in &ifs {
        let p = lab.tc_programs("node-1", i).unwrap();
        let (ing, eg) = match mode {
            TcMode::Tcx => (&p.tcx_ingress, &p.tcx_egress),
            TcMode::Clsact => (&p.clsact_ingress, &p.clsact_egress),
        };
        assert!(
            ing.first()
                .is_some_and(|n| "netwatch_from_pod".starts_with(n.as_str()))
                && ing.len() == 2,
            "{i}: netwatch first, then the CNI's program: {p:?}"
        );
        assert!(
            eg.first()
                .is_some_and(|n| "netwatch_to_pod".starts_with(n.as_str()))
                && eg.len() == 2,
            "{i}: {p:?}"
        );
    }
    expect_probe(&lab, "prod/web", tcp("10.244.1.3:7", 3), Outcome::Refused);
    agent.wait_for_flow(Duration::from_secs(5), |f| {
        to("10.244.1.3", 7)(f) && f["verdict"] == "REFUSED"
    });
    agent.stop();
}

#[test]
fn a_cni_tcx_program_attached_first_hides_nothing() {
    if !has_tcx() {
        eprintln!("skipped: no tcx before Linux 6.6");
        return;
    }
    foreign_program_hides_nothing(TcMode::Tcx, "auto");
}

#[test]
fn a_cni_clsact_filter_at_priority_1_hides_nothing() {
    foreign_program_hides_nothing(TcMode::Clsact, "clsact");
}
