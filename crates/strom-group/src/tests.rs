//! The group state machine and the coordinator, driven with a fake clock and an in-memory log.

use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::coordinator::{GroupConfig, GroupCoordinator, KeyValue, OffsetCommit, OffsetsLog};
use crate::error::GroupError;
use crate::group::{Group, GroupState, JoinRequest, JoinResult, Outbox, SyncResult};

fn cfg() -> GroupConfig {
    GroupConfig {
        max_size: 3,
        ..GroupConfig::default()
    }
}

fn req(member_id: &str, protocols: &[(&str, &str)]) -> JoinRequest {
    JoinRequest {
        member_id: member_id.into(),
        client_id: "c".into(),
        client_host: "/127.0.0.1".into(),
        session_timeout_ms: 10_000,
        rebalance_timeout_ms: 30_000,
        protocol_type: "consumer".into(),
        protocols: protocols
            .iter()
            .map(|(n, m)| (n.to_string(), Bytes::copy_from_slice(m.as_bytes())))
            .collect(),
        require_known_member_id: false,
        ..Default::default()
    }
}

/// Sends every answer in the outbox and returns the join answers by member id.
fn deliver(out: Outbox) -> (Vec<JoinResult>, Vec<SyncResult>, bool) {
    let persist = out.persist;
    let joins = out.joins.into_iter().map(|(_, r)| r).collect();
    let syncs = out.syncs.into_iter().map(|(_, r)| r).collect();
    (joins, syncs, persist)
}

fn join(g: &mut Group, r: JoinRequest, now: i64) -> Vec<JoinResult> {
    let (tx, _rx) = oneshot::channel();
    deliver(g.join(&cfg(), r, tx, now)).0
}

/// A stable group of `n` members (no initial delay); returns their member ids.
fn stable_group(n: usize) -> (Group, Vec<String>) {
    let mut g = Group::new("g", 0, 0);
    let mut ids: Vec<String> = Vec::new();
    for _ in 0..n {
        // Everyone (re)joins so the rebalance completes with all members.
        let mut pending = vec![req("", &[("range", "sub")])];
        for id in &ids {
            pending.push(req(id, &[("range", "sub")]));
        }
        let mut results = Vec::new();
        for r in pending {
            results.extend(join(&mut g, r, 0));
        }
        let fresh = results
            .iter()
            .map(|r| r.member_id.clone())
            .find(|id| !ids.contains(id))
            .unwrap();
        ids.push(fresh);
    }
    assert_eq!(g.state, GroupState::CompletingRebalance);
    let leader = g.leader.clone().unwrap();
    let assignments = ids
        .iter()
        .map(|id| (id.clone(), Bytes::from(format!("asg-{id}"))))
        .collect();
    let (tx, _rx) = oneshot::channel();
    let gen = g.generation;
    let out = g.sync(&leader, None, gen, None, None, assignments, tx, 0);
    assert!(out.persist);
    assert_eq!(out.stored_generation, Some(gen));
    assert!(out.syncs.is_empty(), "answered only once stored");
    assert_eq!(g.state, GroupState::CompletingRebalance);
    let (_, syncs, _) = deliver(g.stored(gen, true, 0));
    assert_eq!(syncs.len(), 1);
    assert_eq!(g.state, GroupState::Stable);
    (g, ids)
}

#[test]
fn first_join_waits_for_the_initial_delay_then_completes() {
    let mut g = Group::new("g", 0, 3000);
    let out = join(&mut g, req("", &[("range", "m")]), 0);
    assert!(out.is_empty(), "held during the initial delay");
    assert_eq!(g.state, GroupState::PreparingRebalance);
    assert!(deliver(g.tick(2999)).0.is_empty());
    let (joins, _, _) = deliver(g.tick(3000));
    assert_eq!(joins.len(), 1);
    let r = &joins[0];
    assert_eq!(r.error, None);
    assert_eq!(r.generation, 1);
    assert_eq!(r.leader, r.member_id);
    assert_eq!(r.members.len(), 1);
    assert_eq!(r.protocol_name.as_deref(), Some("range"));
}

