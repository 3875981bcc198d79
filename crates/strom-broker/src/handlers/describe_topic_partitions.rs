//! DescribeTopicPartitions (KIP-966): each partition's leader, epoch, replicas, ISR, eligible
//! leader replicas and offline replicas, from this broker's metadata image. Topics are answered
//! in name order and paged: at most `response_partition_limit` partitions per response, with a
//! `next_cursor` (topic, partition) where the next page starts.

use std::collections::BTreeSet;
use std::sync::Arc;

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::describe_topic_partitions_response::{
    Cursor, DescribeTopicPartitionsResponsePartition, DescribeTopicPartitionsResponseTopic,
};
use kafka_protocol::messages::{
    BrokerId, DescribeTopicPartitionsRequest, DescribeTopicPartitionsResponse, TopicName,
};
use strom_group::coordinator::OFFSETS_TOPIC;
use strom_meta::controller::validate_topic_name;
use strom_meta::{MetadataImage, PartitionImage, TopicImage};
use uuid::Uuid;

use super::{str_bytes, Ctx, HandlerError, Reply};
use crate::broker::Broker;

/// Kafka caps the limit a client asks for at `max.request.partition.size.limit` (2000).
const MAX_PARTITIONS_PER_RESPONSE: i32 = 2000;

/// No authorizer computes operations here, as in Metadata: Kafka's "not provided" value.
const OPS_NOT_PROVIDED: i32 = i32::MIN;

pub fn handle(broker: &Arc<Broker>, ctx: &mut Ctx) -> Result<Reply, HandlerError> {
    let req: DescribeTopicPartitionsRequest = ctx.decode()?;
    let image = broker.image();
    ctx.reply(&describe(&image, &req))
}

/// The answer to `req` from `image`.
///
/// As in Kafka: an empty topic list means every topic; topics sort by name and those before
/// the cursor's topic are skipped; the cursor's partition index applies to its own topic only;
/// unknown names (only possible when listed) are answered with an error and use none of the
/// partition budget. A listed topic set must contain the cursor's topic (INVALID_REQUEST).
/// Where Kafka would return an empty page that points at itself (a limit of 0) or nothing at
/// all (a negative limit), at least one partition is returned so that paging always ends.
pub fn describe(
    image: &MetadataImage,
    req: &DescribeTopicPartitionsRequest,
) -> DescribeTopicPartitionsResponse {
    let all = req.topics.is_empty();
    let cursor_topic = req.cursor.as_ref().map_or("", |c| c.topic_name.0.as_str());
    let names: BTreeSet<&str> = if all {
        image.topics.keys().map(|n| n.as_str()).collect()
    } else {
        req.topics.iter().map(|t| t.name.0.as_str()).collect()
    };
    let names: BTreeSet<&str> = names.into_iter().filter(|n| *n >= cursor_topic).collect();
    if !all && req.cursor.is_some() && !names.contains(cursor_topic) {
        return invalid_request(req);
    }

    let mut resp = DescribeTopicPartitionsResponse::default();
    let mut remaining = req
        .response_partition_limit
        .clamp(1, MAX_PARTITIONS_PER_RESPONSE) as usize;
    for name in names {
        if remaining == 0 {
            // Every earlier topic is complete: the next page starts at this one.
            resp.next_cursor = Some(cursor(name, 0));
            break;
        }
        let Some(topic) = image.topic(name) else {
            let code = match validate_topic_name(name) {
                Ok(()) => ResponseError::UnknownTopicOrPartition,
                Err(_) => ResponseError::InvalidTopicException,
            };
            resp.topics.push(error_topic(name, code));
            continue;
        };
        let first = match &req.cursor {
            Some(c) if c.topic_name.0.as_str() == name => c.partition_index.max(0),
            _ => 0,
        };
        let mut left = topic.partitions.range(first..).map(|(_, p)| p);
        let partitions: Vec<_> = left
            .by_ref()
            .take(remaining)
            .map(|p| partition_entry(image, p))
            .collect();
        remaining -= partitions.len();
        resp.topics.push(topic_entry(topic, partitions));
        if let Some(next) = left.next() {
            resp.next_cursor = Some(cursor(name, next.partition));
            break;
        }
    }
    resp
}

fn cursor(topic: &str, partition: i32) -> Cursor {
    Cursor::default()
        .with_topic_name(TopicName(str_bytes(topic)))
        .with_partition_index(partition)
}

