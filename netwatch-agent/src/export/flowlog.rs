//! The flow log: one JSON object per line, in Hubble's export shape
//! (`{"flow": {...}, "node_name": ..., "time": ...}`), to stdout or a file
//! rotated by size.
//!
//! Writing happens on a thread of its own behind a bounded queue: a slow or
//! full disk (or a stdout pipe nobody reads) never stalls the capture loop
//! and never grows memory. A record that finds the queue full, or whose write
//! fails, is dropped and counted (`netwatch_flow_log_dropped_records_total`),
//! with one warning per episode in the agent's log.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
    sync::{
        Arc,
        mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use prometheus::IntCounter;

use super::filter::FilterSet;
use crate::flow::record::FlowRecord;

/// Where the flow log goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlowLogTarget {
    Stdout,
    File(PathBuf),
    /// No flow log (`--flow-log none`).
    Off,
}

impl std::str::FromStr for FlowLogTarget {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "stdout" | "-" => FlowLogTarget::Stdout,
            "none" => FlowLogTarget::Off,
            path => FlowLogTarget::File(PathBuf::from(path)),
        })
    }
}

/// How the flow log is written.
#[derive(Clone, Debug)]
pub struct FlowLogConfig {
    pub target: FlowLogTarget,
    /// Rotate the file when the next line would take it past this size
    /// (0: never rotate).
    pub max_size_bytes: u64,
    /// Rotated files kept: `PATH.1` (newest) to `PATH.N`.
    pub max_backups: usize,
    /// Which records are written.
    pub filters: FilterSet,
    /// Records waiting for the writer at most; beyond, records are dropped.
    pub queue_records: usize,
    /// netwatch's own lines or Hubble's.
    pub format: FlowLogFormat,
}

/// `--flow-log-format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum FlowLogFormat {
    /// netwatch's records: Hubble's shape with netwatch's verdicts, kernel
    /// drop reasons and additions (README, "Flow log").
    #[default]
    Netwatch,
    /// Valid Hubble: each line an observer.GetFlowsResponse in protojson,
    /// only Hubble's fields and enum values (netwatch's in `Summary`).
    Hubble,
}

impl FlowLogFormat {
    /// One record as its line, newline included.
    pub fn encode(self, record: &FlowRecord) -> Vec<u8> {
        match self {
            FlowLogFormat::Netwatch => encode_line(record),
            FlowLogFormat::Hubble => {
                let mut buf = serde_json::to_vec(&super::hubble::to_get_flows_response(record))
                    .unwrap_or_default();
                buf.push(b'\n');
                buf
            }
        }
    }
}

impl Default for FlowLogConfig {
    fn default() -> Self {
        FlowLogConfig {
            target: FlowLogTarget::Stdout,
            max_size_bytes: 10 * 1024 * 1024,
            max_backups: 5,
            filters: FilterSet::default(),
            queue_records: 4096,
            format: FlowLogFormat::Netwatch,
        }
    }
}

/// Errors opening the flow log.
#[derive(Debug, thiserror::Error)]
pub enum FlowLogError {
    #[error("cannot open flow log {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the flow log writer: {0}")]
    Thread(io::Error),
}

/// The flow log's counters, exported as metrics.
#[derive(Clone, Debug)]
pub struct FlowLogCounters {
    /// Lines written.
    pub written: IntCounter,
    /// Records lost: queue full or write failed.
    pub dropped: IntCounter,
    /// Failed writes (each also a dropped record).
    pub write_errors: IntCounter,
    /// Records the allow/deny filters kept out.
    pub filtered: IntCounter,
}

impl FlowLogCounters {
    /// Counters not registered anywhere (tests, benchmarks).
    pub fn detached() -> FlowLogCounters {
        let c = |n: &str| IntCounter::new(n, n).expect("valid metric name");
        FlowLogCounters {
            written: c("written"),
            dropped: c("dropped"),
            write_errors: c("write_errors"),
            filtered: c("filtered"),
        }
    }
}

