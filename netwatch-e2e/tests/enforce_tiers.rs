//! The lab enforcer's Admin and Baseline tiers (ClusterNetworkPolicy,
//! AdminNetworkPolicy, BaselineAdminNetworkPolicy) checked three ways:
//!
//! - against kubernetes-sigs/network-policy-api's conformance tests, as
//!   transcribed in netwatch-agent/tests/data/policy/cluster-conformance:
//!   every probe of every step through the compiled nftables chains
//!   ([`CompiledCluster::decide`], which runs the rule text), no root needed;
//! - a subset of those probes with real packets: a lab built from the same
//!   cluster, the chains loaded into nftables, TCP and UDP probes;
//! - against netwatch's engine on random policy sets: `netwatch explain
//!   --matrix -o json` (the engine, a separate program) and the compiled
//!   chains must reach the same verdict on every pair, port and protocol;
//! - the eBPF datapath's first-match lists (what its TC programs compare)
//!   against the chains, on the conformance probes and random policy sets:
//!   the lab's two compilers must agree, direction by direction.

mod support;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use netwatch_lab::{
    Direction, EnforceOptions, Lab, LabCluster, LabSpec, Manifests, Outcome, PodPlacement, Probe,
    datapath::ebpf,
    enforce::{CompiledCluster, Decision, L4},
};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    steps: Vec<Step>,
    #[serde(skip)]
    file: String,
}

#[derive(Debug, Deserialize)]
struct Step {
    description: Option<String>,
    #[serde(default)]
    namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    policies: String,
    probes: Vec<CorpusProbe>,
}

#[derive(Debug, Deserialize)]
struct CorpusProbe {
    from: String,
    to: String,
    port: u16,
    protocol: String,
    expect: String,
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../netwatch-agent/tests/data/policy/cluster-conformance")
}

fn cases() -> Vec<Case> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .expect("the conformance corpus")
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("v1alpha")
        })
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let mut case: Case = serde_yaml::from_str(&std::fs::read_to_string(&f).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            case.file = f.file_name().unwrap().to_string_lossy().into_owned();
            case
        })
        .collect()
}

/// The corpus cluster with a step's namespace labels and policies.
fn step_manifests(case: &Case, step: &Step) -> Manifests {
    let mut m = Manifests::load(&corpus_dir().join("cluster.yaml")).expect("cluster.yaml");
    for (ns, labels) in &step.namespace_labels {
        let n = m
            .namespaces
            .iter_mut()
            .find(|n| n.metadata.name.as_deref() == Some(ns))
            .expect("namespace");
        n.metadata.labels = Some(labels.clone());
    }
    m.extend(Manifests::parse(&case.file, &step.policies).unwrap_or_else(|e| panic!("{e}")));
    m
}

/// Pod-network pods spread over two nodes; hostNetwork pods are node traffic.
fn placements(m: &Manifests) -> Vec<PodPlacement> {
    m.pods
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let host = p
                .spec
                .as_ref()
                .and_then(|s| s.host_network)
                .unwrap_or(false);
            PodPlacement {
                namespace: p.metadata.namespace.clone().unwrap_or_default(),
                name: p.metadata.name.clone().unwrap_or_default(),
                node: format!("node-{}", 1 + i % 2),
                host_if: if host {
                    String::new()
                } else {
                    format!("cali{i:011}")
                },
                ips: Vec::new(),
                host_network: host,
            }
        })
        .collect()
}

fn address(cluster: &LabCluster, id: &str) -> IpAddr {
    cluster.pod(id).unwrap_or_else(|| panic!("no pod {id}")).ips[0]
}

