//! Transport on the controller listener: plain TCP, length-prefixed frames.
//!
//! A frame is `[len u32 BE][tag u8][body]` where `len` counts the tag and the body and is at
//! most 64 MiB (checked before anything is allocated). A connection starts with a handshake:
//! the client sends `HELLO {to, from}`; the server answers `OK {id, directory_id}` (its node id
//! and metadata log directory id, see `directory.rs`) only if `to` is its id (and the client
//! checks the id too), so a wrong node at an address is refused. Then
//! the client sends requests one at a time and reads one answer for each:
//!
//! | request tag         | body                         | answer                              |
//! |---------------------|------------------------------|-------------------------------------|
//! | 1 append_entries    | json AppendEntriesRequest    | OK json AppendEntriesResponse       |
//! | 2 vote, 3 pre_vote  | json VoteRequest             | OK json VoteResponse                |
//! | 4 full snapshot     | json {vote, meta, records}   | OK json SnapshotResponse            |
//! | 5 application       | raw bytes                    | OK raw bytes, or NOT_LEADER json    |
//! | 6 join as learner   | json JoinRequest             | OK json null, or NOT_LEADER json    |
//! | 7 transfer leader   | json TransferLeaderRequest   | OK json TransferLeaderResponse      |
//!
//! Tag 6 is how a broker-only node (not in `--controller-quorum`) asks the active controller
//! to add it to the membership as a learner, with the controller-listener address the leader
//! replicates to. Tag 7 is a stopping leader handing its leadership to this voter: it starts
//! an election at once (the vote it asks for is still checked as any other).
//!
//! `ERR <utf-8 message>` answers any request the server could not serve. Bad input (an
//! oversized frame, an unknown tag, json that does not parse) closes the connection; nothing
//! read from a socket can panic.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;
use openraft::error::{
    RPCError, ReplicationClosed, StreamingError, Timeout as RaftTimeout, Unreachable,
};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, RPCTypes, RaftNetworkV2};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::directory::Directories;
use super::liveness::PeerWatch;
use super::state_machine::StateMachine;
use super::types::{from_node_id, io_err, SnapshotMeta, SnapshotRecords, TypeConfig, Vote};
use super::ControllerHandler;
use crate::record::MetadataRecord;

pub const MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;

pub const TAG_HELLO: u8 = 0;
pub const TAG_APPEND: u8 = 1;
pub const TAG_VOTE: u8 = 2;
pub const TAG_PRE_VOTE: u8 = 3;
pub const TAG_SNAPSHOT: u8 = 4;
pub const TAG_APP: u8 = 5;
pub const TAG_JOIN: u8 = 6;
pub const TAG_TRANSFER_LEADER: u8 = 7;

pub const ANSWER_OK: u8 = 0;
pub const ANSWER_ERR: u8 = 1;
pub const ANSWER_NOT_LEADER: u8 = 2;

/// How long a new connection may take to say who it wants.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub type RaftHandle = openraft::Raft<TypeConfig, StateMachine>;

/// A broker-only node asks to follow the metadata log as a learner (tag 6).
#[derive(Debug, Serialize, Deserialize)]
pub struct JoinRequest {
    pub node_id: u64,
    /// Its controller listener, where the leader sends AppendEntries and snapshots.
    pub addr: SocketAddr,
}

/// What a node answers to an application or join request.
pub enum Answer {
    Ok(Vec<u8>),
    NotLeader(Option<i32>),
    Err(String),
}

/// Controller-listener addresses by node id: the voters from `--controller-quorum` (fixed),
/// and the learners (broker-only nodes) as the membership names them, kept up to date from the
/// membership so a learner that comes back at another address is found there. Looked up each
/// time a connection opens.
#[derive(Clone)]
pub struct PeerAddrs {
    voters: Arc<BTreeMap<u64, SocketAddr>>,
    learners: Arc<Mutex<HashMap<u64, SocketAddr>>>,
}

