//! cgroup v2 id -> pod UID and container, by the cgroup's path.
//!
//! The kernel hands eBPF programs a cgroup id (`bpf_get_current_cgroup_id`,
//! `bpf_skb_cgroup_id`); on cgroup v2 that id is the inode number of the
//! cgroup's directory. The kubelet and the container runtime name those
//! directories after the pod UID and the container ID, so the path alone
//! tells whose socket it is. The layouts:
//!
//! - systemd driver: `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid, '-' as '_'>.slice/<scope>`
//!   (Guaranteed pods skip the QoS level: `kubepods.slice/kubepods-pod<uid>.slice/...`);
//!   the container scope is `cri-containerd-<id>.scope` (containerd),
//!   `crio-<id>.scope` (CRI-O; `crio-conmon-<id>.scope` for its monitor) or
//!   `docker-<id>.scope` (cri-dockerd).
//! - cgroupfs driver: `kubepods/<qos>/pod<uid>/<id>`, `kubepods/pod<uid>/<id>`;
//!   CRI-O names the container `crio-<id>` there too.
//! - anything before the kubepods root is ignored: kind and other nested
//!   kubelets run under `kubelet.slice/kubelet-kubepods.slice/...`, labs under
//!   a directory of their own.
//!
//! Directories below the container's (e.g. `crio-<id>.scope/container`) belong
//! to that container.

use std::{
    collections::HashMap,
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

/// Where cgroup v2 is mounted on a normal node.
pub const DEFAULT_CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// How deep the scan descends below the root: far deeper than any kubelet
/// layout, shallow enough that a pathological tree cannot stall the agent.
const MAX_SCAN_DEPTH: usize = 24;

/// Errors of the cgroup index.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "cannot read the cgroup v2 root {path}: {source} (netwatch needs cgroup v2 mounted there; \
         pass the mount point with --cgroup-root, e.g. /sys/fs/cgroup or /host/sys/fs/cgroup)"
    )]
    Root { path: PathBuf, source: io::Error },
}

/// The container runtime that named a cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerRuntime {
    Containerd,
    Crio,
    Docker,
    /// A bare container ID under the cgroupfs driver: containerd and Docker
    /// both name it so, and the path does not say which.
    Unknown,
}

/// The kubelet's cgroup driver, as read from the path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupDriver {
    Systemd,
    Cgroupfs,
}

/// The pod QoS class, the level the kubelet puts between kubepods and the pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// What a pod cgroup path says: the pod, and the container when the cgroup is
/// a container's (a pod-level cgroup has none).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodCgroup {
    /// The pod's `metadata.uid`, with dashes (`0b2d4c0e-1a2b-...`).
    pub pod_uid: String,
    /// The runtime's container ID, as in `status.containerStatuses[].containerID`
    /// after the `<runtime>://` prefix.
    pub container_id: Option<String>,
    pub runtime: Option<ContainerRuntime>,
    pub driver: CgroupDriver,
    pub qos: QosClass,
    /// CRI-O's `crio-conmon-<id>` cgroup: the monitor process of container
    /// `<id>`, not the container itself.
    pub conmon: bool,
}

