//! netwatch, the library behind the `netwatch-agent` daemon and the
//! `netwatch` CLI.
//!
//! Data flows one way, one module per stage:
//!
//! ```text
//! kernel hooks -> capture -> flow -> identity + policy -> export
//! ```
//!
//! - [`capture`]: load and attach the eBPF programs, read the ring buffer and
//!   the in-kernel tables, decode drop reasons from the running kernel.
//! - [`record`]: the vocabulary every stage shares: the flow record and
//!   [`record::PolicyRef`], how every stage names a policy and its rule.
//! - [`flow`]: merge kernel signals into one record per denied flow.
//! - [`export`]: the flow log.
//! - [`daemon`]: the agent's main loop wiring the stages together.
//! - [`cluster`]: the Kubernetes objects netwatch works from, one snapshot type.
//! - [`manifests`]: Kubernetes manifests (YAML files) as typed objects.
//! - [`policy`]: exact policy semantics, tier by tier (AdminNetworkPolicy and
//!   ClusterNetworkPolicy, NetworkPolicy, the baseline): verdicts,
//!   explanations, fixes.
//! - [`identity`]: IP and cgroup -> pod, workload, service, node.
//! - [`logging`]: both binaries' logs: text (coloured only on a terminal) or JSON.
//! - [`cli`]: the `netwatch` command line (`explain`, `lint`): arguments and output.
pub mod attribution;
pub mod capture;
pub mod cli;
pub mod cluster;
pub mod daemon;
pub mod export;
pub mod flow;
pub mod identity;
pub mod logging;
pub mod manifests;
pub mod policy;
pub mod record;
