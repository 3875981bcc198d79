//! The config registry: every setting declared once with its Kafka name, type, default, scope
//! and documentation. The config file, `--set`, DescribeConfigs and `strom server --help` all
//! read this table, so a setting cannot exist in one place and be missing in another.

use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigKind {
    Boolean,
    String,
    Int,
    Short,
    Long,
    Double,
}

impl ConfigKind {
    /// DescribeConfigs v3+ `config_type`.
    pub fn wire_type(self) -> i8 {
        match self {
            ConfigKind::Boolean => 1,
            ConfigKind::String => 2,
            ConfigKind::Int => 3,
            ConfigKind::Short => 4,
            ConfigKind::Long => 5,
            ConfigKind::Double => 6,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Broker,
    Topic,
}

/// DescribeConfigs `config_source` values (Kafka's `ConfigSource`).
pub mod source {
    pub const TOPIC: i8 = 1;
    pub const DYNAMIC_BROKER: i8 = 2;
    pub const DYNAMIC_DEFAULT_BROKER: i8 = 3;
    pub const STATIC_BROKER: i8 = 4;
    pub const DEFAULT: i8 = 5;
}

#[derive(Debug)]
pub struct ConfigDef {
    pub name: &'static str,
    pub kind: ConfigKind,
    pub default: &'static str,
    pub scope: Scope,
    /// For a topic setting: the broker setting that supplies its default (Kafka's synonym).
    pub broker_synonym: Option<&'static str>,
    /// Accepted values for enumerations; empty means any value of `kind`.
    pub one_of: &'static [&'static str],
    /// Smallest accepted numeric value.
    pub min: Option<i64>,
    pub doc: &'static str,
}

const LONG_MAX: &str = "9223372036854775807";

macro_rules! def {
    ($name:expr, $kind:ident, $default:expr, $scope:ident, $syn:expr, $one_of:expr, $min:expr, $doc:expr) => {
        ConfigDef {
            name: $name,
            kind: ConfigKind::$kind,
            default: $default,
            scope: Scope::$scope,
            broker_synonym: $syn,
            one_of: $one_of,
            min: $min,
            doc: $doc,
        }
    };
}

/// Every setting Strom knows. Defaults are Kafka's unless the doc says otherwise.
pub static REGISTRY: &[ConfigDef] = &[
    // Broker settings.
    def!("auto.create.topics.enable", Boolean, "true", Broker, None, &[], None, "Create a topic when a client asks for metadata of one that does not exist."),
    def!("num.partitions", Int, "1", Broker, None, &[], Some(1), "Partitions of an auto-created topic, and of CreateTopics with num_partitions -1."),
    def!("default.replication.factor", Short, "1", Broker, None, &[], Some(1), "Replication factor of auto-created topics and of CreateTopics with -1."),
    def!("socket.request.max.bytes", Int, "104857600", Broker, None, &[], Some(64), "Largest request frame accepted; a larger size field closes the connection before anything is allocated."),
    def!("max.connections", Int, "2147483647", Broker, None, &[], Some(1), "Connections accepted at once; further connections are closed on accept."),
    def!("queued.max.request.bytes", Long, "536870912", Broker, None, &[], Some(-1), "Request bytes read but not yet handled, across all connections; reading waits when it is reached. -1: no limit. Strom's default is 512 MiB (Kafka's is -1)."),
    def!("fetch.max.bytes", Int, "57671680", Broker, None, &[], Some(1024), "Upper bound on the bytes one Fetch response carries, whatever the client asks."),
    def!("max.incremental.fetch.session.cache.slots", Int, "1000", Broker, None, &[], Some(0), "Incremental fetch sessions (KIP-227) kept at once."),
    def!("message.max.bytes", Int, "1048588", Broker, None, &[], Some(0), "Largest record batch accepted (after compression). Default of the topic setting max.message.bytes."),
    def!("log.segment.bytes", Int, "1073741824", Broker, None, &[], Some(14), "Size at which a segment is rolled. Default of segment.bytes."),
    def!("log.roll.ms", Long, "604800000", Broker, None, &[], Some(1), "Age at which a segment is rolled. Default of segment.ms."),
    def!("log.index.interval.bytes", Int, "4096", Broker, None, &[], Some(0), "Bytes between offset-index entries. Default of index.interval.bytes."),
    def!("log.message.timestamp.type", String, "CreateTime", Broker, None, &["CreateTime", "LogAppendTime"], None, "Default of message.timestamp.type."),
    def!("log.message.timestamp.before.max.ms", Long, LONG_MAX, Broker, None, &[], Some(0), "Default of message.timestamp.before.max.ms."),
    def!("log.message.timestamp.after.max.ms", Long, LONG_MAX, Broker, None, &[], Some(0), "Default of message.timestamp.after.max.ms."),
    def!("log.flush.interval.messages", Long, "1", Broker, None, &[], Some(1), "Default of flush.messages. Strom's default 1 means every acknowledged write is on disk (fsync, shared by concurrent producers) before it is acknowledged; Kafka's default is to never fsync."),
    def!("log.flush.interval.ms", Long, LONG_MAX, Broker, None, &[], Some(0), "Default of flush.ms."),
    def!("log.retention.ms", Long, "604800000", Broker, None, &[], Some(-1), "Default of retention.ms."),
    def!("log.retention.bytes", Long, "-1", Broker, None, &[], Some(-1), "Default of retention.bytes."),
    def!("log.retention.check.interval.ms", Long, "300000", Broker, None, &[], Some(1), "How often segments are checked against retention.ms and retention.bytes."),
    def!("log.cleanup.policy", String, "delete", Broker, None, &["delete", "compact", "compact,delete", "delete,compact"], None, "Default of cleanup.policy."),
    def!("log.cleaner.enable", Boolean, "true", Broker, None, &[], None, "Run the log cleaner (compaction of topics with cleanup.policy compact)."),
    def!("log.cleaner.backoff.ms", Long, "15000", Broker, None, &[], Some(1), "How long the cleaner sleeps when no log needs cleaning."),
    def!("log.cleaner.dedupe.buffer.size", Long, "134217728", Broker, None, &[], Some(1048576), "Memory for the cleaner's key map; a log with more distinct keys is cleaned in parts."),
    def!("log.cleaner.io.max.bytes.per.second", Double, "1.7976931348623157E308", Broker, None, &[], Some(1), "Bytes per second the cleaner reads at most."),
    def!("log.cleaner.min.cleanable.ratio", Double, "0.5", Broker, None, &[], Some(0), "Default of min.cleanable.dirty.ratio."),
    def!("log.cleaner.delete.retention.ms", Long, "86400000", Broker, None, &[], Some(0), "Default of delete.retention.ms."),
    def!("log.cleaner.min.compaction.lag.ms", Long, "0", Broker, None, &[], Some(0), "Default of min.compaction.lag.ms."),
    def!("log.cleaner.max.compaction.lag.ms", Long, LONG_MAX, Broker, None, &[], Some(1), "Default of max.compaction.lag.ms."),
    def!("compression.type", String, "producer", Broker, None, &["producer", "uncompressed", "gzip", "snappy", "lz4", "zstd"], None, "Default of the topic compression.type."),
    def!("min.insync.replicas", Int, "1", Broker, None, &[], Some(1), "Default of the topic min.insync.replicas. In a cluster the first node to register writes its value as the cluster-wide dynamic default, which every node then uses instead of its own; it is changed at runtime for the whole cluster only (the default broker resource), never for one broker, and cannot be removed. A change clears the eligible leader replicas (KIP-966) of the partitions it applies to."),
    def!("strom.max.decompressed.bytes", Int, "67108864", Broker, None, &[], Some(1024), "Upper bound on the output of any decompression the broker performs."),
    def!("strom.connection.max.pipelined.requests", Int, "500", Broker, None, &[], Some(1), "Requests read ahead on one connection while earlier responses are pending."),
    def!("strom.replica.direct.writes", Boolean, "true", Broker, None, &[], None, "A follower writes the data it replicates past the page cache (O_DIRECT), from its memory to the disk; the leader's writes always go through the page cache, which serves its fetches. false: followers write through the page cache too, as they do whenever replica.selector.class is set (consumers may then read from followers)."),
    def!("strom.replica.direct.min.bytes", Int, "262144", Broker, None, &[], Some(0), "With strom.replica.direct.writes, a follower writes what one fetch brought for a partition past the page cache only when it is at least this many bytes (a follower catching up, or under heavy load, where the leader is ahead and the next fetch is already out); smaller pieces are copied into the page cache, where the fsync writes them in one device round trip instead of two."),
    def!("strom.fetch.sendfile.min.bytes", Int, "16384", Broker, None, &[], Some(4096), "A partition's records in a Fetch response of at least this many bytes are sent from the segment files with sendfile (no copy through the broker's memory); smaller ones are copied. 2147483647 copies always."),
    // Replication and the cluster (used with --controller-quorum).
    def!("broker.rack", String, "", Broker, None, &[], None, "Rack (or zone) of this broker: replicas of a partition are spread over racks, and consumers with client.rack may fetch from a replica in theirs."),
    def!("broker.heartbeat.interval.ms", Int, "200", Broker, None, &[], Some(10), "How often a broker heartbeats to the active controller. Strom's default is 200 ms (Kafka's 2000) so that failover stays under 2 s."),
    def!("broker.session.timeout.ms", Int, "1200", Broker, None, &[], Some(50), "A broker that has not heartbeated for this long is fenced: its leaderships move to other in-sync replicas. Strom's default is 1200 ms (Kafka's 9000) so that failover stays under 2 s."),
    def!("unclean.leader.election.enable", Boolean, "false", Broker, None, &[], None, "Default of the topic unclean.leader.election.enable."),
    def!("replica.lag.time.max.ms", Long, "30000", Broker, None, &[], Some(1), "A follower that has not caught up with the leader's log end for this long leaves the ISR."),
    def!("replica.fetch.max.bytes", Int, "1048576", Broker, None, &[], Some(0), "Bytes a follower asks for per partition in one fetch (at least one batch is always returned)."),
    def!("replica.fetch.response.max.bytes", Int, "10485760", Broker, None, &[], Some(0), "Bytes a follower asks for in one fetch across partitions."),
    def!("replica.fetch.wait.max.ms", Int, "500", Broker, None, &[], Some(0), "Longest a follower's fetch waits at the leader for new data."),
    def!("replica.high.watermark.checkpoint.interval.ms", Long, "5000", Broker, None, &[], Some(1), "How often a broker in a replicated cluster writes its partitions' high watermarks to replication-offset-checkpoint (a restarted replica starts from them, not from its log end)."),
    def!("replica.fetch.backoff.ms", Int, "1000", Broker, None, &[], Some(0), "Pause after a follower's fetch failed before it tries again."),
    def!("auto.leader.rebalance.enable", Boolean, "true", Broker, None, &[], None, "The active controller moves leadership back to preferred replicas (the first of each partition's replicas) when a broker leads too few of the partitions it prefers."),
    def!("leader.imbalance.check.interval.seconds", Long, "300", Broker, None, &[], Some(1), "How often the active controller checks the leader balance."),
    def!("leader.imbalance.per.broker.percentage", Int, "10", Broker, None, &[], Some(0), "Share of a broker's preferred partitions it may not lead before preferred elections run."),
    def!("replica.selector.class", String, "", Broker, None, &["", "org.apache.kafka.common.replica.RackAwareReplicaSelector"], None, "KIP-392: with RackAwareReplicaSelector a leader tells a consumer that sends client.rack to fetch from an in-sync replica in its rack."),
    def!("controller.quorum.election.timeout.ms", Int, "600", Broker, None, &[], Some(20), "Raft election timeout of the metadata quorum: a voter that hears nothing from the active controller for 1.5 to 2 times this long (randomised) stands for election, and the controller heartbeats every sixth of it. Strom's default is 600 ms (Kafka's 1000 plus a 2000 ms fetch timeout) so that a silent controller is replaced in under 2 s."),
    def!("controller.quorum.request.timeout.ms", Int, "2000", Broker, None, &[], Some(10), "Timeout of a request to the active controller."),
    // Group coordinator.
    def!("group.min.session.timeout.ms", Int, "6000", Broker, None, &[], Some(1), "Smallest session.timeout.ms a consumer may ask for (INVALID_SESSION_TIMEOUT below)."),
    def!("group.max.session.timeout.ms", Int, "1800000", Broker, None, &[], Some(1), "Largest session.timeout.ms a consumer may ask for."),
    def!("group.initial.rebalance.delay.ms", Int, "3000", Broker, None, &[], Some(0), "How long the first rebalance of an empty group waits for more members, extended while they keep arriving (up to the rebalance timeout)."),
    def!("group.max.size", Int, "2147483647", Broker, None, &[], Some(1), "Members a classic group may have (GROUP_MAX_SIZE_REACHED beyond)."),
    def!("group.consumer.session.timeout.ms", Int, "45000", Broker, None, &[], Some(1), "Session timeout of KIP-848 consumer-group members (group.protocol=consumer)."),
    def!("group.consumer.heartbeat.interval.ms", Int, "5000", Broker, None, &[], Some(1), "Heartbeat interval the coordinator gives KIP-848 consumer-group members."),
    def!("group.consumer.max.size", Int, "2147483647", Broker, None, &[], Some(1), "Members a KIP-848 consumer group may have."),
    def!("offset.metadata.max.bytes", Int, "4096", Broker, None, &[], Some(0), "Largest metadata string of a committed offset (OFFSET_METADATA_TOO_LARGE beyond)."),
    def!("offsets.retention.minutes", Int, "10080", Broker, None, &[], Some(1), "Committed offsets of a group are removed this long after the group became empty (or, for a group that only commits, after the commit)."),
    def!("offsets.retention.check.interval.ms", Long, "600000", Broker, None, &[], Some(1), "How often expired offsets are looked for."),
    def!("offsets.topic.num.partitions", Int, "50", Broker, None, &[], Some(1), "Partitions of __consumer_offsets, fixed when it is created (on the first FindCoordinator)."),
    def!("offsets.topic.replication.factor", Short, "3", Broker, None, &[], Some(1), "Replication factor of __consumer_offsets, capped at the number of brokers."),
    def!("offsets.topic.segment.bytes", Int, "104857600", Broker, None, &[], Some(14), "segment.bytes of __consumer_offsets."),
    // Topic settings and the broker settings they default to.
    def!("max.message.bytes", Int, "1048588", Topic, Some("message.max.bytes"), &[], Some(0), "Largest record batch accepted by this topic."),
    def!("segment.bytes", Int, "1073741824", Topic, Some("log.segment.bytes"), &[], Some(14), "Size at which a segment is rolled."),
    def!("segment.ms", Long, "604800000", Topic, Some("log.roll.ms"), &[], Some(1), "Age at which a segment is rolled."),
    def!("index.interval.bytes", Int, "4096", Topic, Some("log.index.interval.bytes"), &[], Some(0), "Bytes between offset-index entries."),
    def!("message.timestamp.type", String, "CreateTime", Topic, Some("log.message.timestamp.type"), &["CreateTime", "LogAppendTime"], None, "CreateTime keeps the producer's timestamps; LogAppendTime stamps batches with the broker's clock."),
    def!("message.timestamp.before.max.ms", Long, LONG_MAX, Topic, Some("log.message.timestamp.before.max.ms"), &[], Some(0), "With CreateTime: a batch whose first or largest timestamp is more than this before the broker's clock is refused with INVALID_TIMESTAMP."),
    def!("message.timestamp.after.max.ms", Long, LONG_MAX, Topic, Some("log.message.timestamp.after.max.ms"), &[], Some(0), "With CreateTime: a batch whose first or largest timestamp is more than this after the broker's clock is refused with INVALID_TIMESTAMP."),
    def!("flush.messages", Long, "1", Topic, Some("log.flush.interval.messages"), &[], Some(1), "Fsync after this many messages. 1 (Strom's default): fsync before every acknowledgement, with group commit. Larger values acknowledge from the page cache, as Kafka does, trading durability on power loss for latency."),
    def!("flush.ms", Long, LONG_MAX, Topic, Some("log.flush.interval.ms"), &[], Some(0), "Fsync at least this often when flush.messages > 1."),
    def!("retention.ms", Long, "604800000", Topic, Some("log.retention.ms"), &[], Some(-1), "Whole segments whose newest record is older than this are deleted (-1: keep forever). Applies when cleanup.policy includes delete."),
    def!("retention.bytes", Long, "-1", Topic, Some("log.retention.bytes"), &[], Some(-1), "The oldest segments of a partition are deleted while it stays at least this large without them (-1: no limit). Applies when cleanup.policy includes delete."),
    def!("cleanup.policy", String, "delete", Topic, Some("log.cleanup.policy"), &["delete", "compact", "compact,delete", "delete,compact"], None, "delete: retention.ms and retention.bytes apply. compact: the cleaner keeps the latest record of every key (no time or size retention). compact,delete: both."),
    def!("min.cleanable.dirty.ratio", Double, "0.5", Topic, Some("log.cleaner.min.cleanable.ratio"), &[], Some(0), "A compacted log is cleaned once this share of its cleanable bytes was written since the last clean."),
    def!("delete.retention.ms", Long, "86400000", Topic, Some("log.cleaner.delete.retention.ms"), &[], Some(0), "Tombstones (null values) of a compacted topic are removed once older than this."),
    def!("min.compaction.lag.ms", Long, "0", Topic, Some("log.cleaner.min.compaction.lag.ms"), &[], Some(0), "Segments with records newer than this are not compacted yet."),
    def!("max.compaction.lag.ms", Long, LONG_MAX, Topic, Some("log.cleaner.max.compaction.lag.ms"), &[], Some(1), "A log with uncleaned records older than this is cleaned whatever its dirty ratio."),
    def!("compression.type", String, "producer", Topic, Some("compression.type"), &["producer", "uncompressed", "gzip", "snappy", "lz4", "zstd"], None, "producer: store batches as the producer compressed them. uncompressed, gzip, snappy, lz4, zstd: batches in another codec are recompressed on append (records, offsets and timestamps unchanged)."),
    def!("unclean.leader.election.enable", Boolean, "false", Topic, Some("unclean.leader.election.enable"), &[], None, "Allow a replica outside the ISR to become leader when no in-sync replica is alive (acknowledged records may be lost)."),
    def!("min.insync.replicas", Int, "1", Topic, Some("min.insync.replicas"), &[], Some(1), "Minimum in-sync replicas for acks=all."),
];

pub fn lookup(name: &str, scope: Scope) -> Option<&'static ConfigDef> {
    REGISTRY.iter().find(|d| d.name == name && d.scope == scope)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("unknown config '{0}'")]
    Unknown(String),
    #[error("invalid value '{value}' for '{name}': {reason}")]
    Invalid {
        name: String,
        value: String,
        reason: String,
    },
    #[error("config file: {0}")]
    File(String),
}

