//! The lab's own Kubernetes manifest loader: YAML (or JSON) files and
//! directories, multi-document, `kind: List` and `<Kind>List`, into typed
//! k8s-openapi objects. Only the kinds the lab acts on are kept (Namespaces,
//! Nodes, Pods, Services, EndpointSlices, NetworkPolicies, and the cluster
//! policies of kubernetes-sigs/network-policy-api: ClusterNetworkPolicy
//! v1alpha2, AdminNetworkPolicy and BaselineAdminNetworkPolicy v1alpha1,
//! typed here as [`TierPolicy`]; Calico's projectcalico.org/v3
//! NetworkPolicy, GlobalNetworkPolicy and Tier, typed as [`CalicoPolicy`]
//! and [`CalicoTier`], and the staged kinds, kept as [`CalicoStaged`] and
//! never enforced); others
//! (Deployments, ReplicaSets, ...) are skipped silently: they matter to the
//! agent, not to the lab. Independent of the agent's loader on purpose.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, Pod, Service},
        discovery::v1::EndpointSlice,
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta},
};
use serde::{Deserialize, de::DeserializeOwned};
use serde_yaml::{Mapping, Value};

use super::spec::{LabSpec, NodeSpec, PodSpec};

/// Errors loading manifests or turning them into a lab.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}, {document}: {detail}")]
    Document {
        file: String,
        document: String,
        detail: String,
    },
    /// `place` is `<file>, document <n>`, `object` is `<Kind> <namespace>/<name>`.
    #[error("{place} ({object}): field `{field}`: {detail}")]
    Field {
        place: String,
        object: String,
        field: String,
        detail: String,
    },
    #[error("Pod {pod}: `{field}`: {detail}")]
    Pod {
        pod: String,
        field: String,
        detail: String,
    },
}

/// The objects of a set of manifests, in the order they were read.
#[derive(Clone, Debug, Default)]
pub struct Manifests {
    pub namespaces: Vec<Namespace>,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub network_policies: Vec<NetworkPolicy>,
    /// ClusterNetworkPolicies, AdminNetworkPolicies and
    /// BaselineAdminNetworkPolicies, told apart by [`TierPolicy::kind`].
    pub tier_policies: Vec<TierPolicy>,
    /// projectcalico.org/v3 NetworkPolicies and GlobalNetworkPolicies, told
    /// apart by [`CalicoPolicy::kind`].
    pub calico_policies: Vec<CalicoPolicy>,
    pub calico_tiers: Vec<CalicoTier>,
    /// StagedNetworkPolicy, StagedGlobalNetworkPolicy and
    /// StagedKubernetesNetworkPolicy: a what-if, parsed and never enforced.
    pub calico_staged: Vec<CalicoStaged>,
}

/// Calico's API group, as calicoctl and the Calico API server read it.
pub const CALICO_API_VERSION: &str = "projectcalico.org/v3";

/// The Calico kinds the lab reads (all `projectcalico.org/v3`).
pub const CALICO_KINDS: [&str; 6] = [
    "NetworkPolicy",
    "GlobalNetworkPolicy",
    "Tier",
    "StagedNetworkPolicy",
    "StagedGlobalNetworkPolicy",
    "StagedKubernetesNetworkPolicy",
];

/// A Calico NetworkPolicy (namespaced) or GlobalNetworkPolicy. Unknown
/// fields are refused, as by the Calico API server.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CalicoPolicy {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: CalicoPolicySpec,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CalicoPolicySpec {
    #[serde(default)]
    pub tier: Option<String>,
    #[serde(default)]
    pub order: Option<f64>,
    #[serde(default)]
    pub selector: Option<String>,
    #[serde(default)]
    pub namespace_selector: Option<String>,
    #[serde(default)]
    pub service_account_selector: Option<String>,
    /// `Ingress`, `Egress`.
    #[serde(default)]
    pub types: Option<Vec<String>>,
    #[serde(default)]
    pub ingress: Option<Vec<CalicoRule>>,
    #[serde(default)]
    pub egress: Option<Vec<CalicoRule>>,
    #[serde(default)]
    pub do_not_track: Option<bool>,
    #[serde(default, rename = "preDNAT")]
    pub pre_dnat: Option<bool>,
    #[serde(default)]
    pub apply_on_forward: Option<bool>,
    #[serde(default)]
    pub performance_hints: Option<Vec<String>>,
}

