//! Output commit on the primary (the *hold* stage): output produced in epoch n is held
//! until the backup acknowledges checkpoint n, then released to the world.
//!
//! Two kinds of output are held. The built-in guests' output records, drained at each
//! checkpoint, wait here in memory. A guest's packets on a host interface (a Xen guest's
//! vif, `--net-buffer`) wait in the kernel, behind a plug ([`PacketHold`], an
//! [`ha_netbuf::NetBuffer`]): each checkpoint puts a mark in the plug while the guest is
//! paused, and the checkpoint's ack releases the packets before it. The kernel's plug
//! keeps one waiting mark only, so a checkpoint taken while the previous mark still waits
//! (`--pipeline` above 1) sets none: its packets go with the next mark, released at a
//! later ack, never an earlier one. With `--pipeline 1` every checkpoint has its own mark.

use ha_netbuf::{NetBuffer, NetbufError};
use ha_wire::output::{OutputError, OutputSink};
use ha_workloads::guest_abi::OutputRecord;
use std::collections::VecDeque;

/// Errors releasing or marking held output.
#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    /// Released records cannot be written to the output sink.
    #[error("releasing output records")]
    Output(#[from] OutputError),
    /// The kernel refused a mark or a release on a network buffer.
    #[error("network buffer on {iface}")]
    Net {
        /// The buffered interface.
        iface: String,
        /// Why.
        #[source]
        source: NetbufError,
    },
}

/// Packets held in the kernel behind a plug, released mark by mark: a
/// [`ha_netbuf::NetBuffer`] (tests stand in their own).
pub trait PacketHold: std::fmt::Debug + Send {
    /// The interface whose output is held.
    fn iface(&self) -> &str;
    /// Put a mark after the packets held so far (the guest is paused).
    fn buffer(&mut self) -> Result<(), NetbufError>;
    /// Release the packets before the oldest mark.
    fn release_one(&mut self) -> Result<(), NetbufError>;
    /// Release everything and hold nothing more.
    fn release_indefinite(&mut self) -> Result<(), NetbufError>;
    /// The run is over: remove the hold, or (`keep`) leave it closed in the kernel.
    fn finish(self: Box<Self>, keep: bool);
}

impl PacketHold for NetBuffer {
    fn iface(&self) -> &str {
        self.vif()
    }
    fn buffer(&mut self) -> Result<(), NetbufError> {
        NetBuffer::buffer(self)
    }
    fn release_one(&mut self) -> Result<(), NetbufError> {
        NetBuffer::release_one(self)
    }
    fn release_indefinite(&mut self) -> Result<(), NetbufError> {
        NetBuffer::release_indefinite(self)
    }
    fn finish(self: Box<Self>, keep: bool) {
        if keep {
            self.keep();
        } else if let Err(e) = self.teardown() {
            tracing::warn!(error = %ha_daemon::error_chain(&e), "cannot remove the network buffer");
        }
    }
}

/// Output held per checkpoint, and where released output goes.
#[derive(Debug)]
pub struct HeldOutput {
    held: VecDeque<(u64, Vec<OutputRecord>)>,
    sink: Option<OutputSink>,
    /// Records released so far.
    pub released: u64,
    plugs: Vec<Box<dyn PacketHold>>,
    /// The checkpoint whose mark waits in the plugs for its ack.
    marked: Option<u64>,
    /// The plugs were released for good (nothing is held in them any more).
    open: bool,
    /// Marks set so far.
    pub marks: u64,
    /// Checkpoints whose packets went with a later mark (one was still waiting).
    pub folded: u64,
}

impl HeldOutput {
    /// Hold output for release to `sink` (or drop it on release if there is none).
    pub fn new(sink: Option<OutputSink>) -> Self {
        Self::with_plugs(sink, Vec::new())
    }

    /// Hold output records for `sink`, and the packets held by `plugs` (closed now: what
    /// the guest sends from here on waits for the first checkpoint's ack).
    pub fn with_plugs(sink: Option<OutputSink>, plugs: Vec<Box<dyn PacketHold>>) -> Self {
        Self {
            held: VecDeque::new(),
            sink,
            released: 0,
            plugs,
            marked: None,
            open: false,
            marks: 0,
            folded: 0,
        }
    }

    /// Checkpoint `epoch` is being taken, the guest paused: mark the plugs (or, while an
    /// earlier mark waits, leave this epoch's packets to the next mark).
    pub fn mark(&mut self, epoch: u64) -> Result<(), HoldError> {
        if self.plugs.is_empty() || self.open {
            return Ok(());
        }
        if let Some(waiting) = self.marked {
            self.folded += 1;
            tracing::debug!(
                epoch,
                waiting,
                "the plug's mark for checkpoint {waiting} still waits: this epoch's packets \
                 go with the next mark"
            );
            return Ok(());
        }
        for p in &mut self.plugs {
            p.buffer().map_err(|source| HoldError::Net {
                iface: p.iface().to_string(),
                source,
            })?;
        }
        self.marked = Some(epoch);
        self.marks += 1;
        Ok(())
    }

    /// Whether a mark waits in the plugs.
    pub fn mark_waiting(&self) -> Option<u64> {
        self.marked
    }

    /// The run is over: remove the plugs, or (`keep`) leave closed ones closed in the
    /// kernel (a guest that outlives this process and whose output may not go out).
    pub fn finish(&mut self, keep: bool) {
        let keep = keep && !self.open;
        for p in self.plugs.drain(..) {
            p.finish(keep);
        }
    }