#[test]
fn every_probe_of_the_upstream_conformance_tests_through_the_compiled_chains() {
    let mut failures = Vec::new();
    let mut probes = 0;
    let cases = cases();
    assert_eq!(cases.len(), 48, "24 v1alpha2 and 24 v1alpha1 tests");
    for case in &cases {
        for (i, step) in case.steps.iter().enumerate() {
            let m = step_manifests(case, step);
            let placed = placements(&m);
            let cluster = LabCluster::new(m, placed).unwrap_or_else(|e| panic!("{e}"));
            let compiled = CompiledCluster::new(&cluster, &EnforceOptions::default())
                .unwrap_or_else(|e| panic!("{} step {}: {e}", case.file, i + 1));
            for p in &step.probes {
                probes += 1;
                let protocol = L4::from_api(Some(&p.protocol)).unwrap();
                let decision = compiled
                    .decide(&p.from, address(&cluster, &p.to), protocol, p.port)
                    .unwrap_or_else(|e| panic!("{}: {e}", case.file));
                let want = p.expect == "allowed";
                if decision.allowed() != want {
                    failures.push(format!(
                        "{} ({}) step {} [{}]: {} -> {} {}/{}: expected {}, the chains: {decision:?}",
                        case.file,
                        case.name,
                        i + 1,
                        step.description.as_deref().unwrap_or("-"),
                        p.from,
                        p.to,
                        p.port,
                        p.protocol,
                        p.expect
                    ));
                }
            }
        }
    }
    assert!(probes >= 550, "only {probes} probes");
    assert!(
        failures.is_empty(),
        "{} of {probes} probes fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Real packets: the corpus cluster as a lab (pods on two nodes; the
/// host-network centaurs left out, their addresses are the suite's), the
/// steps of a few upstream tests loaded in turn, every TCP and UDP probe to
/// a pod sent for real.
#[test]
fn a_subset_of_the_conformance_probes_with_real_packets() {
    let chosen = [
        "v1alpha2-cnp-admin-tier-gress.yaml",
        "v1alpha2-cnp-baseline-tier-gress.yaml",
        "v1alpha2-cnp-admin-tier-integration.yaml",
        "v1alpha1-admin-network-policy-integration.yaml",
        "v1alpha1-baseline-admin-network-policy-egress-udp.yaml",
        "v1alpha1-admin-network-policy-gress.yaml",
    ];
    let cases: Vec<Case> = cases()
        .into_iter()
        .filter(|c| chosen.contains(&c.file.as_str()))
        .collect();
    assert_eq!(cases.len(), chosen.len());
    let mut base = Manifests::load(&corpus_dir().join("cluster.yaml")).unwrap();
    base.pods.retain(|p| {
        !p.spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false)
    });
    for (i, p) in base.pods.iter_mut().enumerate() {
        p.spec.as_mut().unwrap().node_name = Some(format!("node-{}", 1 + i % 2));
    }
    let (spec, _) = LabSpec::from_manifests(&base).unwrap_or_else(|e| panic!("{e}"));
    let lab = Lab::up(&spec, &support::helper()).expect("lab up (are you root?)");
    let mut failures = Vec::new();
    let mut sent = 0;
    for case in &cases {
        for (i, step) in case.steps.iter().enumerate() {
            let mut m = base.clone();
            let full = step_manifests(case, step);
            m.namespaces = full.namespaces;
            m.network_policies = full.network_policies;
            m.tier_policies = full.tier_policies;
            let cluster = LabCluster::new(m, lab.placements()).unwrap();
            lab.enforce(&cluster, &EnforceOptions::default())
                .unwrap_or_else(|e| panic!("{} step {}: {e}", case.file, i + 1));
            for p in &step.probes {
                let Some(to) = cluster.pod(&p.to).filter(|t| !t.host_network) else {
                    continue;
                };
                let target = SocketAddr::new(to.ips[0], p.port);
                let probe = match p.protocol.as_str() {
                    "TCP" => Probe::tcp(target, TIMEOUT),
                    "UDP" => Probe::udp(target, TIMEOUT),
                    _ => continue,
                };
                sent += 1;
                let mut got = lab.probe(&p.from, &probe).expect("probe").outcome;
                if got == Outcome::TimedOut && p.expect == "allowed" {
                    let retry = match p.protocol.as_str() {
                        "TCP" => Probe::tcp(target, RETRY),
                        _ => Probe::udp(target, RETRY),
                    };
                    got = lab.probe(&p.from, &retry).expect("probe").outcome;
                }
                // Reached: the pod answered, or refused (nothing listens on
                // that port: the packet got through all the same).
                let reached = got != Outcome::TimedOut && got != Outcome::Error;
                let want = p.expect == "allowed";
                if reached != want {
                    failures.push(format!(
                        "{} step {}: {} -> {} {}/{}: expected {}, got {got:?}",
                        case.file,
                        i + 1,
                        p.from,
                        p.to,
                        p.port,
                        p.protocol,
                        p.expect
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {sent} real probes disagree with upstream:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(sent >= 100, "only {sent} probes sent");
}

const TIMEOUT: Duration = Duration::from_secs(1);
const RETRY: Duration = Duration::from_secs(3);

/// A small deterministic generator (splitmix64), so a failing round can be
/// replayed from its number.
struct Dice(u64);

impl Dice {
    fn roll(&mut self, sides: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) % sides as u64) as usize
    }
    fn one<'a>(&mut self, of: &[&'a str]) -> &'a str {
        of[self.roll(of.len())]
    }
}

/// One random set of cluster policies and NetworkPolicies over the corpus
/// cluster, as YAML.
fn random_policies(d: &mut Dice) -> String {
    const NS: [&str; 6] = [
        "{}",
        "{matchLabels: {conformance-house: gryffindor}}",
        "{matchLabels: {conformance-house: slytherin}}",
        "{matchLabels: {conformance-house: hufflepuff}}",
        "{matchLabels: {conformance-house: ravenclaw}}",
        "{matchExpressions: [{key: conformance-house, operator: NotIn, values: [ravenclaw]}]}",
    ];
    const PODS: [&str; 3] = [
        "{}",
        "{matchLabels: {statefulset.kubernetes.io/pod-name: harry-potter-0}}",
        "{matchExpressions: [{key: statefulset.kubernetes.io/pod-name, operator: In, values: [draco-malfoy-1, luna-lovegood-0]}]}",
    ];
    let mut out = String::new();
    let mut priorities: Vec<usize> = (1..30).collect();
    let policies = 1 + d.roll(4);
    for i in 0..policies {
        let (kind, version) = *[
            ("ClusterNetworkPolicy", "v1alpha2"),
            ("AdminNetworkPolicy", "v1alpha1"),
            ("BaselineAdminNetworkPolicy", "v1alpha1"),
        ]
        .get(d.roll(3))
        .unwrap();
        let v2 = version == "v1alpha2";
        let baseline = kind == "BaselineAdminNetworkPolicy"
            || (v2 && d.roll(2) == 0 && !out.contains("tier: Baseline"));
        if kind == "BaselineAdminNetworkPolicy" && out.contains("name: default\n") {
            continue;
        }
        let name = if kind == "BaselineAdminNetworkPolicy" {
            "default".to_string()
        } else {
            format!("p{i}")
        };
        let subject = if d.roll(2) == 0 {
            format!("{{namespaces: {}}}", d.one(&NS))
        } else {
            format!(
                "{{pods: {{namespaceSelector: {}, podSelector: {}}}}}",
                d.one(&NS),
                d.one(&PODS)
            )
        };
        let _ = writeln!(
            out,
            "---\napiVersion: policy.networking.k8s.io/{version}\nkind: {kind}\nmetadata: {{name: {name}}}\nspec:\n  subject: {subject}"
        );
        if v2 {
            let _ = writeln!(
                out,
                "  tier: {}",
                if baseline { "Baseline" } else { "Admin" }
            );
        }
        if kind != "BaselineAdminNetworkPolicy" {
            let p = priorities.remove(d.roll(priorities.len()));
            let _ = writeln!(out, "  priority: {p}");
        }
        for (field, peers_field) in [("ingress", "from"), ("egress", "to")] {
            let rules = d.roll(4);
            if rules == 0 {
                continue;
            }
            let _ = writeln!(out, "  {field}:");
            for r in 0..rules {
                let actions: &[&str] = match (v2, kind) {
                    (true, _) => &["Accept", "Deny", "Pass"],
                    (false, "AdminNetworkPolicy") => &["Allow", "Deny", "Pass"],
                    _ => &["Allow", "Deny"],
                };
                let mut peer_kinds = vec!["namespaces", "pods"];
                if field == "egress" {
                    peer_kinds.extend(["networks", "nodes"]);
                }
                let peer = match d.one(&peer_kinds) {
                    "namespaces" => format!("{{namespaces: {}}}", d.one(&NS)),
                    "pods" => format!(
                        "{{pods: {{namespaceSelector: {}, podSelector: {}}}}}",
                        d.one(&NS),
                        d.one(&PODS)
                    ),
                    "networks" => format!(
                        "{{networks: [{}]}}",
                        d.one(&[
                            "10.244.1.0/24",
                            "10.244.2.11/32",
                            "172.18.0.2/32",
                            "0.0.0.0/0"
                        ])
                    ),
                    _ => format!(
                        "{{nodes: {}}}",
                        d.one(&[
                            "{}",
                            "{matchLabels: {kubernetes.io/hostname: kind-worker2}}"
                        ])
                    ),
                };
                let by_address = peer.starts_with("{networks") || peer.starts_with("{nodes");
                let ports = match (d.roll(5), v2) {
                    (0, true) => "\n    protocols: [{tcp: {destinationPort: {number: 80}}}]",
                    (1, true) => {
                        "\n    protocols: [{udp: {destinationPort: {range: {start: 50, end: 60}}}}, {tcp: {destinationPort: {number: 8080}}}]"
                    }
                    (2, true) if !by_address => "\n    protocols: [{destinationNamedPort: dns}]",
                    (0, false) => "\n    ports: [{portNumber: {port: 80}}]",
                    (1, false) => {
                        "\n    ports: [{portRange: {protocol: UDP, start: 50, end: 60}}, {portNumber: {protocol: TCP, port: 34345}}]"
                    }
                    (2, false) if !by_address => "\n    ports: [{namedPort: web}]",
                    _ => "",
                };
                let _ = writeln!(
                    out,
                    "  - name: r{r}\n    action: {}\n    {peers_field}: [{peer}]{ports}",
                    d.one(actions)
                );
            }
        }
    }
    if d.roll(2) == 0 {
        let ns = d.one(&["gryffindor", "slytherin", "ravenclaw"]);
        let _ = writeln!(
            out,
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: np, namespace: network-policy-conformance-{ns}}}\nspec:\n  podSelector: {{}}\n  policyTypes: [Ingress, Egress]\n  ingress: [{{from: [{{namespaceSelector: {}}}], ports: [{{port: 80}}]}}]\n  egress: [{{to: [{{podSelector: {{}}}}]}}]",
            d.one(&NS)
        );
    }
    out
}

