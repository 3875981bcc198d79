//! The broker: shared state of one Strom node (config, metadata, partitions, fetch sessions),
//! its start-up (lock the data dir, replay the metadata log, open logs, listen) and its clean
//! shutdown (stop accepting, drain connections, close logs, mark the shutdown clean).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use strom_meta::image::MetadataDelta;
use strom_meta::raft::{Committed, RaftConfig, RaftMetadataLog};
use strom_meta::{Controller, FileMetadataLog, MetadataImage, MetadataLog, MetadataRecord};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::BrokerConfig;
use crate::fetch_session::FetchSessionCache;
use crate::groups::{group_config, load_groups, GROUP_TICK};
use crate::replica_manager::ReplicaManager;
use strom_group::coordinator::OFFSETS_TOPIC;
use strom_group::GroupCoordinator;

/// Written on clean shutdown, removed at start: its absence means logs must be recovered.
const CLEAN_SHUTDOWN_FILE: &str = ".strom-clean-shutdown";
const LOCK_FILE: &str = ".lock";
/// Producer ids are reserved from the metadata log in blocks of this many.
const PRODUCER_ID_BLOCK: i64 = 1000;
/// How often a node waiting at start for its metadata quorum says it still waits.
const QUORUM_WAIT_REPORT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct BrokerOptions {
    pub node_id: i32,
    pub listen: SocketAddr,
    /// host:port given to clients in Metadata; defaults to the bound listener address.
    pub advertise: Option<(String, u16)>,
    pub data_dir: PathBuf,
    pub config: BrokerConfig,
    /// Benchmark baseline: acknowledge Produce without storing anything.
    pub null_sink: bool,
    /// Member of a replicated cluster (`--controller-quorum`); `None`: a one-node cluster.
    pub cluster: Option<crate::cluster::ClusterOptions>,
}

/// Where metadata records are made durable and ordered.
enum MetadataBackend {
    /// A one-node cluster: a local file log, appended and applied under one lock.
    Local(Mutex<FileMetadataLog>),
    /// A Raft quorum: records go to the active controller; every node applies what commits.
    Raft {
        log: RaftMetadataLog,
        service: Arc<crate::cluster::ControllerService>,
    },
}

pub struct Broker {
    pub node_id: i32,
    pub data_dir: PathBuf,
    pub advertised_host: String,
    pub advertised_port: i32,
    pub config: BrokerConfig,
    pub null_sink: bool,
    pub replicas: ReplicaManager,
    pub fetch_sessions: FetchSessionCache,
    pub groups: GroupCoordinator,
    /// Serialises the creation of `__consumer_offsets`.
    pub(crate) offsets_topic_init: Mutex<()>,
    controller: Controller,
    metadata: MetadataBackend,
    image: parking_lot::RwLock<Arc<MetadataImage>>,
    /// The offset of the published image, for waiting on metadata to arrive.
    image_offset: watch::Sender<i64>,
    /// Serialises publishing images (the Raft applier and local commits).
    publish_lock: Mutex<()>,
    /// The last committed Raft batches (offset, records), newest last: a broker whose append
    /// had an uncertain outcome looks here for its own records before building them again.
    recent_batches: Mutex<std::collections::VecDeque<(i64, Vec<MetadataRecord>)>>,
    pub fetchers: crate::replication::ReplicaFetchers,
    /// The metadata quorum's voters (empty on a one-node cluster).
    quorum: Vec<(i32, SocketAddr)>,
    producer_ids: tokio::sync::Mutex<(i64, i64)>,
    pub connections: AtomicUsize,
    pub request_memory: RequestMemory,
    shutdown_tx: watch::Sender<bool>,
}

/// Broker-wide budget of request bytes read but not yet dispatched (`queued.max.request.bytes`).
pub struct RequestMemory {
    budget: Option<(tokio::sync::Semaphore, usize)>,
}

impl RequestMemory {
    pub fn new(max_bytes: i64) -> Self {
        let budget = (max_bytes > 0).then(|| {
            let max = (max_bytes as usize).min(tokio::sync::Semaphore::MAX_PERMITS);
            (tokio::sync::Semaphore::new(max), max)
        });
        RequestMemory { budget }
    }

