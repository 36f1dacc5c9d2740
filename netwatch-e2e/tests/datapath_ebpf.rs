//! The eBPF datapath (Cilium / Calico eBPF family) end to end: the lab's TC
//! programs enforce the NetworkPolicies with TC_ACT_SHOT and deliver into
//! pods with bpf_redirect_peer, skipping the host side's egress hook. The
//! agent must report what it reports on the routed datapath: DROPPED (with
//! the TC drop reason), REFUSED, TIMED_OUT, and no TIMED_OUT for traffic that
//! was answered, also when the answer bypassed its TC hooks.

mod support;

use std::time::Duration;

use netwatch_lab::{
    Datapath, EnforceOptions, Lab, LabCluster, LabSpec, Manifests, Outcome, kernel_version,
};
use support::{Agent, expect_probe, helper, records, tcp, to};

/// Two nodes: a client and a denied pod on node-1, a server on node-2; the
/// server only admits `app: client`.
const MANIFESTS: &str = r#"
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
spec: { nodeName: node-1, containers: [ { name: c, ports: [ { containerPort: 8080 } ] } ] }
status: { podIP: 10.244.1.4, conditions: [ { type: Ready, status: "True" } ] }
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
  ingress: [ { from: [ { podSelector: { matchLabels: { app: client } } } ] } ]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: { name: intruder, namespace: shop }
spec:
  podSelector: { matchLabels: { app: intruder } }
  policyTypes: [Egress]
"#;

struct Built {
    lab: Lab,
    cluster: LabCluster,
}

fn ebpf_lab(text: &str) -> Built {
    let manifests = Manifests::parse("test.yaml", text).unwrap_or_else(|e| panic!("{e}"));
    let (mut spec, _) = LabSpec::from_manifests(&manifests).unwrap_or_else(|e| panic!("{e}"));
    spec.datapath = Datapath::Ebpf;
    for p in &mut spec.pods {
        if p.name == "server" || p.name == "local" {
            p.listen = vec!["8080/tcp".into()];
        }
    }
    let lab = Lab::up(&spec, &helper()).expect("lab up (are you root?)");
    let cluster = LabCluster::new(manifests, lab.placements()).unwrap_or_else(|e| panic!("{e}"));
    lab.enforce(&cluster, &EnforceOptions::default())
        .unwrap_or_else(|e| panic!("{e}"));
    lab.proxy_services(&cluster)
        .unwrap_or_else(|e| panic!("{e}"));
    Built { lab, cluster }
}

/// Whether a listed program is the lab's `name`: tcx lists the kernel's
/// program name (cut to 15 characters); clsact the filter's name, which tc
/// takes from the pinned file (`netwatch-lab-<pid>-<program>-<interface>`).
fn is(listed: &str, name: &str) -> bool {
    (!listed.is_empty() && name.starts_with(listed)) || listed.contains(&format!("-{name}-"))
}

fn lab_programs(lab: &Lab, node: &str, interface: &str) -> (Vec<String>, Vec<String>) {
    let p = lab.tc_programs(node, interface).unwrap();
    if kernel_version() >= (6, 6) {
        (p.tcx_ingress, p.tcx_egress)
    } else {
        (p.clsact_ingress, p.clsact_egress)
    }
}

#[test]
fn the_datapath_is_on_every_veth_and_uplink_before_any_agent() {
    let b = ebpf_lab(MANIFESTS);
    for pod in &b.lab.pods {
        let (ingress, egress) = lab_programs(&b.lab, &pod.spec.node, &pod.host_if);
        assert!(
            ingress.iter().any(|n| is(n, "lab_from_pod")),
            "{}: {ingress:?}",
            pod.host_if
        );
        assert!(egress.iter().any(|n| is(n, "lab_to_pod")), "{egress:?}");
    }
    let (ingress, egress) = lab_programs(&b.lab, "node-1", "uplink0");
    assert!(
        ingress.iter().any(|n| is(n, "lab_uplink_in")),
        "{ingress:?}"
    );
    assert!(egress.iter().any(|n| is(n, "lab_uplink_out")), "{egress:?}");
    let _ = &b.cluster;
}

