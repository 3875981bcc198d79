//! One client connection: read frames, dispatch each request in arrival order, write responses
//! in the same order. Requests are read ahead up to a bound while earlier responses wait (for
//! group commit or a long poll); anything malformed closes this connection only.

use std::net::SocketAddr;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::FutureExt;
use std::os::fd::AsRawFd;
use strom_proto::api::{self, HeaderError};
use strom_proto::frame::{self, FrameError};
use strom_proto::splice::{FilePart, Part, ResponseFrame};
use tokio::io::{AsyncWriteExt, BufWriter, Interest};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::broker::Broker;
use crate::handlers::{self, Reply};

pub async fn serve(broker: Arc<Broker>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let (mut reader, writer) = stream.into_split();
    let max_frame = broker.config.i64("socket.request.max.bytes").max(64) as usize;
    let depth = broker
        .config
        .i64("strom.connection.max.pipelined.requests")
        .max(1) as usize;
    let (tx, rx) = mpsc::channel::<BoxFuture<'static, Option<ResponseFrame>>>(depth);
    let writer_task = tokio::spawn(write_responses(writer, rx));
    let mut shutdown = broker.shutdown_signal();

    loop {
        let size = tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            s = frame::read_frame_size(&mut reader, max_frame) => s,
        };
        let size = match size {
            Ok(Some(s)) => s,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "closing connection");
                break;
            }
        };
        // queued.max.request.bytes: memory for request bodies is reserved broker-wide before
        // it is read; a flood of large requests waits here instead of exhausting memory.
        let permit = match broker.request_memory.reserve(size).await {
            Some(p) => p,
            None => break,
        };
        let frame = match frame::read_frame_body(&mut reader, size).await {
            Ok(f) => f,
            Err(FrameError::Io(e)) => {
                tracing::debug!(%peer, error = %e, "connection error");
                break;
            }
            Err(e) => {
                tracing::warn!(%peer, error = %e, "closing connection");
                break;
            }
        };
        let request = match api::decode_header(frame) {
            Ok(r) => r,
            Err(HeaderError::ApiVersionsTooNew {
                correlation_id,
                version,
            }) => {
                tracing::debug!(%peer, version, "ApiVersions newer than served; answering UNSUPPORTED_VERSION");
                let bytes = api::api_versions_unsupported(correlation_id);
                if tx
                    .send(Box::pin(async move { Some(bytes.into()) }))
                    .await
                    .is_err()
                {
                    break;
                }
                continue;
            }
            Err(e) => {
                tracing::warn!(%peer, error = %e, "closing connection");
                break;
            }
        };
        let api_key = request.api_key;
        let version = request.version;
        let dispatched = handlers::dispatch(&broker, request, peer).await;
        // The request's bytes are stored or dropped once dispatched.
        drop(permit);
        let response: BoxFuture<'static, Option<ResponseFrame>> = match dispatched {
            Ok(Reply::Now(bytes)) => Box::pin(async move { Some(bytes.into()) }),
            Ok(Reply::Later(fut)) => {
                // Run it now, not when the writer reaches it: a produce must start its group
                // commit at once, even while earlier responses on this connection are pending.
                let task = tokio::spawn(fut);
                Box::pin(async move { task.await.ok().flatten() })
            }
            Ok(Reply::None) => continue,
            Err(e) => {
                tracing::warn!(%peer, ?api_key, version, error = %e, "bad request; closing connection");
                break;
            }
        };
        if tx.send(response).await.is_err() {
            break;
        }
    }
    drop(tx);
    // Finish the responses already owed (clean shutdown finishes in-flight requests).
    let _ = writer_task.await;
}

async fn write_responses(
    writer: tokio::net::tcp::OwnedWriteHalf,
    mut rx: mpsc::Receiver<BoxFuture<'static, Option<ResponseFrame>>>,
) {
    let mut writer = BufWriter::with_capacity(64 * 1024, writer);
    loop {
        // Flush what is buffered before waiting for anything: responses that are ready go out
        // together, and none waits behind a response that is not.
        let mut fut = match rx.try_recv() {
            Ok(f) => f,
            Err(_) => {
                if writer.flush().await.is_err() {
                    return;
                }
                match rx.recv().await {
                    Some(f) => f,
                    None => break,
                }
            }
        };
        let ready = match (&mut fut).now_or_never() {
            Some(r) => r,
            None => {
                if writer.flush().await.is_err() {
                    return;
                }
                fut.await
            }
        };
        // A response that could not be produced leaves the client waiting on its correlation
        // id forever: close instead.
        let Some(frame) = ready else { return };
        if write_frame(&mut writer, frame).await.is_err() {
            return;
        }
    }
    let _ = writer.flush().await;
    let _ = writer.shutdown().await;
}

