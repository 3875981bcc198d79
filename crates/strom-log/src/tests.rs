use super::*;
use std::os::unix::fs::FileExt;
use strom_proto::batch::validate_batch;
use strom_proto::compression::Compression;
use strom_proto::records::{encode_batch, NewRecord, ProducerInfo};

fn batch(n: usize, ts: i64, value_bytes: usize) -> Vec<u8> {
    batch_with(
        n,
        ts,
        value_bytes,
        Compression::None,
        ProducerInfo::default(),
    )
}

fn batch_with(
    n: usize,
    ts: i64,
    value_bytes: usize,
    codec: Compression,
    p: ProducerInfo,
) -> Vec<u8> {
    let recs: Vec<NewRecord> = (0..n)
        .map(|i| NewRecord {
            key: Some(format!("k{i}").into_bytes()),
            value: Some(vec![b'v'; value_bytes]),
            headers: vec![],
            timestamp: ts + i as i64,
        })
        .collect();
    encode_batch(&recs, codec, p).unwrap()
}

fn small_config() -> LogConfig {
    LogConfig {
        segment_bytes: 2000,
        index_interval_bytes: 300,
        ..LogConfig::default()
    }
}

fn offsets_of(data: &[u8]) -> Vec<(i64, i64)> {
    strom_proto::batch::BatchIter::new(data)
        .map(|b| {
            let (h, _) = b.unwrap();
            (h.base_offset, h.last_offset())
        })
        .collect()
}

#[test]
fn append_and_read_across_rolled_segments() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = Log::open(dir.path(), small_config(), true).unwrap();
    for i in 0..50 {
        let b = batch(3, 1000 + i * 10, 50);
        let out = log.append(&b, 7, 0).unwrap();
        assert_eq!(out.base_offset, i * 3);
        assert_eq!(out.last_offset, i * 3 + 2);
    }
    assert!(
        log.segments.len() > 3,
        "segments rolled: {}",
        log.segments.len()
    );
    assert_eq!(log.log_end_offset(), 150);
    // Everything, in order, contiguous.
    let all = log.read(0, usize::MAX, 150, true).unwrap();
    let offs = offsets_of(&all);
    assert_eq!(offs.len(), 50);
    for (i, (b, l)) in offs.iter().enumerate() {
        assert_eq!((*b, *l), (i as i64 * 3, i as i64 * 3 + 2));
    }
    // From the middle of a batch: that batch first.
    let mid = log.read(31, 1, 150, true).unwrap();
    assert_eq!(
        offsets_of(&mid),
        vec![(30, 32)],
        "KIP-74: one whole batch even over max_bytes"
    );
    assert!(log.read(31, 1, 150, false).unwrap().is_empty());
    // Upper bound (high watermark) respected.
    let hw = log.read(0, usize::MAX, 9, true).unwrap();
    assert_eq!(offsets_of(&hw).last().unwrap().1, 8);
    assert!(log.read(150, 100, 150, true).unwrap().is_empty());
    assert!(matches!(
        log.read(151, 100, 150, true),
        Err(LogError::OffsetOutOfRange { .. })
    ));
    // Leader epoch stamped.
    let h = BatchHeader::parse(&all).unwrap();
    assert_eq!(h.partition_leader_epoch, 7);
    validate_batch(&all[..h.total_len()]).unwrap();
}

#[test]
fn reopen_clean_and_unclean_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = Log::open(dir.path(), small_config(), true).unwrap();
    for i in 0..40 {
        log.append(&batch(2, i, 40), 0, 0).unwrap();
    }
    let before = log.read(0, usize::MAX, i64::MAX, true).unwrap();
    log.close().unwrap();
    assert!(dir.path().join("00000000000000000000.index").exists());
    let log = Log::open(dir.path(), small_config(), true).unwrap();
    assert_eq!(log.log_end_offset(), 80);
    assert_eq!(log.read(0, usize::MAX, i64::MAX, true).unwrap(), before);
    drop(log);
    let mut log = Log::open(dir.path(), small_config(), false).unwrap();
    assert_eq!(log.read(0, usize::MAX, i64::MAX, true).unwrap(), before);
    assert_eq!(log.append(&batch(1, 0, 1), 0, 0).unwrap().base_offset, 80);
}

