//! Test kit for black-box tests: start real `strom` processes on loopback, kill and restart
//! them, and speak raw Kafka wire to them when a test needs bytes no client would send.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};

pub mod cluster;
pub mod proxy;

/// The strom binary: `STROM_BIN`, else the release (then debug) build in the target dir.
pub fn strom_bin() -> PathBuf {
    if let Ok(p) = std::env::var("STROM_BIN") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf();
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    for profile in ["release", "debug"] {
        let p = target.join(profile).join("strom");
        if p.exists() {
            return p;
        }
    }
    panic!(
        "no strom binary: build it with `cargo build --release -p strom` or set STROM_BIN (looked in {})",
        target.display()
    );
}

/// Runs `strom ARGS... --bootstrap BOOTSTRAP` (an admin command); returns whether it
/// succeeded and its stdout and stderr together.
pub fn strom_cli(bootstrap: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(strom_bin())
        .args(args)
        .arg("--bootstrap")
        .arg(bootstrap)
        .output()
        .expect("run strom");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A port nothing listens on, for a server the test starts next. It is taken from below the
/// kernel's ephemeral range: outbound connections (clients, brokers talking to each other)
/// get their local ports from that range and could take a port chosen there before the server
/// binds it. Each test process walks its own sequence through the range.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let high = ephemeral_low.clamp(2048, 65535);
    let low = high.saturating_sub(16384).max(1024);
    let span = high - low;
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let i = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (low + (start + i.wrapping_mul(97)) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `strom server` with its own data directory.
pub struct StromProcess {
    child: Option<Child>,
    pub port: u16,
    data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    args: Vec<String>,
    pub log_path: PathBuf,
    paused: bool,
}

impl StromProcess {
    /// Starts a broker with extra `--set name=value` settings.
    pub fn start(sets: &[&str]) -> StromProcess {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        Self::start_in(dir, Some(tmp), sets)
    }

    pub fn start_in(
        data_dir: PathBuf,
        tmp: Option<tempfile::TempDir>,
        sets: &[&str],
    ) -> StromProcess {
        Self::start_with(data_dir, tmp, None, sets, &[])
    }

    /// Full control: a fixed port (else a free one) and extra command-line arguments.
    pub fn start_with(
        data_dir: PathBuf,
        tmp: Option<tempfile::TempDir>,
        port: Option<u16>,
        sets: &[&str],
        extra_args: &[&str],
    ) -> StromProcess {
        let mut args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        for s in sets {
            args.push("--set".to_string());
            args.push(s.to_string());
        }
        let log_path = std::env::temp_dir().join(format!(
            "strom-test-{}-{}.log",
            std::process::id(),
            free_port()
        ));
        let mut p = Self::new_stopped(data_dir, tmp, port, args, log_path);
        p.spawn();
        p
    }

    fn new_stopped(
        data_dir: PathBuf,
        tmp: Option<tempfile::TempDir>,
        port: Option<u16>,
        args: Vec<String>,
        log_path: PathBuf,
    ) -> StromProcess {
        StromProcess {
            child: None,
            port: port.unwrap_or_else(free_port),
            data_dir,
            _tmp: tmp,
            args,
            log_path,
            paused: false,
        }
    }

    /// Starts the process without waiting for its listener (cluster nodes listen only once a
    /// quorum exists, so they must all be started first).
    pub fn spawn_nowait(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        let child = Command::new(strom_bin())
            .arg("server")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn strom");
        self.child = Some(child);
    }

    /// Waits (bounded) until the Kafka listener accepts connections.
    pub fn wait_listening(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while TcpStream::connect(self.addr()).is_err() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("strom exited with {status} at start:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "strom did not start listening:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn spawn(&mut self) {
        self.spawn_nowait();
        self.wait_listening(Duration::from_secs(20));
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The exit code once the process has ended by itself (`None` while it runs, or if a
    /// signal ended it); the process is then reaped and can be `restart`ed.
    pub fn exit_code(&mut self) -> Option<i32> {
        self.exit_status()?.code()
    }

    /// How the process ended, once it has (`None` while it runs); it is then reaped and can
    /// be `restart`ed.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        self.paused = false;
        Some(status)
    }

    pub fn kill9(&mut self) {
        self.paused = false;
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP: the process stops where it is (a GC pause, a stalled VM, a node cut off) with
    /// its sockets open; peers see silence, not a closed connection. Undo with `resume`.
    pub fn pause(&mut self) {
        self.signal(libc::SIGSTOP);
        self.paused = true;
    }

    /// SIGCONT after `pause`: it goes on from where it stopped, with whatever it believed then.
    pub fn resume(&mut self) {
        self.signal(libc::SIGCONT);
        self.paused = false;
    }

    /// Stopped by `pause` (it would accept a connection and never answer).
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    fn signal(&mut self, sig: i32) {
        let c = self.child.as_ref().expect("the process is running");
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        let rc = unsafe { libc::kill(c.id() as i32, sig) };
        assert_eq!(rc, 0, "kill({sig}) failed");
    }

    /// SIGTERM and wait (bounded) for a clean exit; returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        self.terminate_status().is_some_and(|s| s.success())
    }

    /// SIGTERM and wait (bounded) for the exit: how it ended, or None if it had to be killed
    /// after 20 s (or was not running).
    pub fn terminate_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_ref()?;
        self.signal(libc::SIGTERM);
        if self.paused {
            // A stopped process keeps SIGTERM pending until it runs again.
            self.resume();
        }
        let mut c = self.child.take()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts again on the same port and data directory.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart after kill9 or terminate");
        self.spawn();
    }
}

impl Drop for StromProcess {
    fn drop(&mut self) {
        self.kill9();
        // STROM_KEEP_LOGS=1 keeps every node's whole log (to study a failure).
        if std::env::var_os("STROM_KEEP_LOGS").is_some() {
            eprintln!("log kept: {}", self.log_path.display());
        } else {
            let _ = std::fs::remove_file(&self.log_path);
        }
    }
}

/// A raw Kafka connection: send requests built from `kafka-protocol` types (or any bytes) and
/// read responses.
pub struct RawClient {
    pub stream: TcpStream,
    correlation_id: i32,
}

impl RawClient {
    pub fn connect(addr: SocketAddr) -> RawClient {
        Self::try_connect(addr).expect("connect")
    }

    /// Connects with short timeouts (cluster probes must not hang on a paused node).
    pub fn try_connect(addr: SocketAddr) -> Option<RawClient> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .ok()?;
        Some(RawClient {
            stream,
            correlation_id: 0,
        })
    }

    pub fn send_bytes(&mut self, body: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(&(body.len() as i32).to_be_bytes())?;
        self.stream.write_all(body)
    }

    /// Reads one response frame; `None` if the broker closed the connection.
    pub fn read_frame(&mut self) -> Option<Bytes> {
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len).ok()?;
        let len = i32::from_be_bytes(len);
        assert!(len >= 0, "negative response size");
        let mut buf = vec![0u8; len as usize];
        self.stream.read_exact(&mut buf).ok()?;
        Some(Bytes::from(buf))
    }

    /// True when the broker has closed this connection (EOF within the timeout).
    pub fn is_closed_by_peer(&mut self) -> bool {
        self.stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut b = [0u8; 1];
        matches!(self.stream.read(&mut b), Ok(0) | Err(_))
    }

    pub fn header(&mut self, key: ApiKey, version: i16) -> RequestHeader {
        self.correlation_id += 1;
        RequestHeader::default()
            .with_request_api_key(key as i16)
            .with_request_api_version(version)
            .with_correlation_id(self.correlation_id)
            .with_client_id(Some(StrBytes::from_static_str("strom-tests")))
    }

    /// Sends a typed request and decodes the typed response.
    pub fn call<Req: Encodable + HeaderVersion, Resp: Decodable + HeaderVersion>(
        &mut self,
        key: ApiKey,
        version: i16,
        req: &Req,
    ) -> Resp {
        self.try_call(key, version, req)
            .expect("broker closed the connection")
    }

    pub fn try_call<Req: Encodable + HeaderVersion, Resp: Decodable + HeaderVersion>(
        &mut self,
        key: ApiKey,
        version: i16,
        req: &Req,
    ) -> Option<Resp> {
        let header = self.header(key, version);
        let mut buf = BytesMut::new();
        header
            .encode(&mut buf, Req::header_version(version))
            .unwrap();
        req.encode(&mut buf, version).unwrap();
        self.send_bytes(&buf).ok()?;
        let mut frame = self.read_frame()?;
        let rh = ResponseHeader::decode(&mut frame, Resp::header_version(version)).unwrap();
        assert_eq!(rh.correlation_id, header.correlation_id);
        let resp = Resp::decode(&mut frame, version).unwrap();
        assert_eq!(frame.remaining(), 0, "response has trailing bytes");
        Some(resp)
    }
}

/// Produces one batch to partition 0 of `topic` with acks=all (Produce v9); returns the
/// partition's error code and base offset.
pub fn produce_raw(c: &mut RawClient, topic: &str, batch: Bytes) -> (i16, i64) {
    produce_raw_to(c, topic, 0, batch)
}

/// ListOffsets (v7) for partition `partition` of `topic` at `timestamp` (-1 latest, -2
/// earliest); returns the error code and the offset.
pub fn list_offset(c: &mut RawClient, topic: &str, partition: i32, timestamp: i64) -> (i16, i64) {
    use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
    use kafka_protocol::messages::{BrokerId, ListOffsetsRequest, ListOffsetsResponse, TopicName};
    let req = ListOffsetsRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_topics(vec![ListOffsetsTopic::default()
            .with_name(TopicName(StrBytes::from_string(topic.to_string())))
            .with_partitions(vec![ListOffsetsPartition::default()
                .with_partition_index(partition)
                .with_timestamp(timestamp)])]);
    let r: ListOffsetsResponse = c.call(ApiKey::ListOffsets, 7, &req);
    let p = &r.topics[0].partitions[0];
    (p.error_code, p.offset)
}

/// `produce_raw` to a given partition.
pub fn produce_raw_to(c: &mut RawClient, topic: &str, partition: i32, batch: Bytes) -> (i16, i64) {
    use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
    use kafka_protocol::messages::{ProduceRequest, ProduceResponse, TopicName};
    let req = ProduceRequest::default()
        .with_acks(-1)
        .with_timeout_ms(5000)
        .with_topic_data(vec![TopicProduceData::default()
            .with_name(TopicName(StrBytes::from_string(topic.into())))
            .with_partition_data(vec![PartitionProduceData::default()
                .with_index(partition)
                .with_records(Some(batch))])]);
    let resp: ProduceResponse = c.call(ApiKey::Produce, 9, &req);
    let r = &resp.responses[0].partition_responses[0];
    (r.error_code, r.base_offset)
}

/// Builds raw request bytes (header v1) with an arbitrary body, for malformed-input tests.
pub fn raw_request(key: i16, version: i16, correlation_id: i32, body: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_i16(key);
    b.put_i16(version);
    b.put_i32(correlation_id);
    b.put_i16(5);
    b.put_slice(b"tests");
    b.put_slice(body);
    b.to_vec()
}

/// A header v2 (flexible) request with an arbitrary body.
pub fn raw_flexible_request(key: i16, version: i16, correlation_id: i32, body: &[u8]) -> Vec<u8> {
    let mut b = raw_request(key, version, correlation_id, &[]);
    b.push(0); // no tagged fields in the header
    b.extend_from_slice(body);
    b
}

/// Polls `f` until it returns Some, or panics after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether every thread of process `pid` is traced (ptrace-attached).
pub fn all_threads_traced(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("status"))
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with("TracerPid:") && l.split_whitespace().nth(1) != Some("0"))
    })
}

