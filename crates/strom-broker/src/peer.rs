//! A connection from this broker to another one, speaking the Kafka wire through
//! `kafka-protocol` types (replica fetches, OffsetForLeaderEpoch). Every call has a deadline
//! and a bounded response size. A request may be sent before the answer to the previous one
//! is needed (`send`, then `receive`): at most one is outstanding.
//!
//! While an answer is read the socket's receive low-water mark (`SO_RCVLOWAT`) is the rest of
//! it, up to `RECEIVE_LOW_WATER`: the kernel wakes this broker once per that many bytes instead
//! of on every segment the sender's stack delivers. A fetch answer of ~1 MiB arrives as ~16
//! segments of 64 KiB; each wake-up of a sleeping thread costs the sending side an IPI (a VM
//! exit on a VM), and on one host the sender's stack runs the receiver's TCP path too.
//!
//! A replica fetch answer is read so that the records of its (first large) partition lie at an
//! address congruent, modulo the block size, to where they go in the follower's segment file
//! (`receive_fetch`): the follower's direct write then takes them from the answer itself
//! instead of copying them into an aligned buffer first. The answer's first bytes are read
//! alone to find where those records start; the rest goes straight into place.

use std::os::fd::AsRawFd;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{FetchRequest, FetchResponse, RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The most bytes of an answer the kernel buffers before waking the reader (the kernel also
/// caps it at half the largest receive buffer, `tcp_rmem`, so it cannot wait forever).
const RECEIVE_LOW_WATER: usize = 1 << 20;
/// Below this the mark is left at 1: loopback's largest segment (64 KiB).
const ONE_SEGMENT: usize = 64 << 10;

/// The block size the follower's direct writes align to (the log's `direct::ALIGN`).
const BLOCK: usize = 4096;
/// How much of a fetch answer is read first to find where the records to place start.
const PREFIX: usize = 4096;
/// Records shorter than this are not worth placing (their copy is cheap).
const PLACE_MIN_RECORDS: usize = 64 << 10;

/// Where a partition's records go in its segment file: `(topic, partition) -> position`.
pub type Place<'a> = &'a (dyn Fn(&str, i32) -> Option<u64> + Sync);

pub struct PeerConn {
    stream: TcpStream,
    correlation_id: i32,
    max_response_bytes: usize,
    /// The socket's `SO_RCVLOWAT` as last set (1, the default, between answers).
    low_water: usize,
    /// Sent in every request header (`named`).
    client_id: StrBytes,
}

/// Sets `SO_RCVLOWAT`; a failure leaves the default (wake on every byte), which is only slower.
fn set_low_water(stream: &TcpStream, bytes: usize) -> bool {
    let v = bytes.clamp(1, i32::MAX as usize) as libc::c_int;
    // SAFETY: the descriptor is open (borrowed from the stream) and `v` is a valid c_int whose
    // size is passed.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    rc == 0
}

impl PeerConn {
    pub async fn connect(
        addr: &str,
        timeout: Duration,
        max_response_bytes: usize,
    ) -> Result<Self, String> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| format!("connect to {addr} timed out"))?
            .map_err(|e| format!("connect to {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        Ok(PeerConn {
            stream,
            correlation_id: 0,
            max_response_bytes,
            low_water: 1,
            client_id: StrBytes::from_static_str("strom-replica"),
        })
    }

    /// The client id its requests carry (the leader's logs and request metrics name the
    /// follower by it, as Kafka's `broker-<id>-fetcher-<n>`).
    pub fn named(mut self, client_id: String) -> Self {
        self.client_id = StrBytes::from_string(client_id);
        self
    }

    fn low_water(&mut self, bytes: usize) {
        if self.low_water != bytes && set_low_water(&self.stream, bytes) {
            self.low_water = bytes;
        }
    }

    pub async fn call<R>(
        &mut self,
        req: &R,
        version: i16,
        timeout: Duration,
    ) -> Result<R::Response, String>
    where
        R: Request + Encodable + HeaderVersion,
        R::Response: Decodable + HeaderVersion,
    {
        tokio::time::timeout(timeout, self.call_inner(req, version))
            .await
            .map_err(|_| "request timed out".to_string())?
    }

    async fn call_inner<R>(&mut self, req: &R, version: i16) -> Result<R::Response, String>
    where
        R: Request + Encodable + HeaderVersion,
        R::Response: Decodable + HeaderVersion,
    {
        self.send(req, version).await?;
        self.receive::<R>(version).await
    }

    /// Sends a request whose answer `receive` reads later.
    pub async fn send<R>(&mut self, req: &R, version: i16) -> Result<(), String>
    where
        R: Request + Encodable + HeaderVersion,
    {
        self.correlation_id = self.correlation_id.wrapping_add(1);
        let header = RequestHeader::default()
            .with_request_api_key(R::KEY)
            .with_request_api_version(version)
            .with_correlation_id(self.correlation_id)
            .with_client_id(Some(self.client_id.clone()));
        let mut body = BytesMut::new();
        header
            .encode(&mut body, R::header_version(version))
            .map_err(|e| e.to_string())?;
        req.encode(&mut body, version).map_err(|e| e.to_string())?;
        let mut frame = BytesMut::with_capacity(body.len() + 4);
        frame.put_i32(body.len() as i32);
        frame.extend_from_slice(&body);
        self.stream
            .write_all(&frame)
            .await
            .map_err(|e| e.to_string())
    }

    /// Reads the answer to the request `send` sent last.
    pub async fn receive<R>(&mut self, version: i16) -> Result<R::Response, String>
    where
        R: Request,
        R::Response: Decodable + HeaderVersion,
    {
        let frame = self.read_frame(None).await?;
        self.decode::<R>(frame, version)
    }

    /// Reads the answer to the Fetch `send` sent last (version 12), with the records of the
    /// first partition of at least `PLACE_MIN_RECORDS` for which `place(topic, partition)`
    /// names a file position at an address congruent to it modulo the block size.
    pub async fn receive_fetch(
        &mut self,
        version: i16,
        place: Place<'_>,
    ) -> Result<FetchResponse, String> {
        let frame = self.read_frame(Some((version, place))).await?;
        self.decode::<FetchRequest>(frame, version)
    }

    /// Reads one answer frame (without its length). With `place` (a Fetch answer's version and
    /// where its records go), its records may be placed (see `receive_fetch`).
    async fn read_frame(&mut self, place: Option<(i16, Place<'_>)>) -> Result<Bytes, String> {
        // An answer left unread (a cancelled receive) must not leave the next one waiting for
        // bytes that never come.
        self.low_water(1);
        let len = self.stream.read_i32().await.map_err(|e| e.to_string())?;
        if len < 0 || len as usize > self.max_response_bytes {
            return Err(format!("bad response size {len}"));
        }
        let len = len as usize;
        // A peer broker's answer, bounded above: read into one buffer of its size (and room
        // to place it), not zeroed first and never copied into a larger one as it grows.
        let mut buf = BytesMut::with_capacity(len + if place.is_some() { BLOCK } else { 0 });
        let mut pad = 0;
        if let Some((version, place)) = place.filter(|_| len >= PLACE_MIN_RECORDS) {
            let mut prefix = [0u8; PREFIX];
            let prefix = &mut prefix[..len.min(PREFIX)];
            self.stream
                .read_exact(prefix)
                .await
                .map_err(|e| e.to_string())?;
            if let Some((at, pos)) = fetch_records_at(prefix, version, place) {
                let addr = buf.as_ptr() as usize + at;
                pad = (pos as usize).wrapping_sub(addr) % BLOCK;
            }
            buf.put_bytes(0, pad);
            buf.extend_from_slice(prefix);
        }
        let end = pad + len;
        while buf.len() < end {
            let want = end - buf.len();
            // Wake once the rest (or the next RECEIVE_LOW_WATER bytes) is here, never for more
            // than the answer still owes. A rest that fits in one segment arrives in one wake-up
            // anyway: no system calls for small answers.
            self.low_water(if want > ONE_SEGMENT {
                want.min(RECEIVE_LOW_WATER)
            } else {
                1
            });
            let n = (&mut self.stream)
                .take(want as u64)
                .read_buf(&mut buf)
                .await
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("connection closed in the middle of a response".into());
            }
        }
        self.low_water(1);
        let mut frame = buf.freeze();
        frame.advance(pad);
        Ok(frame)
    }

    fn decode<R>(&self, mut buf: Bytes, version: i16) -> Result<R::Response, String>
    where
        R: Request,
        R::Response: Decodable + HeaderVersion,
    {
        let h = ResponseHeader::decode(&mut buf, R::Response::header_version(version))
            .map_err(|e| e.to_string())?;
        if h.correlation_id != self.correlation_id {
            return Err(format!(
                "response for request {} out of order",
                h.correlation_id
            ));
        }
        let resp = R::Response::decode(&mut buf, version).map_err(|e| e.to_string())?;
        if buf.has_remaining() {
            return Err(format!("{} bytes left after the response", buf.remaining()));
        }
        Ok(resp)
    }
}