impl PeerAddrs {
    pub fn new(voters: BTreeMap<u64, SocketAddr>) -> Self {
        PeerAddrs {
            voters: Arc::new(voters),
            learners: Arc::default(),
        }
    }

    pub fn voters(&self) -> &BTreeMap<u64, SocketAddr> {
        &self.voters
    }

    pub fn is_voter(&self, id: u64) -> bool {
        self.voters.contains_key(&id)
    }

    pub fn get(&self, id: u64) -> Option<SocketAddr> {
        self.voters.get(&id).copied().or_else(|| {
            self.learners
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&id)
                .copied()
        })
    }

    /// Records the addresses the membership gives the nodes that are not configured voters
    /// (an address that does not parse is skipped: such a node is unreachable, not fatal).
    pub fn learn<'a>(&self, nodes: impl Iterator<Item = (&'a u64, &'a BasicNode)>) {
        let mut learners = self.learners.lock().unwrap_or_else(|e| e.into_inner());
        for (id, node) in nodes {
            if self.voters.contains_key(id) {
                continue;
            }
            if let Ok(addr) = node.addr.parse() {
                learners.insert(*id, addr);
            }
        }
    }

    /// The learners become exactly the membership's non-voter nodes: `learn`, and forget the
    /// ones it no longer has (a broker-only node removed by UnregisterBroker).
    pub fn learn_only<'a>(&self, nodes: impl Iterator<Item = (&'a u64, &'a BasicNode)>) {
        let nodes: Vec<_> = nodes.collect();
        self.learners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|id, _| nodes.iter().any(|(n, _)| *n == id));
        self.learn(nodes.into_iter());
    }

    /// Forgets a learner's address (removed from the membership).
    pub fn forget(&self, id: u64) {
        self.learners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }
}

#[derive(Serialize, Deserialize)]
struct Hello {
    to: u64,
    from: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct HelloAnswer {
    id: u64,
    #[serde(default)]
    directory_id: Option<String>,
}

/// The handshake answer as read: nodes from before directory ids answer their id alone.
#[derive(Deserialize)]
#[serde(untagged)]
enum HelloAnswerIn {
    Full(HelloAnswer),
    IdOnly(u64),
}

#[derive(Serialize)]
struct SnapshotOut<'a> {
    vote: &'a Vote,
    meta: &'a SnapshotMeta,
    records: &'a [MetadataRecord],
}

#[derive(Deserialize)]
struct SnapshotIn {
    vote: Vote,
    meta: SnapshotMeta,
    records: Vec<MetadataRecord>,
}

pub async fn write_frame<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    tag: u8,
    body: &[u8],
) -> io::Result<()> {
    if body.len() + 1 > MAX_FRAME_BYTES {
        return Err(io_err(format!(
            "frame of {} bytes exceeds the {MAX_FRAME_BYTES} byte limit",
            body.len() + 1
        )));
    }
    let mut buf = Vec::with_capacity(5 + body.len());
    buf.extend_from_slice(&((body.len() + 1) as u32).to_be_bytes());
    buf.push(tag);
    buf.extend_from_slice(body);
    w.write_all(&buf).await?;
    w.flush().await
}

pub async fn read_frame<R: AsyncReadExt + Unpin>(r: &mut R) -> io::Result<(u8, Vec<u8>)> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > MAX_FRAME_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame length {len} is out of bounds"),
        ));
    }
    let mut tag = [0u8; 1];
    r.read_exact(&mut tag).await?;
    let mut body = vec![0u8; len - 1];
    r.read_exact(&mut body).await?;
    Ok((tag[0], body))
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

// ---------------------------------------------------------------------------------------------
// Server

pub struct ServerCtx {
    pub node_id: u64,
    /// This node's metadata log directory id, told in every handshake.
    pub directory_id: String,
    pub raft: RaftHandle,
    pub handler: Arc<dyn ControllerHandler>,
    pub peers: PeerAddrs,
    pub liveness: Arc<PeerWatch>,
    /// The Raft leader lost its majority (check quorum): it answers as if it led nothing.
    pub resigned: Arc<AtomicBool>,
}

