//! Kubernetes manifests (YAML files and directories) as typed objects.
//!
//! Reads manifests the way people keep them: single files, multi-document
//! YAML, `kind: List` (what `kubectl get -o yaml` prints), JSON, and
//! directories of them (recursively, `*.yaml`, `*.yml`, `*.json`, in sorted
//! order, hidden entries skipped). The result is one [`ClusterSnapshot`].
//!
//! Kinds netwatch reads: Namespace, Pod, NetworkPolicy, Service,
//! EndpointSlice, Node, Deployment, ReplicaSet, StatefulSet, DaemonSet, Job,
//! CronJob, and the cluster policies of policy.networking.k8s.io:
//! ClusterNetworkPolicy (v1alpha2), AdminNetworkPolicy and
//! BaselineAdminNetworkPolicy (v1alpha1), checked as their CRDs check them; and
//! Calico's projectcalico.org/v3 (or crd.projectcalico.org/v1) NetworkPolicy,
//! GlobalNetworkPolicy, Tier and the Staged kinds, as calicoctl accepts them
//! (unknown fields refused, selectors parsed). Other kinds are skipped with a warning. A namespaced object
//! without a namespace lands in `default`, as `kubectl apply` would put it;
//! an object that appears twice replaces the earlier one.
//!
//! Every error names the file, the document (1-based) and the field, and says
//! how to fix it. NetworkPolicies and Pods are also checked the way the API
//! server checks them (CIDRs, selectors, ports, IPs).

use std::io::Read;
use std::path::{Path, PathBuf};

use k8s_openapi::Metadata;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_yaml::Value;

use crate::cluster::{ClusterSnapshot, PodRecord};
use crate::policy;
use crate::policy::api::calico;
use crate::policy::api::cluster::types as cluster_types;
use crate::policy::api::cluster::{
    AdminNetworkPolicy, BaselineAdminNetworkPolicy, ClusterNetworkPolicy,
};

/// Why manifests could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// A path could not be read.
    #[error("cannot read {path}: {source}; check that the path exists and is readable")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A directory holds no manifest files.
    #[error(
        "{path}: no *.yaml, *.yml or *.json files in this directory or below; point --manifests at manifest files or at directories holding them"
    )]
    NoManifests { path: PathBuf },
    /// The text is not YAML (or JSON).
    #[error(
        "{file}:{line}:{column}: document {document} is not valid {format}: {message}; fix the syntax there"
    )]
    Syntax {
        file: String,
        document: usize,
        line: usize,
        column: usize,
        format: &'static str,
        message: String,
    },
    /// An object, or one of its fields, is wrong.
    #[error(transparent)]
    Invalid(Box<InvalidObject>),
}

/// An object, or one of its fields, that is wrong: where, what, how to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: document {document}{item} ({object}): field {field}: {problem}; fix: {fix}")]
pub struct InvalidObject {
    pub file: String,
    /// 1-based index of the YAML document in the file.
    pub document: usize,
    /// `, items[3]` inside a `kind: List`, else empty.
    pub item: String,
    /// `NetworkPolicy prod/allow-web`, or what is known of it.
    pub object: String,
    /// Path of the field, e.g. `spec.ingress[0].from[0].ipBlock.cidr`.
    pub field: String,
    pub problem: String,
    pub fix: String,
}

/// Loads every manifest under `paths` (files, directories, or `-` for
/// standard input) into one snapshot.
pub fn load(paths: &[impl AsRef<Path>]) -> Result<ClusterSnapshot, ManifestError> {
    let mut loader = Loader::default();
    for path in paths {
        let path = path.as_ref();
        if path == Path::new("-") {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|source| ManifestError::Read {
                    path: path.into(),
                    source,
                })?;
            loader.add_text("<stdin>", &text, false, Format::Yaml)?;
            continue;
        }
        let meta = std::fs::metadata(path).map_err(|source| ManifestError::Read {
            path: path.into(),
            source,
        })?;
        if meta.is_dir() {
            let mut files = Vec::new();
            collect_files(path, &mut files)?;
            if files.is_empty() {
                return Err(ManifestError::NoManifests { path: path.into() });
            }
            files.sort();
            for file in files {
                loader.add_file(&file, true)?;
            }
        } else {
            loader.add_file(path, false)?;
        }
    }
    Ok(loader.snapshot)
}

/// Loads manifests from `text`; `source_name` names it in errors.
pub fn load_str(source_name: &str, text: &str) -> Result<ClusterSnapshot, ManifestError> {
    let mut loader = Loader::default();
    let format = if source_name.to_ascii_lowercase().ends_with(".json") {
        Format::Json
    } else {
        Format::Yaml
    };
    loader.add_text(source_name, text, false, format)?;
    Ok(loader.snapshot)
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), ManifestError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ManifestError::Read {
        path: dir.into(),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|source| ManifestError::Read {
            path: dir.into(),
            source,
        })?;
        let path = entry.path();
        // Hidden entries (.git, .github) hold no cluster objects.
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let meta = std::fs::metadata(&path).map_err(|source| ManifestError::Read {
            path: path.clone(),
            source,
        })?;
        if meta.is_dir() {
            collect_files(&path, out)?;
        } else if has_manifest_extension(&path) {
            out.push(path);
        }
    }
    Ok(())
}

