//! The CNI datapath families a lab emulates besides the routed one (which is
//! the lab's base wiring, in the parent module): one module each.

pub mod ebpf;
pub mod ovs;
