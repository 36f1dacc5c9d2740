//! End-to-end: 100 `observe` followers at once on the real agent's socket,
//! with filters, a third of them slow readers, under a flood of denied
//! flows. Capture and the flow log are unaffected (every flow of the flood
//! in the log with its exact count); each follower gets every record its
//! filter admits or is told it lost it (`lost_records`), and the loss
//! metric counts exactly what the followers were told.

mod support;

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use netwatch_lab::{Outcome, Probe};
use serde_json::{Value, json};
use support::{Agent, lab, node_http_get, slowed};

const LAB: &str = r#"
nodes:
  - name: node-1
    nftables: |
      table inet lab {
        chain forward {
          type filter hook forward priority 0; policy accept;
          ip daddr 10.244.1.3 tcp dport 8080 counter drop comment "drop-api"
        }
      }
pods:
  - { name: web, namespace: prod, node: node-1, ip: 10.244.1.2 }
  - { name: api, namespace: prod, node: node-1, ip: 10.244.1.3, listen: ["8080/tcp"] }
"#;

const FOLLOWERS: usize = 100;
const FLOWS: u16 = 150;
const SYNS: u32 = 5;
const FIRST_PORT: u16 = 43_000;

/// Whether a follower's filter admits a record, decided here.
type Admits = Box<dyn Fn(&Value) -> bool + Send + Sync>;

/// The filters followers ask for, and the same decision made here.
fn filter_of(i: usize) -> (Value, Admits) {
    let port = |f: &Value| f["l4"]["TCP"]["source_port"].as_u64().unwrap_or(0);
    match i % 4 {
        0 => (
            json!({"allow": [{"to-port": ["8080"]}]}),
            Box::new(|f: &Value| f["l4"]["TCP"]["destination_port"] == 8080),
        ),
        1 => (
            json!({"allow": [{"verdict": ["DROPPED"], "protocol": ["tcp"]}]}),
            Box::new(|f: &Value| f["verdict"] == "DROPPED" && f["l4"].get("TCP").is_some()),
        ),
        2 => {
            let even: Vec<String> = (FIRST_PORT..FIRST_PORT + FLOWS)
                .step_by(2)
                .map(|p| p.to_string())
                .collect();
            (
                json!({"allow": [{"from-port": even}]}),
                Box::new(move |f: &Value| port(f) % 2 == u64::from(FIRST_PORT % 2)),
            )
        }
        _ => (
            json!({"deny": [{"from-port": [FIRST_PORT.to_string()]}]}),
            Box::new(move |f: &Value| port(f) != u64::from(FIRST_PORT)),
        ),
    }
}

#[derive(Default)]
struct Seen {
    records: Vec<Value>,
    lost: u64,
}

