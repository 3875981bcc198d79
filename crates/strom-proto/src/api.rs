//! Which APIs and versions Strom serves, decoding a request's header, and framing responses.
//! The table here is the single truth that ApiVersions advertises and dispatch enforces.

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::{ApiKey, ApiVersionsResponse, RequestHeader, ResponseHeader};
use kafka_protocol::protocol::buf::ByteBufMut;
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion};

/// (api, min version, max version) served. Ranges are those of `kafka-protocol` 0.18 (Kafka 4.1
/// specs) for each API we implement; old clients (librdkafka 2.0, kafka-python) negotiate
/// down inside them.
pub const SUPPORTED_APIS: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Produce, 3, 13),
    (ApiKey::Fetch, 4, 18),
    (ApiKey::ListOffsets, 1, 10),
    (ApiKey::Metadata, 0, 13),
    (ApiKey::ApiVersions, 0, 4),
    (ApiKey::CreateTopics, 2, 7),
    (ApiKey::DeleteTopics, 1, 6),
    (ApiKey::InitProducerId, 0, 6),
    (ApiKey::DescribeConfigs, 1, 4),
    (ApiKey::CreatePartitions, 0, 3),
    (ApiKey::DescribeCluster, 0, 2),
    (ApiKey::FindCoordinator, 0, 6),
    (ApiKey::JoinGroup, 0, 9),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::LeaveGroup, 0, 5),
    (ApiKey::OffsetCommit, 2, 9),
    (ApiKey::OffsetFetch, 1, 9),
    (ApiKey::ListGroups, 0, 5),
    (ApiKey::DescribeGroups, 0, 6),
    (ApiKey::DeleteGroups, 0, 2),
    (ApiKey::OffsetDelete, 0, 0),
    (ApiKey::DeleteRecords, 0, 2),
    (ApiKey::AlterConfigs, 0, 2),
    (ApiKey::IncrementalAlterConfigs, 0, 1),
    (ApiKey::ConsumerGroupHeartbeat, 0, 1),
    (ApiKey::ConsumerGroupDescribe, 0, 1),
    (ApiKey::OffsetForLeaderEpoch, 2, 4),
    (ApiKey::DescribeQuorum, 0, 2),
    (ApiKey::ElectLeaders, 0, 2),
    (ApiKey::AlterPartitionReassignments, 0, 1),
    (ApiKey::ListPartitionReassignments, 0, 0),
    (ApiKey::DescribeTopicPartitions, 0, 0),
    (ApiKey::UnregisterBroker, 0, 0),
];

/// The version range served for `key`, if the API is served at all.
pub fn supported_range(key: ApiKey) -> Option<(i16, i16)> {
    SUPPORTED_APIS
        .iter()
        .find(|(k, _, _)| *k == key)
        .map(|(_, min, max)| (*min, *max))
}

/// The `api_keys` array of an ApiVersions response.
pub fn api_versions_list() -> Vec<ApiVersion> {
    SUPPORTED_APIS
        .iter()
        .map(|(k, min, max)| {
            ApiVersion::default()
                .with_api_key(*k as i16)
                .with_min_version(*min)
                .with_max_version(*max)
        })
        .collect()
}

/// A request whose header has been decoded; the body is still bytes.
#[derive(Debug)]
pub struct RequestFrame {
    pub api_key: ApiKey,
    pub version: i16,
    pub header: RequestHeader,
    pub body: Bytes,
}

/// Why a request could not be dispatched.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("unknown api key {0}")]
    UnknownApiKey(i16),
    /// An ApiVersions request newer than we serve: KIP-511 says answer with the v0-shaped
    /// UNSUPPORTED_VERSION body so the client can retry with a version we know.
    #[error("ApiVersions v{version} is not supported")]
    ApiVersionsTooNew { version: i16, correlation_id: i32 },
    #[error("{key:?} v{version} is not supported")]
    UnsupportedVersion { key: ApiKey, version: i16 },
    #[error("malformed request header: {0}")]
    Malformed(String),
}

