//! The observe API: recent flows and a live follow, for `netwatch observe`
//! and `netwatch top`, on a Unix socket (and, by opt-in, TCP on loopback).
//!
//! The protocol is newline-delimited JSON. The client sends one request
//! line:
//!
//! ```json
//! {"allow": [{"verdict": ["DROPPED"], "to-port": ["8080"]}], "deny": [], "last": 20, "since": "2026-11-22T02:00:00Z", "follow": true}
//! ```
//!
//! (`allow` and `deny` are lists of [`FlowFilter`]s in their JSON form; every
//! field may be left out). The agent answers with one status line,
//! `{"status": "ok", "node_name": ..., "buffered": N, "capacity": N}` or
//! `{"error": "..."}`, then the matching buffered records (the last `last`
//! of them, newer than `since`), one flow log line each
//! (`{"flow": {...}, "node_name": ..., "time": ...}`), then
//! `{"end_of_history": true}`, and, with `follow`, every new matching record
//! as it comes. When records could not be delivered because the client
//! fell behind, a `{"lost_records": N}` line (N: total so far) says so.
//!
//! The agent filters: a busy node never ships everything to a client. A
//! slow or vanished client never blocks capture: each has a bounded queue,
//! and what does not fit is dropped and counted in
//! `netwatch_observer_dropped_records_total`.

use std::{
    collections::VecDeque,
    io,
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use prometheus::{IntCounter, IntGauge};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{
        AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter,
    },
    sync::mpsc,
};

use super::{filter::FilterSet, flowlog::encode_line};
use crate::flow::record::FlowRecord;

/// The default socket, where `netwatch observe` looks first.
pub const DEFAULT_SOCKET: &str = "/run/netwatch/netwatch.sock";

/// Errors starting the observe API.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {path}: {source}")]
    Socket {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} is in use by another running agent (it accepts connections); stop it or pick another --api-socket"
    )]
    SocketInUse { path: String },
    #[error(
        "--api-addr {addr}: only loopback addresses (127.0.0.1, [::1]) are allowed; the observe API has no authentication"
    )]
    NotLoopback { addr: SocketAddr },
    #[error("cannot listen on {addr}: {source}")]
    Tcp {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Where and how the observe API listens.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// Unix socket path (`None`: no socket).
    pub socket: Option<PathBuf>,
    /// The socket's group (gid): its members may read flows. `None` keeps
    /// the agent's own group (root's, in a cluster).
    pub socket_group: Option<u32>,
    /// TCP address on loopback (opt-in).
    pub tcp: Option<SocketAddr>,
    /// Recent records kept for `--last` and `--since`.
    pub buffer_records: usize,
    /// Records queued per following client before its records are dropped.
    pub client_queue: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            socket: Some(PathBuf::from(DEFAULT_SOCKET)),
            socket_group: None,
            tcp: None,
            buffer_records: 4096,
            client_queue: 1024,
        }
    }
}

/// What a client asks for.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ObserveRequest {
    #[serde(flatten)]
    pub filters: FilterSet,
    /// The last N matching buffered records (`None`: all of them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<usize>,
    /// Only records at or after this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
    /// Keep the connection open and stream new matching records.
    #[serde(default)]
    pub follow: bool,
    /// The first N matching buffered records (oldest first), instead of the
    /// last (`hubble observe --first`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first: Option<usize>,
    /// Only records at or before this time (`hubble observe --until`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
}

/// The first line of every answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ObserveStatus {
    pub status: String,
    pub node_name: String,
    /// Records in the agent's buffer now.
    pub buffered: usize,
    /// The buffer's size.
    pub capacity: usize,
}

struct Subscriber {
    filters: FilterSet,
    tx: mpsc::Sender<Arc<FlowRecord>>,
    lost: Arc<AtomicU64>,
}

struct HubState {
    ring: VecDeque<Arc<FlowRecord>>,
    subscribers: Vec<Subscriber>,
}