/// A protocol or port as Calico writes it: a number or a string.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum NumberOrName {
    Number(u32),
    Name(String),
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CalicoRule {
    #[serde(default)]
    pub action: String,
    #[serde(default)]
    pub protocol: Option<NumberOrName>,
    #[serde(default)]
    pub not_protocol: Option<NumberOrName>,
    #[serde(default)]
    pub icmp: Option<CalicoIcmp>,
    #[serde(default, rename = "notICMP")]
    pub not_icmp: Option<CalicoIcmp>,
    #[serde(default)]
    pub ip_version: Option<u8>,
    #[serde(default)]
    pub source: CalicoEntity,
    #[serde(default)]
    pub destination: CalicoEntity,
    #[serde(default)]
    pub metadata: Option<Value>,
    #[serde(default)]
    pub http: Option<Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CalicoIcmp {
    #[serde(default, rename = "type")]
    pub icmp_type: Option<u8>,
    #[serde(default)]
    pub code: Option<u8>,
}

/// A rule's `source` or `destination`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CalicoEntity {
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
    pub ports: Option<Vec<NumberOrName>>,
    #[serde(default)]
    pub not_ports: Option<Vec<NumberOrName>>,
    #[serde(default)]
    pub service_accounts: Option<CalicoServiceAccounts>,
    #[serde(default)]
    pub services: Option<Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CalicoServiceAccounts {
    #[serde(default)]
    pub names: Option<Vec<String>>,
    #[serde(default)]
    pub selector: Option<String>,
}

/// A Calico Tier.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CalicoTier {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: CalicoTierSpec,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CalicoTierSpec {
    #[serde(default)]
    pub order: Option<f64>,
    /// `Deny` (absent) or `Pass`.
    #[serde(default)]
    pub default_action: Option<String>,
}

/// A staged Calico policy: its kind, name and `stagedAction`; the policy
/// itself is left as written (the lab never enforces it).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CalicoStaged {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Mapping,
}

impl CalicoStaged {
    /// `Set` (absent) or `Delete`.
    pub fn staged_action(&self) -> &str {
        self.spec
            .get("stagedAction")
            .and_then(Value::as_str)
            .unwrap_or("Set")
    }
}

/// The cluster-scoped policy kinds, with the apiVersion the lab reads each as.
pub const TIER_POLICY_KINDS: [(&str, &str); 3] = [
    ("ClusterNetworkPolicy", "policy.networking.k8s.io/v1alpha2"),
    ("AdminNetworkPolicy", "policy.networking.k8s.io/v1alpha1"),
    (
        "BaselineAdminNetworkPolicy",
        "policy.networking.k8s.io/v1alpha1",
    ),
];

/// A ClusterNetworkPolicy, AdminNetworkPolicy or BaselineAdminNetworkPolicy
/// as written. The three share one shape here: which fields a kind may use
/// (`tier` and `protocols` in v1alpha2, `ports` in v1alpha1, ...) is checked
/// by the enforcer when it compiles them, naming the field.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TierPolicy {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: TierPolicySpec,
    #[serde(default)]
    pub status: Option<Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TierPolicySpec {
    /// v1alpha2: `Admin` or `Baseline`.
    #[serde(default)]
    pub tier: Option<String>,
    #[serde(default)]
    pub priority: Option<i64>,
    #[serde(default)]
    pub subject: Option<TierSubject>,
    #[serde(default)]
    pub ingress: Vec<TierRule>,
    #[serde(default)]
    pub egress: Vec<TierRule>,
}