#[test]
fn initial_delay_is_extended_while_members_keep_arriving() {
    let mut g = Group::new("g", 0, 3000);
    join(&mut g, req("", &[("range", "m")]), 0);
    join(&mut g, req("", &[("range", "m")]), 2000);
    // A member arrived during the first delay: a second delay follows.
    assert!(deliver(g.tick(3000)).0.is_empty());
    let (joins, _, _) = deliver(g.tick(6000));
    assert_eq!(joins.len(), 2);
    assert!(joins.iter().all(|j| j.generation == 1));
    assert_eq!(joins.iter().filter(|j| !j.members.is_empty()).count(), 1);
}

#[test]
fn member_id_required_then_join() {
    let mut g = Group::new("g", 0, 0);
    let mut r = req("", &[("range", "m")]);
    r.require_known_member_id = true;
    let out = join(&mut g, r.clone(), 0);
    assert_eq!(out[0].error, Some(GroupError::MemberIdRequired));
    let id = out[0].member_id.clone();
    assert!(!id.is_empty());
    r.member_id = id.clone();
    let out = join(&mut g, r, 1);
    assert_eq!(out[0].error, None);
    assert_eq!(out[0].member_id, id);
    assert_eq!(out[0].generation, 1);
}

#[test]
fn a_new_member_triggers_a_rebalance_that_completes_when_everyone_rejoined() {
    let (mut g, ids) = stable_group(1);
    assert_eq!(g.generation, 1);
    assert!(join(&mut g, req("", &[("range", "m2")]), 10).is_empty());
    assert_eq!(g.state, GroupState::PreparingRebalance);
    assert_eq!(
        g.heartbeat(&ids[0], None, 1, 20),
        Err(GroupError::RebalanceInProgress)
    );
    let joins = join(&mut g, req(&ids[0], &[("range", "m1")]), 30);
    assert_eq!(joins.len(), 2);
    assert!(joins.iter().all(|j| j.generation == 2 && j.error.is_none()));
    // The old leader stays leader.
    assert!(joins.iter().all(|j| j.leader == ids[0]));
    let gen = g.generation;
    // A follower's SyncGroup waits for the leader's.
    let follower = joins.iter().find(|j| j.member_id != ids[0]).unwrap();
    let (tx, mut rx_follower) = oneshot::channel();
    let out = g.sync(&follower.member_id, None, gen, None, None, vec![], tx, 40);
    assert!(out.syncs.is_empty());
    let (tx, _rx) = oneshot::channel();
    let asg = vec![
        (ids[0].clone(), Bytes::from_static(b"a0")),
        (follower.member_id.clone(), Bytes::from_static(b"a1")),
    ];
    let out = g.sync(&ids[0], None, gen, None, None, asg, tx, 50);
    assert!(out.persist);
    assert!(
        rx_follower.try_recv().is_err(),
        "nothing before the record is durable"
    );
    for (w, r) in g.stored(gen, true, 51).syncs {
        let _ = w.send(r);
    }
    assert_eq!(
        rx_follower.try_recv().unwrap().assignment,
        Bytes::from_static(b"a1")
    );
    assert_eq!(g.state, GroupState::Stable);
}

#[test]
fn a_silent_member_expires_after_its_session_and_the_rest_rebalance() {
    let (mut g, ids) = stable_group(2);
    let gen = g.generation;
    // Member 0 keeps heartbeating; member 1 goes silent.
    for t in (1000..=9000).step_by(1000) {
        assert_eq!(g.heartbeat(&ids[0], None, gen, t), Ok(()));
        assert!(deliver(g.tick(t)).0.is_empty());
    }
    g.heartbeat(&ids[0], None, gen, 10_000).unwrap();
    g.tick(10_000);
    assert!(!g.members.contains_key(&ids[1]), "expired after 10 s");
    assert_eq!(g.state, GroupState::PreparingRebalance);
    let joins = join(&mut g, req(&ids[0], &[("range", "sub")]), 10_100);
    assert_eq!(joins.len(), 1, "completes as soon as the survivor rejoins");
    assert_eq!(joins[0].generation, gen + 1);
    assert_eq!(joins[0].members.len(), 1);
}

