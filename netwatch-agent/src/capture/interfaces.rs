//! Pod interfaces: found from netlink link events (not polling) and matched
//! by name pattern; [`super::hooks::tc`] attaches the classifiers to them.

use futures::{StreamExt, TryStreamExt};
use netlink_packet_core::NetlinkPayload;
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage},
};
use tokio::sync::mpsc;
use tracing::warn;

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
