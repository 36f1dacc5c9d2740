//! The lab enforces NetworkPolicies and emulates kube-proxy, on the real
//! kernel. Every case builds a lab from Kubernetes manifests (the e2e suite's
//! classic setup: namespaces x, y, z labelled ns=<name>; pods a, b, c
//! labelled pod=<name> in each, serving TCP and UDP 80 and 81), compiles and
//! loads the policies, and probes every pair on every port. The expected
//! reachability is a truth table written from the API's semantics, in
//! `tests/data/enforce/<case>.yaml`; a disagreement names the flow.

mod support;

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::Mutex,
    time::Duration,
};

use netwatch_lab::{
    Direction, EnforceOptions, Lab, LabCluster, LabSpec, Manifests, Outcome, Probe, enforce,
};
use serde::Deserialize;
use support::helper;

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];
const PORTS: [&str; 4] = ["tcp/80", "tcp/81", "udp/80", "udp/81"];
/// A blocked probe costs this much; an allowed one answers in milliseconds.
const TIMEOUT: Duration = Duration::from_secs(1);
/// Probes that should have passed but timed out are tried once more with
/// this, so a loaded machine does not pass for a drop.
const RETRY_TIMEOUT: Duration = Duration::from_secs(3);

fn v4(ns: usize, pod: usize) -> String {
    format!("10.244.{}.{}", ns + 1, pod + 10)
}

fn v6(ns: usize, pod: usize) -> String {
    format!("fd00:244:{}::{}", ns + 1, pod + 10)
}

/// The e2e setup as manifests, plus a hostNetwork-free twist: a second
/// container declares a port named `http`, TCP 80 on pods a, TCP 81 on pods
/// b, none on pods c, so that a named port means different numbers on
/// different pods.
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
status: {{ podIPs: [ {{ ip: {} }}, {{ ip: \"{}\" }} ], conditions: [ {{ type: Ready, status: \"True\" }} ] }}
---
",
                v4(i, j),
                v6(i, j)
            ));
        }
    }
    out
}

/// One case file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    /// Namespace -> node (default: everything on node-1).
    #[serde(default)]
    nodes: BTreeMap<String, String>,
    #[serde(default)]
    options: Options,
    /// Extra Kubernetes objects: the policies, extra pods.
    #[serde(default)]
    manifests: Vec<serde_yaml::Value>,
    /// "tcp/80 udp/81" -> truth table (rows: from, columns: to; `.` allowed,
    /// `X` blocked, `-` the pod itself, not probed).
    #[serde(default)]
    expect: BTreeMap<String, String>,
    #[serde(default)]
    probes: Vec<CaseProbe>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Options {
    #[serde(default)]
    ipblock_matches_pods: Option<bool>,
    #[serde(default)]
    police_host_to_pod: Option<bool>,
}

/// A single probe with its expected outcome.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseProbe {
    from: String,
    /// A pod (`ns/name`) or an address.
    to: String,
    /// `80/tcp`, `81/udp`, `53/dns`.
    port: String,
    #[serde(default)]
    ipv6: bool,
    expect: Outcome,
}

/// A lab built from a case, with the policies loaded.
struct Built {
    lab: Lab,
    cluster: LabCluster,
}

fn build(name: &str) -> (Case, Built) {
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
    let built = up(&path, &text, &options);
    (case, built)
}

/// Build a lab from manifests text, then enforce its policies and services.
fn up(origin: &str, text: &str, options: &EnforceOptions) -> Built {
    let manifests = Manifests::parse(origin, text).unwrap_or_else(|e| panic!("{e}"));
    let (spec, _notes) = LabSpec::from_manifests(&manifests).unwrap_or_else(|e| panic!("{e}"));
    let lab = Lab::up(&spec, &helper()).expect("lab up (are you root?)");
    let cluster = LabCluster::new(manifests, lab.placements()).unwrap_or_else(|e| panic!("{e}"));
    lab.enforce(&cluster, options)
        .unwrap_or_else(|e| panic!("{e}"));
    lab.proxy_services(&cluster)
        .unwrap_or_else(|e| panic!("{e}"));
    Built { lab, cluster }
}

fn probe_for(port: &str, to: SocketAddr, timeout: Duration) -> Probe {
    match port.split_once('/').map(|(_, p)| p) {
        Some("tcp") => Probe::tcp(to, timeout),
        Some("udp") => Probe::udp(to, timeout),
        Some("dns") => Probe::dns(to, timeout),
        _ => panic!("port {port:?}: use 80/tcp, 81/udp or 53/dns"),
    }
}

