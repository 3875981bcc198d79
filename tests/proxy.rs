//! A userspace TCP proxy for fault injection (the kernel here has no netem): forwards bytes
//! both ways and, on command, cuts every connection so in-flight responses are lost and the
//! client must retry, or holds every byte (a partition that looks like a silent network, not
//! a refused or closed connection) or only the answers (a one-way partition) until released.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub addr: SocketAddr,
    cut_tx: watch::Sender<u64>,
    /// What is not forwarded (see `hold`, `hold_replies`).
    held_tx: watch::Sender<Held>,
    pub connections: Arc<AtomicU64>,
}

impl Proxy {
    /// Listens on a loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut_tx, cut_rx) = watch::channel(0u64);
        let (held_tx, held_rx) = watch::channel(Held::Nothing);
        let connections = Arc::new(AtomicU64::new(0));
        let conns = connections.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                conns.fetch_add(1, Ordering::Relaxed);
                let mut cut = cut_rx.clone();
                cut.borrow_and_update();
                let held = held_rx.clone();
                tokio::spawn(async move {
                    // A connection accepted while held reaches the upstream only once released
                    // (as a SYN lost in a partition would, minus the client's own timeout).
                    let server = tokio::select! {
                        s = async {
                            released(held.clone(), Held::Replies).await;
                            TcpStream::connect(upstream).await
                        } => s,
                        _ = cut.changed() => return,
                    };
                    let Ok(server) = server else {
                        return;
                    };
                    pipe(client, server, cut, held).await;
                });
            }
        });
        Proxy {
            addr,
            cut_tx,
            held_tx,
            connections,
        }
    }

    /// Drops every open connection (both directions) at once.
    pub fn cut_all(&self) {
        self.cut_tx.send_modify(|n| *n += 1);
    }

    /// Stops forwarding in both directions without closing anything: bytes sent either way
    /// (and a close) wait in the proxy and the socket buffers until `release`, and new
    /// connections are accepted but not forwarded. `cut_all` still drops everything.
    pub fn hold(&self) {
        self.held_tx.send_replace(Held::All);
    }

    /// A one-way partition: what the client sends still reaches the upstream, but nothing
    /// comes back (the upstream's answers wait, as with `hold`), until `release`.
    pub fn hold_replies(&self) {
        self.held_tx.send_replace(Held::Replies);
    }

    /// Forwards again whatever `hold` kept back, and everything after it.
    pub fn release(&self) {
        self.held_tx.send_replace(Held::Nothing);
    }
}

/// What a proxy holds back; each level holds what the one before does and more.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Held {
    Nothing,
    /// From the upstream to the client.
    Replies,
    /// Both ways, and new connections.
    All,
}

/// Returns once the proxy holds less than `level`.
async fn released(mut held: watch::Receiver<Held>, level: Held) {
    // Err: the proxy is gone, and with it any reason to wait.
    let _ = held.wait_for(|h| *h < level).await;
}

async fn pipe(
    client: TcpStream,
    server: TcpStream,
    mut cut: watch::Receiver<u64>,
    held: watch::Receiver<Held>,
) {
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    // Bytes read while held wait here (a close too: the peer does not see it before release).
    async fn forward(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        held: watch::Receiver<Held>,
        level: Held,
    ) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = from.read(&mut buf).await.unwrap_or(0);
            released(held.clone(), level).await;
            if n == 0 || to.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    }
    tokio::select! {
        _ = forward(cr, sw, held.clone(), Held::All) => {}
        _ = forward(sr, cw, held, Held::Replies) => {}
        _ = cut.changed() => {}
    }
}
