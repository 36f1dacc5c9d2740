//! The deployment as a cluster operator and their security team check it:
//! the chart (rendered by Helm's own engine, `cargo xtask deploy template`)
//! and the plain manifests parse into the Kubernetes API types with nothing
//! unknown, agree with each other, ask for no privilege beyond what the
//! agent uses, and pass the agent flags and probes it really has.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use k8s_openapi::{
    Resource,
    api::{
        apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet},
        batch::v1::{CronJob, Job},
        core::v1::{ConfigMap, Container, Namespace, Node, Pod, Service, ServiceAccount},
        discovery::v1::EndpointSlice,
        networking::v1::NetworkPolicy,
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value as Json;
use support::target_binary;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn xtask(args: &[&str]) -> Output {
    Command::new(target_binary("xtask"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run xtask")
}

// ---------------------------------------------------------------------------
// Documents and their typed form

/// One YAML document and where it came from (file, or chart template).
struct Doc {
    source: String,
    yaml: serde_yaml::Value,
}

fn split_docs(source: &str, text: &str) -> Vec<Doc> {
    let mut docs = Vec::new();
    let mut current = source.to_string();
    for part in text.split("\n---\n") {
        if let Some(line) = part.lines().find_map(|l| l.strip_prefix("# Source: ")) {
            current = line.to_string();
        }
        let yaml: serde_yaml::Value =
            serde_yaml::from_str(part).unwrap_or_else(|e| panic!("{current}: not YAML: {e}"));
        if !yaml.is_null() {
            docs.push(Doc {
                source: current.clone(),
                yaml,
            });
        }
    }
    docs
}

/// The committed plain manifests, every `*.yaml` under deploy/manifests/.
fn plain_docs() -> Vec<Doc> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&root().join("deploy/manifests"), &mut files);
    files.sort();
    assert!(!files.is_empty(), "deploy/manifests holds no manifests");
    files
        .iter()
        .flat_map(|f| {
            let text = std::fs::read_to_string(f).unwrap();
            split_docs(
                &f.strip_prefix(root()).unwrap().display().to_string(),
                &format!("\n{text}"),
            )
        })
        .collect()
}

/// The chart rendered with `--set` values, as `helm template` would.
fn template(values: &[&str]) -> Vec<Doc> {
    let mut args = vec!["deploy", "template"];
    for v in values {
        args.extend(["--set", v]);
    }
    let out = xtask(&args);
    assert!(
        out.status.success(),
        "xtask {}:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    split_docs("chart", &String::from_utf8(out.stdout).unwrap())
}

/// Every value switch of the chart on at once (plus lists filled in).
const EVERYTHING_ON: &[&str] = &[
    "namespace.create=true",
    "kubernetesEvents.enabled=true",
    "metrics.serviceMonitor.enabled=true",
    "metrics.podMonitor.enabled=true",
    "prometheusRule.enabled=true",
    "grafanaDashboard.enabled=true",
    "interfaces={cali*,lxc*}",
    "flowLog.allow={verdict=DROPPED namespace=prod}",
    "flowLog.deny={to-port=53 verdict=TIMED_OUT}",
    "extraArgs={--idle-timeout=60}",
    "image.digest=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    "imagePullSecrets[0].name=registry",
];

/// Every rendering the tests look at: the committed plain manifests, the
/// chart's defaults, and everything on.
fn all_renderings() -> Vec<(&'static str, Vec<Doc>)> {
    vec![
        ("deploy/manifests", plain_docs()),
        ("chart defaults", template(&[])),
        ("everything on", template(EVERYTHING_ON)),
    ]
}

/// The Prometheus Operator's kinds (monitoring.coreos.com/v1), with the
/// fields of its API reference that the chart may use; anything else is
/// rejected.
mod prometheus_operator {
    use super::*;

    #[derive(Debug, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct Object<S> {
        pub api_version: String,
        pub kind: String,
        pub metadata: ObjectMeta,
        pub spec: S,
    }

    #[derive(Debug, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct ServiceMonitorSpec {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub job_label: Option<String>,
        pub selector: LabelSelector,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub namespace_selector: Option<NamespaceSelector>,
        pub endpoints: Vec<Endpoint>,
    }

    #[derive(Debug, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct PodMonitorSpec {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub job_label: Option<String>,
        pub selector: LabelSelector,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub namespace_selector: Option<NamespaceSelector>,
        pub pod_metrics_endpoints: Vec<Endpoint>,
    }

    #[derive(Debug, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct NamespaceSelector {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub any: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub match_names: Option<Vec<String>>,
    }

    #[derive(Debug, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct Endpoint {
        pub port: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub path: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub interval: Option<String>,
    }

    #[derive(Debug, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct PrometheusRuleSpec {
        pub groups: Vec<RuleGroup>,
    }

    #[derive(Debug, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct RuleGroup {
        pub name: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub interval: Option<String>,
        pub rules: Vec<Rule>,
    }

    #[derive(Debug, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "snake_case")]
    pub struct Rule {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub alert: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub record: Option<String>,
        pub expr: String,
        #[serde(rename = "for", skip_serializing_if = "Option::is_none")]
        pub for_: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub keep_firing_for: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub labels: Option<BTreeMap<String, String>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub annotations: Option<BTreeMap<String, String>>,
    }

    pub type ServiceMonitor = Object<ServiceMonitorSpec>;
    pub type PodMonitor = Object<PodMonitorSpec>;
    pub type PrometheusRule = Object<PrometheusRuleSpec>;
}
use prometheus_operator::{PodMonitor, PrometheusRule, ServiceMonitor};