#[test]
fn torn_and_corrupt_tails_are_truncated() {
    for damage in ["torn", "flip", "garbage-length"] {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), LogConfig::default(), true).unwrap();
        for i in 0..10 {
            log.append(&batch(2, i, 30), 0, 0).unwrap();
        }
        let path = dir.path().join("00000000000000000000.log");
        let len = std::fs::metadata(&path).unwrap().len();
        drop(log); // no clean close: simulates kill -9
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        match damage {
            "torn" => f.set_len(len - 5).unwrap(),
            "flip" => f.write_all_at(&[0xAB], len - 3).unwrap(),
            _ => f
                .write_all_at(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], len)
                .unwrap(),
        }
        drop(f);
        let mut log = Log::open(dir.path(), LogConfig::default(), false).unwrap();
        let expected_end = if damage == "garbage-length" { 20 } else { 18 };
        assert_eq!(log.log_end_offset(), expected_end, "{damage}");
        let out = log.append(&batch(1, 0, 1), 0, 0).unwrap();
        assert_eq!(
            out.base_offset, expected_end,
            "offsets continue with no gap ({damage})"
        );
        let all = log.read(0, usize::MAX, i64::MAX, true).unwrap();
        for b in strom_proto::batch::BatchIter::new(&all) {
            validate_batch(b.unwrap().1).unwrap();
        }
    }
}

#[test]
fn idempotent_producer_rules_survive_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let p = |seq| ProducerInfo {
        producer_id: 42,
        producer_epoch: 0,
        base_sequence: seq,
    };
    let mut log = Log::open(dir.path(), small_config(), true).unwrap();
    log.append(&batch(1, 0, 5), 0, 0).unwrap();
    let first = log
        .append(&batch_with(3, 0, 5, Compression::None, p(0)), 0, 0)
        .unwrap();
    assert_eq!(first.base_offset, 1);
    let dup = log
        .append(&batch_with(3, 0, 5, Compression::None, p(0)), 0, 0)
        .unwrap();
    assert!(dup.duplicate);
    assert_eq!((dup.base_offset, dup.last_offset), (1, 3));
    assert_eq!(log.log_end_offset(), 4, "a duplicate writes nothing");
    assert!(matches!(
        log.append(&batch_with(1, 0, 5, Compression::None, p(5)), 0, 0),
        Err(LogError::OutOfOrderSequence {
            expected: 3,
            got: 5,
            ..
        })
    ));
    log.append(&batch_with(2, 0, 5, Compression::None, p(3)), 0, 0)
        .unwrap();
    drop(log); // unclean: state is rebuilt from the log
    let mut log = Log::open(dir.path(), small_config(), false).unwrap();
    let dup = log
        .append(&batch_with(2, 0, 5, Compression::None, p(3)), 0, 0)
        .unwrap();
    assert!(dup.duplicate);
    assert_eq!(dup.base_offset, 4);
    log.close().unwrap();
    let mut log = Log::open(dir.path(), small_config(), true).unwrap();
    let dup = log
        .append(&batch_with(3, 0, 5, Compression::None, p(0)), 0, 0)
        .unwrap();
    assert!(dup.duplicate && dup.base_offset == 1);
    let stale = ProducerInfo {
        producer_id: 42,
        producer_epoch: 1,
        base_sequence: 0,
    };
    log.append(&batch_with(1, 0, 5, Compression::None, stale), 0, 0)
        .unwrap();
    assert!(matches!(
        log.append(&batch_with(1, 0, 5, Compression::None, p(5)), 0, 0),
        Err(LogError::InvalidProducerEpoch { .. })
    ));
}

