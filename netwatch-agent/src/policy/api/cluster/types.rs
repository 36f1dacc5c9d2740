//! The objects as written in manifests: ClusterNetworkPolicy
//! (`policy.networking.k8s.io/v1alpha2`) and AdminNetworkPolicy /
//! BaselineAdminNetworkPolicy (`policy.networking.k8s.io/v1alpha1`).
//!
//! Fields the CRDs require are `Option` here so that a missing one is
//! reported by [`super::compile`] with its path and a fix, rather than as a
//! bare parse error. Unknown fields are refused: a typo (`namespace:` for
//! `namespaces:`) would otherwise silently select something else.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::{Deserialize, Serialize};

/// The API group and versions.
pub const API_GROUP: &str = "policy.networking.k8s.io";
pub const V1ALPHA2: &str = "policy.networking.k8s.io/v1alpha2";
pub const V1ALPHA1: &str = "policy.networking.k8s.io/v1alpha1";

/// An object of one of the three kinds: `kind: ClusterNetworkPolicy`,
/// `AdminNetworkPolicy` or `BaselineAdminNetworkPolicy` (all cluster-scoped).
/// The kind parameter only tells the three apart as Kubernetes resources.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyObject<K> {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<PolicySpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
    #[serde(skip)]
    pub kind_marker: std::marker::PhantomData<K>,
}

/// Markers for [`PolicyObject`]'s kind.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Cnp;
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Anp;
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Banp;

/// `kind: ClusterNetworkPolicy` (v1alpha2).
pub type ClusterNetworkPolicy = PolicyObject<Cnp>;
/// `kind: AdminNetworkPolicy` (v1alpha1).
pub type AdminNetworkPolicy = PolicyObject<Anp>;
/// `kind: BaselineAdminNetworkPolicy` (v1alpha1): one per cluster, named
/// `default`.
pub type BaselineAdminNetworkPolicy = PolicyObject<Banp>;

/// The spec of any of the three kinds. Which fields a kind has is checked by
/// [`super::compile`]: `tier` is v1alpha2's alone, a
/// BaselineAdminNetworkPolicy has no `priority`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicySpec {
    /// v1alpha2: `Admin` or `Baseline`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// 0 to 1000; lower is evaluated first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    pub subject: Option<Subject>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<Rule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<Rule>>,
}

/// Who a policy applies to: exactly one of the two.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Subject {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
}

/// Pods by namespace selector AND pod selector.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespacedPod {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    pub pod_selector: Option<LabelSelector>,
}

/// An ingress or egress rule of either version. Which of its fields a rule
/// may use (ingress `from`, egress `to`; v1alpha2 `protocols`, v1alpha1
/// `ports`; v1alpha2 actions Accept, Deny, Pass, v1alpha1 Allow, Deny, Pass)
/// is checked by [`super::compile`], naming the field.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub action: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<Peer>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<Peer>>,
    /// v1alpha2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocols: Option<Vec<CnpProtocol>>,
    /// v1alpha1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<AnpPort>>,
}

/// A peer of either version: exactly one field. Ingress peers may only be
/// `namespaces` or `pods`; BaselineAdminNetworkPolicy has no `domainNames`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Peer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub networks: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_names: Option<Vec<String>>,
}

/// One entry of v1alpha2 `protocols`: exactly one field.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CnpProtocol {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<CnpProtocolPorts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<CnpProtocolPorts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sctp: Option<CnpProtocolPorts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_named_port: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CnpProtocolPorts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_port: Option<CnpPort>,
}

/// `number` or `range`, exactly one.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CnpPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub number: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<PortRange>,
}

/// An inclusive port range (v1alpha1 adds an optional protocol).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortRange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    pub start: Option<i64>,
    pub end: Option<i64>,
}

/// One entry of v1alpha1 `ports`: exactly one field.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AnpPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_number: Option<AnpPortNumber>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub named_port: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_range: Option<PortRange>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AnpPortNumber {
    /// TCP when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    pub port: Option<i64>,
}

/// Each kind as a Kubernetes resource: the manifest loader keys objects by
/// it, and the API client lists and watches it.
macro_rules! cluster_resource {
    ($ty:ident, $version:literal, $api_version:expr, $plural:literal) => {
        impl k8s_openapi::Resource for $ty {
            const API_VERSION: &'static str = $api_version;
            const GROUP: &'static str = API_GROUP;
            const KIND: &'static str = stringify!($ty);
            const VERSION: &'static str = $version;
            const URL_PATH_SEGMENT: &'static str = $plural;
            type Scope = k8s_openapi::ClusterResourceScope;
        }

        impl k8s_openapi::ListableResource for $ty {
            const LIST_KIND: &'static str = concat!(stringify!($ty), "List");
        }

        impl k8s_openapi::Metadata for $ty {
            type Ty = ObjectMeta;
            fn metadata(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn metadata_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

cluster_resource!(
    ClusterNetworkPolicy,
    "v1alpha2",
    V1ALPHA2,
    "clusternetworkpolicies"
);
cluster_resource!(
    AdminNetworkPolicy,
    "v1alpha1",
    V1ALPHA1,
    "adminnetworkpolicies"
);
cluster_resource!(
    BaselineAdminNetworkPolicy,
    "v1alpha1",
    V1ALPHA1,
    "baselineadminnetworkpolicies"
);
