//! One segment: a `.log` file of whole batches, with a sparse offset index (relative offset ->
//! file position) and a time index (max timestamp so far -> relative offset) kept in memory and
//! written as `.index` / `.timeindex` when the segment rolls or the log closes. After an unclean
//! shutdown the active tail is rescanned and the indexes rebuilt, so the index files are never
//! trusted past what was fsynced with them.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use strom_proto::batch::{validate_batch, BatchHeader, BATCH_HEADER_LEN, LOG_OVERHEAD};

use crate::direct::{align_down, DirectFile, Stage};
use crate::LogError;

#[cfg(test)]
thread_local! {
    /// Makes this thread's staged writes fail after writing half their bytes.
    pub(crate) static FAIL_STAGED_WRITES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Bytes of a header needed to walk batches: base offset, length, epoch, magic, crc,
/// attributes, last offset delta, base timestamp, max timestamp.
const WALK_HEADER_LEN: usize = 43;
/// Largest batch recovery will read into memory; anything larger is corruption.
pub const MAX_RECOVERY_BATCH_BYTES: usize = 256 * 1024 * 1024;

pub fn file_name(base_offset: i64, ext: &str) -> String {
    format!("{base_offset:020}.{ext}")
}

/// The fields of a batch header that walking a segment needs.
#[derive(Debug, Clone, Copy)]
pub struct BatchPos {
    pub base_offset: i64,
    pub last_offset: i64,
    pub position: u64,
    pub total_len: u64,
    pub max_timestamp: i64,
}

pub struct Segment {
    pub base_offset: i64,
    dir: PathBuf,
    /// Shared so that reads sent straight from the file (`sendfile`) can outlive the lock.
    pub file: Arc<File>,
    /// Bumped before this file is cut (or its path may be reused): reads handed out as ranges
    /// of it (`Log::read_files`) must not send what is written at those positions next.
    pub truncations: Arc<AtomicU64>,
    pub size: u64,
    /// One past the last offset stored here (== base_offset when empty).
    pub next_offset: i64,
    pub index: Vec<(u32, u32)>,
    pub time_index: Vec<(i64, u32)>,
    bytes_since_index: u64,
    pub max_timestamp: i64,
    /// Base offset of the batch holding `max_timestamp`.
    pub max_timestamp_batch: i64,
    /// Wall-clock time of the first append (for `segment.ms`), or of opening.
    pub created_ms: i64,
    /// `next_offset` at the last fsync of this segment's file.
    pub flushed_next_offset: i64,
    /// Replicated appends go past the page cache through this (see `direct`); opened by the
    /// first one.
    pub(crate) direct: Option<DirectFile>,
    /// The file refused a direct write (or its opening): page cache writes only.
    pub(crate) direct_refused: bool,
    /// The file may run past `size` with the zeros that padded a direct write to a block.
    padded: bool,
}

impl Segment {
    pub fn create(dir: &Path, base_offset: i64, now_ms: i64) -> Result<Segment, LogError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join(file_name(base_offset, "log")))?;
        Ok(Segment::blank(dir, base_offset, file, 0, now_ms))
    }

    /// A segment with no batches tracked yet over `file` of `size` bytes.
    fn blank(dir: &Path, base_offset: i64, file: File, size: u64, now_ms: i64) -> Segment {
        Segment {
            base_offset,
            dir: dir.to_path_buf(),
            file: Arc::new(file),
            truncations: Arc::new(AtomicU64::new(0)),
            size,
            next_offset: base_offset,
            index: Vec::new(),
            time_index: Vec::new(),
            bytes_since_index: 0,
            max_timestamp: -1,
            max_timestamp_batch: base_offset,
            created_ms: now_ms,
            flushed_next_offset: base_offset,
            direct: None,
            direct_refused: false,
            padded: false,
        }
    }

    fn open_file(dir: &Path, base_offset: i64) -> Result<File, LogError> {
        Ok(OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join(file_name(base_offset, "log")))?)
    }

    /// Opens a segment whose index files are trustworthy (below the recovery point, or after a
    /// clean shutdown). Falls back to a header walk when an index file is missing or damaged.
    pub fn open_trusted(
        dir: &Path,
        base_offset: i64,
        index_interval_bytes: u32,
        now_ms: i64,
    ) -> Result<Segment, LogError> {
        let file = Self::open_file(dir, base_offset)?;
        let size = file.metadata()?.len();
        let mut seg = Segment::blank(dir, base_offset, file, size, now_ms);
        let loaded = seg.load_index_files(size);
        let walk_from = match loaded {
            Some(pos) => pos,
            None => {
                seg.index.clear();
                seg.time_index.clear();
                0
            }
        };
        // Walk the headers after the last index entry to find the end (and, without index
        // files, rebuild them). No CRC checks: this data was fsynced with its indexes.
        let mut pos = walk_from;
        let rebuild = loaded.is_none();
        while pos < size {
            let b = seg.batch_at(pos)?;
            let Some(b) = b else { break };
            if b.position + b.total_len > size {
                break;
            }
            if rebuild {
                seg.track(&b, index_interval_bytes);
            } else if b.max_timestamp > seg.max_timestamp {
                seg.max_timestamp = b.max_timestamp;
                seg.max_timestamp_batch = b.base_offset;
            }
            seg.next_offset = b.last_offset + 1;
            pos = b.position + b.total_len;
        }
        if pos != size {
            return Err(LogError::Corrupt(format!(
                "segment {} ends with a partial batch at {pos} of {size} after a clean shutdown",
                seg.path("log").display()
            )));
        }
        seg.flushed_next_offset = seg.next_offset;
        Ok(seg)
    }

    /// Recovery of a segment written after the last known fsync: every batch is checked
    /// (length, magic, CRC); the file is truncated after the last good one, and what it keeps
    /// is fsynced. Returns the segment and whether anything was truncated.
    pub fn recover(
        dir: &Path,
        base_offset: i64,
        index_interval_bytes: u32,
        now_ms: i64,
    ) -> Result<(Segment, bool), LogError> {
        let file = Self::open_file(dir, base_offset)?;
        let size = file.metadata()?.len();
        let mut seg = Segment::blank(dir, base_offset, file, 0, now_ms);
        let mut pos = 0u64;
        let mut buf = Vec::new();
        let mut reason = None;
        while pos < size {
            if size - pos < LOG_OVERHEAD as u64 {
                reason = Some("torn batch header".to_string());
                break;
            }
            let mut head = [0u8; LOG_OVERHEAD];
            seg.file.read_exact_at(&mut head, pos)?;
            let len = i32::from_be_bytes([head[8], head[9], head[10], head[11]]);
            let total = len as i64 + LOG_OVERHEAD as i64;
            if len < (BATCH_HEADER_LEN - LOG_OVERHEAD) as i32
                || total as usize > MAX_RECOVERY_BATCH_BYTES
            {
                reason = Some(format!("invalid batch length {len}"));
                break;
            }
            if pos + total as u64 > size {
                reason = Some("torn batch".to_string());
                break;
            }
            buf.resize(total as usize, 0);
            seg.file.read_exact_at(&mut buf, pos)?;
            let h = match validate_batch(&buf) {
                Ok(h) => h,
                Err(e) => {
                    reason = Some(e.to_string());
                    break;
                }
            };
            if h.base_offset < seg.next_offset {
                reason = Some(format!("offset {} goes backwards", h.base_offset));
                break;
            }
            let b = BatchPos {
                base_offset: h.base_offset,
                last_offset: h.last_offset(),
                position: pos,
                total_len: total as u64,
                max_timestamp: h.max_timestamp,
            };
            seg.track(&b, index_interval_bytes);
            seg.next_offset = b.last_offset + 1;
            pos += total as u64;
            seg.size = pos;
        }
        let truncated = pos < size;
        if truncated {
            tracing::warn!(
                segment = %seg.path("log").display(),
                valid_bytes = pos,
                dropped_bytes = size - pos,
                reason = reason.as_deref().unwrap_or(""),
                "truncating the unflushed tail of a segment after an unclean shutdown"
            );
            seg.file.set_len(pos)?;
            seg.file.sync_all()?;
        } else {
            // What recovery keeps counts as flushed from here on (a follower reports it
            // durable, a leader acknowledges past it): after a crash of the process alone it
            // may still be only in the page cache, never fsynced. It is now.
            seg.file.sync_data()?;
        }
        seg.flushed_next_offset = seg.next_offset;
        Ok((seg, truncated))
    }

    pub fn path(&self, ext: &str) -> PathBuf {
        self.dir.join(file_name(self.base_offset, ext))
    }

    /// Updates the in-memory indexes for a batch stored at `b.position`.
    pub fn track(&mut self, b: &BatchPos, index_interval_bytes: u32) {
        let rel = (b.base_offset - self.base_offset) as u32;
        if b.max_timestamp > self.max_timestamp {
            self.max_timestamp = b.max_timestamp;
            self.max_timestamp_batch = b.base_offset;
        }
        if self.bytes_since_index >= index_interval_bytes as u64 && b.position > 0 {
            self.index.push((rel, b.position as u32));
            if self
                .time_index
                .last()
                .is_none_or(|(ts, _)| self.max_timestamp > *ts)
            {
                self.time_index.push((
                    self.max_timestamp,
                    (self.max_timestamp_batch - self.base_offset) as u32,
                ));
            }
            self.bytes_since_index = 0;
        }
        self.bytes_since_index += b.total_len;
        self.size = self.size.max(b.position + b.total_len);
    }

    /// Reads the walkable part of the header of the batch at `pos`; `None` at a partial tail.
    pub fn batch_at(&self, pos: u64) -> Result<Option<BatchPos>, LogError> {
        if pos + WALK_HEADER_LEN as u64 > self.size {
            return Ok(None);
        }
        let mut h = [0u8; WALK_HEADER_LEN];
        match self.file.read_exact_at(&mut h, pos) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let base = i64::from_be_bytes(h[0..8].try_into().unwrap_or_default());
        let len = i32::from_be_bytes(h[8..12].try_into().unwrap_or_default());
        if len < (BATCH_HEADER_LEN - LOG_OVERHEAD) as i32 {
            return Err(LogError::Corrupt(format!(
                "batch length {len} at position {pos} in {}",
                self.path("log").display()
            )));
        }
        let delta = i32::from_be_bytes(h[23..27].try_into().unwrap_or_default());
        let max_ts = i64::from_be_bytes(h[35..43].try_into().unwrap_or_default());
        Ok(Some(BatchPos {
            base_offset: base,
            last_offset: base + delta as i64,
            position: pos,
            total_len: len as u64 + LOG_OVERHEAD as u64,
            max_timestamp: max_ts,
        }))
    }

    /// File position of the batch containing `offset` (or the first after it), by index lookup
    /// and a short header walk. `None` if the segment holds nothing at or after `offset`.
    pub fn find(&self, offset: i64) -> Result<Option<BatchPos>, LogError> {
        if offset >= self.next_offset {
            return Ok(None);
        }
        let rel = (offset - self.base_offset).max(0) as u32;
        let idx = self.index.partition_point(|(r, _)| *r <= rel);
        let mut pos = if idx == 0 {
            0
        } else {
            self.index[idx - 1].1 as u64
        };
        while pos < self.size {
            let Some(b) = self.batch_at(pos)? else {
                return Ok(None);
            };
            if b.last_offset >= offset {
                return Ok(Some(b));
            }
            pos += b.total_len;
        }
        Ok(None)
    }

    /// Position to start a timestamp search from: the batch holding the last time-index entry
    /// whose timestamp is below `ts` (every record before it is older than `ts`).
    pub fn time_search_start(&self, ts: i64) -> i64 {
        let idx = self.time_index.partition_point(|(t, _)| *t < ts);
        if idx == 0 {
            self.base_offset
        } else {
            self.base_offset + self.time_index[idx - 1].1 as i64
        }
    }

    /// Writes the batch `b`, the concatenation of `parts`, at the end of the file.
    pub fn append(
        &mut self,
        parts: &[&[u8]],
        b: &BatchPos,
        index_interval_bytes: u32,
    ) -> Result<(), LogError> {
        // After direct writes: no zeros left past the end, and their last block is stale.
        self.trim()?;
        if let Err(e) = write_all_vectored_at(&self.file, parts, self.size) {
            // Leave the file as it was; if even that fails the caller marks the log failed.
            self.file.set_len(self.size).map_err(|_| LogError::Failed)?;
            return Err(e.into());
        }
        self.track(b, index_interval_bytes);
        self.next_offset = b.last_offset + 1;
        Ok(())
    }

    /// Adds the batch `b` (the concatenation of `parts`) at the end of the segment, with its
    /// bytes staged in `stage` for one direct write of everything staged (`write_staged`)
    /// before the log's lock is released. `false` if this file takes no direct writes: the
    /// caller writes the batch with `append`.
    pub(crate) fn stage(
        &mut self,
        parts: &[&[u8]],
        b: &BatchPos,
        index_interval_bytes: u32,
        stage: &mut Stage,
    ) -> bool {
        if self.direct_refused {
            return false;
        }
        if self.direct.is_none() {
            match DirectFile::open(&self.path("log"), &self.file, self.size) {
                Ok(d) => self.direct = Some(d),
                Err(e) => {
                    tracing::debug!(segment = %self.path("log").display(), error = %e, "no direct writes to this file; writing through the page cache");
                    self.direct_refused = true;
                    return false;
                }
            }
        }
        if stage.is_empty() {
            let tail = self.direct.as_ref().map(|d| d.tail()).unwrap_or_default();
            stage.start(align_down(self.size), tail);
        }
        debug_assert_eq!(stage.end(), self.size);
        for p in parts {
            stage.push(p);
        }
        self.track(b, index_interval_bytes);
        self.next_offset = b.last_offset + 1;
        true
    }

    /// Writes what `stage` holds for this segment. A file that refuses the direct write gets
    /// the same bytes through the page cache; an error there leaves the segment's memory ahead
    /// of its file, for the caller to cut back (`cut_at`).
    pub(crate) fn write_staged(&mut self, stage: &mut Stage) -> std::io::Result<()> {
        if stage.is_empty() {
            return Ok(());
        }
        let end = stage.end();
        #[cfg(test)]
        if FAIL_STAGED_WRITES.with(|f| f.get()) {
            // As a disk that fills up: half the bytes land, then the write fails.
            stage.materialize();
            let half = &stage.bytes()[..stage.bytes().len() / 2];
            self.file.write_all_at(half, stage.file_pos)?;
            self.padded = true;
            stage.clear();
            return Err(std::io::Error::other("injected write failure"));
        }
        let direct = match self.direct.as_mut() {
            Some(d) => d.write(stage),
            None => Err(std::io::ErrorKind::Unsupported.into()),
        };
        let out = match direct {
            Ok(()) => {
                self.padded = !end.is_multiple_of(crate::direct::ALIGN);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(segment = %self.path("log").display(), error = %e, "a direct write failed; writing through the page cache");
                self.direct = None;
                self.direct_refused = true;
                // Part of the direct write, zeros included, may have reached the file.
                self.padded = true;
                stage.materialize();
                self.file.write_all_at(stage.bytes(), stage.file_pos)
            }
        };
        stage.clear();
        out
    }

    /// Whether the last write to the file was a direct one (its descriptor is open).
    pub(crate) fn writes_directly(&self) -> bool {
        self.direct.is_some()
    }

    /// Ends direct writes to the file (until the next one opens them again): closes their
    /// descriptor and cuts the zeros of the last one's block off the end of the file.
    pub fn trim(&mut self) -> Result<(), LogError> {
        self.direct = None;
        if self.padded {
            self.file.set_len(self.size)?;
            self.padded = false;
        }
        Ok(())
    }

    /// Writes `.index` and `.timeindex` from memory (with the segment's final max timestamp
    /// as the last time entry, as Kafka does on roll) and fsyncs them with the log file.
    pub fn write_index_files(&self) -> Result<(), LogError> {
        let mut idx = Vec::with_capacity(self.index.len() * 8);
        for (rel, pos) in &self.index {
            idx.extend_from_slice(&rel.to_be_bytes());
            idx.extend_from_slice(&pos.to_be_bytes());
        }
        let mut tidx = Vec::with_capacity(self.time_index.len() * 12 + 12);
        let mut entries = self.time_index.clone();
        if self.max_timestamp >= 0 && entries.last().is_none_or(|(t, _)| self.max_timestamp > *t) {
            entries.push((
                self.max_timestamp,
                (self.max_timestamp_batch - self.base_offset) as u32,
            ));
        }
        for (ts, rel) in &entries {
            tidx.extend_from_slice(&ts.to_be_bytes());
            tidx.extend_from_slice(&rel.to_be_bytes());
        }
        for (ext, bytes) in [("index", idx), ("timeindex", tidx)] {
            let mut f = File::create(self.path(ext))?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        self.file.sync_data().map_err(LogError::SyncFailed)?;
        Ok(())
    }

    /// Loads the index files; returns the position to walk from, or `None` if they are missing
    /// or inconsistent.
    fn load_index_files(&mut self, size: u64) -> Option<u64> {
        let idx = std::fs::read(self.path("index")).ok()?;
        let tidx = std::fs::read(self.path("timeindex")).ok()?;
        if idx.len() % 8 != 0 || tidx.len() % 12 != 0 {
            return None;
        }
        let mut index = Vec::with_capacity(idx.len() / 8);
        for c in idx.chunks_exact(8) {
            let rel = u32::from_be_bytes(c[0..4].try_into().ok()?);
            let pos = u32::from_be_bytes(c[4..8].try_into().ok()?);
            if pos as u64 >= size
                || index
                    .last()
                    .is_some_and(|(r, p): &(u32, u32)| *r >= rel || *p >= pos)
            {
                return None;
            }
            index.push((rel, pos));
        }
        let mut time_index = Vec::with_capacity(tidx.len() / 12);
        for c in tidx.chunks_exact(12) {
            let ts = i64::from_be_bytes(c[0..8].try_into().ok()?);
            let rel = u32::from_be_bytes(c[8..12].try_into().ok()?);
            time_index.push((ts, rel));
        }
        if let Some((ts, rel)) = time_index.last() {
            self.max_timestamp = *ts;
            self.max_timestamp_batch = self.base_offset + *rel as i64;
        }
        let walk_from = index.last().map(|(_, p)| *p as u64).unwrap_or(0);
        self.index = index;
        self.time_index = time_index;
        Some(walk_from)
    }

    /// Drops the batch containing `offset` and everything after it (replication truncation).
    pub fn truncate_to(&mut self, offset: i64, index_interval_bytes: u32) -> Result<(), LogError> {
        let Some(b) = self.find(offset)? else {
            return Ok(());
        };
        // As Kafka: the batch containing `offset` goes too (batches are never split).
        self.cut_at(b.position, index_interval_bytes)
    }

    /// Cuts the file at `position`, a batch boundary, and rebuilds the segment from the file.
    pub(crate) fn cut_at(
        &mut self,
        position: u64,
        index_interval_bytes: u32,
    ) -> Result<(), LogError> {
        self.truncations.fetch_add(1, Ordering::AcqRel);
        self.file.set_len(position)?;
        self.file.sync_all().map_err(LogError::SyncFailed)?;
        let (seg, _) = Segment::recover(
            &self.dir,
            self.base_offset,
            index_interval_bytes,
            self.created_ms,
        )?;
        let truncations = self.truncations.clone();
        *self = seg;
        self.truncations = truncations;
        Ok(())
    }

    pub fn read_range(&self, from: u64, to: u64) -> Result<Vec<u8>, LogError> {
        let mut buf = Vec::new();
        self.read_range_into(from, to, &mut buf)?;
        Ok(buf)
    }

    /// Appends the bytes `from..to` of the segment file to `out`, read straight into its spare
    /// capacity: no zeroed buffer first (for large reads the allocator zeroes by returning the
    /// pages to the kernel, which then faults every page back in) and no second copy.
    pub fn read_range_into(&self, from: u64, to: u64, out: &mut Vec<u8>) -> Result<(), LogError> {
        let len = to.saturating_sub(from) as usize;
        out.reserve(len);
        let start = out.len();
        let mut done = 0usize;
        while done < len {
            let spare = &mut out.spare_capacity_mut()[done..len];
            // SAFETY: pread writes at most `spare.len()` bytes into memory `out` owns and has
            // reserved; only the bytes it reports written become part of `out` below.
            let n = unsafe {
                libc::pread(
                    self.file.as_raw_fd(),
                    spare.as_mut_ptr().cast(),
                    spare.len(),
                    (from + done as u64) as libc::off_t,
                )
            };
            match n {
                0 => {
                    return Err(LogError::Io(std::io::Error::from(
                        std::io::ErrorKind::UnexpectedEof,
                    )))
                }
                n if n < 0 => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(LogError::Io(e));
                }
                n => {
                    done += n as usize;
                    // SAFETY: the first `done` bytes after `start` were written by pread.
                    unsafe { out.set_len(start + done) };
                }
            }
        }
        Ok(())
    }

    pub fn header_at(&self, pos: u64) -> Result<BatchHeader, LogError> {
        let mut h = [0u8; BATCH_HEADER_LEN];
        self.file.read_exact_at(&mut h, pos)?;
        Ok(BatchHeader::parse(&h)?)
    }

    pub fn delete_files(&self) {
        for ext in ["log", "index", "timeindex"] {
            let _ = std::fs::remove_file(self.path(ext));
        }
    }
}

