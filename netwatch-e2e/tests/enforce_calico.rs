//! The lab enforcer's Calico tiers (projectcalico.org/v3 NetworkPolicy,
//! GlobalNetworkPolicy, Tier, with Kubernetes NetworkPolicies and the
//! cluster policies in their tiers) against netwatch's engine on random
//! policy sets: `netwatch explain --manifests FILES --matrix -o json` (the
//! engine, a separate program written separately) and the compiled chains
//! ([`CompiledCluster::decide`], which runs the rule text) must reach the
//! same verdict on every pair of pods, port and protocol (no root needed);
//! and a sample of those connections as real packets through a lab whose
//! nftables hold the same chains.

mod support;

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use netwatch_lab::{
    EnforceOptions, Lab, LabCluster, LabSpec, Manifests, Outcome, PodPlacement, Probe,
    enforce::{CompiledCluster, L4},
};

/// Three namespaces, six pods with named ports and service accounts.
const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {env: prod, team: web}}
---
apiVersion: v1
kind: Namespace
metadata: {name: dev, labels: {env: dev, team: web}}
---
apiVersion: v1
kind: Namespace
metadata: {name: data, labels: {env: prod, team: data}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: prod, labels: {app: web, tier: frontend, version: v1.2}}
spec:
  serviceAccountName: web
  containers: [{name: c, image: i, ports: [{name: http, containerPort: 80}, {name: metrics, containerPort: 8080}]}]
status: {podIP: 10.1.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: api-0, namespace: prod, labels: {app: api, tier: backend}}
spec:
  serviceAccountName: api
  containers: [{name: c, image: i, ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 53, protocol: UDP}]}]
status: {podIP: 10.1.0.11}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: dev, labels: {app: web, tier: frontend, version: v2.0}}
spec:
  containers: [{name: c, image: i, ports: [{name: http, containerPort: 80}]}]
status: {podIP: 10.1.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: tools, namespace: dev, labels: {app: tools}}
spec:
  containers: [{name: c, image: i}]
status: {podIP: 10.1.1.11}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: data, labels: {app: db, role: primary}}
spec:
  serviceAccountName: db
  containers: [{name: c, image: i, ports: [{name: pg, containerPort: 5432}]}]
status: {podIP: 10.1.2.10}
---
apiVersion: v1
kind: Pod
metadata: {name: cache, namespace: data, labels: {app: cache}}
spec:
  containers: [{name: c, image: i, ports: [{name: redis, containerPort: 6379}, {name: dns, containerPort: 53, protocol: UDP}]}]
status: {podIP: 10.1.2.11}
"#;

/// A small deterministic generator (splitmix64): a failing round replays
/// from its seed.
struct Dice(u64);

impl Dice {
    fn roll(&mut self, sides: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) % sides as u64) as usize
    }
    fn one<'a>(&mut self, of: &[&'a str]) -> &'a str {
        of[self.roll(of.len())]
    }
    fn chance(&mut self, one_in: usize) -> bool {
        self.roll(one_in) == 0
    }
}

const SELECTORS: [&str; 18] = [
    "all()",
    "role != 'primary'",
    "version not in {'v1.2'}",
    "app == 'web'",
    "app != 'web'",
    "has(role)",
    "!has(version)",
    "app in {'api', 'db'}",
    "app not in {'db', 'cache'}",
    "version starts with 'v1'",
    "app ends with 'he'",
    "app contains 'oo'",
    "tier == 'frontend' || app == 'db'",
    "(app == 'api' && tier == 'backend') || has(role)",
    "projectcalico.org/namespace == 'dev'",
    "projectcalico.org/serviceaccount == 'web'",
    "app == 'nothing'",
    "",
];

const NAMESPACE_SELECTORS: [&str; 6] = [
    "env == 'prod'",
    "team == 'data'",
    "all()",
    "projectcalico.org/name == 'dev'",
    "kubernetes.io/metadata.name in {'prod', 'data'}",
    "global()",
];