#[test]
fn a_hundred_followers_with_slow_readers_lose_nothing_uncounted_and_capture_is_unaffected() {
    let lab = lab(LAB);
    let mut agent = Agent::start(
        &lab,
        "node-1",
        2,
        &[
            "--observe-client-queue",
            "8",
            "--metrics-addr",
            "127.0.0.1:9967",
        ],
    );
    let socket = agent.flow_log.with_file_name("api.sock");
    let subscribed = Arc::new(AtomicUsize::new(0));
    let flood_done = Arc::new(AtomicUsize::new(0));
    let seen: Vec<Arc<Mutex<Seen>>> = (0..FOLLOWERS).map(|_| Arc::default()).collect();
    let mut clients = Vec::new();
    for (i, out) in seen.iter().enumerate() {
        let (request, _) = filter_of(i);
        let mut request = request;
        request["follow"] = json!(true);
        request["last"] = json!(0);
        let (socket, subscribed, flood_done, out) = (
            socket.clone(),
            subscribed.clone(),
            flood_done.clone(),
            out.clone(),
        );
        clients.push(std::thread::spawn(move || {
            let mut s = UnixStream::connect(&socket).expect("connect to the observe socket");
            s.write_all(format!("{request}\n").as_bytes()).unwrap();
            let mut r = BufReader::new(s);
            let mut line = String::new();
            loop {
                line.clear();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                let v: Value = serde_json::from_str(&line).expect("a JSON line");
                assert!(v.get("error").is_none(), "client {i}: {v}");
                if v.get("end_of_history").is_some() {
                    break;
                }
            }
            subscribed.fetch_add(1, Ordering::SeqCst);
            // A slow reader takes nothing until the flood is over.
            if i % 3 == 0 {
                while flood_done.load(Ordering::SeqCst) == 0 {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            loop {
                line.clear();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                let v: Value = serde_json::from_str(&line).expect("a JSON line");
                let mut seen = out.lock().unwrap();
                if let Some(n) = v["lost_records"].as_u64() {
                    assert!(n >= seen.lost, "client {i}: the lost total only grows");
                    seen.lost = n;
                } else if v.get("flow").is_some() {
                    seen.records.push(v["flow"].clone());
                }
            }
        }));
    }
    let deadline = Instant::now() + slowed(Duration::from_secs(30));
    while subscribed.load(Ordering::SeqCst) < FOLLOWERS {
        assert!(Instant::now() < deadline, "followers did not all subscribe");
        std::thread::sleep(Duration::from_millis(20));
    }

    for port in FIRST_PORT..FIRST_PORT + FLOWS {
        let r = lab
            .probe(
                "prod/web",
                &Probe::SynFlood {
                    from: format!("10.244.1.2:{port}").parse().unwrap(),
                    to: "10.244.1.3:8080".parse().unwrap(),
                    count: SYNS,
                },
            )
            .unwrap();
        assert_eq!(r.outcome, Outcome::Sent, "{r:?}");
    }
    // The flow log: every flow of the flood, ended (FINAL) with its count.
    let deadline = Instant::now() + slowed(Duration::from_secs(30));
    let log = loop {
        let lines = agent.lines();
        let finals = lines
            .iter()
            .filter(|l| l["flow"]["lifecycle"] == "FINAL")
            .count();
        if finals >= usize::from(FLOWS) {
            break lines;
        }
        assert!(
            Instant::now() < deadline,
            "{finals} of {FLOWS} flows ended in the flow log"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    flood_done.store(1, Ordering::SeqCst);
    let mut counts: BTreeMap<u64, u64> = BTreeMap::new();
    for l in log.iter().filter(|l| l["flow"]["lifecycle"] == "FINAL") {
        let f = &l["flow"];
        *counts
            .entry(f["l4"]["TCP"]["source_port"].as_u64().unwrap())
            .or_default() += f["packets"].as_u64().unwrap();
    }
    assert_eq!(counts.len(), usize::from(FLOWS), "one flow per port");
    assert!(
        counts.values().all(|n| *n == u64::from(SYNS)),
        "exact counts under 100 followers: {counts:?}"
    );
    let records: Vec<&Value> = log.iter().map(|l| &l["flow"]).collect();

    // Each follower: everything its filter admits, received or counted lost.
    let key = |f: &Value| format!("{} {} {}", f["uuid"], f["lifecycle"], f["time"]);
    let deadline = Instant::now() + slowed(Duration::from_secs(60));
    loop {
        let mut pending = Vec::new();
        for (i, s) in seen.iter().enumerate() {
            let (_, admits) = filter_of(i);
            let want: Vec<String> = records
                .iter()
                .filter(|f| admits(f))
                .map(|f| key(f))
                .collect();
            let s = s.lock().unwrap();
            let got: Vec<String> = s.records.iter().map(key).collect();
            let unexpected: Vec<&String> = got.iter().filter(|k| !want.contains(k)).collect();
            assert!(
                unexpected.is_empty(),
                "client {i} got records its filter refuses: {unexpected:?}"
            );
            if got.len() as u64 + s.lost != want.len() as u64 {
                pending.push((i, got.len(), s.lost, want.len()));
            }
        }
        if pending.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "followers (index, received, told lost, admitted) not accounted for: {pending:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let told: u64 = seen.iter().map(|s| s.lock().unwrap().lost).sum();
    let slow_lost: u64 = seen.iter().step_by(3).map(|s| s.lock().unwrap().lost).sum();
    assert!(
        slow_lost > 0,
        "the slow readers fell behind and lost records"
    );
    let metrics = node_http_get(&lab, "node-1", "http://127.0.0.1:9967/metrics");
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("netwatch_observer_dropped_records_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .expect("netwatch_observer_dropped_records_total") as u64;
    assert_eq!(
        dropped, told,
        "the metric counts what the followers were told"
    );
    eprintln!(
        "{FOLLOWERS} followers: {} records in the flow log, {told} lost to followers ({slow_lost} to the slow ones)",
        records.len()
    );
    agent.stop();
    for c in clients {
        c.join().expect("a follower panicked");
    }
}
