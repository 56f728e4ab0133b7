//! Which subnets a node may lease: SubnetMin..=SubnetMax in SubnetLen steps,
//! the same arithmetic for IPv4 and IPv6 (on 128-bit numbers).

use std::collections::HashSet;

use ipnet::IpNet;

use crate::family::{self, Family};
use crate::net_config::Pool;

/// The subnets that can be handed out from a [`Pool`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetRange {
    family: Family,
    first: u128,
    count: u128,
    len: u8,
}

impl SubnetRange {
    /// The range a pool allows.
    pub fn of(pool: &Pool) -> Self {
        let family = pool.family();
        let len = pool.subnet_len;
        let step = 1u128 << (family.bits() - len);
        let first = family::value(pool.subnet_min);
        let count = (family::value(pool.subnet_max) - first) / step + 1;
        SubnetRange { family, first, count, len }
    }

    fn step(&self) -> u128 {
        1u128 << (self.family.bits() - self.len)
    }

    /// How many subnets the range holds.
    pub fn len(&self) -> u128 {
        self.count
    }

    /// Whether the range holds none (never, for a validated config).
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The `index`th subnet of the range.
    pub fn nth(&self, index: u128) -> Option<IpNet> {
        if index >= self.count {
            return None;
        }
        IpNet::new(self.family.addr(self.first + index * self.step()), self.len).ok()
    }

    /// Whether `subnet` is one this range hands out.
    pub fn contains(&self, subnet: &IpNet) -> bool {
        if Family::of_net(subnet) != self.family || subnet.prefix_len() != self.len || subnet.addr() != subnet.network()
        {
            return false;
        }
        let addr = family::value(subnet.addr());
        addr >= self.first && (addr - self.first) / self.step() < self.count
    }

    /// A free subnet, scanning from position `start` (mod the range size) so
    /// nodes starting together do not all race for the same subnet.
    pub fn pick_free(&self, taken: &HashSet<IpNet>, start: u64) -> Option<IpNet> {
        if self.count == 0 {
            return None;
        }
        let offset = u128::from(start) % self.count;
        // Stops at the first free subnet: at most taken.len() + 1 steps, however big the range.
        let mut i = 0u128;
        while i < self.count {
            let subnet = self.nth((offset + i) % self.count)?;
            if !taken.contains(&subnet) {
                return Some(subnet);
            }
            i += 1;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NetConfig;
    use proptest::prelude::*;

    fn range(text: &str) -> SubnetRange {
        SubnetRange::of(&NetConfig::parse(text).unwrap().ipv4.unwrap())
    }

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    #[test]
    fn first_and_last_subnets_are_skipped() {
        let r = range(r#"{"Network":"10.244.0.0/16"}"#);
        assert_eq!(r.len(), 254);
        assert_eq!(r.nth(0).unwrap().to_string(), "10.244.1.0/24");
        assert_eq!(r.nth(253).unwrap().to_string(), "10.244.254.0/24");
        assert!(r.nth(254).is_none());
        assert!(!r.contains(&net("10.244.0.0/24")));
        assert!(!r.contains(&net("10.244.255.0/24")));
        assert!(r.contains(&net("10.244.7.0/24")));
        assert!(!r.contains(&net("10.244.7.0/25")));
        assert!(!r.contains(&net("fd00::/64")));
    }

    #[test]
    fn ipv6_skips_only_the_first_subnet() {
        let c = NetConfig::parse(r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}"#)
            .unwrap();
        let r = SubnetRange::of(&c.ipv6.unwrap());
        assert_eq!(r.len(), 255);
        assert_eq!(r.nth(0).unwrap().to_string(), "fd00:10:244:1::/64");
        assert_eq!(r.nth(254).unwrap().to_string(), "fd00:10:244:ff::/64");
        assert!(!r.contains(&net("fd00:10:244::/64")));
        assert!(r.contains(&net("fd00:10:244:8::/64")));
        assert!(!r.contains(&net("10.244.8.0/24")));
        // A huge range still finds a free subnet at once.
        let c = NetConfig::parse(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/16"}"#).unwrap();
        let r = SubnetRange::of(&c.ipv6.unwrap());
        assert_eq!(r.len(), (1u128 << 48) - 1);
        let taken: HashSet<IpNet> = (0..100).filter_map(|i| r.nth(i)).collect();
        assert_eq!(r.pick_free(&taken, 0), r.nth(100));
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
            let pool = cfg.ipv4.unwrap();
            let r = SubnetRange::of(&pool);
            let taken: HashSet<_> = taken_idx.iter().filter_map(|i| r.nth(u128::from(*i) % r.len())).collect();
            match r.pick_free(&taken, start) {
                Some(s) => {
                    prop_assert!(r.contains(&s));
                    prop_assert!(!taken.contains(&s));
                    prop_assert!(pool.network.contains(&s));
                    prop_assert_ne!(s.network(), pool.network.network());
                }
                None => prop_assert_eq!(taken.len() as u128, r.len()),
            }
        }

        #[test]
        fn ipv6_picks_are_in_range(prefix in 16u8..=100, extra in 1u8..=24, start in any::<u64>()) {
            let len = (prefix + extra).min(126);
            let cfg = NetConfig::parse(&format!(r#"{{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/{prefix}","IPv6SubnetLen":{len}}}"#)).unwrap();
            let pool = cfg.ipv6.unwrap();
            let r = SubnetRange::of(&pool);
            let s = r.pick_free(&HashSet::new(), start).unwrap();
            prop_assert!(r.contains(&s));
            prop_assert!(pool.network.contains(&s));
            prop_assert_ne!(s.network(), pool.network.network());
        }
    }
}
