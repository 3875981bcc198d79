//! N-node clusters of real `strom` processes on loopback: start them, kill, pause and restart
//! nodes, and ask any node what the cluster looks like (Metadata over the wire).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kafka_protocol::messages::{ApiKey, MetadataRequest, MetadataResponse};

use crate::proxy::Proxy;
use crate::{free_port, RawClient, StromProcess};

/// A partition as Metadata reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionState {
    pub leader: i32,
    pub leader_epoch: i32,
    pub replicas: Vec<i32>,
    pub isr: Vec<i32>,
    pub offline: Vec<i32>,
}

/// What one node says of the cluster.
#[derive(Debug, Clone)]
pub struct ClusterView {
    pub controller: i32,
    pub brokers: Vec<i32>,
    pub topics: Vec<(String, i16, Vec<PartitionState>)>,
}

impl ClusterView {
    pub fn partition(&self, topic: &str, p: usize) -> Option<&PartitionState> {
        self.topics
            .iter()
            .find(|(n, _, _)| n == topic)
            .and_then(|(_, _, ps)| ps.get(p))
    }
}

/// Where `start_full` puts node i+1: its controller listener's port, the directory its data
/// directory is made in (else a temporary one) and its Kafka listener's port with the address
/// it advertises (else a free port, advertised as is).
#[derive(Default)]
struct Placement {
    controller_ports: Vec<u16>,
    disks: Vec<PathBuf>,
    kafka: Vec<(u16, SocketAddr)>,
}

/// The proxies of a `Cluster::start_partitionable` cluster.
pub struct Network {
    /// `controller[&(from, to)]`: node `from`'s connections to voter `to`'s controller
    /// listener (Raft between voters, and `from`'s broker registering and heartbeating when
    /// `to` is the active controller).
    pub controller: HashMap<(i32, i32), Proxy>,
    /// `kafka[&to]`: in front of node `to`'s Kafka listener, the address it advertises.
    pub kafka: HashMap<i32, Proxy>,
}

impl Network {
    /// The client id of node `id`'s replica fetcher.
    pub fn fetcher(id: i32) -> String {
        format!("broker-{id}-fetcher-0")
    }

    /// Holds every byte between nodes `a` and `b`, both ways (a silent network: nothing is
    /// closed or refused), until `heal`. Clients still reach both.
    pub fn cut(&self, a: i32, b: i32) {
        for (from, to) in [(a, b), (b, a)] {
            if let Some(p) = self.controller.get(&(from, to)) {
                p.hold();
            }
            self.kafka[&to].hold_client(&Self::fetcher(from));
        }
    }

    /// A one-way partition: what node `from` sends to node `to` still arrives (its requests,
    /// and its answers to `to`'s requests), but nothing from `to` reaches `from`.
    pub fn cut_one_way(&self, from: i32, to: i32) {
        if let Some(p) = self.controller.get(&(from, to)) {
            p.hold_replies();
        }
        if let Some(p) = self.controller.get(&(to, from)) {
            p.hold();
        }
        self.kafka[&to].hold_client_replies(&Self::fetcher(from));
        self.kafka[&from].hold_client(&Self::fetcher(to));
    }

    /// Forwards again everything held.
    pub fn heal(&self) {
        for p in self.controller.values().chain(self.kafka.values()) {
            p.release();
        }
    }
}

pub struct Cluster {
    /// Node i+1 is `nodes[i]`.
    pub nodes: Vec<StromProcess>,
    /// The voters' controller listeners, `--controller-quorum` style (what a node is given
    /// unless `start_routed` routes it elsewhere).
    pub quorum: String,
}

impl Cluster {
    /// Starts `n` nodes, all brokers and controller voters, with extra `--set` settings; waits
    /// until every node serves and all `n` brokers are registered and unfenced.
    pub fn start(n: usize, sets: &[&str]) -> Cluster {
        Self::start_with(n, sets, |_| Vec::new())
    }

    /// `start` with extra `--set` settings per node (`node_sets(id)`), e.g. `broker.rack`.
    pub fn start_with(n: usize, sets: &[&str], node_sets: impl Fn(i32) -> Vec<String>) -> Cluster {
        Self::start_mixed(n, 0, sets, node_sets)
    }

    /// `voters` nodes that are brokers and controller voters (ids 1..=voters), then
    /// `broker_only` nodes that are not in `--controller-quorum` (Kafka's
    /// `process.roles=broker`; each with its own `--controller-listen`). Waits until every node
    /// serves and all of them are registered and unfenced.
    pub fn start_mixed(
        voters: usize,
        broker_only: usize,
        sets: &[&str],
        node_sets: impl Fn(i32) -> Vec<String>,
    ) -> Cluster {
        let n = voters + broker_only;
        let controller_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        Self::start_routed(
            voters,
            broker_only,
            sets,
            node_sets,
            &controller_ports,
            |_, _, addr| addr,
        )
    }

