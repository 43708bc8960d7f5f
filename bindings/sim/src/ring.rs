//! The VMM side of the output ring: draining records from guest memory into the backend's
//! queue, on a doorbell (a direct call from the workload thread) or when the engine asks.

use std::sync::Mutex;

use ha_workloads::guest_abi::{
    OUTPUT_RECORD_SIZE, OUTPUT_RING_SLOTS, OutputRecord, STATUS_GPA, status,
};

use crate::memory::GuestMemory;

/// Errors found while draining the output ring.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// The status page's head and tail do not describe a valid ring.
    #[error("output ring counters are inconsistent: head {head}, tail {tail}")]
    Counters {
        /// `out_head` in guest memory.
        head: u64,
        /// `out_tail` in guest memory.
        tail: u64,
    },
    /// A slot does not hold the record its position says it should.
    #[error("output ring slot for seq {seq} is corrupt")]
    Slot {
        /// The sequence number expected in the slot.
        seq: u64,
    },
}

/// Records drained from the ring and not yet handed to the engine.
#[derive(Debug, Default)]
pub(crate) struct OutputQueue {
    queue: Mutex<Vec<OutputRecord>>,
}

impl OutputQueue {
    /// Move every record between `out_tail` and `out_head` into the queue and store the new
    /// `out_tail` in guest memory (a VMM write, marked dirty). Returns how many moved.
    pub(crate) fn drain_ring(&self, mem: &GuestMemory) -> Result<u64, RingError> {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let head = mem.load_acquire(STATUS_GPA + status::OUT_HEAD as u64);
        let tail = mem.load_acquire(STATUS_GPA + status::OUT_TAIL as u64);
        if head < tail || head - tail > OUTPUT_RING_SLOTS {
            return Err(RingError::Counters { head, tail });
        }
        let mut slot = [0u8; OUTPUT_RECORD_SIZE];
        let first = queue.len();
        for seq in tail..head {
            let rec = mem
                .read(OutputRecord::slot_gpa(seq), &mut slot)
                .ok()
                .and_then(|()| OutputRecord::read_slot(&slot));
            match rec {
                Some(rec) if rec.seq == seq => queue.push(rec),
                _ => {
                    // All or nothing: the tail stays, so nothing is half-drained.
                    queue.truncate(first);
                    return Err(RingError::Slot { seq });
                }
            }
        }
        if head != tail {
            mem.store_release(STATUS_GPA + status::OUT_TAIL as u64, head);
        }
        Ok(head - tail)
    }

    /// Append every queued record to `out`, in sequence order.
    pub(crate) fn take(&self, out: &mut Vec<OutputRecord>) {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        out.append(&mut queue);
    }
}
