//! The engine against a second evaluator written here from the API's text,
//! straight and slow (no indexes, no caches, plain JSON), on random mixes of
//! ClusterNetworkPolicies, AdminNetworkPolicies, the
//! BaselineAdminNetworkPolicy and NetworkPolicies over the conformance base
//! (tests/data/policy/cluster-conformance/cluster.yaml): every pair of pods,
//! on ports that hit numbers, ranges and named ports, must agree.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;
use netwatch::manifests;
use netwatch::policy::{EngineOptions, PolicyEngine, PolicyVerdict, Protocol, connectivity_matrix};
use serde_json::{Value, json};

/// xorshift64*: reproducible without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

const HOUSES: [&str; 5] = [
    "gryffindor",
    "slytherin",
    "hufflepuff",
    "ravenclaw",
    "forbidden-forrest",
];

#[derive(Debug)]
struct Pod {
    name: String,
    namespace: String,
    ns_labels: BTreeMap<String, String>,
    labels: BTreeMap<String, String>,
    ip: IpAddr,
    host: bool,
    /// (name, protocol, port)
    ports: Vec<(String, String, u16)>,
}

struct Node {
    labels: BTreeMap<String, String>,
    ips: Vec<IpAddr>,
}

fn label_map(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// matchLabels only (what the generator writes); absent = everything.
fn selects(selector: Option<&Value>, labels: &BTreeMap<String, String>) -> bool {
    match selector {
        None | Some(Value::Null) => true,
        Some(s) => label_map(&s["matchLabels"])
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v)),
    }
}

struct World {
    pods: Vec<Pod>,
    nodes: Vec<Node>,
}

