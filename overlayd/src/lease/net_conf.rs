//! The network config as both stores read it: parsed, its unknown keys said
//! once, and watched afterwards so that a change is said rather than
//! silently ignored. The daemon applies a config at start only: a new
//! `Network` or VNI would renumber every pod, which is a decision for an
//! operator's restart, not for a watch event.

use proto::NetConfig;
use tracing::{info, warn};

/// Parses `text`, read from `source` (an etcd key, a file), and warns once
/// for each key the format does not have (accepted, as flannel accepts them).
pub fn parse(text: &str, source: &str) -> Result<NetConfig, proto::ConfigError> {
    let config = NetConfig::parse(text)?;
    for unknown in proto::unknown_keys(text) {
        warn!(%source, "{unknown}");
    }
    Ok(config)
}

/// What a change of the config at `source` from `running` (the text the
/// daemon started with) to `now` (none: removed) means, said in one line.
/// Nothing is said when the config still means the same.
pub fn say_changed(source: &str, running: &str, now: Option<&str>) {
    let Some(now) = now else {
        warn!(%source, "the network config was removed; overlayd keeps the one it started with");
        return;
    };
    match (NetConfig::parse(running), NetConfig::parse(now)) {
        (Ok(a), Ok(b)) if a == b => info!(%source, "the network config was rewritten; it means the same"),
        (_, Ok(_)) => warn!(
            %source,
            "the network config changed; overlayd applies a network config at start only: restart it (every node) to apply the new one"
        ),
        (_, Err(e)) => warn!(
            %source,
            error = %e,
            "the network config changed and is not valid; overlayd keeps the one it started with, and would refuse this one at its next start"
        ),
    }
}