/// The lab's chains and the agent's engine (`netwatch explain --matrix`, a
/// separate program written separately) on random policy sets: every pair
/// of pods, on ports hitting numbers, ranges, named ports and host ports.
#[test]
fn the_compiled_chains_agree_with_the_engine_on_random_policy_sets() {
    let netwatch = support::target_binary("netwatch");
    let work = tempfile::tempdir().unwrap();
    let mut dice = Dice(14);
    let mut compared = 0;
    let mut denied = 0;
    for round in 0..60 {
        let yaml = random_policies(&mut dice);
        let file = work.path().join("policies.yaml");
        std::fs::write(&file, &yaml).unwrap();
        let out = std::process::Command::new(&netwatch)
            .arg("explain")
            .arg("-f")
            .arg(corpus_dir().join("cluster.yaml"))
            .arg("-f")
            .arg(&file)
            .args([
                "--matrix",
                "--ports",
                "80,8080,53,55,34345",
                "--protocols",
                "TCP,UDP",
                "-o",
                "json",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "round {round}: netwatch explain: {}\n{yaml}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cells: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        let mut m = Manifests::load(&corpus_dir().join("cluster.yaml")).unwrap();
        m.extend(
            Manifests::parse("random", &yaml)
                .unwrap_or_else(|e| panic!("round {round}: {e}\n{yaml}")),
        );
        let placed = placements(&m);
        let cluster = LabCluster::new(m, placed).unwrap();
        let compiled = CompiledCluster::new(&cluster, &EnforceOptions::default())
            .unwrap_or_else(|e| panic!("round {round}: {e}\n{yaml}"));
        for c in &cells {
            let (from, to) = (c["from"].as_str().unwrap(), c["to"].as_str().unwrap());
            // From a hostNetwork pod: NetworkPolicy leaves it undefined; the
            // lab follows Calico (node traffic, matched by ipBlocks only),
            // the engine lets NetworkPolicy selectors match such a pod.
            // Cluster policies never select it either way.
            if cluster.pod(from).is_some_and(|p| p.host_network) {
                continue;
            }
            let port = c["port"].as_u64().unwrap() as u16;
            let protocol = L4::from_api(c["protocol"].as_str()).unwrap();
            let engine_allows = c["verdict"] == "ALLOWED";
            let lab = compiled
                .decide(from, address(&cluster, to), protocol, port)
                .unwrap();
            compared += 1;
            denied += usize::from(!engine_allows);
            assert_eq!(
                lab.allowed(),
                engine_allows,
                "round {round}: {from} -> {to} {port}/{}: the engine says {}, the chains {lab:?}\n{yaml}",
                protocol.nft(),
                c["verdict"]
            );
        }
    }
    assert!(compared > 10_000, "{compared}");
    assert!(
        denied * 10 > compared && denied * 10 < compared * 9,
        "the sets are not trivial: {denied} of {compared} denied"
    );
}

/// The eBPF datapath's lists of every node of `cluster`, by host interface.
fn ebpf_lists(cluster: &LabCluster, options: &EnforceOptions) -> BTreeMap<String, ebpf::PodRules> {
    ["node-1", "node-2"]
        .into_iter()
        .flat_map(|n| ebpf::compile(cluster, n, options).unwrap_or_else(|e| panic!("{e}")))
        .map(|p| (p.host_if.clone(), p))
        .collect()
}

/// What the eBPF lists decide for `from` opening a connection to `to`, in
/// the shape of the chains' [`Decision`]: per direction, `None` where the
/// end is no policed pod.
fn ebpf_decide(
    cluster: &LabCluster,
    lists: &BTreeMap<String, ebpf::PodRules>,
    from: &str,
    to: IpAddr,
    protocol: L4,
    port: u16,
) -> (Option<bool>, Option<bool>) {
    let source = cluster.pod(from).unwrap();
    let saddr = source
        .ips
        .iter()
        .copied()
        .find(|ip| ip.is_ipv4() == to.is_ipv4())
        .unwrap();
    let rules_of = |p: &netwatch_lab::enforce::ClusterPod| {
        let host_if = &p.placement.as_ref()?.host_if;
        lists.get(host_if)
    };
    let egress = rules_of(source).map(|r| r.allows(Direction::Egress, to, protocol, port));
    let ingress = cluster
        .pods
        .iter()
        .find(|p| !p.host_network && p.ips.contains(&to))
        .and_then(rules_of)
        .map(|r| r.allows(Direction::Ingress, saddr, protocol, port));
    (egress, ingress)
}

fn chains_decide(d: &Decision) -> (Option<bool>, Option<bool>) {
    (
        d.egress.as_ref().map(|j| j.allowed()),
        d.ingress.as_ref().map(|j| j.allowed()),
    )
}

#[test]
fn the_ebpf_lists_agree_with_the_chains_on_every_conformance_probe() {
    let mut probes = 0;
    let mut failures = Vec::new();
    for case in &cases() {
        for (i, step) in case.steps.iter().enumerate() {
            let m = step_manifests(case, step);
            let placed = placements(&m);
            let cluster = LabCluster::new(m, placed).unwrap();
            let options = EnforceOptions::default();
            let chains = CompiledCluster::new(&cluster, &options).unwrap();
            let lists = ebpf_lists(&cluster, &options);
            for p in &step.probes {
                probes += 1;
                let protocol = L4::from_api(Some(&p.protocol)).unwrap();
                let to = address(&cluster, &p.to);
                let want = chains_decide(&chains.decide(&p.from, to, protocol, p.port).unwrap());
                let got = ebpf_decide(&cluster, &lists, &p.from, to, protocol, p.port);
                if got != want {
                    failures.push(format!(
                        "{} step {}: {} -> {} {}/{}: chains (egress, ingress) {want:?}, eBPF lists {got:?}",
                        case.file,
                        i + 1,
                        p.from,
                        p.to,
                        p.port,
                        p.protocol
                    ));
                }
            }
        }
    }
    assert!(probes >= 550, "only {probes} probes");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Random policy sets (the generator of the engine comparison), every pair
/// of pods and some addresses outside the pods, on ports hitting numbers,
/// ranges and named ports, with both ipBlock choices.
#[test]
fn the_ebpf_lists_agree_with_the_chains_on_random_policy_sets() {
    let mut dice = Dice(41);
    let mut compared = 0;
    let mut denied = 0;
    let outside: [IpAddr; 3] = [
        "172.18.0.2".parse().unwrap(),
        "10.244.1.77".parse().unwrap(),
        "192.0.2.9".parse().unwrap(),
    ];
    for round in 0..80 {
        let yaml = random_policies(&mut dice);
        let mut m = Manifests::load(&corpus_dir().join("cluster.yaml")).unwrap();
        m.extend(Manifests::parse("random", &yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}")));
        let placed = placements(&m);
        let cluster = LabCluster::new(m, placed).unwrap();
        let options = EnforceOptions {
            ipblock_matches_pods: round % 2 == 0,
            ..EnforceOptions::default()
        };
        let chains = CompiledCluster::new(&cluster, &options).unwrap();
        let lists = ebpf_lists(&cluster, &options);
        let sources: Vec<String> = cluster
            .pods
            .iter()
            .filter(|p| !p.host_network)
            .map(|p| p.id())
            .collect();
        let targets: Vec<IpAddr> = cluster
            .pods
            .iter()
            .flat_map(|p| p.ips.iter().copied())
            .chain(outside)
            .collect();
        for from in &sources {
            for to in &targets {
                for protocol in [L4::Tcp, L4::Udp] {
                    for port in [80, 8080, 53, 55, 34345] {
                        let decision = chains.decide(from, *to, protocol, port).unwrap();
                        let want = chains_decide(&decision);
                        let got = ebpf_decide(&cluster, &lists, from, *to, protocol, port);
                        compared += 1;
                        denied += usize::from(!decision.allowed());
                        assert_eq!(
                            got,
                            want,
                            "round {round}: {from} -> {to} {port}/{}: the chains {decision:?}, the eBPF lists (egress, ingress) {got:?}\n{yaml}",
                            protocol.nft()
                        );
                    }
                }
            }
        }
    }
    assert!(compared > 10_000, "{compared}");
    assert!(
        denied * 10 > compared && denied * 10 < compared * 9,
        "the sets are not trivial: {denied} of {compared} denied"
    );
}
