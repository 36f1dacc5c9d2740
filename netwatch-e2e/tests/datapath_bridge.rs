//! The `bridge` lab datapath (flannel / kube-router family) end to end: pods
//! on a Linux bridge, nodes joined by a VXLAN overlay, policy through
//! br_netfilter. The scenarios give the records the routed datapath gives;
//! drops before encapsulation, after decapsulation and of the encapsulated
//! packet itself are each reported as the pod flow they broke.

mod support;

use netwatch_lab::Datapath;
use support::run_scenario;

/// Run scenario `name` on the bridge datapath with every check it states.
fn scenario(name: &str) {
    run_scenario(name, Some(Datapath::Bridge), |_| {});
}

#[test]
fn scenario_prod_default_deny() {
    scenario("prod-default-deny");
}

#[test]
fn scenario_least_privilege() {
    scenario("least-privilege");
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

// The cluster-scoped tiers: the nftables enforcer, through br_netfilter.

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

// ---- the overlay's three drop places, with the agent on both nodes ----

/// Two nodes, a client and a same-node peer on node-1, a server on node-2.
/// The node firewalls stand in for policy at fixed places: node-1 drops
/// server:8081 before encapsulation, node-2 drops server:8082 after
/// decapsulation, node-1 drops peer:8081 on its bridge.
const OVERLAY: &str = r#"
datapath: bridge
nodes:
  - name: node-1
    nftables: |
      table inet lab {
        chain forward {
          type filter hook forward priority 0; policy accept;
          ip daddr 10.244.2.2 tcp dport 8081 counter drop comment "before-encap"
          ip daddr 10.244.1.3 tcp dport 8081 counter drop comment "on-bridge"
        }
      }
  - name: node-2
    nftables: |
      table inet lab {
        chain forward {
          type filter hook forward priority 0; policy accept;
          ip daddr 10.244.2.2 tcp dport 8082 counter drop comment "after-decap"
        }
      }
pods:
  - { name: client, namespace: x, node: node-1, ip: 10.244.1.2 }
  - { name: peer, namespace: x, node: node-1, ip: 10.244.1.3, listen: ["8080/tcp", "8081/tcp"] }
  - { name: server, namespace: x, node: node-2, ip: 10.244.2.2, listen: ["8080/tcp", "8081/tcp", "8082/tcp", "9000/tcp"] }
"#;

const OVERLAY_MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: x }
---
apiVersion: v1
kind: Pod
metadata: { name: client, namespace: x }
spec: { nodeName: node-1, containers: [ { name: c, image: c } ] }
status: { phase: Running, podIP: 10.244.1.2, conditions: [ { type: Ready, status: "True" } ] }
---
apiVersion: v1
kind: Pod
metadata: { name: peer, namespace: x }
spec: { nodeName: node-1, containers: [ { name: p, image: p } ] }
status: { phase: Running, podIP: 10.244.1.3, conditions: [ { type: Ready, status: "True" } ] }
---
apiVersion: v1
kind: Pod
metadata: { name: server, namespace: x }
spec: { nodeName: node-2, containers: [ { name: s, image: s } ] }
status: { phase: Running, podIP: 10.244.2.2, conditions: [ { type: Ready, status: "True" } ] }
"#;

use std::time::Duration;

use netwatch_lab::{Lab, Outcome};
use serde_json::Value;
use support::{Agent, expect_probe, lab, node_http_get, records, tcp, to, uuids};

fn agent(lab: &Lab, node: &str, pods: usize, dir: &tempfile::TempDir, metrics: &str) -> Agent {
    let manifests = dir.path().join("cluster.yaml");
    std::fs::write(&manifests, OVERLAY_MANIFESTS).unwrap();
    // The default interface patterns: they must pick the bridge's ports.
    Agent::start(
        lab,
        node,
        pods,
        &[
            "--manifests",
            manifests.to_str().unwrap(),
            "--interfaces",
            "",
            "--metrics-addr",
            metrics,
        ],
    )
}