#[test]
fn a_member_that_never_rejoins_holds_the_rebalance_only_until_the_timeout() {
    let (mut g, ids) = stable_group(2);
    // Member 1 keeps heartbeating but never rejoins.
    let gen = g.generation;
    assert!(join(&mut g, req(&ids[0], &[("range", "new")]), 0).is_empty());
    for t in (1000..30_000).step_by(1000) {
        assert_eq!(
            g.heartbeat(&ids[1], None, gen, t),
            Err(GroupError::RebalanceInProgress)
        );
        assert!(deliver(g.tick(t)).0.is_empty());
    }
    let (joins, _, _) = deliver(g.tick(30_000));
    assert_eq!(joins.len(), 1);
    assert_eq!(joins[0].member_id, ids[0]);
    assert!(!g.members.contains_key(&ids[1]));
}

#[test]
fn errors_for_wrong_members_generations_and_protocols() {
    let (mut g, ids) = stable_group(1);
    assert_eq!(
        g.heartbeat("nobody", None, 1, 0),
        Err(GroupError::UnknownMemberId)
    );
    assert_eq!(
        g.heartbeat(&ids[0], None, 7, 0),
        Err(GroupError::IllegalGeneration)
    );
    let out = join(&mut g, req("", &[("roundrobin", "m")]), 0);
    assert_eq!(out[0].error, Some(GroupError::InconsistentGroupProtocol));
    let mut other_type = req("", &[("range", "m")]);
    other_type.protocol_type = "connect".into();
    let out = join(&mut g, other_type, 0);
    assert_eq!(out[0].error, Some(GroupError::InconsistentGroupProtocol));
    let mut short = req("", &[("range", "m")]);
    short.session_timeout_ms = 100;
    assert_eq!(
        join(&mut g, short, 0)[0].error,
        Some(GroupError::InvalidSessionTimeout)
    );
    assert_eq!(
        join(&mut g, req("ghost", &[("range", "m")]), 0)[0].error,
        Some(GroupError::UnknownMemberId)
    );
    let (tx, _rx) = oneshot::channel();
    let (_, syncs, _) = deliver(g.sync(&ids[0], None, 99, None, None, vec![], tx, 0));
    assert_eq!(syncs[0].error, Some(GroupError::IllegalGeneration));
    let (tx, _rx) = oneshot::channel();
    let (_, syncs, _) = deliver(g.sync(&ids[0], None, 1, Some("connect"), None, vec![], tx, 0));
    assert_eq!(syncs[0].error, Some(GroupError::InconsistentGroupProtocol));
}

#[test]
fn group_max_size_is_enforced() {
    let (mut g, _) = stable_group(3);
    let out = join(&mut g, req("", &[("range", "m")]), 0);
    assert_eq!(out[0].error, Some(GroupError::GroupMaxSizeReached));
    assert_eq!(
        g.state,
        GroupState::Stable,
        "a refused join does not rebalance"
    );
}