/// strace attached to process `pid`, failing with EIO the fsyncs (`fdatasync`, `fsync`,
/// `syncfs`) of the given paths, as a failing disk does: all of them, or those `when` selects
/// (strace's syntax, counted per thread: "1" fails each thread's first). Returns once every
/// thread is traced; the strace ends with the process, or when killed.
pub fn fail_fsyncs(pid: u32, paths: &[PathBuf], when: Option<&str>) -> Child {
    let inject = match when {
        Some(w) => format!("error=EIO:when={w}"),
        None => "error=EIO".to_string(),
    };
    trace_fsyncs(pid, paths, &inject)
}

/// strace attached to process `pid`, delaying every fsync by `delay` before it runs, as a
/// slow (or overloaded) disk does, until `stop_tracing`.
pub fn slow_fsyncs(pid: u32, delay: Duration) -> Child {
    trace_fsyncs(pid, &[], &format!("delay_enter={}", delay.as_micros()))
}

/// Detaches a strace from its process (which goes on untraced) and reaps it.
pub fn stop_tracing(mut strace: Child) {
    // SIGINT: strace detaches from every thread before it exits.
    // SAFETY: kill(2) with a pid this test spawned and a valid signal number.
    unsafe { libc::kill(strace.id() as i32, libc::SIGINT) };
    let _ = strace.wait();
}

