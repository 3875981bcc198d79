//! Log compaction (`cleanup.policy=compact`): keep the latest record of every key.
//!
//! A clean reads the non-active segments that are old enough (`min.compaction.lag.ms`) in two
//! passes **without holding the log**: the first maps each key (by a 128-bit hash) to its last
//! offset — bounded to `max_map_entries`, so memory is bounded; when a log has more distinct
//! keys the clean covers only the segments the map could take — and the second rewrites each
//! segment into `<base>.cleaned` keeping a record only if it is its key's latest, dropping
//! tombstones whose timestamp is older than `delete.retention.ms`. Offsets never change
//! (batches keep their base and last offsets; gaps are normal), keyless records and control
//! batches are kept, the active segment is never touched. Installing a cleaned segment takes
//! the log only for a rename: the old index files go first, then the cleaned file replaces the
//! `.log` atomically, and the index is rebuilt from the batch headers — a crash at any point
//! leaves either the old or the new segment, both complete. Leftover `.cleaned` files are
//! removed at open. Reading is paced by `log.cleaner.io.max.bytes.per.second`.

use std::collections::HashMap;
use std::fs::File;
use std::hash::{Hash, Hasher};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use strom_proto::batch::{validate_batch, BatchHeader, LOG_OVERHEAD};
use strom_proto::records::{filter_batch, record_slices, RecordSlice};

use crate::segment::{self, Segment};
use crate::{sync_dir, Log, LogError};

/// The largest batch the cleaner reads (a stored batch can never be larger than what was
/// accepted; this bounds a corrupt length field).
const MAX_BATCH: usize = 128 << 20;

#[derive(Debug, Clone)]
pub struct CleanConfig {
    /// `delete.retention.ms`: tombstones older than this are dropped.
    pub delete_retention_ms: i64,
    /// `min.compaction.lag.ms`: segments with newer records wait.
    pub min_compaction_lag_ms: i64,
    /// Keys the offset map may hold (`log.cleaner.dedupe.buffer.size` / entry size).
    pub max_map_entries: usize,
    pub max_decompressed_bytes: usize,
    /// `log.cleaner.io.max.bytes.per.second`: bytes read and written per second, at most.
    pub io_max_bytes_per_sec: f64,
}

/// Keeps the cleaner's I/O under a rate: after each batch, how long to pause.
#[derive(Debug)]
pub struct Throttle {
    rate: f64,
    started: std::time::Instant,
    bytes: f64,
}

impl Throttle {
    pub fn new(rate: f64) -> Self {
        Throttle {
            rate,
            started: std::time::Instant::now(),
            bytes: 0.0,
        }
    }

    /// The pause that brings `bytes` done in `elapsed` down to the rate.
    pub fn pause_for(rate: f64, bytes: f64, elapsed: std::time::Duration) -> std::time::Duration {
        if !(rate.is_finite() && rate > 0.0) {
            return std::time::Duration::ZERO;
        }
        let due = bytes / rate;
        std::time::Duration::from_secs_f64((due - elapsed.as_secs_f64()).max(0.0))
    }

    fn account(&mut self, bytes: u64) {
        self.bytes += bytes as f64;
        let pause = Self::pause_for(self.rate, self.bytes, self.started.elapsed());
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CleanStats {
    pub segments: usize,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub records_kept: u64,
    pub records_dropped: u64,
}

/// A segment to clean: its base offset and file, read outside the log's lock.
#[derive(Debug, Clone)]
pub struct CleanTarget {
    pub base_offset: i64,
    pub next_offset: i64,
    pub size: u64,
    pub max_timestamp: i64,
    pub path: PathBuf,
}

fn key_hash(key: &[u8]) -> u128 {
    let mut a = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut a);
    let mut b = std::collections::hash_map::DefaultHasher::new();
    (0xA5u8, key).hash(&mut b);
    ((a.finish() as u128) << 64) | b.finish() as u128
}

/// Calls `f` with every whole batch of a segment file, streaming.
fn for_each_batch(
    path: &Path,
    throttle: &mut Throttle,
    mut f: impl FnMut(&BatchHeader, &[u8]) -> Result<(), LogError>,
) -> Result<u64, LogError> {
    let mut r = BufReader::with_capacity(1 << 20, File::open(path)?);
    let mut buf = Vec::new();
    let mut read = 0u64;
    loop {
        let mut head = [0u8; LOG_OVERHEAD];
        match r.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(read),
            Err(e) => return Err(e.into()),
        }
        let len = i32::from_be_bytes([head[8], head[9], head[10], head[11]]);
        let total = len as usize + LOG_OVERHEAD;
        if len < 0 || total > MAX_BATCH {
            return Err(LogError::Corrupt(format!(
                "{}: batch length {len}",
                path.display()
            )));
        }
        buf.clear();
        buf.extend_from_slice(&head);
        buf.resize(total, 0);
        r.read_exact(&mut buf[LOG_OVERHEAD..])?;
        let h = validate_batch(&buf)?;
        f(&h, &buf)?;
        read += total as u64;
        throttle.account(total as u64);
    }
}

impl Log {
    /// The non-active segments whose newest record is at least `min_lag_ms` old, oldest first.
    pub fn clean_targets(&self, now_ms: i64, min_lag_ms: i64) -> Vec<CleanTarget> {
        let last = self.segments.len() - 1;
        self.segments[..last]
            .iter()
            .take_while(|s| s.max_timestamp <= now_ms.saturating_sub(min_lag_ms))
            .map(|s| CleanTarget {
                base_offset: s.base_offset,
                next_offset: s.next_offset,
                size: s.size,
                max_timestamp: s.max_timestamp,
                path: s.path("log"),
            })
            .collect()
    }