/// Checks `value` against the definition; returns it normalised.
pub fn validate(def: &ConfigDef, value: &str) -> Result<String, ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid {
        name: def.name.to_string(),
        value: value.to_string(),
        reason,
    };
    let value = value.trim();
    match def.kind {
        ConfigKind::Boolean => match value.to_ascii_lowercase().as_str() {
            "true" | "false" => Ok(value.to_ascii_lowercase()),
            _ => Err(invalid("expected true or false".into())),
        },
        ConfigKind::Int | ConfigKind::Short | ConfigKind::Long => {
            let n: i64 = value
                .parse()
                .map_err(|_| invalid("expected an integer".into()))?;
            let (lo, hi) = match def.kind {
                ConfigKind::Short => (i16::MIN as i64, i16::MAX as i64),
                ConfigKind::Int => (i32::MIN as i64, i32::MAX as i64),
                _ => (i64::MIN, i64::MAX),
            };
            if n < lo || n > hi {
                return Err(invalid(format!("out of range {lo}..={hi}")));
            }
            if let Some(min) = def.min {
                if n < min {
                    return Err(invalid(format!("must be at least {min}")));
                }
            }
            Ok(n.to_string())
        }
        ConfigKind::Double => {
            let x: f64 = value
                .parse()
                .map_err(|_| invalid("expected a number".into()))?;
            if !x.is_finite() || def.min.is_some_and(|m| x < m as f64) {
                return Err(invalid("out of range".into()));
            }
            Ok(x.to_string())
        }
        ConfigKind::String => {
            if !def.one_of.is_empty() && !def.one_of.contains(&value) {
                return Err(invalid(format!("expected one of {:?}", def.one_of)));
            }
            Ok(value.to_string())
        }
    }
}

