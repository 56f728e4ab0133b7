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
    /// None of the named interfaces or addresses exists.
    #[error("--iface {}: no such interface or address in this network namespace (interfaces here: {})", .tried.join(", "), .present)]
    NotFound {
        /// What was asked for, in order.
        tried: Vec<String>,
        /// The interfaces there are, with their addresses.
        present: String,
    },
    /// No address or interface name matches any of the patterns.
    #[error("--iface-regex {}: no address or interface name matches (interfaces here: {})", .patterns.join(", "), .present)]
    NoMatch {
        /// The patterns, in order.
        patterns: Vec<String>,
        /// The interfaces there are, with their addresses.
        present: String,
    },
    /// There is no route to the address.
    #[error("--iface-can-reach {0}: this host has no route there to pick an interface by")]
    Unreachable(IpAddr),
    /// The interface has no address of a family the network carries.
    #[error(
        "interface {iface} has no {family} address to use as VTEP address (a unicast address outside the cluster network){hint}"
    )]
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
    /// The interface chosen can never carry the overlay.
    #[error("interface {iface} cannot be the underlay: {reason}")]
    Unusable {
        /// The interface.
        iface: String,
        /// Why, in words.
        reason: String,
    },
}

/// What the underlay must never be: the daemon's own devices (by name, and
/// any VXLAN device of our VNI), and an address inside the cluster's networks.
#[derive(Debug, Clone, Default)]
pub struct NotUnderlay {
    /// The VXLAN device names of this daemon, flanneld's included.
    pub devices: Vec<String>,
    /// Our VNI.
    pub vni: u32,
    /// The cluster networks.
    pub networks: Vec<IpNet>,
}

impl NotUnderlay {
    /// Why `link` can never be the underlay, if it cannot.
    fn refusal(&self, link: &Link) -> Option<String> {
        if link.loopback {
            return Some("it is the loopback interface, which no peer can reach".into());
        }
        let our_vni = link.vxlan.as_ref().is_some_and(|v| v.vni == Some(self.vni));
        if self.devices.contains(&link.name) || our_vni {
            return Some(
                "it is a VXLAN device of the overlay itself; name the interface its packets leave through".into(),
            );
        }
        None
    }

    /// Whether `addr` can be a VTEP address: unicast, routable, and outside the cluster.
    fn usable(&self, addr: &IpNet) -> bool {
        let ip = addr.addr();
        !ip.is_loopback()
            && !ip.is_multicast()
            && !ip.is_unspecified()
            && !proto::family::is_link_local(ip)
            && !matches!(ip, IpAddr::V4(v4) if v4.is_broadcast() || v4.is_link_local())
            && !self.networks.iter().any(|n| n.contains(&ip))
    }
}

/// How the underlay interface is chosen, as flanneld chooses it.
#[derive(Debug, Clone)]
pub enum Selector {
    /// The interface of the default route of the first family.
    DefaultRoute,
    /// Interfaces by name or by one of their addresses, in order of
    /// preference: the first that exists (`--iface`, repeated).
    Named(Vec<String>),
    /// Patterns, in order: the first that matches one of the host's
    /// addresses, else an interface's name (`--iface-regex`, repeated).
    Matching(Vec<regex::Regex>),
    /// The interface of the route to this address (`--iface-can-reach`).
    Reaching(IpAddr),
}