/// `namespaces`, or `pods` (a namespace selector and a pod selector).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TierSubject {
    #[serde(default)]
    pub namespaces: Option<LabelSelector>,
    #[serde(default)]
    pub pods: Option<TierPods>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TierPods {
    #[serde(default)]
    pub namespace_selector: Option<LabelSelector>,
    #[serde(default)]
    pub pod_selector: Option<LabelSelector>,
}

/// An ingress (`from`) or egress (`to`) rule.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TierRule {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub action: Option<String>,
    #[serde(default)]
    pub from: Option<Vec<TierPeer>>,
    #[serde(default)]
    pub to: Option<Vec<TierPeer>>,
    /// v1alpha2.
    #[serde(default)]
    pub protocols: Option<Vec<TierProtocol>>,
    /// v1alpha1.
    #[serde(default)]
    pub ports: Option<Vec<TierPort>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TierPeer {
    #[serde(default)]
    pub namespaces: Option<LabelSelector>,
    #[serde(default)]
    pub pods: Option<TierPods>,
    #[serde(default)]
    pub nodes: Option<LabelSelector>,
    #[serde(default)]
    pub networks: Option<Vec<String>>,
    #[serde(default)]
    pub domain_names: Option<Vec<String>>,
}

/// v1alpha2: `tcp`/`udp`/`sctp` with a `destinationPort`, or
/// `destinationNamedPort`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TierProtocol {
    #[serde(default)]
    pub tcp: Option<TierDestination>,
    #[serde(default)]
    pub udp: Option<TierDestination>,
    #[serde(default)]
    pub sctp: Option<TierDestination>,
    #[serde(default)]
    pub destination_named_port: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TierDestination {
    #[serde(default)]
    pub destination_port: Option<TierPortNumbers>,
}

/// `number` or `range`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TierPortNumbers {
    #[serde(default)]
    pub number: Option<i32>,
    #[serde(default)]
    pub range: Option<TierPortRange>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TierPortRange {
    /// v1alpha1 only (TCP when absent).
    #[serde(default)]
    pub protocol: Option<String>,
    pub start: i32,
    pub end: i32,
}

/// v1alpha1: `portNumber`, `portRange` or `namedPort`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TierPort {
    #[serde(default)]
    pub port_number: Option<TierPortNumber>,
    #[serde(default)]
    pub port_range: Option<TierPortRange>,
    #[serde(default)]
    pub named_port: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TierPortNumber {
    #[serde(default)]
    pub protocol: Option<String>,
    pub port: i32,
}

impl Manifests {
    /// Load a file, or every `*.yaml`, `*.yml` and `*.json` under a directory
    /// (recursively, in name order).
    pub fn load(path: &Path) -> Result<Manifests, ManifestError> {
        let mut m = Manifests::default();
        m.load_into(path)?;
        Ok(m)
    }

    fn load_into(&mut self, path: &Path) -> Result<(), ManifestError> {
        let read_err = |source| ManifestError::Read {
            path: path.to_path_buf(),
            source,
        };
        if path.is_dir() {
            let mut entries: Vec<PathBuf> = fs::read_dir(path)
                .map_err(read_err)?
                .flatten()
                .map(|e| e.path())
                .collect();
            entries.sort();
            for p in entries {
                let is_manifest = p
                    .extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
                if p.is_dir() || is_manifest {
                    self.load_into(&p)?;
                }
            }
            return Ok(());
        }
        let text = fs::read_to_string(path).map_err(read_err)?;
        self.extend(Manifests::parse(&path.display().to_string(), &text)?);
        Ok(())
    }