fn allowed_outcome(port: &str) -> Outcome {
    if port.ends_with("/tcp") || port.starts_with("tcp/") {
        Outcome::Connected
    } else {
        Outcome::Answered
    }
}

/// One probe to run: who, where, what is expected.
struct Job {
    label: String,
    from: String,
    to: SocketAddr,
    port: String,
    expect: Outcome,
}

/// Run jobs in parallel; the ones whose outcome differs from the
/// expectation, with what happened. An expected success that timed out is
/// retried once with a longer timeout first.
fn run_jobs(lab: &Lab, jobs: &[Job]) -> Vec<(usize, Outcome)> {
    let next = Mutex::new(0usize);
    let results = Mutex::new(vec![Outcome::Error; jobs.len()]);
    std::thread::scope(|s| {
        for _ in 0..jobs.len().min(48) {
            s.spawn(|| {
                loop {
                    let i = {
                        let mut n = next.lock().unwrap();
                        *n += 1;
                        *n - 1
                    };
                    let Some(job) = jobs.get(i) else { break };
                    let mut outcome = lab
                        .probe(&job.from, &probe_for(&job.port, job.to, TIMEOUT))
                        .expect("probe")
                        .outcome;
                    if outcome == Outcome::TimedOut && job.expect != Outcome::TimedOut {
                        outcome = lab
                            .probe(&job.from, &probe_for(&job.port, job.to, RETRY_TIMEOUT))
                            .expect("probe")
                            .outcome;
                    }
                    results.lock().unwrap()[i] = outcome;
                }
            });
        }
    });
    let results = results.into_inner().unwrap();
    results
        .into_iter()
        .enumerate()
        .filter(|(i, o)| *o != jobs[*i].expect)
        .collect()
}

fn pod_address(lab: &Lab, id: &str, ipv6: bool) -> IpAddr {
    let p = lab.pod(id).unwrap_or_else(|e| panic!("{e}"));
    if ipv6 {
        IpAddr::V6(p.spec.ipv6.expect("pod has IPv6"))
    } else {
        IpAddr::V4(p.spec.ip)
    }
}

/// Parse a truth table: (from, to) -> allowed.
fn parse_table(key: &str, table: &str) -> BTreeMap<(String, String), bool> {
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
        assert_eq!(
            cells.len(),
            header.len() + 1,
            "table {key:?}: row {line:?} has the wrong number of cells"
        );
        for (to, cell) in header.iter().zip(&cells[1..]) {
            match *cell {
                "." => out.insert((cells[0].to_string(), to.to_string()), true),
                "X" => out.insert((cells[0].to_string(), to.to_string()), false),
                "-" => None,
                other => panic!("table {key:?}: cell {other:?} (use . X -)"),
            };
        }
    }
    out
}

fn render_table(ids: &[String], cell: impl Fn(&str, &str) -> &'static str) -> String {
    let mut out = format!(
        "      {}\n",
        ids.iter().map(|i| format!("{i:>4}")).collect::<String>()
    );
    for from in ids {
        out.push_str(&format!(
            "{from:<6}{}\n",
            ids.iter()
                .map(|to| format!("{:>4}", cell(from, to)))
                .collect::<String>()
        ));
    }
    out
}

