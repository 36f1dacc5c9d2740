//! One module per policy API, each a [`PolicyTier`](super::tiers::PolicyTier):
//!
//! - [`netpol`]: networking.k8s.io/v1 NetworkPolicy (the middle tier).
//! - [`cluster`]: policy.networking.k8s.io ClusterNetworkPolicy (v1alpha2,
//!   tiers Admin and Baseline) and AdminNetworkPolicy /
//!   BaselineAdminNetworkPolicy (v1alpha1).
//! - [`calico`]: projectcalico.org/v3 (the selector language so far).

pub mod calico;
pub mod cluster;
pub(crate) mod netpol;
