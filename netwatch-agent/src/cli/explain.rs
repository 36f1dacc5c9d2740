//! `netwatch explain`: is a flow allowed by the NetworkPolicies in some
//! manifests, which policies decide it, what is the smallest fix; or the
//! whole connectivity table between the pods.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;

use super::{CliError, OutputFormat};
use crate::manifests;
use crate::policy::{
    DirectionVerdict, Endpoint, EndpointKind, EngineOptions, FlowVerdict, MatrixEntry, Peer,
    PolicyEngine, PolicyVerdict, Protocol, SuggestKind, Tier, connectivity_matrix, suggest_kind,
};

const EXAMPLES: &str = "\
Examples:
  # Is prod/web allowed to reach prod/api on 8080/TCP, and if not, why?
  netwatch explain --manifests deploy/ --from prod/web-7d9f --to prod/api-0 --port 8080

  # Ask before deploying: a pod that does not exist yet, by namespace and labels
  netwatch explain --manifests deploy/ --from prod:app=web,tier=frontend --to prod/api-0 --port 8080

  # Traffic from outside the cluster, judged by ipBlocks; JSON for scripts
  netwatch explain --manifests deploy/ --from 203.0.113.7 --to prod/api-0 --port 443 -o json

  # The smallest policy that allows it (YAML on stdout, explanation on stderr)
  netwatch explain --manifests deploy/ --from prod/web-7d9f --to prod/api-0 --port 8080 --suggest | kubectl apply -f -

  # The connectivity table between all pods, for a CI check of a policy change
  netwatch explain --manifests deploy/ --matrix --ports 80,443 --protocols TCP,UDP -o json";

/// Arguments of `netwatch explain`.
#[derive(Debug, Clone, Args)]
#[command(
    about = "Explain whether NetworkPolicies allow a flow, which policies decide it, and the smallest fix",
    long_about = "Explain whether the NetworkPolicies in some manifests allow a flow, which policies \
isolate each end and which allow or deny it, and what each rule almost matched. With --suggest, \
print the least-privilege NetworkPolicy that allows exactly this flow. With --matrix, print the \
allowed/denied table between every pair of pods instead.\n\n\
Semantics are those of the networking.k8s.io/v1 API. Addresses that no pod has (nodes, the \
internet) are matched by ipBlocks only. Whether an ipBlock also matches pod IPs differs between \
CNIs (Calico: yes, Cilium: no): see --ipblock-matches-pods; the output states the setting.",
    after_help = EXAMPLES
)]
pub struct ExplainArgs {
    /// Manifest files or directories: YAML or JSON, multi-document, `kind: List`; directories are
    /// read recursively (*.yaml, *.yml, *.json). `-` reads standard input. Namespaces, Pods
    /// (labels, status.podIP, container ports) and NetworkPolicies are used.
    #[arg(long, short = 'f', value_name = "PATH", num_args = 1.., required = true)]
    pub manifests: Vec<PathBuf>,

    /// Source: namespace/pod, an IP address, or a pod that does not exist yet as
    /// namespace:key=value,key=value (namespace: for one without labels).
    #[arg(
        long,
        value_name = "SRC",
        required_unless_present = "matrix",
        conflicts_with = "matrix"
    )]
    pub from: Option<String>,

    /// Destination, in the same forms as --from.
    #[arg(
        long,
        value_name = "DST",
        required_unless_present = "matrix",
        conflicts_with = "matrix"
    )]
    pub to: Option<String>,

    /// Destination port (1-65535).
    #[arg(
        long,
        value_name = "PORT",
        required_unless_present = "matrix",
        conflicts_with = "matrix",
        value_parser = parse_port
    )]
    pub port: Option<u16>,

    /// The client's source port (1-65535), for Calico rules with source `ports`/`notPorts`.
    /// Without it the source port is unknown: such `ports` match nothing and such `notPorts`
    /// exclude nothing. --suggest judges with an unknown source port.
    #[arg(
        long,
        value_name = "PORT",
        conflicts_with_all = ["matrix", "suggest"],
        value_parser = parse_port
    )]
    pub source_port: Option<u16>,

    /// Exit 1 when the flow is DENIED (0 when ALLOWED), for scripts.
    #[arg(long, conflicts_with = "matrix")]
    pub exit_code: bool,

    /// Protocol: TCP, UDP or SCTP.
    #[arg(long, value_name = "PROTOCOL", default_value = "TCP")]
    pub protocol: Protocol,

    /// Output format: text (verdict first) or json.
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,

    /// Print on stdout the least-privilege NetworkPolicy YAML that allows exactly this flow
    /// (ready for `kubectl apply -f -`); the explanation goes to stderr. Prints nothing on stdout
    /// when the flow is already allowed.
    #[arg(long, conflicts_with = "matrix")]
    pub suggest: bool,

    /// Where a Calico tier decides, what --suggest proposes: a Calico NetworkPolicy in that tier
    /// (calico), or a Kubernetes NetworkPolicy (networkpolicy: Calico's default tier at order
    /// 1000, so only when nothing earlier denies).
    #[arg(
        long,
        value_enum,
        value_name = "KIND",
        default_value = "calico",
        requires = "suggest"
    )]
    pub suggest_kind: SuggestKind,

    /// Print the connectivity table between all pods of the manifests (a pod to itself is left
    /// out) instead of explaining one flow.
    #[arg(long)]
    pub matrix: bool,

    /// Ports probed by --matrix, comma-separated.
    #[arg(long, value_name = "PORTS", value_delimiter = ',', default_value = "80,81", requires = "matrix",
          value_parser = clap::value_parser!(u16).range(1..))]
    pub ports: Vec<u16>,

    /// Protocols probed by --matrix, comma-separated: TCP, UDP, SCTP.
    #[arg(
        long,
        value_name = "PROTOCOLS",
        value_delimiter = ',',
        default_value = "TCP",
        requires = "matrix"
    )]
    pub protocols: Vec<Protocol>,

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