#[test]
fn validation_refuses_bad_batches_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = Log::open(
        dir.path(),
        LogConfig {
            max_message_bytes: 500,
            ..LogConfig::default()
        },
        true,
    )
    .unwrap();
    let mut b = batch(2, 0, 10);
    let last = b.len() - 1;
    b[last] ^= 0x55;
    assert!(matches!(
        log.append(&b, 0, 0),
        Err(LogError::Batch(BatchError::CorruptCrc { .. }))
    ));
    assert!(matches!(
        log.append(&batch(10, 0, 100), 0, 0),
        Err(LogError::MessageTooLarge { .. })
    ));
    let mut two = batch(1, 0, 1);
    two.extend_from_slice(&batch(1, 0, 1));
    assert!(log.append(&two, 0, 0).is_err());
    assert_eq!(log.log_end_offset(), 0);
}

#[test]
fn log_append_time_and_timestamp_lookups() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = Log::open(dir.path(), small_config(), true).unwrap();
    for i in 0..30 {
        let b = batch_with(
            4,
            1000 + i * 100,
            20,
            Compression::Zstd,
            ProducerInfo::default(),
        );
        log.append(&b, 0, 0).unwrap();
    }
    // Batch i holds records with timestamps 1000+i*100 .. +3 at offsets 4i..4i+3.
    assert_eq!(log.offset_for_timestamp(0).unwrap(), Some((0, 1000)));
    assert_eq!(log.offset_for_timestamp(1502).unwrap(), Some((22, 1502)));
    assert_eq!(log.offset_for_timestamp(1504).unwrap(), Some((24, 1600)));
    assert_eq!(log.offset_for_timestamp(99_999).unwrap(), None);
    assert_eq!(log.max_timestamp_and_offset().unwrap(), Some((3903, 119)));

    let dir2 = tempfile::tempdir().unwrap();
    let mut lat = Log::open(
        dir2.path(),
        LogConfig {
            timestamp_type: TimestampType::LogAppendTime,
            ..LogConfig::default()
        },
        true,
    )
    .unwrap();
    let out = lat.append(&batch(2, 5, 1), 0, 777).unwrap();
    assert_eq!(out.log_append_time_ms, 777);
    let data = lat.read(0, usize::MAX, i64::MAX, true).unwrap();
    let h = validate_batch(&data).unwrap();
    assert!(h.is_log_append_time());
    assert_eq!(h.max_timestamp, 777);
}

#[test]
fn append_stores_the_callers_batch_untouched_with_the_header_fields_it_assigns() {
    for timestamp_type in [TimestampType::CreateTime, TimestampType::LogAppendTime] {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            timestamp_type,
            ..LogConfig::default()
        };
        let mut log = Log::open(dir.path(), config, true).unwrap();
        log.append(&batch(4, 10, 8), 3, 900).unwrap();
        let b = batch(5, 20, 300);
        let sent = b.clone();
        let out = log.append(&b, 9, 1000).unwrap();
        assert_eq!(b, sent, "append changed the caller's bytes");
        assert_eq!(out.base_offset, 4);
        let data = log.read(4, usize::MAX, i64::MAX, true).unwrap();
        assert_eq!(data.len(), sent.len());
        let h = validate_batch(&data).unwrap();
        assert_eq!((h.base_offset, h.partition_leader_epoch), (4, 9));
        assert_eq!(
            h.is_log_append_time(),
            timestamp_type == TimestampType::LogAppendTime
        );
        // Past the header: the producer's bytes as they came.
        assert_eq!(data[BATCH_HEADER_LEN..], sent[BATCH_HEADER_LEN..]);
    }
}

#[test]
fn a_batch_written_in_parts_is_their_concatenation() {
    let dir = tempfile::tempdir().unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("f"))
        .unwrap();
    let a: Vec<u8> = (0..70_000u32).map(|i| i as u8).collect();
    let b = vec![7u8; 3];
    // More parts than one call takes, empty ones among them.
    let mut parts: Vec<&[u8]> = vec![&[], &a, &[], &b, &a[..10]];
    for i in 0..12 {
        parts.push(&a[i * 100..i * 100 + 7]);
    }
    segment::write_all_vectored_at(&file, &parts, 5).unwrap();
    let want = parts.concat();
    let mut got = vec![0u8; 5 + want.len()];
    file.read_exact_at(&mut got, 0).unwrap();
    assert_eq!(got[5..], want);
}

