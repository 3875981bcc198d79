//! Loopback tests: a three-voter quorum on 127.0.0.1, the log store on its own, and openraft's
//! storage conformance suite. Every test is bounded by `BOUND`; nothing asserts on timing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::{EntryPayload, RaftLogReader, StorageError};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::state_machine::{Progress, StateMachine};
use super::storage::{LogStore, LOG_FILE};
use super::types::{Entry, TypeConfig};
use super::*;
use crate::image::MetadataImage;
use crate::record::TopicId;

const BOUND: Duration = Duration::from_secs(60);
const STEP: Duration = Duration::from_secs(20);

struct Echo(i32);

impl ControllerHandler for Echo {
    fn handle(&self, request: Vec<u8>) -> BoxFuture<'static, Vec<u8>> {
        let mut out = format!("{}:", self.0).into_bytes();
        out.extend_from_slice(&request);
        async move { out }.boxed()
    }
}

fn rec(n: i64) -> MetadataRecord {
    MetadataRecord::ProducerIds {
        next_producer_id: n,
    }
}

/// One running voter and everything it delivered since it started.
struct Node {
    id: i32,
    addr: SocketAddr,
    dir: PathBuf,
    log: RaftMetadataLog,
    seen: Arc<Mutex<Vec<Committed>>>,
}

impl Node {
    fn seen(&self) -> Vec<Committed> {
        self.seen.lock().unwrap().clone()
    }

    /// Offsets and records of the delivered batches.
    fn batches(&self) -> Vec<(i64, Vec<MetadataRecord>)> {
        self.seen()
            .into_iter()
            .filter_map(|c| match c {
                Committed::Batch { offset, records } => Some((offset, records)),
                Committed::Snapshot { .. } => None,
            })
            .collect()
    }

    /// The image the delivered stream builds.
    fn image(&self) -> MetadataImage {
        let mut img = MetadataImage::empty();
        for c in self.seen() {
            match c {
                Committed::Snapshot { offset, records } => {
                    img = MetadataImage::empty().apply(offset, &records).0
                }
                Committed::Batch { offset, records } => img = img.apply(offset, &records).0,
            }
        }
        img
    }
}

fn config(id: i32, voters: &[(i32, SocketAddr)], dir: &Path, snapshot_every: u64) -> RaftConfig {
    let mut cfg = RaftConfig::new(id, voters.to_vec(), dir.to_path_buf());
    cfg.election_timeout_min_ms = 400;
    cfg.election_timeout_max_ms = 800;
    cfg.heartbeat_interval_ms = 100;
    cfg.snapshot_every_entries = snapshot_every;
    cfg
}

async fn start_node(
    id: i32,
    listener: TcpListener,
    voters: &[(i32, SocketAddr)],
    dir: &Path,
    snapshot_every: u64,
) -> Node {
    let addr = listener.local_addr().unwrap();
    let (log, mut rx) = RaftMetadataLog::start(
        config(id, voters, dir, snapshot_every),
        listener,
        Arc::new(Echo(id)),
    )
    .await
    .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    tokio::spawn(async move {
        while let Some(c) = rx.recv().await {
            sink.lock().unwrap().push(c);
        }
    });
    Node {
        id,
        addr,
        dir: dir.to_path_buf(),
        log,
        seen,
    }
}

async fn restart(node: &Node, voters: &[(i32, SocketAddr)], snapshot_every: u64) -> Node {
    // The port was released by shutdown; rebind the same address.
    let listener = TcpListener::bind(node.addr).await.unwrap();
    start_node(node.id, listener, voters, &node.dir, snapshot_every).await
}

async fn cluster(root: &Path, snapshot_every: u64) -> (Vec<Node>, Vec<(i32, SocketAddr)>) {
    let mut listeners = Vec::new();
    let mut voters = Vec::new();
    for id in 1..=3 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        voters.push((id, l.local_addr().unwrap()));
        listeners.push((id, l));
    }
    let mut nodes = Vec::new();
    for (id, l) in listeners {
        let dir = root.join(format!("node-{id}"));
        nodes.push(start_node(id, l, &voters, &dir, snapshot_every).await);
    }
    (nodes, voters)
}

/// Polls until `f` holds (each test is bounded by `BOUND` anyway).
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + STEP;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until every node names the same leader and that leader knows it leads.
async fn agreed_leader(nodes: &[&Node]) -> i32 {
    let mut leader = -1;
    until("a leader", || {
        let first = nodes[0].log.leader();
        let all_same = nodes.iter().all(|n| n.log.leader() == first);
        match first {
            Some(l) if all_same => {
                leader = l;
                nodes.iter().any(|n| n.id == l && n.log.is_leader())
            }
            _ => false,
        }
    })
    .await;
    leader
}