/// A document as its Kubernetes type.
#[allow(clippy::large_enum_variant)] // a handful of parsed test documents; boxing buys nothing
enum Object {
    Namespace(Namespace),
    ServiceAccount(ServiceAccount),
    ConfigMap(ConfigMap),
    Service(Service),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    DaemonSet(Box<DaemonSet>),
    ServiceMonitor(ServiceMonitor),
    PodMonitor(PodMonitor),
    PrometheusRule(PrometheusRule),
}

/// Parses `doc` into the type its apiVersion and kind name, failing (with
/// the field's path) on a value of the wrong type, and on any field the
/// type does not have: k8s-openapi ignores unknown fields when it reads, so
/// the typed object is written back and every field of the document must
/// still be there with the same value, as the API server would keep it.
fn typed(doc: &Doc) -> Result<Object, String> {
    let json = serde_json::to_value(&doc.yaml).map_err(|e| format!("{}: {e}", doc.source))?;
    let field = |name: &str| {
        json.get(name)
            .and_then(Json::as_str)
            .unwrap_or("")
            .to_string()
    };
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    fn strict<T: DeserializeOwned + Serialize>(source: &str, json: &Json) -> Result<T, String> {
        let parsed: T = serde_path_to_error::deserialize(json.clone())
            .map_err(|e| format!("{source}: field `{}`: {}", e.path(), e.inner()))?;
        let written = serde_json::to_value(&parsed).map_err(|e| format!("{source}: {e}"))?;
        let mut lost = Vec::new();
        vanished(json, &written, "", &mut lost);
        if lost.is_empty() {
            Ok(parsed)
        } else {
            Err(format!(
                "{source}: fields the Kubernetes API does not have (or changed by it): {}",
                lost.join(", ")
            ))
        }
    }
    let source = format!("{} ({api_version} {kind})", doc.source);
    Ok(match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => Object::Namespace(strict(&source, &json)?),
        ("v1", "ServiceAccount") => Object::ServiceAccount(strict(&source, &json)?),
        ("v1", "ConfigMap") => Object::ConfigMap(strict(&source, &json)?),
        ("v1", "Service") => Object::Service(strict(&source, &json)?),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
            Object::ClusterRole(strict(&source, &json)?)
        }
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            Object::ClusterRoleBinding(strict(&source, &json)?)
        }
        ("apps/v1", "DaemonSet") => Object::DaemonSet(Box::new(strict(&source, &json)?)),
        ("monitoring.coreos.com/v1", "ServiceMonitor") => {
            Object::ServiceMonitor(strict(&source, &json)?)
        }
        ("monitoring.coreos.com/v1", "PodMonitor") => Object::PodMonitor(strict(&source, &json)?),
        ("monitoring.coreos.com/v1", "PrometheusRule") => {
            Object::PrometheusRule(strict(&source, &json)?)
        }
        _ => {
            return Err(format!(
                "{source}: a kind these tests do not know; add its type to `typed`"
            ));
        }
    })
}

/// Paths of `original` that are missing or different in `written`.
fn vanished(original: &Json, written: &Json, path: &str, lost: &mut Vec<String>) {
    match (original, written) {
        (Json::Object(a), Json::Object(b)) => {
            for (key, value) in a {
                let here = format!("{path}.{key}");
                match b.get(key) {
                    Some(w) => vanished(value, w, &here, lost),
                    None if value.is_null() => {}
                    None => lost.push(here),
                }
            }
        }
        (Json::Array(a), Json::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                vanished(x, y, &format!("{path}[{i}]"), lost);
            }
        }
        (a, b) if a == b => {}
        (a, b) => lost.push(format!("{path} ({a} became {b})")),
    }
}

/// Every document of a rendering, typed (panics naming each failure).
fn objects(docs: &[Doc]) -> Vec<Object> {
    let (ok, errors): (Vec<_>, Vec<_>) = docs.iter().map(typed).partition(Result::is_ok);
    let errors: Vec<String> = errors.into_iter().map(|e| e.err().unwrap()).collect();
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    ok.into_iter().map(|o| o.ok().unwrap()).collect()
}