fn world(dir: &Path) -> World {
    let text = std::fs::read_to_string(dir.join("cluster.yaml")).unwrap();
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let mut ns_labels = BTreeMap::new();
    let mut nodes = Vec::new();
    for d in &docs {
        match d["kind"].as_str() {
            Some("Namespace") => {
                let name = d["metadata"]["name"].as_str().unwrap().to_string();
                let mut labels = label_map(&d["metadata"]["labels"]);
                labels.insert("kubernetes.io/metadata.name".into(), name.clone());
                ns_labels.insert(name, labels);
            }
            Some("Node") => nodes.push(Node {
                labels: label_map(&d["metadata"]["labels"]),
                ips: d["status"]["addresses"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(|a| a["address"].as_str()?.parse().ok())
                    .collect(),
            }),
            _ => {}
        }
    }
    let pods = docs
        .iter()
        .filter(|d| d["kind"] == "Pod")
        .map(|d| {
            let namespace = d["metadata"]["namespace"].as_str().unwrap().to_string();
            Pod {
                name: d["metadata"]["name"].as_str().unwrap().to_string(),
                ns_labels: ns_labels[&namespace].clone(),
                namespace,
                labels: label_map(&d["metadata"]["labels"]),
                ip: d["status"]["podIP"].as_str().unwrap().parse().unwrap(),
                host: d["spec"]["hostNetwork"] == true,
                ports: d["spec"]["containers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
                    .map(|p| {
                        (
                            p["name"].as_str().unwrap().to_string(),
                            p["protocol"].as_str().unwrap_or("TCP").to_string(),
                            p["containerPort"].as_u64().unwrap() as u16,
                        )
                    })
                    .collect(),
            }
        })
        .collect();
    World { pods, nodes }
}

// ---- the generator ----

fn house_selector(rng: &mut Rng) -> Value {
    if rng.chance(20) {
        json!({})
    } else {
        json!({"matchLabels": {"conformance-house": rng.pick(&HOUSES)}})
    }
}

fn peer(rng: &mut Rng, egress: bool) -> Value {
    match rng.below(if egress { 4 } else { 2 }) {
        0 => json!({"namespaces": house_selector(rng)}),
        1 => {
            json!({"pods": {"namespaceSelector": house_selector(rng), "podSelector": house_selector(rng)}})
        }
        2 => {
            json!({"networks": [*rng.pick(&["10.244.0.0/16", "10.244.2.0/24", "10.244.1.11/32", "172.18.0.0/24", "0.0.0.0/0"])]})
        }
        _ => {
            json!({"nodes": *rng.pick(&[json!({}), json!({"matchLabels": {"kubernetes.io/hostname": "kind-worker"}})])})
        }
    }
}

/// (v1alpha2 protocols entry, v1alpha1 ports entry)
fn port(rng: &mut Rng) -> (Value, Value) {
    match rng.below(5) {
        0 => (
            json!({"tcp": {"destinationPort": {"number": 80}}}),
            json!({"portNumber": {"port": 80}}),
        ),
        1 => (
            json!({"udp": {"destinationPort": {"number": 53}}}),
            json!({"portNumber": {"protocol": "UDP", "port": 53}}),
        ),
        2 => (
            json!({"tcp": {"destinationPort": {"range": {"start": 8000, "end": 9000}}}}),
            json!({"portRange": {"start": 8000, "end": 9000}}),
        ),
        3 => (
            json!({"destinationNamedPort": "web"}),
            json!({"namedPort": "web"}),
        ),
        _ => (
            json!({"destinationNamedPort": "dns"}),
            json!({"namedPort": "dns"}),
        ),
    }
}

fn rules(rng: &mut Rng, egress: bool, v1alpha2: bool, actions: &[&str]) -> Vec<Value> {
    (0..rng.below(4))
        .map(|i| {
            let peers: Vec<Value> = (0..1 + rng.below(2)).map(|_| peer(rng, egress)).collect();
            let address_peers = peers
                .iter()
                .any(|p| p.get("networks").is_some() || p.get("nodes").is_some());
            let mut rule = json!({"name": format!("r{i}"), "action": *rng.pick(actions)});
            rule[if egress { "to" } else { "from" }] = Value::Array(peers);
            if rng.chance(50) {
                let ports: Vec<(Value, Value)> = (0..1 + rng.below(2))
                    .map(|_| port(rng))
                    .filter(|(a, _)| !(address_peers && a.get("destinationNamedPort").is_some()))
                    .collect();
                if !ports.is_empty() {
                    let list: Vec<Value> = ports
                        .into_iter()
                        .map(|(a, b)| if v1alpha2 { a } else { b })
                        .collect();
                    rule[if v1alpha2 { "protocols" } else { "ports" }] = Value::Array(list);
                }
            }
            rule
        })
        .collect()
}

fn subject(rng: &mut Rng) -> Value {
    if rng.chance(50) {
        json!({"namespaces": house_selector(rng)})
    } else {
        json!({"pods": {"namespaceSelector": house_selector(rng), "podSelector": house_selector(rng)}})
    }
}

fn generate(rng: &mut Rng) -> Vec<Value> {
    let mut out = Vec::new();
    // Distinct priorities per tier: equal ones are undefined by the API.
    let mut priorities: Vec<u32> = (0..20).map(|i| i * 7).collect();
    for i in 0..rng.below(4) {
        let at = rng.below(priorities.len());
        let tier = *rng.pick(&["Admin", "Baseline"]);
        let priority = priorities.remove(at);
        out.push(json!({"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": format!("cnp-{i}")},
            "spec": {"tier": tier, "priority": priority, "subject": subject(rng),
                     "ingress": rules(rng, false, true, &["Accept", "Deny", "Pass"]),
                     "egress": rules(rng, true, true, &["Accept", "Deny", "Pass"])}}));
    }
    for i in 0..rng.below(3) {
        let at = rng.below(priorities.len());
        let priority = priorities.remove(at);
        out.push(
            json!({"apiVersion": "policy.networking.k8s.io/v1alpha1", "kind": "AdminNetworkPolicy",
            "metadata": {"name": format!("anp-{i}")},
            "spec": {"priority": priority, "subject": subject(rng),
                     "ingress": rules(rng, false, false, &["Allow", "Deny", "Pass"]),
                     "egress": rules(rng, true, false, &["Allow", "Deny", "Pass"])}}),
        );
    }
    if rng.chance(50) {
        out.push(json!({"apiVersion": "policy.networking.k8s.io/v1alpha1", "kind": "BaselineAdminNetworkPolicy",
            "metadata": {"name": "default"},
            "spec": {"subject": subject(rng),
                     "ingress": rules(rng, false, false, &["Allow", "Deny"]),
                     "egress": rules(rng, true, false, &["Allow", "Deny"])}}));
    }
    for i in 0..rng.below(3) {
        let house = *rng.pick(&HOUSES[..4]);
        let mut types = Vec::new();
        let mut spec = json!({"podSelector": {}});
        if rng.chance(70) {
            types.push("Ingress");
            let ingress: Vec<Value> = (0..rng.below(2))
                .map(|_| json!({"from": [{"namespaceSelector": house_selector(rng)}], "ports": [{"port": *rng.pick(&[80, 8080, 53]), "protocol": "TCP"}]}))
                .collect();
            spec["ingress"] = Value::Array(ingress);
        }
        if rng.chance(50) {
            types.push("Egress");
            let egress: Vec<Value> = (0..rng.below(2))
                .map(|_| json!({"to": [{"namespaceSelector": house_selector(rng)}]}))
                .collect();
            spec["egress"] = Value::Array(egress);
        }
        if types.is_empty() {
            continue;
        }
        spec["policyTypes"] = json!(types);
        out.push(json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": format!("np-{i}"), "namespace": format!("network-policy-conformance-{house}")},
            "spec": spec}));
    }
    out
}