/// Appends on whichever node leads, retrying across elections.
async fn append(nodes: &[&Node], records: Vec<MetadataRecord>) -> i64 {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let leader = agreed_leader(nodes).await;
        let node = nodes.iter().find(|n| n.id == leader).unwrap();
        match node.log.append(records.clone()).await {
            Ok(offset) => return offset,
            Err(MetadataLogError::NotLeader { .. }) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no leader took the append"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("append failed: {e}"),
        }
    }
}

async fn bounded<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(BOUND, f)
        .await
        .expect("test exceeded its time bound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_voters_elect_replicate_and_forward() {
    bounded(async {
        let root = tempfile::tempdir().unwrap();
        let (nodes, _) = cluster(root.path(), 10_000).await;
        let all: Vec<&Node> = nodes.iter().collect();
        let leader_id = agreed_leader(&all).await;
        let leader = all.iter().find(|n| n.id == leader_id).unwrap();
        let followers: Vec<&&Node> = all.iter().filter(|n| n.id != leader_id).collect();

        let mut offsets = Vec::new();
        for i in 0..5 {
            offsets.push(append(&all, vec![rec(i), rec(i + 100)]).await);
        }
        assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
        for n in &all {
            until("every batch on every node", || n.batches().len() == 5).await;
        }
        let expected = leader.batches();
        assert_eq!(
            expected.iter().map(|b| b.0).collect::<Vec<_>>(),
            offsets,
            "offsets are the Raft indexes append returned"
        );
        for n in &all {
            assert_eq!(n.batches(), expected, "node {} order", n.id);
            assert!(
                !n.seen()
                    .iter()
                    .any(|c| matches!(c, Committed::Snapshot { .. })),
                "no snapshot on a fresh cluster"
            );
        }
        assert_eq!(expected[2].1, vec![rec(2), rec(102)]);

        // Followers refuse appends and name the leader.
        match followers[0].log.append(vec![rec(9)]).await {
            Err(MetadataLogError::NotLeader { leader }) => assert_eq!(leader, Some(leader_id)),
            other => panic!("expected NotLeader, got {other:?}"),
        }

        // Application requests reach the leader's handler from anywhere.
        let answer = followers[1]
            .log
            .call_controller(b"ping".to_vec(), STEP)
            .await
            .unwrap();
        assert_eq!(answer, format!("{leader_id}:ping").into_bytes());
        let answer = leader
            .log
            .call_controller(b"self".to_vec(), STEP)
            .await
            .unwrap();
        assert_eq!(answer, format!("{leader_id}:self").into_bytes());

        let ready = leader.log.ensure_leader_ready().await.unwrap();
        assert!(ready >= *offsets.last().unwrap());
        assert!(matches!(
            followers[0].log.ensure_leader_ready().await,
            Err(MetadataLogError::NotLeader { .. })
        ));
        for n in &all {
            let caught_up = n.log.wait_caught_up(STEP).await.unwrap();
            assert_eq!(caught_up, *offsets.last().unwrap());
            assert_eq!(n.log.applied_offset(), *offsets.last().unwrap());
        }

        let last = *offsets.last().unwrap();
        until("the leader sees the followers caught up", || {
            let q = leader.log.quorum_state();
            q.voters.iter().all(|v| v.log_end_offset >= last)
        })
        .await;
        let q = leader.log.quorum_state();
        assert_eq!(q.leader_id, leader_id);
        assert!(q.leader_epoch >= 1);
        assert!(q.high_watermark >= last);
        assert_eq!(
            q.voters.iter().map(|v| v.replica_id).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        for v in &q.voters {
            assert!(v.last_fetch_timestamp > 0, "{q:?}");
        }
        let fq = followers[0].log.quorum_state();
        assert_eq!(fq.leader_id, leader_id);
        assert_eq!(fq.leader_epoch, q.leader_epoch);

        for n in &all {
            n.log.shutdown().await;
        }
        assert!(matches!(
            leader.log.append(vec![rec(1)]).await,
            Err(MetadataLogError::Shutdown)
        ));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_then_restarted_node_catches_up() {
    bounded(async {
        let root = tempfile::tempdir().unwrap();
        let (mut nodes, voters) = cluster(root.path(), 10_000).await;
        {
            let all: Vec<&Node> = nodes.iter().collect();
            for i in 0..3 {
                append(&all, vec![rec(i)]).await;
            }
        }
        let old_leader = {
            let all: Vec<&Node> = nodes.iter().collect();
            agreed_leader(&all).await
        };
        let pos = nodes.iter().position(|n| n.id == old_leader).unwrap();
        let stopped = nodes.remove(pos);
        stopped.log.shutdown().await;

        let rest: Vec<&Node> = nodes.iter().collect();
        let new_leader = agreed_leader(&rest).await;
        assert_ne!(new_leader, old_leader);
        for i in 3..6 {
            append(&rest, vec![rec(i)]).await;
        }
        for n in &rest {
            until("six batches on the survivors", || n.batches().len() == 6).await;
        }

        let back = restart(&stopped, &voters, 10_000).await;
        nodes.push(back);
        let all: Vec<&Node> = nodes.iter().collect();
        let back = all.iter().find(|n| n.id == old_leader).unwrap();
        until("the restarted node to catch up", || {
            back.batches().len() >= 6
        })
        .await;
        let expected = all[0].batches();
        assert_eq!(
            back.batches(),
            expected,
            "same records, same order, no duplicates"
        );
        assert_eq!(
            expected.iter().map(|b| b.1.clone()).collect::<Vec<_>>(),
            (0..6).map(|i| vec![rec(i)]).collect::<Vec<_>>()
        );
        back.log.wait_caught_up(STEP).await.unwrap();

        // It takes part again: a new append reaches all three.
        let offset = append(&all, vec![rec(6)]).await;
        for n in &all {
            until("the seventh batch", || n.batches().len() == 7).await;
            assert_eq!(n.batches().last().unwrap().0, offset);
        }
        for n in &all {
            n.log.shutdown().await;
        }
    })
    .await;
}

/// A follower whose directory is lost (a replaced disk) and that comes back empty under the
/// same id while the same leader leads: the leader's record of what it holds goes backwards,
/// and it must replicate everything to it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voter_back_with_an_empty_directory_is_caught_up_by_the_same_leader() {
    bounded(async {
        let root = tempfile::tempdir().unwrap();
        let (mut nodes, voters) = cluster(root.path(), 10_000).await;
        let leader = {
            let all: Vec<&Node> = nodes.iter().collect();
            for i in 0..3 {
                append(&all, vec![rec(i)]).await;
            }
            let leader = agreed_leader(&all).await;
            for n in &all {
                until("three batches everywhere", || n.batches().len() == 3).await;
            }
            leader
        };
        let pos = nodes.iter().position(|n| n.id != leader).unwrap();
        let wiped = nodes.remove(pos);
        wiped.log.shutdown().await;
        std::fs::remove_dir_all(&wiped.dir).unwrap();
        nodes.push(restart(&wiped, &voters, 10_000).await);

        let all: Vec<&Node> = nodes.iter().collect();
        assert_eq!(agreed_leader(&all).await, leader, "the leader stays");
        let back = all.iter().find(|n| n.id == wiped.id).unwrap();
        until("the emptied voter to catch up", || {
            back.batches().len() >= 3
        })
        .await;
        let offset = append(&all, vec![rec(3)]).await;
        for n in &all {
            until("the fourth batch", || n.batches().len() == 4).await;
            assert_eq!(n.batches().last().unwrap().0, offset);
        }
        assert_eq!(back.batches(), all[0].batches());
        for n in &all {
            n.log.shutdown().await;
        }
    })
    .await;
}

/// A voter that acknowledged an entry and then lost its directory must not help elect a
/// voter that lacks the entry (KIP-853's reason for directory ids): with the leader down, the
/// voter that missed the entry and the emptied one elect nobody; once the leader is back the
/// entry is still there, and the emptied voter counts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voter_back_with_an_empty_directory_does_not_elect_one_missing_what_it_acknowledged() {
    bounded(async {
        let root = tempfile::tempdir().unwrap();
        let (nodes, voters) = cluster(root.path(), 10_000).await;
        let all: Vec<&Node> = nodes.iter().collect();
        append(&all, vec![rec(0)]).await;
        let leader = agreed_leader(&all).await;
        for n in &all {
            until("every voter's directory recorded everywhere", || {
                n.log.recorded_directories().len() == 3
            })
            .await;
        }
        let l = *all.iter().find(|n| n.id == leader).unwrap();
        let mut followers = all.iter().filter(|n| n.id != leader);
        let (behind, wiped) = (*followers.next().unwrap(), *followers.next().unwrap());

        // `behind` misses rec(1): the leader and `wiped` commit it.
        behind.log.shutdown().await;
        append(&[l, wiped], vec![rec(1)]).await;
        until("rec(1) on the voter to be wiped", || {
            wiped.batches().len() == 2
        })
        .await;
        l.log.shutdown().await;
        wiped.log.shutdown().await;
        std::fs::remove_dir_all(&wiped.dir).unwrap();
        let wiped = restart(wiped, &voters, 10_000).await;
        let behind = restart(behind, &voters, 10_000).await;

        // Several election timeouts: the emptied voter's vote would make `behind` leader.
        let watch_until = tokio::time::Instant::now() + Duration::from_secs(4);
        while tokio::time::Instant::now() < watch_until {
            assert!(
                !behind.log.is_leader() && !wiped.log.is_leader(),
                "a leader was elected without the entry the emptied voter had acknowledged"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let l = restart(l, &voters, 10_000).await;
        let all = [&l, &behind, &wiped];
        let offset = append(&all, vec![rec(2)]).await;
        for n in all {
            until("rec(2) everywhere", || {
                n.batches().last().is_some_and(|b| b.0 == offset)
            })
            .await;
            let records: Vec<_> = n.batches().into_iter().map(|b| b.1).collect();
            assert_eq!(
                records,
                vec![vec![rec(0)], vec![rec(1)], vec![rec(2)]],
                "node {}",
                n.id
            );
        }
        for n in all {
            n.log.shutdown().await;
        }
    })
    .await;
}

/// Waits until `a` and `b` have both delivered the batch at `offset`, then checks they
/// delivered the same batches (appends resolve on commit, before every node has applied).
async fn same_batches(a: &Node, b: &Node, offset: i64) {
    for n in [a, b] {
        until("the batch to be delivered", || {
            n.batches().last().is_some_and(|l| l.0 >= offset)
        })
        .await;
    }
    assert_eq!(a.batches(), b.batches(), "nodes {} and {}", a.id, b.id);
}

/// A broker-only node (id 4, not among the voters) joins as a learner: it applies what the
/// voters commit, survives a restart (also at a new address), follows a new leader after a
/// failover, and never votes or leads: with two of the three voters gone, it does not help the
/// last one to a majority.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_follows_the_log_and_never_votes() {
    bounded(async {
        let root = tempfile::tempdir().unwrap();
        let (mut voters, config) = cluster(root.path(), 10_000).await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let learner = start_node(4, listener, &config, &root.path().join("node-4"), 10_000).await;
        assert!(!learner.log.is_voter());
        assert!(voters.iter().all(|v| v.log.is_voter()));

        let mut offsets = Vec::new();
        {
            let all: Vec<&Node> = voters.iter().collect();
            for i in 0..5 {
                offsets.push(append(&all, vec![rec(i)]).await);
            }
        }
        let last = *offsets.last().unwrap();
        same_batches(&learner, &voters[0], last).await;
        assert_eq!(learner.batches().len(), 5);
        assert_eq!(learner.log.wait_caught_up(STEP).await.unwrap(), last);

        let leader_id = {
            let all: Vec<&Node> = voters.iter().collect();
            agreed_leader(&all).await
        };
        assert_eq!(learner.log.leader(), Some(leader_id));
        let leader = voters.iter().find(|n| n.id == leader_id).unwrap();
        until("the leader to see the learner caught up", || {
            let q = leader.log.quorum_state();
            q.observers
                .iter()
                .any(|o| o.replica_id == 4 && o.log_end_offset >= last)
        })
        .await;
        let q = leader.log.quorum_state();
        assert_eq!(
            q.voters.iter().map(|v| v.replica_id).collect::<Vec<_>>(),
            vec![1, 2, 3],
            "the learner is not a voter"
        );
        assert_eq!(
            q.observers.iter().map(|v| v.replica_id).collect::<Vec<_>>(),
            vec![4]
        );
        // The leader refuses to take a voter's id as a learner.
        let (mut s, _) = network::connect(leader.addr, types::to_node_id(leader_id), None)
            .await
            .unwrap();
        let join = network::JoinRequest {
            node_id: types::to_node_id(if leader_id == 1 { 2 } else { 1 }),
            addr: "127.0.0.1:9".parse().unwrap(),
        };
        let body = serde_json::to_vec(&join).unwrap();
        network::write_frame(&mut s, network::TAG_JOIN, &body)
            .await
            .unwrap();
        let (answer, why) = network::read_frame(&mut s).await.unwrap();
        assert_eq!(
            answer,
            network::ANSWER_ERR,
            "{}",
            String::from_utf8_lossy(&why)
        );
        assert_eq!(leader.log.quorum_state().voters.len(), 3);

        // A learner refuses appends and reaches the controller's handler through the leader.
        assert!(matches!(
            learner.log.append(vec![rec(9)]).await,
            Err(MetadataLogError::NotLeader { .. })
        ));
        let answer = learner
            .log
            .call_controller(b"ping".to_vec(), STEP)
            .await
            .unwrap();
        assert_eq!(answer, format!("{leader_id}:ping").into_bytes());

        // Restart the learner on the same address: it replays its persisted log and catches up.
        learner.log.shutdown().await;
        {
            let all: Vec<&Node> = voters.iter().collect();
            offsets.push(append(&all, vec![rec(5)]).await);
        }
        let learner = restart(&learner, &config, 10_000).await;
        same_batches(&learner, &voters[0], *offsets.last().unwrap()).await;
        assert_eq!(learner.batches().len(), 6, "replayed from its own log");
        assert_eq!(
            learner.log.wait_caught_up(STEP).await.unwrap(),
            *offsets.last().unwrap()
        );

        // Kill the leader: a voter takes over, the learner follows it and gets new entries.
        let old = voters.remove(voters.iter().position(|n| n.id == leader_id).unwrap());
        old.log.shutdown().await;
        let new_leader = {
            let rest: Vec<&Node> = voters.iter().collect();
            agreed_leader(&rest).await
        };
        assert_ne!(new_leader, 4);
        assert_ne!(new_leader, leader_id);
        {
            let rest: Vec<&Node> = voters.iter().collect();
            offsets.push(append(&rest, vec![rec(6)]).await);
        }
        same_batches(&learner, &voters[0], *offsets.last().unwrap()).await;
        until("the learner to follow the new leader", || {
            learner.log.leader() == Some(new_leader)
        })
        .await;
        assert!(!learner.log.is_leader());
        assert_eq!(learner.batches().len(), 7);

        // The learner moves to another address: it rejoins there (the leader records it).
        learner.log.shutdown().await;
        let moved = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let learner = start_node(4, moved, &config, &learner.dir, 10_000).await;
        {
            let rest: Vec<&Node> = voters.iter().collect();
            offsets.push(append(&rest, vec![rec(7)]).await);
        }
        same_batches(&learner, &voters[0], *offsets.last().unwrap()).await;
        assert_eq!(learner.batches().len(), 8);

        // One voter and the learner are no majority: nothing commits. (The stopping leader
        // handed its leadership to the last voter, which may still call itself leader.)
        let second = voters.remove(voters.iter().position(|n| n.id == new_leader).unwrap());
        second.log.shutdown().await;
        let lone = &voters[0];
        let attempt = tokio::time::timeout(Duration::from_secs(3), async {
            loop {
                match lone.log.append(vec![rec(99)]).await {
                    Ok(offset) => return offset,
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        })
        .await;
        assert!(attempt.is_err(), "a learner counted towards a majority");
        assert!(!learner.log.is_leader());
        assert_ne!(learner.log.leader(), Some(4));

        // The voters come back; the learner follows whoever leads and never leads itself.
        let back = restart(&old, &config, 10_000).await;
        voters.push(back);
        let leader_now = {
            let all: Vec<&Node> = voters.iter().collect();
            agreed_leader(&all).await
        };
        assert_ne!(leader_now, 4);
        {
            let all: Vec<&Node> = voters.iter().collect();
            offsets.push(append(&all, vec![rec(8)]).await);
        }
        let leader = voters.iter().find(|n| n.id == leader_now).unwrap();
        same_batches(&learner, leader, *offsets.last().unwrap()).await;
        // 9, or 10 when the last voter had taken the attempt above as leader: Raft commits it
        // once a majority is back, although the caller gave up on it.
        assert_eq!(learner.batches().len(), leader.batches().len());
        assert!((9..=10).contains(&learner.batches().len()));
        assert!(!learner.log.is_leader());
        learner.log.shutdown().await;
        for n in &voters {
            n.log.shutdown().await;
        }
    })
    .await;
}

/// UnregisterBroker's Raft side: the leader removes a broker-only node from the membership; it
/// is no longer an observer and gets no more entries. Voters are refused, a follower is not
/// the leader, and the node rejoins as a new learner when it starts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_learner_is_no_longer_an_observer_nor_replicated_to() {
    bounded(async {
        let root = tempfile::tempdir().unwrap();
        let (voters, config) = cluster(root.path(), 10_000).await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let learner = start_node(4, listener, &config, &root.path().join("node-4"), 10_000).await;
        let all: Vec<&Node> = voters.iter().collect();
        let first = append(&all, vec![rec(0)]).await;
        same_batches(&learner, &voters[0], first).await;
        let leader_id = agreed_leader(&all).await;
        let leader = voters.iter().find(|n| n.id == leader_id).unwrap();
        let follower = voters.iter().find(|n| n.id != leader_id).unwrap();
        until("the learner to be an observer", || {
            leader.log.quorum_state().observers.len() == 1
        })
        .await;

        assert!(matches!(
            follower.log.remove_learner(4).await,
            Err(MetadataLogError::NotLeader { .. })
        ));
        assert!(leader.log.remove_learner(follower.id).await.is_err());
        assert!(leader.log.remove_learner(leader_id).await.is_err());
        assert_eq!(leader.log.quorum_state().voters.len(), 3);
        assert!(leader.log.remove_learner(4).await.unwrap());
        assert!(leader.log.quorum_state().observers.is_empty());
        assert!(!leader.log.remove_learner(4).await.unwrap(), "already gone");
        assert!(!leader.log.remove_learner(77).await.unwrap());
        until("every voter to drop the learner", || {
            voters
                .iter()
                .all(|v| v.log.quorum_state().observers.is_empty())
        })
        .await;

        // No more entries reach it.
        let seen = learner.batches().len();
        let later = append(&all, vec![rec(1)]).await;
        same_batches(&voters[1], &voters[0], later).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(learner.batches().len(), seen, "replicated to after removal");

        // Started again, it joins as a new learner and catches up.
        learner.log.shutdown().await;
        let learner = restart(&learner, &config, 10_000).await;
        same_batches(&learner, &voters[0], later).await;
        until("the learner to be an observer again", || {
            leader.log.quorum_state().observers.len() == 1
        })
        .await;
        learner.log.shutdown().await;
        for n in &voters {
            n.log.shutdown().await;
        }
    })
    .await;
}

fn purged_index(dir: &Path) -> i64 {
    std::fs::read(dir.join(storage::PURGED_FILE))
        .ok()
        .and_then(|d| serde_json::from_slice::<Option<types::LogId>>(&d).ok())
        .flatten()
        .map(|l| l.index as i64)
        .unwrap_or(-1)
}

fn offsets(seen: &[Committed]) -> Vec<i64> {
    seen.iter()
        .map(|c| match c {
            Committed::Snapshot { offset, .. } | Committed::Batch { offset, .. } => *offset,
        })
        .collect()
}

fn snapshot_offsets(seen: &[Committed]) -> Vec<i64> {
    seen.iter()
        .filter_map(|c| match c {
            Committed::Snapshot { offset, .. } => Some(*offset),
            Committed::Batch { .. } => None,
        })
        .collect()
}

fn partition(topic: TopicId, p: i32) -> MetadataRecord {
    MetadataRecord::Partition {
        topic_id: topic,
        partition: p,
        replicas: vec![1, 2, 3],
        isr: vec![1, 2, 3],
        leader: 1,
        leader_epoch: 0,
        partition_epoch: 0,
        elr: Vec::new(),
        last_known_elr: Vec::new(),
        adding_replicas: vec![],
        removing_replicas: vec![],
    }
}

/// A voter that missed entries its new leader has already purged behind a snapshot gets that
/// snapshot; every restart starts the Committed stream with the node's own snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_voters_start_from_snapshots() {
    bounded(async {
        let root = tempfile::tempdir().unwrap();
        let (mut nodes, voters) = cluster(root.path(), 5).await;
        let topic = [9u8; 16];
        {
            let all: Vec<&Node> = nodes.iter().collect();
            append(
                &all,
                vec![
                    MetadataRecord::ClusterId {
                        cluster_id: "c".into(),
                    },
                    MetadataRecord::Topic {
                        name: "t".into(),
                        topic_id: topic,
                    },
                ],
            )
            .await;
            // Enough entries that every node builds a snapshot of its own (every 5 entries).
            for i in 0..6 {
                append(&all, vec![rec(i)]).await;
            }
            for n in &all {
                until("every node's own snapshot", || {
                    n.batches().len() == 7 && n.dir.join(state_machine::SNAPSHOT_FILE).exists()
                })
                .await;
            }
        }
        let leader = {
            let all: Vec<&Node> = nodes.iter().collect();
            agreed_leader(&all).await
        };
        let lagging = nodes.remove(nodes.iter().position(|n| n.id != leader).unwrap());
        let lagging_last = lagging.batches().last().unwrap().0;
        lagging.log.shutdown().await;

        // The other follower snapshots and purges on its own (a leader keeps what the
        // unreachable voter still needs, so the lagging voter is caught up by that follower
        // once it leads).
        let other = nodes.iter().position(|n| n.id != leader).unwrap();
        {
            let rest: Vec<&Node> = nodes.iter().collect();
            for p in 0..20 {
                append(&rest, vec![partition(topic, p)]).await;
            }
            let other = &nodes[other];
            until("the other follower to purge past the lagging voter", || {
                other.batches().len() == 27 && purged_index(&other.dir) > lagging_last
            })
            .await;
        }
        let reference = nodes[other].image();
        let old_leader = nodes.remove(nodes.iter().position(|n| n.id == leader).unwrap());
        old_leader.log.shutdown().await;

        let back = restart(&lagging, &voters, 5).await;
        {
            let pair: Vec<&Node> = vec![&nodes[0], &back];
            assert_eq!(
                agreed_leader(&pair).await,
                nodes[0].id,
                "the longer log leads"
            );
        }
        until("the lagging voter to receive the leader's snapshot", || {
            back.image()
                .topic("t")
                .is_some_and(|t| t.partitions.len() == 20)
        })
        .await;
        let seen = back.seen();
        assert!(
            matches!(seen.first(), Some(Committed::Snapshot { .. })),
            "the stream starts with the node's own snapshot: {:?}",
            offsets(&seen)
        );
        let snaps = snapshot_offsets(&seen);
        assert!(
            snaps.len() >= 2 && snaps[0] <= lagging_last && snaps[1] > lagging_last,
            "own snapshot, then the leader's: {snaps:?} (had up to {lagging_last})"
        );
        assert!(
            offsets(&seen).windows(2).all(|w| w[0] < w[1]),
            "offsets only grow: {:?}",
            offsets(&seen)
        );
        assert_eq!(back.image().topics, reference.topics);
        assert_eq!(back.image().cluster_id, "c");

        // Restarting again starts from the snapshot it installed (or a later one of its own).
        back.log.shutdown().await;
        let again = restart(&back, &voters, 5).await;
        let old_leader = restart(&old_leader, &voters, 5).await;
        until("a snapshot on the second restart", || {
            !again.seen().is_empty()
        })
        .await;
        match again.seen().first() {
            Some(Committed::Snapshot { offset, .. }) => assert!(*offset > lagging_last),
            other => panic!("expected a snapshot first, got {other:?}"),
        }
        nodes.push(again);
        nodes.push(old_leader);
        let all: Vec<&Node> = nodes.iter().collect();
        append(&all, vec![rec(77)]).await;
        for n in &all {
            until("the image to converge", || {
                let img = n.image();
                img.next_producer_id == 77 && img.topics == reference.topics
            })
            .await;
        }
        for n in &all {
            n.log.shutdown().await;
        }
    })
    .await;
}

fn entry(term: u64, index: u64, n: i64) -> Entry {
    Entry {
        log_id: openraft::testing::log_id::<TypeConfig>(term, 1, index),
        payload: EntryPayload::Normal(super::types::RecordBatch(vec![rec(n)])),
    }
}

async fn append_durably(store: &mut LogStore, entries: Vec<Entry>) {
    use openraft::type_config::TypeConfigExt;
    let (tx, rx) = TypeConfig::oneshot();
    store.append(entries, IOFlushed::signal(tx)).await.unwrap();
    rx.await.unwrap().unwrap();
}

async fn indexes(store: &mut LogStore) -> Vec<u64> {
    store
        .try_get_log_entries(..)
        .await
        .unwrap()
        .iter()
        .map(|e| e.log_id.index)
        .collect()
}

#[tokio::test]
async fn log_store_drops_torn_tail_and_survives_truncate_and_purge() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = LogStore::open(dir.path()).unwrap();
            append_durably(&mut store, (0..5).map(|i| entry(1, i, i as i64)).collect()).await;
            store
                .save_vote(&openraft::impls::Vote::new_committed(1, 1))
                .await
                .unwrap();
        }
        // A torn write after the good entries: a header promising more than is there.
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(dir.path().join(LOG_FILE))
                .unwrap();
            f.write_all(&[0, 0, 0, 90, 1, 2, 3, 4, 5]).unwrap();
        }
        let mut store = LogStore::open(dir.path()).unwrap();
        assert_eq!(indexes(&mut store).await, vec![0, 1, 2, 3, 4]);
        assert_eq!(
            store.read_vote().await.unwrap(),
            Some(openraft::impls::Vote::new_committed(1, 1))
        );
        append_durably(&mut store, vec![entry(2, 5, 5), entry(2, 6, 6)]).await;
        // A conflicting tail is cut and replaced.
        store
            .truncate_after(Some(openraft::testing::log_id::<TypeConfig>(2, 1, 5)))
            .await
            .unwrap();
        append_durably(&mut store, vec![entry(3, 6, 60)]).await;
        store
            .purge(openraft::testing::log_id::<TypeConfig>(1, 1, 2))
            .await
            .unwrap();
        drop(store);

        let mut store = LogStore::open(dir.path()).unwrap();
        assert_eq!(indexes(&mut store).await, vec![3, 4, 5, 6]);
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(2));
        assert_eq!(
            state.last_log_id,
            Some(openraft::testing::log_id::<TypeConfig>(3, 1, 6))
        );
        let last = store.try_get_log_entries(6..7).await.unwrap();
        assert_eq!(
            last[0].payload,
            EntryPayload::Normal(super::types::RecordBatch(vec![rec(60)]))
        );
        // Purging past the end leaves an empty log that continues after the purge point.
        store
            .purge(openraft::testing::log_id::<TypeConfig>(4, 1, 10))
            .await
            .unwrap();
        append_durably(&mut store, vec![entry(4, 11, 11)]).await;
        drop(store);
        let mut store = LogStore::open(dir.path()).unwrap();
        assert_eq!(indexes(&mut store).await, vec![11]);
        // A corrupt byte inside the last entry drops it (crc mismatch).
        drop(store);
        let path = dir.path().join(LOG_FILE);
        let mut data = std::fs::read(&path).unwrap();
        let n = data.len();
        data[n - 2] ^= 0xff;
        std::fs::write(&path, &data).unwrap();
        let mut store = LogStore::open(dir.path()).unwrap();
        assert_eq!(indexes(&mut store).await, Vec::<u64>::new());
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id.map(|l| l.index), Some(10));
    })
    .await;
}

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().unwrap();
        let log = LogStore::open(dir.path()).unwrap();
        // Nobody consumes: deliveries are dropped, as after a shutdown.
        let (tx, _) = mpsc::channel(1);
        let progress = Arc::new(Progress {
            delivered: std::sync::atomic::AtomicI64::new(-1),
        });
        let sm = StateMachine::open(dir.path(), tx, progress, Default::default()).unwrap();
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_conformance_suite() {
    bounded(async {
        Suite::test_all(Builder).await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn transport_refuses_wrong_node_and_bad_frames() {
    bounded(async {
        let root = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let voters = vec![(5, addr)];
        let node = start_node(5, listener, &voters, &root.path().join("n5"), 100).await;
        // A single voter elects itself.
        until("the single voter to lead", || node.log.is_leader()).await;

        // The handshake names the node: another id at this address is refused.
        let wrong = network::connect(addr, types::to_node_id(6), None).await;
        assert!(wrong.is_err());
        let (_, dir) = network::connect(addr, types::to_node_id(5), None)
            .await
            .unwrap();
        let kept = std::fs::read_to_string(root.path().join("n5").join("directory.id")).unwrap();
        assert_eq!(
            dir.as_deref(),
            Some(kept.as_str()),
            "it tells its directory id"
        );

        // An oversized frame closes the connection without allocating it.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(s.read(&mut buf).await.unwrap_or(0), 0);
        // Garbage after a good handshake closes it too.
        let (mut s, _) = network::connect(addr, types::to_node_id(5), None)
            .await
            .unwrap();
        network::write_frame(&mut s, network::TAG_APPEND, b"{not json")
            .await
            .unwrap();
        assert_eq!(s.read(&mut buf).await.unwrap_or(0), 0);
        let (mut s, _) = network::connect(addr, types::to_node_id(5), None)
            .await
            .unwrap();
        network::write_frame(&mut s, 200, b"").await.unwrap();
        assert_eq!(s.read(&mut buf).await.unwrap_or(0), 0);

        // The node still works.
        let offset = node.log.append(vec![rec(1)]).await.unwrap();
        until("the batch", || node.batches().len() == 1).await;
        assert_eq!(node.batches()[0].0, offset);
        node.log.shutdown().await;
    })
    .await;
}