/// Reports the close of a connection a peer opened (however `serve_conn` ends).
struct PeerConnection<'a> {
    liveness: &'a PeerWatch,
    peer: u64,
}

impl Drop for PeerConnection<'_> {
    fn drop(&mut self) {
        self.liveness.closed(self.peer);
    }
}

/// Whether a node serves as the active controller: the Raft leader, still acknowledged by a
/// majority of the voters within the check-quorum window (not resigned).
pub(crate) fn active_controller(raft: &RaftHandle, resigned: &AtomicBool) -> bool {
    raft.is_leader() && !resigned.load(Ordering::SeqCst)
}

impl ServerCtx {
    fn active(&self) -> bool {
        active_controller(&self.raft, &self.resigned)
    }

    fn current_leader(&self) -> Option<i32> {
        if self.resigned.load(Ordering::SeqCst) {
            return None;
        }
        self.raft
            .metrics()
            .borrow_watched()
            .current_leader
            .map(from_node_id)
    }
}

/// Accepts connections until the returned future is dropped (dropping it closes every
/// connection it spawned, as they live in its `JoinSet`).
pub async fn serve(listener: TcpListener, ctx: Arc<ServerCtx>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let ctx = ctx.clone();
                    conns.spawn(async move {
                        if let Err(e) = serve_conn(stream, &ctx).await {
                            if e.kind() != io::ErrorKind::UnexpectedEof {
                                tracing::debug!(%peer, error = %e, "controller connection closed");
                            }
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "controller listener accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn serve_conn(mut stream: TcpStream, ctx: &ServerCtx) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    let (tag, body) = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut stream))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no handshake"))??;
    if tag != TAG_HELLO {
        return Err(invalid(format!("expected a handshake, got tag {tag}")));
    }
    let hello: Hello = serde_json::from_slice(&body).map_err(invalid)?;
    if hello.to != ctx.node_id {
        let msg = format!(
            "this is node {}, not node {}",
            from_node_id(ctx.node_id),
            from_node_id(hello.to)
        );
        write_frame(&mut stream, ANSWER_ERR, msg.as_bytes()).await?;
        return Err(invalid(msg));
    }
    let me = serde_json::to_vec(&HelloAnswer {
        id: ctx.node_id,
        directory_id: Some(ctx.directory_id.clone()),
    })
    .map_err(io_err)?;
    write_frame(&mut stream, ANSWER_OK, &me).await?;
    let _peer = hello.from.map(|peer| {
        ctx.liveness.connected(peer);
        PeerConnection {
            liveness: &ctx.liveness,
            peer,
        }
    });
    // Only peers in the address book are remembered (the id in the handshake is the peer's
    // own claim, and the map must not grow with whatever ids connections bring).
    let heard_from = hello.from.filter(|p| ctx.peers.get(*p).is_some());
    loop {
        let (tag, body) = read_frame(&mut stream).await?;
        if let Some(peer) = heard_from {
            ctx.liveness.heard(peer);
        }
        let (answer, out) = match tag {
            TAG_APPEND => {
                let req: AppendEntriesRequest<TypeConfig> =
                    serde_json::from_slice(&body).map_err(invalid)?;
                json_answer(ctx.raft.append_entries(req).await)
            }
            TAG_VOTE => {
                let req: VoteRequest<TypeConfig> =
                    serde_json::from_slice(&body).map_err(invalid)?;
                json_answer(ctx.raft.vote(req).await)
            }
            TAG_PRE_VOTE => {
                let req: VoteRequest<TypeConfig> =
                    serde_json::from_slice(&body).map_err(invalid)?;
                json_answer(ctx.raft.pre_vote(req).await)
            }
            TAG_SNAPSHOT => {
                let req: SnapshotIn = serde_json::from_slice(&body).map_err(invalid)?;
                let snap = openraft::alias::SnapshotOf::<TypeConfig, SnapshotRecords> {
                    meta: req.meta,
                    snapshot: SnapshotRecords(Arc::new(req.records)),
                };
                json_answer(ctx.raft.install_full_snapshot(req.vote, snap).await)
            }
            TAG_TRANSFER_LEADER => {
                let req: TransferLeaderRequest<TypeConfig> =
                    serde_json::from_slice(&body).map_err(invalid)?;
                json_answer(ctx.raft.handle_transfer_leader(req).await)
            }
            TAG_APP if ctx.active() => (ANSWER_OK, ctx.handler.handle(body).await),
            TAG_JOIN if ctx.active() => {
                let req: JoinRequest = serde_json::from_slice(&body).map_err(invalid)?;
                match super::admit_learner(&ctx.raft, &ctx.peers, req).await {
                    Answer::Ok(b) => (ANSWER_OK, b),
                    Answer::NotLeader(l) => {
                        (ANSWER_NOT_LEADER, serde_json::to_vec(&l).map_err(io_err)?)
                    }
                    Answer::Err(e) => (ANSWER_ERR, e.into_bytes()),
                }
            }
            TAG_APP | TAG_JOIN => (
                ANSWER_NOT_LEADER,
                serde_json::to_vec(&ctx.current_leader()).map_err(io_err)?,
            ),
            other => return Err(invalid(format!("unknown request tag {other}"))),
        };
        write_frame(&mut stream, answer, &out).await?;
    }
}

fn json_answer<T: Serialize, E: std::fmt::Display>(r: Result<T, E>) -> (u8, Vec<u8>) {
    match r {
        Ok(v) => match serde_json::to_vec(&v) {
            Ok(b) => (ANSWER_OK, b),
            Err(e) => (ANSWER_ERR, e.to_string().into_bytes()),
        },
        Err(e) => (ANSWER_ERR, e.to_string().into_bytes()),
    }
}

// ---------------------------------------------------------------------------------------------
// Client

/// Connects to `addr` and checks that node `to` answers there; returns the connection and the
/// directory id it answered with.
pub async fn connect(
    addr: SocketAddr,
    to: u64,
    from: Option<u64>,
) -> io::Result<(TcpStream, Option<String>)> {
    let mut stream = TcpStream::connect(addr).await?;
    let _ = stream.set_nodelay(true);
    let hello = serde_json::to_vec(&Hello { to, from }).map_err(io_err)?;
    write_frame(&mut stream, TAG_HELLO, &hello).await?;
    let (answer, body) = read_frame(&mut stream).await?;
    if answer != ANSWER_OK {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!(
                "{addr} refused the handshake for node {}: {}",
                from_node_id(to),
                String::from_utf8_lossy(&body)
            ),
        ));
    }
    let (id, directory_id) = match serde_json::from_slice(&body).map_err(invalid)? {
        HelloAnswerIn::Full(a) => (a.id, a.directory_id),
        HelloAnswerIn::IdOnly(id) => (id, None),
    };
    if id != to {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!(
                "{addr} is node {}, expected node {}",
                from_node_id(id),
                from_node_id(to)
            ),
        ));
    }
    Ok((stream, directory_id))
}

