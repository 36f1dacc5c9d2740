//! The vocabulary every stage shares, at the bottom of the crate: the flow
//! record and the names it uses for policies.
//!
//! - [`FlowRecord`] and its parts (re-exported from [`crate::flow::record`],
//!   where the record is assembled).
//! - [`PolicyRef`]: which policy, of which API ([`PolicyKind`]), in which
//!   [`Tier`], and which rule of it ([`RuleRef`]). The policy engine, `netwatch
//!   explain`, `netwatch lint`, the flow records and the metrics all name
//!   policies with it.
//! - [`Direction`] and [`Protocol`]: the side of a pod and the L4 protocol,
//!   as policies, filters and records name them.

pub(crate) mod policy;
pub mod shared;
mod traffic;

pub use crate::flow::record::{
    EventType, FlowLogLine, FlowRecord, Interface, IpInfo, L4, Lifecycle, Verdict,
};
pub use policy::{PolicyKind, PolicyRef, RuleRef, Tier, UnknownPolicyKind};
pub use traffic::{Direction, Protocol, UnknownProtocol};
