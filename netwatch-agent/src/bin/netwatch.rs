//! `netwatch`: the command line. Parses, dispatches to [`netwatch::cli`],
//! and turns errors into one line on stderr with exit code 2.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use netwatch::cli;

/// netwatch: why Kubernetes pod flows are denied, and what to change.
#[derive(Debug, Parser)]
#[command(name = "netwatch", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Explain(cli::explain::ExplainArgs),
    Lint(cli::lint::LintArgs),
    Observe(cli::observe::ObserveArgs),
    Top(cli::top::TopArgs),
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let mut args = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // `--not` inverts the filter flag after it: only the matches know the order.
    if let Some((_, sub)) = matches.subcommand() {
        match &mut args.command {
            Command::Observe(a) => a.filters.negated = cli::observe::negated_terms(sub),
            Command::Top(a) => a.filters.negated = cli::observe::negated_terms(sub),
            _ => {}
        }
    }
    cli::init_logging();
    let result = match &args.command {
        Command::Explain(a) => cli::explain::run(a),
        Command::Lint(a) => cli::lint::run(a),
        Command::Observe(a) => cli::observe::run(a),
        Command::Top(a) => cli::top::run(a),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let code = e.exit_code();
            if code != 0 {
                eprintln!("netwatch: {e}");
            }
            ExitCode::from(code)
        }
    }
}