    /// Waits until `bytes` fit in the budget (a frame larger than the whole budget takes all of
    /// it). `None` only if the budget was closed.
    pub async fn reserve(&self, bytes: usize) -> Option<Option<tokio::sync::SemaphorePermit<'_>>> {
        match &self.budget {
            None => Some(None),
            Some((sem, max)) => {
                let n = bytes.min(*max).min(u32::MAX as usize) as u32;
                sem.acquire_many(n).await.ok().map(Some)
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data directory {0}: {1}")]
    DataDir(PathBuf, #[source] std::io::Error),
    #[error("data directory {0} is in use by another strom process")]
    Locked(PathBuf),
    #[error("metadata log: {0}")]
    Metadata(#[from] strom_meta::MetadataLogError),
    #[error("opening logs: {0}")]
    Log(#[from] strom_log::LogError),
    #[error("listen on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
    /// Its cause kept as the source: a failing disk under the Raft log is a storage failure.
    #[error("joining the metadata quorum: {0}")]
    Quorum(#[source] strom_meta::MetadataLogError),
}

fn lock_data_dir(dir: &Path) -> Result<std::fs::File, StartError> {
    use std::os::fd::AsRawFd;
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StartError::DataDir(path.clone(), e))?;
    // SAFETY: flock on a valid, open descriptor has no memory-safety preconditions.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(StartError::Locked(dir.to_path_buf()));
    }
    Ok(file)
}

fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A running broker: await `serve` to run it until shutdown.
pub struct RunningBroker {
    pub broker: Arc<Broker>,
    pub local_addr: SocketAddr,
    listener: TcpListener,
    _lock: std::fs::File,
}

impl Broker {
    pub async fn start(opts: BrokerOptions) -> Result<RunningBroker, StartError> {
        let dir = opts.data_dir.clone();
        std::fs::create_dir_all(&dir).map_err(|e| StartError::DataDir(dir.clone(), e))?;
        let lock = lock_data_dir(&dir)?;
        let marker = dir.join(CLEAN_SHUTDOWN_FILE);
        let clean_shutdown = marker.exists();
        if clean_shutdown {
            std::fs::remove_file(&marker).map_err(|e| StartError::DataDir(marker.clone(), e))?;
            sync_dir(&dir);
        }

        let (metadata, mut image, committed_rx) = match &opts.cluster {
            None => {
                let mlog = FileMetadataLog::open(&dir.join("__cluster_metadata-0"))?;
                let (image, _) = MetadataImage::empty().apply(0, mlog.committed());
                (MetadataBackend::Local(Mutex::new(mlog)), image, None)
            }
            Some(c) => {
                let (log, service, image, rx) = join_quorum(&opts, c, &dir).await?;
                (MetadataBackend::Raft { log, service }, image, Some(rx))
            }
        };

        let listener = TcpListener::bind(opts.listen)
            .await
            .map_err(|e| StartError::Listen(opts.listen, e))?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| StartError::Listen(opts.listen, e))?;
        let (host, port) = opts
            .advertise
            .clone()
            .unwrap_or((local_addr.ip().to_string(), local_addr.port()));
        let rack = Some(opts.config.get("broker.rack")).filter(|r| !r.is_empty());
        if let MetadataBackend::Local(mlog) = &metadata {
            let mut mlog = mlog.lock();
            let mut records = Vec::new();
            if image.cluster_id.is_empty() {
                records.push(MetadataRecord::ClusterId {
                    cluster_id: new_cluster_id(),
                });
            }
            let registered = image.brokers.get(&opts.node_id).is_some_and(|b| {
                b.host == host && b.port == port as i32 && b.rack == rack && !b.fenced
            });
            if !registered {
                records.push(MetadataRecord::RegisterBroker {
                    broker_id: opts.node_id,
                    host: host.clone(),
                    port: port as i32,
                    rack: rack.clone(),
                });
            }
            if !records.is_empty() {
                let first = mlog.append(&records)?;
                image = image.apply(first, &records).0;
            }
        }

        opts.config.set_dynamic(opts.node_id, &image.broker_configs);
        let replicas = ReplicaManager::new(opts.node_id, dir.clone())
            .map_err(|e| StartError::DataDir(dir.clone(), e))?;
        if opts.cluster.is_some() {
            replicas.start_from_checkpoint(crate::hw_checkpoint::read(&dir));
        }
        // Before the logs open (which creates the missing ones): which partitions this node
        // really holds, for the registration (`Controller::lost_replicas`).
        let local_logs: std::collections::HashSet<(String, i32)> =
            crate::replica_manager::partition_dirs(&dir)
                .into_iter()
                .map(|(_, topic, p)| (topic, p))
                .collect();
        let started = std::time::Instant::now();
        replicas.load(&opts.config, &image, clean_shutdown)?;
        tracing::info!(
            partitions = replicas.all().len(),
            clean_shutdown,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "logs loaded"
        );

        let groups = GroupCoordinator::new(group_config(&opts.config));
        let image_offset = watch::channel(image.offset).0;
        if let Some(t) = image.topic(OFFSETS_TOPIC) {
            if opts.cluster.is_none() {
                // Loaded in the background once serving; until then
                // COORDINATOR_LOAD_IN_PROGRESS. (A cluster loads what this node leads.)
                groups.begin_load(t.partitions.len() as i32);
            }
        }
        let (shutdown_tx, _) = watch::channel(false);
        let slots = opts
            .config
            .i64("max.incremental.fetch.session.cache.slots")
            .max(0) as usize;
        let broker = Arc::new(Broker {
            node_id: opts.node_id,
            data_dir: dir.clone(),
            advertised_host: host,
            advertised_port: port as i32,
            null_sink: opts.null_sink,
            replicas,
            fetch_sessions: FetchSessionCache::new(slots),
            groups,
            offsets_topic_init: Mutex::new(()),
            controller: Controller::default(),
            metadata,
            image: parking_lot::RwLock::new(Arc::new(image)),
            image_offset,
            publish_lock: Mutex::new(()),
            recent_batches: Mutex::new(std::collections::VecDeque::new()),
            fetchers: crate::replication::ReplicaFetchers::default(),
            quorum: opts
                .cluster
                .as_ref()
                .map(|c| c.quorum.clone())
                .unwrap_or_default(),
            producer_ids: tokio::sync::Mutex::new((0, 0)),
            connections: AtomicUsize::new(0),
            request_memory: RequestMemory::new(opts.config.i64("queued.max.request.bytes")),
            shutdown_tx,
            config: opts.config,
        });
        broker.fetchers.attach(&broker);
        if let (MetadataBackend::Raft { service, .. }, Some(rx)) = (&broker.metadata, committed_rx)
        {
            service.attach(&broker);
            tokio::spawn(run_applier(broker.clone(), rx));
            broker
                .register(host_port_rack(&broker, rack), clean_shutdown, &local_logs)
                .await;
        }
        // Followers start fetching; leaders start tracking their followers.
        broker.on_leadership_changed(broker.replicas.all());
        Ok(RunningBroker {
            broker,
            local_addr,
            listener,
            _lock: lock,
        })
    }

    pub fn image(&self) -> Arc<MetadataImage> {
        self.image.read().clone()
    }

    pub fn controller(&self) -> &Controller {
        &self.controller
    }

    pub fn raft(&self) -> Option<&RaftMetadataLog> {
        match &self.metadata {
            MetadataBackend::Raft { log, .. } => Some(log),
            MetadataBackend::Local(_) => None,
        }
    }

    pub fn controller_service_arc(&self) -> Option<Arc<crate::cluster::ControllerService>> {
        match &self.metadata {
            MetadataBackend::Raft { service, .. } => Some(service.clone()),
            MetadataBackend::Local(_) => None,
        }
    }

    /// The active controller's node id: the Raft leader, or this node on its own.
    pub fn controller_id(&self) -> i32 {
        match self.raft() {
            Some(r) => r.leader().unwrap_or(-1),
            None => self.node_id,
        }
    }

    /// The controller-quorum voters' ids: `--controller-quorum`, or this node alone on a
    /// one-node cluster.
    pub fn voter_ids(&self) -> Vec<i32> {
        match self.raft() {
            Some(_) => self.quorum.iter().map(|(id, _)| *id).collect(),
            None => vec![self.node_id],
        }
    }

    /// A voter's controller listener (from --controller-quorum).
    pub fn controller_address(&self, node_id: i32) -> Option<SocketAddr> {
        self.quorum
            .iter()
            .find(|(id, _)| *id == node_id)
            .map(|(_, a)| *a)
    }

    pub fn controller_timeout(&self) -> Duration {
        Duration::from_millis(
            self.config
                .i64("controller.quorum.request.timeout.ms")
                .max(10) as u64,
        )
    }

    /// Resolves once the published image has reached `offset`.
    pub async fn wait_image(&self, offset: i64, timeout: Duration) -> Result<(), String> {
        let mut rx = self.image_offset.subscribe();
        let reached = tokio::time::timeout(timeout, rx.wait_for(|o| *o >= offset))
            .await
            .is_ok_and(|r| r.is_ok());
        if reached {
            Ok(())
        } else {
            Err(format!("metadata did not reach offset {offset} in time"))
        }
    }

    /// Builds records from the current image, makes them durable in the metadata log and
    /// publishes the new image (applying the change to the hosted partitions). One node: all
    /// under one lock, so metadata changes are totally ordered. A cluster: the active
    /// controller appends them only if its image is the one they were built from; otherwise
    /// this broker catches up and builds them again.
    pub fn commit_metadata<E: From<String>>(
        &self,
        build: impl FnMut(&MetadataImage) -> Result<Vec<MetadataRecord>, E>,
    ) -> Result<Arc<MetadataImage>, E> {
        tokio::task::block_in_place(|| match &self.metadata {
            MetadataBackend::Local(mlog) => self.commit_local(mlog, build),
            MetadataBackend::Raft { .. } => {
                tokio::runtime::Handle::current().block_on(self.commit_remote(build))
            }
        })
    }

    /// `commit_metadata` for async callers.
    pub async fn commit_metadata_async<E: From<String>>(
        &self,
        build: impl FnMut(&MetadataImage) -> Result<Vec<MetadataRecord>, E>,
    ) -> Result<Arc<MetadataImage>, E> {
        match &self.metadata {
            MetadataBackend::Local(mlog) => {
                tokio::task::block_in_place(|| self.commit_local(mlog, build))
            }
            MetadataBackend::Raft { .. } => self.commit_remote(build).await,
        }
    }

    fn commit_local<E: From<String>>(
        &self,
        mlog: &Mutex<FileMetadataLog>,
        mut build: impl FnMut(&MetadataImage) -> Result<Vec<MetadataRecord>, E>,
    ) -> Result<Arc<MetadataImage>, E> {
        let mut mlog = mlog.lock();
        let current = self.image();
        let records = build(&current)?;
        if records.is_empty() {
            return Ok(current);
        }
        let first = mlog
            .append(&records)
            .map_err(|e| E::from(format!("metadata log: {e}")))?;
        let (next, delta) = current.apply(first, &records);
        self.publish(next, delta).map_err(E::from)
    }

    async fn commit_remote<E: From<String>>(
        &self,
        mut build: impl FnMut(&MetadataImage) -> Result<Vec<MetadataRecord>, E>,
    ) -> Result<Arc<MetadataImage>, E> {
        use crate::cluster::{ControllerRequest, ControllerResponse};
        let timeout = self.controller_timeout();
        let deadline = tokio::time::Instant::now() + timeout * 4;
        // Appends whose outcome is unknown (the controller lost its leadership while the entry
        // was in flight: it may still commit), with the image offset they were built at.
        let mut uncertain: Vec<(i64, Vec<MetadataRecord>)> = Vec::new();
        loop {
            let current = self.image();
            if uncertain
                .iter()
                .any(|(at, records)| self.committed_after(*at, records))
            {
                // Our own change committed after all: building it again from an image that
                // already holds it would fail (e.g. TOPIC_ALREADY_EXISTS for our own topic).
                return Ok(current);
            }
            let records = build(&current)?;
            if records.is_empty() {
                return Ok(current);
            }
            let req = ControllerRequest::Append {
                expected_offset: current.offset,
                records,
            };
            let resp = crate::cluster::call(self, &req).await.map_err(E::from)?;
            match resp {
                ControllerResponse::Appended { offset } => {
                    self.wait_image(offset, timeout).await.map_err(E::from)?;
                    return Ok(self.image());
                }
                ControllerResponse::Stale { offset } => {
                    let _ = self.wait_image(offset, timeout).await;
                }
                ControllerResponse::NotController => {
                    if let ControllerRequest::Append { records, .. } = req {
                        uncertain.push((current.offset, records));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                ControllerResponse::Ok
                | ControllerResponse::Quorum(_)
                | ControllerResponse::Unregistered => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                ControllerResponse::Error(e) | ControllerResponse::Refused { message: e, .. } => {
                    return Err(E::from(e))
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(E::from(
                    "the metadata change did not commit in time".to_string(),
                ));
            }
        }
    }

    /// Whether exactly `records` were committed as one batch after image offset `after`.
    fn committed_after(&self, after: i64, records: &[MetadataRecord]) -> bool {
        self.recent_batches
            .lock()
            .iter()
            .any(|(offset, batch)| *offset > after && batch.as_slice() == records)
    }

    /// Publishes a new image and brings the hosted partitions, dynamic configs and groups in
    /// line with it. Callers serialise (the local log lock, or the one Raft applier).
    fn publish(
        &self,
        next: MetadataImage,
        delta: MetadataDelta,
    ) -> Result<Arc<MetadataImage>, String> {
        let _guard = self.publish_lock.lock();
        let next = Arc::new(next);
        // Settings first: a controller action built from the new image must not judge it by
        // the old ones (min.insync.replicas decides ELR membership). One built from the old
        // image with the new settings is refused as stale by the controller.
        if delta.changed_broker_configs {
            self.config.set_dynamic(self.node_id, &next.broker_configs);
        }
        *self.image.write() = next.clone();
        let changed = match self
            .replicas
            .apply_delta(&self.config, &next, &delta, now_ms())
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "applying a metadata change to the logs failed");
                self.image_offset.send_replace(next.offset);
                return Err(format!("applying metadata: {e}"));
            }
        };
        for (name, _, parts) in &delta.deleted_topics {
            for p in parts {
                self.fetchers.remove(name, *p);
            }
        }
        let deleted: Vec<String> = delta
            .deleted_topics
            .iter()
            .map(|(name, _, _)| name.clone())
            .filter(|n| n != OFFSETS_TOPIC)
            .collect();
        if !deleted.is_empty() {
            self.groups.on_topics_deleted(self, &deleted);
        }
        self.image_offset.send_replace(next.offset);
        if !changed.is_empty() {
            self.on_leadership_changed(changed);
        }
        Ok(next)
    }

    /// Applies one committed entry of the Raft metadata log.
    fn apply_committed(&self, committed: Committed) {
        let current = self.image();
        let (next, delta) = match committed {
            Committed::Batch { offset, records } => {
                let applied = current.apply_batch(offset, &records);
                let mut recent = self.recent_batches.lock();
                if recent.len() >= RECENT_BATCHES {
                    recent.pop_front();
                }
                recent.push_back((offset, records));
                applied
            }
            Committed::Snapshot { offset, records } => {
                let (next, _) = MetadataImage::empty().apply_batch(offset, &records);
                let delta = current.diff(&next);
                (next, delta)
            }
        };
        if let Err(e) = self.publish(next, delta) {
            tracing::error!(error = %e, "publishing committed metadata failed");
        }
    }

    /// Partitions whose leadership changed: followers (re)start fetching from their leader;
    /// in a cluster the group coordinator follows the leadership of `__consumer_offsets`.
    pub fn on_leadership_changed(&self, parts: Vec<Arc<crate::partition::Partition>>) {
        for p in parts {
            self.fetchers.update(self.node_id, &p);
            if p.topic == OFFSETS_TOPIC && self.raft().is_some() {
                self.coordinate_offsets_partition(&p);
            }
        }
    }

    /// Cluster: load the groups of an offsets partition this broker now leads (in the
    /// background; COORDINATOR_LOAD_IN_PROGRESS meanwhile), forget those of one it lost.
    fn coordinate_offsets_partition(&self, p: &Arc<crate::partition::Partition>) {
        if let Some(t) = self.image().topic(OFFSETS_TOPIC) {
            self.groups.set_partition_count(t.partitions.len() as i32);
        }
        if !p.is_leader() {
            if self.groups.unload(p.index) {
                tracing::info!(
                    partition = p.index,
                    "no longer coordinating this offsets partition"
                );
            }
            return;
        }
        if !self.groups.begin_load_partition(p.index) {
            return;
        }
        let Some(me) = self.fetchers.broker() else {
            return;
        };
        let index = p.index;
        tokio::task::spawn_blocking(move || match me.groups.load(&*me, index, me.now_ms()) {
            Ok(n) => tracing::info!(
                partition = index,
                groups = n,
                "coordinating this offsets partition"
            ),
            Err(e) => {
                tracing::error!(partition = index, error = %e, "loading groups failed");
                me.groups.unload(index);
            }
        });
    }

    /// Cluster start: registers this broker (fenced, so leaderships it held before a restart
    /// move on with a new leader epoch before it serves), the cluster id and the cluster-wide
    /// min.insync.replicas if none exist, and after an unclean shutdown takes it out of the
    /// ELRs of topics that do not fsync every write (`Controller::unclean_restart`). The
    /// heartbeat loop unfences it. Retried until it succeeds.
    async fn register(
        &self,
        (host, port, rack): (String, i32, Option<String>),
        clean_shutdown: bool,
        local_logs: &std::collections::HashSet<(String, i32)>,
    ) {
        let me = self.node_id;
        let static_min_isr = self.config.i64(crate::topics::MIN_ISR);
        let lazy =
            |t: &strom_meta::TopicImage| self.config.topic_i64(&t.configs, "flush.messages") > 1;
        let started = std::time::Instant::now();
        // Until it succeeds, as Kafka's broker retries its registration: the active controller
        // may be unreachable or changing for a while.
        loop {
            let registered = self
                .commit_metadata_async::<String>(|img| {
                    let node = Registration {
                        node_id: me,
                        endpoint: (&host, port, rack.as_deref()),
                        clean_shutdown,
                        static_min_isr,
                        local_logs,
                    };
                    Ok(registration_records(
                        &self.controller,
                        img,
                        &node,
                        self,
                        &lazy,
                    ))
                })
                .await;
            match registered {
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        waited_s = started.elapsed().as_secs(),
                        "registration with the controller failed; retrying"
                    );
                    tokio::time::sleep(self.controller_timeout()).await;
                }
            }
        }
        tracing::info!(node_id = me, "registered with the controller");
    }

    /// Next producer id (KIP-98 InitProducerId), reserving a new block in the metadata log when
    /// the current one is used up, so ids are never reused across restarts.
    /// Requests waiting for the lock while one reserves a block hold no thread (a blocking lock
    /// here once took every worker thread the reservation's wait for the controller needed).
    pub async fn next_producer_id(&self) -> Result<i64, String> {
        let mut ids = self.producer_ids.lock().await;
        if ids.0 >= ids.1 {
            let mut first = 0;
            self.commit_metadata_async::<String>(|img| {
                let (f, rec) = self
                    .controller
                    .allocate_producer_ids(img, PRODUCER_ID_BLOCK);
                first = f;
                Ok(vec![rec])
            })
            .await?;
            *ids = (first, first + PRODUCER_ID_BLOCK);
        }
        let id = ids.0;
        ids.0 += 1;
        Ok(id)
    }

    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown_tx.subscribe()
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown_tx.borrow()
    }

