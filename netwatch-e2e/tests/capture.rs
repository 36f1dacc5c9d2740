//! End-to-end: the real agent, real kernel hooks, real packets in a lab node.
//! Each test builds its own lab and agent, so they run side by side.

mod support;

use std::{os::unix::fs::MetadataExt, time::Duration};

use netwatch_lab::{Outcome, Probe};
use serde_json::Value;
use support::{Agent, dns, expect_probe, lab, records, tcp, to, uuids};

const TWO_PODS: &str = r#"
nodes:
  - name: node-1
    nftables: |
      table inet lab {
        chain forward {
          type filter hook forward priority 0; policy accept;
          ip daddr 10.244.1.3 tcp dport 8080 counter drop comment "drop-api"
          ip6 daddr fd00:244:1::3 tcp dport 8080 counter drop comment "drop-api-v6"
          ip daddr 10.244.1.4 udp dport 53 counter drop comment "drop-dns"
        }
      }
    routes: ["blackhole 10.99.0.0/16"]
pods:
  - { name: web, namespace: prod, node: node-1, ip: 10.244.1.2, ipv6: "fd00:244:1::2" }
  - { name: api, namespace: prod, node: node-1, ip: 10.244.1.3, ipv6: "fd00:244:1::3", listen: ["8080/tcp", "9090/tcp"] }
  - { name: dns, namespace: kube-system, node: node-1, ip: 10.244.1.4, listen: ["53/udp"] }
  - { name: dns2, namespace: kube-system, node: node-1, ip: 10.244.1.5, listen: ["53/udp"] }
"#;

/// The last record of each flow (its final state), for records matching `pred`.
fn finals(lines: &[Value], pred: impl Fn(&Value) -> bool) -> Vec<&Value> {
    let all = records(lines, pred);
    uuids(&all)
        .into_iter()
        .filter_map(|u| all.iter().rev().find(|r| r["uuid"] == u.as_str()).copied())
        .collect()
}

#[test]
fn nftables_drop_is_one_dropped_flow_with_exact_syn_count_and_the_pods_cgroup() {
    let lab = lab(TWO_PODS);
    let mut agent = Agent::start(&lab, "node-1", 4, &[]);
    expect_probe(
        &lab,
        "prod/web",
        tcp("10.244.1.3:8080", 3),
        Outcome::TimedOut,
    );
    // The first record is out quickly: well before the client gives up.
    agent.wait_for_flow(Duration::from_secs(2), to("10.244.1.3", 8080));
    let lines = agent.stop();
    let syns = lab.nft_counter("node-1", "drop-api").unwrap();
    assert!(
        syns >= 2,
        "the kernel retransmitted the SYN at least once: {syns}"
    );

    let flows = finals(&lines, to("10.244.1.3", 8080));
    assert_eq!(flows.len(), 1, "exactly one flow: {lines:#?}");
    let f = flows[0];
    assert_eq!(f["verdict"], "DROPPED");
    assert_eq!(f["drop_reason_desc"], "NETFILTER_DROP");
    assert_eq!(f["IP"]["source"], "10.244.1.2");
    assert_eq!(f["IP"]["ipVersion"], "IPv4");
    assert_eq!(f["l4"]["TCP"]["flags"]["SYN"], true);
    assert!(f["l4"]["TCP"]["source_port"].as_u64().unwrap() > 1024);
    assert_eq!(
        f["packets"].as_u64(),
        Some(syns),
        "packet count = SYNs the firewall dropped"
    );
    assert_eq!(f["node_name"], "node-1");
    assert_eq!(f["timed_out"], true, "the same flow also went unanswered");
    // sock_ops recorded the connecting process's cgroup: the pod's container.
    let web = lab.pod("prod/web").unwrap();
    let cgroup_id = std::fs::metadata(&web.cgroup).unwrap().ino();
    assert_eq!(f["cgroup_id"].as_u64(), Some(cgroup_id), "{f:#}");
    // Nothing about the allowed port.
    assert!(records(&lines, to("10.244.1.3", 9090)).is_empty());
}

