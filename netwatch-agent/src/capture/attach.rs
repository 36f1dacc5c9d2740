//! Pod interfaces: found from netlink link events (not polling), matched by
//! name pattern, and given the two TC classifiers as they appear; forgotten
//! as they go.

use std::collections::BTreeMap;

use aya::programs::{TcAttachType, tc::SchedClassifierLinkId};
use futures::{StreamExt, TryStreamExt};
use netlink_packet_core::NetlinkPayload;
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage},
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::load::{KernelCapture, TC_FROM_POD, TC_TO_POD};

/// Interface name patterns of common CNIs' host-side pod interfaces.
pub const DEFAULT_INTERFACE_PATTERNS: &[&str] =
    &["cali*", "lxc*", "veth*", "cni*", "eni*", "gke*", "azv*"];

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
    /// `peer_netns` is the netns id of a veth's other end, when it has one.
    Present {
        index: u32,
        name: String,
        peer_netns: Option<i32>,
    },
    Gone {
        index: u32,
    },
}

/// `--interfaces` globs.
#[derive(Clone, Debug)]
pub struct InterfacePatterns(Vec<glob::Pattern>);

impl InterfacePatterns {
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<InterfacePatterns, AttachError> {
        let list = if patterns.is_empty() {
            DEFAULT_INTERFACE_PATTERNS
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
        } else {
            patterns.iter().map(|s| s.as_ref().to_string()).collect()
        };
        list.into_iter()
            .map(|p| {
                glob::Pattern::new(&p).map_err(|source| AttachError::Pattern { pattern: p, source })
            })
            .collect::<Result<_, _>>()
            .map(InterfacePatterns)
    }

    pub fn matches(&self, name: &str) -> bool {
        self.0.iter().any(|p| p.matches(name))
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
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(LinkChange::Present {
            index: msg.header.index,
            name: name.clone(),
            peer_netns,
        }),
        _ => None,
    })
}

struct Attached {
    name: String,
    from_pod: SchedClassifierLinkId,
    to_pod: SchedClassifierLinkId,
}

/// Which pod interfaces carry the classifiers.
pub struct TcAttacher {
    patterns: InterfacePatterns,
    attached: BTreeMap<u32, Attached>,
}

/// What [`TcAttacher::apply`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttachOutcome {
    Attached { index: u32, name: String },
    Detached { index: u32, name: String },
    Failed { name: String, error: String },
    Unchanged,
}

impl TcAttacher {
    pub fn new(patterns: InterfacePatterns) -> TcAttacher {
        TcAttacher {
            patterns,
            attached: BTreeMap::new(),
        }
    }

    /// Interfaces with classifiers, by index.
    pub fn interfaces(&self) -> impl Iterator<Item = (u32, &str)> {
        self.attached.iter().map(|(i, a)| (*i, a.name.as_str()))
    }

    pub fn name_of(&self, index: u32) -> Option<&str> {
        self.attached.get(&index).map(|a| a.name.as_str())
    }

    pub fn len(&self) -> usize {
        self.attached.len()
    }

    pub fn is_empty(&self) -> bool {
        self.attached.is_empty()
    }

    /// Attach to or detach from the interface a link change is about.
    pub fn apply(&mut self, capture: &mut KernelCapture, change: LinkChange) -> AttachOutcome {
        match change {
            LinkChange::Present { index, name, .. } => {
                if let Some(a) = self.attached.get(&index) {
                    if a.name == name {
                        return AttachOutcome::Unchanged;
                    }
                    // Renamed: detach, then re-attach if the new name matches.
                    let old = self.detach(capture, index);
                    if !self.patterns.matches(&name) {
                        return old;
                    }
                }
                if !self.patterns.matches(&name) {
                    return AttachOutcome::Unchanged;
                }
                match attach_both(capture, &name) {
                    Ok((from_pod, to_pod)) => {
                        info!(interface = %name, index, "attached TC classifiers");
                        self.attached.insert(
                            index,
                            Attached {
                                name: name.clone(),
                                from_pod,
                                to_pod,
                            },
                        );
                        AttachOutcome::Attached { index, name }
                    }
                    Err(error) => {
                        // Typically the interface vanished between the event and
                        // the attach: the pod is already gone.
                        warn!(interface = %name, "could not attach TC classifiers: {error}");
                        AttachOutcome::Failed { name, error }
                    }
                }
            }
            LinkChange::Gone { index } => self.detach(capture, index),
        }
    }

    fn detach(&mut self, capture: &mut KernelCapture, index: u32) -> AttachOutcome {
        let Some(a) = self.attached.remove(&index) else {
            return AttachOutcome::Unchanged;
        };
        // The kernel already dropped the links of a deleted device; detaching
        // then fails harmlessly.
        for (prog, id) in [(TC_FROM_POD, a.from_pod), (TC_TO_POD, a.to_pod)] {
            if let Some(p) = capture.classifier(prog)
                && let Err(e) = p.detach(id)
            {
                debug!(interface = %a.name, "detach {prog}: {e}");
            }
        }
        info!(interface = %a.name, index, "forgot interface");
        AttachOutcome::Detached {
            index,
            name: a.name,
        }
    }
}

fn attach_both(
    capture: &mut KernelCapture,
    name: &str,
) -> Result<(SchedClassifierLinkId, SchedClassifierLinkId), String> {
    // Kernels before 6.6 have no tcx: the classifiers go on a clsact qdisc.
    let tcx = aya::util::KernelVersion::current()
        .map(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
        .unwrap_or(false);
    if !tcx {
        let _ = aya::programs::tc::qdisc_add_clsact(name);
    }
    let from_pod = capture
        .classifier(TC_FROM_POD)
        .ok_or("TC program missing")?
        .attach(name, TcAttachType::Ingress)
        .map_err(|e| format!("ingress: {e}"))?;
    let to_pod = match capture
        .classifier(TC_TO_POD)
        .ok_or("TC program missing")?
        .attach(name, TcAttachType::Egress)
    {
        Ok(id) => id,
        Err(e) => {
            if let Some(p) = capture.classifier(TC_FROM_POD) {
                let _ = p.detach(from_pod);
            }
            return Err(format!("egress: {e}"));
        }
    };
    Ok((from_pod, to_pod))
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
    fn bad_pattern_is_named() {
        let e = InterfacePatterns::new(&["cali[".to_string()]).unwrap_err();
        assert!(e.to_string().contains("\"cali[\""), "{e}");
    }
}