const NETS: [&str; 5] = [
    "10.1.0.0/24",
    "10.1.2.10/32",
    "10.0.0.0/8",
    "10.1.1.11",
    "192.168.0.0/16",
];

/// One entity (`source:` or `destination:`), as a YAML flow mapping.
fn entity(d: &mut Dice, global: bool, ports: Option<&str>, ingress_dest: bool) -> String {
    let mut fields = Vec::new();
    match d.roll(6) {
        0 | 1 => fields.push(format!("selector: \"{}\"", d.one(&SELECTORS))),
        2 => {
            fields.push(format!(
                "namespaceSelector: \"{}\"",
                d.one(&NAMESPACE_SELECTORS)
            ));
            if d.chance(2) {
                fields.push(format!("selector: \"{}\"", d.one(&SELECTORS)));
            }
        }
        3 => fields.push(format!("nets: [{}]", d.one(&NETS))),
        4 => fields.push(format!(
            "serviceAccounts: {}",
            d.one(&[
                "{names: [web, api]}",
                "{selector: \"projectcalico.org/name == 'db'\"}",
                "{names: [default]}"
            ])
        )),
        _ => {}
    }
    if d.chance(5) {
        fields.push(format!("notNets: [{}]", d.one(&NETS)));
    }
    if d.chance(6) {
        fields.push(format!("notSelector: \"{}\"", d.one(&SELECTORS)));
    }
    if global && d.chance(8) && !fields.iter().any(|f| f.starts_with("namespaceSelector")) {
        fields.push("namespaceSelector: \"all()\"".into());
    }
    if let Some(p) = ports {
        fields.push(p.to_string());
    }
    if ports.is_some() && d.chance(4) {
        let not = if ingress_dest {
            d.one(&["[8080]", "[\"50:60\"]", "[http]"])
        } else {
            d.one(&["[8080]", "[\"50:60\"]"])
        };
        fields.push(format!("notPorts: {not}"));
    }
    format!("{{{}}}", fields.join(", "))
}

fn rule(d: &mut Dice, ingress: bool, global: bool) -> String {
    let action = d.one(&["Allow", "Allow", "Deny", "Pass", "Log"]);
    let (protocol, ports) = match d.roll(7) {
        0 => (Some("TCP"), Some("ports: [80]")),
        1 => (Some("TCP"), Some("ports: [\"8000:9000\"]")),
        2 => (Some("TCP"), Some("ports: [http]")),
        3 => (Some("UDP"), Some("ports: [53, \"5432\"]")),
        4 => (Some(d.one(&["6", "TCP"])), Some("ports: [pg, 6379]")),
        5 => (Some(d.one(&["UDP", "17", "TCP"])), None),
        _ => (None, None),
    };
    let mut out = format!("  - action: {action}\n");
    if d.chance(12) {
        let v = d.one(&["4", "6"]);
        let _ = writeln!(out, "    ipVersion: {v}");
    }
    if protocol.is_none() && d.chance(12) {
        out.push_str("    protocol: ICMP\n    icmp: {type: 8}\n");
        return out;
    }
    if let Some(p) = protocol {
        let _ = writeln!(out, "    protocol: {p}");
    } else if d.chance(6) {
        let _ = writeln!(out, "    notProtocol: UDP");
    }
    if ingress {
        let source = entity(d, global, None, false);
        let _ = writeln!(out, "    source: {source}");
        if let Some(p) = ports {
            let _ = writeln!(out, "    destination: {{{p}}}");
        }
    } else {
        let destination = entity(d, global, ports, false);
        let _ = writeln!(out, "    destination: {destination}");
    }
    out
}