    /// Parse manifests from text; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Manifests, ManifestError> {
        let mut m = Manifests::default();
        for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let document = format!("document {}", i + 1);
            let value = Value::deserialize(doc).map_err(|e| ManifestError::Document {
                file: file.into(),
                document: document.clone(),
                detail: format!("not valid YAML: {e}"),
            })?;
            m.add_value(file, &document, value, None)?;
        }
        Ok(m)
    }

    /// Add another set's objects, as `kubectl apply` would: an object with
    /// the same kind, namespace and name replaces the one already here.
    pub fn extend(&mut self, other: Manifests) {
        apply(&mut self.namespaces, other.namespaces, |o| &o.metadata);
        apply(&mut self.nodes, other.nodes, |o| &o.metadata);
        apply(&mut self.pods, other.pods, |o| &o.metadata);
        apply(&mut self.services, other.services, |o| &o.metadata);
        apply(&mut self.endpoint_slices, other.endpoint_slices, |o| {
            &o.metadata
        });
        apply(&mut self.network_policies, other.network_policies, |o| {
            &o.metadata
        });
        apply_kind(&mut self.calico_policies, other.calico_policies, |o| {
            (&o.kind, &o.metadata)
        });
        apply_kind(&mut self.calico_tiers, other.calico_tiers, |o| {
            (&o.kind, &o.metadata)
        });
        apply_kind(&mut self.calico_staged, other.calico_staged, |o| {
            (&o.kind, &o.metadata)
        });
        // Cluster-scoped: the kind tells objects of one name apart.
        for object in other.tier_policies {
            match self
                .tier_policies
                .iter_mut()
                .find(|o| o.kind == object.kind && o.metadata.name == object.metadata.name)
            {
                Some(existing) => *existing = object,
                None => self.tier_policies.push(object),
            }
        }
    }

    /// `implied` is the (apiVersion, kind) of a `<Kind>List`'s items, which
    /// the API server leaves out of each item.
    fn add_value(
        &mut self,
        file: &str,
        document: &str,
        value: Value,
        implied: Option<(&Value, &str)>,
    ) -> Result<(), ManifestError> {
        let doc_err = |detail: String| ManifestError::Document {
            file: file.into(),
            document: document.into(),
            detail,
        };
        let mut map: Mapping = match value {
            // An empty document (a stray `---`) is no object.
            Value::Null => return Ok(()),
            Value::Mapping(m) => m,
            other => {
                return Err(doc_err(format!(
                    "expected a Kubernetes object (a mapping), found {}",
                    kind_of(&other)
                )));
            }
        };
        if let Some((api_version, kind)) = implied {
            map.entry("apiVersion".into())
                .or_insert_with(|| api_version.clone());
            map.entry("kind".into()).or_insert_with(|| kind.into());
        }
        let kind = match map.get("kind") {
            Some(Value::String(k)) => k.clone(),
            _ => return Err(doc_err("no `kind`: every manifest needs `apiVersion` and `kind` (e.g. `apiVersion: v1`, `kind: Pod`)".into())),
        };
        if kind == "List" || (kind.ends_with("List") && map.contains_key("items")) {
            let item_kind = kind
                .strip_suffix("List")
                .filter(|k| !k.is_empty())
                .map(str::to_string);
            let api_version = map.get("apiVersion").cloned().unwrap_or(Value::Null);
            let items = match map.remove("items") {
                Some(Value::Sequence(items)) => items,
                None | Some(Value::Null) => Vec::new(),
                Some(other) => {
                    return Err(doc_err(format!(
                        "`items` must be a list, found {}",
                        kind_of(&other)
                    )));
                }
            };
            for (j, item) in items.into_iter().enumerate() {
                let implied = item_kind.as_deref().map(|k| (&api_version, k));
                self.add_value(file, &format!("{document}, items[{j}]"), item, implied)?;
            }
            return Ok(());
        }
        let name = map
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .map(|n| {
                match map
                    .get("metadata")
                    .and_then(|m| m.get("namespace"))
                    .and_then(Value::as_str)
                {
                    Some(ns) => format!("{ns}/{n}"),
                    None => n.to_string(),
                }
            })
            .unwrap_or_else(|| "(no metadata.name)".into());
        let calico = map.get("apiVersion").and_then(Value::as_str) == Some(CALICO_API_VERSION)
            && CALICO_KINDS.contains(&kind.as_str());
        let expected = match kind.as_str() {
            _ if calico => CALICO_API_VERSION,
            "Namespace" | "Node" | "Pod" | "Service" => "v1",
            "EndpointSlice" => "discovery.k8s.io/v1",
            "NetworkPolicy" => "networking.k8s.io/v1",
            "GlobalNetworkPolicy"
            | "Tier"
            | "StagedNetworkPolicy"
            | "StagedGlobalNetworkPolicy"
            | "StagedKubernetesNetworkPolicy" => CALICO_API_VERSION,
            other => match TIER_POLICY_KINDS.iter().find(|(k, _)| *k == other) {
                Some((_, version)) => version,
                None => return Ok(()),
            },
        };
        if let Some(v) = map
            .get("apiVersion")
            .filter(|v| v.as_str() != Some(expected))
        {
            let found = v
                .as_str()
                .map_or_else(|| format!("{v:?}"), |s| format!("{s:?}"));
            return Err(ManifestError::Field {
                place: format!("{file}, {document}"),
                object: format!("{kind} {name}"),
                field: "apiVersion".into(),
                detail: format!("{found}: the lab reads {kind} as apiVersion {expected}"),
            });
        }
        let value = Value::Mapping(map);
        let ctx = Ctx {
            file,
            document,
            kind: &kind,
            name: &name,
        };
        match kind.as_str() {
            "NetworkPolicy" | "GlobalNetworkPolicy" if calico => {
                self.calico_policies.push(ctx.typed(value)?)
            }
            "Tier" => self.calico_tiers.push(ctx.typed(value)?),
            "StagedNetworkPolicy"
            | "StagedGlobalNetworkPolicy"
            | "StagedKubernetesNetworkPolicy" => self.calico_staged.push(ctx.typed(value)?),
            "Namespace" => self.namespaces.push(ctx.typed(value)?),
            "Node" => self.nodes.push(ctx.typed(value)?),
            "Pod" => self.pods.push(ctx.typed(value)?),
            "Service" => self.services.push(ctx.typed(value)?),
            "EndpointSlice" => self.endpoint_slices.push(ctx.typed(value)?),
            "NetworkPolicy" => self.network_policies.push(ctx.typed(value)?),
            "ClusterNetworkPolicy" | "AdminNetworkPolicy" | "BaselineAdminNetworkPolicy" => {
                self.tier_policies.push(ctx.typed(value)?)
            }
            // Workloads, ConfigMaps, RBAC...: not the lab's business (skipped above).
            _ => {}
        }
        Ok(())
    }
}

