//! What `overlayd status` shows: the daemon's own account of the node (its
//! lease and VTEPs, its peers and the leases it skipped and why, each
//! resource's readiness, the last repair and the last error), served as
//! JSON at `/status` on the health address and on the local socket, and
//! printed as text by the `status` command.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The daemon's report, as `/status` serves it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Report {
    /// overlayd's version line.
    pub version: String,
    /// The lease store: `etcd` or `kubernetes`.
    pub store: String,
    /// Our lease (`10.244.1.0-24`), once held.
    pub lease: Option<String>,
    /// Our VTEP in each family that is on.
    pub vteps: Vec<Vtep>,
    /// Peers programmed.
    pub peers: usize,
    /// Peer leases not programmed, and why.
    pub skipped: Vec<Skipped>,
    /// Ready as `/readyz` says.
    pub ready: bool,
    /// Each resource of a family that is on, and whether it was right after the last reconcile.
    pub resources: Vec<ResourceState>,
    /// NetworkPolicy enforcement: none when off (etcd mode, or --network-policy=false).
    pub network_policy: Option<bool>,
    /// The last repair of drift.
    pub last_repair: Option<Event>,
    /// The last error of a reconcile.
    pub last_error: Option<Event>,
}

/// One VTEP.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Vtep {
    /// `IPv4` or `IPv6`.
    pub family: String,
    /// The VXLAN device.
    pub device: String,
    /// Its MAC.
    pub mac: String,
    /// The underlay address peers send to.
    pub public_ip: String,
}

/// A lease that is not a peer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Skipped {
    /// Its key.
    pub lease: String,
    /// Why.
    pub reason: String,
}

/// One resource's readiness.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ResourceState {
    /// Its name, as `/readyz` says it.
    pub name: String,
    /// Right after the last reconcile.
    pub ready: bool,
}

/// Something that happened, and when (Unix seconds).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Event {
    /// When.
    pub at: u64,
    /// What.
    pub what: String,
}

impl Event {
    /// `what`, now.
    pub fn now(what: impl Into<String>) -> Self {
        Event { at: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()), what: what.into() }
    }
}

/// The parts of the report the daemon keeps up to date; readiness is added
/// when it is served.
#[derive(Debug, Default)]
pub struct Status(Mutex<Report>);

impl Status {
    /// Changes the report.
    pub fn update(&self, f: impl FnOnce(&mut Report)) {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// The report as it stands.
    pub fn report(&self) -> Report {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Report {
    /// The report in words, as `overlayd status` prints it.
    pub fn to_text(&self, now: u64) -> String {
        let ago = |e: &Event| {
            let s = now.saturating_sub(e.at);
            let when = match s {
                0..=119 => format!("{s}s ago"),
                120..=7199 => format!("{}m ago", s / 60),
                _ => format!("{}h ago", s / 3600),
            };
            format!("{} ({when})", e.what)
        };
        let mut out = format!("overlayd {} ({})\n", self.version, self.store);
        out += &format!("ready:      {}\n", if self.ready { "yes" } else { "NO" });
        out += &format!("lease:      {}\n", self.lease.as_deref().unwrap_or("none yet"));
        for v in &self.vteps {
            out += &format!("vtep:       {} {} mac {} on {}\n", v.family, v.device, v.mac, v.public_ip);
        }
        out += &format!("peers:      {} programmed, {} skipped\n", self.peers, self.skipped.len());
        for s in &self.skipped {
            out += &format!("  skipped   {}: {}\n", s.lease, s.reason);
        }
        let not_ready: Vec<&str> = self.resources.iter().filter(|r| !r.ready).map(|r| r.name.as_str()).collect();
        let names: Vec<&str> = self.resources.iter().map(|r| r.name.as_str()).collect();
        if not_ready.is_empty() {
            out += &format!("resources:  all right ({})\n", names.join(", "));
        } else {
            out += &format!("resources:  NOT RIGHT: {} (of {})\n", not_ready.join(", "), names.join(", "));
        }
        if let Some(policy) = self.network_policy {
            out += &format!("policy:     {}\n", if policy { "enforced" } else { "NOT YET ENFORCED" });
        }
        out += &format!("last repair: {}\n", self.last_repair.as_ref().map_or("none".into(), ago));
        out += &format!("last error:  {}\n", self.last_error.as_ref().map_or("none".into(), ago));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_names_what_is_wrong_and_when_things_happened() {
        let report = Report {
            version: "0.1.0".into(),
            store: "etcd".into(),
            lease: Some("10.244.7.0-24".into()),
            vteps: vec![Vtep {
                family: "IPv4".into(),
                device: "overlay.1".into(),
                mac: "0e:00:00:00:00:07".into(),
                public_ip: "192.168.50.11".into(),
            }],
            peers: 2,
            skipped: vec![Skipped { lease: "192.168.50.0-24".into(), reason: "outside the network".into() }],
            ready: false,
            resources: vec![
                ResourceState { name: "device".into(), ready: true },
                ResourceState { name: "entries".into(), ready: false },
            ],
            network_policy: None,
            last_repair: Some(Event { at: 1000, what: "device (kernel event)".into() }),
            last_error: None,
        };
        let text = report.to_text(1030);
        for part in [
            "ready:      NO",
            "lease:      10.244.7.0-24",
            "overlay.1 mac 0e:00:00:00:00:07 on 192.168.50.11",
            "2 programmed, 1 skipped",
            "skipped   192.168.50.0-24: outside the network",
            "NOT RIGHT: entries (of device, entries)",
            "last repair: device (kernel event) (30s ago)",
            "last error:  none",
        ] {
            assert!(text.contains(part), "{part}:\n{text}");
        }
        assert!(!text.contains("policy:"), "no policy line in etcd mode");
        let json = serde_json::to_string(&report).unwrap();
        assert_eq!(serde_json::from_str::<Report>(&json).unwrap(), report);
    }
}
