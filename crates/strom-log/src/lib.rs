//! One partition's log: an ordered list of segments, appends with validation, offset assignment
//! and idempotent-producer checks, reads of whole batches by offset, timestamp lookups, and
//! recovery after a crash. It knows nothing of the network or of other replicas; the broker
//! owns one `Log` per partition and calls it from one place at a time. For replication it keeps
//! the leader epoch cache (`epoch_cache`), takes a leader's batches as they are
//! (`append_replicated`), and truncates either end on a follower's behalf.

pub mod cleaner;
mod direct;
mod epoch_cache;
mod producer_state;
mod retention;
mod segment;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use strom_proto::batch::{self, BatchError, BatchHeader, BATCH_HEADER_LEN, LOG_OVERHEAD};
use strom_proto::compression::Compression;
use strom_proto::records::decode_records;

use epoch_cache::EpochCache;
pub use epoch_cache::{UNDEFINED_EPOCH, UNDEFINED_EPOCH_OFFSET};
pub use producer_state::{ProducerState, SequenceCheck};
use segment::{BatchPos, Segment};
pub use strom_proto::splice::FilePart;

const RECOVERY_POINT_FILE: &str = "recovery-point";
const PRODUCER_STATE_FILE: &str = "producer-state";
/// The log start offset when DeleteRecords moved it inside the first segment.
const LOG_START_FILE: &str = "log-start-offset";
/// Largest batch length field `append_replicated` accepts (Kafka bounds fetches far below).
const MAX_REPLICATED_BATCH_LENGTH: i32 = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestampType {
    CreateTime,
    LogAppendTime,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub segment_bytes: u64,
    pub segment_ms: i64,
    pub index_interval_bytes: u32,
    pub max_message_bytes: u32,
    pub timestamp_type: TimestampType,
    /// Bound on any decompression the log performs (timestamp lookups).
    pub max_decompressed_bytes: usize,
    /// `retention.ms`: whole segments whose newest record is older are deleted (-1: never).
    pub retention_ms: i64,
    /// `retention.bytes`: oldest segments are deleted while the log is larger (-1: no limit).
    pub retention_bytes: i64,
    /// `cleanup.policy` includes `delete` (retention applies).
    pub delete_retention: bool,
    /// `compression.type`: batches in another codec are recompressed on append (`None`:
    /// `producer`, stored as sent).
    pub compression: Option<Compression>,
    /// `message.timestamp.before.max.ms`: how far in the past a CreateTime batch may be.
    pub timestamp_before_max_ms: i64,
    /// `message.timestamp.after.max.ms`: how far in the future a CreateTime batch may be.
    pub timestamp_after_max_ms: i64,
    /// Replicated appends (a follower's) are written past the page cache (`O_DIRECT`, see
    /// `direct`); appends as leader always go through it.
    pub direct_replica_writes: bool,
    /// Only replicated appends of at least this many bytes go past the page cache (a write
    /// that follows direct ones stays direct down to a quarter of it); smaller ones are
    /// copied into it, where the fsync writes them with its own device round trip.
    pub direct_replica_min_bytes: usize,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: 1 << 30,
            segment_ms: 7 * 24 * 3600 * 1000,
            index_interval_bytes: 4096,
            max_message_bytes: 1_048_588,
            timestamp_type: TimestampType::CreateTime,
            max_decompressed_bytes: 64 << 20,
            retention_ms: 7 * 24 * 3600 * 1000,
            retention_bytes: -1,
            delete_retention: true,
            compression: None,
            timestamp_before_max_ms: i64::MAX,
            timestamp_after_max_ms: i64::MAX,
            direct_replica_writes: true,
            direct_replica_min_bytes: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendOutcome {
    pub base_offset: i64,
    pub last_offset: i64,
    /// -1 unless the topic uses LogAppendTime.
    pub log_append_time_ms: i64,
    /// A retried idempotent batch: these are its original offsets and nothing was written.
    pub duplicate: bool,
    /// The leader epoch the append was accepted in (a duplicate's too: the current one).
    pub leader_epoch: i32,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error("record batch of {size} bytes exceeds max.message.bytes {max}")]
    MessageTooLarge { size: usize, max: u32 },
    #[error("offset {offset} is outside the log ({start}..={end})")]
    OffsetOutOfRange { offset: i64, start: i64, end: i64 },
    #[error("out of order sequence for producer {producer_id}: expected {expected}, got {got}")]
    OutOfOrderSequence {
        producer_id: i64,
        expected: i32,
        got: i32,
    },
    #[error("producer {producer_id} epoch {got} is older than the current epoch {current}")]
    InvalidProducerEpoch {
        producer_id: i64,
        current: i16,
        got: i16,
    },
    #[error("batch timestamp {timestamp} is outside the allowed range {min}..={max}")]
    InvalidTimestamp { timestamp: i64, min: i64, max: i64 },
    #[error("log i/o: {0}")]
    Io(#[from] std::io::Error),
    /// An fsync of a segment's data failed. The kernel may have dropped the written pages, so
    /// no later fsync proves them durable: the caller must stop using the log (the broker stops
    /// the node, as the flusher does when its fsync fails).
    #[error("fsync of the log failed: {0}")]
    SyncFailed(std::io::Error),
    #[error("log is offline after an unrecoverable write error")]
    Failed,
    #[error("log is corrupt: {0}")]
    Corrupt(String),
    /// Refused by the log's owner, not the log: the replica stopped leading the partition
    /// before the append could take place.
    #[error("this replica no longer leads the partition")]
    NotLeader,
}

/// What `append_replicated` did with one fetch response's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicatedAppend {
    /// Whole batches written (batches the log already had are skipped, not counted).
    pub appended_batches: usize,
    /// Bytes of whole batches consumed, written or skipped; a partial trailing batch is not.
    pub bytes_consumed: usize,
    /// Base offset of the first batch written.
    pub first_offset: Option<i64>,
    /// Last offset of the last batch written.
    pub last_offset: Option<i64>,
    pub log_end_offset: i64,
}

