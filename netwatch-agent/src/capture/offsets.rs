//! Kernel struct field offsets from the running kernel's BTF.
//!
//! Rust eBPF programs get no CO-RE relocations, so the kfree_skb program reads
//! `sk_buff`, `net_device`, `net` and `sock_common` fields at offsets that we
//! compute here, from `/sys/kernel/btf/vmlinux`, and hand over as globals.

use std::path::Path;

use btf_rs::{Btf, Type};

/// Where the kernel's own BTF lives.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Errors computing offsets.
#[derive(Debug, thiserror::Error)]
pub enum OffsetError {
    #[error(
        "cannot read kernel BTF at {path}: {source}. The kernel needs CONFIG_DEBUG_INFO_BTF=y \
         (every major distribution kernel since 2021 has it); without it drop capture is off"
    )]
    Unreadable {
        path: String,
        #[source]
        source: btf_rs::Error,
    },
    #[error("kernel BTF has no struct {0}")]
    NoStruct(String),
    #[error("kernel BTF: struct {strukt} has no field {field}")]
    NoField { strukt: String, field: String },
    #[error("kernel BTF: {0}")]
    Btf(#[from] btf_rs::Error),
}

/// The offsets (in bytes) the kfree_skb program needs, and whether the
/// tracepoint passes a drop reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub skb_head: u32,
    pub skb_network_header: u32,
    pub skb_protocol: u32,
    pub skb_len: u32,
    pub skb_dev: u32,
    pub skb_sk: u32,
    pub dev_ifindex: u32,
    pub dev_nd_net: u32,
    pub net_ns_inum: u32,
    pub sock_net: u32,
    /// `sock_common`'s IPv6 addresses (for sock_state); 0 when the kernel
    /// has no IPv6 (CONFIG_IPV6=n drops the fields).
    pub sock_v6_daddr: u32,
    pub sock_v6_rcv_saddr: u32,
    /// `kfree_skb` has an `enum skb_drop_reason` argument (kernels >= 5.17).
    pub has_reason: bool,
}

impl KernelOffsets {
    /// Read the running kernel's BTF.
    pub fn from_btf_file(path: &Path) -> Result<(KernelOffsets, Btf), OffsetError> {
        let btf = Btf::from_file(path).map_err(|source| OffsetError::Unreadable {
            path: path.display().to_string(),
            source,
        })?;
        Ok((KernelOffsets::from_btf(&btf)?, btf))
    }

    pub fn from_btf(btf: &Btf) -> Result<KernelOffsets, OffsetError> {
        Ok(KernelOffsets {
            skb_head: field_offset(btf, "sk_buff", &["head"])?,
            skb_network_header: field_offset(btf, "sk_buff", &["network_header"])?,
            skb_protocol: field_offset(btf, "sk_buff", &["protocol"])?,
            skb_len: field_offset(btf, "sk_buff", &["len"])?,
            skb_dev: field_offset(btf, "sk_buff", &["dev"])?,
            skb_sk: field_offset(btf, "sk_buff", &["sk"])?,
            dev_ifindex: field_offset(btf, "net_device", &["ifindex"])?,
            dev_nd_net: field_offset(btf, "net_device", &["nd_net"])?,
            net_ns_inum: field_offset(btf, "net", &["ns", "inum"])?,
            sock_net: field_offset(btf, "sock_common", &["skc_net"])?,
            sock_v6_daddr: field_offset(btf, "sock_common", &["skc_v6_daddr"]).unwrap_or(0),
            sock_v6_rcv_saddr: field_offset(btf, "sock_common", &["skc_v6_rcv_saddr"]).unwrap_or(0),
            has_reason: kfree_skb_has_reason(btf),
        })
    }
}

/// Byte offset of `path` (a field, then fields of that field's struct) in
/// struct `strukt`, looking through anonymous structs and unions.
pub fn field_offset(btf: &Btf, strukt: &str, path: &[&str]) -> Result<u32, OffsetError> {
    let mut ty = find_struct(btf, strukt)?;
    let mut total_bits = 0u32;
    let mut current = strukt.to_string();
    for (i, field) in path.iter().enumerate() {
        let (bits, member_ty) =
            find_member(btf, &ty, field)?.ok_or_else(|| OffsetError::NoField {
                strukt: current.clone(),
                field: (*field).to_string(),
            })?;
        total_bits += bits;
        if i + 1 < path.len() {
            ty = strip(btf, member_ty)?;
            current = format!("{current}.{field}");
        }
    }
    Ok(total_bits / 8)
}

