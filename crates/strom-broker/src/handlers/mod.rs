//! One handler per Kafka API, one file each. A handler decodes its request, asks a subsystem
//! and encodes the answer; business rules live in the subsystems.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use kafka_protocol::messages::ApiKey;
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};
use strom_proto::api::RequestFrame;
use strom_proto::splice::ResponseFrame;

use crate::broker::Broker;

mod alter_configs;
mod alter_partition_reassignments;
mod api_versions;
mod consumer_group_describe;
mod consumer_group_heartbeat;
mod create_partitions;
mod create_topics;
mod delete_groups;
mod delete_records;
mod delete_topics;
mod describe_cluster;
mod describe_configs;
mod describe_groups;
mod describe_quorum;
mod describe_topic_partitions;
mod elect_leaders;
mod fetch;
mod find_coordinator;
mod heartbeat;
mod incremental_alter_configs;
mod init_producer_id;
mod join_group;
mod leave_group;
mod list_groups;
mod list_offsets;
mod list_partition_reassignments;
mod metadata;
mod offset_commit;
mod offset_delete;
mod offset_fetch;
mod offset_for_leader_epoch;
mod produce;
mod sync_group;
mod unregister_broker;

/// What a handler gives back to the connection.
pub enum Reply {
    /// A response frame ready to send.
    Now(Bytes),
    /// A response that completes later (group commit, long poll). Responses still go out in
    /// request order.
    Later(BoxFuture<'static, Option<ResponseFrame>>),
    /// No response at all (Produce with acks=0).
    None,
}

/// A request that cannot be served closes the connection; this says why.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    #[error("cannot decode {0:?} body: {1}")]
    Decode(ApiKey, String),
    #[error("cannot encode response: {0}")]
    Encode(String),
    /// The protocol's way to report this failure is to drop the connection.
    #[error("{0}")]
    Close(&'static str),
}

pub async fn dispatch(
    broker: &Arc<Broker>,
    frame: RequestFrame,
    peer: SocketAddr,
) -> Result<Reply, HandlerError> {
    let mut ctx = Ctx::new(frame, peer);
    match ctx.api_key {
        ApiKey::ApiVersions => api_versions::handle(broker, &mut ctx),
        ApiKey::Metadata => metadata::handle(broker, &mut ctx),
        ApiKey::Produce => produce::handle(broker, &mut ctx),
        ApiKey::Fetch => fetch::handle(broker, &mut ctx),
        ApiKey::ListOffsets => list_offsets::handle(broker, &mut ctx),
        ApiKey::CreateTopics => create_topics::handle(broker, &mut ctx),
        ApiKey::DeleteTopics => delete_topics::handle(broker, &mut ctx),
        ApiKey::CreatePartitions => create_partitions::handle(broker, &mut ctx),
        ApiKey::InitProducerId => init_producer_id::handle(broker, &mut ctx),
        ApiKey::DescribeConfigs => describe_configs::handle(broker, &mut ctx),
        ApiKey::DescribeCluster => describe_cluster::handle(broker, &mut ctx),
        ApiKey::FindCoordinator => find_coordinator::handle(broker, &mut ctx),
        ApiKey::JoinGroup => join_group::handle(broker, &mut ctx),
        ApiKey::SyncGroup => sync_group::handle(broker, &mut ctx),
        ApiKey::Heartbeat => heartbeat::handle(broker, &mut ctx),
        ApiKey::LeaveGroup => leave_group::handle(broker, &mut ctx),
        ApiKey::OffsetCommit => offset_commit::handle(broker, &mut ctx),
        ApiKey::OffsetFetch => offset_fetch::handle(broker, &mut ctx),
        ApiKey::ListGroups => list_groups::handle(broker, &mut ctx),
        ApiKey::DescribeGroups => describe_groups::handle(broker, &mut ctx),
        ApiKey::DeleteGroups => delete_groups::handle(broker, &mut ctx),
        ApiKey::OffsetDelete => offset_delete::handle(broker, &mut ctx),
        ApiKey::DeleteRecords => delete_records::handle(broker, &mut ctx),
        ApiKey::AlterConfigs => alter_configs::handle(broker, &mut ctx),
        ApiKey::IncrementalAlterConfigs => incremental_alter_configs::handle(broker, &mut ctx),
        ApiKey::ConsumerGroupHeartbeat => consumer_group_heartbeat::handle(broker, &mut ctx),
        ApiKey::ConsumerGroupDescribe => consumer_group_describe::handle(broker, &mut ctx),
        ApiKey::OffsetForLeaderEpoch => offset_for_leader_epoch::handle(broker, &mut ctx),
        ApiKey::DescribeQuorum => describe_quorum::handle(broker, &mut ctx),
        ApiKey::ElectLeaders => elect_leaders::handle(broker, &mut ctx),
        ApiKey::AlterPartitionReassignments => {
            alter_partition_reassignments::handle(broker, &mut ctx)
        }
        ApiKey::ListPartitionReassignments => {
            list_partition_reassignments::handle(broker, &mut ctx)
        }
        ApiKey::DescribeTopicPartitions => describe_topic_partitions::handle(broker, &mut ctx),
        ApiKey::UnregisterBroker => unregister_broker::handle(broker, &mut ctx),
        // decode_header only lets served APIs through.
        other => Err(HandlerError::Decode(other, "not served".into())),
    }
}

/// The request being handled: its key, version, correlation id and undecoded body.
pub struct Ctx {
    pub api_key: ApiKey,
    pub version: i16,
    pub correlation_id: i32,
    pub client_id: String,
    pub peer: SocketAddr,
    body: Bytes,
}

impl Ctx {
    fn new(frame: RequestFrame, peer: SocketAddr) -> Self {
        Ctx {
            api_key: frame.api_key,
            version: frame.version,
            correlation_id: frame.header.correlation_id,
            client_id: frame
                .header
                .client_id
                .as_ref()
                .map(|c| c.to_string())
                .unwrap_or_default(),
            peer,
            body: frame.body,
        }
    }