struct Ctx<'a> {
    file: &'a str,
    document: &'a str,
    kind: &'a str,
    name: &'a str,
}

impl Ctx<'_> {
    fn typed<T: DeserializeOwned>(&self, value: Value) -> Result<T, ManifestError> {
        serde_path_to_error::deserialize(value).map_err(|e| {
            let field = e.path().to_string();
            ManifestError::Field {
                place: format!("{}, {}", self.file, self.document),
                object: format!("{} {}", self.kind, self.name),
                field: if field == "." {
                    "(top level)".into()
                } else {
                    field
                },
                detail: e.into_inner().to_string(),
            }
        })
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// [`apply`] for kinds sharing one list: kind, namespace and name identify.
fn apply_kind<T>(into: &mut Vec<T>, from: Vec<T>, key: impl Fn(&T) -> (&String, &ObjectMeta)) {
    for object in from {
        let (kind, meta) = key(&object);
        let id = (kind.clone(), object_id(meta));
        match into.iter_mut().find(|o| {
            let (k, m) = key(o);
            (k.clone(), object_id(m)) == id
        }) {
            Some(existing) => *existing = object,
            None => into.push(object),
        }
    }
}

/// Replace objects of `into` with those of `from` that have the same
/// namespace and name; append the others.
fn apply<T>(
    into: &mut Vec<T>,
    from: Vec<T>,
    meta: impl Fn(&T) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) {
    for object in from {
        let id = object_id(meta(&object));
        match into.iter_mut().find(|o| object_id(meta(o)) == id) {
            Some(existing) => *existing = object,
            None => into.push(object),
        }
    }
}

pub fn object_id(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or("")
    )
}

