//! Label selectors (`matchLabels` + `matchExpressions`), compiled once and
//! matched many times, with the words to say why a selector missed.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

use super::model::FieldProblem;

/// Kubernetes labels: key -> value.
pub type Labels = BTreeMap<String, String>;

/// One requirement of a label selector. `matchLabels` entries become
/// [`LabelRequirement::Equals`]; the expressions keep their operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LabelRequirement {
    /// `key: value` in `matchLabels`.
    Equals { key: String, value: String },
    /// `operator: In`: the label exists and its value is one of `values`.
    In { key: String, values: Vec<String> },
    /// `operator: NotIn`: the label is absent, or its value is none of `values`.
    NotIn { key: String, values: Vec<String> },
    /// `operator: Exists`.
    Exists { key: String },
    /// `operator: DoesNotExist`.
    DoesNotExist { key: String },
}

impl LabelRequirement {
    fn matches(&self, labels: &Labels) -> bool {
        match self {
            Self::Equals { key, value } => labels.get(key) == Some(value),
            Self::In { key, values } => labels.get(key).is_some_and(|v| values.contains(v)),
            Self::NotIn { key, values } => labels.get(key).is_none_or(|v| !values.contains(v)),
            Self::Exists { key } => labels.contains_key(key),
            Self::DoesNotExist { key } => !labels.contains_key(key),
        }
    }

    /// Why `labels` fails this requirement, in a few words, into `out`.
    fn write_mismatch(&self, labels: &Labels, out: &mut String) {
        use std::fmt::Write;
        let _ = match self {
            Self::Equals { key, value } => match labels.get(key) {
                None => write!(out, "missing {key}={value}"),
                Some(actual) => write!(out, "{key}={actual}, not {value}"),
            },
            Self::In { key, values } => match labels.get(key) {
                None => write!(
                    out,
                    "missing {key} (needs {key} in ({}))",
                    values.join(", ")
                ),
                Some(actual) => write!(out, "{key}={actual} not in ({})", values.join(", ")),
            },
            Self::NotIn { key, values } => {
                let actual = labels.get(key).map(String::as_str).unwrap_or_default();
                write!(out, "{key}={actual} is in ({})", values.join(", "))
            }
            Self::Exists { key } => write!(out, "missing label {key}"),
            Self::DoesNotExist { key } => {
                let actual = labels.get(key).map(String::as_str).unwrap_or_default();
                write!(out, "has {key}={actual}")
            }
        };
    }
}

impl fmt::Display for LabelRequirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Equals { key, value } => write!(f, "{key}: {value}"),
            Self::In { key, values } => write!(f, "{key} in ({})", values.join(", ")),
            Self::NotIn { key, values } => write!(f, "{key} notin ({})", values.join(", ")),
            Self::Exists { key } => write!(f, "{key}"),
            Self::DoesNotExist { key } => write!(f, "!{key}"),
        }
    }
}

/// A validated label selector. An empty selector matches everything, as in
/// the API (`podSelector: {}` selects every pod of the namespace).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompiledSelector {
    requirements: Vec<LabelRequirement>,
    /// The rendered form, made once: explanations print it for every
    /// denied flow.
    text: String,
}

impl Default for CompiledSelector {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl CompiledSelector {
    fn new(requirements: Vec<LabelRequirement>) -> Self {
        let inner: Vec<String> = requirements.iter().map(ToString::to_string).collect();
        let text = format!("{{{}}}", inner.join(", "));
        Self { requirements, text }
    }

    /// The selector that matches everything.
    pub fn everything() -> Self {
        Self::default()
    }

