//! `netwatch lint`: the NetworkPolicy mistakes behind real outages, with
//! their fixes. Exit status 1 when something is found, for CI.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use clap::Args;

use super::{CliError, OutputFormat};
use crate::manifests;
use crate::policy::{Finding, LintOptions, Severity, lint_with};

const CHECKS: &str = "\
Checks (id: what it finds):
  dns-egress                          pods isolated for egress that cannot reach DNS on 53/UDP and 53/TCP
  namespace-selector-matches-nothing  namespaceSelectors on labels no namespace has (the classic `name: kube-system`)
  pod-selector-matches-nothing        spec.podSelector selecting no pod: the policy does nothing
  peer-selector-matches-nothing       from/to podSelectors matching no pod
  named-port-undefined                named ports no pod they could resolve on defines
  allows-nothing                      policies whose rules can all never match: they only isolate
  rules-ignored-by-policy-types       ingress/egress rules in a direction policyTypes leaves out
  ipblock-covers-cluster              ipBlocks containing pod IPs, node pod CIDRs or service IPs
  invalid-policy                      what the API server would refuse

Pods are the Pods of the manifests, plus the pod templates of Deployments, StatefulSets,
DaemonSets, ReplicaSets, Jobs and CronJobs that have no Pod there. Checks that need pods only
look at namespaces with pods in the manifests.

Exit status: 0 nothing found, 1 something found, 2 the manifests could not be read.

Examples:
  netwatch lint --manifests deploy/
  netwatch lint --manifests base/ overlays/prod/ -o json";

/// Arguments of `netwatch lint`.
#[derive(Debug, Clone, Args)]
#[command(
    about = "Find NetworkPolicy mistakes that cause outages, and say how to fix each",
    after_help = CHECKS
)]
pub struct LintArgs {
    /// Manifest files or directories: YAML or JSON, multi-document, `kind: List`; directories are
    /// read recursively (*.yaml, *.yml, *.json). `-` reads standard input.
    #[arg(long, short = 'f', value_name = "PATH", num_args = 1.., required = true)]
    pub manifests: Vec<PathBuf>,

    /// Output format: text or json (an array of findings).
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,

    /// Namespace of the cluster DNS pods, for the dns-egress check.
    #[arg(long, value_name = "NAMESPACE", default_value = "kube-system")]
    pub dns_namespace: String,

    /// Labels of the cluster DNS pods, for the dns-egress check.
    #[arg(long, value_name = "KEY=VALUE,...", default_value = "k8s-app=kube-dns")]
    pub dns_labels: String,

    /// Whether ipBlocks also match traffic from and to pod IPs (Calico: true, Cilium: false).
    #[arg(
        long,
        value_name = "BOOL",
        default_value_t = true,
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub ipblock_matches_pods: bool,
}

/// Runs `netwatch lint`, writing to standard output.
pub fn run(args: &LintArgs) -> Result<u8, CliError> {
    let stdout = std::io::stdout();
    run_with(args, &mut stdout.lock())
}

/// Runs `netwatch lint`; returns 1 when it finds something, else 0.
pub fn run_with(args: &LintArgs, out: &mut dyn Write) -> Result<u8, CliError> {
    let mut dns_labels = BTreeMap::new();
    for pair in args
        .dns_labels
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| CliError::Usage(format!("--dns-labels: {pair:?} is not key=value")))?;
        dns_labels.insert(k.to_string(), v.to_string());
    }
    let snapshot = manifests::load(&args.manifests)?;
    let options = LintOptions {
        ipblock_matches_pods: args.ipblock_matches_pods,
        dns_namespace: args.dns_namespace.clone(),
        dns_labels,
    };
    let findings = lint_with(&snapshot, &options);
    match args.output {
        OutputFormat::Json => {
            serde_json::to_writer_pretty(&mut *out, &findings).map_err(std::io::Error::from)?;
            writeln!(out)?;
        }
        OutputFormat::Text => write_text(out, &findings, snapshot.network_policies.len())?,
    }
    Ok(if findings.is_empty() { 0 } else { 1 })
}

fn write_text(out: &mut dyn Write, findings: &[Finding], policies: usize) -> std::io::Result<()> {
    let plural =
        |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    if findings.is_empty() {
        return writeln!(
            out,
            "no problems found in {}",
            plural(policies, "NetworkPolicy", "NetworkPolicies")
        );
    }
    // Prose is wrapped to the terminal; fixes that hold YAML keep their lines.
    let width = super::term::terminal_width();
    for f in findings {
        let at = f
            .policy
            .as_ref()
            .map(|p| format!(" {p}"))
            .unwrap_or_default();
        let message = format!("{}[{}]{at}: {}", f.severity, f.check, f.message);
        writeln!(out, "{}", super::term::wrap(&message, width))?;
        let mut lines = f.fix.lines();
        if let Some(first) = lines.next() {
            writeln!(
                out,
                "{}",
                super::term::wrap(&format!("  fix: {first}"), width)
            )?;
        }
        for line in lines {
            writeln!(out, "       {line}")?;
        }
    }
    let errors = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .count();
    let warnings = findings.len() - errors;
    writeln!(
        out,
        "\n{}: {}, {}",
        plural(findings.len(), "finding", "findings"),
        plural(errors, "error", "errors"),
        plural(warnings, "warning", "warnings")
    )
}
