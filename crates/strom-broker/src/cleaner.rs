//! The log cleaner: every `log.cleaner.backoff.ms` it looks at the partitions of compacted
//! topics (`cleanup.policy` includes `compact`) and cleans those whose dirty share of cleanable
//! bytes reached `min.cleanable.dirty.ratio`, or whose oldest uncleaned record is older than
//! `max.compaction.lag.ms`. The work (reading, mapping keys, rewriting) happens on a blocking
//! thread without the partition's lock; produce and fetch only wait for the short swap of each
//! cleaned segment. Memory is bounded by `log.cleaner.dedupe.buffer.size`, I/O by
//! `log.cleaner.io.max.bytes.per.second`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use strom_log::cleaner::{build_offset_map, clean_segment, CleanConfig, CleanStats, Throttle};

use crate::broker::Broker;
use crate::partition::Partition;

/// Bytes one key takes in the cleaner's map (hash, offset and the table's own overhead).
const MAP_ENTRY_BYTES: i64 = 48;

pub async fn run(broker: Arc<Broker>) {
    let backoff = broker.config.i64("log.cleaner.backoff.ms").max(1) as u64;
    loop {
        tokio::time::sleep(Duration::from_millis(backoff)).await;
        if !broker.config.bool("log.cleaner.enable") {
            continue;
        }
        let b = broker.clone();
        let _ = tokio::task::spawn_blocking(move || clean_round(&b)).await;
    }
}

/// One pass over every compacted partition that needs cleaning.
pub fn clean_round(broker: &Broker) {
    let image = broker.image();
    for p in broker.replicas.all() {
        let Some(topic) = image.topic(&p.topic) else {
            continue;
        };
        let o = &topic.configs;
        let policy = broker
            .config
            .topic_value(o, "cleanup.policy")
            .map(|(v, _)| v)
            .unwrap_or_default();
        if !policy.contains("compact") {
            continue;
        }
        let ratio: f64 = broker
            .config
            .topic_value(o, "min.cleanable.dirty.ratio")
            .and_then(|(v, _)| v.parse().ok())
            .unwrap_or(0.5);
        let cfg = CleanConfig {
            delete_retention_ms: broker.config.topic_i64(o, "delete.retention.ms"),
            min_compaction_lag_ms: broker.config.topic_i64(o, "min.compaction.lag.ms"),
            max_map_entries: (broker.config.i64("log.cleaner.dedupe.buffer.size") / MAP_ENTRY_BYTES)
                .max(1024) as usize,
            max_decompressed_bytes: broker.config.i64("strom.max.decompressed.bytes").max(1024)
                as usize,
            io_max_bytes_per_sec: broker.config.f64("log.cleaner.io.max.bytes.per.second"),
        };
        let max_lag = broker.config.topic_i64(o, "max.compaction.lag.ms");
        if let Err(e) = clean_partition(broker, &p, &cfg, ratio, max_lag) {
            tracing::warn!(topic = %p.topic, partition = p.index, error = %e, "cleaning failed");
        }
    }
}

fn clean_partition(
    broker: &Broker,
    p: &Arc<Partition>,
    cfg: &CleanConfig,
    min_ratio: f64,
    max_lag_ms: i64,
) -> Result<(), strom_log::LogError> {
    let now = broker.now_ms();
    let targets = p.clean_targets(now, cfg.min_compaction_lag_ms)?;
    let total: u64 = targets.iter().map(|t| t.size).sum();
    if total == 0 {
        return Ok(());
    }
    let cleaned_through = p.cleaned_through.load(Ordering::Acquire);
    let dirty: Vec<_> = targets
        .iter()
        .filter(|t| t.next_offset > cleaned_through)
        .collect();
    let dirty_bytes: u64 = dirty.iter().map(|t| t.size).sum();
    let overdue = dirty
        .iter()
        .any(|t| t.max_timestamp < now.saturating_sub(max_lag_ms));
    if dirty_bytes == 0 || (!overdue && (dirty_bytes as f64) < min_ratio * total as f64) {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let mut throttle = Throttle::new(cfg.io_max_bytes_per_sec);
    let (map, covered) = build_offset_map(&targets, cfg, &mut throttle)?;
    let mut stats = CleanStats::default();
    for t in &targets[..covered] {
        if let Some(path) = clean_segment(t, &map, now, cfg, &mut stats, &mut throttle)? {
            p.install_cleaned(t.base_offset, &path)?;
        }
        stats.segments += 1;
    }
    if let Some(last) = targets[..covered].last() {
        p.cleaned_through
            .fetch_max(last.next_offset, Ordering::AcqRel);
    }
    tracing::info!(
        topic = %p.topic,
        partition = p.index,
        segments = stats.segments,
        read_mb = stats.bytes_read as f64 / 1e6,
        written_mb = stats.bytes_written as f64 / 1e6,
        records_dropped = stats.records_dropped,
        keys = map.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "log cleaned"
    );
    Ok(())
}