    /// Take the plugs away (for the next session, which closes them again).
    pub fn take_plugs(&mut self) -> Vec<Box<dyn PacketHold>> {
        std::mem::take(&mut self.plugs)
    }

    /// Whether the plugs were released for good (or there are none).
    pub fn plugs_open(&self) -> bool {
        self.open || self.plugs.is_empty()
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

    /// Checkpoint `epoch` is committed: release everything held up to it (the plugs'
    /// waiting mark too, if it is this checkpoint's or an earlier one's).
    pub fn ack(&mut self, epoch: u64) -> Result<(), HoldError> {
        self.release_while(|e| e <= epoch)?;
        if self.marked.is_some_and(|m| m <= epoch) {
            for p in &mut self.plugs {
                p.release_one().map_err(|source| HoldError::Net {
                    iface: p.iface().to_string(),
                    source,
                })?;
            }
            self.marked = None;
        }
        Ok(())
    }

    /// Release everything held, committed or not (the backup is gone and the policy is
    /// to continue unprotected), and open the plugs for good.
    pub fn release_all(&mut self) -> Result<(), HoldError> {
        self.release_while(|_| true)?;
        self.open_plugs()
    }

    /// Release the plugs' packets, committed or not, and hold none from now on (the
    /// backup will not take over); output records stay held.
    pub fn open_plugs(&mut self) -> Result<(), HoldError> {
        if !self.open && !self.plugs.is_empty() {
            for p in &mut self.plugs {
                p.release_indefinite().map_err(|source| HoldError::Net {
                    iface: p.iface().to_string(),
                    source,
                })?;
            }
            tracing::warn!("network buffers released: the guest's packets pass unheld");
        }
        self.marked = None;
        self.open = true;
        Ok(())
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

    /// A plug that logs what it is asked to do.
    #[derive(Debug)]
    struct LogPlug(std::sync::Arc<std::sync::Mutex<Vec<&'static str>>>);

    impl PacketHold for LogPlug {
        fn iface(&self) -> &str {
            "vif-log"
        }
        fn buffer(&mut self) -> Result<(), NetbufError> {
            self.0.lock().unwrap().push("buffer");
            Ok(())
        }
        fn release_one(&mut self) -> Result<(), NetbufError> {
            self.0.lock().unwrap().push("release_one");
            Ok(())
        }
        fn release_indefinite(&mut self) -> Result<(), NetbufError> {
            self.0.lock().unwrap().push("release_indefinite");
            Ok(())
        }
        fn finish(self: Box<Self>, keep: bool) {
            self.0
                .lock()
                .unwrap()
                .push(if keep { "keep" } else { "teardown" });
        }
    }

    fn logged() -> (
        HeldOutput,
        std::sync::Arc<std::sync::Mutex<Vec<&'static str>>>,
    ) {
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let h = HeldOutput::with_plugs(None, vec![Box::new(LogPlug(log.clone()))]);
        (h, log)
    }

    fn take(log: &std::sync::Mutex<Vec<&'static str>>) -> Vec<&'static str> {
        std::mem::take(&mut *log.lock().unwrap())
    }

    #[test]
    fn each_mark_is_released_by_its_own_ack_and_no_earlier() {
        let (mut h, log) = logged();
        h.mark(5).unwrap();
        assert_eq!(take(&log), ["buffer"]);
        h.ack(4).unwrap(); // an earlier (pre-copy) epoch's ack releases nothing
        assert_eq!(take(&log), Vec::<&str>::new());
        h.ack(5).unwrap();
        assert_eq!(take(&log), ["release_one"]);
        h.ack(5).unwrap(); // once only
        h.mark(6).unwrap();
        h.ack(6).unwrap();
        assert_eq!(take(&log), ["buffer", "release_one"]);
        assert_eq!((h.marks, h.folded), (2, 0));
    }

    #[test]
    fn a_checkpoint_taken_while_a_mark_waits_goes_with_the_next_mark() {
        let (mut h, log) = logged();
        h.mark(1).unwrap();
        h.mark(2).unwrap(); // the kernel would forget epoch 1's size: no second mark
        assert_eq!(take(&log), ["buffer"]);
        h.ack(1).unwrap();
        h.mark(3).unwrap(); // epochs 2 and 3 together
        h.ack(2).unwrap(); // not yet: the mark is checkpoint 3's
        assert_eq!(take(&log), ["release_one", "buffer"]);
        h.ack(3).unwrap();
        assert_eq!(take(&log), ["release_one"]);
        assert_eq!((h.marks, h.folded), (2, 1));
    }

    #[test]
    fn releasing_everything_opens_the_plugs_for_good() {
        let (mut h, log) = logged();
        h.mark(1).unwrap();
        h.release_all().unwrap();
        h.release_all().unwrap();
        h.mark(2).unwrap(); // unprotected: no more marks
        assert_eq!(take(&log), ["buffer", "release_indefinite"]);
        assert!(h.plugs_open());
        h.finish(true); // nothing is held: removed even when asked to keep
        assert_eq!(take(&log), ["teardown"]);
    }

    #[test]
    fn closed_plugs_are_kept_when_asked() {
        let (mut h, log) = logged();
        h.mark(1).unwrap();
        assert!(!h.plugs_open());
        h.finish(true);
        assert_eq!(take(&log), ["buffer", "keep"]);
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
