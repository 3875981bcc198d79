//! One partition as the broker sees it: the log (its single owner, behind a mutex held only for
//! an append or a read), the replica offsets (log end offset, high watermark, leader epoch), the
//! group commit that makes appends durable, and the notification that wakes long-poll fetches.
//!
//! Durability: with `flush.messages` = 1 (Strom's default) the high watermark is the flushed
//! offset, so a consumer never sees a record that a crash could take back, and an acks>=1
//! produce is answered only once its records are fsynced. Concurrent producers, on all
//! partitions, share each fsync through the broker's `Flusher`.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use strom_log::cleaner::CleanTarget;
use strom_log::{AppendOutcome, FlushTarget, Log, LogConfig, LogError};
use tokio::sync::{watch, Notify};

use crate::flusher::Flusher;

pub struct Partition {
    pub topic: String,
    pub topic_id: [u8; 16],
    pub index: i32,
    /// `None` once the partition was closed or deleted; later calls fail cleanly.
    log: Mutex<Option<Log>>,
    high_watermark: AtomicI64,
    log_end_offset: AtomicI64,
    log_start_offset: AtomicI64,
    leader_epoch: AtomicI32,
    /// 1 = durable mode (fsync before ack); larger = lazy flushing.
    flush_messages: AtomicI64,
    flush_ms: AtomicI64,
    /// (flushed offset, failed rounds): waiters watch it.
    flush_state: watch::Sender<(i64, u64)>,
    flush_queued: AtomicBool,
    flusher: Arc<Flusher>,
    /// Woken whenever the high watermark moves.
    pub hw_advanced: Notify,
    /// Segments below this offset were compacted since the broker started (dirty-ratio base).
    pub cleaned_through: AtomicI64,
}

impl Partition {
    pub fn new(
        topic: String,
        topic_id: [u8; 16],
        index: i32,
        log: Log,
        leader_epoch: i32,
        (flush_messages, flush_ms): (i64, i64),
        flusher: Arc<Flusher>,
    ) -> Self {
        let leo = log.log_end_offset();
        let flushed = log.flushed_offset().min(leo);
        let lazy = flush_messages > 1;
        Partition {
            topic,
            topic_id,
            index,
            high_watermark: AtomicI64::new(if lazy { leo } else { flushed }),
            log_end_offset: AtomicI64::new(leo),
            log_start_offset: AtomicI64::new(log.log_start_offset()),
            leader_epoch: AtomicI32::new(leader_epoch),
            flush_messages: AtomicI64::new(flush_messages.max(1)),
            flush_ms: AtomicI64::new(flush_ms),
            flush_state: watch::channel((flushed, 0)).0,
            flush_queued: AtomicBool::new(false),
            flusher,
            hw_advanced: Notify::new(),
            cleaned_through: AtomicI64::new(0),
            log: Mutex::new(Some(log)),
        }
    }

    pub fn high_watermark(&self) -> i64 {
        self.high_watermark.load(Ordering::Acquire)
    }
    pub fn log_end_offset(&self) -> i64 {
        self.log_end_offset.load(Ordering::Acquire)
    }
    pub fn log_start_offset(&self) -> i64 {
        self.log_start_offset.load(Ordering::Acquire)
    }
    pub fn leader_epoch(&self) -> i32 {
        self.leader_epoch.load(Ordering::Acquire)
    }
    pub fn is_durable_mode(&self) -> bool {
        self.flush_messages.load(Ordering::Relaxed) <= 1
    }

    pub fn set_flush_policy(&self, flush_messages: i64, flush_ms: i64) {
        self.flush_messages
            .store(flush_messages.max(1), Ordering::Relaxed);
        self.flush_ms.store(flush_ms, Ordering::Relaxed);
    }

    pub fn set_log_config(&self, config: LogConfig) {
        let _ = self.with_log(|log| {
            log.set_config(config);
            Ok(())
        });
    }

    fn with_log<T>(&self, f: impl FnOnce(&mut Log) -> Result<T, LogError>) -> Result<T, LogError> {
        match self.log.lock().as_mut() {
            Some(log) => f(log),
            None => Err(LogError::Failed),
        }
    }

    fn advance_hw(&self, to: i64) {
        let prev = self.high_watermark.fetch_max(to, Ordering::AcqRel);
        // Invariant: the high watermark never passes the log end offset.
        debug_assert!(to <= self.log_end_offset());
        if to > prev {
            self.hw_advanced.notify_waiters();
        }
    }

    /// Appends one produce request's records. Durability is awaited separately
    /// (`wait_durable`), so that the append itself happens in request order.
    pub fn append(
        self: &Arc<Self>,
        records: &mut [u8],
        now_ms: i64,
    ) -> Result<AppendOutcome, LogError> {
        let epoch = self.leader_epoch();
        let (outcome, leo, unflushed) = self.with_log(|log| {
            let outcome = log.append(records, epoch, now_ms)?;
            Ok((outcome, log.log_end_offset(), log.unflushed_messages()))
        })?;
        self.log_end_offset.fetch_max(leo, Ordering::AcqRel);
        if !self.is_durable_mode() {
            self.advance_hw(leo);
            if unflushed as i64 >= self.flush_messages.load(Ordering::Relaxed) {
                self.spawn_flush();
            }
        }
        Ok(outcome)
    }