// ---- the reference evaluator ----

fn cluster_peer_matches(w: &World, peer: &Value, other: &Pod) -> bool {
    if let Some(ns) = peer.get("namespaces") {
        return !other.host && selects(Some(ns), &other.ns_labels);
    }
    if let Some(p) = peer.get("pods") {
        return !other.host
            && selects(p.get("namespaceSelector"), &other.ns_labels)
            && selects(p.get("podSelector"), &other.labels);
    }
    if let Some(nets) = peer.get("networks") {
        return nets.as_array().unwrap().iter().any(|n| {
            n.as_str()
                .unwrap()
                .parse::<IpNet>()
                .unwrap()
                .contains(&other.ip)
        });
    }
    if let Some(sel) = peer.get("nodes") {
        return w
            .nodes
            .iter()
            .any(|n| n.ips.contains(&other.ip) && selects(Some(sel), &n.labels));
    }
    false
}

fn named(dest: &Pod, name: &str, port: u16, protocol: &str) -> bool {
    dest.ports
        .iter()
        .any(|(n, p, num)| n == name && p == protocol && *num == port)
}

fn cluster_port_matches(entry: &Value, dest: &Pod, port: u16, protocol: &str) -> bool {
    if let Some(name) = entry.get("destinationNamedPort").or(entry.get("namedPort")) {
        return named(dest, name.as_str().unwrap(), port, protocol);
    }
    for (key, proto) in [("tcp", "TCP"), ("udp", "UDP"), ("sctp", "SCTP")] {
        if let Some(p) = entry.get(key) {
            let d = &p["destinationPort"];
            return proto == protocol
                && match d.get("number") {
                    Some(n) => n.as_u64() == Some(u64::from(port)),
                    None => (d["range"]["start"].as_u64().unwrap()
                        ..=d["range"]["end"].as_u64().unwrap())
                        .contains(&u64::from(port)),
                };
        }
    }
    if let Some(p) = entry.get("portNumber") {
        return p["protocol"].as_str().unwrap_or("TCP") == protocol
            && p["port"].as_u64() == Some(u64::from(port));
    }
    if let Some(r) = entry.get("portRange") {
        return r["protocol"].as_str().unwrap_or("TCP") == protocol
            && (r["start"].as_u64().unwrap()..=r["end"].as_u64().unwrap())
                .contains(&u64::from(port));
    }
    false
}