/// Parses a cgroup path (absolute, relative to the cgroup root, or with any
/// prefix) into the pod and container it belongs to; `None` when it is not a
/// pod's cgroup.
pub fn parse_pod_cgroup(path: &str) -> Option<PodCgroup> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    // The kubepods root is the first segment the kubelet created: `kubepods`
    // (cgroupfs) or `kubepods.slice` / `<prefix>-kubepods.slice` (systemd).
    let root = segments.iter().position(|s| {
        *s == "kubepods" || *s == "kubepods.slice" || s.ends_with("-kubepods.slice")
    })?;
    let driver = if segments[root] == "kubepods" {
        CgroupDriver::Cgroupfs
    } else {
        CgroupDriver::Systemd
    };
    let mut qos = QosClass::Guaranteed;
    let mut rest = segments[root + 1..].iter();
    let pod_uid = loop {
        let segment = rest.next()?;
        match driver {
            CgroupDriver::Cgroupfs => match *segment {
                "burstable" => qos = QosClass::Burstable,
                "besteffort" => qos = QosClass::BestEffort,
                _ => break parse_uid(segment.strip_prefix("pod")?, '-')?,
            },
            CgroupDriver::Systemd => {
                let unit = segment.strip_suffix(".slice")?;
                // `...kubepods-burstable-pod<uid>` or `...kubepods-pod<uid>`;
                // the QoS slices have no `-pod`.
                match unit.rfind("-pod") {
                    Some(at) => {
                        let parent = &unit[..at];
                        if parent.ends_with("-burstable") {
                            qos = QosClass::Burstable;
                        } else if parent.ends_with("-besteffort") {
                            qos = QosClass::BestEffort;
                        }
                        break parse_uid(&unit[at + 4..], '_')?;
                    }
                    None if unit.ends_with("-burstable") => qos = QosClass::Burstable,
                    None if unit.ends_with("-besteffort") => qos = QosClass::BestEffort,
                    None => return None,
                }
            }
        }
    };
    let mut cgroup = PodCgroup {
        pod_uid,
        container_id: None,
        runtime: None,
        driver,
        qos,
        conmon: false,
    };
    if let Some(segment) = rest.next() {
        let (runtime, id, conmon) = parse_container(segment, driver)?;
        cgroup.container_id = Some(id.to_owned());
        cgroup.runtime = Some(runtime);
        cgroup.conmon = conmon;
    }
    Some(cgroup)
}

/// A pod UID as the kubelet writes it in a cgroup name (`sep` is `_` under
/// systemd, which reserves `-`), returned in the API's dashed form.
fn parse_uid(raw: &str, sep: char) -> Option<String> {
    let groups: Vec<&str> = raw.split(sep).collect();
    let well_formed = groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| g.len() == len && g.bytes().all(|b| b.is_ascii_hexdigit()));
    well_formed.then(|| groups.join("-"))
}

fn parse_container(segment: &str, driver: CgroupDriver) -> Option<(ContainerRuntime, &str, bool)> {
    let name = match driver {
        CgroupDriver::Systemd => segment.strip_suffix(".scope")?,
        CgroupDriver::Cgroupfs => segment,
    };
    let (runtime, id, conmon) = if let Some(id) = name.strip_prefix("cri-containerd-") {
        (ContainerRuntime::Containerd, id, false)
    } else if let Some(id) = name.strip_prefix("crio-conmon-") {
        (ContainerRuntime::Crio, id, true)
    } else if let Some(id) = name.strip_prefix("crio-") {
        (ContainerRuntime::Crio, id, false)
    } else if let Some(id) = name.strip_prefix("docker-") {
        (ContainerRuntime::Docker, id, false)
    } else if driver == CgroupDriver::Cgroupfs {
        (ContainerRuntime::Unknown, name, false)
    } else {
        return None;
    };
    // Runtimes use 64 hex digits; accept shorter IDs (tests, other runtimes)
    // but nothing that is not hex, so stray directories are not taken for
    // containers.
    let is_id = id.len() >= 12 && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit());
    is_id.then_some((runtime, id, conmon))
}

/// Counts from one scan of the cgroup tree.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanStats {
    /// Directories visited.
    pub directories: usize,
    /// Pod and container cgroups indexed.
    pub pod_cgroups: usize,
    /// Directories that vanished or could not be read during the scan
    /// (cgroups come and go while we walk).
    pub unreadable: usize,
}

/// An index of the node's pod cgroups by cgroup id, rebuilt by scanning the
/// cgroup v2 tree.
///
/// Drive it with [`CgroupIndex::scan`] at start and periodically, and look
/// ids up with [`CgroupIndex::resolve`], which rescans on a miss (a cgroup
/// created since the last scan) at most once per rescan interval, so ids that
/// are not pods' (system services) cannot make it walk the tree per lookup.
#[derive(Debug)]
pub struct CgroupIndex {
    root: PathBuf,
    by_id: HashMap<u64, PodCgroup>,
    min_rescan_interval: Duration,
    last_scan: Option<Instant>,
}