/// Probe the whole matrix and the case's single probes; fail naming every
/// flow the kernel treated otherwise than the truth table says.
fn check(name: &str, case: &Case, lab: &Lab) {
    let ids: Vec<String> = NAMESPACES
        .iter()
        .flat_map(|n| PODS.iter().map(move |p| format!("{n}/{p}")))
        .collect();
    let mut jobs = Vec::new();
    for (key, table) in &case.expect {
        let truth = parse_table(key, table);
        for port in key.split_whitespace() {
            assert!(
                PORTS.contains(&port),
                "{name}: table key {port:?} (use {PORTS:?})"
            );
            let (proto, number) = port.split_once('/').unwrap();
            let number: u16 = number.parse().unwrap();
            for from in &ids {
                for to in &ids {
                    if from == to {
                        continue;
                    }
                    let allowed = *truth
                        .get(&(from.clone(), to.clone()))
                        .unwrap_or_else(|| panic!("{name} {port}: no cell for {from} -> {to}"));
                    jobs.push(Job {
                        label: format!("{from} -> {to} {port}"),
                        from: from.clone(),
                        to: SocketAddr::new(pod_address(lab, to, false), number),
                        port: format!("{number}/{proto}"),
                        expect: if allowed {
                            allowed_outcome(port)
                        } else {
                            Outcome::TimedOut
                        },
                    });
                }
            }
        }
    }
    let matrix = jobs.len();
    assert_eq!(
        matrix,
        72 * 4,
        "{name}: the truth tables must cover every port"
    );
    for p in &case.probes {
        let (number, _) = p.port.split_once('/').expect("port/proto");
        let to = match p.to.parse::<IpAddr>() {
            Ok(ip) => ip,
            Err(_) => pod_address(lab, &p.to, p.ipv6),
        };
        jobs.push(Job {
            label: format!(
                "{} -> {} {}{}",
                p.from,
                p.to,
                p.port,
                if p.ipv6 { " over IPv6" } else { "" }
            ),
            from: p.from.clone(),
            to: SocketAddr::new(to, number.parse().expect("port number")),
            port: p.port.clone(),
            expect: p.expect,
        });
    }
    let wrong = run_jobs(lab, &jobs);
    if wrong.is_empty() {
        return;
    }
    let mut report = format!(
        "{name}: {} of {} probes disagree with the truth table:\n",
        wrong.len(),
        jobs.len()
    );
    for (i, got) in &wrong {
        report.push_str(&format!(
            "  {}: expected {:?}, got {got:?}\n",
            jobs[*i].label, jobs[*i].expect
        ));
    }
    for port in PORTS {
        if wrong
            .iter()
            .any(|(i, _)| *i < matrix && jobs[*i].label.ends_with(port))
        {
            let outcome = |from: &str, to: &str| {
                let label = format!("{from} -> {to} {port}");
                match jobs.iter().position(|j| j.label == label) {
                    None => "-",
                    Some(i) => {
                        let expected_allowed = jobs[i].expect != Outcome::TimedOut;
                        let wrong = wrong.iter().any(|(w, _)| *w == i);
                        if expected_allowed != wrong { "." } else { "X" }
                    }
                }
            };
            report.push_str(&format!(
                "what the kernel did on {port}:\n{}",
                render_table(&ids, outcome)
            ));
        }
    }
    panic!("{report}");
}

fn case(name: &str) -> Built {
    let (c, built) = build(name);
    check(name, &c, &built.lab);
    built
}

#[test]
fn default_deny_ingress() {
    case("default-deny-ingress");
}

#[test]
fn default_deny_egress() {
    case("default-deny-egress");
}

#[test]
fn deny_all() {
    case("deny-all");
}

#[test]
fn allow_from_same_namespace() {
    case("allow-from-same-namespace");
}

#[test]
fn allow_from_namespace_selector() {
    case("allow-from-namespace");
}

#[test]
fn pod_and_namespace_selectors_in_one_peer_are_anded() {
    case("pod-and-namespace");
}

#[test]
fn separate_peers_are_ored() {
    case("pod-or-namespace");
}

#[test]
fn ip_block_with_except() {
    case("ip-block-except");
}

#[test]
fn ip_blocks_can_be_told_to_skip_pods() {
    case("ip-block-pods-excluded");
}

#[test]
fn named_ports_in_ingress_resolve_per_pod() {
    case("named-port-ingress");
}

#[test]
fn named_ports_in_egress_resolve_per_destination() {
    case("named-port-egress");
}

#[test]
fn end_port_ranges() {
    case("end-port");
}

#[test]
fn egress_to_specific_pods_and_stateful_replies() {
    case("egress-to-pods");
}

#[test]
fn dns_to_kube_system() {
    case("dns-to-kube-system");
}

#[test]
fn two_nodes_each_polices_its_own_pods() {
    let Built { lab, cluster } = case("two-nodes");
    let options = EnforceOptions::default();
    // Each node has chains for its own pods only.
    let node1 = enforce::compile(&cluster, "node-1", &options).unwrap();
    let node2 = enforce::compile(&cluster, "node-2", &options).unwrap();
    assert!(
        node1.contains("chain egress/x/a") && !node1.contains("chain ingress/y/"),
        "{node1}"
    );
    assert!(
        node2.contains("chain ingress/y/b") && !node2.contains("chain egress/x/"),
        "{node2}"
    );
    // The matrix dropped x/a's traffic on node-1, and traffic into y on node-2.
    assert!(lab.policy_drops("x/a", Direction::Egress).unwrap() > 0);
    let before = lab.policy_drops("y/b", Direction::Ingress).unwrap();
    let r = lab
        .probe(
            "x/c",
            &Probe::tcp(
                SocketAddr::new(pod_address(&lab, "y/b", false), 80),
                TIMEOUT,
            ),
        )
        .unwrap();
    assert_eq!(r.outcome, Outcome::TimedOut);
    assert!(
        lab.policy_drops("y/b", Direction::Ingress).unwrap() > before,
        "x/c -> y/b is dropped on y/b's node"
    );
    let e = lab
        .nft_counter("node-1", &enforce::drop_comment("y/b", Direction::Ingress))
        .unwrap_err();
    assert!(
        e.to_string().contains("no nftables rule"),
        "node-1 has no rule for y/b: {e}"
    );
}