impl LabSpec {
    /// A lab holding the manifests' pods: each Pod with `spec.nodeName`
    /// becomes a lab pod on that node, with `status.podIP`/`podIPs` as its
    /// addresses, its containers' ports as listeners (`8080/tcp`, `53/udp`),
    /// `metadata.uid` as its UID and `spec.hostNetwork` (a hostNetwork pod
    /// without `status.podIP` gets its node's lab address). Nodes are the Node
    /// objects (in order), then any other `nodeName` (in order of first use);
    /// lab node k gets the underlay address 100.64.k.2.
    ///
    /// Skipped, with a note each: pods without `spec.nodeName` (unscheduled)
    /// or in phase Succeeded/Failed, and SCTP ports (the lab has no SCTP
    /// listener). Pods' NetworkPolicies are not applied here: see
    /// [`Lab::enforce`](super::Lab::enforce).
    pub fn from_manifests(m: &Manifests) -> Result<(LabSpec, Vec<String>), ManifestError> {
        let mut spec = LabSpec::default();
        let mut notes = Vec::new();
        let mut node_names: Vec<String> = m
            .nodes
            .iter()
            .filter_map(|n| n.metadata.name.clone())
            .collect();
        for pod in &m.pods {
            let id = object_id(&pod.metadata);
            let pod_err = |field: &str, detail: String| ManifestError::Pod {
                pod: id.clone(),
                field: field.into(),
                detail,
            };
            let Some(ps) = pod.spec.as_ref() else {
                notes.push(format!("pod {id}: no spec, not in the lab"));
                continue;
            };
            let Some(node) = ps.node_name.clone() else {
                notes.push(format!(
                    "pod {id}: no spec.nodeName (unscheduled), not in the lab"
                ));
                continue;
            };
            let status = pod.status.clone().unwrap_or_default();
            if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
                notes.push(format!(
                    "pod {id}: phase {}, not in the lab",
                    status.phase.as_deref().unwrap_or("")
                ));
                continue;
            }
            let mut ips: Vec<std::net::IpAddr> = Vec::new();
            let listed = status
                .pod_ips
                .iter()
                .flatten()
                .map(|p| p.ip.clone())
                .chain(status.pod_ip.clone());
            for (k, text) in listed.enumerate() {
                let field = if k < status.pod_ips.as_ref().map_or(0, Vec::len) {
                    format!("status.podIPs[{k}].ip")
                } else {
                    "status.podIP".into()
                };
                let ip = text
                    .parse()
                    .map_err(|_| pod_err(&field, format!("{text:?} is not an IP address")))?;
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
            let ip = ips.iter().find_map(|ip| match ip {
                std::net::IpAddr::V4(v4) => Some(*v4),
                _ => None,
            });
            let ipv6 = ips.iter().find_map(|ip| match ip {
                std::net::IpAddr::V6(v6) => Some(*v6),
                _ => None,
            });
            if !node_names.contains(&node) {
                node_names.push(node.clone());
            }
            let host_network = ps.host_network.unwrap_or(false);
            // A hostNetwork pod's address is its node's: the lab's k-th node
            // has 100.64.k.2.
            let node_ip = || {
                node_names
                    .iter()
                    .position(|n| *n == node)
                    .and_then(|k| u8::try_from(k + 1).ok())
                    .map(|k| std::net::Ipv4Addr::new(100, 64, k, 2))
            };
            let Some(ip) = ip.or_else(|| if host_network { node_ip() } else { None }) else {
                return Err(pod_err(
                    "status.podIP",
                    "a lab pod needs an IPv4 address: set status.podIP (and status.podIPs for IPv6)".into(),
                ));
            };
            let mut listen = BTreeSet::new();
            for (c, container) in ps.containers.iter().enumerate() {
                for (k, port) in container.ports.iter().flatten().enumerate() {
                    let field = format!("spec.containers[{c}].ports[{k}]");
                    let number = super::enforce::port_number(port.container_port)
                        .map_err(|d| pod_err(&format!("{field}.containerPort"), d))?;
                    match port.protocol.as_deref().unwrap_or("TCP") {
                        "TCP" => listen.insert((number, "tcp")),
                        "UDP" => listen.insert((number, "udp")),
                        "SCTP" => {
                            notes.push(format!("pod {id}: {field}: SCTP port {number} has no listener (the lab has no SCTP listener)"));
                            false
                        }
                        other => {
                            return Err(pod_err(
                                &format!("{field}.protocol"),
                                format!("{other:?}: use TCP, UDP or SCTP"),
                            ));
                        }
                    };
                }
            }
            spec.pods.push(PodSpec {
                name: pod.metadata.name.clone().unwrap_or_default(),
                namespace: pod
                    .metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into()),
                node,
                ip,
                ipv6,
                listen: listen
                    .into_iter()
                    .map(|(p, proto)| format!("{p}/{proto}"))
                    .collect(),
                uid: pod.metadata.uid.clone(),
                host_network,
            });
        }
        spec.nodes = node_names
            .into_iter()
            .map(|name| NodeSpec {
                name,
                ..NodeSpec::default()
            })
            .collect();
        Ok((spec, notes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: x, labels: { ns: x } }
---
# a comment-only document is skipped
---
apiVersion: apps/v1
kind: Deployment
metadata: { name: web, namespace: x }
spec: { selector: {}, template: {} }
---
apiVersion: v1
kind: List
items:
  - apiVersion: v1
    kind: Pod
    metadata: { name: a, namespace: x, uid: u-a, labels: { pod: a } }
    spec:
      nodeName: node-2
      containers:
        - name: c
          image: i
          ports:
            - { containerPort: 80, name: serve-80-tcp }
            - { containerPort: 53, protocol: UDP }
            - { containerPort: 9, protocol: SCTP }
    status: { podIP: 10.244.2.2, podIPs: [ { ip: 10.244.2.2 }, { ip: "fd00::2" } ] }
  - apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: { name: deny, namespace: x }
    spec: { podSelector: {} }
---
apiVersion: v1
kind: PodList
items:
  - metadata: { name: b, namespace: x }
    spec: { nodeName: node-1, hostNetwork: true, containers: [ { name: c } ] }
  - metadata: { name: pending, namespace: x }
    spec: { containers: [ { name: c } ] }
---
apiVersion: v1
kind: Node
metadata: { name: node-1 }
"#;

    #[test]
    fn multi_document_lists_and_typed_lists_load_and_other_kinds_are_skipped() {
        let m = Manifests::parse("cluster.yaml", CLUSTER).unwrap();
        assert_eq!(m.namespaces.len(), 1);
        assert_eq!(m.pods.len(), 3);
        assert_eq!(m.network_policies.len(), 1);
        assert_eq!(m.nodes.len(), 1);
        assert_eq!(
            m.pods[1].metadata.name.as_deref(),
            Some("b"),
            "PodList items get their kind implied"
        );
    }

    #[test]
    fn a_lab_spec_comes_from_the_pods() {
        let m = Manifests::parse("cluster.yaml", CLUSTER).unwrap();
        let (spec, notes) = LabSpec::from_manifests(&m).unwrap();
        let names: Vec<&str> = spec.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(
            names,
            ["node-1", "node-2"],
            "Node objects first, then nodeNames"
        );
        let a = &spec.pods[0];
        assert_eq!((a.id().as_str(), a.node.as_str()), ("x/a", "node-2"));
        assert_eq!(a.ip.to_string(), "10.244.2.2");
        assert_eq!(a.ipv6.map(|v| v.to_string()).as_deref(), Some("fd00::2"));
        assert_eq!(a.listen, ["53/udp", "80/tcp"]);
        assert_eq!(a.uid.as_deref(), Some("u-a"));
        assert!(spec.pods[1].host_network);
        assert_eq!(
            spec.pods[1].ip.to_string(),
            "100.64.1.2",
            "a hostNetwork pod without podIP has its node's address"
        );
        assert_eq!(spec.pods.len(), 2, "the unscheduled pod is not in the lab");
        assert!(
            notes
                .iter()
                .any(|n| n.contains("x/a") && n.contains("SCTP")),
            "{notes:?}"
        );
        assert!(
            notes
                .iter()
                .any(|n| n.contains("x/pending") && n.contains("nodeName")),
            "{notes:?}"
        );
    }

    #[test]
    fn errors_name_the_file_document_object_and_field() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: { name: x }\n---\napiVersion: v1\nkind: Pod\nmetadata: { name: a, namespace: x }\nspec: { containers: [ { name: c, ports: [ { containerPort: eighty } ] } ] }\n";
        let e = Manifests::parse("bad.yaml", text).unwrap_err().to_string();
        assert!(
            e.starts_with(
                "bad.yaml, document 2 (Pod x/a): field `spec.containers[0].ports[0].containerPort`"
            ),
            "{e}"
        );
        let e = Manifests::parse("bad.yaml", "metadata: { name: x }\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("document 1") && e.contains("kind"), "{e}");
        let e = Manifests::parse("bad.yaml", "kind: Pod\n  bad: [\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.yaml, document 1: not valid YAML"), "{e}");
        let e = Manifests::parse(
            "l.yaml",
            "kind: List\nitems: [ { apiVersion: v2, kind: Pod, metadata: { name: p } } ]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("document 1, items[0] (Pod p): field `apiVersion`: \"v2\""),
            "{e}"
        );
    }

    #[test]
    fn a_pod_without_an_ipv4_address_is_refused_by_name() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: { name: a, namespace: x }\nspec: { nodeName: n, containers: [] }\nstatus: { podIP: not-an-ip }\n";
        let e = LabSpec::from_manifests(&Manifests::parse("f", text).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("x/a") && e.contains("status.podIP") && e.contains("not an IP"),
            "{e}"
        );
        let text = "apiVersion: v1\nkind: Pod\nmetadata: { name: a, namespace: x }\nspec: { nodeName: n, containers: [] }\n";
        let e = LabSpec::from_manifests(&Manifests::parse("f", text).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs an IPv4 address"), "{e}");
    }

    #[test]
    fn a_directory_loads_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("b.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: { name: b }\n",
        )
        .unwrap();
        fs::create_dir(dir.path().join("a")).unwrap();
        fs::write(
            dir.path().join("a/ns.yml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: { name: a }\n",
        )
        .unwrap();
        fs::write(dir.path().join("notes.txt"), "not a manifest").unwrap();
        let m = Manifests::load(dir.path()).unwrap();
        let names: Vec<_> = m
            .namespaces
            .iter()
            .filter_map(|n| n.metadata.name.clone())
            .collect();
        assert_eq!(names, ["a", "b"]);
        let e = Manifests::load(&dir.path().join("missing.yaml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.yaml"), "{e}");
    }
}

#[cfg(test)]
mod extend_tests {
    use super::*;

    #[test]
    fn a_later_object_with_the_same_name_replaces_the_earlier_one() {
        let pod = |ready: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{ name: p, namespace: x }}\nstatus: {{ conditions: [ {{ type: Ready, status: \"{ready}\" }} ] }}\n"
            )
        };
        let mut m = Manifests::parse("a.yaml", &pod("True")).unwrap();
        m.extend(
            Manifests::parse(
                "b.yaml",
                &(pod("False")
                    + "---\napiVersion: v1\nkind: Pod\nmetadata: { name: q, namespace: x }\n"),
            )
            .unwrap(),
        );
        assert_eq!(m.pods.len(), 2);
        let p = m
            .pods
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some("p"))
            .unwrap();
        let ready = &p.status.as_ref().unwrap().conditions.as_ref().unwrap()[0].status;
        assert_eq!(ready, "False");
    }
}