/// Where, in the first bytes of a Fetch answer frame (version 12: flexible, topics by name),
/// the records of the first partition of at least `PLACE_MIN_RECORDS` that `place` has a file
/// position for start, with that position. `None` when the bytes end first, or are not such an
/// answer (the full decode then says what is wrong).
fn fetch_records_at(
    frame: &[u8],
    version: i16,
    place: &dyn Fn(&str, i32) -> Option<u64>,
) -> Option<(usize, u64)> {
    if version != 12 {
        return None;
    }
    let mut c = Cursor { buf: frame, at: 0 };
    c.skip(4)?; // correlation id
    c.tagged_fields()?;
    c.skip(4 + 2 + 4)?; // throttle time, error code, session id
    for _ in 0..c.compact_len()? {
        let name_len = c.compact_len()?;
        let name = c.take(name_len)?;
        let topic = std::str::from_utf8(name).ok()?;
        for _ in 0..c.compact_len()? {
            let partition = i32::from_be_bytes(c.take(4)?.try_into().ok()?);
            c.skip(2 + 8 + 8 + 8)?; // error code, high watermark, last stable, log start
            for _ in 0..c.compact_len()? {
                c.skip(8 + 8)?; // aborted transaction: producer id, first offset
                c.tagged_fields()?;
            }
            c.skip(4)?; // preferred read replica
            let records = c.compact_len()?;
            if records >= PLACE_MIN_RECORDS {
                if let Some(pos) = place(topic, partition) {
                    return Some((c.at, pos));
                }
            }
            c.skip(records)?;
            c.tagged_fields()?;
        }
        c.tagged_fields()?;
    }
    None
}

