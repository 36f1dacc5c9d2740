//! Calico's tiers inside the [`PolicyEngine`]: when the snapshot has any
//! projectcalico.org object, every direction of a flow is judged by
//! Calico's tiers in their order instead of Admin -> NetworkPolicy ->
//! Baseline:
//!
//! ```text
//! tiers by order (then name)       e.g. security (100)
//!   kube-admin (1000)              AdminNetworkPolicy / ClusterNetworkPolicy tier Admin
//!   default (1,000,000)            Calico policies of the default tier, and
//!                                  Kubernetes NetworkPolicies at order 1000
//!   kube-baseline (10,000,000)     BaselineAdminNetworkPolicy / ClusterNetworkPolicy tier Baseline
//!   -> the namespace profile       allows
//! ```
//!
//! That is Calico 3.30+'s model: the cluster policies sit in the
//! kube-admin and kube-baseline tiers (default action Pass). Within a
//! Calico tier the first matching Allow or Deny rule decides, Pass goes to
//! the next tier, and a tier that selected the endpoint but did not decide
//! denies at its end (or passes, `defaultAction: Pass`). Staged policies
//! are judged separately as a what-if ([`PolicyEngine::staged_decision`]).

use std::collections::BTreeMap;

use super::evaluate::{
    CalicoEndpoint, CalicoError, CalicoFlow, CalicoKind, CalicoOutcome, CalicoPolicies,
    CalicoPolicyChange, CalicoPolicyRef, CalicoTierStep, Direction as CalicoDirection,
    PreparedPolicies,
};
use super::types::Crd;
use crate::cluster::{Change, ChangeKind, ClusterSnapshot};
use crate::policy::evaluate::{
    DirectionVerdict, EndpointKind, Flow, PolicyDecision, PolicyEngine, PolicyVerdict, Resolved,
};
use crate::policy::model::{Direction, Protocol};
use crate::policy::tiers::PolicyTier;
use crate::policy::verdict::{Outcome, TierStep};
use crate::record::{PolicyKind, PolicyRef, RuleRef, Tier};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// The Calico side of an engine.
#[derive(Debug)]
pub(crate) struct CalicoEngine {
    pub enforced: CalicoPolicies,
    /// The policies with the staged ones applied, when there are any.
    pub staged: Option<CalicoPolicies>,
    /// The Calico endpoint of every pod of the model (by pod index; IP
    /// filled in per flow).
    pub endpoints: Vec<CalicoEndpoint>,
    /// Which view of the snapshot the policies were compiled from.
    pub source: CalicoSource,
}

/// Calico's compiled policies: the enforced set and, when staged policies
/// exist, the set with them applied.
pub(crate) struct CalicoPolicySets {
    pub enforced: CalicoPolicies,
    pub staged: Option<CalicoPolicies>,
    pub source: CalicoSource,
}

/// Which of the snapshot's two views of Calico's objects policies come
/// from: the Calico API server's (`projectcalico.org/v3`) when it lists
/// anything, else the CRDs it stores them in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CalicoSource {
    Api,
    Crds,
}

impl CalicoSource {
    fn of(snapshot: &ClusterSnapshot) -> Self {
        if snapshot.calico.is_empty() {
            CalicoSource::Crds
        } else {
            CalicoSource::Api
        }
    }
}

/// What a batch of changes does to Calico's compiled policies.
pub(crate) enum CalicoPolicyUpdate {
    /// Some policies changed, nothing else: they alone were compiled. A
    /// changed namespaced policy reaches only flows with an end in its
    /// namespace (it selects no other endpoint); a global one, all.
    InPlace {
        prepared: PreparedPolicies,
        namespaces: Vec<String>,
        global: bool,
    },
    /// Compiled again whole (a tier or a staged policy changed, or the
    /// changes did not say which object).
    Recompiled(CalicoPolicySets),
    /// The last Calico object is gone.
    Gone,
}