/// The flow log's front end, owned by the capture loop.
pub struct FlowLog {
    tx: Option<SyncSender<Arc<FlowRecord>>>,
    thread: Option<JoinHandle<()>>,
    done: Option<Receiver<()>>,
    filters: FilterSet,
    counters: FlowLogCounters,
    /// When the queue was last found full (one warning per episode).
    full_since: Option<Instant>,
}

impl FlowLog {
    /// Open the target (so a bad path fails at start) and start the writer.
    pub fn start(
        config: &FlowLogConfig,
        counters: FlowLogCounters,
    ) -> Result<FlowLog, FlowLogError> {
        let out: Box<dyn LineSink> = match &config.target {
            FlowLogTarget::Off => {
                return Ok(FlowLog {
                    tx: None,
                    thread: None,
                    done: None,
                    filters: config.filters.clone(),
                    counters,
                    full_since: None,
                });
            }
            FlowLogTarget::Stdout => Box::new(StdoutSink(Pending::default())),
            FlowLogTarget::File(path) => Box::new(RotatingFile::open(
                path,
                config.max_size_bytes,
                config.max_backups,
            )?),
        };
        let (tx, rx) = mpsc::sync_channel::<Arc<FlowRecord>>(config.queue_records.max(1));
        let (done_tx, done_rx) = mpsc::channel();
        let c = counters.clone();
        let format = config.format;
        let thread = std::thread::Builder::new()
            .name("flow-log".into())
            .spawn(move || {
                writer_loop(rx, out, &c, format);
                let _ = done_tx.send(());
            })
            .map_err(FlowLogError::Thread)?;
        Ok(FlowLog {
            tx: Some(tx),
            thread: Some(thread),
            done: Some(done_rx),
            filters: config.filters.clone(),
            counters,
            full_since: None,
        })
    }

    /// Queue one record; never blocks.
    pub fn write(&mut self, record: &Arc<FlowRecord>) {
        let Some(tx) = &self.tx else { return };
        if !self.filters.admits(record) {
            self.counters.filtered.inc();
            return;
        }
        match tx.try_send(record.clone()) {
            Ok(()) => {
                if let Some(since) = self.full_since.take() {
                    tracing::info!(after = ?since.elapsed(), "flow log writer caught up");
                }
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.counters.dropped.inc();
                if self.full_since.is_none() {
                    self.full_since = Some(Instant::now());
                    tracing::warn!(
                        "flow log writer is behind (slow or full disk, or nobody reads stdout): dropping records; \
                         counted in netwatch_flow_log_dropped_records_total"
                    );
                }
            }
        }
    }

    /// Stop accepting records, let the writer write what is queued, and wait
    /// for it at most `timeout` (a hung disk must not hang shutdown).
    pub fn close(&mut self, timeout: Duration) {
        self.tx = None;
        if let Some(done) = self.done.take() {
            match done.recv_timeout(timeout) {
                Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                    if let Some(t) = self.thread.take() {
                        let _ = t.join();
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    tracing::warn!(
                        "flow log writer did not finish within {timeout:?}; records still queued are lost"
                    );
                }
            }
        }
    }
}

impl Drop for FlowLog {
    fn drop(&mut self) {
        self.close(Duration::from_secs(5));
    }
}

/// Lines waiting to be written, and what became of written ones: lines
/// are only counted as written once all their bytes are, so a full disk's
/// losses are counted exactly.
#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    /// End offset of each line in `buf`.
    ends: Vec<usize>,
    written: u64,
    lost: u64,
    error: Option<io::Error>,
}

impl Pending {
    fn push(&mut self, line: &[u8]) {
        self.buf.extend_from_slice(line);
        self.ends.push(self.buf.len());
    }