fn ids(v: &[i32]) -> Vec<BrokerId> {
    v.iter().map(|b| BrokerId(*b)).collect()
}

fn partition_entry(
    image: &MetadataImage,
    p: &PartitionImage,
) -> DescribeTopicPartitionsResponsePartition {
    let offline: Vec<i32> = p
        .replicas
        .iter()
        .copied()
        .filter(|r| !image.is_live(*r))
        .collect();
    DescribeTopicPartitionsResponsePartition::default()
        .with_partition_index(p.partition)
        .with_leader_id(BrokerId(p.leader))
        .with_leader_epoch(p.leader_epoch)
        .with_replica_nodes(ids(&p.replicas))
        .with_isr_nodes(ids(&p.isr))
        .with_eligible_leader_replicas(Some(ids(&p.elr)))
        .with_last_known_elr(Some(ids(&p.last_known_elr)))
        .with_offline_replicas(ids(&offline))
}

fn topic_entry(
    t: &TopicImage,
    partitions: Vec<DescribeTopicPartitionsResponsePartition>,
) -> DescribeTopicPartitionsResponseTopic {
    DescribeTopicPartitionsResponseTopic::default()
        .with_name(Some(TopicName(str_bytes(&t.name))))
        .with_topic_id(Uuid::from_bytes(t.topic_id))
        .with_is_internal(t.name == OFFSETS_TOPIC)
        .with_partitions(partitions)
        .with_topic_authorized_operations(OPS_NOT_PROVIDED)
}

fn error_topic(name: &str, code: ResponseError) -> DescribeTopicPartitionsResponseTopic {
    DescribeTopicPartitionsResponseTopic::default()
        .with_error_code(code.code())
        .with_name(Some(TopicName(str_bytes(name))))
        .with_topic_id(Uuid::nil())
        .with_is_internal(name == OFFSETS_TOPIC)
        .with_topic_authorized_operations(OPS_NOT_PROVIDED)
}

