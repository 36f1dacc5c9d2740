//! Kernel drop reasons, named by the running kernel.
//!
//! `enum skb_drop_reason` is renumbered between kernel releases, so names
//! come from this kernel's BTF, never from a table compiled into netwatch.

use std::collections::{BTreeMap, BTreeSet};

use btf_rs::{Btf, Type};

/// The reasons counted by default: drops that come from a decision to block
/// traffic (firewalls, policy programs, reverse-path filters, IPsec policy,
/// routing and neighbour failures), not the everyday noise of a busy node
/// (NOT_SPECIFIED, NO_SOCKET, TCP state handling, ...).
pub const DEFAULT_REASONS: &[&str] = &[
    "NETFILTER_DROP",
    "TC_INGRESS",
    "TC_EGRESS",
    "BPF_CGROUP_EGRESS",
    "BPF_CGROUP_INGRESS",
    "IP_RPFILTER",
    "XFRM_POLICY",
    "IP_INNOROUTES",
    "IP_OUTNOROUTES",
    "NEIGH_FAILED",
    "SOCKET_FILTER",
];

/// Errors decoding drop reasons or parsing a reason filter.
#[derive(Debug, thiserror::Error)]
pub enum ReasonError {
    #[error(
        "kernel BTF has no enum skb_drop_reason (kernel older than 5.17?): drop reasons cannot be named"
    )]
    NoEnum,
    #[error("unknown drop reason {name:?} in --drop-reasons; this kernel knows: {known}")]
    Unknown { name: String, known: String },
    #[error("kernel BTF: {0}")]
    Btf(#[from] btf_rs::Error),
}

/// The running kernel's drop reasons: number <-> name (without the
/// `SKB_DROP_REASON_` prefix).
#[derive(Clone, Debug, Default)]
pub struct DropReasons {
    by_value: BTreeMap<u32, String>,
    by_name: BTreeMap<String, u32>,
}

impl DropReasons {
    pub fn from_btf(btf: &Btf) -> Result<DropReasons, ReasonError> {
        let types = btf.resolve_types_by_name("skb_drop_reason")?;
        let e = types
            .into_iter()
            .find_map(|t| match t {
                Type::Enum(e) => Some(e),
                _ => None,
            })
            .ok_or(ReasonError::NoEnum)?;
        let mut pairs = Vec::with_capacity(e.members.len());
        for m in &e.members {
            let name = btf.resolve_name(m)?;
            pairs.push((m.val(), name));
        }
        Ok(DropReasons::from_pairs(pairs))
    }

