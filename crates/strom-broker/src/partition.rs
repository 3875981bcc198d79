//! One partition as the broker sees it: the log (its single owner, behind a mutex held only for
//! an append or a read), the replica offsets (log end offset, high watermark, leader epoch), the
//! group commit that makes appends durable, and the notification that wakes long-poll fetches.
//!
//! Durability: with `flush.messages` = 1 (Strom's default) the high watermark is the flushed
//! offset, so a consumer never sees a record that a crash could take back, and an acks>=1
//! produce is answered only once its records are fsynced. Concurrent producers share one fsync:
//! whoever holds `flush_lock` syncs everything appended so far.

use std::sync::atomic::{AtomicI32, AtomicI64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use strom_log::{AppendOutcome, Log, LogConfig, LogError};
use tokio::sync::Notify;

pub struct Partition {
    pub topic: String,
    pub topic_id: [u8; 16],
    pub index: i32,
    /// `None` once the partition was closed or deleted; later calls fail cleanly.
    log: Mutex<Option<Log>>,
    high_watermark: AtomicI64,
    log_end_offset: AtomicI64,
    log_start_offset: AtomicI64,
    flushed_offset: AtomicI64,
    leader_epoch: AtomicI32,
    /// 1 = durable mode (fsync before ack); larger = lazy flushing.
    flush_messages: AtomicI64,
    flush_ms: AtomicI64,
    flush_lock: tokio::sync::Mutex<()>,
    /// Woken whenever the high watermark moves.
    pub hw_advanced: Notify,
}

impl Partition {
    pub fn new(
        topic: String,
        topic_id: [u8; 16],
        index: i32,
        log: Log,
        leader_epoch: i32,
        flush_messages: i64,
        flush_ms: i64,
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
            flushed_offset: AtomicI64::new(flushed),
            leader_epoch: AtomicI32::new(leader_epoch),
            flush_messages: AtomicI64::new(flush_messages.max(1)),
            flush_ms: AtomicI64::new(flush_ms),
            flush_lock: tokio::sync::Mutex::new(()),
            hw_advanced: Notify::new(),
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
    /// lazy mode. A flush error is returned to every waiter of that flush.
    pub async fn wait_durable(self: &Arc<Self>, end_offset: i64) -> Result<(), LogError> {
        if !self.is_durable_mode() {
            return Ok(());
        }
        self.flush_to(end_offset).await
    }

    async fn flush_to(self: &Arc<Self>, end_offset: i64) -> Result<(), LogError> {
        if self.flushed_offset.load(Ordering::Acquire) >= end_offset {
            return Ok(());
        }
        let _guard = self.flush_lock.lock().await;
        if self.flushed_offset.load(Ordering::Acquire) >= end_offset {
            return Ok(());
        }
        self.flush_now().await
    }

    /// Fsyncs everything appended so far (caller holds `flush_lock`).
    async fn flush_now(self: &Arc<Self>) -> Result<(), LogError> {
        let target = self.with_log(|log| log.flush_target())?;
        let Some(target) = target else {
            return Ok(());
        };
        let end = target.end_offset;
        let target = tokio::task::spawn_blocking(move || target.sync().map(|_| ()))
            .await
            .map_err(|e| LogError::Io(std::io::Error::other(e.to_string())))?;
        target?;
        self.with_log(|log| {
            log.mark_flushed(end);
            Ok(())
        })?;
        self.flushed_offset.fetch_max(end, Ordering::AcqRel);
        if self.is_durable_mode() {
            self.advance_hw(end.min(self.log_end_offset()));
        }
        Ok(())
    }

    /// Flushes in the background (acks=0 in durable mode, lazy mode thresholds).
    pub fn spawn_flush(self: &Arc<Self>) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let end = me.log_end_offset();
            if let Err(e) = me.flush_to(end).await {
                tracing::error!(topic = %me.topic, partition = me.index, error = %e, "background flush failed");
            }
        });
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

    /// Takes the log out to close or delete it; every later call on this partition fails with
    /// a storage error, which requests still holding the partition report to their client.
    pub fn take_log(&self) -> Option<Log> {
        self.log.lock().take()
    }
}
