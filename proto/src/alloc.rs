//! Which subnets a node may lease: SubnetMin..=SubnetMax in SubnetLen steps.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::net_config::NetConfig;

/// The subnets that can be handed out under a [`NetConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetRange {
    first: u32,
    count: u32,
    len: u8,
}

impl SubnetRange {
    /// The range a config allows.
    pub fn of(config: &NetConfig) -> Self {
        let len = config.subnet_len;
        let step = 1u32 << (32 - len);
        let first = u32::from(config.subnet_min);
        let count = (u32::from(config.subnet_max) - first) / step + 1;
        SubnetRange { first, count, len }
    }

    /// How many subnets the range holds.
    pub fn len(&self) -> u32 {
        self.count
    }

    /// Whether the range holds none (never, for a validated config).
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The `index`th subnet of the range.
    pub fn nth(&self, index: u32) -> Option<Ipv4Net> {
        if index >= self.count {
            return None;
        }
        let addr = self.first + index * (1u32 << (32 - self.len));
        Ipv4Net::new(Ipv4Addr::from(addr), self.len).ok()
    }

    /// Whether `subnet` is one this range hands out.
    pub fn contains(&self, subnet: &Ipv4Net) -> bool {
        if subnet.prefix_len() != self.len || subnet.addr() != subnet.network() {
            return false;
        }
        let addr = u32::from(subnet.addr());
        addr >= self.first && (addr - self.first) >> (32 - self.len) < self.count
    }

    /// A free subnet, scanning from position `start` (mod the range size) so
    /// nodes starting together do not all race for the same subnet.
    pub fn pick_free(&self, taken: &HashSet<Ipv4Net>, start: u64) -> Option<Ipv4Net> {
        if self.count == 0 {
            return None;
        }
        let offset = (start % u64::from(self.count)) as u32;
        (0..self.count).map(|i| (offset + i) % self.count).filter_map(|i| self.nth(i)).find(|s| !taken.contains(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn range(text: &str) -> SubnetRange {
        SubnetRange::of(&NetConfig::parse(text).unwrap())
    }

    #[test]
    fn first_and_last_subnets_are_skipped() {
        let r = range(r#"{"Network":"10.244.0.0/16"}"#);
        assert_eq!(r.len(), 254);
        assert_eq!(r.nth(0).unwrap().to_string(), "10.244.1.0/24");
        assert_eq!(r.nth(253).unwrap().to_string(), "10.244.254.0/24");
        assert!(r.nth(254).is_none());
        assert!(!r.contains(&"10.244.0.0/24".parse().unwrap()));
        assert!(!r.contains(&"10.244.255.0/24".parse().unwrap()));
        assert!(r.contains(&"10.244.7.0/24".parse().unwrap()));
        assert!(!r.contains(&"10.244.7.0/25".parse().unwrap()));
    }

    #[test]
    fn min_and_max_are_honoured() {
        let r = range(r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.10.0","SubnetMax":"10.244.12.0"}"#);
        assert_eq!(r.len(), 3);
        let mut taken = HashSet::new();
        for _ in 0..3 {
            let s = r.pick_free(&taken, 7).unwrap();
            assert!(r.contains(&s));
            taken.insert(s);
        }
        assert_eq!(r.pick_free(&taken, 0), None, "a full network has no free subnet");
    }

    proptest! {
        #[test]
        fn picks_are_in_range_and_free(prefix in 8u8..=24, extra in 2u8..=6, start in any::<u64>(), taken_idx in proptest::collection::vec(any::<u32>(), 0..20)) {
            let len = (prefix + extra).min(30);
            let cfg = NetConfig::parse(&format!(r#"{{"Network":"10.0.0.0/{prefix}","SubnetLen":{len}}}"#)).unwrap();
            let r = SubnetRange::of(&cfg);
            let taken: HashSet<_> = taken_idx.iter().filter_map(|i| r.nth(i % r.len())).collect();
            match r.pick_free(&taken, start) {
                Some(s) => {
                    prop_assert!(r.contains(&s));
                    prop_assert!(!taken.contains(&s));
                    prop_assert!(cfg.network.contains(&s));
                    prop_assert_ne!(s.network(), cfg.network.network());
                }
                None => prop_assert_eq!(taken.len() as u32, r.len()),
            }
        }
    }
}
