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
//! Dual stack as flannel builds it: pods with an IPv6 address share their
//! node's /64 (the first such pod's), whose `::1` the bridge holds; a second
//! VXLAN device `flannel-v6.1` (same VNI and port, over the nodes' IPv6
//! underlay) carries it between nodes, with `<prefix>::` as its address and
//! the same routes, neighbours and forwarding entries as the IPv4 overlay.
//!
//! Policy: the nftables enforcer's `inet` table, reached through
//! br_netfilter (`bridge-nf-call-iptables`): bridged packets pass the IP
//! hooks with the bridge as their interface, so the enforcer dispatches on
//! pod addresses ([`crate::enforce::PodMatch::Address`]) instead of
//! interface names. The nftables bridge family would see the ports, but its
//! `ct state` needs nf_conntrack_bridge, which not every node kernel has.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::super::{
    Lab, LabError, LabNode, PodSpec,
    system::{ip_batch, run, sysctl_in},
};

/// The bridge pods are ports of.
pub const BRIDGE: &str = "cni0";
/// flannel's VXLAN device and port (Linux's default VXLAN port is 4789).
pub const VXLAN_DEVICE: &str = "flannel.1";
pub const VXLAN_PORT: u16 = 8472;
/// flannel's VXLAN device for IPv6 (over the IPv6 underlay).
pub const VXLAN6_DEVICE: &str = "flannel-v6.1";
/// Room for the VXLAN, UDP, IP and inner Ethernet headers, as flannel sets it.
const POD_MTU: u32 = 1450;
/// The same over an IPv6 underlay (its header is 20 bytes longer); a
/// dual-stack pod gets the smaller of the two, as flannel gives it.
const POD_MTU_V6: u32 = 1430;

/// A node's pod CIDRs: the /24 and the /64 its pods share.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeCidrs {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

/// A node's pod CIDRs: the /24 of its first pod-network pod, the /64 of its
/// first pod with an IPv6 address.
pub fn node_cidrs(lab_pods: &[PodSpec], node: &str) -> NodeCidrs {
    let on_node = || {
        lab_pods
            .iter()
            .filter(move |p| p.node == node && !p.host_network)
    };
    NodeCidrs {
        v4: pod_cidr(lab_pods, node),
        v6: on_node().find_map(|p| p.ipv6).map(prefix64),
    }
}

fn prefix64(a: Ipv6Addr) -> Ipv6Addr {
    let s = a.segments();
    Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0)
}

/// `prefix` with `last` as its final 16 bits (`::1`: the gateway).
fn in_prefix(prefix: Ipv6Addr, last: u16) -> Ipv6Addr {
    let mut s = prefix.segments();
    s[7] = last;
    Ipv6Addr::from(s)
}

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

/// The same for `flannel-v6.1`.
fn vxlan6_mac(k: usize) -> String {
    format!("0e:6e:77:00:06:{k:02x}")
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
        if let Some(v6) = p.ipv6 {
            let prefix = node_cidrs(pods, &p.node)
                .v6
                .unwrap_or(Ipv6Addr::UNSPECIFIED);
            let last = v6.segments()[4..] == [0, 0, 0, 0] || v6.segments()[4..] == [0, 0, 0, 1];
            if prefix64(v6) != prefix || last {
                return Err(LabError::Spec(format!(
                    "datapath bridge: pod {} has {v6}, outside node {}'s IPv6 pod CIDR \
                     {prefix}/64 or on its network or gateway address",
                    p.id(),
                    p.node
                )));
            }
        }
    }
    Ok(())
}

