//! Incremental cluster updates against full rebuilds: random sequences of
//! watch events (pods, namespaces, services, EndpointSlices,
//! NetworkPolicies, AdminNetworkPolicies and the
//! BaselineAdminNetworkPolicy, nodes, ReplicaSets; adds, changes,
//! deletes, re-lists that find pods gone, changed and new; addresses
//! reused and contested from a small pool, a deleted pod's address taken
//! by another at once, hostNetwork pods sharing the node's address, pods
//! without one) go through the API source's snapshot writer, which records
//! them in the snapshot's change log. One [`Attribution`] applies them
//! change by change; another sees every snapshot as new and rebuilds.
//! After each batch both must resolve every address alike (pods,
//! tombstones, services, readiness), and the verdicts on sampled flows,
//! through the incremental side's verdict cache (kept warm across batches
//! so a stale entry would show), must equal a freshly built engine's.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::{
    apps::v1::ReplicaSet,
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use kube::runtime::watcher::Event;
use netwatch::{
    attribution::{Attribution, AttributionConfig},
    cluster::{ChangeLog, ClusterSnapshot, Lineage, PodRecord},
    identity::kube::{ObjectEvent, SnapshotWriter},
    policy::api::calico::{CalicoNetworkPolicy, CalicoTier, GlobalNetworkPolicy},
    policy::api::cluster::{AdminNetworkPolicy, BaselineAdminNetworkPolicy},
    policy::{EngineOptions, Peer, PolicyEngine, Protocol},
};
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

const NAMESPACES: [&str; 4] = ["a", "b", "c", "d"];
const APPS: [&str; 4] = ["web", "api", "db", "cache"];
const TEAMS: [&str; 3] = ["red", "blue", "green"];
const PORTS: [u16; 4] = [80, 443, 8080, 9000];

fn from<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("valid object")
}

/// A small pool of addresses, so that they get reused and contested.
fn pod_ip(i: usize) -> String {
    format!("10.1.0.{}", i % 24 + 1)
}

/// The node's address, which every hostNetwork pod has.
const NODE_IP: &str = "10.0.0.1";

/// Another node's address, for cluster policies' `nodes` peers.
const OTHER_NODE_IP: &str = "10.0.0.2";

const ZONES: [&str; 2] = ["east", "west"];

fn cluster_action(rng: &mut Rng, pass: bool) -> &'static str {
    match rng.below(if pass { 3 } else { 2 }) {
        0 => "Allow",
        1 => "Deny",
        _ => "Pass",
    }
}

/// A cluster policy's peer: namespaces, pods, and for egress nodes and
/// networks.
fn cluster_peer(rng: &mut Rng, egress: bool) -> Value {
    match rng.below(if egress { 4 } else { 2 }) {
        0 => json!({"namespaces": {"matchLabels": {"team": rng.pick(&TEAMS)}}}),
        1 => json!({"pods": {
            "namespaceSelector": {},
            "podSelector": {"matchLabels": {"app": rng.pick(&APPS)}},
        }}),
        2 => json!({"nodes": {"matchLabels": {"zone": rng.pick(&ZONES)}}}),
        _ => json!({"networks": ["10.1.0.0/28"]}),
    }
}

/// A cluster policy's subject and rules.
fn cluster_spec(rng: &mut Rng, pass: bool) -> Value {
    let subject = if rng.chance(50) {
        json!({"namespaces": {"matchLabels": {"team": rng.pick(&TEAMS)}}})
    } else {
        json!({"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": rng.pick(&APPS)}}}})
    };
    let ports = if rng.chance(30) {
        json!([{"namedPort": "http"}])
    } else {
        json!([{"portNumber": {"port": rng.pick(&PORTS)}}])
    };
    let mut spec = json!({
        "subject": subject,
        "ingress": [{"name": "in", "action": cluster_action(rng, pass), "from": [cluster_peer(rng, false)], "ports": ports}],
    });
    if rng.chance(60) {
        spec["egress"] = json!([{"name": "out", "action": cluster_action(rng, pass), "to": [cluster_peer(rng, true)]}]);
    }
    spec
}

fn service_ip(i: usize) -> String {
    format!("10.96.0.{}", i + 1)
}