/// Broker settings that can change at runtime (IncrementalAlterConfigs on a broker): the
/// defaults of topic settings, which every topic without an override picks up at once.
pub const DYNAMIC_BROKER_CONFIGS: &[&str] = &[
    "message.max.bytes",
    "log.segment.bytes",
    "log.roll.ms",
    "log.index.interval.bytes",
    "log.message.timestamp.type",
    "log.message.timestamp.before.max.ms",
    "log.message.timestamp.after.max.ms",
    "log.flush.interval.messages",
    "log.flush.interval.ms",
    "log.retention.ms",
    "log.retention.bytes",
    "log.cleanup.policy",
    "compression.type",
    "min.insync.replicas",
    "unclean.leader.election.enable",
    "log.cleaner.min.cleanable.ratio",
    "log.cleaner.io.max.bytes.per.second",
    "log.cleaner.delete.retention.ms",
    "log.cleaner.min.compaction.lag.ms",
    "log.cleaner.max.compaction.lag.ms",
];

/// The broker's configuration: defaults overlaid with the config file and `--set` (static),
/// overlaid with dynamic settings from the metadata log (this broker's, then the cluster
/// default's).
#[derive(Debug, Clone, Default)]
pub struct BrokerConfig {
    explicit: BTreeMap<String, String>,
    dynamic: std::sync::Arc<parking_lot::RwLock<BTreeMap<String, (String, i8)>>>,
}