#[test]
fn flush_bookkeeping() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = Log::open(dir.path(), small_config(), true).unwrap();
    assert!(log.flush_target().unwrap().is_none());
    for i in 0..20 {
        log.append(&batch(1, i, 100), 0, 0).unwrap();
    }
    let t = log.flush_target().unwrap().unwrap();
    assert_eq!(t.end_offset, 20);
    assert!(!t.files.is_empty());
    t.sync().unwrap();
    assert!(log.mark_flushed(&t));
    assert_eq!(log.flushed_offset(), 20);
    assert_eq!(log.unflushed_messages(), 0);
    assert!(log.flush_target().unwrap().is_none());
}

/// An fsync that a truncation overtook marks nothing: the range past the cut was written again
/// after the fsync began.
#[test]
fn a_flush_overtaken_by_a_truncation_marks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = Log::open(dir.path(), LogConfig::default(), true).unwrap();
    for i in 0..20 {
        log.append(&batch(1, i, 100), 0, 0).unwrap();
    }
    let t = log.flush_target().unwrap().unwrap();
    log.truncate_to(5).unwrap();
    for i in 0..15 {
        log.append(&batch(1, i, 100), 1, 0).unwrap();
    }
    t.sync().unwrap();
    assert!(!log.mark_flushed(&t));
    assert_eq!(log.flushed_offset(), 0);
    assert_eq!(log.unflushed_messages(), 20);
    // The next target covers the rewritten range.
    let again = log.flush_target().unwrap().unwrap();
    assert_eq!(again.end_offset, 20);
    again.sync().unwrap();
    assert!(log.mark_flushed(&again));
    assert_eq!(log.flushed_offset(), 20);
}

/// The bytes `read_files` points at, read back.
fn gather(out: &ReadOut) -> Vec<u8> {
    match out {
        ReadOut::Copied(b) => b.clone(),
        ReadOut::Files(parts) => parts
            .iter()
            .flat_map(|p| p.read().unwrap().to_vec())
            .collect(),
    }
}

#[test]
fn file_reads_point_at_exactly_the_bytes_a_read_returns() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = Log::open(dir.path(), small_config(), true).unwrap();
    for i in 0..60 {
        log.append(&batch(2, i, 40), 0, 0).unwrap();
    }
    assert!(log.segments.len() > 3);
    for (offset, max_bytes, upper, min_one) in [
        (0, usize::MAX, i64::MAX, true),
        (7, 1500, i64::MAX, true),
        (30, 5000, 90, true),
        (33, 10, i64::MAX, true),
        (33, 10, i64::MAX, false),
        (120, usize::MAX, i64::MAX, true),
    ] {
        let copied = log.read(offset, max_bytes, upper, min_one).unwrap();
        let files = log
            .read_files(offset, max_bytes, upper, min_one, 0)
            .unwrap();
        assert_eq!(
            gather(&files),
            copied,
            "read({offset}, {max_bytes}, {upper})"
        );
        assert_eq!(files.len(), copied.len() as u64);
        if let ReadOut::Files(parts) = &files {
            // One range per segment touched, none empty.
            assert!(parts.iter().all(|p| p.len > 0 && p.unchanged()));
        }
    }
    // A read spanning segments is one range per segment.
    let ReadOut::Files(parts) = log.read_files(0, usize::MAX, i64::MAX, true, 0).unwrap() else {
        panic!("copy_below 0 always answers with files")
    };
    assert_eq!(parts.len(), log.segments.len());
    // Shorter than copy_below: the bytes themselves.
    let small = log.read_files(0, 300, i64::MAX, true, 4096).unwrap();
    assert!(
        matches!(small, ReadOut::Copied(ref b) if *b == log.read(0, 300, i64::MAX, true).unwrap())
    );
    assert!(matches!(
        log.read_files(121, 10, i64::MAX, true, 0),
        Err(LogError::OffsetOutOfRange { .. })
    ));
}

