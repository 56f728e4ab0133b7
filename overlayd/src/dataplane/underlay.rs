//! Finding the underlay: the interface VXLAN packets leave through, its
//! address (our VTEP's local address) and its MTU.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use netlink_packet_route::{
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage},
    AddressFamily, RouteNetlinkMessage,
};

use super::links::{self, primary_address};
use super::netlink::{Netlink, NetlinkError};

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
    Netlink(#[from] NetlinkError),
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
pub fn find(nl: &mut Netlink, iface: Option<&str>) -> Result<Underlay, UnderlayError> {
    let links = links::list(nl)?;
    let addrs = links::ipv4_addresses(nl)?;
    let (index, preferred) = match iface {
        Some(text) => match text.parse::<Ipv4Addr>() {
            Ok(ip) => {
                let found =
                    addrs.iter().find(|a| a.net.addr() == ip).ok_or_else(|| UnderlayError::NotFound(text.into()))?;
                (found.index, Some(ip))
            }
            Err(_) => {
                let link = links.iter().find(|l| l.name == text).ok_or_else(|| UnderlayError::NotFound(text.into()))?;
                (link.index, None)
            }
        },
        None => default_route(nl)?.ok_or(UnderlayError::NoDefaultRoute)?,
    };
    let link = links.iter().find(|l| l.index == index).ok_or_else(|| UnderlayError::NotFound(index.to_string()))?;
    let addr = primary_address(&addrs, index, preferred).ok_or_else(|| UnderlayError::NoAddress(link.name.clone()))?;
    Ok(Underlay { index, name: link.name.clone(), addr, mtu: link.mtu })
}

/// The output interface and preferred source of the main table's IPv4 default route.
fn default_route(nl: &mut Netlink) -> Result<Option<(u32, Option<Ipv4Addr>)>, NetlinkError> {
    let mut req = RouteMessage::default();
    req.header.address_family = AddressFamily::Inet;
    for msg in nl.dump(RouteNetlinkMessage::GetRoute(req))? {
        let RouteNetlinkMessage::NewRoute(r) = msg else {
            continue;
        };
        if r.header.destination_prefix_length != 0 || r.header.table != RouteHeader::RT_TABLE_MAIN {
            continue;
        }
        let oif = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        });
        let src = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::PrefSource(RouteAddress::Inet(ip)) => Some(*ip),
            _ => None,
        });
        if let Some(oif) = oif {
            return Ok(Some((oif, src)));
        }
    }
    Ok(None)
}
