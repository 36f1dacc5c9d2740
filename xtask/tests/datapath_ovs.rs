//! End-to-end on the Open vSwitch datapath (Antrea, OVN-Kubernetes,
//! Kube-OVN): pods on an OVS bridge, policy as OpenFlow drop flows, the
//! agent attached to the bridge's pod ports.
//!
//! Needs the kernel module openvswitch. The machines the host tests run on
//! have none, so there each test says it is skipped; in the VM matrix
//! (`cargo xtask vmtest`, where NETWATCH_TEST_SLOWDOWN is set) a missing
//! module fails the test.

mod support;

use std::time::Duration;

use support::{Agent, expect_probe, records, tcp, to, uuids};
use xtask::lab::{Lab, LabSpec, Outcome, kernel_version, ovs};

const TWO_PODS: &str = r#"
datapath: ovs
nodes:
  - name: node-1
pods:
  - { name: web, namespace: prod, node: node-1, ip: 10.244.1.2 }
  - { name: api, namespace: prod, node: node-1, ip: 10.244.1.3, listen: ["9090/tcp", "8080/tcp"] }
"#;

/// The lab, or `None` (with a note) on a kernel without openvswitch.
fn ovs_lab() -> Option<Lab> {
    let spec: LabSpec = serde_yaml::from_str(TWO_PODS).expect("lab spec");
    match Lab::up(&spec, &support::helper()) {
        Ok(lab) => Some(lab),
        Err(e)
            if e.to_string().contains("openvswitch")
                && std::env::var_os("NETWATCH_TEST_SLOWDOWN").is_none() =>
        {
            eprintln!("skipped: {e}");
            None
        }
        Err(e) => panic!("ovs lab: {e}"),
    }
}

/// The agent on the node, hooked to the pods' ports (named as Antrea names
/// them: the pod name's start and a hash).
fn agent(lab: &Lab) -> Agent {
    let patterns: Vec<String> = lab.pods.iter().map(|p| p.host_if.clone()).collect();
    let mut args = Vec::new();
    for p in &patterns {
        args.extend(["--interfaces", p.as_str()]);
    }
    Agent::start(lab, "node-1", patterns.len(), &args)
}

/// The final record of each flow to `ip:port`.
fn final_records(agent: &mut Agent, ip: &str, port: u16) -> Vec<serde_json::Value> {
    let lines = agent.stop();
    let all = records(&lines, to(ip, port));
    uuids(&all)
        .into_iter()
        .filter_map(|u| {
            all.iter()
                .rev()
                .find(|r| r["uuid"] == u.as_str())
                .map(|r| (*r).clone())
        })
        .collect()
}

#[test]
fn an_openflow_drop_on_ovs_is_dropped_with_the_open_vswitch_reason() {
    let Some(mut lab) = ovs_lab() else { return };
    lab.switch("node-1")
        .unwrap()
        .add_flows(&[format!(
            "priority={},tcp,nw_src=10.244.1.2,nw_dst=10.244.1.3,tp_dst=8080,actions=drop",
            ovs::DROP_PRIORITY
        )])
        .unwrap();
    let mut agent = agent(&lab);
    expect_probe(&lab, "prod/web", tcp("10.244.1.3:8080", 3), Outcome::TimedOut);
    // The bridge forwards what no drop matches.
    expect_probe(&lab, "prod/web", tcp("10.244.1.3:9090", 3), Outcome::Connected);
    let switch = lab.switch("node-1").unwrap();
    let matched = switch.packets_at(ovs::DROP_PRIORITY).unwrap();
    assert!(matched >= 2, "the OpenFlow drop matched the SYNs: {matched}");
    // The first SYN went up to ovs-vswitchd, which dropped it in user space;
    // the kernel datapath dropped the retransmissions.
    let dropped = switch.datapath_drops().unwrap();
    assert_eq!(dropped, matched - 1, "kernel drops: all but the upcalled SYN");
    if kernel_version() >= (6, 4) {
        agent.wait_for_flow(Duration::from_secs(10), |r| {
            to("10.244.1.3", 8080)(r) && r["verdict"] == "DROPPED"
        });
    }
    let flows = final_records(&mut agent, "10.244.1.3", 8080);
    assert_eq!(flows.len(), 1, "one flow: {flows:#?}");
    if kernel_version() >= (6, 4) {
        // 6.4+: the datapath frees the packet with its own reason.
        assert_eq!(flows[0]["verdict"], "DROPPED", "{:#}", flows[0]);
        assert_eq!(flows[0]["drop_reason_desc"], "OVS_DROP_LAST_ACTION", "{:#}", flows[0]);
        assert_eq!(
            flows[0]["packets"].as_u64(),
            Some(dropped),
            "every SYN the kernel datapath dropped is counted"
        );
    } else {
        // Before 6.4 the datapath consumes an OpenFlow drop without a drop
        // event: only the missing answer tells.
        assert_eq!(flows[0]["verdict"], "TIMED_OUT", "{:#}", flows[0]);
    }
}

#[test]
fn answered_and_refused_connections_through_ovs_are_reported_as_such() {
    let Some(lab) = ovs_lab() else { return };
    let mut agent = agent(&lab);
    expect_probe(&lab, "prod/web", tcp("10.244.1.3:9090", 3), Outcome::Connected);
    expect_probe(&lab, "prod/web", tcp("10.244.1.3:7070", 3), Outcome::Refused);
    agent.wait_for_flow(Duration::from_secs(10), |r| {
        to("10.244.1.3", 7070)(r) && r["verdict"] == "REFUSED"
    });
    // Past the connect timeout and an update: an answered connection never
    // turns into TIMED_OUT.
    std::thread::sleep(xtask::lab::slowed(Duration::from_secs(3)));
    let lines = agent.stop();
    let answered = records(&lines, to("10.244.1.3", 9090));
    assert!(
        answered
            .iter()
            .all(|r| r["verdict"] != "TIMED_OUT" && r["verdict"] != "DROPPED"),
        "{answered:#?}"
    );
    let refused = records(&lines, to("10.244.1.3", 7070));
    assert!(
        refused.iter().all(|r| r["verdict"] == "REFUSED"),
        "{refused:#?}"
    );
}
