//! A connection from this broker to another one, speaking the Kafka wire through
//! `kafka-protocol` types (replica fetches, OffsetForLeaderEpoch). Every call has a deadline
//! and a bounded response size. A request may be sent before the answer to the previous one
//! is needed (`send`, then `receive`): at most one is outstanding.

use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use kafka_protocol::messages::{RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct PeerConn {
    stream: TcpStream,
    correlation_id: i32,
    max_response_bytes: usize,
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
        })
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
        let len = self.stream.read_i32().await.map_err(|e| e.to_string())?;
        if len < 0 || len as usize > self.max_response_bytes {
            return Err(format!("bad response size {len}"));
        }
        // A peer broker's answer, bounded above: read into one buffer of its size, not zeroed
        // first and never copied into a larger one as it grows.
        let mut buf = BytesMut::with_capacity(len as usize);
        while buf.len() < len as usize {
            let want = len as u64 - buf.len() as u64;
            let n = (&mut self.stream)
                .take(want)
                .read_buf(&mut buf)
                .await
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("connection closed in the middle of a response".into());
            }
        }
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
