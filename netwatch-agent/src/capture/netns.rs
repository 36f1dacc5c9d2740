//! Which network namespace sits behind a pod interface.
//!
//! Only needed with `--own-netns-only` (several lab nodes sharing one
//! kernel): an agent then counts drops in its node's namespace and in the
//! namespaces of the pods behind its interfaces. A veth reports its peer's
//! namespace as a netns *id* (`IFLA_LINK_NETNSID`), local to our namespace;
//! the drop program knows namespaces by *inode*. `RTM_GETNSID` asked about
//! an open namespace file answers with its id, so we ask about the
//! namespace files we can see (`/run/netns/*`, `/proc/*/ns/net`) until one
//! has the id we look for.

use std::{
    collections::HashMap, fs::File, os::fd::AsRawFd, os::unix::fs::MetadataExt, path::PathBuf,
};

use futures::StreamExt;
use netlink_packet_core::{NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    nsid::{NsidAttribute, NsidMessage},
};

/// Errors resolving a namespace id.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("netlink: {0}")]
    Netlink(#[from] std::io::Error),
}

/// Resolves netns ids (relative to this agent's namespace) to inodes.
pub struct NetnsResolver {
    handle: rtnetlink::Handle,
    known: HashMap<i32, u32>,
}

impl NetnsResolver {
    pub fn new() -> Result<NetnsResolver, NetnsError> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(NetnsResolver {
            handle,
            known: HashMap::new(),
        })
    }

    /// The inode of the namespace with id `nsid`, if a file of it is visible.
    pub async fn inode_of(&mut self, nsid: i32) -> Option<u32> {
        if let Some(inum) = self.known.get(&nsid) {
            return Some(*inum);
        }
        for (inum, path) in candidates() {
            let Ok(file) = File::open(&path) else {
                continue;
            };
            if let Some(id) = self.id_of(&file).await {
                self.known.insert(id, inum);
                if id == nsid {
                    return Some(inum);
                }
            }
        }
        None
    }

    /// `RTM_GETNSID` for an open namespace file.
    async fn id_of(&mut self, file: &File) -> Option<i32> {
        let mut msg = NsidMessage::default();
        msg.attributes
            .push(NsidAttribute::Fd(file.as_raw_fd() as u32));
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetNsId(msg));
        req.header.flags = NLM_F_REQUEST;
        let mut responses = self.handle.request(req).ok()?;
        while let Some(resp) = responses.next().await {
            if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNsId(m)) = resp.payload {
                return m.attributes.iter().find_map(|a| match a {
                    NsidAttribute::Id(id) if *id >= 0 => Some(*id),
                    _ => None,
                });
            }
        }
        None
    }
}

/// One openable file per distinct network namespace we can see.
fn candidates() -> Vec<(u32, PathBuf)> {
    let mut seen = HashMap::new();
    let mut add = |path: PathBuf| {
        if let Ok(m) = std::fs::metadata(&path) {
            seen.entry(m.ino() as u32).or_insert(path);
        }
    };
    if let Ok(dir) = std::fs::read_dir("/run/netns") {
        for e in dir.flatten() {
            add(e.path());
        }
    }
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            if e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
            {
                add(e.path().join("ns/net"));
            }
        }
    }
    seen.into_iter().collect()
}
