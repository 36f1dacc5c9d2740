//! The enforcer truth tables of tests/data/enforce, run on any datapath: the
//! e2e suite's setup (namespaces x, y, z; pods a, b, c serving TCP and UDP
//! 80 and 81), each case's policies, every pair probed over IPv4 on every
//! port. tests/enforce.rs checks the nftables enforcer against the same
//! files (with its IPv6 and single probes).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::Mutex,
    time::Duration,
};

use netwatch_lab::{Datapath, EnforceOptions, Lab, LabCluster, LabSpec, Manifests, Outcome, Probe};
use serde::Deserialize;

use crate::support::helper;

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];
const TIMEOUT: Duration = Duration::from_secs(1);
const RETRY_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Deserialize)]
struct Case {
    #[serde(default)]
    nodes: BTreeMap<String, String>,
    #[serde(default)]
    options: Options,
    #[serde(default)]
    manifests: Vec<serde_yaml::Value>,
    #[serde(default)]
    expect: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
struct Options {
    #[serde(default)]
    ipblock_matches_pods: Option<bool>,
    #[serde(default)]
    police_host_to_pod: Option<bool>,
}

fn base_manifests(nodes: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    for (i, ns) in NAMESPACES.iter().enumerate() {
        out.push_str(&format!("apiVersion: v1\nkind: Namespace\nmetadata: {{ name: {ns}, labels: {{ ns: {ns} }} }}\n---\n"));
        let node = nodes.get(*ns).map_or("node-1", String::as_str);
        for (j, pod) in PODS.iter().enumerate() {
            let sidecar = match *pod {
                "a" => "\n    - { name: sidecar, ports: [ { name: http, containerPort: 80 } ] }",
                "b" => "\n    - { name: sidecar, ports: [ { name: http, containerPort: 81 } ] }",
                _ => "",
            };
            out.push_str(&format!(
                "apiVersion: v1
kind: Pod
metadata: {{ name: {pod}, namespace: {ns}, labels: {{ pod: {pod} }} }}
spec:
  nodeName: {node}
  containers:
    - name: serve
      ports:
        - {{ name: serve-80-tcp, containerPort: 80 }}
        - {{ name: serve-81-tcp, containerPort: 81 }}
        - {{ name: serve-80-udp, containerPort: 80, protocol: UDP }}
        - {{ name: serve-81-udp, containerPort: 81, protocol: UDP }}{sidecar}
status: {{ podIPs: [ {{ ip: 10.244.{}.{} }}, {{ ip: \"fd00:244:{}::{}\" }} ], conditions: [ {{ type: Ready, status: \"True\" }} ] }}
---
",
                i + 1,
                j + 10,
                i + 1,
                j + 10
            ));
        }
    }
    out
}

fn parse_table(table: &str) -> BTreeMap<(String, String), bool> {
    let mut lines = table.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines
        .next()
        .expect("header")
        .split_whitespace()
        .skip(1)
        .collect();
    let mut out = BTreeMap::new();
    for line in lines {
        let cells: Vec<&str> = line.split_whitespace().collect();
        for (to, cell) in header.iter().zip(&cells[1..]) {
            match *cell {
                "." => out.insert((cells[0].to_string(), to.to_string()), true),
                "X" => out.insert((cells[0].to_string(), to.to_string()), false),
                _ => None,
            };
        }
    }
    out
}

/// Build case `name` on `datapath` and probe its truth tables; panics naming
/// every flow the kernel treated otherwise.
pub fn run_case(name: &str, datapath: Datapath) {
    let path = format!(
        "{}/tests/data/enforce/{name}.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    let case: Case = serde_yaml::from_str(&std::fs::read_to_string(&path).expect("case file"))
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    let list = serde_yaml::to_string(&serde_yaml::Value::Mapping(
        [
            ("apiVersion".into(), "v1".into()),
            ("kind".into(), "List".into()),
            (
                "items".into(),
                serde_yaml::Value::Sequence(case.manifests.clone()),
            ),
        ]
        .into_iter()
        .collect(),
    ))
    .unwrap();
    let text = format!("{}{list}", base_manifests(&case.nodes));
    let options = EnforceOptions {
        ipblock_matches_pods: case.options.ipblock_matches_pods.unwrap_or(true),
        police_host_to_pod: case.options.police_host_to_pod.unwrap_or(false),
        ..EnforceOptions::default()
    };
    let manifests = Manifests::parse(&path, &text).unwrap_or_else(|e| panic!("{e}"));
    let (mut spec, _) = LabSpec::from_manifests(&manifests).unwrap_or_else(|e| panic!("{e}"));
    spec.datapath = datapath;
    let lab = Lab::up(&spec, &helper()).expect("lab up (are you root?)");
    let cluster = LabCluster::new(manifests, lab.placements()).unwrap_or_else(|e| panic!("{e}"));
    lab.enforce(&cluster, &options)
        .unwrap_or_else(|e| panic!("{e}"));
    lab.proxy_services(&cluster)
        .unwrap_or_else(|e| panic!("{e}"));

    let ids: Vec<String> = NAMESPACES
        .iter()
        .flat_map(|n| PODS.iter().map(move |p| format!("{n}/{p}")))
        .collect();
    // (label, from, to, tcp, expected)
    let mut jobs: Vec<(String, String, SocketAddr, bool, Outcome)> = Vec::new();
    for (key, table) in &case.expect {
        let truth = parse_table(table);
        for port in key.split_whitespace() {
            let (proto, number) = port.split_once('/').expect("proto/port");
            let number: u16 = number.parse().expect("port");
            let is_tcp = proto == "tcp";
            for from in &ids {
                for to in &ids {
                    let Some(allowed) = truth.get(&(from.clone(), to.clone())) else {
                        continue;
                    };
                    let ip = IpAddr::V4(lab.pod(to).expect("pod").spec.ip);
                    let expect = match (allowed, is_tcp) {
                        (false, _) => Outcome::TimedOut,
                        (true, true) => Outcome::Connected,
                        (true, false) => Outcome::Answered,
                    };
                    jobs.push((
                        format!("{from} -> {to} {port}"),
                        from.clone(),
                        SocketAddr::new(ip, number),
                        is_tcp,
                        expect,
                    ));
                }
            }
        }
    }
    assert!(!jobs.is_empty(), "{name}: no truth table");
    let probe = |tcp: bool, to: SocketAddr, t: Duration| {
        if tcp {
            Probe::tcp(to, t)
        } else {
            Probe::udp(to, t)
        }
    };
    let next = Mutex::new(0usize);
    let wrong = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..jobs.len().min(32) {
            s.spawn(|| {
                loop {
                    let i = {
                        let mut n = next.lock().unwrap();
                        *n += 1;
                        *n - 1
                    };
                    let Some((label, from, to, tcp, expect)) = jobs.get(i) else {
                        break;
                    };
                    let mut got = lab
                        .probe(from, &probe(*tcp, *to, TIMEOUT))
                        .expect("probe")
                        .outcome;
                    if got == Outcome::TimedOut && *expect != Outcome::TimedOut {
                        got = lab
                            .probe(from, &probe(*tcp, *to, RETRY_TIMEOUT))
                            .expect("probe")
                            .outcome;
                    }
                    if got != *expect {
                        wrong
                            .lock()
                            .unwrap()
                            .push(format!("  {label}: expected {expect:?}, got {got:?}"));
                    }
                }
            });
        }
    });
    let mut wrong = wrong.into_inner().unwrap();
    wrong.sort();
    assert!(
        wrong.is_empty(),
        "{name} on the {datapath} datapath: {} of {} probes disagree with the nftables enforcer's truth table:\n{}",
        wrong.len(),
        jobs.len(),
        wrong.join("\n")
    );
}