/// Decodes a frame's request header. The body is left undecoded.
pub fn decode_header(frame: Bytes) -> Result<RequestFrame, HeaderError> {
    if frame.len() < 8 {
        return Err(HeaderError::Malformed(format!("{} bytes", frame.len())));
    }
    let raw_key = i16::from_be_bytes([frame[0], frame[1]]);
    let version = i16::from_be_bytes([frame[2], frame[3]]);
    let correlation_id = i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
    let api_key = ApiKey::try_from(raw_key).map_err(|_| HeaderError::UnknownApiKey(raw_key))?;
    let (min, max) = supported_range(api_key).ok_or(HeaderError::UnknownApiKey(raw_key))?;
    if version < min || version > max {
        if api_key == ApiKey::ApiVersions && version > max {
            return Err(HeaderError::ApiVersionsTooNew {
                version,
                correlation_id,
            });
        }
        return Err(HeaderError::UnsupportedVersion {
            key: api_key,
            version,
        });
    }
    let header_version = api_key.request_header_version(version);
    let mut body = frame;
    let header = RequestHeader::decode(&mut body, header_version)
        .map_err(|e| HeaderError::Malformed(e.to_string()))?;
    Ok(RequestFrame {
        api_key,
        version,
        header,
        body,
    })
}

/// Decodes a request body of type `T` at `version`, requiring every byte to be consumed.
pub fn decode_body<T: Decodable>(body: &mut Bytes, version: i16) -> Result<T, String> {
    let value = T::decode(body, version).map_err(|e| e.to_string())?;
    Ok(value)
}

/// Encodes a whole response frame: size prefix, response header, body.
pub fn encode_response<T: Encodable + HeaderVersion>(
    correlation_id: i32,
    version: i16,
    body: &T,
) -> Result<Bytes, String> {
    encode_frame(correlation_id, version, body, BytesMut::with_capacity).map(BytesMut::freeze)
}

/// Encodes a response frame (size field, header, body) into the buffer `make_buf` returns for
/// the frame's length.
pub(crate) fn encode_frame<T: Encodable + HeaderVersion, B: ByteBufMut>(
    correlation_id: i32,
    version: i16,
    body: &T,
    make_buf: impl FnOnce(usize) -> B,
) -> Result<B, String> {
    let header_version = T::header_version(version);
    let header = ResponseHeader::default().with_correlation_id(correlation_id);
    let size = header
        .compute_size(header_version)
        .and_then(|h| body.compute_size(version).map(|b| h + b))
        .map_err(|e| e.to_string())?;
    let mut buf = make_buf(size + 4);
    buf.put_i32(size as i32);
    header
        .encode(&mut buf, header_version)
        .map_err(|e| e.to_string())?;
    body.encode(&mut buf, version).map_err(|e| e.to_string())?;
    if buf.offset() != size + 4 {
        return Err(format!(
            "encoded {} bytes where {} were computed",
            buf.offset(),
            size + 4
        ));
    }
    Ok(buf)
}

