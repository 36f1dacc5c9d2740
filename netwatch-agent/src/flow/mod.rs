//! Flow records: kernel signals merged into one Hubble-shaped record per
//! denied flow ([`assemble`], [`record`]).
pub mod assemble;
pub mod record;