fn has_manifest_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "yaml" | "yml" | "json"))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Yaml,
    Json,
}

/// Where an object came from, for errors.
struct Origin<'a> {
    file: &'a str,
    document: usize,
    item: Option<usize>,
}

impl Origin<'_> {
    fn invalid(
        &self,
        object: &str,
        field: &str,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> ManifestError {
        ManifestError::Invalid(Box::new(InvalidObject {
            file: self.file.to_string(),
            document: self.document,
            item: self
                .item
                .map(|i| format!(", items[{i}]"))
                .unwrap_or_default(),
            object: object.to_string(),
            field: field.to_string(),
            problem: problem.into(),
            fix: fix.into(),
        }))
    }
}

#[derive(Default)]
struct Loader {
    snapshot: ClusterSnapshot,
    /// Where each (kind, namespace, name) sits in its list, so a duplicate
    /// replaces the earlier object without scanning (10,000-pod manifests).
    index: ObjectIndex,
}

type ObjectIndex = std::collections::HashMap<(&'static str, Option<String>, Option<String>), usize>;

impl Loader {
    fn add_file(&mut self, path: &Path, found_by_walking: bool) -> Result<(), ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: path.into(),
            source,
        })?;
        let name = path.display().to_string();
        let format = if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"))
        {
            Format::Json
        } else {
            Format::Yaml
        };
        self.add_text(&name, &text, found_by_walking, format)
    }

    fn add_text(
        &mut self,
        file: &str,
        text: &str,
        found_by_walking: bool,
        format: Format,
    ) -> Result<(), ManifestError> {
        let documents: Vec<Value> = match format {
            Format::Json => {
                let json: serde_json::Value =
                    serde_json::from_str(text).map_err(|e| ManifestError::Syntax {
                        file: file.to_string(),
                        document: 1,
                        line: e.line(),
                        column: e.column(),
                        format: "JSON",
                        message: e.to_string(),
                    })?;
                // JSON values are YAML values; one conversion, then one path.
                let value = serde_yaml::to_value(json).map_err(|e| ManifestError::Syntax {
                    file: file.to_string(),
                    document: 1,
                    line: 1,
                    column: 1,
                    format: "JSON",
                    message: e.to_string(),
                })?;
                vec![value]
            }
            Format::Yaml => {
                let mut docs = Vec::new();
                for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
                    let value = Value::deserialize(de).map_err(|e| {
                        let (line, column) = e
                            .location()
                            .map(|l| (l.line(), l.column()))
                            .unwrap_or((0, 0));
                        ManifestError::Syntax {
                            file: file.to_string(),
                            document: i + 1,
                            line,
                            column,
                            format: "YAML",
                            message: e.to_string(),
                        }
                    })?;
                    docs.push(value);
                }
                docs
            }
        };
        for (i, value) in documents.into_iter().enumerate() {
            let origin = Origin {
                file,
                document: i + 1,
                item: None,
            };
            if found_by_walking && is_foreign(&value) {
                tracing::warn!(
                    "{file}: document {}: no apiVersion and kind, not a Kubernetes object; skipped",
                    i + 1
                );
                continue;
            }
            self.add_value(value, &origin)?;
        }
        Ok(())
    }

    fn add_value(&mut self, value: Value, origin: &Origin<'_>) -> Result<(), ManifestError> {
        let map = match &value {
            Value::Null => return Ok(()), // an empty document, e.g. after a trailing `---`
            Value::Mapping(map) => map,
            other => {
                return Err(origin.invalid(
                    "document",
                    "(top level)",
                    format!(
                        "expected a Kubernetes object (a mapping), found {}",
                        value_kind(other)
                    ),
                    "write an object with apiVersion, kind and metadata",
                ));
            }
        };
        let text = |key: &str| map.get(key).and_then(Value::as_str).map(str::to_string);
        let name = map
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let namespace = map
            .get("metadata")
            .and_then(|m| m.get("namespace"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let Some(kind) = text("kind") else {
            return Err(origin.invalid(
                &describe("object", namespace.as_deref(), name.as_deref()),
                "kind",
                if map.contains_key("kind") {
                    "kind is not a string"
                } else {
                    "missing kind"
                },
                "add `kind:` (e.g. Pod, NetworkPolicy) and `apiVersion:`",
            ));
        };
        if kind == "List" || (kind.ends_with("List") && map.contains_key("items")) {
            let items = match map.get("items") {
                None | Some(Value::Null) => return Ok(()),
                Some(Value::Sequence(items)) => items.clone(),
                Some(other) => {
                    return Err(origin.invalid(
                        &kind,
                        "items",
                        format!("expected a list, found {}", value_kind(other)),
                        "write `items:` as a YAML list of objects",
                    ));
                }
            };
            for (i, item) in items.into_iter().enumerate() {
                self.add_value(
                    item,
                    &Origin {
                        file: origin.file,
                        document: origin.document,
                        item: Some(i),
                    },
                )?;
            }
            return Ok(());
        }
        if let Some(api) = text("apiVersion")
            && calico::manifests::API_VERSIONS.contains(&api.as_str())
        {
            return self.add_calico(value, &kind, name, origin);
        }
        let Some(expected) = api_version_of(&kind) else {
            tracing::warn!(
                "{}: document {}: skipping {kind} {} (netwatch does not read this kind)",
                origin.file,
                origin.document,
                name.as_deref().unwrap_or("")
            );
            return Ok(());
        };
        let object = describe(&kind, namespace.as_deref(), name.as_deref());
        match text("apiVersion") {
            None => {
                return Err(origin.invalid(
                    &object,
                    "apiVersion",
                    "missing apiVersion",
                    format!("add `apiVersion: {expected}`"),
                ));
            }
            Some(v) if v != expected => {
                return Err(origin.invalid(
                    &object,
                    "apiVersion",
                    format!("{kind} with apiVersion {v} is not read (the API server serves {kind} as {expected})"),
                    format!("write `apiVersion: {expected}`"),
                ));
            }
            Some(_) => {}
        }
        if name.is_none() {
            return Err(origin.invalid(
                &object,
                "metadata.name",
                "missing name",
                "add `metadata: {name: ...}`",
            ));
        }
        // Every kind's metadata is checked strictly too: ObjectMeta's fields
        // are stable across Kubernetes versions, and a misspelt `lables:`
        // would silently leave a namespace or pod without its labels.
        if api_version_of(&kind).is_some()
            && let Some(meta) = map.get("metadata")
            && let Ok(parsed) = serde_yaml::from_value::<ObjectMeta>(meta.clone())
        {
            reject_unknown_fields(origin, &object, meta, &parsed, "metadata")?;
        }
        let s = &mut self.snapshot;
        let ix = &mut self.index;
        match kind.as_str() {
            "Namespace" => push(&mut s.namespaces, ix, typed(value, origin, &object)?, false),
            "Node" => push(&mut s.nodes, ix, typed(value, origin, &object)?, false),
            "Pod" => {
                let mut pod: k8s_openapi::api::core::v1::Pod = typed(value, origin, &object)?;
                default_namespace(&mut pod.metadata);
                // Kept as a record: what netwatch reads of a pod, a tenth
                // of the typed object.
                let (pod, problems) = PodRecord::read(pod);
                if let Some(p) = problems.into_iter().next() {
                    return Err(origin.invalid(&object, &p.field, p.problem, p.fix));
                }
                let key = (
                    "Pod",
                    Some(pod.namespace().to_owned()),
                    pod.name().map(str::to_owned),
                );
                push_keyed(&mut s.pods, ix, key, pod);
            }
            "NetworkPolicy" => {
                let original = value.clone();
                let np: k8s_openapi::api::networking::v1::NetworkPolicy =
                    typed(value, origin, &object)?;
                // serde skips fields it does not know: a misspelt `ingres:`
                // would silently mean "no ingress rules". Reject it as
                // `kubectl --validate=strict` does. (Policies only: other
                // kinds may carry fields newer than netwatch's API types.)
                reject_unknown_fields(origin, &object, &original, &np, "")?;
                if let Err(p) = policy::check_network_policy(&np) {
                    return Err(origin.invalid(&object, &p.field, p.problem, p.fix));
                }
                push(&mut s.network_policies, ix, np, true);
            }
            "ClusterNetworkPolicy" => {
                let cnp: ClusterNetworkPolicy = typed(value, origin, &object)?;
                if let Err(p) = policy::check_cluster_network_policy(&cnp) {
                    return Err(origin.invalid(&object, &p.field, p.problem, p.fix));
                }
                push(&mut s.cluster_network_policies, ix, cnp, false);
            }
            "AdminNetworkPolicy" => {
                let anp: AdminNetworkPolicy = typed(value, origin, &object)?;
                if let Err(p) = policy::check_admin_network_policy(&anp) {
                    return Err(origin.invalid(&object, &p.field, p.problem, p.fix));
                }
                push(&mut s.admin_network_policies, ix, anp, false);
            }
            "BaselineAdminNetworkPolicy" => {
                let banp: BaselineAdminNetworkPolicy = typed(value, origin, &object)?;
                if let Err(p) = policy::check_baseline_admin_network_policy(&banp) {
                    return Err(origin.invalid(&object, &p.field, p.problem, p.fix));
                }
                push(&mut s.baseline_admin_network_policies, ix, banp, false);
            }
            "Service" => push(&mut s.services, ix, typed(value, origin, &object)?, true),
            "EndpointSlice" => push(
                &mut s.endpoint_slices,
                ix,
                typed(value, origin, &object)?,
                true,
            ),
            "Deployment" => push(&mut s.deployments, ix, typed(value, origin, &object)?, true),
            "ReplicaSet" => push(
                &mut s.replica_sets,
                ix,
                typed(value, origin, &object)?,
                true,
            ),
            "StatefulSet" => push(
                &mut s.stateful_sets,
                ix,
                typed(value, origin, &object)?,
                true,
            ),
            "DaemonSet" => push(&mut s.daemon_sets, ix, typed(value, origin, &object)?, true),
            "Job" => push(&mut s.jobs, ix, typed(value, origin, &object)?, true),
            "CronJob" => push(&mut s.cron_jobs, ix, typed(value, origin, &object)?, true),
            _ => {}
        }
        Ok(())
    }
}

impl Loader {
    /// A projectcalico.org/v3 (or crd.projectcalico.org/v1) object: the
    /// policy kinds and Tier, checked as the Calico API server checks them.
    fn add_calico(
        &mut self,
        value: Value,
        kind: &str,
        name: Option<String>,
        origin: &Origin<'_>,
    ) -> Result<(), ManifestError> {
        let namespaced = matches!(
            kind,
            "NetworkPolicy" | "StagedNetworkPolicy" | "StagedKubernetesNetworkPolicy"
        );
        let mut namespace = value
            .get("metadata")
            .and_then(|m| m.get("namespace"))
            .and_then(Value::as_str)
            .map(str::to_string);
        if namespaced && namespace.as_deref().is_none_or(str::is_empty) {
            namespace = Some("default".into());
        }
        let object = describe(
            &format!("{kind}.projectcalico.org"),
            namespace.as_deref(),
            name.as_deref(),
        );
        let known = [
            "Tier",
            "NetworkPolicy",
            "GlobalNetworkPolicy",
            "StagedNetworkPolicy",
            "StagedGlobalNetworkPolicy",
            "StagedKubernetesNetworkPolicy",
        ];
        if !known.contains(&kind) {
            tracing::warn!(
                "{}: document {}: skipping Calico {kind} {} (it does not decide pod flows)",
                origin.file,
                origin.document,
                name.as_deref().unwrap_or("")
            );
            return Ok(());
        }
        let Some(name) = name else {
            return Err(origin.invalid(
                &object,
                "metadata.name",
                "missing name",
                "add `metadata: {name: ...}`",
            ));
        };
        let calico_error = |e: calico::CalicoError| {
            origin.invalid(
                &object,
                e.field(),
                e.problem(),
                "see Calico's policy reference (docs.tigera.io, projectcalico.org/v3)",
            )
        };
        let c = &mut self.snapshot.calico;
        let ns = namespace.as_deref();
        match kind {
            "Tier" => {
                let tier: calico::CalicoTier = typed(value, origin, &object)?;
                calico::check_tier(&tier).map_err(calico_error)?;
                replace_named(&mut c.tiers, tier, |t| &t.metadata);
            }
            "NetworkPolicy" => {
                let mut p: calico::CalicoNetworkPolicy = typed(value, origin, &object)?;
                p.metadata.namespace = namespace.clone();
                calico::check_policy(calico::CalicoKind::CalicoNetworkPolicy, ns, &name, &p.spec)
                    .map_err(calico_error)?;
                replace_named(&mut c.network_policies, p, |p| &p.metadata);
            }
            "GlobalNetworkPolicy" => {
                let p: calico::GlobalNetworkPolicy = typed(value, origin, &object)?;
                calico::check_policy(
                    calico::CalicoKind::CalicoGlobalNetworkPolicy,
                    None,
                    &name,
                    &p.spec,
                )
                .map_err(calico_error)?;
                replace_named(&mut c.global_network_policies, p, |p| &p.metadata);
            }
            "StagedNetworkPolicy" => {
                let mut p: calico::StagedNetworkPolicy = typed(value, origin, &object)?;
                p.metadata.namespace = namespace.clone();
                calico::check_policy(
                    calico::CalicoKind::CalicoNetworkPolicy,
                    ns,
                    &name,
                    &p.spec.spec,
                )
                .map_err(calico_error)?;
                replace_named(&mut c.staged_network_policies, p, |p| &p.metadata);
            }
            "StagedGlobalNetworkPolicy" => {
                let p: calico::StagedGlobalNetworkPolicy = typed(value, origin, &object)?;
                calico::check_policy(
                    calico::CalicoKind::CalicoGlobalNetworkPolicy,
                    None,
                    &name,
                    &p.spec.spec,
                )
                .map_err(calico_error)?;
                replace_named(&mut c.staged_global_network_policies, p, |p| &p.metadata);
            }
            _ => {
                let mut p: calico::StagedKubernetesNetworkPolicy = typed(value, origin, &object)?;
                p.metadata.namespace = namespace.clone();
                let np = k8s_openapi::api::networking::v1::NetworkPolicy {
                    metadata: p.metadata.clone(),
                    spec: Some(p.spec.spec.clone()),
                };
                if let Err(problem) = policy::check_network_policy(&np) {
                    return Err(origin.invalid(
                        &object,
                        &format!("spec.{}", problem.field.trim_start_matches("spec.")),
                        problem.problem,
                        problem.fix,
                    ));
                }
                replace_named(&mut c.staged_kubernetes_network_policies, p, |p| {
                    &p.metadata
                });
            }
        }
        Ok(())
    }
}

/// Appends a Calico object, replacing an earlier one of the same
/// namespace and name (as `calicoctl apply` of both would).
fn replace_named<T>(list: &mut Vec<T>, object: T, meta: impl Fn(&T) -> &ObjectMeta) {
    let key = |m: &ObjectMeta| (m.namespace.clone(), m.name.clone());
    let new = key(meta(&object));
    match list.iter_mut().find(|o| key(meta(o)) == new) {
        Some(existing) => {
            tracing::warn!(
                "{} appears twice; the later one is used",
                describe("Calico object", new.0.as_deref(), new.1.as_deref())
            );
            *existing = object;
        }
        None => list.push(object),
    }
}

/// Whether a document found by walking a directory is some other tool's
/// YAML (CI config, Helm values): neither apiVersion nor kind.
fn is_foreign(value: &Value) -> bool {
    match value {
        Value::Mapping(map) => !map.contains_key("apiVersion") && !map.contains_key("kind"),
        Value::Null => false,
        _ => true,
    }
}

/// The apiVersion netwatch reads for `kind`, or None for kinds it skips.
fn api_version_of(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "Namespace" | "Pod" | "Service" | "Node" => "v1",
        "NetworkPolicy" => "networking.k8s.io/v1",
        "EndpointSlice" => "discovery.k8s.io/v1",
        "Deployment" | "ReplicaSet" | "StatefulSet" | "DaemonSet" => "apps/v1",
        "Job" | "CronJob" => "batch/v1",
        "ClusterNetworkPolicy" => cluster_types::V1ALPHA2,
        "AdminNetworkPolicy" | "BaselineAdminNetworkPolicy" => cluster_types::V1ALPHA1,
        _ => return None,
    })
}

