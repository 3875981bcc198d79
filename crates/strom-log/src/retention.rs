//! Retention: whole segments leave the log when they are older than `retention.ms` (by their
//! newest record's timestamp), when the log is larger than `retention.bytes`, or when
//! DeleteRecords moved the log start offset past them. The active segment always stays, so
//! offsets keep growing from where they were. Readers below the log start offset get
//! OFFSET_OUT_OF_RANGE. A moved log start also cuts the leader epoch cache from the start.

use std::path::Path;

use crate::{sync_dir, Log, LogError, LOG_START_FILE};

impl Log {
    /// Deletes the segments retention allows; returns how many went.
    pub fn apply_retention(&mut self, now_ms: i64) -> Result<usize, LogError> {
        let cfg = self.config.clone();
        let total: u64 = self.segments.iter().map(|s| s.size).sum();
        let mut excess = if cfg.delete_retention && cfg.retention_bytes >= 0 {
            total as i64 - cfg.retention_bytes
        } else {
            0
        };
        let mut doomed = 0;
        // Only a prefix goes, and never the active segment.
        for seg in &self.segments[..self.segments.len() - 1] {
            let below_start = seg.next_offset <= self.log_start_offset;
            let expired = cfg.delete_retention
                && cfg.retention_ms >= 0
                && seg.max_timestamp >= 0
                && seg.max_timestamp < now_ms - cfg.retention_ms;
            let oversize = excess > 0 && excess - seg.size as i64 >= 0;
            if !(below_start || expired || oversize) {
                break;
            }
            excess -= seg.size as i64;
            doomed += 1;
        }
        if doomed == 0 {
            return Ok(0);
        }
        let gone: Vec<_> = self.segments.drain(..doomed).collect();
        let new_start = self.segments[0].base_offset;
        tracing::info!(
            dir = %self.dir.display(),
            segments = gone.len(),
            log_start_offset = new_start.max(self.log_start_offset),
            "retention deleted segments"
        );
        for seg in &gone {
            seg.delete_files();
        }
        sync_dir(&self.dir);
        if new_start > self.log_start_offset {
            self.log_start_offset = new_start;
        }
        let changed = self.epochs.truncate_from_start(self.log_start_offset);
        self.persist_epochs_if(changed)?;
        Ok(gone.len())
    }

    /// DeleteRecords: every record below `offset` becomes unreachable (whole segments below it
    /// are deleted at once). `offset` must not pass `upper_bound` (the high watermark).
    pub fn delete_records_before(
        &mut self,
        offset: i64,
        upper_bound: i64,
    ) -> Result<i64, LogError> {
        if offset < 0 || offset > upper_bound.min(self.log_end_offset()) {
            return Err(LogError::OffsetOutOfRange {
                offset,
                start: self.log_start_offset,
                end: upper_bound,
            });
        }
        if offset > self.log_start_offset {
            write_log_start(&self.dir, offset)?;
            self.log_start_offset = offset;
            let changed = self.epochs.truncate_from_start(offset);
            self.persist_epochs_if(changed)?;
            let config = self.config.clone();
            // Whole segments below the new start go now; time and size limits wait for the
            // next retention check.
            self.config.retention_ms = -1;
            self.config.retention_bytes = -1;
            let r = self.apply_retention(0);
            self.config = config;
            r?;
        }
        Ok(self.log_start_offset)
    }
}

pub(crate) fn write_log_start(dir: &Path, offset: i64) -> Result<(), LogError> {
    crate::replace_file(dir, LOG_START_FILE, offset.to_string().as_bytes())?;
    Ok(())
}
