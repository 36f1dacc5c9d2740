//! Calico objects from YAML (what `calicoctl get -o yaml` prints, or the
//! `crd.projectcalico.org/v1` CRDs, which carry the same fields), and the
//! pods of a snapshot as Calico endpoints: what `--manifests` will hand
//! the evaluator once it is wired into the engine.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::Deserialize;

use super::evaluate::{CalicoEndpoint, CalicoObjects, ServiceBacking, StagedObjects};
use super::types::{
    CalicoNetworkPolicy, Crd, GlobalNetworkPolicy, StagedGlobalNetworkPolicy,
    StagedKubernetesNetworkPolicy, StagedNetworkPolicy, Tier,
};
use crate::cluster::{ClusterSnapshot, PodRecord};
use crate::policy::Labels;

/// The API versions Calico's objects are read from.
pub const API_VERSIONS: [&str; 2] = ["projectcalico.org/v3", "crd.projectcalico.org/v1"];

/// A Calico document that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: document {document}: {kind}: {problem}")]
pub struct CalicoManifestError {
    pub source_name: String,
    /// From 1.
    pub document: usize,
    pub kind: String,
    pub problem: String,
}

/// Calico objects as the watchers read them from the CRDs
/// (`crd.projectcalico.org/v1`): used when the Calico API server
/// (`projectcalico.org/v3`) serves nothing.
#[derive(Clone, Debug, Default)]
pub struct CalicoCrds {
    pub tiers: Vec<Crd<Tier>>,
    pub network_policies: Vec<Crd<CalicoNetworkPolicy>>,
    pub global_network_policies: Vec<Crd<GlobalNetworkPolicy>>,
    pub staged_network_policies: Vec<Crd<StagedNetworkPolicy>>,
    pub staged_global_network_policies: Vec<Crd<StagedGlobalNetworkPolicy>>,
    pub staged_kubernetes_network_policies: Vec<Crd<StagedKubernetesNetworkPolicy>>,
}

impl CalicoCrds {
    /// The same objects (the CRDs carry the v3 fields).
    pub fn to_manifests(&self) -> CalicoManifests {
        fn inner<T: Clone>(list: &[Crd<T>]) -> Vec<T> {
            list.iter().map(|c| c.0.clone()).collect()
        }
        CalicoManifests {
            tiers: inner(&self.tiers),
            network_policies: inner(&self.network_policies),
            global_network_policies: inner(&self.global_network_policies),
            staged_network_policies: inner(&self.staged_network_policies),
            staged_global_network_policies: inner(&self.staged_global_network_policies),
            staged_kubernetes_network_policies: inner(&self.staged_kubernetes_network_policies),
        }
    }

    /// Whether there is no Calico object at all.
    pub fn is_empty(&self) -> bool {
        self.tiers.is_empty()
            && self.network_policies.is_empty()
            && self.global_network_policies.is_empty()
            && !self.has_staged()
    }

    /// Whether any staged policy exists.
    pub fn has_staged(&self) -> bool {
        !(self.staged_network_policies.is_empty()
            && self.staged_global_network_policies.is_empty()
            && self.staged_kubernetes_network_policies.is_empty())
    }
}

/// The Calico objects of some manifests.
#[derive(Clone, Debug, Default)]
pub struct CalicoManifests {
    pub tiers: Vec<Tier>,
    pub network_policies: Vec<CalicoNetworkPolicy>,
    pub global_network_policies: Vec<GlobalNetworkPolicy>,
    pub staged_network_policies: Vec<StagedNetworkPolicy>,
    pub staged_global_network_policies: Vec<StagedGlobalNetworkPolicy>,
    pub staged_kubernetes_network_policies: Vec<StagedKubernetesNetworkPolicy>,
}

impl CalicoManifests {
    /// Whether there is no Calico object at all (the engine then judges
    /// flows by the Kubernetes tiers alone).
    pub fn is_empty(&self) -> bool {
        self.tiers.is_empty()
            && self.network_policies.is_empty()
            && self.global_network_policies.is_empty()
            && !self.has_staged()
    }

    /// Whether any staged policy exists.
    pub fn has_staged(&self) -> bool {
        !(self.staged_network_policies.is_empty()
            && self.staged_global_network_policies.is_empty()
            && self.staged_kubernetes_network_policies.is_empty())
    }