/// Kafka's error response: every listed topic with the error and nothing else.
fn invalid_request(req: &DescribeTopicPartitionsRequest) -> DescribeTopicPartitionsResponse {
    let mut names: Vec<&str> = req.topics.iter().map(|t| t.name.0.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    DescribeTopicPartitionsResponse::default().with_topics(
        names
            .into_iter()
            .map(|n| error_topic(n, ResponseError::InvalidRequest))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use kafka_protocol::messages::describe_topic_partitions_request::{
        Cursor as RequestCursor, TopicRequest,
    };
    use strom_meta::MetadataRecord;

    use super::*;

    /// Brokers 1..=3 (3 fenced); topics "a" (3 partitions), "b" (1), "c" (2) on [1, 2, 3].
    fn image() -> MetadataImage {
        let mut records = Vec::new();
        for b in 1..=3 {
            records.push(MetadataRecord::RegisterBroker {
                broker_id: b,
                host: "localhost".into(),
                port: 9091 + b,
                rack: None,
            });
        }
        records.push(MetadataRecord::FenceBroker { broker_id: 3 });
        for (i, (name, n)) in [("a", 3), ("b", 1), ("c", 2)].into_iter().enumerate() {
            let topic_id = [i as u8 + 1; 16];
            records.push(MetadataRecord::Topic {
                name: name.into(),
                topic_id,
            });
            for p in 0..n {
                records.push(MetadataRecord::Partition {
                    topic_id,
                    partition: p,
                    replicas: vec![1, 2, 3],
                    isr: vec![1],
                    leader: 1,
                    leader_epoch: 4,
                    partition_epoch: 7,
                    elr: vec![2],
                    last_known_elr: vec![3],
                    adding_replicas: vec![],
                    removing_replicas: vec![],
                });
            }
        }
        MetadataImage::empty().apply(0, &records).0
    }

    fn request(
        topics: &[&str],
        limit: i32,
        cursor: Option<(&str, i32)>,
    ) -> DescribeTopicPartitionsRequest {
        DescribeTopicPartitionsRequest::default()
            .with_topics(
                topics
                    .iter()
                    .map(|t| TopicRequest::default().with_name(TopicName(str_bytes(t))))
                    .collect(),
            )
            .with_response_partition_limit(limit)
            .with_cursor(cursor.map(|(t, p)| {
                RequestCursor::default()
                    .with_topic_name(TopicName(str_bytes(t)))
                    .with_partition_index(p)
            }))
    }

    /// (topic, partition) pairs of a response, in order, and its next cursor.
    type Page = (Vec<(String, i32)>, Option<(String, i32)>);

    fn pages(resp: &DescribeTopicPartitionsResponse) -> Page {
        let parts = resp
            .topics
            .iter()
            .flat_map(|t| {
                let name = t.name.as_ref().unwrap().0.to_string();
                t.partitions
                    .iter()
                    .map(move |p| (name.clone(), p.partition_index))
            })
            .collect();
        let next = resp
            .next_cursor
            .as_ref()
            .map(|c| (c.topic_name.0.to_string(), c.partition_index));
        (parts, next)
    }

    #[test]
    fn fields_of_a_partition() {
        let resp = describe(&image(), &request(&["b"], 10, None));
        assert!(resp.next_cursor.is_none());
        let t = &resp.topics[0];
        assert_eq!(t.error_code, 0);
        assert_eq!(t.topic_id, Uuid::from_bytes([2; 16]));
        assert!(!t.is_internal);
        let p = &t.partitions[0];
        assert_eq!((p.leader_id.0, p.leader_epoch), (1, 4));
        assert_eq!(p.replica_nodes, ids(&[1, 2, 3]));
        assert_eq!(p.isr_nodes, ids(&[1]));
        assert_eq!(p.eligible_leader_replicas, Some(ids(&[2])));
        assert_eq!(p.last_known_elr, Some(ids(&[3])));
        assert_eq!(p.offline_replicas, ids(&[3]), "the fenced broker");
    }

    #[test]
    fn every_partition_exactly_once_whatever_the_page_size() {
        let img = image();
        let everything: Vec<(String, i32)> =
            [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("c", 0), ("c", 1)]
                .iter()
                .map(|(t, p)| (t.to_string(), *p))
                .collect();
        for topics in [vec![], vec!["c", "a", "b", "a"]] {
            for limit in 1..=7 {
                let mut seen = Vec::new();
                let mut cursor: Option<(String, i32)> = None;
                for _ in 0..20 {
                    let c = cursor.as_ref().map(|(t, p)| (t.as_str(), *p));
                    let (parts, next) = pages(&describe(&img, &request(&topics, limit, c)));
                    assert!(parts.len() <= limit as usize);
                    seen.extend(parts);
                    cursor = next;
                    if cursor.is_none() {
                        break;
                    }
                }
                assert_eq!(seen, everything, "topics {topics:?}, limit {limit}");
            }
        }
    }

    #[test]
    fn a_full_page_points_at_the_next_topic() {
        let (parts, next) = pages(&describe(&image(), &request(&[], 3, None)));
        assert_eq!(parts.len(), 3);
        assert_eq!(next, Some(("b".to_string(), 0)));
        // A limit below one still makes progress.
        let (parts, next) = pages(&describe(&image(), &request(&[], 0, None)));
        assert_eq!(parts, vec![("a".to_string(), 0)]);
        assert_eq!(next, Some(("a".to_string(), 1)));
    }

    #[test]
    fn unknown_and_invalid_names() {
        let resp = describe(&image(), &request(&["nope", "b", "bad/name"], 10, None));
        let codes: Vec<(String, i16, usize)> = resp
            .topics
            .iter()
            .map(|t| {
                (
                    t.name.as_ref().unwrap().0.to_string(),
                    t.error_code,
                    t.partitions.len(),
                )
            })
            .collect();
        assert_eq!(
            codes,
            vec![
                ("b".to_string(), 0, 1),
                ("bad/name".to_string(), 17, 0),
                ("nope".to_string(), 3, 0),
            ]
        );
        assert_eq!(resp.topics[2].topic_id, Uuid::nil());
    }

    #[test]
    fn a_cursor_outside_the_listed_topics_is_an_invalid_request() {
        let resp = describe(&image(), &request(&["b", "c"], 10, Some(("a", 1))));
        assert_eq!(resp.topics.len(), 2);
        assert!(resp.topics.iter().all(|t| t.error_code == 42));
        // A negative cursor partition starts at the first one.
        let (parts, _) = pages(&describe(&image(), &request(&["b"], 10, Some(("b", -5)))));
        assert_eq!(parts, vec![("b".to_string(), 0)]);
    }
}