async fn exchange(stream: &mut TcpStream, tag: u8, body: &[u8]) -> io::Result<(u8, Vec<u8>)> {
    write_frame(stream, tag, body).await?;
    read_frame(stream).await
}

enum CallError {
    Io(io::Error),
    Timeout,
}

/// One lazily opened connection to one peer, reopened after any error.
pub struct PeerClient {
    me: u64,
    target: u64,
    peers: PeerAddrs,
    directories: Arc<Directories>,
    conn: Option<TcpStream>,
    /// The directory id the peer answered the handshake of `conn` with.
    peer_dir: Option<String>,
}

impl PeerClient {
    async fn call_once(&mut self, tag: u8, body: &[u8]) -> io::Result<(u8, Vec<u8>)> {
        let reused = self.conn.is_some();
        let mut stream = match self.conn.take() {
            Some(s) => s,
            None => self.open().await?,
        };
        match exchange(&mut stream, tag, body).await {
            Ok(r) => {
                self.conn = Some(stream);
                Ok(r)
            }
            // A kept connection may have died while idle (the peer restarted): one fresh try.
            Err(_) if reused => {
                let mut stream = self.open().await?;
                let r = exchange(&mut stream, tag, body).await?;
                self.conn = Some(stream);
                Ok(r)
            }
            Err(e) => Err(e),
        }
    }

