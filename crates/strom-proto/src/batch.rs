//! The v2 record batch as bytes. The broker reads the 61-byte header and patches base offset,
//! partition leader epoch and (for LogAppendTime) max timestamp + CRC in place; records are
//! never decoded and re-encoded to be stored or served.

use crate::compression::{Compression, CompressionError};

pub const BATCH_HEADER_LEN: usize = 61;
/// baseOffset (8) + batchLength (4): the bytes not counted by batchLength.
pub const LOG_OVERHEAD: usize = 12;
pub const MAGIC_V2: i8 = 2;
/// Smallest legal batchLength: the header after the length field.
const MIN_BATCH_LENGTH: i32 = (BATCH_HEADER_LEN - LOG_OVERHEAD) as i32;

const ATTR_TIMESTAMP_TYPE: i16 = 0x08;
const ATTR_TRANSACTIONAL: i16 = 0x10;
const ATTR_CONTROL: i16 = 0x20;
const CRC_START: usize = 21;

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("record batch is truncated")]
    Truncated,
    #[error("record batch length {0} is invalid")]
    InvalidLength(i32),
    #[error("record batch magic {0} is not supported (only v2)")]
    UnsupportedMagic(i8),
    #[error("record batch CRC mismatch: header says {expected:#010x}, data gives {actual:#010x}")]
    CorruptCrc { expected: u32, actual: u32 },
    #[error("record batch record count does not match its offsets")]
    InvalidRecordCount,
    #[error(transparent)]
    Compression(#[from] CompressionError),
    #[error("invalid record: {0}")]
    InvalidRecord(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub base_offset: i64,
    pub batch_length: i32,
    pub partition_leader_epoch: i32,
    pub magic: i8,
    pub crc: u32,
    pub attributes: i16,
    pub last_offset_delta: i32,
    pub base_timestamp: i64,
    pub max_timestamp: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub records_count: i32,
}

fn i16_at(b: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([b[at], b[at + 1]])
}
fn i32_at(b: &[u8], at: usize) -> i32 {
    i32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn i64_at(b: &[u8], at: usize) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    i64::from_be_bytes(a)
}

impl BatchHeader {
    /// Reads the header fields; needs at least 61 bytes and checks nothing else.
    pub fn parse(buf: &[u8]) -> Result<BatchHeader, BatchError> {
        if buf.len() < BATCH_HEADER_LEN {
            return Err(BatchError::Truncated);
        }
        Ok(BatchHeader {
            base_offset: i64_at(buf, 0),
            batch_length: i32_at(buf, 8),
            partition_leader_epoch: i32_at(buf, 12),
            magic: buf[16] as i8,
            crc: i32_at(buf, 17) as u32,
            attributes: i16_at(buf, 21),
            last_offset_delta: i32_at(buf, 23),
            base_timestamp: i64_at(buf, 27),
            max_timestamp: i64_at(buf, 35),
            producer_id: i64_at(buf, 43),
            producer_epoch: i16_at(buf, 51),
            base_sequence: i32_at(buf, 53),
            records_count: i32_at(buf, 57),
        })
    }

    pub fn total_len(&self) -> usize {
        self.batch_length.max(0) as usize + LOG_OVERHEAD
    }
    pub fn last_offset(&self) -> i64 {
        self.base_offset + self.last_offset_delta as i64
    }
    pub fn compression(&self) -> Result<Compression, CompressionError> {
        Compression::from_attributes(self.attributes)
    }
    pub fn is_transactional(&self) -> bool {
        self.attributes & ATTR_TRANSACTIONAL != 0
    }
    pub fn is_control(&self) -> bool {
        self.attributes & ATTR_CONTROL != 0
    }
    pub fn is_log_append_time(&self) -> bool {
        self.attributes & ATTR_TIMESTAMP_TYPE != 0
    }
    pub fn is_idempotent(&self) -> bool {
        self.producer_id >= 0
    }
    /// Sequence of the last record, wrapping past i32::MAX to 0 as Kafka does.
    pub fn last_sequence(&self) -> i32 {
        increment_sequence(self.base_sequence, self.last_offset_delta)
    }
}

/// Kafka's `DefaultRecordBatch.incrementSequence`.
pub fn increment_sequence(seq: i32, by: i32) -> i32 {
    if seq > i32::MAX - by {
        by - (i32::MAX - seq) - 1
    } else {
        seq + by
    }
}

pub fn set_base_offset(batch: &mut [u8], base_offset: i64) {
    batch[0..8].copy_from_slice(&base_offset.to_be_bytes());
}

pub fn set_partition_leader_epoch(batch: &mut [u8], epoch: i32) {
    batch[12..16].copy_from_slice(&epoch.to_be_bytes());
}

/// Stamps the batch with the broker's time: attribute bit 3, max timestamp, new CRC.
pub fn set_log_append_time(batch: &mut [u8], ts_ms: i64) {
    let attrs = i16_at(batch, 21) | ATTR_TIMESTAMP_TYPE;
    batch[21..23].copy_from_slice(&attrs.to_be_bytes());
    batch[35..43].copy_from_slice(&ts_ms.to_be_bytes());
    let crc = compute_crc(batch);
    batch[17..21].copy_from_slice(&crc.to_be_bytes());
}

/// `set_log_append_time` on a copy of the batch's header (`head`, its first 61 bytes) with the
/// rest of the batch (`rest`) left where it is: the CRC is computed over the patched header
/// fields and then `rest`, so the records need not be copied to be stamped.
pub fn set_log_append_time_split(head: &mut [u8; BATCH_HEADER_LEN], rest: &[u8], ts_ms: i64) {
    let attrs = i16_at(head, 21) | ATTR_TIMESTAMP_TYPE;
    head[21..23].copy_from_slice(&attrs.to_be_bytes());
    head[35..43].copy_from_slice(&ts_ms.to_be_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&head[CRC_START..]), rest);
    head[17..21].copy_from_slice(&crc.to_be_bytes());
}

