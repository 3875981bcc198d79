//! The Raft log store: one append-only file of entries plus small side files, all under the
//! metadata directory.
//!
//! - `raft.log`: entries `[len u32 BE][crc32c u32 BE][json Entry]`, contiguous by index. A torn or
//!   corrupt tail (or an index gap) is dropped on open.
//! - `vote`: the last vote, JSON, replaced atomically (tmp, fsync, rename, fsync dir).
//! - `purged`: the last purged log id, JSON, replaced the same way. Purging writes this first,
//!   then rewrites `raft.log` without the purged entries (tmp, fsync, rename); entries at or
//!   below the marker that survive a crash in between are dropped on open.
//!
//! Every entry is also kept in memory (metadata is small and the log is purged behind
//! snapshots). File writes run on one writer thread in submission order, so a vote, an append,
//! a truncation and a purge reach the disk in the order openraft issued them; appends are
//! acknowledged (`IOFlushed`) only after `fdatasync`, and batched appends share one sync.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::ops::RangeBounds;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};
use tokio::sync::oneshot;

use super::types::{io_err, Entry, LogId, TypeConfig, Vote};

pub const LOG_FILE: &str = "raft.log";
pub const VOTE_FILE: &str = "vote";
pub const PURGED_FILE: &str = "purged";

/// Largest entry accepted on read; anything bigger is treated as corruption.
const MAX_ENTRY_BYTES: usize = 64 * 1024 * 1024;

struct Stored {
    /// Byte position of the entry's header in `raft.log`.
    pos: u64,
    entry: Entry,
}

struct Mem {
    entries: BTreeMap<u64, Stored>,
    /// Logical length of `raft.log` once every submitted write is done.
    end: u64,
    vote: Option<Vote>,
    purged: Option<LogId>,
}

enum Op {
    Append {
        pos: u64,
        bytes: Vec<u8>,
        done: IOFlushed<TypeConfig>,
    },
    Truncate {
        len: u64,
        done: oneshot::Sender<io::Result<()>>,
    },
    /// Replace a small file atomically.
    Replace {
        name: &'static str,
        bytes: Vec<u8>,
        done: oneshot::Sender<io::Result<()>>,
    },
    /// Replace `raft.log` with these bytes.
    Rewrite {
        bytes: Vec<u8>,
        done: oneshot::Sender<io::Result<()>>,
    },
}

/// The writer thread; dropping the last handle lets it finish what was queued and joins it,
/// so a store reopened on the same directory never races the old one.
struct Writer {
    tx: Option<std::sync::mpsc::Sender<Op>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The log store handed to openraft. Clones share state (the reader is a clone).
#[derive(Clone)]
pub struct LogStore {
    mem: Arc<Mutex<Mem>>,
    writer: Arc<Writer>,
}

pub fn encode_frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 8);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&crc32c::crc32c(body).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Splits `data` into valid `[len][crc][body]` frames; returns the bodies with their positions
/// and the length of the valid prefix.
pub fn decode_frames(data: &[u8]) -> (Vec<(u64, &[u8])>, usize) {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos + 8 <= data.len() {
        let len =
            u32::from_be_bytes([data[pos], data[pos + 1], data[pos + 2], data[pos + 3]]) as usize;
        let crc = u32::from_be_bytes([data[pos + 4], data[pos + 5], data[pos + 6], data[pos + 7]]);
        if len > MAX_ENTRY_BYTES || pos + 8 + len > data.len() {
            break;
        }
        let body = &data[pos + 8..pos + 8 + len];
        if crc32c::crc32c(body) != crc {
            break;
        }
        out.push((pos as u64, body));
        pos += 8 + len;
    }
    (out, pos)
}