    /// A selector of exact `matchLabels`.
    pub fn from_labels(labels: &Labels) -> Self {
        Self::new(
            labels
                .iter()
                .map(|(k, v)| LabelRequirement::Equals {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
        )
    }

    /// Validates and compiles `selector`; `field` is its path in the object
    /// (for example `spec.ingress[0].from[1].podSelector`), used in errors.
    pub(crate) fn compile(selector: &LabelSelector, field: &str) -> Result<Self, FieldProblem> {
        let mut requirements = Vec::new();
        if let Some(match_labels) = &selector.match_labels {
            for (key, value) in match_labels {
                let path = format!("{field}.matchLabels.{key}");
                validate_label_key(key, &path)?;
                validate_label_value(value, &path)?;
                requirements.push(LabelRequirement::Equals {
                    key: key.clone(),
                    value: value.clone(),
                });
            }
        }
        for (i, expr) in selector.match_expressions.iter().flatten().enumerate() {
            let path = format!("{field}.matchExpressions[{i}]");
            requirements.push(compile_expression(expr, &path)?);
        }
        Ok(Self::new(requirements))
    }

    /// Whether `labels` satisfies every requirement.
    #[inline]
    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// True for `{}`: matches everything.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// The requirements, in the order written.
    pub fn requirements(&self) -> &[LabelRequirement] {
        &self.requirements
    }

    /// Why `labels` does not match, one phrase per failed requirement
    /// (empty when it matches).
    pub fn mismatches(&self, labels: &Labels) -> Vec<String> {
        self.requirements
            .iter()
            .filter(|r| !r.matches(labels))
            .map(|r| {
                let mut s = String::new();
                r.write_mismatch(labels, &mut s);
                s
            })
            .collect()
    }

    /// [`CompiledSelector::mismatches`] joined with `, `, written into `out`.
    pub fn write_mismatches(&self, labels: &Labels, out: &mut String) {
        for (i, r) in self
            .requirements
            .iter()
            .filter(|r| !r.matches(labels))
            .enumerate()
        {
            if i > 0 {
                out.push_str(", ");
            }
            r.write_mismatch(labels, out);
        }
    }

    /// Values this selector requires for `key` through `Equals` or `In`
    /// (used to hint at the namespace a selector probably meant).
    pub fn wanted_values(&self) -> impl Iterator<Item = (&str, &str)> {
        self.requirements.iter().flat_map(|r| match r {
            LabelRequirement::Equals { key, value } => vec![(key.as_str(), value.as_str())],
            LabelRequirement::In { key, values } => {
                values.iter().map(|v| (key.as_str(), v.as_str())).collect()
            }
            _ => Vec::new(),
        })
    }
}

impl fmt::Display for CompiledSelector {
    /// `{app: web, env in (prod, staging), !canary}`; `{}` for everything.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Renders labels as `{app: web, tier: frontend}`.
pub fn render_labels(labels: &Labels) -> String {
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    format!("{{{}}}", inner.join(", "))
}

fn compile_expression(
    expr: &LabelSelectorRequirement,
    path: &str,
) -> Result<LabelRequirement, FieldProblem> {
    let key = expr.key.clone();
    validate_label_key(&key, &format!("{path}.key"))?;
    let values = expr.values.clone().unwrap_or_default();
    for (j, v) in values.iter().enumerate() {
        validate_label_value(v, &format!("{path}.values[{j}]"))?;
    }
    let needs_values = |op: &str| -> Result<(), FieldProblem> {
        if values.is_empty() {
            return Err(FieldProblem::new(
                format!("{path}.values"),
                format!("operator {op} needs at least one value"),
                "list the values, e.g. `values: [prod]`, or use operator Exists/DoesNotExist"
                    .to_string(),
            ));
        }
        Ok(())
    };
    let no_values = |op: &str| -> Result<(), FieldProblem> {
        if !values.is_empty() {
            return Err(FieldProblem::new(
                format!("{path}.values"),
                format!("operator {op} takes no values"),
                "remove `values`, or use operator In/NotIn to compare values".to_string(),
            ));
        }
        Ok(())
    };
    match expr.operator.as_str() {
        "In" => {
            needs_values("In")?;
            Ok(LabelRequirement::In { key, values })
        }
        "NotIn" => {
            needs_values("NotIn")?;
            Ok(LabelRequirement::NotIn { key, values })
        }
        "Exists" => {
            no_values("Exists")?;
            Ok(LabelRequirement::Exists { key })
        }
        "DoesNotExist" => {
            no_values("DoesNotExist")?;
            Ok(LabelRequirement::DoesNotExist { key })
        }
        other => Err(FieldProblem::new(
            format!("{path}.operator"),
            format!("unknown operator {other:?}"),
            "use one of In, NotIn, Exists, DoesNotExist (case-sensitive)".to_string(),
        )),
    }
}

/// Checks a label key: optional DNS-subdomain prefix and `/`, then a name of
/// at most 63 characters (alphanumerics, `-`, `_`, `.`; alphanumeric ends).
pub(crate) fn validate_label_key(key: &str, path: &str) -> Result<(), FieldProblem> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let bad = |why: &str| {
        Err(FieldProblem::new(
            path.to_string(),
            format!("invalid label key {key:?}: {why}"),
            "use a key like `app` or `example.com/team`: at most 63 characters of a-z, A-Z, 0-9, `-`, `_`, `.`, starting and ending with a letter or digit, with an optional DNS-name prefix and `/`".to_string(),
        ))
    };
    if let Some(prefix) = prefix {
        if prefix.is_empty() || prefix.len() > 253 {
            return bad("the prefix before `/` must be a DNS subdomain of 1 to 253 characters");
        }
        let ok = prefix.split('.').all(|part| {
            !part.is_empty()
                && part.len() <= 63
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        });
        if !ok {
            return bad("the prefix before `/` must be a lowercase DNS subdomain");
        }
    }
    if name.is_empty() {
        return bad("the name part is empty");
    }
    if !is_label_token(name) {
        return bad(
            "the name part has characters other than a-z, A-Z, 0-9, `-`, `_`, `.`, or does not start and end with a letter or digit, or is longer than 63",
        );
    }
    Ok(())
}

/// Checks a label value: empty, or at most 63 characters as for key names.
pub(crate) fn validate_label_value(value: &str, path: &str) -> Result<(), FieldProblem> {
    if value.is_empty() || is_label_token(value) {
        return Ok(());
    }
    Err(FieldProblem::new(
        path.to_string(),
        format!("invalid label value {value:?}"),
        "label values are at most 63 characters of a-z, A-Z, 0-9, `-`, `_`, `.`, starting and ending with a letter or digit (or empty)".to_string(),
    ))
}

fn is_label_token(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: if values.is_empty() {
                None
            } else {
                Some(values.iter().map(|v| v.to_string()).collect())
            },
        }
    }

