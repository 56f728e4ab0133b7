//! Finding the underlay: the interface VXLAN packets leave through, its
//! address (our VTEP's local address) and its MTU.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};
use overlay_netlink::{AddressFamily, Netlink};

/// The interface the overlay is built over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Its IPv4 address and prefix.
    pub addr: Ipv4Net,
    /// Its MTU.
    pub mtu: u32,
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
    /// The interface has no IPv4 address.
    #[error("interface {0} has no IPv4 address to use as VTEP address")]
    NoAddress(String),
    /// Nothing was named and there is no default route.
    #[error("no --iface given and no IPv4 default route to pick one from")]
    NoDefaultRoute,
}

/// Picks the underlay: `iface` names an interface or one of its addresses;
/// without it, the interface of the IPv4 default route.
pub async fn find(nl: &Netlink, iface: Option<&str>) -> Result<Underlay, UnderlayError> {
    let addrs: Vec<(u32, Ipv4Net)> = nl
        .all_addresses(AddressFamily::Inet)
        .await?
        .into_iter()
        .filter_map(|(index, net)| match net {
            IpNet::V4(v4) => Some((index, v4)),
            IpNet::V6(_) => None,
        })
        .collect();
    let (link, preferred) = match iface {
        Some(text) => match text.parse::<Ipv4Addr>() {
            Ok(ip) => {
                let (index, _) =
                    addrs.iter().find(|(_, a)| a.addr() == ip).ok_or_else(|| UnderlayError::NotFound(text.into()))?;
                (nl.link_by_index(*index).await?, Some(ip))
            }
            Err(_) => (nl.link(text).await?, None),
        },
        None => {
            let (oif, source) = nl.default_route(AddressFamily::Inet).await?.ok_or(UnderlayError::NoDefaultRoute)?;
            let source = match source {
                Some(IpAddr::V4(ip)) => Some(ip),
                _ => None,
            };
            (nl.link_by_index(oif).await?, source)
        }
    };
    let link = link.ok_or_else(|| UnderlayError::NotFound(iface.unwrap_or("(default route)").into()))?;
    let on_link: Vec<Ipv4Net> = addrs.iter().filter(|(i, _)| *i == link.index).map(|(_, a)| *a).collect();
    let addr = primary_address(&on_link, preferred).ok_or_else(|| UnderlayError::NoAddress(link.name.clone()))?;
    Ok(Underlay { index: link.index, name: link.name, addr, mtu: link.mtu })
}

/// The first address, or `preferred` when the link has it.
fn primary_address(on_link: &[Ipv4Net], preferred: Option<Ipv4Addr>) -> Option<Ipv4Net> {
    preferred.and_then(|p| on_link.iter().find(|a| a.addr() == p)).or(on_link.first()).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preferred_address_wins_when_present() {
        let a: Ipv4Net = "192.168.50.11/24".parse().unwrap();
        let b: Ipv4Net = "10.0.0.5/8".parse().unwrap();
        assert_eq!(primary_address(&[a, b], Some(b.addr())), Some(b));
        assert_eq!(primary_address(&[a, b], Some(Ipv4Addr::new(1, 2, 3, 4))), Some(a));
        assert_eq!(primary_address(&[a, b], None), Some(a));
        assert_eq!(primary_address(&[], None), None);
    }
}
