//! TC classifiers on the host side of pod interfaces: what a pod sends
//! (ingress there) and what it receives (egress).
//!
//! Two kernel variants, picked by kernel version or forced with
//! `--tc-variant`:
//!
//! | mode | kernels | order and leftovers |
//! | --- | --- | --- |
//! | `tcx` | 6.6+ | a tcx link placed **first** (before a CNI's programs, which may end the chain); links die with the agent, so a killed agent leaves nothing |
//! | `clsact` | before 6.6 | a cls_bpf filter at priority [`CLSACT_PRIORITY`] (the first that runs) and handle [`CLSACT_HANDLE`]; netwatch's filters left by a killed agent are removed before attaching, so a restart replaces them instead of adding a second set |
//!
//! Either way the classifiers never change a packet's fate: they return
//! "next" (`TC_ACT_UNSPEC`).

use std::collections::BTreeMap;

use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType,
    tc::{NlOptions, SchedClassifierLinkId, TcAttachOptions, TcHandle},
};
use tracing::{debug, info, warn};

use super::super::{
    interfaces::{InterfacePatterns, LinkChange},
    load::KernelCapture,
};

pub const FROM_POD: &str = "netwatch_from_pod";
pub const TO_POD: &str = "netwatch_to_pod";

/// cls_bpf priority of netwatch's filters on clsact kernels: 1, the lowest
/// number there is, runs before every filter a CNI adds at a higher number.
/// Within one priority cls_bpf runs the most recently added filter first.
pub const CLSACT_PRIORITY: u16 = 1;
/// cls_bpf handle of netwatch's filters on clsact kernels ("nw").
pub const CLSACT_HANDLE: u16 = 0x6e77;

/// `--tc-variant`: how the classifiers are attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Variant {
    /// tcx on kernels >= 6.6, clsact before.
    #[default]
    Auto,
    /// tcx links (kernels >= 6.6).
    Tcx,
    /// cls_bpf filters on a clsact qdisc (every kernel).
    Clsact,
}

/// The variant that runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Tcx,
    Clsact,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Tcx => "tcx",
            Mode::Clsact => "clsact",
        }
    }

    /// The mode `variant` means on the running kernel.
    pub fn pick(variant: Variant) -> Mode {
        match variant {
            Variant::Tcx => Mode::Tcx,
            Variant::Clsact => Mode::Clsact,
            Variant::Auto => {
                let tcx = aya::util::KernelVersion::current()
                    .map(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
                    .unwrap_or(false);
                if tcx { Mode::Tcx } else { Mode::Clsact }
            }
        }
    }
}

/// Why the classifiers could not be attached to one interface.
#[derive(Debug, thiserror::Error)]
pub enum TcError {
    #[error("the eBPF object has no {0}: the agent and its embedded programs do not match")]
    Missing(&'static str),
    #[error("{direction}: {why}")]
    Attach {
        direction: &'static str,
        why: String,
    },
}

struct Attached {
    name: String,
    from_pod: SchedClassifierLinkId,
    to_pod: SchedClassifierLinkId,
}

/// Which pod interfaces carry the classifiers.
pub struct TcAttacher {
    patterns: InterfacePatterns,
    mode: Mode,
    attached: BTreeMap<u32, Attached>,
}

/// What [`TcAttacher::apply`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttachOutcome {
    Attached { index: u32, name: String },
    Detached { index: u32, name: String },
    Failed { name: String, error: String },
    Unchanged,
}

