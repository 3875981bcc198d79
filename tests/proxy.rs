//! A userspace TCP proxy for fault injection (the kernel here has no netem): forwards bytes
//! both ways and, on command, cuts every connection so in-flight responses are lost and the
//! client must retry, or holds every byte (a partition that looks like a silent network, not
//! a refused or closed connection) or only the answers (a one-way partition) until released.
//!
//! Started with `start_by_client` in front of a Kafka listener, it also tells its clients
//! apart by the client id of each connection's first request, so that one client's
//! connections (say another node's replica fetcher) can be held while everyone else's flow.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub addr: SocketAddr,
    cut_tx: watch::Sender<u64>,
    /// What is not forwarded (see `hold`, `hold_replies`).
    held_tx: watch::Sender<Held>,
    /// What is not forwarded for the connections of one client id (`hold_client`).
    held_clients_tx: watch::Sender<BTreeMap<String, Held>>,
    pub connections: Arc<AtomicU64>,
    /// Connections accepted per client id (`start_by_client` only).
    pub clients: Arc<Mutex<HashMap<String, u64>>>,
}

impl Proxy {
    /// Listens on a loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        Self::start_inner(upstream, false).await
    }

    /// `start` for a Kafka listener: each connection is forwarded once its first request
    /// header names the client id, which `hold_client` can then hold.
    pub async fn start_by_client(upstream: SocketAddr) -> Proxy {
        Self::start_inner(upstream, true).await
    }

    async fn start_inner(upstream: SocketAddr, by_client: bool) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut_tx, cut_rx) = watch::channel(0u64);
        let (held_tx, held_rx) = watch::channel(Held::Nothing);
        let (held_clients_tx, held_clients_rx) = watch::channel(BTreeMap::new());
        let connections = Arc::new(AtomicU64::new(0));
        let clients = Arc::new(Mutex::new(HashMap::new()));
        let (conns, seen) = (connections.clone(), clients.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                conns.fetch_add(1, Ordering::Relaxed);
                let mut cut = cut_rx.clone();
                cut.borrow_and_update();
                let mut gate = Gate {
                    held: held_rx.clone(),
                    held_clients: held_clients_rx.clone(),
                    client: None,
                };
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut first = Vec::new();
                    if by_client {
                        let read = tokio::select! {
                            r = read_client_id(&mut client) => r,
                            _ = cut.changed() => return,
                        };
                        let Some((head, id)) = read else {
                            return;
                        };
                        *seen.lock().unwrap().entry(id.clone()).or_default() += 1;
                        gate.client = Some(id);
                        first = head;
                    }
                    // A connection accepted while held reaches the upstream only once released
                    // (as a SYN lost in a partition would, minus the client's own timeout).
                    let server = tokio::select! {
                        s = async {
                            gate.open(Held::Replies).await;
                            TcpStream::connect(upstream).await
                        } => s,
                        _ = cut.changed() => return,
                    };
                    let Ok(mut server) = server else {
                        return;
                    };
                    if server.write_all(&first).await.is_err() {
                        return;
                    }
                    pipe(client, server, cut, gate).await;
                });
            }
        });
        Proxy {
            addr,
            cut_tx,
            held_tx,
            held_clients_tx,
            connections,
            clients,
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

    /// `hold` for the connections whose first request names `client_id` only (a proxy from
    /// `start_by_client`), until `release_client` or `release`.
    pub fn hold_client(&self, client_id: &str) {
        self.held_clients_tx.send_modify(|m| {
            m.insert(client_id.to_string(), Held::All);
        });
    }

    /// `hold_replies` for the connections of `client_id` only.
    pub fn hold_client_replies(&self, client_id: &str) {
        self.held_clients_tx.send_modify(|m| {
            m.insert(client_id.to_string(), Held::Replies);
        });
    }

    /// Forwards again what `hold_client` kept back of `client_id`'s connections.
    pub fn release_client(&self, client_id: &str) {
        self.held_clients_tx.send_modify(|m| {
            m.remove(client_id);
        });
    }

    /// Forwards again whatever `hold` (or any `hold_client`) kept back, and everything after it.
    pub fn release(&self) {
        self.held_tx.send_replace(Held::Nothing);
        self.held_clients_tx.send_replace(BTreeMap::new());
    }

    /// How many connections named `client_id` so far (`start_by_client` only).
    pub fn connections_of(&self, client_id: &str) -> u64 {
        self.clients
            .lock()
            .unwrap()
            .get(client_id)
            .copied()
            .unwrap_or(0)
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

/// Reads a Kafka request's first bytes up to and including its header's client id (size,
/// api key, version, correlation id, then a nullable string): the bytes read, for the
/// upstream, and the id ("" for null). None if the client goes first.
async fn read_client_id(client: &mut TcpStream) -> Option<(Vec<u8>, String)> {
    let mut head = vec![0u8; 14];
    client.read_exact(&mut head).await.ok()?;
    let len = i16::from_be_bytes([head[12], head[13]]).max(0) as usize;
    let mut id = vec![0u8; len];
    client.read_exact(&mut id).await.ok()?;
    let name = String::from_utf8_lossy(&id).into_owned();
    head.extend_from_slice(&id);
    Some((head, name))
}

/// What holds one connection back: the proxy's level and its client id's.
#[derive(Clone)]
struct Gate {
    held: watch::Receiver<Held>,
    held_clients: watch::Receiver<BTreeMap<String, Held>>,
    client: Option<String>,
}

impl Gate {
    /// Returns once this connection is held less than `level`.
    async fn open(&mut self, level: Held) {
        loop {
            let global = *self.held.borrow_and_update();
            let own = match &self.client {
                Some(c) => self.held_clients.borrow_and_update().get(c).copied(),
                None => None,
            };
            if global.max(own.unwrap_or(Held::Nothing)) < level {
                return;
            }
            // Err: the proxy is gone, and with it any reason to wait.
            tokio::select! {
                r = self.held.changed() => if r.is_err() { return },
                r = self.held_clients.changed() => if r.is_err() { return },
            }
        }
    }
}

async fn pipe(client: TcpStream, server: TcpStream, mut cut: watch::Receiver<u64>, gate: Gate) {
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    // Bytes read while held wait here (a close too: the peer does not see it before release).
    async fn forward(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        mut gate: Gate,
        level: Held,
    ) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = from.read(&mut buf).await.unwrap_or(0);
            gate.open(level).await;
            if n == 0 || to.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    }
    tokio::select! {
        _ = forward(cr, sw, gate.clone(), Held::All) => {}
        _ = forward(sr, cw, gate, Held::Replies) => {}
        _ = cut.changed() => {}
    }
}