#[test]
fn static_member_rejoin_keeps_its_assignment_without_a_rebalance() {
    let mut g = Group::new("g", 0, 0);
    let mut r = req("", &[("range", "sub")]);
    r.group_instance_id = Some("inst-1".into());
    let j = join(&mut g, r.clone(), 0);
    let old_id = j[0].member_id.clone();
    let (tx, _rx) = oneshot::channel();
    g.sync(
        &old_id,
        Some("inst-1"),
        1,
        None,
        None,
        vec![(old_id.clone(), Bytes::from_static(b"mine"))],
        tx,
        0,
    );
    g.stored(1, true, 0);
    assert_eq!(g.state, GroupState::Stable);
    // The process restarts: same instance id, no member id.
    let j = join(&mut g, r.clone(), 1000);
    assert_eq!(j[0].error, None);
    assert_eq!(j[0].generation, 1, "no new generation");
    let new_id = j[0].member_id.clone();
    assert_ne!(new_id, old_id);
    assert_eq!(g.state, GroupState::Stable);
    let (tx, _rx) = oneshot::channel();
    let (_, syncs, _) = deliver(g.sync(&new_id, Some("inst-1"), 1, None, None, vec![], tx, 1000));
    assert_eq!(syncs[0].assignment, Bytes::from_static(b"mine"));
    // The old incarnation is fenced.
    assert_eq!(
        g.heartbeat(&old_id, Some("inst-1"), 1, 1000),
        Err(GroupError::FencedInstanceId)
    );
    assert_eq!(
        g.validate_commit(&old_id, Some("inst-1"), 1),
        Err(GroupError::FencedInstanceId)
    );
}

#[test]
fn leaving_rebalances_and_the_last_leave_empties_the_group() {
    let (mut g, ids) = stable_group(2);
    let gen = g.generation;
    let (res, _) = g.leave(&[(ids[1].clone(), None)], 0);
    assert_eq!(res, vec![Ok(ids[1].clone())]);
    assert_eq!(g.state, GroupState::PreparingRebalance);
    let (res, out) = g.leave(&[(ids[0].clone(), None), ("ghost".into(), None)], 1);
    assert_eq!(res[1], Err(GroupError::UnknownMemberId));
    assert!(out.persist, "the empty group is stored");
    assert_eq!(g.state, GroupState::Empty);
    assert_eq!(g.generation, gen + 1);
}

#[test]
fn a_member_that_never_syncs_after_the_leader_is_removed_at_the_deadline() {
    let mut g = Group::new("g", 0, 0);
    let j1 = join(&mut g, req("", &[("range", "s")]), 0);
    let a = j1[0].member_id.clone();
    join(&mut g, req("", &[("range", "s")]), 1);
    let joins = join(&mut g, req(&a, &[("range", "s")]), 2);
    assert_eq!(joins.len(), 2);
    let b = joins
        .iter()
        .find(|j| j.member_id != a)
        .unwrap()
        .member_id
        .clone();
    let gen = g.generation;
    let leader = g.leader.clone().unwrap();
    let (tx, _rx) = oneshot::channel();
    g.sync(&leader, None, gen, None, None, vec![], tx, 3);
    g.stored(gen, true, 3);
    assert_eq!(g.state, GroupState::Stable);
    let silent = if leader == a { b } else { a };
    // The silent member keeps heartbeating but never syncs: at the rebalance deadline it goes.
    for t in (1000..30_000).step_by(1000) {
        let _ = g.heartbeat(&silent, None, gen, t);
        let _ = g.heartbeat(&leader, None, gen, t);
        assert!(deliver(g.tick(t)).0.is_empty());
        assert!(g.members.contains_key(&silent));
    }
    g.tick(30_002);
    assert!(!g.members.contains_key(&silent));
    assert_eq!(g.state, GroupState::PreparingRebalance);
}

#[test]
fn a_failed_store_of_the_assignment_rebalances_instead_of_going_stable() {
    let mut g = Group::new("g", 0, 0);
    let j = join(&mut g, req("", &[("range", "s")]), 0);
    let id = j[0].member_id.clone();
    let gen = g.generation;
    let (tx, mut rx) = oneshot::channel();
    g.sync(
        &id,
        None,
        gen,
        None,
        None,
        vec![(id.clone(), Bytes::from_static(b"x"))],
        tx,
        1,
    );
    for (w, r) in g.stored(gen, false, 2).syncs {
        let _ = w.send(r);
    }
    assert_eq!(
        rx.try_recv().unwrap().error,
        Some(GroupError::RebalanceInProgress)
    );
    assert_eq!(g.state, GroupState::PreparingRebalance);
    assert!(g.members[&id].assignment.is_empty());
    // A late confirmation for that generation changes nothing.
    assert!(g.stored(gen, true, 3).syncs.is_empty());
    assert_eq!(g.state, GroupState::PreparingRebalance);
}

