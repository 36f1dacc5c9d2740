//! The worst stack chain of every eBPF program, computed from the object
//! the agent embeds, with each frame rounded up to 32 bytes as verifiers
//! before Linux 6.7 do (`round_up(depth, 32)` per frame, 512 bytes for the
//! whole chain). A program that grows past [`BUDGET`] fails here, on any
//! machine, instead of failing to load only on older kernels.

use std::collections::{BTreeMap, HashMap};

use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget, SymbolKind};

/// The verifier's limit: 512 bytes for the whole call chain. Measured at
/// this commit (rounded frames): the TC classifiers 512 (classifier ->
/// try_observe 368 -> track 72), kfree_skb 448 (its drop-table value,
/// the aggregate's key and value and
/// tunnel header live in a per-CPU scratch map), sock_ops 224, connect 32.
/// The classifiers sit at the limit: any growth of their stack fails here
/// first. (Moving work out of line made LLVM's frames larger, not smaller;
/// a per-CPU scratch map for the parsed packet is the way to headroom.)
const BUDGET: u64 = 512;
/// Pre-6.7 verifiers round every frame up to this.
const FRAME_ROUND: u64 = 32;

struct Function {
    section: usize,
    start: u64,
    end: u64,
    stack: u64,
    /// (section, byte offset) of each callee.
    calls: Vec<(usize, u64)>,
}

fn insn(data: &[u8], off: u64) -> (u8, u8, u8, i16, i32) {
    let o = off as usize;
    let code = data[o];
    let regs = data[o + 1];
    let off16 = i16::from_le_bytes([data[o + 2], data[o + 3]]);
    let imm = i32::from_le_bytes([data[o + 4], data[o + 5], data[o + 6], data[o + 7]]);
    (code, regs & 0x0f, regs >> 4, off16, imm)
}

/// Functions by (section, address), and the programs as (name, section,
/// address): every function outside .text.
type Program = (BTreeMap<(usize, u64), Function>, Vec<(String, usize, u64)>);

fn functions(bytes: &[u8]) -> Program {
    let file = object::File::parse(bytes).expect("the embedded eBPF object is ELF");
    let mut funcs = BTreeMap::new();
    let mut programs = Vec::new();
    let mut section_names = HashMap::new();
    for s in file.sections() {
        section_names.insert(s.index().0, s.name().unwrap_or("").to_string());
    }
    for sym in file.symbols() {
        if sym.kind() != SymbolKind::Text || sym.size() == 0 {
            continue;
        }
        let Some(si) = sym.section_index() else {
            continue;
        };
        let name = sym.name().unwrap_or("").to_string();
        let section = &section_names[&si.0];
        if section != ".text" {
            programs.push((name, si.0, sym.address()));
        }
        funcs.insert(
            (si.0, sym.address()),
            Function {
                section: si.0,
                start: sym.address(),
                end: sym.address() + sym.size(),
                stack: 0,
                calls: Vec::new(),
            },
        );
    }
    for s in file.sections() {
        let si = s.index().0;
        let Ok(data) = s.data() else { continue };
        let relocs: HashMap<u64, (u64, usize)> = s
            .relocations()
            .filter_map(|(off, r)| match r.target() {
                RelocationTarget::Symbol(i) => {
                    let sym = file.symbol_by_index(i).ok()?;
                    Some((off, (sym.address(), sym.section_index()?.0)))
                }
                _ => None,
            })
            .collect();
        for f in funcs.values_mut().filter(|f| f.section == si) {
            let mut r10_copies: HashMap<u8, i64> = HashMap::new();
            let mut deepest: i64 = 0;
            let mut off = f.start;
            while off + 8 <= f.end {
                let (code, dst, src, o, imm) = insn(data, off);
                let class = code & 0x07;
                match (class, code) {
                    // LDX from the stack.
                    (1, _) if src == 10 => deepest = deepest.max(-(o as i64)),
                    // ST / STX to the stack.
                    (2, _) | (3, _) if dst == 10 => deepest = deepest.max(-(o as i64)),
                    // LDX/ST/STX through a copy of r10 plus an offset.
                    (1, _) if r10_copies.contains_key(&src) => {
                        deepest = deepest.max(-(r10_copies[&src] + o as i64))
                    }
                    (2, _) | (3, _) if r10_copies.contains_key(&dst) => {
                        deepest = deepest.max(-(r10_copies[&dst] + o as i64))
                    }
                    // mov64 dst, r10
                    (_, 0xbf) if src == 10 => {
                        r10_copies.insert(dst, 0);
                    }
                    // add64 dst, imm on a copy of r10
                    (_, 0x07) if r10_copies.contains_key(&dst) => {
                        let v = r10_copies[&dst] + imm as i64;
                        r10_copies.insert(dst, v);
                        deepest = deepest.max(-v);
                    }
                    // A BPF-to-BPF call (src_reg = BPF_PSEUDO_CALL).
                    (_, 0x85) if src == 1 => {
                        let target = match relocs.get(&off) {
                            Some((sym, sec)) => (*sec, (*sym as i64 + (imm as i64 + 1) * 8) as u64),
                            None => (si, (off as i64 + (imm as i64 + 1) * 8) as u64),
                        };
                        f.calls.push(target);
                    }
                    _ => {
                        // Any other write to a register that held a copy of r10.
                        if class == 4 || class == 7 {
                            r10_copies.remove(&dst);
                        }
                    }
                }
                // 16-byte lddw takes two slots.
                off += if code == 0x18 { 16 } else { 8 };
            }
            f.stack = deepest.max(0) as u64;
        }
    }
    (funcs, programs)
}