/// `pwritev` of all of `parts` at `offset`, continuing after short writes (a file write is one
/// system call however many parts the batch is in, and no part is copied to join them).
pub(crate) fn write_all_vectored_at(
    file: &File,
    parts: &[&[u8]],
    mut offset: u64,
) -> std::io::Result<()> {
    // Skip what is written: (index of the first part not fully written, bytes of it written).
    let (mut first, mut done) = (0usize, 0usize);
    while first < parts.len() {
        if parts[first].len() == done {
            first += 1;
            done = 0;
            continue;
        }
        // A batch is one or two parts: a few iovecs on the stack, the rest in later calls.
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; 8];
        let mut count = 0;
        for (i, p) in parts[first..].iter().take(iov.len()).enumerate() {
            let p = if i == 0 { &p[done..] } else { p };
            iov[i] = libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            };
            count = i + 1;
        }
        // SAFETY: every iovec points into a borrowed slice that outlives the call, and the
        // kernel only reads through them; the descriptor is open for the borrow of `file`.
        let n = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                iov.as_ptr(),
                count as libc::c_int,
                offset as libc::off_t,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        offset += n as u64;
        let mut n = n as usize;
        while n > 0 && first < parts.len() {
            let left = parts[first].len() - done;
            if n >= left {
                n -= left;
                first += 1;
                done = 0;
            } else {
                done += n;
                n = 0;
            }
        }
    }
    Ok(())
}
