//! `--log-policy-drops`: one log line per flow that policy drops. The
//! kernel logs dropped packets to NFLOG (rate-limited in the table); here
//! each is read back into its flow, named from the cluster view, and given
//! the rule that dropped it from the same ruleset the kernel holds
//! ([`explain::decide`](super::explain::decide)). A flow is said once a
//! minute at most, however many of its packets (retransmitted SYNs) come,
//! and again at once when another rule drops it.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use super::compile::{Direction, Key, Protocol, Ruleset};
use super::table;

/// How long a flow said is not said again.
const QUIET: Duration = Duration::from_secs(60);
/// Flows remembered at most (then forgotten all at once).
const REMEMBERED: usize = 10_000;

/// A dropped packet's flow: source, destination, IP protocol, destination port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    /// For TCP, UDP and SCTP.
    pub port: Option<u16>,
}

impl Flow {
    /// From a packet's first bytes (its IP header on); none when they are not one.
    pub fn parse(packet: &[u8]) -> Option<Flow> {
        let (src, dst, protocol, l4): (IpAddr, IpAddr, u8, &[u8]) = match packet.first()? >> 4 {
            4 => {
                let ihl = usize::from(packet[0] & 0x0f) * 4;
                let src: [u8; 4] = packet.get(12..16)?.try_into().ok()?;
                let dst: [u8; 4] = packet.get(16..20)?.try_into().ok()?;
                (Ipv4Addr::from(src).into(), Ipv4Addr::from(dst).into(), *packet.get(9)?, packet.get(ihl..)?)
            }
            6 => {
                let src: [u8; 16] = packet.get(8..24)?.try_into().ok()?;
                let dst: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
                (Ipv6Addr::from(src).into(), Ipv6Addr::from(dst).into(), *packet.get(6)?, packet.get(40..)?)
            }
            _ => return None,
        };
        let port = match protocol {
            6 | 17 | 132 => Some(u16::from_be_bytes(l4.get(2..4)?.try_into().ok()?)),
            _ => None,
        };
        Some(Flow { src, dst, protocol, port })
    }

    fn transport(&self) -> Option<(Protocol, u16)> {
        let protocol = match self.protocol {
            6 => Protocol::Tcp,
            17 => Protocol::Udp,
            132 => Protocol::Sctp,
            _ => return None,
        };
        Some((protocol, self.port?))
    }

    fn describe(&self) -> String {
        let name = match self.protocol {
            1 => "ICMP".to_string(),
            58 => "ICMPv6".to_string(),
            _ => match self.transport() {
                Some((p, port)) => format!("{} {port}", p.nft().to_uppercase()),
                None => format!("protocol {}", self.protocol),
            },
        };
        name
    }
}

/// The direction a logged packet was dropped in, from its prefix.
pub fn direction(prefix: &str) -> Option<Direction> {
    Direction::ALL.into_iter().find(|d| table::log_prefix(*d) == prefix)
}

/// Which flows were said, and when.
#[derive(Default)]
pub struct DropLog {
    /// Each flow said, with the rule that dropped it.
    said: HashMap<(Flow, String), Instant>,
}

impl DropLog {
    /// The line for a dropped `flow`, or none when it was said within the last minute.
    pub fn line(
        &mut self,
        flow: Flow,
        direction: Direction,
        ruleset: &Ruleset,
        pod_of: impl Fn(IpAddr) -> Option<Key>,
        now: Instant,
    ) -> Option<String> {
        let (pod, peer) = match direction {
            Direction::Egress => (flow.src, flow.dst),
            Direction::Ingress => (flow.dst, flow.src),
        };
        let (_, why) = super::explain::decide(ruleset, direction, pod, peer, flow.dst, flow.transport());
        let key = (flow, why);
        if self.said.get(&key).is_some_and(|at| now.duration_since(*at) < QUIET) {
            return None;
        }
        if self.said.len() >= REMEMBERED {
            self.said.clear();
        }
        let why = key.1.clone();
        self.said.insert(key, now);
        let name = |ip: IpAddr| match pod_of(ip) {
            Some((ns, name)) => format!("{ns}/{name} ({ip})"),
            None => ip.to_string(),
        };
        Some(format!(
            "policy dropped {} {} -> {}: {} of {} denied by {why}",
            flow.describe(),
            name(flow.src),
            name(flow.dst),
            direction.name(),
            name(pod)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_parse_from_both_families() {
        let mut v4 = vec![0x45, 0, 0, 60, 0, 0, 0, 0, 64, 6, 0, 0, 10, 244, 1, 3, 10, 244, 0, 2];
        v4.extend([0xc3, 0x50, 0, 80]);
        let flow = Flow::parse(&v4).unwrap();
        assert_eq!(flow.src, "10.244.1.3".parse::<IpAddr>().unwrap());
        assert_eq!((flow.protocol, flow.port), (6, Some(80)));
        assert_eq!(flow.describe(), "TCP 80");
        let mut v6 = vec![0x60, 0, 0, 0, 0, 8, 17, 64];
        v6.extend("fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend("fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend([0x12, 0x34, 0, 53]);
        let flow = Flow::parse(&v6).unwrap();
        assert_eq!((flow.dst, flow.protocol, flow.port), ("fd00::2".parse().unwrap(), 17, Some(53)));
        assert!(Flow::parse(&[0x45, 0, 0]).is_none(), "cut short");
        assert!(Flow::parse(&[]).is_none());
    }

    #[test]
    fn a_flow_is_said_once_a_minute() {
        let mut log = DropLog::default();
        let flow = Flow { src: "10.0.0.1".parse().unwrap(), dst: "10.0.0.2".parse().unwrap(), protocol: 1, port: None };
        let ruleset = Ruleset::default();
        let t = Instant::now();
        assert!(log.line(flow, Direction::Ingress, &ruleset, |_| None, t).is_some());
        assert!(log.line(flow, Direction::Ingress, &ruleset, |_| None, t + Duration::from_secs(5)).is_none());
        assert!(log.line(flow, Direction::Ingress, &ruleset, |_| None, t + Duration::from_secs(61)).is_some());
    }
}