/// The last record of the one flow matching `pred`; fails on none or two.
fn one_flow<'a>(lines: &'a [Value], pred: impl Fn(&Value) -> bool, what: &str) -> &'a Value {
    let all = records(lines, pred);
    let ids = uuids(&all);
    assert_eq!(ids.len(), 1, "{what}: exactly one flow: {lines:#?}");
    all.last().copied().unwrap()
}

fn pods_named(f: &Value, src: &str, dst: &str) {
    assert_eq!(f["source"]["namespace"], "x", "{f:#}");
    assert_eq!(f["source"]["pod_name"], src, "{f:#}");
    assert_eq!(f["destination"]["pod_name"], dst, "{f:#}");
}

#[test]
fn drops_before_encapsulation_after_decapsulation_and_of_the_tunnel_name_the_pod_flow() {
    let lab = lab(OVERLAY);
    let dir1 = tempfile::tempdir().unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    let mut a1 = agent(&lab, "node-1", 2, &dir1, "127.0.0.1:9965");
    let mut a2 = agent(&lab, "node-2", 1, &dir2, "none");

    // The overlay works: pod to pod across nodes, and on one bridge.
    expect_probe(
        &lab,
        "x/client",
        tcp("10.244.2.2:8080", 5),
        Outcome::Connected,
    );
    expect_probe(
        &lab,
        "x/client",
        tcp("10.244.1.3:8080", 5),
        Outcome::Connected,
    );
    // Source node, before encapsulation; destination node, after
    // decapsulation; and between two pods on node-1's bridge.
    expect_probe(
        &lab,
        "x/client",
        tcp("10.244.2.2:8081", 2),
        Outcome::TimedOut,
    );
    expect_probe(
        &lab,
        "x/client",
        tcp("10.244.2.2:8082", 2),
        Outcome::TimedOut,
    );
    expect_probe(
        &lab,
        "x/client",
        tcp("10.244.1.3:8081", 2),
        Outcome::TimedOut,
    );
    a1.wait_for_flow(Duration::from_secs(10), to("10.244.2.2", 8081));
    a1.wait_for_flow(Duration::from_secs(10), to("10.244.1.3", 8081));
    a2.wait_for_flow(Duration::from_secs(10), to("10.244.2.2", 8082));

    // The attached-interfaces gauge counts the bridge's ports only: not
    // cni0, flannel.1 or the uplink.
    let metrics = node_http_get(&lab, "node-1", "http://127.0.0.1:9965/metrics");
    let attached = metrics
        .lines()
        .find(|l| l.starts_with("netwatch_attached_interfaces "))
        .unwrap_or_else(|| panic!("no gauge in {metrics}"));
    assert_eq!(attached, "netwatch_attached_interfaces 2", "{metrics}");

    // Node-2's firewall now drops the tunnel itself (flannel's UDP 8472).
    lab.nft(
        "node-2",
        "table inet tunnel {\n chain input {\n type filter hook input priority 0; policy accept;\n udp dport 8472 counter drop comment \"vxlan\"\n }\n}\n",
    )
    .unwrap();
    expect_probe(
        &lab,
        "x/client",
        tcp("10.244.2.2:8080", 2),
        Outcome::TimedOut,
    );
    a2.wait_for_flow(Duration::from_secs(10), |f| {
        to("10.244.2.2", 8080)(f) && f["verdict"] == "DROPPED"
    });
    assert!(lab.nft_counter("node-2", "vxlan").unwrap() >= 1);

    let l1 = a1.stop();
    let l2 = a2.stop();

    let f = one_flow(&l1, to("10.244.2.2", 8081), "before encapsulation");
    assert_eq!(f["verdict"], "DROPPED");
    assert_eq!(f["drop_reason_desc"], "NETFILTER_DROP");
    pods_named(f, "client", "server");
    assert!(f.get("outer").is_none(), "not in a tunnel yet: {f:#}");
    assert!(
        records(&l2, to("10.244.2.2", 8081)).is_empty(),
        "node-2 never saw it"
    );

    let f = one_flow(&l2, to("10.244.2.2", 8082), "after decapsulation");
    assert_eq!(f["verdict"], "DROPPED");
    assert_eq!(f["drop_reason_desc"], "NETFILTER_DROP");
    pods_named(f, "client", "server");
    assert!(f.get("outer").is_none(), "out of the tunnel: {f:#}");

    // On the bridge: one flow, not one per hook (the bridge is not hooked).
    let f = one_flow(&l1, to("10.244.1.3", 8081), "on the bridge");
    assert_eq!(f["verdict"], "DROPPED");
    pods_named(f, "client", "peer");

    // The tunnel's drop: the inner pod flow, the nodes in `outer`.
    let dropped: Vec<&Value> = records(&l2, |f| {
        to("10.244.2.2", 8080)(f) && f["verdict"] == "DROPPED"
    });
    let f = dropped.last().unwrap();
    assert_eq!(uuids(&dropped).len(), 1, "{dropped:#?}");
    assert_eq!(f["drop_reason_desc"], "NETFILTER_DROP");
    assert_eq!(f["IP"]["source"], "10.244.1.2");
    pods_named(f, "client", "server");
    let outer = &f["outer"];
    assert_eq!(
        outer["source"],
        lab.node("node-1").unwrap().ip.to_string(),
        "{f:#}"
    );
    assert_eq!(
        outer["destination"],
        lab.node("node-2").unwrap().ip.to_string()
    );
    assert_eq!(outer["protocol"], "UDP");
    assert_eq!(outer["port"], 8472);
    assert_eq!(outer["encapsulation"], "vxlan");
    // No node-to-node UDP flow is reported instead.
    assert!(
        records(&l2, |f| f["IP"]["source"] == outer["source"]).is_empty(),
        "{l2:#?}"
    );
}