#[test]
fn blackholed_flow_without_counted_drop_is_timed_out() {
    let lab = lab(TWO_PODS);
    let mut agent = Agent::start(&lab, "node-1", 4, &[]);
    expect_probe(&lab, "prod/web", tcp("10.99.0.5:80", 2), Outcome::TimedOut);
    agent.wait_for_flow(Duration::from_secs(3), to("10.99.0.5", 80));
    let lines = agent.stop();
    let flows = finals(&lines, to("10.99.0.5", 80));
    assert_eq!(flows.len(), 1, "{lines:#?}");
    assert_eq!(flows[0]["verdict"], "TIMED_OUT");
    assert!(
        flows[0].get("drop_reason_desc").is_none(),
        "NOT_SPECIFIED is not counted by default"
    );
    assert!(flows[0]["packets"].as_u64().unwrap() >= 1);
    assert_eq!(flows[0]["traffic_direction"], "EGRESS");
}

#[test]
fn connect_to_closed_port_is_refused() {
    let lab = lab(TWO_PODS);
    let mut agent = Agent::start(&lab, "node-1", 4, &[]);
    expect_probe(
        &lab,
        "prod/web",
        tcp("10.244.1.3:7777", 2),
        Outcome::Refused,
    );
    let f = agent.wait_for_flow(Duration::from_secs(2), to("10.244.1.3", 7777));
    assert_eq!(f["flow"]["verdict"], "REFUSED");
    assert_eq!(f["flow"]["refusal"], "TCP_RESET");
    let lines = agent.stop();
    assert_eq!(uuids(&records(&lines, to("10.244.1.3", 7777))).len(), 1);
}

#[test]
fn dns_query_to_dropped_resolver_is_a_flow_on_53_udp() {
    let lab = lab(TWO_PODS);
    let mut agent = Agent::start(&lab, "node-1", 4, &[]);
    expect_probe(&lab, "prod/web", dns("10.244.1.4:53", 2), Outcome::TimedOut);
    let lines = {
        agent.wait_for_flow(Duration::from_secs(2), to("10.244.1.4", 53));
        agent.stop()
    };
    let flows = finals(&lines, to("10.244.1.4", 53));
    assert_eq!(flows.len(), 1, "{lines:#?}");
    let f = flows[0];
    assert_eq!(f["verdict"], "DROPPED");
    assert_eq!(f["is_dns"], true);
    assert_eq!(f["l4"]["UDP"]["destination_port"], 53);
    assert_eq!(
        f["packets"].as_u64(),
        Some(lab.nft_counter("node-1", "drop-dns").unwrap())
    );
}

#[test]
fn allowed_traffic_gives_no_flow() {
    let lab = lab(TWO_PODS);
    let mut agent = Agent::start(&lab, "node-1", 4, &[]);
    for _ in 0..3 {
        expect_probe(
            &lab,
            "prod/web",
            tcp("10.244.1.3:9090", 2),
            Outcome::Connected,
        );
        expect_probe(&lab, "prod/web", dns("10.244.1.5:53", 2), Outcome::Answered);
        expect_probe(
            &lab,
            "prod/web",
            tcp("[fd00:244:1::3]:9090", 2),
            Outcome::Connected,
        );
    }
    // Longer than the connect timeout: a missed answer would have shown by now.
    std::thread::sleep(Duration::from_millis(1500));
    let lines = agent.stop();
    assert!(
        lines.is_empty(),
        "allowed traffic produced records: {lines:#?}"
    );
}