struct Cluster {
    rng: Rng,
    version: u64,
    clock: u64,
}

impl Cluster {
    fn version(&mut self) -> String {
        self.version += 1;
        self.version.to_string()
    }

    fn pod(&mut self, name: &str) -> Pod {
        let rng = &mut self.rng;
        let namespace = *rng.pick(&NAMESPACES);
        let app = *rng.pick(&APPS);
        let mut labels = json!({"app": app, "pod-template-hash": format!("h{}", rng.below(3))});
        if rng.chance(50) {
            labels["tier"] = json!(rng.pick(&["front", "back"]));
        }
        let phase = *rng.pick(&["Running", "Running", "Running", "Pending", "Succeeded"]);
        let host = rng.chance(8);
        // hostNetwork pods share the node's address; some pods have none
        // yet (just scheduled).
        let ip = if host {
            Some(NODE_IP.to_string())
        } else {
            rng.chance(85).then(|| pod_ip(rng.below(40)))
        };
        let ready = rng.chance(70);
        let service_account = *rng.pick(&["default", "builder", "frontend"]);
        let owner = rng.chance(60).then(|| format!("{app}-rs{}", rng.below(2)));
        self.clock += 1;
        let created = 1_700_000_000 + self.clock;
        let version = self.version();
        // Same name, same namespace most of the time; a new UID when
        // recreated.
        let uid = format!("{namespace}-{name}-{}", self.rng.below(2));
        let mut pod = json!({
            "metadata": {
                "name": name, "namespace": namespace, "uid": uid,
                "resourceVersion": version, "labels": labels,
                "creationTimestamp": rfc3339(created),
            },
            "spec": {
                "nodeName": "node-1", "hostNetwork": host,
                "serviceAccountName": service_account,
                "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}],
            },
            "status": {
                "phase": phase,
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
            },
        });
        if let Some(ip) = ip {
            pod["status"]["podIP"] = json!(ip);
        }
        if let Some(owner) = owner {
            pod["metadata"]["ownerReferences"] = json!([{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": owner,
                "uid": "rs", "controller": true,
            }]);
        }
        from(pod)
    }

    fn namespace(&mut self, name: &str) -> Namespace {
        let team = *self.rng.pick(&TEAMS);
        let version = self.version();
        from(
            json!({"metadata": {"name": name, "labels": {"team": team}, "resourceVersion": version}}),
        )
    }

    fn policy(&mut self, name: &str) -> NetworkPolicy {
        let rng = &mut self.rng;
        let namespace = *rng.pick(&NAMESPACES);
        let selector = if rng.chance(30) {
            json!({})
        } else {
            json!({"matchLabels": {"app": rng.pick(&APPS)}})
        };
        let peer = match rng.below(4) {
            0 => json!({"podSelector": {"matchLabels": {"app": rng.pick(&APPS)}}}),
            1 => json!({"namespaceSelector": {"matchLabels": {"team": rng.pick(&TEAMS)}}}),
            2 => json!({"ipBlock": {"cidr": "10.1.0.0/28"}}),
            _ => json!({
                "namespaceSelector": {},
                "podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["front"]}]},
            }),
        };
        let port = if rng.chance(30) {
            json!({"port": "http"})
        } else {
            json!({"port": rng.pick(&PORTS)})
        };
        let mut spec =
            json!({"podSelector": selector, "ingress": [{"from": [peer], "ports": [port]}]});
        if rng.chance(40) {
            spec["egress"] = json!([{"to": [{"podSelector": {}}]}]);
        }
        if rng.chance(20) {
            spec["ingress"] = json!([]);
        }
        from(json!({"metadata": {"name": name, "namespace": namespace}, "spec": spec}))
    }

    fn admin_policy(&mut self, name: &str) -> AdminNetworkPolicy {
        let mut spec = cluster_spec(&mut self.rng, true);
        spec["priority"] = json!(self.rng.below(3) * 10);
        from(json!({"metadata": {"name": name}, "spec": spec}))
    }

    fn baseline_policy(&mut self) -> BaselineAdminNetworkPolicy {
        let spec = cluster_spec(&mut self.rng, false);
        from(json!({"metadata": {"name": "default"}, "spec": spec}))
    }

