//! One client connection: read frames, dispatch each request in arrival order, write responses
//! in the same order. Requests are read ahead up to a bound while earlier responses wait (for
//! group commit or a long poll); anything malformed closes this connection only.

use std::net::SocketAddr;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::FutureExt;
use strom_proto::api::{self, HeaderError};
use strom_proto::frame::{self, FrameError};
use strom_proto::splice::ResponseFrame;
use tokio::io::{AsyncWriteExt, BufWriter};
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
        // Parts of at least the buffer's capacity (spliced record batches) go to the socket
        // directly, not through the buffer.
        for part in frame.parts() {
            if writer.write_all(part).await.is_err() {
                return;
            }
        }
    }
    let _ = writer.flush().await;
    let _ = writer.shutdown().await;
}
