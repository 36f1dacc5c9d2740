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

use netwatch_lab::{
    EnforceOptions, Lab, LabCluster, LabSpec, Manifests, Outcome, datapath::ovs, kernel_version,
};
use support::{Agent, expect_probe, final_records, records, tcp, to};

const TWO_PODS: &str = r#"
datapath: ovs
nodes:
  - name: node-1
pods:
  - { name: web, namespace: prod, node: node-1, ip: 10.244.1.2 }
  - { name: api, namespace: prod, node: node-1, ip: 10.244.1.3, listen: ["9090/tcp", "8080/tcp"] }
"#;

/// Two nodes; the server's ingress admits the client only, the intruder
/// may send nothing.
const POLICED: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: shop }
---
apiVersion: v1
kind: Pod
metadata: { name: client, namespace: shop, labels: { app: client } }
spec: { nodeName: node-1, containers: [ { name: c } ] }
status: { podIP: 10.244.1.2, conditions: [ { type: Ready, status: "True" } ] }
---
apiVersion: v1
kind: Pod
metadata: { name: intruder, namespace: shop, labels: { app: intruder } }
spec: { nodeName: node-1, containers: [ { name: c } ] }
status: { podIP: 10.244.1.3, conditions: [ { type: Ready, status: "True" } ] }
---
apiVersion: v1
kind: Pod
metadata: { name: local, namespace: shop, labels: { app: local } }
spec: { nodeName: node-2, containers: [ { name: c } ] }
status: { podIP: 10.244.2.3, conditions: [ { type: Ready, status: "True" } ] }
---
apiVersion: v1
kind: Pod
metadata: { name: server, namespace: shop, labels: { app: server } }
spec: { nodeName: node-2, containers: [ { name: c, ports: [ { containerPort: 8080 } ] } ] }
status: { podIP: 10.244.2.2, conditions: [ { type: Ready, status: "True" } ] }
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: { name: server, namespace: shop }
spec:
  podSelector: { matchLabels: { app: server } }
  ingress: [ { from: [ { podSelector: { matchLabels: { app: client } } } ], ports: [ { port: 8080 } ] } ]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: { name: intruder, namespace: shop }
spec:
  podSelector: { matchLabels: { app: intruder } }
  policyTypes: [Egress]
"#;

/// The lab, or `None` (with a note) on a kernel without openvswitch.
fn ovs_lab() -> Option<Lab> {
    let spec: LabSpec = serde_yaml::from_str(TWO_PODS).expect("lab spec");
    up(&spec)
}

