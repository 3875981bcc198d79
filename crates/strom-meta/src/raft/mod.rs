//! The Raft-replicated metadata log (KRaft-like): every controller-quorum voter keeps the
//! metadata records in a Raft log (openraft), the leader is the active controller, and every
//! committed batch is handed to the broker through a channel of [`Committed`] messages.
//!
//! A node whose id is not among the voters is a broker-only node (Kafka's
//! `process.roles=broker`): an openraft learner that receives the same committed log and
//! snapshots but never votes and never leads. On start it asks the active controller to add it
//! to the membership with its controller-listener address (see [`admit_learner`]); it is never
//! promoted to voter (nothing here changes the voter set), and never initializes a cluster.
//!
//! Nothing outside this module sees openraft types.
//!
//! Files under [`RaftConfig::dir`]: `raft.log`, `vote`, `purged` (see `storage.rs`),
//! `snapshot` (see `state_machine.rs`) and `directory.id` (see `directory.rs`).
//!
//! Offsets are Raft log indexes: they only grow, but have gaps (the entries a new leader or a
//! membership change writes carry no records and are not delivered).
//!
//! Limits worth knowing:
//! - A voter that lost its directory comes back under a new directory id, and its vote counts
//!   again once the leader has recorded that id (see `directory.rs`, with what it leaves open).
//! - A snapshot travels as one frame, so the metadata image must encode to under 64 MiB.
//! - A broker-only node stays in the membership until it is unregistered
//!   ([`RaftMetadataLog::remove_learner`], UnregisterBroker): until then the leader keeps
//!   trying to replicate to it while it is gone.
//! - The leader does not purge entries a voter (or a broker-only learner) that is down still
//!   needs, and the log store keeps unpurged entries in memory: a long outage of one node grows
//!   the leader's memory.

mod check_quorum;
mod directory;
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
use check_quorum::CheckQuorum;
use directory::Directories;
use liveness::{PeerWatch, Watcher};
use network::{
    Answer, AppClient, JoinRequest, NetworkFactory, PeerAddrs, RaftHandle, ServerCtx, TAG_APP,
    TAG_JOIN,
};
use state_machine::{Progress, StateMachine};
use storage::LogStore;
use types::{from_node_id, offset_of, to_node_id, RecordBatch};

/// On the active controller: writes a `VoterDirectory` record for every voter (this node
/// included) whose directory id, as it answered the handshake, the log does not record yet (see
/// `directory.rs`). Checked every `every`, after the log's earlier entries are applied.
async fn record_directories(
    raft: RaftHandle,
    resigned: Arc<AtomicBool>,
    directories: Arc<Directories>,
    (me, own): (u64, String),
    voters: Vec<u64>,
    every: Duration,
) {
    if !voters.contains(&me) {
        return;
    }
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !network::active_controller(&raft, &resigned)
            || directories.unrecorded(me, &own, &voters).is_empty()
            || raft
                .ensure_linearizable(ReadPolicy::ReadIndex)
                .await
                .is_err()
        {
            continue;
        }
        let records = directories.unrecorded(me, &own, &voters);
        if records.is_empty() {
            continue;
        }
        match raft.client_write(RecordBatch(records.clone())).await {
            Ok(_) => tracing::info!(?records, "recorded the voters' metadata log directories"),
            Err(e) => tracing::debug!(error = %e, "recording voter directories failed"),
        }
    }
}

/// Room in the `Committed` channel.
const COMMITTED_CHANNEL: usize = 1024;
/// How long a stopping leader waits for another voter to take over (`resign`).
const RESIGN_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct RaftConfig {
    pub node_id: i32,
    /// Every voter, from --controller-quorum "1@127.0.0.1:9192,2@...". A node that is not
    /// among them is a broker-only node (a learner).
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
    /// This node's Raft stopped on an error of its own (its log storage failed, e.g. an
    /// fsync): it can no longer take part in the quorum nor learn what it commits. Called once.
    fn metadata_log_failed(&self, _error: &str) {}
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
    pub voters: Vec<ReplicaState>,
    /// The learners (broker-only nodes): Kafka's observers.
    pub observers: Vec<ReplicaState>,
}

