//! Calico's selector language, as the lab reads it (written from Calico's
//! policy reference, independently of netwatch-agent's parser):
//!
//! ```text
//! or      := and ( "||" and )*
//! and     := not ( "&&" not )*
//! not     := "!" not | "(" or ")" | "all()" | "global()" | "has(" label ")"
//!          | label "==" string | label "!=" string
//!          | label "in" "{" strings "}" | label "not" "in" "{" strings "}"
//!          | label "contains" string | label "starts" "with" string
//!          | label "ends" "with" string
//! ```
//!
//! An empty selector is `all()`. `!=` and `not in` hold for a resource
//! without the label; the other comparisons need it. `global()` holds for
//! every set of labels: where it means "non-namespaced resources" (a
//! `namespaceSelector`), the compiler decides, not the selector.

use std::{collections::BTreeMap, fmt};

/// Why a selector does not parse: the 1-based character column.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("selector {text:?}, column {column}: {detail}")]
pub struct SelectorError {
    pub text: String,
    pub column: usize,
    pub detail: String,
}

/// A parsed selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sel {
    All,
    Global,
    Has(String),
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Contains(String, String),
    StartsWith(String, String),
    EndsWith(String, String),
    Not(Box<Sel>),
    And(Box<Sel>, Box<Sel>),
    Or(Box<Sel>, Box<Sel>),
}

impl Sel {
    pub fn parse(text: &str) -> Result<Sel, SelectorError> {
        let mut p = Parser {
            chars: text.chars().collect(),
            at: 0,
            text,
            depth: 0,
        };
        p.skip_space();
        if p.at == p.chars.len() {
            return Ok(Sel::All);
        }
        let sel = p.or()?;
        p.skip_space();
        if p.at != p.chars.len() {
            return Err(p.error(format!("unexpected {:?}", p.chars[p.at])));
        }
        Ok(sel)
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let get = |k: &String| labels.get(k);
        match self {
            Sel::All | Sel::Global => true,
            Sel::Has(k) => labels.contains_key(k),
            Sel::Equals(k, v) => get(k) == Some(v),
            Sel::NotEquals(k, v) => get(k) != Some(v),
            Sel::In(k, vs) => get(k).is_some_and(|l| vs.contains(l)),
            Sel::NotIn(k, vs) => get(k).is_none_or(|l| !vs.contains(l)),
            Sel::Contains(k, s) => get(k).is_some_and(|l| l.contains(s.as_str())),
            Sel::StartsWith(k, s) => get(k).is_some_and(|l| l.starts_with(s.as_str())),
            Sel::EndsWith(k, s) => get(k).is_some_and(|l| l.ends_with(s.as_str())),
            Sel::Not(s) => !s.matches(labels),
            Sel::And(a, b) => a.matches(labels) && b.matches(labels),
            Sel::Or(a, b) => a.matches(labels) || b.matches(labels),
        }
    }
}

impl fmt::Display for Sel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |vs: &[String]| {
            vs.iter()
                .map(|v| format!("'{v}'"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self {
            Sel::All => f.write_str("all()"),
            Sel::Global => f.write_str("global()"),
            Sel::Has(k) => write!(f, "has({k})"),
            Sel::Equals(k, v) => write!(f, "{k} == '{v}'"),
            Sel::NotEquals(k, v) => write!(f, "{k} != '{v}'"),
            Sel::In(k, vs) => write!(f, "{k} in {{{}}}", list(vs)),
            Sel::NotIn(k, vs) => write!(f, "{k} not in {{{}}}", list(vs)),
            Sel::Contains(k, v) => write!(f, "{k} contains '{v}'"),
            Sel::StartsWith(k, v) => write!(f, "{k} starts with '{v}'"),
            Sel::EndsWith(k, v) => write!(f, "{k} ends with '{v}'"),
            Sel::Not(s) => write!(f, "!({s})"),
            Sel::And(a, b) => write!(f, "({a} && {b})"),
            Sel::Or(a, b) => write!(f, "({a} || {b})"),
        }
    }
}

/// Nesting limit: a hostile selector must not overflow the stack.
const MAX_DEPTH: usize = 100;

struct Parser<'a> {
    chars: Vec<char>,
    at: usize,
    text: &'a str,
    depth: usize,
}