    fn compile(
        match_labels: &[(&str, &str)],
        exprs: Vec<LabelSelectorRequirement>,
    ) -> CompiledSelector {
        let sel = LabelSelector {
            match_labels: if match_labels.is_empty() {
                None
            } else {
                Some(labels(match_labels))
            },
            match_expressions: if exprs.is_empty() { None } else { Some(exprs) },
        };
        CompiledSelector::compile(&sel, "spec.podSelector").unwrap()
    }

    #[test]
    fn empty_selector_matches_everything_including_no_labels() {
        let s = compile(&[], vec![]);
        assert!(s.matches(&labels(&[])));
        assert!(s.matches(&labels(&[("app", "web")])));
        assert_eq!(s.to_string(), "{}");
    }

    #[test]
    fn match_labels_are_anded() {
        let s = compile(&[("app", "web"), ("tier", "frontend")], vec![]);
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "frontend"), ("x", "y")])));
        assert!(!s.matches(&labels(&[("app", "web")])));
        assert_eq!(
            s.mismatches(&labels(&[("app", "web")])),
            vec!["missing tier=frontend"]
        );
        assert_eq!(
            s.mismatches(&labels(&[("app", "api"), ("tier", "frontend")])),
            vec!["app=api, not web"]
        );
    }

    #[test]
    fn in_requires_the_label_and_one_of_the_values() {
        let s = compile(&[], vec![expr("env", "In", &["prod", "staging"])]);
        assert!(s.matches(&labels(&[("env", "prod")])));
        assert!(!s.matches(&labels(&[("env", "dev")])));
        assert!(!s.matches(&labels(&[])));
        assert_eq!(s.to_string(), "{env in (prod, staging)}");
    }

    #[test]
    fn not_in_matches_when_the_label_is_absent() {
        let s = compile(&[], vec![expr("env", "NotIn", &["prod"])]);
        assert!(s.matches(&labels(&[])));
        assert!(s.matches(&labels(&[("env", "dev")])));
        assert!(!s.matches(&labels(&[("env", "prod")])));
        assert_eq!(
            s.mismatches(&labels(&[("env", "prod")])),
            vec!["env=prod is in (prod)"]
        );
    }

    #[test]
    fn exists_and_does_not_exist_look_at_the_key_only() {
        let exists = compile(&[], vec![expr("canary", "Exists", &[])]);
        let absent = compile(&[], vec![expr("canary", "DoesNotExist", &[])]);
        let with = labels(&[("canary", "")]);
        let without = labels(&[("app", "web")]);
        assert!(exists.matches(&with) && !exists.matches(&without));
        assert!(!absent.matches(&with) && absent.matches(&without));
        assert_eq!(exists.to_string(), "{canary}");
        assert_eq!(absent.to_string(), "{!canary}");
    }

    #[test]
    fn match_labels_and_expressions_are_anded() {
        let s = compile(&[("app", "web")], vec![expr("env", "NotIn", &["dev"])]);
        assert!(s.matches(&labels(&[("app", "web"), ("env", "prod")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("env", "dev")])));
        assert!(!s.matches(&labels(&[("app", "api"), ("env", "prod")])));
    }

    #[test]
    fn unknown_operator_is_rejected_with_the_field_path() {
        let sel = LabelSelector {
            match_expressions: Some(vec![expr("env", "in", &["prod"])]),
            match_labels: None,
        };
        let err = CompiledSelector::compile(&sel, "spec.podSelector").unwrap_err();
        assert_eq!(err.field, "spec.podSelector.matchExpressions[0].operator");
        assert!(
            err.problem.contains("unknown operator \"in\""),
            "{}",
            err.problem
        );
        assert!(err.fix.contains("In, NotIn, Exists, DoesNotExist"));
    }

    #[test]
    fn operators_check_their_values() {
        for (op, values, field) in [
            ("In", &[][..], "values"),
            ("NotIn", &[][..], "values"),
            ("Exists", &["x"][..], "values"),
            ("DoesNotExist", &["x"][..], "values"),
        ] {
            let sel = LabelSelector {
                match_expressions: Some(vec![expr("env", op, values)]),
                match_labels: None,
            };
            let err = CompiledSelector::compile(&sel, "s").unwrap_err();
            assert_eq!(err.field, format!("s.matchExpressions[0].{field}"), "{op}");
        }
    }

    #[test]
    fn label_keys_and_values_are_validated() {
        assert!(validate_label_key("app", "f").is_ok());
        assert!(validate_label_key("kubernetes.io/metadata.name", "f").is_ok());
        assert!(validate_label_key("app.kubernetes.io/name", "f").is_ok());
        assert!(validate_label_key("", "f").is_err());
        assert!(validate_label_key("-app", "f").is_err());
        assert!(validate_label_key("Example.com/app", "f").is_err());
        assert!(validate_label_key("a b", "f").is_err());
        assert!(validate_label_key(&"a".repeat(64), "f").is_err());
        assert!(validate_label_value("", "f").is_ok());
        assert!(validate_label_value("v1.2_3-x", "f").is_ok());
        assert!(validate_label_value("has space", "f").is_err());
        assert!(validate_label_value("trailing-", "f").is_err());
    }
}
