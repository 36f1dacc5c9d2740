//! Pod interfaces: found from netlink link events (not polling) and matched
//! by name pattern; [`super::hooks::tc`] attaches the classifiers to them.

use futures::{StreamExt, TryStreamExt};
use netlink_packet_core::NetlinkPayload;
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkInfo, LinkMessage},
};
use tokio::sync::mpsc;
use tracing::warn;

/// Interface name patterns of common CNIs' host-side pod interfaces:
/// Calico (`cali`), Cilium (`lxc`), flannel, kube-router, Weave and the
/// bridge plugin (`veth`), CNIs that prefix `cni`, AWS VPC CNI (`eni`),
/// GKE (`gke`), Azure CNI (`azv`).
pub const DEFAULT_INTERFACE_PATTERNS: &[&str] =
    &["cali*", "lxc*", "veth*", "cni*", "eni*", "gke*", "azv*"];

/// Link kinds that are never a pod's host interface, whatever their name:
/// a bridge (flannel's `cni0`, kube-router's `kube-bridge`) whose ports are
/// the pods' veths, so hooking it too would see every routed pod packet a
/// second time; overlay and tunnel devices (`flannel.1`, `tunl0`, Antrea's
/// `antrea-tun0`), which carry pod traffic already seen on the ports; and
/// Open vSwitch's internal ports (`antrea-gw0`, `ovn-k8s-mp0`).
const NOT_POD_KINDS: &[&str] = &[
    "bridge",
    "vxlan",
    "geneve",
    "ipip",
    "ip6tnl",
    "sit",
    "gre",
    "gretap",
    "wireguard",
    "openvswitch",
    "dummy",
];

/// Errors of the link watcher.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("invalid --interfaces pattern {pattern:?}: {source}")]
    Pattern {
        pattern: String,
        #[source]
        source: glob::PatternError,
    },
    #[error("netlink: {0}")]
    Netlink(#[from] std::io::Error),
    #[error("netlink link dump: {0}")]
    Dump(#[from] rtnetlink::Error),
}

/// A link appeared, changed or went away.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkChange {
    /// New or changed (renamed, up/down): attach if the name matches.
    /// `peer_netns` is the netns id of a veth's other end, when it has one;
    /// `kind` the link's kind (`veth`, `bridge`, `vxlan`, ...; empty when
    /// the kernel names none, as for physical devices); `port_kind` the
    /// kind of the device it is a port of (`openvswitch`, `bridge`; empty
    /// when none).
    Present {
        index: u32,
        name: String,
        kind: String,
        port_kind: String,
        peer_netns: Option<i32>,
    },
    Gone {
        index: u32,
    },
}

/// `--interfaces` globs. With the defaults, a veth that is a port of an
/// Open vSwitch datapath is a pod interface whatever its name: Antrea,
/// OVN-Kubernetes and Kube-OVN name pods' host veths after the pod or the
/// container (`web-7f9c2a`, `a1b2c3d4e5f6a7b`, `a1b2c3d4e5f6_h`), not by a
/// prefix.
#[derive(Clone, Debug)]
pub struct InterfacePatterns {
    globs: Vec<glob::Pattern>,
    defaults: bool,
}

impl InterfacePatterns {
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<InterfacePatterns, AttachError> {
        // An empty pattern (`--interfaces ''`) stands for the defaults.
        let patterns: Vec<&str> = patterns
            .iter()
            .map(AsRef::as_ref)
            .filter(|p| !p.is_empty())
            .collect();
        let defaults = patterns.is_empty();
        let list = if defaults {
            DEFAULT_INTERFACE_PATTERNS
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
        } else {
            patterns.iter().map(|s| s.to_string()).collect()
        };
        list.into_iter()
            .map(|p| {
                glob::Pattern::new(&p).map_err(|source| AttachError::Pattern { pattern: p, source })
            })
            .collect::<Result<_, _>>()
            .map(|globs| InterfacePatterns { globs, defaults })
    }

    pub fn matches(&self, name: &str) -> bool {
        self.globs.iter().any(|p| p.matches(name))
    }

    /// A pod's host interface: its kind (`veth`, `netkit`, ...; empty when
    /// unknown) is not a bridge or overlay device, and its name matches or
    /// (with the default patterns) it is a veth port of Open vSwitch.
    pub fn matches_link(&self, name: &str, kind: &str, port_kind: &str) -> bool {
        !NOT_POD_KINDS.contains(&kind)
            && (self.matches(name)
                || (self.defaults && kind == "veth" && port_kind == "openvswitch"))
    }
}

