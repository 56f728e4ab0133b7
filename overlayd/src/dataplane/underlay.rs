//! Finding the underlay: the interface VXLAN packets leave through, its
//! address in each family the network carries (the VTEPs' local addresses)
//! and its MTU.

use std::net::IpAddr;

use ipnet::IpNet;
use overlay_netlink::{Link, Netlink};
use proto::Family;

use super::entries::address_family;

/// The interface the overlay is built over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Its IPv4 address and prefix, when IPv4 is on.
    pub v4: Option<IpNet>,
    /// Its (global) IPv6 address and prefix, when IPv6 is on.
    pub v6: Option<IpNet>,
    /// Its MTU.
    pub mtu: u32,
}

impl Underlay {
    /// The address of `family`.
    pub fn addr(&self, family: Family) -> Option<IpNet> {
        match family {
            Family::V4 => self.v4,
            Family::V6 => self.v6,
        }
    }
}

/// Why no underlay could be chosen.
#[derive(Debug, thiserror::Error)]
pub enum UnderlayError {
    /// Netlink failed.
    #[error(transparent)]
    Netlink(#[from] overlay_netlink::Error),
    /// The named interface or address does not exist.
    #[error("--iface {0}: no such interface or address in this network namespace")]
    NotFound(String),
    /// The interface has no address of a family the network carries.
    #[error("interface {iface} has no {family} address to use as VTEP address{hint}")]
    NoAddress {
        /// The interface.
        iface: String,
        /// The family.
        family: Family,
        /// What to do about it.
        hint: &'static str,
    },
    /// Nothing was named and there is no default route.
    #[error("no --iface given and no {0} default route to pick one from")]
    NoDefaultRoute(Family),
}

/// Picks the underlay for `families` (IPv4 first when on): `iface` names an
/// interface or one of its addresses; without it, the interface of the
/// default route of the first family.
pub async fn find(nl: &Netlink, iface: Option<&str>, families: &[Family]) -> Result<Underlay, UnderlayError> {
    let mut addrs: Vec<(u32, IpNet)> = Vec::new();
    for family in families {
        addrs.extend(
            nl.all_addresses(address_family(*family))
                .await?
                .into_iter()
                .filter(|(_, a)| Family::of_net(a) == *family && !proto::family::is_link_local(a.addr())),
        );
    }
    let first = families.first().copied().unwrap_or(Family::V4);
    let (link, preferred): (Option<Link>, Option<IpAddr>) = match iface {
        Some(text) => match text.parse::<IpAddr>() {
            Ok(ip) => {
                let (index, _) =
                    addrs.iter().find(|(_, a)| a.addr() == ip).ok_or_else(|| UnderlayError::NotFound(text.into()))?;
                (nl.link_by_index(*index).await?, Some(ip))
            }
            Err(_) => (nl.link(text).await?, None),
        },
        None => {
            let (oif, source) =
                nl.default_route(address_family(first)).await?.ok_or(UnderlayError::NoDefaultRoute(first))?;
            (nl.link_by_index(oif).await?, source)
        }
    };
    let link = link.ok_or_else(|| UnderlayError::NotFound(iface.unwrap_or("(default route)").into()))?;
    let on_link: Vec<IpNet> = addrs.iter().filter(|(i, _)| *i == link.index).map(|(_, a)| *a).collect();
    let mut underlay = Underlay { index: link.index, name: link.name.clone(), v4: None, v6: None, mtu: link.mtu };
    for family in families {
        let addr = primary_address(*family, &on_link, preferred).ok_or_else(|| UnderlayError::NoAddress {
            iface: link.name.clone(),
            family: *family,
            hint: match family {
                Family::V4 => "",
                Family::V6 => " (EnableIPv6 needs a global IPv6 address on the underlay interface; or choose another with --iface)",
            },
        })?;
        match family {
            Family::V4 => underlay.v4 = Some(addr),
            Family::V6 => underlay.v6 = Some(addr),
        }
    }
    Ok(underlay)
}

/// The first address of `family`, or `preferred` when the link has it.
fn primary_address(family: Family, on_link: &[IpNet], preferred: Option<IpAddr>) -> Option<IpNet> {
    let of_family: Vec<&IpNet> = on_link.iter().filter(|a| Family::of_net(a) == family).collect();
    preferred.and_then(|p| of_family.iter().find(|a| a.addr() == p)).or(of_family.first()).map(|a| **a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preferred_address_wins_when_present() {
        let a: IpNet = "192.168.50.11/24".parse().unwrap();
        let b: IpNet = "10.0.0.5/8".parse().unwrap();
        let c: IpNet = "fd00:50::11/64".parse().unwrap();
        let v4 = Family::V4;
        assert_eq!(primary_address(v4, &[a, b], Some(b.addr())), Some(b));
        assert_eq!(primary_address(v4, &[a, b], Some("1.2.3.4".parse().unwrap())), Some(a));
        assert_eq!(primary_address(v4, &[a, b], None), Some(a));
        assert_eq!(primary_address(v4, &[], None), None);
        // Each family finds its own, whatever was preferred.
        assert_eq!(primary_address(Family::V6, &[a, c], Some(a.addr())), Some(c));
        assert_eq!(primary_address(v4, &[c, a], Some(c.addr())), Some(a));
        assert_eq!(primary_address(Family::V6, &[a, b], None), None);
    }
}