// ---- dual stack: flannel's IPv6 overlay (flannel-v6.1) ----

/// The overlay again, dual-stack: node-1 drops the server's IPv6 port 8081
/// before encapsulation; later node-2 drops the IPv6 tunnel itself.
const OVERLAY_V6: &str = r#"
datapath: bridge
nodes:
  - name: node-1
    nftables: |
      table inet lab {
        chain forward {
          type filter hook forward priority 0; policy accept;
          ip6 daddr fd00:10:244:2::2 tcp dport 8081 counter drop comment "v6-before-encap"
        }
      }
  - name: node-2
pods:
  - { name: client, namespace: x, node: node-1, ip: 10.244.1.2, ipv6: "fd00:10:244:1::2" }
  - { name: peer, namespace: x, node: node-1, ip: 10.244.1.3, ipv6: "fd00:10:244:1::3", listen: ["8080/tcp"] }
  - { name: server, namespace: x, node: node-2, ip: 10.244.2.2, ipv6: "fd00:10:244:2::2", listen: ["8080/tcp", "8081/tcp"] }
"#;

const OVERLAY_V6_MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: x }
---
apiVersion: v1
kind: Pod
metadata: { name: client, namespace: x }
spec: { nodeName: node-1, containers: [ { name: c, image: c } ] }
status: { phase: Running, podIPs: [ { ip: 10.244.1.2 }, { ip: "fd00:10:244:1::2" } ], conditions: [ { type: Ready, status: "True" } ] }
---
apiVersion: v1
kind: Pod
metadata: { name: peer, namespace: x }
spec: { nodeName: node-1, containers: [ { name: p, image: p } ] }
status: { phase: Running, podIPs: [ { ip: 10.244.1.3 }, { ip: "fd00:10:244:1::3" } ], conditions: [ { type: Ready, status: "True" } ] }
---
apiVersion: v1
kind: Pod
metadata: { name: server, namespace: x }
spec: { nodeName: node-2, containers: [ { name: s, image: s } ] }
status: { phase: Running, podIPs: [ { ip: 10.244.2.2 }, { ip: "fd00:10:244:2::2" } ], conditions: [ { type: Ready, status: "True" } ] }
"#;