/// The KIP-511 answer to an ApiVersions request newer than we serve: v0 body, header v0.
pub fn api_versions_unsupported(correlation_id: i32) -> Bytes {
    let body = ApiVersionsResponse::default()
        .with_error_code(kafka_protocol::error::ResponseError::UnsupportedVersion.code())
        .with_api_keys(api_versions_list());
    // Encoding a fixed, valid v0 message cannot fail.
    encode_response(correlation_id, 0, &body).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;
    use kafka_protocol::messages::MetadataRequest;

    fn request_bytes(key: i16, version: i16, correlation_id: i32) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_i16(key);
        b.put_i16(version);
        b.put_i32(correlation_id);
        b.put_i16(-1); // null client id
        b
    }

    #[test]
    fn served_ranges_lie_inside_what_kafka_protocol_knows() {
        for (key, min, max) in SUPPORTED_APIS {
            let known = key.valid_versions();
            assert!(*min >= known.min && *max <= known.max, "{key:?}");
        }
    }

    #[test]
    fn decodes_a_v1_header() {
        let mut b = request_bytes(ApiKey::Metadata as i16, 4, 77);
        MetadataRequest::default().encode(&mut b, 4).unwrap();
        let frame = decode_header(b.freeze()).unwrap();
        assert_eq!(frame.api_key, ApiKey::Metadata);
        assert_eq!(frame.header.correlation_id, 77);
        assert_eq!(frame.version, 4);
    }

    #[test]
    fn unknown_key_and_version_are_refused() {
        let b = request_bytes(999, 0, 1);
        assert!(matches!(
            decode_header(b.freeze()),
            Err(HeaderError::UnknownApiKey(999))
        ));
        let b = request_bytes(ApiKey::Metadata as i16, 99, 1);
        assert!(matches!(
            decode_header(b.freeze()),
            Err(HeaderError::UnsupportedVersion { .. })
        ));
        let b = request_bytes(ApiKey::ApiVersions as i16, 99, 5);
        assert!(matches!(
            decode_header(b.freeze()),
            Err(HeaderError::ApiVersionsTooNew {
                correlation_id: 5,
                ..
            })
        ));
    }

    #[test]
    fn unsupported_api_versions_answer_is_v0_shaped() {
        let frame = api_versions_unsupported(9);
        let mut body = frame.slice(4..);
        let header = ResponseHeader::decode(&mut body, 0).unwrap();
        assert_eq!(header.correlation_id, 9);
        let resp = ApiVersionsResponse::decode(&mut body, 0).unwrap();
        assert_eq!(resp.error_code, 35);
        assert_eq!(resp.api_keys.len(), SUPPORTED_APIS.len());
    }

    #[test]
    fn hostile_count_is_a_decode_error_not_an_abort() {
        // Metadata v4: topics count i32::MAX followed by nothing.
        let mut b = request_bytes(ApiKey::Metadata as i16, 4, 1);
        b.put_i32(i32::MAX);
        let mut frame = decode_header(b.freeze()).unwrap();
        assert!(decode_body::<MetadataRequest>(&mut frame.body, 4).is_err());
    }

    #[test]
    fn hostile_group_counts_are_decode_errors() {
        use kafka_protocol::messages::{
            ConsumerGroupHeartbeatRequest, JoinGroupRequest, OffsetCommitRequest,
        };
        // Each body once with a valid empty array (it decodes) and once with a hostile count.
        // JoinGroup v5: group "g", timeouts, member "", instance null, type "c", protocols.
        let join = |count: i32| {
            let mut b = BytesMut::new();
            b.extend_from_slice(&[
                0, 1, b'g', 0, 0, 0x27, 0x10, 0, 0, 0x27, 0x10, 0, 0, 0xff, 0xff,
            ]);
            b.extend_from_slice(&[0, 1, b'c']);
            b.put_i32(count);
            b.freeze()
        };
        assert!(decode_body::<JoinGroupRequest>(&mut join(0), 5).is_ok());
        assert!(decode_body::<JoinGroupRequest>(&mut join(i32::MAX), 5).is_err());
        // OffsetCommit v7: group "g", generation, member "", instance null, topics.
        let commit = |count: i32| {
            let mut b = BytesMut::new();
            b.extend_from_slice(&[0, 1, b'g', 0xff, 0xff, 0xff, 0xff, 0, 0, 0xff, 0xff]);
            b.put_i32(count);
            b.freeze()
        };
        assert!(decode_body::<OffsetCommitRequest>(&mut commit(0), 7).is_ok());
        assert!(decode_body::<OffsetCommitRequest>(&mut commit(i32::MAX), 7).is_err());
        // ConsumerGroupHeartbeat v0 (flexible): subscribed topics as a compact array.
        let heartbeat = |count: &[u8]| {
            let mut b = BytesMut::new();
            b.extend_from_slice(&[2, b'g', 1, 0, 0, 0, 0, 0, 0, 0, 0, 0x27, 0x10]);
            b.extend_from_slice(count);
            b.extend_from_slice(&[0, 0, 0]); // null assignor, null partitions, no tags
            b.freeze()
        };
        assert!(decode_body::<ConsumerGroupHeartbeatRequest>(&mut heartbeat(&[1]), 0).is_ok());
        let huge = [0xff, 0xff, 0xff, 0xff, 0x0f];
        assert!(decode_body::<ConsumerGroupHeartbeatRequest>(&mut heartbeat(&huge), 0).is_err());
    }
}