impl CalicoPolicySets {
    /// Compiles the snapshot's Calico policies (with its Kubernetes
    /// NetworkPolicies, which sit in Calico's default tier); `None` when
    /// the snapshot has no Calico object.
    pub fn build(snapshot: &ClusterSnapshot) -> Result<Option<Self>, CalicoError> {
        // The Calico API server's view, else the CRDs it stores them in
        // (both list the same objects when the API server is installed).
        let from_crds;
        let calico = if snapshot.calico.is_empty() {
            from_crds = snapshot.calico_crds.to_manifests();
            &from_crds
        } else {
            &snapshot.calico
        };
        if calico.is_empty() {
            return Ok(None);
        }
        let objects = calico.objects(&snapshot.network_policies);
        let enforced = CalicoPolicies::build(objects.clone())?;
        let staged = if calico.has_staged() {
            Some(CalicoPolicies::build_staged(objects, &calico.staged())?)
        } else {
            None
        };
        Ok(Some(Self {
            enforced,
            staged,
            source: CalicoSource::of(snapshot),
        }))
    }
}

impl CalicoEngine {
    /// `None` when the snapshot has no Calico object.
    pub fn build(
        snapshot: &ClusterSnapshot,
        pods: &[(String, String)],
    ) -> Result<Option<Self>, CalicoError> {
        let Some(CalicoPolicySets {
            enforced,
            staged,
            source,
        }) = CalicoPolicySets::build(snapshot)?
        else {
            return Ok(None);
        };
        let mut by_name: BTreeMap<String, CalicoEndpoint> = super::endpoints(snapshot);
        let endpoints = pods
            .iter()
            .map(|(ns, name)| {
                by_name.remove(&format!("{ns}/{name}")).unwrap_or_else(|| {
                    CalicoEndpoint::pod(ns, Default::default(), Default::default())
                })
            })
            .collect();
        Ok(Some(Self {
            enforced,
            staged,
            endpoints,
            source,
        }))
    }

    /// What `changes` (those of kind Calico or NetworkPolicy) do to the
    /// compiled policies, compiled but not yet applied: only the changed
    /// policies when the changes name them and neither tiers nor staged
    /// policies are involved, else everything again.
    pub fn update(
        &self,
        snapshot: &ClusterSnapshot,
        changes: &[&Change],
    ) -> Result<CalicoPolicyUpdate, CalicoError> {
        if let Some(update) = self.in_place(snapshot, changes)? {
            return Ok(update);
        }
        Ok(match CalicoPolicySets::build(snapshot)? {
            Some(sets) => CalicoPolicyUpdate::Recompiled(sets),
            None => CalicoPolicyUpdate::Gone,
        })
    }

    /// `None` when the changes cannot be applied policy by policy.
    fn in_place(
        &self,
        snapshot: &ClusterSnapshot,
        changes: &[&Change],
    ) -> Result<Option<CalicoPolicyUpdate>, CalicoError> {
        let source = CalicoSource::of(snapshot);
        let (empty, staged) = match source {
            CalicoSource::Api => (snapshot.calico.is_empty(), snapshot.calico.has_staged()),
            CalicoSource::Crds => (
                snapshot.calico_crds.is_empty(),
                snapshot.calico_crds.has_staged(),
            ),
        };
        if source != self.source || empty || staged || self.staged.is_some() {
            return Ok(None);
        }
        let (api, crds) = (&snapshot.calico, &snapshot.calico_crds);
        let mut list = Vec::with_capacity(changes.len());
        let mut namespaces = Vec::new();
        let mut global = false;
        for change in changes {
            let Some(name) = change.name.as_deref() else {
                return Ok(None);
            };
            let namespace = change.namespace.as_str();
            list.push(match change.kind {
                ChangeKind::NetworkPolicy => {
                    let namespace = if namespace.is_empty() {
                        "default"
                    } else {
                        namespace
                    };
                    namespaces.push(namespace.to_owned());
                    CalicoPolicyChange::Kubernetes {
                        namespace,
                        name,
                        now: change.locate(&snapshot.network_policies, |p| &p.metadata),
                    }
                }
                // Cluster-scoped: a tier or a global policy.
                ChangeKind::Calico if namespace.is_empty() => {
                    let tier_now =
                        located(change, source, &api.tiers, &crds.tiers, |t| &t.metadata).is_some();
                    if tier_now || self.enforced.tiers().iter().any(|(t, _, _)| *t == name) {
                        return Ok(None);
                    }
                    global = true;
                    CalicoPolicyChange::GlobalNetworkPolicy {
                        name,
                        now: located(
                            change,
                            source,
                            &api.global_network_policies,
                            &crds.global_network_policies,
                            |p| &p.metadata,
                        ),
                    }
                }
                // Namespaced: with no staged policy, a NetworkPolicy.
                ChangeKind::Calico => {
                    namespaces.push(namespace.to_owned());
                    CalicoPolicyChange::NetworkPolicy {
                        namespace,
                        name,
                        now: located(
                            change,
                            source,
                            &api.network_policies,
                            &crds.network_policies,
                            |p| &p.metadata,
                        ),
                    }
                }
                _ => continue,
            });
        }
        let prepared = self.enforced.prepare(&list)?;
        Ok(Some(CalicoPolicyUpdate::InPlace {
            prepared,
            namespaces,
            global,
        }))
    }

