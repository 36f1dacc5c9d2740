//! The engine as an ordered list of tiers: every direction of a flow is
//! judged by the Admin tier, then NetworkPolicy, then the Baseline tier,
//! and the first tier that allows or denies decides (see
//! [`super::verdict`]). Each policy API is one [`PolicyTier`]
//! implementation in [`super::api`]; the matchers they share (selectors,
//! CIDRs, ports, named ports) live below them in [`super::model`] and
//! [`super::selector`].
//!
//! Adding an API (Calico's tiers, say) means one more module implementing
//! [`PolicyTier`] and one more entry in [`PolicyEngine::tiers`].

use super::evaluate::{Flow, PolicyEngine};
use super::model::Direction;
use super::verdict::{Decision, TierStep};
use crate::record::Tier;

/// One tier of the evaluation order, answering for one direction of a flow.
pub(crate) trait PolicyTier: Sync {
    /// Which tier this is.
    fn tier(&self) -> Tier;

    /// The answer alone (the fast path: no allocation when nothing matches).
    fn decide(&self, engine: &PolicyEngine, direction: Direction, flow: &Flow<'_>) -> Decision;

    /// The answer with the policies and rules behind it.
    fn judge(&self, engine: &PolicyEngine, direction: Direction, flow: &Flow<'_>) -> TierStep;

    /// When this tier denied: per relevant rule, what matched and what did not.
    fn near_misses(
        &self,
        engine: &PolicyEngine,
        direction: Direction,
        flow: &Flow<'_>,
    ) -> Vec<String>;

    /// Whether any policy of this tier exists in the engine at all.
    fn is_empty(&self, engine: &PolicyEngine) -> bool;
}

impl PolicyEngine {
    /// The tiers of a direction, in evaluation order.
    pub(crate) fn tiers(&self) -> [&'static dyn PolicyTier; 3] {
        [
            &super::api::cluster::ADMIN_TIER,
            &super::api::netpol::NETWORK_POLICY_TIER,
            &super::api::cluster::BASELINE_TIER,
        ]
    }
}
