//! Calico's selector language (projectcalico.org/v3 `selector`,
//! `namespaceSelector`, `serviceAccountSelector`), parsed once and
//! evaluated against labels many times.
//!
//! ```text
//! selector := or?                        (empty = all())
//! or       := and ("||" and)*
//! and      := unary ("&&" unary)*
//! unary    := "!" unary | "(" or ")" | "all()" | "global()" | "has(" key ")"
//!           | key "==" str | key "!=" str | key "in" set | key "not" "in" set
//!           | key "contains" str | key "starts" "with" str | key "ends" "with" str
//! set      := "{" (str ("," str)*)? "}"
//! str      := 'text' | "text"            (no escapes, as in Calico)
//! key      := [A-Za-z0-9_./-]+           (prefixes such as projectcalico.org/name)
//! ```
//!
//! Semantics, as Calico defines them: `!=` and `not in` are true when the
//! label is absent; `==`, `in`, `contains`, `starts with` and `ends with`
//! are false then. `global()` is true for every set of labels here: in a
//! rule's `namespaceSelector` it means "non-namespaced endpoints", which
//! the rule matcher decides, not the selector.
//!
//! Errors point at the 1-based column (in characters) where the selector
//! went wrong; a selector that ends too early points one past its end.

use std::fmt;

use crate::policy::Labels;

/// How deep `!` and parentheses may nest: keeps parsing and evaluation of
/// hostile input (fuzzing, a typo'd manifest) off the end of the stack.
const MAX_DEPTH: usize = 64;

/// A Calico selector that failed to parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("selector {selector:?}: column {column}: {problem}")]
pub struct SelectorError {
    /// The selector as written.
    pub selector: String,
    /// 1-based character column of the problem (length + 1 for "ended too early").
    pub column: usize,
    /// What is wrong there.
    pub problem: SelectorProblem,
}

/// What is wrong with a selector, at [`SelectorError::column`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorProblem {
    #[error("unexpected character {0:?}")]
    UnexpectedChar(char),
    #[error("string is not closed (missing {0})")]
    UnterminatedString(char),
    #[error("expected an expression after {0}")]
    ExpectedExpressionAfter(&'static str),
    #[error("expected an expression, found {0}")]
    ExpectedExpression(String),
    #[error(
        "expected ==, !=, in, not in, contains, starts with or ends with after label {key:?}, found {found}"
    )]
    ExpectedOperator { key: String, found: String },
    #[error("expected a quoted string after {after}, found {found}")]
    ExpectedString { after: &'static str, found: String },
    #[error("expected {expected}, found {found}")]
    Expected {
        expected: &'static str,
        found: String,
    },
    #[error("expected && or || between expressions, found {0}")]
    Trailing(String),
    #[error("nested more than {MAX_DEPTH} deep")]
    TooDeep,
}

/// A parsed selector expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// `all()` (and the empty selector).
    All,
    /// `global()`.
    Global,
    /// `has(k)`.
    Has(String),
    /// `k == 'v'`.
    Eq(String, String),
    /// `k != 'v'` (true when k is absent).
    Ne(String, String),
    /// `k in {...}`.
    In(String, Vec<String>),
    /// `k not in {...}` (true when k is absent).
    NotIn(String, Vec<String>),
    /// `k contains 's'`.
    Contains(String, String),
    /// `k starts with 's'`.
    StartsWith(String, String),
    /// `k ends with 's'`.
    EndsWith(String, String),
    /// `!e`.
    Not(Box<Expr>),
    /// `a && b && ...` (two or more).
    And(Vec<Expr>),
    /// `a || b || ...` (two or more).
    Or(Vec<Expr>),
}

impl Expr {
    /// Whether labels satisfy this expression.
    pub fn matches(&self, labels: &Labels) -> bool {
        match self {
            Expr::All | Expr::Global => true,
            Expr::Has(k) => labels.contains_key(k),
            Expr::Eq(k, v) => labels.get(k) == Some(v),
            Expr::Ne(k, v) => labels.get(k) != Some(v),
            Expr::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Expr::NotIn(k, vs) => labels.get(k).is_none_or(|l| !vs.contains(l)),
            Expr::Contains(k, s) => labels.get(k).is_some_and(|l| l.contains(s.as_str())),
            Expr::StartsWith(k, s) => labels.get(k).is_some_and(|l| l.starts_with(s.as_str())),
            Expr::EndsWith(k, s) => labels.get(k).is_some_and(|l| l.ends_with(s.as_str())),
            Expr::Not(e) => !e.matches(labels),
            Expr::And(es) => es.iter().all(|e| e.matches(labels)),
            Expr::Or(es) => es.iter().any(|e| e.matches(labels)),
        }
    }

