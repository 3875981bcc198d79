//! One handler per Kafka API, one file each. A handler decodes its request, asks a subsystem
//! and encodes the answer; business rules live in the subsystems.

use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use kafka_protocol::messages::ApiKey;
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};
use strom_proto::api::RequestFrame;

use crate::broker::Broker;

mod api_versions;
mod create_partitions;
mod create_topics;
mod delete_topics;
mod describe_cluster;
mod describe_configs;
mod fetch;
mod init_producer_id;
mod list_offsets;
mod metadata;
mod produce;

/// What a handler gives back to the connection.
pub enum Reply {
    /// A response frame ready to send.
    Now(Bytes),
    /// A response that completes later (group commit, long poll). Responses still go out in
    /// request order.
    Later(BoxFuture<'static, Option<Bytes>>),
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

pub async fn dispatch(broker: &Arc<Broker>, frame: RequestFrame) -> Result<Reply, HandlerError> {
    let mut ctx = Ctx::new(frame);
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
        // decode_header only lets served APIs through.
        other => Err(HandlerError::Decode(other, "not served".into())),
    }
}

/// The request being handled: its key, version, correlation id and undecoded body.
pub struct Ctx {
    pub api_key: ApiKey,
    pub version: i16,
    pub correlation_id: i32,
    body: Bytes,
}

impl Ctx {
    fn new(frame: RequestFrame) -> Self {
        Ctx {
            api_key: frame.api_key,
            version: frame.version,
            correlation_id: frame.header.correlation_id,
            body: frame.body,
        }
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

pub fn str_bytes(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_string())
}

/// Kafka error message field, only where the version carries it.
pub fn message(s: impl std::fmt::Display) -> Option<StrBytes> {
    Some(StrBytes::from_string(s.to_string()))
}
