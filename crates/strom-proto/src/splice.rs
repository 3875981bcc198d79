//! Encoding a response without copying the record batches it carries. A Fetch response is
//! mostly record batches read from the log; encoding them with the rest of the message copied
//! every fetched byte once more into the response buffer (a few per cent of a replicating
//! broker's CPU, and a fresh buffer of the response's size per fetch). Here the encoder writes
//! into a buffer that, when asked to put one of the given batches, keeps a reference to it
//! instead: the frame goes out as the encoded parts with the batches in between.
//!
//! Batches need not be in memory at all: a partition's records can be ranges of segment files
//! ([`FilePart`]), which the connection sends with `sendfile` (Kafka's zero-copy transfer), so
//! the bytes go from the page cache to the socket without passing through user space. The
//! message encoder is given a placeholder of the right length ([`file_placeholder`]) in their
//! place; the splicing buffer swaps the file ranges in when the encoder puts it.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

use bytes::buf::UninitSlice;
use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::protocol::buf::ByteBufMut;
use kafka_protocol::protocol::{Encodable, HeaderVersion};

/// A range of a file to send as part of a frame. `generation` guards against the file being
/// cut and rewritten in place (a follower truncating a divergent tail reuses the positions):
/// the log bumps the counter before it truncates, and a sender that finds it changed must
/// close the connection instead of sending what now lies there, as Kafka does when a
/// `FileRecords` shrinks during a transfer.
#[derive(Debug, Clone)]
pub struct FilePart {
    pub file: Arc<File>,
    pub offset: u64,
    pub len: u64,
    pub generation: Arc<AtomicU64>,
    pub expected: u64,
}

impl FilePart {
    /// Whether the range still holds what it held when it was chosen.
    pub fn unchanged(&self) -> bool {
        self.generation.load(Ordering::Acquire) == self.expected
    }

    /// Appends the range's bytes to `out` (for senders that cannot use `sendfile`); on an
    /// error `out` is as it was.
    pub fn read_into(&self, out: &mut Vec<u8>) -> std::io::Result<()> {
        let start = out.len();
        out.resize(start + self.len as usize, 0);
        let read = self.file.read_exact_at(&mut out[start..], self.offset);
        if read.is_err() || !self.unchanged() {
            out.truncate(start);
            read?;
            return Err(std::io::Error::other("file truncated while reading"));
        }
        Ok(())
    }

    /// The range's bytes, read into memory.
    pub fn read(&self) -> std::io::Result<Bytes> {
        let mut buf = Vec::new();
        self.read_into(&mut buf)?;
        Ok(buf.into())
    }
}

/// One piece of a frame: bytes in memory or a range of a file.
#[derive(Debug, Clone)]
pub enum Part {
    Mem(Bytes),
    File(FilePart),
}