    /// Write everything pending to `out`.
    fn drain(&mut self, out: &mut impl Write) {
        let mut done = 0;
        let mut failure = None;
        while done < self.buf.len() {
            match out.write(&self.buf[done..]) {
                Ok(0) => {
                    failure = Some(io::Error::from(io::ErrorKind::WriteZero));
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let ok = self.ends.iter().filter(|end| **end <= done).count();
        self.written += ok as u64;
        self.lost += (self.ends.len() - ok) as u64;
        if let Some(e) = failure {
            self.error.get_or_insert(e);
        }
        self.buf.clear();
        self.ends.clear();
    }
}

/// Where the writer thread puts lines.
trait LineSink: Send {
    /// Queue one line (a rotation may write what is pending first).
    fn push(&mut self, line: &[u8]);
    /// Write what is pending.
    fn flush(&mut self);
    /// Lines written and lost since the last call, and the first error.
    fn outcome(&mut self) -> (u64, u64, Option<io::Error>);
}

fn take_outcome(p: &mut Pending) -> (u64, u64, Option<io::Error>) {
    let out = (p.written, p.lost, p.error.take());
    p.written = 0;
    p.lost = 0;
    out
}

struct StdoutSink(Pending);

impl LineSink for StdoutSink {
    fn push(&mut self, line: &[u8]) {
        self.0.push(line);
    }
    fn flush(&mut self) {
        let mut out = io::stdout().lock();
        self.0.drain(&mut out);
        let _ = out.flush();
    }
    fn outcome(&mut self) -> (u64, u64, Option<io::Error>) {
        take_outcome(&mut self.0)
    }
}

/// A file rotated by size: `PATH` is current, `PATH.1` the newest backup.
pub struct RotatingFile {
    path: PathBuf,
    file: File,
    /// Bytes in the current file, written or pending.
    size: u64,
    max_size: u64,
    max_backups: usize,
    pending: Pending,
}

impl RotatingFile {
    /// Open `path` for appending (its current size counts toward rotation).
    pub fn open(
        path: &Path,
        max_size: u64,
        max_backups: usize,
    ) -> Result<RotatingFile, FlowLogError> {
        let open_err = |source| FlowLogError::Open {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(open_err)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(open_err)?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(RotatingFile {
            path: path.to_path_buf(),
            file,
            size,
            max_size,
            max_backups,
            pending: Pending::default(),
        })
    }

    fn backup(&self, n: usize) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    }

    fn rotate(&mut self) -> io::Result<()> {
        if self.max_backups == 0 {
            fs::remove_file(&self.path).or_else(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })?;
        } else {
            let _ = fs::remove_file(self.backup(self.max_backups));
            for n in (1..self.max_backups).rev() {
                let from = self.backup(n);
                if from.exists() {
                    fs::rename(&from, self.backup(n + 1))?;
                }
            }
            fs::rename(&self.path, self.backup(1))?;
        }
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

impl LineSink for RotatingFile {
    fn push(&mut self, line: &[u8]) {
        let len = line.len() as u64;
        if self.max_size > 0 && self.size > 0 && self.size + len > self.max_size {
            self.pending.drain(&mut self.file);
            if let Err(e) = self.rotate() {
                // Keep appending to the current file rather than lose lines.
                self.pending.error.get_or_insert(e);
                self.size = 0;
            }
        }
        self.pending.push(line);
        self.size += len;
    }
    fn flush(&mut self) {
        self.pending.drain(&mut self.file);
    }
    fn outcome(&mut self) -> (u64, u64, Option<io::Error>) {
        take_outcome(&mut self.pending)
    }
}

/// One record as its flow log line, newline included.
pub fn encode_line(record: &FlowRecord) -> Vec<u8> {
    let line = FlowLogLineRef {
        flow: record,
        node_name: &record.node_name,
        time: &record.time,
    };
    let mut buf = serde_json::to_vec(&line).unwrap_or_default();
    buf.push(b'\n');
    buf
}

/// [`crate::flow::record::FlowLogLine`] by reference: serializing needs no copy of the record.
#[derive(serde::Serialize)]
struct FlowLogLineRef<'a> {
    flow: &'a FlowRecord,
    node_name: &'a str,
    time: &'a chrono::DateTime<chrono::Utc>,
}

fn writer_loop(
    rx: Receiver<Arc<FlowRecord>>,
    mut out: Box<dyn LineSink>,
    counters: &FlowLogCounters,
    format: FlowLogFormat,
) {
    let mut failing = false;
    let mut settle = |out: &mut Box<dyn LineSink>| {
        let (written, lost, error) = out.outcome();
        counters.written.inc_by(written);
        counters.dropped.inc_by(lost);
        match error {
            Some(e) => {
                counters.write_errors.inc();
                if !failing {
                    failing = true;
                    tracing::error!(
                        "writing the flow log: {e}; records are dropped until writes succeed again"
                    );
                }
            }
            None if written > 0 && failing => {
                failing = false;
                tracing::info!("flow log writes succeed again");
            }
            None => {}
        }
    };
    while let Ok(first) = rx.recv() {
        out.push(&format.encode(&first));
        // Take whatever else is queued, then write once: lines reach the
        // file promptly, without a syscall per line under load.
        for _ in 0..1024 {
            match rx.try_recv() {
                Ok(r) => out.push(&format.encode(&r)),
                Err(_) => break,
            }
        }
        out.flush();
        settle(&mut out);
    }
    out.flush();
    settle(&mut out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::filter::{FlowFilter, tests::record};
    use crate::flow::record::FlowLogLine;
    use serde_json::json;

    #[test]
    fn lines_have_hubbles_export_shape() {
        let r = record(json!({}));
        let v: serde_json::Value = serde_json::from_slice(&encode_line(&r)).unwrap();
        assert_eq!(v["node_name"], "node-1");
        assert_eq!(v["time"], "2026-11-22T02:14:07.113Z");
        assert_eq!(v["flow"]["verdict"], "DROPPED");
        assert_eq!(v["flow"]["source"]["labels"][0], "k8s:app=web");
        // Same as the owned line type.
        let owned = serde_json::to_value(FlowLogLine::new(r)).unwrap();
        assert_eq!(v, owned);
    }

    #[test]
    fn file_rotates_by_size_and_keeps_max_backups() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flows.jsonl");
        let line_len = encode_line(&record(json!({}))).len() as u64;
        let config = FlowLogConfig {
            target: FlowLogTarget::File(path.clone()),
            max_size_bytes: line_len * 3,
            max_backups: 2,
            ..FlowLogConfig::default()
        };
        let counters = FlowLogCounters::detached();
        let mut log = FlowLog::start(&config, counters.clone()).unwrap();
        for i in 0..10 {
            log.write(&Arc::new(record(json!({"uuid": format!("u-{i}")}))));
        }
        log.close(Duration::from_secs(10));
        assert_eq!(counters.written.get(), 10);
        let uuids = |p: &Path| -> Vec<String> {
            fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).unwrap()["flow"]["uuid"]
                        .as_str()
                        .unwrap()
                        .to_string()
                })
                .collect()
        };
        // 10 lines, 3 per file: u-9 current; u-6..8 in .1; u-3..5 in .2; u-0..2 rotated away.
        assert_eq!(uuids(&path), ["u-9"]);
        assert_eq!(
            uuids(&dir.path().join("flows.jsonl.1")),
            ["u-6", "u-7", "u-8"]
        );
        assert_eq!(
            uuids(&dir.path().join("flows.jsonl.2")),
            ["u-3", "u-4", "u-5"]
        );
        assert!(!dir.path().join("flows.jsonl.3").exists());
    }

