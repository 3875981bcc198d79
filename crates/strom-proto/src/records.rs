//! Records inside a v2 batch, for the few places that must look inside one (ListOffsets by
//! timestamp) and for building batches in tests and tools. The hot path never uses this.

use crate::batch::{compute_crc, BatchError, BatchHeader, BATCH_HEADER_LEN, MAGIC_V2};
use crate::compression::{compress, decompress, Compression};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordView {
    pub offset: i64,
    pub timestamp: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn varlong(&mut self) -> Result<i64, BatchError> {
        let mut value: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = *self
                .buf
                .get(self.pos)
                .ok_or(BatchError::InvalidRecord("truncated varint"))?;
            self.pos += 1;
            value |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(((value >> 1) as i64) ^ -((value & 1) as i64));
            }
        }
        Err(BatchError::InvalidRecord("varint too long"))
    }
    fn bytes(&mut self, len: i64) -> Result<Option<Vec<u8>>, BatchError> {
        if len < 0 {
            return Ok(None);
        }
        let len = len as usize;
        if len > self.buf.len() - self.pos {
            return Err(BatchError::InvalidRecord(
                "length past the end of the batch",
            ));
        }
        let v = self.buf[self.pos..self.pos + len].to_vec();
        self.pos += len;
        Ok(Some(v))
    }
}

/// Decodes every record of a whole batch, decompressing (bounded) if needed.
pub fn decode_records(
    header: &BatchHeader,
    batch: &[u8],
    max_decompressed_bytes: usize,
) -> Result<Vec<RecordView>, BatchError> {
    if batch.len() < BATCH_HEADER_LEN {
        return Err(BatchError::Truncated);
    }
    let body = &batch[BATCH_HEADER_LEN..];
    let codec = header.compression()?;
    let owned;
    let data: &[u8] = if codec == Compression::None {
        body
    } else {
        owned = decompress(codec, body, max_decompressed_bytes)?;
        &owned
    };
    let mut c = Cursor { buf: data, pos: 0 };
    // Each record takes at least 7 bytes; never reserve more than the data could hold.
    let count = (header.records_count.max(0) as usize).min(data.len() / 7 + 1);
    let mut out = Vec::with_capacity(count);
    for _ in 0..header.records_count.max(0) {
        let len = c.varlong()?;
        let start = c.pos;
        if len < 0 || len as usize > data.len() - start {
            return Err(BatchError::InvalidRecord("record length"));
        }
        let _attributes = c.bytes(1)?;
        let ts_delta = c.varlong()?;
        let offset_delta = c.varlong()?;
        let klen = c.varlong()?;
        let key = c.bytes(klen)?;
        let vlen = c.varlong()?;
        let value = c.bytes(vlen)?;
        let nheaders = c.varlong()?;
        if nheaders < 0 || nheaders as usize > data.len() - c.pos {
            return Err(BatchError::InvalidRecord("header count"));
        }
        let mut headers = Vec::with_capacity(nheaders as usize);
        for _ in 0..nheaders {
            let hk = c.varlong()?;
            let k = c
                .bytes(hk)?
                .ok_or(BatchError::InvalidRecord("null header key"))?;
            let hv = c.varlong()?;
            let v = c.bytes(hv)?;
            headers.push((String::from_utf8_lossy(&k).into_owned(), v));
        }
        if c.pos != start + len as usize {
            return Err(BatchError::InvalidRecord("record length mismatch"));
        }
        let timestamp = if header.is_log_append_time() {
            header.max_timestamp
        } else {
            header.base_timestamp + ts_delta
        };
        out.push(RecordView {
            offset: header.base_offset + offset_delta,
            timestamp,
            key,
            value,
            headers,
        });
    }
    Ok(out)
}

/// Where one record lies in a batch's (decompressed) record data, for the log cleaner.
#[derive(Debug, Clone)]
pub struct RecordSlice {
    /// The record's bytes, length prefix included: `data[start..end]`.
    pub start: usize,
    pub end: usize,
    pub offset: i64,
    pub timestamp: i64,
    pub key: Option<std::ops::Range<usize>>,
    pub value_is_null: bool,
}

