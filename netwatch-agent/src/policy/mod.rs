//! Exact policy semantics, tier by tier: verdicts, the policies and rules
//! behind them, near misses, the smallest fix, and lint.
//!
//! Each direction of a flow (the source's egress, the destination's
//! ingress) is judged by an ordered list of tiers ([`tiers`]), each one
//! policy API ([`api`]) answering Allow, Deny, Pass or NotSelected
//! ([`Outcome`]):
//!
//! ```text
//! Admin tier          ClusterNetworkPolicy tier Admin, AdminNetworkPolicy
//!   -> NetworkPolicy  networking.k8s.io/v1, for pods it isolates
//!   -> Baseline tier  ClusterNetworkPolicy tier Baseline, BaselineAdminNetworkPolicy `default`
//!   -> allowed
//! ```
//!
//! The first tier that allows or denies decides; Pass skips the rest of its
//! tier. [`DirectionVerdict::tiers`] is the walkthrough. The cluster tiers'
//! rules are in [`api::cluster`]; NetworkPolicy's below.
//!
//! Build a [`PolicyEngine`] from a [`ClusterSnapshot`](crate::cluster::ClusterSnapshot),
//! then ask it about flows:
//!
//! ```no_run
//! # use netwatch::policy::{EngineOptions, Peer, PolicyEngine, Protocol};
//! # let snapshot = netwatch::cluster::ClusterSnapshot::default();
//! let engine = PolicyEngine::new(&snapshot, EngineOptions::default())?;
//! let from: Peer = "prod/web-1".parse()?;
//! let to: Peer = "prod/api-0".parse()?;
//! let verdict = engine.evaluate(&from, &to, 8080, Protocol::Tcp);
//! println!("{}: {}", verdict.verdict, verdict.sentence());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The rules, as the API defines them:
//! - A pod is isolated for ingress (egress) when a policy of its namespace
//!   selects it and has Ingress (Egress) in its effective policyTypes. A
//!   direction allows a flow when the pod is not isolated there, or when any
//!   rule of any selecting policy matches. A flow needs both directions.
//! - policyTypes defaults to Ingress, plus Egress when there are egress rules;
//!   an explicit list wins.
//! - A missing rule list and an empty one are the same (nothing matches); a
//!   rule without peers matches every peer, without ports every port.
//! - Peers: podSelector alone (the policy's namespace), namespaceSelector alone
//!   (every pod of the matching namespaces), both in one peer (AND), separate
//!   peers (OR), ipBlock with except. Whether an ipBlock also matches pod IPs
//!   differs between CNIs: [`EngineOptions::ipblock_matches_pods`].
//! - Ports: number, `endPort` range, or name resolved against the destination
//!   pod's container ports (name and protocol; unresolved matches nothing);
//!   protocol defaults to TCP.
//! - Addresses no pod has (nodes, the world) are matched by ipBlocks only.

pub mod api;
mod cache;
mod evaluate;
mod explain;
mod incremental;
mod lint;
mod matrix;
mod model;
mod selector;
mod suggest;
mod tiers;
mod verdict;

pub use cache::{CacheStats, IdentityKey, VerdictCache, VerdictKey};
pub use evaluate::{
    DirectionVerdict, Endpoint, EndpointKind, EngineOptions, FlowVerdict, Peer, PeerSyntaxError,
    PolicyDecision, PolicyEngine, PolicyVerdict,
};
pub use incremental::{Invalidation, Unapplied};
pub use lint::{
    Finding, LintCheck, LintOptions, MISSING_NAMESPACE_RULE, Severity, lint, lint_with,
};
pub use matrix::{MatrixEntry, connectivity_matrix};
pub(crate) use model::validate_port_name;
pub use model::{
    BUILT_IN_NAMESPACES, Direction, FieldProblem, NAMESPACE_NAME_LABEL, PolicyRef, Protocol,
    UnknownProtocol,
};
pub(crate) use selector::validate_label_key;
pub use selector::{CompiledSelector, LabelRequirement, Labels, render_labels};
pub use suggest::{SuggestKind, Suggestion, render_suggestion, suggest, suggest_kind};
pub use verdict::{Outcome, TierStep};

pub use crate::record::{PolicyKind, RuleRef, Tier};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::NetworkPolicy;

/// Errors of the policy engine.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A policy the API server would refuse.
    #[error("{} {}: {problem}", policy.kind, policy.namespace.as_ref().map(|ns| format!("{ns}/{}", policy.name)).unwrap_or_else(|| policy.name.clone()))]
    InvalidPolicy {
        policy: Box<PolicyRef>,
        problem: Box<FieldProblem>,
    },
    /// A pod name the snapshot does not have.
    #[error(
        "pod {namespace}/{name} is not in the manifests ({known}); check the name, or ask about a pod that does not exist yet as {namespace}:key=value,..."
    )]
    UnknownPod {
        namespace: String,
        name: String,
        known: String,
    },
    /// Calico policies the Calico API server would refuse, or that name a
    /// tier that does not exist.
    #[error("{0}")]
    Calico(Box<api::calico::CalicoError>),
    /// No policy can be suggested for this flow.
    #[error("cannot suggest a policy: {0}")]
    Suggest(String),
}

/// Checks a NetworkPolicy as the API server would; the error names the field
/// (`spec.ingress[0].from[1].ipBlock.cidr`) and how to fix it.
pub fn check_network_policy(policy: &NetworkPolicy) -> Result<(), FieldProblem> {
    model::compile_policy(policy).map(|_| ())
}

/// Checks a ClusterNetworkPolicy as its CRD would.
pub fn check_cluster_network_policy(
    policy: &api::cluster::ClusterNetworkPolicy,
) -> Result<(), FieldProblem> {
    api::cluster::compile_cluster_network_policy(policy).map(|_| ())
}

/// Checks an AdminNetworkPolicy as its CRD would.
pub fn check_admin_network_policy(
    policy: &api::cluster::AdminNetworkPolicy,
) -> Result<(), FieldProblem> {
    api::cluster::compile_admin_network_policy(policy).map(|_| ())
}

/// Checks a BaselineAdminNetworkPolicy as its CRD would (named `default`).
pub fn check_baseline_admin_network_policy(
    policy: &api::cluster::BaselineAdminNetworkPolicy,
) -> Result<(), FieldProblem> {
    api::cluster::compile_baseline_admin_network_policy(policy).map(|_| ())
}

/// Checks what the engine reads of a pod (IPs, container ports, label keys).
pub fn check_pod(pod: &Pod) -> Result<(), FieldProblem> {
    match crate::cluster::PodRecord::read(pod.clone())
        .1
        .into_iter()
        .next()
    {
        Some(problem) => Err(problem),
        None => Ok(()),
    }
}
