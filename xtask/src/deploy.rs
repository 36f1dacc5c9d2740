//! `cargo xtask deploy`: the Helm chart (`deploy/helm/netwatch`) is the one
//! source; the plain manifests (`deploy/manifests/`) are the chart rendered
//! by Helm's own template engine, and the chart's copies of the alerting
//! rules and the dashboard are the exporters' files.
//!
//! No `helm` binary can be installed on these machines, so the engine is
//! Helm's Go SDK (v4.2.3) as a C library, shipped in the PyPI wheel
//! `helm-python-sdk`, pinned by version and hash and installed on first use
//! under the target directory. Rendering is therefore exactly what
//! `helm template` does, with no renderer of our own to trust.
//!
//! - `render`: copy the rules and dashboard into the chart, render the plain
//!   manifests;
//! - `check`: fail, naming each file, when any of them differs from what
//!   `render` would write (and when `helm lint --strict` complains);
//! - `template`: print the chart rendered with `--set` values, like
//!   `helm template`.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use serde::Deserialize;

/// The Helm engine: PyPI's helm-python-sdk, a ctypes binding of libhelm_c
/// (Helm's Go SDK built as a C library), pinned to one reviewed wheel.
const HELM_SDK: &str = "helm-python-sdk==0.2.2";
/// sha256 of helm_python_sdk-0.2.2-py3-none-manylinux_2_28_x86_64.whl.
const HELM_SDK_SHA256: &str = "28cc13abaf134c3a7e37f070c939be8d9cdc9825c3c8b8b2d35161073bcd4578";

/// Release and namespace the plain manifests are rendered for.
pub const PLAIN_RELEASE: &str = "netwatch";
pub const PLAIN_NAMESPACE: &str = "netwatch";
/// Values of the plain manifests beyond the chart's defaults: a Namespace
/// object (no `--create-namespace` with kubectl) and the monitoring objects,
/// each in its own directory so a cluster without the Prometheus Operator
/// applies `deploy/manifests/` alone.
pub const PLAIN_VALUES: &[&str] = &[
    "namespace.create=true",
    "metrics.serviceMonitor.enabled=true",
    "prometheusRule.enabled=true",
    "grafanaDashboard.enabled=true",
];

/// Where each template's output goes under `deploy/manifests/`. The numbers
/// are Helm's install order: `kubectl apply -f` applies a directory's files
/// in name order, so the Namespace comes first.
pub const PLAIN_LAYOUT: &[(&str, &str)] = &[
    ("namespace.yaml", "00-namespace.yaml"),
    ("serviceaccount.yaml", "01-serviceaccount.yaml"),
    ("configmap.yaml", "02-configmap.yaml"),
    ("clusterrole.yaml", "03-clusterrole.yaml"),
    ("service.yaml", "04-service.yaml"),
    ("daemonset.yaml", "05-daemonset.yaml"),
    ("servicemonitor.yaml", "monitoring/servicemonitor.yaml"),
    ("prometheusrule.yaml", "monitoring/prometheusrule.yaml"),
    (
        "grafana-dashboard.yaml",
        "monitoring/grafana-dashboard.yaml",
    ),
];

/// Templates the plain manifests leave out on purpose.
const NOT_PLAIN: &[(&str, &str)] = &[
    ("NOTES.txt", "Helm's post-install message, not an object"),
    (
        "podmonitor.yaml",
        "the alternative to the ServiceMonitor; one of the two is enough",
    ),
];

/// The chart's copies of the exporters' files: (copy in the chart, source).
pub const CHART_FILES: &[(&str, &str)] = &[
    (
        "deploy/helm/netwatch/files/netwatch-rules.yaml",
        "deploy/prometheus/netwatch-rules.yaml",
    ),
    (
        "deploy/helm/netwatch/files/netwatch-dashboard.json",
        "deploy/grafana/netwatch-dashboard.json",
    ),
];

pub const CHART_DIR: &str = "deploy/helm/netwatch";
pub const MANIFESTS_DIR: &str = "deploy/manifests";

