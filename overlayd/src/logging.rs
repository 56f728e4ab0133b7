//! Logging: text for people (journald, `kubectl logs`), or JSON lines for
//! log pipelines, as kube components and Calico offer. The filter is
//! checked at start: a typo is refused, never silently taken for "off".

use tracing_subscriber::EnvFilter;

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// `2026-12-06T18:00:00Z  INFO message key=value`.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `message` and the fields.
    Json,
}

/// The level when nothing sets one.
pub const DEFAULT_FILTER: &str = "info";

/// The client library logs every failed connection at error level, bare
/// (`failed with error client error (Connect)`), and every watch cut short
/// (`eof in poll`); overlayd says each outage itself, once, with the
/// endpoint (see `outage`). Named in the filter, it logs again.
const QUIET: &str = "kube_client=off";

/// Checks a filter (`info`, `debug`, `info,overlayd=debug`) as the flag's value.
pub fn parse_filter(text: &str) -> Result<String, String> {
    let text = text.trim();
    // An empty OVERLAYD_LOG= (an env file's placeholder) means the default, not silence.
    if text.is_empty() {
        return Ok(DEFAULT_FILTER.to_string());
    }
    EnvFilter::builder()
        .parse(text)
        .map(|_| text.to_string())
        .map_err(|e| format!("{text:?} is not a log filter such as info, debug or info,overlayd=debug: {e}"))
}

/// The filter to use: the flag's (or OVERLAYD_LOG's), else flanneld's `-v`
/// level, else info; the client library's noise is off unless it is named.
fn filter(level: Option<&str>, fallback: &str) -> EnvFilter {
    let chosen = level.unwrap_or(fallback);
    let text = if chosen.contains("kube_client") { chosen.to_string() } else { format!("{chosen},{QUIET}") };
    // Checked by `parse_filter` already; the default is always valid.
    EnvFilter::builder().parse(&text).unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER))
}

/// Installs the subscriber for the process.
pub fn init(level: Option<&str>, fallback: &str, format: LogFormat) {
    let filter = filter(level, fallback);
    match format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none())
            .with_writer(std::io::stderr)
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_env_filter(filter)
            .with_target(false)
            .with_writer(std::io::stderr)
            .init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_or_empty_filter_is_refused_and_a_good_one_kept() {
        for good in ["info", "debug", "off", "warn,overlayd=debug", "overlayd::lease=trace"] {
            assert_eq!(parse_filter(good).as_deref(), Ok(good));
        }
        assert_eq!(parse_filter("").as_deref(), Ok(DEFAULT_FILTER), "empty is the default, not off");
        for bad in ["info,overlayd=lots", "=debug", "nonsense=x"] {
            assert!(parse_filter(bad).is_err(), "{bad:?}");
        }
        assert!(filter(None, "info").to_string().contains(QUIET));
        assert!(!filter(Some("kube_client=debug"), "info").to_string().contains(QUIET));
    }
}