    /// Replaces segment `base_offset` with its cleaned file (crash-safe, see the module doc).
    /// Returns false (and removes the file) if the segment went meanwhile (retention).
    pub fn install_cleaned(&mut self, base_offset: i64, cleaned: &Path) -> Result<bool, LogError> {
        let last = self.segments.len() - 1;
        let Some(i) = self.segments[..last]
            .iter()
            .position(|s| s.base_offset == base_offset)
        else {
            let _ = std::fs::remove_file(cleaned);
            return Ok(false);
        };
        for ext in ["index", "timeindex"] {
            let _ = std::fs::remove_file(self.dir.join(segment::file_name(base_offset, ext)));
        }
        sync_dir(&self.dir);
        std::fs::rename(
            cleaned,
            self.dir.join(segment::file_name(base_offset, "log")),
        )?;
        sync_dir(&self.dir);
        let interval = self.config.index_interval_bytes;
        let seg = Segment::open_trusted(&self.dir, base_offset, interval, crate::now_ms())?;
        seg.write_index_files()?;
        self.segments[i] = seg;
        Ok(true)
    }
}

/// Removes `.cleaned` files a crash left behind.
pub(crate) fn remove_leftovers(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().ends_with(".cleaned") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Pass 1: each key's last offset over `targets` (a prefix of them when the map fills up).
/// Returns the map and how many targets it covers.
pub fn build_offset_map(
    targets: &[CleanTarget],
    cfg: &CleanConfig,
    throttle: &mut Throttle,
) -> Result<(HashMap<u128, i64>, usize), LogError> {
    let mut map: HashMap<u128, i64> = HashMap::new();
    for (i, t) in targets.iter().enumerate() {
        let mut segment_map: Vec<(u128, i64)> = Vec::new();
        for_each_batch(&t.path, throttle, |h, batch| {
            if h.is_control() {
                return Ok(());
            }
            let (data, slices) = record_slices(h, batch, cfg.max_decompressed_bytes)?;
            for r in &slices {
                if let Some(k) = &r.key {
                    segment_map.push((key_hash(&data[k.clone()]), r.offset));
                }
            }
            Ok(())
        })?;
        let new_keys = segment_map
            .iter()
            .filter(|(k, _)| !map.contains_key(k))
            .count();
        if i > 0 && map.len() + new_keys > cfg.max_map_entries {
            return Ok((map, i));
        }
        for (k, o) in segment_map {
            map.insert(k, o);
        }
    }
    Ok((map, targets.len()))
}

/// Pass 2 for one segment: writes `<base>.cleaned` beside it when anything can go.
pub fn clean_segment(
    target: &CleanTarget,
    map: &HashMap<u128, i64>,
    now_ms: i64,
    cfg: &CleanConfig,
    stats: &mut CleanStats,
    throttle: &mut Throttle,
) -> Result<Option<PathBuf>, LogError> {
    let out_path = target.path.with_extension("cleaned");
    let mut out = BufWriter::new(File::create(&out_path)?);
    let mut dropped_here = 0u64;
    let keep = |r: &RecordSlice, data: &[u8]| -> bool {
        let Some(k) = &r.key else { return true };
        let latest = map.get(&key_hash(&data[k.clone()])).copied();
        if latest.is_some_and(|l| l > r.offset) {
            return false;
        }
        !(r.value_is_null && r.timestamp < now_ms.saturating_sub(cfg.delete_retention_ms))
    };
    let read = for_each_batch(&target.path, throttle, |h, batch| {
        if h.is_control() {
            out.write_all(batch)?;
            stats.bytes_written += batch.len() as u64;
            return Ok(());
        }
        let (data, slices) = record_slices(h, batch, cfg.max_decompressed_bytes)?;
        let kept: Vec<&RecordSlice> = slices.iter().filter(|r| keep(r, &data)).collect();
        stats.records_kept += kept.len() as u64;
        let dropped = (slices.len() - kept.len()) as u64;
        stats.records_dropped += dropped;
        dropped_here += dropped;
        if kept.is_empty() {
            return Ok(());
        }
        if kept.len() == slices.len() {
            out.write_all(batch)?;
            stats.bytes_written += batch.len() as u64;
        } else {
            let b = filter_batch(batch, &data, &kept)?;
            out.write_all(&b)?;
            stats.bytes_written += b.len() as u64;
        }
        Ok(())
    });
    let read = match read {
        Ok(r) => r,
        Err(e) => {
            drop(out);
            let _ = std::fs::remove_file(&out_path);
            return Err(e);
        }
    };
    stats.bytes_read += read;
    let file = out.into_inner().map_err(|e| e.into_error())?;
    if dropped_here == 0 {
        drop(file);
        std::fs::remove_file(&out_path)?;
        return Ok(None);
    }
    file.sync_all()?;
    Ok(Some(out_path))
}

#[cfg(test)]
mod throttle_tests {
    use super::Throttle;
    use std::time::Duration;

    #[test]
    fn pauses_bring_io_down_to_the_rate() {
        // 10 MB done in 1 s at 5 MB/s: one more second.
        assert_eq!(
            Throttle::pause_for(5e6, 10e6, Duration::from_secs(1)),
            Duration::from_secs(1)
        );
        assert_eq!(
            Throttle::pause_for(5e6, 1e6, Duration::from_secs(1)),
            Duration::ZERO
        );
        assert_eq!(
            Throttle::pause_for(f64::MAX, 1e12, Duration::ZERO),
            Duration::ZERO
        );
        assert_eq!(
            Throttle::pause_for(f64::INFINITY, 1e12, Duration::ZERO),
            Duration::ZERO
        );
    }
}