#[test]
fn a_truncation_invalidates_file_reads_handed_out_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = Log::open(dir.path(), small_config(), true).unwrap();
    for i in 0..10 {
        log.append(&batch(2, i, 40), 0, 0).unwrap();
    }
    let files = |log: &Log, offset: i64| match log
        .read_files(offset, usize::MAX, i64::MAX, true, 0)
        .unwrap()
    {
        ReadOut::Files(parts) => parts,
        ReadOut::Copied(_) => panic!("copy_below 0 always answers with files"),
    };
    let before = files(&log, 10);
    // Appends and rolls leave earlier ranges valid: their bytes do not change.
    for i in 0..30 {
        log.append(&batch(2, i, 40), 0, 0).unwrap();
    }
    assert!(before.iter().all(FilePart::unchanged));
    assert!(log.segments.len() > 2);
    // A cut in the last segment leaves ranges of the earlier ones valid.
    let last_base = log.segments.last().unwrap().base_offset;
    let everything = files(&log, 0);
    log.truncate_to(last_base + 2).unwrap();
    let (valid, stale): (Vec<_>, Vec<_>) = everything.iter().partition(|p| p.unchanged());
    assert_eq!(stale.len(), 1, "only the cut segment's range is stale");
    assert_eq!(valid.len(), everything.len() - 1);
    assert!(before.iter().all(FilePart::unchanged));
    // The tail is cut and rewritten at the same positions: the old ranges now hold other
    // bytes, and say so.
    log.truncate_to(12).unwrap();
    log.append(&batch(5, 99, 7), 0, 0).unwrap();
    assert!(before.iter().all(|p| !p.unchanged()));
    assert!(before[0].read().is_err());
    let after = files(&log, 10);
    assert!(after.iter().all(FilePart::unchanged));
    assert_eq!(
        gather(&ReadOut::Files(after)),
        log.read(10, usize::MAX, i64::MAX, true).unwrap()
    );
}

#[test]
fn truncate_to_drops_the_tail() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = Log::open(dir.path(), small_config(), true).unwrap();
    for i in 0..40 {
        log.append(&batch(2, i, 40), 0, 0).unwrap();
    }
    log.truncate_to(31).unwrap();
    assert_eq!(
        log.log_end_offset(),
        30,
        "truncation is at batch boundaries"
    );
    assert_eq!(log.append(&batch(1, 0, 1), 0, 0).unwrap().base_offset, 30);
}

#[test]
fn write_error_leaves_the_log_readable() {
    // A read-only segment file makes the write fail like a full disk would.
    let dir = tempfile::tempdir().unwrap();
    let mut log = Log::open(dir.path(), LogConfig::default(), true).unwrap();
    log.append(&batch(2, 0, 10), 0, 0).unwrap();
    let ro = std::fs::File::open(dir.path().join("00000000000000000000.log")).unwrap();
    let good = std::mem::replace(&mut log.active().file, std::sync::Arc::new(ro));
    let err = log.append(&batch(2, 0, 10), 0, 0).unwrap_err();
    assert!(matches!(err, LogError::Io(_) | LogError::Failed), "{err}");
    assert_eq!(log.log_end_offset(), 2);
    log.active().file = good;
    assert_eq!(
        offsets_of(&log.read(0, usize::MAX, i64::MAX, true).unwrap()),
        vec![(0, 1)]
    );
}