    /// Reads the Calico documents of a multi-document YAML text (other
    /// documents are skipped). Unknown fields are errors.
    pub fn read_str(source_name: &str, text: &str) -> Result<Self, CalicoManifestError> {
        let mut out = Self::default();
        for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let error = |kind: &str, problem: String| CalicoManifestError {
                source_name: source_name.to_string(),
                document: i + 1,
                kind: kind.to_string(),
                problem,
            };
            let value =
                serde_yaml::Value::deserialize(doc).map_err(|e| error("?", e.to_string()))?;
            let api = value["apiVersion"].as_str().unwrap_or_default();
            if !API_VERSIONS.contains(&api) {
                continue;
            }
            let kind = value["kind"].as_str().unwrap_or_default().to_string();
            let e = |err: serde_yaml::Error| error(&kind, err.to_string());
            match kind.as_str() {
                "Tier" => out.tiers.push(serde_yaml::from_value(value).map_err(e)?),
                "NetworkPolicy" => out
                    .network_policies
                    .push(serde_yaml::from_value(value).map_err(e)?),
                "GlobalNetworkPolicy" => out
                    .global_network_policies
                    .push(serde_yaml::from_value(value).map_err(e)?),
                "StagedNetworkPolicy" => out
                    .staged_network_policies
                    .push(serde_yaml::from_value(value).map_err(e)?),
                "StagedGlobalNetworkPolicy" => out
                    .staged_global_network_policies
                    .push(serde_yaml::from_value(value).map_err(e)?),
                "StagedKubernetesNetworkPolicy" => out
                    .staged_kubernetes_network_policies
                    .push(serde_yaml::from_value(value).map_err(e)?),
                // Other Calico kinds (IPPool, FelixConfiguration, ...) do not decide flows.
                _ => {}
            }
        }
        Ok(out)
    }

    /// The enforced objects, with the snapshot's Kubernetes NetworkPolicies.
    pub fn objects<'a>(&'a self, kubernetes: &'a [NetworkPolicy]) -> CalicoObjects<'a> {
        CalicoObjects {
            tiers: &self.tiers,
            network_policies: &self.network_policies,
            global_network_policies: &self.global_network_policies,
            kubernetes_network_policies: kubernetes,
        }
    }

    /// The staged objects.
    pub fn staged(&self) -> StagedObjects<'_> {
        StagedObjects {
            network_policies: &self.staged_network_policies,
            global_network_policies: &self.staged_global_network_policies,
            kubernetes_network_policies: &self.staged_kubernetes_network_policies,
        }
    }
}

/// Every pod of the snapshot as a Calico endpoint, by `namespace/name`:
/// its labels, its namespace's labels (with `kubernetes.io/metadata.name`),
/// service account, IP and named container ports.
pub fn endpoints(snapshot: &ClusterSnapshot) -> BTreeMap<String, CalicoEndpoint> {
    // Each namespace's labels and Services once, not once per pod.
    let mut namespaces: BTreeMap<&str, (Labels, NamespaceServices<'_>)> = BTreeMap::new();
    snapshot
        .pods
        .iter()
        .map(|pod| {
            let ns = pod.namespace();
            let (labels, services) = namespaces.entry(ns).or_insert_with(|| {
                (
                    namespace_labels(snapshot, ns),
                    NamespaceServices::of(snapshot, ns),
                )
            });
            let e = endpoint_in(pod, labels.clone(), services);
            let name = pod.name().unwrap_or_default();
            (format!("{ns}/{name}"), e)
        })
        .collect()
}

/// One pod as a Calico endpoint (see [`endpoints`]).
pub fn endpoint(snapshot: &ClusterSnapshot, pod: &PodRecord) -> CalicoEndpoint {
    let ns = pod.namespace();
    endpoint_in(
        pod,
        namespace_labels(snapshot, ns),
        &NamespaceServices::of(snapshot, ns),
    )
}

/// A pod as an endpoint, given its namespace's labels and Services.
pub(crate) fn endpoint_in(
    pod: &PodRecord,
    namespace_labels: Labels,
    services: &NamespaceServices<'_>,
) -> CalicoEndpoint {
    let mut e = CalicoEndpoint::pod(pod.namespace(), pod.labels().clone(), namespace_labels);
    e.ip = pod.pod_ip();
    let service_account = pod.service_account().unwrap_or("default").to_owned();
    // Calico labels every service account with its name.
    e.service_account_labels
        .insert("projectcalico.org/name".into(), service_account.clone());
    e.service_account = Some(service_account);
    for port in pod.ports().iter().filter(|p| !p.init) {
        if let Some(port_name) = &port.name {
            e.named_ports
                .push((port_name.clone(), port.protocol.number(), port.port));
        }
    }
    e.services = service_backings(services, pod.labels(), &e);
    e
}

/// A namespace's labels as Calico's selectors see them: with
/// `kubernetes.io/metadata.name`, also when the Namespace object is gone.
pub(crate) fn namespace_labels(snapshot: &ClusterSnapshot, namespace: &str) -> Labels {
    let mut labels: Labels = snapshot
        .namespaces
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(namespace))
        .and_then(|n| n.metadata.labels.clone())
        .unwrap_or_default();
    labels.insert("kubernetes.io/metadata.name".into(), namespace.into());
    labels
}

