//! A pod as a [`ClusterSnapshot`](super::ClusterSnapshot) keeps it: what the
//! identity cache, the policy engine, lint, explain and suggest read, and
//! nothing else. A typed `Pod` is 2,176 bytes before anything it points to
//! (k8s-openapi keeps every optional field inline), and its one container
//! spec about 2 KB more; a record is a few hundred bytes with its strings.
//! Both sources convert at their edge: the manifests loader as it reads a
//! Pod, the API watcher as it receives one.

use std::{collections::BTreeMap, net::IpAddr, str::FromStr, time::SystemTime};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};

use super::LabelSet;
use crate::policy::{FieldProblem, Protocol, validate_label_key, validate_port_name};

/// A pod's identity, addresses, ports and state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PodRecord {
    /// `metadata.namespace`, `default` when unset.
    namespace: String,
    /// `metadata.name`; empty when unset (such a pod names nothing).
    name: String,
    /// `metadata.uid`; empty for manifest pods written without one.
    uid: String,
    resource_version: Option<String>,
    /// Shared with every pod, identity and policy model of equal labels.
    labels: LabelSet,
    /// The controller among `metadata.ownerReferences`, else the first.
    owner: Option<PodOwner>,
    node_name: Option<String>,
    service_account: Option<String>,
    /// `status.phase`: Pending, Running, Succeeded, Failed, Unknown.
    phase: Option<String>,
    /// `status.podIP` then `status.podIPs`, each once, those that parse.
    ips: Vec<IpAddr>,
    /// Container ports as the API validates them, containers' then init
    /// containers'.
    ports: Vec<PodPort>,
    /// `status.containerStatuses`: names and runtime IDs.
    containers: Vec<PodContainer>,
    created: Option<SystemTime>,
    started: Option<SystemTime>,
    deletion: Option<SystemTime>,
    host_network: bool,
    /// The `Ready` condition is `True`.
    ready: bool,
    /// `status.podIP` parsed: it is `ips[0]`.
    has_pod_ip: bool,
}

/// The owner a pod names (`metadata.ownerReferences`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodOwner {
    pub kind: String,
    pub name: String,
    /// `controller: true`: the owner manages the pod.
    pub controller: bool,
}

/// A container port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodPort {
    pub name: Option<String>,
    pub protocol: Protocol,
    pub port: u16,
    /// Declared by an init container (sidecars serve from there).
    pub init: bool,
}

/// A container of a pod and its runtime ID, without the `containerd://`
/// prefix.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodContainer {
    pub name: String,
    pub id: Option<String>,
}