    #[test]
    fn allow_and_deny_filters_decide_what_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.jsonl");
        let config = FlowLogConfig {
            target: FlowLogTarget::File(path.clone()),
            filters: FilterSet {
                allow: vec![FlowFilter::parse_expr("verdict=DROPPED").unwrap()],
                deny: vec![FlowFilter::parse_expr("to-port=53").unwrap()],
            },
            ..FlowLogConfig::default()
        };
        let counters = FlowLogCounters::detached();
        let mut log = FlowLog::start(&config, counters.clone()).unwrap();
        log.write(&Arc::new(record(json!({"uuid": "kept"}))));
        log.write(&Arc::new(record(
            json!({"uuid": "timed-out", "verdict": "TIMED_OUT"}),
        )));
        log.write(&Arc::new(record(
            json!({"uuid": "dns", "l4": {"UDP": {"source_port": 1, "destination_port": 53}}}),
        )));
        log.close(Duration::from_secs(10));
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("\"kept\""));
        assert_eq!((counters.written.get(), counters.filtered.get()), (1, 2));
    }

    #[test]
    fn a_stalled_writer_drops_and_counts_instead_of_blocking_or_growing() {
        // A sink that blocks until released: a hung disk.
        struct Stuck(Arc<std::sync::Mutex<()>>, u64);
        impl LineSink for Stuck {
            fn push(&mut self, _: &[u8]) {
                drop(self.0.lock());
                self.1 += 1;
            }
            fn flush(&mut self) {}
            fn outcome(&mut self) -> (u64, u64, Option<io::Error>) {
                (std::mem::take(&mut self.1), 0, None)
            }
        }
        let gate = Arc::new(std::sync::Mutex::new(()));
        let held = gate.lock().unwrap();
        let (tx, rx) = mpsc::sync_channel(8);
        let counters = FlowLogCounters::detached();
        let c = counters.clone();
        let sink = Stuck(gate.clone(), 0);
        let thread = std::thread::spawn(move || {
            writer_loop(rx, Box::new(sink), &c, FlowLogFormat::Netwatch)
        });
        let mut log = FlowLog {
            tx: Some(tx),
            thread: None,
            done: None,
            filters: FilterSet::default(),
            counters: counters.clone(),
            full_since: None,
        };
        let r = Arc::new(record(json!({})));
        let start = Instant::now();
        for _ in 0..10_000 {
            log.write(&r);
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "writes must not block on a stuck disk"
        );
        // At most one record is in the stuck write and 8 are queued:
        // everything else is dropped, nothing piles up.
        let dropped = counters.dropped.get();
        assert!((10_000 - 9..=10_000 - 8).contains(&dropped), "{dropped}");
        drop(held);
        log.tx = None;
        thread.join().unwrap();
        assert_eq!(counters.written.get() + dropped, 10_000);
    }

    #[test]
    fn failed_writes_are_counted_as_dropped() {
        /// A disk with room for `room` bytes.
        struct Full {
            room: usize,
            pending: Pending,
            taken: Vec<u8>,
        }
        impl Write for Full {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                if self.room == 0 {
                    return Err(io::Error::from_raw_os_error(libc::ENOSPC));
                }
                let n = b.len().min(self.room);
                self.room -= n;
                self.taken.extend_from_slice(&b[..n]);
                Ok(n)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        impl LineSink for Full {
            fn push(&mut self, line: &[u8]) {
                self.pending.push(line);
            }
            fn flush(&mut self) {
                let mut p = std::mem::take(&mut self.pending);
                p.drain(self);
                self.pending = p;
            }
            fn outcome(&mut self) -> (u64, u64, Option<io::Error>) {
                take_outcome(&mut self.pending)
            }
        }
        let line_len = encode_line(&record(json!({}))).len();
        // Room for two and a half lines.
        let sink = Full {
            room: line_len * 5 / 2,
            pending: Pending::default(),
            taken: Vec::new(),
        };
        let (tx, rx) = mpsc::sync_channel(16);
        let counters = FlowLogCounters::detached();
        let c = counters.clone();
        for _ in 0..5 {
            tx.send(Arc::new(record(json!({})))).unwrap();
        }
        drop(tx);
        let thread = std::thread::spawn(move || {
            writer_loop(rx, Box::new(sink), &c, FlowLogFormat::Netwatch)
        });
        thread.join().unwrap();
        // Two lines made it whole; the half line and the other two are lost.
        assert_eq!((counters.written.get(), counters.dropped.get()), (2, 3));
        assert!(counters.write_errors.get() >= 1);
    }

    #[test]
    fn unwritable_path_fails_at_start_with_the_path() {
        let err = FlowLog::start(
            &FlowLogConfig {
                target: FlowLogTarget::File("/proc/netwatch/flows.jsonl".into()),
                ..FlowLogConfig::default()
            },
            FlowLogCounters::detached(),
        )
        .err()
        .expect("cannot open under /proc")
        .to_string();
        assert!(err.contains("/proc/netwatch/flows.jsonl"), "{err}");
    }
}