#[derive(PartialEq)]
enum Said {
    Allow,
    Deny,
    Nothing,
}

#[allow(clippy::too_many_arguments)]
fn cluster_tier(
    w: &World,
    policies: &[Value],
    tier: &str,
    subject: &Pod,
    other: &Pod,
    dest: &Pod,
    egress: bool,
    port: u16,
    protocol: &str,
) -> Said {
    if subject.host {
        return Said::Nothing;
    }
    let mut in_tier: Vec<&Value> = policies
        .iter()
        .filter(|p| match p["kind"].as_str().unwrap() {
            "ClusterNetworkPolicy" => p["spec"]["tier"] == tier,
            "AdminNetworkPolicy" => tier == "Admin",
            "BaselineAdminNetworkPolicy" => tier == "Baseline",
            _ => false,
        })
        .collect();
    in_tier.sort_by_key(|p| p["spec"]["priority"].as_u64().unwrap_or(0));
    for p in in_tier {
        let s = &p["spec"]["subject"];
        let selected = match s.get("namespaces") {
            Some(ns) => selects(Some(ns), &subject.ns_labels),
            None => {
                selects(s["pods"].get("namespaceSelector"), &subject.ns_labels)
                    && selects(s["pods"].get("podSelector"), &subject.labels)
            }
        };
        if !selected {
            continue;
        }
        let rules = p["spec"][if egress { "egress" } else { "ingress" }]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for r in rules {
            let peers = r[if egress { "to" } else { "from" }].as_array().unwrap();
            let ports = r
                .get("protocols")
                .or(r.get("ports"))
                .and_then(Value::as_array);
            let peer_ok = peers.iter().any(|x| cluster_peer_matches(w, x, other));
            let port_ok = ports.is_none_or(|ps| {
                ps.iter()
                    .any(|e| cluster_port_matches(e, dest, port, protocol))
            });
            if peer_ok && port_ok {
                return match r["action"].as_str().unwrap() {
                    "Accept" | "Allow" => Said::Allow,
                    "Deny" => Said::Deny,
                    _ => Said::Nothing, // Pass: the rest of the tier is skipped
                };
            }
        }
    }
    Said::Nothing
}