#[test]
fn retention_by_bytes_deletes_the_oldest_whole_segments_only() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LogConfig {
        retention_ms: -1,
        retention_bytes: 5000,
        ..small_config()
    };
    let mut log = Log::open(dir.path(), cfg, true).unwrap();
    for i in 0..60 {
        log.append(&batch(3, 1000 + i, 50), 0, 0).unwrap();
    }
    let before: u64 = log.size_bytes();
    let segments_before = log.segments.len();
    assert!(before > 5000);
    let deleted = log.apply_retention(0).unwrap();
    assert!(deleted > 0);
    assert_eq!(log.segments.len(), segments_before - deleted);
    // Kafka's rule: a segment goes only if the log is still at least retention.bytes without
    // it, so the log ends between retention.bytes and that plus its oldest segment.
    let after = log.size_bytes();
    assert!(after >= 5000, "{after}");
    assert!(after - log.segments[0].size < 5000, "{after}");
    let start = log.log_start_offset();
    assert_eq!(start, log.segments[0].base_offset);
    assert!(matches!(
        log.read(start - 1, 1 << 20, i64::MAX, true),
        Err(LogError::OffsetOutOfRange { .. })
    ));
    assert!(!log.read(start, 1 << 20, i64::MAX, true).unwrap().is_empty());
    // Survives a reopen; the next append continues the offsets.
    let leo = log.log_end_offset();
    log.close().unwrap();
    let mut log = Log::open(dir.path(), small_config(), true).unwrap();
    assert_eq!(log.log_start_offset(), start);
    assert_eq!(log.append(&batch(1, 5, 5), 0, 0).unwrap().base_offset, leo);
}

#[test]
fn retention_by_time_keeps_recent_segments_and_the_active_one() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LogConfig {
        retention_ms: 10_000,
        ..small_config()
    };
    let mut log = Log::open(dir.path(), cfg, true).unwrap();
    // Old records (timestamps around 1000), then recent ones (around 100_000).
    for i in 0..30 {
        log.append(&batch(3, 1000 + i, 50), 0, 0).unwrap();
    }
    let old_end = log.log_end_offset();
    for i in 0..30 {
        log.append(&batch(3, 100_000 + i, 50), 0, 0).unwrap();
    }
    log.apply_retention(105_000).unwrap();
    let start = log.log_start_offset();
    assert!(start > 0 && start <= old_end, "{start} {old_end}");
    // Far in the future everything but the active segment goes.
    log.apply_retention(10_000_000).unwrap();
    assert_eq!(log.segments.len(), 1);
    assert_eq!(log.log_start_offset(), log.segments[0].base_offset);
    // With delete retention off (cleanup.policy=compact) nothing is deleted by time.
    let dir2 = tempfile::tempdir().unwrap();
    let mut log2 = Log::open(
        dir2.path(),
        LogConfig {
            retention_ms: 1,
            delete_retention: false,
            ..small_config()
        },
        true,
    )
    .unwrap();
    for i in 0..30 {
        log2.append(&batch(3, 1000 + i, 50), 0, 0).unwrap();
    }
    assert_eq!(log2.apply_retention(10_000_000).unwrap(), 0);
}

#[test]
fn delete_records_moves_the_start_inside_a_segment_durably() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = Log::open(dir.path(), small_config(), true).unwrap();
    for i in 0..40 {
        log.append(&batch(3, 1000 + i, 50), 0, 0).unwrap();
    }
    let leo = log.log_end_offset();
    assert!(matches!(
        log.delete_records_before(leo + 1, leo),
        Err(LogError::OffsetOutOfRange { .. })
    ));
    let segs = log.segments.len();
    let target = log.segments[2].base_offset + 1;
    assert_eq!(log.delete_records_before(target, leo).unwrap(), target);
    assert_eq!(log.segments.len(), segs - 2, "whole segments below it went");
    assert!(log.read(target - 1, 1 << 20, leo, true).is_err());
    log.close().unwrap();
    let log = Log::open(dir.path(), small_config(), false).unwrap();
    assert_eq!(log.log_start_offset(), target, "kept across a restart");
}

#[test]
fn create_time_batches_outside_the_allowed_range_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LogConfig {
        timestamp_before_max_ms: 1000,
        timestamp_after_max_ms: 500,
        ..small_config()
    };
    let mut log = Log::open(dir.path(), cfg, true).unwrap();
    let now = 1_000_000;
    assert!(matches!(
        log.append(&batch(2, now - 1001, 10), 0, now),
        Err(LogError::InvalidTimestamp { .. })
    ));
    assert!(matches!(
        log.append(&batch(2, now + 500, 10), 0, now),
        Err(LogError::InvalidTimestamp { .. })
    ));
    assert_eq!(log.log_end_offset(), 0, "nothing stored");
    log.append(&batch(2, now - 1000, 10), 0, now).unwrap();
    log.append(&batch(2, now + 498, 10), 0, now).unwrap();
    assert_eq!(log.log_end_offset(), 4);
}