fn up(spec: &LabSpec) -> Option<Lab> {
    match Lab::up(spec, &support::helper()) {
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

/// The agent on node-1 with its default interface patterns, which find
/// the pods' ports (named as Antrea names them: the pod name's start and a
/// hash) as ports of the switch.
fn agent(lab: &Lab) -> Agent {
    let pods_here = lab.pods.iter().filter(|p| p.spec.node == "node-1").count();
    Agent::start(lab, "node-1", pods_here, &["--interfaces", ""])
}

#[test]
fn an_openflow_drop_on_ovs_is_dropped_with_the_open_vswitch_reason() {
    let Some(lab) = ovs_lab() else { return };
    lab.switch("node-1")
        .unwrap()
        .add_flows(&[format!(
            "priority={},tcp,nw_src=10.244.1.2,nw_dst=10.244.1.3,tp_dst=8080,actions=drop",
            ovs::DROP_PRIORITY
        )])
        .unwrap();
    let mut agent = agent(&lab);
    // 4 s: SYNs at 0, 1 and 3 s. The first goes up to ovs-vswitchd; a
    // loaded switch may not have installed the megaflow by the second.
    expect_probe(
        &lab,
        "prod/web",
        tcp("10.244.1.3:8080", 4),
        Outcome::TimedOut,
    );
    // The bridge forwards what no drop matches.
    expect_probe(
        &lab,
        "prod/web",
        tcp("10.244.1.3:9090", 3),
        Outcome::Connected,
    );
    let switch = lab.switch("node-1").unwrap();
    let matched = switch.packets_at(ovs::DROP_PRIORITY).unwrap();
    assert!(
        matched >= 2,
        "the OpenFlow drop matched the SYNs: {matched}"
    );
    // The first SYN went up to ovs-vswitchd, which dropped it in user space;
    // the kernel datapath dropped the retransmissions.
    let dropped = switch.datapath_drops().unwrap();
    assert_eq!(
        dropped,
        matched - 1,
        "kernel drops: all but the upcalled SYN"
    );
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
        assert_eq!(
            flows[0]["drop_reason_desc"], "OVS_DROP_LAST_ACTION",
            "{:#}",
            flows[0]
        );
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
    expect_probe(
        &lab,
        "prod/web",
        tcp("10.244.1.3:9090", 3),
        Outcome::Connected,
    );
    expect_probe(
        &lab,
        "prod/web",
        tcp("10.244.1.3:7070", 3),
        Outcome::Refused,
    );
    agent.wait_for_flow(Duration::from_secs(10), |r| {
        to("10.244.1.3", 7070)(r) && r["verdict"] == "REFUSED"
    });
    // Past the connect timeout and an update: an answered connection never
    // turns into TIMED_OUT.
    std::thread::sleep(netwatch_lab::slowed(Duration::from_secs(3)));
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

#[test]
fn networkpolicies_become_openflow_drops_on_ovs_nodes() {
    let manifests = Manifests::parse("policed.yaml", POLICED).unwrap_or_else(|e| panic!("{e}"));
    let (mut spec, _) = LabSpec::from_manifests(&manifests).unwrap_or_else(|e| panic!("{e}"));
    spec.datapath = netwatch_lab::Datapath::Ovs;
    for p in &mut spec.pods {
        if p.name == "server" {
            p.listen = vec!["8080/tcp".into(), "9090/tcp".into()];
        }
    }
    let Some(lab) = up(&spec) else { return };
    let cluster = LabCluster::new(manifests, lab.placements()).unwrap_or_else(|e| panic!("{e}"));
    lab.enforce(&cluster, &EnforceOptions::default())
        .unwrap_or_else(|e| panic!("{e}"));
    // The default patterns: the pods' ports are found as ports of the
    // switch, not by name.
    let pods_here = lab.pods.iter().filter(|p| p.spec.node == "node-2").count();
    let mut agent = Agent::start(&lab, "node-2", pods_here, &["--interfaces", ""]);
    let log = agent.log();
    for p in lab.pods.iter().filter(|p| p.spec.node == "node-2") {
        assert!(
            log.contains(&format!("interface={} ", p.host_if))
                || log.contains(&format!("interface=\"{}\"", p.host_if)),
            "{} ({}) hooked:\n{log}",
            p.host_if,
            p.spec.id()
        );
    }
    assert!(
        !log.contains("interface=antrea-gw0") && !log.contains("interface=br-int"),
        "the switch's own ports are not hooked:\n{log}"
    );
    // Admitted across nodes (through both nodes' tables and the uplinks).
    expect_probe(
        &lab,
        "shop/client",
        tcp("10.244.2.2:8080", 5),
        Outcome::Connected,
    );
    // The admitted peer on a port the policy does not name.
    expect_probe(
        &lab,
        "shop/client",
        tcp("10.244.2.2:9090", 4),
        Outcome::TimedOut,
    );
    // Denied by the server's ingress, on the same node.
    expect_probe(
        &lab,
        "shop/local",
        tcp("10.244.2.2:8080", 4),
        Outcome::TimedOut,
    );
    // Denied by the intruder's egress on node-1.
    expect_probe(
        &lab,
        "shop/intruder",
        tcp("10.244.2.2:8080", 4),
        Outcome::TimedOut,
    );
    if kernel_version() >= (6, 4) {
        agent.wait_for_flow(Duration::from_secs(10), |r| {
            r["IP"]["source"] == "10.244.2.3" && r["verdict"] == "DROPPED"
        });
    }
    let lines = agent.stop();
    let local: Vec<_> = records(&lines, to("10.244.2.2", 8080))
        .into_iter()
        .filter(|r| r["IP"]["source"] == "10.244.2.3")
        .collect();
    assert!(!local.is_empty(), "the denied same-node flow is reported");
    let want = if kernel_version() >= (6, 4) {
        "DROPPED"
    } else {
        "TIMED_OUT"
    };
    assert!(
        local.iter().any(|r| r["verdict"] == want),
        "{want}: {local:#?}"
    );
    if kernel_version() >= (6, 4) {
        assert!(
            local
                .iter()
                .any(|r| r["drop_reason_desc"] == "OVS_DROP_LAST_ACTION"),
            "{local:#?}"
        );
    }
    let answered = records(&lines, to("10.244.2.2", 8080));
    assert!(
        answered
            .iter()
            .filter(|r| r["IP"]["source"] == "10.244.1.2")
            .all(|r| r["verdict"] != "TIMED_OUT" && r["verdict"] != "DROPPED"),
        "the admitted client is never reported: {answered:#?}"
    );
}

// ---------------------------------------------------------------------------
// The scenarios on Open vSwitch, with the records the routed datapath gives
// except the kernel's reason: the switch's (6.4+; before, a drop in the
// datapath is silent and such flows are TIMED_OUT, as the tests above show).
// The cluster tiers are OpenFlow priorities (Deny, Allow, Pass to the table
// below the Admin tier's). The VM matrix runs them all on 6.12, two at a
// time (1.5-2 min each under TCG with two switches).

fn scenario(name: &str) {
    if !openvswitch_here() {
        return;
    }
    support::run_scenario(name, Some(netwatch_lab::Datapath::Ovs), |scenario| {
        let phases = scenario
            .spec
            .phases
            .iter_mut()
            .flat_map(|p| p.flows.iter_mut());
        for f in scenario.spec.flows.iter_mut().chain(phases) {
            // Service traffic too: the switch DNATs it before its policy
            // tables.
            if f.reason.as_deref() == Some("NETFILTER_DROP") {
                f.reason = Some("OVS_DROP_LAST_ACTION".into());
            }
        }
    });
}

/// Whether this kernel has Open vSwitch's drop reasons (6.4+) and its module;
/// says why not when skipping (a VM without the module fails instead).
fn openvswitch_here() -> bool {
    if kernel_version() < (6, 4) {
        eprintln!("skipped: Open vSwitch drops have no reason before 6.4 (TIMED_OUT; see above)");
        return false;
    }
    let spec: LabSpec = serde_yaml::from_str(TWO_PODS).expect("lab spec");
    up(&spec).is_some()
}

#[test]
fn ovs_scenario_label_mismatch() {
    scenario("label-mismatch");
}

#[test]
fn ovs_scenario_least_privilege() {
    scenario("least-privilege");
}

#[test]
fn ovs_scenario_pass_to_networkpolicy() {
    scenario("pass-to-networkpolicy");
}

#[test]
fn ovs_scenario_admin_deny_sensitive() {
    scenario("admin-deny-sensitive");
}

#[test]
fn ovs_scenario_baseline_default_deny() {
    scenario("baseline-default-deny");
}

// kube-proxy's REJECT drops the SYN at once, and its ICMP answer comes back
// through ovs-vswitchd's slow path (a new megaflow) after the drop reached
// the agent: the first record must still say REFUSED, not DROPPED.
#[test]
fn ovs_scenario_no_ready_endpoints() {
    scenario("no-ready-endpoints");
}

// The Service's endpoint is outside the switch (the API server): the
// switch DNATs it before its egress tables, as AntreaProxy does, so the
// denied call is dropped there, judged as the endpoint's address and port.
#[test]
fn ovs_scenario_egress_apiserver_world() {
    scenario("egress-apiserver-world");
}

#[test]
fn ovs_scenario_policy_not_enforced() {
    scenario("policy-not-enforced");
}

#[test]
fn ovs_scenario_prod_default_deny() {
    scenario("prod-default-deny");
}

#[test]
fn ovs_scenario_dns_wrong_label() {
    scenario("dns-wrong-label");
}
