//! The manifests snapshot source: loads at start, reloads when files change,
//! keeps the last good snapshot when an edit does not load.

use std::{
    fs,
    net::IpAddr,
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use netwatch::{
    cluster::ClusterSnapshot,
    identity::{IdentityCache, IdentityConfig, IpResolution, SnapshotSource},
};
use tokio::sync::watch;

fn pods_yaml(names: &[(&str, &str)]) -> String {
    names
        .iter()
        .map(|(name, ip)| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: prod\n  labels:\n    app: {name}\n\
                 spec:\n  containers:\n  - name: app\n    image: busybox\nstatus:\n  phase: Running\n  podIP: {ip}\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

fn write(path: &Path, text: &str) {
    // Write then rename, as editors and `kubectl ... > file` races aside,
    // so the poller never sees half a file.
    let tmp = path.with_extension("tmp~");
    fs::write(&tmp, text).unwrap();
    fs::rename(&tmp, path).unwrap();
}

fn pod_names(snapshot: &ClusterSnapshot) -> Vec<String> {
    let mut names: Vec<String> = snapshot
        .pods
        .iter()
        .filter_map(|p| p.name().map(str::to_owned))
        .collect();
    names.sort();
    names
}

async fn wait_for_pods(
    snapshots: &mut watch::Receiver<Arc<ClusterSnapshot>>,
    expected: &[&str],
) -> Arc<ClusterSnapshot> {
    let found = {
        let wait = snapshots.wait_for(|s| pod_names(s) == expected);
        tokio::time::timeout(Duration::from_secs(20), wait)
            .await
            .ok()
            .map(|r| Arc::clone(&r.expect("source stopped")))
    };
    found.unwrap_or_else(|| {
        panic!(
            "no snapshot with pods {expected:?}; last {:?}",
            pod_names(&snapshots.borrow())
        )
    })
}

fn source(paths: Vec<std::path::PathBuf>) -> SnapshotSource {
    SnapshotSource::Manifests {
        paths,
        poll: Duration::from_millis(50),
    }
}

#[tokio::test]
async fn manifests_reload_on_change_and_keep_the_last_good_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let pods = dir.path().join("pods.yaml");
    write(&pods, &pods_yaml(&[("web", "10.0.0.1")]));

    let feed = source(vec![dir.path().to_owned()]).start().await.unwrap();
    assert!(*feed.ready.borrow(), "manifests are complete at once");
    let mut snapshots = feed.snapshots.clone();
    assert_eq!(pod_names(&snapshots.borrow_and_update()), ["web"]);

    // An edit is picked up.
    write(
        &pods,
        &pods_yaml(&[("web", "10.0.0.1"), ("api", "10.0.0.2")]),
    );
    wait_for_pods(&mut snapshots, &["api", "web"]).await;

    // A broken edit keeps the previous snapshot...
    write(&pods, "apiVersion: v1\nkind: Pod\nmetadata: [not, a, map\n");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !snapshots.has_changed().unwrap(),
        "a failed reload must not publish"
    );
    assert_eq!(pod_names(&snapshots.borrow()), ["api", "web"]);

    // ...until it is fixed; a new file in the directory counts too.
    write(&pods, &pods_yaml(&[("web", "10.0.0.1")]));
    write(
        &dir.path().join("more.yaml"),
        &pods_yaml(&[("db", "10.0.0.3")]),
    );
    let latest = wait_for_pods(&mut snapshots, &["db", "web"]).await;

    // The lab's way in: the snapshot resolves.
    let mut cache = IdentityCache::new(IdentityConfig::default());
    cache.update(&latest, SystemTime::now());
    let ip: IpAddr = "10.0.0.3".parse().unwrap();
    assert!(
        matches!(cache.resolve_ip(ip, SystemTime::now()), IpResolution::Pod(p) if p.name == "db")
    );
}

#[tokio::test]
async fn broken_manifests_fail_the_start_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    fs::write(&bad, "kind: Pod\nmetadata: [oops\n").unwrap();
    let err = source(vec![bad.clone()])
        .start()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("bad.yaml"), "{err}");

    let missing = dir.path().join("missing.yaml");
    let err = source(vec![missing]).start().await.unwrap_err().to_string();
    assert!(err.contains("missing.yaml"), "{err}");
}
