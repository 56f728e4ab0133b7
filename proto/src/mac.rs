//! Ethernet MAC addresses in the `aa:bb:cc:dd:ee:ff` form flannel writes.

use std::fmt;
use std::str::FromStr;

/// A 48-bit Ethernet address, serialized as lower-case colon hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

/// Why a MAC address string was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid MAC address {0:?}: want six hex octets like aa:bb:cc:dd:ee:ff")]
pub struct MacParseError(pub String);

impl MacAddr {
    /// A locally administered unicast address derived from `seed`, so a node's
    /// VTEP MAC is stable across restarts without any state on disk.
    pub fn from_seed(seed: &[u8]) -> Self {
        let b = crate::hash::fnv1a(seed).to_be_bytes();
        // Clear the multicast bit, set the locally-administered bit.
        MacAddr([(b[0] & 0xfe) | 0x02, b[1], b[2], b[3], b[4], b[5]])
    }

    /// The raw octets, as netlink wants them.
    pub fn octets(&self) -> [u8; 6] {
        self.0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5])
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for MacAddr {
    type Err = MacParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for slot in out.iter_mut() {
            let part = parts.next().ok_or_else(|| MacParseError(s.into()))?;
            if part.len() != 2 {
                return Err(MacParseError(s.into()));
            }
            *slot = u8::from_str_radix(part, 16).map_err(|_| MacParseError(s.into()))?;
        }
        if parts.next().is_some() {
            return Err(MacParseError(s.into()));
        }
        Ok(MacAddr(out))
    }
}

impl TryFrom<&[u8]> for MacAddr {
    type Error = MacParseError;
    fn try_from(bytes: &[u8]) -> Result<Self, Self::Error> {
        <[u8; 6]>::try_from(bytes).map(MacAddr).map_err(|_| MacParseError(format!("{bytes:02x?}")))
    }
}

impl serde::Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_flannel_form() {
        let m: MacAddr = "b2:5e:e8:32:3a:be".parse().unwrap();
        assert_eq!(m.0, [0xb2, 0x5e, 0xe8, 0x32, 0x3a, 0xbe]);
        assert_eq!(m.to_string(), "b2:5e:e8:32:3a:be");
    }

    #[test]
    fn rejects_malformed() {
        for bad in ["", "b2:5e:e8:32:3a", "b2:5e:e8:32:3a:be:00", "zz:5e:e8:32:3a:be", "b25:e:e8:32:3a:be"] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn seeded_mac_is_unicast_local_and_stable() {
        let a = MacAddr::from_seed(b"node-a");
        assert_eq!(a, MacAddr::from_seed(b"node-a"));
        assert_ne!(a, MacAddr::from_seed(b"node-b"));
        assert_eq!(a.0[0] & 0x01, 0, "multicast bit must be clear");
        assert_eq!(a.0[0] & 0x02, 0x02, "locally administered bit must be set");
    }

    proptest! {
        #[test]
        fn display_parse_roundtrip(bytes in any::<[u8; 6]>()) {
            let m = MacAddr(bytes);
            prop_assert_eq!(m.to_string().parse::<MacAddr>().unwrap(), m);
        }
    }
}