/// CRC-32C of everything after the crc field.
pub fn compute_crc(batch: &[u8]) -> u32 {
    crc32c::crc32c(&batch[CRC_START..])
}

/// Checks one complete batch (`batch.len()` must equal its total length) as received from a
/// producer or read back in recovery.
pub fn validate_batch(batch: &[u8]) -> Result<BatchHeader, BatchError> {
    let h = BatchHeader::parse(batch)?;
    if h.batch_length < MIN_BATCH_LENGTH {
        return Err(BatchError::InvalidLength(h.batch_length));
    }
    if h.total_len() != batch.len() {
        return Err(BatchError::InvalidLength(h.batch_length));
    }
    if h.magic != MAGIC_V2 {
        return Err(BatchError::UnsupportedMagic(h.magic));
    }
    let actual = compute_crc(batch);
    if actual != h.crc {
        return Err(BatchError::CorruptCrc {
            expected: h.crc,
            actual,
        });
    }
    if h.records_count < 0 || h.last_offset_delta < 0 {
        return Err(BatchError::InvalidRecordCount);
    }
    h.compression()?;
    Ok(h)
}

/// The same batch with its records compressed with `codec` instead (topic `compression.type`):
/// the records themselves (offset deltas, timestamps, keys, values, headers) and every header
/// field but the compression bits, the length and the CRC stay as they were. Decompression is
/// bounded by `max_decompressed_bytes`.
pub fn recompress_batch(
    batch: &[u8],
    codec: Compression,
    max_decompressed_bytes: usize,
) -> Result<Vec<u8>, BatchError> {
    let header = BatchHeader::parse(batch)?;
    if batch.len() < BATCH_HEADER_LEN {
        return Err(BatchError::Truncated);
    }
    let body = &batch[BATCH_HEADER_LEN..header.total_len()];
    let from = header.compression()?;
    let plain;
    let records: &[u8] = if from == Compression::None {
        body
    } else {
        plain = crate::compression::decompress(from, body, max_decompressed_bytes)?;
        &plain
    };
    let body = crate::compression::compress(codec, records)?;
    let mut out = Vec::with_capacity(BATCH_HEADER_LEN + body.len());
    out.extend_from_slice(&batch[..BATCH_HEADER_LEN]);
    out.extend_from_slice(&body);
    let length = (out.len() - 12) as i32;
    out[8..12].copy_from_slice(&length.to_be_bytes());
    let attributes = (header.attributes & !0x07) | codec.attribute_bits();
    out[21..23].copy_from_slice(&attributes.to_be_bytes());
    let crc = compute_crc(&out);
    out[17..21].copy_from_slice(&crc.to_be_bytes());
    Ok(out)
}

/// `validate_batch` plus what a producer's batch must also satisfy: an uncompressed batch holds
/// exactly one record per offset (stored batches may have gaps after compaction).
pub fn validate_produced_batch(batch: &[u8]) -> Result<BatchHeader, BatchError> {
    let h = validate_batch(batch)?;
    if h.compression()? == Compression::None && h.records_count != h.last_offset_delta + 1 {
        return Err(BatchError::InvalidRecordCount);
    }
    Ok(h)
}

/// Iterates the whole batches of a byte slice without checking CRCs. Ends at a trailing partial
/// batch; yields an error for a length field that cannot be a batch (corruption, not a tear).
pub struct BatchIter<'a> {
    buf: &'a [u8],
    pos: usize,
    failed: bool,
}

impl<'a> BatchIter<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        BatchIter {
            buf,
            pos: 0,
            failed: false,
        }
    }
    /// Bytes of whole batches yielded so far.
    pub fn position(&self) -> usize {
        self.pos
    }
}

impl<'a> Iterator for BatchIter<'a> {
    type Item = Result<(BatchHeader, &'a [u8]), BatchError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let rest = &self.buf[self.pos..];
        if rest.len() < LOG_OVERHEAD {
            return None;
        }
        let len = i32_at(rest, 8);
        if len < MIN_BATCH_LENGTH {
            self.failed = true;
            return Some(Err(BatchError::InvalidLength(len)));
        }
        let total = len as usize + LOG_OVERHEAD;
        if rest.len() < total {
            return None;
        }
        let batch = &rest[..total];
        match BatchHeader::parse(batch) {
            Ok(h) => {
                self.pos += total;
                Some(Ok((h, batch)))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}