/// The ring of recent records and the following clients.
pub struct ObserveHub {
    state: Mutex<HubState>,
    capacity: usize,
    client_queue: usize,
    node_name: String,
    dropped: IntCounter,
    clients: IntGauge,
}

/// What a client gets when it subscribes.
pub struct Subscription {
    pub history: Vec<Arc<FlowRecord>>,
    /// New records, when following.
    pub live: Option<mpsc::Receiver<Arc<FlowRecord>>>,
    /// Records dropped to this client so far.
    pub lost: Arc<AtomicU64>,
    pub status: ObserveStatus,
}

impl ObserveHub {
    pub fn new(
        config: &ApiConfig,
        node_name: &str,
        dropped: IntCounter,
        clients: IntGauge,
    ) -> ObserveHub {
        ObserveHub {
            state: Mutex::new(HubState {
                ring: VecDeque::with_capacity(config.buffer_records.min(65_536)),
                subscribers: Vec::new(),
            }),
            capacity: config.buffer_records.max(1),
            client_queue: config.client_queue.max(1),
            node_name: node_name.to_string(),
            dropped,
            clients,
        }
    }

    /// Keep `record` and hand it to every following client that wants it;
    /// never waits.
    pub fn publish(&self, record: &Arc<FlowRecord>) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        if st.ring.len() >= self.capacity {
            st.ring.pop_front();
        }
        st.ring.push_back(record.clone());
        if st.subscribers.is_empty() {
            return;
        }
        let before = st.subscribers.len();
        st.subscribers.retain(|s| {
            if !s.filters.admits(record) {
                return !s.tx.is_closed();
            }
            match s.tx.try_send(record.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    s.lost.fetch_add(1, Ordering::Relaxed);
                    self.dropped.inc();
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        if st.subscribers.len() != before {
            self.clients.set(st.subscribers.len() as i64);
        }
    }

    /// The buffered records `request` asks for and, when it follows, a
    /// queue of new ones. Atomic: no record is missed or repeated between
    /// the two.
    pub fn subscribe(&self, request: &ObserveRequest) -> Subscription {
        let lost = Arc::new(AtomicU64::new(0));
        let Ok(mut st) = self.state.lock() else {
            return Subscription {
                history: Vec::new(),
                live: None,
                lost,
                status: self.status(0, "error"),
            };
        };
        let matching = st
            .ring
            .iter()
            .filter(|r| {
                request.since.is_none_or(|s| r.time >= s)
                    && request.until.is_none_or(|u| r.time <= u)
                    && request.filters.admits(r)
            })
            .cloned();
        let mut history: Vec<Arc<FlowRecord>> = matching.collect();
        if let Some(n) = request.first {
            history.truncate(n);
        } else if let Some(n) = request.last {
            let skip = history.len().saturating_sub(n);
            history.drain(..skip);
        }
        let live = request.follow.then(|| {
            let (tx, rx) = mpsc::channel(self.client_queue);
            st.subscribers.push(Subscriber {
                filters: request.filters.clone(),
                tx,
                lost: lost.clone(),
            });
            self.clients.set(st.subscribers.len() as i64);
            rx
        });
        let status = self.status(st.ring.len(), "ok");
        Subscription {
            history,
            live,
            lost,
            status,
        }
    }

    fn status(&self, buffered: usize, status: &str) -> ObserveStatus {
        ObserveStatus {
            status: status.into(),
            node_name: self.node_name.clone(),
            buffered,
            capacity: self.capacity,
        }
    }

    /// Clients following now.
    pub fn followers(&self) -> usize {
        self.state
            .lock()
            .map(|s| s.subscribers.iter().filter(|s| !s.tx.is_closed()).count())
            .unwrap_or(0)
    }
}

/// The listening observe API; removes its socket file when dropped.
pub struct ObserveServer {
    socket: Option<PathBuf>,
    /// Where it listens on TCP (the bound port when 0 was asked).
    pub tcp_addr: Option<SocketAddr>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl ObserveServer {
    /// Bind the socket and/or TCP address and serve `hub` on them.
    ///
    /// A non-loopback TCP address is refused. A socket or port that cannot
    /// be bound (in use, no permission) is logged and left off: capture and
    /// the other outputs matter more than the live tail.
    pub async fn start(
        config: &ApiConfig,
        hub: Arc<ObserveHub>,
    ) -> Result<ObserveServer, ServerError> {
        if let Some(addr) = config.tcp.filter(|a| !a.ip().is_loopback()) {
            return Err(ServerError::NotLoopback { addr });
        }
        let mut server = ObserveServer {
            socket: None,
            tcp_addr: None,
            tasks: Vec::new(),
        };
        if let Some(path) = &config.socket {
            match bind_unix(path, config.socket_group).await {
                Ok(listener) => {
                    server.socket = Some(path.clone());
                    tracing::info!(socket = %path.display(), "observe API listening on {}", path.display());
                    server
                        .tasks
                        .push(tokio::spawn(accept_loop(listener, hub.clone())));
                }
                Err(e) => tracing::error!("{e}; the observe API socket is off (--api-socket)"),
            }
        }
        if let Some(addr) = config.tcp {
            let bound = tokio::net::TcpListener::bind(addr)
                .await
                .and_then(|l| l.local_addr().map(|a| (l, a)));
            match bound {
                Ok((listener, bound)) => {
                    server.tcp_addr = Some(bound);
                    tracing::info!(addr = %bound, "observe API listening on tcp://{bound}");
                    server.tasks.push(tokio::spawn(accept_loop(listener, hub)));
                }
                Err(source) => tracing::error!(
                    "{}; the observe API on TCP is off (--api-addr)",
                    ServerError::Tcp { addr, source }
                ),
            }
        }
        Ok(server)
    }

    /// The socket it listens on, if binding it worked.
    pub fn socket(&self) -> Option<&Path> {
        self.socket.as_deref()
    }
}

impl Drop for ObserveServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(p) = &self.socket {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A listening socket of either kind the observe API serves on.
trait Listener: Send + 'static {
    type Stream: AsyncRead + AsyncWrite + Send + 'static;
    fn accept_stream(&self) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

impl Listener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_stream(&self) -> io::Result<Self::Stream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_stream(&self) -> io::Result<Self::Stream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

/// Serve every client that connects, until the task is aborted. A failed
/// accept (out of file descriptors, say) is retried after a pause: the API
/// stays up once the pressure is gone.
async fn accept_loop<L: Listener>(listener: L, hub: Arc<ObserveHub>) {
    loop {
        match listener.accept_stream().await {
            Ok(stream) => {
                tokio::spawn(serve_client(stream, hub.clone()));
            }
            Err(e) => {
                tracing::warn!("observe API: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn bind_unix(
    path: &Path,
    group: Option<u32>,
) -> Result<tokio::net::UnixListener, ServerError> {
    let err = |source| ServerError::Socket {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    if path.exists() {
        // A socket left by an agent that was killed is removed; one that
        // answers belongs to a running agent and is not taken over.
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(ServerError::SocketInUse {
                path: path.display().to_string(),
            });
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    // Flows name pods and addresses: the owner and the socket's group only.
    // Bound under a temporary name, restricted, then renamed into place, so
    // that nobody can connect while the socket still has the umask's mode.
    let mut staging = path.as_os_str().to_owned();
    staging.push(format!(".{}.new", std::process::id()));
    let staging = PathBuf::from(staging);
    let _ = std::fs::remove_file(&staging);
    let listener = tokio::net::UnixListener::bind(&staging).map_err(err)?;
    let restricted = std::os::unix::fs::chown(&staging, None, group)
        .and_then(|()| std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o660)))
        .and_then(|()| std::fs::rename(&staging, path));
    if let Err(e) = restricted {
        let _ = std::fs::remove_file(&staging);
        return Err(err(e));
    }
    Ok(listener)
}

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;
/// A client that accepts nothing for this long is disconnected.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

async fn write_json<W: AsyncWrite + Unpin>(w: &mut W, v: &impl Serialize) -> io::Result<()> {
    let mut line = serde_json::to_vec(v).map_err(io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await
}

/// One client: read its request, answer, and follow if asked.
pub async fn serve_client<S: AsyncRead + AsyncWrite + Send + 'static>(
    stream: S,
    hub: Arc<ObserveHub>,
) {
    let (r, w) = tokio::io::split(stream);
    let mut reader = BufReader::new(r.take(MAX_REQUEST));
    let mut w = BufWriter::new(w);
    let mut line = String::new();
    match tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line)).await {
        Ok(Ok(n)) if n > 0 => {}
        _ => return,
    }
    let request: ObserveRequest = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(e) => {
            let _ = write_json(
                &mut w,
                &serde_json::json!({"error": format!("bad request: {e}")}),
            )
            .await;
            let _ = w.flush().await;
            return;
        }
    };
    let sub = hub.subscribe(&request);
    let result: io::Result<()> = async {
        write_json(&mut w, &sub.status).await?;
        for r in &sub.history {
            tokio::time::timeout(WRITE_TIMEOUT, w.write_all(&encode_line(r))).await.map_err(io::Error::other)??;
        }
        write_json(&mut w, &serde_json::json!({"end_of_history": true})).await?;
        w.flush().await?;
        let Some(mut live) = sub.live else { return Ok(()) };
        let mut reported = 0;
        let mut scratch = String::new();
        loop {
            tokio::select! {
                r = live.recv() => {
                    let Some(r) = r else { return Ok(()) };
                    tokio::time::timeout(WRITE_TIMEOUT, w.write_all(&encode_line(&r))).await.map_err(io::Error::other)??;
                    // Write what else is queued before flushing.
                    while let Ok(r) = live.try_recv() {
                        tokio::time::timeout(WRITE_TIMEOUT, w.write_all(&encode_line(&r))).await.map_err(io::Error::other)??;
                    }
                    let lost = sub.lost.load(Ordering::Relaxed);
                    if lost > reported {
                        reported = lost;
                        write_json(&mut w, &serde_json::json!({"lost_records": lost})).await?;
                    }
                    tokio::time::timeout(WRITE_TIMEOUT, w.flush()).await.map_err(io::Error::other)??;
                }
                n = reader.read_line(&mut scratch) => {
                    // The client closed its end (or sent more than one request).
                    if matches!(n, Ok(0) | Err(_)) {
                        return Ok(());
                    }
                    scratch.clear();
                }
            }
        }
    }
    .await;
    if let Err(e) = result {
        tracing::debug!("observe client gone: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::filter::{FlowFilter, tests::record};
    use serde_json::{Value, json};

    fn hub(buffer: usize, queue: usize) -> Arc<ObserveHub> {
        let config = ApiConfig {
            socket: None,
            socket_group: None,
            tcp: None,
            buffer_records: buffer,
            client_queue: queue,
        };
        Arc::new(ObserveHub::new(
            &config,
            "node-1",
            IntCounter::new("d", "d").unwrap(),
            IntGauge::new("c", "c").unwrap(),
        ))
    }

    fn rec(uuid: &str, port: u16) -> Arc<FlowRecord> {
        Arc::new(record(
            json!({"uuid": uuid, "l4": {"TCP": {"source_port": 40000, "destination_port": port}}}),
        ))
    }

    fn request(filter: &str, last: Option<usize>, follow: bool) -> ObserveRequest {
        ObserveRequest {
            filters: FilterSet {
                allow: vec![FlowFilter::parse_expr(filter).unwrap()],
                deny: vec![],
            },
            last,
            since: None,
            follow,
            ..ObserveRequest::default()
        }
    }

    #[test]
    fn history_is_filtered_bounded_and_last_n() {
        let h = hub(5, 8);
        for i in 0..8u16 {
            h.publish(&rec(&format!("u{i}"), if i % 2 == 0 { 80 } else { 443 }));
        }
        // The ring holds the last 5: u3..u7.
        let s = h.subscribe(&request("", None, false));
        let ids: Vec<&str> = s.history.iter().map(|r| r.uuid.as_str()).collect();
        assert_eq!(ids, ["u3", "u4", "u5", "u6", "u7"]);
        let s = h.subscribe(&request("to-port=80", Some(2), false));
        let ids: Vec<&str> = s.history.iter().map(|r| r.uuid.as_str()).collect();
        assert_eq!(ids, ["u4", "u6"]);
        assert!(s.live.is_none());
        assert_eq!((s.status.buffered, s.status.capacity), (5, 5));
    }

    #[test]
    fn first_and_until_as_hubble_observe() {
        let h = hub(10, 8);
        for (i, t) in ["01:00", "02:00", "03:00", "04:00"].iter().enumerate() {
            h.publish(&Arc::new(record(
                json!({"uuid": format!("u{i}"), "time": format!("2026-11-22T{t}:00Z")}),
            )));
        }
        let mut req = request("", Some(1), false);
        req.first = Some(2);
        let ids = |req: &ObserveRequest| -> Vec<String> {
            h.subscribe(req)
                .history
                .iter()
                .map(|r| r.uuid.clone())
                .collect()
        };
        assert_eq!(ids(&req), ["u0", "u1"], "--first wins over --last");
        let mut req = request("", None, false);
        req.until = Some("2026-11-22T02:30:00Z".parse().unwrap());
        assert_eq!(ids(&req), ["u0", "u1"]);
        req.last = Some(1);
        assert_eq!(ids(&req), ["u1"], "the last one before --until");
    }

    #[test]
    fn since_drops_older_records() {
        let h = hub(10, 8);
        h.publish(&Arc::new(record(
            json!({"uuid": "old", "time": "2026-11-22T01:00:00Z"}),
        )));
        h.publish(&Arc::new(record(
            json!({"uuid": "new", "time": "2026-11-22T03:00:00Z"}),
        )));
        let mut req = request("", None, false);
        req.since = Some("2026-11-22T02:00:00Z".parse().unwrap());
        let s = h.subscribe(&req);
        assert_eq!(s.history.len(), 1);
        assert_eq!(s.history[0].uuid, "new");
    }

    #[test]
    fn a_slow_follower_loses_records_and_never_blocks_publish() {
        let h = hub(10, 4);
        let mut s = h.subscribe(&request("to-port=80", None, true));
        for i in 0..100 {
            h.publish(&rec(&format!("u{i}"), 80));
            h.publish(&rec(&format!("x{i}"), 443));
        }
        // 4 fit in its queue; 96 dropped and counted; the other port never queued.
        assert_eq!(s.lost.load(Ordering::Relaxed), 96);
        assert_eq!(h.dropped.get(), 96);
        let live = s.live.as_mut().unwrap();
        let mut got = Vec::new();
        while let Ok(r) = live.try_recv() {
            got.push(r.uuid.clone());
        }
        assert_eq!(got, ["u0", "u1", "u2", "u3"]);
    }

    #[test]
    fn a_vanished_follower_is_forgotten() {
        let h = hub(10, 4);
        let s = h.subscribe(&request("", None, true));
        assert_eq!(h.followers(), 1);
        drop(s);
        h.publish(&rec("u", 80));
        assert_eq!(h.followers(), 0);
        assert_eq!(h.clients.get(), 0);
    }

    async fn converse(
        h: Arc<ObserveHub>,
        request: &str,
    ) -> (tokio::io::DuplexStream, tokio::task::JoinHandle<()>) {
        let (client, server) = tokio::io::duplex(1 << 20);
        let task = tokio::spawn(serve_client(server, h));
        let mut client = client;
        client.write_all(request.as_bytes()).await.unwrap();
        (client, task)
    }

    async fn read_lines(client: &mut (impl AsyncRead + Unpin), n: usize) -> Vec<Value> {
        let mut r = BufReader::new(client);
        let mut out = Vec::new();
        for _ in 0..n {
            let mut l = String::new();
            tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut l))
                .await
                .expect("line in time")
                .unwrap();
            out.push(serde_json::from_str(&l).unwrap());
        }
        out
    }

    #[tokio::test]
    async fn protocol_status_history_end_then_live_records() {
        let h = hub(10, 8);
        h.publish(&rec("before", 8080));
        h.publish(&rec("other", 53));
        let (mut client, _task) = converse(
            h.clone(),
            "{\"allow\": [{\"to-port\": [\"8080\"]}], \"follow\": true}\n",
        )
        .await;
        let lines = read_lines(&mut client, 3).await;
        assert_eq!(lines[0]["status"], "ok");
        assert_eq!(lines[0]["node_name"], "node-1");
        assert_eq!(lines[1]["flow"]["uuid"], "before");
        assert_eq!(lines[1]["node_name"], "node-1");
        assert_eq!(lines[2]["end_of_history"], true);
        // Wait for the subscription, then publish.
        while h.followers() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        h.publish(&rec("skip", 53));
        h.publish(&rec("live", 8080));
        let lines = read_lines(&mut client, 1).await;
        assert_eq!(lines[0]["flow"]["uuid"], "live");
    }

    #[tokio::test]
    async fn bad_requests_get_an_error_line() {
        let h = hub(10, 8);
        let (mut client, task) =
            converse(h, "{\"allow\": [{\"verdict\": [\"FORWARDED\"]}]}\n").await;
        let lines = read_lines(&mut client, 1).await;
        let e = lines[0]["error"].as_str().unwrap();
        assert!(e.contains("verdict") && e.contains("TIMED_OUT"), "{e}");
        task.await.unwrap();
    }

    #[tokio::test]
    async fn socket_serves_and_is_removed_on_drop_and_a_live_one_is_not_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/netwatch.sock");
        let h = hub(10, 8);
        h.publish(&rec("a", 80));
        let config = ApiConfig {
            socket: Some(path.clone()),
            ..ApiConfig::default()
        };
        let server = ObserveServer::start(&config, h.clone()).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        assert!(
            std::fs::read_dir(path.parent().unwrap())
                .unwrap()
                .all(|e| e.unwrap().file_name() == "netwatch.sock"),
            "no staging name is left behind"
        );
        // A second agent on the same socket runs without it.
        let err = bind_unix(&path, None).await.err().unwrap().to_string();
        assert!(err.contains("in use"), "{err}");
        let second = ObserveServer::start(&config, h.clone()).await.unwrap();
        assert!(second.socket().is_none());
        drop(second);
        assert!(
            path.exists(),
            "the second agent leaves the first one's socket alone"
        );
        let mut c = tokio::net::UnixStream::connect(&path).await.unwrap();
        c.write_all(b"{\"last\": 1}\n").await.unwrap();
        let lines = read_lines(&mut c, 3).await;
        assert_eq!(lines[1]["flow"]["uuid"], "a");
        drop(server);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn the_socket_belongs_to_the_configured_group() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("netwatch.sock");
        // A group this process may give files to: its own supplementary or
        // primary one unless it is root, who may give any.
        // SAFETY: plain getters.
        let (uid, own_gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let gid = if uid == 0 { 65534 } else { own_gid };
        let config = ApiConfig {
            socket: Some(path.clone()),
            socket_group: Some(gid),
            ..ApiConfig::default()
        };
        let _server = ObserveServer::start(&config, hub(10, 8)).await.unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.gid(), gid);
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    }

    #[tokio::test]
    async fn tcp_only_on_loopback() {
        let h = hub(10, 8);
        let config = ApiConfig {
            socket: None,
            tcp: Some("0.0.0.0:0".parse().unwrap()),
            ..ApiConfig::default()
        };
        let err = ObserveServer::start(&config, h.clone())
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("loopback"), "{err}");
        let config = ApiConfig {
            socket: None,
            tcp: Some("127.0.0.1:0".parse().unwrap()),
            ..ApiConfig::default()
        };
        let server = ObserveServer::start(&config, h).await.unwrap();
        assert_ne!(server.tcp_addr.unwrap().port(), 0);
    }
}