#[derive(Subcommand)]
pub enum DeployCommand {
    /// Copy the alerting rules and the dashboard into the chart, and render
    /// the chart into deploy/manifests/ (what `check` compares against).
    Render {
        /// Write the manifests here instead of deploy/manifests.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Fail if the chart's copies of the rules or dashboard, or the plain
    /// manifests, differ from what `render` writes, or if `helm lint
    /// --strict` finds anything.
    Check {
        /// The chart to check [default: deploy/helm/netwatch].
        #[arg(long, value_name = "DIR")]
        chart: Option<PathBuf>,
        /// The plain manifests to compare [default: deploy/manifests].
        #[arg(long, value_name = "DIR")]
        manifests: Option<PathBuf>,
    },
    /// Print the chart rendered like `helm template` (documents separated by
    /// `---`, each after a `# Source:` line).
    Template {
        /// A value, as `helm template --set` takes it (repeat for more).
        #[arg(long, value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// The values of the plain manifests (before any --set).
        #[arg(long)]
        plain: bool,
        #[arg(long, default_value = PLAIN_RELEASE)]
        release: String,
        #[arg(long, default_value = PLAIN_NAMESPACE)]
        namespace: String,
        /// The chart [default: deploy/helm/netwatch].
        #[arg(long, value_name = "DIR")]
        chart: Option<PathBuf>,
    },
}

pub fn run(command: DeployCommand) -> Result<()> {
    let root = workspace_root();
    match command {
        DeployCommand::Render { out } => {
            for (copy, source) in CHART_FILES {
                let text = read(&root.join(source))?;
                write(&root.join(copy), &text)?;
            }
            let out = out.unwrap_or_else(|| root.join(MANIFESTS_DIR));
            let files = plain_manifests(&root.join(CHART_DIR))?;
            for stale in yaml_files(&out)? {
                let relative = stale
                    .strip_prefix(&out)
                    .unwrap_or(&stale)
                    .to_string_lossy()
                    .into_owned();
                if !files.contains_key(&relative) {
                    std::fs::remove_file(&stale)
                        .with_context(|| format!("removing {}", stale.display()))?;
                }
            }
            for (relative, text) in &files {
                write(&out.join(relative), text)?;
            }
            eprintln!(
                "deploy: rendered {} manifests into {}",
                files.len(),
                out.display()
            );
            Ok(())
        }
        DeployCommand::Check { chart, manifests } => {
            let chart = chart.unwrap_or_else(|| root.join(CHART_DIR));
            let manifests = manifests.unwrap_or_else(|| root.join(MANIFESTS_DIR));
            let problems = check(&root, &chart, &manifests)?;
            if problems.is_empty() {
                eprintln!("deploy: chart, plain manifests, rules and dashboard agree");
                return Ok(());
            }
            for p in &problems {
                eprintln!("deploy: {p}");
            }
            bail!(
                "{} deploy file(s) out of date: run `cargo xtask deploy render` (and commit the result)",
                problems.len()
            )
        }
        DeployCommand::Template {
            set,
            plain,
            release,
            namespace,
            chart,
        } => {
            let chart = chart.unwrap_or_else(|| root.join(CHART_DIR));
            let mut values: Vec<String> = if plain {
                PLAIN_VALUES.iter().map(|s| s.to_string()).collect()
            } else {
                vec![]
            };
            values.extend(set);
            let rendered = render(&chart, &values, &release, &namespace)?;
            let mut out = String::new();
            for (template, text) in ordered(&rendered.manifests) {
                if template.ends_with("NOTES.txt") {
                    continue;
                }
                let _ = write!(
                    out,
                    "---\n# Source: {template}\n{}\n",
                    text.trim_matches('\n')
                );
            }
            std::io::stdout().write_all(out.as_bytes())?;
            Ok(())
        }
    }
}

/// The workspace root (xtask's parent directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf()
}

/// The chart rendered by Helm: template path (`netwatch/templates/x.yaml`)
/// to its output, empty outputs left out; and what `helm lint` said.
#[derive(Debug, Deserialize)]
pub struct Rendered {
    pub manifests: BTreeMap<String, String>,
    pub lint: Vec<LintMessage>,
}

#[derive(Debug, Deserialize)]
pub struct LintMessage {
    /// Helm's severity: 1 info, 2 warning, 3 error.
    pub severity: u8,
    pub path: String,
    pub error: String,
}

/// Documents in Helm's install order (the plain layout's order), then the rest by name.
fn ordered(manifests: &BTreeMap<String, String>) -> Vec<(&String, &String)> {
    let rank = |template: &str| {
        let name = template.rsplit('/').next().unwrap_or(template);
        PLAIN_LAYOUT
            .iter()
            .position(|(t, _)| *t == name)
            .unwrap_or(PLAIN_LAYOUT.len())
    };
    let mut docs: Vec<_> = manifests.iter().collect();
    docs.sort_by_key(|(t, _)| (rank(t), t.to_string()));
    docs
}