    /// Whether a rule names source ports (verdicts then depend on them).
    pub fn uses_source_ports(&self) -> bool {
        self.enforced.uses_source_ports()
            || self.staged.as_ref().is_some_and(|s| s.uses_source_ports())
    }

    /// Puts newly compiled policies in place.
    pub fn replace_policies(&mut self, sets: CalicoPolicySets) {
        self.enforced = sets.enforced;
        self.staged = sets.staged;
        self.source = sets.source;
    }

    /// Sets the endpoint of pod slot `slot` (an empty slot gets an empty
    /// endpoint); whether it changed.
    pub fn set_endpoint(&mut self, slot: u32, endpoint: CalicoEndpoint) -> bool {
        let slot = slot as usize;
        if self.endpoints.len() <= slot {
            self.endpoints
                .resize_with(slot + 1, CalicoEndpoint::default);
        }
        if self.endpoints[slot] == endpoint {
            return false;
        }
        self.endpoints[slot] = endpoint;
        true
    }
}

/// The object `change` names, in the view of Calico's objects `source`
/// says: the API server's list or the CRDs'.
fn located<'s, T>(
    change: &Change,
    source: CalicoSource,
    api: &'s [T],
    crds: &'s [Crd<T>],
    meta: impl Fn(&T) -> &ObjectMeta,
) -> Option<&'s T> {
    match source {
        CalicoSource::Api => change.locate(api, meta),
        CalicoSource::Crds => change.locate(crds, |c| meta(&c.0)).map(|c| &c.0),
    }
}

/// The engine's reference for a Calico one.
pub(crate) fn policy_ref(r: &CalicoPolicyRef) -> PolicyRef {
    let kind = match r.kind {
        CalicoKind::CalicoNetworkPolicy => PolicyKind::CalicoNetworkPolicy,
        CalicoKind::CalicoGlobalNetworkPolicy => PolicyKind::CalicoGlobalNetworkPolicy,
        CalicoKind::KubernetesNetworkPolicy => PolicyKind::NetworkPolicy,
        CalicoKind::StagedNetworkPolicy => PolicyKind::StagedNetworkPolicy,
        CalicoKind::StagedGlobalNetworkPolicy => PolicyKind::StagedGlobalNetworkPolicy,
        CalicoKind::StagedKubernetesNetworkPolicy => PolicyKind::StagedKubernetesNetworkPolicy,
    };
    // A NetworkPolicy's rules are split per peer and port when compiled:
    // their indexes are not the manifest's, so they are not named.
    let rule = match r.kind.enforced() {
        CalicoKind::KubernetesNetworkPolicy => None,
        _ => r.rule.map(|index| RuleRef { index, name: None }),
    };
    PolicyRef {
        namespace: r.namespace.clone(),
        name: r.name.clone(),
        kind,
        tier: Tier::calico(&r.tier),
        rule,
    }
}

fn protocol_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

impl PolicyEngine {
    /// One end of a flow as Calico sees it. Host-network pods are host
    /// endpoints to Calico, not workloads: only `nets` match them.
    fn calico_endpoint(
        &self,
        calico: &CalicoEngine,
        end: &Resolved<'_>,
        hint: Option<std::net::IpAddr>,
    ) -> CalicoEndpoint {
        let ip = end.address(hint);
        match (end.kind, end.pod, &end.namespace) {
            (EndpointKind::External, _, _) | (_, _, None) => CalicoEndpoint {
                ip,
                ..CalicoEndpoint::default()
            },
            (_, Some((_, pod)), _) if pod.host_network => CalicoEndpoint {
                ip,
                ..CalicoEndpoint::default()
            },
            (_, Some((idx, _)), _) => {
                let mut e = calico
                    .endpoints
                    .get(idx as usize)
                    .cloned()
                    .unwrap_or_default();
                e.ip = ip;
                e
            }
            (_, None, Some(ns)) => {
                let mut e = CalicoEndpoint::pod(
                    &ns.name,
                    end.labels.clone().into_owned(),
                    ns.labels.clone(),
                );
                e.service_account = Some("default".into());
                e.ip = ip;
                e
            }
        }
    }

