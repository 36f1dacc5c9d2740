//! projectcalico.org/v3 objects as calicoctl and the Calico API server
//! accept them: NetworkPolicy, GlobalNetworkPolicy and Tier. Unknown
//! fields are refused (a typo in a policy changes what it does).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

/// `projectcalico.org/v3` (the CRDs in `crd.projectcalico.org/v1` carry
/// the same fields).
pub const API_VERSION: &str = "projectcalico.org/v3";

/// A namespaced Calico NetworkPolicy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CalicoNetworkPolicy {
    #[serde(default)]
    pub api_version: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PolicySpec,
}

/// A cluster-wide Calico GlobalNetworkPolicy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GlobalNetworkPolicy {
    #[serde(default)]
    pub api_version: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PolicySpec,
}

/// The spec both kinds share; the fields only a GlobalNetworkPolicy may
/// have are refused on a NetworkPolicy when compiled.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicySpec {
    /// The tier; `default` when absent.
    #[serde(default)]
    pub tier: Option<String>,
    /// Lower first; absent = after every ordered policy.
    #[serde(default)]
    pub order: Option<f64>,
    #[serde(default)]
    pub selector: Option<String>,
    #[serde(default)]
    pub service_account_selector: Option<String>,
    /// GlobalNetworkPolicy only.
    #[serde(default)]
    pub namespace_selector: Option<String>,
    #[serde(default)]
    pub types: Option<Vec<PolicyType>>,
    #[serde(default)]
    pub ingress: Option<Vec<Rule>>,
    #[serde(default)]
    pub egress: Option<Vec<Rule>>,
    /// GlobalNetworkPolicy only; host endpoints (see the module docs).
    #[serde(default)]
    pub do_not_track: Option<bool>,
    #[serde(default, rename = "preDNAT")]
    pub pre_dnat: Option<bool>,
    #[serde(default)]
    pub apply_on_forward: Option<bool>,
    #[serde(default)]
    pub performance_hints: Option<Vec<String>>,
}

/// `Ingress` or `Egress`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PolicyType {
    Ingress,
    Egress,
}

/// A rule's action.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    Allow,
    Deny,
    /// Skip the rest of the tier.
    Pass,
    /// Record and go on to the next rule.
    Log,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "Allow",
            Action::Deny => "Deny",
            Action::Pass => "Pass",
            Action::Log => "Log",
        }
    }
}

/// A protocol by name (`TCP`, `UDP`, `ICMP`, `ICMPv6`, `SCTP`, `UDPLite`)
/// or number (1-255).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ProtocolSpec {
    Number(u8),
    Name(String),
}

/// A port: a number, `"80:81"`, or a named port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PortSpec {
    Number(u16),
    Text(String),
}

/// ICMP type and code.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IcmpFields {
    #[serde(default, rename = "type")]
    pub icmp_type: Option<u8>,
    #[serde(default)]
    pub code: Option<u8>,
}

/// `serviceAccounts` of an entity rule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceAccountMatch {
    #[serde(default)]
    pub names: Option<Vec<String>>,
    #[serde(default)]
    pub selector: Option<String>,
}

/// `services` of an entity rule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceMatch {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
}

/// `source` or `destination` of a rule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EntityRule {
    #[serde(default)]
    pub nets: Option<Vec<String>>,
    #[serde(default)]
    pub not_nets: Option<Vec<String>>,
    #[serde(default)]
    pub selector: Option<String>,
    #[serde(default)]
    pub not_selector: Option<String>,
    #[serde(default)]
    pub namespace_selector: Option<String>,
    #[serde(default)]
    pub ports: Option<Vec<PortSpec>>,
    #[serde(default)]
    pub not_ports: Option<Vec<PortSpec>>,
    #[serde(default)]
    pub service_accounts: Option<ServiceAccountMatch>,
    #[serde(default)]
    pub services: Option<ServiceMatch>,
}

/// `metadata` of a rule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleMetadata {
    #[serde(default)]
    pub annotations: Option<std::collections::BTreeMap<String, String>>,
}

/// One rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    pub action: Action,
    #[serde(default)]
    pub protocol: Option<ProtocolSpec>,
    #[serde(default)]
    pub not_protocol: Option<ProtocolSpec>,
    #[serde(default, rename = "icmp")]
    pub icmp: Option<IcmpFields>,
    #[serde(default, rename = "notICMP")]
    pub not_icmp: Option<IcmpFields>,
    #[serde(default)]
    pub ip_version: Option<u8>,
    #[serde(default)]
    pub source: EntityRule,
    #[serde(default)]
    pub destination: EntityRule,
    #[serde(default)]
    pub metadata: Option<RuleMetadata>,
}

/// A Tier.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Tier {
    #[serde(default)]
    pub api_version: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: TierSpec,
}

/// A Tier's spec.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TierSpec {
    #[serde(default)]
    pub order: Option<f64>,
    /// `Deny` (the default) or `Pass`.
    #[serde(default)]
    pub default_action: Option<Action>,
}

/// What applying a staged policy would do to the enforced one of the same
/// name: `Set` (create or replace it, the default) or `Delete`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum StagedAction {
    #[default]
    Set,
    Delete,
}

