//! The lab removes its namespaces, veths and cgroups: on drop, on panic, on
//! Ctrl-C, and (swept by the next lab) after being killed.

mod support;

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use netwatch_lab::{Outcome, Probe, sweep_stale};
use support::{helper, lab};

const LAB: &str = r#"
nodes:
  - name: node-1
    nftables: |
      table inet t {
        chain f { type filter hook forward priority 0; }
      }
pods:
  - { name: a, namespace: x, node: node-1, ip: 10.244.7.2, ipv6: "fd00:7::2", listen: ["80/tcp", "53/udp", "81/udp"] }
  - { name: b, namespace: x, node: node-1, ip: 10.244.7.3, ipv6: "fd00:7::3" }
"#;

fn netns_list() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn footprint(id: &str) -> (Vec<String>, Vec<PathBuf>) {
    let ns = netns_list()
        .into_iter()
        .filter(|n| n.contains(&format!("nwl-{id}-")))
        .collect();
    let cg = netwatch_lab::cgroup2_mount()
        .and_then(|m| std::fs::read_dir(m).ok())
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().contains(&format!("netwatch-lab-{id}-")))
                .collect()
        })
        .unwrap_or_default();
    (ns, cg)
}

#[test]
fn pods_reach_each_other_over_v4_and_v6_and_everything_goes_on_drop() {
    let lab = lab(LAB);
    let id = lab.id.clone();
    let (ns, cg) = footprint(&id);
    assert_eq!(ns.len(), 4, "world, node and two pods: {ns:?}");
    assert_eq!(cg.len(), 1, "one node cgroup root: {cg:?}");
    let a = lab.pod("x/a").unwrap();
    assert!(a.host_if.starts_with("cali") && a.host_if.len() == 15);
    assert!(
        a.cgroup
            .to_string_lossy()
            .contains("kubepods-besteffort-pod")
    );
    for (to, probe) in [
        (
            "tcp v4",
            Probe::tcp("10.244.7.2:80".parse().unwrap(), Duration::from_secs(2)),
        ),
        (
            "tcp v6",
            Probe::tcp("[fd00:7::2]:80".parse().unwrap(), Duration::from_secs(2)),
        ),
    ] {
        assert_eq!(
            lab.probe("x/b", &probe).unwrap().outcome,
            Outcome::Connected,
            "{to}"
        );
    }
    assert_eq!(
        lab.probe(
            "x/b",
            &Probe::dns("10.244.7.2:53".parse().unwrap(), Duration::from_secs(2))
        )
        .unwrap()
        .outcome,
        Outcome::Answered
    );
    assert_eq!(
        lab.probe(
            "x/b",
            &Probe::udp("10.244.7.2:81".parse().unwrap(), Duration::from_secs(2))
        )
        .unwrap()
        .outcome,
        Outcome::Answered
    );
    assert_eq!(
        lab.probe(
            "x/b",
            &Probe::tcp("10.244.7.2:82".parse().unwrap(), Duration::from_secs(2))
        )
        .unwrap()
        .outcome,
        Outcome::Refused
    );
    drop(lab);
    assert_eq!(footprint(&id), (vec![], vec![]));
}

#[test]
fn a_panicking_test_leaves_nothing() {
    let mut id = String::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let lab = lab(LAB);
        id = lab.id.clone();
        panic!("test failure while the lab is up");
    }));
    assert!(result.is_err());
    assert_eq!(footprint(&id), (vec![], vec![]));
}

#[test]
fn a_bad_scenario_is_refused_and_leaves_nothing() {
    let spec: netwatch_lab::LabSpec = serde_yaml::from_str(
        "nodes: [ { name: n } ]\npods: [ { name: a, node: n, ip: 10.244.8.2, listen: [\"http/tcp\"] } ]",
    )
    .unwrap();
    let e = netwatch_lab::Lab::up(&spec, &helper())
        .err()
        .expect("bad listen spec");
    assert!(
        e.to_string().contains("default/a") && e.to_string().contains("http/tcp"),
        "{e}"
    );
    let me = format!("nwl-{}-", std::process::id());
    let left: Vec<String> = netns_list()
        .into_iter()
        .filter(|n| n.starts_with(&me) && n.ends_with("-default-a"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

fn spawn_lab_cli(dir: &tempfile::TempDir) -> std::process::Child {
    let file = dir.path().join("s.yaml");
    std::fs::write(&file, LAB).unwrap();
    Command::new(helper())
        .args(["up", file.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_up(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while footprint(&format!("{pid}-0")).0.len() < 4 {
        assert!(Instant::now() < deadline, "lab did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn ctrl_c_tears_down_the_lab_command() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_lab_cli(&dir);
    wait_up(child.id());
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert!(child.wait().unwrap().success());
    assert_eq!(footprint(&format!("{}-0", child.id())), (vec![], vec![]));
}

#[test]
fn a_killed_lab_is_swept_by_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_lab_cli(&dir);
    wait_up(child.id());
    child.kill().unwrap();
    child.wait().unwrap();
    let id = format!("{}-0", child.id());
    assert_eq!(footprint(&id).0.len(), 4, "SIGKILL leaves the lab behind");
    sweep_stale();
    assert_eq!(footprint(&id), (vec![], vec![]));
}
