//! Sending events to user space, counting what could not be sent.

use netwatch_common::Event;

use crate::maps::{EVENTS, count_loss};

/// Reserve one event in the ring buffer, zero it, let `fill` write its fields
/// in place (no copy through the 512-byte stack), and submit it. Counts a loss
/// under `loss_index` when the ring buffer is full.
#[inline(always)]
pub fn send(loss_index: u32, fill: impl FnOnce(&mut Event)) {
    match EVENTS.reserve::<Event>(0) {
        Some(mut entry) => {
            let event = entry.as_mut_ptr();
            // SAFETY: the reservation is size_of::<Event>() bytes, exclusively ours
            // until submit; all-zero is a valid Event.
            unsafe {
                core::ptr::write_bytes(event, 0, 1);
                fill(&mut *event);
            }
            entry.submit(0);
        }
        None => count_loss(loss_index),
    }
}