mod compaction {
    use super::*;
    use crate::cleaner::{build_offset_map, clean_segment, CleanConfig, CleanStats, Throttle};
    use strom_proto::records::decode_records;

    fn keyed(keys_values: &[(String, Option<String>)], ts: i64) -> Vec<u8> {
        let recs: Vec<NewRecord> = keys_values
            .iter()
            .map(|(k, v)| NewRecord {
                key: Some(k.clone().into_bytes()),
                value: v.clone().map(|v| v.into_bytes()),
                headers: vec![],
                timestamp: ts,
            })
            .collect();
        encode_batch(&recs, Compression::Lz4, ProducerInfo::default()).unwrap()
    }

    fn cfg() -> CleanConfig {
        CleanConfig {
            delete_retention_ms: 1_000,
            min_compaction_lag_ms: 0,
            max_map_entries: 1 << 20,
            max_decompressed_bytes: 64 << 20,
            io_max_bytes_per_sec: f64::MAX,
        }
    }

    /// Runs one whole clean as the broker's cleaner does.
    fn clean(log: &mut Log, now: i64, cfg: &CleanConfig) -> CleanStats {
        let targets = log.clean_targets(now, cfg.min_compaction_lag_ms);
        let mut throttle = Throttle::new(cfg.io_max_bytes_per_sec);
        let (map, covered) = build_offset_map(&targets, cfg, &mut throttle).unwrap();
        let mut stats = CleanStats::default();
        for t in &targets[..covered] {
            if let Some(path) = clean_segment(t, &map, now, cfg, &mut stats, &mut throttle).unwrap()
            {
                assert!(log.install_cleaned(t.base_offset, &path).unwrap());
            }
            stats.segments += 1;
        }
        stats
    }

    fn all_records(log: &Log) -> Vec<strom_proto::records::RecordView> {
        let data = log
            .read(log.log_start_offset(), 1 << 30, i64::MAX, true)
            .unwrap();
        strom_proto::batch::BatchIter::new(&data)
            .flat_map(|b| {
                let (h, bytes) = b.unwrap();
                decode_records(&h, bytes, 64 << 20).unwrap()
            })
            .collect()
    }

