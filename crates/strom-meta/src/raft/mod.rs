//! The Raft-replicated metadata log (KRaft-like): every controller-quorum voter keeps the
//! metadata records in a Raft log (openraft), the leader is the active controller, and every
//! committed batch is handed to the broker through a channel of [`Committed`] messages.
//!
//! Nothing outside this module sees openraft types.
//!
//! Files under [`RaftConfig::dir`]: `raft.log`, `vote`, `purged` (see `storage.rs`) and
//! `snapshot` (see `state_machine.rs`).
//!
//! Offsets are Raft log indexes: they only grow, but have gaps (the entries a new leader or a
//! membership change writes carry no records and are not delivered).
//!
//! Limits worth knowing:
//! - A voter that lost its directory must not come back under the same id: openraft sees the
//!   leader's view of it go backwards (a debug assertion in debug builds) and acknowledged
//!   entries may be lost.
//! - A snapshot travels as one frame, so the metadata image must encode to under 64 MiB.
//! - The leader does not purge entries a voter that is down still needs, and the log store keeps
//!   unpurged entries in memory: a long outage of one voter grows the leader's memory.

mod liveness;
mod network;
mod state_machine;
mod storage;
mod types;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::error::{ClientWriteError, LinearizableReadError, RaftError};
use openraft::impls::ProgressResponder;
use openraft::storage::RaftLogStorage;
use openraft::{
    BasicNode, Config, Instant as _, RaftLogReader, ReadPolicy, ServerState, SnapshotPolicy,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::log::MetadataLogError;
use crate::record::MetadataRecord;
use liveness::{PeerWatch, Watcher};
use network::{AppAnswer, AppClient, NetworkFactory, RaftHandle, ServerCtx};
use state_machine::{Progress, StateMachine};
use storage::LogStore;
use types::{from_node_id, offset_of, to_node_id, RecordBatch};

/// Room in the `Committed` channel.
const COMMITTED_CHANNEL: usize = 1024;

#[derive(Debug, Clone)]
pub struct RaftConfig {
    pub node_id: i32,
    /// Every voter, from --controller-quorum "1@127.0.0.1:9192,2@...". This node is among them.
    pub voters: Vec<(i32, SocketAddr)>,
    /// Directory for the Raft log, vote and snapshot (the caller passes
    /// <data-dir>/__cluster_metadata-0).
    pub dir: PathBuf,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    pub heartbeat_interval_ms: u64,
    /// A snapshot is built every this many entries; the log is purged behind snapshots
    /// (keeping a tenth of this many entries for followers that lag a little).
    pub snapshot_every_entries: u64,
}

impl RaftConfig {
    /// A config with the defaults: elections after 500..1000 ms without a leader, heartbeats
    /// every 100 ms, a snapshot every 10 000 entries.
    pub fn new(node_id: i32, voters: Vec<(i32, SocketAddr)>, dir: PathBuf) -> Self {
        RaftConfig {
            node_id,
            voters,
            dir,
            election_timeout_min_ms: 500,
            election_timeout_max_ms: 1000,
            heartbeat_interval_ms: 100,
            snapshot_every_entries: 10_000,
        }
    }
}

/// Application requests carried to the active controller over the same controller listener.
pub trait ControllerHandler: Send + Sync + 'static {
    fn handle(&self, request: Vec<u8>) -> BoxFuture<'static, Vec<u8>>;
    /// The process of node `node_id` is gone (see `liveness.rs`). Called on every node.
    fn peer_down(&self, _node_id: i32) {}
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Committed {
    /// Replace the whole image with these records (sent first on start if a snapshot exists,
    /// and whenever a snapshot is installed from the leader).
    Snapshot {
        offset: i64,
        records: Vec<MetadataRecord>,
    },
    /// One committed append, in log order, each exactly once per process lifetime.
    Batch {
        offset: i64,
        records: Vec<MetadataRecord>,
    },
}

/// For DescribeQuorum (Kafka API 55).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuorumState {
    /// -1 when no leader is known.
    pub leader_id: i32,
    /// The Raft term.
    pub leader_epoch: i32,
    /// The committed Raft index (-1: none).
    pub high_watermark: i64,
    pub voters: Vec<VoterState>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoterState {
    pub replica_id: i32,
    /// The replica's matched log index as the leader sees it (-1: unknown).
    pub log_end_offset: i64,
    /// Milliseconds since the epoch (-1: unknown).
    pub last_fetch_timestamp: i64,
    pub last_caught_up_timestamp: i64,
}

struct Inner {
    node_id: i32,
    raft: RaftHandle,
    leader_rx: watch::Receiver<Option<i32>>,
    progress: Arc<Progress>,
    app: AppClient,
    handler: Arc<dyn ControllerHandler>,
    peers: Arc<PeerWatch>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    shut: AtomicBool,
}

/// The Raft metadata log of one controller-quorum voter. Cheap to clone.
#[derive(Clone)]
pub struct RaftMetadataLog {
    inner: Arc<Inner>,
}

fn raft_err(e: impl std::fmt::Display) -> MetadataLogError {
    MetadataLogError::Raft(e.to_string())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl RaftMetadataLog {
    /// Takes an already-bound TcpListener (the controller listener) and serves peer Raft RPCs
    /// and application requests on it. Returns the log and the receiver of committed entries.
    /// On first start of a fresh cluster, the voter with the lowest id initializes the
    /// membership with all voters: only on a pristine log (no vote, no entries, no snapshot),
    /// and only if no leader contacts it within one maximum election timeout (a voter that
    /// lost its disk rejoins the existing quorum instead of founding a new one).
    pub async fn start(
        cfg: RaftConfig,
        listener: tokio::net::TcpListener,
        handler: Arc<dyn ControllerHandler>,
    ) -> Result<(RaftMetadataLog, mpsc::Receiver<Committed>), MetadataLogError> {
        let mut addrs = BTreeMap::new();
        for (id, addr) in &cfg.voters {
            if *id < 0 {
                return Err(raft_err(format!("voter id {id} is negative")));
            }
            if addrs.insert(to_node_id(*id), *addr).is_some() {
                return Err(raft_err(format!("voter {id} is listed twice")));
            }
        }
        if !addrs.contains_key(&to_node_id(cfg.node_id)) {
            return Err(raft_err(format!(
                "node {} is not among the controller quorum voters",
                cfg.node_id
            )));
        }
        let addrs = Arc::new(addrs);
        let me = to_node_id(cfg.node_id);

        let config = Config {
            cluster_name: "strom-metadata".into(),
            election_timeout_min: cfg.election_timeout_min_ms,
            election_timeout_max: cfg.election_timeout_max_ms,
            heartbeat_interval: cfg.heartbeat_interval_ms,
            install_snapshot_timeout: 30_000,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_every_entries.max(1)),
            max_in_snapshot_log_to_keep: cfg.snapshot_every_entries / 10,
            enable_pre_vote: Some(true),
            ..Default::default()
        };
        let config = Arc::new(config.validate().map_err(raft_err)?);

        let (tx, rx) = mpsc::channel(COMMITTED_CHANNEL);
        let progress = Arc::new(Progress {
            delivered: AtomicI64::new(-1),
        });
        let mut log = LogStore::open(&cfg.dir)?;
        let sm = StateMachine::open(&cfg.dir, tx, progress.clone())?;
        let pristine = {
            let state = log.get_log_state().await?;
            let vote = log.read_vote().await?;
            state.last_log_id.is_none()
                && state.last_purged_log_id.is_none()
                && vote.is_none()
                && !cfg.dir.join(state_machine::SNAPSHOT_FILE).exists()
        };

        let factory = NetworkFactory {
            me,
            addrs: addrs.clone(),
        };
        let raft = openraft::Raft::new(me, config, factory, log, sm)
            .await
            .map_err(raft_err)?;

        let (peers, closed) = PeerWatch::new();
        let server = tokio::spawn(network::serve(
            listener,
            Arc::new(ServerCtx {
                node_id: me,
                raft: raft.clone(),
                handler: handler.clone(),
                peers: peers.clone(),
            }),
        ));
        let liveness = tokio::spawn(
            Arc::new(Watcher {
                me,
                raft: raft.clone(),
                addrs: addrs.clone(),
                peers: peers.clone(),
                handler: handler.clone(),
            })
            .run(closed),
        );

        let (leader_tx, leader_rx) = watch::channel(None);
        let watcher = {
            let mut metrics = raft.metrics();
            tokio::spawn(async move {
                loop {
                    let leader = metrics.borrow_watched().current_leader.map(from_node_id);
                    leader_tx.send_if_modified(|cur| {
                        let changed = *cur != leader;
                        *cur = leader;
                        changed
                    });
                    if metrics.changed().await.is_err() {
                        leader_tx.send_replace(None);
                        return;
                    }
                }
            })
        };

        let mut tasks = vec![server, watcher, liveness];
        let lowest = addrs.keys().next().copied();
        if pristine && lowest == Some(me) {
            // Wait a little before forming the cluster: on a fresh cluster nobody can elect a
            // leader without a membership, so a leader that shows up meanwhile means this node
            // lost its disk and rejoins an existing quorum, which it must not re-initialize.
            let raft = raft.clone();
            let wait = Duration::from_millis(cfg.election_timeout_max_ms);
            let members: BTreeMap<u64, BasicNode> = addrs
                .iter()
                .map(|(id, addr)| (*id, BasicNode::new(addr.to_string())))
                .collect();
            tasks.push(tokio::spawn(async move {
                let mut metrics = raft.metrics();
                let _ = tokio::time::timeout(wait, async {
                    while metrics.borrow_watched().current_leader.is_none() {
                        if metrics.changed().await.is_err() {
                            break;
                        }
                    }
                })
                .await;
                if raft.metrics().borrow_watched().current_leader.is_some()
                    || raft.is_initialized().await.unwrap_or(true)
                {
                    tracing::info!("the metadata quorum already exists; not initializing it");
                    return;
                }
                tracing::info!(
                    voters = ?members.keys().map(|i| from_node_id(*i)).collect::<Vec<_>>(),
                    "initializing the metadata quorum"
                );
                if let Err(e) = raft.initialize(members).await {
                    tracing::warn!(error = %e, "metadata quorum initialization refused");
                }
            }));
        }

        let log = RaftMetadataLog {
            inner: Arc::new(Inner {
                node_id: cfg.node_id,
                raft,
                leader_rx,
                progress,
                app: AppClient::new(me, addrs),
                handler,
                peers,
                tasks: Mutex::new(tasks),
                shut: AtomicBool::new(false),
            }),
        };
        Ok((log, rx))
    }

    pub fn node_id(&self) -> i32 {
        self.inner.node_id
    }

    /// The leader this node currently knows of (None during an election).
    pub fn leader(&self) -> Option<i32> {
        *self.inner.leader_rx.borrow()
    }

    pub fn leader_watch(&self) -> watch::Receiver<Option<i32>> {
        self.inner.leader_rx.clone()
    }

    /// Since when node `node_id`'s process is known to be gone (its controller listener
    /// refused a probe after a connection from it closed), if it is.
    pub fn peer_down_since(&self, node_id: i32) -> Option<std::time::Instant> {
        self.inner.peers.down_since(to_node_id(node_id))
    }

    pub fn is_leader(&self) -> bool {
        self.inner.raft.is_leader()
    }

    fn check_open(&self) -> Result<(), MetadataLogError> {
        if self.inner.shut.load(Ordering::SeqCst) {
            Err(MetadataLogError::Shutdown)
        } else {
            Ok(())
        }
    }

    /// Leader only: appends the records as ONE Raft entry and returns its offset (the Raft log
    /// index) once committed. `NotLeader` also reports an entry that a leader change discarded
    /// (it may or may not commit later).
    pub async fn append(&self, records: Vec<MetadataRecord>) -> Result<i64, MetadataLogError> {
        self.check_open()?;
        let (responder, commit_rx, complete_rx) = ProgressResponder::new();
        self.inner
            .raft
            .write(RecordBatch(records))
            .responder(responder)
            .await
            .map_err(|_| MetadataLogError::Shutdown)?;
        if let Ok(log_id) = commit_rx.await {
            return Ok(log_id.index as i64);
        }
        match complete_rx.await {
            Ok(Ok(resp)) => Ok(resp.log_id.index as i64),
            Ok(Err(ClientWriteError::ForwardToLeader(f)))
            | Ok(Err(ClientWriteError::LogEntryDiscarded(f))) => Err(MetadataLogError::NotLeader {
                leader: f.leader_id.map(from_node_id),
            }),
            Ok(Err(e)) => Err(raft_err(e)),
            Err(_) => Err(MetadataLogError::Shutdown),
        }
    }

    /// Leader only: resolves once every entry committed by earlier leaders has been delivered
    /// through the Committed channel (read index), returning that offset.
    pub async fn ensure_leader_ready(&self) -> Result<i64, MetadataLogError> {
        self.check_open()?;
        match self
            .inner
            .raft
            .ensure_linearizable(ReadPolicy::ReadIndex)
            .await
        {
            Ok(read) => Ok(read.index() as i64),
            Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f))) => {
                Err(MetadataLogError::NotLeader {
                    leader: f.leader_id.map(from_node_id),
                })
            }
            Err(RaftError::APIError(e)) => Err(raft_err(e)),
            Err(RaftError::Fatal(_)) => Err(MetadataLogError::Shutdown),
        }
    }

    /// Sends an application request to the active controller's ControllerHandler (this node's
    /// own handler if it is the leader), retrying while there is no leader or it moved, up to
    /// `timeout`. A request whose connection breaks mid-way is sent again (at least once).
    pub async fn call_controller(
        &self,
        request: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, MetadataLogError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let timed_out = || MetadataLogError::Timeout("no active controller answered".into());
        let mut leaders = self.leader_watch();
        // A leader named by a node that is no longer the leader, tried before our own view.
        let mut hint: Option<i32> = None;
        loop {
            self.check_open()?;
            let known = *leaders.borrow_and_update();
            let leader = hint.take().or(known);
            match leader {
                None => {
                    if tokio::time::timeout_at(deadline, leaders.changed())
                        .await
                        .is_err()
                    {
                        return Err(timed_out());
                    }
                    continue;
                }
                Some(id) if id == self.inner.node_id => {
                    if self.is_leader() {
                        let fut = self.inner.handler.handle(request.clone());
                        return tokio::time::timeout_at(deadline, fut)
                            .await
                            .map_err(|_| timed_out());
                    }
                }
                Some(id) => {
                    let call = self.inner.app.call(to_node_id(id), &request);
                    match tokio::time::timeout_at(deadline, call).await {
                        Err(_) => return Err(timed_out()),
                        Ok(Ok(AppAnswer::Ok(answer))) => return Ok(answer),
                        Ok(Ok(AppAnswer::NotLeader(other))) => {
                            if other.is_some() && other != Some(id) && other != known {
                                hint = other;
                                continue;
                            }
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(leader = id, error = %e, "controller call failed; retrying");
                        }
                    }
                }
            }
            let pause = tokio::time::Instant::now() + Duration::from_millis(50);
            if pause >= deadline {
                return Err(timed_out());
            }
            tokio::time::sleep_until(pause).await;
        }
    }

    /// For DescribeQuorum: leader id, leader epoch (= Raft term), high watermark (= committed
    /// index), and per voter its matched index and last fetch / caught-up times as the leader
    /// sees them (-1 where unknown, e.g. on a follower).
    pub fn quorum_state(&self) -> QuorumState {
        let metrics = self.inner.raft.metrics();
        let m = metrics.borrow_watched();
        let me = to_node_id(self.inner.node_id);
        let committed = m.cluster_committed.or(m.local_committed);
        let high_watermark = offset_of(committed.as_ref());
        let is_leader = m.state == ServerState::Leader;
        let now = now_ms();
        let voter_ids: BTreeSet<u64> = m.membership_config.membership().voter_ids().collect();
        let voters = voter_ids
            .into_iter()
            .map(|id| {
                if id == me {
                    let end = m.last_log_index.map(|i| i as i64).unwrap_or(-1);
                    return VoterState {
                        replica_id: from_node_id(id),
                        log_end_offset: end,
                        last_fetch_timestamp: if is_leader { now } else { -1 },
                        last_caught_up_timestamp: if is_leader { now } else { -1 },
                    };
                }
                let matched = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&id))
                    .map(|l| offset_of(l.as_ref()))
                    .unwrap_or(-1);
                let fetched = m
                    .heartbeat
                    .as_ref()
                    .and_then(|h| h.get(&id))
                    .and_then(|t| t.as_ref())
                    .map(|t| now - t.elapsed().as_millis() as i64)
                    .unwrap_or(-1);
                let caught_up = if fetched >= 0 && matched >= high_watermark {
                    fetched
                } else {
                    -1
                };
                VoterState {
                    replica_id: from_node_id(id),
                    log_end_offset: matched,
                    last_fetch_timestamp: fetched,
                    last_caught_up_timestamp: caught_up,
                }
            })
            .collect();
        QuorumState {
            leader_id: m.current_leader.map(from_node_id).unwrap_or(-1),
            leader_epoch: m.current_term as i32,
            high_watermark,
            voters,
        }
    }

    /// Offset of the last entry delivered through Committed (-1 if none).
    pub fn applied_offset(&self) -> i64 {
        self.inner.progress.delivered.load(Ordering::SeqCst)
    }

    /// Resolves once this node knows a leader and has delivered everything up to the commit
    /// index it has learned (on the leader: everything earlier leaders committed). Returns
    /// `applied_offset()`.
    pub async fn wait_caught_up(&self, timeout: Duration) -> Result<i64, MetadataLogError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let timed_out = || MetadataLogError::Timeout("metadata log did not catch up".into());
        let mut metrics = self.inner.raft.metrics();
        loop {
            self.check_open()?;
            let (leader, caught_up) = {
                let m = metrics.borrow_watched();
                let committed = m.cluster_committed.or(m.local_committed);
                let applied = m.last_applied;
                // A follower must have heard the leader's commit index: after a restart the
                // commit index is unknown (not persisted) and an empty "nothing committed yet"
                // would let the broker act on an empty image (and drop its partitions' logs).
                (
                    m.current_leader,
                    committed.is_some() && committed.map(|c| c.index) <= applied.map(|a| a.index),
                )
            };
            if leader == Some(to_node_id(self.inner.node_id)) {
                match tokio::time::timeout_at(deadline, self.ensure_leader_ready()).await {
                    Err(_) => return Err(timed_out()),
                    Ok(Ok(_)) => return Ok(self.applied_offset()),
                    // Leadership moved meanwhile: wait for the next one.
                    Ok(Err(MetadataLogError::NotLeader { .. })) => {}
                    Ok(Err(e)) => return Err(e),
                }
            } else if leader.is_some() && caught_up {
                return Ok(self.applied_offset());
            }
            match tokio::time::timeout_at(deadline, metrics.changed()).await {
                Err(_) => return Err(timed_out()),
                Ok(Err(_)) => return Err(MetadataLogError::Shutdown),
                Ok(Ok(())) => {}
            }
        }
    }

    /// Stops Raft, closes the controller listener and every connection it accepted.
    pub async fn shutdown(&self) {
        if self.inner.shut.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Err(e) = self.inner.raft.shutdown().await {
            tracing::warn!(error = %e, "metadata raft did not stop cleanly");
        }
        let tasks: Vec<_> =
            std::mem::take(&mut *self.inner.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for task in tasks {
            task.abort();
            let _ = task.await;
        }
    }
}