    pub fn begin_shutdown(&self) {
        let _ = self.shutdown_tx.send(true);
    }

    pub fn now_ms(&self) -> i64 {
        now_ms()
    }
}

impl RunningBroker {
    /// Accepts connections until `begin_shutdown`, then drains them (bounded) and closes every
    /// log cleanly.
    pub async fn serve(self) -> Result<(), strom_log::LogError> {
        let RunningBroker {
            broker,
            local_addr,
            listener,
            _lock,
        } = self;
        tracing::info!(
            node_id = broker.node_id,
            workers = tokio::runtime::Handle::current().metrics().num_workers(),
            "listening on {local_addr}"
        );
        let max_connections = broker.config.i64("max.connections").max(1) as usize;
        let mut shutdown = broker.shutdown_signal();
        let ticker = tokio::spawn(flush_ticker(broker.clone()));
        let flusher = tokio::spawn(broker.replicas.flusher.clone().run());
        if broker.groups.partitions() > 0 {
            let b = broker.clone();
            tokio::task::spawn_blocking(move || load_groups(&b));
        }
        let group_ticker = tokio::spawn(group_ticker(broker.clone()));
        let retention = tokio::spawn(retention_checker(broker.clone()));
        let cleaner = tokio::spawn(crate::cleaner::run(broker.clone()));
        let isr = tokio::spawn(crate::replication::isr_ticker(broker.clone()));
        let heartbeats = broker
            .raft()
            .is_some()
            .then(|| tokio::spawn(crate::cluster::heartbeat_loop(broker.clone())));
        let hw_checkpoints = broker
            .raft()
            .is_some()
            .then(|| tokio::spawn(crate::hw_checkpoint::run(broker.clone())));
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                accepted = listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    };
                    if broker.connections.load(Ordering::Acquire) >= max_connections {
                        tracing::warn!(%peer, max_connections, "max.connections reached; closing new connection");
                        drop(stream);
                        continue;
                    }
                    broker.connections.fetch_add(1, Ordering::AcqRel);
                    let b = broker.clone();
                    tokio::spawn(async move {
                        crate::connection::serve(b.clone(), stream, peer).await;
                        b.connections.fetch_sub(1, Ordering::AcqRel);
                    });
                }
            }
        }
        drop(listener);
        if broker.raft().is_some() {
            // Controlled shutdown: leaderships move to other in-sync replicas first, so
            // producers fail over at once instead of after the session timeout.
            let req = crate::cluster::ControllerRequest::ControlledShutdown {
                broker_id: broker.node_id,
            };
            match crate::cluster::call(&broker, &req).await {
                Ok(_) => tracing::info!("controlled shutdown: leaderships moved"),
                Err(e) => tracing::warn!(error = %e, "controlled shutdown failed; leaving anyway"),
            }
        }
        tracing::info!("shutting down: draining connections");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while broker.connections.load(Ordering::Acquire) > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        ticker.abort();
        group_ticker.abort();
        retention.abort();
        cleaner.abort();
        flusher.abort();
        isr.abort();
        if let Some(h) = heartbeats {
            h.abort();
        }
        if let Some(raft) = broker.raft() {
            raft.shutdown().await;
        }
        let dir = broker.data_dir.clone();
        if let Some(h) = hw_checkpoints {
            h.abort();
            let entries = crate::hw_checkpoint::entries(&broker.replicas.all());
            if let Err(e) =
                tokio::task::block_in_place(|| crate::hw_checkpoint::write(&dir, &entries))
            {
                tracing::warn!(error = %e, "writing the high watermark checkpoint failed");
            }
        }
        tokio::task::block_in_place(|| broker.replicas.close_all())?;
        let marker = dir.join(CLEAN_SHUTDOWN_FILE);
        std::fs::write(&marker, b"")?;
        if let Ok(f) = std::fs::File::open(&marker) {
            let _ = f.sync_all();
        }
        sync_dir(&dir);
        tracing::info!("shutdown complete");
        Ok(())
    }
}