fn daemonset(objects: &[Object]) -> &DaemonSet {
    let sets: Vec<&DaemonSet> = objects
        .iter()
        .filter_map(|o| {
            if let Object::DaemonSet(d) = o {
                Some(&**d)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(sets.len(), 1, "one DaemonSet");
    sets[0]
}

fn cluster_role(objects: &[Object]) -> &ClusterRole {
    objects
        .iter()
        .find_map(|o| {
            if let Object::ClusterRole(r) = o {
                Some(r)
            } else {
                None
            }
        })
        .expect("a ClusterRole")
}

fn agent_container(ds: &DaemonSet) -> &Container {
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(pod.containers.len(), 1, "one container, the agent");
    &pod.containers[0]
}

// ---------------------------------------------------------------------------
// Chart, manifests, rules and dashboard stay one

#[test]
fn the_plain_manifests_are_the_chart_rendered_and_the_chart_carries_the_exporters_files() {
    let out = xtask(&["deploy", "check"]);
    assert!(
        out.status.success(),
        "cargo xtask deploy check:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_chart_change_not_rendered_into_the_manifests_fails_the_check_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let chart = dir.path().join("netwatch");
    copy_dir(&root().join("deploy/helm/netwatch"), &chart);
    let values = std::fs::read_to_string(chart.join("values.yaml")).unwrap();
    assert!(values.contains("memory: 512Mi"));
    std::fs::write(
        chart.join("values.yaml"),
        values.replace("memory: 512Mi", "memory: 1Gi"),
    )
    .unwrap();
    let rules = chart.join("files/netwatch-rules.yaml");
    let mut text = std::fs::read_to_string(&rules).unwrap();
    text.push_str("# edited in the chart only\n");
    std::fs::write(&rules, text).unwrap();
    let out = xtask(&["deploy", "check", "--chart", chart.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("05-daemonset.yaml differs from the chart") && stderr.contains("1Gi"),
        "{stderr}"
    );
    assert!(
        stderr
            .contains("netwatch-rules.yaml is not a copy of deploy/prometheus/netwatch-rules.yaml"),
        "{stderr}"
    );
    assert!(
        stderr.contains("cargo xtask deploy render"),
        "says how to fix it: {stderr}"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

#[test]
fn the_prometheus_rule_is_the_exporters_rules_and_passes_promtool() {
    let objects = objects(&plain_docs());
    let rule = objects
        .iter()
        .find_map(|o| {
            if let Object::PrometheusRule(r) = o {
                Some(r)
            } else {
                None
            }
        })
        .expect("PrometheusRule");
    let spec = serde_json::to_value(&rule.spec).unwrap();
    let source: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(root().join("deploy/prometheus/netwatch-rules.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        spec,
        serde_json::to_value(&source).unwrap(),
        "the PrometheusRule's spec is deploy/prometheus/netwatch-rules.yaml"
    );

    // promtool reads the spec as a plain rules file; the exporters' unit
    // tests then run against the wrapped copy.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("netwatch-rules.yaml"),
        serde_yaml::to_string(&rule.spec).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        root().join("deploy/prometheus/netwatch-rules.test.yaml"),
        dir.path().join("netwatch-rules.test.yaml"),
    )
    .unwrap();
    for args in [
        ["check", "rules", "netwatch-rules.yaml"],
        ["test", "rules", "netwatch-rules.test.yaml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("promtool (Debian package prometheus; `cargo xtask setup` installs it)");
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_dashboard_configmap_holds_the_exporters_dashboard() {
    let objects = objects(&plain_docs());
    let dashboards: Vec<&ConfigMap> = objects
        .iter()
        .filter_map(|o| {
            if let Object::ConfigMap(c) = o {
                Some(c)
            } else {
                None
            }
        })
        .filter(|c| {
            c.metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.get("grafana_dashboard").map(String::as_str) == Some("1"))
        })
        .collect();
    assert_eq!(
        dashboards.len(),
        1,
        "one ConfigMap labelled for Grafana's dashboard sidecar"
    );
    let data = dashboards[0].data.as_ref().unwrap();
    let shipped: Json =
        serde_json::from_str(&data["netwatch-dashboard.json"]).expect("the dashboard is JSON");
    let source: Json = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/grafana/netwatch-dashboard.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(shipped, source);
}

// ---------------------------------------------------------------------------
// The Kubernetes API accepts every document

#[test]
fn every_manifest_parses_into_the_kubernetes_api_types_with_no_unknown_fields() {
    let core = [
        "ServiceAccount",
        "ConfigMap",
        "ClusterRole",
        "ClusterRoleBinding",
        "Service",
        "DaemonSet",
    ];
    let monitoring = ["Namespace", "ServiceMonitor", "PrometheusRule", "ConfigMap"];
    for (name, docs) in all_renderings() {
        let objects = objects(&docs);
        let mut kinds: Vec<&str> = docs
            .iter()
            .map(|d| d.yaml["kind"].as_str().unwrap())
            .collect();
        kinds.sort();
        let mut expected: Vec<&str> = match name {
            "chart defaults" => core.to_vec(),
            "deploy/manifests" => [&core[..], &monitoring[..]].concat(),
            _ => [&core[..], &monitoring[..], &["PodMonitor"][..]].concat(),
        };
        expected.sort();
        assert_eq!(kinds, expected, "{name}");
        assert_eq!(objects.len(), docs.len());
    }
}

#[test]
fn an_unknown_or_mistyped_field_is_rejected_with_its_path() {
    let docs = plain_docs();
    let ds = docs.iter().find(|d| d.yaml["kind"] == "DaemonSet").unwrap();
    // A typo k8s-openapi would silently drop on reading.
    let mut typo = ds.yaml.clone();
    typo["spec"]["template"]["spec"]["hostPid"] = serde_yaml::Value::Bool(true);
    let e = typed(&Doc {
        source: "typo".into(),
        yaml: typo,
    })
    .err()
    .expect("rejected");
    assert!(e.contains(".spec.template.spec.hostPid"), "{e}");
    // A value of the wrong type.
    let mut wrong = ds.yaml.clone();
    wrong["spec"]["template"]["spec"]["hostNetwork"] = serde_yaml::Value::String("yes".into());
    let e = typed(&Doc {
        source: "wrong".into(),
        yaml: wrong,
    })
    .err()
    .expect("rejected");
    assert!(e.contains("spec.template.spec.hostNetwork"), "{e}");
    // An unknown field in a Prometheus Operator object.
    let mut monitor = docs
        .iter()
        .find(|d| d.yaml["kind"] == "ServiceMonitor")
        .unwrap()
        .yaml
        .clone();
    monitor["spec"]["endpoints"][0]["intervall"] = serde_yaml::Value::String("30s".into());
    let e = typed(&Doc {
        source: "monitor".into(),
        yaml: monitor,
    })
    .err()
    .expect("rejected");
    assert!(e.contains("intervall"), "{e}");
}

// ---------------------------------------------------------------------------
// RBAC: read-only, on exactly what the agent watches

/// The kinds the agent's identity source watches, as named in its
/// `snapshot_kinds!` list (netwatch-agent/src/identity/kube.rs).
/// The agent also watches CRDs (kube.rs `watch_crds`), to pick up a
/// policy kind whose CRD is installed later.
fn crd_watch() -> ((String, String), BTreeSet<String>) {
    let source =
        std::fs::read_to_string(root().join("netwatch-agent/src/identity/kube.rs")).unwrap();
    assert!(
        source.contains("Api<CustomResourceDefinition>") && !source.contains("crds.get("),
        "the agent's CRD watch changed"
    );
    (
        (
            "apiextensions.k8s.io".into(),
            "customresourcedefinitions".into(),
        ),
        ["list", "watch"].map(String::from).into(),
    )
}

fn watched_kinds() -> Vec<String> {
    let source =
        std::fs::read_to_string(root().join("netwatch-agent/src/identity/kube.rs")).unwrap();
    let start = source
        .find("snapshot_kinds! {")
        .expect("kube.rs lists its kinds in `snapshot_kinds! { ... }`");
    let body = &source[start..][..source[start..].find('}').unwrap()];
    let kinds: Vec<String> = body
        .lines()
        // `Pod as PodRecord => pods`: the watched kind, then what is kept.
        .filter_map(|l| l.trim().split_once("=>").map(|(k, _)| k))
        .map(|k| k.split(" as ").next().unwrap_or(k).trim().to_string())
        .collect();
    assert!(kinds.len() >= 10, "read {kinds:?} from kube.rs");
    kinds
}

/// (API group, resource) of a kind, from k8s-openapi's own constants.
fn group_resource(kind: &str) -> (String, String) {
    fn of<K: Resource>() -> (String, String) {
        (K::GROUP.to_string(), K::URL_PATH_SEGMENT.to_string())
    }
    match kind {
        "Namespace" => of::<Namespace>(),
        "Pod" => of::<Pod>(),
        "Service" => of::<Service>(),
        "Node" => of::<Node>(),
        "NetworkPolicy" => of::<NetworkPolicy>(),
        "EndpointSlice" => of::<EndpointSlice>(),
        "Deployment" => of::<Deployment>(),
        "ReplicaSet" => of::<ReplicaSet>(),
        "StatefulSet" => of::<StatefulSet>(),
        "DaemonSet" => of::<DaemonSet>(),
        "Job" => of::<Job>(),
        "CronJob" => of::<CronJob>(),
        // The network-policy-api CRDs (no k8s-openapi types): their group
        // and plural as the CRDs declare them.
        "ClusterNetworkPolicy" => (
            "policy.networking.k8s.io".into(),
            "clusternetworkpolicies".into(),
        ),
        "AdminNetworkPolicy" => (
            "policy.networking.k8s.io".into(),
            "adminnetworkpolicies".into(),
        ),
        "BaselineAdminNetworkPolicy" => (
            "policy.networking.k8s.io".into(),
            "baselineadminnetworkpolicies".into(),
        ),
        // Calico's kinds: through the Calico API server (projectcalico.org)
        // and its CRDs (crd.projectcalico.org), same plurals.
        calico if calico_plural(calico).is_some() => {
            let group = if calico.starts_with("Crd") {
                "crd.projectcalico.org"
            } else {
                "projectcalico.org"
            };
            (
                group.into(),
                calico_plural(calico).unwrap_or_default().into(),
            )
        }
        other => panic!(
            "the agent now watches {other}: add it to group_resource here and to the chart's ClusterRole"
        ),
    }
}

/// The plural of a Calico kind as kube.rs names it (`CalicoTier`,
/// `GlobalNetworkPolicy`; `Crd...` for the CRD group).
fn calico_plural(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "CalicoTier" | "CrdTier" => "tiers",
        "CalicoNetworkPolicy" | "CrdNetworkPolicy" => "networkpolicies",
        "GlobalNetworkPolicy" | "CrdGlobalNetworkPolicy" => "globalnetworkpolicies",
        "StagedNetworkPolicy" | "CrdStagedNetworkPolicy" => "stagednetworkpolicies",
        "StagedGlobalNetworkPolicy" | "CrdStagedGlobalNetworkPolicy" => {
            "stagedglobalnetworkpolicies"
        }
        "StagedKubernetesNetworkPolicy" | "CrdStagedKubernetesNetworkPolicy" => {
            "stagedkubernetesnetworkpolicies"
        }
        _ => return None,
    })
}

/// (group, resource) -> verbs the ClusterRole grants.
fn grants(role: &ClusterRole) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut grants: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for rule in role.rules.as_deref().unwrap_or_default() {
        assert!(
            rule.non_resource_urls.is_none() && rule.resource_names.is_none(),
            "{rule:?}"
        );
        for group in rule.api_groups.as_deref().unwrap_or_default() {
            for resource in rule.resources.as_deref().unwrap_or_default() {
                assert!(
                    group != "*" && resource != "*" && !rule.verbs.iter().any(|v| v == "*"),
                    "wildcard in {rule:?}"
                );
                grants
                    .entry((group.clone(), resource.clone()))
                    .or_default()
                    .extend(rule.verbs.iter().cloned());
            }
        }
    }
    grants
}

#[test]
fn the_cluster_role_grants_list_and_watch_on_exactly_the_kinds_the_agent_watches() {
    let expected: BTreeMap<(String, String), BTreeSet<String>> = watched_kinds()
        .iter()
        .map(|k| {
            (
                group_resource(k),
                ["list", "watch"].map(String::from).into(),
            )
        })
        .chain([crd_watch()])
        .collect();
    for (name, docs) in [
        ("deploy/manifests", plain_docs()),
        ("chart defaults", template(&[])),
    ] {
        let objects = objects(&docs);
        assert_eq!(grants(cluster_role(&objects)), expected, "{name}");
        let args = agent_container(daemonset(&objects))
            .args
            .clone()
            .unwrap_or_default();
        assert!(
            !args.iter().any(|a| a.starts_with("--kubernetes-events")),
            "{name}: Events are off by default"
        );
    }
}

#[test]
fn events_add_only_create_on_events_and_only_when_the_agent_posts_them() {
    // The agent posts core/v1 Events with `create` (export/events.rs).
    let events_rs =
        std::fs::read_to_string(root().join("netwatch-agent/src/export/events.rs")).unwrap();
    assert!(
        events_rs.contains("core::v1::Event") && events_rs.contains(".create("),
        "the agent's Events code changed"
    );
    assert!(
        !events_rs.contains(".patch(") && !events_rs.contains(".replace("),
        "the agent now patches Events: grant it"
    );

    let objects = objects(&template(&["kubernetesEvents.enabled=true"]));
    let mut expected: BTreeMap<(String, String), BTreeSet<String>> = watched_kinds()
        .iter()
        .map(|k| {
            (
                group_resource(k),
                ["list", "watch"].map(String::from).into(),
            )
        })
        .chain([crd_watch()])
        .collect();
    expected.insert(
        (String::new(), "events".into()),
        ["create".to_string()].into(),
    );
    assert_eq!(grants(cluster_role(&objects)), expected);
    let args = agent_container(daemonset(&objects)).args.clone().unwrap();
    assert!(
        args.contains(&"--kubernetes-events".to_string()),
        "{args:?}"
    );
}

#[test]
fn the_service_account_is_bound_to_the_role_and_only_the_agent_mounts_its_token() {
    for (name, docs) in all_renderings() {
        let objects = objects(&docs);
        let ds = daemonset(&objects);
        let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let namespace = ds.metadata.namespace.clone().unwrap();
        let account = pod.service_account_name.clone().unwrap();
        let sa = objects
            .iter()
            .find_map(|o| {
                if let Object::ServiceAccount(s) = o {
                    Some(s)
                } else {
                    None
                }
            })
            .unwrap();
        assert_eq!(
            (sa.metadata.name.as_ref(), sa.metadata.namespace.as_ref()),
            (Some(&account), Some(&namespace)),
            "{name}"
        );
        assert_eq!(
            sa.automount_service_account_token,
            Some(false),
            "{name}: other pods using the account get no token"
        );
        assert_eq!(pod.automount_service_account_token, Some(true), "{name}");
        let binding = objects
            .iter()
            .find_map(|o| {
                if let Object::ClusterRoleBinding(b) = o {
                    Some(b)
                } else {
                    None
                }
            })
            .unwrap();
        assert_eq!(binding.role_ref.kind, "ClusterRole");
        assert_eq!(
            Some(&binding.role_ref.name),
            cluster_role(&objects).metadata.name.as_ref(),
            "{name}"
        );
        let subjects = binding.subjects.as_deref().unwrap();
        assert_eq!(subjects.len(), 1, "{name}");
        assert_eq!(
            (
                subjects[0].kind.as_str(),
                subjects[0].name.as_str(),
                subjects[0].namespace.as_deref()
            ),
            ("ServiceAccount", account.as_str(), Some(namespace.as_str())),
            "{name}"
        );
    }
}

// ---------------------------------------------------------------------------
// Security context

/// README "Security posture": `nodeKernel` value -> the capabilities documented for it.
fn documented_capabilities() -> BTreeMap<String, BTreeSet<String>> {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let section = readme
        .split("### Security posture")
        .nth(1)
        .expect("README has a \"### Security posture\" section");
    let section = section.split("\n## ").next().unwrap();
    let mut table = BTreeMap::new();
    for row in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        let ticked = |cell: &str| -> Vec<String> {
            cell.split('`')
                .skip(1)
                .step_by(2)
                .map(String::from)
                .collect()
        };
        let (Some(first), Some(last)) = (cells.first(), cells.last()) else {
            continue;
        };
        let caps = ticked(last);
        if caps.iter().all(|c| c.starts_with("CAP_")) && !caps.is_empty() {
            table.insert(ticked(first)[0].clone(), caps.into_iter().collect());
        }
    }
    assert_eq!(
        table.len(),
        4,
        "the README table of nodeKernel values: {table:?}"
    );
    table
}

#[test]
fn no_container_is_privileged_and_capabilities_are_exactly_the_documented_set() {
    for (kernel, documented) in documented_capabilities() {
        let kernel_value = format!("nodeKernel={kernel}");
        let mut renderings = vec![(kernel_value.clone(), template(&[&kernel_value]))];
        if kernel == "5.17+" {
            renderings.push(("deploy/manifests".into(), plain_docs()));
        }
        for (name, docs) in renderings {
            let objects = objects(&docs);
            let pod = daemonset(&objects)
                .spec
                .as_ref()
                .unwrap()
                .template
                .spec
                .as_ref()
                .unwrap();
            let containers = pod
                .containers
                .iter()
                .chain(pod.init_containers.iter().flatten());
            for c in containers {
                let sc = c
                    .security_context
                    .as_ref()
                    .unwrap_or_else(|| panic!("{name}: {} has no securityContext", c.name));
                assert_ne!(
                    sc.privileged,
                    Some(true),
                    "{name}: {} is privileged",
                    c.name
                );
                assert_eq!(
                    sc.allow_privilege_escalation,
                    Some(false),
                    "{name}: {}",
                    c.name
                );
                assert_eq!(
                    sc.read_only_root_filesystem,
                    Some(true),
                    "{name}: {}",
                    c.name
                );
                let caps = sc.capabilities.as_ref().unwrap();
                assert_eq!(
                    caps.drop.as_deref(),
                    Some(&["ALL".to_string()][..]),
                    "{name}: {} drops every capability first",
                    c.name
                );
                let added: BTreeSet<String> = caps
                    .add
                    .iter()
                    .flatten()
                    .map(|c| format!("CAP_{c}"))
                    .collect();
                assert_eq!(
                    added, documented,
                    "{name}: {} adds exactly what README documents for {kernel}",
                    c.name
                );
            }
            assert_ne!(pod.host_pid, Some(true), "{name}: hostPID");
            assert_ne!(pod.host_ipc, Some(true), "{name}: hostIPC");
            assert_eq!(
                pod.host_network,
                Some(true),
                "{name}: TC and netlink need the host network namespace"
            );
            let seccomp = pod
                .security_context
                .as_ref()
                .and_then(|s| s.seccomp_profile.as_ref())
                .map(|p| p.type_.as_str());
            assert_eq!(seccomp, Some("RuntimeDefault"), "{name}");
        }
    }
}

#[test]
fn the_only_host_path_is_the_cgroup_v2_root_read_only_and_the_agent_is_pointed_at_it() {
    for (name, docs) in all_renderings() {
        let objects = objects(&docs);
        let ds = daemonset(&objects);
        let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let host_paths: Vec<(&str, &str)> = pod
            .volumes
            .iter()
            .flatten()
            .filter_map(|v| {
                v.host_path
                    .as_ref()
                    .map(|h| (v.name.as_str(), h.path.as_str()))
            })
            .collect();
        assert_eq!(host_paths.len(), 1, "{name}: {host_paths:?}");
        let (volume, path) = host_paths[0];
        assert_eq!(path, "/sys/fs/cgroup", "{name}");
        let container = agent_container(ds);
        let mounts: Vec<_> = container
            .volume_mounts
            .iter()
            .flatten()
            .filter(|m| m.name == volume)
            .collect();
        assert_eq!(mounts.len(), 1, "{name}");
        assert_eq!(
            mounts[0].read_only,
            Some(true),
            "{name}: the host cgroup tree is mounted read-only"
        );
        let args = container.args.clone().unwrap();
        assert!(
            args.contains(&format!("--cgroup-root={}", mounts[0].mount_path)),
            "{name}: {args:?}"
        );
        // No bpffs, tracefs, debugfs or /proc of the host.
        for v in pod.volumes.iter().flatten() {
            assert!(v.host_path.is_none() || v.name == volume, "{name}: {v:?}");
        }
    }
}

#[test]
fn the_daemonset_runs_on_every_node_critical_and_one_node_at_a_time() {
    for (name, docs) in all_renderings() {
        let objects = objects(&docs);
        let ds = daemonset(&objects);
        let spec = ds.spec.as_ref().unwrap();
        let pod = spec.template.spec.as_ref().unwrap();
        let tolerations = pod.tolerations.as_deref().unwrap();
        assert!(
            tolerations
                .iter()
                .any(|t| t.operator.as_deref() == Some("Exists")
                    && t.key.is_none()
                    && t.effect.is_none()),
            "{name}: tolerates every taint, control plane included: {tolerations:?}"
        );
        assert_eq!(
            pod.priority_class_name.as_deref(),
            Some("system-node-critical"),
            "{name}"
        );
        let rolling = spec
            .update_strategy
            .as_ref()
            .unwrap()
            .rolling_update
            .as_ref()
            .unwrap();
        use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
        assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(1)), "{name}");
        // A surge pod could never be scheduled: the host-network metrics port is a host port.
        assert_eq!(rolling.max_surge, Some(IntOrString::Int(0)), "{name}");
        let env = agent_container(ds).env.as_deref().unwrap();
        let node_name = env
            .iter()
            .find(|e| e.name == "NODE_NAME")
            .expect("NODE_NAME");
        let field = node_name
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str());
        assert_eq!(
            field,
            Some("spec.nodeName"),
            "{name}: NODE_NAME from the downward API"
        );
        let resources = agent_container(ds).resources.as_ref().unwrap();
        for key in ["cpu", "memory"] {
            assert!(
                resources.requests.as_ref().unwrap().contains_key(key),
                "{name}: requests.{key}"
            );
            assert!(
                resources.limits.as_ref().unwrap().contains_key(key),
                "{name}: limits.{key}"
            );
        }
    }
}

#[test]
fn the_plain_manifests_namespace_admits_the_agent_under_pod_security() {
    let objects = objects(&plain_docs());
    let namespace = objects
        .iter()
        .find_map(|o| {
            if let Object::Namespace(n) = o {
                Some(n)
            } else {
                None
            }
        })
        .expect("a Namespace");
    assert_eq!(
        namespace.metadata.name,
        daemonset(&objects).metadata.namespace
    );
    let labels = namespace.metadata.labels.clone().unwrap_or_default();
    // `baseline` forbids host networking, hostPath volumes and added capabilities.
    assert_eq!(
        labels
            .get("pod-security.kubernetes.io/enforce")
            .map(String::as_str),
        Some("privileged")
    );
}

// ---------------------------------------------------------------------------
// Flags and probes the agent really has

/// Every `--flag` of `netwatch-agent --help`.
fn agent_flags() -> BTreeSet<String> {
    let out = Command::new(target_binary("netwatch-agent"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    let flags: BTreeSet<String> = help
        .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == '<')
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| {
            w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
                .to_string()
        })
        .collect();
    assert!(
        flags.contains("--metrics-addr") && flags.contains("--help"),
        "{flags:?}"
    );
    flags
}

/// The agent's arguments with each `$(VAR)` replaced by the value the
/// kubelet would give it (from the ConfigMap, or the downward API as `<field>`).
fn resolved_args(objects: &[Object]) -> Vec<String> {
    let container = agent_container(daemonset(objects));
    let config: BTreeMap<String, String> = objects
        .iter()
        .filter_map(|o| {
            if let Object::ConfigMap(c) = o {
                c.data.clone()
            } else {
                None
            }
        })
        .flatten()
        .collect();
    let mut env = BTreeMap::new();
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(v), _) => v.clone(),
            (None, Some(from)) => match (&from.config_map_key_ref, &from.field_ref) {
                (Some(key), _) => config
                    .get(&key.key)
                    .cloned()
                    .unwrap_or_else(|| panic!("no ConfigMap key {} for ${}", key.key, var.name)),
                (None, Some(field)) => format!("<{}>", field.field_path),
                _ => panic!(
                    "{}: an environment source these tests do not resolve",
                    var.name
                ),
            },
            (None, None) => String::new(),
        };
        env.insert(var.name.clone(), value);
    }
    container
        .args
        .iter()
        .flatten()
        .map(|arg| {
            let mut arg = arg.clone();
            while let Some(start) = arg.find("$(") {
                let end = start + arg[start..].find(')').expect("closed $(");
                let name = &arg[start + 2..end];
                let value = env
                    .get(name)
                    .unwrap_or_else(|| panic!("{arg}: ${name} is not in the container's env"));
                arg.replace_range(start..=end, value);
            }
            arg
        })
        .collect()
}