fn agent_v6(lab: &Lab, node: &str, pods: usize, dir: &tempfile::TempDir) -> Agent {
    let manifests = dir.path().join("cluster.yaml");
    std::fs::write(&manifests, OVERLAY_V6_MANIFESTS).unwrap();
    Agent::start(
        lab,
        node,
        pods,
        &[
            "--manifests",
            manifests.to_str().unwrap(),
            "--interfaces",
            "",
        ],
    )
}

#[test]
fn dual_stack_overlay_drops_name_the_ipv6_pod_flow_inside_the_tunnel_too() {
    let lab = lab(OVERLAY_V6);
    let dir1 = tempfile::tempdir().unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    let mut a1 = agent_v6(&lab, "node-1", 2, &dir1);
    let mut a2 = agent_v6(&lab, "node-2", 1, &dir2);
    // IPv6 across the overlay and on one bridge; IPv4 still works.
    for to_addr in [
        "[fd00:10:244:2::2]:8080",
        "[fd00:10:244:1::3]:8080",
        "10.244.2.2:8080",
    ] {
        expect_probe(&lab, "x/client", tcp(to_addr, 5), Outcome::Connected);
    }
    // Dropped before encapsulation: the pod flow, on node-1.
    expect_probe(
        &lab,
        "x/client",
        tcp("[fd00:10:244:2::2]:8081", 2),
        Outcome::TimedOut,
    );
    a1.wait_for_flow(Duration::from_secs(10), to("fd00:10:244:2::2", 8081));
    // Node-2's firewall drops the IPv6 tunnel (VXLAN over the IPv6 underlay).
    lab.nft(
        "node-2",
        "table inet tunnel {\n chain input {\n type filter hook input priority 0; policy accept;\n meta nfproto ipv6 udp dport 8472 counter drop comment \"vxlan6\"\n }\n}\n",
    )
    .unwrap();
    expect_probe(
        &lab,
        "x/client",
        tcp("[fd00:10:244:2::2]:8080", 2),
        Outcome::TimedOut,
    );
    a2.wait_for_flow(Duration::from_secs(10), |f| {
        to("fd00:10:244:2::2", 8080)(f) && f["verdict"] == "DROPPED"
    });
    assert!(lab.nft_counter("node-2", "vxlan6").unwrap() >= 1);
    let l1 = a1.stop();
    let l2 = a2.stop();

    let f = one_flow(
        &l1,
        to("fd00:10:244:2::2", 8081),
        "IPv6 before encapsulation",
    );
    assert_eq!(f["verdict"], "DROPPED");
    assert_eq!(f["IP"]["ipVersion"], "IPv6");
    pods_named(f, "client", "server");
    // Answered IPv6 connections are no flow at all (nothing denied).
    assert!(
        records(&l1, to("fd00:10:244:1::3", 8080)).is_empty(),
        "{l1:#?}"
    );

    let dropped: Vec<&Value> = records(&l2, |f| {
        to("fd00:10:244:2::2", 8080)(f) && f["verdict"] == "DROPPED"
    });
    let f = dropped.last().unwrap();
    assert_eq!(f["IP"]["source"], "fd00:10:244:1::2", "{f:#}");
    pods_named(f, "client", "server");
    let outer = &f["outer"];
    assert_eq!(
        outer["source"],
        lab.node("node-1").unwrap().uplink_v6.to_string(),
        "{f:#}"
    );
    assert_eq!(
        outer["destination"],
        lab.node("node-2").unwrap().uplink_v6.to_string()
    );
    assert_eq!(outer["encapsulation"], "vxlan");
}