const HOST_PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: x }
---
apiVersion: v1
kind: Namespace
metadata: { name: monitoring }
---
apiVersion: v1
kind: Pod
metadata: { name: a, namespace: x, labels: { pod: a } }
spec: { nodeName: node-1, containers: [ { name: c, ports: [ { containerPort: 80 } ] } ] }
status: { podIP: 10.244.1.10 }
---
apiVersion: v1
kind: Pod
metadata: { name: b, namespace: monitoring, labels: { pod: b } }
spec: { nodeName: node-1, containers: [ { name: c } ] }
status: { podIP: 10.244.1.11 }
---
apiVersion: v1
kind: Pod
metadata: { name: scraper, namespace: monitoring }
spec: { nodeName: node-1, hostNetwork: true, containers: [ { name: c, ports: [ { containerPort: 9100 } ] } ] }
status: { podIP: 100.64.1.2 }
---
apiVersion: v1
kind: Pod
metadata: { name: remote-scraper, namespace: monitoring }
spec: { nodeName: node-2, hostNetwork: true, containers: [ { name: c } ] }
status: { podIP: 100.64.2.2 }
---
apiVersion: v1
kind: Service
metadata: { name: nothing-ready, namespace: x }
spec: { clusterIP: 10.96.0.99, selector: { app: none }, ports: [ { port: 80 } ] }
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: { name: deny-all, namespace: x }
spec: { podSelector: {}, policyTypes: [ Ingress, Egress ] }
"#;

#[test]
fn traffic_from_the_node_to_its_pods_is_not_policed_by_default() {
    let Built { lab, cluster } = up("host-pods.yaml", HOST_PODS, &EnforceOptions::default());
    let a_80: SocketAddr = "10.244.1.10:80".parse().unwrap();
    let node_exporter: SocketAddr = "100.64.1.2:9100".parse().unwrap();
    let expect = |from: &str, to: SocketAddr, outcome: Outcome, why: &str| {
        let r = lab.probe(from, &Probe::tcp(to, TIMEOUT)).unwrap();
        assert_eq!(r.outcome, outcome, "{from} -> {to}: {why}");
    };
    expect(
        "monitoring/scraper",
        a_80,
        Outcome::Connected,
        "the pod's own node is allowed in (API docs, Calico's default)",
    );
    assert!(
        lab.nft_counter(
            "node-1",
            "host to local pods: not policed (police_host_to_pod: false)"
        )
        .unwrap()
            > 0
    );
    expect(
        "monitoring/remote-scraper",
        a_80,
        Outcome::TimedOut,
        "another node is a non-pod address, matched by ipBlocks only",
    );
    expect(
        "monitoring/b",
        a_80,
        Outcome::TimedOut,
        "x/a is isolated for ingress",
    );
    expect(
        "monitoring/b",
        node_exporter,
        Outcome::Connected,
        "monitoring/b is not isolated: it reaches its node",
    );
    expect(
        "x/a",
        node_exporter,
        Outcome::TimedOut,
        "x/a's egress policy applies to its own node too",
    );
    // Police the node's traffic as well.
    lab.enforce(
        &cluster,
        &EnforceOptions {
            police_host_to_pod: true,
            ..EnforceOptions::default()
        },
    )
    .unwrap();
    expect(
        "monitoring/scraper",
        a_80,
        Outcome::TimedOut,
        "with police_host_to_pod the node is policed",
    );
    let nothing_ready: SocketAddr = "10.96.0.99:80".parse().unwrap();
    expect(
        "x/a",
        nothing_ready,
        Outcome::Refused,
        "kube-proxy's REJECT comes first, and the node's ICMP error reaches the pod",
    );
    // Back to the default, replacing the ruleset in place.
    lab.enforce(&cluster, &EnforceOptions::default()).unwrap();
    expect(
        "monitoring/scraper",
        a_80,
        Outcome::Connected,
        "reloading restores the default",
    );
}