impl PodRecord {
    /// Reads `pod`, reporting what cannot be read (an IP that does not
    /// parse, a container port the API would refuse, a label key) with its
    /// field, for the manifest loader to refuse; what cannot be read is left
    /// out of the record.
    pub fn read(pod: Pod) -> (PodRecord, Vec<FieldProblem>) {
        let mut problems = Vec::new();
        let Pod {
            metadata: meta,
            spec,
            status,
        } = pod;
        let mut ips: Vec<IpAddr> = Vec::new();
        let mut has_pod_ip = false;
        let mut phase = None;
        let mut ready = false;
        let mut started = None;
        let mut containers = Vec::new();
        if let Some(status) = status {
            if let Some(ip) = status.pod_ip.as_deref().filter(|s| !s.is_empty()) {
                match IpAddr::from_str(ip) {
                    Ok(ip) => {
                        ips.push(ip);
                        has_pod_ip = true;
                    }
                    Err(_) => problems.push(FieldProblem::new(
                        "status.podIP".into(),
                        format!("invalid IP address {ip:?}"),
                        "write a plain IPv4 or IPv6 address, e.g. 10.244.1.5, or remove the field"
                            .into(),
                    )),
                }
            }
            for (i, entry) in status.pod_ips.iter().flatten().enumerate() {
                match IpAddr::from_str(&entry.ip) {
                    Ok(ip) if !ips.contains(&ip) => ips.push(ip),
                    Ok(_) => {}
                    Err(_) => problems.push(FieldProblem::new(
                        format!("status.podIPs[{i}].ip"),
                        format!("invalid IP address {:?}", entry.ip),
                        "write a plain IPv4 or IPv6 address, e.g. 10.244.1.5".into(),
                    )),
                }
            }
            phase = status.phase;
            ready = status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            started = time(status.start_time);
            containers = status
                .container_statuses
                .into_iter()
                .flatten()
                .map(|c| PodContainer {
                    name: c.name,
                    // `containerd://<id>`, `cri-o://<id>`, `docker://<id>`
                    id: c
                        .container_id
                        .map(|id| id.split_once("://").map_or(&*id, |(_, id)| id).to_owned()),
                })
                .collect();
        }
        let mut ports = Vec::new();
        let mut node_name = None;
        let mut host_network = false;
        let mut service_account = None;
        if let Some(spec) = spec {
            let regular = spec.containers.iter().map(|c| ("containers", c));
            let init = spec
                .init_containers
                .iter()
                .flatten()
                .map(|c| ("initContainers", c));
            for (ci, (list, container)) in regular.chain(init).enumerate() {
                let ci = if list == "containers" {
                    ci
                } else {
                    ci - spec.containers.len()
                };
                for (pi, port) in container.ports.iter().flatten().enumerate() {
                    let path = format!("spec.{list}[{ci}].ports[{pi}]");
                    match read_port(port, &path) {
                        Ok((name, protocol, port)) => ports.push(PodPort {
                            name,
                            protocol,
                            port,
                            init: list == "initContainers",
                        }),
                        Err(p) => problems.push(p),
                    }
                }
            }
            node_name = spec.node_name;
            host_network = spec.host_network.unwrap_or(false);
            service_account = spec.service_account_name;
        }
        let labels = meta.labels.unwrap_or_default();
        for key in labels.keys() {
            if let Err(p) = validate_label_key(key, &format!("metadata.labels.{key}")) {
                problems.push(p);
            }
        }
        ips.shrink_to_fit();
        ports.shrink_to_fit();
        let record = PodRecord {
            namespace: meta
                .namespace
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "default".to_owned()),
            name: meta.name.unwrap_or_default(),
            uid: meta.uid.unwrap_or_default(),
            resource_version: meta.resource_version,
            labels: LabelSet::new(labels),
            owner: meta.owner_references.and_then(owner),
            node_name,
            service_account,
            phase,
            ips,
            ports,
            containers,
            created: time(meta.creation_timestamp),
            started,
            deletion: time(meta.deletion_timestamp),
            host_network,
            ready,
            has_pod_ip,
        };
        (record, problems)
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// `None` for a pod without a name.
    pub fn name(&self) -> Option<&str> {
        Some(self.name.as_str()).filter(|n| !n.is_empty())
    }

    /// `metadata.uid`; empty when the pod has none.
    pub fn uid(&self) -> &str {
        &self.uid
    }

    pub fn resource_version(&self) -> Option<&str> {
        self.resource_version.as_deref()
    }

    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.labels
    }

    /// The labels as the shared set, for holders that keep them.
    pub fn label_set(&self) -> &LabelSet {
        &self.labels
    }

    /// The controller among the pod's owners, else its first owner.
    pub fn owner(&self) -> Option<&PodOwner> {
        self.owner.as_ref()
    }

    /// The pod's controller, if it names one.
    pub fn controller(&self) -> Option<&PodOwner> {
        self.owner.as_ref().filter(|o| o.controller)
    }

    pub fn node_name(&self) -> Option<&str> {
        self.node_name.as_deref()
    }

    pub fn host_network(&self) -> bool {
        self.host_network
    }

    /// `spec.serviceAccountName`.
    pub fn service_account(&self) -> Option<&str> {
        self.service_account.as_deref()
    }

    pub fn phase(&self) -> Option<&str> {
        self.phase.as_deref()
    }

    /// The `Ready` condition is `True`.
    pub fn ready(&self) -> bool {
        self.ready
    }

    /// Every address of the pod, `status.podIP` first.
    pub fn ips(&self) -> &[IpAddr] {
        &self.ips
    }

    /// `status.podIP`.
    pub fn pod_ip(&self) -> Option<IpAddr> {
        self.ips.first().copied().filter(|_| self.has_pod_ip)
    }

    /// Container ports, containers' then init containers'.
    pub fn ports(&self) -> &[PodPort] {
        &self.ports
    }

    /// Container names and runtime IDs (`status.containerStatuses`).
    pub fn containers(&self) -> &[PodContainer] {
        &self.containers
    }

    /// `metadata.creationTimestamp`.
    pub fn created(&self) -> Option<SystemTime> {
        self.created
    }

    /// `status.startTime`.
    pub fn started(&self) -> Option<SystemTime> {
        self.started
    }

    /// `metadata.deletionTimestamp`.
    pub fn deletion(&self) -> Option<SystemTime> {
        self.deletion
    }

    /// Drops what the agent does not read of a pod the API watcher would
    /// have stripped (`strip_pod`): init containers' ports.
    pub fn strip(&mut self) {
        self.ports.retain(|p| !p.init);
        self.ports.shrink_to_fit();
    }

    /// Replaces the labels (tests and benchmarks that edit a snapshot).
    pub fn set_labels(&mut self, labels: BTreeMap<String, String>) {
        self.labels = LabelSet::new(labels);
    }

    /// Sets `metadata.resourceVersion` (tests and benchmarks).
    pub fn set_resource_version(&mut self, version: Option<String>) {
        self.resource_version = version;
    }

    /// Sets the addresses, the first as `status.podIP` (tests and
    /// benchmarks).
    pub fn set_ips(&mut self, ips: Vec<IpAddr>) {
        self.has_pod_ip = !ips.is_empty();
        self.ips = ips;
    }
}

