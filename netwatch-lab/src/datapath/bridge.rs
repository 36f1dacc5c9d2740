//! The `bridge` datapath, as flannel (VXLAN backend) and kube-router wire
//! pods: every pod's veth is a port of the node's Linux bridge `cni0`, which
//! holds the gateway address of the node's pod CIDR (a /24: the one its pods'
//! addresses share). Pods on one node reach each other at layer 2 (bridged),
//! everything else through the gateway (routed).
//!
//! Nodes are joined by a VXLAN overlay the way flannel builds it: a VXLAN
//! device `flannel.1` (VNI 1, UDP 8472) with the address `<pod CIDR>.0/32`,
//! and per other node a route to its pod CIDR via its `flannel.1` address
//! (onlink), a permanent neighbour entry giving that address's MAC, and a
//! forwarding entry sending that MAC to the node's underlay address. So pod
//! to pod traffic between nodes is encapsulated; the world router still
//! routes pod CIDRs to their node (as with kube-router's BGP or flannel
//! without masquerading), so pods talk to the world unencapsulated.
//!
//! Policy: the nftables enforcer's `inet` table, reached through
//! br_netfilter (`bridge-nf-call-iptables`): bridged packets pass the IP
//! hooks with the bridge as their interface, so the enforcer dispatches on
//! pod addresses ([`crate::enforce::PodMatch::Address`]) instead of
//! interface names. The nftables bridge family would see the ports, but its
//! `ct state` needs nf_conntrack_bridge, which not every node kernel has.

use std::net::Ipv4Addr;

use super::super::{
    Lab, LabError, LabNode, PodSpec,
    system::{ip_batch, run, sysctl_in},
};

/// The bridge pods are ports of.
pub const BRIDGE: &str = "cni0";
/// flannel's VXLAN device and port (Linux's default VXLAN port is 4789).
pub const VXLAN_DEVICE: &str = "flannel.1";
pub const VXLAN_PORT: u16 = 8472;
/// Room for the VXLAN, UDP, IP and inner Ethernet headers, as flannel sets it.
const POD_MTU: u32 = 1450;

/// A node's pod CIDR: the /24 of its first pod-network pod.
pub fn pod_cidr(lab_pods: &[PodSpec], node: &str) -> Option<Ipv4Addr> {
    lab_pods
        .iter()
        .find(|p| p.node == node && !p.host_network)
        .map(|p| {
            let o = p.ip.octets();
            Ipv4Addr::new(o[0], o[1], o[2], 0)
        })
}

/// The VXLAN device's MAC on the `k`th node (1-based): fixed, so the other
/// nodes' neighbour entries can name it.
fn vxlan_mac(k: usize) -> String {
    format!("0e:6e:77:00:00:{k:02x}")
}

/// Check that every node's pods share their /24 and none takes its gateway.
pub fn validate(pods: &[PodSpec]) -> Result<(), LabError> {
    for p in pods.iter().filter(|p| !p.host_network) {
        let cidr = pod_cidr(pods, &p.node).unwrap_or(Ipv4Addr::UNSPECIFIED);
        let o = p.ip.octets();
        if Ipv4Addr::new(o[0], o[1], o[2], 0) != cidr || o[3] < 2 || o[3] == 255 {
            return Err(LabError::Spec(format!(
                "datapath bridge: pod {} has {}, outside node {}'s pod CIDR {cidr}/24 or on its \
                 network, gateway or broadcast address",
                p.id(),
                p.ip,
                p.node
            )));
        }
        if p.ipv6.is_some() {
            return Err(LabError::Spec(format!(
                "datapath bridge: pod {} has an IPv6 address; the bridge lab is IPv4 only \
                 (flannel's IPv6 overlay, flannel-v6.1, is not built)",
                p.id()
            )));
        }
    }
    Ok(())
}