/// The records of a whole batch as slices of its decompressed record data (returned too).
pub fn record_slices(
    header: &BatchHeader,
    batch: &[u8],
    max_decompressed_bytes: usize,
) -> Result<(Vec<u8>, Vec<RecordSlice>), BatchError> {
    if batch.len() < BATCH_HEADER_LEN {
        return Err(BatchError::Truncated);
    }
    let body = &batch[BATCH_HEADER_LEN..];
    let codec = header.compression()?;
    let data = if codec == Compression::None {
        body.to_vec()
    } else {
        decompress(codec, body, max_decompressed_bytes)?
    };
    let mut out =
        Vec::with_capacity((header.records_count.max(0) as usize).min(data.len() / 7 + 1));
    let mut c = Cursor { buf: &data, pos: 0 };
    for _ in 0..header.records_count.max(0) {
        let start = c.pos;
        let len = c.varlong()?;
        let body_start = c.pos;
        if len < 0 || len as usize > data.len() - body_start {
            return Err(BatchError::InvalidRecord("record length"));
        }
        let end = body_start + len as usize;
        c.bytes(1)?;
        let ts_delta = c.varlong()?;
        let offset_delta = c.varlong()?;
        let klen = c.varlong()?;
        let key_start = c.pos;
        let key = c.bytes(klen)?.map(|k| key_start..key_start + k.len());
        let vlen = c.varlong()?;
        c.pos = end;
        let timestamp = if header.is_log_append_time() {
            header.max_timestamp
        } else {
            header.base_timestamp + ts_delta
        };
        out.push(RecordSlice {
            start,
            end,
            offset: header.base_offset + offset_delta,
            timestamp,
            key,
            value_is_null: vlen < 0,
        });
    }
    Ok((data, out))
}

/// The same batch with only the `keep` records (slices of `data`), compressed with the
/// batch's codec. Base offset, last offset delta, timestamps and producer fields stay, so
/// offsets and producer state are preserved; count, length and CRC are recomputed.
pub fn filter_batch(
    batch: &[u8],
    data: &[u8],
    keep: &[&RecordSlice],
) -> Result<Vec<u8>, BatchError> {
    let header = BatchHeader::parse(batch)?;
    let mut records = Vec::new();
    for r in keep {
        records.extend_from_slice(&data[r.start..r.end]);
    }
    let body = compress(header.compression()?, &records)?;
    let mut out = Vec::with_capacity(BATCH_HEADER_LEN + body.len());
    out.extend_from_slice(&batch[..BATCH_HEADER_LEN]);
    out.extend_from_slice(&body);
    let length = (out.len() - 12) as i32;
    out[8..12].copy_from_slice(&length.to_be_bytes());
    out[57..61].copy_from_slice(&(keep.len() as i32).to_be_bytes());
    let crc = compute_crc(&out);
    out[17..21].copy_from_slice(&crc.to_be_bytes());
    Ok(out)
}

