//! Calico's staged policies in flow records: a record carries `staged`
//! (the verdict with the staged policies enforced, the deciding policies,
//! "would deny if enforced") only when enforcing them would change the
//! decision; the flow log JSON, `observe`'s outputs and the Hubble-shaped
//! output all show it. Records go through the agent's own attribution.

use std::time::SystemTime;

use netwatch::{
    attribution::{Attribution, AttributionConfig},
    cli::observe::{format_compact, format_dict},
    export::hubble::to_get_flows_response,
    flow::record::FlowRecord,
    manifests,
};
use serde_json::{Value, json};

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: prod}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: prod, uid: u-web, labels: {app: web}}
spec: {nodeName: node-1, containers: [{name: c, image: i}]}
status: {phase: Running, podIP: 10.0.0.1, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: prod, uid: u-api, labels: {app: api}}
spec: {nodeName: node-1, containers: [{name: c, image: i}]}
status: {phase: Running, podIP: 10.0.0.2, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: projectcalico.org/v3
kind: Tier
metadata: {name: security}
spec: {order: 100}
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: api-allow-web, namespace: prod}
spec:
  selector: app == 'api'
  ingress:
  - action: Allow
    protocol: TCP
    source: {selector: app == 'web'}
    destination: {ports: [8080, 9090]}
---
apiVersion: projectcalico.org/v3
kind: StagedGlobalNetworkPolicy
metadata: {name: security.lockdown}
spec:
  tier: security
  order: 10
  selector: app == 'api'
  types: [Ingress]
  ingress:
  - action: Deny
    protocol: TCP
    destination: {ports: [8080]}
  - action: Pass
"#;

/// A refused connect (RST: nothing listens) web -> api:`port`: the
/// policies allow it, the port is closed. As the assembler writes it.
fn refused(port: u16) -> FlowRecord {
    serde_json::from_value(json!({
        "time": "2026-11-22T02:14:07.113Z", "uuid": format!("5b0d5f5e-0000-4000-8000-00000000{port}"),
        "verdict": "REFUSED", "refusal": "TCP_RESET",
        "IP": {"source": "10.0.0.1", "destination": "10.0.0.2", "ipVersion": "IPv4"},
        "l4": {"TCP": {"source_port": 40000, "destination_port": port, "flags": {"SYN": true}}},
        "source": {"ip": "10.0.0.1", "port": 40000},
        "destination": {"ip": "10.0.0.2", "port": port},
        "Type": "L3_L4", "node_name": "node-1", "event_type": {"type": 1, "sub_type": 0},
        "traffic_direction": "EGRESS", "is_reply": false, "Summary": "TCP Flags: SYN",
        "lifecycle": "NEW", "packets": 1, "bytes": 60,
        "first_seen": "2026-11-22T02:14:07.000Z", "last_seen": "2026-11-22T02:14:07.113Z",
        "observation_points": ["tc"]
    }))
    .expect("record")
}

fn attributed(port: u16) -> FlowRecord {
    let snapshot = manifests::load_str("cluster.yaml", CLUSTER).expect("manifests");
    let mut attribution = Attribution::new(AttributionConfig {
        node_name: "node-1".into(),
        ..AttributionConfig::default()
    });
    attribution.update(&snapshot, true, SystemTime::now());
    let mut r = refused(port);
    attribution.enrich(&mut r);
    r
}

#[test]
fn a_staged_deny_of_an_allowed_flow_is_in_the_record_as_a_what_if() {
    let r = attributed(8080);
    assert_eq!(r.destination.pod_name, "api", "{r:?}");
    // Enforced: allowed by the app team's policy.
    assert!(r.ingress_denied_by.is_empty(), "{r:?}");
    assert_eq!(
        r.ingress_allowed_by[0].name, "api-allow-web",
        "{:?}",
        r.ingress_allowed_by
    );

    let line: Value = serde_json::to_value(&r).unwrap();
    let staged = &line["staged"];
    assert_eq!(staged["verdict"], "DENIED", "{line:#}");
    assert_eq!(staged["would_deny_if_enforced"], true, "{line:#}");
    let by = &staged["ingress_denied_by"][0];
    assert_eq!(
        by["kind"], "StagedGlobalNetworkPolicy.projectcalico.org",
        "{line:#}"
    );
    assert_eq!(by["name"], "security.lockdown", "{line:#}");
    assert_eq!(by["tier"], "security", "{line:#}");
    assert_eq!(by["rule"]["index"], 0, "{line:#}");
    assert!(staged.get("egress_denied_by").is_none(), "{line:#}");

    // The flow log line reads back as it was written.
    let back: FlowRecord = serde_json::from_value(line.clone()).unwrap();
    assert_eq!(back, r);

    // observe's outputs.
    let compact = format_compact(&r, false);
    assert!(
        compact.contains("staged: would deny if enforced by")
            && compact.contains("security.lockdown"),
        "{compact}"
    );
    let dict = format_dict(&r, false);
    assert!(
        dict.contains("STAGED: staged: would deny if enforced"),
        "{dict}"
    );

    // Hubble-shaped: in Summary (Hubble's Policy lists are enforced ones).
    let hubble = to_get_flows_response(&r);
    let summary = hubble["flow"]["Summary"].as_str().unwrap();
    assert!(
        summary.contains("staged_verdict=DENIED")
            && summary.contains("staged_would_deny_if_enforced=true")
            && summary.contains(
                "staged_denied_by=ingress:StagedGlobalNetworkPolicy.projectcalico.org/security.lockdown@security#0"
            ),
        "{summary}"
    );
    assert!(
        hubble["flow"].get("staged").is_none(),
        "not a Hubble field: {hubble:#}"
    );
}

#[test]
fn a_flow_the_staged_policies_do_not_change_has_no_staged_field() {
    // 9090: the staged policy passes it to the default tier, which allows
    // it as today: nothing would change.
    let r = attributed(9090);
    assert_eq!(r.destination.pod_name, "api", "{r:?}");
    assert!(r.staged.is_none(), "{:?}", r.staged);
    let line = serde_json::to_value(&r).unwrap();
    assert!(line.get("staged").is_none(), "{line:#}");
    assert!(!format_compact(&r, false).contains("staged"));
    let hubble = to_get_flows_response(&r);
    assert!(
        !hubble["flow"]["Summary"]
            .as_str()
            .unwrap()
            .contains("staged"),
        "{hubble:#}"
    );
}
