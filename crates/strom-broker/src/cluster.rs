//! The cluster side of a broker started with `--controller-quorum`: the requests brokers send
//! to the active controller (the Raft leader of the metadata quorum), the controller service
//! that answers them, broker heartbeats and liveness (fencing a silent broker moves its
//! leaderships), and the compare-and-append that lets any broker commit metadata records it
//! built from its own image: the controller appends them only if its image is still the one
//! they were built from, otherwise the broker catches up and builds them again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use strom_meta::raft::ControllerHandler;
use strom_meta::{ControllerError, MetadataImage, MetadataRecord, TopicImage};

use crate::broker::Broker;

/// `--controller-listen` and `--controller-quorum`. A node whose id is not in `quorum` is a
/// broker-only node: it follows the metadata log as a learner on `controller_listen`.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub controller_listen: SocketAddr,
    pub quorum: Vec<(i32, SocketAddr)>,
}

/// Parses `1@127.0.0.1:9192,2@127.0.0.1:9193` (Kafka's controller.quorum.voters format).
pub fn parse_quorum(s: &str) -> Result<Vec<(i32, SocketAddr)>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('@')
            .ok_or_else(|| format!("'{part}' is not ID@HOST:PORT"))?;
        let id: i32 = id
            .parse()
            .map_err(|_| format!("'{id}' in '{part}' is not a node id"))?;
        let addr: SocketAddr = addr
            .parse()
            .map_err(|_| format!("'{addr}' in '{part}' is not HOST:PORT"))?;
        if out.iter().any(|(i, _)| *i == id) {
            return Err(format!("node id {id} appears twice"));
        }
        out.push((id, addr));
    }
    if out.is_empty() {
        return Err("the quorum lists no voters".into());
    }
    Ok(out)
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ControllerRequest {
    /// Append `records` if the controller's image is still at `expected_offset`.
    Append {
        expected_offset: i64,
        records: Vec<MetadataRecord>,
    },
    Heartbeat {
        broker_id: i32,
    },
    /// SIGTERM: move this broker's leaderships away before it exits.
    ControlledShutdown {
        broker_id: i32,
    },
    /// DescribeQuorum: the leader's view of the voters and observers.
    DescribeQuorum,
    /// UnregisterBroker (KIP-631): remove a broker for good, from the metadata image and, for
    /// a broker-only node, from the Raft membership.
    UnregisterBroker {
        broker_id: i32,
    },
}

/// The metadata quorum as its leader sees it (DescribeQuorum, KIP-595).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuorumView {
    pub leader_id: i32,
    pub leader_epoch: i32,
    pub high_watermark: i64,
    /// (id, log end offset, last fetch ms, last caught-up ms)
    pub voters: Vec<(i32, i64, i64, i64)>,
    /// The broker-only nodes (learners), as `voters`.
    #[serde(default)]
    pub observers: Vec<(i32, i64, i64, i64)>,
    /// The voters' metadata log directory ids as recorded (KIP-853).
    #[serde(default)]
    pub directories: Vec<(i32, String)>,
}

