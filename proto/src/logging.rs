//! How both daemons log: to stderr (journald under systemd), filtered by
//! [`FILTER_ENV`] (default [`DEFAULT_FILTER`]), as text for people or as
//! JSON for machines (`--log-format`).
//!
//! Colour is for a terminal only: journald and log files keep escape codes
//! as literal bytes, which then clutter every line and break `grep`.

use std::fmt;
use std::io::IsTerminal;
use std::str::FromStr;
use std::sync::OnceLock;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// The environment variable holding the log filter (`info`,
/// `certfleet_coordinator=debug`, ...).
pub const FILTER_ENV: &str = "CERTFLEET_LOG";

/// The filter when [`FILTER_ENV`] is unset or invalid.
pub const DEFAULT_FILTER: &str = "info";

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// One human-readable line per event; coloured only on a terminal.
    #[default]
    Text,
    /// One JSON object per line, the event's fields at the top level.
    Json,
}

impl LogFormat {
    /// Every format's name, as `--log-format` takes it.
    pub const NAMES: [&'static str; 2] = ["text", "json"];
}

/// `--log-format`, as both daemons take it (`#[command(flatten)]`).
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// How to write logs to stderr: text (coloured only on a terminal) or
    /// json (one object per line).
    #[arg(
        long,
        global = true,
        value_name = "FORMAT",
        default_value = "text",
        value_parser = clap::builder::TypedValueParser::map(
            clap::builder::PossibleValuesParser::new(LogFormat::NAMES),
            |name| name.parse::<LogFormat>().expect("one of LogFormat::NAMES"),
        ),
    )]
    pub log_format: LogFormat,
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Text => "text",
            Self::Json => "json",
        })
    }
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!(
                "unknown log format {other:?}: expected one of {}",
                Self::NAMES.join(", ")
            )),
        }
    }
}

/// Whether text logs get colour: only on a terminal, and never when the
/// user asked for none with a non-empty `NO_COLOR`.
pub fn use_colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// The format [`init`] installed, for [`fatal`].
static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// Installs the process-wide subscriber writing to stderr. Call once, first
/// thing in `main`.
pub fn init(format: LogFormat) {
    FORMAT.set(format).expect("logging is initialised once");
    let colour = use_colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let filter =
        EnvFilter::try_from_env(FILTER_ENV).unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    tracing::subscriber::set_global_default(subscriber(format, colour, filter, std::io::stderr))
        .expect("logging is initialised once");
}

/// The subscriber [`init`] installs, writing to `writer`.
fn subscriber<W>(
    format: LogFormat,
    colour: bool,
    filter: EnvFilter,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => Box::new(builder.with_ansi(colour).finish()),
        LogFormat::Json => Box::new(
            builder
                .with_ansi(false)
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(true)
                .finish(),
        ),
    }
}

/// Reports why a daemon stops: a plain `program: error` line for people,
/// or, once [`init`] chose [`LogFormat::Json`], one JSON error event like
/// every other line, so whatever parses the log can parse this too.
pub fn fatal(program: &str, error: &dyn fmt::Display) {
    match FORMAT.get().copied().unwrap_or_default() {
        LogFormat::Text => eprintln!("{program}: {error}"),
        LogFormat::Json => tracing::error!(program, "{error}"),
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A writer that keeps what was logged.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Captured {
        type Writer = Self;
        fn make_writer(&'w self) -> Self {
            self.clone()
        }
    }

    fn log_with(format: LogFormat, colour: bool) -> String {
        let out = Captured::default();
        let subscriber = subscriber(format, colour, EnvFilter::new("info"), out.clone());
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("rollout", cert = "cn");
            let _in = span.enter();
            tracing::info!(node = "cn-unm-1", "restarted");
            tracing::warn!(error = "got 404", "self-check failed");
        });
        String::from_utf8(out.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_colour(true, None));
        assert!(use_colour(true, Some(OsStr::new(""))));
        assert!(!use_colour(true, Some(OsStr::new("1"))));
        assert!(!use_colour(false, None));
    }

    #[test]
    fn text_logs_without_colour_carry_no_escape_codes() {
        let text = log_with(LogFormat::Text, false);
        assert!(text.contains("restarted"), "{text}");
        assert!(!text.contains('\x1b'), "{text:?}");
        // The check above would pass on anything without colour: make sure
        // colour does show up when asked for.
        assert!(log_with(LogFormat::Text, true).contains("\x1b["));
    }

    #[test]
    fn json_logs_are_one_object_per_line_with_fields_and_span() {
        let text = log_with(LogFormat::Json, true);
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["level"], "INFO");
        assert_eq!(lines[0]["message"], "restarted");
        assert_eq!(lines[0]["node"], "cn-unm-1");
        assert_eq!(lines[0]["span"]["cert"], "cn");
        assert_eq!(lines[1]["error"], "got 404");
        assert!(!text.contains('\x1b'), "{text:?}");
    }

    #[test]
    fn formats_parse_by_name() {
        for name in LogFormat::NAMES {
            assert_eq!(name.parse::<LogFormat>().unwrap().to_string(), name);
        }
        assert!(
            "yaml"
                .parse::<LogFormat>()
                .unwrap_err()
                .contains("text, json")
        );
    }
}