impl TcAttacher {
    pub fn new(patterns: InterfacePatterns, mode: Mode) -> TcAttacher {
        TcAttacher {
            patterns,
            mode,
            attached: BTreeMap::new(),
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Interfaces with classifiers, by index.
    pub fn interfaces(&self) -> impl Iterator<Item = (u32, &str)> {
        self.attached.iter().map(|(i, a)| (*i, a.name.as_str()))
    }

    pub fn name_of(&self, index: u32) -> Option<&str> {
        self.attached.get(&index).map(|a| a.name.as_str())
    }

    pub fn len(&self) -> usize {
        self.attached.len()
    }

    pub fn is_empty(&self) -> bool {
        self.attached.is_empty()
    }

    /// Attach to or detach from the interface a link change is about.
    pub fn apply(&mut self, capture: &mut KernelCapture, change: LinkChange) -> AttachOutcome {
        match change {
            LinkChange::Present {
                index,
                name,
                kind,
                port_kind,
                ..
            } => {
                if let Some(a) = self.attached.get(&index) {
                    if a.name == name {
                        return AttachOutcome::Unchanged;
                    }
                    // Renamed: detach, then re-attach if the new name matches.
                    let old = self.detach(capture, index);
                    if !self.patterns.matches_link(&name, &kind, &port_kind) {
                        return old;
                    }
                }
                if !self.patterns.matches_link(&name, &kind, &port_kind) {
                    return AttachOutcome::Unchanged;
                }
                match attach_both(capture, &name, self.mode) {
                    Ok((from_pod, to_pod)) => {
                        info!(interface = %name, index, "attached TC classifiers");
                        self.attached.insert(
                            index,
                            Attached {
                                name: name.clone(),
                                from_pod,
                                to_pod,
                            },
                        );
                        AttachOutcome::Attached { index, name }
                    }
                    Err(error) => {
                        // Typically the interface vanished between the event and
                        // the attach: the pod is already gone.
                        warn!(interface = %name, "could not attach TC classifiers: {error}");
                        AttachOutcome::Failed {
                            name,
                            error: error.to_string(),
                        }
                    }
                }
            }
            LinkChange::Gone { index } => self.detach(capture, index),
        }
    }

    fn detach(&mut self, capture: &mut KernelCapture, index: u32) -> AttachOutcome {
        let Some(a) = self.attached.remove(&index) else {
            return AttachOutcome::Unchanged;
        };
        // The kernel already dropped the links of a deleted device; detaching
        // then fails harmlessly.
        for (prog, id) in [(FROM_POD, a.from_pod), (TO_POD, a.to_pod)] {
            if let Some(p) = capture.classifier(prog)
                && let Err(e) = p.detach(id)
            {
                debug!(interface = %a.name, "detach {prog}: {e}");
            }
        }
        info!(interface = %a.name, index, "forgot interface");
        AttachOutcome::Detached {
            index,
            name: a.name,
        }
    }
}

fn classifier<'a>(
    capture: &'a mut KernelCapture,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, TcError> {
    capture.classifier(name).ok_or(TcError::Missing(name))
}

fn attach_both(
    capture: &mut KernelCapture,
    name: &str,
    mode: Mode,
) -> Result<(SchedClassifierLinkId, SchedClassifierLinkId), TcError> {
    let from_pod = attach_one(capture, name, mode, FROM_POD, TcAttachType::Ingress)?;
    match attach_one(capture, name, mode, TO_POD, TcAttachType::Egress) {
        Ok(to_pod) => Ok((from_pod, to_pod)),
        Err(e) => {
            if let Ok(p) = classifier(capture, FROM_POD) {
                let _ = p.detach(from_pod);
            }
            Err(e)
        }
    }
}

fn attach_one(
    capture: &mut KernelCapture,
    interface: &str,
    mode: Mode,
    program: &'static str,
    at: TcAttachType,
) -> Result<SchedClassifierLinkId, TcError> {
    let direction = match at {
        TcAttachType::Ingress => "ingress",
        _ => "egress",
    };
    let options = match mode {
        Mode::Tcx => TcAttachOptions::TcxOrder(LinkOrder::first()),
        Mode::Clsact => {
            // EEXIST when the interface has one already (a CNI's, or ours).
            let _ = aya::programs::tc::qdisc_add_clsact(interface);
            // A killed agent's filters stay on clsact: remove ours (by
            // program name) so a restart replaces them.
            match aya::programs::tc::qdisc_detach_program(interface, at, program) {
                Ok(()) => info!(interface, program, "removed a previous agent's TC filter"),
                Err(e) => debug!(interface, program, "no previous TC filter: {e}"),
            }
            TcAttachOptions::Netlink(NlOptions {
                priority: CLSACT_PRIORITY,
                handle: TcHandle::new(0, CLSACT_HANDLE),
                ..NlOptions::default()
            })
        }
    };
    classifier(capture, program)?
        .attach_with_options(interface, at, options)
        .map_err(|e| TcError::Attach {
            direction,
            why: super::chain(&e),
        })
}
