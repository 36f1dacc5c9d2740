//! Where the agent's cluster snapshots come from: the API server, or
//! manifest files reloaded when they change. Both yield the same channel.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use kube::Client;
use tokio::{sync::watch, task::JoinHandle};

use super::kube::{KubeWatchConfig, watch_cluster};
use crate::{
    cluster::{ClusterSnapshot, Lineage},
    manifests::{self, ManifestError},
};

/// How often manifest files are checked for changes.
pub const DEFAULT_MANIFEST_POLL: Duration = Duration::from_secs(1);

/// How deep a manifest directory is searched for changed files.
const MAX_MANIFEST_DEPTH: usize = 8;

/// Errors starting a snapshot source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot load the manifests given with --manifests: {0}")]
    Manifests(#[from] ManifestError),
    #[error("the manifest loader stopped unexpectedly: {0}")]
    Loader(String),
}

/// The snapshot source the agent runs.
pub enum SnapshotSource {
    /// `--manifests PATH...`: the same files `netwatch explain` reads,
    /// checked every `poll` and reloaded when a file (or a directory's list
    /// of files) changes.
    Manifests { paths: Vec<PathBuf>, poll: Duration },
    /// The live cluster through the API server.
    Kube {
        client: Client,
        config: KubeWatchConfig,
    },
}

impl SnapshotSource {
    /// Manifest files and directories, polled every second.
    pub fn manifests(paths: impl IntoIterator<Item = impl Into<PathBuf>>) -> Self {
        SnapshotSource::Manifests {
            paths: paths.into_iter().map(Into::into).collect(),
            poll: DEFAULT_MANIFEST_POLL,
        }
    }

    /// The live cluster.
    pub fn kube(client: Client, config: KubeWatchConfig) -> Self {
        SnapshotSource::Kube { client, config }
    }

    /// Starts the source. Manifests are loaded once before this returns, so
    /// a typo fails the start with the file's name; later reloads that fail
    /// keep the previous snapshot and log why. The API source returns at
    /// once and fills in as the lists arrive.
    pub async fn start(self) -> Result<SnapshotFeed, SourceError> {
        match self {
            SnapshotSource::Manifests { paths, poll } => {
                let stamp = stamp_blocking(paths.clone()).await;
                let mut snapshot = load_blocking(paths.clone()).await?;
                let mut lineage = Lineage::default();
                lineage.follow(&mut snapshot);
                let (snapshot_tx, snapshots) = watch::channel(Arc::new(snapshot));
                let (_ready_tx, ready) = watch::channel(true);
                let source_copy = Some(snapshot_tx.clone());
                let task = tokio::spawn(reload_on_change(paths, poll, stamp, lineage, snapshot_tx));
                Ok(SnapshotFeed {
                    snapshots,
                    ready,
                    api_status: None,
                    tasks: vec![task],
                    source_copy,
                })
            }
            SnapshotSource::Kube { client, config } => {
                let (snapshots, ready, status, tasks) = watch_cluster(client, config).into_parts();
                Ok(SnapshotFeed {
                    snapshots,
                    ready,
                    api_status: Some(status),
                    tasks,
                    source_copy: None,
                })
            }
        }
    }
}

/// A running source: the latest snapshot and readiness. Dropping it stops
/// the source.
#[derive(Debug)]
pub struct SnapshotFeed {
    /// The latest snapshot; `changed().await` wakes on each new one.
    pub snapshots: watch::Receiver<Arc<ClusterSnapshot>>,
    /// `true` once the source has a complete view (manifests: at once; the
    /// API: when every kind has been listed).
    pub ready: watch::Receiver<bool>,
    /// The API source's kinds and whether each is current (`None` for
    /// manifests, which are always current).
    pub api_status: Option<watch::Receiver<super::kube::ApiStatus>>,
    tasks: Vec<JoinHandle<()>>,
    /// The manifests source's handle on the channel's value, to drop it
    /// once applied (the API source needs its copy: it applies watch
    /// events to it).
    source_copy: Option<watch::Sender<Arc<ClusterSnapshot>>>,
}

