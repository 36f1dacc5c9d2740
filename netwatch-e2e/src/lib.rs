//! netwatch's end-to-end tests live in `tests/`: each builds a lab
//! (`netwatch-lab`) on this machine's kernel, runs the real `netwatch-agent`
//! in it, sends real packets and reads what the agent reported the way a user
//! would (flow log, metrics, `netwatch observe`, `netwatch explain`).
//!
//! They need root and the binaries of `netwatch-agent` and `netwatch-lab`:
//! `cargo xtask test` builds those and runs these tests, and the kernel matrix
//! (`cargo xtask vmtest`) runs some of them on other kernels. A plain
//! `cargo test` at the workspace root leaves this crate out.