#[test]
fn commits_are_checked_against_member_and_generation() {
    let (g, ids) = stable_group(1);
    assert_eq!(g.validate_commit(&ids[0], None, 1), Ok(()));
    assert_eq!(
        g.validate_commit(&ids[0], None, 0),
        Err(GroupError::IllegalGeneration)
    );
    assert_eq!(
        g.validate_commit("", None, -1),
        Err(GroupError::UnknownMemberId)
    );
    let empty = Group::new("e", 0, 0);
    assert_eq!(empty.validate_commit("", None, -1), Ok(()));
}

#[test]
fn stored_group_metadata_restores_the_group() {
    let (g, ids) = stable_group(2);
    let v = crate::records::GroupValue::decode(&g.to_record().encode()).unwrap();
    let mut restored = Group::new("g", 0, 0);
    restored.restore(v, 100);
    assert_eq!(restored.state, GroupState::Stable);
    assert_eq!(restored.generation, g.generation);
    assert_eq!(restored.leader, g.leader);
    for id in &ids {
        assert_eq!(restored.members[id].assignment, g.members[id].assignment);
        assert_eq!(restored.heartbeat(id, None, g.generation, 200), Ok(()));
    }
}

// ---- coordinator ----

#[derive(Default)]
struct MemLog {
    parts: Mutex<std::collections::HashMap<i32, Vec<KeyValue>>>,
    fail: std::sync::atomic::AtomicBool,
    /// Appends succeed but never become durable.
    fail_durability: std::sync::atomic::AtomicBool,
}

impl OffsetsLog for MemLog {
    fn append(
        &self,
        partition: i32,
        records: Vec<KeyValue>,
    ) -> Result<BoxFuture<'static, Result<(), GroupError>>, GroupError> {
        if self.fail.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(GroupError::StorageError);
        }
        self.parts
            .lock()
            .entry(partition)
            .or_default()
            .extend(records);
        if self
            .fail_durability
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Ok(Box::pin(async { Err(GroupError::StorageError) }));
        }
        Ok(Box::pin(async { Ok(()) }))
    }
    fn read_all(&self, partition: i32) -> Result<Vec<KeyValue>, GroupError> {
        Ok(self
            .parts
            .lock()
            .get(&partition)
            .cloned()
            .unwrap_or_default())
    }
}

fn coordinator(log: &MemLog) -> GroupCoordinator {
    let c = GroupCoordinator::new(GroupConfig {
        initial_rebalance_delay_ms: 0,
        offsets_retention_check_interval_ms: 1000,
        offsets_retention_ms: 60_000,
        ..GroupConfig::default()
    });
    c.begin_load(4);
    for p in 0..4 {
        c.load(log, p, 0).unwrap();
    }
    c
}

fn commit(t: &str, p: i32, o: i64) -> OffsetCommit {
    OffsetCommit {
        topic: t.into(),
        partition: p,
        offset: o,
        leader_epoch: 0,
        metadata: Some("meta".into()),
    }
}

#[test]
fn kafka_hash_placement() {
    // Java: "my-group".hashCode() == 1164000436... computed with Java's definition.
    assert_eq!(crate::coordinator::java_string_hash(""), 0);
    assert_eq!(crate::coordinator::java_string_hash("a"), 97);
    assert_eq!(crate::coordinator::java_string_hash("ab"), 97 * 31 + 98);
    for g in ["x", "group-1", "a much longer group name ü"] {
        let p = crate::coordinator::partition_for(g, 50);
        assert!((0..50).contains(&p));
    }
}