fn describe(kind: &str, namespace: Option<&str>, name: Option<&str>) -> String {
    match (namespace, name) {
        (Some(ns), Some(n)) => format!("{kind} {ns}/{n}"),
        (None, Some(n)) => format!("{kind} {n}"),
        _ => format!("{kind} without a name"),
    }
}

fn value_kind(v: &Value) -> &'static str {
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

/// Deserializes `value` as `T`, naming the field that does not fit.
fn typed<T: DeserializeOwned>(
    value: Value,
    origin: &Origin<'_>,
    object: &str,
) -> Result<T, ManifestError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner().to_string();
        let fix = if inner.contains("expected a string") {
            "quote the value (labels, annotations and names are strings: write \"true\", \"1\")"
                .to_string()
        } else if inner.contains("expected i32")
            || inner.contains("expected i64")
            || inner.contains("expected u16")
        {
            "write a number without quotes".to_string()
        } else {
            let kind = object
                .split(' ')
                .next()
                .unwrap_or_default()
                .to_ascii_lowercase();
            let path: String = field
                .split('.')
                .map(|p| p.split('[').next().unwrap_or_default())
                .collect::<Vec<_>>()
                .join(".");
            format!("see `kubectl explain {kind}.{path}` for the field's type")
        };
        origin.invalid(
            object,
            if field == "." { "(top level)" } else { &field },
            inner,
            fix,
        )
    })
}