impl SnapshotFeed {
    /// The consumer has built what it needs from `applied` (the latest
    /// snapshot): a manifests feed stops holding it, so it is freed when the
    /// consumer drops it (one copy of the cluster in memory, the consumer's
    /// own). Silent: receivers are not woken. A newer snapshot, sent since,
    /// is kept.
    pub fn release(&self, applied: &Arc<ClusterSnapshot>) {
        if let Some(tx) = &self.source_copy {
            tx.send_if_modified(|latest| {
                if Arc::ptr_eq(latest, applied) {
                    *latest = Arc::default();
                }
                false
            });
        }
    }
}

impl Drop for SnapshotFeed {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// What the files looked like: every file under the paths with its
/// modification time and size (`None` for a path that is missing).
type Stamp = Vec<(PathBuf, Option<(SystemTime, u64)>)>;

fn stamp(paths: &[PathBuf]) -> Stamp {
    fn visit(path: &Path, depth: usize, out: &mut Stamp) {
        let Ok(meta) = std::fs::metadata(path) else {
            out.push((path.to_owned(), None));
            return;
        };
        if meta.is_dir() {
            let Ok(entries) = std::fs::read_dir(path) else {
                out.push((path.to_owned(), None));
                return;
            };
            if depth < MAX_MANIFEST_DEPTH {
                // Hidden entries (editor swap files, `..data` of mounted
                // ConfigMaps' internals) are skipped, as the loader skips them.
                let visible = entries
                    .flatten()
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'));
                for entry in visible {
                    visit(&entry.path(), depth + 1, out);
                }
            }
        } else {
            let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            out.push((path.to_owned(), Some((modified, meta.len()))));
        }
    }
    let mut out = Vec::new();
    for path in paths {
        visit(path, 0, &mut out);
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

async fn stamp_blocking(paths: Vec<PathBuf>) -> Stamp {
    tokio::task::spawn_blocking(move || stamp(&paths))
        .await
        .unwrap_or_default()
}

async fn load_blocking(paths: Vec<PathBuf>) -> Result<ClusterSnapshot, SourceError> {
    // Stripped as the API source strips: the agent keeps what it reads.
    let load = move || {
        manifests::load(&paths).map(|mut snapshot| {
            super::kube::strip_snapshot(&mut snapshot);
            snapshot
        })
    };
    match tokio::task::spawn_blocking(load).await {
        Ok(result) => Ok(result?),
        // The loader panicked: a bug, but not one to take the agent down.
        Err(join) => Err(SourceError::Loader(join.to_string())),
    }
}

async fn reload_on_change(
    paths: Vec<PathBuf>,
    poll: Duration,
    mut last: Stamp,
    mut lineage: Lineage,
    snapshots: watch::Sender<Arc<ClusterSnapshot>>,
) {
    let mut ticker = tokio::time::interval(poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        ticker.tick().await;
        if snapshots.is_closed() {
            return;
        }
        // Stamp before loading, so an edit during the load is seen next time.
        let now = stamp_blocking(paths.clone()).await;
        if now == last {
            continue;
        }
        last = now;
        match load_blocking(paths.clone()).await {
            Ok(mut snapshot) => {
                // As changes of the previous load: consumers apply what
                // differs instead of rebuilding.
                lineage.follow(&mut snapshot);
                tracing::info!(
                    pods = snapshot.pods.len(),
                    policies = snapshot.network_policies.len(),
                    "manifests changed: reloaded"
                );
                snapshots.send_replace(Arc::new(snapshot));
            }
            Err(error) => tracing::warn!(
                error = %error,
                "manifests changed but do not load; keeping the previous snapshot until they are fixed"
            ),
        }
    }
}