#[test]
fn every_flag_the_daemonset_passes_is_one_the_agent_has() {
    let flags = agent_flags();
    for (name, docs) in all_renderings() {
        let objects = objects(&docs);
        let args = resolved_args(&objects);
        assert!(!args.is_empty(), "{name}");
        for arg in &args {
            let flag = arg.split('=').next().unwrap();
            assert!(
                flags.contains(flag),
                "{name}: {flag} is not in `netwatch-agent --help`"
            );
        }
    }
    // And a flag the agent does not have is caught.
    let objects = objects(&template(&["extraArgs={--no-such-flag=1}"]));
    assert!(
        resolved_args(&objects)
            .iter()
            .any(|a| !flags.contains(a.split('=').next().unwrap()))
    );
}

#[test]
fn probes_and_monitors_point_at_the_port_the_agent_serves_its_health_on() {
    let help = String::from_utf8(
        Command::new(target_binary("netwatch-agent"))
            .arg("--help")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(
        help.contains("/healthz") && help.contains("/readyz"),
        "the agent documents its health endpoints"
    );
    for (name, docs) in all_renderings() {
        let objects = objects(&docs);
        let container = agent_container(daemonset(&objects));
        let args = resolved_args(&objects);
        let addr = args
            .iter()
            .find_map(|a| a.strip_prefix("--metrics-addr="))
            .expect("--metrics-addr");
        let served: i32 = addr.rsplit(':').next().unwrap().parse().unwrap();
        let ports = container.ports.as_deref().unwrap();
        let port_of = |p: &k8s_openapi::apimachinery::pkg::util::intstr::IntOrString| match p {
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => *n,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => ports
                .iter()
                .find(|p| p.name.as_deref() == Some(s.as_str()))
                .map(|p| p.container_port)
                .unwrap_or_else(|| panic!("{name}: no port named {s}")),
        };
        for (probe, path) in [
            (&container.liveness_probe, "/healthz"),
            (&container.readiness_probe, "/readyz"),
        ] {
            let get = probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
                .unwrap_or_else(|| panic!("{name}: {path} probe"));
            assert_eq!(get.path.as_deref(), Some(path), "{name}");
            assert_eq!(
                port_of(&get.port),
                served,
                "{name}: {path} probe on the port of --metrics-addr"
            );
        }
        for o in &objects {
            match o {
                Object::Service(s) => {
                    let spec = s.spec.as_ref().unwrap();
                    assert_eq!(spec.cluster_ip.as_deref(), Some("None"), "{name}: headless");
                    for p in spec.ports.iter().flatten() {
                        assert_eq!(port_of(p.target_port.as_ref().unwrap()), served, "{name}");
                    }
                }
                Object::ServiceMonitor(m) => {
                    for e in &m.spec.endpoints {
                        assert_eq!(
                            ports
                                .iter()
                                .find(|p| p.name.as_deref() == Some(&e.port))
                                .map(|p| p.container_port),
                            Some(served)
                        );
                    }
                    assert_eq!(m.spec.job_label.as_deref(), Some("app.kubernetes.io/name"));
                }
                Object::PodMonitor(m) => {
                    for e in &m.spec.pod_metrics_endpoints {
                        assert_eq!(
                            ports
                                .iter()
                                .find(|p| p.name.as_deref() == Some(&e.port))
                                .map(|p| p.container_port),
                            Some(served)
                        );
                    }
                    assert_eq!(m.spec.job_label.as_deref(), Some("app.kubernetes.io/name"));
                }
                _ => {}
            }
        }
        // The job label's value is the job name the alerting rules expect.
        let labels = daemonset(&objects)
            .spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .clone()
            .unwrap();
        assert_eq!(
            labels.get("app.kubernetes.io/name").map(String::as_str),
            Some("netwatch-agent"),
            "{name}"
        );
    }
    let rules =
        std::fs::read_to_string(root().join("deploy/prometheus/netwatch-rules.yaml")).unwrap();
    assert!(rules.contains(r#"job="netwatch-agent""#));
}

/// One HTTP GET on loopback: the status code.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut stream =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.split_whitespace().nth(1)?.parse().ok()
}

/// The agent started with exactly the DaemonSet's arguments (only the
/// metrics address moved to a free loopback port and the observe socket to
/// a temporary directory, so it runs beside other tests, and no pod
/// interface matched) answers its probes.
#[test]
fn the_agent_started_with_the_daemonsets_arguments_answers_its_probes() {
    let objects = objects(&plain_docs());
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let mut args: Vec<String> = resolved_args(&objects)
        .into_iter()
        .map(|a| {
            if a.starts_with("--metrics-addr=") {
                "--metrics-addr=127.0.0.1:0".into()
            } else if a.starts_with("--api-socket=") {
                format!("--api-socket={}", socket.display())
            } else {
                a
            }
        })
        .collect();
    args.extend([
        "--interfaces=nwdeploytest*".into(),
        "--flow-log=none".into(),
        "--duration=20".into(),
    ]);
    let log_path = dir.path().join("agent.log");
    let mut child = Command::new(target_binary("netwatch-agent"))
        .args(&args)
        .env("NODE_NAME", "deploy-test")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBECONFIG")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .expect("start netwatch-agent");
    let deadline = Instant::now() + Duration::from_secs(15);
    let (mut health, mut ready) = (None, None);
    while Instant::now() < deadline && ready != Some(200) {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "netwatch-agent {} exited ({status}):\n{log}",
                args.join(" ")
            );
        }
        if let Some(port) = log
            .split("metrics listening on http://127.0.0.1:")
            .nth(1)
            .and_then(|s| s.split('/').next())
            .and_then(|p| p.parse().ok())
        {
            health = http_status(port, "/healthz");
            ready = http_status(port, "/readyz");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert_eq!(
        (health, ready),
        (Some(200), Some(200)),
        "netwatch-agent {}:\n{log}",
        args.join(" ")
    );
}

// ---------------------------------------------------------------------------
// README and image

#[test]
fn the_readme_install_section_is_three_command_lines_or_fewer_on_paths_that_exist() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let section = readme
        .split("\n## Install\n")
        .nth(1)
        .expect("README has an \"## Install\" section");
    let section = section.split("\n## ").next().unwrap();
    let commands: Vec<&str> = section
        .split("```")
        .skip(1)
        .step_by(2)
        .flat_map(|block| block.lines().skip(1))
        .map(|l| l.split(" #").next().unwrap().trim())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert!(!commands.is_empty() && commands.len() <= 3, "{commands:?}");
    for path in ["deploy/helm/netwatch", "deploy/manifests/"] {
        assert!(
            commands.iter().any(|c| c.contains(path)),
            "installs from {path}: {commands:?}"
        );
        assert!(root().join(path).exists());
    }
}

#[test]
fn the_dockerfile_pins_every_base_image_by_digest_and_copies_what_exists() {
    let dockerfile = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    let froms: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert!(froms.len() >= 2, "a build stage and a runtime stage");
    for from in &froms {
        let image = from.split_whitespace().nth(1).unwrap();
        let digest = image
            .split("@sha256:")
            .nth(1)
            .unwrap_or_else(|| panic!("{from}: not pinned by digest"));
        assert!(
            digest.len() == 64 && digest.chars().all(|c| c.is_ascii_hexdigit()),
            "{from}"
        );
    }
    for line in dockerfile
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from="))
    {
        let parts: Vec<&str> = line.split_whitespace().skip(1).collect();
        for source in &parts[..parts.len() - 1] {
            assert!(
                root().join(source).exists(),
                "{line}: {source} is not in the repository"
            );
        }
    }
    // The image runs the agent and carries the CLI the chart's NOTES point at.
    assert!(dockerfile.contains("ENTRYPOINT [\"/usr/local/bin/netwatch-agent\"]"));
    assert!(dockerfile.contains("/usr/local/bin/netwatch"));
}