/// Lazy flushing (`flush.messages` > 1): flushes partitions whose `flush.ms` has passed.
async fn flush_ticker(broker: Arc<Broker>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let now = now_ms();
        for p in broker.replicas.all() {
            p.flush_if_due(now);
        }
    }
}

/// Applies retention.ms / retention.bytes every `log.retention.check.interval.ms`.
async fn retention_checker(broker: Arc<Broker>) {
    let every = broker.config.i64("log.retention.check.interval.ms").max(1) as u64;
    let mut tick = tokio::time::interval(Duration::from_millis(every));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let b = broker.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let now = now_ms();
            for p in b.replicas.all() {
                if let Err(e) = p.apply_retention(now) {
                    tracing::warn!(topic = %p.topic, partition = p.index, error = %e, "retention check failed");
                }
            }
        })
        .await;
    }
}

/// Drives the group coordinator's timers (sessions, rebalances, offset expiry).
async fn group_ticker(broker: Arc<Broker>) {
    let mut tick = tokio::time::interval(GROUP_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let image = broker.image();
        let topics = |name: &str| crate::groups::topic_info(&image, name);
        broker.groups.tick(&*broker, &topics, now_ms());
    }
}

/// A node registering with the controller (`Broker::register`).
struct Registration<'a> {
    node_id: i32,
    /// Host, port and rack.
    endpoint: (&'a str, i32, Option<&'a str>),
    clean_shutdown: bool,
    /// Its own min.insync.replicas, for a cluster that has none yet.
    static_min_isr: i64,
    /// The partitions it had a log for when it started.
    local_logs: &'a std::collections::HashSet<(String, i32)>,
}