    fn node(&mut self, i: usize) -> Node {
        let zone = *self.rng.pick(&ZONES);
        let address = [NODE_IP, OTHER_NODE_IP][i % 2];
        let version = self.version();
        from(json!({
            "metadata": {"name": format!("node-{}", i + 1), "labels": {"zone": zone}, "resourceVersion": version},
            "status": {"addresses": [{"type": "InternalIP", "address": address}]},
        }))
    }

    fn service(&mut self, i: usize) -> Service {
        let rng = &mut self.rng;
        let app = *rng.pick(&APPS);
        from(json!({
            "metadata": {"name": format!("svc-{i}"), "namespace": "a"},
            "spec": {
                "clusterIP": service_ip(i),
                "selector": {"app": app},
                "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
            },
        }))
    }

    fn slice(&mut self, i: usize) -> EndpointSlice {
        let rng = &mut self.rng;
        let service = format!("svc-{}", rng.below(4));
        let endpoints: Vec<Value> = (0..rng.below(3))
            .map(|_| json!({"addresses": [pod_ip(rng.below(40))], "conditions": {"ready": rng.chance(50)}}))
            .collect();
        from(json!({
            "metadata": {
                "name": format!("slice-{i}"), "namespace": "a",
                "labels": {"kubernetes.io/service-name": service},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": endpoints,
        }))
    }

    fn replica_set(&mut self, name: &str, namespace: &str) -> ReplicaSet {
        let deployment = format!("deploy-{}", self.rng.below(3));
        from(json!({
            "metadata": {
                "name": name, "namespace": namespace,
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment, "uid": "d", "controller": true}],
            },
        }))
    }

    /// A Calico policy's spec: selectors on pod and namespace labels,
    /// service accounts, Services, nets and named ports, in the default
    /// tier or one ahead of it.
    fn calico_spec(&mut self, global: bool) -> Value {
        let rng = &mut self.rng;
        let action = |rng: &mut Rng| *rng.pick(&["Allow", "Deny", "Pass"]);
        let entity = |rng: &mut Rng, egress: bool| match rng.below(if egress { 7 } else { 6 }) {
            0 => json!({"selector": format!("app == '{}'", rng.pick(&APPS))}),
            1 => json!({"namespaceSelector": format!("team == '{}'", rng.pick(&TEAMS))}),
            2 => json!({"serviceAccounts": {"names": [rng.pick(&["builder", "frontend"])]}}),
            3 => json!({"nets": ["10.1.0.0/28"]}),
            4 => {
                json!({"selector": format!("projectcalico.org/namespace == '{}'", rng.pick(&NAMESPACES))})
            }
            5 => json!({"serviceAccounts": {"selector": "projectcalico.org/name == 'default'"}}),
            _ => json!({"services": {"name": format!("svc-{}", rng.below(4)), "namespace": "a"}}),
        };
        let selector = rng
            .pick(&["all()", "app == 'web'", "has(tier)", "app in {'api', 'db'}"])
            .to_string();
        let port = if rng.chance(30) {
            json!("http")
        } else {
            json!(rng.pick(&PORTS))
        };
        let mut spec = json!({
            "tier": rng.pick(&["default", "security"]),
            "order": rng.below(3) * 10,
            "selector": selector,
            "types": ["Ingress", "Egress"],
            "ingress": [{"action": action(rng), "protocol": "TCP", "source": entity(rng, false), "destination": {"ports": [port]}}],
            "egress": [{"action": action(rng), "protocol": "TCP", "destination": entity(rng, true)}],
        });
        if global && rng.chance(50) {
            spec["namespaceSelector"] = json!(format!("team == '{}'", rng.pick(&TEAMS)));
        }
        if rng.chance(20) {
            spec["serviceAccountSelector"] = json!("projectcalico.org/name == 'builder'");
        }
        spec
    }

    fn calico_policy(&mut self, name: &str) -> CalicoNetworkPolicy {
        let namespace = *self.rng.pick(&NAMESPACES);
        let spec = self.calico_spec(false);
        // Calico names a tiered policy after its tier.
        let name = match spec["tier"].as_str() {
            Some("security") => format!("security.{name}"),
            _ => name.to_string(),
        };
        from(json!({"metadata": {"name": name, "namespace": namespace}, "spec": spec}))
    }

    fn global_policy(&mut self, name: &str) -> GlobalNetworkPolicy {
        let spec = self.calico_spec(true);
        let name = match spec["tier"].as_str() {
            Some("security") => format!("security.{name}"),
            _ => name.to_string(),
        };
        from(json!({"metadata": {"name": name}, "spec": spec}))
    }

    fn tier(&mut self) -> CalicoTier {
        let action = *self.rng.pick(&["Deny", "Pass"]);
        from(
            json!({"metadata": {"name": "security"}, "spec": {"order": 100, "defaultAction": action}}),
        )
    }

    /// One random Calico event (the cluster runs Calico).
    fn calico_event(&mut self) -> ObjectEvent {
        let delete = self.rng.chance(25);
        match self.rng.below(5) {
            0 | 1 => {
                let name = format!("cnp-{}", self.rng.below(4));
                let policy = self.calico_policy(&name);
                if delete {
                    return ObjectEvent::CalicoNetworkPolicy(Event::Delete(policy));
                }
                ObjectEvent::CalicoNetworkPolicy(Event::Apply(policy))
            }
            2 | 3 => {
                let name = format!("gnp-{}", self.rng.below(3));
                let policy = self.global_policy(&name);
                if delete {
                    return ObjectEvent::GlobalNetworkPolicy(Event::Delete(policy));
                }
                ObjectEvent::GlobalNetworkPolicy(Event::Apply(policy))
            }
            _ => ObjectEvent::CalicoTier(Event::Apply(self.tier())),
        }
    }

    /// One random watch event.
    fn event(&mut self, snapshot: &ClusterSnapshot) -> ObjectEvent {
        let delete = self.rng.chance(25);
        match self.rng.below(12) {
            0..=3 => {
                let name = format!("pod-{}", self.rng.below(30));
                if delete
                    && let Some(p) = snapshot
                        .pods
                        .get(self.rng.below(snapshot.pods.len().max(1)))
                {
                    return ObjectEvent::Pod(Event::Delete(p.clone()));
                }
                ObjectEvent::Pod(Event::Apply(self.pod(&name).into()))
            }
            4 => {
                let name = *self.rng.pick(&NAMESPACES);
                if delete {
                    return ObjectEvent::Namespace(Event::Delete(from(
                        json!({"metadata": {"name": name}}),
                    )));
                }
                ObjectEvent::Namespace(Event::Apply(self.namespace(name)))
            }
            5 => {
                let i = self.rng.below(4);
                if delete {
                    let svc = self.service(i);
                    return ObjectEvent::Service(Event::Delete(svc));
                }
                ObjectEvent::Service(Event::Apply(self.service(i)))
            }
            6 => {
                let i = self.rng.below(6);
                if delete {
                    return ObjectEvent::EndpointSlice(Event::Delete(self.slice(i)));
                }
                ObjectEvent::EndpointSlice(Event::Apply(self.slice(i)))
            }
            7 | 8 => {
                let name = format!("np-{}", self.rng.below(12));
                let policy = self.policy(&name);
                if delete {
                    return ObjectEvent::NetworkPolicy(Event::Delete(policy));
                }
                ObjectEvent::NetworkPolicy(Event::Apply(policy))
            }
            9 => {
                if self.rng.chance(30) {
                    let policy = self.baseline_policy();
                    if delete {
                        return ObjectEvent::BaselineAdminNetworkPolicy(Event::Delete(policy));
                    }
                    return ObjectEvent::BaselineAdminNetworkPolicy(Event::Apply(policy));
                }
                let name = format!("anp-{}", self.rng.below(4));
                let policy = self.admin_policy(&name);
                if delete {
                    return ObjectEvent::AdminNetworkPolicy(Event::Delete(policy));
                }
                ObjectEvent::AdminNetworkPolicy(Event::Apply(policy))
            }
            10 => {
                let i = self.rng.below(2);
                let node = self.node(i);
                if delete {
                    return ObjectEvent::Node(Event::Delete(node));
                }
                ObjectEvent::Node(Event::Apply(node))
            }
            _ => {
                let app = *self.rng.pick(&APPS);
                let name = format!("{app}-rs{}", self.rng.below(2));
                let namespace = *self.rng.pick(&NAMESPACES);
                let rs = self.replica_set(&name, namespace);
                if delete {
                    return ObjectEvent::ReplicaSet(Event::Delete(rs));
                }
                ObjectEvent::ReplicaSet(Event::Apply(rs))
            }
        }
    }
}

