//! Fast detection of a peer whose process died.
//!
//! Nodes keep connections open to each other on the controller listener: the Raft leader's
//! replication stream to every follower, every broker's pooled requests (heartbeats) to the
//! active controller. When a connection a peer opened closes, that peer is probed: if its
//! controller listener now refuses connections, the host is up but the process is gone
//! (`kill -9`, a crash), and waiting for timeouts only delays failover:
//!
//! - a follower whose leader is gone starts an election at once, ranked among the surviving
//!   voters (the lowest id first, the next one a little later if that did not work) so that
//!   two do not split the vote. The dead leader's lease has not run out on the voters yet, so
//!   the election is started as a leadership transfer from that leader, which voters grant
//!   without waiting for the lease (Raft dissertation §4.2.3). Safety does not depend on the
//!   lease: a vote still needs an up-to-date log and a higher term.
//! - the handler learns it ([`ControllerHandler::peer_down`]) so that the active controller
//!   fences the broker at once instead of after its session timeout.
//!
//! A probe that connects, times out or fails any other way proves nothing (a host that is
//! gone altogether, a partitioned network): the timeouts cover those cases.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::async_runtime::watch::WatchReceiver;
use openraft::raft::TransferLeaderRequest;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::network::{PeerAddrs, RaftHandle};
use super::types::from_node_id;
use super::ControllerHandler;

/// Pause before probing: a peer that merely closed a pooled connection is still listening.
const PROBE_DELAY: Duration = Duration::from_millis(20);
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Between the elections the surviving voters start, by rank.
const ELECTION_STAGGER: Duration = Duration::from_millis(150);

/// What this node knows of its peers' processes.
pub struct PeerWatch {
    down: Mutex<HashMap<u64, Instant>>,
    /// When each peer last sent this node a request (the Raft leader's appends and heartbeats,
    /// a broker's requests to the controller).
    heard: Mutex<HashMap<u64, Instant>>,
    probing: Mutex<HashSet<u64>>,
    closed_tx: mpsc::Sender<u64>,
}

/// Closes waiting to be probed; beyond that a close is dropped (it only speeds failover up).
const CLOSED_QUEUE: usize = 1024;

impl PeerWatch {
    pub fn new() -> (Arc<PeerWatch>, mpsc::Receiver<u64>) {
        let (closed_tx, rx) = mpsc::channel(CLOSED_QUEUE);
        let watch = Arc::new(PeerWatch {
            down: Mutex::new(HashMap::new()),
            heard: Mutex::new(HashMap::new()),
            probing: Mutex::new(HashSet::new()),
            closed_tx,
        });
        (watch, rx)
    }

    /// A connection from `peer` completed its handshake: the peer is up.
    pub fn connected(&self, peer: u64) {
        self.down
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&peer);
    }

    /// A connection `peer` opened has closed.
    pub fn closed(&self, peer: u64) {
        let _ = self.closed_tx.try_send(peer);
    }

    /// A request from `peer` arrived: it was running when it sent it.
    pub fn heard(&self, peer: u64) {
        self.heard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(peer, Instant::now());
    }

    /// When a request from `peer` last arrived, if one did since this process started.
    pub fn last_heard(&self, peer: u64) -> Option<Instant> {
        self.heard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&peer)
            .copied()
    }

    /// Since when `peer` is known to be down (its listener refused a probe), if it is.
    pub fn down_since(&self, peer: u64) -> Option<Instant> {
        self.down
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&peer)
            .copied()
    }

    fn mark_down(&self, peer: u64) -> bool {
        let mut down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        if down.contains_key(&peer) {
            return false;
        }
        down.insert(peer, Instant::now());
        true
    }
}

/// Whether nothing listens at `addr` any more (the connection was refused).
async fn refused(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, TcpStream::connect(addr)).await,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

pub struct Watcher {
    pub me: u64,
    pub raft: RaftHandle,
    pub peers: PeerAddrs,
    pub liveness: Arc<PeerWatch>,
    pub handler: Arc<dyn ControllerHandler>,
}

impl Watcher {
    /// Probes every peer whose connection closed, one probe per peer at a time.
    pub async fn run(self: Arc<Self>, mut closed: mpsc::Receiver<u64>) {
        while let Some(peer) = closed.recv().await {
            if peer == self.me {
                continue;
            }
            let Some(addr) = self.peers.get(peer) else {
                continue;
            };
            if !self
                .liveness
                .probing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(peer)
            {
                continue;
            }
            let this = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(PROBE_DELAY).await;
                let gone = refused(addr).await;
                this.liveness
                    .probing
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&peer);
                if gone && this.liveness.mark_down(peer) {
                    tracing::info!(
                        node_id = from_node_id(peer),
                        "peer is down (its controller listener refuses connections)"
                    );
                    this.on_down(peer).await;
                }
            });
        }
    }

    async fn on_down(&self, peer: u64) {
        self.handler.peer_down(from_node_id(peer));
        let rank = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow_watched();
            if m.current_leader != Some(peer) {
                return;
            }
            let mut survivors: Vec<u64> = m
                .membership_config
                .membership()
                .voter_ids()
                .filter(|id| *id != peer)
                .collect();
            survivors.sort_unstable();
            match survivors.iter().position(|id| *id == self.me) {
                Some(rank) => rank,
                // A learner does not stand for election.
                None => return,
            }
        };
        tokio::time::sleep(ELECTION_STAGGER * rank as u32).await;
        let vote = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow_watched();
            if m.current_leader != Some(peer) {
                // Somebody already took over.
                return;
            }
            m.vote
        };
        tracing::info!(
            dead_leader = from_node_id(peer),
            "the metadata leader's process is gone; standing for election now"
        );
        // From the dead leader's (still current) vote to this node, with no log requirement
        // beyond Raft's own vote check.
        let req = TransferLeaderRequest::new(vote, self.me, None);
        if let Err(e) = self.raft.handle_transfer_leader(req).await {
            tracing::warn!(error = %e, "could not start an election");
        }
    }
}