    /// Whether `global()` occurs anywhere (a rule's namespaceSelector then
    /// selects non-namespaced endpoints).
    pub fn mentions_global(&self) -> bool {
        match self {
            Expr::Global => true,
            Expr::Not(e) => e.mentions_global(),
            Expr::And(es) | Expr::Or(es) => es.iter().any(Expr::mentions_global),
            _ => false,
        }
    }
}

/// Quotes a string the way Calico reads it back: single quotes unless the
/// text holds one.
fn quote(s: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    if s.contains('\'') {
        write!(f, "\"{s}\"")
    } else {
        write!(f, "'{s}'")
    }
}

fn set(vs: &[String], f: &mut fmt::Formatter<'_>) -> fmt::Result {
    f.write_str("{")?;
    for (i, v) in vs.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        quote(v, f)?;
    }
    f.write_str("}")
}

/// The canonical text, which parses back to the same expression.
impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::All => f.write_str("all()"),
            Expr::Global => f.write_str("global()"),
            Expr::Has(k) => write!(f, "has({k})"),
            Expr::Eq(k, v) => {
                write!(f, "{k} == ")?;
                quote(v, f)
            }
            Expr::Ne(k, v) => {
                write!(f, "{k} != ")?;
                quote(v, f)
            }
            Expr::In(k, vs) => {
                write!(f, "{k} in ")?;
                set(vs, f)
            }
            Expr::NotIn(k, vs) => {
                write!(f, "{k} not in ")?;
                set(vs, f)
            }
            Expr::Contains(k, s) => {
                write!(f, "{k} contains ")?;
                quote(s, f)
            }
            Expr::StartsWith(k, s) => {
                write!(f, "{k} starts with ")?;
                quote(s, f)
            }
            Expr::EndsWith(k, s) => {
                write!(f, "{k} ends with ")?;
                quote(s, f)
            }
            Expr::Not(e) => match **e {
                Expr::And(_) | Expr::Or(_) => write!(f, "!({e})"),
                _ => write!(f, "!{e}"),
            },
            Expr::And(es) | Expr::Or(es) => {
                let op = if matches!(self, Expr::And(_)) {
                    " && "
                } else {
                    " || "
                };
                for (i, e) in es.iter().enumerate() {
                    if i > 0 {
                        f.write_str(op)?;
                    }
                    // Parentheses only where precedence needs them (an
                    // `||` under `&&`) or to keep the tree's shape (a
                    // compound of the same kind), so the canonical text is
                    // never nested deeper than what was parsed.
                    match (self, e) {
                        (_, Expr::Or(_)) | (Expr::And(_), Expr::And(_)) => write!(f, "({e})")?,
                        _ => write!(f, "{e}")?,
                    }
                }
                Ok(())
            }
        }
    }
}

/// A parsed Calico selector and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalicoSelector {
    source: String,
    expr: Expr,
}

impl CalicoSelector {
    /// Parses a selector; empty or blank text is `all()`.
    pub fn parse(source: &str) -> Result<Self, SelectorError> {
        let tokens = tokenize(source)?;
        let mut parser = Parser {
            source,
            tokens,
            pos: 0,
            depth: 0,
        };
        let expr = if parser.tokens.len() == 1 {
            Expr::All
        } else {
            let expr = parser.or()?;
            let token = parser.peek();
            if token.kind != Kind::End {
                return Err(parser.error(token.column, SelectorProblem::Trailing(token.describe())));
            }
            expr
        };
        Ok(Self {
            source: source.to_string(),
            expr,
        })
    }

    /// The selector as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The parsed expression.
    pub fn expr(&self) -> &Expr {
        &self.expr
    }

    /// Whether labels satisfy the selector.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.expr.matches(labels)
    }

    /// Whether the selector is `all()` (or empty).
    pub fn is_all(&self) -> bool {
        self.expr == Expr::All
    }
}

