//! Calico's own policies (projectcalico.org/v3).
//!
//! - [`selector`]: Calico's selector language, parsed and evaluated.

pub mod selector;

pub use selector::{CalicoSelector, Expr as SelectorExpr, SelectorError, SelectorProblem};