impl From<strom_meta::raft::QuorumState> for QuorumView {
    fn from(q: strom_meta::raft::QuorumState) -> Self {
        let rows = |rs: &[strom_meta::raft::ReplicaState]| {
            rs.iter()
                .map(|r| {
                    (
                        r.replica_id,
                        r.log_end_offset,
                        r.last_fetch_timestamp,
                        r.last_caught_up_timestamp,
                    )
                })
                .collect()
        };
        QuorumView {
            leader_id: q.leader_id,
            leader_epoch: q.leader_epoch,
            high_watermark: q.high_watermark,
            voters: rows(&q.voters),
            observers: rows(&q.observers),
            directories: q
                .voters
                .iter()
                .filter_map(|r| Some((r.replica_id, r.directory_id.clone()?)))
                .collect(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ControllerResponse {
    Appended {
        offset: i64,
    },
    Stale {
        offset: i64,
    },
    NotController,
    Ok,
    Quorum(QuorumView),
    Error(String),
    /// The request is refused with this Kafka error code and message.
    Refused {
        error_code: i16,
        message: String,
    },
    /// A heartbeat from a broker that is not registered: it was unregistered while running.
    Unregistered,
}

/// The controller's per-topic settings: the topic's override or this broker's default.
impl strom_meta::TopicPolicy for Broker {
    fn unclean(&self, topic: &TopicImage) -> bool {
        self.config
            .topic_value(&topic.configs, "unclean.leader.election.enable")
            .is_some_and(|(v, _)| v == "true")
    }
    fn min_isr(&self, topic: &TopicImage) -> usize {
        self.config
            .topic_i64(&topic.configs, "min.insync.replicas")
            .max(1) as usize
    }
}

/// Runs on every node; acts only while this node is the Raft leader.
pub struct ControllerService {
    broker: OnceLock<Weak<Broker>>,
    /// Serialises appends so each sees the image its predecessor produced.
    lock: tokio::sync::Mutex<()>,
    last_heartbeat: Mutex<HashMap<i32, Instant>>,
    was_leader: AtomicBool,
    /// The last other controller this node knew of (whose broker may have died with it).
    last_leader: Mutex<Option<i32>>,
    last_balance_check: Mutex<Instant>,
    /// When this node last ran the liveness check as the controller (a long gap means this
    /// process itself was not running).
    last_liveness_check: Mutex<Option<Instant>>,
}

impl ControllerService {
    pub fn new() -> Arc<Self> {
        Arc::new(ControllerService {
            broker: OnceLock::new(),
            lock: tokio::sync::Mutex::new(()),
            last_heartbeat: Mutex::new(HashMap::new()),
            was_leader: AtomicBool::new(false),
            last_leader: Mutex::new(None),
            last_balance_check: Mutex::new(Instant::now()),
            last_liveness_check: Mutex::new(None),
        })
    }

    pub fn attach(&self, broker: &Arc<Broker>) {
        let _ = self.broker.set(Arc::downgrade(broker));
    }

    fn broker(&self) -> Option<Arc<Broker>> {
        self.broker.get().and_then(Weak::upgrade)
    }

    /// Appends what `build` makes of the up-to-date image, if `expected` (when given) is still
    /// its offset. Leader only.
    async fn append_checked(
        &self,
        broker: &Arc<Broker>,
        expected: Option<i64>,
        build: impl FnOnce(&MetadataImage) -> Vec<MetadataRecord>,
    ) -> ControllerResponse {
        let _guard = self.lock.lock().await;
        let Some(raft) = broker.raft() else {
            return ControllerResponse::NotController;
        };
        if !raft.is_leader() {
            return ControllerResponse::NotController;
        }
        let timeout = broker.controller_timeout();
        if let Err(e) = raft.ensure_leader_ready().await {
            tracing::debug!(error = %e, "not ready to act as controller");
            return ControllerResponse::NotController;
        }
        if broker
            .wait_image(raft.applied_offset(), timeout)
            .await
            .is_err()
        {
            return ControllerResponse::Error("controller image is behind its log".into());
        }
        let image = broker.image();
        if let Some(expected) = expected {
            if expected != image.offset {
                return ControllerResponse::Stale {
                    offset: image.offset,
                };
            }
        }
        let records = build(&image);
        if records.is_empty() {
            return ControllerResponse::Appended {
                offset: image.offset,
            };
        }
        match raft.append(records).await {
            Ok(offset) => {
                if broker.wait_image(offset, timeout).await.is_err() {
                    return ControllerResponse::Error("appended but not applied in time".into());
                }
                ControllerResponse::Appended { offset }
            }
            Err(e) => {
                tracing::warn!(error = %e, "metadata append failed");
                ControllerResponse::NotController
            }
        }
    }

    async fn handle_request(self: Arc<Self>, request: ControllerRequest) -> ControllerResponse {
        let Some(broker) = self.broker() else {
            return ControllerResponse::NotController;
        };
        match request {
            ControllerRequest::Append {
                expected_offset,
                records,
            } => {
                self.append_checked(&broker, Some(expected_offset), |_| records)
                    .await
            }
            ControllerRequest::Heartbeat { broker_id } => {
                if !broker.raft().is_some_and(|r| r.is_leader()) {
                    return ControllerResponse::NotController;
                }
                self.last_heartbeat.lock().insert(broker_id, Instant::now());
                let fenced = match broker.image().brokers.get(&broker_id) {
                    Some(b) => b.fenced,
                    None => return self.unregistered(&broker, broker_id).await,
                };
                if fenced {
                    let b = broker.clone();
                    let resp = self
                        .append_checked(&broker, None, |img| {
                            b.controller().unfence_broker(img, broker_id, &*b)
                        })
                        .await;
                    if let ControllerResponse::Appended { .. } = resp {
                        tracing::info!(broker_id, "broker unfenced");
                    }
                    return resp;
                }
                ControllerResponse::Ok
            }
            ControllerRequest::DescribeQuorum => match broker.raft() {
                Some(r) if r.is_leader() => ControllerResponse::Quorum(r.quorum_state().into()),
                _ => ControllerResponse::NotController,
            },
            ControllerRequest::UnregisterBroker { broker_id } => {
                self.unregister(&broker, broker_id).await
            }
            ControllerRequest::ControlledShutdown { broker_id } => {
                let b = broker.clone();
                let resp = self
                    .append_checked(&broker, None, |img| {
                        b.controller().fence_broker(img, broker_id, &*b)
                    })
                    .await;
                self.last_heartbeat.lock().remove(&broker_id);
                tracing::info!(
                    broker_id,
                    "controlled shutdown: broker fenced, leaderships moved"
                );
                resp
            }
        }
    }

    /// UnregisterBroker on the active controller: the records that take the broker out of
    /// every ISR, ELR and leadership and remove its registration, then, for a broker-only
    /// node, its removal from the Raft membership (the leader stops replicating to it). A
    /// broker that is not registered but still a learner (an earlier attempt that failed
    /// between the two steps) is removed from the membership and the request succeeds.
    async fn unregister(&self, broker: &Arc<Broker>, id: i32) -> ControllerResponse {
        let Some(raft) = broker.raft() else {
            return ControllerResponse::NotController;
        };
        let voters = broker.voter_ids();
        let mut refused = None;
        let b = broker.clone();
        let resp = self
            .append_checked(broker, None, |img| {
                match b.controller().unregister_broker(img, id, &voters, &*b) {
                    Ok(records) => records,
                    Err(e) => {
                        refused = Some(e);
                        Vec::new()
                    }
                }
            })
            .await;
        if !matches!(resp, ControllerResponse::Appended { .. }) {
            return resp;
        }
        let refusal = |e: &ControllerError| ControllerResponse::Refused {
            error_code: crate::error::controller_error_code(e).code(),
            message: e.to_string(),
        };
        match &refused {
            None | Some(ControllerError::BrokerIdNotRegistered(_)) => {}
            Some(e) => return refusal(e),
        }
        self.last_heartbeat.lock().remove(&id);
        match (raft.remove_learner(id).await, &refused) {
            (Ok(true), _) => {
                tracing::info!(broker_id = id, "broker unregistered; no longer a learner");
                ControllerResponse::Ok
            }
            (Ok(false), None) => {
                tracing::info!(broker_id = id, "broker unregistered");
                ControllerResponse::Ok
            }
            (Ok(false), Some(e)) => refusal(e),
            (Err(strom_meta::MetadataLogError::NotLeader { .. }), _) => {
                ControllerResponse::NotController
            }
            (Err(e), _) => ControllerResponse::Error(format!(
                "removing broker {id} from the metadata quorum failed (retry the request): {e}"
            )),
        }
    }

    /// A heartbeat from a broker the image does not hold: it was unregistered while running,
    /// or this controller's image is behind. Answers `Unregistered` only from an image that
    /// holds everything committed, so a live broker is never told it is gone by mistake.
    async fn unregistered(&self, broker: &Arc<Broker>, id: i32) -> ControllerResponse {
        let Some(raft) = broker.raft() else {
            return ControllerResponse::NotController;
        };
        if raft.ensure_leader_ready().await.is_err() {
            return ControllerResponse::NotController;
        }
        // The applied offset, not the read index: membership entries (a learner's removal)
        // carry no records and never reach the image.
        if broker
            .wait_image(raft.applied_offset(), broker.controller_timeout())
            .await
            .is_err()
        {
            return ControllerResponse::Error("controller image is behind its log".into());
        }
        if broker.image().brokers.contains_key(&id) {
            return ControllerResponse::Ok;
        }
        ControllerResponse::Unregistered
    }

    /// Fences brokers that stopped heartbeating. Called on a timer on every node.
    pub async fn check_liveness(&self, broker: &Arc<Broker>) {
        let Some(raft) = broker.raft() else {
            return;
        };
        if !raft.is_leader() {
            self.was_leader.store(false, Ordering::Release);
            *self.last_liveness_check.lock() = None;
            if let Some(l) = raft.leader() {
                *self.last_leader.lock() = Some(l);
            }
            return;
        }
        let now = Instant::now();
        let session = Duration::from_millis(broker.config.i64("broker.session.timeout.ms") as u64);
        // Measured from the end of the previous check, so that a slow fencing round is no gap.
        let previous_check = *self.last_liveness_check.lock();
        let interval =
            Duration::from_millis(broker.config.i64("broker.heartbeat.interval.ms").max(1) as u64);
        let stalled = previous_check
            .map(|t| now.duration_since(t))
            .filter(|gap| *gap > (session / 2).max(interval * 3));
        if let (Some(gap), true) = (stalled, self.was_leader.load(Ordering::Acquire)) {
            // This check runs every heartbeat interval: a gap of half a session (and of three
            // intervals) means this process did not run (stopped, a stalled VM, starved), and
            // the heartbeats sent meanwhile are still unread in its sockets. Its own silence is
            // no evidence against the brokers: each gets a new session instead of being fenced
            // now. (If another controller took over meanwhile, this one cannot commit anyway.)
            tracing::warn!(
                stalled_ms = gap.as_millis() as u64,
                "the controller did not run for longer than half a broker session; giving \
                 every broker a new session instead of fencing them"
            );
            for t in self.last_heartbeat.lock().values_mut() {
                *t = (*t).max(now);
            }
            *self.last_liveness_check.lock() = Some(now);
            return;
        }
        if !self.was_leader.swap(true, Ordering::AcqRel) {
            // A new controller gives every broker a full session before judging it — except
            // the node of the controller it replaces (see `previous_controller_seen`).
            let mut hb = self.last_heartbeat.lock();
            hb.clear();
            for id in broker.image().brokers.keys() {
                hb.insert(*id, now);
            }
            let previous = self.last_leader.lock().filter(|p| *p != broker.node_id);
            if let Some(p) = previous {
                let down = raft.peer_down_since(p).is_some();
                let heard = raft.peer_last_heard(p);
                if let Some(t) = previous_controller_seen(now, session, interval, down, heard) {
                    hb.insert(p, t);
                }
            }
            tracing::info!(
                node_id = broker.node_id,
                "this node is now the active controller"
            );
        }
        let expired: Vec<i32> = {
            let mut hb = self.last_heartbeat.lock();
            broker
                .image()
                .live_brokers()
                .map(|b| b.broker_id)
                .filter(|id| {
                    let seen = *hb.entry(*id).or_insert(now);
                    now.duration_since(seen) > session
                })
                .collect()
        };
        for id in expired {
            let b = broker.clone();
            let resp = self
                .append_checked(broker, None, |img| {
                    b.controller().fence_broker(img, id, &*b)
                })
                .await;
            tracing::warn!(
                broker_id = id,
                ?resp,
                "broker missed its session timeout; fenced"
            );
        }
        self.balance_leaders(broker, now).await;
        self.elect_unclean_leaders(broker).await;
        *self.last_liveness_check.lock() = Some(Instant::now());
    }

    /// Offline partitions of topics that allow unclean election get a leader (see
    /// `Controller::elect_unclean_leaders`); checked on the image first, so a tick with
    /// nothing to do costs no controller round.
    async fn elect_unclean_leaders(&self, broker: &Arc<Broker>) {
        let image = broker.image();
        if broker
            .controller()
            .elect_unclean_leaders(&image, &**broker)
            .is_empty()
        {
            return;
        }
        let b = broker.clone();
        let resp = self
            .append_checked(broker, None, |img| {
                b.controller().elect_unclean_leaders(img, &*b)
            })
            .await;
        tracing::warn!(
            ?resp,
            "unclean leader election: offline partitions now led by out-of-sync replicas"
        );
    }

    /// Fences a live broker whose process is known to be gone.
    async fn fence_dead(&self, broker: &Arc<Broker>, id: i32) {
        if !broker.image().is_live(id) {
            return;
        }
        let b = broker.clone();
        let resp = self
            .append_checked(broker, None, |img| {
                if img.is_live(id) {
                    b.controller().fence_broker(img, id, &*b)
                } else {
                    Vec::new()
                }
            })
            .await;
        self.last_heartbeat.lock().remove(&id);
        tracing::warn!(broker_id = id, ?resp, "broker process is gone; fenced");
    }

    /// `auto.leader.rebalance.enable`: preferred elections where a broker leads too few of the
    /// partitions it prefers, every `leader.imbalance.check.interval.seconds`.
    async fn balance_leaders(&self, broker: &Arc<Broker>, now: Instant) {
        if !broker.config.bool("auto.leader.rebalance.enable") {
            return;
        }
        let every = Duration::from_secs(
            broker
                .config
                .i64("leader.imbalance.check.interval.seconds")
                .max(1) as u64,
        );
        {
            let mut last = self.last_balance_check.lock();
            if now.duration_since(*last) < every {
                return;
            }
            *last = now;
        }
        let pct = broker.config.i64("leader.imbalance.per.broker.percentage");
        let b = broker.clone();
        let resp = self
            .append_checked(broker, None, |img| {
                b.controller().rebalance_leaders(img, pct)
            })
            .await;
        tracing::debug!(?resp, "leader balance checked");
    }
}

impl ControllerHandler for ControllerService {
    fn handle(&self, request: Vec<u8>) -> BoxFuture<'static, Vec<u8>> {
        let this = self
            .broker()
            .map(|b| b.controller_service_arc())
            .unwrap_or(None);
        Box::pin(async move {
            let resp = match (this, serde_json::from_slice::<ControllerRequest>(&request)) {
                (Some(svc), Ok(req)) => svc.handle_request(req).await,
                (None, _) => ControllerResponse::NotController,
                (_, Err(e)) => ControllerResponse::Error(format!("bad controller request: {e}")),
            };
            serde_json::to_vec(&resp).unwrap_or_default()
        })
    }

    /// As Kafka's metadata log fault handler: the node stops. Going on, it would keep serving
    /// its partitions from a metadata image that no longer changes (a leader the controller has
    /// replaced would still take writes).
    fn metadata_log_failed(&self, error: &str) {
        crate::flusher::halt_on_storage_failure(
            "the metadata log failed: stopping the node; the next start recovers it",
            error,
        );
    }

    /// A broker whose process is gone is fenced at once by the active controller (its
    /// leaderships move now, not after `broker.session.timeout.ms`).
    fn peer_down(&self, node_id: i32) {
        let Some(broker) = self.broker() else {
            return;
        };
        let Some(svc) = broker.controller_service_arc() else {
            return;
        };
        if !broker.raft().is_some_and(|r| r.is_leader()) {
            return;
        }
        tokio::spawn(async move { svc.fence_dead(&broker, node_id).await });
    }
}

/// Sends one request to the active controller and decodes the answer.
/// When a new active controller counts the node of the controller it replaces as last seen
/// (its broker is fenced one `session` after that). The election happened because that node
/// went silent, so its partitions should fail over one session after it did, not after an
/// election plus a session: the session runs from the last request this node had from it (the
/// metadata leader's heartbeats, `heard`), and at most a few heartbeat intervals from now are
/// left to it to show it is alive. A node whose process is known to be gone (`down`, the
/// liveness probe) is fenced at once.
fn previous_controller_seen(
    now: Instant,
    session: Duration,
    interval: Duration,
    down: bool,
    heard: Option<Instant>,
) -> Option<Instant> {
    if down {
        return now.checked_sub(session + Duration::from_millis(1));
    }
    let grace = now.checked_sub(session - (interval * 3).min(session));
    match (heard, grace) {
        (Some(h), Some(g)) => Some(h.min(g)),
        (Some(h), None) => Some(h.min(now)),
        (None, g) => g,
    }
}

pub async fn call(broker: &Broker, req: &ControllerRequest) -> Result<ControllerResponse, String> {
    call_within(broker, req, broker.controller_timeout()).await
}

/// `call` with its own deadline.
pub async fn call_within(
    broker: &Broker,
    req: &ControllerRequest,
    timeout: Duration,
) -> Result<ControllerResponse, String> {
    let raft = broker.raft().ok_or("not in a cluster")?;
    let body = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    let resp = raft
        .call_controller(body, timeout)
        .await
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&resp).map_err(|e| format!("bad controller response: {e}"))
}

/// Heartbeats to the active controller, and runs the liveness check where this node is the
/// controller. Ends with the broker.
pub async fn heartbeat_loop(broker: Arc<Broker>) {
    let every = Duration::from_millis(broker.config.i64("broker.heartbeat.interval.ms") as u64);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shutdown = broker.shutdown_signal();
    let in_flight = Arc::new(AtomicBool::new(false));
    // A new active controller checks liveness at once (a dead predecessor is fenced now).
    let mut leaders = broker.raft().map(|r| r.leader_watch());
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some(Ok(())) = async {
                match leaders.as_mut() {
                    Some(l) => Some(l.changed().await),
                    None => None,
                }
            } => {}
            _ = shutdown.changed() => return,
        }
        if broker.is_shutting_down() {
            return;
        }
        // A heartbeat that hangs must not hold up the liveness check; one at a time.
        if !in_flight.swap(true, Ordering::AcqRel) {
            let b = broker.clone();
            let in_flight = in_flight.clone();
            tokio::spawn(async move {
                let req = ControllerRequest::Heartbeat {
                    broker_id: b.node_id,
                };
                // Well inside the session: a heartbeat stuck on a controller that just died must
                // not make this live broker miss its session with the next one.
                let session = b.config.i64("broker.session.timeout.ms").max(3) as u64;
                let within = Duration::from_millis(session / 3);
                match call_within(&b, &req, within).await {
                    Ok(ControllerResponse::Unregistered) => {
                        // Unregistered while running (UnregisterBroker): the cluster no longer
                        // sends it metadata, so it must not serve stale leaderships. It stops;
                        // started again, it registers as a new broker.
                        tracing::error!(
                            node_id = b.node_id,
                            "this broker was unregistered from the cluster; shutting down"
                        );
                        b.begin_shutdown();
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "heartbeat failed"),
                }
                in_flight.store(false, Ordering::Release);
            });
        }
        if let Some(svc) = broker.controller_service_arc() {
            svc.check_liveness(&broker).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SESSION: Duration = Duration::from_millis(1200);
    const INTERVAL: Duration = Duration::from_millis(200);

    fn remaining(now: Instant, seen: Option<Instant>) -> Duration {
        (seen.unwrap() + SESSION).saturating_duration_since(now)
    }

    #[test]
    fn a_replaced_controller_is_fenced_one_session_after_it_was_last_heard() {
        let now = Instant::now() + Duration::from_secs(10);
        // Silent for 900 ms when this node took over (a stopped process, a partition): its
        // session has 300 ms left, not a new one.
        let heard = now - Duration::from_millis(900);
        let seen = previous_controller_seen(now, SESSION, INTERVAL, false, Some(heard));
        assert_eq!(seen, Some(heard));
        assert_eq!(remaining(now, seen), Duration::from_millis(300));
        // Silent longer than a session: fenced in this very check.
        let heard = now - Duration::from_millis(1500);
        let seen = previous_controller_seen(now, SESSION, INTERVAL, false, Some(heard));
        assert_eq!(remaining(now, seen), Duration::ZERO);
    }

    #[test]
    fn a_replaced_controller_gets_at_most_a_few_heartbeat_intervals() {
        let now = Instant::now() + Duration::from_secs(10);
        // Heard from just now (it handed leadership over, or a long session): three intervals.
        let seen = previous_controller_seen(now, SESSION, INTERVAL, false, Some(now));
        assert_eq!(remaining(now, seen), INTERVAL * 3);
        let long = Duration::from_secs(9);
        let heard = now - Duration::from_secs(2);
        let seen = previous_controller_seen(now, long, INTERVAL, false, Some(heard));
        assert_eq!((seen.unwrap() + long) - now, INTERVAL * 3);
        // Never heard from since this process started: the same few intervals.
        let seen = previous_controller_seen(now, SESSION, INTERVAL, false, None);
        assert_eq!(remaining(now, seen), INTERVAL * 3);
    }

    #[test]
    fn a_replaced_controller_whose_process_is_gone_is_fenced_at_once() {
        let now = Instant::now() + Duration::from_secs(10);
        let seen = previous_controller_seen(now, SESSION, INTERVAL, true, Some(now));
        assert!(now.duration_since(seen.unwrap()) > SESSION);
    }
}