impl BrokerConfig {
    pub fn new(file: Option<&Path>, sets: &[String]) -> Result<Self, ConfigError> {
        let mut cfg = BrokerConfig::default();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError::File(format!("{}: {e}", path.display())))?;
            let table: toml::Table = text
                .parse()
                .map_err(|e| ConfigError::File(format!("{}: {e}", path.display())))?;
            let mut flat = Vec::new();
            flatten("", &toml::Value::Table(table), &mut flat);
            for (k, v) in flat {
                cfg.set(&k, &v)?;
            }
        }
        for s in sets {
            let (k, v) = s.split_once('=').ok_or_else(|| ConfigError::Invalid {
                name: s.clone(),
                value: String::new(),
                reason: "expected name=value".into(),
            })?;
            cfg.set(k.trim(), v)?;
        }
        Ok(cfg)
    }

    pub fn set(&mut self, name: &str, value: &str) -> Result<(), ConfigError> {
        let def = lookup(name, Scope::Broker).ok_or_else(|| ConfigError::Unknown(name.into()))?;
        let v = validate(def, value)?;
        self.explicit.insert(name.to_string(), v);
        Ok(())
    }

    /// Replaces the dynamic layer from the metadata image's broker settings for `node_id`.
    pub fn set_dynamic(&self, node_id: i32, all: &BTreeMap<(Option<i32>, String), String>) {
        let mut layer = BTreeMap::new();
        for ((id, name), v) in all {
            match id {
                None => {
                    layer
                        .entry(name.clone())
                        .or_insert((v.clone(), source::DYNAMIC_DEFAULT_BROKER));
                }
                Some(id) if *id == node_id => {
                    layer.insert(name.clone(), (v.clone(), source::DYNAMIC_BROKER));
                }
                Some(_) => {}
            }
        }
        *self.dynamic.write() = layer;
    }

    /// The value of a broker setting and where it comes from.
    pub fn get_with_source(&self, name: &str) -> (String, i8) {
        if let Some(v) = self.dynamic.read().get(name) {
            return v.clone();
        }
        if let Some(v) = self.explicit.get(name) {
            return (v.clone(), source::STATIC_BROKER);
        }
        let d = lookup(name, Scope::Broker).map(|d| d.default).unwrap_or("");
        (d.to_string(), source::DEFAULT)
    }

    pub fn get(&self, name: &str) -> String {
        self.get_with_source(name).0
    }

    pub fn i64(&self, name: &str) -> i64 {
        self.get(name).parse().unwrap_or(0)
    }

    pub fn f64(&self, name: &str) -> f64 {
        self.get(name).parse().unwrap_or(0.0)
    }

    pub fn bool(&self, name: &str) -> bool {
        self.get(name) == "true"
    }

    /// A topic setting's effective value and source given the topic's overrides.
    pub fn topic_value(
        &self,
        overrides: &BTreeMap<String, String>,
        name: &str,
    ) -> Option<(String, i8)> {
        let def = lookup(name, Scope::Topic)?;
        if let Some(v) = overrides.get(name) {
            return Some((v.clone(), source::TOPIC));
        }
        match def.broker_synonym {
            Some(syn) => Some(self.get_with_source(syn)),
            None => Some((def.default.to_string(), source::DEFAULT)),
        }
    }

    pub fn topic_i64(&self, overrides: &BTreeMap<String, String>, name: &str) -> i64 {
        self.topic_value(overrides, name)
            .and_then(|(v, _)| v.parse().ok())
            .unwrap_or(0)
    }
}