fn rfc3339(secs: u64) -> String {
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
    k8s_openapi::jiff::Timestamp::try_from(at)
        .expect("valid time")
        .to_string()
}

fn attribution() -> Attribution {
    Attribution::new(AttributionConfig {
        node_name: "node-1".into(),
        tombstone_grace: Duration::from_secs(30),
        ..AttributionConfig::default()
    })
}

/// Every address of the pools, resolved by both, at `at` and a little
/// before (tombstones and closed tenures).
fn assert_same_identity(inc: &Attribution, full: &Attribution, at: SystemTime, step: usize) {
    let ips = (0..24)
        .map(pod_ip)
        .chain((0..5).map(service_ip))
        .chain(["192.0.2.1", NODE_IP, OTHER_NODE_IP].map(String::from));
    for ip in ips {
        let ip: IpAddr = ip.parse().unwrap();
        for when in [
            at,
            at - Duration::from_secs(7),
            at - Duration::from_secs(40),
        ] {
            for port in [None, Some(80), Some(8080)] {
                assert_eq!(
                    format!("{:?}", inc.identity().resolve(ip, port, when)),
                    format!("{:?}", full.identity().resolve(ip, port, when)),
                    "step {step}: {ip}:{port:?} resolves differently"
                );
            }
            assert_eq!(
                inc.identity().service_readiness(ip, 80, 6),
                full.identity().service_readiness(ip, 80, 6),
                "step {step}: readiness of {ip}"
            );
        }
    }
    for ns in NAMESPACES {
        assert_eq!(
            inc.identity().namespace_labels(ns),
            full.identity().namespace_labels(ns),
            "step {step}: labels of namespace {ns}"
        );
        let mut a: Vec<String> = inc
            .identity()
            .pods_in(ns)
            .map(|p| format!("{p:?}"))
            .collect();
        let mut b: Vec<String> = full
            .identity()
            .pods_in(ns)
            .map(|p| format!("{p:?}"))
            .collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "step {step}: pods of namespace {ns}");
    }
}