/// One replica of the metadata log as the leader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaState {
    pub replica_id: i32,
    /// The replica's matched log index as the leader sees it (-1: unknown).
    pub log_end_offset: i64,
    /// Milliseconds since the epoch (-1: unknown).
    pub last_fetch_timestamp: i64,
    pub last_caught_up_timestamp: i64,
    /// The id of its metadata log directory as last recorded in the log (KIP-853), if any
    /// (voters only).
    pub directory_id: Option<String>,
}

struct Inner {
    node_id: i32,
    /// False on a broker-only node (a learner).
    voter: bool,
    /// The controller listener this node announces when it joins as a learner.
    listen_addr: SocketAddr,
    raft: RaftHandle,
    leader_rx: watch::Receiver<Option<i32>>,
    /// This node is the Raft leader but has not heard from a majority of the voters for a
    /// while (see `CheckQuorum`): it does not act as the active controller meanwhile.
    resigned: Arc<AtomicBool>,
    progress: Arc<Progress>,
    app: AppClient,
    handler: Arc<dyn ControllerHandler>,
    liveness: Arc<PeerWatch>,
    directories: Arc<Directories>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    shut: AtomicBool,
}

/// The Raft metadata log of one node: a controller-quorum voter or a broker-only learner.
/// Cheap to clone.
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
    ///
    /// A node that is not a voter starts as a learner and asks the active controller, in the
    /// background until it succeeds, to add it with the listener's address (which therefore
    /// must be one the voters can reach, not a wildcard).
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
        if cfg.node_id < 0 {
            return Err(raft_err(format!("node id {} is negative", cfg.node_id)));
        }
        let me = to_node_id(cfg.node_id);
        let voter = addrs.contains_key(&me);
        let listen_addr = listener.local_addr().map_err(raft_err)?;
        if !voter && listen_addr.ip().is_unspecified() {
            return Err(raft_err(format!(
                "broker-only node {}: the controller listener {listen_addr} is a wildcard \
                 address; the voters need one they can connect to",
                cfg.node_id
            )));
        }
        let peers = PeerAddrs::new(addrs);

        let config = Config {
            cluster_name: "strom-metadata".into(),
            election_timeout_min: cfg.election_timeout_min_ms,
            election_timeout_max: cfg.election_timeout_max_ms,
            heartbeat_interval: cfg.heartbeat_interval_ms,
            install_snapshot_timeout: 30_000,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_every_entries.max(1)),
            max_in_snapshot_log_to_keep: cfg.snapshot_every_entries / 10,
            enable_pre_vote: Some(true),
            // A voter back with an empty directory (a replaced disk) answers the leader with a
            // log shorter than the one it had acknowledged: start its replication over instead
            // of stalling on it (openraft's default treats that as a bug).
            allow_log_reversion: Some(true),
            ..Default::default()
        };
        let config = Arc::new(config.validate().map_err(raft_err)?);

        let (tx, rx) = mpsc::channel(COMMITTED_CHANNEL);
        let progress = Arc::new(Progress {
            delivered: AtomicI64::new(-1),
        });
        let mut log = LogStore::open(&cfg.dir)?;
        let directories = Arc::new(Directories::default());
        let sm = StateMachine::open(&cfg.dir, tx, progress.clone(), directories.clone())?;
        let pristine = {
            let state = log.get_log_state().await?;
            let vote = log.read_vote().await?;
            state.last_log_id.is_none()
                && state.last_purged_log_id.is_none()
                && vote.is_none()
                && !cfg.dir.join(state_machine::SNAPSHOT_FILE).exists()
        };
        let directory_id = directory::load_or_create(&cfg.dir, pristine)?;
        // What the log already records, committed or not (see `directory.rs`).
        for entry in log.try_get_log_entries(..).await? {
            if let openraft::EntryPayload::Normal(batch) = &entry.payload {
                directories.record_all(entry.log_id, &batch.0);
            }
        }

        let factory = NetworkFactory {
            me,
            peers: peers.clone(),
            directories: directories.clone(),
        };
        let raft = openraft::Raft::new(me, config, factory, log, sm)
            .await
            .map_err(raft_err)?;

        let (liveness, closed) = PeerWatch::new();
        let resigned = Arc::new(AtomicBool::new(false));
        let server = tokio::spawn(network::serve(
            listener,
            Arc::new(ServerCtx {
                node_id: me,
                directory_id: directory_id.clone(),
                raft: raft.clone(),
                handler: handler.clone(),
                peers: peers.clone(),
                liveness: liveness.clone(),
                resigned: resigned.clone(),
            }),
        ));
        let liveness_watch = tokio::spawn(
            Arc::new(Watcher {
                me,
                raft: raft.clone(),
                peers: peers.clone(),
                liveness: liveness.clone(),
                handler: handler.clone(),
            })
            .run(closed),
        );

        let (leader_tx, leader_rx) = watch::channel(None);
        let watcher = {
            let mut metrics = raft.metrics();
            let peers = peers.clone();
            let resigned = resigned.clone();
            let handler = handler.clone();
            let mut failed = false;
            let mut check = CheckQuorum::new(
                me,
                Duration::from_millis(cfg.election_timeout_max_ms.saturating_mul(3) / 2),
            );
            // Wakes up without a metrics change too: a leader cut off from the other voters
            // sees none (its last quorum acknowledgement just grows old).
            let tick = Duration::from_millis(cfg.heartbeat_interval_ms.max(1));
            tokio::spawn(async move {
                let mut membership_seen = None;
                loop {
                    let (leader, membership, lost, fatal) = {
                        let m = metrics.borrow_watched();
                        // Stopped by a storage error or a panic, not by `shutdown`.
                        let fatal = match &m.running_state {
                            Err(openraft::error::Fatal::Stopped) | Ok(()) => None,
                            Err(e) => Some(e.to_string()),
                        };
                        let membership = m.membership_config.clone();
                        let voters = membership.membership().voter_ids().count();
                        let acked = m.last_quorum_acked.as_ref().map(|t| t.elapsed());
                        let term = (m.state == ServerState::Leader).then_some(m.current_term);
                        let lost = check.lost(term, voters, acked);
                        (m.current_leader.map(from_node_id), membership, lost, fatal)
                    };
                    if let Some(e) = fatal.filter(|_| !failed) {
                        failed = true;
                        handler.metadata_log_failed(&e);
                    }
                    if membership_seen.as_ref() != Some(membership.log_id()) {
                        peers.learn_only(membership.membership().nodes());
                        membership_seen = Some(*membership.log_id());
                    }
                    resigned.store(lost, Ordering::SeqCst);
                    let leader = if lost { None } else { leader };
                    leader_tx.send_if_modified(|cur| {
                        let changed = *cur != leader;
                        *cur = leader;
                        changed
                    });
                    tokio::select! {
                        changed = metrics.changed() => {
                            if changed.is_err() {
                                leader_tx.send_replace(None);
                                return;
                            }
                        }
                        _ = tokio::time::sleep(tick) => {}
                    }
                }
            })
        };

        let recorder = tokio::spawn(record_directories(
            raft.clone(),
            resigned.clone(),
            directories.clone(),
            (me, directory_id),
            peers.voters().keys().copied().collect(),
            Duration::from_millis(cfg.heartbeat_interval_ms.max(1)),
        ));
        let mut tasks = vec![server, watcher, liveness_watch, recorder];
        let lowest = peers.voters().keys().next().copied();
        // Only a voter may found the cluster: a broker-only node never initializes one.
        if voter && pristine && lowest == Some(me) {
            // Wait a little before forming the cluster: on a fresh cluster nobody can elect a
            // leader without a membership, so a leader that shows up meanwhile means this node
            // lost its disk and rejoins an existing quorum, which it must not re-initialize.
            let raft = raft.clone();
            let wait = Duration::from_millis(cfg.election_timeout_max_ms);
            let members: BTreeMap<u64, BasicNode> = peers
                .voters()
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
                voter,
                listen_addr,
                raft,
                leader_rx,
                resigned,
                progress,
                app: AppClient::new(me, peers),
                handler,
                liveness,
                directories,
                tasks: Mutex::new(tasks),
                shut: AtomicBool::new(false),
            }),
        };
        if !voter {
            tracing::info!(
                node_id = cfg.node_id,
                controller_listener = %listen_addr,
                "broker-only node: following the metadata quorum as a learner"
            );
            let join = tokio::spawn(join_as_learner(Arc::downgrade(&log.inner)));
            log.inner
                .tasks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(join);
        }
        Ok((log, rx))
    }

    /// The voters' directory ids as this node's log records them.
    fn recorded_directories(&self) -> BTreeMap<u64, String> {
        self.inner.directories.recorded()
    }

    /// Whether this node is a controller-quorum voter (false: a broker-only learner).
    pub fn is_voter(&self) -> bool {
        self.inner.voter
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
        self.inner.liveness.down_since(to_node_id(node_id))
    }

    /// When node `node_id` last sent this node a request on the controller listener (the
    /// metadata leader sends appends or heartbeats several times per election timeout), if it
    /// did since this process started.
    pub fn peer_last_heard(&self, node_id: i32) -> Option<std::time::Instant> {
        self.inner.liveness.last_heard(to_node_id(node_id))
    }

    /// Whether this node is the active controller: the Raft leader, still acknowledged by a
    /// majority of the voters within the check-quorum window.
    pub fn is_leader(&self) -> bool {
        network::active_controller(&self.inner.raft, &self.inner.resigned)
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
            // It could not confirm its leadership with a majority (e.g. a leader restored at
            // restart whose peers moved to a later term or are down): not the leader for now.
            Err(RaftError::APIError(LinearizableReadError::QuorumNotEnough(e))) => {
                tracing::debug!(error = %e, "leadership not confirmed by a majority");
                Err(MetadataLogError::NotLeader { leader: None })
            }
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
        self.call_leader(TAG_APP, request, timeout).await
    }

    /// Serves a request this node received as the leader (`call_leader` without the network).
    async fn answer_locally(&self, tag: u8, request: Vec<u8>) -> Answer {
        match tag {
            TAG_JOIN => match serde_json::from_slice::<JoinRequest>(&request) {
                Ok(req) => admit_learner(&self.inner.raft, &self.inner.app.peers, req).await,
                Err(e) => Answer::Err(format!("bad join request: {e}")),
            },
            _ => Answer::Ok(self.inner.handler.handle(request).await),
        }
    }

    /// Sends a request (`TAG_APP` or `TAG_JOIN`) to the active controller, retrying while
    /// there is no leader, it moved, or it answered with an error, up to `timeout`. A node that
    /// knows no leader and is not a voter (a learner before it joined) asks the voters in turn:
    /// each names the leader it knows.
    async fn call_leader(
        &self,
        tag: u8,
        request: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, MetadataLogError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last_error: Option<String> = None;
        let timed_out = |last: &Option<String>| {
            MetadataLogError::Timeout(match last {
                Some(e) => format!("no active controller answered (last error: {e})"),
                None => "no active controller answered".into(),
            })
        };
        let mut leaders = self.leader_watch();
        let voters: Vec<i32> = self
            .inner
            .app
            .peers
            .voters()
            .keys()
            .map(|id| from_node_id(*id))
            .collect();
        let mut probe = 0usize;
        // A leader named by a node that is no longer the leader, tried before our own view.
        let mut hint: Option<i32> = None;
        loop {
            self.check_open()?;
            let known = *leaders.borrow_and_update();
            let probed = if known.is_none() && !self.inner.voter && !voters.is_empty() {
                probe = probe.wrapping_add(1);
                Some(voters[probe % voters.len()])
            } else {
                None
            };
            let leader = hint.take().or(known).or(probed);
            match leader {
                None => {
                    if tokio::time::timeout_at(deadline, leaders.changed())
                        .await
                        .is_err()
                    {
                        return Err(timed_out(&last_error));
                    }
                    continue;
                }
                Some(id) if id == self.inner.node_id => {
                    if self.is_leader() {
                        let fut = self.answer_locally(tag, request.clone());
                        match tokio::time::timeout_at(deadline, fut).await {
                            Err(_) => return Err(timed_out(&last_error)),
                            Ok(Answer::Ok(answer)) => return Ok(answer),
                            Ok(Answer::NotLeader(_)) => {}
                            Ok(Answer::Err(e)) => last_error = Some(e),
                        }
                    }
                }
                Some(id) => {
                    let call = self.inner.app.call(to_node_id(id), tag, &request);
                    match tokio::time::timeout_at(deadline, call).await {
                        Err(_) => return Err(timed_out(&last_error)),
                        Ok(Ok(Answer::Ok(answer))) => return Ok(answer),
                        Ok(Ok(Answer::NotLeader(other))) => {
                            if other.is_some() && other != Some(id) && other != known {
                                hint = other;
                                continue;
                            }
                        }
                        Ok(Ok(Answer::Err(e))) => {
                            tracing::debug!(leader = id, error = %e, "controller refused; retrying");
                            last_error = Some(e);
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(leader = id, error = %e, "controller call failed; retrying");
                            last_error = Some(e.to_string());
                        }
                    }
                }
            }
            let pause = tokio::time::Instant::now() + Duration::from_millis(50);
            if pause >= deadline {
                return Err(timed_out(&last_error));
            }
            tokio::time::sleep_until(pause).await;
        }
    }

    /// Leader only: removes broker-only node `node_id` (a learner) from the membership, so the
    /// leader stops replicating to it and DescribeQuorum no longer lists it (UnregisterBroker).
    /// Returns once the change is committed: true if it was a learner, false if it was not in
    /// the membership. A voter is refused: the voter set never changes here.
    pub async fn remove_learner(&self, node_id: i32) -> Result<bool, MetadataLogError> {
        self.check_open()?;
        if node_id < 0 {
            return Ok(false);
        }
        let id = to_node_id(node_id);
        let (voter, learner) = {
            let metrics = self.inner.raft.metrics();
            let m = metrics.borrow_watched();
            let membership = m.membership_config.membership();
            let voter = membership.voter_ids().any(|v| v == id);
            let learner = membership.learner_ids().any(|l| l == id);
            (voter, learner)
        };
        if voter || self.inner.app.peers.is_voter(id) {
            return Err(raft_err(format!(
                "node {node_id} is a controller-quorum voter, not a broker-only node"
            )));
        }
        if !learner {
            return Ok(false);
        }
        let change = openraft::ChangeMembers::RemoveNodes(BTreeSet::from([id]));
        match self.inner.raft.change_membership(change, false).await {
            Ok(_) => {
                self.inner.app.peers.forget(id);
                tracing::info!(
                    node_id,
                    "broker-only node removed from the metadata quorum (learner)"
                );
                Ok(true)
            }
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(MetadataLogError::NotLeader {
                    leader: f.leader_id.map(from_node_id),
                })
            }
            Err(RaftError::Fatal(_)) => Err(MetadataLogError::Shutdown),
            Err(e) => Err(raft_err(e)),
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
        let directories = self.recorded_directories();
        let replica = |id: u64| {
            let directory_id = directories.get(&id).cloned();
            if id == me {
                let end = m.last_log_index.map(|i| i as i64).unwrap_or(-1);
                return ReplicaState {
                    replica_id: from_node_id(id),
                    log_end_offset: end,
                    last_fetch_timestamp: if is_leader { now } else { -1 },
                    last_caught_up_timestamp: if is_leader { now } else { -1 },
                    directory_id,
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
            ReplicaState {
                replica_id: from_node_id(id),
                log_end_offset: matched,
                last_fetch_timestamp: fetched,
                last_caught_up_timestamp: caught_up,
                directory_id,
            }
        };
        let membership = m.membership_config.membership();
        let voter_ids: BTreeSet<u64> = membership.voter_ids().collect();
        let learner_ids: BTreeSet<u64> = membership.learner_ids().collect();
        let resigned = self.inner.resigned.load(Ordering::SeqCst);
        QuorumState {
            leader_id: m
                .current_leader
                .filter(|_| !resigned)
                .map(from_node_id)
                .unwrap_or(-1),
            leader_epoch: m.current_term as i32,
            high_watermark,
            voters: voter_ids.into_iter().map(replica).collect(),
            observers: learner_ids.into_iter().map(replica).collect(),
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
            // Looks again without a metrics change too: a leader that could not confirm its
            // leadership may still believe it leads.
            let wake = (tokio::time::Instant::now() + Duration::from_millis(100)).min(deadline);
            match tokio::time::timeout_at(wake, metrics.changed()).await {
                Err(_) if wake >= deadline => return Err(timed_out()),
                Err(_) | Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(MetadataLogError::Shutdown),
            }
        }
    }

    /// Stops Raft, closes the controller listener and every connection it accepted. The
    /// active controller first hands its leadership to another voter (`resign`).
    pub async fn shutdown(&self) {
        if self.inner.shut.swap(true, Ordering::SeqCst) {
            return;
        }
        self.resign(RESIGN_TIMEOUT).await;
        // The listener and its connections first: a peer's request still inside Raft when it
        // stops fails there (and openraft logs that as an error).
        let tasks: Vec<_> =
            std::mem::take(&mut *self.inner.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for task in tasks {
            task.abort();
            let _ = task.await;
        }
        if let Err(e) = self.inner.raft.shutdown().await {
            tracing::warn!(error = %e, "metadata raft did not stop cleanly");
        }
    }

    /// On the leader of a quorum of several voters: transfers the leadership to the voter that
    /// has replicated the most and waits (up to `timeout`) until it has taken over. A KRaft
    /// controller resigns on a clean shutdown the same way: the quorum has a leader again at
    /// once instead of after the leader is noticed gone.
    async fn resign(&self, timeout: Duration) {
        let raft = &self.inner.raft;
        let me = to_node_id(self.inner.node_id);
        let target = {
            let metrics = raft.metrics();
            let m = metrics.borrow_watched();
            if m.current_leader != Some(me) {
                return;
            }
            let matched = |id: &u64| {
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(id))
                    .map(|l| offset_of(l.as_ref()))
                    .unwrap_or(-1)
            };
            // Only a voter that answered recently can take over in time.
            let answering = |id: &u64| {
                m.heartbeat
                    .as_ref()
                    .and_then(|h| h.get(id))
                    .and_then(|t| t.as_ref())
                    .is_some_and(|t| t.elapsed() < RESIGN_TIMEOUT / 2)
            };
            m.membership_config
                .membership()
                .voter_ids()
                .filter(|v| *v != me && answering(v))
                .max_by_key(|v| (matched(v), std::cmp::Reverse(*v)))
        };
        let Some(to) = target else { return };
        if raft.trigger().transfer_leader(to).await.is_err() {
            return;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut metrics = raft.metrics();
        loop {
            let leader = metrics.borrow_watched().current_leader;
            if let Some(leader) = leader.filter(|l| *l != me) {
                tracing::info!(
                    leader = from_node_id(leader),
                    "metadata quorum leadership handed over"
                );
                return;
            }
            // A target that stops too (the whole cluster is being stopped) never takes over.
            let now = tokio::time::Instant::now();
            if now >= deadline || self.inner.liveness.down_since(to).is_some() {
                tracing::info!(
                    to = from_node_id(to),
                    "metadata quorum leadership not handed over; leaving"
                );
                return;
            }
            let wake = deadline.min(now + Duration::from_millis(50));
            if let Ok(Err(_)) = tokio::time::timeout_at(wake, metrics.changed()).await {
                return;
            }
        }
    }
}

/// How long one join attempt may take, and the longest pause between attempts.
const JOIN_ATTEMPT: Duration = Duration::from_secs(10);
const JOIN_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// At most this many broker-only nodes in the membership (each costs the leader a replication
/// stream until UnregisterBroker removes it).
const MAX_LEARNERS: usize = 1024;

/// A broker-only node's start: asks the active controller to add it as a learner, retrying
/// (with a growing pause) until it is in, or the log shuts down. On a restart it is already in
/// the membership and the leader answers at once (or records its new address).
async fn join_as_learner(inner: std::sync::Weak<Inner>) {
    let mut pause = Duration::from_millis(100);
    loop {
        let Some(log) = inner.upgrade().map(|inner| RaftMetadataLog { inner }) else {
            return;
        };
        let req = JoinRequest {
            node_id: to_node_id(log.inner.node_id),
            addr: log.inner.listen_addr,
        };
        let body = match serde_json::to_vec(&req) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode the join request");
                return;
            }
        };
        match log.call_leader(TAG_JOIN, body, JOIN_ATTEMPT).await {
            Ok(_) => {
                tracing::info!(
                    node_id = log.inner.node_id,
                    "joined the metadata quorum as a broker-only node (learner)"
                );
                return;
            }
            Err(MetadataLogError::Shutdown) => return,
            Err(e) => tracing::warn!(error = %e, "joining the metadata quorum; retrying"),
        }
        drop(log);
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(JOIN_BACKOFF_MAX);
    }
}