/// Picks the underlay for `families` (IPv4 first when on), as `selector` says.
pub async fn find(
    nl: &Netlink,
    selector: &Selector,
    families: &[Family],
    not: &NotUnderlay,
) -> Result<Underlay, UnderlayError> {
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
    let (link, preferred): (Option<Link>, Option<IpAddr>) = match selector {
        Selector::DefaultRoute => {
            let (oif, source) =
                nl.default_route(address_family(first)).await?.ok_or(UnderlayError::NoDefaultRoute(first))?;
            (nl.link_by_index(oif).await?, source)
        }
        Selector::Named(names) => {
            let mut found = None;
            for text in names {
                found = match text.parse::<IpAddr>() {
                    Ok(ip) => match addrs.iter().find(|(_, a)| a.addr() == ip) {
                        Some((index, _)) => nl.link_by_index(*index).await?.map(|l| (l, Some(ip))),
                        None => None,
                    },
                    Err(_) => nl.link(text).await?.map(|l| (l, None)),
                };
                if found.is_some() {
                    break;
                }
            }
            let Some((link, ip)) = found else {
                return Err(UnderlayError::NotFound { tried: names.clone(), present: present(nl, &addrs).await });
            };
            (Some(link), ip)
        }
        Selector::Matching(patterns) => {
            let links = nl.links().await?;
            let matched = patterns.iter().find_map(|pattern| {
                let by_address = addrs.iter().find(|(_, a)| pattern.is_match(&a.addr().to_string()));
                match by_address {
                    Some((index, a)) => links.iter().find(|l| l.index == *index).map(|l| (l.clone(), Some(a.addr()))),
                    None => links.iter().find(|l| pattern.is_match(&l.name)).map(|l| (l.clone(), None)),
                }
            });
            let Some((link, ip)) = matched else {
                return Err(UnderlayError::NoMatch {
                    patterns: patterns.iter().map(|p| p.as_str().to_string()).collect(),
                    present: present(nl, &addrs).await,
                });
            };
            (Some(link), ip)
        }
        Selector::Reaching(destination) => {
            let (oif, source) = nl.route_to(*destination).await?.ok_or(UnderlayError::Unreachable(*destination))?;
            (nl.link_by_index(oif).await?, source)
        }
    };
    let link =
        link.ok_or_else(|| UnderlayError::NotFound { tried: vec!["(its interface)".into()], present: String::new() })?;
    if let Some(reason) = not.refusal(&link) {
        return Err(UnderlayError::Unusable { iface: link.name, reason });
    }
    let on_link: Vec<IpNet> =
        addrs.iter().filter(|(i, a)| *i == link.index && not.usable(a)).map(|(_, a)| *a).collect();
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

/// The interfaces there are, each with its addresses, for an error that says what could have matched.
async fn present(nl: &Netlink, addrs: &[(u32, IpNet)]) -> String {
    let Ok(links) = nl.links().await else { return "(cannot list them)".into() };
    let described: Vec<String> = links
        .iter()
        .map(|l| {
            let of_link: Vec<String> =
                addrs.iter().filter(|(i, _)| *i == l.index).map(|(_, a)| a.addr().to_string()).collect();
            if of_link.is_empty() {
                l.name.clone()
            } else {
                format!("{} ({})", l.name, of_link.join(" "))
            }
        })
        .collect();
    described.join(", ")
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

    #[test]
    fn the_overlay_s_own_devices_loopback_and_cluster_addresses_are_never_the_underlay() {
        let not = NotUnderlay {
            devices: vec!["overlay.1".into(), "flannel.1".into()],
            vni: 1,
            networks: vec!["10.244.0.0/16".parse().unwrap()],
        };
        let link = |name: &str| Link { name: name.into(), ..Link::default() };
        assert_eq!(not.refusal(&link("eth0")), None);
        assert!(not.refusal(&Link { loopback: true, ..link("lo") }).unwrap().contains("loopback"));
        assert!(not.refusal(&link("overlay.1")).unwrap().contains("VXLAN device of the overlay"));
        assert!(not.refusal(&link("flannel.1")).is_some());
        let vxlan = |vni| Some(overlay_netlink::VxlanSettings { vni: Some(vni), ..Default::default() });
        assert!(not.refusal(&Link { vxlan: vxlan(1), ..link("vx0") }).is_some(), "our VNI under another name");
        assert_eq!(not.refusal(&Link { vxlan: vxlan(7), ..link("vx7") }), None, "another overlay's VXLAN");
        for bad in ["127.0.0.1/8", "10.244.3.1/24", "224.0.0.1/32", "0.0.0.0/0", "169.254.1.1/16", "::1/128"] {
            assert!(!not.usable(&bad.parse().unwrap()), "{bad}");
        }
        for good in ["192.168.50.11/24", "fd00:50::11/64", "10.0.0.5/8"] {
            assert!(not.usable(&good.parse().unwrap()), "{good}");
        }
    }
}
