//! Kernel drop reasons, named by the running kernel.
//!
//! `enum skb_drop_reason` is renumbered between kernel releases, so names
//! come from this kernel's BTF, never from a table compiled into netwatch.
//!
//! Since 6.4 a subsystem can have reasons of its own above 0xFFFF (the high
//! 16 bits name the subsystem, `enum skb_drop_reason_subsys`). Open vSwitch's
//! (`enum ovs_drop_reason`, OVS_DROP_LAST_ACTION for an OpenFlow drop, ...)
//! live in the openvswitch module's BTF, which exists only once the module
//! is loaded: they are read then, and again when an unnamed one shows up.
//! They are counted per subsystem (`--drop-reasons OPENVSWITCH`).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use netwatch_common::REASON_SUBSYS_SHIFT;

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
    // A subsystem: every Open vSwitch drop reason (OpenFlow drops, meters, ...).
    "OPENVSWITCH",
];

/// Subsystems whose reasons netwatch names, with the module and enum that
/// hold them (`enum skb_drop_reason_subsys` names the subsystem).
const SUBSYSTEM_ENUMS: &[(&str, &str, &str)] = &[("OPENVSWITCH", "openvswitch", "ovs_drop_reason")];

/// Where the kernel publishes its modules' BTF.
const MODULE_BTF_DIR: &str = "/sys/kernel/btf";

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
    /// Subsystem number -> name (OPENVSWITCH), from `enum skb_drop_reason_subsys`.
    subsystems: BTreeMap<u32, String>,
    /// Subsystems whose module BTF has been read.
    modules_read: BTreeSet<u32>,
    /// Subsystem reasons met without a name, each looked up once.
    unnamed_tried: BTreeSet<u32>,
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
        let mut r = DropReasons::from_pairs(pairs);
        // 6.4+: the subsystems' numbers (absent before: no subsystem reasons).
        if let Ok(types) = btf.resolve_types_by_name("skb_drop_reason_subsys") {
            for t in types {
                let Type::Enum(e) = t else { continue };
                for m in &e.members {
                    let name = btf.resolve_name(m)?;
                    if let Some(short) = name.strip_prefix("SKB_DROP_REASON_SUBSYS_")
                        && short != "CORE"
                        && short != "NUM"
                    {
                        r.add_subsystem(m.val(), short);
                    }
                }
            }
        }
        Ok(r)
    }

    /// Know subsystem `number` as `name`: `--drop-reasons NAME` counts all of
    /// its reasons.
    pub fn add_subsystem(&mut self, number: u32, name: &str) {
        let marker = number << REASON_SUBSYS_SHIFT;
        self.subsystems.insert(number, name.to_string());
        self.by_name.insert(name.to_string(), marker);
        self.by_value.insert(marker, name.to_string());
    }

    /// Read the reasons of loaded modules' subsystems (their BTF splits the
    /// kernel's `vmlinux`). Returns how many reasons were added.
    pub fn read_module_reasons(&mut self, vmlinux: &Path) -> usize {
        self.read_module_reasons_in(vmlinux, Path::new(MODULE_BTF_DIR))
    }

    fn read_module_reasons_in(&mut self, vmlinux: &Path, dir: &Path) -> usize {
        let wanted: Vec<(u32, &str, &str)> = SUBSYSTEM_ENUMS
            .iter()
            .filter_map(|(subsys, module, enum_name)| {
                let number = self
                    .subsystems
                    .iter()
                    .find(|(_, n)| n.as_str() == *subsys)
                    .map(|(k, _)| *k)?;
                (!self.modules_read.contains(&number) && dir.join(module).exists())
                    .then_some((number, *module, *enum_name))
            })
            .collect();
        if wanted.is_empty() {
            return 0;
        }
        let Ok(base) = Btf::from_file(vmlinux) else {
            return 0;
        };
        let mut added = 0;
        for (number, module, enum_name) in wanted {
            let Ok(btf) = Btf::from_split_file(dir.join(module), &base) else {
                continue;
            };
            self.modules_read.insert(number);
            let Ok(types) = btf.resolve_types_by_name(enum_name) else {
                continue;
            };
            for t in types {
                let Type::Enum(e) = t else { continue };
                for m in &e.members {
                    let Ok(name) = btf.resolve_name(m) else {
                        continue;
                    };
                    let v = m.val();
                    // __OVS_DROP_REASON and OVS_DROP_MAX are markers.
                    if v >> REASON_SUBSYS_SHIFT != number
                        || name.starts_with("__")
                        || name.ends_with("_MAX")
                    {
                        continue;
                    }
                    self.by_name.insert(name.clone(), v);
                    self.by_value.insert(v, name);
                    added += 1;
                }
            }
        }
        added
    }

    /// Name `reason` if it is a subsystem's whose module was loaded after
    /// the last read: its module BTF is read again, once per unnamed number
    /// (a flood of one unknown reason costs one read).
    pub fn learn(&mut self, reason: u32, vmlinux: &Path) {
        if reason >> REASON_SUBSYS_SHIFT == 0
            || self.by_value.contains_key(&reason)
            || !self.unnamed_tried.insert(reason)
        {
            return;
        }
        self.modules_read.remove(&(reason >> REASON_SUBSYS_SHIFT));
        self.read_module_reasons(vmlinux);
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

    /// The reason's name, or `REASON_<n>` (`<SUBSYSTEM>_REASON_<n>`) for a
    /// number this kernel does not name.
    /// The name of `value` when the kernel's enum has one (what
    /// [`DropReasons::name`] returns then), borrowed.
    pub fn known_name(&self, value: u32) -> Option<&str> {
        self.by_value.get(&value).map(String::as_str)
    }

    pub fn name(&self, value: u32) -> String {
        if let Some(name) = self.by_value.get(&value) {
            return name.clone();
        }
        let subsys = value >> REASON_SUBSYS_SHIFT;
        match self.subsystems.get(&subsys) {
            Some(s) if subsys != 0 => format!("{s}_REASON_{}", value & 0xFFFF),
            _ => format!("REASON_{value}"),
        }
    }

    /// The subsystems counted by a filter from [`DropReasons::parse_filter`]
    /// (a subsystem counts as a whole once any of its reasons is in it).
    pub fn subsystems_of(filter: &BTreeSet<u32>) -> BTreeSet<u32> {
        filter
            .iter()
            .map(|v| v >> REASON_SUBSYS_SHIFT)
            .filter(|s| *s != 0)
            .collect()
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

    fn with_ovs() -> DropReasons {
        let mut r = sample();
        r.add_subsystem(3, "OPENVSWITCH");
        r
    }

    #[test]
    fn subsystem_reasons_are_named_and_counted_per_subsystem() {
        let r = with_ovs();
        // Before the module's BTF is read: the subsystem names the number.
        assert_eq!(r.name((3 << 16) | 1), "OPENVSWITCH_REASON_1");
        assert_eq!(r.name((5 << 16) | 1), format!("REASON_{}", (5 << 16) | 1));
        let set = r.parse_filter("default").unwrap();
        assert_eq!(DropReasons::subsystems_of(&set), BTreeSet::from([3]));
        let set = r.parse_filter("default,-OPENVSWITCH").unwrap();
        assert!(DropReasons::subsystems_of(&set).is_empty());
        assert_eq!(set, BTreeSet::from([12, 30]));
        // A kernel without subsystems (before 6.4): default is the core set.
        let set = sample().parse_filter("default").unwrap();
        assert!(DropReasons::subsystems_of(&set).is_empty());
    }

    #[test]
    fn module_reasons_without_their_module_stay_numbered() {
        let mut r = with_ovs();
        let dir = std::env::temp_dir().join(format!("netwatch-nobtf-{}", std::process::id()));
        // No openvswitch file in `dir`: nothing read, nothing invented.
        assert_eq!(
            r.read_module_reasons_in(Path::new(super::super::offsets::VMLINUX_BTF), &dir),
            0
        );
        assert_eq!(r.name((3 << 16) | 1), "OPENVSWITCH_REASON_1");
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
