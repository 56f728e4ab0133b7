//! Named operations on devices, addresses and single routes, on rtnetlink's
//! handle: callers say what they want (`link("cni0")`, `set_up(index)`),
//! never how the message looks.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, BorrowedFd};

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::{
    address::{AddressAttribute, AddressMessage},
    link::{InfoData, InfoVeth, LinkAttribute, LinkMessage},
    route::{RouteAttribute, RouteHeader, RouteMessage},
    AddressFamily,
};
use proto::MacAddr;
use rtnetlink::{
    AddressMessageBuilder, LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVxlan,
};

use crate::entry::Route;
use crate::error::{Error, Result};
use crate::link::Link;

/// A VXLAN device to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanDevice {
    /// Device name.
    pub name: String,
    /// VXLAN network identifier.
    pub vni: u32,
    /// UDP port.
    pub port: u16,
    /// Group-based policy extension.
    pub gbp: bool,
    /// Local VTEP address.
    pub local: IpAddr,
    /// The underlay device it is bound to.
    pub lower: u32,
    /// MTU.
    pub mtu: u32,
    /// MAC.
    pub mac: MacAddr,
}

/// An rtnetlink connection in the network namespace it was opened in.
#[derive(Clone)]
pub struct Netlink {
    handle: rtnetlink::Handle,
}

impl Netlink {
    /// Opens a connection in the calling thread's network namespace. Its I/O
    /// runs as a task on the current tokio runtime, so call it inside one.
    pub fn connect() -> Result<Self> {
        let (connection, handle, _) =
            rtnetlink::new_connection_with_strict_check().map_err(Error::socket("opening a netlink connection"))?;
        tokio::spawn(connection);
        Ok(Netlink { handle })
    }

    /// The link called `name`, if any: one request, not a dump.
    pub async fn link(&self, name: &str) -> Result<Option<Link>> {
        let request = self.handle.link().get().match_name(name.to_string()).execute();
        one_link(request, format!("looking up {name}")).await
    }

    /// The link with index `index`, if any.
    pub async fn link_by_index(&self, index: u32) -> Result<Option<Link>> {
        let request = self.handle.link().get().match_index(index).execute();
        one_link(request, format!("looking up link {index}")).await
    }

    /// Every link of the namespace.
    pub async fn links(&self) -> Result<Vec<Link>> {
        let messages: Vec<LinkMessage> =
            self.handle.link().get().execute().try_collect().await.map_err(Error::rtnl("listing links"))?;
        Ok(messages.iter().map(Link::from_message).collect())
    }

    /// Creates a VXLAN device that learns nothing (every FDB entry is programmed).
    pub async fn create_vxlan(&self, device: &VxlanDevice) -> Result<()> {
        let mut builder = LinkVxlan::new(&device.name, device.vni)
            .dev(device.lower)
            .port(device.port)
            .learning(false)
            .mtu(device.mtu)
            .address(device.mac.octets().to_vec());
        builder = match device.local {
            IpAddr::V4(local) => builder.local(local),
            IpAddr::V6(local) => builder.local6(local),
        };
        if device.gbp {
            builder = builder.gbp();
        }
        self.add_link(builder.build(), format!("creating VXLAN device {}", device.name)).await
    }

    /// Creates a bridge with a fixed MAC.
    pub async fn create_bridge(&self, name: &str, mtu: u32, mac: MacAddr) -> Result<()> {
        let msg = LinkBridge::new(name).mtu(mtu).address(mac.octets().to_vec()).build();
        self.add_link(msg, format!("creating bridge {name}")).await
    }

    /// Passes the bridge's IPv4 and IPv6 traffic through the IP layer's
    /// netfilter hooks (br_netfilter's per-bridge `nf_call_iptables` and
    /// `nf_call_ip6tables`), so a firewall in the forward hook sees
    /// traffic between two ports of this bridge, with conntrack.
    pub async fn set_bridge_netfilter(&self, index: u32, name: &str, on: bool) -> Result<()> {
        let msg =
            LinkMessageBuilder::<LinkBridge>::new(name).index(index).nf_call_iptables(on).nf_call_ip6tables(on).build();
        self.set_link(msg, format!("setting netfilter calls on bridge {name}")).await
    }