/// What a registration writes, built on `img`: the cluster id and the cluster-wide
/// min.insync.replicas if there are none, the node's endpoint, the node fenced, and after an
/// unclean shutdown the node out of the ELRs of topics that do not fsync every write (`lazy`).
fn registration_records(
    controller: &Controller,
    img: &MetadataImage,
    node: &Registration<'_>,
    policy: &dyn strom_meta::TopicPolicy,
    lazy: &dyn Fn(&strom_meta::TopicImage) -> bool,
) -> Vec<MetadataRecord> {
    let me = node.node_id;
    let (host, port, rack) = node.endpoint;
    let mut records = Vec::new();
    if img.cluster_id.is_empty() {
        records.push(MetadataRecord::ClusterId {
            cluster_id: new_cluster_id(),
        });
    }
    let same = img
        .brokers
        .get(&me)
        .is_some_and(|b| b.host == host && b.port == port && b.rack.as_deref() == rack);
    if !same {
        records.push(MetadataRecord::RegisterBroker {
            broker_id: me,
            host: host.to_string(),
            port,
            rack: rack.map(str::to_string),
        });
    }
    let min_isr = crate::topics::MIN_ISR;
    if !img
        .broker_configs
        .contains_key(&(None, min_isr.to_string()))
    {
        // One min.insync.replicas for every leader and the controller (KIP-966's eligible
        // replicas rest on it): the first node to register writes its own as the cluster-wide
        // value, which outranks every node's static setting; per-broker values from before go.
        // Changed later with AlterConfigs on the default broker resource.
        records.push(MetadataRecord::BrokerConfig {
            broker_id: None,
            name: min_isr.to_string(),
            value: Some(node.static_min_isr.max(1).to_string()),
        });
        records.extend(
            img.broker_configs
                .keys()
                .filter(|(id, name)| id.is_some() && name == min_isr)
                .map(|(id, name)| MetadataRecord::BrokerConfig {
                    broker_id: *id,
                    name: name.clone(),
                    value: None,
                }),
        );
        // A cluster from before the value was written: ELRs chosen under whatever each
        // controller had go.
        records.extend(controller.clear_eligible_leader_replicas(img, |_| true));
    }
    let (after, _) = img.apply(img.offset, &records);
    records.extend(controller.fence_broker(&after, me, policy));
    if !records
        .iter()
        .any(|r| matches!(r, MetadataRecord::FenceBroker { .. }))
        && !after.brokers.get(&me).is_some_and(|b| b.fenced)
    {
        records.push(MetadataRecord::FenceBroker { broker_id: me });
    }
    if !node.clean_shutdown {
        // KIP-966: what a topic that does not fsync every write acknowledged may be lost
        // here, so this node is no longer an eligible leader of it. After the fencing, which
        // moves a node still in an ISR below min.insync.replicas into the ELR.
        let (fenced, _) = img.apply(img.offset, &records);
        records.extend(controller.unclean_restart(&fenced, me, lazy));
    }
    // Recorded as holding data it has no log for (a replaced or wiped disk): never elected
    // with nothing.
    let (now, _) = img.apply(img.offset, &records);
    let lost = |t: &strom_meta::TopicImage, p: i32| !node.local_logs.contains(&(t.name.clone(), p));
    records.extend(controller.lost_replicas(&now, me, lost));
    records
}