/// An error for the first field of `original` (at `path`) that `parsed`,
/// deserialized from it, does not carry: serde drops unknown fields
/// silently, `kubectl --validate=strict` refuses them.
fn reject_unknown_fields<T: serde::Serialize>(
    origin: &Origin<'_>,
    object: &str,
    original: &Value,
    parsed: &T,
    path: &str,
) -> Result<(), ManifestError> {
    let Ok(understood) = serde_yaml::to_value(parsed) else {
        return Ok(());
    };
    let Some((field, key)) = unknown_field(original, &understood, path) else {
        return Ok(());
    };
    let fix = match did_you_mean(&key) {
        Some(known) => format!("did you mean `{known}`?"),
        None => "remove it".to_string(),
    };
    Err(origin.invalid(
        object,
        &field,
        format!("unknown field `{key}`"),
        format!("{fix} (unknown fields are rejected, as kubectl --validate=strict does)"),
    ))
}

/// The first field of `original` that deserializing dropped: the path
/// and the key. `understood` is what was deserialized, serialized again.
/// Nulls and empty maps or lists are skipped (they say nothing: `status:
/// {}` in kubectl's output of older clusters, say).
fn unknown_field(original: &Value, understood: &Value, path: &str) -> Option<(String, String)> {
    match (original, understood) {
        (Value::Mapping(o), Value::Mapping(u)) => {
            for (k, v) in o {
                let empty = match v {
                    Value::Null => true,
                    Value::Mapping(m) => m.is_empty(),
                    Value::Sequence(q) => q.is_empty(),
                    _ => false,
                };
                let Some(key) = k.as_str() else { continue };
                if empty && !u.contains_key(key) {
                    continue;
                }
                let here = if path.is_empty() {
                    key.to_string()
                } else {
                    format!("{path}.{key}")
                };
                match u.get(key) {
                    None => return Some((here, key.to_string())),
                    Some(inner) => {
                        if let Some(found) = unknown_field(v, inner, &here) {
                            return Some(found);
                        }
                    }
                }
            }
            None
        }
        (Value::Sequence(o), Value::Sequence(u)) => o
            .iter()
            .zip(u)
            .enumerate()
            .find_map(|(i, (a, b))| unknown_field(a, b, &format!("{path}[{i}]"))),
        _ => None,
    }
}