impl Part {
    pub fn len(&self) -> usize {
        match self {
            Part::Mem(b) => b.len(),
            Part::File(f) => f.len as usize,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A response frame ready to send: one buffer, or parts to send in order.
#[derive(Debug, Clone)]
pub enum ResponseFrame {
    Whole(Bytes),
    Parts(Vec<Part>),
}

impl ResponseFrame {
    pub fn len(&self) -> usize {
        match self {
            ResponseFrame::Whole(b) => b.len(),
            ResponseFrame::Parts(p) => p.iter().map(Part::len).sum(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The frame's bytes in one buffer (copies when it is made of parts, reads file parts).
    pub fn to_bytes(&self) -> std::io::Result<Bytes> {
        match self {
            ResponseFrame::Whole(b) => Ok(b.clone()),
            ResponseFrame::Parts(parts) => {
                let mut all = Vec::with_capacity(self.len());
                for p in parts {
                    match p {
                        Part::Mem(b) => all.extend_from_slice(b),
                        Part::File(f) => f.read_into(&mut all)?,
                    }
                }
                Ok(all.into())
            }
        }
    }
}

impl From<Bytes> for ResponseFrame {
    fn from(b: Bytes) -> Self {
        ResponseFrame::Whole(b)
    }
}

/// Zeros the placeholders for file parts are cut from. Never read: the encoder hands a
/// placeholder to `put_slice`, which the splicing buffer recognises by its address. Allocated
/// zeroed on first use (the allocator maps fresh zero pages, so it costs address space, not
/// memory); a `static` array of this size would be 64 MiB of every binary.
static PLACEHOLDER: LazyLock<&'static [u8]> =
    LazyLock::new(|| Box::leak(vec![0u8; MAX_FILE_RECORDS].into_boxed_slice()));

/// Longest run of file parts one placeholder can stand for; longer reads are copied.
pub const MAX_FILE_RECORDS: usize = 64 << 20;

/// A buffer of `len` bytes to put in a message where file parts of that total length go, or
/// None when `len` is too short to be worth a file part or longer than a placeholder can be.
pub fn file_placeholder(len: usize) -> Option<Bytes> {
    (MIN_SPLICE_BYTES..=MAX_FILE_RECORDS)
        .contains(&len)
        .then(|| Bytes::from_static(&PLACEHOLDER[..len]))
}

/// Slices shorter than this are copied: a reference costs more than copying them.
const MIN_SPLICE_BYTES: usize = 4096;

/// A `ByteBufMut` that splices the given buffers in by reference when the encoder puts exactly
/// one of them, and file parts in place of each placeholder it puts (in order). Offsets are
/// those of the whole frame; `seek`/`range` before the last spliced part (the message encoders
/// do not use them) first gather everything into one buffer, so they stay correct.
struct SplicingBuf {
    done: Vec<Part>,
    /// Bytes in `done`: the frame offset at which `tail` starts.
    base: usize,
    tail: BytesMut,
    /// Start address and length of each splicable buffer → its index in `splice`.
    by_addr: HashMap<(usize, usize), usize>,
    splice: Vec<Bytes>,
    /// The file parts for each placeholder still to come, in encoding order.
    files: VecDeque<Vec<FilePart>>,
    /// Set when a placeholder did not match its file parts or a gather could not read them.
    error: Option<String>,
}

impl SplicingBuf {
    fn new(capacity: usize, splice: Vec<Bytes>, files: Vec<Vec<FilePart>>) -> Self {
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
            files: files.into(),
            error: None,
        }
    }

    fn gather(&mut self) {
        if self.done.is_empty() {
            return;
        }
        let mut all = BytesMut::with_capacity(self.base + self.tail.len());
        for p in self.done.drain(..) {
            match p {
                Part::Mem(b) => all.extend_from_slice(&b),
                Part::File(f) => match f.read() {
                    Ok(b) => all.extend_from_slice(&b),
                    Err(e) => {
                        all.resize(all.len() + f.len as usize, 0);
                        self.error.get_or_insert(e.to_string());
                    }
                },
            }
        }
        all.extend_from_slice(&self.tail);
        self.tail = all;
        self.base = 0;
    }

    /// Ends the buffered bytes so far as a part, then appends `parts`.
    fn push_parts(&mut self, parts: impl IntoIterator<Item = Part>) {
        if !self.tail.is_empty() {
            let head = self.tail.split().freeze();
            self.base += head.len();
            self.done.push(Part::Mem(head));
        }
        for p in parts {
            self.base += p.len();
            self.done.push(p);
        }
    }

    fn finish(mut self) -> Result<ResponseFrame, String> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if !self.files.is_empty() {
            return Err(format!(
                "{} file placeholder(s) were not encoded",
                self.files.len()
            ));
        }
        if self.done.is_empty() {
            return Ok(ResponseFrame::Whole(self.tail.freeze()));
        }
        if !self.tail.is_empty() {
            self.done.push(Part::Mem(self.tail.freeze()));
        }
        Ok(ResponseFrame::Parts(self.done))
    }
}

// SAFETY: every method forwards to the `BytesMut` tail, whose own implementation upholds the
// trait's contract; `put_slice` only appends whole parts or forwards.
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
            if std::ptr::eq(src.as_ptr(), PLACEHOLDER.as_ptr()) {
                match self.files.pop_front() {
                    Some(parts) if parts.iter().map(|f| f.len).sum::<u64>() == src.len() as u64 => {
                        self.push_parts(parts.into_iter().map(Part::File));
                    }
                    _ => {
                        self.error
                            .get_or_insert_with(|| "file placeholder without its parts".into());
                        self.tail.extend_from_slice(src);
                    }
                }
                return;
            }
            if let Some(&i) = self.by_addr.get(&(src.as_ptr() as usize, src.len())) {
                let part = self.splice[i].clone();
                self.push_parts([Part::Mem(part)]);
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
/// record batches) sent by reference instead of copied, and `files` sent in place of the
/// body's [`file_placeholder`]s, in the order the encoder meets them (one entry per
/// placeholder, whose length is the sum of its parts').
pub fn encode_response_spliced<T: Encodable + HeaderVersion>(
    correlation_id: i32,
    version: i16,
    body: &T,
    splice: Vec<Bytes>,
    files: Vec<Vec<FilePart>>,
) -> Result<ResponseFrame, String> {
    let spliced: usize = splice
        .iter()
        .filter(|b| b.len() >= MIN_SPLICE_BYTES)
        .map(Bytes::len)
        .sum::<usize>()
        + files
            .iter()
            .flatten()
            .map(|f| f.len as usize)
            .sum::<usize>();
    crate::api::encode_frame(correlation_id, version, body, |len| {
        SplicingBuf::new(len.saturating_sub(spliced), splice, files)
    })
    .and_then(SplicingBuf::finish)
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
                let frame = encode_response_spliced(7, version, &resp, splice, vec![]).unwrap();
                assert_eq!(frame.len(), copied.len());
                assert!(
                    frame.to_bytes().unwrap() == copied,
                    "frames differ at v{version}"
                );
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
                            assert!(parts
                                .iter()
                                .any(|p| matches!(p, Part::Mem(m) if m.as_ptr() == b.as_ptr())));
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
        let mut buf = SplicingBuf::new(16, vec![part.clone()], vec![]);
        buf.put_i32(0);
        buf.put_slice(&part);
        buf.put_u8(7);
        assert_eq!(buf.offset(), 4 + 8192 + 1);
        buf.range(0..4).copy_from_slice(&42i32.to_be_bytes());
        buf.seek(4 + 8192 + 3);
        let all = buf.finish().unwrap().to_bytes().unwrap();
        assert_eq!(&all[..4], &42i32.to_be_bytes());
        assert!(all[4..4 + 8192] == part[..]);
        assert_eq!(&all[4 + 8192..], &[7, 0, 0]);
    }

    /// A file holding `chunks` back to back, with a FilePart for each.
    fn file_parts(
        chunks: &[Bytes],
        generation: &Arc<AtomicU64>,
    ) -> (tempfile::NamedTempFile, Vec<FilePart>) {
        use std::io::Write;
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"header bytes that are not records").unwrap();
        let mut offset = 33u64;
        let file = Arc::new(f.reopen().unwrap());
        let mut parts = Vec::new();
        for c in chunks {
            f.write_all(c).unwrap();
            parts.push(FilePart {
                file: file.clone(),
                offset,
                len: c.len() as u64,
                generation: generation.clone(),
                expected: generation.load(Ordering::Acquire),
            });
            offset += c.len() as u64;
        }
        (f, parts)
    }

    #[test]
    fn file_parts_take_the_placeholders_places_in_order() {
        let generation = Arc::new(AtomicU64::new(3));
        // Partition 0: two file ranges (two segments); 1: in memory; 2: one file range.
        let p0 = [batch(5000, 1), batch(9000, 2)];
        let p2 = [batch(70_000, 3)];
        let (_f0, parts0) = file_parts(&p0, &generation);
        let (_f2, parts2) = file_parts(&p2, &generation);
        let mem = batch(4096, 4);
        let real = response(&[
            Some(p0.concat().into()),
            Some(mem.clone()),
            Some(p2[0].clone()),
        ]);
        let placeholders = response(&[
            file_placeholder(14_000),
            Some(mem.clone()),
            file_placeholder(70_000),
        ]);
        for version in [4i16, 12, 16] {
            let copied = encode_response(9, version, &real).unwrap();
            let frame = encode_response_spliced(
                9,
                version,
                &placeholders,
                vec![mem.clone()],
                vec![parts0.clone(), parts2.clone()],
            )
            .unwrap();
            assert_eq!(frame.len(), copied.len());
            assert!(
                frame.to_bytes().unwrap() == copied,
                "frames differ at v{version}"
            );
            let ResponseFrame::Parts(parts) = &frame else {
                panic!("a frame with file parts is made of parts")
            };
            let files = parts.iter().filter(|p| matches!(p, Part::File(_))).count();
            assert_eq!(files, 3);
        }
        // Parts that do not add up to their placeholder, or a placeholder left without parts,
        // fail the encoding instead of sending zeros.
        let short = encode_response_spliced(
            9,
            12,
            &placeholders,
            vec![],
            vec![parts2.clone(), parts0.clone()],
        );
        assert!(short.is_err());
        let missing = encode_response_spliced(9, 12, &placeholders, vec![], vec![parts0.clone()]);
        assert!(missing.is_err());
        let extra = encode_response_spliced(
            9,
            12,
            &response(&[Some(mem.clone())]),
            vec![],
            vec![parts0.clone()],
        );
        assert!(extra.is_err());
        // A truncation after the parts were chosen makes them unreadable.
        generation.fetch_add(1, Ordering::AcqRel);
        assert!(!parts2[0].unchanged());
        assert!(parts2[0].read().is_err());
    }

    #[test]
    fn placeholders_exist_only_for_lengths_worth_a_file_part() {
        assert!(file_placeholder(MIN_SPLICE_BYTES - 1).is_none());
        assert_eq!(
            file_placeholder(MIN_SPLICE_BYTES).unwrap().len(),
            MIN_SPLICE_BYTES
        );
        assert!(file_placeholder(MAX_FILE_RECORDS).is_some());
        assert!(file_placeholder(MAX_FILE_RECORDS + 1).is_none());
    }
}