/// The node's bridge and VXLAN device (`k`: the node's 1-based number).
pub fn wire_node(node: &LabNode, k: usize, cidr: Option<Ipv4Addr>) -> Result<(), LabError> {
    let mut cmds = vec![
        format!("link add {BRIDGE} type bridge"),
        format!("link set {BRIDGE} up"),
        format!(
            "link add {VXLAN_DEVICE} address {} type vxlan id 1 local {} dev uplink0 dstport {VXLAN_PORT} nolearning",
            vxlan_mac(k),
            node.ip
        ),
        format!("link set {VXLAN_DEVICE} mtu {POD_MTU} up"),
    ];
    if let Some(c) = cidr {
        let o = c.octets();
        cmds.push(format!(
            "addr add {}.{}.{}.1/24 dev {BRIDGE}",
            o[0], o[1], o[2]
        ));
        cmds.push(format!("addr add {c}/32 dev {VXLAN_DEVICE}"));
    }
    ip_batch(&node.netns, &cmds)?;
    // br_netfilter: bridged IP packets pass the IP hooks (policy, services'
    // DNAT and its reversal between pods on one bridge), as kube-proxy and
    // every bridge CNI require.
    sysctl_in(
        &node.netns,
        &[
            "net.bridge.bridge-nf-call-iptables=1",
            "net.bridge.bridge-nf-call-ip6tables=1",
        ],
    )
}

/// Wire `pod` (already in its own namespace `netns`) to `node`'s bridge via
/// the veth `host_if`.
pub fn wire_pod(
    node: &LabNode,
    netns: &str,
    host_if: &str,
    pod: &PodSpec,
    cidr: Ipv4Addr,
) -> Result<(), LabError> {
    run(
        "ip",
        &[
            "link",
            "add",
            host_if,
            "netns",
            &node.netns,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns,
        ],
    )?;
    let o = cidr.octets();
    let gateway = Ipv4Addr::new(o[0], o[1], o[2], 1);
    ip_batch(
        netns,
        &[
            format!("addr add {}/24 dev eth0", pod.ip),
            format!("link set eth0 mtu {POD_MTU} up"),
            format!("route add default via {gateway} dev eth0"),
        ],
    )?;
    ip_batch(
        &node.netns,
        &[format!(
            "link set {host_if} mtu {POD_MTU} master {BRIDGE} up"
        )],
    )
}

/// Join every pair of nodes through the overlay, and route each pod CIDR to
/// its node on the world router.
pub fn join_nodes(lab: &Lab, cidrs: &[(usize, Option<Ipv4Addr>)]) -> Result<(), LabError> {
    let mut world = Vec::new();
    for (k, cidr) in cidrs {
        let Some(cidr) = cidr else { continue };
        let node = &lab.nodes[k - 1];
        world.push(format!("route add {cidr}/24 via {}", node.ip));
        for (j, other) in lab.nodes.iter().enumerate() {
            if j + 1 == *k {
                continue;
            }
            ip_batch(
                &other.netns,
                &[
                    format!(
                        "neigh add {cidr} lladdr {} dev {VXLAN_DEVICE} nud permanent",
                        vxlan_mac(*k)
                    ),
                    format!("route add {cidr}/24 via {cidr} dev {VXLAN_DEVICE} onlink"),
                ],
            )?;
            run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &other.netns,
                    "bridge",
                    "fdb",
                    "append",
                    &vxlan_mac(*k),
                    "dev",
                    VXLAN_DEVICE,
                    "dst",
                    &node.ip.to_string(),
                ],
            )?;
        }
    }
    ip_batch(&lab.world, &world)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, node: &str, ip: &str) -> PodSpec {
        PodSpec {
            name: name.into(),
            namespace: "x".into(),
            node: node.into(),
            ip: ip.parse().unwrap(),
            ipv6: None,
            listen: Vec::new(),
            uid: None,
            host_network: false,
        }
    }

    #[test]
    fn a_nodes_pods_share_its_cidr_and_leave_the_gateway_free() {
        let ok = [
            pod("a", "node-1", "10.244.1.2"),
            pod("b", "node-1", "10.244.1.3"),
            pod("c", "node-2", "10.244.2.2"),
        ];
        validate(&ok).unwrap();
        assert_eq!(pod_cidr(&ok, "node-2"), Some(Ipv4Addr::new(10, 244, 2, 0)));
        let split = [
            pod("a", "node-1", "10.244.1.2"),
            pod("b", "node-1", "10.244.3.2"),
        ];
        let e = validate(&split).unwrap_err().to_string();
        assert!(e.contains("x/b") && e.contains("10.244.1.0/24"), "{e}");
        let gateway = [pod("a", "node-1", "10.244.1.1")];
        assert!(validate(&gateway).is_err());
        let mut v6 = pod("a", "node-1", "10.244.1.2");
        v6.ipv6 = Some("fd00::2".parse().unwrap());
        assert!(validate(&[v6]).unwrap_err().to_string().contains("IPv6"));
    }
}
