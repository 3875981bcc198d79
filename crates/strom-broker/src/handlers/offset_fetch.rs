//! OffsetFetch: committed offsets of one group (v1-7) or several (v8+); -1 where nothing is
//! committed; all of a group's committed partitions when no topics are given.

use std::sync::Arc;

use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponseGroup, OffsetFetchResponsePartition, OffsetFetchResponsePartitions,
    OffsetFetchResponseTopic, OffsetFetchResponseTopics,
};
use kafka_protocol::messages::{OffsetFetchRequest, OffsetFetchResponse, TopicName};
use strom_group::records::OffsetValue;
use strom_group::GroupError;

use super::{str_bytes, Ctx, HandlerError, Reply};
use crate::broker::Broker;

type Fetched = Result<Vec<(String, i32, Option<OffsetValue>)>, GroupError>;
/// A topic's partitions with their committed offsets (`None`: nothing committed).
type TopicOffsets = (String, Vec<(i32, Option<OffsetValue>)>);

/// One partition's answer; the v8+ and older response types have the same fields.
macro_rules! partition_answer {
    ($ty:ty, $p:expr, $o:expr) => {{
        let o: Option<&OffsetValue> = $o;
        <$ty>::default()
            .with_partition_index($p)
            .with_committed_offset(o.map_or(-1, |o| o.offset))
            .with_committed_leader_epoch(o.map_or(-1, |o| o.leader_epoch))
            .with_metadata(Some(str_bytes(o.map_or("", |o| o.metadata.as_str()))))
    }};
}

fn fetch(broker: &Broker, group: &str, topics: Option<Vec<(String, Vec<i32>)>>) -> Fetched {
    let partitions = topics.map(|ts| {
        ts.into_iter()
            .flat_map(|(t, ps)| ps.into_iter().map(move |p| (t.clone(), p)))
            .collect()
    });
    broker.groups.fetch_offsets(group, partitions)
}

/// Groups the fetched partitions by topic, in first-seen order.
fn by_topic(rows: Vec<(String, i32, Option<OffsetValue>)>) -> Vec<TopicOffsets> {
    let mut out: Vec<TopicOffsets> = Vec::new();
    for (t, p, v) in rows {
        match out.iter_mut().find(|(n, _)| *n == t) {
            Some((_, ps)) => ps.push((p, v)),
            None => out.push((t, vec![(p, v)])),
        }
    }
    out
}

pub fn handle(broker: &Arc<Broker>, ctx: &mut Ctx) -> Result<Reply, HandlerError> {
    let req: OffsetFetchRequest = ctx.decode()?;
    let v = ctx.version;
    let mut resp = OffsetFetchResponse::default();
    if v >= 8 {
        for g in &req.groups {
            let topics = g.topics.as_ref().map(|ts| {
                ts.iter()
                    .map(|t| (t.name.0.to_string(), t.partition_indexes.clone()))
                    .collect()
            });
            let mut group = OffsetFetchResponseGroup::default().with_group_id(g.group_id.clone());
            match fetch(broker, g.group_id.0.as_str(), topics) {
                Err(e) => group.error_code = e.code(),
                Ok(rows) => {
                    group.topics = by_topic(rows)
                        .into_iter()
                        .map(|(t, ps)| {
                            OffsetFetchResponseTopics::default()
                                .with_name(TopicName(str_bytes(&t)))
                                .with_partitions(
                                    ps.iter()
                                        .map(|(p, o)| {
                                            partition_answer!(
                                                OffsetFetchResponsePartitions,
                                                *p,
                                                o.as_ref()
                                            )
                                        })
                                        .collect(),
                                )
                        })
                        .collect();
                }
            }
            resp.groups.push(group);
        }
        return ctx.reply(&resp);
    }
    let topics = req.topics.as_ref().map(|ts| {
        ts.iter()
            .map(|t| (t.name.0.to_string(), t.partition_indexes.clone()))
            .collect::<Vec<_>>()
    });
    let asked = topics.clone();
    match fetch(broker, req.group_id.0.as_str(), topics) {
        Err(e) => {
            if v >= 2 {
                resp.error_code = e.code();
            }
            // Before v2 the error is reported on every asked partition.
            resp.topics = asked
                .unwrap_or_default()
                .into_iter()
                .map(|(t, ps)| {
                    OffsetFetchResponseTopic::default()
                        .with_name(TopicName(str_bytes(&t)))
                        .with_partitions(
                            ps.into_iter()
                                .map(|p| {
                                    partition_answer!(OffsetFetchResponsePartition, p, None)
                                        .with_error_code(e.code())
                                })
                                .collect(),
                        )
                })
                .collect();
        }
        Ok(rows) => {
            resp.topics = by_topic(rows)
                .into_iter()
                .map(|(t, ps)| {
                    OffsetFetchResponseTopic::default()
                        .with_name(TopicName(str_bytes(&t)))
                        .with_partitions(
                            ps.iter()
                                .map(|(p, o)| {
                                    partition_answer!(OffsetFetchResponsePartition, *p, o.as_ref())
                                })
                                .collect(),
                        )
                })
                .collect();
        }
    }
    ctx.reply(&resp)
}
