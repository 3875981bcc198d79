//! Group APIs on the wire, for the cases clients rarely produce on their own: batched
//! FindCoordinator keys, a batch LeaveGroup of static members, multi-group OffsetFetch,
//! OffsetDelete, and the error codes of the bad-input list.

mod common;

use bytes::Bytes;
use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
use kafka_protocol::messages::leave_group_request::MemberIdentity;
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::offset_delete_request::{
    OffsetDeleteRequestPartition, OffsetDeleteRequestTopic,
};
use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestGroup;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use strom_tests::{RawClient, StromProcess};

fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_string())
}

fn gid(v: &str) -> GroupId {
    GroupId(s(v))
}

fn commit(c: &mut RawClient, group: &str, topic: &str, partition: i32, offset: i64) -> i16 {
    commit_with_metadata(c, group, topic, partition, offset, "")
}

fn commit_with_metadata(
    c: &mut RawClient,
    group: &str,
    topic: &str,
    partition: i32,
    offset: i64,
    metadata: &str,
) -> i16 {
    let req = OffsetCommitRequest::default()
        .with_group_id(gid(group))
        .with_generation_id_or_member_epoch(-1)
        .with_member_id(s(""))
        .with_topics(vec![OffsetCommitRequestTopic::default()
            .with_name(TopicName(s(topic)))
            .with_partitions(vec![OffsetCommitRequestPartition::default()
                .with_partition_index(partition)
                .with_committed_offset(offset)
                .with_committed_leader_epoch(-1)
                .with_committed_metadata(Some(s(metadata)))])]);
    let r: OffsetCommitResponse = c.call(ApiKey::OffsetCommit, 8, &req);
    r.topics[0].partitions[0].error_code
}

/// A JoinGroup (v5, static when `instance` is set) that completes at once: the broker runs
/// with no initial delay and the member is alone.
fn join(
    c: &mut RawClient,
    group: &str,
    instance: Option<&str>,
    session_ms: i32,
) -> JoinGroupResponse {
    let req = JoinGroupRequest::default()
        .with_group_id(gid(group))
        .with_session_timeout_ms(session_ms)
        .with_rebalance_timeout_ms(10_000)
        .with_member_id(s(""))
        .with_group_instance_id(instance.map(s))
        .with_protocol_type(s("consumer"))
        .with_protocols(vec![JoinGroupRequestProtocol::default()
            .with_name(s("range"))
            .with_metadata(Bytes::from_static(b"\0\0\0\0\0\0\0\0"))]);
    c.call(ApiKey::JoinGroup, 5, &req)
}