/// One random set of Calico policies, Tiers and Kubernetes NetworkPolicies.
fn random_policies(d: &mut Dice) -> String {
    let mut out = String::new();
    let mut tiers = vec!["default"];
    if d.chance(2) {
        out.push_str("---\napiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: security}\nspec: {order: 100}\n");
        tiers.push("security");
    }
    if d.chance(3) {
        // Equal order with `security`: the names order them.
        let action = d.one(&["Deny", "Pass"]);
        let _ = writeln!(
            out,
            "---\napiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {{name: platform}}\nspec: {{order: 100, defaultAction: {action}}}"
        );
        tiers.push("platform");
    }
    if d.chance(4) {
        out.push_str("---\napiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: late}\nspec: {defaultAction: Pass}\n");
        tiers.push("late");
    }
    let policies = 1 + d.roll(5);
    for i in 0..policies {
        let global = d.chance(2);
        let tier = d.one(&tiers);
        let namespace = d.one(&["prod", "dev", "data"]);
        let _ = writeln!(
            out,
            "---\napiVersion: projectcalico.org/v3\nkind: {}\nmetadata: {{name: p{i}{}}}\nspec:",
            if global {
                "GlobalNetworkPolicy"
            } else {
                "NetworkPolicy"
            },
            if global {
                String::new()
            } else {
                format!(", namespace: {namespace}")
            }
        );
        if tier != "default" || d.chance(4) {
            let _ = writeln!(out, "  tier: {tier}");
        }
        match d.roll(8) {
            0 => {}
            1..=3 => out.push_str("  order: 100\n"),
            4 => out.push_str("  order: 1000\n"),
            5 => out.push_str("  order: 10.5\n"),
            _ => out.push_str("  order: 500\n"),
        }
        let _ = writeln!(out, "  selector: \"{}\"", d.one(&SELECTORS));
        if global && d.chance(3) {
            let _ = writeln!(
                out,
                "  namespaceSelector: \"{}\"",
                d.one(&NAMESPACE_SELECTORS[..5])
            );
        }
        if d.chance(8) {
            out.push_str("  serviceAccountSelector: \"projectcalico.org/name in {'web', 'db'}\"\n");
        }
        let (ingress, egress) = (d.roll(4), d.roll(4));
        if d.chance(3) {
            let types = d.one(&["[Ingress]", "[Egress]", "[Ingress, Egress]"]);
            let _ = writeln!(out, "  types: {types}");
        }
        for (field, n, is_ingress) in [("ingress", ingress, true), ("egress", egress, false)] {
            if n == 0 {
                continue;
            }
            let _ = writeln!(out, "  {field}:");
            for _ in 0..n {
                out.push_str(&rule(d, is_ingress, global));
            }
        }
    }
    if d.chance(2) {
        let ns = d.one(&["prod", "dev", "data"]);
        let _ = writeln!(
            out,
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: np, namespace: {ns}}}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress, Egress]\n  ingress: [{{from: [{{namespaceSelector: {{matchLabels: {{env: prod}}}}}}], ports: [{{port: {}}}]}}]\n  egress: [{{to: [{{podSelector: {{}}}}]}}, {{ports: [{{port: 53, protocol: UDP}}]}}]",
            d.one(&["{}", "{matchLabels: {app: web}}"]),
            d.one(&["80", "http", "8080"])
        );
    }
    if d.chance(4) {
        let _ = writeln!(
            out,
            "---\napiVersion: policy.networking.k8s.io/v1alpha1\nkind: AdminNetworkPolicy\nmetadata: {{name: admin}}\nspec:\n  priority: 5\n  subject: {{namespaces: {{matchLabels: {{team: data}}}}}}\n  ingress: [{{name: r, action: {}, from: [{{namespaces: {{matchLabels: {{env: dev}}}}}}]}}]",
            d.one(&["Allow", "Deny", "Pass"])
        );
    }
    if d.chance(5) {
        let _ = writeln!(
            out,
            "---\napiVersion: policy.networking.k8s.io/v1alpha1\nkind: BaselineAdminNetworkPolicy\nmetadata: {{name: default}}\nspec:\n  subject: {{namespaces: {{}}}}\n  egress: [{{name: b, action: {}, to: [{{pods: {{namespaceSelector: {{matchLabels: {{team: data}}}}, podSelector: {{}}}}}}]}}]",
            d.one(&["Allow", "Deny"])
        );
    }
    if d.chance(4) {
        // Staged: previewed by the engine, never enforced by either.
        out.push_str("---\napiVersion: projectcalico.org/v3\nkind: StagedGlobalNetworkPolicy\nmetadata: {name: lockdown}\nspec:\n  selector: all()\n  types: [Ingress, Egress]\n");
    }
    out
}

