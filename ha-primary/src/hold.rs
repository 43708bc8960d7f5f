//! Output commit on the primary (the *hold* stage): output produced in epoch n is held
//! until the backup acknowledges checkpoint n, then released to the world.

use ha_wire::output::{OutputError, OutputSink};
use ha_workloads::guest_abi::OutputRecord;
use std::collections::VecDeque;

/// Output held per checkpoint, and where released output goes.
#[derive(Debug)]
pub struct HeldOutput {
    held: VecDeque<(u64, Vec<OutputRecord>)>,
    sink: Option<OutputSink>,
    /// Records released so far.
    pub released: u64,
}

impl HeldOutput {
    /// Hold output for release to `sink` (or drop it on release if there is none).
    pub fn new(sink: Option<OutputSink>) -> Self {
        Self {
            held: VecDeque::new(),
            sink,
            released: 0,
        }
    }

    /// Hold the output produced during checkpoint `epoch`'s epoch.
    pub fn hold(&mut self, epoch: u64, records: Vec<OutputRecord>) {
        if !records.is_empty() {
            self.held.push_back((epoch, records));
        }
    }

    /// Records held now.
    pub fn held_records(&self) -> usize {
        self.held.iter().map(|(_, r)| r.len()).sum()
    }

    /// Checkpoint `epoch` is committed: release everything held up to it.
    pub fn ack(&mut self, epoch: u64) -> Result<(), OutputError> {
        self.release_while(|e| e <= epoch)
    }

    /// Release everything held, committed or not (the backup is gone and the policy is
    /// to continue unprotected).
    pub fn release_all(&mut self) -> Result<(), OutputError> {
        self.release_while(|_| true)
    }

    /// Release held output, oldest first, while its checkpoint is `due`.
    fn release_while(&mut self, due: impl Fn(u64) -> bool) -> Result<(), OutputError> {
        while self.held.front().is_some_and(|(e, _)| due(*e)) {
            if let Some((_, recs)) = self.held.pop_front() {
                self.release(&recs)?;
            }
        }
        Ok(())
    }

    /// Release records at once (unprotected mode).
    pub fn release(&mut self, recs: &[OutputRecord]) -> Result<(), OutputError> {
        self.released += recs.len() as u64;
        match &mut self.sink {
            Some(s) => s.release(recs),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recs(from: u64, n: u64) -> Vec<OutputRecord> {
        (from..from + n)
            .map(|seq| OutputRecord {
                seq,
                payload: vec![],
            })
            .collect()
    }

    #[test]
    fn nothing_is_released_before_its_ack() {
        let mut h = HeldOutput::new(None);
        h.hold(1, recs(0, 3));
        h.hold(2, recs(3, 2));
        h.hold(3, vec![]);
        assert_eq!(h.held_records(), 5);
        h.ack(0).unwrap();
        assert_eq!(h.released, 0);
        h.ack(1).unwrap();
        assert_eq!((h.released, h.held_records()), (3, 2));
        h.release_all().unwrap();
        assert_eq!((h.released, h.held_records()), (5, 0));
    }
}
