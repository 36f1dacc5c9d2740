//! Exact counters shared between CPUs. `core`'s atomics have no
//! read-modify-write on the BPF target, so this emits BPF's atomic add
//! (`lock *(u64 *)(ptr) += v`, available on every BPF ISA version).

/// Atomically add `value` to the u64 at `ptr`.
///
/// # Safety
/// `ptr` must point at a u64 in a map value.
#[inline(always)]
pub unsafe fn atomic_add(ptr: *mut u64, value: u64) {
    // SAFETY: the caller guarantees ptr is a valid map value address.
    unsafe {
        core::arch::asm!(
            "lock *(u64 *)({ptr} + 0) += {value}",
            ptr = in(reg) ptr,
            value = in(reg) value,
            options(nostack),
        );
    }
}