impl fmt::Display for CalicoSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl std::str::FromStr for CalicoSelector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Word(String),
    Str(String),
    EqEq,
    NotEq,
    Bang,
    AndAnd,
    OrOr,
    LParen,
    RParen,
    LBrace,
    RBrace,
    Comma,
    End,
}

#[derive(Debug, Clone)]
struct Token {
    kind: Kind,
    /// 1-based character column of the token's first character.
    column: usize,
}

impl Token {
    fn describe(&self) -> String {
        match &self.kind {
            Kind::Word(w) => format!("{w:?}"),
            Kind::Str(s) => format!("string {s:?}"),
            Kind::EqEq => "==".into(),
            Kind::NotEq => "!=".into(),
            Kind::Bang => "!".into(),
            Kind::AndAnd => "&&".into(),
            Kind::OrOr => "||".into(),
            Kind::LParen => "(".into(),
            Kind::RParen => ")".into(),
            Kind::LBrace => "{".into(),
            Kind::RBrace => "}".into(),
            Kind::Comma => ",".into(),
            Kind::End => "the end of the selector".into(),
        }
    }
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-')
}

fn tokenize(source: &str) -> Result<Vec<Token>, SelectorError> {
    let chars: Vec<char> = source.chars().collect();
    let error = |column: usize, problem| SelectorError {
        selector: source.to_string(),
        column,
        problem,
    };
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let column = i + 1;
        let next = chars.get(i + 1).copied();
        let (kind, len) = match c {
            c if c.is_whitespace() => {
                i += 1;
                continue;
            }
            '=' if next == Some('=') => (Kind::EqEq, 2),
            '!' if next == Some('=') => (Kind::NotEq, 2),
            '!' => (Kind::Bang, 1),
            '&' if next == Some('&') => (Kind::AndAnd, 2),
            '|' if next == Some('|') => (Kind::OrOr, 2),
            '(' => (Kind::LParen, 1),
            ')' => (Kind::RParen, 1),
            '{' => (Kind::LBrace, 1),
            '}' => (Kind::RBrace, 1),
            ',' => (Kind::Comma, 1),
            '\'' | '"' => {
                let Some(end) = chars[i + 1..].iter().position(|&d| d == c) else {
                    return Err(error(column, SelectorProblem::UnterminatedString(c)));
                };
                let text: String = chars[i + 1..i + 1 + end].iter().collect();
                (Kind::Str(text), end + 2)
            }
            c if is_key_char(c) => {
                let len = chars[i..].iter().take_while(|&&d| is_key_char(d)).count();
                (Kind::Word(chars[i..i + len].iter().collect()), len)
            }
            c => return Err(error(column, SelectorProblem::UnexpectedChar(c))),
        };
        tokens.push(Token { kind, column });
        i += len;
    }
    tokens.push(Token {
        kind: Kind::End,
        column: chars.len() + 1,
    });
    Ok(tokens)
}

