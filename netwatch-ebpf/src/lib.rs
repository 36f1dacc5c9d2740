//! Present only so the crate has a library target for tooling; the programs
//! live in the `netwatch` binary target (src/main.rs).
#![no_std]