const SERVICES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: shop, labels: { team: shop } }
---
apiVersion: v1
kind: Pod
metadata: { name: client, namespace: shop, labels: { role: client } }
spec: { nodeName: node-1, containers: [ { name: c } ] }
status: { podIPs: [ { ip: 10.244.1.2 }, { ip: "fd00:244:1::2" } ] }
---
apiVersion: v1
kind: Pod
metadata: { name: stranger, namespace: shop }
spec: { nodeName: node-1, containers: [ { name: c } ] }
status: { podIP: 10.244.1.3 }
---
apiVersion: v1
kind: Pod
metadata: { name: web-1, namespace: shop, labels: { app: web } }
spec: { nodeName: node-1, containers: [ { name: c, ports: [ { name: http, containerPort: 8080 } ] } ] }
status: { podIPs: [ { ip: 10.244.1.10 }, { ip: "fd00:244:1::10" } ], conditions: [ { type: Ready, status: "True" } ] }
---
apiVersion: v1
kind: Pod
metadata: { name: web-2, namespace: shop, labels: { app: web } }
spec: { nodeName: node-2, containers: [ { name: c, ports: [ { name: http, containerPort: 8081 } ] } ] }
status: { podIP: 10.244.2.10, conditions: [ { type: Ready, status: "True" } ] }
---
apiVersion: v1
kind: Pod
metadata: { name: web-3, namespace: shop, labels: { app: web } }
spec: { nodeName: node-2, containers: [ { name: c, ports: [ { name: http, containerPort: 8080 } ] } ] }
status: { podIP: 10.244.2.11, conditions: [ { type: Ready, status: "False" } ] }
---
apiVersion: v1
kind: Pod
metadata: { name: payment-0, namespace: shop, labels: { app: payment } }
spec: { nodeName: node-2, containers: [ { name: c, ports: [ { containerPort: 8080 } ] } ] }
status: { podIP: 10.244.2.20, conditions: [ { type: Ready, status: "False" } ] }
---
apiVersion: v1
kind: Pod
metadata: { name: dns-0, namespace: shop, labels: { app: dns } }
spec: { nodeName: node-2, containers: [ { name: c, ports: [ { containerPort: 53, protocol: UDP } ] } ] }
status: { podIP: 10.244.2.53 }
---
apiVersion: v1
kind: Pod
metadata: { name: node-agent, namespace: shop }
spec: { nodeName: node-1, hostNetwork: true, containers: [ { name: c } ] }
status: { podIP: 100.64.1.2 }
---
apiVersion: v1
kind: Service
metadata: { name: web, namespace: shop }
spec: { clusterIP: 10.96.0.20, clusterIPs: [ 10.96.0.20, "fd96::20" ], selector: { app: web }, ports: [ { port: 80, targetPort: http } ] }
---
apiVersion: v1
kind: Service
metadata: { name: payment, namespace: shop }
spec: { clusterIP: 10.96.0.30, selector: { app: payment }, ports: [ { port: 80, targetPort: 8080 } ] }
---
apiVersion: v1
kind: Service
metadata: { name: dns, namespace: shop }
spec: { clusterIP: 10.96.0.10, ports: [ { name: dns, port: 53, protocol: UDP }, { name: spare, port: 54, protocol: UDP } ] }
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: { name: dns-x1, namespace: shop, labels: { kubernetes.io/service-name: dns } }
addressType: IPv4
ports: [ { name: dns, port: 53, protocol: UDP } ]
endpoints:
  - addresses: [ 10.244.2.53 ]
    conditions: { ready: true }
  - addresses: [ 10.244.2.99 ]
    conditions: { ready: false }
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: { name: dns-x2, namespace: shop, labels: { kubernetes.io/service-name: dns } }
addressType: IPv4
ports: [ { name: spare, port: 53, protocol: UDP } ]
endpoints:
  - addresses: [ 10.244.2.98 ]
    conditions: { ready: false }
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: { name: web-from-clients, namespace: shop }
spec:
  podSelector: { matchLabels: { app: web } }
  ingress: [ { from: [ { podSelector: { matchLabels: { role: client } } }, { ipBlock: { cidr: 100.64.0.0/16 } } ], ports: [ { port: http } ] } ]
"#;