/// What `render` writes under deploy/manifests/: relative path to contents.
pub fn plain_manifests(chart: &Path) -> Result<BTreeMap<String, String>> {
    let values: Vec<String> = PLAIN_VALUES.iter().map(|s| s.to_string()).collect();
    let rendered = render(chart, &values, PLAIN_RELEASE, PLAIN_NAMESPACE)?;
    let mut files = BTreeMap::new();
    for (template, text) in &rendered.manifests {
        let name = template.rsplit('/').next().unwrap_or(template);
        if NOT_PLAIN.iter().any(|(t, _)| *t == name) {
            continue;
        }
        let Some((_, file)) = PLAIN_LAYOUT.iter().find(|(t, _)| *t == name) else {
            bail!(
                "{template}: a template the plain manifests have no place for; add it to PLAIN_LAYOUT \
                 (or NOT_PLAIN) in xtask/src/deploy.rs"
            );
        };
        let header = format!(
            "# Generated by `cargo xtask deploy render` from deploy/helm/netwatch/templates/{name}\n\
             # (Helm's engine; release {PLAIN_RELEASE:?}, namespace {PLAIN_NAMESPACE:?}). Edit the chart, not this file.\n"
        );
        files.insert(
            file.to_string(),
            format!("{header}{}\n", text.trim_matches('\n')),
        );
    }
    for (template, file) in PLAIN_LAYOUT {
        if !files.contains_key(*file) {
            bail!(
                "templates/{template} rendered nothing with the plain manifests' values ({PLAIN_VALUES:?}), so {file} would be empty"
            );
        }
    }
    Ok(files)
}

/// Every problem `check` finds, one sentence each naming the file.
pub fn check(root: &Path, chart: &Path, manifests: &Path) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    for (copy, source) in CHART_FILES {
        let copy_in_chart = chart.join(copy.strip_prefix(&format!("{CHART_DIR}/")).unwrap_or(copy));
        let (want, have) = (
            read(&root.join(source))?,
            std::fs::read_to_string(&copy_in_chart).unwrap_or_default(),
        );
        if want != have {
            problems.push(format!(
                "{} is not a copy of {source}{}",
                copy_in_chart.display(),
                first_difference(&want, &have)
            ));
        }
    }
    let expected = plain_manifests(chart)?;
    for (relative, want) in &expected {
        let path = manifests.join(relative);
        match std::fs::read_to_string(&path) {
            Err(_) => problems.push(format!("{} is missing", path.display())),
            Ok(have) if have != *want => problems.push(format!(
                "{} differs from the chart{}",
                path.display(),
                first_difference(want, &have)
            )),
            Ok(_) => {}
        }
    }
    for path in yaml_files(manifests)? {
        let relative = path
            .strip_prefix(manifests)
            .unwrap_or(&path)
            .to_string_lossy()
            .into_owned();
        if !expected.contains_key(&relative) {
            problems.push(format!(
                "{} is not rendered from the chart (remove it, or add a template)",
                path.display()
            ));
        }
    }
    for values in [vec![], PLAIN_VALUES.iter().map(|s| s.to_string()).collect()] {
        let rendered = render(chart, &values, PLAIN_RELEASE, PLAIN_NAMESPACE)?;
        for m in rendered.lint.iter().filter(|m| m.severity >= 2) {
            problems.push(format!(
                "helm lint --strict (values {values:?}): {}: {}",
                m.path, m.error
            ));
        }
    }
    Ok(problems)
}

/// ": line N is `...`, expected `...`" for the first line that differs.
fn first_difference(want: &str, have: &str) -> String {
    let (w, h): (Vec<&str>, Vec<&str>) = (want.lines().collect(), have.lines().collect());
    for i in 0..w.len().max(h.len()) {
        let (a, b) = (w.get(i).copied(), h.get(i).copied());
        if a != b {
            return format!(
                ": line {} is {}, expected {}",
                i + 1,
                b.map_or("missing".into(), |l| format!("`{}`", l.trim())),
                a.map_or("nothing".into(), |l| format!("`{}`", l.trim()))
            );
        }
    }
    String::new()
}

