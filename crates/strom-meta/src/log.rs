//! The metadata log: an ordered, durable sequence of metadata records. On one node it is a
//! local file; a replicated cluster puts a Raft quorum behind the same trait.
//!
//! File format: entries of `[len u32 BE][crc32c u32 BE][json array of records]`. One entry is one
//! atomic batch (a topic and its partitions land together or not at all). A torn or corrupt
//! tail after a crash is truncated on open.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::record::MetadataRecord;

#[derive(Debug, thiserror::Error)]
pub enum MetadataLogError {
    #[error("metadata log i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("metadata log entry could not be encoded: {0}")]
    Encode(String),
    /// Only the Raft leader (the active controller) may do this; `leader` is the current one
    /// if known.
    #[error("this node is not the metadata leader (leader: {leader:?})")]
    NotLeader { leader: Option<i32> },
    #[error("the metadata log is shut down")]
    Shutdown,
    #[error("timed out: {0}")]
    Timeout(String),
    /// Anything else from the Raft layer (configuration, storage, protocol).
    #[error("metadata quorum: {0}")]
    Raft(String),
}

pub trait MetadataLog: Send + Sync {
    /// Every record committed so far, in order.
    fn committed(&self) -> &[MetadataRecord];
    /// Appends records as one atomic batch; they are durable when this returns. Returns the
    /// offset of the first one.
    fn append(&mut self, records: &[MetadataRecord]) -> Result<i64, MetadataLogError>;
}

/// Largest entry accepted on read; anything bigger is treated as corruption.
const MAX_ENTRY_BYTES: usize = 64 * 1024 * 1024;

pub struct FileMetadataLog {
    path: PathBuf,
    file: File,
    records: Vec<MetadataRecord>,
}

impl FileMetadataLog {
    pub fn open(dir: &Path) -> Result<Self, MetadataLogError> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("metadata.log");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let mut data = Vec::new();
        file.read_to_end(&mut data)?;
        let mut records = Vec::new();
        let mut pos = 0usize;
        while pos + 8 <= data.len() {
            let len = u32::from_be_bytes([data[pos], data[pos + 1], data[pos + 2], data[pos + 3]])
                as usize;
            let crc =
                u32::from_be_bytes([data[pos + 4], data[pos + 5], data[pos + 6], data[pos + 7]]);
            if len > MAX_ENTRY_BYTES || pos + 8 + len > data.len() {
                break;
            }
            let body = &data[pos + 8..pos + 8 + len];
            if crc32c::crc32c(body) != crc {
                break;
            }
            match serde_json::from_slice::<Vec<MetadataRecord>>(body) {
                Ok(batch) => records.extend(batch),
                Err(_) => break,
            }
            pos += 8 + len;
        }
        if pos < data.len() {
            tracing::warn!(
                path = %path.display(),
                valid_bytes = pos,
                dropped_bytes = data.len() - pos,
                "metadata log has a torn or corrupt tail; truncating it"
            );
            file.set_len(pos as u64)?;
            file.sync_all()?;
        } else {
            // What it keeps is the metadata from here on: after a crash of the process alone
            // it may still be only in the page cache, never fsynced. It is now.
            file.sync_data()?;
        }
        file.seek(SeekFrom::End(0))?;
        Ok(FileMetadataLog {
            path,
            file,
            records,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl MetadataLog for FileMetadataLog {
    fn committed(&self) -> &[MetadataRecord] {
        &self.records
    }

    fn append(&mut self, records: &[MetadataRecord]) -> Result<i64, MetadataLogError> {
        let body =
            serde_json::to_vec(records).map_err(|e| MetadataLogError::Encode(e.to_string()))?;
        let mut entry = Vec::with_capacity(body.len() + 8);
        entry.extend_from_slice(&(body.len() as u32).to_be_bytes());
        entry.extend_from_slice(&crc32c::crc32c(&body).to_be_bytes());
        entry.extend_from_slice(&body);
        let before = self.file.seek(SeekFrom::End(0))?;
        if let Err(e) = self
            .file
            .write_all(&entry)
            .and_then(|_| self.file.sync_data())
        {
            // Leave the file as it was so the next append does not follow a torn entry.
            let _ = self.file.set_len(before);
            return Err(e.into());
        }
        let first = self.records.len() as i64;
        self.records.extend_from_slice(records);
        Ok(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_survive_reopen_and_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = FileMetadataLog::open(dir.path()).unwrap();
            let first = log
                .append(&[MetadataRecord::ClusterId {
                    cluster_id: "c".into(),
                }])
                .unwrap();
            assert_eq!(first, 0);
            let second = log
                .append(&[MetadataRecord::ProducerIds {
                    next_producer_id: 1000,
                }])
                .unwrap();
            assert_eq!(second, 1);
        }
        // Simulate a torn write after the two good entries.
        let path = dir.path().join("metadata.log");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[0, 0, 0, 50, 1, 2, 3]).unwrap();
        drop(f);
        let log = FileMetadataLog::open(dir.path()).unwrap();
        assert_eq!(log.committed().len(), 2);
        let mut log = log;
        assert_eq!(
            log.append(&[MetadataRecord::ProducerIds {
                next_producer_id: 2000
            }])
            .unwrap(),
            2
        );
        let log = FileMetadataLog::open(dir.path()).unwrap();
        assert_eq!(log.committed().len(), 3);
    }
}
