//! Writes past the page cache (`O_DIRECT`) for a follower's replicated data.
//!
//! A follower writes what it replicates and, as long as it follows, reads it back only when it
//! has to (a consumer fetching from it, a truncation): keeping those bytes in the page cache
//! costs a copy into freshly allocated cache pages on every write and pushes out data a leader
//! serves. A direct write goes from the broker's memory to the device instead.
//!
//! Direct writes must start and end on a block boundary, while batches end anywhere. So the
//! segment keeps the bytes of its last, partial block in memory; a write rewrites that block
//! with the new batches after it and zeros up to the next boundary. The file then runs past the
//! segment's size with zeros, which the next write overwrites; a segment that rolls or closes
//! is cut back to its size, and recovery after a crash drops the zeros as it drops any torn
//! tail (a batch length of zero is invalid).
//!
//! The batches of one fetch response are staged in one aligned buffer per thread and written
//! with one system call. A file that refuses direct writes (a file system without
//! `O_DIRECT`) is written through the page cache as before.
//!
//! When the batches come in a shared buffer (`Stage::set_source`, the fetch answer the follower
//! received) placed so that their address is congruent to their file position modulo the block
//! size (the replica fetcher arranges that when it reads the answer), they are not copied: the
//! write gathers the first block (the tail and the batches' first bytes, copied), the whole
//! blocks straight from the answer, and the last partial block (copied, padded with zeros).

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use bytes::Bytes;

/// Alignment of file positions, lengths and memory for direct writes: a common page size and
/// a multiple of every usual logical block size.
pub(crate) const ALIGN: u64 = 4096;

/// A staging buffer larger than this is freed after use rather than kept for the next write.
const RETAIN_BYTES: usize = 8 << 20;

pub(crate) fn align_down(pos: u64) -> u64 {
    pos & !(ALIGN - 1)
}

/// The descriptor a segment's direct writes go through, and the bytes of the segment's last
/// partial block (from the block's start to the segment's size).
pub(crate) struct DirectFile {
    file: File,
    tail: Vec<u8>,
}

impl DirectFile {
    /// Opens `path` for direct writes; `buffered` (the same file) gives the partial last block
    /// of a segment of `size` bytes.
    pub(crate) fn open(path: &Path, buffered: &File, size: u64) -> std::io::Result<DirectFile> {
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)?;
        let start = align_down(size);
        let mut tail = vec![0u8; (size - start) as usize];
        buffered.read_exact_at(&mut tail, start)?;
        Ok(DirectFile { file, tail })
    }

    /// Writes `stage` (aligned at its file position) with zeros up to the next block boundary.
    /// On success the new partial last block is kept for the next write.
    pub(crate) fn write(&mut self, stage: &mut Stage) -> std::io::Result<()> {
        let pos = stage.file_pos;
        let len = stage.len;
        let end = pos + len as u64;
        let tail_from = (align_down(end) - pos) as usize;
        // A short write leaves the rest at an unaligned position, which the device refuses:
        // an error, and the segment falls back to page cache writes.
        if let Some(parts) = stage.gathered() {
            crate::segment::write_all_vectored_at(&self.file, &parts, pos)?;
        } else {
            stage.materialize();
            self.file.write_all_at(stage.padded(), pos)?;
        }
        self.tail.clear();
        match &stage.run {
            // The run covers the last block: the gathered write copied nothing of it but its
            // first and last blocks.
            Some((src, run)) => {
                let from = run.end - (len - tail_from);
                self.tail.extend_from_slice(&src[from..run.end]);
            }
            None => self.tail.extend_from_slice(&stage.bytes()[tail_from..]),
        }
        Ok(())
    }

    pub(crate) fn tail(&self) -> &[u8] {
        &self.tail
    }
}

