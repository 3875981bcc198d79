//! Encoding a response without copying the record batches it carries. A Fetch response is
//! mostly record batches read from the log; encoding them with the rest of the message copied
//! every fetched byte once more into the response buffer (a few per cent of a replicating
//! broker's CPU, and a fresh buffer of the response's size per fetch). Here the encoder writes
//! into a buffer that, when asked to put one of the given batches, keeps a reference to it
//! instead: the frame goes out as the encoded parts with the batches in between.

use std::collections::HashMap;
use std::ops::Range;

use bytes::buf::UninitSlice;
use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::protocol::buf::ByteBufMut;
use kafka_protocol::protocol::{Encodable, HeaderVersion};

/// A response frame ready to send: one buffer, or parts to send in order.
#[derive(Debug, Clone)]
pub enum ResponseFrame {
    Whole(Bytes),
    Parts(Vec<Bytes>),
}

impl ResponseFrame {
    /// The buffers to send, in order.
    pub fn parts(&self) -> &[Bytes] {
        match self {
            ResponseFrame::Whole(b) => std::slice::from_ref(b),
            ResponseFrame::Parts(p) => p,
        }
    }

    pub fn len(&self) -> usize {
        self.parts().iter().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The frame's bytes in one buffer (copies when it is made of parts).
    pub fn to_bytes(&self) -> Bytes {
        match self {
            ResponseFrame::Whole(b) => b.clone(),
            ResponseFrame::Parts(p) => p.concat().into(),
        }
    }
}

impl From<Bytes> for ResponseFrame {
    fn from(b: Bytes) -> Self {
        ResponseFrame::Whole(b)
    }
}

/// Slices shorter than this are copied: a reference costs more than copying them.
const MIN_SPLICE_BYTES: usize = 4096;

/// A `ByteBufMut` that splices the given buffers in by reference when the encoder puts exactly
/// one of them. Offsets are those of the whole frame; `seek`/`range` before the last spliced
/// part (the message encoders do not use them) first gather everything into one buffer, so they
/// stay correct.
struct SplicingBuf {
    done: Vec<Bytes>,
    /// Bytes in `done`: the frame offset at which `tail` starts.
    base: usize,
    tail: BytesMut,
    /// Start address and length of each splicable buffer → its index in `splice`.
    by_addr: HashMap<(usize, usize), usize>,
    splice: Vec<Bytes>,
}

impl SplicingBuf {
    fn new(capacity: usize, splice: Vec<Bytes>) -> Self {
        let by_addr = splice
            .iter()
            .enumerate()
            .filter(|(_, b)| b.len() >= MIN_SPLICE_BYTES)
            .map(|(i, b)| ((b.as_ptr() as usize, b.len()), i))
            .collect();
        SplicingBuf {
            done: Vec::new(),
            base: 0,
            tail: BytesMut::with_capacity(capacity),
            by_addr,
            splice,
        }
    }

    fn gather(&mut self) {
        if self.done.is_empty() {
            return;
        }
        let mut all = BytesMut::with_capacity(self.base + self.tail.len());
        for b in self.done.drain(..) {
            all.extend_from_slice(&b);
        }
        all.extend_from_slice(&self.tail);
        self.tail = all;
        self.base = 0;
    }

    fn finish(mut self) -> ResponseFrame {
        if self.done.is_empty() {
            return ResponseFrame::Whole(self.tail.freeze());
        }
        if !self.tail.is_empty() {
            self.done.push(self.tail.freeze());
        }
        ResponseFrame::Parts(self.done)
    }
}

// SAFETY: every method forwards to the `BytesMut` tail, whose own implementation upholds the
// trait's contract; `put_slice` only appends whole buffers or forwards.
unsafe impl BufMut for SplicingBuf {
    fn remaining_mut(&self) -> usize {
        self.tail.remaining_mut()
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        // SAFETY: the caller's promise about `cnt` is about the chunk the tail handed out.
        unsafe { self.tail.advance_mut(cnt) }
    }

    fn chunk_mut(&mut self) -> &mut UninitSlice {
        self.tail.chunk_mut()
    }

    fn put_slice(&mut self, src: &[u8]) {
        if src.len() >= MIN_SPLICE_BYTES {
            if let Some(&i) = self.by_addr.get(&(src.as_ptr() as usize, src.len())) {
                let part = self.splice[i].clone();
                if !self.tail.is_empty() {
                    let head = self.tail.split().freeze();
                    self.base += head.len();
                    self.done.push(head);
                }
                self.base += part.len();
                self.done.push(part);
                return;
            }
        }
        self.tail.extend_from_slice(src);
    }
}

impl ByteBufMut for SplicingBuf {
    fn offset(&self) -> usize {
        self.base + self.tail.len()
    }