impl PodRecord {
    /// The record as a typed Pod (writing a snapshot back out as a
    /// manifest): what the record holds, nothing else. Container ports are
    /// under one container (`c`) and one init container (`init`).
    pub fn to_pod(&self) -> Pod {
        use k8s_openapi::api::core::v1::{
            Container, ContainerPort, ContainerStatus, PodCondition, PodIP, PodSpec, PodStatus,
        };
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
        let ports = |init: bool| -> Vec<Container> {
            let ports: Vec<ContainerPort> = self
                .ports
                .iter()
                .filter(|p| p.init == init)
                .map(|p| ContainerPort {
                    name: p.name.clone(),
                    container_port: i32::from(p.port),
                    protocol: Some(p.protocol.as_str().to_owned()),
                    ..ContainerPort::default()
                })
                .collect();
            if ports.is_empty() {
                return Vec::new();
            }
            vec![Container {
                name: if init { "init" } else { "c" }.to_owned(),
                ports: Some(ports),
                ..Container::default()
            }]
        };
        let init_containers = ports(true);
        let time = |t: Option<SystemTime>| {
            t.and_then(|t| k8s_openapi::jiff::Timestamp::try_from(t).ok())
                .map(Time)
        };
        Pod {
            metadata: ObjectMeta {
                namespace: Some(self.namespace.clone()),
                name: self.name().map(str::to_owned),
                uid: Some(self.uid.clone()).filter(|u| !u.is_empty()),
                resource_version: self.resource_version.clone(),
                labels: Some(self.labels().clone()).filter(|l| !l.is_empty()),
                owner_references: self.owner.as_ref().map(|o| {
                    vec![OwnerReference {
                        kind: o.kind.clone(),
                        name: o.name.clone(),
                        controller: o.controller.then_some(true),
                        ..OwnerReference::default()
                    }]
                }),
                creation_timestamp: time(self.created),
                deletion_timestamp: time(self.deletion),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                containers: ports(false),
                init_containers: Some(init_containers).filter(|c| !c.is_empty()),
                node_name: self.node_name.clone(),
                host_network: self.host_network.then_some(true),
                service_account_name: self.service_account.clone(),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: self.phase.clone(),
                pod_ip: self.pod_ip().map(|ip| ip.to_string()),
                pod_ips: Some(
                    self.ips
                        .iter()
                        .map(|ip| PodIP { ip: ip.to_string() })
                        .collect(),
                )
                .filter(|ips: &Vec<PodIP>| !ips.is_empty()),
                conditions: self.ready.then(|| {
                    vec![PodCondition {
                        type_: "Ready".into(),
                        status: "True".into(),
                        ..PodCondition::default()
                    }]
                }),
                container_statuses: Some(
                    self.containers
                        .iter()
                        .map(|c| ContainerStatus {
                            name: c.name.clone(),
                            container_id: c.id.clone(),
                            ..ContainerStatus::default()
                        })
                        .collect(),
                )
                .filter(|c: &Vec<ContainerStatus>| !c.is_empty()),
                start_time: time(self.started),
                ..PodStatus::default()
            }),
        }
    }
}

