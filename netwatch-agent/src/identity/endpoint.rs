//! The endpoint embedded in every flow record, in Hubble's JSON shape.
//!
//! Hubble's `Endpoint` message has `ID`, `identity`, `namespace`, `labels`,
//! `pod_name` and `workloads`; netwatch keeps those names so tools that read
//! Hubble flows read netwatch's, and adds what a reader needs at 3 a.m.
//! without a second lookup: the service the flow was addressed through, the
//! node, the IP and port, and the pod UID.

use std::{fmt, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::record::shared::{SharedList, SharedStr};

/// Hubble's reserved identities, the ones a flow endpoint gets when it is not
/// a pod.
///
/// The numbers are Cilium's (`pkg/identity/numericidentity.go`), so a Hubble
/// user reads them as usual.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReservedIdentity {
    /// This node (one of its own addresses), or a hostNetwork pod on it.
    Host,
    /// Another node of the cluster.
    RemoteNode,
    /// The Kubernetes API server: the `default/kubernetes` service and its
    /// endpoints.
    KubeApiserver,
    /// Anything outside the cluster.
    World,
}

impl ReservedIdentity {
    /// Cilium's numeric identity: host 1, world 2, remote-node 6,
    /// kube-apiserver 7.
    pub const fn number(self) -> u32 {
        match self {
            ReservedIdentity::Host => 1,
            ReservedIdentity::World => 2,
            ReservedIdentity::RemoteNode => 6,
            ReservedIdentity::KubeApiserver => 7,
        }
    }

    /// The label Hubble shows for it, `reserved:host` etc.
    pub const fn label(self) -> &'static str {
        match self {
            ReservedIdentity::Host => "reserved:host",
            ReservedIdentity::World => "reserved:world",
            ReservedIdentity::RemoteNode => "reserved:remote-node",
            ReservedIdentity::KubeApiserver => "reserved:kube-apiserver",
        }
    }

    /// The identity's name without the `reserved:` prefix.
    pub const fn name(self) -> &'static str {
        match self {
            ReservedIdentity::Host => "host",
            ReservedIdentity::World => "world",
            ReservedIdentity::RemoteNode => "remote-node",
            ReservedIdentity::KubeApiserver => "kube-apiserver",
        }
    }
}

impl fmt::Display for ReservedIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The controller a pod belongs to, as Hubble's `Workload` (`{name, kind}`),
/// e.g. `{ "name": "payment", "kind": "Deployment" }`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Workload {
    pub name: String,
    /// The Kubernetes kind: `Deployment`, `ReplicaSet`, `StatefulSet`,
    /// `DaemonSet`, `Job`, `CronJob`, or whatever kind owns the pod.
    pub kind: String,
}

/// A service by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ServiceRef {
    /// `namespace/name`, the way kubectl users write it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One side of a flow: who sent or received it. A pod's parts are shared
