//! `cargo xtask demo`: netwatch on a plain Linux machine, no cluster.
//!
//! Builds what it needs, brings up a lab node whose firewall drops some pod
//! traffic, runs the agent there, drives traffic the way an application
//! would, and shows each denied flow as on-call would see it. Runs until
//! Ctrl-C (or `--duration`), and always cleans up.

use std::{
    io::{BufRead, BufReader, Seek, SeekFrom},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use xtask::lab::{Lab, LabSpec, Probe};

const SPEC: &str = r#"
nodes:
  - name: node-1
    nftables: |
      table inet demo_firewall {
        chain forward {
          type filter hook forward priority 0; policy accept;
          ip saddr 10.244.1.2 ip daddr 10.244.1.3 tcp dport 8080 counter drop comment "web-to-api"
          ip daddr 10.244.1.10 udp dport 53 counter drop comment "dns"
        }
      }
pods:
  - { name: web, namespace: prod, node: node-1, ip: 10.244.1.2 }
  - { name: api, namespace: prod, node: node-1, ip: 10.244.1.3, listen: ["8080/tcp"] }
  - { name: db, namespace: prod, node: node-1, ip: 10.244.1.4, listen: ["5432/tcp"] }
  - { name: coredns, namespace: kube-system, node: node-1, ip: 10.244.1.10, listen: ["53/udp"] }
"#;

pub fn demo(duration: Option<u64>, stop: &'static AtomicBool) -> Result<()> {
    crate::setup::setup()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo builds network namespaces and loads eBPF programs: run it as root");
    }
    let agent_bin = build_agent()?;
    let spec: LabSpec = serde_yaml::from_str(SPEC)?;
    let lab = Lab::up(&spec, &std::env::current_exe()?)?;
    eprintln!("\nlab node-1 is up: prod/web, prod/api:8080, prod/db:5432, kube-system/coredns:53");
    eprintln!("the node's firewall drops web -> api:8080 and every DNS query to coredns\n");

    let dir = tempfile_dir()?;
    let flow_log = dir.join("flows.jsonl");
    let node = lab.node("node-1")?;
    let mut agent = Guard(
        lab.on_node("node-1", &agent_bin)?
            .args(["--node-name", "node-1", "--interfaces", "cali*", "--own-netns-only"])
            .args(["--connect-timeout", "2", "--flow-log"])
            .arg(&flow_log)
            .arg("--cgroup-root")
            .arg(&node.cgroup_root)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting netwatch-agent")?,
    );
    // Pass the agent's log through, and start traffic only once it has
    // attached to every pod interface.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    if let Some(stderr) = agent.0.stderr.take() {
        let pods = lab.pods.len();
        std::thread::spawn(move || {
            let mut attached = 0;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
                if line.contains("attached TC classifiers") {
                    attached += 1;
                    if attached == pods {
                        let _ = ready_tx.send(());
                    }
                }
            }
        });
    }
    ready_rx
        .recv_timeout(Duration::from_secs(30))
        .context("netwatch-agent did not attach to the pod interfaces within 30 s")?;
    eprintln!("\n--- denied flows, live (one line per new flow) ---");

    let deadline = duration.map(|d| Instant::now() + Duration::from_secs(d));
    let mut offset = 0u64;
    let mut tick = 0u64;
    while !stop.load(Ordering::SeqCst) && deadline.is_none_or(|d| Instant::now() < d) {
        // The application's traffic: web calls api and looks up names; api
        // talks to db. Probes run in the background so the tail stays live.
        let probes: Vec<(&str, Probe)> = vec![
            ("prod/web", Probe::tcp("10.244.1.3:8080".parse()?, Duration::from_secs(3))),
            ("prod/web", Probe::dns("10.244.1.10:53".parse()?, Duration::from_secs(2))),
            ("prod/api", Probe::tcp("10.244.1.4:5432".parse()?, Duration::from_secs(2))),
        ];
        if tick % 5 == 0 {
            std::thread::scope(|s| {
                for (from, p) in &probes {
                    let lab = &lab;
                    s.spawn(move || lab.probe(from, p));
                }
                // Print while the probes wait for their timeouts.
                let until = Instant::now() + Duration::from_secs(1);
                while Instant::now() < until {
                    offset = print_new(&flow_log, offset);
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        }
        offset = print_new(&flow_log, offset);
        std::thread::sleep(Duration::from_secs(1));
        tick += 1;
        if let Ok(Some(status)) = agent.0.try_wait() {
            bail!("netwatch-agent exited: {status}");
        }
    }
    eprintln!("\nstopping: the agent detaches, the lab is removed");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.0.id() as i32, libc::SIGTERM) };
    let _ = agent.0.wait();
    print_new(&flow_log, offset);
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tempfile_dir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("netwatch-demo-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

fn build_agent() -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("demo: building netwatch-agent");
    if !Command::new(&cargo).args(["build", "-p", "netwatch-agent", "--bins"]).status()?.success() {
        bail!("building netwatch-agent failed");
    }
    let meta = Command::new(&cargo).args(["metadata", "--format-version", "1", "--no-deps"]).output()?;
    let v: serde_json::Value = serde_json::from_slice(&meta.stdout)?;
    let target = v["target_directory"].as_str().context("cargo metadata: target_directory")?;
    Ok(Path::new(target).join("debug/netwatch-agent"))
}

/// Print the first record of each new flow in the log after `offset`.
fn print_new(path: &Path, offset: u64) -> u64 {
    let Ok(mut f) = std::fs::File::open(path) else { return offset };
    if f.seek(SeekFrom::Start(offset)).is_err() {
        return offset;
    }
    let mut reader = BufReader::new(f);
    let mut pos = offset;
    let mut line = String::new();
    while let Ok(n) = reader.read_line(&mut line) {
        if n == 0 || !line.ends_with('\n') {
            break;
        }
        pos += n as u64;
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            let f = &v["flow"];
            if f["lifecycle"] == "NEW" {
                println!("{}", compact(f));
            }
        }
        line.clear();
    }
    pos
}

fn compact(f: &serde_json::Value) -> String {
    let (proto, sport, dport) = ["TCP", "UDP", "SCTP"]
        .iter()
        .find_map(|p| f["l4"].get(*p).map(|l| (*p, l["source_port"].clone(), l["destination_port"].clone())))
        .unwrap_or(("IP", serde_json::Value::Null, serde_json::Value::Null));
    let reason = f["drop_reason_desc"].as_str().or(f["refusal"].as_str()).unwrap_or("");
    format!(
        "{} {}:{} -> {}:{} {} {} {}",
        f["time"].as_str().unwrap_or("").get(11..23).unwrap_or(""),
        f["IP"]["source"].as_str().unwrap_or("?"),
        sport,
        f["IP"]["destination"].as_str().unwrap_or("?"),
        dport,
        proto,
        f["verdict"].as_str().unwrap_or("?"),
        if reason.is_empty() { String::new() } else { format!("({reason})") },
    )
}