/// A port number; a named port (`http`) gets a message saying what to give.
fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        Ok(_) => Err("0 is not a port: give 1-65535".into()),
        Err(_) if s.chars().any(|c| c.is_ascii_alphabetic()) => Err(format!(
            "{s:?} is a port name; give the number the destination's containerPort named {s:?} has (e.g. 8080)"
        )),
        Err(_) => Err(format!("{s:?} is not a port: give 1-65535")),
    }
}

/// Runs `netwatch explain`, writing to standard output and error.
pub fn run(args: &ExplainArgs) -> Result<u8, CliError> {
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    run_with(args, &mut stdout.lock(), &mut stderr.lock())
}

/// Runs `netwatch explain` with the given output streams. Returns 0: the
/// verdict is in the output, not in the exit code (unless --exit-code).
pub fn run_with(
    args: &ExplainArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<u8, CliError> {
    let snapshot = manifests::load(&args.manifests)?;
    let options = EngineOptions {
        ipblock_matches_pods: args.ipblock_matches_pods,
    };
    let engine = PolicyEngine::new(&snapshot, options)?;

    if args.matrix {
        let mut protocols = args.protocols.clone();
        protocols.dedup();
        let entries = connectivity_matrix(&engine, &args.ports, &protocols);
        match args.output {
            OutputFormat::Json => {
                serde_json::to_writer_pretty(&mut *out, &entries).map_err(std::io::Error::from)?;
                writeln!(out)?;
                writeln!(err, "{}", ipblock_line(args.ipblock_matches_pods))?;
            }
            OutputFormat::Text => write_matrix(
                out,
                &engine,
                &entries,
                &args.ports,
                &protocols,
                args.ipblock_matches_pods,
            )?,
        }
        return Ok(0);
    }

    // clap guarantees these without --matrix.
    let (Some(from), Some(to), Some(port)) = (&args.from, &args.to, args.port) else {
        return Err(CliError::Usage(
            "--from, --to and --port are required without --matrix".into(),
        ));
    };
    let from: Peer = from
        .parse()
        .map_err(|e| CliError::Usage(format!("--from: {e}")))?;
    let to: Peer = to
        .parse()
        .map_err(|e| CliError::Usage(format!("--to: {e}")))?;
    let to = match service_backend(&snapshot, &engine, &to)? {
        Some((backend, note)) => {
            writeln!(err, "{note}")?;
            backend
        }
        None => to,
    };
    let verdict =
        engine.try_evaluate_with_source_port(&from, &to, args.source_port, port, args.protocol)?;

    if args.suggest {
        // Stdout carries only YAML, so `| kubectl apply -f -` works.
        write_verdict(err, &verdict, args.output)?;
        let suggestion = suggest_kind(
            &engine,
            &snapshot,
            &from,
            &to,
            port,
            args.protocol,
            args.suggest_kind,
        )?;
        if suggestion.is_empty() {
            writeln!(err, "nothing to suggest: the flow is already allowed")?;
        } else {
            write!(out, "{}", suggestion.to_yaml())?;
        }
        return Ok(0);
    }
    write_verdict(out, &verdict, args.output)?;
    Ok(
        if args.exit_code && verdict.verdict == PolicyVerdict::Denied {
            1
        } else {
            0
        },
    )
}

/// A `--to` naming a Service (`namespace/name`, or its cluster IP) means
/// its backends: after DNAT the packets go to a pod its selector matches,
/// and that pod's policies judge them (an ipBlock of the cluster IP never
/// matches). Returns the first backend and a note saying so; `None` when
/// `to` is not a Service.
fn service_backend(
    snapshot: &crate::cluster::ClusterSnapshot,
    engine: &PolicyEngine,
    to: &Peer,
) -> Result<Option<(Peer, String)>, CliError> {
    let is_pod_ip = |ip: &std::net::IpAddr| snapshot.pods.iter().any(|p| p.ips().contains(ip));
    let service = snapshot.services.iter().find(|svc| {
        let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
        let name = svc.metadata.name.as_deref().unwrap_or_default();
        match to {
            Peer::Pod { namespace, name: n } => {
                engine.check_peer(to).is_err() && ns == namespace && name == n
            }
            Peer::Ip(ip) if !is_pod_ip(ip) => svc.spec.as_ref().is_some_and(|spec| {
                let ip = ip.to_string();
                spec.cluster_ip.as_deref() == Some(ip.as_str())
                    || spec.cluster_ips.iter().flatten().any(|c| *c == ip)
            }),
            _ => false,
        }
    });
    let Some(svc) = service else {
        return Ok(None);
    };
    let ns = svc
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = svc.metadata.name.clone().unwrap_or_default();
    let selector = svc
        .spec
        .as_ref()
        .and_then(|s| s.selector.clone())
        .unwrap_or_default();
    let mut backends: Vec<String> = snapshot
        .pods
        .iter()
        .filter(|p| p.namespace() == ns)
        .filter(|p| {
            let labels = p.labels();
            !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
        })
        .filter_map(|p| p.name().map(str::to_owned))
        .collect();
    backends.sort();
    let Some(first) = backends.first() else {
        return Err(CliError::Usage(format!(
            "--to {to}: service {ns}/{name} selects no pod in the manifests; its traffic goes to its backends: add them, or name a backend pod"
        )));
    };
    let note = format!(
        "{to} is service {ns}/{name}: judging its backend {ns}/{first}{}, which the packets reach after DNAT",
        match backends.len() {
            1 => String::new(),
            n => format!(" (1 of {n} it selects, same labels)"),
        }
    );
    Ok(Some((
        Peer::Pod {
            namespace: ns,
            name: first.clone(),
        },
        note,
    )))
}

fn ipblock_line(matches: bool) -> String {
    format!(
        "ipBlock peers match pod IPs: {} (--ipblock-matches-pods={matches})",
        if matches { "yes" } else { "no" }
    )
}

fn write_verdict(
    out: &mut dyn Write,
    v: &FlowVerdict,
    format: OutputFormat,
) -> std::io::Result<()> {
    match format {
        OutputFormat::Json => {
            serde_json::to_writer_pretty(&mut *out, v).map_err(std::io::Error::from)?;
            writeln!(out)
        }
        OutputFormat::Text => write!(
            out,
            "{}",
            super::term::wrap(&render_text(v), super::term::terminal_width())
        ),
    }
}

/// The text form of a verdict: verdict first, then the sentence, then each
/// direction with its policies and near misses.
pub fn render_text(v: &FlowVerdict) -> String {
    let from_port = v
        .source_port
        .map(|p| format!(" from source port {p}"))
        .unwrap_or_default();
    let mut s = format!(
        "{}: {} -> {} on {}/{}{from_port}\n",
        v.verdict, v.source, v.destination, v.port, v.protocol
    );
    s.push_str(&v.sentence());
    s.push_str("\n\n");
    s.push_str(&format!("source:      {}\n", describe(&v.source)));
    s.push_str(&format!("destination: {}\n", describe(&v.destination)));
    for e in [&v.source, &v.destination] {
        if e.namespace_assumed
            && let Some(ns) = &e.namespace
        {
            s.push_str(&format!(
                "note: namespace {ns} is not in the manifests: {}\n",
                crate::policy::MISSING_NAMESPACE_RULE
            ));
        }
    }
    s.push_str(&direction_text("egress ", &v.source, &v.egress));
    s.push_str(&direction_text("ingress", &v.destination, &v.ingress));
    if let Some(staged) = &v.staged {
        // Staged Calico policies: what-if only, never enforced.
        let headline = match (v.verdict, staged.verdict) {
            (PolicyVerdict::Allowed, PolicyVerdict::Denied) => "would be DENIED if enforced",
            (PolicyVerdict::Denied, PolicyVerdict::Allowed) => "would be ALLOWED if enforced",
            (_, PolicyVerdict::Allowed) => "ALLOWED either way",
            (_, PolicyVerdict::Denied) => "DENIED either way",
        };
        s.push_str(&format!("staged policies (not enforced): {headline}\n"));
        s.push_str(&direction_text("  egress ", &v.source, &staged.egress));
        s.push_str(&direction_text(
            "  ingress",
            &v.destination,
            &staged.ingress,
        ));
    }
    s.push_str(&ipblock_line(v.ipblock_matches_pods));
    s.push('\n');
    s
}

fn describe(e: &Endpoint) -> String {
    let kind = match e.kind {
        EndpointKind::Pod => "pod",
        EndpointKind::Hypothetical => "hypothetical pod",
        EndpointKind::External => "not a pod: judged by ipBlocks only",
    };
    let mut parts = vec![kind.to_string()];
    if e.kind != EndpointKind::External {
        parts.push(format!(
            "labels {}",
            crate::policy::render_labels(&e.labels)
        ));
        parts.push(match e.ip {
            Some(ip) => format!("ip {ip}"),
            None => "no IP".into(),
        });
    }
    format!("{e} ({})", parts.join(", "))
}

fn direction_text(name: &str, subject: &Endpoint, d: &DirectionVerdict) -> String {
    let list = |refs: &[crate::policy::PolicyRef]| {
        refs.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut s = match (d.isolated, d.verdict) {
        (false, _) if subject.kind == EndpointKind::External => {
            format!("{name} ALLOWED: {subject} has no policies\n")
        }
        (false, _) => format!(
            "{name} ALLOWED: {subject} is not isolated for {}\n",
            name.trim()
        ),
        (true, PolicyVerdict::Allowed) => format!("{name} ALLOWED by {}\n", list(&d.allowed_by)),
        (true, PolicyVerdict::Denied) if d.decided_in != Some(Tier::NetworkPolicy) => {
            format!("{name} DENIED by {}\n", list(&d.denied_by))
        }
        (true, PolicyVerdict::Denied) => format!(
            "{name} DENIED: {subject} is isolated by {}\n",
            list(&d.denied_by)
        ),
    };
    // With cluster policies, the per-tier walkthrough:
    //   Admin: PASS by ClusterNetworkPolicy ns-isolation rule 2
    //   NetworkPolicy: isolated by prod/default-deny, nothing allows -> DENY
    if d.tiers.iter().any(|t| t.tier != Tier::NetworkPolicy) {
        for step in &d.tiers {
            s.push_str(&format!("  {}\n", step.describe()));
        }
        if d.decided_in.is_none() {
            s.push_str("  no tier decided -> ALLOWED (the default)\n");
        }
    }
    for miss in &d.near_misses {
        s.push_str(&format!("  near miss: {miss}\n"));
    }
    s
}

fn write_matrix(
    out: &mut dyn Write,
    engine: &PolicyEngine,
    entries: &[MatrixEntry],
    ports: &[u16],
    protocols: &[Protocol],
    ipblock_matches_pods: bool,
) -> std::io::Result<()> {
    let pods: Vec<String> = engine
        .pods()
        .into_iter()
        .map(|(ns, name)| format!("{ns}/{name}"))
        .collect();
    let width = pods.iter().map(String::len).max().unwrap_or(1).max(1);
    writeln!(
        out,
        "rows: from, columns: to; . allowed, X denied, - same pod (not probed)"
    )?;
    writeln!(out, "{}", ipblock_line(ipblock_matches_pods))?;
    let mut cells = entries.iter();
    for &port in ports {
        for &protocol in protocols {
            writeln!(out, "\n{port}/{protocol}")?;
            let mut line = format!("{:width$}", "");
            for p in &pods {
                line.push_str(&format!(" {p:width$}"));
            }
            writeln!(out, "{}", line.trim_end())?;
            for (fi, from) in pods.iter().enumerate() {
                let mut line = format!("{from:width$}");
                for ti in 0..pods.len() {
                    let mark = if fi == ti {
                        "-"
                    } else {
                        match cells.next().map(|c| c.verdict) {
                            Some(PolicyVerdict::Allowed) => ".",
                            Some(PolicyVerdict::Denied) => "X",
                            None => "?",
                        }
                    };
                    line.push_str(&format!(" {mark:width$}"));
                }
                writeln!(out, "{}", line.trim_end())?;
            }
        }
    }
    Ok(())
}
