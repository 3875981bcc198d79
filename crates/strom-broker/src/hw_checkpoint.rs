//! `replication-offset-checkpoint` in the data directory: the high watermark of every hosted
//! partition, in Kafka's format (a version line `0`, a count line, then one
//! `topic partition offset` line per partition), replaced atomically every
//! `replica.high.watermark.checkpoint.interval.ms` and at clean shutdown.
//!
//! In a replicated cluster a replica starts from it: its high watermark after a restart is the
//! checkpointed one (or its log start without one), never its log end, which may hold records
//! that were written but never committed (e.g. while the ISR was below min.insync.replicas).
//! The leader's high watermark then moves on as the ISR fetches, a follower's with its
//! leader's. A one-node cluster has no use for it: everything durable there is committed.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::broker::Broker;
use crate::partition::Partition;

pub const FILE: &str = "replication-offset-checkpoint";

pub type Checkpoint = HashMap<(String, i32), i64>;

pub fn encode(entries: &[(String, i32, i64)]) -> String {
    let mut out = format!("0\n{}\n", entries.len());
    for (topic, partition, hw) in entries {
        out.push_str(&format!("{topic} {partition} {hw}\n"));
    }
    out
}

/// `None` for anything that is not a complete version-0 checkpoint.
pub fn decode(text: &str) -> Option<Checkpoint> {
    let mut lines = text.lines();
    if lines.next()? != "0" {
        return None;
    }
    let count: usize = lines.next()?.parse().ok()?;
    let mut out = HashMap::new();
    for _ in 0..count {
        let mut fields = lines.next()?.split(' ');
        let topic = fields.next()?.to_string();
        let partition: i32 = fields.next()?.parse().ok()?;
        let hw: i64 = fields.next()?.parse().ok()?;
        if fields.next().is_some() || topic.is_empty() {
            return None;
        }
        out.insert((topic, partition), hw);
    }
    lines.next().is_none().then_some(out)
}

/// The checkpoint in `dir`; empty when there is none or it cannot be read (replicas then
/// start from their log start, which is safe, only slower to serve).
pub fn read(dir: &Path) -> Checkpoint {
    match std::fs::read_to_string(dir.join(FILE)) {
        Ok(text) => decode(&text).unwrap_or_else(|| {
            tracing::warn!(
                file = FILE,
                "damaged high watermark checkpoint ignored; replicas start from their log start"
            );
            HashMap::new()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
        Err(e) => {
            tracing::warn!(file = FILE, error = %e, "cannot read the high watermark checkpoint");
            HashMap::new()
        }
    }
}

/// (topic, partition, high watermark) of `parts`, sorted.
pub fn entries(parts: &[Arc<Partition>]) -> Vec<(String, i32, i64)> {
    let mut entries: Vec<(String, i32, i64)> = parts
        .iter()
        .map(|p| (p.topic.clone(), p.index, p.high_watermark()))
        .collect();
    entries.sort();
    entries
}

pub fn write(dir: &Path, entries: &[(String, i32, i64)]) -> std::io::Result<()> {
    strom_log::replace_file(dir, FILE, encode(entries).as_bytes())
}

/// Writes the checkpoint every `replica.high.watermark.checkpoint.interval.ms` while the
/// broker runs (only when something changed).
pub async fn run(broker: Arc<Broker>) {
    let every = broker
        .config
        .i64("replica.high.watermark.checkpoint.interval.ms")
        .max(1) as u64;
    let mut tick = tokio::time::interval(Duration::from_millis(every));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shutdown = broker.shutdown_signal();
    let mut last: Option<Vec<(String, i32, i64)>> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let now = entries(&broker.replicas.all());
        if last.as_ref() == Some(&now) {
            continue;
        }
        let dir = broker.replicas.data_dir().to_path_buf();
        let result = tokio::task::spawn_blocking(move || write(&dir, &now).map(|()| now)).await;
        match result {
            Ok(Ok(now)) => last = Some(now),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "writing the high watermark checkpoint failed")
            }
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let entries = vec![("a".to_string(), 0, 5), ("b.c-d".to_string(), 12, 0)];
        let text = encode(&entries);
        assert_eq!(text, "0\n2\na 0 5\nb.c-d 12 0\n");
        let back = decode(&text).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[&("a".to_string(), 0)], 5);
        assert_eq!(back[&("b.c-d".to_string(), 12)], 0);
        for bad in [
            "",
            "1\n0\n",
            "0\n2\na 0 5\n",
            "0\n1\na 0\n",
            "0\n1\na x 5\n",
            "0\n1\na 0 5 6\n",
            "0\n1\na 0 5\nextra\n",
        ] {
            assert!(decode(bad).is_none(), "{bad:?} accepted");
        }
        let dir = tempfile::tempdir().unwrap();
        assert!(read(dir.path()).is_empty());
        std::fs::write(dir.path().join(FILE), "garbage").unwrap();
        assert!(read(dir.path()).is_empty());
        strom_log::replace_file(dir.path(), FILE, text.as_bytes()).unwrap();
        assert_eq!(read(dir.path()), back);
    }
}