struct Parser<'a> {
    source: &'a str,
    tokens: Vec<Token>,
    pos: usize,
    depth: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Token {
        self.tokens[self.pos].clone()
    }

    fn peek_kind(&self) -> &Kind {
        &self.tokens[self.pos].kind
    }

    fn peek_word(&self, word: &str) -> bool {
        matches!(self.peek_kind(), Kind::Word(w) if w == word)
    }

    fn next(&mut self) -> Token {
        let token = self.peek();
        if token.kind != Kind::End {
            self.pos += 1;
        }
        token
    }

    fn error(&self, column: usize, problem: SelectorProblem) -> SelectorError {
        SelectorError {
            selector: self.source.to_string(),
            column,
            problem,
        }
    }

    fn expect(&mut self, kind: Kind, expected: &'static str) -> Result<(), SelectorError> {
        let token = self.next();
        if token.kind == kind {
            Ok(())
        } else {
            Err(self.error(
                token.column,
                SelectorProblem::Expected {
                    expected,
                    found: token.describe(),
                },
            ))
        }
    }

    fn or(&mut self) -> Result<Expr, SelectorError> {
        let mut terms = vec![self.and(None)?];
        while *self.peek_kind() == Kind::OrOr {
            self.next();
            terms.push(self.and(Some("||"))?);
        }
        Ok(if terms.len() == 1 {
            terms.remove(0)
        } else {
            Expr::Or(terms)
        })
    }

    fn and(&mut self, after: Option<&'static str>) -> Result<Expr, SelectorError> {
        let mut terms = vec![self.unary(after)?];
        while *self.peek_kind() == Kind::AndAnd {
            self.next();
            terms.push(self.unary(Some("&&"))?);
        }
        Ok(if terms.len() == 1 {
            terms.remove(0)
        } else {
            Expr::And(terms)
        })
    }

    /// One operand; `after` names the operator before it, for the error
    /// when it is missing.
    fn unary(&mut self, after: Option<&'static str>) -> Result<Expr, SelectorError> {
        let token = self.peek();
        let missing = |parser: &Self, token: &Token| {
            let problem = match (&token.kind, after) {
                (Kind::End | Kind::RParen | Kind::AndAnd | Kind::OrOr, Some(op)) => {
                    SelectorProblem::ExpectedExpressionAfter(op)
                }
                _ => SelectorProblem::ExpectedExpression(token.describe()),
            };
            parser.error(token.column, problem)
        };
        match &token.kind {
            Kind::Bang => {
                self.next();
                self.nest(token.column)?;
                let inner = self.unary(Some("!"));
                self.depth -= 1;
                Ok(Expr::Not(Box::new(inner?)))
            }
            Kind::LParen => {
                self.next();
                self.nest(token.column)?;
                let inner = self.or_after_paren();
                self.depth -= 1;
                let inner = inner?;
                self.expect(Kind::RParen, ")")?;
                Ok(inner)
            }
            Kind::Word(word) => {
                self.next();
                let word = word.clone();
                if *self.peek_kind() == Kind::LParen {
                    match word.as_str() {
                        "all" | "global" => {
                            self.next();
                            self.expect(Kind::RParen, ")")?;
                            return Ok(if word == "all" {
                                Expr::All
                            } else {
                                Expr::Global
                            });
                        }
                        "has" => {
                            self.next();
                            let key = self.next();
                            let Kind::Word(key) = key.kind else {
                                return Err(self.error(
                                    key.column,
                                    SelectorProblem::Expected {
                                        expected: "a label key",
                                        found: key.describe(),
                                    },
                                ));
                            };
                            self.expect(Kind::RParen, ")")?;
                            return Ok(Expr::Has(key));
                        }
                        _ => {}
                    }
                }
                self.comparison(word)
            }
            _ => Err(missing(self, &token)),
        }
    }

    /// The expression inside parentheses (the missing-operand error names `(`).
    fn or_after_paren(&mut self) -> Result<Expr, SelectorError> {
        let mut terms = vec![self.and(Some("("))?];
        while *self.peek_kind() == Kind::OrOr {
            self.next();
            terms.push(self.and(Some("||"))?);
        }
        Ok(if terms.len() == 1 {
            terms.remove(0)
        } else {
            Expr::Or(terms)
        })
    }

    fn nest(&mut self, column: usize) -> Result<(), SelectorError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            self.depth -= 1;
            return Err(self.error(column, SelectorProblem::TooDeep));
        }
        Ok(())
    }

    fn comparison(&mut self, key: String) -> Result<Expr, SelectorError> {
        let op = self.next();
        match &op.kind {
            Kind::EqEq => Ok(Expr::Eq(key, self.string("==")?)),
            Kind::NotEq => Ok(Expr::Ne(key, self.string("!=")?)),
            Kind::Word(w) if w == "in" => Ok(Expr::In(key, self.set("in")?)),
            Kind::Word(w) if w == "contains" => Ok(Expr::Contains(key, self.string("contains")?)),
            Kind::Word(w) if w == "not" && self.peek_word("in") => {
                self.next();
                Ok(Expr::NotIn(key, self.set("not in")?))
            }
            Kind::Word(w) if w == "starts" && self.peek_word("with") => {
                self.next();
                Ok(Expr::StartsWith(key, self.string("starts with")?))
            }
            Kind::Word(w) if w == "ends" && self.peek_word("with") => {
                self.next();
                Ok(Expr::EndsWith(key, self.string("ends with")?))
            }
            _ => Err(self.error(
                op.column,
                SelectorProblem::ExpectedOperator {
                    key,
                    found: op.describe(),
                },
            )),
        }
    }

    fn string(&mut self, after: &'static str) -> Result<String, SelectorError> {
        let token = self.next();
        match token.kind {
            Kind::Str(s) => Ok(s),
            _ => Err(self.error(
                token.column,
                SelectorProblem::ExpectedString {
                    after,
                    found: token.describe(),
                },
            )),
        }
    }

    fn set(&mut self, after: &'static str) -> Result<Vec<String>, SelectorError> {
        let open = self.next();
        if open.kind != Kind::LBrace {
            return Err(self.error(
                open.column,
                SelectorProblem::Expected {
                    expected: match after {
                        "in" => "{ after in",
                        _ => "{ after not in",
                    },
                    found: open.describe(),
                },
            ));
        }
        let mut values = Vec::new();
        if *self.peek_kind() == Kind::RBrace {
            self.next();
            return Ok(values);
        }
        loop {
            values.push(self.string(if values.is_empty() { "{" } else { "," })?);
            let token = self.next();
            match token.kind {
                Kind::Comma => {}
                Kind::RBrace => return Ok(values),
                _ => {
                    return Err(self.error(
                        token.column,
                        SelectorProblem::Expected {
                            expected: ", or }",
                            found: token.describe(),
                        },
                    ));
                }
            }
        }
    }
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

    fn eval(selector: &str, pairs: &[(&str, &str)]) -> bool {
        CalicoSelector::parse(selector)
            .unwrap_or_else(|e| panic!("{e}"))
            .matches(&labels(pairs))
    }

    fn err(selector: &str) -> SelectorError {
        CalicoSelector::parse(selector).expect_err(selector)
    }

    #[test]
    fn empty_and_all_and_global_match_everything() {
        for s in ["", "   ", "all()", "global()", " all ( ) "] {
            assert!(eval(s, &[]), "{s}");
            assert!(eval(s, &[("app", "x")]), "{s}");
        }
        assert!(CalicoSelector::parse("").unwrap().is_all());
        assert!(!CalicoSelector::parse("has(a)").unwrap().is_all());
        assert!(
            CalicoSelector::parse("has(a) || global()")
                .unwrap()
                .expr()
                .mentions_global()
        );
        assert!(
            !CalicoSelector::parse("all()")
                .unwrap()
                .expr()
                .mentions_global()
        );
    }

    #[test]
    fn equality_and_inequality() {
        assert!(eval("app == 'web'", &[("app", "web")]));
        assert!(!eval("app == 'web'", &[("app", "api")]));
        assert!(!eval("app == 'web'", &[]));
        assert!(eval("app != 'web'", &[("app", "api")]));
        assert!(!eval("app != 'web'", &[("app", "web")]));
        // Calico: != is true when the label is absent.
        assert!(eval("app != 'web'", &[]));
        assert!(eval("app == \"web\"", &[("app", "web")]));
        assert!(eval("app==''", &[("app", "")]));
        assert!(!eval("app==''", &[]));
    }

    #[test]
    fn has_and_not_has() {
        assert!(eval("has(app)", &[("app", "")]));
        assert!(!eval("has(app)", &[("tier", "x")]));
        assert!(eval("!has(app)", &[("tier", "x")]));
        assert!(!eval("!has(app)", &[("app", "x")]));
        assert!(eval("! has( app )", &[]));
    }

    #[test]
    fn in_and_not_in() {
        assert!(eval("app in {'a', 'b'}", &[("app", "b")]));
        assert!(!eval("app in {'a', 'b'}", &[("app", "c")]));
        assert!(!eval("app in {'a', 'b'}", &[]));
        assert!(!eval("app in {}", &[("app", "a")]));
        assert!(eval("app not in {'a',\"b\"}", &[("app", "c")]));
        assert!(!eval("app not in {'a','b'}", &[("app", "a")]));
        // Calico: not in is true when the label is absent.
        assert!(eval("app not in {'a','b'}", &[]));
        assert!(eval("app not in {}", &[("app", "a")]));
    }

    #[test]
    fn string_operators_are_false_when_absent() {
        assert!(eval("img contains 'ngin'", &[("img", "nginx")]));
        assert!(!eval("img contains 'apache'", &[("img", "nginx")]));
        assert!(eval("img starts with 'ng'", &[("img", "nginx")]));
        assert!(!eval("img starts with 'nx'", &[("img", "nginx")]));
        assert!(eval("img ends with 'nx'", &[("img", "nginx")]));
        assert!(!eval("img ends with 'ng'", &[("img", "nginx")]));
        for s in ["img contains ''", "img starts with ''", "img ends with ''"] {
            assert!(eval(s, &[("img", "x")]), "{s}");
            assert!(!eval(s, &[]), "{s}");
        }
    }

    #[test]
    fn keys_with_prefixes_and_punctuation() {
        let l = [
            ("projectcalico.org/namespace", "prod"),
            ("app.kubernetes.io/name", "web-1"),
            ("k8s_app", "dns"),
        ];
        assert!(eval("projectcalico.org/namespace == 'prod'", &l));
        assert!(eval("app.kubernetes.io/name starts with 'web-'", &l));
        assert!(eval("k8s_app == 'dns' && has(app.kubernetes.io/name)", &l));
        // Operator words are only operators after a key.
        assert!(eval("contains == 'x'", &[("contains", "x")]));
        assert!(eval("has(in)", &[("in", "")]));
    }

    #[test]
    fn precedence_not_then_and_then_or() {
        // a || b && c  ==  a || (b && c)
        assert!(eval("has(a) || has(b) && has(c)", &[("a", "")]));
        assert!(!eval("(has(a) || has(b)) && has(c)", &[("a", "")]));
        // !a && b  ==  (!a) && b
        assert!(eval("!has(a) && has(b)", &[("b", "")]));
        assert!(!eval("!(has(a) && has(b))", &[("a", ""), ("b", "")]));
        assert!(eval("!(has(a) && has(b))", &[("b", "")]));
        // ! binds tighter than ||: !a || b with a present and b absent.
        assert!(!eval("!has(a) || has(b)", &[("a", "")]));
        assert!(eval("!!has(a)", &[("a", "")]));
        let parsed = CalicoSelector::parse("a == 'x' || b == 'y' && c == 'z'").unwrap();
        assert_eq!(
            parsed.expr(),
            &Expr::Or(vec![
                Expr::Eq("a".into(), "x".into()),
                Expr::And(vec![
                    Expr::Eq("b".into(), "y".into()),
                    Expr::Eq("c".into(), "z".into()),
                ]),
            ])
        );
    }

    #[test]
    fn errors_point_at_the_column() {
        let e = err("app == 'a' &&");
        assert_eq!(e.column, 14);
        assert_eq!(e.problem, SelectorProblem::ExpectedExpressionAfter("&&"));
        assert_eq!(
            e.to_string(),
            "selector \"app == 'a' &&\": column 14: expected an expression after &&"
        );
        let e = err("app = 'a'");
        assert_eq!(
            (e.column, &e.problem),
            (5, &SelectorProblem::UnexpectedChar('='))
        );
        let e = err("app == 'a");
        assert_eq!(e.column, 8);
        assert_eq!(e.problem, SelectorProblem::UnterminatedString('\''));
        let e = err("app is 'a'");
        assert_eq!(e.column, 5);
        assert!(e.to_string().contains("after label \"app\""), "{e}");
        let e = err("app == web");
        assert_eq!(e.column, 8);
        assert!(matches!(
            e.problem,
            SelectorProblem::ExpectedString { after: "==", .. }
        ));
        let e = err("(has(a) || has(b)");
        assert_eq!(e.column, 18);
        assert!(
            e.to_string()
                .ends_with("expected ), found the end of the selector")
        );
        let e = err("has(a) has(b)");
        assert_eq!(e.column, 8);
        assert!(matches!(e.problem, SelectorProblem::Trailing(_)));
        let e = err("app in {'a' 'b'}");
        assert_eq!(e.column, 13);
        let e = err("app in 'a'");
        assert_eq!(e.column, 8);
        let e = err("|| has(a)");
        assert_eq!(e.column, 1);
        let e = err("has(a) || && has(b)");
        assert_eq!(
            (e.column, &e.problem),
            (11, &SelectorProblem::ExpectedExpressionAfter("||"))
        );
        let e = err("!");
        assert_eq!(
            (e.column, &e.problem),
            (2, &SelectorProblem::ExpectedExpressionAfter("!"))
        );
        let e = err("has()");
        assert_eq!(e.column, 5);
        let e = err("app starts 'x'");
        assert_eq!(e.column, 5);
        // Columns count characters, not bytes.
        let e = err("app == 'é' && ?");
        assert_eq!(
            (e.column, &e.problem),
            (15, &SelectorProblem::UnexpectedChar('?'))
        );
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = format!("{}has(a){}", "(".repeat(10_000), ")".repeat(10_000));
        assert_eq!(err(&deep).problem, SelectorProblem::TooDeep);
        let bangs = format!("{}has(a)", "!".repeat(10_000));
        assert_eq!(err(&bangs).problem, SelectorProblem::TooDeep);
        let ok = format!("{}has(a){}", "(".repeat(MAX_DEPTH), ")".repeat(MAX_DEPTH));
        assert!(eval(&ok, &[("a", "")]));
        // Long flat chains do not nest.
        let chain = vec!["has(a)"; 10_000].join(" && ");
        assert!(eval(&chain, &[("a", "")]));
    }

    /// A small deterministic generator (no extra dependency).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
            items[(self.next() % items.len() as u64) as usize]
        }
    }

    const KEYS: &[&str] = &["a", "b", "app.io/name"];
    const VALUES: &[&str] = &["", "x", "xy", "yx", "it's"];

    fn random_expr(rng: &mut Rng, depth: u32) -> Expr {
        let key = rng.pick(KEYS).to_string();
        let value = rng.pick(VALUES).to_string();
        match rng.next() % if depth == 0 { 10 } else { 13 } {
            0 => Expr::All,
            1 => Expr::Has(key),
            2 => Expr::Eq(key, value),
            3 => Expr::Ne(key, value),
            4 => Expr::In(key, vec![value, rng.pick(VALUES).to_string()]),
            5 => Expr::NotIn(key, vec![value]),
            6 => Expr::Contains(key, value),
            7 => Expr::StartsWith(key, value),
            8 => Expr::EndsWith(key, value),
            9 => Expr::In(key, vec![]),
            10 => Expr::Not(Box::new(random_expr(rng, depth - 1))),
            11 => Expr::And(vec![
                random_expr(rng, depth - 1),
                random_expr(rng, depth - 1),
            ]),
            _ => Expr::Or(vec![
                random_expr(rng, depth - 1),
                random_expr(rng, depth - 1),
            ]),
        }
    }

    /// The semantics written a second way: with string ops on Option.
    fn reference(e: &Expr, l: &Labels) -> bool {
        let get = |k: &String| l.get(k).map(String::as_str);
        match e {
            Expr::All | Expr::Global => true,
            Expr::Has(k) => get(k).is_some(),
            Expr::Eq(k, v) => get(k) == Some(v.as_str()),
            Expr::Ne(k, v) => !reference(&Expr::Eq(k.clone(), v.clone()), l),
            Expr::In(k, vs) => vs.iter().any(|v| get(k) == Some(v.as_str())),
            Expr::NotIn(k, vs) => !reference(&Expr::In(k.clone(), vs.clone()), l),
            Expr::Contains(k, s) => get(k).is_some_and(|v| v.find(s.as_str()).is_some()),
            Expr::StartsWith(k, s) => get(k).is_some_and(|v| v.get(..s.len()) == Some(s)),
            Expr::EndsWith(k, s) => {
                get(k).is_some_and(|v| v.len() >= s.len() && v[v.len() - s.len()..] == **s)
            }
            Expr::Not(e) => !reference(e, l),
            Expr::And(es) => es.iter().fold(true, |acc, e| acc & reference(e, l)),
            Expr::Or(es) => es.iter().fold(false, |acc, e| acc | reference(e, l)),
        }
    }

    #[test]
    fn random_expressions_round_trip_and_agree_with_a_reference() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let label_sets: Vec<Labels> = (0..16)
            .map(|_| {
                let mut l = Labels::new();
                for k in KEYS {
                    if rng.next().is_multiple_of(2) {
                        l.insert(k.to_string(), rng.pick(VALUES).to_string());
                    }
                }
                l
            })
            .collect();
        for _ in 0..2000 {
            let expr = random_expr(&mut rng, 4);
            let text = expr.to_string();
            let parsed = CalicoSelector::parse(&text).unwrap_or_else(|e| panic!("{e}"));
            // Parsing the canonical text gives back an expression that
            // evaluates the same (nested And/Or may flatten, so compare
            // texts of texts and evaluations, not trees).
            let reparsed = CalicoSelector::parse(&parsed.expr().to_string()).unwrap();
            assert_eq!(reparsed.expr(), parsed.expr(), "{text}");
            for l in &label_sets {
                assert_eq!(parsed.matches(l), reference(&expr, l), "{text} on {l:?}");
            }
        }
    }
}
