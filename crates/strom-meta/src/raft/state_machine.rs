//! The Raft state machine: replays committed entries into a `MetadataImage` (kept only to build
//! snapshots) and hands every committed batch to the broker through the `Committed` channel,
//! except batches of `VoterDirectory` records, which only the Raft layer reads (see
//! `directory.rs`; snapshots carry them after the image's records).
//!
//! The state machine itself is in memory; snapshots are durable. The snapshot file `snapshot`
//! is one frame `[len u32 BE][crc32c u32 BE][json {meta, records}]`, replaced atomically (tmp,
//! fsync, rename, fsync dir). On open the snapshot is loaded, `Committed::Snapshot` is queued
//! first, and it is reported as applied, so openraft replays only the entries after it.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use futures::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::directory::{voter_directories, Directories};
use super::storage::{decode_frames, encode_frame, replace_file};
use super::types::{
    io_err, offset_of, LogId, Snapshot, SnapshotMeta, SnapshotRecords, StoredMembership, TypeConfig,
};
use super::Committed;
use crate::image::MetadataImage;
use crate::record::MetadataRecord;

pub const SNAPSHOT_FILE: &str = "snapshot";

#[derive(Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta,
    records: Vec<MetadataRecord>,
}

#[derive(Serialize)]
struct SnapshotFileOut<'a> {
    meta: &'a SnapshotMeta,
    records: &'a [MetadataRecord],
}

/// Progress shared with the public handle.
#[derive(Debug)]
pub struct Progress {
    /// Offset of the last batch or snapshot delivered through `Committed` (-1: none).
    pub delivered: AtomicI64,
}

struct Shared {
    dir: PathBuf,
    current: Mutex<Option<Snapshot>>,
}

impl Shared {
    /// Persists a snapshot and makes it current, unless a newer one is already current.
    fn store(&self, snap: &Snapshot) -> io::Result<()> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cur) = current.as_ref() {
            if cur.meta.last_log_id > snap.meta.last_log_id {
                return Ok(());
            }
        }
        let file = SnapshotFileOut {
            meta: &snap.meta,
            records: &snap.snapshot.0,
        };
        let body = serde_json::to_vec(&file).map_err(io_err)?;
        replace_file(&self.dir, SNAPSHOT_FILE, &encode_frame(&body))?;
        *current = Some(snap.clone());
        Ok(())
    }
}

pub fn load_snapshot(dir: &Path) -> io::Result<Option<Snapshot>> {
    let path = dir.join(SNAPSHOT_FILE);
    let data = match std::fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let (frames, valid) = decode_frames(&data);
    let (Some((_, body)), true) = (frames.first(), valid == data.len() && frames.len() == 1) else {
        return Err(io_err(format!("{} is corrupt", path.display())));
    };
    let file: SnapshotFile =
        serde_json::from_slice(body).map_err(|e| io_err(format!("{}: {e}", path.display())))?;
    Ok(Some(Snapshot {
        meta: file.meta,
        snapshot: SnapshotRecords(Arc::new(file.records)),
    }))
}

pub struct StateMachine {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    image: MetadataImage,
    /// The voters' directory ids the applied log records (published to `directories`).
    voter_dirs: BTreeMap<u64, String>,
    directories: Arc<Directories>,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Committed>,
    progress: Arc<Progress>,
}

impl StateMachine {
    /// Opens the state machine on `dir`, queueing `Committed::Snapshot` if a snapshot exists
    /// (the channel must have room for one message).
    pub fn open(
        dir: &Path,
        tx: mpsc::Sender<Committed>,
        progress: Arc<Progress>,
        directories: Arc<Directories>,
    ) -> io::Result<StateMachine> {
        std::fs::create_dir_all(dir)?;
        let snap = load_snapshot(dir)?;
        let mut sm = StateMachine {
            last_applied: None,
            membership: StoredMembership::default(),
            image: MetadataImage::empty(),
            voter_dirs: BTreeMap::new(),
            directories,
            shared: Arc::new(Shared {
                dir: dir.to_path_buf(),
                current: Mutex::new(None),
            }),
            tx,
            progress,
        };
        if let Some(snap) = snap {
            sm.load(&snap.meta, &snap.snapshot);
            let msg = Committed::Snapshot {
                offset: offset_of(snap.meta.last_log_id.as_ref()),
                records: snap.snapshot.0.as_ref().clone(),
            };
            if sm.tx.try_send(msg).is_err() {
                return Err(io_err("committed channel has no room for the snapshot"));
            }
            let offset = offset_of(snap.meta.last_log_id.as_ref());
            sm.progress.delivered.store(offset, Ordering::SeqCst);
            *sm.shared.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(snap);
        }
        Ok(sm)
    }