// ---- Geneve and IPIP: real packets, crafted ----
//
// This kernel has no geneve or ipip driver, but the agent does not need one:
// it decodes whatever the node's firewall drops. Packets built here, sent
// from the world router to node-1 and dropped by node-1's input chain, are
// Geneve (UDP 6081, an Ethernet frame inside) and IP in IP (protocol 4)
// carrying a SYN from x/server to x/client. (nftables calls protocol 4
// `ipencap`; its `ipip` is 94.)

/// An IPv4 + TCP SYN from `src:sport` to `dst:dport` (checksums are not
/// checked by a firewall's drop).
fn syn(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut p = vec![
        0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0, // v4, len 40, DF, TTL 64, TCP
    ];
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    p
}

/// Run `f` on a thread inside network namespace `netns` (setns applies to
/// the calling thread only).
fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).expect("netns");
        use std::os::fd::AsRawFd;
        // SAFETY: a valid namespace fd; only this thread moves.
        assert_eq!(
            unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        f()
    })
    .join()
    .expect("netns thread")
}

#[test]
fn geneve_and_ipip_drops_are_reported_as_the_inner_pod_flow() {
    let lab = lab(OVERLAY);
    lab.nft(
        "node-1",
        "table inet tunnel {\n chain input {\n type filter hook input priority 0; policy accept;\n udp dport 6081 counter drop comment \"geneve\"\n ip protocol 4 counter drop comment \"ipip\"\n }\n}\n",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(&lab, "node-1", 2, &dir, "none");
    let node = lab.node("node-1").unwrap().ip;
    let world = {
        let o = node.octets();
        std::net::Ipv4Addr::new(o[0], o[1], o[2], o[3] - 1)
    };
    let (server, client) = ([10, 244, 2, 2], [10, 244, 1, 2]);
    in_netns(&lab.world, move || {
        // Geneve: version 0, no options, protocol 0x6558 (Ethernet), VNI 1.
        let mut geneve = vec![0, 0, 0x65, 0x58, 0, 0, 1, 0];
        geneve.extend_from_slice(&[0x0e, 0, 0, 0, 0, 1, 0x0e, 0, 0, 0, 0, 2, 0x08, 0x00]);
        geneve.extend(syn(server, client, 41000, 9000));
        let udp = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        udp.send_to(&geneve, (node, 6081)).unwrap();
        // IPIP: the kernel writes the outer header (protocol 4).
        // SAFETY: plain socket calls on our own buffers.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_IPIP);
            assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            let inner = syn(server, client, 41001, 9001);
            let to = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(node.octets()),
                },
                sin_zero: [0; 8],
            };
            let n = libc::sendto(
                fd,
                inner.as_ptr().cast(),
                inner.len(),
                0,
                (&to as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            );
            assert_eq!(
                n,
                inner.len() as isize,
                "{}",
                std::io::Error::last_os_error()
            );
            libc::close(fd);
        }
    });
    for (port, encap, protocol) in [(9000, "geneve", "UDP"), (9001, "ipip", "IPIP")] {
        let line = agent.wait_for_flow(Duration::from_secs(10), to("10.244.1.2", port));
        let f = &line["flow"];
        assert_eq!(f["verdict"], "DROPPED", "{f:#}");
        assert_eq!(f["drop_reason_desc"], "NETFILTER_DROP");
        assert_eq!(f["IP"]["source"], "10.244.2.2");
        pods_named(f, "server", "client");
        assert_eq!(f["outer"]["encapsulation"], encap, "{f:#}");
        assert_eq!(f["outer"]["protocol"], protocol);
        assert_eq!(f["outer"]["source"], world.to_string());
        assert_eq!(f["outer"]["destination"], node.to_string());
    }
    assert_eq!(lab.nft_counter("node-1", "geneve").unwrap(), 1);
    assert_eq!(lab.nft_counter("node-1", "ipip").unwrap(), 1);
}