    /// `start_mixed` where node i+1's controller listener is on `controller_ports[i]` and
    /// each node has its own `--controller-quorum`: node `node` reaches voter `peer` at
    /// `route(node, peer, peer_listener)` (e.g. a proxy in front of `peer_listener`), its own
    /// entry staying its listener. Voters are always dialled at their `--controller-quorum`
    /// address (the membership's addresses count only for broker-only nodes), so every
    /// controller connection between voters takes the route given here.
    pub fn start_routed(
        voters: usize,
        broker_only: usize,
        sets: &[&str],
        node_sets: impl Fn(i32) -> Vec<String>,
        controller_ports: &[u16],
        route: impl Fn(i32, i32, SocketAddr) -> SocketAddr,
    ) -> Cluster {
        let at = Placement {
            controller_ports: controller_ports.to_vec(),
            ..Placement::default()
        };
        Self::start_full(voters, broker_only, sets, node_sets, at, route)
    }

    /// `voters` voters and `broker_only` broker-only nodes (as `start_mixed`) whose links go
    /// through proxies of `Network`, so that a test can partition the network between nodes
    /// while clients still reach every node: each node reaches each voter's controller
    /// listener through a proxy of its own, and advertises a proxy in front of its Kafka
    /// listener, which the other nodes' replica fetchers (told apart by their client id) and
    /// the clients go through. Not proxied: the active controller's connections to a
    /// broker-only node's controller listener (the metadata log it replicates to it; a node
    /// joins at the address it listens on).
    pub async fn start_partitionable(
        voters: usize,
        broker_only: usize,
        sets: &[&str],
    ) -> (Cluster, Network) {
        let n = voters + broker_only;
        let controller_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let kafka_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let local = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let mut net = Network {
            controller: HashMap::new(),
            kafka: HashMap::new(),
        };
        let mut kafka = Vec::new();
        for from in 1..=n as i32 {
            let port = kafka_ports[from as usize - 1];
            let proxy = Proxy::start_by_client(local(port)).await;
            kafka.push((port, proxy.addr));
            net.kafka.insert(from, proxy);
            for to in (1..=voters as i32).filter(|to| *to != from) {
                let upstream = local(controller_ports[to as usize - 1]);
                net.controller
                    .insert((from, to), Proxy::start(upstream).await);
            }
        }
        let routes: HashMap<(i32, i32), SocketAddr> = net
            .controller
            .iter()
            .map(|(link, p)| (*link, p.addr))
            .collect();
        let at = Placement {
            controller_ports,
            kafka,
            ..Placement::default()
        };
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let c = tokio::task::spawn_blocking(move || {
            let sets: Vec<&str> = sets.iter().map(|s| s.as_str()).collect();
            Self::start_full(
                voters,
                broker_only,
                &sets,
                |_| Vec::new(),
                at,
                |node, peer, _| routes[&(node, peer)],
            )
        })
        .await
        .unwrap();
        (c, net)
    }

    /// `start` with node i+1's data directory inside `disks[i]` (e.g. a small file system of
    /// its own, to fill up).
    pub fn start_on(n: usize, sets: &[&str], disks: &[PathBuf]) -> Cluster {
        let at = Placement {
            controller_ports: (0..n).map(|_| free_port()).collect(),
            disks: disks.to_vec(),
            ..Placement::default()
        };
        Self::start_full(n, 0, sets, |_| Vec::new(), at, |_, _, addr| addr)
    }

    fn start_full(
        voters: usize,
        broker_only: usize,
        sets: &[&str],
        node_sets: impl Fn(i32) -> Vec<String>,
        at: Placement,
        route: impl Fn(i32, i32, SocketAddr) -> SocketAddr,
    ) -> Cluster {
        let Placement {
            controller_ports,
            disks,
            kafka,
        } = at;
        let n = voters + broker_only;
        assert_eq!(controller_ports.len(), n, "one controller port per node");
        let listener = |i: usize| SocketAddr::from(([127, 0, 0, 1], controller_ports[i]));
        let quorum_of = |node: Option<i32>| {
            (0..voters)
                .map(|i| {
                    let peer = i as i32 + 1;
                    let addr = match node {
                        Some(node) if node != peer => route(node, peer, listener(i)),
                        _ => listener(i),
                    };
                    format!("{peer}@{addr}")
                })
                .collect::<Vec<_>>()
                .join(",")
        };
        let quorum = quorum_of(None);
        let mut nodes = Vec::new();
        for (i, port) in controller_ports.iter().enumerate() {
            let tmp = match disks.get(i) {
                Some(parent) => tempfile::tempdir_in(parent),
                None => tempfile::tempdir(),
            }
            .unwrap();
            let dir = tmp.path().to_path_buf();
            let id = (i + 1).to_string();
            let listen = format!("127.0.0.1:{port}");
            let node_quorum = quorum_of(Some(i as i32 + 1));
            let extra = [
                "--node-id",
                id.as_str(),
                "--controller-quorum",
                node_quorum.as_str(),
                "--controller-listen",
                listen.as_str(),
            ];
            let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
            let port = kafka.get(i).map(|(port, advertised)| {
                args.extend(["--advertise".to_string(), advertised.to_string()]);
                *port
            });
            for s in sets
                .iter()
                .map(|s| s.to_string())
                .chain(node_sets(i as i32 + 1))
            {
                args.push("--set".into());
                args.push(s);
            }
            let log_path = std::env::temp_dir().join(format!(
                "strom-cluster-{}-{}-node{}.log",
                std::process::id(),
                free_port(),
                i + 1
            ));
            let mut p = StromProcess::new_stopped(dir, Some(tmp), port, args, log_path);
            p.spawn_nowait();
            nodes.push(p);
        }
        let mut c = Cluster { nodes, quorum };
        for p in c.nodes.iter_mut() {
            p.wait_listening(Duration::from_secs(60));
        }
        c.wait_brokers(n, Duration::from_secs(30));
        c
    }