/// Sampled flows between pods, addresses and hypothetical pods.
fn assert_same_verdicts(inc: &Attribution, snapshot: &ClusterSnapshot, rng: &mut Rng, step: usize) {
    let Ok(fresh) = PolicyEngine::new(snapshot, EngineOptions::default()) else {
        return;
    };
    let mut peers: Vec<Peer> = snapshot
        .pods
        .iter()
        .map(|p| Peer::Pod {
            namespace: p.namespace().to_owned(),
            name: p.name().unwrap().to_owned(),
        })
        .collect();
    peers.extend((0..24).map(|i| Peer::Ip(pod_ip(i).parse().unwrap())));
    peers.push(Peer::Ip("192.0.2.1".parse().unwrap()));
    peers.push(Peer::Ip(NODE_IP.parse().unwrap()));
    peers.push(Peer::Ip(OTHER_NODE_IP.parse().unwrap()));
    peers.push(Peer::Hypothetical {
        namespace: "b".into(),
        labels: [("app".to_string(), "web".to_string())].into(),
    });
    for _ in 0..150 {
        let from = rng.pick(&peers).clone();
        let to = rng.pick(&peers).clone();
        let port = *rng.pick(&PORTS);
        let got = inc
            .verdict(&from, &to, None, port, Protocol::Tcp)
            .expect("an engine");
        let want = fresh.evaluate(&from, &to, port, Protocol::Tcp);
        if got != want {
            let (a, b) = (format!("{got:#?}"), format!("{want:#?}"));
            let at = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
            let start = at.saturating_sub(600);
            panic!(
                "step {step}: {from} -> {to}:{port} differs:\nincremental: ...{}\nrebuilt: ...{}",
                &a[start..(at + 300).min(a.len())],
                &b[start..(at + 300).min(b.len())]
            );
        }
        assert_eq!(got.sentence(), want.sentence());
    }
}

