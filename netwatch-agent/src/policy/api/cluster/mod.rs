//! Cluster-scoped policies from kubernetes-sigs/network-policy-api, as the
//! Admin and Baseline tiers around NetworkPolicy.
//!
//! Three kinds, one shape once compiled ([`ClusterPolicy`]):
//!
//! | kind | apiVersion | tier | actions | ports |
//! | --- | --- | --- | --- | --- |
//! | ClusterNetworkPolicy | policy.networking.k8s.io/v1alpha2 | `spec.tier`: Admin or Baseline | Accept, Deny, Pass | `protocols`: tcp/udp/sctp `destinationPort` (number or range), `destinationNamedPort` |
//! | AdminNetworkPolicy | policy.networking.k8s.io/v1alpha1 | Admin | Allow, Deny, Pass | `ports`: portNumber, portRange (protocol defaults to TCP), namedPort |
//! | BaselineAdminNetworkPolicy | policy.networking.k8s.io/v1alpha1 | Baseline (only `default`) | Allow, Deny | as above |
//!
//! How a tier judges one direction of a flow:
//!
//! 1. The subject is the source for egress, the destination for ingress.
//!    Only pods are subjects, and never host-network pods. A policy selects
//!    it by `subject.namespaces` (every pod of the matching namespaces) or
//!    `subject.pods` (namespaceSelector AND podSelector). A policy with no
//!    rules in a direction does not act on it.
//! 2. The selecting policies are taken by ascending priority, and the rules
//!    of each in written order. The first rule whose peers and ports match
//!    decides: Accept/Allow (allowed), Deny (denied) or Pass (the rest of
//!    the tier is skipped; NetworkPolicy, then Baseline, come next).
//! 3. Peers: `namespaces` and `pods` select pods (not host-network ones);
//!    egress `networks` are CIDRs and match any address, pod addresses
//!    included; `nodes` (experimental) match the addresses in the selected
//!    Nodes' `status.addresses`, so host-network pods too; `domainNames`
//!    (experimental) match nothing here: netwatch judges addresses and does
//!    not see which name a client resolved, and explain and lint say so.
//! 4. Ports: none listed matches every port of every protocol; a named
//!    port matches when the destination pod has a container port of that
//!    name with the flow's port and protocol.
//!
//! Where the API leaves the order undefined (two policies of one tier and
//! one priority that both match with different actions; an
//! AdminNetworkPolicy and an Admin-tier ClusterNetworkPolicy of the same
//! priority are such a pair), netwatch evaluates ClusterNetworkPolicy
//! before AdminNetworkPolicy, then by name, and reports the pair in the
//! walkthrough ([`TierStep::undefined_order_with`](crate::policy::TierStep))
//! and in `netwatch lint`.

mod compile;
mod evaluate;
mod lint;
pub mod types;

pub use compile::{
    Action, ClusterPeer, ClusterPolicy, ClusterPort, ClusterRule, SubjectMatcher,
    compile_admin_network_policy, compile_baseline_admin_network_policy,
    compile_cluster_network_policy,
};
pub(crate) use evaluate::{ADMIN_TIER, BASELINE_TIER, ClusterPolicies};
pub(crate) use lint::lint;
pub use types::{AdminNetworkPolicy, BaselineAdminNetworkPolicy, ClusterNetworkPolicy};
