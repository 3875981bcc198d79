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
    metadata_log: Mutex<FileMetadataLog>,
    image: parking_lot::RwLock<Arc<MetadataImage>>,
    producer_ids: Mutex<(i64, i64)>,
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
    DataDir(PathBuf, std::io::Error),
    #[error("data directory {0} is in use by another strom process")]
    Locked(PathBuf),
    #[error("metadata log: {0}")]
    Metadata(#[from] strom_meta::MetadataLogError),
    #[error("opening logs: {0}")]
    Log(#[from] strom_log::LogError),
    #[error("listen on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
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

        let mut mlog = FileMetadataLog::open(&dir.join("__cluster_metadata-0"))?;
        let (mut image, _) = MetadataImage::empty().apply(0, mlog.committed());
        if image.cluster_id.is_empty() {
            let id = uuid::Uuid::new_v4();
            let recs = vec![MetadataRecord::ClusterId {
                cluster_id: base64_url(id.as_bytes()),
            }];
            let first = mlog.append(&recs)?;
            image = image.apply(first, &recs).0;
        }

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
        let me = MetadataRecord::RegisterBroker {
            broker_id: opts.node_id,
            host: host.clone(),
            port: port as i32,
            rack: None,
        };
        let registered = image
            .brokers
            .get(&opts.node_id)
            .is_some_and(|b| b.host == host && b.port == port as i32);
        if !registered {
            let first = mlog.append(std::slice::from_ref(&me))?;
            image = image.apply(first, std::slice::from_ref(&me)).0;
        }

        opts.config.set_dynamic(opts.node_id, &image.broker_configs);
        let replicas =
            ReplicaManager::new(dir.clone()).map_err(|e| StartError::DataDir(dir.clone(), e))?;
        let started = std::time::Instant::now();
        replicas.load(&opts.config, &image, clean_shutdown)?;
        tracing::info!(
            partitions = replicas.all().len(),
            clean_shutdown,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "logs loaded"
        );

        let groups = GroupCoordinator::new(group_config(&opts.config));
        if let Some(t) = image.topic(OFFSETS_TOPIC) {
            // Loaded in the background once serving; until then COORDINATOR_LOAD_IN_PROGRESS.
            groups.begin_load(t.partitions.len() as i32);
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
            metadata_log: Mutex::new(mlog),
            image: parking_lot::RwLock::new(Arc::new(image)),
            producer_ids: Mutex::new((0, 0)),
            connections: AtomicUsize::new(0),
            request_memory: RequestMemory::new(opts.config.i64("queued.max.request.bytes")),
            shutdown_tx,
            config: opts.config,
        });
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

    /// Builds records from the current image, makes them durable in the metadata log, publishes
    /// the new image and applies the change to the hosted partitions — all under one lock, so
    /// metadata changes are totally ordered.
    pub fn commit_metadata<E: From<String>>(
        &self,
        build: impl FnOnce(&MetadataImage) -> Result<Vec<MetadataRecord>, E>,
    ) -> Result<Arc<MetadataImage>, E> {
        tokio::task::block_in_place(|| {
            let mut mlog = self.metadata_log.lock();
            let current = self.image();
            let records = build(&current)?;
            if records.is_empty() {
                return Ok(current);
            }
            let first = mlog
                .append(&records)
                .map_err(|e| E::from(format!("metadata log: {e}")))?;
            let (next, delta): (MetadataImage, MetadataDelta) = current.apply(first, &records);
            let next = Arc::new(next);
            *self.image.write() = next.clone();
            if delta.changed_broker_configs {
                self.config.set_dynamic(self.node_id, &next.broker_configs);
            }
            if let Err(e) = self.replicas.apply_delta(&self.config, &next, &delta) {
                tracing::error!(error = %e, "applying a metadata change to the logs failed");
                return Err(E::from(format!("applying metadata: {e}")));
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
            Ok(next)
        })
    }

    /// Next producer id (KIP-98 InitProducerId), reserving a new block in the metadata log when
    /// the current one is used up, so ids are never reused across restarts.
    pub fn next_producer_id(&self) -> Result<i64, String> {
        let mut ids = self.producer_ids.lock();
        if ids.0 >= ids.1 {
            let mut first = 0;
            self.commit_metadata::<String>(|img| {
                let (f, rec) = self
                    .controller
                    .allocate_producer_ids(img, PRODUCER_ID_BLOCK);
                first = f;
                Ok(vec![rec])
            })?;
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
        tracing::info!(node_id = broker.node_id, "listening on {local_addr}");
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
        let dir = broker.data_dir.clone();
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