    fn seek(&mut self, offset: usize) {
        if offset < self.base {
            self.gather();
        }
        self.tail.resize(offset - self.base, 0);
    }

    fn range(&mut self, r: Range<usize>) -> &mut [u8] {
        if r.start < self.base {
            self.gather();
        }
        &mut self.tail[r.start - self.base..r.end - self.base]
    }
}

/// `api::encode_response`, with `splice` (buffers the body holds, such as a Fetch response's
/// record batches) sent by reference instead of copied.
pub fn encode_response_spliced<T: Encodable + HeaderVersion>(
    correlation_id: i32,
    version: i16,
    body: &T,
    splice: Vec<Bytes>,
) -> Result<ResponseFrame, String> {
    let spliced: usize = splice
        .iter()
        .filter(|b| b.len() >= MIN_SPLICE_BYTES)
        .map(Bytes::len)
        .sum();
    crate::api::encode_frame(correlation_id, version, body, |len| {
        SplicingBuf::new(len.saturating_sub(spliced), splice)
    })
    .map(SplicingBuf::finish)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::encode_response;
    use kafka_protocol::messages::fetch_response::{
        FetchResponse, FetchableTopicResponse, PartitionData,
    };
    use kafka_protocol::messages::TopicName;
    use kafka_protocol::protocol::StrBytes;

    fn response(records: &[Option<Bytes>]) -> FetchResponse {
        let partitions = records
            .iter()
            .enumerate()
            .map(|(i, r)| {
                PartitionData::default()
                    .with_partition_index(i as i32)
                    .with_high_watermark(100 + i as i64)
                    .with_records(r.clone())
            })
            .collect();
        FetchResponse::default().with_responses(vec![FetchableTopicResponse::default()
            .with_topic(TopicName(StrBytes::from_static_str("t")))
            .with_partitions(partitions)])
    }

    fn batch(len: usize, seed: u8) -> Bytes {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect::<Vec<u8>>()
            .into()
    }

    #[test]
    fn spliced_frames_are_byte_for_byte_the_copied_ones() {
        let sets: Vec<Vec<Option<Bytes>>> = vec![
            vec![],
            vec![None],
            vec![Some(batch(100, 1))],
            vec![Some(batch(70_000, 2))],
            vec![
                Some(batch(5000, 3)),
                None,
                Some(batch(10, 4)),
                Some(batch(1 << 20, 5)),
            ],
        ];
        for records in sets {
            let resp = response(&records);
            for version in [4i16, 11, 12, 16] {
                let copied = encode_response(7, version, &resp).unwrap();
                let splice: Vec<Bytes> = records.iter().flatten().cloned().collect();
                let frame = encode_response_spliced(7, version, &resp, splice).unwrap();
                assert_eq!(frame.len(), copied.len());
                assert!(frame.to_bytes() == copied, "frames differ at v{version}");
                let big = records
                    .iter()
                    .flatten()
                    .any(|b| b.len() >= MIN_SPLICE_BYTES);
                match (&frame, big) {
                    (ResponseFrame::Parts(parts), true) => {
                        // The large batches are the very buffers given, not copies.
                        for b in records
                            .iter()
                            .flatten()
                            .filter(|b| b.len() >= MIN_SPLICE_BYTES)
                        {
                            assert!(parts.iter().any(|p| p.as_ptr() == b.as_ptr()));
                        }
                    }
                    (ResponseFrame::Whole(_), false) => {}
                    _ => panic!("unexpected frame shape at v{version}: big={big}"),
                }
            }
        }
    }

    #[test]
    fn seeking_back_over_a_spliced_part_gathers_the_frame() {
        let part = batch(8192, 9);
        let mut buf = SplicingBuf::new(16, vec![part.clone()]);
        buf.put_i32(0);
        buf.put_slice(&part);
        buf.put_u8(7);
        assert_eq!(buf.offset(), 4 + 8192 + 1);
        buf.range(0..4).copy_from_slice(&42i32.to_be_bytes());
        buf.seek(4 + 8192 + 3);
        let all = buf.finish().to_bytes();
        assert_eq!(&all[..4], &42i32.to_be_bytes());
        assert!(all[4..4 + 8192] == part[..]);
        assert_eq!(&all[4 + 8192..], &[7, 0, 0]);
    }
}
