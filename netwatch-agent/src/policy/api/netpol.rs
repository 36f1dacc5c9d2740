//! networking.k8s.io/v1 NetworkPolicy as a tier.
//!
//! A pod is isolated in a direction when a NetworkPolicy of its namespace
//! selects it with that direction in its effective policyTypes. For an
//! isolated pod the tier decides: `Allow` (every policy with a matching
//! rule) or `Deny` (every isolating policy, when none matches). A pod no
//! policy isolates is `NotSelected`, and the Baseline tier is next.
//!
//! Compilation and matching live in [`crate::policy::model`] and
//! [`crate::policy::evaluate`]; near misses in [`crate::policy::explain`].

use crate::policy::evaluate::{Flow, PolicyEngine};
use crate::policy::explain;
use crate::policy::model::Direction;
use crate::policy::tiers::PolicyTier;
use crate::policy::verdict::{Decision, Outcome, TierStep};
use crate::record::{PolicyRef, Tier};

/// The NetworkPolicy tier (stateless: the policies live in the engine).
pub(crate) struct NetworkPolicyTier;

pub(crate) static NETWORK_POLICY_TIER: NetworkPolicyTier = NetworkPolicyTier;

impl PolicyTier for NetworkPolicyTier {
    fn tier(&self) -> Tier {
        Tier::NetworkPolicy
    }

    fn decide(&self, engine: &PolicyEngine, direction: Direction, flow: &Flow<'_>) -> Decision {
        let isolating = engine.isolating(flow.subject(direction), direction);
        if isolating.is_empty() {
            Decision::NotSelected
        } else if isolating
            .iter()
            .any(|&p| engine.policy_allows(p, direction, flow))
        {
            Decision::Allow
        } else {
            Decision::Deny
        }
    }

    fn judge(&self, engine: &PolicyEngine, direction: Direction, flow: &Flow<'_>) -> TierStep {
        let isolating = engine.isolating(flow.subject(direction), direction);
        let outcome = if isolating.is_empty() {
            Outcome::NotSelected
        } else {
            let allowed_by: Vec<PolicyRef> = isolating
                .iter()
                .filter(|&&p| engine.policy_allows(p, direction, flow))
                .map(|&p| engine.policies[p as usize].reference.clone())
                .collect();
            if allowed_by.is_empty() {
                Outcome::Deny(
                    isolating
                        .iter()
                        .map(|&p| engine.policies[p as usize].reference.clone())
                        .collect(),
                )
            } else {
                Outcome::Allow(allowed_by)
            }
        };
        TierStep {
            tier: Tier::NetworkPolicy,
            outcome,
            undefined_order_with: Vec::new(),
        }
    }

    fn near_misses(
        &self,
        engine: &PolicyEngine,
        direction: Direction,
        flow: &Flow<'_>,
    ) -> Vec<String> {
        engine
            .isolating(flow.subject(direction), direction)
            .iter()
            .flat_map(|&p| explain::near_misses(engine, p, direction, flow))
            .collect()
    }

    fn is_empty(&self, engine: &PolicyEngine) -> bool {
        engine.policies.is_empty()
    }
}