    #[test]
    fn one_record_per_key_the_latest_with_offsets_kept() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            segment_bytes: 64 << 10,
            segment_ms: 10_000,
            ..LogConfig::default()
        };
        let mut log = Log::open(dir.path(), config.clone(), true).unwrap();
        // 100k updates over 1000 keys, in batches of 100.
        let mut latest = std::collections::HashMap::new();
        let mut n = 0u64;
        for round in 0..1000 {
            let kv: Vec<(String, Option<String>)> = (0..100)
                .map(|i| {
                    let k = format!("key-{}", (round * 37 + i * 13) % 1000);
                    let v = format!("v{n}");
                    n += 1;
                    (k, Some(v))
                })
                .collect();
            let base = log.log_end_offset();
            for (j, (k, v)) in kv.iter().enumerate() {
                latest.insert(k.clone(), (base + j as i64, v.clone().unwrap()));
            }
            log.append(&keyed(&kv, 0), 0, 0).unwrap();
        }
        // A record with another key after a roll: every update is in a cleanable segment.
        log.append(
            &keyed(&[("sentinel".into(), Some("s".into()))], 100_000),
            0,
            100_000,
        )
        .unwrap();
        let leo = log.log_end_offset();
        let stats = clean(&mut log, 100_000, &cfg());
        assert!(stats.records_dropped >= 99_000, "{stats:?}");
        let recs = all_records(&log);
        let updates: Vec<_> = recs
            .iter()
            .filter(|r| r.key.as_deref() != Some(b"sentinel"))
            .collect();
        assert_eq!(updates.len(), 1000, "exactly one record per key");
        for r in &updates {
            let k = String::from_utf8(r.key.clone().unwrap()).unwrap();
            let (off, v) = &latest[&k];
            assert_eq!(r.offset, *off, "{k} keeps its offset");
            assert_eq!(
                r.value.as_deref(),
                Some(v.as_bytes()),
                "{k} keeps its latest value"
            );
        }
        assert_eq!(
            log.log_end_offset(),
            leo,
            "offsets continue where they were"
        );
        // Reopening (indexes rebuilt from the cleaned files) reads the same.
        drop(log);
        let log = Log::open(dir.path(), config, false).unwrap();
        assert_eq!(all_records(&log).len(), recs.len());
        assert_eq!(log.log_end_offset(), leo);
        // A second clean finds nothing to drop.
        let mut log = log;
        assert_eq!(clean(&mut log, 100_000, &cfg()).records_dropped, 0);
    }

    #[test]
    fn tombstones_go_after_delete_retention_and_not_before() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            segment_ms: 10_000,
            ..LogConfig::default()
        };
        let mut log = Log::open(dir.path(), config, true).unwrap();
        log.append(
            &keyed(
                &[
                    ("a".into(), Some("1".into())),
                    ("b".into(), Some("2".into())),
                ],
                0,
            ),
            0,
            0,
        )
        .unwrap();
        log.append(&keyed(&[("a".into(), None)], 50_000), 0, 0)
            .unwrap();
        log.append(
            &keyed(&[("z".into(), Some("z".into()))], 100_000),
            0,
            100_000,
        )
        .unwrap();
        // Within delete.retention.ms of the tombstone: it stays, the value it deletes goes.
        clean(&mut log, 50_500, &cfg());
        let keys: Vec<(Vec<u8>, bool)> = all_records(&log)
            .iter()
            .map(|r| (r.key.clone().unwrap(), r.value.is_none()))
            .collect();
        assert_eq!(
            keys,
            vec![
                (b"b".to_vec(), false),
                (b"a".to_vec(), true),
                (b"z".to_vec(), false)
            ]
        );
        // Later: the tombstone itself goes.
        clean(&mut log, 60_000, &cfg());
        let keys: Vec<Vec<u8>> = all_records(&log)
            .iter()
            .map(|r| r.key.clone().unwrap())
            .collect();
        assert_eq!(keys, vec![b"b".to_vec(), b"z".to_vec()]);
    }

    #[test]
    fn a_crash_mid_clean_leaves_a_complete_log() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            segment_bytes: 4096,
            ..LogConfig::default()
        };
        let mut log = Log::open(dir.path(), config.clone(), true).unwrap();
        for i in 0..200 {
            log.append(
                &keyed(&[(format!("k{}", i % 10), Some(format!("{i}")))], 0),
                0,
                0,
            )
            .unwrap();
        }
        let leo = log.log_end_offset();
        let before = all_records(&log).len();
        // The cleaner wrote its files, then the process died before installing them.
        let targets = log.clean_targets(0, 0);
        let mut throttle = Throttle::new(f64::MAX);
        let (map, _) = build_offset_map(&targets, &cfg(), &mut throttle).unwrap();
        let mut stats = CleanStats::default();
        let written = clean_segment(&targets[0], &map, 0, &cfg(), &mut stats, &mut throttle)
            .unwrap()
            .unwrap();
        assert!(written.exists());
        drop(log);
        let log = Log::open(dir.path(), config.clone(), false).unwrap();
        assert!(!written.exists(), "leftover removed");
        assert_eq!(all_records(&log).len(), before, "the old segment is intact");
        // A crash after the rename but before the index was rebuilt: indexes are rebuilt.
        let mut log = log;
        clean(&mut log, 0, &cfg());
        let after = all_records(&log).len();
        for f in std::fs::read_dir(dir.path()).unwrap().flatten() {
            let name = f.file_name().to_string_lossy().to_string();
            if name.ends_with(".index") || name.ends_with(".timeindex") {
                std::fs::remove_file(f.path()).unwrap();
            }
        }
        drop(log);
        let log = Log::open(dir.path(), config, false).unwrap();
        assert_eq!(all_records(&log).len(), after);
        assert_eq!(log.log_end_offset(), leo);
    }
}

mod replication;