    fn calico_flow(&self, calico: &CalicoEngine, flow: &Flow<'_>) -> CalicoFlow {
        CalicoFlow {
            source: self.calico_endpoint(calico, &flow.source, flow.family_hint),
            destination: self.calico_endpoint(calico, &flow.destination, flow.family_hint),
            protocol: protocol_number(flow.protocol),
            port: flow.port,
            icmp: None,
            source_port: flow.source_port,
        }
    }

    /// The lowest order of the policies of `tier` that select `subject`
    /// for the direction (`None` when none has an order).
    pub(crate) fn calico_min_order(
        &self,
        tier: &str,
        subject: &Resolved<'_>,
        direction: Direction,
    ) -> Option<f64> {
        let calico = self.calico.as_deref()?;
        let endpoint = self.calico_endpoint(calico, subject, None);
        let cdirection = match direction {
            Direction::Ingress => CalicoDirection::Ingress,
            Direction::Egress => CalicoDirection::Egress,
        };
        let set = &calico.enforced;
        let index = set.tiers().iter().position(|(name, _, _)| *name == tier)?;
        let selecting = set.selecting(index, &endpoint, cdirection);
        set.tier_policies(index)
            .into_iter()
            .filter(|(r, _)| selecting.contains(r))
            .filter_map(|(_, order)| order)
            .reduce(f64::min)
    }

    /// Whether Calico's tiers judge this engine's flows.
    pub fn calico_in_use(&self) -> bool {
        self.calico.is_some()
    }

    /// One direction through Calico's tiers (enforced or staged set).
    pub(crate) fn calico_direction_verdict(
        &self,
        calico: &CalicoEngine,
        set: &CalicoPolicies,
        direction: Direction,
        flow: &Flow<'_>,
    ) -> DirectionVerdict {
        let cflow = self.calico_flow(calico, flow);
        let cdirection = match direction {
            Direction::Ingress => CalicoDirection::Ingress,
            Direction::Egress => CalicoDirection::Egress,
        };
        let mut verdict = DirectionVerdict::default();
        for (index, (name, _, _)) in set.tiers().into_iter().enumerate() {
            let cluster: Option<&dyn PolicyTier> = match name {
                "kube-admin" => Some(&crate::policy::api::cluster::ADMIN_TIER),
                "kube-baseline" => Some(&crate::policy::api::cluster::BASELINE_TIER),
                _ => None,
            };
            if let Some(tier) = cluster
                && !tier.is_empty(self)
            {
                let step = tier.judge(self, direction, flow);
                let outcome = step.outcome.clone();
                if let Some(done) = self.record_step(&mut verdict, tier, step, direction, flow) {
                    return done;
                }
                // Pass skips the rest of the tier (its Calico policies too).
                if matches!(outcome, Outcome::Pass(_)) {
                    continue;
                }
            }
            let Some(step) = set.judge_tier(index, cdirection, &cflow) else {
                continue;
            };
            let tier = Tier::calico(name);
            let step = calico_step(tier, &step);
            let outcome = step.outcome.clone();
            verdict.tiers.push(step);
            match outcome {
                Outcome::Allow(by) => {
                    verdict.isolated = true;
                    verdict.verdict = PolicyVerdict::Allowed;
                    verdict.allowed_by = by;
                    verdict.decided_in = Some(tier);
                    return verdict;
                }
                Outcome::Deny(by) => {
                    verdict.isolated = true;
                    verdict.verdict = PolicyVerdict::Denied;
                    // NetworkPolicies among the deciders: their near misses.
                    if by.iter().any(|p| p.kind == PolicyKind::NetworkPolicy) {
                        verdict.near_misses = crate::policy::api::netpol::NETWORK_POLICY_TIER
                            .near_misses(self, direction, flow);
                    }
                    verdict.denied_by = by;
                    verdict.decided_in = Some(tier);
                    return verdict;
                }
                Outcome::Pass(_) | Outcome::NotSelected => {}
            }
        }
        // After the last tier: the namespace profile allows.
        verdict
    }