#[test]
fn the_programs_enforce_and_deliver_across_nodes() {
    let b = ebpf_lab(MANIFESTS);
    // Allowed across nodes, redirected into the server by node-2's uplink.
    expect_probe(
        &b.lab,
        "shop/client",
        tcp("10.244.2.2:8080", 5),
        Outcome::Connected,
    );
    // Allowed on one node, redirected from veth to veth.
    expect_probe(
        &b.lab,
        "shop/client",
        tcp("10.244.1.4:8080", 5),
        Outcome::Connected,
    );
    // A closed port: the RST comes back through the datapath.
    expect_probe(
        &b.lab,
        "shop/client",
        tcp("10.244.2.2:9", 5),
        Outcome::Refused,
    );
    // Denied by the server's ingress policy on node-2.
    expect_probe(
        &b.lab,
        "shop/local",
        tcp("10.244.2.2:8080", 2),
        Outcome::TimedOut,
    );
    // Denied by the intruder's egress policy on node-1.
    expect_probe(
        &b.lab,
        "shop/intruder",
        tcp("10.244.1.4:8080", 2),
        Outcome::TimedOut,
    );
}

/// The agent on node-1 while its client's answers arrive by redirect, with
/// the datapath's programs attached after the agent (re-enforced): REFUSED
/// for a closed port, nothing for an answered connection, DROPPED with the
/// TC reason for a denied one, TIMED_OUT for one denied on the other node.
#[test]
fn the_agent_reports_refusals_drops_and_no_false_timeouts_under_redirect_peer() {
    let b = ebpf_lab(MANIFESTS);
    let mut agent = Agent::start(&b.lab, "node-1", 3, &[]);
    // Attach the datapath again: now after the agent (tcx appends; clsact
    // replaces the lab's filter).
    b.lab
        .enforce(&b.cluster, &EnforceOptions::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let (ingress, _) = lab_programs(&b.lab, "node-1", &b.lab.pod("shop/client").unwrap().host_if);
    assert!(ingress.iter().any(|n| is(n, "lab_from_pod")), "{ingress:?}");

    expect_probe(
        &b.lab,
        "shop/client",
        tcp("10.244.2.2:8080", 5),
        Outcome::Connected,
    );
    expect_probe(
        &b.lab,
        "shop/client",
        tcp("10.244.1.4:8080", 5),
        Outcome::Connected,
    );
    expect_probe(
        &b.lab,
        "shop/client",
        tcp("10.244.2.2:9", 5),
        Outcome::Refused,
    );
    expect_probe(
        &b.lab,
        "shop/intruder",
        tcp("10.244.1.4:8080", 2),
        Outcome::TimedOut,
    );
    expect_probe(
        &b.lab,
        "shop/local",
        tcp("10.244.2.2:8080", 2),
        Outcome::TimedOut,
    );

    agent.wait_for_flow(Duration::from_secs(10), |f| {
        to("10.244.2.2", 9)(f) && f["verdict"] == "REFUSED"
    });
    agent.wait_for_flow(Duration::from_secs(10), |f| {
        to("10.244.1.4", 8080)(f) && f["verdict"] == "DROPPED"
    });
    agent.wait_for_flow(Duration::from_secs(10), |f| {
        to("10.244.2.2", 8080)(f) && f["verdict"] == "TIMED_OUT"
    });
    // Past the connect timeout (2 s) three times over: a false TIMED_OUT
    // for the answered connections would be out by now.
    std::thread::sleep(Duration::from_secs(6));
    let lines = agent.stop();
    let refused = records(&lines, to("10.244.2.2", 9));
    assert!(
        refused.iter().all(|f| f["verdict"] == "REFUSED")
            && refused.iter().any(|f| f["refusal"] == "TCP_RESET"),
        "{refused:#?}"
    );
    let dropped = records(&lines, to("10.244.1.4", 8080));
    assert!(!dropped.is_empty());
    for f in &dropped {
        assert_eq!(
            f["IP"]["source"], "10.244.1.3",
            "only the denied intruder: {f:#}"
        );
        assert_eq!(f["verdict"], "DROPPED", "{f:#}");
        assert_eq!(f["drop_reason_desc"], "TC_INGRESS", "{f:#}");
    }
    let to_server = records(&lines, to("10.244.2.2", 8080));
    for f in &to_server {
        assert_eq!(
            f["IP"]["source"], "10.244.1.4",
            "the client's answered connection is no TIMED_OUT: {f:#}"
        );
        assert_eq!(f["verdict"], "TIMED_OUT", "{f:#}");
    }
    let log = agent.log();
    assert!(
        log.contains("sock_state"),
        "the agent names the socket-state hook:\n{log}"
    );
}

/// Dual-stack pods on two nodes: node-2's uplink redirects the server's
/// IPv6 answers into the client past its veth's egress hook.
const DUAL_STACK: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: shop }
---
apiVersion: v1
kind: Pod
metadata: { name: client, namespace: shop, labels: { app: client } }
spec: { nodeName: node-1, containers: [ { name: c } ] }
status: { podIPs: [ { ip: 10.244.1.2 }, { ip: "fd00:244:1::2" } ], conditions: [ { type: Ready, status: "True" } ] }
---
apiVersion: v1
kind: Pod
metadata: { name: server, namespace: shop, labels: { app: server } }
spec: { nodeName: node-2, containers: [ { name: c, ports: [ { containerPort: 8080 } ] } ] }
status: { podIPs: [ { ip: 10.244.2.2 }, { ip: "fd00:244:2::2" } ], conditions: [ { type: Ready, status: "True" } ] }
"#;

