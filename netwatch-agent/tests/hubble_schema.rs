//! `--flow-log-format hubble` and `netwatch observe -o jsonpb` against
//! Hubble's published schema: every field a record can produce is checked
//! against `data/hubble/flow_schema.json` (flow.proto and observer.proto's
//! field names, json names, types and enum values, transcribed by hand) the
//! way protojson decodes strictly: an unknown field, an unknown enum value
//! or a mistyped value fails.

use std::collections::HashMap;

use netwatch::{
    export::hubble::{netwatch_fields, to_get_flows_response},
    flow::record::FlowRecord,
};
use serde_json::{Value, json};

struct Schema {
    messages: HashMap<String, Value>,
    enums: HashMap<String, Vec<String>>,
}

fn schema() -> Schema {
    let text = include_str!("data/hubble/flow_schema.json");
    let v: Value = serde_json::from_str(text).expect("schema fixture");
    Schema {
        messages: serde_json::from_value(v["messages"].clone()).unwrap(),
        enums: serde_json::from_value(v["enums"].clone()).unwrap(),
    }
}

impl Schema {
    /// Check `v` as message `ty` the way a strict protojson decoder does.
    fn check(&self, v: &Value, ty: &str, path: &str) -> Result<(), String> {
        let msg = self
            .messages
            .get(ty)
            .ok_or_else(|| format!("{path}: message {ty} is not in Hubble's schema subset"))?;
        let obj = v
            .as_object()
            .ok_or_else(|| format!("{path}: {ty} must be an object, got {v}"))?;
        let fields = msg["fields"].as_array().unwrap();
        let mut present = Vec::new();
        for (key, value) in obj {
            let field = fields
                .iter()
                .find(|f| f["name"] == key.as_str() || f["json"] == key.as_str())
                .ok_or_else(|| format!("{path}.{key}: unknown field of {ty}"))?;
            present.push(field["name"].as_str().unwrap().to_string());
            let fty = field["type"].as_str().unwrap();
            let at = format!("{path}.{key}");
            if field["repeated"] == true {
                let items = value
                    .as_array()
                    .ok_or_else(|| format!("{at}: repeated field must be an array"))?;
                for (i, item) in items.iter().enumerate() {
                    self.check_value(item, fty, &format!("{at}[{i}]"))?;
                }
            } else {
                self.check_value(value, fty, &at)?;
            }
        }
        for oneof in msg["oneofs"].as_array().into_iter().flatten() {
            let set: Vec<&String> = present
                .iter()
                .filter(|p| oneof.as_array().unwrap().iter().any(|o| o == p.as_str()))
                .collect();
            if set.len() > 1 {
                return Err(format!("{path}: oneof fields {set:?} set together"));
            }
        }
        Ok(())
    }

    fn check_value(&self, v: &Value, ty: &str, path: &str) -> Result<(), String> {
        let bad = || format!("{path}: {v} is not a valid {ty}");
        let integer = |max: u64| match v {
            Value::Number(n) => n.as_u64().filter(|n| *n <= max).map(|_| ()).ok_or_else(bad),
            Value::String(s) => s
                .parse::<u64>()
                .ok()
                .filter(|n| *n <= max)
                .map(|_| ())
                .ok_or_else(bad),
            _ => Err(bad()),
        };
        match ty {
            "string" => v.as_str().map(|_| ()).ok_or_else(bad),
            "bool" | "google.protobuf.BoolValue" => v.as_bool().map(|_| ()).ok_or_else(bad),
            "uint32" => integer(u64::from(u32::MAX)),
            "uint64" => integer(u64::MAX),
            "int32" => match v.as_i64() {
                Some(n) if i32::try_from(n).is_ok() => Ok(()),
                _ => Err(bad()),
            },
            "google.protobuf.Timestamp" => v
                .as_str()
                .filter(|s| s.ends_with('Z'))
                .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
                .map(|_| ())
                .ok_or_else(bad),
            t if t.starts_with("enum:") => {
                let values = &self.enums[&t["enum:".len()..]];
                match v.as_str() {
                    Some(name) if values.iter().any(|x| x == name) => Ok(()),
                    _ => Err(format!("{path}: {v} is not a value of {t}")),
                }
            }
            message => self.check(v, message, path),
        }
    }
}

