//! Verdicts cached per (source identity, destination identity, port,
//! protocol, and the source port when some rule matches source ports), for
//! the agent that judges every denied flow it sees.
//!
//! An identity is what the policies can see of an endpoint: for a pod its
//! namespace and labels, plus its IP when an ipBlock could match pods and
//! its container ports when a policy names ports; for an address outside
//! the pod network, the address. Replicas of one workload share entries,
//! except under Calico's tiers, whose rules also see a pod's service
//! account and the Services it backs: there each pod has its own.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use super::evaluate::{EndpointKind, Peer, PolicyDecision, PolicyEngine, Resolved};
use super::model::Protocol;
use super::selector::Labels;
use super::{FlowVerdict, Invalidation};

/// What the policies can see of one end of a flow.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum IdentityKey {
    /// A pod of the snapshot: its selection identity (namespace + labels),
    /// its container-port set and its IP where those can change a verdict,
    /// and under Calico the pod itself (its slot in the engine's model):
    /// two pods of one identity may even claim one address.
    Pod {
        identity: u32,
        ports: u32,
        ip: Option<IpAddr>,
        pod: Option<u32>,
    },
    /// A pod by namespace and labels only (hypothetical, or unknown).
    Labels { namespace: String, labels: Labels },
    /// An address no pod has.
    External(IpAddr),
}

/// The cache key: both identities, the port and the protocol, and the
/// source port only when the engine has a rule on source ports (else
/// `None`, so that every source port of a pair shares one entry).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct VerdictKey {
    pub source: IdentityKey,
    pub destination: IdentityKey,
    pub port: u16,
    pub protocol: Protocol,
    pub source_port: Option<u16>,
}

impl PolicyEngine {
    pub(crate) fn identity_key(&self, end: &Resolved<'_>) -> IdentityKey {
        match (end.kind, end.pod, &end.namespace) {
            (_, Some((idx, pod)), _) => IdentityKey::Pod {
                identity: pod.identity,
                ports: if self.named_ports_used {
                    self.port_classes[idx as usize]
                } else {
                    0
                },
                ip: if self.ip_sensitive {
                    end.given_ip.or_else(|| pod.ips.first().copied())
                } else {
                    None
                },
                pod: self.calico.is_some().then_some(idx),
            },
            (EndpointKind::External, _, _) | (_, _, None) => {
                IdentityKey::External(end.given_ip.unwrap_or(IpAddr::from([0, 0, 0, 0])))
            }
            (_, None, Some(ns)) => IdentityKey::Labels {
                namespace: ns.name.clone(),
                labels: end.labels.clone().into_owned(),
            },
        }
    }

    /// The cache key of a flow from `source_port` (`None`: unknown).
    pub fn verdict_key(
        &self,
        from: &Peer,
        to: &Peer,
        source_port: Option<u16>,
        port: u16,
        protocol: Protocol,
    ) -> VerdictKey {
        VerdictKey {
            source: self.identity_key(&self.resolve_lenient(from)),
            destination: self.identity_key(&self.resolve_lenient(to)),
            port,
            protocol,
            source_port: self.source_port_key(source_port),
        }
    }

    /// The source port as far as it can change a verdict.
    pub(crate) fn source_port_key(&self, source_port: Option<u16>) -> Option<u16> {
        source_port.filter(|_| self.source_ports_used)
    }
}

/// Hit and miss counts, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub entries: usize,
}

#[derive(Debug, Default)]
struct CacheState {
    generation: u64,
    entries: HashMap<VerdictKey, Arc<PolicyDecision>>,
    hits: u64,
    misses: u64,
}

/// Verdicts by [`VerdictKey`]. Shared between threads; emptied when it sees
/// an engine of another generation (the engine is rebuilt on every change),
/// and when it reaches its capacity (a simple bound on memory).
#[derive(Debug)]
pub struct VerdictCache {
    state: RwLock<CacheState>,
    capacity: usize,
}

impl Default for VerdictCache {
    fn default() -> Self {
        Self::new(65_536)
    }
}

impl VerdictCache {
    /// A cache holding at most `capacity` decisions.
    pub fn new(capacity: usize) -> Self {
        Self {
            state: RwLock::new(CacheState::default()),
            capacity: capacity.max(1),
        }
    }

    /// The verdict on `from` (port `source_port`, `None` when unknown) ->
    /// `to`, from the cache when an identical identity pair was judged by
    /// the same engine. The endpoints of the result are always this flow's
    /// own.
    pub fn evaluate(
        &self,
        engine: &PolicyEngine,
        from: &Peer,
        to: &Peer,
        source_port: Option<u16>,
        port: u16,
        protocol: Protocol,
    ) -> FlowVerdict {
        let source = engine.resolve_lenient(from);
        let destination = engine.resolve_lenient(to);
        let key = VerdictKey {
            source: engine.identity_key(&source),
            destination: engine.identity_key(&destination),
            port,
            protocol,
            source_port: engine.source_port_key(source_port),
        };
        let mut flow = engine.flow(source, destination, port, protocol);
        // Without source-port rules the port changes nothing: leave it
        // unknown, so the cached decision is the same whichever flow of the
        // pair filled the entry.
        flow.source_port = key.source_port;
        if let Ok(mut state) = self.state.write() {
            if state.generation == engine.generation() {
                if let Some(decision) = state.entries.get(&key).cloned() {
                    state.hits += 1;
                    return engine.flow_verdict(&flow, decision);
                }
            } else {
                state.entries.clear();
                state.generation = engine.generation();
            }
            state.misses += 1;
        }
        let decision = Arc::new(engine.decide_flow(&flow));
        if let Ok(mut state) = self.state.write()
            && state.generation == engine.generation()
        {
            if state.entries.len() >= self.capacity {
                state.entries.clear();
            }
            state.entries.insert(key, decision.clone());
        }
        engine.flow_verdict(&flow, decision)
    }

    /// The cached decision for `key`, if the cache holds one for `engine`.
    pub fn get(&self, engine: &PolicyEngine, key: &VerdictKey) -> Option<Arc<PolicyDecision>> {
        let state = self.state.read().ok()?;
        (state.generation == engine.generation())
            .then(|| state.entries.get(key).cloned())
            .flatten()
    }

    /// Drops the entries a change to `engine` (applied in place, same
    /// generation) can have changed.
    pub fn invalidate(&self, engine: &PolicyEngine, what: &Invalidation) {
        if what.is_empty() {
            return;
        }
        let Ok(mut state) = self.state.write() else {
            return;
        };
        if what.all {
            state.entries.clear();
            return;
        }
        let reached = |end: &IdentityKey| match end {
            IdentityKey::Pod { identity, .. } => {
                what.identities.contains(identity)
                    || engine
                        .identities
                        .get(*identity as usize)
                        .and_then(|i| engine.model.namespaces.get(i.namespace as usize))
                        .is_none_or(|ns| what.namespaces.contains(&ns.name))
            }
            IdentityKey::Labels { namespace, .. } => what.namespaces.contains(namespace),
            IdentityKey::External(_) => false,
        };
        state
            .entries
            .retain(|key, _| !reached(&key.source) && !reached(&key.destination));
    }

    /// Drops every entry.
    pub fn clear(&self) {
        if let Ok(mut state) = self.state.write() {
            state.entries.clear();
        }
    }

    /// Hits, misses and size so far.
    pub fn stats(&self) -> CacheStats {
        self.state
            .read()
            .map(|s| CacheStats {
                hits: s.hits,
                misses: s.misses,
                entries: s.entries.len(),
            })
            .unwrap_or_default()
    }
}
