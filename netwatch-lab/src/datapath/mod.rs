//! How pods are wired to their node and policy enforced there, one module
//! per CNI datapath family. The routed (Calico) wiring is the lab's own
//! default in `lab::add_pod`.

pub mod bridge;
pub mod ebpf;
pub mod ovs;