fn record(patch: Value) -> FlowRecord {
    let mut base = json!({
        "time": "2026-11-22T02:14:07.113000001Z", "uuid": "bc8e1a44-d2db-4173-9de7-7bf1c2d44619", "verdict": "DROPPED",
        "drop_reason_desc": "NETFILTER_DROP",
        "IP": {"source": "10.244.1.20", "destination": "10.244.1.30", "ipVersion": "IPv4"},
        "l4": {"TCP": {"source_port": 44234, "destination_port": 8080, "flags": {"SYN": true}}},
        "source": {"identity": 8003895, "namespace": "prod", "pod_name": "web-7f9c4-q8z2m",
                   "labels": ["k8s:app=web", "k8s:io.kubernetes.pod.namespace=prod"],
                   "workloads": [{"name": "web", "kind": "Deployment"}], "node_name": "node-1",
                   "ip": "10.244.1.20", "port": 44234, "pod_uid": "0b000000-0000-0000-0000-000000000001"},
        "destination": {"identity": 164419, "namespace": "prod", "pod_name": "api-5d4e8-h7t3c",
                        "labels": ["k8s:app=api"], "workloads": [{"name": "api", "kind": "Deployment"}],
                        "service": {"namespace": "prod", "name": "api"}, "ip": "10.244.1.30", "port": 8080},
        "original_destination": {"ip": "10.96.10.30", "port": 8080},
        "Type": "L3_L4", "node_name": "node-1", "event_type": {"type": 1, "sub_type": 12},
        "traffic_direction": "EGRESS", "is_reply": false,
        "interface": {"index": 4, "name": "cali617d7cb16d0"}, "Summary": "TCP Flags: SYN",
        "egress_denied_by": [{"name": "default-deny-all", "namespace": "prod", "kind": "NetworkPolicy", "revision": "4711"}],
        "ingress_denied_by": [{"name": "default-deny-all", "namespace": "prod", "kind": "NetworkPolicy", "revision": "not-a-number"}],
        "ingress_allowed_by": [{"name": "allow-web", "namespace": "prod", "labels": ["k8s:io.cilium.k8s.policy.name=allow-web"]}],
        "lifecycle": "UPDATE", "packets": 3, "bytes": 180,
        "first_seen": "2026-11-22T02:14:05.000Z", "last_seen": "2026-11-22T02:14:07.113Z",
        "drop_reasons": ["NETFILTER_DROP", "IP_RPFILTER"], "timed_out": true, "is_dns": false,
        "observation_points": ["kfree_skb", "tc"], "cgroup_id": 18446744073709551000u64,
        "explanation": "prod/default-deny-all isolates prod/api-5d4e8-h7t3c for ingress; no policy allows it",
        "near_misses": ["ingress: prod/allow-web: port 80 is not 8080"]
    });
    for (k, v) in patch.as_object().unwrap() {
        base[k] = v.clone();
    }
    serde_json::from_value(base).expect("test record")
}

/// Records covering every verdict, protocol and optional field netwatch has.
fn variety() -> Vec<FlowRecord> {
    vec![
        record(json!({})),
        record(
            json!({"verdict": "TIMED_OUT", "drop_reason_desc": null, "drop_reasons": [], "timed_out": false,
            "is_dns": true, "l4": {"UDP": {"source_port": 5353, "destination_port": 53}},
            "traffic_direction": "unknown", "interface": null, "cgroup_id": null}),
        ),
        record(
            json!({"verdict": "REFUSED", "drop_reason_desc": null, "refusal": "ICMP_PORT_UNREACHABLE",
            "destination": {"identity": 0, "service": {"namespace": "shop", "name": "payment"}, "ip": "10.96.0.20"},
            "egress_denied_by": [], "ingress_denied_by": []}),
        ),
        record(
            json!({"verdict": "POLICY_NOT_ENFORCED", "drop_reason_desc": null, "lifecycle": "NEW",
            "source": {"identity": 1, "labels": ["reserved:host"]}, "traffic_direction": "INGRESS"}),
        ),
        record(
            json!({"drop_reason_desc": "NO_SOCKET", "l4": {"SCTP": {"source_port": 1, "destination_port": 2}}}),
        ),
        record(
            json!({"drop_reason_desc": "IP_RPFILTER", "l4": {"ICMPv4": {"type": 8, "code": 0}}}),
        ),
        record(
            json!({"IP": {"source": "fd00::2", "destination": "fd00::9", "ipVersion": "IPv6"},
            "l4": {"ICMPv6": {"type": 128, "code": 0}}, "drop_reason_desc": "IP_OUTNOROUTES", "lifecycle": "FINAL"}),
        ),
        record(
            json!({"outer": {"source": "100.64.1.2", "destination": "100.64.2.2", "protocol": "UDP",
            "port": 8472, "encapsulation": "vxlan"}}),
        ),
        record(
            json!({"outer": {"source": "fd64::1", "destination": "fd64::2", "protocol": "IPIP",
            "encapsulation": "ipip"}}),
        ),
        record(
            json!({"l4": {"other": {"protocol": 47}}, "unenriched": true,
            "source": {"identity": 0}, "destination": {"identity": 2, "labels": ["reserved:world"]}}),
        ),
    ]
}

