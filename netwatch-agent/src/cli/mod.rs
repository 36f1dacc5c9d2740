//! The `netwatch` command line: one argument struct and one `run` function
//! per subcommand. `run` returns the exit code; errors are input or usage
//! errors, which the binary reports in one line with exit code 2 (1 when the
//! agent went away mid-stream).

pub mod explain;
pub mod lint;
pub mod observe;
pub mod term;
pub mod top;

use crate::manifests::ManifestError;
use crate::policy::PolicyError;

/// `-o text|json`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// For people: short, the verdict first.
    #[default]
    Text,
    /// For programs: one JSON document.
    Json,
}

/// Why a command could not do its work (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The manifests could not be read.
    #[error(transparent)]
    Manifests(#[from] ManifestError),
    /// A policy is invalid, a pod is unknown, or no suggestion is possible.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The arguments do not make sense together.
    #[error("{0}")]
    Usage(String),
    /// The agent went away while this command was reading from it (it
    /// stopped or restarted): a follower must not take that for quiet.
    #[error(
        "the agent at {0} closed the connection (stopped or restarted?); no more flows will come"
    )]
    AgentGone(String),
    /// Standard output or error could not be written.
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

impl CliError {
    /// The exit code for this error: 0 when the reader went away (a closed
    /// pipe, as with `| head`), else 2.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Output(e) if e.kind() == std::io::ErrorKind::BrokenPipe => 0,
            CliError::AgentGone(_) => 1,
            _ => 2,
        }
    }
}

/// Logs to standard error, warnings and up unless `RUST_LOG` says otherwise,
/// without timestamps: the CLI's warnings are messages, not events.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    crate::logging::init(filter, crate::logging::LogFormat::Text, false);
}
