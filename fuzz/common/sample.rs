//! Records the targets filter and re-encode: flow log lines as the agent
//! writes them.
use netwatch::flow::record::FlowRecord;

pub const LINES: &[&str] = &[
    r#"{"flow":{"time":"2026-11-22T13:17:10.602833083Z","uuid":"bc8e1a44-d2db-4173-9de7-7bf1c2d44619","verdict":"DROPPED","drop_reason_desc":"NETFILTER_DROP","IP":{"source":"10.244.1.20","destination":"10.244.1.30","ipVersion":"IPv4"},"l4":{"TCP":{"source_port":44234,"destination_port":8080,"flags":{"SYN":true}}},"source":{"identity":8003895,"namespace":"prod","labels":["k8s:app=web","k8s:tier=frontend"],"pod_name":"web-7f9c4-q8z2m","workloads":[{"name":"web","kind":"Deployment"}],"node_name":"node-1","ip":"10.244.1.20","port":44234},"destination":{"identity":164419,"namespace":"prod","labels":["k8s:app=api"],"pod_name":"api-5d4e8-h7t3c","workloads":[{"name":"api","kind":"Deployment"}],"service":{"namespace":"prod","name":"api"},"node_name":"node-1","ip":"10.244.1.30","port":8080},"Type":"L3_L4","node_name":"node-1","event_type":{"type":1,"sub_type":12},"traffic_direction":"EGRESS","is_reply":false,"interface":{"index":4,"name":"cali617d7cb16d0"},"Summary":"TCP Flags: SYN","egress_denied_by":[{"name":"default-deny-all","namespace":"prod","kind":"NetworkPolicy"}],"lifecycle":"UPDATE","packets":3,"bytes":180,"first_seen":"2026-11-22T13:17:08.559606911Z","last_seen":"2026-11-22T13:17:10.602833083Z","timed_out":true,"observation_points":["kfree_skb","tc"]},"node_name":"node-1","time":"2026-11-22T13:17:10.602833083Z"}"#,
    r#"{"flow":{"time":"2026-11-22T13:18:00Z","uuid":"u2","verdict":"TIMED_OUT","IP":{"source":"fd00::2","destination":"fd00::3","ipVersion":"IPv6"},"l4":{"UDP":{"source_port":5353,"destination_port":53}},"source":{"namespace":"kube-system","labels":["reserved:world"]},"destination":{"namespace":"kube-system","pod_name":"dns"},"Type":"L3_L4","node_name":"node-2","traffic_direction":"INGRESS","lifecycle":"NEW","packets":1,"bytes":60},"node_name":"node-2","time":"2026-11-22T13:18:00Z"}"#,
];

/// The sample records (those this netwatch reads).
pub fn records() -> Vec<FlowRecord> {
    LINES
        .iter()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            serde_json::from_value(v["flow"].clone()).ok()
        })
        .collect()
}
