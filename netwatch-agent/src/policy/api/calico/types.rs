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