/// Validates a dynamic broker setting: known, changeable at runtime, a valid value.
pub fn validate_dynamic_broker_config(name: &str, value: &str) -> Result<String, ConfigError> {
    let def = lookup(name, Scope::Broker).ok_or_else(|| ConfigError::Unknown(name.into()))?;
    if !DYNAMIC_BROKER_CONFIGS.contains(&name) {
        return Err(ConfigError::Invalid {
            name: name.into(),
            value: value.into(),
            reason: "cannot be changed at runtime (set it with --set or the config file)".into(),
        });
    }
    validate(def, value)
}

/// Validates topic-level configs from CreateTopics; returns them normalised.
pub fn validate_topic_configs(
    configs: &[(String, Option<String>)],
) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut out = BTreeMap::new();
    for (name, value) in configs {
        let def = lookup(name, Scope::Topic).ok_or_else(|| ConfigError::Unknown(name.clone()))?;
        let Some(value) = value else {
            return Err(ConfigError::Invalid {
                name: name.clone(),
                value: "null".into(),
                reason: "a value is required".into(),
            });
        };
        out.insert(name.clone(), validate(def, value)?);
    }
    Ok(out)
}

/// One change of IncrementalAlterConfigs (KIP-339).
#[derive(Debug, Clone)]
pub enum ConfigOp {
    Set(String),
    Delete,
    /// Adds items to a list setting (`cleanup.policy`).
    Append(String),
    /// Removes items from a list setting.
    Subtract(String),
}