fn network_policy_tier(
    policies: &[Value],
    subject: &Pod,
    other: &Pod,
    egress: bool,
    port: u16,
    protocol: &str,
) -> Said {
    let kind = if egress { "Egress" } else { "Ingress" };
    let isolating: Vec<&Value> = policies
        .iter()
        .filter(|p| {
            p["kind"] == "NetworkPolicy" && p["metadata"]["namespace"] == subject.namespace.as_str()
        })
        .filter(|p| {
            p["spec"]["policyTypes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t == kind)
        })
        .collect();
    if isolating.is_empty() {
        return Said::Nothing;
    }
    let allowed = isolating.iter().any(|p| {
        p["spec"][if egress { "egress" } else { "ingress" }]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .any(|r| {
                let peers = r[if egress { "to" } else { "from" }].as_array().unwrap();
                let peer_ok = peers
                    .iter()
                    .any(|x| selects(x.get("namespaceSelector"), &other.ns_labels));
                let port_ok = r.get("ports").and_then(Value::as_array).is_none_or(|ps| {
                    ps.iter().any(|e| {
                        e["protocol"] == protocol && e["port"].as_u64() == Some(u64::from(port))
                    })
                });
                peer_ok && port_ok
            })
    });
    if allowed { Said::Allow } else { Said::Deny }
}

fn reference(
    w: &World,
    policies: &[Value],
    from: &Pod,
    to: &Pod,
    port: u16,
    protocol: &str,
) -> PolicyVerdict {
    let direction = |egress: bool| {
        let (subject, other) = if egress { (from, to) } else { (to, from) };
        for said in [
            cluster_tier(
                w, policies, "Admin", subject, other, to, egress, port, protocol,
            ),
            network_policy_tier(policies, subject, other, egress, port, protocol),
            cluster_tier(
                w, policies, "Baseline", subject, other, to, egress, port, protocol,
            ),
        ] {
            match said {
                Said::Allow => return true,
                Said::Deny => return false,
                Said::Nothing => {}
            }
        }
        true
    };
    if direction(true) && direction(false) {
        PolicyVerdict::Allowed
    } else {
        PolicyVerdict::Denied
    }
}

#[test]
fn the_engine_agrees_with_a_straight_reading_of_the_api_on_random_policy_sets() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/policy/cluster-conformance");
    let w = world(&dir);
    let base = manifests::load(&[dir.join("cluster.yaml")]).unwrap();
    let probes: [(u16, Protocol, &str); 6] = [
        (80, Protocol::Tcp, "TCP"),
        (8080, Protocol::Tcp, "TCP"),
        (53, Protocol::Udp, "UDP"),
        (80, Protocol::Udp, "UDP"),
        (34345, Protocol::Tcp, "TCP"),
        (9003, Protocol::Sctp, "SCTP"),
    ];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut compared = 0;
    let mut decided_by_cluster = 0;
    for round in 0..150 {
        let policies = generate(&mut rng);
        let yaml: String = policies
            .iter()
            .map(|p| format!("---\n{}", serde_yaml::to_string(p).unwrap()))
            .collect();
        let loaded = manifests::load_str(&format!("round {round}"), &yaml)
            .unwrap_or_else(|e| panic!("round {round}: {e}\n{yaml}"));
        let mut snapshot = base.clone();
        snapshot.network_policies = loaded.network_policies;
        snapshot.cluster_network_policies = loaded.cluster_network_policies;
        snapshot.admin_network_policies = loaded.admin_network_policies;
        snapshot.baseline_admin_network_policies = loaded.baseline_admin_network_policies;
        let engine = PolicyEngine::new(&snapshot, EngineOptions::default()).unwrap();
        for (port, protocol, proto) in probes {
            let matrix = connectivity_matrix(&engine, &[port], &[protocol]);
            for cell in matrix {
                let find = |name: &str| {
                    w.pods
                        .iter()
                        .find(|p| format!("{}/{}", p.namespace, p.name) == name)
                        .unwrap()
                };
                let want = reference(&w, &policies, find(&cell.from), find(&cell.to), port, proto);
                compared += 1;
                if cell.verdict != want {
                    let v = engine.evaluate(
                        &cell.from.parse().unwrap(),
                        &cell.to.parse().unwrap(),
                        port,
                        protocol,
                    );
                    panic!(
                        "round {round}: {} -> {} {port}/{proto}: reference {want}, engine {} ({})\n{yaml}",
                        cell.from,
                        cell.to,
                        cell.verdict,
                        v.sentence()
                    );
                }
                let v = engine.evaluate(
                    &cell.from.parse().unwrap(),
                    &cell.to.parse().unwrap(),
                    port,
                    protocol,
                );
                if [&v.egress, &v.ingress].iter().any(|d| {
                    matches!(
                        d.decided_in,
                        Some(netwatch::policy::Tier::Admin | netwatch::policy::Tier::Baseline)
                    )
                }) {
                    decided_by_cluster += 1;
                }
            }
        }
    }
    assert!(compared > 50_000, "{compared}");
    // The sets are not trivial: cluster tiers decide a good share of them.
    assert!(
        decided_by_cluster * 10 > compared,
        "{decided_by_cluster} of {compared}"
    );
}