impl CgroupIndex {
    /// An empty index over the cgroup v2 tree mounted at `root`; call
    /// [`scan`](Self::scan) to fill it.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        CgroupIndex {
            root: root.into(),
            by_id: HashMap::new(),
            min_rescan_interval: Duration::from_secs(1),
            last_scan: None,
        }
    }

    /// The shortest time between two rescans triggered by lookup misses
    /// (default 1 s).
    pub fn with_min_rescan_interval(mut self, interval: Duration) -> Self {
        self.min_rescan_interval = interval;
        self
    }

    /// The cgroup root this index scans.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Walks the tree and replaces the index with what is there now.
    ///
    /// Fails only when the root itself cannot be read; directories that
    /// vanish mid-walk are counted in [`ScanStats::unreadable`].
    pub fn scan(&mut self) -> Result<ScanStats, CgroupError> {
        let mut stats = ScanStats::default();
        let mut by_id = HashMap::with_capacity(self.by_id.len());
        let root_entries = fs::read_dir(&self.root).map_err(|source| CgroupError::Root {
            path: self.root.clone(),
            source,
        })?;
        let mut pending: Vec<(PathBuf, usize)> = Vec::new();
        let push_children = |entries: fs::ReadDir,
                             depth: usize,
                             stats: &mut ScanStats,
                             pending: &mut Vec<(PathBuf, usize)>| {
            for entry in entries {
                match entry {
                    Ok(entry) if entry.file_type().is_ok_and(|t| t.is_dir()) => {
                        pending.push((entry.path(), depth));
                    }
                    Ok(_) => {}
                    Err(_) => stats.unreadable += 1,
                }
            }
        };
        push_children(root_entries, 1, &mut stats, &mut pending);
        while let Some((dir, depth)) = pending.pop() {
            stats.directories += 1;
            let Ok(meta) = fs::symlink_metadata(&dir) else {
                stats.unreadable += 1;
                continue;
            };
            let relative = dir.strip_prefix(&self.root).unwrap_or(&dir);
            if let Some(cgroup) = relative.to_str().and_then(parse_pod_cgroup) {
                by_id.insert(meta.ino(), cgroup);
                stats.pod_cgroups += 1;
            }
            if depth >= MAX_SCAN_DEPTH {
                continue;
            }
            match fs::read_dir(&dir) {
                Ok(entries) => push_children(entries, depth + 1, &mut stats, &mut pending),
                Err(_) => stats.unreadable += 1,
            }
        }
        self.by_id = by_id;
        self.last_scan = Some(Instant::now());
        Ok(stats)
    }

    /// The pod cgroup with this id, as of the last scan.
    pub fn get(&self, cgroup_id: u64) -> Option<&PodCgroup> {
        self.by_id.get(&cgroup_id)
    }

    /// The pod cgroup with this id; on a miss, rescans first if the last scan
    /// is older than the rescan interval. A rescan that fails (root gone)
    /// keeps the previous index and returns the error.
    pub fn resolve(&mut self, cgroup_id: u64) -> Result<Option<&PodCgroup>, CgroupError> {
        if !self.by_id.contains_key(&cgroup_id) {
            let due = self
                .last_scan
                .is_none_or(|at| at.elapsed() >= self.min_rescan_interval);
            if due {
                self.scan()?;
            }
        }
        Ok(self.by_id.get(&cgroup_id))
    }

    /// Number of pod and container cgroups indexed.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no pod cgroup is indexed.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0b2d4c0e-1a2b-4c3d-9e8f-0123456789ab";
    const UID_SYSTEMD: &str = "0b2d4c0e_1a2b_4c3d_9e8f_0123456789ab";
    const CID: &str = "4f797c539e6c745de61a93ca3ff892358ecbcaccd8414d5db545c38428142970";

    fn expect(
        path: &str,
        driver: CgroupDriver,
        qos: QosClass,
        runtime: Option<ContainerRuntime>,
        conmon: bool,
    ) {
        let parsed = parse_pod_cgroup(path).unwrap_or_else(|| panic!("{path} did not parse"));
        assert_eq!(
            parsed,
            PodCgroup {
                pod_uid: UID.into(),
                container_id: runtime.map(|_| CID.to_owned()),
                runtime,
                driver,
                qos,
                conmon,
            },
            "{path}"
        );
    }

    #[test]
    fn systemd_driver_layouts_of_each_runtime() {
        use CgroupDriver::Systemd;
        use ContainerRuntime::*;
        // containerd, Burstable (kubeadm on Ubuntu 22.04+, cgroup v2)
        expect(
            &format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice/cri-containerd-{CID}.scope"
            ),
            Systemd,
            QosClass::Burstable,
            Some(Containerd),
            false,
        );
        // CRI-O, BestEffort (OpenShift / Fedora CoreOS)
        expect(
            &format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_SYSTEMD}.slice/crio-{CID}.scope"
            ),
            Systemd,
            QosClass::BestEffort,
            Some(Crio),
            false,
        );
        // CRI-O's conmon next to the container
        expect(
            &format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_SYSTEMD}.slice/crio-conmon-{CID}.scope"
            ),
            Systemd,
            QosClass::BestEffort,
            Some(Crio),
            true,
        );
        // crun's nested `container` cgroup inside CRI-O's scope
        expect(
            &format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice/crio-{CID}.scope/container"
            ),
            Systemd,
            QosClass::Burstable,
            Some(Crio),
            false,
        );
        // cri-dockerd, Guaranteed (no QoS slice)
        expect(
            &format!("/kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice/docker-{CID}.scope"),
            Systemd,
            QosClass::Guaranteed,
            Some(Docker),
            false,
        );
        // kind: the kubelet's cgroup root is /kubelet, so every unit is prefixed
        expect(
            &format!(
                "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_SYSTEMD}.slice/cri-containerd-{CID}.scope"
            ),
            Systemd,
            QosClass::BestEffort,
            Some(Containerd),
            false,
        );
        // a lab root below the mount point
        expect(
            &format!(
                "/sys/fs/cgroup/unified/netwatch-lab-1234/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice/cri-containerd-{CID}.scope"
            ),
            Systemd,
            QosClass::Burstable,
            Some(Containerd),
            false,
        );
        // the pod-level slice itself
        expect(
            &format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice"
            ),
            Systemd,
            QosClass::Burstable,
            None,
            false,
        );
    }

    #[test]
    fn cgroupfs_driver_layouts_of_each_runtime() {
        use CgroupDriver::Cgroupfs;
        use ContainerRuntime::*;
        // containerd or Docker with cgroupfs (k3s, older kubeadm): bare ID
        expect(
            &format!("/kubepods/burstable/pod{UID}/{CID}"),
            Cgroupfs,
            QosClass::Burstable,
            Some(Unknown),
            false,
        );
        expect(
            &format!("/kubepods/besteffort/pod{UID}/{CID}"),
            Cgroupfs,
            QosClass::BestEffort,
            Some(Unknown),
            false,
        );
        // Guaranteed: no QoS level
        expect(
            &format!("/kubepods/pod{UID}/{CID}"),
            Cgroupfs,
            QosClass::Guaranteed,
            Some(Unknown),
            false,
        );
        // CRI-O with cgroupfs
        expect(
            &format!("/kubepods/burstable/pod{UID}/crio-{CID}"),
            Cgroupfs,
            QosClass::Burstable,
            Some(Crio),
            false,
        );
        expect(
            &format!("/kubepods/burstable/pod{UID}/crio-conmon-{CID}"),
            Cgroupfs,
            QosClass::Burstable,
            Some(Crio),
            true,
        );
        // k3s inside Docker (k3d): a prefix before kubepods
        expect(
            &format!("/docker/{CID}/kubepods/besteffort/pod{UID}/{CID}"),
            Cgroupfs,
            QosClass::BestEffort,
            Some(Unknown),
            false,
        );
        expect(
            &format!("/kubepods/pod{UID}"),
            Cgroupfs,
            QosClass::Guaranteed,
            None,
            false,
        );
    }

    #[test]
    fn non_pod_cgroups_are_rejected() {
        for path in [
            "/",
            "/system.slice/containerd.service",
            &format!("/system.slice/docker-{CID}.scope"),
            "/user.slice/user-1000.slice/session-3.scope",
            "/kubepods.slice",
            "/kubepods.slice/kubepods-burstable.slice",
            "/kubepods/burstable",
            // malformed UIDs
            "/kubepods.slice/kubepods-podnot_a_uid.slice",
            &format!("/kubepods/pod{UID_SYSTEMD}/{CID}"),
            &format!("/kubepods.slice/kubepods-pod{UID}.slice"),
            // a stray directory where the container should be
            &format!("/kubepods/burstable/pod{UID}/not-a-container"),
            &format!("/kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice/init.scope"),
        ] {
            assert_eq!(parse_pod_cgroup(path), None, "{path}");
        }
    }

    #[test]
    fn index_maps_real_inodes_and_rescans_on_miss() {
        let root = tempfile::tempdir().unwrap();
        let pod = root
            .path()
            .join("kubepods.slice/kubepods-burstable.slice")
            .join(format!("kubepods-burstable-pod{UID_SYSTEMD}.slice"));
        let container = pod.join(format!("cri-containerd-{CID}.scope"));
        fs::create_dir_all(&container).unwrap();
        fs::create_dir_all(root.path().join("system.slice/containerd.service")).unwrap();

        let mut index = CgroupIndex::new(root.path()).with_min_rescan_interval(Duration::ZERO);
        let stats = index.scan().unwrap();
        assert_eq!(stats.pod_cgroups, 2);
        let container_id = fs::metadata(&container).unwrap().ino();
        let found = index.get(container_id).unwrap();
        assert_eq!(found.pod_uid, UID);
        assert_eq!(found.container_id.as_deref(), Some(CID));
        let pod_id = fs::metadata(&pod).unwrap().ino();
        assert_eq!(index.get(pod_id).unwrap().container_id, None);
        let service_id = fs::metadata(root.path().join("system.slice/containerd.service"))
            .unwrap()
            .ino();
        assert_eq!(index.get(service_id), None);

        // A container started after the scan is found by the rescan a miss triggers.
        let other = "a".repeat(64);
        let late = pod.join(format!("cri-containerd-{other}.scope"));
        fs::create_dir(&late).unwrap();
        let late_id = fs::metadata(&late).unwrap().ino();
        assert_eq!(index.get(late_id), None);
        let resolved = index.resolve(late_id).unwrap().unwrap();
        assert_eq!(resolved.container_id.as_deref(), Some(other.as_str()));

        // A removed cgroup is gone after the next scan.
        fs::remove_dir(&late).unwrap();
        index.scan().unwrap();
        assert_eq!(index.get(late_id), None);
        assert_eq!(index.len(), 2);
    }

    #[test]
    fn misses_do_not_rescan_within_the_interval() {
        let root = tempfile::tempdir().unwrap();
        let mut index =
            CgroupIndex::new(root.path()).with_min_rescan_interval(Duration::from_secs(3600));
        index.scan().unwrap();
        let pod = root.path().join(format!("kubepods/pod{UID}/{CID}"));
        fs::create_dir_all(&pod).unwrap();
        let id = fs::metadata(&pod).unwrap().ino();
        // Rate-limited: the new cgroup is not seen until an explicit scan.
        assert_eq!(index.resolve(id).unwrap(), None);
        index.scan().unwrap();
        assert_eq!(index.get(id).map(|c| c.pod_uid.as_str()), Some(UID));
    }

    #[test]
    fn missing_root_is_a_clear_error() {
        let mut index = CgroupIndex::new("/nonexistent/netwatch-cgroup-root");
        let err = index.scan().unwrap_err().to_string();
        assert!(err.contains("/nonexistent/netwatch-cgroup-root"), "{err}");
        assert!(err.contains("--cgroup-root"), "{err}");
    }
}