/// IPv6 under redirect: the SYN-ACK and the RST reach the client only by
/// `bpf_redirect_peer` from node-1's uplink, which the agent does not hook,
/// so only the socket sees them. An answered IPv6 connection is no
/// TIMED_OUT, a refused one is REFUSED; an IPv6 socket connecting to a
/// v4-mapped address (IPv4 on the wire) is settled under its IPv4 flow.
#[test]
fn the_agent_settles_ipv6_handshakes_answered_past_its_tc_hooks() {
    let b = ebpf_lab(DUAL_STACK);
    // Before the agent: neighbour discovery on both nodes, so that no first
    // answer waits on it (its retransmit timer is 1 s, the agent's connect
    // timeout here is 2 s; on a loaded machine a first IPv6 handshake was
    // once answered only after the timeout, legitimately TIMED_OUT).
    for to_addr in ["[fd00:244:2::2]:8080", "[::ffff:10.244.2.2]:8080"] {
        expect_probe(&b.lab, "shop/client", tcp(to_addr, 5), Outcome::Connected);
    }
    let mut agent = Agent::start(&b.lab, "node-1", 1, &["--connect-timeout", "2"]);
    // The datapath again, after the agent: under tcx its programs end the
    // chain, so the agent's classifier must come first to see the SYN.
    b.lab
        .enforce(&b.cluster, &EnforceOptions::default())
        .unwrap_or_else(|e| panic!("{e}"));

    expect_probe(
        &b.lab,
        "shop/client",
        tcp("[fd00:244:2::2]:8080", 5),
        Outcome::Connected,
    );
    expect_probe(
        &b.lab,
        "shop/client",
        tcp("[fd00:244:2::2]:9", 5),
        Outcome::Refused,
    );
    expect_probe(
        &b.lab,
        "shop/client",
        tcp("[::ffff:10.244.2.2]:8080", 5),
        Outcome::Connected,
    );
    expect_probe(
        &b.lab,
        "shop/client",
        tcp("[::ffff:10.244.2.2]:9", 5),
        Outcome::Refused,
    );

    agent.wait_for_flow(Duration::from_secs(10), |f| {
        to("fd00:244:2::2", 9)(f) && f["verdict"] == "REFUSED"
    });
    agent.wait_for_flow(Duration::from_secs(10), |f| {
        to("10.244.2.2", 9)(f) && f["verdict"] == "REFUSED"
    });
    // Past the connect timeout (2 s) three times over: a false TIMED_OUT
    // for the answered connections would be out by now.
    std::thread::sleep(Duration::from_secs(6));
    let lines = agent.stop();
    for ip in ["fd00:244:2::2", "10.244.2.2"] {
        let refused = records(&lines, to(ip, 9));
        assert!(
            refused.iter().all(|f| f["verdict"] == "REFUSED")
                && refused.iter().any(|f| f["refusal"] == "TCP_RESET"),
            "{refused:#?}"
        );
        let answered = records(&lines, to(ip, 8080));
        assert!(
            answered.iter().all(|f| f["verdict"] != "TIMED_OUT"),
            "the answered connection is no TIMED_OUT: {answered:#?}"
        );
    }
}

