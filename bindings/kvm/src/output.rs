//! Draining the guest's output ring: records between the status page's `OUT_TAIL` and
//! `OUT_HEAD` are validated, queued in the VMM, and `OUT_TAIL` is advanced in guest memory
//! (a VMM write, so the status page shows up in the next dirty harvest).

use std::sync::Mutex;

use ha_workloads::guest_abi::{
    OUTPUT_RECORD_SIZE, OUTPUT_RING_SLOTS, OutputRecord, STATUS_GPA, status,
};

use crate::memory::{GuestRam, MemoryError};

/// Errors from draining the ring. Any of them means the guest broke the ABI.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// head/tail inconsistent.
    #[error("output ring head {head} / tail {tail} out of range")]
    Counters {
        /// Guest's `OUT_HEAD`.
        head: u64,
        /// `OUT_TAIL`.
        tail: u64,
    },
    /// A slot that does not parse or holds the wrong sequence number.
    #[error("output ring slot for seq {seq} is invalid")]
    Slot {
        /// Expected sequence number.
        seq: u64,
    },
    /// The ring's memory could not be accessed.
    #[error("cannot access the output ring")]
    Memory(#[source] MemoryError),
}

/// Records drained from the ring but not yet handed to the engine.
#[derive(Debug, Default)]
pub struct OutputQueue {
    queue: Mutex<Vec<OutputRecord>>,
}

impl OutputQueue {
    /// Drain the ring into the queue; returns the number of new records.
    pub fn drain_ring(&self, ram: &GuestRam) -> Result<usize, OutputError> {
        self.drain_ring_capped(ram, usize::MAX)
    }

    /// Drain the ring into the queue, but leave records in the ring once the queue holds
    /// `cap` records (back-pressure on a guest whose output nobody collects: it then finds
    /// its ring full and keeps ringing). Returns the number of new records.
    pub fn drain_ring_capped(&self, ram: &GuestRam, cap: usize) -> Result<usize, OutputError> {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let head = ram
            .read_u64(STATUS_GPA + status::OUT_HEAD as u64)
            .map_err(OutputError::Memory)?;
        let tail = ram
            .read_u64(STATUS_GPA + status::OUT_TAIL as u64)
            .map_err(OutputError::Memory)?;
        if head < tail || head - tail > OUTPUT_RING_SLOTS {
            return Err(OutputError::Counters { head, tail });
        }
        let room = u64::try_from(cap.saturating_sub(q.len())).unwrap_or(u64::MAX);
        let head = head.min(tail.saturating_add(room));
        let mut slot = [0u8; OUTPUT_RECORD_SIZE];
        let first = q.len();
        for seq in tail..head {
            ram.read(OutputRecord::slot_gpa(seq), &mut slot)
                .map_err(OutputError::Memory)?;
            match OutputRecord::read_slot(&slot) {
                Some(r) if r.seq == seq => q.push(r),
                _ => {
                    q.truncate(first);
                    return Err(OutputError::Slot { seq });
                }
            }
        }
        if head != tail {
            ram.write_u64(STATUS_GPA + status::OUT_TAIL as u64, head)
                .map_err(OutputError::Memory)?;
        }
        // head - tail <= OUTPUT_RING_SLOTS, checked above.
        Ok(usize::try_from(head - tail).unwrap_or(usize::MAX))
    }

    /// Drain the ring, then move every queued record into `out`.
    pub fn take_all(&self, ram: &GuestRam, out: &mut Vec<OutputRecord>) -> Result<(), OutputError> {
        let res = self.drain_ring(ram);
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        out.append(&mut q);
        res.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram_with(records: &[(u64, u64)], head: u64, tail: u64) -> GuestRam {
        let ram = GuestRam::new(2 << 20).expect("map");
        for &(slot_seq, seq) in records {
            let mut slot = [0u8; OUTPUT_RECORD_SIZE];
            OutputRecord {
                seq,
                payload: vec![1; 16],
            }
            .write_slot(&mut slot);
            ram.write(OutputRecord::slot_gpa(slot_seq), &slot)
                .expect("write");
        }
        ram.write_u64(STATUS_GPA + status::OUT_HEAD as u64, head)
            .expect("w");
        ram.write_u64(STATUS_GPA + status::OUT_TAIL as u64, tail)
            .expect("w");
        ram.take_vmm_dirty();
        ram
    }

    #[test]
    fn drains_and_advances_tail() {
        let ram = ram_with(&[(5, 5), (6, 6)], 7, 5);
        let q = OutputQueue::default();
        let mut out = Vec::new();
        q.take_all(&ram, &mut out).expect("drain");
        assert_eq!(out.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![5, 6]);
        assert_eq!(
            ram.read_u64(STATUS_GPA + status::OUT_TAIL as u64)
                .expect("r"),
            7
        );
        assert_eq!(ram.take_vmm_dirty()[0], 1 << 2);
    }

    #[test]
    fn capped_drain_leaves_the_rest_in_the_ring() {
        let ram = ram_with(&[(5, 5), (6, 6)], 7, 5);
        let q = OutputQueue::default();
        assert_eq!(q.drain_ring_capped(&ram, 1).expect("drain"), 1);
        assert_eq!(q.drain_ring_capped(&ram, 1).expect("drain"), 0);
        assert_eq!(
            ram.read_u64(STATUS_GPA + status::OUT_TAIL as u64)
                .expect("r"),
            6
        );
        let mut out = Vec::new();
        q.take_all(&ram, &mut out).expect("drain");
        assert_eq!(out.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![5, 6]);
    }

    #[test]
    fn bad_rings_are_errors() {
        let q = OutputQueue::default();
        assert!(matches!(
            q.drain_ring(&ram_with(&[], 2000, 0)),
            Err(OutputError::Counters { .. })
        ));
        assert!(matches!(
            q.drain_ring(&ram_with(&[], 1, 2)),
            Err(OutputError::Counters { .. })
        ));
        assert!(matches!(
            q.drain_ring(&ram_with(&[(0, 9)], 1, 0)),
            Err(OutputError::Slot { seq: 0 })
        ));
    }
}
