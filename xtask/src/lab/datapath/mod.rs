//! How pods are wired to their node, one module per CNI datapath family.
//! The routed (Calico) wiring is the lab's own default in `lab::add_pod`.

pub mod bridge;