/// The first two-node topology, dual-stack: the policies judge IPv6 as
/// they judge IPv4.
const DUAL_STACK_POLICED: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: shop }
---
apiVersion: v1
kind: Pod
metadata: { name: client, namespace: shop, labels: { app: client } }
spec: { nodeName: node-1, containers: [ { name: c } ] }
status: { podIPs: [ { ip: 10.244.1.2 }, { ip: "fd00:244:1::2" } ], conditions: [ { type: Ready, status: "True" } ] }
---
apiVersion: v1
kind: Pod
metadata: { name: intruder, namespace: shop, labels: { app: intruder } }
spec: { nodeName: node-1, containers: [ { name: c } ] }
status: { podIPs: [ { ip: 10.244.1.3 }, { ip: "fd00:244:1::3" } ], conditions: [ { type: Ready, status: "True" } ] }
---
apiVersion: v1
kind: Pod
metadata: { name: local, namespace: shop, labels: { app: local } }
spec: { nodeName: node-1, containers: [ { name: c, ports: [ { containerPort: 8080 } ] } ] }
status: { podIPs: [ { ip: 10.244.1.4 }, { ip: "fd00:244:1::4" } ], conditions: [ { type: Ready, status: "True" } ] }
---
apiVersion: v1
kind: Pod
metadata: { name: server, namespace: shop, labels: { app: server } }
spec: { nodeName: node-2, containers: [ { name: c, ports: [ { containerPort: 8080 } ] } ] }
status: { podIPs: [ { ip: 10.244.2.2 }, { ip: "fd00:244:2::2" } ], conditions: [ { type: Ready, status: "True" } ] }
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: { name: server, namespace: shop }
spec:
  podSelector: { matchLabels: { app: server } }
  ingress: [ { from: [ { podSelector: { matchLabels: { app: client } } } ] } ]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: { name: intruder, namespace: shop }
spec:
  podSelector: { matchLabels: { app: intruder } }
  policyTypes: [Egress]
"#;

/// IPv6 policed: a pod denied egress is dropped at its veth (TC_INGRESS,
/// DROPPED by the agent on its node, with its IPv6 address), a pod denied
/// by the other node's ingress policy times out there, allowed pods
/// connect (on one node and across, delivered by redirect) and are no
/// TIMED_OUT.
#[test]
fn the_agent_names_a_denied_ipv6_pod_flow_tc_ingress() {
    let b = ebpf_lab(DUAL_STACK_POLICED);
    // Neighbour discovery before the agent, as in the test above.
    for (from, to_addr) in [
        ("shop/client", "[fd00:244:2::2]:8080"),
        ("shop/client", "[fd00:244:1::4]:8080"),
    ] {
        expect_probe(&b.lab, from, tcp(to_addr, 5), Outcome::Connected);
    }
    let mut agent = Agent::start(&b.lab, "node-1", 3, &["--connect-timeout", "2"]);
    b.lab
        .enforce(&b.cluster, &EnforceOptions::default())
        .unwrap_or_else(|e| panic!("{e}"));

    expect_probe(
        &b.lab,
        "shop/client",
        tcp("[fd00:244:2::2]:8080", 5),
        Outcome::Connected,
    );
    expect_probe(
        &b.lab,
        "shop/client",
        tcp("[fd00:244:1::4]:8080", 5),
        Outcome::Connected,
    );
    expect_probe(
        &b.lab,
        "shop/intruder",
        tcp("[fd00:244:1::4]:8080", 2),
        Outcome::TimedOut,
    );
    expect_probe(
        &b.lab,
        "shop/local",
        tcp("[fd00:244:2::2]:8080", 2),
        Outcome::TimedOut,
    );
    agent.wait_for_flow(Duration::from_secs(10), |f| {
        to("fd00:244:1::4", 8080)(f) && f["verdict"] == "DROPPED"
    });
    agent.wait_for_flow(Duration::from_secs(10), |f| {
        to("fd00:244:2::2", 8080)(f) && f["verdict"] == "TIMED_OUT"
    });
    // Past the connect timeout (2 s) three times over: a false TIMED_OUT
    // for the answered connections would be out by now.
    std::thread::sleep(Duration::from_secs(6));
    let lines = agent.stop();
    let dropped = records(&lines, to("fd00:244:1::4", 8080));
    assert!(
        dropped.iter().any(|f| f["verdict"] == "DROPPED"),
        "{dropped:#?}"
    );
    for f in &dropped {
        if f["IP"]["source"] == "fd00:244:1::2" {
            assert_ne!(f["verdict"], "DROPPED", "the client is allowed: {f:#}");
            assert_ne!(f["verdict"], "TIMED_OUT", "{f:#}");
            continue;
        }
        assert_eq!(f["IP"]["source"], "fd00:244:1::3", "{f:#}");
        assert_eq!(f["verdict"], "DROPPED", "{f:#}");
        assert_eq!(f["drop_reason_desc"], "TC_INGRESS", "{f:#}");
    }
    for f in records(&lines, to("fd00:244:2::2", 8080)) {
        let denied = f["IP"]["source"] == "fd00:244:1::4";
        assert_eq!(
            f["verdict"] == "TIMED_OUT",
            denied,
            "only the pod node-2 denies times out: {f:#}"
        );
    }
}