/// strace attached to every thread of `pid` with `inject` (strace's `-e inject=` terms) on
/// the fsyncs of `paths` (all fsyncs if none).
fn trace_fsyncs(pid: u32, paths: &[PathBuf], inject: &str) -> Child {
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-qq", "-o", "/dev/null", "-p", &pid.to_string()]);
    for p in paths {
        cmd.arg("-P").arg(p);
    }
    let strace = cmd
        .args(["-e", "trace=fdatasync,fsync,syncfs"])
        .arg("-e")
        .arg(format!("inject=fdatasync,fsync,syncfs:{inject}"))
        .spawn()
        .expect("strace (the test command installs it)");
    // A process that fails its first fsync at once may be gone before all are seen traced.
    wait_for(Duration::from_secs(30), "strace attached", || {
        (all_threads_traced(pid) || has_exited(pid)).then_some(())
    });
    strace
}

/// Whether process `pid` has ended (a zombie not yet reaped by its parent, or gone).
pub fn has_exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| matches!(rest.trim_start().chars().next(), Some('Z' | 'X'))),
        Err(_) => true,
    }
}

/// Waits (30 s) until `node` stops by itself on a storage failure: exit status 74 and `why` in
/// its log. Reaps the strace (`fail_fsyncs`) that caused it.
pub fn expect_storage_halt(node: &mut StromProcess, mut strace: Child, why: &str) {
    let code = wait_for(Duration::from_secs(30), "the node stops by itself", || {
        node.exit_code()
    });
    let _ = strace.wait();
    assert_eq!(code, 74, "{}", node.log());
    assert!(node.log().contains(why), "{}", node.log());
}

/// A tmpfs of its own (a small disk to fill up), unmounted on drop. `None` where it cannot be
/// mounted (not root).
pub struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    pub fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then_some(SmallDisk { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the disk with a file `filler` until `room` bytes are left; remove the file to
    /// give the space back.
    pub fn fill_leaving(&self, room: u64) -> PathBuf {
        let filler = self.path().join("filler");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&filler)
            .unwrap();
        let chunk = vec![0u8; 64 << 10];
        while self.free_bytes() > room + chunk.len() as u64 {
            f.write_all(&chunk).unwrap();
        }
        f.sync_all().unwrap();
        filler
    }

    pub fn free_bytes(&self) -> u64 {
        let path = std::ffi::CString::new(self.path().as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: statvfs(3) fills the zeroed struct; the path is NUL-terminated.
        unsafe {
            let mut st: libc::statvfs = std::mem::zeroed();
            assert_eq!(libc::statvfs(path.as_ptr(), &mut st), 0);
            st.f_bavail as u64 * st.f_frsize as u64
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}