#[tokio::test]
async fn offsets_commit_fetch_and_survive_a_reload() {
    let log = MemLog::default();
    let c = coordinator(&log);
    let exists = |t: &str, p: i32| t == "t" && p < 2;
    let res = c
        .commit_offsets(
            &log,
            "g",
            "",
            None,
            -1,
            vec![commit("t", 0, 10), commit("t", 1, 20), commit("nope", 0, 1)],
            &exists,
            5,
        )
        .await
        .unwrap();
    assert_eq!(res[0].2, Ok(()));
    assert_eq!(res[2].2, Err(GroupError::UnknownTopicOrPartition));
    let big = OffsetCommit {
        metadata: Some("x".repeat(5000)),
        ..commit("t", 0, 11)
    };
    let res = c
        .commit_offsets(&log, "g", "", None, -1, vec![big], &exists, 6)
        .await
        .unwrap();
    assert_eq!(res[0].2, Err(GroupError::OffsetMetadataTooLarge));
    let got = c
        .fetch_offsets("g", Some(vec![("t".into(), 0), ("t".into(), 5)]))
        .unwrap();
    assert_eq!(got[0].2.as_ref().unwrap().offset, 10);
    assert!(got[1].2.is_none());

    // A new coordinator over the same log sees the same offsets.
    let c2 = coordinator(&log);
    let all = c2.fetch_offsets("g", None).unwrap();
    assert_eq!(
        all.iter()
            .map(|(t, p, v)| (t.clone(), *p, v.as_ref().unwrap().offset))
            .collect::<Vec<_>>(),
        vec![("t".to_string(), 0, 10), ("t".to_string(), 1, 20)]
    );
}

#[tokio::test]
async fn load_in_progress_and_not_coordinator() {
    let log = MemLog::default();
    let c = GroupCoordinator::new(GroupConfig::default());
    assert_eq!(
        c.heartbeat("g", "m", None, 1, 0),
        Err(GroupError::CoordinatorNotAvailable)
    );
    c.begin_load(1);
    assert_eq!(
        c.heartbeat("g", "m", None, 1, 0),
        Err(GroupError::CoordinatorLoadInProgress)
    );
    assert_eq!(
        c.fetch_offsets("g", None).unwrap_err(),
        GroupError::CoordinatorLoadInProgress
    );
    c.load(&log, 0, 0).unwrap();
    assert_eq!(
        c.heartbeat("g", "m", None, 1, 0),
        Err(GroupError::UnknownMemberId)
    );
}

#[tokio::test]
async fn join_sync_through_the_coordinator_persists_the_group() {
    let log = Arc::new(MemLog::default());
    let c = coordinator(&log);
    let r = c.join(&*log, "g", req("", &[("range", "sub")]), 0).await;
    assert_eq!(r.error, None);
    let s = c
        .sync(
            &*log,
            "g",
            &r.member_id,
            None,
            r.generation,
            Some("consumer"),
            Some("range"),
            vec![(r.member_id.clone(), Bytes::from_static(b"a"))],
            0,
        )
        .await;
    assert_eq!(s.error, None);
    assert_eq!(s.assignment, Bytes::from_static(b"a"));
    let d = c.describe("g").unwrap();
    assert_eq!(d.state, GroupState::Stable);
    assert_eq!(d.members.len(), 1);
    // Deleting a group with members is refused; unknown groups are not found.
    assert_eq!(
        c.delete_group(&*log, "g", 1).await,
        Err(GroupError::NonEmptyGroup)
    );
    assert_eq!(
        c.delete_group(&*log, "nope", 1).await,
        Err(GroupError::GroupIdNotFound)
    );
    // Reloaded from the log, the group is still there with its member.
    let c2 = coordinator(&log);
    let d = c2.describe("g").unwrap();
    assert_eq!(d.state, GroupState::Stable);
    assert_eq!(d.members[0].assignment, Bytes::from_static(b"a"));
    // The member leaves; the group is empty and can be deleted, also after a reload.
    c2.leave(&*log, "g", &[(r.member_id.clone(), None)], 2)
        .unwrap();
    c2.commit_offsets(
        &*log,
        "g",
        "",
        None,
        -1,
        vec![commit("t", 0, 1)],
        &|_, _| true,
        3,
    )
    .await
    .unwrap();
    assert_eq!(c2.delete_group(&*log, "g", 4).await, Ok(()));
    let c3 = coordinator(&log);
    assert_eq!(c3.describe("g").unwrap().state, GroupState::Dead);
    assert!(c3.fetch_offsets("g", None).unwrap().is_empty());
}