    /// Build from (value, enumerator name) pairs as the kernel spells them.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (u32, String)>) -> DropReasons {
        let mut r = DropReasons::default();
        for (value, name) in pairs {
            let short = name
                .strip_prefix("SKB_DROP_REASON_")
                .or_else(|| name.strip_prefix("SKB_"))
                .unwrap_or(&name)
                .to_string();
            // SKB_DROP_REASON_MAX and subsystem masks are markers, not reasons.
            if short == "MAX" || short.starts_with("SUBSYS") {
                continue;
            }
            r.by_name.insert(short.clone(), value);
            r.by_value.insert(value, short);
        }
        r
    }

    /// The reason's name, or `REASON_<n>` for a number this kernel does not name.
    pub fn name(&self, value: u32) -> String {
        self.by_value
            .get(&value)
            .cloned()
            .unwrap_or_else(|| format!("REASON_{value}"))
    }

    pub fn value(&self, name: &str) -> Option<u32> {
        self.by_name.get(name).copied()
    }

    /// Every reason name this kernel knows.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    /// The reasons of the kernel whose BTF is at `path` (the running one's
    /// is world-readable: no privileges needed).
    pub fn from_btf_file(path: &std::path::Path) -> Result<DropReasons, ReasonError> {
        DropReasons::from_btf(&Btf::from_file(path)?)
    }

    pub fn len(&self) -> usize {
        self.by_value.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_value.is_empty()
    }

    /// Parse a `--drop-reasons` value into the set of reason numbers to count.
    ///
    /// A comma-separated list of reason names, `default` (the
    /// [`DEFAULT_REASONS`] this kernel has) and `all` (every real drop
    /// reason); a name prefixed with `-` is removed. Example:
    /// `default,NO_SOCKET` or `all,-NOT_SPECIFIED`.
    pub fn parse_filter(&self, spec: &str) -> Result<BTreeSet<u32>, ReasonError> {
        let mut set = BTreeSet::new();
        for raw in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (remove, item) = match raw.strip_prefix('-') {
                Some(rest) => (true, rest),
                None => (false, raw),
            };
            let values: Vec<u32> = match item.to_ascii_uppercase().as_str() {
                "DEFAULT" => DEFAULT_REASONS
                    .iter()
                    .filter_map(|n| self.value(n))
                    .collect(),
                "ALL" => self
                    .by_name
                    .iter()
                    .filter(|(n, _)| *n != "NOT_DROPPED_YET" && *n != "CONSUMED")
                    .map(|(_, v)| *v)
                    .collect(),
                name => {
                    let name = name.strip_prefix("SKB_DROP_REASON_").unwrap_or(name);
                    vec![self.value(name).ok_or_else(|| ReasonError::Unknown {
                        name: item.to_string(),
                        known: self.by_name.keys().cloned().collect::<Vec<_>>().join(", "),
                    })?]
                }
            };
            for v in values {
                if remove {
                    set.remove(&v);
                } else {
                    set.insert(v);
                }
            }
        }
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DropReasons {
        DropReasons::from_pairs(
            [
                (0, "SKB_NOT_DROPPED_YET"),
                (1, "SKB_CONSUMED"),
                (2, "SKB_DROP_REASON_NOT_SPECIFIED"),
                (3, "SKB_DROP_REASON_NO_SOCKET"),
                (12, "SKB_DROP_REASON_NETFILTER_DROP"),
                (30, "SKB_DROP_REASON_IP_RPFILTER"),
                (99, "SKB_DROP_REASON_MAX"),
            ]
            .map(|(v, n)| (v, n.to_string())),
        )
    }

    #[test]
    fn names_strip_the_kernel_prefix() {
        let r = sample();
        assert_eq!(r.name(12), "NETFILTER_DROP");
        assert_eq!(r.name(1), "CONSUMED");
        assert_eq!(r.name(77), "REASON_77");
        assert_eq!(r.value("MAX"), None, "markers are not reasons");
    }

    #[test]
    fn default_keeps_policy_drops_and_skips_noise() {
        let r = sample();
        let set = r.parse_filter("default").unwrap();
        assert_eq!(set, BTreeSet::from([12, 30]));
    }

    #[test]
    fn filter_adds_removes_and_rejects_unknown_names() {
        let r = sample();
        assert_eq!(
            r.parse_filter("default,NO_SOCKET").unwrap(),
            BTreeSet::from([3, 12, 30])
        );
        assert_eq!(
            r.parse_filter("all,-NOT_SPECIFIED").unwrap(),
            BTreeSet::from([3, 12, 30])
        );
        let e = r.parse_filter("NETFILTER_DROPP").unwrap_err().to_string();
        assert!(
            e.contains("NETFILTER_DROPP") && e.contains("NETFILTER_DROP,"),
            "{e}"
        );
    }

    // The running kernel's own numbering, read from its BTF.
    #[test]
    fn running_kernel_names_netfilter_drop() {
        let btf = Btf::from_file(super::super::offsets::VMLINUX_BTF).unwrap();
        let r = DropReasons::from_btf(&btf).unwrap();
        let v = r
            .value("NETFILTER_DROP")
            .expect("NETFILTER_DROP exists since 5.17");
        assert_eq!(r.name(v), "NETFILTER_DROP");
        assert!(r.value("NOT_SPECIFIED").is_some());
    }
}
