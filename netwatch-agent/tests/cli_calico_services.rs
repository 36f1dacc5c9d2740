//! Calico rules that match Kubernetes Services (`services: {name,
//! namespace}`): as a destination, the Service's endpoints on the ports
//! each serves it on; as a source, the pods backing it. Through `netwatch
//! explain` and `netwatch lint`, as outside checks run them.

use std::process::{Command, Output};

use serde_json::Value;

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: prod}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: prod, labels: {app: web}}
spec: {containers: [{name: c, image: i}]}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: prod, labels: {app: api}}
spec: {containers: [{name: c, image: i, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: prod, labels: {app: db}}
spec: {containers: [{name: c, image: i}]}
status: {podIP: 10.0.0.3}
---
apiVersion: v1
kind: Service
metadata: {name: api-svc, namespace: prod}
spec:
  selector: {app: api}
  ports: [{port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: web-svc, namespace: prod}
spec:
  selector: {app: web}
  ports: [{port: 80}]
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: default-deny}
spec:
  order: 2000
  selector: projectcalico.org/namespace == 'prod'
  types: [Ingress, Egress]
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: web-to-api-svc, namespace: prod}
spec:
  order: 100
  selector: app == 'web'
  egress:
  - action: Allow
    protocol: TCP
    destination:
      services: {name: api-svc}
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: api-from-web-svc, namespace: prod}
spec:
  order: 100
  selector: app == 'api'
  ingress:
  - action: Allow
    protocol: TCP
    source:
      services: {name: web-svc, namespace: prod}
"#;

fn netwatch(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_netwatch"))
        .args(args)
        .output()
        .expect("run netwatch")
}

fn text(o: &[u8]) -> String {
    String::from_utf8(o.to_vec()).unwrap()
}

fn write(extra: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("all.yaml");
    std::fs::write(&path, format!("{CLUSTER}{extra}")).unwrap();
    let p = path.display().to_string();
    (dir, p)
}

fn explain(file: &str, from: &str, to: &str, port: &str) -> Value {
    let o = netwatch(&[
        "explain",
        "--manifests",
        file,
        "--from",
        from,
        "--to",
        to,
        "--port",
        port,
        "-o",
        "json",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn services_match_the_pods_backing_them_on_their_ports() {
    let (_dir, file) = write("");

    // web -> api on the port api serves api-svc on (targetPort http):
    // egress by the destination Service, ingress by the source Service.
    let v = explain(&file, "prod/web", "prod/api", "8080");
    assert_eq!(v["verdict"], "ALLOWED", "{v:#}");
    let by = &v["egress"]["allowed_by"][0];
    assert_eq!(by["name"], "web-to-api-svc", "{v:#}");
    assert_eq!(by["kind"], "NetworkPolicy.projectcalico.org", "{v:#}");
    assert_eq!(by["rule"]["index"], 0, "{v:#}");
    assert_eq!(
        v["ingress"]["allowed_by"][0]["name"], "api-from-web-svc",
        "{v:#}"
    );

    // Another port of api: not a port of the Service.
    let v = explain(&file, "prod/web", "prod/api", "9090");
    // End of the default tier: the policies selecting web deny it.
    assert_eq!(v["egress"]["verdict"], "DENIED", "{v:#}");
    assert_eq!(v["egress"]["allowed_by"], serde_json::json!([]), "{v:#}");
    assert!(
        v["egress"]["denied_by"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "default-deny"),
        "{v:#}"
    );

    // db backs no Service: web cannot reach it through the rule, and db
    // is not a source the api's rule allows.
    let v = explain(&file, "prod/web", "prod/db", "8080");
    assert_eq!(v["egress"]["verdict"], "DENIED", "{v:#}");
    let v = explain(&file, "prod/db", "prod/api", "8080");
    assert_eq!(v["ingress"]["verdict"], "DENIED", "{v:#}");
}

#[test]
fn lint_names_a_service_no_pod_backs_and_bad_service_rules_are_refused() {
    let missing = r#"---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: web-to-gone, namespace: prod}
spec:
  selector: app == 'web'
  egress: [{action: Allow, protocol: TCP, destination: {services: {name: gone-svc}}}]
"#;
    let (_dir, file) = write(missing);
    let o = netwatch(&["lint", "--manifests", &file, "-o", "json"]);
    let findings: Vec<Value> =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o.stdout)));
    let f = findings
        .iter()
        .find(|f| {
            f["check"] == "calico-selector-matches-nothing" && f["policy"]["name"] == "web-to-gone"
        })
        .unwrap_or_else(|| panic!("{findings:#?}"));
    assert!(
        f["message"].as_str().unwrap().contains("prod/gone-svc"),
        "{f:#}"
    );
    // The Services that exist are backed: no finding for them.
    assert!(
        !findings
            .iter()
            .any(|f| f["policy"]["name"] == "web-to-api-svc"
                && f["check"] == "calico-selector-matches-nothing"),
        "{findings:#?}"
    );

    for (rule, field, problem) in [
        (
            "{action: Allow, destination: {services: {name: api-svc}, selector: app == 'api'}}",
            "spec.egress[0].destination.services",
            "cannot be combined with selector",
        ),
        (
            "{action: Allow, destination: {services: {namespace: prod}}}",
            "spec.egress[0].destination.services.name",
            "Service name",
        ),
    ] {
        let bad = format!(
            "---\napiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {{name: x, namespace: prod}}\nspec:\n  selector: app == 'web'\n  egress:\n  - {rule}\n"
        );
        let (_dir, file) = write(&bad);
        let o = netwatch(&["lint", "--manifests", &file]);
        assert!(!o.status.success(), "{rule} accepted");
        let err = text(&o.stderr);
        assert!(
            err.contains(field) && err.contains(problem),
            "{rule}: {err}"
        );
    }
    // A GlobalNetworkPolicy must say which namespace the Service is in.
    let global = "---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: g}\nspec:\n  selector: app == 'web'\n  egress: [{action: Allow, destination: {services: {name: api-svc}}}]\n";
    let (_dir, file) = write(global);
    let o = netwatch(&["lint", "--manifests", &file]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("services.namespace"), "{err}");
}
