//! Exporters: where flow records go ([`flowlog`]).
pub mod flowlog;