    /// Adds a cluster tier's step; `Some` when it decided.
    fn record_step(
        &self,
        verdict: &mut DirectionVerdict,
        tier: &dyn PolicyTier,
        step: TierStep,
        direction: Direction,
        flow: &Flow<'_>,
    ) -> Option<DirectionVerdict> {
        let decided = match &step.outcome {
            Outcome::Allow(by) => {
                verdict.isolated = true;
                verdict.verdict = PolicyVerdict::Allowed;
                verdict.allowed_by = by.clone();
                true
            }
            Outcome::Deny(by) => {
                verdict.isolated = true;
                verdict.verdict = PolicyVerdict::Denied;
                verdict.denied_by = by.clone();
                verdict.near_misses = tier.near_misses(self, direction, flow);
                true
            }
            Outcome::Pass(_) | Outcome::NotSelected => false,
        };
        verdict.tiers.push(step);
        if decided {
            verdict.decided_in = Some(tier.tier());
            Some(verdict.clone())
        } else {
            None
        }
    }

    /// The verdict the flow would get with the staged policies enforced
    /// ("would deny if enforced"); `None` without staged policies.
    pub(crate) fn staged_decision_of(&self, flow: &Flow<'_>) -> Option<PolicyDecision> {
        let calico = self.calico.as_deref()?;
        let staged = calico.staged.as_ref()?;
        let egress = self.calico_direction_verdict(calico, staged, Direction::Egress, flow);
        let ingress = self.calico_direction_verdict(calico, staged, Direction::Ingress, flow);
        Some(PolicyDecision {
            verdict: if egress.verdict == PolicyVerdict::Allowed
                && ingress.verdict == PolicyVerdict::Allowed
            {
                PolicyVerdict::Allowed
            } else {
                PolicyVerdict::Denied
            },
            egress,
            ingress,
            ipblock_matches_pods: self.options.ipblock_matches_pods,
        })
    }

    /// The staged verdict between two pods of the snapshot, by index.
    pub(crate) fn staged_pods(
        &self,
        from: u32,
        to: u32,
        port: u16,
        protocol: Protocol,
    ) -> Option<PolicyVerdict> {
        self.calico.as_ref()?.staged.as_ref()?;
        let source = self.resolved_pod(from, &self.model.pods[from as usize], None);
        let destination = self.resolved_pod(to, &self.model.pods[to as usize], None);
        let flow = self.flow(source, destination, port, protocol);
        self.staged_decision_of(&flow).map(|d| d.verdict)
    }

    /// The staged what-if of `from` -> `to`: the verdict with every staged
    /// policy applied (StagedNetworkPolicy, StagedGlobalNetworkPolicy,
    /// StagedKubernetesNetworkPolicy; `stagedAction: Delete` removes the
    /// enforced policy of the same name). `None` without staged policies.
    pub fn staged_decision(
        &self,
        from: &crate::policy::Peer,
        to: &crate::policy::Peer,
        port: u16,
        protocol: Protocol,
    ) -> Option<PolicyDecision> {
        let source = self.resolve_lenient(from);
        let destination = self.resolve_lenient(to);
        let flow = self.flow(source, destination, port, protocol);
        self.staged_decision_of(&flow)
    }
}

/// A Calico tier's step in the engine's walkthrough. A default action of
/// Pass reads as "no rule matches" (the walk goes on).
fn calico_step(tier: Tier, step: &CalicoTierStep) -> TierStep {
    let outcome = match &step.outcome {
        CalicoOutcome::Allow(r) => Outcome::Allow(vec![policy_ref(r)]),
        CalicoOutcome::Deny(r) => Outcome::Deny(vec![policy_ref(r)]),
        CalicoOutcome::Pass(r) => Outcome::Pass(policy_ref(r)),
        CalicoOutcome::EndOfTierDeny(refs) => Outcome::Deny(refs.iter().map(policy_ref).collect()),
        CalicoOutcome::EndOfTierPass(_) => Outcome::NotSelected,
    };
    TierStep {
        tier,
        outcome,
        undefined_order_with: Vec::new(),
    }
}