#[tokio::test]
async fn offsets_of_an_empty_group_expire_after_retention() {
    let log = MemLog::default();
    let c = coordinator(&log);
    c.commit_offsets(
        &log,
        "simple",
        "",
        None,
        -1,
        vec![commit("t", 0, 1)],
        &|_, _| true,
        1000,
    )
    .await
    .unwrap();
    c.tick(&log, &|_| None, 30_000);
    assert_eq!(c.fetch_offsets("simple", None).unwrap().len(), 1);
    c.tick(&log, &|_| None, 61_000);
    assert!(c.fetch_offsets("simple", None).unwrap().is_empty());
    assert_eq!(c.describe("simple").unwrap().state, GroupState::Dead);
    // The expiry was written: a reload does not bring the offset back.
    let c2 = coordinator(&log);
    assert!(c2.fetch_offsets("simple", None).unwrap().is_empty());
}

#[tokio::test]
async fn a_failed_write_fails_the_commit() {
    let log = MemLog::default();
    let c = coordinator(&log);
    log.fail.store(true, std::sync::atomic::Ordering::Relaxed);
    let r = c
        .commit_offsets(
            &log,
            "g",
            "",
            None,
            -1,
            vec![commit("t", 0, 1)],
            &|_, _| true,
            0,
        )
        .await;
    assert_eq!(r.unwrap_err(), GroupError::StorageError);
    assert!(c.fetch_offsets("g", None).unwrap().is_empty());
}

#[tokio::test]
async fn classic_and_consumer_protocols_do_not_mix_in_one_group() {
    use crate::consumer::{HeartbeatRequest, TopicInfo};
    let log = Arc::new(MemLog::default());
    let c = coordinator(&log);
    let topics = |n: &str| {
        (n == "t").then_some(TopicInfo {
            id: [1; 16],
            partitions: 2,
        })
    };
    let hb = HeartbeatRequest {
        member_id: "m1".into(),
        member_epoch: 0,
        rebalance_timeout_ms: 1000,
        subscribed_topics: Some(vec!["t".into()]),
        ..Default::default()
    };
    let (r, durable) = c
        .consumer_heartbeat(&*log, "mixed", hb.clone(), &topics, 0)
        .unwrap();
    durable.expect("a join is stored").await.unwrap();
    assert_eq!(r.assignment.map(|a| a.len()), Some(2));
    // A classic member cannot join a consumer group with members ...
    let j = c.join(&*log, "mixed", req("", &[("range", "s")]), 1).await;
    assert_eq!(j.error, Some(GroupError::InconsistentGroupProtocol));
    // ... and a consumer member cannot join a classic group with members.
    let j = c
        .join(&*log, "classic", req("", &[("range", "s")]), 1)
        .await;
    assert_eq!(j.error, None);
    assert!(matches!(
        c.consumer_heartbeat(&*log, "classic", hb, &topics, 2),
        Err(GroupError::GroupIdNotFound)
    ));
    let (listed, _) = c.list_groups();
    let types: Vec<(&str, &str)> = listed
        .iter()
        .map(|g| (g.group_id.as_str(), g.group_type))
        .collect();
    assert!(types.contains(&("mixed", "Consumer")));
    assert!(types.contains(&("classic", "Classic")));
    // Commits from the consumer member are checked against its epoch.
    let commit_with = |epoch| {
        c.commit_offsets(
            &*log,
            "mixed",
            "m1",
            None,
            epoch,
            vec![commit("t", 0, 5)],
            &|_, _| true,
            3,
        )
    };
    assert!(commit_with(1).await.is_ok());
    assert_eq!(
        commit_with(7).await.unwrap_err(),
        GroupError::StaleMemberEpoch
    );
}