/// Stream link changes into `tx`: first every existing link, then every
/// change the kernel announces. Runs until `tx` is closed.
pub async fn watch_links(tx: mpsc::Sender<LinkChange>) -> Result<(), AttachError> {
    let (mut conn, handle, mut messages) = rtnetlink::new_connection()?;
    // Subscribe before the dump so nothing created in between is missed.
    let groups = rtnetlink::constants::RTMGRP_LINK;
    {
        use netlink_sys::AsyncSocket;
        let socket = conn.socket_mut().socket_mut();
        socket.bind(&netlink_sys::SocketAddr::new(0, groups))?;
        let _ = socket.set_rx_buf_sz(4 << 20);
    }
    tokio::spawn(conn);

    let dump = |handle: rtnetlink::Handle, tx: mpsc::Sender<LinkChange>| async move {
        let mut links = handle.link().get().execute();
        while let Some(msg) = links.try_next().await? {
            if let Some(change) = present(&msg)
                && tx.send(change).await.is_err()
            {
                break;
            }
        }
        Ok::<(), AttachError>(())
    };
    dump(handle.clone(), tx.clone()).await?;

    while let Some((message, _)) = messages.next().await {
        let change = match message.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) => present(&m),
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(m)) => {
                Some(LinkChange::Gone {
                    index: m.header.index,
                })
            }
            NetlinkPayload::Overrun(_) => {
                // The kernel dropped notifications: resynchronise by dumping again.
                warn!("netlink link notifications overran; re-reading all links");
                dump(handle.clone(), tx.clone()).await?;
                None
            }
            _ => None,
        };
        if let Some(change) = change
            && tx.send(change).await.is_err()
        {
            break;
        }
    }
    Ok(())
}

fn present(msg: &LinkMessage) -> Option<LinkChange> {
    let peer_netns = msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkNetNsId(id) => Some(*id),
        _ => None,
    });
    let info = |pick: fn(&LinkInfo) -> Option<String>| {
        msg.attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::LinkInfo(infos) => infos.iter().find_map(pick),
                _ => None,
            })
            .unwrap_or_default()
    };
    let kind = info(|i| match i {
        LinkInfo::Kind(k) => Some(k.to_string()),
        _ => None,
    });
    // IFLA_INFO_SLAVE_KIND: the kind of the device this one is a port of.
    let port_kind = info(|i| match i {
        LinkInfo::PortKind(k) => Some(k.to_string()),
        _ => None,
    });
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(LinkChange::Present {
            index: msg.header.index,
            name: name.clone(),
            kind: kind.clone(),
            port_kind: port_kind.clone(),
            peer_netns,
        }),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_patterns_match_cni_interface_names() {
        let p = InterfacePatterns::new::<&str>(&[]).unwrap();
        for name in [
            "cali1a2b3c4d5e6",
            "lxc12ab",
            "veth9f8e7d6",
            "cni0",
            "eni3f2a",
        ] {
            assert!(p.matches(name), "{name}");
        }
        for name in ["eth0", "lo", "docker0", "flannel.1", "tunl0"] {
            assert!(!p.matches(name), "{name}");
        }
    }

    #[test]
    fn bridges_and_overlays_are_not_pod_interfaces_whatever_their_name() {
        let p = InterfacePatterns::new::<&str>(&[]).unwrap();
        // flannel: the bridge cni0 is not hooked, its ports (the pods'
        // veths) are.
        assert!(!p.matches_link("cni0", "bridge", ""));
        assert!(p.matches_link("veth1a2b3c4d", "veth", ""));
        // A CNI whose ports are named cni*: still hooked.
        assert!(p.matches_link("cni1a2b3c", "veth", ""));
        for (name, kind) in [
            ("flannel.1", "vxlan"),
            ("cni-vxlan", "vxlan"),
            ("veth-tun", "geneve"),
            ("cali-tunl", "ipip"),
            ("lxc-ovs", "openvswitch"),
        ] {
            assert!(!p.matches_link(name, kind, ""), "{name} ({kind})");
        }
        // Kinds the kernel does not name (physical NICs) go by name alone.
        assert!(p.matches_link("eni3f2a", "", ""));
        assert!(!p.matches_link("eth0", "", ""));
        // Cilium and Calico pod interfaces.
        assert!(p.matches_link("lxc12ab", "veth", ""));
        assert!(p.matches_link("cali1a2b3c4d5e6", "veth", ""));
        assert!(p.matches_link("lxc12ab", "netkit", ""));
        // flannel's ports say they are a bridge's: still hooked by name.
        assert!(p.matches_link("veth1a2b3c4d", "veth", "bridge"));
    }

    #[test]
    fn open_vswitch_pod_ports_are_pod_interfaces_whatever_their_name() {
        let p = InterfacePatterns::new::<&str>(&[]).unwrap();
        // Antrea, OVN-Kubernetes and Kube-OVN names of pods' host veths.
        for name in ["web-7f9c2a", "a1b2c3d4e5f6a7b", "a1b2c3d4e5f6_h"] {
            assert!(p.matches_link(name, "veth", "openvswitch"), "{name}");
            // The same name off the switch is nobody's pod interface.
            assert!(!p.matches_link(name, "veth", ""), "{name}");
        }
        // The switch's own devices: the datapath, bridge, gateway and
        // management ports are kind openvswitch, tunnels their own kinds.
        for (name, kind) in [
            ("ovs-system", "openvswitch"),
            ("br-int", "openvswitch"),
            ("antrea-gw0", "openvswitch"),
            ("ovn-k8s-mp0", "openvswitch"),
            ("genev_sys_6081", "geneve"),
        ] {
            assert!(!p.matches_link(name, kind, "openvswitch"), "{name}");
        }
        // Patterns given by hand are taken as they are.
        let only = InterfacePatterns::new(&["cali*".to_string()]).unwrap();
        assert!(!only.matches_link("web-7f9c2a", "veth", "openvswitch"));
    }

    #[test]
    fn bad_pattern_is_named() {
        let e = InterfacePatterns::new(&["cali[".to_string()]).unwrap_err();
        assert!(e.to_string().contains("\"cali[\""), "{e}");
    }
}