impl ConfigOp {
    /// From the wire: operation code and value.
    pub fn from_wire(op: i8, value: Option<String>) -> Result<ConfigOp, String> {
        let need = |v: Option<String>| v.ok_or_else(|| "a value is required".to_string());
        Ok(match op {
            0 => ConfigOp::Set(need(value)?),
            1 => ConfigOp::Delete,
            2 => ConfigOp::Append(need(value)?),
            3 => ConfigOp::Subtract(need(value)?),
            other => return Err(format!("unknown config operation {other}")),
        })
    }
}

const LIST_CONFIGS: &[&str] = &["cleanup.policy"];

/// Applies IncrementalAlterConfigs operations to a topic's overrides; `effective` gives a
/// setting's current value (override or default) for APPEND and SUBTRACT. Returns the new
/// overrides, every value validated.
pub fn apply_topic_config_ops(
    current: &BTreeMap<String, String>,
    ops: &[(String, ConfigOp)],
    effective: impl Fn(&str) -> String,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut out = current.clone();
    for (name, op) in ops {
        let def = lookup(name, Scope::Topic).ok_or_else(|| ConfigError::Unknown(name.clone()))?;
        let list = |v: &str| -> Vec<String> {
            v.split(',')
                .map(|x| x.trim().to_string())
                .filter(|x| !x.is_empty())
                .collect()
        };
        let invalid = |reason: &str, value: &str| ConfigError::Invalid {
            name: name.clone(),
            value: value.to_string(),
            reason: reason.to_string(),
        };
        match op {
            ConfigOp::Set(v) => {
                out.insert(name.clone(), validate(def, v)?);
            }
            ConfigOp::Delete => {
                out.remove(name);
            }
            ConfigOp::Append(v) | ConfigOp::Subtract(v) => {
                if !LIST_CONFIGS.contains(&name.as_str()) {
                    return Err(invalid(
                        "APPEND and SUBTRACT apply only to list settings",
                        v,
                    ));
                }
                let base = out.get(name).cloned().unwrap_or_else(|| effective(name));
                let mut items = list(&base);
                for item in list(v) {
                    match op {
                        ConfigOp::Append(_) if !items.contains(&item) => items.push(item),
                        ConfigOp::Subtract(_) => items.retain(|x| *x != item),
                        _ => {}
                    }
                }
                if items.is_empty() {
                    return Err(invalid("the list would be empty", v));
                }
                out.insert(name.clone(), validate(def, &items.join(","))?);
            }
        }
    }
    Ok(out)
}