/// The node's bridge and VXLAN device (`k`: the node's 1-based number).
pub fn wire_node(node: &LabNode, k: usize, cidrs: NodeCidrs) -> Result<(), LabError> {
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
    if let Some(c) = cidrs.v4 {
        let o = c.octets();
        cmds.push(format!(
            "addr add {}.{}.{}.1/24 dev {BRIDGE}",
            o[0], o[1], o[2]
        ));
        cmds.push(format!("addr add {c}/32 dev {VXLAN_DEVICE}"));
    }
    if let Some(p) = cidrs.v6 {
        cmds.extend([
            format!(
                "link add {VXLAN6_DEVICE} address {} type vxlan id 1 local {} dev uplink0 dstport {VXLAN_PORT} nolearning",
                vxlan6_mac(k),
                node.uplink_v6
            ),
            format!("link set {VXLAN6_DEVICE} mtu {POD_MTU_V6} up"),
            format!("addr add {}/64 dev {BRIDGE} nodad", in_prefix(p, 1)),
            format!("addr add {p}/128 dev {VXLAN6_DEVICE} nodad"),
        ]);
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
    cidrs: NodeCidrs,
) -> Result<(), LabError> {
    super::veth_into_pod(node, netns, host_if)?;
    let o = cidrs.v4.unwrap_or(Ipv4Addr::UNSPECIFIED).octets();
    let gateway = Ipv4Addr::new(o[0], o[1], o[2], 1);
    let mtu = if pod.ipv6.is_some() {
        POD_MTU_V6
    } else {
        POD_MTU
    };
    let mut cmds = vec![
        format!("addr add {}/24 dev eth0", pod.ip),
        format!("link set eth0 mtu {mtu} up"),
        format!("route add default via {gateway} dev eth0"),
    ];
    if let (Some(v6), Some(prefix)) = (pod.ipv6, cidrs.v6) {
        cmds.push(format!("addr add {v6}/64 dev eth0 nodad"));
        cmds.push(format!(
            "route add ::/0 via {} dev eth0",
            in_prefix(prefix, 1)
        ));
    }
    ip_batch(netns, &cmds)?;
    ip_batch(
        &node.netns,
        &[format!("link set {host_if} mtu {mtu} master {BRIDGE} up")],
    )
}

/// Join every pair of nodes through the overlay, and route each pod CIDR to
/// its node on the world router.
pub fn join_nodes(lab: &Lab, cidrs: &[(usize, NodeCidrs)]) -> Result<(), LabError> {
    let mut world = Vec::new();
    for (k, c) in cidrs {
        let node = &lab.nodes[k - 1];
        if let Some(cidr) = c.v4 {
            let overlay = Overlay {
                device: VXLAN_DEVICE,
                mac: vxlan_mac(*k),
                underlay: node.ip.into(),
            };
            join(lab, *k, &overlay, cidr.into(), 24, &mut world)?;
        }
        if let Some(prefix) = c.v6 {
            let overlay = Overlay {
                device: VXLAN6_DEVICE,
                mac: vxlan6_mac(*k),
                underlay: node.uplink_v6.into(),
            };
            join(lab, *k, &overlay, prefix.into(), 64, &mut world)?;
        }
    }
    ip_batch(&lab.world, &world)
}

/// Node `k`'s end of one overlay (one address family).
struct Overlay {
    device: &'static str,
    mac: String,
    underlay: IpAddr,
}

/// The entries for node `k`'s pod CIDR `network`/`len` on every other node
/// (neighbour, onlink route via the network address, forwarding entry to
/// its underlay address), and the world router's route to it.
fn join(
    lab: &Lab,
    k: usize,
    overlay: &Overlay,
    network: IpAddr,
    len: u8,
    world: &mut Vec<String>,
) -> Result<(), LabError> {
    let Overlay {
        device,
        mac,
        underlay,
    } = overlay;
    world.push(format!("route add {network}/{len} via {underlay}"));
    for (j, other) in lab.nodes.iter().enumerate() {
        if j + 1 == k {
            continue;
        }
        ip_batch(
            &other.netns,
            &[
                format!("neigh add {network} lladdr {mac} dev {device} nud permanent"),
                format!("route add {network}/{len} via {network} dev {device} onlink"),
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
                mac,
                "dev",
                device,
                "dst",
                &underlay.to_string(),
            ],
        )?;
    }
    Ok(())
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
        v6.ipv6 = Some("fd00:1::2".parse().unwrap());
        let mut other = pod("b", "node-1", "10.244.1.3");
        other.ipv6 = Some("fd00:2::3".parse().unwrap());
        validate(std::slice::from_ref(&v6)).unwrap();
        assert_eq!(
            node_cidrs(std::slice::from_ref(&v6), "node-1").v6,
            Some("fd00:1::".parse().unwrap())
        );
        let e = validate(&[v6.clone(), other]).unwrap_err().to_string();
        assert!(e.contains("x/b") && e.contains("fd00:1::/64"), "{e}");
        v6.ipv6 = Some("fd00:1::1".parse().unwrap());
        assert!(validate(&[v6]).is_err(), "the gateway's address");
    }
}
