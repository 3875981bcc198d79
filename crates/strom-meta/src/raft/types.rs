//! The openraft type configuration and small conversions. Everything openraft-specific stays
//! inside `raft/`.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::record::MetadataRecord;

/// The payload of one Raft entry: one atomic batch of metadata records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordBatch(pub Vec<MetadataRecord>);

impl fmt::Display for RecordBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecordBatch({} records)", self.0.len())
    }
}

openraft::declare_raft_types!(
    /// Strom's metadata quorum. Node ids are Kafka node ids (non-negative `i32`) widened to
    /// `u64`; the standard (one leader per term) leader id, so the term is the Kafka leader
    /// epoch.
    pub TypeConfig:
        D = RecordBatch,
        R = (),
        NodeId = u64,
        Node = openraft::BasicNode,
        LeaderId = openraft::impls::leader_id_std::LeaderId<u64, u64>,
);

pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, SnapshotRecords>;

/// A state machine snapshot in memory: the records that rebuild the metadata image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotRecords(pub Arc<Vec<MetadataRecord>>);

pub fn to_node_id(id: i32) -> u64 {
    id as u32 as u64
}

pub fn from_node_id(id: u64) -> i32 {
    id as u32 as i32
}

/// A log index as a Kafka offset.
pub fn offset_of(log_id: Option<&LogId>) -> i64 {
    log_id.map(|l| l.index as i64).unwrap_or(-1)
}

/// Builds an `io::Error` with a message.
pub fn io_err(msg: impl fmt::Display) -> std::io::Error {
    std::io::Error::other(msg.to_string())
}