/// The kernel names a TC_ACT_SHOT drop TC_INGRESS; on kernels without drop
/// reasons the `location` variant must say the same (the drop's caller is
/// where sch_handle_ingress is inlined). Also a denied connection to a
/// closed port is a drop, not a refusal.
#[test]
fn the_location_variant_names_the_datapath_drop_tc_ingress() {
    let b = ebpf_lab(MANIFESTS);
    let mut agent = Agent::start(&b.lab, "node-1", 3, &["--kfree-skb-variant", "location"]);
    assert!(agent.log().contains("mode location"), "{}", agent.log());
    expect_probe(
        &b.lab,
        "shop/intruder",
        tcp("10.244.1.4:8080", 2),
        Outcome::TimedOut,
    );
    let f = agent.wait_for_flow(Duration::from_secs(10), |f| {
        to("10.244.1.4", 8080)(f) && f["verdict"] == "DROPPED"
    });
    assert_eq!(f["flow"]["drop_reason_desc"], "TC_INGRESS", "{f:#}");
    agent.stop();
}

/// The nftables enforcer's truth tables (tests/data/enforce, which the
/// routed datapath is checked against in tests/enforce.rs) hold for the eBPF
/// enforcer too: same manifests, same outcomes.
#[path = "support/enforce_cases.rs"]
mod enforce_cases;

macro_rules! same_as_nftables {
    ($($test:ident: $case:literal,)*) => {$(
        #[test]
        fn $test() {
            enforce_cases::run_case($case, Datapath::Ebpf);
        }
    )*};
}

same_as_nftables! {
    enforcer_default_deny_ingress: "default-deny-ingress",
    enforcer_default_deny_egress: "default-deny-egress",
    enforcer_deny_all: "deny-all",
    enforcer_allow_from_namespace: "allow-from-namespace",
    enforcer_pod_and_namespace: "pod-and-namespace",
    enforcer_ip_block_except: "ip-block-except",
    enforcer_named_port_egress: "named-port-egress",
    enforcer_named_port_ingress: "named-port-ingress",
    enforcer_end_port: "end-port",
    enforcer_egress_to_pods: "egress-to-pods",
    enforcer_two_nodes: "two-nodes",
    enforcer_allow_from_same_namespace: "allow-from-same-namespace",
    enforcer_dns_to_kube_system: "dns-to-kube-system",
    enforcer_ip_block_pods_excluded: "ip-block-pods-excluded",
    enforcer_pod_or_namespace: "pod-or-namespace",
}

// ---------------------------------------------------------------------------
// The scenarios, in ebpf mode, with the records the routed mode gives.

fn scenario(name: &str) {
    support::run_scenario(name, Some(Datapath::Ebpf), |scenario| {
        // The kernel's reason is the datapath's: a TC program's drop. Service
        // traffic is judged after the node's DNAT, on the way out (TC egress
        // of the backend's veth or the uplink); direct traffic at the
        // source's veth.
        let phases = scenario
            .spec
            .phases
            .iter_mut()
            .flat_map(|p| p.flows.iter_mut());
        for f in scenario.spec.flows.iter_mut().chain(phases) {
            if f.reason.as_deref() == Some("NETFILTER_DROP") {
                f.reason = Some(
                    if f.service.is_some() {
                        "TC_EGRESS"
                    } else {
                        "TC_INGRESS"
                    }
                    .into(),
                );
            }
        }
    });
}

#[test]
fn scenario_prod_default_deny() {
    scenario("prod-default-deny");
}

#[test]
fn scenario_dns_wrong_label() {
    scenario("dns-wrong-label");
}

#[test]
fn scenario_label_mismatch() {
    scenario("label-mismatch");
}

#[test]
fn scenario_no_ready_endpoints() {
    scenario("no-ready-endpoints");
}

#[test]
fn scenario_egress_apiserver_world() {
    scenario("egress-apiserver-world");
}

#[test]
fn scenario_policy_not_enforced() {
    scenario("policy-not-enforced");
}

#[test]
fn scenario_least_privilege() {
    scenario("least-privilege");
}

// The cluster tiers (Admin and Baseline, with Deny, Allow and Pass), compiled
// into the programs' first-match lists.

#[test]
fn scenario_admin_deny_sensitive() {
    scenario("admin-deny-sensitive");
}

#[test]
fn scenario_baseline_default_deny() {
    scenario("baseline-default-deny");
}

#[test]
fn scenario_pass_to_networkpolicy() {
    scenario("pass-to-networkpolicy");
}