fn new_cluster_id() -> String {
    base64_url(uuid::Uuid::new_v4().as_bytes())
}

fn host_port_rack(broker: &Broker, rack: Option<String>) -> (String, i32, Option<String>) {
    (broker.advertised_host.clone(), broker.advertised_port, rack)
}

/// Starts this node's member of the metadata quorum (a voter, or a learner on a broker-only
/// node) and replays what is committed, until the node has caught up with the leader.
async fn join_quorum(
    opts: &BrokerOptions,
    c: &crate::cluster::ClusterOptions,
    dir: &Path,
) -> Result<
    (
        RaftMetadataLog,
        Arc<crate::cluster::ControllerService>,
        MetadataImage,
        tokio::sync::mpsc::Receiver<Committed>,
    ),
    StartError,
> {
    let listener = TcpListener::bind(c.controller_listen)
        .await
        .map_err(|e| StartError::Listen(c.controller_listen, e))?;
    let election_ms = opts
        .config
        .i64("controller.quorum.election.timeout.ms")
        .max(20) as u64;
    // openraft's followers keep a lease on their leader of `election_timeout_max` after each
    // heartbeat and stand for election only a random timeout (min..max) after the lease ran
    // out: with max = E and min = E/2, a leader that went silent is replaced 1.5 E to 2 E
    // later (900–1200 ms by default; a leader whose process died is replaced at once, see
    // strom_meta's liveness probe).
    let cfg = RaftConfig {
        node_id: opts.node_id,
        voters: c.quorum.clone(),
        dir: dir.join("__cluster_metadata-0"),
        election_timeout_min_ms: election_ms / 2,
        election_timeout_max_ms: election_ms,
        heartbeat_interval_ms: (election_ms / 6).max(3),
        snapshot_every_entries: 10_000,
    };
    let service = crate::cluster::ControllerService::new();
    let (log, mut rx) = RaftMetadataLog::start(cfg, listener, service.clone())
        .await
        .map_err(StartError::Quorum)?;
    let mut image = MetadataImage::empty();
    let started = std::time::Instant::now();
    // As long as it takes (as a KRaft node waits for its quorum): the other voters may be
    // started later, or be cut off for a while.
    loop {
        let caught_up = log.wait_caught_up(QUORUM_WAIT_REPORT);
        tokio::pin!(caught_up);
        let done = loop {
            tokio::select! {
                c = rx.recv() => match c {
                    Some(c) => image = apply_to(&image, c),
                    None => return Err(StartError::Quorum(strom_meta::MetadataLogError::Shutdown)),
                },
                r = &mut caught_up => break r,
            }
        };
        match done {
            Ok(_) => break,
            Err(strom_meta::MetadataLogError::Timeout(_)) => tracing::warn!(
                waited_s = started.elapsed().as_secs(),
                leader = ?log.leader(),
                "still waiting to catch up with the metadata quorum (a majority of the voters \
                 must be running and reachable)"
            ),
            Err(e) => return Err(StartError::Quorum(e)),
        }
    }
    while image.offset < log.applied_offset() {
        match rx.recv().await {
            Some(c) => image = apply_to(&image, c),
            None => return Err(StartError::Quorum(strom_meta::MetadataLogError::Shutdown)),
        }
    }
    tracing::info!(
        offset = image.offset,
        leader = ?log.leader(),
        role = if log.is_voter() { "voter" } else { "broker-only" },
        elapsed_ms = started.elapsed().as_millis() as u64,
        "caught up with the metadata quorum"
    );
    Ok((log, service, image, rx))
}