/// A staged spec: the enforced kind's spec plus `stagedAction`. (serde
/// cannot refuse unknown fields through `flatten`, so the action is taken
/// out first and the rest read strictly.)
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Staged<S> {
    pub staged_action: StagedAction,
    pub spec: S,
}

impl<'de, S: serde::de::DeserializeOwned> Deserialize<'de> for Staged<S> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut value = serde_json::Value::deserialize(d)?;
        let staged_action = match value.as_object_mut().and_then(|m| m.remove("stagedAction")) {
            Some(a) => serde_json::from_value(a).map_err(D::Error::custom)?,
            None => StagedAction::Set,
        };
        let spec = serde_json::from_value(value).map_err(D::Error::custom)?;
        Ok(Self {
            staged_action,
            spec,
        })
    }
}

/// StagedNetworkPolicy: a Calico NetworkPolicy previewed, not enforced.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StagedNetworkPolicy {
    #[serde(default)]
    pub api_version: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: Staged<PolicySpec>,
}

/// StagedGlobalNetworkPolicy: a GlobalNetworkPolicy previewed.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StagedGlobalNetworkPolicy {
    #[serde(default)]
    pub api_version: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: Staged<PolicySpec>,
}

/// StagedKubernetesNetworkPolicy: a Kubernetes NetworkPolicy previewed.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StagedKubernetesNetworkPolicy {
    #[serde(default)]
    pub api_version: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: Staged<k8s_openapi::api::networking::v1::NetworkPolicySpec>,
}

/// How the API serves each Calico kind, for the watchers: the Calico API
/// server (`projectcalico.org/v3`) when it is installed, else the CRDs
/// Calico stores them in (`crd.projectcalico.org/v1`, [`Crd`]), with the
/// same fields.
pub trait CalicoResource {
    /// The Kubernetes kind (`NetworkPolicy`).
    const CALICO_KIND: &'static str;
    /// The resource (`networkpolicies`).
    const PLURAL: &'static str;
    /// The kind as netwatch's API status names it (`NetworkPolicy.projectcalico.org`):
    /// distinct from networking.k8s.io's NetworkPolicy.
    const STATUS_KIND: &'static str;
    /// The same, for the CRD.
    const CRD_STATUS_KIND: &'static str;
    type Scope: k8s_openapi::ResourceScope;
    fn meta(&self) -> &ObjectMeta;
    fn meta_mut(&mut self) -> &mut ObjectMeta;
}

/// The CRD group Calico stores its objects in.
pub const CRD_API_VERSION: &str = "crd.projectcalico.org/v1";

macro_rules! calico_resource {
    ($ty:ident, $kind:literal, $plural:literal, $scope:ty) => {
        impl CalicoResource for $ty {
            const CALICO_KIND: &'static str = $kind;
            const PLURAL: &'static str = $plural;
            const STATUS_KIND: &'static str = concat!($kind, ".projectcalico.org");
            const CRD_STATUS_KIND: &'static str = concat!($kind, ".crd.projectcalico.org");
            type Scope = $scope;
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }

        impl k8s_openapi::Resource for $ty {
            const API_VERSION: &'static str = API_VERSION;
            const GROUP: &'static str = "projectcalico.org";
            const KIND: &'static str = concat!($kind, ".projectcalico.org");
            const VERSION: &'static str = "v3";
            const URL_PATH_SEGMENT: &'static str = $plural;
            type Scope = $scope;
        }

        impl k8s_openapi::ListableResource for $ty {
            const LIST_KIND: &'static str = concat!($kind, "List");
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

calico_resource!(
    CalicoNetworkPolicy,
    "NetworkPolicy",
    "networkpolicies",
    k8s_openapi::NamespaceResourceScope
);
calico_resource!(
    GlobalNetworkPolicy,
    "GlobalNetworkPolicy",
    "globalnetworkpolicies",
    k8s_openapi::ClusterResourceScope
);
calico_resource!(Tier, "Tier", "tiers", k8s_openapi::ClusterResourceScope);
calico_resource!(
    StagedNetworkPolicy,
    "StagedNetworkPolicy",
    "stagednetworkpolicies",
    k8s_openapi::NamespaceResourceScope
);
calico_resource!(
    StagedGlobalNetworkPolicy,
    "StagedGlobalNetworkPolicy",
    "stagedglobalnetworkpolicies",
    k8s_openapi::ClusterResourceScope
);
calico_resource!(
    StagedKubernetesNetworkPolicy,
    "StagedKubernetesNetworkPolicy",
    "stagedkubernetesnetworkpolicies",
    k8s_openapi::NamespaceResourceScope
);

/// A Calico object as its `crd.projectcalico.org/v1` CRD serves it.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(transparent)]
pub struct Crd<T>(pub T);

impl<T: CalicoResource> k8s_openapi::Resource for Crd<T> {
    const API_VERSION: &'static str = CRD_API_VERSION;
    const GROUP: &'static str = "crd.projectcalico.org";
    const KIND: &'static str = T::CRD_STATUS_KIND;
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = T::PLURAL;
    type Scope = T::Scope;
}

impl<T: CalicoResource> k8s_openapi::ListableResource for Crd<T> {
    const LIST_KIND: &'static str = "List";
}

impl<T: CalicoResource> k8s_openapi::Metadata for Crd<T> {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        self.0.meta()
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        self.0.meta_mut()
    }
}