    fn load(&mut self, meta: &SnapshotMeta, records: &SnapshotRecords) {
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        let offset = offset_of(meta.last_log_id.as_ref());
        self.image = MetadataImage::empty().apply(offset, &records.0).0;
        self.image.offset = offset;
        self.voter_dirs.clear();
        self.record_directories(&records.0);
        if let Some(at) = meta.last_log_id {
            self.directories.record_all(at, &records.0);
        }
    }

    /// Takes in the `VoterDirectory` records among `records` (for snapshots); whether there
    /// were only those.
    fn record_directories(&mut self, records: &[MetadataRecord]) -> bool {
        let mut found = 0;
        for (node, directory_id) in voter_directories(records) {
            self.voter_dirs.insert(node, directory_id.to_string());
            found += 1;
        }
        found > 0 && found == records.len()
    }

    async fn deliver(&self, msg: Committed) {
        // A consumer that went away (shutdown) is not an error for Raft.
        let _ = self.tx.send(msg).await;
    }
}

pub struct SnapshotBuilder {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    image: MetadataImage,
    voter_dirs: BTreeMap<u64, String>,
    shared: Arc<Shared>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotRecords;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let mut records = self.image.to_records();
        records.extend(
            self.voter_dirs
                .iter()
                .map(|(node, id)| MetadataRecord::VoterDirectory {
                    node_id: super::types::from_node_id(*node),
                    directory_id: id.clone(),
                }),
        );
        let snap = Snapshot {
            meta: SnapshotMeta {
                last_log_id: self.last_applied,
                last_membership: self.membership.clone(),
            },
            snapshot: SnapshotRecords(Arc::new(records)),
        };
        let shared = self.shared.clone();
        let to_store = snap.clone();
        tokio::task::spawn_blocking(move || shared.store(&to_store))
            .await
            .map_err(io_err)??;
        tracing::info!(
            last_log_id = offset_of(snap.meta.last_log_id.as_ref()),
            records = snap.snapshot.0.len(),
            "built metadata snapshot"
        );
        Ok(snap)
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotRecords;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        while let Some((entry, responder)) = entries.try_next().await? {
            let log_id = entry.log_id;
            self.last_applied = Some(log_id);
            if let EntryPayload::Normal(batch) = &entry.payload {
                self.directories.record_all(log_id, &batch.0);
            }
            match entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(log_id), m);
                }
                EntryPayload::Normal(batch) if self.record_directories(&batch.0) => {}
                EntryPayload::Normal(batch) => {
                    let offset = log_id.index as i64;
                    self.image.apply_in_place(offset, &batch.0);
                    self.deliver(Committed::Batch {
                        offset,
                        records: batch.0,
                    })
                    .await;
                    self.progress.delivered.store(offset, Ordering::SeqCst);
                }
            }
            if let Some(r) = responder {
                r.send(());
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            last_applied: self.last_applied,
            membership: self.membership.clone(),
            image: self.image.clone(),
            voter_dirs: self.voter_dirs.clone(),
            shared: self.shared.clone(),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotRecords,
    ) -> Result<(), io::Error> {
        let snap = Snapshot {
            meta: meta.clone(),
            snapshot: snapshot.clone(),
        };
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.store(&snap))
            .await
            .map_err(io_err)??;
        self.load(meta, &snapshot);
        tracing::info!(
            last_log_id = offset_of(meta.last_log_id.as_ref()),
            records = snapshot.0.len(),
            "installed metadata snapshot"
        );
        let offset = offset_of(meta.last_log_id.as_ref());
        self.deliver(Committed::Snapshot {
            offset,
            records: snapshot.0.as_ref().clone(),
        })
        .await;
        self.progress.delivered.store(offset, Ordering::SeqCst);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        Ok(self
            .shared
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone())
    }
}