fn flatten(prefix: &str, v: &toml::Value, out: &mut Vec<(String, String)>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        toml::Value::String(s) => out.push((prefix.to_string(), s.clone())),
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

/// `strom server --help` text listing every broker setting.
pub fn help_text() -> String {
    let mut s = String::from("Broker settings (--set NAME=VALUE or in the --config TOML file):\n");
    for d in REGISTRY.iter().filter(|d| d.scope == Scope::Broker) {
        s.push_str(&format!(
            "  {} (default {}): {}\n",
            d.name, d.default, d.doc
        ));
    }
    s.push_str("\nTopic settings (CreateTopics configs):\n");
    for d in REGISTRY.iter().filter(|d| d.scope == Scope::Topic) {
        s.push_str(&format!(
            "  {} (default from {}): {}\n",
            d.name,
            d.broker_synonym.unwrap_or("-"),
            d.doc
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_and_set_overlay_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(
            &path,
            "num.partitions = 3\n[log.segment]\nbytes = 1048576\n",
        )
        .unwrap();
        let cfg =
            BrokerConfig::new(Some(&path), &["auto.create.topics.enable=false".into()]).unwrap();
        assert_eq!(cfg.i64("num.partitions"), 3);
        assert_eq!(cfg.i64("log.segment.bytes"), 1048576);
        assert!(!cfg.bool("auto.create.topics.enable"));
        assert_eq!(
            cfg.get_with_source("message.max.bytes"),
            ("1048588".into(), source::DEFAULT)
        );
        let o = BTreeMap::new();
        assert_eq!(
            cfg.topic_value(&o, "segment.bytes").unwrap(),
            ("1048576".into(), source::STATIC_BROKER)
        );
    }

    #[test]
    fn bad_values_are_refused_with_a_reason() {
        assert!(matches!(
            BrokerConfig::new(None, &["nope=1".into()]),
            Err(ConfigError::Unknown(_))
        ));
        assert!(matches!(
            BrokerConfig::new(None, &["num.partitions=0".into()]),
            Err(ConfigError::Invalid { .. })
        ));
        assert!(matches!(
            BrokerConfig::new(None, &["num.partitions=x".into()]),
            Err(ConfigError::Invalid { .. })
        ));
        assert!(
            validate_topic_configs(&[("message.timestamp.type".into(), Some("Foo".into()))])
                .is_err()
        );
        assert!(validate_topic_configs(&[("segment.bytes".into(), Some("1000".into()))]).is_ok());
    }
}
