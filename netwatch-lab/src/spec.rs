//! What a lab is made of: nodes, pods and the rules the node's firewall
//! applies. Serialisable, so a scenario file can hold it.

use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

/// A whole lab.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabSpec {
    pub nodes: Vec<NodeSpec>,
    pub pods: Vec<PodSpec>,
    /// Listeners on the world router, outside every node: `ip:port/tcp` (the
    /// address is added to the router), e.g. an API server or a host on the
    /// internet.
    #[serde(default)]
    pub world: Vec<String>,
    /// Which CNI datapath family the nodes emulate.
    #[serde(default)]
    pub datapath: Datapath,
}

/// The CNI datapath family a lab emulates. Each is a way of wiring pods to
/// their node and of enforcing policy there; the agent must report the same
/// flows on all of them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Datapath {
    /// Routed veths, policy as nftables forward drops (Calico iptables/nftables mode).
    #[default]
    Routed,
    /// TC programs on the host veths drop with TC_ACT_SHOT and deliver with
    /// bpf_redirect_peer (Cilium, Calico eBPF).
    Ebpf,
    /// Pods on a Linux bridge, nodes joined by a VXLAN overlay (flannel, kube-router).
    Bridge,
    /// Pods on an Open vSwitch bridge, policy as OpenFlow drops (Antrea, OVN-Kubernetes).
    Ovs,
}

impl Datapath {
    /// The kernel drop reasons of the datapath's policy drops: a DROPPED
    /// record with one of them is the lab enforcer's doing.
    pub fn policy_drop_reasons(self) -> &'static [&'static str] {
        match self {
            Datapath::Routed | Datapath::Bridge => &["NETFILTER_DROP"],
            Datapath::Ebpf => &["TC_INGRESS", "TC_EGRESS"],
            Datapath::Ovs => &["OVS_DROP_LAST_ACTION"],
        }
    }
}

impl std::fmt::Display for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Datapath::Routed => "routed",
            Datapath::Ebpf => "ebpf",
            Datapath::Bridge => "bridge",
            Datapath::Ovs => "ovs",
        })
    }
}

/// One lab node: a network namespace standing in for a node's root
/// namespace, with its own cgroup root.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub name: String,
    /// Raw nftables ruleset (`nft -f` syntax) loaded into the node.
    #[serde(default)]
    pub nftables: Option<String>,
    /// Extra `ip route add` arguments in the node, e.g. `blackhole 10.99.0.0/16`.
    #[serde(default)]
    pub routes: Vec<String>,
}

/// One lab pod: a network namespace behind a veth whose host side is named
/// as Calico names it, a /32 (and /128) route on the node, and a cgroup
/// shaped like kubelet's.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodSpec {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub node: String,
    pub ip: Ipv4Addr,
    #[serde(default)]
    pub ipv6: Option<Ipv6Addr>,
    /// Ports with listeners, `8080/tcp` or `53/udp` (UDP 53 answers DNS).
    #[serde(default)]
    pub listen: Vec<String>,
    /// Kubernetes pod UID (random when absent).
    #[serde(default)]
    pub uid: Option<String>,
    /// Runs in the node's network namespace (hostNetwork: true), still in
    /// its own pod cgroup.
    #[serde(default)]
    pub host_network: bool,
}

fn default_namespace() -> String {
    "default".into()
}

impl PodSpec {
    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// (port, protocol) listeners, validated.
    pub fn listeners(&self) -> Result<Vec<(u16, Proto)>, String> {
        self.listen
            .iter()
            .map(|l| {
                let (port, proto) = l.split_once('/').unwrap_or((l.as_str(), "tcp"));
                let port: u16 = port.parse().map_err(|_| {
                    format!(
                        "pod {}: listen {l:?}: port must be a number 1-65535",
                        self.id()
                    )
                })?;
                let proto = match proto.to_ascii_lowercase().as_str() {
                    "tcp" => Proto::Tcp,
                    "udp" => Proto::Udp,
                    other => {
                        return Err(format!(
                            "pod {}: listen {l:?}: protocol {other:?} (tcp or udp)",
                            self.id()
                        ));
                    }
                };
                Ok((port, proto))
            })
            .collect()
    }
}

/// Transport protocol of a listener or probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}
