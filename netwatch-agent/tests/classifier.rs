//! The TC classifier's logic, run inside the kernel on hand-built packets
//! with BPF_PROG_TEST_RUN (aya's `TestRun`). Needs root: without it each
//! test says so and passes without running (`cargo xtask test` runs them as
//! root, on this kernel and in the kernel matrix).

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use netwatch::capture::EBPF_OBJECT;
use netwatch_common::{
    Event, FlowKey, IP_V4, IPPROTO_TCP, PendingConn, event_kind, loss, pending_kind,
};

const TC_ACT_UNSPEC: i32 = -1;

/// The classifiers loaded, or `None` (with a line saying why) when this
/// process is not root, so a plain `cargo test` passes unprivileged.
fn load() -> Option<Ebpf> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: loading eBPF programs needs root (run `cargo xtask test` as root)");
        return None;
    }
    let mut ebpf = EbpfLoader::new()
        .load(EBPF_OBJECT)
        .expect("load the object (root needed)");
    for name in ["netwatch_from_pod", "netwatch_to_pod"] {
        let p: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
        p.load().unwrap();
    }
    Some(ebpf)
}

fn run(ebpf: &Ebpf, prog: &str, packet: &[u8]) -> i32 {
    let p: &SchedClassifier = ebpf.program(prog).unwrap().try_into().unwrap();
    let r = p
        .test_run(TestRunOptions {
            data_in: Some(packet),
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    r.return_value as i32
}

fn eth(ethertype: u16) -> Vec<u8> {
    let mut v = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
    v.extend_from_slice(&ethertype.to_be_bytes());
    v
}

fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0];
    h[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(payload);
    h
}

fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t
}

const CLIENT: [u8; 4] = [10, 0, 0, 1];
const SERVER: [u8; 4] = [10, 0, 0, 2];

fn packet(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut p = eth(0x0800);
    p.extend(ipv4(src, dst, proto, l4));
    p
}

fn client_key(sport: u16, dport: u16) -> FlowKey {
    let mut k = FlowKey {
        src_port: sport,
        dst_port: dport,
        proto: IPPROTO_TCP,
        ip_version: IP_V4,
        ..FlowKey::default()
    };
    k.src_addr[..4].copy_from_slice(&CLIENT);
    k.dst_addr[..4].copy_from_slice(&SERVER);
    k
}

fn pending(ebpf: &Ebpf) -> Vec<(FlowKey, PendingConn)> {
    let m: HashMap<&MapData, FlowKey, PendingConn> =
        HashMap::try_from(ebpf.map("PENDING").unwrap()).unwrap();
    m.iter().map(Result::unwrap).collect()
}

fn events(ebpf: &mut Ebpf) -> Vec<Event> {
    let mut rb = RingBuf::try_from(ebpf.map_mut("EVENTS").unwrap()).unwrap();
    let mut out = Vec::new();
    while let Some(item) = rb.next() {
        // SAFETY: the programs write whole Events.
        out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Event>()) });
    }
    out
}

fn malformed(ebpf: &Ebpf) -> u64 {
    let m: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(ebpf.map("LOSSES").unwrap()).unwrap();
    m.get(&loss::MALFORMED, 0).unwrap().iter().sum()
}

#[test]
fn syn_is_tracked_once_and_synack_completes_it() {
    let Some(mut ebpf) = load() else { return };
    let syn = packet(CLIENT, SERVER, 6, &tcp(40000, 8080, 0x02));
    assert_eq!(
        run(&ebpf, "netwatch_from_pod", &syn),
        TC_ACT_UNSPEC,
        "never changes a packet's fate"
    );
    assert_eq!(run(&ebpf, "netwatch_from_pod", &syn), TC_ACT_UNSPEC);
    let p = pending(&ebpf);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].0, client_key(40000, 8080));
    assert_eq!(
        (p[0].1.packets, p[0].1.kind),
        (2, pending_kind::TCP_SYN),
        "a retransmitted SYN counts"
    );
    // The same SYN seen again entering the destination pod is not counted twice.
    run(&ebpf, "netwatch_to_pod", &syn);
    assert_eq!(pending(&ebpf)[0].1.packets, 2);

    let synack = packet(SERVER, CLIENT, 6, &tcp(8080, 40000, 0x12));
    assert_eq!(run(&ebpf, "netwatch_to_pod", &synack), TC_ACT_UNSPEC);
    assert!(pending(&ebpf).is_empty(), "answered handshake is forgotten");
    let ev = events(&mut ebpf);
    assert_eq!(ev.len(), 1);
    assert_eq!(
        (ev[0].kind, ev[0].flow),
        (event_kind::ESTABLISHED, client_key(40000, 8080))
    );
}