#[test]
fn services_dnat_to_ready_backends_and_reject_without_any() {
    let Built { lab, .. } = up("services.yaml", SERVICES, &EnforceOptions::default());
    let web: SocketAddr = "10.96.0.20:80".parse().unwrap();
    let counter = |pod: &str| {
        lab.nft_counter(
            if pod == "web-1" { "node-1" } else { "node-2" },
            &format!("shop/web-from-clients ingress[0].from[0].ports[0] shop/{pod}"),
        )
    };
    for i in 0..16 {
        let r = lab
            .probe("shop/client", &Probe::tcp(web, Duration::from_secs(3)))
            .unwrap();
        assert_eq!(
            r.outcome,
            Outcome::Connected,
            "client -> web, attempt {i}: {r:?}"
        );
    }
    let (one, two) = (counter("web-1").unwrap(), counter("web-2").unwrap());
    assert!(
        one > 0 && two > 0,
        "both ready backends get connections (web-1 {one}, web-2 {two} packets)"
    );
    assert!(
        one + two >= 16,
        "every connection's SYN passed its backend's ingress rule, on the backend's node, after DNAT ({one} + {two})"
    );
    // IPv6: the cluster IP's family picks the endpoints (web-1 alone has IPv6).
    let r = lab
        .probe(
            "shop/client",
            &Probe::tcp("[fd96::20]:80".parse().unwrap(), Duration::from_secs(3)),
        )
        .unwrap();
    assert_eq!(r.outcome, Outcome::Connected, "client -> web over IPv6");
    // Policy applies after DNAT: a pod the backends do not accept times out.
    let r = lab
        .probe("shop/stranger", &Probe::tcp(web, TIMEOUT))
        .unwrap();
    assert_eq!(
        r.outcome,
        Outcome::TimedOut,
        "stranger -> web is denied at the backend"
    );
    // From the node (nat output): DNAT too (to web-1 on this node, not
    // policed; or to web-2 on node-2, allowed by the ipBlock).
    let r = lab
        .probe("shop/node-agent", &Probe::tcp(web, Duration::from_secs(3)))
        .unwrap();
    assert_eq!(r.outcome, Outcome::Connected, "node -> web");
    // No ready endpoint: rejected with ICMP port unreachable, from pods and node.
    let payment: SocketAddr = "10.96.0.30:80".parse().unwrap();
    for from in ["shop/client", "shop/node-agent"] {
        let r = lab
            .probe(from, &Probe::tcp(payment, Duration::from_secs(3)))
            .unwrap();
        assert_eq!(
            r.outcome,
            Outcome::Refused,
            "{from} -> payment (no ready endpoint)"
        );
    }
    assert!(
        lab.nft_counter("node-1", "shop/payment 10.96.0.30:80/TCP")
            .unwrap()
            >= 2,
        "both attempts went through the REJECT rule"
    );
    // EndpointSlices: the ready endpoint answers; a port whose endpoints are
    // all not ready is rejected.
    let r = lab
        .probe(
            "shop/client",
            &Probe::dns("10.96.0.10:53".parse().unwrap(), Duration::from_secs(3)),
        )
        .unwrap();
    assert_eq!(
        r.outcome,
        Outcome::Answered,
        "DNS through the service to dns-0"
    );
    let r = lab
        .probe(
            "shop/client",
            &Probe::udp("10.96.0.10:54".parse().unwrap(), Duration::from_secs(3)),
        )
        .unwrap();
    assert_eq!(
        r.outcome,
        Outcome::Refused,
        "port 54's only endpoint is not ready"
    );
}

#[test]
fn bad_policies_are_refused_before_anything_is_loaded() {
    let text = HOST_PODS.replace(
        "policyTypes: [ Ingress, Egress ] }",
        "policyTypes: [ Ingress ], ingress: [ { ports: [ { port: 80, endPort: 70 } ] } ] }",
    );
    let manifests = Manifests::parse("bad.yaml", &text).unwrap();
    let (spec, _) = LabSpec::from_manifests(&manifests).unwrap();
    let lab = Lab::up(&spec, &helper()).expect("lab up");
    let cluster = LabCluster::new(manifests, lab.placements()).unwrap();
    let e = lab
        .enforce(&cluster, &EnforceOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(
            "NetworkPolicy x/deny-all: `spec.ingress[0].ports[0].endPort`: 70 is below port 80"
        ),
        "{e}"
    );
    let r = lab
        .probe(
            "monitoring/b",
            &Probe::tcp("10.244.1.10:80".parse().unwrap(), TIMEOUT),
        )
        .unwrap();
    assert_eq!(r.outcome, Outcome::Connected, "nothing was loaded");
}