fn round(depth: u64) -> u64 {
    depth.max(1).div_ceil(FRAME_ROUND) * FRAME_ROUND
}

/// The worst chain from `at`: its frames, rounded, added up.
fn chain(
    funcs: &BTreeMap<(usize, u64), Function>,
    at: (usize, u64),
    seen: &mut Vec<(usize, u64)>,
) -> (u64, Vec<(usize, u64)>) {
    let Some(f) = funcs.get(&at) else {
        panic!("a call to {at:?}, which starts no function in the object");
    };
    assert!(
        !seen.contains(&at),
        "recursion through {at:?}: the verifier rejects it"
    );
    seen.push(at);
    let mut worst = (0, Vec::new());
    for c in &f.calls {
        let sub = chain(funcs, *c, seen);
        if sub.0 > worst.0 {
            worst = sub;
        }
    }
    seen.pop();
    let mut path = vec![at];
    path.extend(worst.1);
    (round(f.stack) + worst.0, path)
}

#[test]
fn every_program_fits_the_stack_of_old_verifiers() {
    let (funcs, programs) = functions(netwatch::capture::EBPF_OBJECT);
    assert!(programs.len() >= 6, "all programs found: {:?}", programs);
    let mut report = Vec::new();
    let mut over = Vec::new();
    for (name, section, addr) in &programs {
        let (depth, path) = chain(&funcs, (*section, *addr), &mut Vec::new());
        let frames: Vec<String> = path
            .iter()
            .map(|p| format!("{}@{:#x}:{}", p.0, p.1, funcs[p].stack))
            .collect();
        report.push(format!("{name}: {depth} bytes ({})", frames.join(" -> ")));
        if depth > BUDGET {
            over.push(name.clone());
        }
    }
    eprintln!("{}", report.join("\n"));
    assert!(
        over.is_empty(),
        "over the {BUDGET}-byte stack budget (frames rounded to {FRAME_ROUND}): {over:?}\n{}",
        report.join("\n")
    );
}

#[test]
fn the_stack_measure_sees_a_known_frame() {
    // Frames are rounded up, never down, and an empty frame still costs one
    // unit, as the verifier counts it.
    assert_eq!(round(0), 32);
    assert_eq!(round(8), 32);
    assert_eq!(round(33), 64);
    assert_eq!(round(512), 512);
    // Every program touches its stack: a measure that found nothing would
    // pass any budget.
    let (funcs, programs) = functions(netwatch::capture::EBPF_OBJECT);
    let kfree = programs
        .iter()
        .find(|p| p.0 == "netwatch_kfree_skb")
        .unwrap();
    assert!(
        funcs[&(kfree.1, kfree.2)].stack >= 40,
        "kfree_skb copies a 40-byte IPv6 header"
    );
}