fn placements(m: &Manifests) -> Vec<PodPlacement> {
    m.pods
        .iter()
        .enumerate()
        .map(|(i, p)| PodPlacement {
            namespace: p.metadata.namespace.clone().unwrap_or_default(),
            name: p.metadata.name.clone().unwrap_or_default(),
            node: format!("node-{}", 1 + i % 2),
            host_if: format!("cali{i:011}"),
            ips: Vec::new(),
            host_network: false,
        })
        .collect()
}

/// The kernel's nftables accepts every node's ruleset (`nft -c`, in a
/// network namespace of its own; skipped without root).
fn nft_accepts(compiled: &CompiledCluster, seed: u64, yaml: &str) {
    if !nix_root() {
        return;
    }
    for node in &compiled.nodes {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), node.to_nft()).unwrap();
        let out = std::process::Command::new("unshare")
            .args(["--net", "nft", "-c", "-f"])
            .arg(file.path())
            .output()
            .expect("unshare nft");
        assert!(
            out.status.success(),
            "seed {seed}, {}: nft -c refuses the ruleset: {}\n{}\n{yaml}",
            node.node,
            String::from_utf8_lossy(&out.stderr),
            node.to_nft()
        );
    }
}

fn nix_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn address(cluster: &LabCluster, id: &str) -> IpAddr {
    cluster.pod(id).unwrap_or_else(|| panic!("no pod {id}")).ips[0]
}