impl Parser<'_> {
    fn error(&self, detail: String) -> SelectorError {
        SelectorError {
            text: self.text.to_string(),
            column: self.at + 1,
            detail,
        }
    }

    fn skip_space(&mut self) {
        while self.chars.get(self.at).is_some_and(|c| c.is_whitespace()) {
            self.at += 1;
        }
    }

    /// Consume `word` (after spaces) if it is next.
    fn eat(&mut self, word: &str) -> bool {
        self.skip_space();
        let w: Vec<char> = word.chars().collect();
        if self.chars[self.at..].starts_with(&w) {
            self.at += w.len();
            true
        } else {
            false
        }
    }

    /// Consume the keyword `word` when no label character follows it.
    fn eat_keyword(&mut self, word: &str) -> bool {
        let start = self.at;
        if self.eat(word) && !self.chars.get(self.at).copied().is_some_and(label_char) {
            return true;
        }
        self.at = start;
        false
    }

    fn expect(&mut self, word: &str) -> Result<(), SelectorError> {
        if self.eat(word) {
            Ok(())
        } else {
            Err(self.error(format!("expected {word:?}")))
        }
    }

    fn or(&mut self) -> Result<Sel, SelectorError> {
        let mut left = self.and()?;
        while self.eat("||") {
            left = Sel::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Sel, SelectorError> {
        let mut left = self.not()?;
        while self.eat("&&") {
            left = Sel::And(Box::new(left), Box::new(self.not()?));
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<Sel, SelectorError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.error("nested too deep".into()));
        }
        let out = self.term();
        self.depth -= 1;
        out
    }

    fn term(&mut self) -> Result<Sel, SelectorError> {
        self.skip_space();
        // `!=` is an operator, `!` before a term negates it.
        if self.eat("!") {
            return Ok(Sel::Not(Box::new(self.not()?)));
        }
        if self.eat("(") {
            let inner = self.or()?;
            self.expect(")")?;
            return Ok(inner);
        }
        for (word, sel) in [("all", Sel::All), ("global", Sel::Global)] {
            let start = self.at;
            if self.eat_keyword(word) && self.eat("(") {
                self.expect(")")?;
                return Ok(sel);
            }
            self.at = start;
        }
        let start = self.at;
        if self.eat_keyword("has") && self.eat("(") {
            let label = self.label()?;
            self.expect(")")?;
            return Ok(Sel::Has(label));
        }
        self.at = start;
        let label = self.label()?;
        if self.eat("==") {
            return Ok(Sel::Equals(label, self.string()?));
        }
        if self.eat("!=") {
            return Ok(Sel::NotEquals(label, self.string()?));
        }
        if self.eat_keyword("in") {
            return Ok(Sel::In(label, self.set()?));
        }
        if self.eat_keyword("not") {
            if !self.eat_keyword("in") {
                self.skip_space();
                return Err(self.error("expected `in` after `not`".into()));
            }
            return Ok(Sel::NotIn(label, self.set()?));
        }
        if self.eat_keyword("contains") {
            return Ok(Sel::Contains(label, self.string()?));
        }
        if self.eat_keyword("starts") {
            if !self.eat_keyword("with") {
                self.skip_space();
                return Err(self.error("expected `with` after `starts`".into()));
            }
            return Ok(Sel::StartsWith(label, self.string()?));
        }
        if self.eat_keyword("ends") {
            if !self.eat_keyword("with") {
                self.skip_space();
                return Err(self.error("expected `with` after `ends`".into()));
            }
            return Ok(Sel::EndsWith(label, self.string()?));
        }
        self.skip_space();
        Err(self.error(format!(
            "expected ==, !=, in, not in, contains, starts with or ends with after {label:?}"
        )))
    }

    fn label(&mut self) -> Result<String, SelectorError> {
        self.skip_space();
        let start = self.at;
        while self.chars.get(self.at).copied().is_some_and(label_char) {
            self.at += 1;
        }
        if start == self.at {
            return Err(match self.chars.get(self.at) {
                Some(c) => self.error(format!("expected a label, found {c:?}")),
                None => self.error("expected a label, the selector ends".into()),
            });
        }
        Ok(self.chars[start..self.at].iter().collect())
    }

    fn string(&mut self) -> Result<String, SelectorError> {
        self.skip_space();
        let quote = match self.chars.get(self.at) {
            Some(q @ ('"' | '\'')) => *q,
            _ => return Err(self.error("expected a quoted string".into())),
        };
        let start = self.at + 1;
        let Some(len) = self.chars[start..].iter().position(|c| *c == quote) else {
            return Err(self.error(format!("string not closed (missing {quote})")));
        };
        self.at = start + len + 1;
        Ok(self.chars[start..start + len].iter().collect())
    }

    fn set(&mut self) -> Result<Vec<String>, SelectorError> {
        self.expect("{")?;
        let mut out = Vec::new();
        if self.eat("}") {
            return Ok(out);
        }
        loop {
            out.push(self.string()?);
            if self.eat("}") {
                return Ok(out);
            }
            self.expect(",")?;
        }
    }
}

fn label_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_operators_as_calico_documents_them() {
        let l = labels(&[("app", "web-frontend"), ("tier", "a")]);
        let yes = [
            "",
            "all()",
            "global()",
            "app == 'web-frontend'",
            "app != \"db\"",
            "missing != 'x'",
            "has(app) && !has(missing)",
            "tier in {'a', 'b'}",
            "tier not in {'b'}",
            "missing not in {'b'}",
            "app contains 'front'",
            "app starts with 'web'",
            "app ends with 'end'",
            "!(app == 'db') || tier == 'z'",
            "(app == 'x' || tier == 'a') && has(tier)",
            "has(projectcalico.org/name) || all()",
            "in == 'x' || all()",
        ];
        for s in yes {
            assert!(Sel::parse(s).unwrap().matches(&l), "{s}");
        }
        let no = [
            "app == 'db'",
            "missing == ''",
            "missing in {'a'}",
            "missing contains ''",
            "tier in {}",
            "!all()",
            "app == 'web-frontend' && tier != 'a'",
        ];
        for s in no {
            assert!(!Sel::parse(s).unwrap().matches(&l), "{s}");
        }
    }

    #[test]
    fn errors_point_at_the_column() {
        for (s, column) in [
            ("app = 'x'", 5),
            ("app == 'x", 8),
            ("app == 'x' &&", 14),
            ("(app == 'x'", 12),
            ("app not 'x'", 9),
            ("has(", 5),
            ("app == 'x' junk", 12),
        ] {
            let e = Sel::parse(s).unwrap_err();
            assert_eq!(e.column, column, "{s}: {e}");
        }
        assert!(Sel::parse(&"!".repeat(10_000)).is_err());
        assert!(Sel::parse(&"(".repeat(10_000)).is_err());
    }
}