#[test]
fn rst_answering_a_syn_is_refused_and_a_stray_rst_is_not() {
    let Some(mut ebpf) = load() else { return };
    let stray = packet(SERVER, CLIENT, 6, &tcp(8080, 40001, 0x14));
    run(&ebpf, "netwatch_to_pod", &stray);
    assert!(
        events(&mut ebpf).is_empty(),
        "no pending SYN: nothing refused"
    );

    run(
        &ebpf,
        "netwatch_from_pod",
        &packet(CLIENT, SERVER, 6, &tcp(40001, 8080, 0x02)),
    );
    run(&ebpf, "netwatch_to_pod", &stray);
    let ev = events(&mut ebpf);
    assert_eq!(ev.len(), 1);
    assert_eq!(
        (ev[0].kind, ev[0].flow, ev[0].count),
        (event_kind::TCP_RESET, client_key(40001, 8080), 1)
    );
}

#[test]
fn icmp_port_unreachable_refuses_the_quoted_flow_but_frag_needed_does_not() {
    let Some(mut ebpf) = load() else { return };
    let syn_l4 = tcp(40002, 8080, 0x02);
    run(
        &ebpf,
        "netwatch_from_pod",
        &packet(CLIENT, SERVER, 6, &syn_l4),
    );
    // ICMP "fragmentation needed" quoting the SYN: path MTU, not a refusal.
    let quoted = ipv4(CLIENT, SERVER, 6, &syn_l4[..8]);
    let mut frag = vec![3, 4, 0, 0, 0, 0, 5, 0xdc];
    frag.extend_from_slice(&quoted);
    run(&ebpf, "netwatch_to_pod", &packet(SERVER, CLIENT, 1, &frag));
    assert!(events(&mut ebpf).is_empty());
    // Port unreachable quoting the SYN: refused.
    let mut unreach = vec![3, 3, 0, 0, 0, 0, 0, 0];
    unreach.extend_from_slice(&quoted);
    run(
        &ebpf,
        "netwatch_to_pod",
        &packet(SERVER, CLIENT, 1, &unreach),
    );
    let ev = events(&mut ebpf);
    assert_eq!(ev.len(), 1);
    assert_eq!(
        (ev[0].kind, ev[0].reason, ev[0].flow),
        (
            event_kind::ICMP_UNREACH,
            3 << 8 | 3,
            client_key(40002, 8080)
        )
    );
}

#[test]
fn truncated_and_malformed_packets_pass_untouched_and_are_counted() {
    let Some(ebpf) = load() else { return };
    // BPF_PROG_TEST_RUN itself refuses IPv4 frames shorter than an IP header,
    // so the shortest cases start at a full header: TCP cut after the ports,
    // an IPv6 header with two bytes of TCP, an impossible IPv4 header length,
    // and a non-IP frame.
    let syn = packet(CLIENT, SERVER, 6, &tcp(40003, 80, 0x02));
    let cut_tcp = &syn[..14 + 20 + 4];
    let mut cut_v6 = eth(0x86DD);
    let mut v6 = vec![0x60, 0, 0, 0, 0, 2, 6, 64];
    v6.extend_from_slice(&[0xfd; 16]);
    v6.extend_from_slice(&[0xfe; 16]);
    v6.extend_from_slice(&[0x9c, 0x40]);
    cut_v6.extend(v6);
    let mut bad_ihl = packet(CLIENT, SERVER, 6, &tcp(40004, 80, 0x02));
    bad_ihl[14] = 0x43;
    let mut arp = eth(0x0806);
    arp.extend_from_slice(&[0; 28]);
    for p in [cut_tcp, &cut_v6[..], &bad_ihl[..], &arp[..]] {
        assert_eq!(run(&ebpf, "netwatch_from_pod", p), TC_ACT_UNSPEC);
    }
    assert!(
        pending(&ebpf).is_empty(),
        "nothing tracked from broken packets"
    );
    assert_eq!(
        malformed(&ebpf),
        1,
        "the impossible header is counted as malformed"
    );
}

