//! A fake Kubernetes API server over real HTTP/1.1, for the agent started
//! with `--kubeconfig`: list and watch with resourceVersions and bookmarks
//! for every kind the agent watches, and faults the test turns on and off:
//! cut watch streams, 410 Gone (as a watch ERROR event, and as the HTTP
//! answer to a watch request), 403 for one kind, 500, a stall (requests
//! accepted and never answered, open watches gone silent, the connections
//! held open for ever), and down (the port closed, every connection cut).
//!
//! It listens on loopback inside a lab node's network namespace (where the
//! agent runs). Plain threads and blocking sockets: the test drives it
//! synchronously, and each connection is its own thread.
#![allow(dead_code)]

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io::{BufRead, BufReader, Write},
    net::{Shutdown, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

/// Every collection the agent watches: path, apiVersion, list kind.
pub const COLLECTIONS: &[(&str, &str, &str)] = &[
    ("/api/v1/namespaces", "v1", "NamespaceList"),
    ("/api/v1/pods", "v1", "PodList"),
    ("/api/v1/services", "v1", "ServiceList"),
    ("/api/v1/nodes", "v1", "NodeList"),
    (
        "/apis/discovery.k8s.io/v1/endpointslices",
        "discovery.k8s.io/v1",
        "EndpointSliceList",
    ),
    (
        "/apis/networking.k8s.io/v1/networkpolicies",
        "networking.k8s.io/v1",
        "NetworkPolicyList",
    ),
    ("/apis/apps/v1/deployments", "apps/v1", "DeploymentList"),
    ("/apis/apps/v1/replicasets", "apps/v1", "ReplicaSetList"),
    ("/apis/apps/v1/statefulsets", "apps/v1", "StatefulSetList"),
    ("/apis/apps/v1/daemonsets", "apps/v1", "DaemonSetList"),
    ("/apis/batch/v1/jobs", "batch/v1", "JobList"),
    ("/apis/batch/v1/cronjobs", "batch/v1", "CronJobList"),
    (
        "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies",
        "policy.networking.k8s.io/v1alpha2",
        "ClusterNetworkPolicyList",
    ),
    (
        "/apis/policy.networking.k8s.io/v1alpha1/adminnetworkpolicies",
        "policy.networking.k8s.io/v1alpha1",
        "AdminNetworkPolicyList",
    ),
    (
        "/apis/policy.networking.k8s.io/v1alpha1/baselineadminnetworkpolicies",
        "policy.networking.k8s.io/v1alpha1",
        "BaselineAdminNetworkPolicyList",
    ),
    (
        CRDS,
        "apiextensions.k8s.io/v1",
        "CustomResourceDefinitionList",
    ),
    // Calico's kinds through the Calico API server (an aggregated API)...
    (
        "/apis/projectcalico.org/v3/tiers",
        "projectcalico.org/v3",
        "TierList",
    ),
    (
        CALICO_NETWORK_POLICIES,
        "projectcalico.org/v3",
        "NetworkPolicyList",
    ),
    (
        CALICO_GLOBAL_NETWORK_POLICIES,
        "projectcalico.org/v3",
        "GlobalNetworkPolicyList",
    ),
    (
        "/apis/projectcalico.org/v3/stagednetworkpolicies",
        "projectcalico.org/v3",
        "StagedNetworkPolicyList",
    ),
    (
        "/apis/projectcalico.org/v3/stagedglobalnetworkpolicies",
        "projectcalico.org/v3",
        "StagedGlobalNetworkPolicyList",
    ),
    (
        "/apis/projectcalico.org/v3/stagedkubernetesnetworkpolicies",
        "projectcalico.org/v3",
        "StagedKubernetesNetworkPolicyList",
    ),
    // ... and in the CRDs Calico stores them in.
    (
        "/apis/crd.projectcalico.org/v1/tiers",
        "crd.projectcalico.org/v1",
        "TierList",
    ),
    (
        CRD_NETWORK_POLICIES,
        "crd.projectcalico.org/v1",
        "NetworkPolicyList",
    ),
    (
        CRD_GLOBAL_NETWORK_POLICIES,
        "crd.projectcalico.org/v1",
        "GlobalNetworkPolicyList",
    ),
    (
        "/apis/crd.projectcalico.org/v1/stagednetworkpolicies",
        "crd.projectcalico.org/v1",
        "StagedNetworkPolicyList",
    ),
    (
        "/apis/crd.projectcalico.org/v1/stagedglobalnetworkpolicies",
        "crd.projectcalico.org/v1",
        "StagedGlobalNetworkPolicyList",
    ),
    (
        "/apis/crd.projectcalico.org/v1/stagedkubernetesnetworkpolicies",
        "crd.projectcalico.org/v1",
        "StagedKubernetesNetworkPolicyList",
    ),
];

pub const CRDS: &str = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions";
pub const CALICO_NETWORK_POLICIES: &str = "/apis/projectcalico.org/v3/networkpolicies";
pub const CALICO_GLOBAL_NETWORK_POLICIES: &str = "/apis/projectcalico.org/v3/globalnetworkpolicies";
pub const CRD_NETWORK_POLICIES: &str = "/apis/crd.projectcalico.org/v1/networkpolicies";
pub const CRD_GLOBAL_NETWORK_POLICIES: &str =
    "/apis/crd.projectcalico.org/v1/globalnetworkpolicies";

/// Whether `path` is one of Calico's collections (absent until installed).
fn is_calico(path: &str) -> bool {
    path.starts_with("/apis/projectcalico.org/") || path.starts_with("/apis/crd.projectcalico.org/")
}

pub const PODS: &str = "/api/v1/pods";
pub const NAMESPACES: &str = "/api/v1/namespaces";
pub const NODES: &str = "/api/v1/nodes";
pub const NETWORK_POLICIES: &str = "/apis/networking.k8s.io/v1/networkpolicies";

/// A request as the server saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub at: Instant,
    pub path: String,
    pub query: HashMap<String, String>,
    pub user_agent: String,
}