    /// Creates a veth pair whose `peer` end is born inside the network namespace `peer_netns`.
    pub async fn create_veth(&self, host: &str, peer: &str, peer_netns: BorrowedFd<'_>, mtu: u32) -> Result<()> {
        let peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer.to_string())
            .mtu(mtu)
            .setns_by_fd(peer_netns.as_raw_fd())
            .build();
        let msg = LinkVeth::new(host, peer).mtu(mtu).set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg))).build();
        self.add_link(msg, format!("creating veth {host} <-> {peer}")).await
    }

    async fn add_link(&self, msg: LinkMessage, what: String) -> Result<()> {
        self.handle.link().add(msg).execute().await.map_err(Error::rtnl(what))
    }

    /// Deletes the link `index` (and with it every entry on it).
    pub async fn delete_link(&self, index: u32) -> Result<()> {
        self.handle.link().del(index).execute().await.map_err(Error::rtnl(format!("deleting link {index}")))
    }

    /// Sets the link administratively up.
    pub async fn set_up(&self, index: u32) -> Result<()> {
        self.set_link(LinkUnspec::new_with_index(index).up().build(), format!("setting link {index} up")).await
    }

    /// Sets the link's MTU.
    pub async fn set_mtu(&self, index: u32, mtu: u32) -> Result<()> {
        self.set_link(LinkUnspec::new_with_index(index).mtu(mtu).build(), format!("setting the MTU of link {index}"))
            .await
    }

    /// Sets the link's MAC.
    pub async fn set_mac(&self, index: u32, mac: MacAddr) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).address(mac.octets().to_vec()).build();
        self.set_link(msg, format!("setting the MAC of link {index}")).await
    }

    /// Sets the link's alias (`ip link show` prints it as `alias`).
    pub async fn set_alias(&self, index: u32, alias: &str) -> Result<()> {
        let mut msg = LinkUnspec::new_with_index(index).build();
        msg.attributes.push(LinkAttribute::IfAlias(alias.to_string()));
        self.set_link(msg, format!("setting the alias of link {index}")).await
    }

    /// Attaches the link to `bridge` and sets it up.
    pub async fn attach_up(&self, index: u32, bridge: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).controller(bridge).up().build();
        self.set_link(msg, format!("attaching link {index} to bridge {bridge}")).await
    }

    /// Turns hairpin mode of the bridge port `index` on or off.
    pub async fn set_hairpin(&self, index: u32, on: bool) -> Result<()> {
        let msg = LinkBridgePort::new(index).hairpin(on).build();
        self.handle
            .link()
            .set_port(msg)
            .execute()
            .await
            .map_err(Error::rtnl(format!("setting hairpin on link {index}")))
    }

    async fn set_link(&self, msg: LinkMessage, what: String) -> Result<()> {
        self.handle.link().set(msg).execute().await.map_err(Error::rtnl(what))
    }

    /// The addresses of `family` on the link `index`, filtered by the kernel.
    pub async fn addresses(&self, index: u32, family: AddressFamily) -> Result<Vec<IpNet>> {
        Ok(self.addresses_where(Some(index), family).await?.into_iter().map(|(_, net)| net).collect())
    }

    /// Every address of `family` in the namespace, with its link's index.
    pub async fn all_addresses(&self, family: AddressFamily) -> Result<Vec<(u32, IpNet)>> {
        self.addresses_where(None, family).await
    }

    async fn addresses_where(&self, index: Option<u32>, family: AddressFamily) -> Result<Vec<(u32, IpNet)>> {
        let mut request = self.handle.address().get();
        request.message_mut().header.family = family;
        request.message_mut().header.index = index.unwrap_or(0);
        let messages: Vec<AddressMessage> =
            request.execute().try_collect().await.map_err(Error::rtnl("reading addresses"))?;
        Ok(messages
            .iter()
            .filter(|m| index.is_none_or(|i| m.header.index == i) && m.header.family == family)
            .filter_map(|m| Some((m.header.index, address_of(m)?)))
            .collect())
    }

    /// Adds `address` to the link `index`; an address already there is fine.
    /// IPv6 addresses skip duplicate address detection: ours are handed out
    /// by a lease or an allocation that is unique already, and DAD would keep
    /// them unusable (tentative) for a second or more after they are added.
    pub async fn add_address(&self, index: u32, address: IpNet) -> Result<()> {
        let mut request = self.handle.address().add(index, address.addr(), address.prefix_len()).replace();
        if address.addr().is_ipv6() {
            request.message_mut().attributes.push(netlink_packet_route::address::AddressAttribute::Flags(
                netlink_packet_route::address::AddressFlags::Nodad,
            ));
        }
        request.execute().await.map_err(Error::rtnl(format!("adding {address} to link {index}")))
    }

    /// Removes `address` from the link `index`.
    pub async fn delete_address(&self, index: u32, address: IpNet) -> Result<()> {
        let msg = match address {
            IpNet::V4(a) => {
                AddressMessageBuilder::<Ipv4Addr>::new().index(index).address(a.addr(), a.prefix_len()).build()
            }
            IpNet::V6(a) => {
                AddressMessageBuilder::<Ipv6Addr>::new().index(index).address(a.addr(), a.prefix_len()).build()
            }
        };
        self.handle
            .address()
            .del(msg)
            .execute()
            .await
            .map_err(Error::rtnl(format!("removing {address} from link {index}")))
    }

    /// The main table's route messages of `family`, through `oif` only when given (the kernel filters).
    async fn main_table_routes(&self, family: AddressFamily, oif: Option<u32>) -> Result<Vec<RouteMessage>> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family;
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        if let Some(oif) = oif {
            msg.attributes.push(RouteAttribute::Oif(oif));
        }
        self.handle.route().get(msg).execute().try_collect().await.map_err(Error::rtnl("reading routes"))
    }

    /// The main table's routes of `family`, only those through `oif` when given (filtered by the kernel).
    pub async fn routes(&self, family: AddressFamily, oif: Option<u32>) -> Result<Vec<Route>> {
        Ok(self
            .main_table_routes(family, oif)
            .await?
            .iter()
            .filter_map(Route::from_message)
            .filter(|r| oif.is_none_or(|o| r.oif == Some(o)) && family_of(r.destination) == family)
            .collect())
    }

    /// The output device and preferred source of the main table's default route of `family`.
    pub async fn default_route(&self, family: AddressFamily) -> Result<Option<(u32, Option<IpAddr>)>> {
        let messages = self.main_table_routes(family, None).await?;
        Ok(messages.iter().filter(|r| r.header.destination_prefix_length == 0).find_map(|r| {
            let route = Route::from_message(r)?;
            let source = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::PrefSource(s) => ip_of(s),
                _ => None,
            });
            Some((route.oif?, source))
        }))
    }

    /// The output device and source address the kernel would use to reach
    /// `destination` (`ip route get`); none when it has no route there.
    pub async fn route_to(&self, destination: IpAddr) -> Result<Option<(u32, Option<IpAddr>)>> {
        use netlink_packet_route::route::RouteAddress;
        let mut msg = RouteMessage::default();
        let (family, length, address) = match destination {
            IpAddr::V4(ip) => (AddressFamily::Inet, 32, RouteAddress::Inet(ip)),
            IpAddr::V6(ip) => (AddressFamily::Inet6, 128, RouteAddress::Inet6(ip)),
        };
        msg.header.address_family = family;
        msg.header.destination_prefix_length = length;
        msg.attributes.push(RouteAttribute::Destination(address));
        let answer: Vec<RouteMessage> = match self.handle.route().get(msg).execute().try_collect().await {
            Ok(answer) => answer,
            Err(rtnetlink::Error::NetlinkError(e))
                if [libc::ENETUNREACH, libc::EHOSTUNREACH].contains(&-e.raw_code()) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(Error::rtnl(format!("looking up the route to {destination}"))(e)),
        };
        Ok(answer.iter().find_map(|r| {
            let oif = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(oif) => Some(*oif),
                _ => None,
            })?;
            let source = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::PrefSource(s) => ip_of(s),
                _ => None,
            });
            Some((oif, source))
        }))
    }

    /// Adds `route`, or replaces the one with the same destination.
    pub async fn replace_route(&self, route: &Route) -> Result<()> {
        let what = match route.gateway {
            Some(gateway) => format!("adding route {} via {gateway}", route.destination),
            None => format!("adding route {}", route.destination),
        };
        self.handle.route().add(route.message()).replace().execute().await.map_err(Error::rtnl(what))
    }
}

async fn one_link(
    request: impl futures::Stream<Item = Result<LinkMessage, rtnetlink::Error>>,
    what: String,
) -> Result<Option<Link>> {
    let mut request = std::pin::pin!(request);
    match request.try_next().await.map_err(Error::rtnl(what)) {
        Ok(msg) => Ok(msg.as_ref().map(Link::from_message)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

fn address_of(msg: &AddressMessage) -> Option<IpNet> {
    // IPv4 says the interface's own address in IFA_LOCAL (IFA_ADDRESS is the
    // peer's on point-to-point links); IPv6 has only IFA_ADDRESS.
    let local = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let address = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    });
    IpNet::new(local.or(address)?, msg.header.prefix_len).ok()
}

fn ip_of(address: &netlink_packet_route::route::RouteAddress) -> Option<IpAddr> {
    match address {
        netlink_packet_route::route::RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        netlink_packet_route::route::RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

fn family_of(net: IpNet) -> AddressFamily {
    match net {
        IpNet::V4(_) => AddressFamily::Inet,
        IpNet::V6(_) => AddressFamily::Inet6,
    }
}