/// The Services and EndpointSlices of one namespace: what decides which
/// Services a pod of it backs (a Service only selects pods of its own
/// namespace).
#[derive(Clone)]
pub(crate) struct NamespaceServices<'a> {
    namespace: String,
    services: Vec<&'a Service>,
    slices: Vec<&'a EndpointSlice>,
}

impl<'a> NamespaceServices<'a> {
    pub(crate) fn of(snapshot: &'a ClusterSnapshot, namespace: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            services: snapshot
                .services
                .iter()
                .filter(|s| s.metadata.namespace.as_deref().unwrap_or("default") == namespace)
                .collect(),
            slices: snapshot
                .endpoint_slices
                .iter()
                .filter(|s| s.metadata.namespace.as_deref().unwrap_or("default") == namespace)
                .collect(),
        }
    }
}

fn protocol_number(name: Option<&str>) -> u8 {
    match name {
        Some("UDP") => 17,
        Some("SCTP") => 132,
        _ => 6,
    }
}

/// The Services a pod with `labels` backs, with the ports it serves each
/// on: a Service of its namespace whose selector matches its labels
/// (target ports resolved on the pod, named ones through its container
/// ports), and any Service whose EndpointSlices list its IP (Services
/// without a selector too).
pub(crate) fn service_backings(
    services: &NamespaceServices<'_>,
    labels: &Labels,
    endpoint: &CalicoEndpoint,
) -> Vec<ServiceBacking> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let namespace = &services.namespace;
    let mut out: BTreeMap<(String, String), std::collections::BTreeSet<(u8, u16)>> =
        BTreeMap::new();
    for svc in &services.services {
        let Some(spec) = &svc.spec else { continue };
        let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) else {
            continue;
        };
        if !selector.iter().all(|(k, v)| labels.get(k) == Some(v)) {
            continue;
        }
        let ports = out
            .entry((
                namespace.to_string(),
                svc.metadata.name.clone().unwrap_or_default(),
            ))
            .or_default();
        for port in spec.ports.iter().flatten() {
            let protocol = protocol_number(port.protocol.as_deref());
            let target = match &port.target_port {
                None => Some(port.port as u16),
                Some(IntOrString::Int(n)) => Some(*n as u16),
                Some(IntOrString::String(name)) => endpoint
                    .named_ports
                    .iter()
                    .find(|(n, p, _)| n == name && *p == protocol)
                    .map(|(_, _, number)| *number),
            };
            if let Some(target) = target {
                ports.insert((protocol, target));
            }
        }
    }
    if let Some(ip) = endpoint.ip.map(|ip| ip.to_string()) {
        for slice in &services.slices {
            let Some(service) = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("kubernetes.io/service-name"))
            else {
                continue;
            };
            if !slice.endpoints.iter().any(|e| e.addresses.contains(&ip)) {
                continue;
            }
            let ports = out
                .entry((namespace.to_string(), service.clone()))
                .or_default();
            for port in slice.ports.iter().flatten() {
                if let Some(number) = port.port {
                    ports.insert((protocol_number(port.protocol.as_deref()), number as u16));
                }
            }
        }
    }
    out.into_iter()
        .map(|((namespace, name), ports)| ServiceBacking {
            namespace,
            name,
            ports: ports.into_iter().collect(),
        })
        .collect()
}