impl Seen {
    pub fn is_watch(&self) -> bool {
        matches!(
            self.query.get("watch").map(String::as_str),
            Some("true" | "1")
        )
    }
}

/// How the server answers new requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Healthy,
    /// Every request answered with this status.
    Failing(u16),
    /// Requests read and never answered; open watches write nothing more.
    Stalled,
}

struct State {
    rv: u64,
    /// Watches from a version older than this get a 410 ERROR event.
    oldest_rv: u64,
    objects: BTreeMap<&'static str, BTreeMap<String, Value>>,
    /// (resourceVersion, collection, event), oldest first.
    history: Vec<(u64, &'static str, Value)>,
    mode: Mode,
    forbidden: HashSet<&'static str>,
    /// Not installed (404): the CRDs of AdminNetworkPolicy and
    /// BaselineAdminNetworkPolicy, as on most clusters, and Calico's kinds
    /// until [`FakeApiServer::install`] or [`FakeApiServer::install_crd`].
    absent: HashSet<&'static str>,
    /// The next watch request of these collections is answered HTTP 410.
    gone_next_watch: HashSet<&'static str>,
    /// Bumped to end every open watch (cut), or to expire them (410 event).
    cut_generation: u64,
    expire_generation: u64,
    requests: Vec<Seen>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    /// Open connections, to cut them when the server goes down.
    connections: Mutex<Vec<TcpStream>>,
    /// Set when the server is dropped: held connections may go.
    stopped: AtomicBool,
}

/// The fake API server; stops (and releases every held connection) when
/// dropped.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    netns: String,
    pub port: u16,
    listening: Option<(Arc<AtomicBool>, thread::JoinHandle<()>)>,
}

/// `/run/netns/NAME`: the lab's named namespaces.
fn netns_path(netns: &str) -> PathBuf {
    Path::new("/run/netns").join(netns)
}

/// Binds 127.0.0.1:`port` inside network namespace `netns`: a thread
/// enters it, binds, and leaves; the socket stays in that namespace.
fn bind_in(netns: &str, port: u16) -> TcpListener {
    let path = netns_path(netns);
    thread::spawn(move || {
        let ns = std::fs::File::open(&path).expect("open the node's netns");
        // SAFETY: setns on this short-lived thread only.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match TcpListener::bind(("127.0.0.1", port)) {
                Ok(l) => return l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("bind 127.0.0.1:{port} in the node: {e}"),
            }
        }
    })
    .join()
    .expect("bind thread")
}