/// Shared handles of the segment files an fsync must cover (no descriptor is duplicated per
/// fsync), and the offset it makes durable.
pub struct FlushTarget {
    pub files: Vec<std::sync::Arc<std::fs::File>>,
    pub end_offset: i64,
    /// The log's truncation count when the target was taken: a target that a truncation
    /// overtook proves nothing about what was written in the cut range since.
    cuts: u64,
}

impl FlushTarget {
    pub fn sync(&self) -> std::io::Result<()> {
        for f in &self.files {
            f.sync_data()?;
        }
        Ok(())
    }
}

/// What `Log::read_files` answers: the bytes, or where they are.
#[derive(Debug)]
pub enum ReadOut {
    Copied(Vec<u8>),
    Files(Vec<FilePart>),
}

impl ReadOut {
    pub fn len(&self) -> u64 {
        match self {
            ReadOut::Copied(b) => b.len() as u64,
            ReadOut::Files(f) => f.iter().map(|f| f.len).sum(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes, read from the files if need be.
    pub fn into_vec(self) -> Result<Vec<u8>, LogError> {
        match self {
            ReadOut::Copied(b) => Ok(b),
            ReadOut::Files(parts) => {
                let mut out = Vec::with_capacity(parts.iter().map(|p| p.len as usize).sum());
                for p in parts {
                    p.read_into(&mut out)?;
                }
                Ok(out)
            }
        }
    }
}

pub struct Log {
    dir: PathBuf,
    config: LogConfig,
    segments: Vec<Segment>,
    log_start_offset: i64,
    flushed_offset: i64,
    /// Truncations so far (see `FlushTarget`).
    cuts: u64,
    last_flush_ms: i64,
    producers: ProducerState,
    /// Leader epochs and the offsets they started at, mirrored in `leader-epoch-checkpoint`.
    epochs: EpochCache,
    failed: bool,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn segment_bases(dir: &Path) -> Result<Vec<i64>, LogError> {
    let mut bases = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name().to_string_lossy().to_string();
        if let Some(stem) = name.strip_suffix(".log") {
            if stem.len() == 20 {
                if let Ok(base) = stem.parse::<i64>() {
                    bases.push(base);
                }
            }
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

impl Log {
    pub fn open(dir: &Path, config: LogConfig, clean_shutdown: bool) -> Result<Log, LogError> {
        std::fs::create_dir_all(dir)?;
        cleaner::remove_leftovers(dir);
        let now = now_ms();
        let recovery_point: i64 = std::fs::read_to_string(dir.join(RECOVERY_POINT_FILE))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let bases = segment_bases(dir)?;
        let mut segments: Vec<Segment> = Vec::with_capacity(bases.len().max(1));
        let mut truncated_at: Option<usize> = None;
        // Base of the first segment whose contents were rescanned rather than trusted.
        let mut recovered_from: Option<i64> = None;
        for (i, &base) in bases.iter().enumerate() {
            let next_base = bases.get(i + 1).copied();
            // A segment is trusted if the shutdown was clean or it lies wholly below the point
            // up to which everything was fsynced together with the index files.
            let trusted = clean_shutdown || next_base.is_some_and(|n| n <= recovery_point);
            let seg = if trusted {
                match Segment::open_trusted(dir, base, config.index_interval_bytes, now) {
                    Ok(s) => s,
                    Err(LogError::Corrupt(why)) => {
                        tracing::warn!(%why, "segment inconsistent; recovering it");
                        recovered_from.get_or_insert(base);
                        Segment::recover(dir, base, config.index_interval_bytes, now)?.0
                    }
                    Err(e) => return Err(e),
                }
            } else {
                recovered_from.get_or_insert(base);
                let (s, truncated) = Segment::recover(dir, base, config.index_interval_bytes, now)?;
                if truncated && next_base.is_some() {
                    truncated_at = Some(i);
                }
                s
            };
            segments.push(seg);
            if truncated_at.is_some() {
                break;
            }
        }
        if let Some(i) = truncated_at {
            // Everything after a corrupt point is unreachable: offsets must stay contiguous.
            for &base in &bases[i + 1..] {
                tracing::warn!(base, "removing a segment that follows a truncated one");
                for ext in ["log", "index", "timeindex"] {
                    let _ = std::fs::remove_file(dir.join(segment::file_name(base, ext)));
                }
            }
        }
        if segments.is_empty() {
            segments.push(Segment::create(dir, 0, now)?);
        }
        let leo = segments.last().map(|s| s.next_offset).unwrap_or(0);
        let stored_start: i64 = std::fs::read_to_string(dir.join(LOG_START_FILE))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let log_start_offset = segments[0].base_offset.max(stored_start.min(leo));
        let mut log = Log {
            dir: dir.to_path_buf(),
            config,
            segments,
            log_start_offset,
            flushed_offset: leo,
            cuts: 0,
            last_flush_ms: now,
            producers: ProducerState::default(),
            epochs: EpochCache::default(),
            failed: false,
        };
        log.load_producer_state()?;
        log.load_epoch_cache(recovered_from)?;
        Ok(log)
    }

    /// The epoch cache = the checkpoint, cut to the recovered log, plus the epochs of batches
    /// recovery rescanned (from `recovered_from`). Without a usable checkpoint it is rebuilt
    /// from the batch headers of every segment. Written back if that changed anything.
    fn load_epoch_cache(&mut self, recovered_from: Option<i64>) -> Result<(), LogError> {
        let leo = self.log_end_offset();
        let mut changed = false;
        let walk_from = match EpochCache::read(&self.dir) {
            Ok(Some(cache)) => {
                self.epochs = cache;
                // Entries past a truncated (torn) tail describe data that is gone.
                changed |= self.epochs.truncate_from_end(leo);
                recovered_from
            }
            Ok(None) if self.segments.iter().all(|s| s.size == 0) => None,
            missing_or_bad => {
                if let Err(why) = missing_or_bad {
                    tracing::warn!(dir = %self.dir.display(), %why, "leader epoch checkpoint unusable; rebuilding it from the log");
                }
                self.epochs = EpochCache::default();
                changed = true;
                Some(self.segments[0].base_offset)
            }
        };
        if let Some(from) = walk_from {
            let mut epochs = std::mem::take(&mut self.epochs);
            self.walk_headers(from, |h| {
                changed |= epochs.assign_if_newer(h.partition_leader_epoch, h.base_offset);
            })?;
            self.epochs = epochs;
        }
        changed |= self.epochs.truncate_from_start(self.log_start_offset);
        if changed {
            self.epochs.write(&self.dir)?;
        }
        Ok(())
    }

    /// Calls `f` with the header of every batch from the one holding `from_offset` to the end
    /// of the log (headers only; records are not read).
    fn walk_headers(
        &self,
        from_offset: i64,
        mut f: impl FnMut(&BatchHeader),
    ) -> Result<(), LogError> {
        let Some((mut si, first)) = self.locate(from_offset)? else {
            return Ok(());
        };
        let mut pos = first.position;
        while let Some(seg) = self.segments.get(si) {
            while pos + BATCH_HEADER_LEN as u64 <= seg.size {
                let h = seg.header_at(pos)?;
                if h.batch_length < (BATCH_HEADER_LEN - LOG_OVERHEAD) as i32 {
                    return Err(LogError::Corrupt(format!(
                        "batch length {} at position {pos} of {}",
                        h.batch_length,
                        seg.path("log").display()
                    )));
                }
                f(&h);
                pos += h.total_len() as u64;
            }
            si += 1;
            pos = 0;
        }
        Ok(())
    }

    /// Producer state = the snapshot (if it is not ahead of the log) plus a replay of batch
    /// headers after it.
    fn load_producer_state(&mut self) -> Result<(), LogError> {
        let leo = self.log_end_offset();
        let (state, from) = match ProducerState::read_snapshot(&self.dir.join(PRODUCER_STATE_FILE))
        {
            Some((s, off)) if off <= leo && off >= self.log_start_offset => (s, off),
            _ => (ProducerState::default(), self.log_start_offset),
        };
        self.producers = state;
        let mut offset = from;
        while offset < leo {
            let Some((si, b)) = self.locate(offset)? else {
                break;
            };
            let h = self.segments[si].header_at(b.position)?;
            self.producers.update(&h);
            offset = b.last_offset + 1;
        }
        Ok(())
    }

    pub fn config(&self) -> &LogConfig {
        &self.config
    }
    pub fn set_config(&mut self, config: LogConfig) {
        self.config = config;
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn log_start_offset(&self) -> i64 {
        self.log_start_offset
    }
    pub fn log_end_offset(&self) -> i64 {
        self.segments.last().map(|s| s.next_offset).unwrap_or(0)
    }
    pub fn size_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.size).sum()
    }
    pub fn flushed_offset(&self) -> i64 {
        self.flushed_offset
    }
    pub fn unflushed_messages(&self) -> u64 {
        (self.log_end_offset() - self.flushed_offset).max(0) as u64
    }
    pub fn last_flush_ms(&self) -> i64 {
        self.last_flush_ms
    }
    pub fn producer_state(&self) -> &ProducerState {
        &self.producers
    }

    /// The newest leader epoch that wrote to this log.
    pub fn latest_epoch(&self) -> Option<i32> {
        self.epochs.latest_epoch()
    }

    /// The leader epoch cache: `(epoch, start_offset)`, both strictly increasing.
    pub fn epoch_entries(&self) -> Vec<(i32, i64)> {
        self.epochs.entries().to_vec()
    }

    /// OffsetsForLeaderEpoch for this log (Kafka's `LeaderEpochFileCache.endOffsetFor`):
    /// `(largest known epoch <= requested_epoch, offset where the next epoch starts)`, the log
    /// end offset for the latest epoch, `(-1, -1)` when nothing fits.
    pub fn end_offset_for_epoch(&self, requested_epoch: i32) -> (i32, i64) {
        self.epochs
            .end_offset_for(requested_epoch, self.log_end_offset())
    }

    /// A replica became leader in `epoch`: the epoch starts at the current log end (Kafka
    /// records it on election, not at the first append, so that OffsetForLeaderEpoch answers a
    /// follower of an older epoch with where that epoch ends here even before anything new
    /// is written).
    pub fn start_leader_epoch(&mut self, epoch: i32) -> Result<(), LogError> {
        let leo = self.log_end_offset();
        self.assign_epoch(epoch, leo)
    }

    /// Records that `epoch` starts at `start_offset` if it is newer than every cached epoch,
    /// durably, before the batch that starts it is written. Undone in memory if the checkpoint
    /// cannot be written.
    fn assign_epoch(&mut self, epoch: i32, start_offset: i64) -> Result<(), LogError> {
        if epoch < 0 || self.epochs.latest_epoch().is_some_and(|l| epoch <= l) {
            return Ok(());
        }
        let before = self.epochs.clone();
        if self.epochs.assign_if_newer(epoch, start_offset) {
            if let Err(e) = self.epochs.write(&self.dir) {
                self.epochs = before;
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Persists a cache change that follows a change of the log itself (truncation, start
    /// moving). A failure here leaves a checkpoint with extra entries, which the next open
    /// cuts back to the log, so the change stays in memory either way.
    fn persist_epochs_if(&self, changed: bool) -> Result<(), LogError> {
        if changed {
            self.epochs.write(&self.dir)?;
        }
        Ok(())
    }

    fn active(&mut self) -> &mut Segment {
        // `open` guarantees at least one segment.
        let last = self.segments.len() - 1;
        &mut self.segments[last]
    }

    /// Appends one produce request's records for this partition: exactly one v2 batch (as
    /// Kafka requires of Produce v3+), validated before anything is written. The batch is not
    /// modified: what the log assigns (base offset, leader epoch, log-append time and CRC)
    /// goes into a copy of its 61-byte header, written ahead of the rest in one vectored
    /// write, so a batch received into a shared request buffer is stored without a copy.
    pub fn append(
        &mut self,
        records: &[u8],
        leader_epoch: i32,
        now_ms: i64,
    ) -> Result<AppendOutcome, LogError> {
        if self.failed {
            return Err(LogError::Failed);
        }
        let header = batch::validate_produced_batch(records)?;
        let converted;
        let records: &[u8] = match self.config.compression {
            Some(to)
                if !header.is_control()
                    && header.compression().map_err(BatchError::from)? != to =>
            {
                converted =
                    batch::recompress_batch(records, to, self.config.max_decompressed_bytes)?;
                &converted
            }
            _ => records,
        };
        if self.config.timestamp_type == TimestampType::CreateTime && !header.is_control() {
            // The batch's first and largest timestamps stand for its records (the header is
            // all the broker reads of a batch).
            let min = now_ms.saturating_sub(self.config.timestamp_before_max_ms);
            let max = now_ms.saturating_add(self.config.timestamp_after_max_ms);
            for ts in [header.base_timestamp, header.max_timestamp] {
                if ts < min || ts > max {
                    return Err(LogError::InvalidTimestamp {
                        timestamp: ts,
                        min,
                        max,
                    });
                }
            }
        }
        if records.len() > self.config.max_message_bytes as usize {
            return Err(LogError::MessageTooLarge {
                size: records.len(),
                max: self.config.max_message_bytes,
            });
        }
        match self.producers.check(&header) {
            SequenceCheck::Accept => {}
            SequenceCheck::Duplicate(m) => {
                return Ok(AppendOutcome {
                    base_offset: m.first_offset,
                    last_offset: m.last_offset,
                    log_append_time_ms: -1,
                    duplicate: true,
                    leader_epoch,
                })
            }
            SequenceCheck::OutOfOrder { expected, got } => {
                return Err(LogError::OutOfOrderSequence {
                    producer_id: header.producer_id,
                    expected,
                    got,
                })
            }
            SequenceCheck::StaleEpoch { current, got } => {
                return Err(LogError::InvalidProducerEpoch {
                    producer_id: header.producer_id,
                    current,
                    got,
                })
            }
        }
        let base = self.log_end_offset();
        // Validated above: at least a whole header.
        let (head, rest) = records.split_at(batch::BATCH_HEADER_LEN);
        let mut head: [u8; batch::BATCH_HEADER_LEN] =
            head.try_into().map_err(|_| BatchError::Truncated)?;
        batch::set_base_offset(&mut head, base);
        batch::set_partition_leader_epoch(&mut head, leader_epoch);
        let log_append_time_ms = if self.config.timestamp_type == TimestampType::LogAppendTime {
            batch::set_log_append_time_split(&mut head, rest, now_ms);
            now_ms
        } else {
            -1
        };
        let h = BatchHeader::parse(&head)?;
        self.maybe_roll(records.len() as u64, base, h.last_offset(), now_ms, None)?;
        // A new leader's first batch (control batches too) starts its epoch.
        self.assign_epoch(leader_epoch, base)?;
        self.write_batch(&[&head, rest], &h, now_ms, None)?;
        debug_assert_eq!(self.log_end_offset(), h.last_offset() + 1);
        Ok(AppendOutcome {
            base_offset: base,
            last_offset: h.last_offset(),
            log_append_time_ms,
            duplicate: false,
            leader_epoch,
        })
    }

    /// Writes one validated batch (offsets already final) to the active segment and its
    /// indexes, and records it in the producer state. A write that cannot be undone takes the
    /// log offline for writes.
    /// The batch is the concatenation of `parts`.
    /// With a `stage` the batch is staged for a direct write (see `Segment::stage`) where the
    /// file takes one.
    fn write_batch(
        &mut self,
        parts: &[&[u8]],
        h: &BatchHeader,
        now_ms: i64,
        stage: Option<&mut direct::Stage>,
    ) -> Result<(), LogError> {
        let interval = self.config.index_interval_bytes;
        let seg = self.active();
        let pos = BatchPos {
            base_offset: h.base_offset,
            last_offset: h.last_offset(),
            position: seg.size,
            total_len: parts.iter().map(|p| p.len() as u64).sum(),
            max_timestamp: h.max_timestamp,
        };
        if seg.size == 0 {
            seg.created_ms = now_ms;
        }
        let staged = stage.is_some_and(|st| seg.stage(parts, &pos, interval, st));
        match if staged {
            Ok(())
        } else {
            seg.append(parts, &pos, interval)
        } {
            Ok(()) => {}
            Err(LogError::Failed) => {
                tracing::error!(dir = %self.dir.display(), "write failed and the segment could not be restored; log is offline for writes");
                self.failed = true;
                return Err(LogError::Failed);
            }
            Err(e) => return Err(e),
        }
        self.producers.update(h);
        Ok(())
    }

    /// Rolls the active segment if a batch of `incoming` bytes holding `base_offset..=
    /// last_offset` may not go into it. The new segment starts at `base_offset` (which is past
    /// the log end only for a follower whose leader's log has gaps after compaction).
    /// What `stage` holds for the active segment is written before it rolls.
    fn maybe_roll(
        &mut self,
        incoming: u64,
        base_offset: i64,
        last_offset: i64,
        now_ms: i64,
        stage: Option<&mut direct::Stage>,
    ) -> Result<(), LogError> {
        let seg_bytes = self.config.segment_bytes;
        let seg_ms = self.config.segment_ms;
        let active = self.active();
        let full = active.size > 0 && active.size + incoming > seg_bytes;
        let old = active.size > 0 && now_ms.saturating_sub(active.created_ms) >= seg_ms;
        // Positions are u32 in the index: never let a segment pass 4 GiB.
        let too_big = active.size + incoming > u32::MAX as u64;
        // Offsets are relative to the segment base in the indexes (Kafka keeps them in an i32).
        let offsets_overflow = last_offset.saturating_sub(active.base_offset) > i32::MAX as i64;
        if offsets_overflow && active.size == 0 {
            // Nothing in it yet: the empty segment moves up to where the data starts.
            let empty = self.segments.pop();
            if let Some(s) = empty {
                s.delete_files();
            }
            let seg = Segment::create(&self.dir, base_offset, now_ms)?;
            self.segments.push(seg);
            crate::sync_dir(&self.dir);
            if self.segments.len() == 1 {
                // What a reopen would make of it: the log starts at its first segment.
                self.log_start_offset = self.log_start_offset.max(base_offset);
            }
            return Ok(());
        }
        if !(full || old || too_big || offsets_overflow) {
            return Ok(());
        }
        let new_base = base_offset.max(active.next_offset);
        if let Some(stage) = stage {
            self.write_staged(stage)?;
        }
        let active = self.active();
        // The finished segment becomes immutable: fsync it with its index files, then move the
        // recovery point past it so an unclean restart never rescans it.
        active.trim()?;
        active.write_index_files()?;
        active.flushed_next_offset = active.next_offset;
        let seg = Segment::create(&self.dir, new_base, now_ms)?;
        self.segments.push(seg);
        crate::sync_dir(&self.dir);
        self.write_recovery_point(new_base)?;
        self.flushed_offset = self.flushed_offset.max(new_base);
        self.producers
            .write_snapshot(&self.dir.join(PRODUCER_STATE_FILE), new_base)?;
        Ok(())
    }

    fn write_recovery_point(&self, offset: i64) -> Result<(), LogError> {
        let path = self.dir.join(RECOVERY_POINT_FILE);
        let tmp = self.dir.join("recovery-point.tmp");
        std::fs::write(&tmp, offset.to_string())?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    /// The segment and batch holding `offset` (or the first batch after it).
    fn locate(&self, offset: i64) -> Result<Option<(usize, BatchPos)>, LogError> {
        let start = self
            .segments
            .partition_point(|s| s.base_offset <= offset)
            .saturating_sub(1);
        for (i, seg) in self.segments.iter().enumerate().skip(start) {
            if let Some(b) = seg.find(offset)? {
                return Ok(Some((i, b)));
            }
        }
        Ok(None)
    }

    /// Whole batches from the one holding `offset`, below `upper_bound`, within `max_bytes`
    /// (but at least one batch when `min_one_batch`, KIP-74).
    pub fn read(
        &self,
        offset: i64,
        max_bytes: usize,
        upper_bound: i64,
        min_one_batch: bool,
    ) -> Result<Vec<u8>, LogError> {
        let ranges = self.read_ranges(offset, max_bytes, upper_bound, min_one_batch)?;
        self.copy_ranges(&ranges)
    }

    /// `read`, answered with where the bytes are instead of the bytes when they are at least
    /// `copy_below` long: ranges of the segment files, to be sent from the page cache without
    /// a copy through user space. Valid until a truncation (see [`FilePart::unchanged`]).
    pub fn read_files(
        &self,
        offset: i64,
        max_bytes: usize,
        upper_bound: i64,
        min_one_batch: bool,
        copy_below: u64,
    ) -> Result<ReadOut, LogError> {
        let ranges = self.read_ranges(offset, max_bytes, upper_bound, min_one_batch)?;
        let total: u64 = ranges.iter().map(|(_, from, to)| to - from).sum();
        if total < copy_below {
            return self.copy_ranges(&ranges).map(ReadOut::Copied);
        }
        Ok(ReadOut::Files(
            ranges
                .into_iter()
                .map(|(si, from, to)| {
                    let seg = &self.segments[si];
                    FilePart {
                        file: seg.file.clone(),
                        offset: from,
                        len: to - from,
                        generation: seg.truncations.clone(),
                        expected: seg.truncations.load(Ordering::Acquire),
                    }
                })
                .collect(),
        ))
    }

    fn copy_ranges(&self, ranges: &[(usize, u64, u64)]) -> Result<Vec<u8>, LogError> {
        let total: u64 = ranges.iter().map(|(_, from, to)| to - from).sum();
        let mut out = Vec::with_capacity(total as usize);
        for &(si, from, to) in ranges {
            self.segments[si].read_range_into(from, to, &mut out)?;
        }
        Ok(out)
    }

    /// The byte ranges (segment index, from, to) that `read` returns.
    fn read_ranges(
        &self,
        offset: i64,
        max_bytes: usize,
        upper_bound: i64,
        min_one_batch: bool,
    ) -> Result<Vec<(usize, u64, u64)>, LogError> {
        let leo = self.log_end_offset();
        if offset < self.log_start_offset || offset > leo {
            return Err(LogError::OffsetOutOfRange {
                offset,
                start: self.log_start_offset,
                end: leo,
            });
        }
        let mut ranges = Vec::new();
        let Some((mut si, first)) = self.locate(offset)? else {
            return Ok(ranges);
        };
        let mut total = 0u64;
        let mut pos = first.position;
        loop {
            let seg = &self.segments[si];
            let start = pos;
            let mut end = pos;
            if seg.next_offset <= upper_bound && total + (seg.size - start) <= max_bytes as u64 {
                // The rest of the segment is wanted and fits: no need to read each batch's
                // header to find where to stop (the common case at the log's tail, where
                // followers and caught-up consumers read).
                end = seg.size;
            }
            while end < seg.size {
                let Some(b) = seg.batch_at(end)? else { break };
                if b.base_offset >= upper_bound {
                    break;
                }
                let so_far = total + (end - start);
                if so_far + b.total_len > max_bytes as u64 && !(so_far == 0 && min_one_batch) {
                    break;
                }
                end += b.total_len;
            }
            if end > start {
                ranges.push((si, start, end));
                total += end - start;
            }
            let exhausted = end >= seg.size;
            if !exhausted || si + 1 >= self.segments.len() {
                break;
            }
            si += 1;
            pos = 0;
        }
        Ok(ranges)
    }

    /// First offset whose record timestamp is >= `ts_ms`, with that timestamp.
    pub fn offset_for_timestamp(&self, ts_ms: i64) -> Result<Option<(i64, i64)>, LogError> {
        for seg in &self.segments {
            if seg.max_timestamp < ts_ms {
                continue;
            }
            let mut offset = seg.time_search_start(ts_ms);
            while offset < seg.next_offset {
                let Some(b) = seg.find(offset)? else { break };
                if b.max_timestamp >= ts_ms {
                    let batch = seg.read_range(b.position, b.position + b.total_len)?;
                    let h = BatchHeader::parse(&batch)?;
                    for r in decode_records(&h, &batch, self.config.max_decompressed_bytes)? {
                        if r.timestamp >= ts_ms && r.offset >= self.log_start_offset {
                            return Ok(Some((r.offset, r.timestamp)));
                        }
                    }
                }
                offset = b.last_offset + 1;
            }
        }
        Ok(None)
    }

    /// (max timestamp, offset of the first record carrying it), KIP-734.
    pub fn max_timestamp_and_offset(&self) -> Result<Option<(i64, i64)>, LogError> {
        let Some(seg) = self
            .segments
            .iter()
            .filter(|s| s.next_offset > s.base_offset)
            .max_by_key(|s| s.max_timestamp)
        else {
            return Ok(None);
        };
        let Some(b) = seg.find(seg.max_timestamp_batch)? else {
            return Ok(None);
        };
        let batch = seg.read_range(b.position, b.position + b.total_len)?;
        let h = BatchHeader::parse(&batch)?;
        let records = decode_records(&h, &batch, self.config.max_decompressed_bytes)?;
        Ok(records
            .iter()
            .find(|r| r.timestamp == seg.max_timestamp)
            .map(|r| (r.timestamp, r.offset)))
    }

    pub fn flush_target(&self) -> Result<Option<FlushTarget>, LogError> {
        let end = self.log_end_offset();
        if self.flushed_offset >= end {
            return Ok(None);
        }
        let mut files = Vec::new();
        for s in self
            .segments
            .iter()
            .filter(|s| s.flushed_next_offset < s.next_offset)
        {
            files.push(s.file.clone());
        }
        Ok(Some(FlushTarget {
            files,
            end_offset: end,
            cuts: self.cuts,
        }))
    }

    /// The fsync of `target` succeeded: everything below its end is durable, unless the log
    /// was truncated since the target was taken (then the range past the cut may hold data
    /// written after the fsync began, and nothing is marked). Returns whether it marked.
    pub fn mark_flushed(&mut self, target: &FlushTarget) -> bool {
        if target.cuts != self.cuts {
            return false;
        }
        let end_offset = target.end_offset;
        for s in self.segments.iter_mut() {
            if s.next_offset <= end_offset {
                s.flushed_next_offset = s.next_offset;
            } else if s.base_offset < end_offset {
                s.flushed_next_offset = s.flushed_next_offset.max(end_offset);
            }
        }
        self.flushed_offset = self.flushed_offset.max(end_offset);
        self.last_flush_ms = now_ms();
        true
    }

    /// Clean close: fsync data and index files, write the producer snapshot and recovery point.
    pub fn close(mut self) -> Result<(), LogError> {
        let leo = self.log_end_offset();
        self.active().trim()?;
        self.active().write_index_files()?;
        self.producers
            .write_snapshot(&self.dir.join(PRODUCER_STATE_FILE), leo)?;
        self.write_recovery_point(leo)?;
        sync_dir(&self.dir);
        Ok(())
    }

    pub fn delete(self) -> Result<(), LogError> {
        std::fs::remove_dir_all(&self.dir)?;
        Ok(())
    }

    /// Drops every batch at or after `offset` (for replication); producer state is rebuilt and
    /// leader epochs starting at or after the new end are forgotten.
    pub fn truncate_to(&mut self, offset: i64) -> Result<(), LogError> {
        if offset >= self.log_end_offset() {
            // No data goes, but an epoch that starts here wrote nothing (a leader elected at
            // this end that never appended): a follower's truncation must forget it too, or
            // its next OffsetForLeaderEpoch round would ask about that epoch again.
            let changed = self.epochs.truncate_from_end(offset);
            return self.persist_epochs_if(changed);
        }
        let offset = offset.max(self.log_start_offset);
        while self.segments.len() > 1
            && self
                .segments
                .last()
                .is_some_and(|s| s.base_offset >= offset)
        {
            if let Some(s) = self.segments.pop() {
                // Unlinked, so reads of it stay valid; unless the unlink fails and a new
                // segment reuses the path.
                s.truncations.fetch_add(1, Ordering::AcqRel);
                s.delete_files();
            }
        }
        let interval = self.config.index_interval_bytes;
        self.active().truncate_to(offset, interval)?;
        self.after_truncation()
    }

    /// What follows a cut of the active segment: the flushed offset and recovery point, the
    /// producer state and the epochs past the new end.
    fn after_truncation(&mut self) -> Result<(), LogError> {
        self.cuts += 1;
        let leo = self.log_end_offset();
        self.flushed_offset = self.flushed_offset.min(leo);
        let rp = self.flushed_offset.min(self.active().base_offset);
        self.write_recovery_point(rp)?;
        let _ = std::fs::remove_file(self.dir.join(PRODUCER_STATE_FILE));
        // After the data: a crash in between leaves entries past the end, which open drops.
        let changed = self.epochs.truncate_from_end(leo);
        self.load_producer_state()?;
        self.persist_epochs_if(changed)
    }

    /// Follower append (Kafka's `appendAsFollower`): `data` is what the leader's Fetch returned
    /// for this partition, whole v2 batches possibly followed by a partial one. Batches are
    /// stored byte for byte with the leader's offsets and epochs. Batches the log already has
    /// are skipped; one that overlaps the log end is refused, while a gap before a batch is
    /// legal (the leader's log may be compacted). Producer state follows without sequence
    /// checks, and a batch of a newer epoch starts a leader epoch cache entry. Nothing is
    /// fsynced here: durability comes with the normal flush path. On an error the batches
    /// before the bad one stay appended.
    ///
    /// With `direct_replica_writes` the batches of a large enough call are written past the
    /// page cache, all of them in one write per segment.
    pub fn append_replicated(&mut self, data: &[u8]) -> Result<ReplicatedAppend, LogError> {
        self.append_replicated_from(data, None)
    }

    /// `append_replicated` of a shared buffer: batches placed at an address congruent to their
    /// file position modulo the block size are written from it directly, without being copied
    /// into the staging buffer (see the `direct` module).
    pub fn append_replicated_shared(
        &mut self,
        data: &bytes::Bytes,
    ) -> Result<ReplicatedAppend, LogError> {
        self.append_replicated_from(data, Some(data))
    }

    /// Where the next replicated batch would start in the active segment's file (its size),
    /// for placing a fetch answer so that its records need no copy (`append_replicated_shared`).
    pub fn append_position(&self) -> u64 {
        self.segments.last().map_or(0, |s| s.size)
    }

    fn append_replicated_from(
        &mut self,
        data: &[u8],
        src: Option<&bytes::Bytes>,
    ) -> Result<ReplicatedAppend, LogError> {
        if self.failed {
            return Err(LogError::Failed);
        }
        let min = self.config.direct_replica_min_bytes;
        let direct = self.config.direct_replica_writes
            && (data.len() >= min
                || (self.segments.last().is_some_and(|s| s.writes_directly())
                    && data.len() >= min / 4));
        if !direct {
            return self.append_replicated_with(data, None);
        }
        direct::with_stage(|stage| {
            if let Some(src) = src {
                stage.set_source(src.clone());
            }
            let out = self.append_replicated_with(data, Some(&mut *stage));
            // Also after an error: the batches before the bad one are in the indexes.
            self.write_staged(stage)?;
            out
        })
    }

    /// Writes what `stage` holds for the active segment. On a write error the staged batches
    /// (already counted in the segment's indexes) go again, as a truncation would take them;
    /// only when that fails too is the log offline for writes.
    fn write_staged(&mut self, stage: &mut direct::Stage) -> Result<(), LogError> {
        let from = stage.new_from;
        let Err(e) = self.active().write_staged(stage) else {
            return Ok(());
        };
        tracing::error!(dir = %self.dir.display(), error = %e, "writing replicated data failed");
        let interval = self.config.index_interval_bytes;
        let undone = self
            .active()
            .cut_at(from, interval)
            .and_then(|()| self.after_truncation());
        if let Err(u) = undone {
            tracing::error!(dir = %self.dir.display(), error = %u, "replicated data that could not be written cannot be cut off either; log is offline for writes");
            self.failed = true;
            return Err(LogError::Failed);
        }
        Err(e.into())
    }

    fn append_replicated_with(
        &mut self,
        data: &[u8],
        mut stage: Option<&mut direct::Stage>,
    ) -> Result<ReplicatedAppend, LogError> {
        let mut out = ReplicatedAppend {
            appended_batches: 0,
            bytes_consumed: 0,
            first_offset: None,
            last_offset: None,
            log_end_offset: self.log_end_offset(),
        };
        let now = now_ms();
        while data.len() - out.bytes_consumed >= LOG_OVERHEAD {
            let rest = &data[out.bytes_consumed..];
            let length = i32::from_be_bytes([rest[8], rest[9], rest[10], rest[11]]);
            if !((BATCH_HEADER_LEN - LOG_OVERHEAD) as i32..=MAX_REPLICATED_BATCH_LENGTH)
                .contains(&length)
            {
                return Err(LogError::Corrupt(format!(
                    "replicated batch at byte {} has length {length}",
                    out.bytes_consumed
                )));
            }
            let total_len = length as usize + LOG_OVERHEAD;
            if rest.len() < total_len {
                break; // the fetch cut the last batch
            }
            let batch = &rest[..total_len];
            let h = batch::validate_batch(batch)?;
            let Some(last_offset) = h.base_offset.checked_add(h.last_offset_delta as i64) else {
                return Err(LogError::Corrupt(format!(
                    "replicated batch offsets overflow: base {} delta {}",
                    h.base_offset, h.last_offset_delta
                )));
            };
            let leo = self.log_end_offset();
            if last_offset < leo {
                // Already here (the fetch started inside a batch we have).
                out.bytes_consumed += total_len;
                continue;
            }
            if h.base_offset < leo {
                return Err(LogError::Corrupt(format!(
                    "replicated batch {}..={last_offset} overlaps the log end {leo}",
                    h.base_offset
                )));
            }
            self.maybe_roll(
                total_len as u64,
                h.base_offset,
                last_offset,
                now,
                stage.as_deref_mut(),
            )?;
            self.assign_epoch(h.partition_leader_epoch, h.base_offset)?;
            self.write_batch(&[batch], &h, now, stage.as_deref_mut())?;
            out.appended_batches += 1;
            out.bytes_consumed += total_len;
            out.first_offset.get_or_insert(h.base_offset);
            out.last_offset = Some(last_offset);
            out.log_end_offset = self.log_end_offset();
        }
        Ok(out)
    }

    /// Kafka's `truncateFullyAndStartAt`: a follower that fell below its leader's log start
    /// drops everything and continues, empty, from `offset` (log start = log end = `offset`),
    /// with no producer state and no leader epochs.
    pub fn truncate_fully_and_start_at(&mut self, offset: i64) -> Result<(), LogError> {
        if offset < 0 {
            return Err(LogError::OffsetOutOfRange {
                offset,
                start: self.log_start_offset,
                end: self.log_end_offset(),
            });
        }
        self.cuts += 1;
        // The epochs go first: an old epoch surviving a crash here would claim the new log.
        let changed = self.epochs.clear();
        self.persist_epochs_if(changed)?;
        for seg in &self.segments {
            // Unlinked, not cut, but a new segment may reuse a path whose unlink failed:
            // senders of earlier reads stop either way.
            seg.truncations.fetch_add(1, Ordering::AcqRel);
            seg.delete_files();
        }
        sync_dir(&self.dir);
        let now = now_ms();
        match Segment::create(&self.dir, offset, now) {
            Ok(seg) => self.segments = vec![seg],
            Err(e) => {
                // The old segments stay readable through their open files until a restart.
                tracing::error!(dir = %self.dir.display(), error = %e, "could not create a segment after deleting the log; log is offline for writes");
                self.failed = true;
                return Err(e);
            }
        }
        sync_dir(&self.dir);
        self.write_recovery_point(offset)?;
        retention::write_log_start(&self.dir, offset)?;
        self.log_start_offset = offset;
        self.flushed_offset = offset;
        self.last_flush_ms = now;
        self.producers = ProducerState::default();
        self.producers
            .write_snapshot(&self.dir.join(PRODUCER_STATE_FILE), offset)?;
        Ok(())
    }
}

pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Replaces `dir/name` with `bytes` atomically and durably: a temporary file, fsynced, renamed
/// over the old one, then the directory fsynced. A crash leaves the old file or the new one.
pub fn replace_file(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir);
    Ok(())
}

#[cfg(test)]
mod tests;
