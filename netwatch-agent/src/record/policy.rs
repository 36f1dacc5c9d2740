//! How every part of netwatch names a policy: [`PolicyRef`].
//!
//! A NetworkPolicy is `namespace/name`. The cluster-scoped kinds of
//! kubernetes-sigs/network-policy-api have no namespace; they sit in a tier
//! (Admin or Baseline) and decide through one rule, which the reference
//! names too:
//!
//! ```text
//! prod/default-deny                                   NetworkPolicy
//! ClusterNetworkPolicy deny-db (Admin) egress rule 2 "deny-to-db"
//! BaselineAdminNetworkPolicy default (Baseline) ingress rule 1
//! ```
//!
//! In JSON (`netwatch explain -o json`, `netwatch lint -o json`) a
//! NetworkPolicy stays `{"namespace", "name"}`; the other kinds add `kind`,
//! `tier` and, when one rule decided, `rule` (`{"index", "name"}`, `index`
//! counting from 0 as in `spec.egress[index]`). Flow records always carry
//! `kind`, as Hubble's `Policy` does: see [`PolicyRef::serialize_for_record`].

use std::fmt;
use std::str::FromStr;

use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize};

/// The policy APIs netwatch evaluates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyKind {
    /// networking.k8s.io/v1, namespaced.
    #[default]
    NetworkPolicy,
    /// policy.networking.k8s.io/v1alpha2, tier Admin or Baseline.
    ClusterNetworkPolicy,
    /// policy.networking.k8s.io/v1alpha1, the Admin tier.
    AdminNetworkPolicy,
    /// policy.networking.k8s.io/v1alpha1, the Baseline tier (only `default`).
    BaselineAdminNetworkPolicy,
    /// projectcalico.org/v3 NetworkPolicy, namespaced, in a Calico tier.
    CalicoNetworkPolicy,
    /// projectcalico.org/v3 GlobalNetworkPolicy, in a Calico tier.
    CalicoGlobalNetworkPolicy,
    /// projectcalico.org/v3 staged kinds: previewed, never enforced.
    StagedNetworkPolicy,
    StagedGlobalNetworkPolicy,
    StagedKubernetesNetworkPolicy,
}

impl PolicyKind {
    /// The Kubernetes kind.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::NetworkPolicy => "NetworkPolicy",
            PolicyKind::ClusterNetworkPolicy => "ClusterNetworkPolicy",
            PolicyKind::AdminNetworkPolicy => "AdminNetworkPolicy",
            PolicyKind::BaselineAdminNetworkPolicy => "BaselineAdminNetworkPolicy",
            // Kind and API group, as `kubectl get` names them: Calico's
            // NetworkPolicy is not networking.k8s.io's.
            PolicyKind::CalicoNetworkPolicy => "NetworkPolicy.projectcalico.org",
            PolicyKind::CalicoGlobalNetworkPolicy => "GlobalNetworkPolicy.projectcalico.org",
            PolicyKind::StagedNetworkPolicy => "StagedNetworkPolicy.projectcalico.org",
            PolicyKind::StagedGlobalNetworkPolicy => "StagedGlobalNetworkPolicy.projectcalico.org",
            PolicyKind::StagedKubernetesNetworkPolicy => {
                "StagedKubernetesNetworkPolicy.projectcalico.org"
            }
        }
    }

    /// Whether objects of this kind live in a namespace.
    pub fn is_namespaced(self) -> bool {
        matches!(
            self,
            PolicyKind::NetworkPolicy
                | PolicyKind::CalicoNetworkPolicy
                | PolicyKind::StagedNetworkPolicy
                | PolicyKind::StagedKubernetesNetworkPolicy
        )
    }

    /// Whether this is one of Calico's kinds (projectcalico.org).
    pub fn is_calico(self) -> bool {
        matches!(
            self,
            PolicyKind::CalicoNetworkPolicy
                | PolicyKind::CalicoGlobalNetworkPolicy
                | PolicyKind::StagedNetworkPolicy
                | PolicyKind::StagedGlobalNetworkPolicy
                | PolicyKind::StagedKubernetesNetworkPolicy
        )
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for PolicyKind {
    /// The kind as [`PolicyKind::as_str`] names it (Calico's with their
    /// API group).
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for PolicyKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Error of [`PolicyKind::from_str`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown policy kind {0:?}: use NetworkPolicy, ClusterNetworkPolicy, AdminNetworkPolicy, BaselineAdminNetworkPolicy, or a Calico kind (NetworkPolicy.projectcalico.org, GlobalNetworkPolicy.projectcalico.org, Staged*.projectcalico.org)"
)]
pub struct UnknownPolicyKind(pub String);

impl FromStr for PolicyKind {
    type Err = UnknownPolicyKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            PolicyKind::NetworkPolicy,
            PolicyKind::ClusterNetworkPolicy,
            PolicyKind::AdminNetworkPolicy,
            PolicyKind::BaselineAdminNetworkPolicy,
            PolicyKind::CalicoNetworkPolicy,
            PolicyKind::CalicoGlobalNetworkPolicy,
            PolicyKind::StagedNetworkPolicy,
            PolicyKind::StagedGlobalNetworkPolicy,
            PolicyKind::StagedKubernetesNetworkPolicy,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
        .ok_or_else(|| UnknownPolicyKind(s.to_string()))
    }
}