    async fn open(&mut self) -> io::Result<TcpStream> {
        let addr = self.peers.get(self.target).ok_or_else(|| {
            io_err(format!(
                "no address known for node {}",
                from_node_id(self.target)
            ))
        })?;
        let (stream, dir) = connect(addr, self.target, Some(self.me)).await?;
        if let Some(dir) = &dir {
            self.directories.saw(self.target, dir);
        }
        self.peer_dir = dir;
        Ok(stream)
    }

    /// A vote (or pre-vote) answer, not counted if the peer answered from a directory other
    /// than the one the log records for it (see `directory.rs`).
    fn checked_vote(&self, mut resp: VoteResponse<TypeConfig>) -> VoteResponse<TypeConfig> {
        if resp.vote_granted
            && !self
                .directories
                .vote_counts(self.target, self.peer_dir.as_deref())
        {
            tracing::warn!(
                node_id = from_node_id(self.target),
                directory_id = self.peer_dir.as_deref().unwrap_or("none"),
                "not counting the vote of a voter back with another metadata log directory \
                 until the leader has recorded it"
            );
            resp.vote_granted = false;
        }
        resp
    }

    async fn call<Resp: DeserializeOwned>(
        &mut self,
        tag: u8,
        body: &[u8],
        ttl: Duration,
    ) -> Result<Resp, CallError> {
        let r = match tokio::time::timeout(ttl, self.call_once(tag, body)).await {
            Ok(r) => r,
            Err(_) => {
                self.conn = None;
                return Err(CallError::Timeout);
            }
        };
        let (answer, body) = r.map_err(CallError::Io)?;
        match answer {
            ANSWER_OK => serde_json::from_slice(&body).map_err(|e| {
                self.conn = None;
                CallError::Io(invalid(e))
            }),
            _ => Err(CallError::Io(io_err(format!(
                "node {} answered: {}",
                from_node_id(self.target),
                String::from_utf8_lossy(&body)
            )))),
        }
    }

    /// One Raft RPC whose request and answer are json.
    async fn json_rpc<Req: Serialize, Resp: DeserializeOwned>(
        &mut self,
        tag: u8,
        rpc: &Req,
        option: RPCOption,
        action: RPCTypes,
    ) -> Result<Resp, RPCError<TypeConfig>> {
        let ttl = option.soft_ttl();
        let body =
            serde_json::to_vec(rpc).map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        self.call(tag, &body, ttl)
            .await
            .map_err(|e| self.rpc_error(e, action, ttl))
    }