impl From<Pod> for PodRecord {
    /// What [`PodRecord::read`] reads; problems are logged (the API server
    /// validates what it stores, so there should be none).
    fn from(pod: Pod) -> Self {
        let (record, problems) = PodRecord::read(pod);
        for p in problems {
            tracing::warn!("pod {}/{}: {p}", record.namespace, record.name);
        }
        record
    }
}

fn read_port(
    port: &k8s_openapi::api::core::v1::ContainerPort,
    path: &str,
) -> Result<(Option<String>, Protocol, u16), FieldProblem> {
    let protocol = match port.protocol.as_deref() {
        None => Protocol::Tcp,
        Some(p) => Protocol::from_api(p).ok_or_else(|| {
            FieldProblem::new(
                format!("{path}.protocol"),
                format!("unknown protocol {p:?}"),
                "use TCP, UDP or SCTP".into(),
            )
        })?,
    };
    let number = u16::try_from(port.container_port)
        .ok()
        .filter(|p| *p >= 1)
        .ok_or_else(|| {
            FieldProblem::new(
                format!("{path}.containerPort"),
                format!("port {} is out of range", port.container_port),
                "use a port from 1 to 65535".into(),
            )
        })?;
    if let Some(name) = &port.name {
        validate_port_name(name, &format!("{path}.name"))?;
    }
    Ok((port.name.clone(), protocol, number))
}

/// The controller among `owners`, else the first.
fn owner(owners: Vec<OwnerReference>) -> Option<PodOwner> {
    let at = owners
        .iter()
        .position(|o| o.controller == Some(true))
        .unwrap_or(0);
    let o = owners.into_iter().nth(at)?;
    Some(PodOwner {
        controller: o.controller == Some(true),
        kind: o.kind,
        name: o.name,
    })
}