#[tokio::test(flavor = "multi_thread")]
async fn group_api_edges_on_the_wire() {
    let srv = StromProcess::start(&["group.initial.rebalance.delay.ms=0", "group.max.size=2"]);
    common::create_topic(&srv.bootstrap(), "gp", 2, &[]).await;
    let mut c = RawClient::connect(srv.addr());

    // Batched FindCoordinator (v4): one answer per key, all this node.
    let req = FindCoordinatorRequest::default()
        .with_key_type(0)
        .with_coordinator_keys(vec![s("a"), s("b"), s("c")]);
    let r: FindCoordinatorResponse = c.call(ApiKey::FindCoordinator, 4, &req);
    assert_eq!(r.coordinators.len(), 3);
    assert!(r
        .coordinators
        .iter()
        .all(|k| k.error_code == 0 && k.node_id.0 == 1 && k.port == srv.port as i32));

    // Commits: to an unknown partition, with oversized metadata, and fine ones.
    assert_eq!(
        commit(&mut c, "ga", "gp", 7, 1),
        3,
        "UNKNOWN_TOPIC_OR_PARTITION"
    );
    assert_eq!(
        commit_with_metadata(&mut c, "ga", "gp", 0, 1, &"m".repeat(4097)),
        12,
        "OFFSET_METADATA_TOO_LARGE"
    );
    assert_eq!(commit(&mut c, "ga", "gp", 0, 11), 0);
    assert_eq!(commit(&mut c, "ga", "gp", 1, 12), 0);
    assert_eq!(commit(&mut c, "gb", "gp", 0, 21), 0);

    // Multi-group OffsetFetch (v8).
    let req = OffsetFetchRequest::default().with_groups(vec![
        OffsetFetchRequestGroup::default()
            .with_group_id(gid("ga"))
            .with_topics(None),
        OffsetFetchRequestGroup::default()
            .with_group_id(gid("gb"))
            .with_topics(None),
        OffsetFetchRequestGroup::default()
            .with_group_id(gid("nobody"))
            .with_topics(None),
    ]);
    let r: OffsetFetchResponse = c.call(ApiKey::OffsetFetch, 8, &req);
    let offsets = |g: &str| -> Vec<(i32, i64)> {
        let grp = r
            .groups
            .iter()
            .find(|x| x.group_id.0.as_str() == g)
            .unwrap();
        assert_eq!(grp.error_code, 0);
        grp.topics
            .iter()
            .flat_map(|t| {
                t.partitions
                    .iter()
                    .map(|p| (p.partition_index, p.committed_offset))
            })
            .collect()
    };
    assert_eq!(offsets("ga"), vec![(0, 11), (1, 12)]);
    assert_eq!(offsets("gb"), vec![(0, 21)]);
    assert_eq!(offsets("nobody"), vec![]);

    // OffsetDelete: an empty group's offsets go; an unknown group is GROUP_ID_NOT_FOUND.
    let delete = |c: &mut RawClient, g: &str| -> OffsetDeleteResponse {
        let req = OffsetDeleteRequest::default()
            .with_group_id(gid(g))
            .with_topics(vec![OffsetDeleteRequestTopic::default()
                .with_name(TopicName(s("gp")))
                .with_partitions(vec![
                    OffsetDeleteRequestPartition::default().with_partition_index(0)
                ])]);
        c.call(ApiKey::OffsetDelete, 0, &req)
    };
    let r = delete(&mut c, "ga");
    assert_eq!(r.error_code, 0);
    assert_eq!(r.topics[0].partitions[0].error_code, 0);
    assert_eq!(
        delete(&mut c, "nobody").error_code,
        69,
        "GROUP_ID_NOT_FOUND"
    );
    let req = OffsetFetchRequest::default()
        .with_group_id(gid("ga"))
        .with_topics(None);
    let r: OffsetFetchResponse = c.call(ApiKey::OffsetFetch, 7, &req);
    let left: Vec<i32> = r.topics[0]
        .partitions
        .iter()
        .map(|p| p.partition_index)
        .collect();
    assert_eq!(left, vec![1], "partition 0's offset deleted");

    // JoinGroup errors: a session timeout out of bounds; v4+ without a member id.
    assert_eq!(
        join(&mut c, "gs", None, 10).error_code,
        26,
        "INVALID_SESSION_TIMEOUT"
    );
    let first = join(&mut c, "gs", None, 10_000);
    assert_eq!(first.error_code, 79, "MEMBER_ID_REQUIRED");
    assert!(!first.member_id.is_empty());
    // Heartbeats from strangers and stale generations.
    let hb = |c: &mut RawClient, g: &str, m: &str, gen: i32, inst: Option<&str>| -> i16 {
        let req = HeartbeatRequest::default()
            .with_group_id(gid(g))
            .with_member_id(s(m))
            .with_generation_id(gen)
            .with_group_instance_id(inst.map(s));
        let r: HeartbeatResponse = c.call(ApiKey::Heartbeat, 3, &req);
        r.error_code
    };
    assert_eq!(
        hb(&mut c, "gs", "stranger", 1, None),
        25,
        "UNKNOWN_MEMBER_ID"
    );

    // Two static members (the group's maximum), a third is refused, a fenced old id.
    let a = join(&mut c, "gst", Some("i-a"), 10_000);
    assert_eq!(a.error_code, 0);
    let mut c2 = RawClient::connect(srv.addr());
    let handle = std::thread::spawn(move || join(&mut c2, "gst", Some("i-b"), 10_000));
    // The first member must rejoin for the rebalance to complete.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let req = JoinGroupRequest::default()
        .with_group_id(gid("gst"))
        .with_session_timeout_ms(10_000)
        .with_rebalance_timeout_ms(10_000)
        .with_member_id(a.member_id.clone())
        .with_group_instance_id(Some(s("i-a")))
        .with_protocol_type(s("consumer"))
        .with_protocols(vec![JoinGroupRequestProtocol::default()
            .with_name(s("range"))
            .with_metadata(Bytes::from_static(b"\0\0\0\0\0\0\0\0"))]);
    let a2: JoinGroupResponse = c.call(ApiKey::JoinGroup, 5, &req);
    let b = handle.join().unwrap();
    assert_eq!((a2.error_code, b.error_code), (0, 0));
    assert_eq!(a2.generation_id, b.generation_id);
    let mut c3 = RawClient::connect(srv.addr());
    assert_eq!(
        join(&mut c3, "gst", None, 10_000).error_code,
        81,
        "GROUP_MAX_SIZE_REACHED"
    );
    assert_eq!(
        hb(
            &mut c,
            "gst",
            "old-incarnation",
            a2.generation_id,
            Some("i-a")
        ),
        82,
        "FENCED_INSTANCE_ID"
    );
    assert_eq!(
        hb(
            &mut c,
            "gst",
            &a2.member_id,
            a2.generation_id + 5,
            Some("i-a")
        ),
        22,
        "ILLEGAL_GENERATION"
    );
    // DeleteGroups refuses a group with members.
    let req = DeleteGroupsRequest::default().with_groups_names(vec![gid("gst"), gid("none")]);
    let r: DeleteGroupsResponse = c.call(ApiKey::DeleteGroups, 2, &req);
    assert_eq!(r.results[0].error_code, 68, "NON_EMPTY_GROUP");
    assert_eq!(r.results[1].error_code, 69, "GROUP_ID_NOT_FOUND");

    // Batch LeaveGroup (v3+) by instance id: both static members leave, the group empties.
    let req = LeaveGroupRequest::default()
        .with_group_id(gid("gst"))
        .with_members(vec![
            MemberIdentity::default()
                .with_member_id(s(""))
                .with_group_instance_id(Some(s("i-a"))),
            MemberIdentity::default()
                .with_member_id(s(""))
                .with_group_instance_id(Some(s("i-b"))),
            MemberIdentity::default()
                .with_member_id(s(""))
                .with_group_instance_id(Some(s("i-unknown"))),
        ]);
    let r: LeaveGroupResponse = c.call(ApiKey::LeaveGroup, 4, &req);
    assert_eq!(r.error_code, 0);
    let codes: Vec<i16> = r.members.iter().map(|m| m.error_code).collect();
    assert_eq!(codes, vec![0, 0, 25]);

    // Listed by state and type; described; an unknown group is GROUP_ID_NOT_FOUND in v6.
    let req = ListGroupsRequest::default()
        .with_states_filter(vec![s("Empty")])
        .with_types_filter(vec![s("classic")]);
    let r: ListGroupsResponse = c.call(ApiKey::ListGroups, 5, &req);
    let names: Vec<&str> = r.groups.iter().map(|g| g.group_id.0.as_str()).collect();
    assert!(names.contains(&"gst") && names.contains(&"ga"), "{names:?}");
    let req = DescribeGroupsRequest::default().with_groups(vec![gid("gst"), gid("missing")]);
    let r: DescribeGroupsResponse = c.call(ApiKey::DescribeGroups, 6, &req);
    assert_eq!(r.groups[0].error_code, 0);
    assert_eq!(r.groups[0].group_state.as_str(), "Empty");
    assert_eq!(r.groups[1].error_code, 69);
    let req = ConsumerGroupDescribeRequest::default().with_group_ids(vec![gid("gst")]);
    let r: ConsumerGroupDescribeResponse = c.call(ApiKey::ConsumerGroupDescribe, 0, &req);
    assert_eq!(
        r.groups[0].error_code, 69,
        "a classic group is not a consumer group"
    );
}