/// Bounds-checked reading of the first bytes of a frame: every step is `None` past their end.
struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let out = self.buf.get(self.at..end)?;
        self.at = end;
        Some(out)
    }

    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(|_| ())
    }

    fn uvarint(&mut self) -> Option<u32> {
        let mut v: u32 = 0;
        for i in 0..5 {
            let b = *self.take(1)?.first()?;
            v |= u32::from(b & 0x7f).checked_shl(7 * i)?;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    /// A compact length (n + 1; 0 for null, read as empty).
    fn compact_len(&mut self) -> Option<usize> {
        Some((self.uvarint()? as usize).saturating_sub(1))
    }

    fn tagged_fields(&mut self) -> Option<()> {
        for _ in 0..self.uvarint()? {
            self.uvarint()?;
            let size = self.uvarint()? as usize;
            self.skip(size)?;
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
    use kafka_protocol::messages::{FetchRequest, FetchResponse, TopicName};
    use tokio::net::TcpListener;

    const V: i16 = 12;

    /// `resp` encoded as the answer to request `correlation_id`, frame length included.
    fn frame_of(correlation_id: i32, resp: &FetchResponse) -> Vec<u8> {
        let mut body = BytesMut::new();
        ResponseHeader::default()
            .with_correlation_id(correlation_id)
            .encode(&mut body, FetchResponse::header_version(V))
            .unwrap();
        resp.encode(&mut body, V).unwrap();
        let mut frame = (body.len() as i32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        frame
    }

    /// An encoded Fetch answer (frame included) whose one partition carries `records` bytes.
    fn answer(correlation_id: i32, records: usize) -> Vec<u8> {
        let part =
            PartitionData::default().with_records(Some(bytes::Bytes::from(vec![7u8; records])));
        let resp = FetchResponse::default().with_responses(vec![FetchableTopicResponse::default()
            .with_topic(TopicName(StrBytes::from_static_str("t")))
            .with_partitions(vec![part])]);
        frame_of(correlation_id, &resp)
    }

    /// Reads one request frame and returns its correlation id.
    async fn request(sock: &mut TcpStream) -> i32 {
        let len = sock.read_i32().await.unwrap() as usize;
        let mut body = vec![0u8; len];
        sock.read_exact(&mut body).await.unwrap();
        i32::from_be_bytes(body[4..8].try_into().unwrap())
    }

    fn low_water_of(stream: &TcpStream) -> usize {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: an open descriptor and a c_int-sized out buffer.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                &mut v as *mut libc::c_int as *mut libc::c_void,
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        v as usize
    }

    fn records_len(resp: &FetchResponse) -> usize {
        resp.responses[0].partitions[0]
            .records
            .as_ref()
            .map_or(0, |r| r.len())
    }

    /// A Fetch answer (frame included) of several topics and partitions: small records with
    /// aborted transactions and tagged fields first, then two large ones, filled with bytes that
    /// differ by position.
    fn varied_answer(correlation_id: i32) -> (Vec<u8>, FetchResponse) {
        use kafka_protocol::messages::fetch_response::AbortedTransaction;
        use kafka_protocol::messages::ProducerId;
        let fill = |n: usize, seed: usize| -> bytes::Bytes {
            (0..n).map(|i| (i * 7 + seed + i / 4096) as u8).collect()
        };
        let mut small = PartitionData::default()
            .with_partition_index(0)
            .with_high_watermark(5)
            .with_records(Some(fill(10, 1)))
            .with_aborted_transactions(Some(vec![AbortedTransaction::default()
                .with_producer_id(ProducerId(9))
                .with_first_offset(3)]));
        small
            .unknown_tagged_fields
            .insert(0x5354_0002, bytes::Bytes::from_static(&[1; 8]));
        let resp = FetchResponse::default().with_responses(vec![
            FetchableTopicResponse::default()
                .with_topic(TopicName(StrBytes::from_static_str("a")))
                .with_partitions(vec![small]),
            FetchableTopicResponse::default()
                .with_topic(TopicName(StrBytes::from_static_str("bb")))
                .with_partitions(vec![
                    PartitionData::default()
                        .with_partition_index(1)
                        .with_records(Some(fill(100 << 10, 2))),
                    PartitionData::default()
                        .with_partition_index(2)
                        .with_records(Some(fill(300 << 10, 3))),
                ]),
        ]);
        (frame_of(correlation_id, &resp), resp)
    }

    /// Places topic "bb" partition 2 only.
    fn only_bb_2(pos: u64) -> impl Fn(&str, i32) -> Option<u64> + Sync {
        move |t, p| (t == "bb" && p == 2).then_some(pos)
    }

    #[test]
    fn the_records_to_place_are_found_behind_other_topics_partitions_and_tagged_fields() {
        let (frame, resp) = varied_answer(7);
        let body = &frame[4..];
        let want = resp.responses[1].partitions[1].records.as_ref().unwrap();
        let (at, pos) = fetch_records_at(body, V, &only_bb_2(77)).unwrap();
        assert_eq!(pos, 77);
        assert_eq!(&body[at..at + want.len()], &want[..]);
        // Partition 1 of "bb" is the first large one when it may be placed.
        let (at, _) = fetch_records_at(body, V, &|t, _| (t == "bb").then_some(0)).unwrap();
        let first = resp.responses[1].partitions[0].records.as_ref().unwrap();
        assert_eq!(&body[at..at + first.len()], &first[..]);
        // Small records are never placed, nothing is placed without a position, and only
        // version 12 is read.
        assert!(fetch_records_at(body, V, &|t, _| (t == "a").then_some(0)).is_none());
        assert!(fetch_records_at(body, V, &|_, _| None).is_none());
        assert!(fetch_records_at(body, 13, &only_bb_2(0)).is_none());
        // Cut anywhere before the records start, or garbled anywhere, the bytes give no
        // answer or a position inside them: never a panic.
        let (at, _) = fetch_records_at(body, V, &only_bb_2(0)).unwrap();
        for cut in 0..at {
            assert!(fetch_records_at(&body[..cut], V, &only_bb_2(0)).is_none());
        }
        for i in 0..at {
            for b in [0u8, 0x7f, 0x80, 0xff] {
                let mut garbled = body[..at + 16].to_vec();
                garbled[i] = b;
                if let Some((a, _)) = fetch_records_at(&garbled, V, &only_bb_2(0)) {
                    assert!(a <= garbled.len());
                }
            }
        }
    }

    #[tokio::test]
    async fn a_fetch_answer_is_read_with_the_records_to_place_congruent_to_their_file_position() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let positions = [0u64, 1, 100, 4095, 4096 * 3 + 17];
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            for _ in positions {
                let id = request(&mut sock).await;
                // In pieces, the first one shorter than the prefix read alone.
                let (frame, _) = varied_answer(id);
                for piece in frame.chunks(1000 + id as usize * 3000) {
                    sock.write_all(piece).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            sock
        });
        let mut conn = PeerConn::connect(&addr, Duration::from_secs(5), 64 << 20)
            .await
            .unwrap();
        for pos in positions {
            conn.send(&FetchRequest::default(), V).await.unwrap();
            // "bb" 1 starts in the first bytes; "bb" 2 lies beyond them, after 100 KiB of
            // records: the answer is read as it comes (only the first bytes are parsed ahead).
            let place = |t: &str, p: i32| (t == "bb").then_some(pos + p as u64);
            let got = conn.receive_fetch(V, &place).await.unwrap();
            let (_, want) = varied_answer(conn.correlation_id);
            assert_eq!(got, want);
            let records = got.responses[1].partitions[0].records.as_ref().unwrap();
            assert_eq!(
                records.as_ptr() as usize % BLOCK,
                (pos + 1) as usize % BLOCK
            );
        }
        drop(server.await.unwrap());
    }

    #[tokio::test]
    async fn an_answer_that_trickles_in_is_read_whole_and_the_next_small_one_does_not_wait() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            // 2.5 MiB in 64 KiB pieces: past the low-water cap, and a last piece below it.
            let id = request(&mut sock).await;
            for piece in answer(id, (5 << 20) / 2).chunks(64 << 10) {
                sock.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let id = request(&mut sock).await;
            sock.write_all(&answer(id, 10)).await.unwrap();
            sock
        });
        let mut conn = PeerConn::connect(&addr, Duration::from_secs(5), 64 << 20)
            .await
            .unwrap();
        let big = conn
            .call(&FetchRequest::default(), V, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(records_len(&big), (5 << 20) / 2);
        assert_eq!(low_water_of(&conn.stream), 1, "reset between answers");
        let small = conn
            .call(&FetchRequest::default(), V, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(records_len(&small), 10);
        drop(server.await.unwrap());
    }

    #[tokio::test]
    async fn while_an_answer_is_owed_the_reader_sleeps_until_the_rest_or_a_mebibyte_is_there() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let id = request(&mut sock).await;
            let frame = answer(id, 300 << 10);
            // The first 100 KiB, then nothing until released.
            sock.write_all(&frame[..100 << 10]).await.unwrap();
            let _ = release_rx.await;
            sock.write_all(&frame[100 << 10..]).await.unwrap();
            sock
        });
        let mut conn = PeerConn::connect(&addr, Duration::from_secs(5), 64 << 20)
            .await
            .unwrap();
        conn.send(&FetchRequest::default(), V).await.unwrap();
        // Give up on the answer while its rest is held back: the mark asks for what is owed.
        let r =
            tokio::time::timeout(Duration::from_millis(300), conn.receive::<FetchRequest>(V)).await;
        assert!(r.is_err(), "the answer cannot be complete yet");
        let owed = low_water_of(&conn.stream);
        assert!(
            owed > 1 && owed <= 300 << 10,
            "SO_RCVLOWAT while 200 KiB are owed: {owed}"
        );
        drop(release_tx);
        drop(server.await.unwrap());
    }
}