/// The leader's side of a join: adds `req.node_id` as a learner at `req.addr` (openraft's
/// non-blocking `add_learner`: the leader starts replicating to it once the membership entry
/// commits), or records its new address if it is already a learner elsewhere. Never touches
/// the voter set, and refuses a node id that is a voter.
async fn admit_learner(raft: &RaftHandle, peers: &PeerAddrs, req: JoinRequest) -> Answer {
    if req.node_id > i32::MAX as u64 {
        return Answer::Err(format!("{} is not a node id", req.node_id));
    }
    let id = from_node_id(req.node_id);
    let addr = req.addr.to_string();
    let (voter, known, committed, learners) = {
        let metrics = raft.metrics();
        let m = metrics.borrow_watched();
        let membership = m.membership_config.membership();
        let voter = membership.voter_ids().any(|v| v == req.node_id);
        let known = membership.get_node(&req.node_id).map(|n| n.addr.clone());
        // Answer "already in" only from the committed membership: an uncommitted entry may
        // still be discarded by a leader change.
        let committed = m
            .committed_membership_config
            .membership()
            .get_node(&req.node_id)
            .is_some_and(|n| n.addr == addr);
        (voter, known, committed, membership.learner_ids().count())
    };
    if voter || peers.is_voter(req.node_id) {
        return Answer::Err(format!(
            "node {id} is a controller-quorum voter; it cannot join as a broker-only node"
        ));
    }
    if committed && known.as_deref() == Some(addr.as_str()) {
        return Answer::Ok(b"null".to_vec());
    }
    if known.is_none() && learners >= MAX_LEARNERS {
        return Answer::Err(format!(
            "node {id} cannot join: the metadata quorum already has {learners} broker-only nodes"
        ));
    }
    let node = BasicNode::new(addr.clone());
    let result = if known.is_some() {
        // Safe for a learner (it has no vote); `AddNodes` would keep the old address.
        let nodes = BTreeMap::from([(req.node_id, node)]);
        raft.change_membership(openraft::ChangeMembers::SetNodes(nodes), true)
            .await
    } else {
        raft.add_learner(req.node_id, node, false).await
    };
    match result {
        Ok(_) => {
            tracing::info!(
                node_id = id,
                controller_listener = %addr,
                moved = known.is_some(),
                "broker-only node added to the metadata quorum as a learner"
            );
            Answer::Ok(b"null".to_vec())
        }
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
            Answer::NotLeader(f.leader_id.map(from_node_id))
        }
        Err(e) => Answer::Err(format!("adding learner {id}: {e}")),
    }
}
