//! One module per kernel hook, each with its kernel variants inside and a
//! typed error saying why it is off:
//!
//! | hook | module | modes |
//! | --- | --- | --- |
//! | `kfree_skb` | [`kfree_skb`] | `reason` (5.17+), `location` (older kernels) |
//! | `tc` | [`tc`] | `tcx` (6.6+), `clsact` (older kernels) |
//! | `sock_ops` | [`sock_ops`] | `sock_ops+connect` (every kernel) |
//! | `sock_state` | [`sock_state`] | `tp_btf` (every kernel with BTF) |
//!
//! A new kernel variant goes into its hook's module as another mode; the
//! rest of the agent only sees [`HookReport`]: which hooks run, in which
//! mode, and why the others do not (logged once each, exported as
//! `netwatch_hook_info`, and said by `/readyz`).

pub mod kfree_skb;
pub mod sock_ops;
pub mod sock_state;
pub mod tc;

/// One hook's state, for logs, metrics and `/readyz`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookState {
    pub hook: &'static str,
    /// The mode that runs, or `off`.
    pub mode: &'static str,
    /// Why the hook is off.
    pub off_because: Option<String>,
}

/// Which hooks run and how.
#[derive(Debug)]
pub struct HookReport {
    pub kfree_skb: Result<kfree_skb::Mode, kfree_skb::KfreeSkbError>,
    pub sock_ops: Result<sock_ops::Mode, sock_ops::SockOpsError>,
    pub sock_state: Result<sock_state::Mode, sock_state::SockStateError>,
    pub tc: tc::Mode,
}

impl HookReport {
    pub fn states(&self) -> Vec<HookState> {
        fn state<M, E: std::fmt::Display>(
            hook: &'static str,
            r: &Result<M, E>,
            name: impl Fn(&M) -> &'static str,
        ) -> HookState {
            match r {
                Ok(m) => HookState {
                    hook,
                    mode: name(m),
                    off_because: None,
                },
                Err(e) => HookState {
                    hook,
                    mode: "off",
                    off_because: Some(e.to_string()),
                },
            }
        }
        vec![
            state("kfree_skb", &self.kfree_skb, |m| m.as_str()),
            HookState {
                hook: "tc",
                mode: self.tc.as_str(),
                off_because: None,
            },
            state("sock_ops", &self.sock_ops, |m| m.as_str()),
            state("sock_state", &self.sock_state, |m| m.as_str()),
        ]
    }

    /// Capture is partial when a hook is off: what is missing, in a line.
    pub fn partial(&self) -> Option<String> {
        let off: Vec<String> = self
            .states()
            .into_iter()
            .filter_map(|s| s.off_because.map(|why| format!("{} off: {why}", s.hook)))
            .collect();
        (!off.is_empty()).then(|| off.join("; "))
    }
}

/// An error and its causes on one line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A program-load error in one line, with the verifier's last words when the
/// verifier said no.
pub(crate) fn verifier_msg(hook: &str, e: &aya::programs::ProgramError) -> String {
    match e {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let last = verifier_log
                .to_string()
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or_default()
                .to_string();
            format!("the kernel refused the {hook} program: {io_error} ({last})")
        }
        other => format!("loading the {hook} program: {}", chain(other)),
    }
}