fn find_struct(btf: &Btf, name: &str) -> Result<Type, OffsetError> {
    btf.resolve_types_by_name(name)?
        .into_iter()
        .find(|t| matches!(t, Type::Struct(s) if !s.members.is_empty()))
        .ok_or_else(|| OffsetError::NoStruct(name.to_string()))
}

/// Follow typedefs and qualifiers to the underlying type.
fn strip(btf: &Btf, mut ty: Type) -> Result<Type, OffsetError> {
    for _ in 0..16 {
        match &ty {
            Type::Typedef(t) => ty = btf.resolve_chained_type(t)?,
            Type::Const(t) => ty = btf.resolve_chained_type(t)?,
            Type::Volatile(t) => ty = btf.resolve_chained_type(t)?,
            Type::Restrict(t) => ty = btf.resolve_chained_type(t)?,
            Type::TypeTag(t) => ty = btf.resolve_chained_type(t)?,
            _ => break,
        }
    }
    Ok(ty)
}

/// (bit offset, type) of member `name` in a struct or union, searching
/// anonymous members depth-first (kernel structs nest them deeply).
fn find_member(btf: &Btf, ty: &Type, name: &str) -> Result<Option<(u32, Type)>, OffsetError> {
    let members = match ty {
        Type::Struct(s) | Type::Union(s) => &s.members,
        _ => return Ok(None),
    };
    for m in members {
        let member_name = btf.resolve_name(m).unwrap_or_default();
        if member_name == name {
            return Ok(Some((m.bit_offset(), btf.resolve_chained_type(m)?)));
        }
        if member_name.is_empty() {
            let inner = strip(btf, btf.resolve_chained_type(m)?)?;
            if let Some((bits, t)) = find_member(btf, &inner, name)? {
                return Ok(Some((m.bit_offset() + bits, t)));
            }
        }
    }
    Ok(None)
}

/// Whether `kfree_skb`'s BTF prototype carries `enum skb_drop_reason`.
fn kfree_skb_has_reason(btf: &Btf) -> bool {
    let Ok(types) = btf.resolve_types_by_name("btf_trace_kfree_skb") else {
        return false;
    };
    for t in types {
        let Ok(Type::Ptr(p)) = strip(btf, t) else {
            continue;
        };
        let Ok(Type::FuncProto(proto)) = btf.resolve_chained_type(&p) else {
            continue;
        };
        // (void *ctx, struct sk_buff *skb, void *location, enum skb_drop_reason reason, ...)
        if let Some(param) = proto.parameters.get(3)
            && let Ok(Type::Enum(e)) = btf.resolve_chained_type(param)
        {
            return btf
                .resolve_name(&e)
                .map(|n| n == "skb_drop_reason")
                .unwrap_or(false);
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    // Reads this machine's kernel BTF: the offsets must be plausible and
    // consistent with what the kernel's own layout implies.
    #[test]
    fn offsets_from_running_kernel() {
        let (o, _) = KernelOffsets::from_btf_file(Path::new(VMLINUX_BTF)).expect("kernel BTF");
        // network_header and transport_header are adjacent u16s in every kernel.
        let transport = {
            let btf = Btf::from_file(VMLINUX_BTF).unwrap();
            field_offset(&btf, "sk_buff", &["transport_header"]).unwrap()
        };
        assert_eq!(o.skb_network_header, transport + 2);
        assert!(o.skb_head > o.skb_dev, "head comes after dev in sk_buff");
        assert!(o.net_ns_inum > 0);
        // After the fixed IPv4 part (daddr, rcv_saddr, hash, ports, family,
        // state...), 16 bytes apart.
        assert!(o.sock_v6_daddr > 18, "{o:?}");
        assert_eq!(o.sock_v6_rcv_saddr, o.sock_v6_daddr + 16, "{o:?}");
        assert!(o.has_reason, "this kernel (>= 5.17) passes a drop reason");
    }

    #[test]
    fn missing_struct_and_field_are_named() {
        let btf = Btf::from_file(VMLINUX_BTF).unwrap();
        let e = field_offset(&btf, "sk_buff", &["no_such_field"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "kernel BTF: struct sk_buff has no field no_such_field"
        );
        let e = field_offset(&btf, "no_such_struct_xyz", &["a"]).unwrap_err();
        assert_eq!(e.to_string(), "kernel BTF has no struct no_such_struct_xyz");
    }
}