impl FakeApiServer {
    /// Starts serving on loopback in `netns` (a lab node's namespace).
    pub fn start(netns: &str) -> FakeApiServer {
        let mut objects = BTreeMap::new();
        for (path, _, _) in COLLECTIONS {
            objects.insert(*path, BTreeMap::new());
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 100,
                oldest_rv: 0,
                objects,
                history: Vec::new(),
                mode: Mode::Healthy,
                forbidden: HashSet::new(),
                absent: COLLECTIONS
                    .iter()
                    .map(|(p, _, _)| *p)
                    .filter(|p| is_calico(p) || p.contains("adminnetworkpolicies"))
                    .collect(),
                gone_next_watch: HashSet::new(),
                cut_generation: 0,
                expire_generation: 0,
                requests: Vec::new(),
            }),
            changed: Condvar::new(),
            connections: Mutex::new(Vec::new()),
            stopped: AtomicBool::new(false),
        });
        let mut server = FakeApiServer {
            shared,
            netns: netns.to_string(),
            port: 0,
            listening: None,
        };
        server.up();
        server
    }

    /// A kubeconfig pointing at this server (plain http, no credentials).
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://127.0.0.1:{}\nusers:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\ncurrent-context: fake\n",
            self.port
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    /// Listening again (after [`FakeApiServer::down`]), on the same port.
    pub fn up(&mut self) {
        if self.listening.is_some() {
            return;
        }
        let listener = bind_in(&self.netns, self.port);
        self.port = listener.local_addr().expect("local addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let run = Arc::new(AtomicBool::new(true));
        let shared = Arc::clone(&self.shared);
        let keep = Arc::clone(&run);
        let accept = thread::spawn(move || {
            while keep.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        if let Ok(clone) = stream.try_clone() {
                            shared.connections.lock().unwrap().push(clone);
                        }
                        let shared = Arc::clone(&shared);
                        thread::spawn(move || serve_connection(stream, &shared));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
            // The listener closes here: new connections are refused.
        });
        self.listening = Some((run, accept));
    }

    /// Down: the port closes (connections refused) and every open
    /// connection is cut, as when the API server's process stops.
    pub fn down(&mut self) {
        if let Some((run, accept)) = self.listening.take() {
            run.store(false, Ordering::Relaxed);
            let _ = accept.join();
        }
        self.cut_connections();
    }

    fn cut_connections(&self) {
        for c in self.shared.connections.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
        self.shared.changed.notify_all();
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut state = self.shared.state.lock().unwrap();
        let out = f(&mut state);
        self.shared.changed.notify_all();
        out
    }

    /// Adds or replaces an object (its metadata.name and namespace name it).
    pub fn apply(&self, collection: &'static str, mut object: Value) {
        self.with_state(|s| {
            s.rv += 1;
            object["metadata"]["resourceVersion"] = json!(s.rv.to_string());
            let key = format!(
                "{}/{}",
                object["metadata"]["namespace"].as_str().unwrap_or(""),
                object["metadata"]["name"].as_str().unwrap_or("")
            );
            let objects = s.objects.get_mut(collection).expect("known collection");
            let kind = if objects.contains_key(&key) {
                "MODIFIED"
            } else {
                "ADDED"
            };
            objects.insert(key, object.clone());
            let rv = s.rv;
            s.history
                .push((rv, collection, json!({"type": kind, "object": object})));
        });
    }

    /// Deletes an object (a DELETED event with its last state, marked
    /// deleted); a no-op when there is none.
    pub fn delete(&self, collection: &'static str, namespace: &str, name: &str) {
        self.with_state(|s| {
            let key = format!("{namespace}/{name}");
            let objects = s.objects.get_mut(collection).expect("known collection");
            let Some(mut object) = objects.remove(&key) else {
                return;
            };
            s.rv += 1;
            object["metadata"]["resourceVersion"] = json!(s.rv.to_string());
            object["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
            let rv = s.rv;
            s.history
                .push((rv, collection, json!({"type": "DELETED", "object": object})));
        });
    }

    /// Healthy: every request answered.
    pub fn heal(&self) {
        self.with_state(|s| s.mode = Mode::Healthy);
    }

    /// Every request answered with `code` (a Status body); open watches are
    /// cut, so that the agent's re-watches meet it.
    pub fn fail_all(&self, code: u16) {
        self.with_state(|s| {
            s.mode = Mode::Failing(code);
            s.cut_generation += 1;
        });
    }

    /// Requests are read and never answered, and open watches write nothing
    /// more; the connections stay open (also after [`FakeApiServer::heal`]),
    /// as a wedged proxy or a half-dead node would hold them.
    pub fn stall(&self) {
        self.with_state(|s| s.mode = Mode::Stalled);
    }

    /// `collection` is forbidden (403), as a narrower RBAC gives.
    pub fn forbid(&self, collection: &'static str) {
        self.with_state(|s| {
            s.forbidden.insert(collection);
        });
    }

    /// `collection` is served from now on (an aggregated API such as the
    /// Calico API server, installed).
    pub fn install(&self, collection: &'static str) {
        self.with_state(|s| {
            s.absent.remove(collection);
        });
    }

    /// The CRD serving `collection` (`/apis/GROUP/VERSION/PLURAL`) is
    /// created: a CustomResourceDefinition `PLURAL.GROUP` appears, and the
    /// collection is served.
    pub fn install_crd(&self, collection: &'static str) {
        let mut parts = collection.trim_start_matches("/apis/").split('/');
        let (group, version, plural) = (
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
        );
        self.install(collection);
        self.apply(
            CRDS,
            json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
                   "metadata": {"name": format!("{plural}.{group}")},
                   "spec": {"group": group, "names": {"plural": plural},
                            "versions": [{"name": version, "served": true, "storage": true}]}}),
        );
    }

    /// Ends every open watch stream, cleanly (as the API server does at a
    /// watch's timeout or on a restart of a proxy).
    pub fn cut_watches(&self) {
        self.with_state(|s| s.cut_generation += 1);
    }

    /// The history is compacted: every open watch gets an ERROR event 410
    /// Gone, and a watch from any older version gets it too.
    pub fn expire_watches(&self) {
        self.with_state(|s| {
            s.oldest_rv = s.rv;
            s.expire_generation += 1;
        });
    }

    /// The next watch request of `collection` is answered HTTP 410 (its
    /// resourceVersion is too old), after its open watches are cut.
    pub fn gone_on_next_watch(&self, collection: &'static str) {
        self.with_state(|s| {
            s.oldest_rv = s.rv;
            s.gone_next_watch.insert(collection);
            s.cut_generation += 1;
        });
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Seen> {
        self.shared.state.lock().unwrap().requests.clone()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::Relaxed);
        self.down();
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_string(), v.replace("%3D", "=").replace("%2C", ","))
        })
        .collect()
}