/// Bytes waiting for one direct write: they start at `file_pos`, a block boundary, and sit at
/// an aligned address in `mem`.
pub(crate) struct Stage {
    mem: Vec<u8>,
    off: usize,
    /// Bytes staged, `run` included.
    len: usize,
    pub(crate) file_pos: u64,
    /// File position of the first new byte (after the tail the file already has).
    pub(crate) new_from: u64,
    /// The shared buffer the pushed bytes may come from (`set_source`).
    src: Option<Bytes>,
    /// The staged bytes after the tail, when they are one range of `src` at an address
    /// congruent to their file position: not copied into `mem`, which holds the tail only.
    run: Option<(Bytes, Range<usize>)>,
}

impl Stage {
    const fn new() -> Stage {
        Stage {
            mem: Vec::new(),
            off: 0,
            len: 0,
            file_pos: 0,
            new_from: 0,
            src: None,
            run: None,
        }
    }

    /// Bytes pushed from within `src` (until the stage is given back) may be written from it
    /// without a copy.
    pub(crate) fn set_source(&mut self, src: Bytes) {
        self.src = Some(src);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// File position one past the staged bytes.
    pub(crate) fn end(&self) -> u64 {
        self.file_pos + self.len as u64
    }

    /// Starts staging at `file_pos` (a block boundary) with `tail`, the bytes the file already
    /// has from there.
    pub(crate) fn start(&mut self, file_pos: u64, tail: &[u8]) {
        debug_assert_eq!(file_pos % ALIGN, 0);
        self.file_pos = file_pos;
        self.new_from = file_pos + tail.len() as u64;
        self.len = 0;
        self.push(tail);
    }

    pub(crate) fn push(&mut self, bytes: &[u8]) {
        if self.borrow(bytes) {
            return;
        }
        self.materialize();
        self.copy_in(bytes);
    }

    /// Stages `bytes` as (part of) the run, if they lie in the source and can: the first bytes
    /// after the tail, at an address congruent to their file position, or the bytes right
    /// after the run in the same source.
    fn borrow(&mut self, bytes: &[u8]) -> bool {
        let Some(src) = &self.src else {
            return false;
        };
        let base = src.as_ptr() as usize;
        let at = (bytes.as_ptr() as usize).wrapping_sub(base);
        if bytes.is_empty() || at > src.len() || src.len() - at < bytes.len() {
            return false;
        }
        let tail_len = (self.new_from - self.file_pos) as usize;
        match &mut self.run {
            Some((run_src, run)) => {
                if run.end != at || run_src.as_ptr() != src.as_ptr() || run_src.len() != src.len() {
                    return false;
                }
                run.end = at + bytes.len();
            }
            None => {
                let congruent = (base + at) % ALIGN as usize == tail_len % ALIGN as usize;
                if self.len != tail_len || !congruent {
                    return false;
                }
                self.run = Some((src.clone(), at..at + bytes.len()));
            }
        }
        self.len += bytes.len();
        true
    }

    /// Copies the run into `mem` after the tail: the stage then holds all its bytes.
    pub(crate) fn materialize(&mut self) {
        if let Some((src, run)) = self.run.take() {
            self.len -= run.len();
            self.copy_in(&src[run]);
        }
    }

    /// The iovecs of one direct write of a run that spans at least two blocks: the first block
    /// (the tail, then the run's first bytes, copied into `mem`), the run's whole blocks in
    /// place, and its last partial block (copied, padded with zeros; empty if none). `None`
    /// when there is no such run: then the stage is written from `mem` (`materialize`).
    fn gathered(&mut self) -> Option<[&[u8]; 3]> {
        let align = ALIGN as usize;
        let tail_len = (self.new_from - self.file_pos) as usize;
        let (src, run) = self.run.clone()?;
        let run_bytes = &src[run];
        if self.len < 2 * align || run_bytes.as_ptr() as usize % align != tail_len {
            return None;
        }
        let head = align - tail_len;
        let whole = (self.len / align - 1) * align;
        let rest = self.len - align - whole;
        self.reserve(2 * align);
        let at = self.off + tail_len;
        self.mem[at..at + head].copy_from_slice(&run_bytes[..head]);
        let last = self.off + align;
        self.mem[last..last + rest].copy_from_slice(&run_bytes[head + whole..]);
        self.mem[last + rest..last + align].fill(0);
        #[cfg(test)]
        GATHERED.with(|g| g.set(g.get() + 1));
        let (src, run) = self.run.as_ref()?;
        let middle = &src[run.start + head..run.start + head + whole];
        let last_block = if rest > 0 { align } else { 0 };
        Some([
            &self.mem[self.off..last],
            middle,
            &self.mem[last..last + last_block],
        ])
    }

    /// Room in `mem` for `room` bytes from the start of the stage, keeping what it holds.
    fn reserve(&mut self, room: usize) {
        if self.mem.len() < self.off + room {
            let cap = room.max(1 << 20).next_power_of_two();
            let mut mem = vec![0u8; cap + ALIGN as usize];
            let off = mem.as_ptr().align_offset(ALIGN as usize);
            let kept = self.len - self.run.as_ref().map_or(0, |(_, r)| r.len());
            mem[off..off + kept].copy_from_slice(&self.mem[self.off..self.off + kept]);
            self.mem = mem;
            self.off = off;
        }
    }

    fn copy_in(&mut self, bytes: &[u8]) {
        let need = self.len + bytes.len();
        // Room for the bytes and for the zeros that pad them to a block boundary.
        self.reserve(need.next_multiple_of(ALIGN as usize));
        let at = self.off + self.len;
        self.mem[at..at + bytes.len()].copy_from_slice(bytes);
        self.len = need;
    }

    /// The staged bytes; a run must have been copied in first (`materialize`).
    pub(crate) fn bytes(&self) -> &[u8] {
        debug_assert!(self.run.is_none());
        &self.mem[self.off..self.off + self.len]
    }

    /// The staged bytes and zeros after them up to a block boundary.
    fn padded(&mut self) -> &[u8] {
        let padded = self.len.next_multiple_of(ALIGN as usize);
        let from = self.off + self.len;
        self.mem[from..self.off + padded].fill(0);
        &self.mem[self.off..self.off + padded]
    }

    /// Empties the stage (the source stays, for the next segment's bytes).
    pub(crate) fn clear(&mut self) {
        self.len = 0;
        self.run = None;
        if self.mem.len() > RETAIN_BYTES {
            self.mem = Vec::new();
            self.off = 0;
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Direct writes of this thread gathered from a source without copying it.
    pub(crate) static GATHERED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

thread_local! {
    static STAGE: RefCell<Stage> = const { RefCell::new(Stage::new()) };
}

/// Runs `f` with this thread's staging buffer, empty. A nested call gets a buffer of its own.
pub(crate) fn with_stage<T>(f: impl FnOnce(&mut Stage) -> T) -> T {
    STAGE.with(|cell| match cell.try_borrow_mut() {
        Ok(mut stage) => {
            // A call that panicked may have left its source.
            stage.clear();
            stage.src = None;
            let out = f(&mut stage);
            stage.clear();
            stage.src = None;
            out
        }
        Err(_) => f(&mut Stage::new()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_bytes_sit_at_an_aligned_address_and_are_padded_with_zeros_to_a_block() {
        let mut stage = Stage::new();
        stage.start(8192, b"tail");
        stage.push(&[7u8; 5000]);
        assert_eq!(stage.bytes().as_ptr() as usize % ALIGN as usize, 0);
        assert_eq!(stage.end(), 8192 + 5004);
        let padded = stage.padded().to_vec();
        assert_eq!(padded.len(), 8192);
        assert_eq!(&padded[..4], b"tail");
        assert!(padded[4..5004].iter().all(|b| *b == 7));
        assert!(padded[5004..].iter().all(|b| *b == 0));
        // Growing keeps what was staged, aligned.
        stage.push(&vec![9u8; 3 << 20]);
        assert_eq!(stage.bytes().as_ptr() as usize % ALIGN as usize, 0);
        assert_eq!(&stage.bytes()[..4], b"tail");
        assert_eq!(stage.bytes().len(), 5004 + (3 << 20));
        stage.clear();
        assert!(stage.is_empty());
        assert!(stage.mem.len() <= RETAIN_BYTES);
    }
}