/// Where a policy sits in the order a direction is judged in: Admin, then
/// NetworkPolicy, then Baseline; with Calico policies loaded, Calico's
/// tiers by their order (see [`crate::policy::api::calico`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    /// ClusterNetworkPolicy tier Admin and AdminNetworkPolicy (Calico's
    /// `kube-admin` tier).
    Admin,
    /// networking.k8s.io/v1 NetworkPolicy.
    #[default]
    NetworkPolicy,
    /// ClusterNetworkPolicy tier Baseline and BaselineAdminNetworkPolicy
    /// (Calico's `kube-baseline` tier).
    Baseline,
    /// A Calico tier, by name (`default`, `security`, ...).
    Calico(CalicoTierName),
}

/// The name of a Calico tier. Interned: there are few tiers, and [`Tier`]
/// stays `Copy` for the hot paths that pass it around.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CalicoTierName(&'static str);

impl CalicoTierName {
    pub fn new(name: &str) -> Self {
        use std::collections::HashSet;
        use std::sync::{Mutex, OnceLock};
        static NAMES: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
        let mut names = NAMES
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(&known) = names.get(name) {
            return CalicoTierName(known);
        }
        let leaked: &'static str = Box::leak(name.to_string().into_boxed_str());
        names.insert(leaked);
        CalicoTierName(leaked)
    }

    pub fn as_str(self) -> &'static str {
        self.0
    }
}

impl Tier {
    /// The three tiers, in evaluation order.
    pub const ORDER: [Tier; 3] = [Tier::Admin, Tier::NetworkPolicy, Tier::Baseline];

    /// `Admin`, `NetworkPolicy`, `Baseline`, or the Calico tier's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Admin => "Admin",
            Tier::NetworkPolicy => "NetworkPolicy",
            Tier::Baseline => "Baseline",
            Tier::Calico(name) => name.as_str(),
        }
    }

    /// A Calico tier by name.
    pub fn calico(name: &str) -> Tier {
        Tier::Calico(CalicoTierName::new(name))
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Tier {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Tier {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Ok(match name.as_str() {
            "Admin" => Tier::Admin,
            "NetworkPolicy" => Tier::NetworkPolicy,
            "Baseline" => Tier::Baseline,
            other => Tier::calico(other),
        })
    }
}

/// One rule of a policy: its position in `spec.ingress` or `spec.egress`
/// (from 0) and its `name`, when it has one.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RuleRef {
    pub index: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl fmt::Display for RuleRef {
    /// `rule 2 "deny-to-db"` (counting from 1, as people do), or `rule 2`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) => write!(f, "rule {} {name:?}", self.index + 1),
            None => write!(f, "rule {}", self.index + 1),
        }
    }
}

/// A policy, and the rule of it that decided, when one did.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
pub struct PolicyRef {
    /// The namespace of a NetworkPolicy; `None` for cluster-scoped kinds.
    #[serde(default)]
    pub namespace: Option<String>,
    pub name: String,
    #[serde(default)]
    pub kind: PolicyKind,
    #[serde(default)]
    pub tier: Tier,
    #[serde(default)]
    pub rule: Option<RuleRef>,
}

impl PolicyRef {
    /// A NetworkPolicy by namespace and name.
    pub fn network_policy(namespace: impl Into<String>, name: impl Into<String>) -> PolicyRef {
        PolicyRef {
            namespace: Some(namespace.into()),
            name: name.into(),
            kind: PolicyKind::NetworkPolicy,
            tier: Tier::NetworkPolicy,
            rule: None,
        }
    }

