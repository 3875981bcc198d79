//! Cluster metadata: the records that describe brokers, topics and partitions, the immutable
//! `MetadataImage` they are replayed into, the metadata log that makes them durable (a local
//! file log on a single node; a Raft quorum later behind the same trait), and the controller
//! that turns admin requests into records.

pub mod controller;
pub mod image;
pub mod log;
pub mod raft;
pub mod record;

pub use controller::{
    AlterPartitionError, Controller, ControllerError, CreateTopicSpec, FixedPolicy, TopicPolicy,
};
pub use image::{BrokerImage, MetadataImage, PartitionImage, TopicImage};
pub use log::{FileMetadataLog, MetadataLog, MetadataLogError};
pub use raft::{
    Committed, ControllerHandler, QuorumState, RaftConfig, RaftMetadataLog, ReplicaState,
};
pub use record::{MetadataRecord, TopicId};
