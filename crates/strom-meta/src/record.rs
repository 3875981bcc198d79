//! Metadata records: the only way metadata changes. Each is appended to the metadata log and
//! then applied to the image; replaying the log from the start rebuilds the same image.

use serde::{Deserialize, Serialize};

/// A topic's id (KIP-516), as 16 bytes. Kept as a plain array so this crate does not depend on
/// the protocol crate; the broker converts to the wire's UUID type.
pub type TopicId = [u8; 16];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum MetadataRecord {
    /// The cluster's id, written once when the metadata log is created.
    ClusterId {
        cluster_id: String,
    },
    /// A broker announced itself (its listener). Re-registration replaces the old entry.
    RegisterBroker {
        broker_id: i32,
        host: String,
        port: i32,
        rack: Option<String>,
    },
    /// The controller stopped hearing from a broker (`broker.session.timeout.ms`) or it shut
    /// down: it leads nothing and leaves every ISR until it is unfenced.
    FenceBroker {
        broker_id: i32,
    },
    /// A fenced broker is back (heartbeating again).
    UnfenceBroker {
        broker_id: i32,
    },
    /// UnregisterBroker (KIP-631): the broker is gone for good and its registration leaves the
    /// image. Partitions keep it in their replica lists (offline until reassigned); the
    /// records written before this one took it out of every ISR, ELR and leadership.
    UnregisterBroker {
        broker_id: i32,
    },
    Topic {
        name: String,
        topic_id: TopicId,
    },
    /// A partition's full state; a later record for the same partition replaces it (leader
    /// elections, ISR changes and reassignments all write one).
    Partition {
        topic_id: TopicId,
        partition: i32,
        replicas: Vec<i32>,
        isr: Vec<i32>,
        leader: i32,
        leader_epoch: i32,
        partition_epoch: i32,
        /// KIP-966 eligible leader replicas: left the ISR while it was below
        /// min.insync.replicas, so they hold everything committed and may lead.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        elr: Vec<i32>,
        /// KIP-966's last known ELR, kept as Kafka does with balanced recovery: the last
        /// leader of a partition that has none, which may lead again once it is back if no
        /// in-sync or eligible replica is left. Empty while the partition has a leader.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        last_known_elr: Vec<i32>,
        /// An ongoing reassignment (KIP-455): replicas being added (in the target, not yet
        /// caught up) and being removed (not in the target). Both empty otherwise; absent in
        /// records written before reassignment existed.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        adding_replicas: Vec<i32>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        removing_replicas: Vec<i32>,
    },
    RemoveTopic {
        topic_id: TopicId,
    },
    /// A topic-level config override; `value: None` deletes it.
    TopicConfig {
        topic_id: TopicId,
        name: String,
        value: Option<String>,
    },
    /// A dynamic broker setting: for one broker, or (`broker_id: None`) the cluster-wide
    /// default; `value: None` deletes it.
    BrokerConfig {
        broker_id: Option<i32>,
        name: String,
        value: Option<String>,
    },
    /// The next block of producer ids handed out starts at `next_producer_id`.
    ProducerIds {
        next_producer_id: i64,
    },
    /// The metadata log directory a controller voter answers from (a random id made with the
    /// directory, as Kafka's KIP-853 directory ids): written by the Raft leader, kept by the
    /// Raft layer only (the metadata image ignores it). A voter that lost its directory comes
    /// back under a new id, and its votes do not count until the leader has recorded that id.
    VoterDirectory {
        node_id: i32,
        directory_id: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_records_without_reassignment_fields_still_read() {
        let old = r#"{"type":"Partition","topic_id":[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1],"partition":0,"replicas":[1,2],"isr":[1,2],"leader":1,"leader_epoch":0,"partition_epoch":0}"#;
        let r: MetadataRecord = serde_json::from_str(old).unwrap();
        let MetadataRecord::Partition {
            adding_replicas,
            removing_replicas,
            ..
        } = &r
        else {
            panic!("{r:?}")
        };
        assert!(adding_replicas.is_empty() && removing_replicas.is_empty());
        // A settled partition is written as before.
        assert_eq!(serde_json::to_string(&r).unwrap(), old);
    }
}