#[test]
fn ten_thousand_syns_of_one_flow_are_one_flow_with_exact_counts_and_no_losses() {
    let lab = lab(TWO_PODS);
    let mut agent = Agent::start(&lab, "node-1", 4, &[]);
    let r = lab
        .probe(
            "prod/web",
            &Probe::SynFlood {
                from: "10.244.1.2:41000".parse().unwrap(),
                to: "10.244.1.3:8080".parse().unwrap(),
                count: 10_000,
            },
        )
        .unwrap();
    assert_eq!((r.outcome, r.sent), (Outcome::Sent, 10_000), "{r:?}");
    let dropped = lab.nft_counter("node-1", "drop-api").unwrap();
    assert_eq!(dropped, 10_000, "every SYN reached the firewall");
    std::thread::sleep(Duration::from_millis(1500));
    let lines = agent.stop();
    let flows = finals(&lines, to("10.244.1.3", 8080));
    assert_eq!(
        flows.len(),
        1,
        "one flow, not one per packet: {} records",
        lines.len()
    );
    assert_eq!(flows[0]["packets"].as_u64(), Some(10_000));
    assert_eq!(flows[0]["bytes"].as_u64(), Some(10_000 * 40));
    assert_eq!(flows[0]["l4"]["TCP"]["source_port"], 41000);
    let log = agent.log();
    assert!(
        log.contains("kernel losses over the agent's life lost=0"),
        "{log}"
    );
}

#[test]
fn ipv6_drop_is_seen() {
    let lab = lab(TWO_PODS);
    let mut agent = Agent::start(&lab, "node-1", 4, &[]);
    expect_probe(
        &lab,
        "prod/web",
        tcp("[fd00:244:1::3]:8080", 2),
        Outcome::TimedOut,
    );
    agent.wait_for_flow(Duration::from_secs(2), to("fd00:244:1::3", 8080));
    let lines = agent.stop();
    let flows = finals(&lines, to("fd00:244:1::3", 8080));
    assert_eq!(flows.len(), 1, "{lines:#?}");
    let f = flows[0];
    assert_eq!(
        (f["verdict"].as_str(), f["drop_reason_desc"].as_str()),
        (Some("DROPPED"), Some("NETFILTER_DROP"))
    );
    assert_eq!(f["IP"]["ipVersion"], "IPv6");
    assert_eq!(f["IP"]["source"], "fd00:244:1::2");
    assert_eq!(
        f["packets"].as_u64(),
        Some(lab.nft_counter("node-1", "drop-api-v6").unwrap())
    );
}

#[test]
fn with_own_netns_only_a_drop_inside_a_pod_counts_and_another_nodes_does_not() {
    let lab = lab(TWO_PODS);
    let other = support::lab(
        "nodes:\n  - name: node-1\n    nftables: |\n      table inet t {\n        chain f { type filter hook forward priority 0; ip daddr 10.244.1.3 tcp dport 9090 drop; }\n      }\npods:\n  - { name: web, namespace: prod, node: node-1, ip: 10.244.1.2 }\n  - { name: api, namespace: prod, node: node-1, ip: 10.244.1.3, listen: [\"9090/tcp\"] }\n",
    );
    let mut agent = Agent::start(&lab, "node-1", 4, &[]);
    // The pod's own firewall drops its connection to api:9090 on the way out.
    lab.nft_in_pod(
        "prod/web",
        "table inet sidecar {\n  chain out { type filter hook output priority 0; ip daddr 10.244.1.3 tcp dport 9090 counter drop; }\n}\n",
    )
    .unwrap();
    expect_probe(
        &lab,
        "prod/web",
        tcp("10.244.1.3:9090", 2),
        Outcome::TimedOut,
    );
    // The same flow dropped on another lab's node (same addresses!) is not ours.
    expect_probe(
        &other,
        "prod/web",
        tcp("10.244.1.3:9090", 2),
        Outcome::TimedOut,
    );
    let lines = agent.stop();
    let flows = finals(&lines, to("10.244.1.3", 9090));
    assert_eq!(flows.len(), 1, "ours only: {lines:#?}");
    assert_eq!(flows[0]["verdict"], "DROPPED");
    assert_eq!(flows[0]["drop_reason_desc"], "NETFILTER_DROP");
    assert_eq!(
        flows[0]["packets"], 2,
        "two SYNs (1 s connect timeout, 2 s probe), not four"
    );
}