fn respond(stream: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let body = serde_json::to_vec(body).unwrap_or_default();
    let reason = match code {
        200 => "OK",
        403 => "Forbidden",
        404 => "Not Found",
        410 => "Gone",
        _ => "Error",
    };
    write!(
        stream,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )?;
    stream.write_all(&body)?;
    stream.flush()
}

fn chunk(stream: &mut TcpStream, event: &Value) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(event).unwrap_or_default();
    line.push(b'\n');
    write!(stream, "{:x}\r\n", line.len())?;
    stream.write_all(&line)?;
    stream.write_all(b"\r\n")?;
    stream.flush()
}

/// Holds a connection silently until the server is dropped.
fn hold(shared: &Shared) {
    while !shared.stopped.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(100));
    }
}

fn serve_connection(stream: TcpStream, shared: &Shared) {
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut stream = stream;
    loop {
        // Request line and headers; GETs have no body.
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let target = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let mut user_agent = String::new();
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("user-agent")
            {
                user_agent = value.trim().to_string();
            }
        }
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let seen = Seen {
            at: Instant::now(),
            path: path.to_string(),
            query: parse_query(query),
            user_agent,
        };
        let watch = seen.is_watch();
        let mode = {
            let mut s = shared.state.lock().unwrap();
            s.requests.push(seen.clone());
            s.mode
        };
        let collection = COLLECTIONS.iter().find(|(p, _, _)| *p == path);
        let answered = match (mode, collection) {
            (Mode::Stalled, _) => {
                hold(shared);
                return;
            }
            (Mode::Failing(code), _) => respond(
                &mut stream,
                code,
                &status(
                    code,
                    "InternalError",
                    "the fake API server fails on purpose",
                ),
            ),
            (Mode::Healthy, None) => respond(
                &mut stream,
                404,
                &status(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ),
            ),
            (Mode::Healthy, Some((path, api_version, list_kind))) => {
                let absent = shared.state.lock().unwrap().absent.contains(path);
                if absent {
                    respond(
                        &mut stream,
                        404,
                        &status(
                            404,
                            "NotFound",
                            "the server could not find the requested resource",
                        ),
                    )
                } else if shared.state.lock().unwrap().forbidden.contains(path) {
                    respond(
                        &mut stream,
                        403,
                        &status(
                            403,
                            "Forbidden",
                            &format!(
                                "{path} is forbidden: User \"system:serviceaccount:netwatch:netwatch\" cannot list or watch it"
                            ),
                        ),
                    )
                } else if watch {
                    serve_watch(&mut stream, shared, path, &seen);
                    // A watch's connection is not reused.
                    let _ = stream.shutdown(Shutdown::Both);
                    return;
                } else {
                    let s = shared.state.lock().unwrap();
                    let items: Vec<Value> = s.objects[path].values().cloned().collect();
                    let list = json!({
                        "apiVersion": api_version, "kind": list_kind,
                        "metadata": {"resourceVersion": s.rv.to_string()},
                        "items": items,
                    });
                    drop(s);
                    respond(&mut stream, 200, &list)
                }
            }
        };
        if answered.is_err() {
            return;
        }
    }
}