    pub fn node(&mut self, id: i32) -> &mut StromProcess {
        &mut self.nodes[(id - 1) as usize]
    }

    /// Every node's listener, comma-separated (a client bootstrap list).
    pub fn bootstrap(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.bootstrap())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Metadata for all topics from the first running node that answers (paused ones are
    /// skipped).
    pub fn view(&mut self) -> Option<ClusterView> {
        for n in self.nodes.iter_mut() {
            if !n.is_running() || n.is_paused() {
                continue;
            }
            if let Some(v) = view_of(n) {
                return Some(v);
            }
        }
        None
    }

    /// Metadata as node `id` sees it.
    pub fn view_from(&mut self, id: i32) -> Option<ClusterView> {
        view_of(self.node(id))
    }

    pub fn wait_brokers(&mut self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.view() {
                if v.brokers.len() == n && v.controller > 0 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "cluster did not reach {n} live brokers; logs:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `f` holds for the partition as some running node reports it.
    pub fn wait_partition(
        &mut self,
        topic: &str,
        p: usize,
        timeout: Duration,
        what: &str,
        f: impl Fn(&PartitionState) -> bool,
    ) -> PartitionState {
        self.wait_partition_in(None, topic, p, timeout, what, f)
    }

    /// Waits until `f` holds for the partition as node `id` reports it (a test that then asks
    /// that node must not rely on another node having seen the change first).
    pub fn wait_partition_from(
        &mut self,
        id: i32,
        topic: &str,
        p: usize,
        timeout: Duration,
        what: &str,
        f: impl Fn(&PartitionState) -> bool,
    ) -> PartitionState {
        self.wait_partition_in(Some(id), topic, p, timeout, what, f)
    }

    fn wait_partition_in(
        &mut self,
        from: Option<i32>,
        topic: &str,
        p: usize,
        timeout: Duration,
        what: &str,
        f: impl Fn(&PartitionState) -> bool,
    ) -> PartitionState {
        let deadline = Instant::now() + timeout;
        loop {
            let view = match from {
                Some(id) => self.view_from(id),
                None => self.view(),
            };
            if let Some(s) = view.as_ref().and_then(|v| v.partition(topic, p).cloned()) {
                if f(&s) {
                    return s;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{topic}/{p}: {what} did not happen; view {view:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| format!("---- node {} ----\n{}", i + 1, tail(&n.log(), 60)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

fn view_of(n: &StromProcess) -> Option<ClusterView> {
    let mut c = RawClient::try_connect(n.addr())?;
    c.stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .ok()?;
    let req = MetadataRequest::default().with_topics(None);
    let resp: MetadataResponse = c.try_call(ApiKey::Metadata, 12, &req)?;
    let mut brokers: Vec<i32> = resp.brokers.iter().map(|b| b.node_id.0).collect();
    brokers.sort_unstable();
    let mut topics = Vec::new();
    for t in resp.topics {
        let mut parts: Vec<(i32, PartitionState)> = t
            .partitions
            .iter()
            .map(|p| {
                (
                    p.partition_index,
                    PartitionState {
                        leader: p.leader_id.0,
                        leader_epoch: p.leader_epoch,
                        replicas: p.replica_nodes.iter().map(|b| b.0).collect(),
                        isr: p.isr_nodes.iter().map(|b| b.0).collect(),
                        offline: p.offline_replicas.iter().map(|b| b.0).collect(),
                    },
                )
            })
            .collect();
        parts.sort_by_key(|(i, _)| *i);
        let name = t.name.map(|n| n.0.to_string()).unwrap_or_default();
        topics.push((
            name,
            t.error_code,
            parts.into_iter().map(|(_, s)| s).collect(),
        ));
    }
    Some(ClusterView {
        controller: resp.controller_id.0,
        brokers,
        topics,
    })
}