/// The NetworkPolicy field names (and the common metadata ones) closest to
/// a misspelt `key`: at most two edits away.
fn did_you_mean(key: &str) -> Option<&'static str> {
    const FIELDS: &[&str] = &[
        "apiVersion",
        "kind",
        "metadata",
        "spec",
        "status",
        "name",
        "namespace",
        "labels",
        "annotations",
        "podSelector",
        "policyTypes",
        "ingress",
        "egress",
        "from",
        "to",
        "ports",
        "namespaceSelector",
        "ipBlock",
        "cidr",
        "except",
        "port",
        "endPort",
        "protocol",
        "matchLabels",
        "matchExpressions",
        "key",
        "operator",
        "values",
    ];
    fn distance(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut prev: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut cur = vec![i + 1];
            for (j, cb) in b.iter().enumerate() {
                let sub = prev[j] + usize::from(!ca.eq_ignore_ascii_case(cb));
                cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
            }
            prev = cur;
        }
        prev[b.len()]
    }
    FIELDS
        .iter()
        .map(|f| (distance(key, f), *f))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, f)| f)
}

fn default_namespace(meta: &mut ObjectMeta) {
    if meta.namespace.as_deref().is_none_or(str::is_empty) {
        meta.namespace = Some("default".into());
    }
}