/// A small deterministic generator: the same packets on every run and kernel.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Whether a frame could be a TCP SYN the classifier tracks at all (IPv4 or
/// IPv6, TCP, SYN set): a loose upper bound on what may be counted.
fn may_be_syn(p: &[u8]) -> bool {
    let tcp = match p.get(12..14) {
        Some([0x08, 0x00]) if p.get(14).is_some_and(|b| b >> 4 == 4) && p.get(23) == Some(&6) => {
            14 + usize::from(p[14] & 0x0f) * 4
        }
        Some([0x86, 0xdd]) if p.get(20) == Some(&6) => 14 + 40,
        _ => return false,
    };
    p.get(tcp + 13).is_some_and(|f| f & 0x02 != 0)
}

#[test]
fn random_and_truncated_packets_never_change_a_packets_fate_and_counts_stay_consistent() {
    let Some(ebpf) = load() else { return };
    let mut rng = XorShift(0x6e65_7477_6174_6368);
    let mut valid = std::collections::BTreeSet::new();
    let (mut junk, mut maybe_syns, mut refused_by_test_run) = (0u64, 0u64, 0u64);
    for i in 0..300u16 {
        // A real SYN on a port of its own, then junk around it.
        let sport = 20_000 + i;
        let syn = packet(CLIENT, SERVER, 6, &tcp(sport, 8080, 0x02));
        assert_eq!(run(&ebpf, "netwatch_from_pod", &syn), TC_ACT_UNSPEC);
        valid.insert(client_key(sport, 8080));
        maybe_syns += 1;
        let base = match i % 3 {
            0 => packet(SERVER, CLIENT, 6, &tcp(8080, 30_000 + i, 0x12)),
            1 => packet(CLIENT, SERVER, 17, &[0x9c, 0x40, 0, 53, 0, 8, 0, 0]),
            _ => packet(SERVER, CLIENT, 1, &[3, 3, 0, 0, 0, 0, 0, 0]),
        };
        let mut cases: Vec<Vec<u8>> = Vec::new();
        // Cut anywhere.
        cases.push(base[..rng.below(base.len() + 1)].to_vec());
        // A few bytes changed.
        let mut mutated = base.clone();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(mutated.len());
            mutated[at] = rng.next() as u8;
        }
        cases.push(mutated);
        // Random bytes behind a valid Ethernet + IP type, and pure noise.
        let mut noise = eth(if i % 2 == 0 { 0x0800 } else { 0x86DD });
        noise.extend((0..rng.below(120)).map(|_| rng.next() as u8));
        cases.push(noise);
        cases.push((0..rng.below(200)).map(|_| rng.next() as u8).collect());
        for p in &cases {
            for prog in ["netwatch_from_pod", "netwatch_to_pod"] {
                let sched: &SchedClassifier = ebpf.program(prog).unwrap().try_into().unwrap();
                match sched.test_run(TestRunOptions {
                    data_in: Some(p),
                    ..TestRunOptions::default()
                }) {
                    Ok(r) => {
                        assert_eq!(
                            r.return_value as i32, TC_ACT_UNSPEC,
                            "{prog} changed the fate of {p:02x?}"
                        );
                        junk += 1;
                        maybe_syns += u64::from(may_be_syn(p));
                    }
                    // The kernel refuses frames shorter than its minimum
                    // before the program runs.
                    Err(_) => {
                        assert!(p.len() < 14 + 40, "test run refused {p:02x?}");
                        refused_by_test_run += 1;
                    }
                }
            }
        }
    }
    let tracked = pending(&ebpf);
    let keys: std::collections::BTreeSet<FlowKey> = tracked.iter().map(|(k, _)| *k).collect();
    assert!(
        valid.is_subset(&keys),
        "every real SYN is tracked: {} of {}",
        valid.intersection(&keys).count(),
        valid.len()
    );
    let counted: u64 = tracked.iter().map(|(_, c)| c.packets).sum();
    assert!(
        counted >= valid.len() as u64 && counted <= maybe_syns,
        "tracked packets {counted}: between the real SYNs ({}) and what could be a SYN ({maybe_syns})",
        valid.len()
    );
    assert!(
        malformed(&ebpf) <= junk,
        "malformed {} of {junk} junk packets",
        malformed(&ebpf)
    );
    eprintln!(
        "{junk} junk packets run, {refused_by_test_run} refused by BPF_PROG_TEST_RUN, malformed {}",
        malformed(&ebpf)
    );
}
