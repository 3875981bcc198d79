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

use std::os::fd::AsRawFd;
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use kafka_protocol::messages::{RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The most bytes of an answer the kernel buffers before waking the reader (the kernel also
/// caps it at half the largest receive buffer, `tcp_rmem`, so it cannot wait forever).
const RECEIVE_LOW_WATER: usize = 1 << 20;
/// Below this the mark is left at 1: loopback's largest segment (64 KiB).
const ONE_SEGMENT: usize = 64 << 10;

pub struct PeerConn {
    stream: TcpStream,
    correlation_id: i32,
    max_response_bytes: usize,
    /// The socket's `SO_RCVLOWAT` as last set (1, the default, between answers).
    low_water: usize,
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
        })
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
            .with_client_id(Some(StrBytes::from_static_str("strom-replica")));
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
        // An answer left unread (a cancelled receive) must not leave the next one waiting for
        // bytes that never come.
        self.low_water(1);
        let len = self.stream.read_i32().await.map_err(|e| e.to_string())?;
        if len < 0 || len as usize > self.max_response_bytes {
            return Err(format!("bad response size {len}"));
        }
        // A peer broker's answer, bounded above: read into one buffer of its size, not zeroed
        // first and never copied into a larger one as it grows.
        let mut buf = BytesMut::with_capacity(len as usize);
        while buf.len() < len as usize {
            let want = len as usize - buf.len();
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
        let mut buf = buf.freeze();
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

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
    use kafka_protocol::messages::{FetchRequest, FetchResponse, TopicName};
    use tokio::net::TcpListener;

    const V: i16 = 12;

    /// An encoded Fetch answer (frame included) whose one partition carries `records` bytes.
    fn answer(correlation_id: i32, records: usize) -> Vec<u8> {
        let part =
            PartitionData::default().with_records(Some(bytes::Bytes::from(vec![7u8; records])));
        let resp = FetchResponse::default().with_responses(vec![FetchableTopicResponse::default()
            .with_topic(TopicName(StrBytes::from_static_str("t")))
            .with_partitions(vec![part])]);
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
