//! How pods are wired to their node and policy enforced there, one module
//! per CNI datapath family: `routed` (Calico's veths and routes; the eBPF
//! datapath, `ebpf`, adds its TC programs on the same wiring), `bridge`
//! (flannel's `cni0` and VXLAN) and `ovs` (Antrea's `br-int`).

pub mod bridge;
pub mod ebpf;
pub mod ovs;
pub mod routed;

use super::{
    LabNode, PodSpec,
    system::{LabError, ip_batch, run},
};

/// A veth pair: `host_if` on the node, `eth0` in the pod's namespace.
pub(super) fn veth_into_pod(node: &LabNode, netns: &str, host_if: &str) -> Result<(), LabError> {
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
    )
    .map(drop)
}

/// The pod side of a /32 pod behind the link-local gateway `169.254.1.1`
/// (Calico's and Antrea-in-the-lab's).
pub(super) fn pod_address_cmds(pod: &PodSpec) -> Vec<String> {
    vec![
        format!("addr add {}/32 dev eth0", pod.ip),
        "link set eth0 up".into(),
        "route add 169.254.1.1 dev eth0 scope link".into(),
        "route add default via 169.254.1.1 dev eth0".into(),
    ]
}

/// The underlay (the lab's world router) routes each pod to its node.
pub(super) fn route_on_underlay(
    node: &LabNode,
    world: &str,
    pod: &PodSpec,
) -> Result<(), LabError> {
    let mut cmds = vec![format!("route add {}/32 via {}", pod.ip, node.ip)];
    if let Some(v6) = pod.ipv6 {
        cmds.push(format!("route add {v6}/128 via {}", node.uplink_v6));
    }
    ip_batch(world, &cmds)
}