fn apply_to(image: &MetadataImage, c: Committed) -> MetadataImage {
    match c {
        Committed::Batch { offset, records } => image.apply_batch(offset, &records).0,
        Committed::Snapshot { offset, records } => {
            MetadataImage::empty().apply_batch(offset, &records).0
        }
    }
}

/// Applies committed metadata as the quorum delivers it.
/// Committed Raft batches a broker remembers (see `Broker::committed_after`).
const RECENT_BATCHES: usize = 256;

async fn run_applier(broker: Arc<Broker>, mut rx: tokio::sync::mpsc::Receiver<Committed>) {
    while let Some(c) = rx.recv().await {
        let b = broker.clone();
        tokio::task::block_in_place(move || b.apply_committed(c));
    }
}

fn base64_url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for &b in bytes {
        acc = (acc << 8) | b as u32;
        bits += 8;
        while bits >= 6 {
            bits -= 6;
            out.push(ALPHABET[((acc >> bits) & 63) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((acc << (6 - bits)) & 63) as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use strom_meta::FixedPolicy;

    const POLICY: FixedPolicy = FixedPolicy {
        unclean: false,
        min_isr: 2,
    };

    /// Brokers 1-3 registered and live; topics "lazy" and "synced" of one partition on all
    /// three, led by 1 with ISR [1, 2] (3 out of sync); broker 3 has a per-broker
    /// min.insync.replicas from before the cluster-wide one existed.
    fn cluster() -> MetadataImage {
        let mut records = Vec::new();
        for id in 1..=3 {
            records.push(MetadataRecord::RegisterBroker {
                broker_id: id,
                host: "127.0.0.1".into(),
                port: 9090 + id,
                rack: None,
            });
            records.push(MetadataRecord::UnfenceBroker { broker_id: id });
        }
        for (i, name) in ["lazy", "synced"].into_iter().enumerate() {
            let topic_id = [i as u8 + 1; 16];
            records.push(MetadataRecord::Topic {
                name: name.into(),
                topic_id,
            });
            records.push(MetadataRecord::Partition {
                topic_id,
                partition: 0,
                replicas: vec![1, 2, 3],
                isr: vec![1, 2],
                leader: 1,
                leader_epoch: 3,
                partition_epoch: 5,
                elr: vec![],
                last_known_elr: vec![],
                adding_replicas: vec![],
                removing_replicas: vec![],
            });
        }
        records.push(MetadataRecord::BrokerConfig {
            broker_id: Some(3),
            name: "min.insync.replicas".into(),
            value: Some("1".into()),
        });
        MetadataImage::empty().apply(0, &records).0
    }

    fn register(img: &MetadataImage, node_id: i32, clean_shutdown: bool) -> MetadataImage {
        let all = ["lazy", "synced"].map(|t| (t.to_string(), 0)).into();
        register_with(img, node_id, clean_shutdown, &all)
    }

    fn register_with(
        img: &MetadataImage,
        node_id: i32,
        clean_shutdown: bool,
        local_logs: &std::collections::HashSet<(String, i32)>,
    ) -> MetadataImage {
        let node = Registration {
            node_id,
            endpoint: ("127.0.0.1", 9090 + node_id, None),
            clean_shutdown,
            static_min_isr: 2,
            local_logs,
        };
        let lazy = |t: &strom_meta::TopicImage| t.name == "lazy";
        let records = registration_records(&Controller::default(), img, &node, &POLICY, &lazy);
        img.apply(img.offset + 1, &records).0
    }

    fn elr(img: &MetadataImage, topic: &str) -> (Vec<i32>, Vec<i32>) {
        let p = &img.topic(topic).unwrap().partitions[&0];
        (p.isr.clone(), p.elr.clone())
    }

    /// Broker 2 restarts after a kill -9 before its session ran out: still in the ISR when it
    /// registers. Fencing it takes the ISR below min.insync.replicas, which makes it eligible —
    /// but not for the topic that does not fsync every write, where it may have lost what it
    /// acknowledged.
    #[test]
    fn a_quick_unclean_restart_is_not_eligible_where_writes_are_not_fsynced() {
        let img = register(&cluster(), 2, false);
        assert_eq!(elr(&img, "lazy"), (vec![1], vec![]));
        assert_eq!(elr(&img, "synced"), (vec![1], vec![2]));
        // After a clean shutdown it stays eligible for both.
        let img = register(&cluster(), 2, true);
        assert_eq!(elr(&img, "lazy"), (vec![1], vec![2]));
        assert_eq!(elr(&img, "synced"), (vec![1], vec![2]));
    }

    /// A node whose disk was replaced has no log for the partitions it is recorded as
    /// holding: it leaves their ISR and ELR instead of being elected with nothing.
    #[test]
    fn a_node_without_the_logs_it_is_recorded_with_is_not_eligible() {
        let only_lazy = [("lazy".to_string(), 0)].into();
        let img = register_with(&cluster(), 2, true, &only_lazy);
        assert_eq!(elr(&img, "lazy"), (vec![1], vec![2]));
        assert_eq!(elr(&img, "synced"), (vec![1], vec![]));
        // The leader itself, restarted with a new disk before it was fenced: another in-sync
        // replica leads.
        let mut img = cluster();
        let p = img.topic("synced").unwrap().partitions[&0].clone();
        assert_eq!(p.leader, 1);
        img = register_with(&img, 1, true, &only_lazy);
        let after = &img.topic("synced").unwrap().partitions[&0];
        assert_eq!((after.leader, after.isr.clone()), (2, vec![2]));
        assert!(after.elr.is_empty(), "{after:?}");
    }

    /// The first registration writes one cluster-wide min.insync.replicas and drops the
    /// per-broker ones, which would otherwise outrank it on their broker.
    #[test]
    fn the_first_registration_writes_one_min_insync_replicas_for_the_cluster() {
        let img = register(&cluster(), 1, true);
        let min_isr = |id| {
            img.broker_configs
                .get(&(id, "min.insync.replicas".to_string()))
        };
        assert_eq!(min_isr(None).map(String::as_str), Some("2"));
        assert_eq!(min_isr(Some(3)), None);
        // Later registrations leave it alone.
        let mut changed = img.clone();
        changed
            .broker_configs
            .insert((None, "min.insync.replicas".into()), "3".into());
        let again = register(&changed, 2, true);
        let v = again
            .broker_configs
            .get(&(None, "min.insync.replicas".to_string()));
        assert_eq!(v.map(String::as_str), Some("3"));
    }
}