    /// A cluster-scoped policy of `kind` in `tier`.
    pub fn cluster(kind: PolicyKind, tier: Tier, name: impl Into<String>) -> PolicyRef {
        PolicyRef {
            namespace: None,
            name: name.into(),
            kind,
            tier,
            rule: None,
        }
    }

    /// The same policy, naming one of its rules.
    pub fn with_rule(&self, index: usize, name: Option<&str>) -> PolicyRef {
        PolicyRef {
            rule: Some(RuleRef {
                index,
                name: name.map(str::to_string),
            }),
            ..self.clone()
        }
    }

    /// The same policy without a rule.
    pub fn policy(&self) -> PolicyRef {
        PolicyRef {
            rule: None,
            ..self.clone()
        }
    }

    /// The namespace, or `""` for cluster-scoped kinds (metric labels).
    pub fn namespace_or_empty(&self) -> &str {
        self.namespace.as_deref().unwrap_or("")
    }

    /// The policy without its rule: `prod/deny`, `ClusterNetworkPolicy deny-db`.
    pub fn policy_name(&self) -> String {
        match (&self.namespace, self.kind) {
            (Some(ns), PolicyKind::NetworkPolicy) => format!("{ns}/{}", self.name),
            (Some(ns), kind) => format!("{kind} {ns}/{}", self.name),
            (None, kind) => format!("{kind} {}", self.name),
        }
    }

    /// Serializes as Hubble's flow `Policy`: `name`, `namespace` (empty for
    /// cluster-scoped kinds), `kind` always, and netwatch's `tier` and `rule`
    /// for the cluster-scoped kinds.
    pub fn serialize_for_record<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let cluster = self.kind != PolicyKind::NetworkPolicy || self.tier != Tier::NetworkPolicy;
        let mut st = s.serialize_struct("Policy", 5)?;
        st.serialize_field("name", &self.name)?;
        st.serialize_field("namespace", self.namespace_or_empty())?;
        st.serialize_field("kind", &self.kind)?;
        if cluster {
            st.serialize_field("tier", &self.tier)?;
        }
        if let Some(rule) = &self.rule {
            st.serialize_field("rule", rule)?;
        }
        st.end()
    }
}

impl Serialize for PolicyRef {
    /// `{"namespace", "name"}` for a NetworkPolicy (the shape netwatch has
    /// always printed), `{"name", "kind", "tier", "rule"?}` otherwise.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("PolicyRef", 5)?;
        if let Some(ns) = &self.namespace {
            st.serialize_field("namespace", ns)?;
        }
        st.serialize_field("name", &self.name)?;
        // A NetworkPolicy in a Calico tier (`default`) says so.
        if self.kind != PolicyKind::NetworkPolicy || self.tier != Tier::NetworkPolicy {
            st.serialize_field("kind", &self.kind)?;
            st.serialize_field("tier", &self.tier)?;
        }
        if let Some(rule) = &self.rule {
            st.serialize_field("rule", rule)?;
        }
        st.end()
    }
}

impl fmt::Display for PolicyRef {
    /// `prod/deny` for a NetworkPolicy; `ClusterNetworkPolicy deny-db egress
    /// rule 2 "deny-to-db"` style for the others (the rule when known).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.policy_name())?;
        if let Some(rule) = &self.rule {
            write!(f, " {rule}")?;
        }
        Ok(())
    }
}

/// Serializes a list of references as Hubble's flow `Policy` list.
pub(crate) fn serialize_record_list<S: serde::Serializer>(
    refs: &[PolicyRef],
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    struct ForRecord<'a>(&'a PolicyRef);
    impl Serialize for ForRecord<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            self.0.serialize_for_record(s)
        }
    }
    let mut seq = s.serialize_seq(Some(refs.len()))?;
    for r in refs {
        seq.serialize_element(&ForRecord(r))?;
    }
    seq.end()
}