fn time(t: Option<Time>) -> Option<SystemTime> {
    t.map(|t| SystemTime::from(t.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000 + secs)
    }

    fn typed(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn a_typed_pod_converts_to_a_record_keeping_what_identity_and_policy_read() {
        let pod = typed(serde_json::json!({
            "metadata": {
                "name": "web-7d9c5b-x1", "namespace": "prod", "uid": "u1", "resourceVersion": "42",
                "labels": {"app": "web", "pod-template-hash": "7d9c5b"},
                "annotations": {"note": "dropped"},
                "creationTimestamp": "2023-11-14T22:13:20Z",
                "deletionTimestamp": "2023-11-14T22:15:00Z",
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "ConfigMap", "name": "not-the-controller", "uid": "c"},
                    {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9c5b", "uid": "r", "controller": true}
                ]
            },
            "spec": {
                "nodeName": "node-a", "hostNetwork": true, "serviceAccountName": "web-sa",
                "containers": [
                    {"name": "web", "image": "nginx", "ports": [{"name": "http", "containerPort": 8080}]},
                    {"name": "stats", "ports": [{"name": "metrics", "containerPort": 9090, "protocol": "UDP"},
                                                {"containerPort": 9091, "protocol": "SCTP"}]},
                    {"name": "log"}
                ],
                "initContainers": [{"name": "proxy", "ports": [{"name": "proxy", "containerPort": 15001}]}]
            },
            "status": {
                "phase": "Running", "podIP": "10.0.0.5",
                "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}],
                "startTime": "2023-11-14T22:13:30Z",
                "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}],
                "containerStatuses": [{"name": "web", "containerID": "containerd://abc", "image": "nginx",
                                       "imageID": "sha", "ready": true, "restartCount": 0}]
            }
        }));
        let (record, problems) = PodRecord::read(pod);
        assert_eq!(problems, []);
        assert_eq!(
            (record.namespace(), record.name(), record.uid()),
            ("prod", Some("web-7d9c5b-x1"), "u1")
        );
        assert_eq!(record.resource_version(), Some("42"));
        assert_eq!(
            record.labels().iter().collect::<Vec<_>>(),
            [
                (&"app".to_owned(), &"web".to_owned()),
                (&"pod-template-hash".to_owned(), &"7d9c5b".to_owned())
            ]
        );
        // The controller, not the first owner.
        let owner = PodOwner {
            kind: "ReplicaSet".into(),
            name: "web-7d9c5b".into(),
            controller: true,
        };
        assert_eq!(record.owner(), Some(&owner));
        assert_eq!(record.controller(), Some(&owner));
        assert_eq!(record.node_name(), Some("node-a"));
        assert!(record.host_network());
        assert_eq!(record.service_account(), Some("web-sa"));
        assert_eq!(record.phase(), Some("Running"));
        assert!(record.ready());
        let ips: Vec<IpAddr> = vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()];
        assert_eq!(record.ips(), ips);
        assert_eq!(record.pod_ip(), Some(ips[0]));
        // Every container's ports, then the init containers'.
        let port = |name: Option<&str>, protocol, port, init| PodPort {
            name: name.map(str::to_owned),
            protocol,
            port,
            init,
        };
        assert_eq!(
            record.ports(),
            [
                port(Some("http"), Protocol::Tcp, 8080, false),
                port(Some("metrics"), Protocol::Udp, 9090, false),
                port(None, Protocol::Sctp, 9091, false),
                port(Some("proxy"), Protocol::Tcp, 15001, true),
            ]
        );
        assert_eq!(
            record.containers(),
            [PodContainer {
                name: "web".into(),
                id: Some("abc".into())
            }]
        );
        assert_eq!(record.created(), Some(at(0)));
        assert_eq!(record.started(), Some(at(10)));
        assert_eq!(record.deletion(), Some(at(100)));
        // Written back as a typed Pod, it reads as the same record.
        assert_eq!(PodRecord::from(record.to_pod()), record);

        // What the API watcher strips of a pod.
        let mut stripped = record.clone();
        stripped.strip();
        assert_eq!(stripped.ports().len(), 3);
        assert!(stripped.ports().iter().all(|p| !p.init));
        // Calico's service account rules read it.
        assert_eq!(stripped.service_account(), Some("web-sa"));
    }

    #[test]
    fn a_bare_pod_reads_as_defaults_and_what_cannot_be_read_is_reported() {
        let record = PodRecord::from(typed(serde_json::json!({"metadata": {"name": "a"}})));
        assert_eq!((record.namespace(), record.name()), ("default", Some("a")));
        assert_eq!((record.uid(), record.owner()), ("", None));
        assert!(!record.host_network() && !record.ready());
        assert_eq!((record.ips(), record.pod_ip()), (&[][..], None));
        // Only podIPs: addresses, but no podIP.
        let record = PodRecord::from(typed(serde_json::json!({
            "metadata": {"name": "a", "namespace": ""},
            "status": {"podIPs": [{"ip": "10.0.0.1"}], "conditions": [{"type": "Ready", "status": "False"}]}
        })));
        assert_eq!(record.namespace(), "default");
        assert_eq!(record.ips(), ["10.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(record.pod_ip(), None);
        assert!(!record.ready());

        let (record, problems) = PodRecord::read(typed(serde_json::json!({
            "metadata": {"name": "a", "labels": {"-bad": "x"}},
            "spec": {"containers": [{"name": "c", "ports": [
                {"containerPort": 80, "protocol": "tcp"},
                {"containerPort": 0},
                {"name": "Bad_Name", "containerPort": 81},
                {"name": "ok", "containerPort": 82}
            ]}]},
            "status": {"podIP": "10.0.0.300", "podIPs": [{"ip": "10.0.0.1"}]}
        })));
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "status.podIP",
                "spec.containers[0].ports[0].protocol",
                "spec.containers[0].ports[1].containerPort",
                "spec.containers[0].ports[2].name",
                "metadata.labels.-bad",
            ]
        );
        assert_eq!(record.ips(), ["10.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(record.pod_ip(), None);
        assert_eq!(
            record.ports(),
            [PodPort {
                name: Some("ok".into()),
                protocol: Protocol::Tcp,
                port: 82,
                init: false
            }]
        );
    }
}