    /// A response that is encoded when `fut` resolves (the connection keeps request order).
    pub fn later<T, F>(&self, fut: F) -> Reply
    where
        T: Encodable + HeaderVersion + Send + 'static,
        F: std::future::Future<Output = T> + Send + 'static,
    {
        let (correlation_id, version) = (self.correlation_id, self.version);
        Reply::Later(Box::pin(async move {
            let body = fut.await;
            match strom_proto::api::encode_response(correlation_id, version, &body) {
                Ok(b) => Some(b.into()),
                Err(e) => {
                    tracing::error!(error = %e, "cannot encode a delayed response");
                    None
                }
            }
        }))
    }

    pub fn decode<T: Decodable>(&mut self) -> Result<T, HandlerError> {
        strom_proto::api::decode_body(&mut self.body, self.version)
            .map_err(|e| HandlerError::Decode(self.api_key, e))
    }

    pub fn encode<T: Encodable + HeaderVersion>(&self, body: &T) -> Result<Bytes, HandlerError> {
        strom_proto::api::encode_response(self.correlation_id, self.version, body)
            .map_err(HandlerError::Encode)
    }

    pub fn reply<T: Encodable + HeaderVersion>(&self, body: &T) -> Result<Reply, HandlerError> {
        self.encode(body).map(Reply::Now)
    }
}

/// The group coordinator's error as a wire code (0 for none).
pub fn group_code(e: Option<strom_group::GroupError>) -> i16 {
    e.map_or(0, |e| e.code())
}

pub fn str_bytes(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_string())
}

/// Kafka error message field, only where the version carries it.
pub fn message(s: impl std::fmt::Display) -> Option<StrBytes> {
    Some(StrBytes::from_string(s.to_string()))
}