/// How the incremental side gets its snapshots.
#[derive(Clone, Copy, PartialEq)]
enum Feed {
    /// As the API source publishes them, with its change log.
    Api,
    /// Each loaded afresh, as a manifest reload: a [`Lineage`] records
    /// what differs from the last.
    Reload,
}

fn run(seed: u64, steps: usize, feed: Feed, calico: bool) -> (usize, usize) {
    let mut cluster = Cluster {
        rng: Rng(seed),
        version: 0,
        clock: 0,
    };
    let mut check_rng = Rng(seed ^ 0x9e37_79b9);
    let mut writer = SnapshotWriter::default();
    let mut snapshot = ClusterSnapshot::default();
    // The initial lists: a re-list of every kind read here.
    let mut initial: Vec<ObjectEvent> = Vec::new();
    macro_rules! list {
        ($kind:ident, $objects:expr) => {{
            initial.push(ObjectEvent::$kind(Event::Init));
            for o in $objects {
                initial.push(ObjectEvent::$kind(Event::InitApply(o)));
            }
            initial.push(ObjectEvent::$kind(Event::InitDone));
        }};
    }
    let namespaces: Vec<Namespace> = NAMESPACES.iter().map(|n| cluster.namespace(n)).collect();
    list!(Namespace, namespaces);
    let pods: Vec<Pod> = (0..20).map(|i| cluster.pod(&format!("pod-{i}"))).collect();
    list!(Pod, pods.into_iter().map(PodRecord::from));
    let policies: Vec<NetworkPolicy> = (0..8).map(|i| cluster.policy(&format!("np-{i}"))).collect();
    list!(NetworkPolicy, policies);
    let services: Vec<Service> = (0..3).map(|i| cluster.service(i)).collect();
    list!(Service, services);
    let slices: Vec<EndpointSlice> = (0..3).map(|i| cluster.slice(i)).collect();
    list!(EndpointSlice, slices);
    let nodes: Vec<Node> = (0..2).map(|i| cluster.node(i)).collect();
    list!(Node, nodes);
    let admin: Vec<AdminNetworkPolicy> = (0..2)
        .map(|i| cluster.admin_policy(&format!("anp-{i}")))
        .collect();
    list!(AdminNetworkPolicy, admin);
    let baseline = vec![cluster.baseline_policy()];
    list!(BaselineAdminNetworkPolicy, baseline);
    if calico {
        let tiers = vec![cluster.tier()];
        list!(CalicoTier, tiers);
        let policies: Vec<CalicoNetworkPolicy> = (0..2)
            .map(|i| cluster.calico_policy(&format!("cnp-{i}")))
            .collect();
        list!(CalicoNetworkPolicy, policies);
        let policies: Vec<GlobalNetworkPolicy> = (0..2)
            .map(|i| cluster.global_policy(&format!("gnp-{i}")))
            .collect();
        list!(GlobalNetworkPolicy, policies);
    }
    for event in initial {
        writer.apply(event, || &mut snapshot);
    }

    let mut inc = attribution();
    let mut full = attribution();
    let mut lineage = Lineage::default();
    let mut now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_100);
    let mut applied = 0;
    for step in 0..steps {
        if step > 0 {
            for _ in 0..1 + cluster.rng.below(4) {
                if cluster.rng.chance(4) {
                    // A re-list of pods after a watch gap: events were
                    // missed, so some pods are gone, changed or new.
                    let mut pods = snapshot.pods.clone();
                    for _ in 0..cluster.rng.below(4) {
                        if !pods.is_empty() && cluster.rng.chance(40) {
                            let at = cluster.rng.below(pods.len());
                            pods.remove(at);
                        } else {
                            let name = format!("pod-{}", cluster.rng.below(30));
                            let pod = PodRecord::from(cluster.pod(&name));
                            match pods.iter().position(|p| {
                                p.name() == pod.name() && p.namespace() == pod.namespace()
                            }) {
                                Some(at) => pods[at] = pod,
                                None => pods.push(pod),
                            }
                        }
                    }
                    writer.apply(ObjectEvent::Pod(Event::Init), || &mut snapshot);
                    for pod in pods {
                        writer.apply(ObjectEvent::Pod(Event::InitApply(pod)), || &mut snapshot);
                    }
                    writer.apply(ObjectEvent::Pod(Event::InitDone), || &mut snapshot);
                } else if cluster.rng.chance(15)
                    && let Some(old) = snapshot
                        .pods
                        .get(cluster.rng.below(snapshot.pods.len().max(1)))
                        .cloned()
                {
                    // A pod deleted and another (any name, often a new
                    // one) taking its address in the same batch, as a
                    // node's IPAM reuses it.
                    let name = format!("pod-{}", cluster.rng.below(30));
                    let mut new = cluster.pod(&name);
                    let address = old.pod_ip().map(|ip| ip.to_string());
                    let host = new.spec.as_ref().and_then(|s| s.host_network) == Some(true);
                    if let Some(status) = new.status.as_mut()
                        && !host
                    {
                        status.pod_ip = address;
                    }
                    writer.apply(ObjectEvent::Pod(Event::Delete(old)), || &mut snapshot);
                    writer.apply(ObjectEvent::Pod(Event::Apply(new.into())), || &mut snapshot);
                } else if calico && cluster.rng.chance(20) {
                    let event = cluster.calico_event();
                    writer.apply(event, || &mut snapshot);
                } else {
                    let event = cluster.event(&snapshot);
                    writer.apply(event, || &mut snapshot);
                }
            }
        }
        now += Duration::from_secs(1 + cluster.rng.below(10) as u64);
        let shared = match feed {
            Feed::Api => Arc::new(snapshot.clone()),
            Feed::Reload => {
                let mut loaded = ClusterSnapshot {
                    changes: ChangeLog::default(),
                    ..snapshot.clone()
                };
                lineage.follow(&mut loaded);
                Arc::new(loaded)
            }
        };
        inc.update(&shared, true, now);
        // The same objects under a new log: a rebuild.
        let rebuilt = ClusterSnapshot {
            changes: ChangeLog::default(),
            ..snapshot.clone()
        };
        full.update(&rebuilt, true, now);
        applied += 1;
        assert_same_identity(&inc, &full, now, step);
        assert_same_verdicts(&inc, &snapshot, &mut check_rng, step);
    }
    let counts = inc.update_counts();
    assert_eq!(counts.incremental + counts.rebuilds, applied as u64);
    eprintln!(
        "seed {seed}: {} of {applied} incremental",
        counts.incremental
    );
    // Only the first snapshot rebuilds (re-lists are applied as what
    // they changed; Calico's tier is never deleted, so its tiers judge
    // throughout).
    assert!(
        counts.rebuilds == 1,
        "seed {seed}: only {} of {applied} updates were incremental",
        counts.incremental
    );
    assert_eq!(full.update_counts().incremental, 0);
    (applied, snapshot.changes.revision() as usize)
}

#[test]
fn incremental_updates_equal_full_rebuilds_over_random_change_sequences() {
    for seed in 1..=10u64 {
        let (steps, changes) = run(seed * 7919, 100, Feed::Api, false);
        assert!(
            steps == 100 && changes > 100,
            "seed {seed}: too few changes ({changes})"
        );
    }
}

#[test]
fn manifest_reloads_recorded_as_changes_equal_full_rebuilds() {
    for seed in 1..=6u64 {
        run(seed * 104_729, 80, Feed::Reload, false);
    }
}

/// The same with Calico's tiers judging: its policies (namespaced and
/// global, in two tiers) change too, and pods' service accounts, Services
/// and namespaces' labels reach Calico's endpoints.
#[test]
fn incremental_updates_with_calico_policies_equal_full_rebuilds() {
    for seed in 1..=8u64 {
        run(seed * 6151, 80, Feed::Api, true);
    }
    for seed in 1..=3u64 {
        run(seed * 3571, 60, Feed::Reload, true);
    }
}
