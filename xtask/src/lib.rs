//! netwatch's developer and CI tasks, as a library so the end-to-end tests
//! can build labs too.
pub mod flood;
pub mod lab;
pub mod scenario;