/// by the records that name it (cloning an endpoint copies no text).
///
/// Serializes in Hubble's shape (`ID`, `identity`, `namespace`, `labels`,
/// `pod_name`, `workloads`) plus netwatch's `service`, `node_name`, `ip`,
/// `port` and `pod_uid`. Empty fields are left out of the JSON, as Hubble's
/// protobuf-JSON does; `identity` is always present (0 means not resolved).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Hubble's endpoint ID (a Cilium endpoint number). netwatch has no such
    /// numbering, so this stays 0 and is left out of the JSON.
    #[serde(rename = "ID", default, skip_serializing_if = "is_zero")]
    pub id: u32,
    /// Numeric security identity: a [`ReservedIdentity`] number, or for pods
    /// a stable number (>= 256) derived from the namespace and labels, so pods
    /// of one workload share it. 0 means unresolved (Cilium's `unknown`).
    #[serde(default)]
    pub identity: u32,
    #[serde(default, skip_serializing_if = "SharedStr::is_empty")]
    pub namespace: SharedStr,
    /// Sorted `k8s:key=value` labels (pod labels plus
    /// `k8s:io.kubernetes.pod.namespace=<ns>`), or one `reserved:...` label.
    #[serde(default, skip_serializing_if = "SharedList::is_empty")]
    pub labels: SharedList<String>,
    #[serde(default, skip_serializing_if = "SharedStr::is_empty")]
    pub pod_name: SharedStr,
    #[serde(default, skip_serializing_if = "SharedList::is_empty")]
    pub workloads: SharedList<Workload>,
    /// The service the flow was addressed to, when it went through one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceRef>,
    #[serde(default, skip_serializing_if = "SharedStr::is_empty")]
    pub node_name: SharedStr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "SharedStr::is_empty")]
    pub pod_uid: SharedStr,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Endpoint {
    /// An endpoint known only by address: what a flow carries when identity
    /// did not arrive in time (identity 0).
    pub fn unresolved(ip: IpAddr, port: Option<u16>) -> Self {
        Endpoint {
            ip: Some(ip),
            port,
            ..Endpoint::default()
        }
    }

    /// A reserved identity at `ip`, on `node_name` for host and remote-node.
    pub fn reserved(
        identity: ReservedIdentity,
        node_name: Option<&str>,
        ip: IpAddr,
        port: Option<u16>,
    ) -> Self {
        Endpoint {
            identity: identity.number(),
            labels: vec![identity.label().to_owned()].into(),
            node_name: node_name.unwrap_or_default().into(),
            ip: Some(ip),
            port,
            ..Endpoint::default()
        }
    }

    /// Records that the flow was addressed through `service` (e.g. the flow
    /// layer saw the cluster IP before DNAT and the backend after).
    pub fn with_service(mut self, service: ServiceRef) -> Self {
        self.service = Some(service);
        self
    }

    /// The reserved identity this endpoint carries, if it is one.
    pub fn reserved_identity(&self) -> Option<ReservedIdentity> {
        [
            ReservedIdentity::Host,
            ReservedIdentity::World,
            ReservedIdentity::RemoteNode,
            ReservedIdentity::KubeApiserver,
        ]
        .into_iter()
        .find(|r| r.number() == self.identity)
    }

    /// Whether identity resolution gave this endpoint anything beyond its
    /// address.
    pub fn is_resolved(&self) -> bool {
        self.identity != 0 || self.service.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_endpoint_serializes_in_hubble_shape_and_omits_empty_fields() {
        let ep = Endpoint {
            identity: 4242,
            namespace: "prod".into(),
            labels: vec![
                "k8s:app=payment".into(),
                "k8s:io.kubernetes.pod.namespace=prod".into(),
            ]
            .into(),
            pod_name: "payment-7d9c-abcde".into(),
            workloads: vec![Workload {
                name: "payment".into(),
                kind: "Deployment".into(),
            }]
            .into(),
            node_name: "node-a".into(),
            ip: Some("10.0.1.7".parse().unwrap()),
            port: Some(8080),
            pod_uid: "0b2d4c0e-1a2b-4c3d-9e8f-0123456789ab".into(),
            ..Endpoint::default()
        };
        let json = serde_json::to_value(&ep).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "identity": 4242,
                "namespace": "prod",
                "labels": ["k8s:app=payment", "k8s:io.kubernetes.pod.namespace=prod"],
                "pod_name": "payment-7d9c-abcde",
                "workloads": [{"name": "payment", "kind": "Deployment"}],
                "node_name": "node-a",
                "ip": "10.0.1.7",
                "port": 8080,
                "pod_uid": "0b2d4c0e-1a2b-4c3d-9e8f-0123456789ab"
            })
        );
        let back: Endpoint = serde_json::from_value(json).unwrap();
        assert_eq!(back, ep);
    }

    #[test]
    fn reserved_endpoints_carry_hubble_numbers_and_labels() {
        let ip: IpAddr = "192.168.1.10".parse().unwrap();
        let cases = [
            (ReservedIdentity::Host, 1, "reserved:host"),
            (ReservedIdentity::World, 2, "reserved:world"),
            (ReservedIdentity::RemoteNode, 6, "reserved:remote-node"),
            (
                ReservedIdentity::KubeApiserver,
                7,
                "reserved:kube-apiserver",
            ),
        ];
        for (reserved, number, label) in cases {
            let ep = Endpoint::reserved(reserved, None, ip, None);
            let json = serde_json::to_value(&ep).unwrap();
            assert_eq!(
                json,
                serde_json::json!({"identity": number, "labels": [label], "ip": "192.168.1.10"})
            );
            assert_eq!(ep.reserved_identity(), Some(reserved));
        }
    }

    #[test]
    fn nonzero_id_and_service_are_serialized() {
        let ep = Endpoint {
            id: 12,
            ..Endpoint::unresolved("10.96.0.10".parse().unwrap(), Some(53))
        }
        .with_service(ServiceRef {
            namespace: "kube-system".into(),
            name: "kube-dns".into(),
        });
        let json = serde_json::to_value(&ep).unwrap();
        assert_eq!(json["ID"], 12);
        assert_eq!(json["identity"], 0);
        assert_eq!(
            json["service"],
            serde_json::json!({"namespace": "kube-system", "name": "kube-dns"})
        );
        assert!(ep.is_resolved());
        assert!(!Endpoint::unresolved("10.0.0.1".parse().unwrap(), None).is_resolved());
    }
}