/// Writes `bytes` to `dir/name` atomically and durably.
pub fn replace_file(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

fn read_json_file<T: serde::de::DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(data) => serde_json::from_slice(&data)
            .map(Some)
            .map_err(|e| io_err(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn encode_entry(entry: &Entry) -> io::Result<Vec<u8>> {
    let body = serde_json::to_vec(entry).map_err(io_err)?;
    Ok(encode_frame(&body))
}

impl LogStore {
    pub fn open(dir: &Path) -> io::Result<LogStore> {
        std::fs::create_dir_all(dir)?;
        let _ = std::fs::remove_file(dir.join(format!("{LOG_FILE}.tmp")));
        let vote: Option<Vote> = read_json_file(&dir.join(VOTE_FILE))?;
        let purged: Option<Option<LogId>> = read_json_file(&dir.join(PURGED_FILE))?;
        let purged = purged.flatten();
        let path = dir.join(LOG_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let mut data = Vec::new();
        file.read_to_end(&mut data)?;
        let (frames, mut valid) = decode_frames(&data);
        let mut entries = BTreeMap::new();
        let mut dropped_purged = false;
        let mut last: Option<u64> = None;
        for (pos, body) in frames {
            let entry: Entry = match serde_json::from_slice(body) {
                Ok(e) => e,
                Err(_) => {
                    valid = pos as usize;
                    break;
                }
            };
            let index = entry.log_id.index;
            if last.is_some_and(|l| index != l + 1) {
                valid = pos as usize;
                break;
            }
            last = Some(index);
            if purged.as_ref().is_some_and(|p| index <= p.index) {
                dropped_purged = true;
                continue;
            }
            entries.insert(index, Stored { pos, entry });
        }
        if valid < data.len() {
            tracing::warn!(
                path = %path.display(),
                valid_bytes = valid,
                dropped_bytes = data.len() - valid,
                "raft log has a torn or corrupt tail; truncating it"
            );
            file.set_len(valid as u64)?;
            file.sync_all()?;
        } else {
            // What it keeps counts as written from here on (this voter acknowledges entries,
            // and votes, by it): after a crash of the process alone it may still be only in
            // the page cache, never fsynced. It is now.
            file.sync_data()?;
        }
        let mut end = valid as u64;
        if dropped_purged {
            // A purge was interrupted before the log was rewritten: finish it.
            let mut bytes = Vec::new();
            for stored in entries.values_mut() {
                stored.pos = bytes.len() as u64;
                bytes.extend_from_slice(&encode_entry(&stored.entry)?);
            }
            replace_file(dir, LOG_FILE, &bytes)?;
            end = bytes.len() as u64;
            file = OpenOptions::new().read(true).write(true).open(&path)?;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let writer_dir = dir.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || writer_loop(writer_dir, file, rx))?;
        Ok(LogStore {
            mem: Arc::new(Mutex::new(Mem {
                entries,
                end,
                vote,
                purged,
            })),
            writer: Arc::new(Writer {
                tx: Some(tx),
                thread: Some(thread),
            }),
        })
    }

    fn mem(&self) -> MutexGuard<'_, Mem> {
        self.mem.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn submit(&self, op: Op) -> io::Result<()> {
        self.writer
            .tx
            .as_ref()
            .ok_or_else(|| io_err("raft log writer has stopped"))?
            .send(op)
            .map_err(|_| io_err("raft log writer has stopped"))
    }

    async fn wait(rx: oneshot::Receiver<io::Result<()>>) -> io::Result<()> {
        rx.await
            .unwrap_or_else(|_| Err(io_err("raft log writer has stopped")))
    }

    fn last_log_id(mem: &Mem) -> Option<LogId> {
        mem.entries
            .values()
            .next_back()
            .map(|s| s.entry.log_id)
            .or(mem.purged)
    }
}

fn writer_loop(dir: PathBuf, mut file: File, rx: std::sync::mpsc::Receiver<Op>) {
    let path = dir.join(LOG_FILE);
    while let Ok(first) = rx.recv() {
        // Gather consecutive appends so they share one fsync.
        let mut ops = vec![first];
        while matches!(ops.last(), Some(Op::Append { .. })) {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        let mut appends = Vec::new();
        let mut append_result: io::Result<()> = Ok(());
        for op in ops {
            match op {
                Op::Append { pos, bytes, done } => {
                    if append_result.is_ok() {
                        append_result = file.write_all_at(&bytes, pos);
                    }
                    appends.push(done);
                }
                other => {
                    flush_appends(&file, &mut appends, &mut append_result);
                    match other {
                        Op::Truncate { len, done } => {
                            let _ = done.send(file.set_len(len).and_then(|_| file.sync_all()));
                        }
                        Op::Replace { name, bytes, done } => {
                            let _ = done.send(replace_file(&dir, name, &bytes));
                        }
                        Op::Rewrite { bytes, done } => {
                            let r = replace_file(&dir, LOG_FILE, &bytes).and_then(|_| {
                                file = OpenOptions::new().read(true).write(true).open(&path)?;
                                Ok(())
                            });
                            let _ = done.send(r);
                        }
                        Op::Append { .. } => unreachable!(),
                    }
                }
            }
        }
        flush_appends(&file, &mut appends, &mut append_result);
    }
}

fn flush_appends(
    file: &File,
    appends: &mut Vec<IOFlushed<TypeConfig>>,
    result: &mut io::Result<()>,
) {
    if appends.is_empty() {
        return;
    }
    let r = std::mem::replace(result, Ok(())).and_then(|_| file.sync_data());
    for done in appends.drain(..) {
        done.io_completed(match &r {
            Ok(()) => Ok(()),
            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
        });
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let mem = self.mem();
        Ok(mem
            .entries
            .range(range)
            .map(|(_, s)| s.entry.clone())
            .collect())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(self.mem().vote)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let mem = self.mem();
        Ok(LogState {
            last_purged_log_id: mem.purged,
            last_log_id: Self::last_log_id(&mem),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let bytes = serde_json::to_vec(vote).map_err(io_err)?;
        let (tx, rx) = oneshot::channel();
        self.submit(Op::Replace {
            name: VOTE_FILE,
            bytes,
            done: tx,
        })?;
        Self::wait(rx).await?;
        self.mem().vote = Some(*vote);
        Ok(())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut mem = self.mem();
        let start = mem.end;
        let mut bytes = Vec::new();
        for entry in entries {
            let index = entry.log_id.index;
            if let Some(last) = Self::last_log_id(&mem) {
                if index != last.index + 1 {
                    return Err(io_err(format!(
                        "raft log append at index {index} does not follow {}",
                        last.index
                    )));
                }
            }
            let pos = start + bytes.len() as u64;
            bytes.extend_from_slice(&encode_entry(&entry)?);
            mem.entries.insert(index, Stored { pos, entry });
        }
        mem.end = start + bytes.len() as u64;
        // Submitted under the lock so the writer sees operations in log order.
        self.submit(Op::Append {
            pos: start,
            bytes,
            done: callback,
        })
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let rx = {
            let mut mem = self.mem();
            let from = last_log_id.map(|l| l.index + 1).unwrap_or(0);
            let removed = mem.entries.split_off(&from);
            let Some(first) = removed.values().next() else {
                return Ok(());
            };
            let len = first.pos;
            mem.end = len;
            let (tx, rx) = oneshot::channel();
            self.submit(Op::Truncate { len, done: tx })?;
            rx
        };
        Self::wait(rx).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let (marker_rx, rewrite_rx) = {
            let mut mem = self.mem();
            if mem.purged.is_some_and(|p| p.index >= log_id.index) {
                return Ok(());
            }
            let kept = mem.entries.split_off(&(log_id.index + 1));
            mem.entries = kept;
            mem.purged = Some(log_id);
            let marker = serde_json::to_vec(&Some(log_id)).map_err(io_err)?;
            let mut bytes = Vec::new();
            for stored in mem.entries.values_mut() {
                stored.pos = bytes.len() as u64;
                bytes.extend_from_slice(&encode_entry(&stored.entry)?);
            }
            mem.end = bytes.len() as u64;
            let (tx1, rx1) = oneshot::channel();
            self.submit(Op::Replace {
                name: PURGED_FILE,
                bytes: marker,
                done: tx1,
            })?;
            let (tx2, rx2) = oneshot::channel();
            self.submit(Op::Rewrite { bytes, done: tx2 })?;
            (rx1, rx2)
        };
        Self::wait(marker_rx).await?;
        Self::wait(rewrite_rx).await
    }
}