/// A watch of `path` from the request's resourceVersion: chunked events,
/// a bookmark every 2 s when asked for (the real API server sends one about
/// every minute), until timeoutSeconds, a cut, an expiry or a stall.
fn serve_watch(stream: &mut TcpStream, shared: &Shared, path: &'static str, seen: &Seen) {
    let from: u64 = seen
        .query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = seen.query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = Duration::from_secs(
        seen.query
            .get("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(290),
    );
    let mut s = shared.state.lock().unwrap();
    if s.gone_next_watch.remove(path) {
        drop(s);
        let _ = respond(
            stream,
            410,
            &status(410, "Expired", &format!("too old resource version: {from}")),
        );
        return;
    }
    let (cut, expire) = (s.cut_generation, s.expire_generation);
    let gone = from < s.oldest_rv;
    drop(s);
    if write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .is_err()
    {
        return;
    }
    let end = |stream: &mut TcpStream| {
        let _ = stream.write_all(b"0\r\n\r\n");
        let _ = stream.flush();
    };
    if gone {
        let _ = chunk(
            stream,
            &json!({"type": "ERROR", "object": status(410, "Expired", &format!("too old resource version: {from}"))}),
        );
        end(stream);
        return;
    }
    let started = Instant::now();
    let mut sent = from;
    let mut last_bookmark = Instant::now();
    loop {
        let s = shared.state.lock().unwrap();
        let (s, _) = shared
            .changed
            .wait_timeout(s, Duration::from_millis(200))
            .unwrap();
        if s.mode == Mode::Stalled {
            drop(s);
            hold(shared);
            return;
        }
        if shared.stopped.load(Ordering::Relaxed) || s.cut_generation != cut {
            drop(s);
            end(stream);
            return;
        }
        if s.expire_generation != expire {
            drop(s);
            let _ = chunk(
                stream,
                &json!({"type": "ERROR", "object": status(410, "Expired", &format!("too old resource version: {sent}"))}),
            );
            end(stream);
            return;
        }
        let new: Vec<(u64, Value)> = s
            .history
            .iter()
            .filter(|(rv, c, _)| *rv > sent && *c == path)
            .map(|(rv, _, e)| (*rv, e.clone()))
            .collect();
        let now_rv = s.rv;
        drop(s);
        for (rv, event) in new {
            if chunk(stream, &event).is_err() {
                return;
            }
            sent = rv;
        }
        if bookmarks && last_bookmark.elapsed() >= Duration::from_secs(2) {
            last_bookmark = Instant::now();
            let kind = path.rsplit('/').next().unwrap_or("");
            let bookmark = json!({"type": "BOOKMARK", "object": {
                "kind": kind, "apiVersion": "v1",
                "metadata": {"resourceVersion": now_rv.max(sent).to_string()}}});
            if chunk(stream, &bookmark).is_err() {
                return;
            }
            sent = sent.max(now_rv);
        }
        if started.elapsed() >= timeout {
            end(stream);
            return;
        }
    }
}

/// The objects of a small cluster: namespaces, a node and pods named
/// `(namespace, name, ip)` on `node`.
pub fn seed(server: &FakeApiServer, node: &str, node_ip: &str, pods: &[(&str, &str, &str)]) {
    let mut namespaces: Vec<&str> = pods.iter().map(|(ns, _, _)| *ns).collect();
    namespaces.sort();
    namespaces.dedup();
    for ns in namespaces {
        server.apply(
            NAMESPACES,
            json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": ns, "labels": {"kubernetes.io/metadata.name": ns}}}),
        );
    }
    server.apply(
        NODES,
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node},
               "status": {"addresses": [{"type": "InternalIP", "address": node_ip}]}}),
    );
    for (ns, name, ip) in pods {
        server.apply(PODS, pod(node, ns, name, ip));
    }
}

/// A running pod.
pub fn pod(node: &str, namespace: &str, name: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{namespace}-{name}"),
                     "labels": {"app": name}},
        "spec": {"nodeName": node, "containers": [{"name": name, "image": "lab"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                   "conditions": [{"type": "Ready", "status": "True"}]}
    })
}
