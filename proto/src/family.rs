//! IP families, and the address arithmetic that is the same for both: the
//! core plans with `IpAddr`/`IpNet` and a [`Family`], never with one
//! family's types, so dual stack is the IPv4 path run twice, not a copy.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// An IP family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// Both families, IPv4 first (the order of every file and log).
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// The family of an address.
    pub fn of(addr: IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// The family of a network.
    pub fn of_net(net: &IpNet) -> Family {
        Family::of(net.addr())
    }

    /// Address width in bits.
    pub fn bits(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    /// What VXLAN adds to a packet over an underlay of this family: outer
    /// Ethernet 14 + IP (20 or 40) + UDP 8 + VXLAN 8.
    pub fn vxlan_overhead(self) -> u32 {
        match self {
            Family::V4 => 50,
            Family::V6 => 70,
        }
    }

    /// The unspecified address (`0.0.0.0`, `::`).
    pub fn unspecified(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Family::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        }
    }

    /// The address with this value, truncated to the family's width.
    pub fn addr(self, value: u128) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(Ipv4Addr::from(value as u32)),
            Family::V6 => IpAddr::V6(Ipv6Addr::from(value)),
        }
    }

    /// A host route to `addr` (`/32`, `/128`).
    pub fn host(addr: IpAddr) -> IpNet {
        match addr {
            IpAddr::V4(a) => IpNet::V4(Ipv4Net::new_assert(a, 32)),
            IpAddr::V6(a) => IpNet::V6(Ipv6Net::new_assert(a, 128)),
        }
    }

    /// Multicast, which is never masqueraded.
    pub fn multicast(self) -> IpNet {
        match self {
            Family::V4 => IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(224, 0, 0, 0), 4)),
            Family::V6 => IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8)),
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// An address type of one family, `Ipv4Addr` or `Ipv6Addr`. The dataplane's
/// plan is generic over it: both families run the same code, and each
/// family's state is as compact as its addresses (an IPv4 entry holds 4
/// bytes, not an `IpAddr`'s 17).
pub trait Address:
    Copy + Ord + Eq + std::hash::Hash + fmt::Debug + fmt::Display + Send + Sync + Into<IpAddr> + 'static
{
    /// The family's network type, `Ipv4Net` or `Ipv6Net`.
    type Net: Copy + Ord + Eq + std::hash::Hash + fmt::Debug + fmt::Display + Send + Sync + Into<IpNet> + 'static;
    /// The family.
    const FAMILY: Family;
    /// The network address of `net`.
    fn network(net: &Self::Net) -> Self;
    /// The address part of `net` (an interface address with its prefix).
    fn addr(net: &Self::Net) -> Self;
    /// Whether `net` contains `addr`.
    fn contains(net: &Self::Net, addr: Self) -> bool;
    /// `ip` when it is of this family.
    fn from_ip(ip: IpAddr) -> Option<Self>;
    /// `net` when it is of this family.
    fn net_from(net: IpNet) -> Option<Self::Net>;
}

impl Address for Ipv4Addr {
    type Net = Ipv4Net;
    const FAMILY: Family = Family::V4;
    fn network(net: &Ipv4Net) -> Self {
        net.network()
    }
    fn addr(net: &Ipv4Net) -> Self {
        net.addr()
    }
    fn contains(net: &Ipv4Net, addr: Self) -> bool {
        net.contains(&addr)
    }
    fn from_ip(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        }
    }
    fn net_from(net: IpNet) -> Option<Ipv4Net> {
        match net {
            IpNet::V4(n) => Some(n),
            IpNet::V6(_) => None,
        }
    }
}

impl Address for Ipv6Addr {
    type Net = Ipv6Net;
    const FAMILY: Family = Family::V6;
    fn network(net: &Ipv6Net) -> Self {
        net.network()
    }
    fn addr(net: &Ipv6Net) -> Self {
        net.addr()
    }
    fn contains(net: &Ipv6Net, addr: Self) -> bool {
        net.contains(&addr)
    }
    fn from_ip(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V6(a) => Some(a),
            IpAddr::V4(_) => None,
        }
    }
    fn net_from(net: IpNet) -> Option<Ipv6Net> {
        match net {
            IpNet::V6(n) => Some(n),
            IpNet::V4(_) => None,
        }
    }
}

/// An address as a number.
pub fn value(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// The address `offset` after the network address of `net`, with its prefix
/// (the first pod address of a subnet is `first_host(subnet, 1)`).
pub fn nth_addr(net: &IpNet, offset: u128) -> IpAddr {
    Family::of_net(net).addr(value(net.network()).wrapping_add(offset))
}

/// A link-local IPv6 address (fe80::/10): the kernel's own, never ours to manage.
pub fn is_link_local(addr: IpAddr) -> bool {
    matches!(addr, IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_is_the_same_for_both_families() {
        let v4: IpNet = "10.244.7.0/24".parse().unwrap();
        let v6: IpNet = "fd00:10:244:8::/64".parse().unwrap();
        assert_eq!(nth_addr(&v4, 1).to_string(), "10.244.7.1");
        assert_eq!(nth_addr(&v6, 1).to_string(), "fd00:10:244:8::1");
        assert_eq!(Family::host(nth_addr(&v6, 0)).to_string(), "fd00:10:244:8::/128");
        assert_eq!(Family::of_net(&v6), Family::V6);
        assert_eq!(Family::V6.vxlan_overhead() - Family::V4.vxlan_overhead(), 20);
        assert!(is_link_local("fe80::1".parse().unwrap()));
        assert!(!is_link_local("fd00::1".parse().unwrap()));
        assert!(!is_link_local("10.0.0.1".parse().unwrap()));
    }
}
