//! Logs on standard error, for both binaries: plain text for people, with
//! colour only on a terminal, or one JSON object per line for log
//! pipelines (`kubectl logs` output collected by Loki, Elasticsearch, ...).

use std::{ffi::OsStr, fmt, io::IsTerminal};

use tracing::{Event, Subscriber, field::Field};
use tracing_subscriber::{
    EnvFilter,
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    registry::LookupSpan,
};

/// `--log-format text|json`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event; coloured only on a terminal.
    #[default]
    Text,
    /// One JSON object per line: timestamp, level, target, message and the
    /// event's fields.
    Json,
}

/// Whether to colour output written to a stream: only a terminal, and never
/// when `NO_COLOR` is set to a non-empty value (<https://no-color.org>).
pub fn colour_wanted(is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Whether standard error should be coloured.
pub fn stderr_colour() -> bool {
    colour_wanted(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    )
}

/// Install the global subscriber. `timestamps` is off for the CLI, whose
/// warnings are messages rather than events.
pub fn init(filter: EnvFilter, format: LogFormat, timestamps: bool) {
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    // A second init (tests) is harmless: the first subscriber stays.
    let _ = match (format, timestamps) {
        (LogFormat::Json, _) => builder.with_ansi(false).event_format(JsonLines).try_init(),
        (LogFormat::Text, true) => builder.with_ansi(stderr_colour()).try_init(),
        (LogFormat::Text, false) => builder
            .with_ansi(stderr_colour())
            .without_time()
            .with_target(false)
            .try_init(),
    };
}

/// Formats each event as one JSON object.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut obj = serde_json::Map::new();
        obj.insert(
            "timestamp".into(),
            chrono::Utc::now()
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                .into(),
        );
        obj.insert("level".into(), meta.level().as_str().into());
        obj.insert("target".into(), meta.target().into());
        let mut fields = JsonFields(serde_json::Map::new());
        event.record(&mut fields);
        // The message first among the event's own fields, as other
        // structured loggers put it.
        if let Some(m) = fields.0.remove("message") {
            obj.insert("message".into(), m);
        }
        for (k, v) in fields.0 {
            obj.entry(k).or_insert(v);
        }
        writeln!(writer, "{}", serde_json::Value::Object(obj))
    }
}

struct JsonFields(serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for JsonFields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour_wanted(true, None));
        assert!(!colour_wanted(false, None), "a file or a pipe");
        assert!(!colour_wanted(true, Some(OsStr::new("1"))));
        assert!(
            colour_wanted(true, Some(OsStr::new(""))),
            "an empty NO_COLOR is unset (no-color.org)"
        );
    }
}
