//! The verdict cache: shared by replicas, never wrong when IPs or container
//! ports matter, emptied when the engine is rebuilt.

#[path = "policy_support/mod.rs"]
mod support;

use netwatch::manifests;
use netwatch::policy::{EngineOptions, Peer, PolicyEngine, PolicyVerdict, Protocol, VerdictCache};

const TCP: Protocol = Protocol::Tcp;

const CLUSTER: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: prod, labels: {app: web}}
status: {podIP: 10.1.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: prod, labels: {app: web}}
status: {podIP: 10.1.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: api-1, namespace: prod, labels: {app: api}}
spec:
  containers: [{name: c, image: i, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 10.1.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: api-2, namespace: prod, labels: {app: api}}
spec:
  containers: [{name: c, image: i, ports: [{name: http, containerPort: 9090}]}]
status: {podIP: 10.1.0.4}
"#;

fn engine(policies: &str) -> PolicyEngine {
    let snapshot = manifests::load_str("c.yaml", &format!("{CLUSTER}---\n{policies}")).unwrap();
    PolicyEngine::new(&snapshot, EngineOptions::default()).unwrap()
}

fn p(s: &str) -> Peer {
    s.parse().unwrap()
}

const DENY_API: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: prod}\nspec: {podSelector: {matchLabels: {app: api}}}\n";

#[test]
fn replicas_share_an_entry_but_keep_their_own_endpoints() {
    let e = engine(DENY_API);
    let cache = VerdictCache::new(100);
    let first = cache.evaluate(&e, &p("prod/web-1"), &p("prod/api-1"), None, 8080, TCP);
    let second = cache.evaluate(&e, &p("prod/web-2"), &p("prod/api-1"), None, 8080, TCP);
    let stats = cache.stats();
    assert_eq!((stats.misses, stats.hits, stats.entries), (1, 1, 1));
    assert!(std::sync::Arc::ptr_eq(&first.decision, &second.decision));
    assert_eq!(second.source.name.as_deref(), Some("web-2"));
    assert_eq!(second.source.ip, Some("10.1.0.2".parse().unwrap()));
    assert_eq!(second.verdict, PolicyVerdict::Denied);
    assert!(
        second.sentence().contains("prod/web-2"),
        "{}",
        second.sentence()
    );
    // Another port, protocol or identity is another entry.
    cache.evaluate(&e, &p("prod/web-1"), &p("prod/api-1"), None, 8081, TCP);
    cache.evaluate(
        &e,
        &p("prod/web-1"),
        &p("prod/api-1"),
        None,
        8080,
        Protocol::Udp,
    );
    cache.evaluate(&e, &p("prod/api-1"), &p("prod/web-1"), None, 8080, TCP);
    assert_eq!(cache.stats().entries, 4);
}

#[test]
fn a_rebuilt_engine_empties_the_cache() {
    let cache = VerdictCache::new(100);
    let before = engine(DENY_API);
    assert_eq!(
        cache
            .evaluate(&before, &p("prod/web-1"), &p("prod/api-1"), None, 80, TCP)
            .verdict,
        PolicyVerdict::Denied
    );
    let after = engine("");
    assert_eq!(
        cache
            .evaluate(&after, &p("prod/web-1"), &p("prod/api-1"), None, 80, TCP)
            .verdict,
        PolicyVerdict::Allowed
    );
    assert_eq!(cache.stats().entries, 1);
    let key = after.verdict_key(&p("prod/web-2"), &p("prod/api-1"), None, 80, TCP);
    assert!(cache.get(&after, &key).is_some(), "replica key hits");
    assert!(
        cache.get(&before, &key).is_none(),
        "the old engine's entries are gone"
    );
}

#[test]
fn pod_ips_are_part_of_the_identity_when_ip_blocks_can_match_pods() {
    let e = engine(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: prod}\nspec:\n  podSelector: {matchLabels: {app: api}}\n  ingress:\n  - from: [{ipBlock: {cidr: 10.1.0.1/32}}]\n",
    );
    let cache = VerdictCache::new(100);
    assert_eq!(
        cache
            .evaluate(&e, &p("prod/web-1"), &p("prod/api-1"), None, 80, TCP)
            .verdict,
        PolicyVerdict::Allowed
    );
    assert_eq!(
        cache
            .evaluate(&e, &p("prod/web-2"), &p("prod/api-1"), None, 80, TCP)
            .verdict,
        PolicyVerdict::Denied
    );
    assert_ne!(
        e.verdict_key(&p("prod/web-1"), &p("prod/api-1"), None, 80, TCP),
        e.verdict_key(&p("prod/web-2"), &p("prod/api-1"), None, 80, TCP)
    );
    // Without ipBlocks, replicas share a key.
    let e = engine(DENY_API);
    assert_eq!(
        e.verdict_key(&p("prod/web-1"), &p("prod/api-1"), None, 80, TCP),
        e.verdict_key(&p("prod/web-2"), &p("prod/api-1"), None, 80, TCP)
    );
}

#[test]
fn container_ports_are_part_of_the_identity_when_policies_name_ports() {
    let e = engine(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: prod}\nspec:\n  podSelector: {matchLabels: {app: api}}\n  ingress:\n  - ports: [{port: http}]\n",
    );
    let cache = VerdictCache::new(100);
    assert_eq!(
        cache
            .evaluate(&e, &p("prod/web-1"), &p("prod/api-1"), None, 8080, TCP)
            .verdict,
        PolicyVerdict::Allowed
    );
    assert_eq!(
        cache
            .evaluate(&e, &p("prod/web-1"), &p("prod/api-2"), None, 8080, TCP)
            .verdict,
        PolicyVerdict::Denied
    );
    assert_eq!(
        cache
            .evaluate(&e, &p("prod/web-1"), &p("prod/api-2"), None, 9090, TCP)
            .verdict,
        PolicyVerdict::Allowed
    );
}

#[test]
fn the_cache_stays_within_its_capacity() {
    let e = engine(DENY_API);
    let cache = VerdictCache::new(3);
    for port in 1..=10 {
        cache.evaluate(&e, &p("prod/web-1"), &p("prod/api-1"), None, port, TCP);
        assert!(cache.stats().entries <= 3);
    }
}

#[test]
fn cached_verdicts_equal_fresh_ones_on_every_conformance_case() {
    let mut compared = 0;
    for case in support::cases() {
        for (i, step) in case.steps.iter().enumerate() {
            let snapshot = support::step_snapshot(&case, i);
            let options = EngineOptions {
                ipblock_matches_pods: step.ipblock_matches_pods.unwrap_or(true),
            };
            let e = PolicyEngine::new(&snapshot, options).unwrap();
            let cache = VerdictCache::new(10_000);
            for probe in &step.probes {
                for (from, to) in support::parse_table(&probe.reachability).keys() {
                    // Twice: the second answer comes from the cache.
                    for _ in 0..2 {
                        let cached = cache.evaluate(
                            &e,
                            &p(from),
                            &p(to),
                            None,
                            probe.port,
                            probe.protocol(),
                        );
                        let fresh = e.evaluate(&p(from), &p(to), probe.port, probe.protocol());
                        assert_eq!(cached, fresh, "{} {from} -> {to}", case.file);
                        compared += 1;
                    }
                }
            }
        }
    }
    assert!(compared > 10_000);
}