/// Reads a record's policy list: Hubble's `namespace: ""` is no namespace,
/// a missing `kind` is NetworkPolicy.
pub(crate) fn deserialize_record_list<'de, D: serde::Deserializer<'de>, L: From<Vec<PolicyRef>>>(
    d: D,
) -> Result<L, D::Error> {
    #[derive(Deserialize)]
    struct Wire {
        name: String,
        #[serde(default)]
        namespace: Option<String>,
        #[serde(default)]
        kind: Option<String>,
        #[serde(default)]
        tier: Option<Tier>,
        #[serde(default)]
        rule: Option<RuleRef>,
    }
    let wires = Vec::<Wire>::deserialize(d)?;
    Ok(wires
        .into_iter()
        .map(|w| {
            let kind = w
                .kind
                .as_deref()
                .filter(|k| !k.is_empty())
                .and_then(|k| k.parse().ok())
                .unwrap_or_default();
            PolicyRef {
                namespace: w.namespace.filter(|n| !n.is_empty()),
                name: w.name,
                kind,
                tier: w.tier.unwrap_or(match kind {
                    PolicyKind::NetworkPolicy => Tier::NetworkPolicy,
                    PolicyKind::BaselineAdminNetworkPolicy => Tier::Baseline,
                    kind if kind.is_calico() => Tier::calico("default"),
                    _ => Tier::Admin,
                }),
                rule: w.rule,
            }
        })
        .collect::<Vec<_>>()
        .into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_network_policy_keeps_its_json_shape_and_records_add_its_kind() {
        let r = PolicyRef::network_policy("prod", "deny");
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({"namespace": "prod", "name": "deny"})
        );
        let mut out = Vec::new();
        r.serialize_for_record(&mut serde_json::Serializer::new(&mut out))
            .unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&out).unwrap(),
            serde_json::json!({"name": "deny", "namespace": "prod", "kind": "NetworkPolicy"})
        );
        assert_eq!(r.to_string(), "prod/deny");
    }

    #[test]
    fn a_cluster_policy_names_its_tier_and_rule() {
        let r = PolicyRef::cluster(PolicyKind::ClusterNetworkPolicy, Tier::Admin, "deny-db")
            .with_rule(1, Some("deny-to-db"));
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({"name": "deny-db", "kind": "ClusterNetworkPolicy", "tier": "Admin",
                               "rule": {"index": 1, "name": "deny-to-db"}})
        );
        assert_eq!(
            r.to_string(),
            "ClusterNetworkPolicy deny-db rule 2 \"deny-to-db\""
        );
    }

    #[test]
    fn a_calico_policy_names_its_api_group_tier_and_rule_in_records() {
        let r = PolicyRef {
            namespace: Some("prod".into()),
            name: "api-lockdown".into(),
            kind: PolicyKind::CalicoNetworkPolicy,
            tier: Tier::calico("security"),
            rule: Some(RuleRef {
                index: 0,
                name: None,
            }),
        };
        let mut out = Vec::new();
        r.serialize_for_record(&mut serde_json::Serializer::new(&mut out))
            .unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&out).unwrap(),
            serde_json::json!({"name": "api-lockdown", "namespace": "prod",
                               "kind": "NetworkPolicy.projectcalico.org", "tier": "security",
                               "rule": {"index": 0}})
        );
        // A NetworkPolicy judged in Calico's default tier says so.
        let np = PolicyRef {
            tier: Tier::calico("default"),
            ..PolicyRef::network_policy("prod", "allow")
        };
        assert_eq!(
            serde_json::to_value(&np).unwrap(),
            serde_json::json!({"namespace": "prod", "name": "allow", "kind": "NetworkPolicy", "tier": "default"})
        );
        #[derive(Serialize, Deserialize)]
        struct Holder {
            #[serde(
                serialize_with = "serialize_record_list",
                deserialize_with = "deserialize_record_list"
            )]
            refs: Vec<PolicyRef>,
        }
        let text = serde_json::to_string(&Holder {
            refs: vec![r.clone()],
        })
        .unwrap();
        let back: Holder = serde_json::from_str(&text).unwrap();
        assert_eq!(back.refs, vec![r]);
    }

    #[test]
    fn record_lists_read_back_what_they_write() {
        #[derive(Serialize, Deserialize)]
        struct Holder {
            #[serde(
                serialize_with = "serialize_record_list",
                deserialize_with = "deserialize_record_list"
            )]
            refs: Vec<PolicyRef>,
        }
        let refs = vec![
            PolicyRef::network_policy("prod", "deny"),
            PolicyRef::cluster(
                PolicyKind::BaselineAdminNetworkPolicy,
                Tier::Baseline,
                "default",
            )
            .with_rule(0, None),
        ];
        let text = serde_json::to_string(&Holder { refs: refs.clone() }).unwrap();
        let back: Holder = serde_json::from_str(&text).unwrap();
        assert_eq!(back.refs, refs);
    }
}
