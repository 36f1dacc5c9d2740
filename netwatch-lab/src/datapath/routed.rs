//! Routed veths, as Calico wires pods (and the eBPF datapath, which adds its
//! TC programs on the same wiring): the host side named `cali` + 11 hex
//! digits, a /32 (and /128) route per pod on the node, proxy ARP answering
//! for the pod's gateway `169.254.1.1`, no bridge.

use super::super::{
    LabNode, PodSpec,
    system::{LabError, ip_batch, sysctl_in},
};

/// Calico's host-side name: `cali` and 11 hex digits of a hash.
pub fn host_if_name(hash: &str) -> String {
    format!("cali{}", &hash[..11])
}

/// The pod's veth, addresses and routes on both sides, and its route on the
/// underlay (`world`), which knows each pod's node.
pub fn wire_pod(
    node: &LabNode,
    world: &str,
    netns: &str,
    host_if: &str,
    pod: &PodSpec,
) -> Result<(), LabError> {
    super::veth_into_pod(node, netns, host_if)?;
    let ip = pod.ip;
    let mut pod_cmds = super::pod_address_cmds(pod);
    let mut node_cmds = vec![
        format!("link set {host_if} up"),
        format!("route add {ip}/32 dev {host_if}"),
    ];
    if let Some(v6) = pod.ipv6 {
        pod_cmds.push(format!("addr add {v6}/128 dev eth0 nodad"));
        pod_cmds.push("route add ::/0 via fe80::1 dev eth0".into());
        node_cmds.push(format!("addr add fe80::1/64 dev {host_if} nodad"));
        node_cmds.push(format!("route add {v6}/128 dev {host_if}"));
    }
    ip_batch(netns, &pod_cmds)?;
    ip_batch(&node.netns, &node_cmds)?;
    super::route_on_underlay(node, world, pod)?;
    // Calico's settings: answer ARP for the gateway, without delay.
    sysctl_in(
        &node.netns,
        &[
            &format!("net.ipv4.conf.{host_if}.proxy_arp=1"),
            &format!("net.ipv4.neigh.{host_if}.proxy_delay=0"),
        ],
    )
}