#[test]
fn every_hubble_line_decodes_strictly_against_hubbles_schema() {
    let schema = schema();
    for r in variety() {
        let line = to_get_flows_response(&r);
        // Serialized and read back, as a reader of the flow log gets it.
        let text = serde_json::to_string(&line).unwrap();
        assert!(!text.contains('\n'));
        let v: Value = serde_json::from_str(&text).unwrap();
        schema
            .check(&v, "observer.GetFlowsResponse", "$")
            .unwrap_or_else(|e| panic!("{e}\n{v:#}"));
    }
}

#[test]
fn netwatchs_verdict_and_kernel_reason_survive_in_the_summary() {
    for r in variety() {
        let v = to_get_flows_response(&r);
        let summary = v["flow"]["Summary"].as_str().unwrap();
        let kv = netwatch_fields(summary);
        assert!(kv.contains(&("verdict", r.verdict.as_str())), "{summary}");
        if let Some(reason) = &r.drop_reason_desc {
            assert!(kv.contains(&("reason", reason.as_str())), "{summary}");
        }
        if let Some(how) = &r.refusal {
            assert!(kv.contains(&("refusal", how.as_str())), "{summary}");
        }
        if let Some(e) = &r.explanation {
            assert!(kv.contains(&("explanation", e.as_str())), "{summary}");
        }
        assert!(kv.contains(&("packets", r.packets.to_string().as_str())));
        // The tunnel of a flow dropped encapsulated, which Hubble has no field for.
        assert_eq!(
            kv.iter().find(|(k, _)| *k == "outer").map(|(_, v)| *v),
            r.outer.as_ref().map(|o| match o.port {
                Some(_) => "vxlan:100.64.1.2->100.64.2.2:UDP/8472",
                None => "ipip:fd64::1->fd64::2:IPIP",
            }),
            "{summary}"
        );
    }
    let dropped = to_get_flows_response(&record(json!({})));
    assert_eq!(dropped["flow"]["verdict"], "DROPPED");
    assert_eq!(dropped["flow"]["drop_reason_desc"], "POLICY_DENIED");
    assert_eq!(dropped["flow"]["destination_service"]["name"], "api");
    assert_eq!(
        dropped["flow"]["egress_denied_by"][0]["kind"],
        "NetworkPolicy"
    );
}

/// The check is strict: netwatch's own format (the default) is not Hubble.
#[test]
fn the_schema_check_refuses_netwatchs_own_format() {
    let schema = schema();
    let own = serde_json::to_value(netwatch::flow::record::FlowLogLine::new(record(
        json!({"verdict": "TIMED_OUT", "drop_reason_desc": null}),
    )))
    .unwrap();
    let e = schema
        .check(&own, "observer.GetFlowsResponse", "$")
        .unwrap_err();
    assert!(
        e.contains("unknown field") || e.contains("not a value of"),
        "{e}"
    );
    let mut bad = to_get_flows_response(&record(json!({})));
    bad["flow"]["verdict"] = json!("TIMED_OUT");
    assert!(
        schema
            .check(&bad, "observer.GetFlowsResponse", "$")
            .unwrap_err()
            .contains("not a value of enum:flow.Verdict")
    );
}
