//! Directory ids of the controller voters, as Kafka's KIP-853 gives every metadata log
//! directory one: a random id made with the directory and kept in it (`directory.id`).
//!
//! A voter that lost its directory (a replaced disk) comes back under the same node id but with
//! an empty log and no memory of its votes. Counted as before, its vote could elect a voter
//! that lacks entries it had itself acknowledged, and those committed entries would be gone.
//! So every node answers the controller handshake with its directory id, the Raft leader
//! records each voter's id in the log (`MetadataRecord::VoterDirectory`), and a candidate
//! counts a vote only from a voter answering with the id its own log last recorded for it (or
//! with any id while none is). A voter back with a new directory counts again once the leader
//! has recorded the new id: a log that ever held that record holds every entry committed
//! before it was written (committed entries are never truncated), so the new directory's votes
//! and acknowledgements are only ever of entries it really holds. The record read is the
//! newest by log id among the snapshot's, the log's entries at start (committed or not) and
//! the entries applied since: after a restart the commit index is unknown and the applied
//! state empty, but the log already holds what was recorded.
//!
//! Left as Kafka's static quorums leave it: a voter wiped just after voting in a term that a
//! leader unaware of that term is still acting in can acknowledge that leader's appends.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::Mutex;

use super::storage::replace_file;
use super::types::LogId;
use crate::record::MetadataRecord;

pub const DIRECTORY_ID_FILE: &str = "directory.id";

/// This node's directory id: the one kept in `dir`, or a new one if there is none or the log
/// is `pristine` (a directory that lost its log is a new directory, whatever id is left in it).
pub fn load_or_create(dir: &Path, pristine: bool) -> io::Result<String> {
    if !pristine {
        match std::fs::read_to_string(dir.join(DIRECTORY_ID_FILE)) {
            Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_string()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    let id = uuid::Uuid::new_v4().to_string();
    replace_file(dir, DIRECTORY_ID_FILE, id.as_bytes())?;
    Ok(id)
}

/// The (node id, directory id) of each `VoterDirectory` record among `records`.
pub fn voter_directories(records: &[MetadataRecord]) -> impl Iterator<Item = (u64, &str)> {
    records.iter().filter_map(|r| match r {
        MetadataRecord::VoterDirectory {
            node_id,
            directory_id,
        } => Some((super::types::to_node_id(*node_id), directory_id.as_str())),
        _ => None,
    })
}

/// What a node knows of the voters' directory ids.
#[derive(Debug, Default)]
pub struct Directories {
    /// As the log records them: node id → the newest record's log id and directory id.
    recorded: Mutex<BTreeMap<u64, (LogId, String)>>,
    /// As each peer answered this node's last handshake with it.
    seen: Mutex<BTreeMap<u64, String>>,
}

impl Directories {
    /// Takes in a record of `node`'s directory `at` a log position, unless a newer one is in.
    pub fn record(&self, node: u64, at: LogId, directory_id: &str) {
        let mut recorded = self.recorded.lock().unwrap_or_else(|e| e.into_inner());
        if recorded
            .get(&node)
            .is_none_or(|(seen_at, _)| *seen_at <= at)
        {
            recorded.insert(node, (at, directory_id.to_string()));
        }
    }

    /// Takes in the `VoterDirectory` records among `records`, found `at` a log position.
    pub fn record_all(&self, at: LogId, records: &[MetadataRecord]) {
        for (node, directory_id) in voter_directories(records) {
            self.record(node, at, directory_id);
        }
    }

    /// Each node's directory id as last recorded.
    pub fn recorded(&self) -> BTreeMap<u64, String> {
        self.recorded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(node, (_, id))| (*node, id.clone()))
            .collect()
    }

    pub fn saw(&self, node: u64, directory_id: &str) {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node, directory_id.to_string());
    }

    /// Whether a vote from `node`, answering from directory `answered`, counts.
    pub fn vote_counts(&self, node: u64, answered: Option<&str>) -> bool {
        let recorded = self.recorded.lock().unwrap_or_else(|e| e.into_inner());
        match recorded.get(&node) {
            None => true,
            Some((_, id)) => answered == Some(id.as_str()),
        }
    }

    /// The records the leader should write: each of `voters` whose directory id (as seen, or
    /// `own` for this node `me`) is not the recorded one.
    pub fn unrecorded(&self, me: u64, own: &str, voters: &[u64]) -> Vec<MetadataRecord> {
        let recorded = self.recorded.lock().unwrap_or_else(|e| e.into_inner());
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        voters
            .iter()
            .filter_map(|v| {
                let id = if *v == me { own } else { seen.get(v)?.as_str() };
                (recorded.get(v).map(|(_, id)| id.as_str()) != Some(id)).then(|| {
                    MetadataRecord::VoterDirectory {
                        node_id: super::types::from_node_id(*v),
                        directory_id: id.to_string(),
                    }
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_keeps_its_id_until_its_log_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(dir.path(), true).unwrap();
        assert_eq!(load_or_create(dir.path(), false).unwrap(), first);
        let again = load_or_create(dir.path(), true).unwrap();
        assert_ne!(again, first, "an emptied log is a new directory");
        assert_eq!(load_or_create(dir.path(), false).unwrap(), again);
    }

    fn at(term: u64, index: u64) -> LogId {
        openraft::testing::log_id::<super::super::types::TypeConfig>(term, 1, index)
    }

    #[test]
    fn votes_count_from_the_newest_recorded_directory_or_while_none_is() {
        let d = Directories::default();
        assert!(d.vote_counts(2, Some("a")));
        assert!(d.vote_counts(2, None));
        d.record(2, at(1, 5), "a");
        assert!(d.vote_counts(2, Some("a")));
        assert!(!d.vote_counts(2, Some("b")));
        assert!(!d.vote_counts(2, None));
        assert!(d.vote_counts(3, Some("c")));
        // An older record (a replayed entry, a snapshot) does not undo a newer one.
        d.record(2, at(2, 4), "b");
        d.record(2, at(1, 9), "a");
        assert!(d.vote_counts(2, Some("b")), "a later term is newer");
    }

    #[test]
    fn the_leader_records_what_differs() {
        let d = Directories::default();
        d.saw(2, "b");
        d.record_all(
            at(1, 3),
            &[
                MetadataRecord::VoterDirectory {
                    node_id: 1,
                    directory_id: "a".into(),
                },
                MetadataRecord::VoterDirectory {
                    node_id: 2,
                    directory_id: "old".into(),
                },
            ],
        );
        let records = d.unrecorded(1, "a", &[1, 2, 3]);
        assert_eq!(
            records,
            vec![MetadataRecord::VoterDirectory {
                node_id: 2,
                directory_id: "b".into()
            }],
            "1 is recorded, 2 changed, 3 not heard from yet"
        );
    }
}