#[tokio::test]
async fn offsets_of_a_deleted_topic_are_removed() {
    let log = MemLog::default();
    let c = coordinator(&log);
    c.commit_offsets(
        &log,
        "g",
        "",
        None,
        -1,
        vec![commit("gone", 0, 5), commit("kept", 0, 7)],
        &|_, _| true,
        0,
    )
    .await
    .unwrap();
    c.on_topics_deleted(&log, &["gone".to_string()]);
    let left: Vec<String> = c
        .fetch_offsets("g", None)
        .unwrap()
        .into_iter()
        .map(|(t, _, _)| t)
        .collect();
    assert_eq!(left, vec!["kept".to_string()]);
    let c2 = coordinator(&log);
    assert_eq!(
        c2.fetch_offsets("g", None).unwrap().len(),
        1,
        "tombstones written"
    );
}

#[tokio::test]
async fn a_classic_group_after_a_consumer_group_commits_after_a_reload() {
    use crate::consumer::{HeartbeatRequest, TopicInfo};
    let log = Arc::new(MemLog::default());
    let c = coordinator(&log);
    let topics = |n: &str| {
        (n == "t").then_some(TopicInfo {
            id: [1; 16],
            partitions: 2,
        })
    };
    let hb = |epoch: i32| HeartbeatRequest {
        member_id: "m1".into(),
        member_epoch: epoch,
        rebalance_timeout_ms: 1000,
        subscribed_topics: Some(vec!["t".into()]),
        ..Default::default()
    };
    c.consumer_heartbeat(&*log, "g", hb(0), &topics, 0).unwrap();
    c.consumer_heartbeat(&*log, "g", hb(-1), &topics, 1)
        .unwrap();
    // Now classic members take the group over and commit.
    let j = c.join(&*log, "g", req("", &[("range", "s")]), 2).await;
    assert_eq!(j.error, None);
    let s = c
        .sync(
            &*log,
            "g",
            &j.member_id,
            None,
            j.generation,
            None,
            None,
            vec![],
            3,
        )
        .await;
    assert_eq!(s.error, None);
    async fn commit_as(c: &GroupCoordinator, log: &MemLog, member: &str, gen: i32) -> bool {
        c.commit_offsets(
            log,
            "g",
            member,
            None,
            gen,
            vec![commit("t", 0, 9)],
            &|_, _| true,
            4,
        )
        .await
        .is_ok()
    }
    assert!(commit_as(&c, &log, &j.member_id, j.generation).await);
    let c2 = coordinator(&log);
    assert!(
        commit_as(&c2, &log, &j.member_id, j.generation).await,
        "after a reload too"
    );
    let (listed, _) = c2.list_groups();
    assert_eq!(listed[0].group_type, "Classic");
}

#[tokio::test]
async fn a_commit_that_never_became_durable_is_not_served() {
    let log = MemLog::default();
    let c = coordinator(&log);
    let all = |_: &str, _: i32| true;
    c.commit_offsets(&log, "g", "", None, -1, vec![commit("t", 0, 5)], &all, 0)
        .await
        .unwrap();
    log.fail_durability
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let r = c
        .commit_offsets(&log, "g", "", None, -1, vec![commit("t", 0, 9)], &all, 1)
        .await;
    assert_eq!(r.unwrap_err(), GroupError::StorageError);
    let got = c.fetch_offsets("g", Some(vec![("t".into(), 0)])).unwrap();
    assert_eq!(
        got[0].2.as_ref().unwrap().offset,
        5,
        "the acknowledged value stays"
    );
}