    /// Resolves once every offset below `end_offset` is on disk (durable mode), or at once in
    /// lazy mode. A failed fsync fails every waiter of that round.
    pub async fn wait_durable(self: &Arc<Self>, end_offset: i64) -> Result<(), LogError> {
        if !self.is_durable_mode() {
            return Ok(());
        }
        let mut rx = self.flush_state.subscribe();
        let failures_before = rx.borrow().1;
        if rx.borrow().0 >= end_offset {
            return Ok(());
        }
        self.spawn_flush();
        loop {
            let (flushed, failures) = *rx.borrow_and_update();
            if flushed >= end_offset {
                return Ok(());
            }
            if failures != failures_before {
                return Err(LogError::Io(std::io::Error::other("fsync failed")));
            }
            if rx.changed().await.is_err() {
                return Err(LogError::Failed);
            }
        }
    }

    /// Queues this partition for the flusher's next round (at most once at a time).
    pub fn spawn_flush(self: &Arc<Self>) {
        if !self.flush_queued.swap(true, Ordering::AcqRel) {
            self.flusher.enqueue(self.clone());
        }
    }

    pub(crate) fn clear_queued(&self) {
        self.flush_queued.store(false, Ordering::Release);
    }

    pub(crate) fn flush_target(&self) -> Result<Option<FlushTarget>, LogError> {
        self.with_log(|log| log.flush_target())
    }

    /// The flusher made everything below `end` durable (`None`: nothing was dirty).
    pub(crate) fn flush_done(&self, end: Option<i64>) {
        let Some(end) = end else {
            self.flush_state.send_modify(|_| {});
            return;
        };
        let _ = self.with_log(|log| {
            log.mark_flushed(end);
            Ok(())
        });
        self.flush_state.send_modify(|s| s.0 = s.0.max(end));
        if self.is_durable_mode() {
            self.advance_hw(end.min(self.log_end_offset()));
        }
    }

    pub(crate) fn flush_failed(&self) {
        self.flush_state.send_modify(|s| s.1 += 1);
    }

    /// Lazy mode: flush when `flush.ms` has passed since the last flush. Called by a ticker.
    pub fn flush_if_due(self: &Arc<Self>, now_ms: i64) {
        if self.is_durable_mode() {
            return;
        }
        let Ok((unflushed, last)) =
            self.with_log(|log| Ok((log.unflushed_messages(), log.last_flush_ms())))
        else {
            return;
        };
        let flush_ms = self.flush_ms.load(Ordering::Relaxed);
        if unflushed > 0 && now_ms.saturating_sub(last) >= flush_ms {
            self.spawn_flush();
        }
    }

    /// Reads whole batches for a fetch: nothing at or above the high watermark.
    pub fn read(
        &self,
        offset: i64,
        max_bytes: usize,
        min_one_batch: bool,
    ) -> Result<Vec<u8>, LogError> {
        let hw = self.high_watermark();
        self.with_log(|log| log.read(offset, max_bytes, hw, min_one_batch))
    }

    pub fn offset_for_timestamp(&self, ts_ms: i64) -> Result<Option<(i64, i64)>, LogError> {
        self.with_log(|log| log.offset_for_timestamp(ts_ms))
    }

    pub fn max_timestamp_and_offset(&self) -> Result<Option<(i64, i64)>, LogError> {
        self.with_log(|log| log.max_timestamp_and_offset())
    }

    /// Deletes the segments retention allows (a background check).
    pub fn apply_retention(&self, now_ms: i64) -> Result<usize, LogError> {
        let (n, start) = self.with_log(|log| {
            let n = log.apply_retention(now_ms)?;
            Ok((n, log.log_start_offset()))
        })?;
        self.log_start_offset.fetch_max(start, Ordering::AcqRel);
        Ok(n)
    }

    /// Segments the cleaner may compact: not the active one, fully below the high watermark,
    /// newest record at least `min_lag_ms` old.
    pub fn clean_targets(
        &self,
        now_ms: i64,
        min_lag_ms: i64,
    ) -> Result<Vec<CleanTarget>, LogError> {
        let hw = self.high_watermark();
        let mut t = self.with_log(|log| Ok(log.clean_targets(now_ms, min_lag_ms)))?;
        t.retain(|s| s.next_offset <= hw);
        Ok(t)
    }

    /// Swaps in a cleaned segment (a short critical section: renames and an index walk).
    pub fn install_cleaned(
        &self,
        base_offset: i64,
        path: &std::path::Path,
    ) -> Result<bool, LogError> {
        self.with_log(|log| log.install_cleaned(base_offset, path))
    }

    /// DeleteRecords: records below `offset` (-1: the high watermark) become unreachable.
    /// Returns the new log start offset.
    pub fn delete_records(&self, offset: i64) -> Result<i64, LogError> {
        let hw = self.high_watermark();
        let offset = if offset == -1 { hw } else { offset };
        let start = self.with_log(|log| log.delete_records_before(offset, hw))?;
        self.log_start_offset.fetch_max(start, Ordering::AcqRel);
        Ok(start)
    }

    /// Takes the log out to close or delete it; every later call on this partition fails with
    /// a storage error, which requests still holding the partition report to their client.
    pub fn take_log(&self) -> Option<Log> {
        self.log.lock().take()
    }
}
