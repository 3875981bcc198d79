//! A small blocking Kafka client for the admin commands, speaking the wire through
//! `kafka-protocol` types: one connection per broker, requests at fixed versions that Strom and
//! current Apache Kafka both serve.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes};

/// Largest response accepted (a describe of many groups stays far below).
const MAX_RESPONSE: usize = 256 << 20;

pub struct Conn {
    stream: TcpStream,
    correlation_id: i32,
}

impl Conn {
    /// Connects to the first broker of `bootstrap` (HOST:PORT, or a comma-separated list of
    /// them) that accepts, so a command still works while some nodes are down.
    pub fn connect(bootstrap: &str) -> Result<Conn> {
        let mut last = None;
        for addr in bootstrap
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
        {
            match Self::connect_one(addr) {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("no broker address in '{bootstrap}'")))
    }

    fn connect_one(addr: &str) -> Result<Conn> {
        let stream = TcpStream::connect(addr).with_context(|| format!("connect to {addr}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            correlation_id: 0,
        })
    }

    /// Sends `req` at `version` and reads its response.
    pub fn call<R>(&mut self, req: &R, version: i16) -> Result<R::Response>
    where
        R: Request + Encodable + HeaderVersion,
        R::Response: Decodable + HeaderVersion,
    {
        self.correlation_id += 1;
        let header = RequestHeader::default()
            .with_request_api_key(R::KEY)
            .with_request_api_version(version)
            .with_correlation_id(self.correlation_id)
            .with_client_id(Some(StrBytes::from_static_str("strom-cli")));
        let mut body = BytesMut::new();
        header.encode(&mut body, R::header_version(version))?;
        req.encode(&mut body, version)?;
        let mut frame = BytesMut::with_capacity(body.len() + 4);
        frame.put_i32(body.len() as i32);
        frame.extend_from_slice(&body);
        self.stream.write_all(&frame)?;

        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len)?;
        let len = i32::from_be_bytes(len);
        if len < 0 || len as usize > MAX_RESPONSE {
            bail!("bad response size {len}");
        }
        let mut buf = vec![0u8; len as usize];
        self.stream.read_exact(&mut buf)?;
        let mut buf = Bytes::from(buf);
        let h = ResponseHeader::decode(&mut buf, R::Response::header_version(version))?;
        if h.correlation_id != self.correlation_id {
            bail!("response for request {} out of order", h.correlation_id);
        }
        let resp = R::Response::decode(&mut buf, version)?;
        if buf.has_remaining() {
            bail!("{} bytes left after the response", buf.remaining());
        }
        Ok(resp)
    }
}

/// Kafka error code to a readable name (the codes the admin commands meet).
pub fn error_name(code: i16) -> String {
    kafka_protocol::error::ResponseError::try_from_code(code)
        .map(|e| format!("{e:?}"))
        .unwrap_or_else(|| format!("error {code}"))
}

/// Broker ids as `1,2,3`, or `-` for none.
pub fn id_list(ids: impl IntoIterator<Item = i32>) -> String {
    let s = ids
        .into_iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",");
    if s.is_empty() {
        "-".into()
    } else {
        s
    }
}

/// An error naming the Kafka error of `code` (and the broker's message) after `what`, unless
/// `code` is 0.
pub fn check(code: i16, message: Option<&str>, what: &str) -> Result<()> {
    if code == 0 {
        return Ok(());
    }
    bail!("{what}: {}{}", error_name(code), detail(message))
}

/// ": message" when the broker sent one, for an error line.
pub fn detail(message: Option<&str>) -> String {
    match message {
        Some(m) if !m.is_empty() => format!(": {m}"),
        _ => String::new(),
    }
}