/// Writes one response frame. Parts of at least the buffer's capacity (spliced record batches)
/// go to the socket directly, not through the buffer; file parts go with `sendfile`, after
/// what is buffered.
async fn write_frame(
    writer: &mut BufWriter<tokio::net::tcp::OwnedWriteHalf>,
    frame: ResponseFrame,
) -> std::io::Result<()> {
    match frame {
        ResponseFrame::Whole(b) => writer.write_all(&b).await,
        ResponseFrame::Parts(parts) => {
            for part in parts {
                match part {
                    Part::Mem(b) => writer.write_all(&b).await?,
                    Part::File(f) => {
                        writer.flush().await?;
                        send_file(writer.get_ref().as_ref(), &f).await?;
                    }
                }
            }
            Ok(())
        }
    }
}

/// Sends a range of a file with `sendfile(2)`: the bytes go from the page cache to the socket
/// without a copy through user space. A range that shrank (the file was truncated) or whose
/// log was truncated since it was chosen fails: the frame's length is already promised, so the
/// caller closes the connection rather than send other bytes, as Kafka does.
pub async fn send_file(sock: &TcpStream, part: &FilePart) -> std::io::Result<()> {
    let end = part.offset + part.len;
    let mut pos = part.offset;
    while pos < end {
        sock.writable().await?;
        let want = (end - pos).min(1 << 30) as usize;
        let sent = sock.try_io(Interest::WRITABLE, || {
            // Checked right before each call, not before the wait for the socket: a slow
            // reader can keep us waiting while the log is cut and rewritten.
            if !part.unchanged() {
                return Err(std::io::Error::other("log truncated while sending from it"));
            }
            let mut off = pos as libc::off_t;
            // SAFETY: both descriptors are open for the duration of the call (the socket is
            // borrowed, the file is held by `part`), and `off` is a valid, exclusively borrowed
            // offset the kernel updates.
            let n =
                unsafe { libc::sendfile(sock.as_raw_fd(), part.file.as_raw_fd(), &mut off, want) };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(n as u64)
            }
        });
        match sent {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => pos += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (s, c)
    }

    fn file_of(bytes: &[u8]) -> (tempfile::NamedTempFile, Arc<std::fs::File>) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        let file = Arc::new(f.reopen().unwrap());
        (f, file)
    }

    fn part(file: &Arc<std::fs::File>, offset: u64, len: u64, g: &Arc<AtomicU64>) -> FilePart {
        FilePart {
            file: file.clone(),
            offset,
            len,
            generation: g.clone(),
            expected: g.load(Ordering::Acquire),
        }
    }

    #[tokio::test]
    async fn sendfile_sends_exactly_the_range_past_a_full_socket_buffer() {
        let data: Vec<u8> = (0..6u32 << 20).map(|i| (i % 251) as u8).collect();
        let (_tmp, file) = file_of(&data);
        let g = Arc::new(AtomicU64::new(0));
        let (server, mut client) = pair().await;
        // Several MiB over loopback: the socket buffer fills and sendfile must wait for it.
        let (from, len) = (1234u64, (5u64 << 20) + 17);
        let p = part(&file, from, len, &g);
        let sender = tokio::spawn(async move { send_file(&server, &p).await });
        let mut got = vec![0u8; len as usize];
        client.read_exact(&mut got).await.unwrap();
        sender.await.unwrap().unwrap();
        assert!(got[..] == data[from as usize..(from + len) as usize]);
    }

    #[tokio::test]
    async fn sendfile_fails_on_a_shrunk_file_or_a_truncated_log() {
        let (_tmp, file) = file_of(&vec![9u8; 100_000]);
        let g = Arc::new(AtomicU64::new(4));
        let (server, _client) = pair().await;
        // The range runs past the end of the file (it was cut after the range was chosen).
        let past = part(&file, 90_000, 20_000, &g);
        let err = send_file(&server, &past).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        // The log was truncated since: nothing is sent.
        let stale = part(&file, 0, 50_000, &g);
        g.fetch_add(1, Ordering::AcqRel);
        assert!(send_file(&server, &stale).await.is_err());
    }
}
