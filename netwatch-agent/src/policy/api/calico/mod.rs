//! Calico's own policies (projectcalico.org/v3): NetworkPolicy,
//! GlobalNetworkPolicy and Tier, evaluated tier by tier together with
//! Kubernetes NetworkPolicies (issue 15, in progress).
//!
//! - [`selector`]: Calico's selector language, parsed and evaluated.
//! - [`types`]: the objects, as calicoctl and the Calico API server accept
//!   them (unknown fields refused).
//! - [`manifests`]: Calico objects from YAML, snapshot pods as endpoints.
//! - [`evaluate`]: compilation and Calico's tiered evaluation
//!   ([`CalicoPolicies`]).
//! - `engine`: Calico's tiers inside
//!   [`PolicyEngine`](crate::policy::PolicyEngine) (with the cluster
//!   policies in kube-admin / kube-baseline), used whenever the snapshot
//!   has a Calico object: `--manifests`, `netwatch explain`, flows. Staged
//!   policies (StagedNetworkPolicy, StagedGlobalNetworkPolicy,
//!   StagedKubernetesNetworkPolicy) as a what-if ([`CalicoWhatIf`]: "would
//!   deny if enforced"); lint of selectors that pick no endpoint
//!   ([`CalicoPolicies::selectors_matching_nothing`]).

pub(crate) mod engine;
pub mod evaluate;
pub(crate) mod lint;
pub mod manifests;
pub mod selector;
pub mod types;

pub use evaluate::{
    CalicoDirectionVerdict, CalicoEndpoint, CalicoError, CalicoFlow, CalicoKind, CalicoObjects,
    CalicoOutcome, CalicoPolicies, CalicoPolicyRef, CalicoTierStep, CalicoWhatIf,
    Direction as CalicoDirection, EmptySelection, ServiceBacking, StagedObjects, StagedPreview,
    check_policy, check_tier,
};
pub use manifests::{CalicoCrds, CalicoManifestError, CalicoManifests, endpoints};
pub use selector::{CalicoSelector, Expr as SelectorExpr, SelectorError, SelectorProblem};
pub use types::{
    Action as CalicoAction, CalicoNetworkPolicy, Crd, GlobalNetworkPolicy, StagedAction,
    StagedGlobalNetworkPolicy, StagedKubernetesNetworkPolicy, StagedNetworkPolicy,
    Tier as CalicoTier,
};