#[test]
fn the_compiled_calico_chains_agree_with_the_engine_on_random_policy_sets() {
    let netwatch = support::target_binary("netwatch");
    let work = tempfile::tempdir().unwrap();
    let cluster_file = work.path().join("cluster.yaml");
    std::fs::write(&cluster_file, CLUSTER).unwrap();
    let rounds: u64 = std::env::var("CALICO_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(150);
    let first: u64 = std::env::var("CALICO_SEED")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    let (mut compared, mut denied) = (0, 0);
    let mut failures = Vec::new();
    for seed in first..first + rounds {
        let mut dice = Dice(seed * 7919 + 15);
        let yaml = random_policies(&mut dice);
        let file = work.path().join("policies.yaml");
        std::fs::write(&file, &yaml).unwrap();
        let out = std::process::Command::new(&netwatch)
            .arg("explain")
            .arg("--manifests")
            .arg(&cluster_file)
            .arg("--manifests")
            .arg(&file)
            .args([
                "--matrix",
                "--ports",
                "80,8080,53,5432,6379,55,1000",
                "--protocols",
                "TCP,UDP",
                "-o",
                "json",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "seed {seed}: netwatch explain: {}\n{yaml}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cells: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        let mut m = Manifests::parse("cluster", CLUSTER).unwrap();
        m.extend(
            Manifests::parse("random", &yaml)
                .unwrap_or_else(|e| panic!("seed {seed}: {e}\n{yaml}")),
        );
        let placed = placements(&m);
        let cluster = LabCluster::new(m, placed).unwrap();
        let compiled = CompiledCluster::new(&cluster, &EnforceOptions::default())
            .unwrap_or_else(|e| panic!("seed {seed}: {e}\n{yaml}"));
        if seed % 10 == 0 {
            nft_accepts(&compiled, seed, &yaml);
        }
        for c in &cells {
            let (from, to) = (c["from"].as_str().unwrap(), c["to"].as_str().unwrap());
            let port = c["port"].as_u64().unwrap() as u16;
            let protocol = L4::from_api(c["protocol"].as_str()).unwrap();
            let engine_allows = c["verdict"] == "ALLOWED";
            let lab = compiled
                .decide(from, address(&cluster, to), protocol, port)
                .unwrap_or_else(|e| panic!("seed {seed}: {e}\n{yaml}"));
            compared += 1;
            denied += usize::from(!engine_allows);
            if lab.allowed() != engine_allows && failures.len() < 5 {
                failures.push(format!(
                    "seed {seed} (replay: CALICO_SEED={seed} CALICO_ROUNDS=1): {from} -> {to} {port}/{}: the engine says {}, the chains {lab:?}\n{yaml}",
                    protocol.nft(),
                    c["verdict"]
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(compared > 1000 * rounds.min(10) as usize, "{compared}");
    assert!(
        denied * 10 > compared && denied * 10 < compared * 9,
        "the sets are not trivial: {denied} of {compared} denied"
    );
}

/// Real packets: the cluster as a lab on two nodes, a few random sets
/// loaded in turn, a sample of TCP and UDP connections sent for real; what
/// reaches the pod (answered or refused) must be what the chains allow.
#[test]
fn random_calico_sets_with_real_packets() {
    let mut base = Manifests::parse("cluster", CLUSTER).unwrap();
    for (i, p) in base.pods.iter_mut().enumerate() {
        p.spec.as_mut().unwrap().node_name = Some(format!("node-{}", 1 + i % 2));
    }
    let (spec, _) = LabSpec::from_manifests(&base).unwrap_or_else(|e| panic!("{e}"));
    let lab = Lab::up(&spec, &support::helper()).expect("lab up (are you root?)");
    let pods: Vec<String> = base
        .pods
        .iter()
        .map(|p| {
            format!(
                "{}/{}",
                p.metadata.namespace.as_deref().unwrap_or_default(),
                p.metadata.name.as_deref().unwrap_or_default()
            )
        })
        .collect();
    let (mut sent, mut dropped) = (0, 0);
    let mut failures = Vec::new();
    for seed in 0..8u64 {
        let mut dice = Dice(seed * 104_729 + 3);
        let yaml = random_policies(&mut dice);
        let mut m = base.clone();
        m.extend(Manifests::parse("random", &yaml).unwrap());
        let cluster = LabCluster::new(m, lab.placements()).unwrap();
        lab.enforce(&cluster, &EnforceOptions::default())
            .unwrap_or_else(|e| panic!("seed {seed}: {e}\n{yaml}"));
        let compiled = CompiledCluster::new(&cluster, &EnforceOptions::default()).unwrap();
        for _ in 0..12 {
            let from = &pods[dice.roll(pods.len())];
            let to = &pods[dice.roll(pods.len())];
            if from == to {
                continue;
            }
            let port = [80, 8080, 53, 5432, 6379][dice.roll(5)];
            let l4 = if dice.chance(3) { L4::Udp } else { L4::Tcp };
            let to_ip = address(&cluster, to);
            let want = compiled.decide(from, to_ip, l4, port).unwrap().allowed();
            let target = SocketAddr::new(to_ip, port);
            let probe = |t| match l4 {
                L4::Udp => Probe::udp(target, t),
                _ => Probe::tcp(target, t),
            };
            let mut got = lab.probe(from, &probe(TIMEOUT)).expect("probe").outcome;
            if got == Outcome::TimedOut && want {
                got = lab.probe(from, &probe(RETRY)).expect("probe").outcome;
            }
            // Reached: answered, or refused (nothing listens there: the
            // packet got through all the same).
            let reached = !matches!(got, Outcome::TimedOut | Outcome::Error);
            sent += 1;
            dropped += usize::from(!reached);
            if reached != want {
                failures.push(format!(
                    "seed {seed}: {from} -> {to} {port}/{}: the chains say {}, the kernel {got:?}\n{yaml}",
                    l4.nft(),
                    if want { "allowed" } else { "denied" }
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(
        sent >= 60 && dropped > 0 && dropped < sent,
        "{dropped} of {sent} dropped"
    );
}

const TIMEOUT: Duration = Duration::from_secs(1);
const RETRY: Duration = Duration::from_secs(3);
