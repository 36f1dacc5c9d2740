//! Calico's own policies (projectcalico.org/v3): NetworkPolicy,
//! GlobalNetworkPolicy and Tier, evaluated tier by tier together with
//! Kubernetes NetworkPolicies (issue 15, in progress).
//!
//! - [`selector`]: Calico's selector language, parsed and evaluated.
//! - [`types`]: the objects, as calicoctl and the Calico API server accept
//!   them (unknown fields refused).
//! - [`manifests`]: Calico objects from YAML, snapshot pods as endpoints.
//! - [`evaluate`]: compilation and Calico's tiered evaluation
//!   ([`CalicoPolicies`]). Not yet wired into
//!   [`PolicyEngine`](crate::policy::PolicyEngine), the manifest loader or
//!   `netwatch explain`: callers build the endpoints themselves. Staged
//!   policies (StagedNetworkPolicy, StagedGlobalNetworkPolicy,
//!   StagedKubernetesNetworkPolicy) as a what-if ([`CalicoWhatIf`]: "would
//!   deny if enforced"); lint of selectors that pick no endpoint
//!   ([`CalicoPolicies::selectors_matching_nothing`]).

pub mod evaluate;
pub mod manifests;
pub mod selector;
pub mod types;

pub use evaluate::{
    CalicoDirectionVerdict, CalicoEndpoint, CalicoError, CalicoFlow, CalicoKind, CalicoObjects,
    CalicoOutcome, CalicoPolicies, CalicoPolicyRef, CalicoTierStep, CalicoWhatIf,
    Direction as CalicoDirection, EmptySelection, StagedObjects, StagedPreview,
};
pub use manifests::{CalicoManifestError, CalicoManifests, endpoints};
pub use selector::{CalicoSelector, Expr as SelectorExpr, SelectorError, SelectorProblem};
pub use types::{
    CalicoNetworkPolicy, GlobalNetworkPolicy, StagedAction, StagedGlobalNetworkPolicy,
    StagedKubernetesNetworkPolicy, StagedNetworkPolicy, Tier as CalicoTier,
};