/// `*.yaml` files under `dir`, recursively (none if it does not exist).
fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(found);
    };
    for entry in entries {
        let path = entry?.path();
        if path.is_dir() {
            found.extend(yaml_files(&path)?);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn write(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The Python side: parse each `--set` with Helm's own strvals, render the
/// chart offline, lint it strictly, and answer in JSON.
const RENDER_PY: &str = r#"
import json, sys
try:
    import helm_python as helm
except Exception as e:
    sys.exit(f"cannot load Helm's engine (helm_python): {e}")
req = json.load(sys.stdin)
def merge(into, new):
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            merge(into[k], v)
        else:
            into[k] = v
values = {}
try:
    for expr in req["set"]:
        merge(values, helm.parse_set_string(expr))
    with helm.Chart.load(req["chart"]) as chart:
        out = chart.render(values, name=req["release"], namespace=req["namespace"], is_install=True)
    lint = helm.lint(req["chart"], values, strict=True, namespace=req["namespace"])
except Exception as e:
    sys.exit(f"{type(e).__name__}: {e}")
manifests = {k: v for k, v in out.items() if v.strip()}
messages = [{"severity": m["severity"], "path": m["path"], "error": m["error"]} for m in lint.get("messages") or []]
messages += [{"severity": 3, "path": "", "error": e} for e in lint.get("errors") or []]
json.dump({"manifests": manifests, "lint": messages}, sys.stdout)
"#;

/// Renders `chart` with `values` (each as `helm template --set` takes it).
pub fn render(chart: &Path, values: &[String], release: &str, namespace: &str) -> Result<Rendered> {
    if !chart.join("Chart.yaml").is_file() {
        bail!("{}: not a Helm chart (no Chart.yaml)", chart.display());
    }
    let engine = helm_engine()?;
    let request = serde_json::json!({
        "chart": chart.canonicalize().with_context(|| format!("resolving {}", chart.display()))?,
        "set": values,
        "release": release,
        "namespace": namespace,
    });
    let mut child = Command::new("python3")
        .args(["-c", RENDER_PY])
        .env("PYTHONPATH", &engine)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running python3 (Helm's engine is a Python package): install python3")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(request.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "helm template {} {}: {}",
            chart.display(),
            values
                .iter()
                .map(|v| format!("--set {v}"))
                .collect::<Vec<_>>()
                .join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("reading the Helm engine's answer")
}

/// Directory holding the pinned helm-python-sdk, installed on first use.
fn helm_engine() -> Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let version = HELM_SDK.split("==").nth(1).unwrap_or("");
    let dir = target
        .join("deploy-tools")
        .join(format!("helm-python-sdk-{version}"));
    if dir.join("helm_python").join("__init__.py").is_file() {
        return Ok(dir);
    }
    if std::env::consts::ARCH != "x86_64" {
        bail!(
            "the pinned Helm engine ({HELM_SDK}) is the x86_64 wheel; on {} add that wheel's sha256 \
             to HELM_SDK_SHA256 in xtask/src/deploy.rs",
            std::env::consts::ARCH
        );
    }
    let parent = dir.parent().expect("deploy-tools");
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    // One install at a time (tests render side by side); the others wait
    // for it and then find the engine in place.
    let lock_path = parent.join(".install.lock");
    let lock = std::fs::File::create(&lock_path)
        .with_context(|| format!("creating {}", lock_path.display()))?;
    // SAFETY: flock on a descriptor we own; released when `lock` is closed.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
        bail!(
            "cannot lock {}: {}",
            lock_path.display(),
            std::io::Error::last_os_error()
        );
    }
    if dir.join("helm_python").join("__init__.py").is_file() {
        return Ok(dir);
    }
    eprintln!(
        "deploy: installing Helm's engine ({HELM_SDK}, hash-pinned) into {}",
        dir.display()
    );
    let staging = parent.join(format!(".staging-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let requirements = parent.join(format!(".requirements-{}.txt", std::process::id()));
    write(
        &requirements,
        &format!("{HELM_SDK} --hash=sha256:{HELM_SDK_SHA256}\n"),
    )?;
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
        ])
        .env("PIP_ROOT_USER_ACTION", "ignore")
        .args(["--only-binary=:all:", "--require-hashes", "--target"])
        .arg(&staging)
        .arg("-r")
        .arg(&requirements)
        .status()
        .context("running python3 -m pip (needed once, to install Helm's engine)")?;
    let _ = std::fs::remove_file(&requirements);
    if !status.success() {
        let _ = std::fs::remove_dir_all(&staging);
        bail!("pip could not install {HELM_SDK} (PyPI must be reachable once)");
    }
    // Renamed into place: a run killed mid-install leaves no half engine.
    std::fs::rename(&staging, &dir)
        .with_context(|| format!("moving the Helm engine into {}", dir.display()))?;
    drop(lock);
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_difference_names_the_line_and_both_texts() {
        assert_eq!(first_difference("a\nb\n", "a\nb\n"), "");
        assert_eq!(
            first_difference("a\nb\n", "a\nc\n"),
            ": line 2 is `c`, expected `b`"
        );
        assert_eq!(
            first_difference("a\nb\n", "a\n"),
            ": line 2 is missing, expected `b`"
        );
        assert_eq!(
            first_difference("a\n", "a\nz\n"),
            ": line 2 is `z`, expected nothing"
        );
    }

    #[test]
    fn every_template_has_a_place_or_a_reason() {
        let templates =
            std::fs::read_dir(workspace_root().join(CHART_DIR).join("templates")).unwrap();
        for entry in templates {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            if name.starts_with('_') {
                continue;
            }
            let placed = PLAIN_LAYOUT.iter().any(|(t, _)| *t == name)
                || NOT_PLAIN.iter().any(|(t, _)| *t == name);
            assert!(
                placed,
                "templates/{name} is neither in PLAIN_LAYOUT nor in NOT_PLAIN"
            );
        }
    }
}