    fn rpc_error(&self, e: CallError, action: RPCTypes, ttl: Duration) -> RPCError<TypeConfig> {
        match e {
            CallError::Io(e) => RPCError::Unreachable(Unreachable::new(&e)),
            CallError::Timeout => RPCError::Timeout(RaftTimeout {
                action,
                id: self.me,
                target: self.target,
                timeout: ttl,
            }),
        }
    }
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = SnapshotRecords;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.json_rpc(TAG_APPEND, &rpc, option, RPCTypes::AppendEntries)
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let resp = self
            .json_rpc(TAG_VOTE, &rpc, option, RPCTypes::Vote)
            .await?;
        Ok(self.checked_vote(resp))
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let resp = self
            .json_rpc(TAG_PRE_VOTE, &rpc, option, RPCTypes::Vote)
            .await?;
        Ok(self.checked_vote(resp))
    }

    async fn transfer_leader(
        &mut self,
        rpc: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.json_rpc(TAG_TRANSFER_LEADER, &rpc, option, RPCTypes::TransferLeader)
            .await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: openraft::alias::SnapshotOf<TypeConfig, SnapshotRecords>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let ttl = option.soft_ttl();
        let body = serde_json::to_vec(&SnapshotOut {
            vote: &vote,
            meta: &snapshot.meta,
            records: &snapshot.snapshot.0,
        })
        .map_err(|e| StreamingError::Unreachable(Unreachable::new(&e)))?;
        tokio::select! {
            closed = cancel => {
                self.conn = None;
                Err(StreamingError::Closed(closed))
            }
            r = self.call(TAG_SNAPSHOT, &body, ttl) => r.map_err(|e| match e {
                CallError::Io(e) => StreamingError::Unreachable(Unreachable::new(&e)),
                CallError::Timeout => StreamingError::Timeout(RaftTimeout {
                    action: RPCTypes::InstallSnapshot,
                    id: self.me,
                    target: self.target,
                    timeout: ttl,
                }),
            }),
        }
    }
}

/// Creates a `PeerClient` per replication stream; addresses come from the configured voters,
/// and for learners from the membership (see `PeerAddrs`).
#[derive(Clone)]
pub struct NetworkFactory {
    pub me: u64,
    pub peers: PeerAddrs,
    pub directories: Arc<Directories>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> PeerClient {
        self.peers.learn(std::iter::once((&target, node)));
        PeerClient {
            me: self.me,
            target,
            peers: self.peers.clone(),
            directories: self.directories.clone(),
            conn: None,
            peer_dir: None,
        }
    }
}

/// Pooled connections for application and join requests to the active controller (a voter).
pub struct AppClient {
    pub me: u64,
    pub peers: PeerAddrs,
    pool: Mutex<HashMap<u64, Vec<TcpStream>>>,
}

impl AppClient {
    pub fn new(me: u64, peers: PeerAddrs) -> Self {
        AppClient {
            me,
            peers,
            pool: Mutex::new(HashMap::new()),
        }
    }

    fn take(&self, target: u64) -> Option<TcpStream> {
        self.pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&target)
            .and_then(|v| v.pop())
    }

    fn put(&self, target: u64, stream: TcpStream) {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        let conns = pool.entry(target).or_default();
        if conns.len() < 8 {
            conns.push(stream);
        }
    }

    /// Sends one request (`tag`: TAG_APP or TAG_JOIN) to the voter `target` (the caller bounds
    /// the time). An `ERR` answer is `Answer::Err`; the connection stays usable.
    pub async fn call(&self, target: u64, tag: u8, request: &[u8]) -> io::Result<Answer> {
        let addr = *self.peers.voters().get(&target).ok_or_else(|| {
            io_err(format!(
                "node {} is not a configured voter",
                from_node_id(target)
            ))
        })?;
        let (mut stream, reused) = match self.take(target) {
            Some(s) => (s, true),
            None => (connect(addr, target, Some(self.me)).await?.0, false),
        };
        let (answer, body) = match exchange(&mut stream, tag, request).await {
            Ok(r) => r,
            Err(_) if reused => {
                stream = connect(addr, target, Some(self.me)).await?.0;
                exchange(&mut stream, tag, request).await?
            }
            Err(e) => return Err(e),
        };
        let out = match answer {
            ANSWER_OK => Answer::Ok(body),
            ANSWER_NOT_LEADER => Answer::NotLeader(serde_json::from_slice(&body).map_err(invalid)?),
            _ => Answer::Err(format!(
                "node {} answered: {}",
                from_node_id(target),
                String::from_utf8_lossy(&body)
            )),
        };
        self.put(target, stream);
        Ok(out)
    }
}