/// Appends `object` (in `default` when namespaced and without a namespace),
/// replacing an earlier object of the same namespace and name.
fn push<T: Metadata<Ty = ObjectMeta>>(
    list: &mut Vec<T>,
    index: &mut ObjectIndex,
    mut object: T,
    namespaced: bool,
) {
    if namespaced {
        default_namespace(object.metadata_mut());
    }
    let m = object.metadata();
    let key = (T::KIND, m.namespace.clone(), m.name.clone());
    push_keyed(list, index, key, object);
}

/// Appends `object` filed under `key` (kind, namespace, name), replacing an
/// earlier object of that key.
fn push_keyed<T>(
    list: &mut Vec<T>,
    index: &mut ObjectIndex,
    key: (&'static str, Option<String>, Option<String>),
    object: T,
) {
    match index.get(&key).and_then(|&i| list.get_mut(i)) {
        Some(existing) => {
            tracing::warn!(
                "{} {} appears twice; the later one is used",
                key.0,
                describe("", key.1.as_deref(), key.2.as_deref()).trim_start()
            );
            *existing = object;
        }
        None => {
            index.insert(key, list.len());
            list.push(object);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x, labels: {pod: a}}\nspec:\n  containers:\n  - name: c\n    image: i\n    ports: [{containerPort: 80, name: http}]\nstatus: {podIP: 10.0.0.1}\n";

    #[test]
    fn multi_document_yaml_with_empty_documents() {
        let text = format!(
            "---\n{POD}---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: x, labels: {{team: a}}}}\n---\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: x}}\nspec: {{podSelector: {{}}}}\n---\n"
        );
        let s = load_str("all.yaml", &text).unwrap();
        assert_eq!(s.pods.len(), 1);
        assert_eq!(s.namespaces.len(), 1);
        assert_eq!(s.network_policies.len(), 1);
    }

    #[test]
    fn list_objects_are_unpacked() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: x}}\n- {apiVersion: v1, kind: Namespace, metadata: {name: y}}\n";
        let s = load_str("list.yaml", text).unwrap();
        assert_eq!(s.namespaces.len(), 2);
    }

    #[test]
    fn unknown_kinds_are_skipped() {
        let text = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n";
        let s = load_str("m.yaml", text).unwrap();
        assert_eq!(s.namespaces.len(), 1);
    }

    #[test]
    fn namespaced_objects_default_to_the_default_namespace() {
        let text = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p}\nspec: {}\n";
        let s = load_str("m.yaml", text).unwrap();
        assert_eq!(
            s.network_policies[0].metadata.namespace.as_deref(),
            Some("default")
        );
    }

    #[test]
    fn every_kind_of_the_snapshot_is_read() {
        let text = "\
apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: x}\nspec: {clusterIP: 10.96.0.10}\n---
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: e, namespace: x}\naddressType: IPv4\nendpoints: []\n---
apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nspec: {podCIDR: 10.244.0.0/24}\n---
apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d, namespace: x}\nspec: {selector: {matchLabels: {app: d}}, template: {metadata: {labels: {app: d}}}}\n---
apiVersion: apps/v1\nkind: ReplicaSet\nmetadata: {name: r, namespace: x}\nspec: {selector: {matchLabels: {app: d}}}\n---
apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: ss, namespace: x}\nspec: {selector: {matchLabels: {app: s}}, serviceName: s, template: {metadata: {labels: {app: s}}}}\n---
apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: ds, namespace: x}\nspec: {selector: {matchLabels: {app: ds}}, template: {metadata: {labels: {app: ds}}}}\n---
apiVersion: batch/v1\nkind: Job\nmetadata: {name: j, namespace: x}\nspec: {template: {metadata: {labels: {app: j}}}}\n---
apiVersion: batch/v1\nkind: CronJob\nmetadata: {name: cj, namespace: x}\nspec: {schedule: '* * * * *', jobTemplate: {spec: {template: {}}}}\n";
        let s = load_str("m.yaml", text).unwrap();
        assert_eq!(
            [
                s.services.len(),
                s.endpoint_slices.len(),
                s.nodes.len(),
                s.deployments.len(),
                s.replica_sets.len(),
                s.stateful_sets.len(),
                s.daemon_sets.len(),
                s.jobs.len(),
                s.cron_jobs.len()
            ],
            [1; 9]
        );
    }

    #[test]
    fn json_files_are_read() {
        let text = r#"{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}}"#;
        let s = load_str("ns.json", text).unwrap();
        assert_eq!(s.namespaces.len(), 1);
        let err = load_str("ns.json", "{\"apiVersion\": }").unwrap_err();
        assert!(
            matches!(
                err,
                ManifestError::Syntax {
                    format: "JSON",
                    line: 1,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn syntax_errors_name_file_document_and_line() {
        let text = format!("{POD}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: b\n");
        let err = load_str("pods.yaml", &text).unwrap_err();
        let ManifestError::Syntax {
            file,
            document,
            line,
            ..
        } = &err
        else {
            panic!("{err}")
        };
        assert_eq!((file.as_str(), *document), ("pods.yaml", 2));
        assert!(*line >= 12, "line {line}");
    }

    #[test]
    fn type_errors_name_the_field_path() {
        let text = format!(
            "{POD}---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: x}}\nspec:\n  podSelector: {{}}\n  ingress:\n  - from:\n    - podSelector: {{matchLabels: [a]}}\n"
        );
        let err = load_str("np.yaml", &text).unwrap_err().to_string();
        assert!(err.starts_with("np.yaml: document 2 (NetworkPolicy x/p): field spec.ingress[0].from[0].podSelector.matchLabels:"), "{err}");
    }

    #[test]
    fn unknown_policy_fields_are_rejected_with_a_suggestion() {
        let text = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x, creationTimestamp: null}\nspec:\n  podSelector: {}\n  ingres:\n  - from: [{podSelector: {}}]\n";
        let err = load_str("np.yaml", text).unwrap_err().to_string();
        assert!(
            err.contains(
                "document 1 (NetworkPolicy x/p): field spec.ingres: unknown field `ingres`"
            ) && err.contains("did you mean `ingress`?"),
            "{err}"
        );
        // Deeper down, in a list.
        let text = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  egress:\n  - to:\n    - ipBlock: {cidr: 10.0.0.0/8}\n    prots: [{port: 53}]\n";
        let err = load_str("np.yaml", text).unwrap_err().to_string();
        assert!(
            err.contains("field spec.egress[0].prots") && err.contains("`ports`"),
            "{err}"
        );
        // Metadata of every kind netwatch reads, too.
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, lables: {team: a}}\n";
        let err = load_str("ns.yaml", text).unwrap_err().to_string();
        assert!(
            err.contains("field metadata.lables") && err.contains("`labels`"),
            "{err}"
        );
        // Every field it knows, empty ones and explicit nulls included, passes.
        let text = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x, labels: {}}\nspec:\n  podSelector: {matchLabels: {app: a}, matchExpressions: []}\n  policyTypes: [Ingress, Egress]\n  ingress: []\n  egress:\n  - to: [{namespaceSelector: {}, podSelector: {}}]\n    ports: [{port: 53, protocol: UDP, endPort: null}]\n";
        load_str("np.yaml", text).unwrap();
    }

    #[test]
    fn policy_semantics_errors_name_the_field() {
        let text = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  egress:\n  - to:\n    - ipBlock: {cidr: 10.0.0.0/33}\n";
        let err = load_str("np.yaml", text).unwrap_err().to_string();
        assert!(err.contains("document 1 (NetworkPolicy x/p): field spec.egress[0].to[0].ipBlock.cidr: invalid CIDR"), "{err}");
        let text = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector:\n    matchExpressions: [{key: app, operator: Equals, values: [a]}]\n";
        let err = load_str("np.yaml", text).unwrap_err().to_string();
        assert!(
            err.contains(
                "field spec.podSelector.matchExpressions[0].operator: unknown operator \"Equals\""
            ),
            "{err}"
        );
        assert!(err.contains("In, NotIn, Exists, DoesNotExist"), "{err}");
    }

    #[test]
    fn list_item_errors_name_the_item() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: x}}\n- {apiVersion: v1, kind: Pod, metadata: {name: a}, status: {podIP: not-an-ip}}\n";
        let err = load_str("l.yaml", text).unwrap_err().to_string();
        assert!(
            err.starts_with(
                "l.yaml: document 1, items[1] (Pod a): field status.podIP: invalid IP address"
            ),
            "{err}"
        );
    }

    #[test]
    fn missing_kind_api_version_and_name_are_errors() {
        let err = load_str("m.yaml", "apiVersion: v1\nmetadata: {name: a}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("field kind: missing kind"), "{err}");
        let err = load_str("m.yaml", "kind: Pod\nmetadata: {name: a}\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("field apiVersion: missing apiVersion; fix: add `apiVersion: v1`"),
            "{err}"
        );
        let err = load_str(
            "m.yaml",
            "apiVersion: extensions/v1beta1\nkind: NetworkPolicy\nmetadata: {name: a}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("write `apiVersion: networking.k8s.io/v1`"),
            "{err}"
        );
        let err = load_str("m.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("field metadata.name: missing name"), "{err}");
        let err = load_str("m.yaml", "- a\n- b\n").unwrap_err().to_string();
        assert!(err.contains("expected a Kubernetes object"), "{err}");
    }

    #[test]
    fn unquoted_label_values_get_a_quoting_hint() {
        let err = load_str(
            "m.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a, labels: {enabled: true}}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("field metadata.labels.enabled"), "{err}");
        assert!(err.contains("quote the value"), "{err}");
    }

    #[test]
    fn later_duplicates_replace_earlier_objects() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x, labels: {v: '1'}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x, labels: {v: '2'}}\n";
        let s = load_str("m.yaml", text).unwrap();
        assert_eq!(s.pods.len(), 1);
        assert_eq!(s.pods[0].labels()["v"], "2");
    }

    #[test]
    fn directories_are_walked_recursively_in_order_skipping_hidden_and_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("b-sub");
        std::fs::create_dir(&sub).unwrap();
        std::fs::create_dir(dir.path().join(".github")).unwrap();
        std::fs::write(dir.path().join(".github/ci.yaml"), "on: push\n").unwrap();
        std::fs::write(dir.path().join("values.yaml"), "replicas: 3\n").unwrap();
        std::fs::write(
            dir.path().join("a.yml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n",
        )
        .unwrap();
        std::fs::write(
            sub.join("pod.json"),
            r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"a","namespace":"x"}}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("README.md"), "# not yaml: {").unwrap();
        let s = load(&[dir.path()]).unwrap();
        assert_eq!((s.namespaces.len(), s.pods.len()), (1, 1));

        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            load(&[empty.path()]).unwrap_err(),
            ManifestError::NoManifests { .. }
        ));
        let missing = dir.path().join("nope.yaml");
        let err = load(&[&missing]).unwrap_err().to_string();
        assert!(
            err.contains("nope.yaml") && err.contains("check that the path exists"),
            "{err}"
        );
    }

    #[test]
    fn explicit_files_without_kind_are_errors_even_if_a_walk_would_skip_them() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("values.yaml");
        std::fs::write(&file, "replicas: 3\n").unwrap();
        let err = load(&[&file]).unwrap_err().to_string();
        assert!(
            err.contains("values.yaml: document 1") && err.contains("missing kind"),
            "{err}"
        );
    }
}
