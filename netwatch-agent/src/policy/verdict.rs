//! What one tier says about one direction of a flow, and the walkthrough
//! of the tiers a direction went through.
//!
//! Each tier answers with an [`Outcome`]:
//!
//! | outcome | meaning | next |
//! | --- | --- | --- |
//! | `Allow(by)` | a rule accepts the traffic (NetworkPolicy: a rule of an isolating policy matches) | stop: allowed |
//! | `Deny(by)` | a Deny rule matches (NetworkPolicy: the pod is isolated and nothing allows) | stop: denied |
//! | `Pass(by)` | a Pass rule matches: the rest of this tier is skipped | next tier |
//! | `NotSelected` | no policy of the tier selects the pod, or none of their rules match | next tier |
//!
//! After the last tier (Baseline), a direction nothing decided is allowed.

use serde::Serialize;
use serde::ser::SerializeStruct;

use crate::record::{PolicyRef, Tier};

/// A tier's answer for one direction of one flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Allowed, by these policies (cluster tiers: one policy and its rule).
    Allow(Vec<PolicyRef>),
    /// Denied, by these policies (NetworkPolicy: every isolating policy).
    Deny(Vec<PolicyRef>),
    /// Handed to the next tier by this rule.
    Pass(PolicyRef),
    /// Nothing in this tier applies.
    NotSelected,
}

impl Outcome {
    /// `ALLOW`, `DENY`, `PASS`, `NOT_SELECTED`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Allow(_) => "ALLOW",
            Outcome::Deny(_) => "DENY",
            Outcome::Pass(_) => "PASS",
            Outcome::NotSelected => "NOT_SELECTED",
        }
    }

    /// The policies behind it.
    pub fn policies(&self) -> &[PolicyRef] {
        match self {
            Outcome::Allow(p) | Outcome::Deny(p) => p,
            Outcome::Pass(p) => std::slice::from_ref(p),
            Outcome::NotSelected => &[],
        }
    }

    /// Whether the walk stops here.
    pub fn is_final(&self) -> bool {
        matches!(self, Outcome::Allow(_) | Outcome::Deny(_))
    }
}

/// The answer alone, for the fast path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny,
    Pass,
    NotSelected,
}

/// One tier of a direction's walkthrough.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TierStep {
    pub tier: Tier,
    pub outcome: Outcome,
    /// Policies of the same tier and priority whose rules also match with
    /// another action: the API leaves their order undefined, so a CNI may
    /// apply either. netwatch applies the one listed in `outcome` (lower
    /// kind, then name) and says so.
    pub undefined_order_with: Vec<PolicyRef>,
}

impl Serialize for TierStep {
    /// `{"tier": "Admin", "outcome": "PASS", "policies": [...], "undefined_order_with": [...]?}`.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("TierStep", 4)?;
        st.serialize_field("tier", &self.tier)?;
        st.serialize_field("outcome", self.outcome.as_str())?;
        st.serialize_field("policies", self.outcome.policies())?;
        if !self.undefined_order_with.is_empty() {
            st.serialize_field("undefined_order_with", &self.undefined_order_with)?;
        }
        st.end()
    }
}

impl TierStep {
    /// `Admin: PASS by ClusterNetworkPolicy ns-isolation rule 2`.
    pub fn describe(&self) -> String {
        let list = |refs: &[PolicyRef]| {
            refs.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut s = match (&self.outcome, self.tier) {
            (Outcome::NotSelected, Tier::NetworkPolicy) => {
                "NetworkPolicy: not isolated (no NetworkPolicy selects the pod for this direction)"
                    .to_string()
            }
            (Outcome::Deny(refs), Tier::NetworkPolicy) => format!(
                "NetworkPolicy: isolated by {}, nothing allows -> DENY",
                list(refs)
            ),
            (Outcome::Allow(refs), Tier::NetworkPolicy) => {
                format!("NetworkPolicy: ALLOW by {}", list(refs))
            }
            (Outcome::NotSelected, Tier::Calico(name)) => format!(
                "tier {}: selected, no rule decided -> default action PASS",
                name.as_str()
            ),
            (Outcome::Deny(refs), Tier::Calico(name)) if refs.iter().all(|r| r.rule.is_none()) => {
                format!(
                    "tier {}: selected by {}, no rule decided -> end-of-tier DENY",
                    name.as_str(),
                    list(refs)
                )
            }
            (Outcome::NotSelected, tier) => format!("{tier}: no rule matches"),
            (outcome, Tier::Calico(name)) => format!(
                "tier {}: {} by {}",
                name.as_str(),
                outcome.as_str(),
                list(outcome.policies())
            ),
            (outcome, tier) => format!(
                "{tier}: {} by {}",
                outcome.as_str(),
                list(outcome.policies())
            ),
        };
        if !self.undefined_order_with.is_empty() {
            s.push_str(&format!(
                " (UNDEFINED ORDER: {} has the same priority and also matches with another action; a CNI may apply either)",
                list(&self.undefined_order_with)
            ));
        }
        s
    }
}