fn put_varlong(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

fn put_bytes(out: &mut Vec<u8>, b: Option<&[u8]>) {
    match b {
        None => put_varlong(out, -1),
        Some(b) => {
            put_varlong(out, b.len() as i64);
            out.extend_from_slice(b);
        }
    }
}

/// One record to put in a batch built by `encode_batch`.
#[derive(Debug, Clone, Default)]
pub struct NewRecord {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    pub timestamp: i64,
}

/// Producer identity of a batch; `producer_id` -1 for a non-idempotent batch.
#[derive(Debug, Clone, Copy)]
pub struct ProducerInfo {
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
}

impl Default for ProducerInfo {
    fn default() -> Self {
        ProducerInfo {
            producer_id: -1,
            producer_epoch: -1,
            base_sequence: -1,
        }
    }
}

/// Builds a v2 batch (base offset 0) with a valid CRC, as a producer would send it.
pub fn encode_batch(
    records: &[NewRecord],
    codec: Compression,
    producer: ProducerInfo,
) -> Result<Vec<u8>, BatchError> {
    if records.is_empty() {
        return Err(BatchError::InvalidRecordCount);
    }
    let base_ts = records[0].timestamp;
    let max_ts = records.iter().map(|r| r.timestamp).max().unwrap_or(base_ts);
    let mut body = Vec::new();
    for (i, r) in records.iter().enumerate() {
        let mut rec = vec![0u8];
        put_varlong(&mut rec, r.timestamp - base_ts);
        put_varlong(&mut rec, i as i64);
        put_bytes(&mut rec, r.key.as_deref());
        put_bytes(&mut rec, r.value.as_deref());
        put_varlong(&mut rec, r.headers.len() as i64);
        for (k, v) in &r.headers {
            put_bytes(&mut rec, Some(k.as_bytes()));
            put_bytes(&mut rec, v.as_deref());
        }
        put_varlong(&mut body, rec.len() as i64);
        body.extend_from_slice(&rec);
    }
    let body = compress(codec, &body)?;
    let mut b = Vec::with_capacity(BATCH_HEADER_LEN + body.len());
    b.extend_from_slice(&0i64.to_be_bytes());
    b.extend_from_slice(&((BATCH_HEADER_LEN - 12 + body.len()) as i32).to_be_bytes());
    b.extend_from_slice(&0i32.to_be_bytes());
    b.push(MAGIC_V2 as u8);
    b.extend_from_slice(&0u32.to_be_bytes());
    b.extend_from_slice(&codec.attribute_bits().to_be_bytes());
    b.extend_from_slice(&((records.len() - 1) as i32).to_be_bytes());
    b.extend_from_slice(&base_ts.to_be_bytes());
    b.extend_from_slice(&max_ts.to_be_bytes());
    b.extend_from_slice(&producer.producer_id.to_be_bytes());
    b.extend_from_slice(&producer.producer_epoch.to_be_bytes());
    b.extend_from_slice(&producer.base_sequence.to_be_bytes());
    b.extend_from_slice(&(records.len() as i32).to_be_bytes());
    b.extend_from_slice(&body);
    let crc = compute_crc(&b);
    b[17..21].copy_from_slice(&crc.to_be_bytes());
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{set_log_append_time, validate_batch, BatchIter};

    fn recs(n: usize) -> Vec<NewRecord> {
        (0..n)
            .map(|i| NewRecord {
                key: Some(format!("k{i}").into_bytes()),
                value: if i == 1 {
                    None
                } else {
                    Some(vec![i as u8; i * 3])
                },
                headers: vec![("h".into(), Some(b"v".to_vec())), ("h".into(), None)],
                timestamp: 1000 + i as i64,
            })
            .collect()
    }

    #[test]
    fn filtering_a_batch_keeps_offsets_and_the_chosen_records() {
        for codec in [Compression::None, Compression::Zstd, Compression::Gzip] {
            let b = encode_batch(&recs(10), codec, ProducerInfo::default()).unwrap();
            let h = validate_batch(&b).unwrap();
            let (data, slices) = record_slices(&h, &b, 1 << 20).unwrap();
            assert_eq!(slices.len(), 10);
            assert!(slices[1].value_is_null);
            let keep: Vec<&RecordSlice> = slices.iter().filter(|r| r.offset % 3 == 0).collect();
            let out = filter_batch(&b, &data, &keep).unwrap();
            let h2 = validate_batch(&out).unwrap();
            assert_eq!(
                h2.last_offset(),
                h.last_offset(),
                "the batch spans the same offsets"
            );
            let got = decode_records(&h2, &out, 1 << 20).unwrap();
            let want: Vec<_> = decode_records(&h, &b, 1 << 20)
                .unwrap()
                .into_iter()
                .filter(|r| r.offset % 3 == 0)
                .collect();
            assert_eq!(got, want);
            let k = slices[4].key.clone().unwrap();
            assert_eq!(&data[k], b"k4");
        }
    }

    #[test]
    fn recompression_keeps_records_and_header_fields() {
        use crate::batch::recompress_batch;
        let codecs = [
            Compression::None,
            Compression::Gzip,
            Compression::Snappy,
            Compression::Lz4,
            Compression::Zstd,
        ];
        let producer = ProducerInfo {
            producer_id: 42,
            producer_epoch: 3,
            base_sequence: 7,
        };
        for from in codecs {
            let original = encode_batch(&recs(20), from, producer).unwrap();
            let want =
                decode_records(&validate_batch(&original).unwrap(), &original, 1 << 20).unwrap();
            for to in codecs {
                let out = recompress_batch(&original, to, 1 << 20).unwrap();
                let h = validate_batch(&out).unwrap();
                assert_eq!(h.compression().unwrap(), to);
                assert_eq!((h.producer_id, h.base_sequence), (42, 7));
                assert_eq!(h.last_offset_delta, 19);
                assert_eq!(
                    decode_records(&h, &out, 1 << 20).unwrap(),
                    want,
                    "{from:?} -> {to:?}"
                );
            }
        }
        // Bounded: a batch that inflates past the limit is refused.
        let big = encode_batch(&recs(200), Compression::Gzip, ProducerInfo::default()).unwrap();
        assert!(recompress_batch(&big, Compression::Zstd, 100).is_err());
    }

    #[test]
    fn encode_validate_decode_every_codec() {
        for codec in [
            Compression::None,
            Compression::Gzip,
            Compression::Snappy,
            Compression::Lz4,
            Compression::Zstd,
        ] {
            let b = encode_batch(&recs(5), codec, ProducerInfo::default()).unwrap();
            let h = validate_batch(&b).unwrap();
            assert_eq!(h.records_count, 5);
            let r = decode_records(&h, &b, 1 << 20).unwrap();
            assert_eq!(r.len(), 5);
            assert_eq!(r[3].timestamp, 1003);
            assert_eq!(r[1].value, None);
            assert_eq!(r[2].headers.len(), 2, "duplicate header keys survive");
        }
    }

    #[test]
    fn log_append_time_on_a_header_copy_gives_the_same_batch() {
        let b = encode_batch(&recs(3), Compression::None, ProducerInfo::default()).unwrap();
        let mut whole = b.clone();
        set_log_append_time(&mut whole, 4242);
        let (head, rest) = b.split_at(crate::batch::BATCH_HEADER_LEN);
        let mut head: [u8; crate::batch::BATCH_HEADER_LEN] = head.try_into().unwrap();
        crate::batch::set_log_append_time_split(&mut head, rest, 4242);
        assert_eq!([&head[..], rest].concat(), whole);
        validate_batch(&whole).unwrap();
    }

    #[test]
    fn crc_and_log_append_time() {
        let mut b = encode_batch(&recs(2), Compression::None, ProducerInfo::default()).unwrap();
        set_log_append_time(&mut b, 99);
        let h = validate_batch(&b).unwrap();
        assert!(h.is_log_append_time());
        assert_eq!(h.max_timestamp, 99);
        let last = b.len() - 1;
        b[last] ^= 1;
        assert!(matches!(
            validate_batch(&b),
            Err(BatchError::CorruptCrc { .. })
        ));
    }

    #[test]
    fn iterator_stops_at_partial_tail_and_flags_bad_length() {
        let b = encode_batch(&recs(2), Compression::None, ProducerInfo::default()).unwrap();
        let mut two = b.clone();
        two.extend_from_slice(&b);
        two.extend_from_slice(&b[..20]);
        let mut it = BatchIter::new(&two);
        assert!(it.next().unwrap().is_ok());
        assert!(it.next().unwrap().is_ok());
        assert!(it.next().is_none());
        assert_eq!(it.position(), 2 * b.len());
        let mut bad = b.clone();
        bad[8..12].copy_from_slice(&3i32.to_be_bytes());
        assert!(BatchIter::new(&bad).next().unwrap().is_err());
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let mut b = encode_batch(&recs(1), Compression::None, ProducerInfo::default()).unwrap();
            b.truncate(BATCH_HEADER_LEN);
            b.extend_from_slice(&data);
            if let Ok(h) = BatchHeader::parse(&b) {
                let _ = decode_records(&h, &b, 1 << 16);
            }
            let _ = validate_batch(&b);
            let _ = BatchIter::new(&data).count();
        }
    }
}
