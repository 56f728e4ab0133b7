//! What this node is to its peers: its VTEP in each family (the underlay
//! interface and address packets leave through, the address peers send to,
//! the VXLAN device's MAC) and the lease attributes that publish them; and
//! how all of that follows the underlay when it changes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::Result;
use overlay_netlink::{KernelEvent, Netlink};
use proto::{Address, Family, LeaseAttrs, MacAddr, NetConfig, VxlanBackendData};
use tracing::{info, warn};

use crate::dataplane::underlay::{self, NotUnderlay, Selector};
use crate::dataplane::{device, Underlay};
use crate::flags::NodeArgs;
use crate::lease::PublicIps;

/// The node's VTEPs as they stand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vteps {
    /// The underlay as last found.
    pub underlay: Underlay,
    /// The addresses we publish (the underlay's, or pinned by a flag or the store).
    pub public: PublicIps,
    /// The VTEP MAC of each family's device (IPv4, IPv6).
    pub macs: [MacAddr; 2],
    /// The machine's id, which the VTEP MACs are derived from.
    pub machine: String,
}

/// What a change of the underlay means for the lease and the store.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Moved {
    /// The underlay's address or interface changed: connections to the store are dead.
    pub reconnect: bool,
    /// What our lease must say now, when that changed.
    pub publish: Option<LeaseAttrs>,
}

impl Vteps {
    /// The underlay is now `found`: the addresses that followed the old one
    /// follow it (one pinned by `--public-ip` or the store stays), and so do
    /// the VTEP MACs derived from them.
    pub fn follow(&mut self, found: Underlay, flags: &NodeArgs, config: &NetConfig) -> Moved {
        let (before, now) = (detected(flags, &self.underlay), detected(flags, &found));
        let public =
            PublicIps { v4: follow(self.public.v4, before.v4, now.v4), v6: follow(self.public.v6, before.v6, now.v6) };
        info!(iface = %found.name, v4 = found.v4.map(display), v6 = found.v6.map(display), mtu = found.mtu, public_ip = public.v4.map(display), public_ipv6 = public.v6.map(display), "the underlay changed");
        let reconnect = (found.index, found.v4, found.v6) != (self.underlay.index, self.underlay.v4, self.underlay.v6);
        self.underlay = found;
        if public == self.public {
            return Moved { reconnect, publish: None };
        }
        let (macs, attrs) = lease_attrs(config, public, self.macs.map(Some), &self.machine);
        self.public = public;
        self.macs = macs;
        Moved { reconnect, publish: Some(attrs) }
    }
}

/// Finding the underlay, at start and again when it changes.
pub struct UnderlayFinder {
    nl: Netlink,
    selector: Selector,
    not: NotUnderlay,
    families: Vec<Family>,
}

impl UnderlayFinder {
    /// As the flags say, never one of the overlay's own devices nor a cluster address.
    pub fn new(nl: Netlink, node: &NodeArgs, config: &NetConfig) -> Result<Self> {
        let selector = node.underlay_selector().map_err(anyhow::Error::msg)?;
        Ok(UnderlayFinder { nl, selector, not: not_underlay(node, config), families: config.families().collect() })
    }

    /// The underlay now.
    pub async fn find(&self) -> Result<Underlay, underlay::UnderlayError> {
        underlay::find(&self.nl, &self.selector, &self.families, &self.not).await
    }

    /// The underlay again after news of it: a new one, or none when it is
    /// the same (or cannot be used as it is, which is said).
    pub async fn again(&self, current: &Underlay) -> Option<Underlay> {
        match self.find().await {
            Ok(found) if found == *current => None,
            Ok(found) => Some(found),
            Err(e) => {
                warn!(error = %e, "the underlay changed and cannot be used as it is; keeping the last one until it can");
                None
            }
        }
    }
}

/// Whether `event` is news of `underlay`: its addresses, MTU or existence,
/// or a default route (which picks the interface without `--iface`).
pub fn touches(underlay: &Underlay, event: &KernelEvent) -> bool {
    match event {
        KernelEvent::Address { index, .. } => *index == underlay.index,
        KernelEvent::Route { route, .. } => route.destination.prefix_len() == 0,
        KernelEvent::Link { index, mtu, gone, .. } => {
            *index == underlay.index && (*gone || mtu.is_some_and(|m| m != underlay.mtu))
        }
        _ => false,
    }
}

/// The overlay's own devices (ours and flanneld's, of either family) and
/// the cluster networks: the underlay is never one of them.
fn not_underlay(node: &NodeArgs, config: &NetConfig) -> NotUnderlay {
    let vni = config.backend.vni;
    let mut devices = vec![
        device::name(node.device.as_deref(), Family::V4, vni),
        device::name(node.device_v6.as_deref(), Family::V6, vni),
    ];
    devices.extend(Family::ALL.map(|family| device::flannel_name(family, vni)));
    let networks = config.families().filter_map(|f| Some(config.pool(f)?.network)).collect();
    NotUnderlay { devices, vni, networks }
}

/// An address that followed the underlay (`published == was`) follows it to
/// `is`; one pinned by the store (public-ip-overwrite) stays.
fn follow<T: PartialEq>(published: Option<T>, was: Option<T>, is: Option<T>) -> Option<T> {
    if published == was {
        is
    } else {
        published
    }
}

/// The addresses peers should send to, as this node sees them: the flags, else the underlay's.
pub fn detected(node: &NodeArgs, underlay: &Underlay) -> PublicIps {
    PublicIps {
        v4: node.public_ip.or(underlay.v4.and_then(|a| Ipv4Addr::from_ip(a.addr()))),
        v6: node.public_ipv6.or(underlay.v6.and_then(|a| Ipv6Addr::from_ip(a.addr()))),
    }
}

/// The MAC of each family's device, where it exists already: ours from
/// before a restart, or flanneld's. Without `--device`, when our default
/// device does not exist but flanneld's `flannel.<VNI>` (`flannel-v6.<VNI>`)
/// does, with our VNI, that one is adopted as it is, name and MAC: peers'
/// entries for this node stay right, so flanneld is replaced without a
/// packet lost (README, "Migrating from flannel").
pub async fn existing_devices(nl: &Netlink, node: &mut NodeArgs, vni: u32) -> Result<[Option<MacAddr>; 2]> {
    let mut kept = [None, None];
    for family in Family::ALL {
        let flag = match family {
            Family::V4 => &mut node.device,
            Family::V6 => &mut node.device_v6,
        };
        let ours = nl.link(&device::name(flag.as_deref(), family, vni)).await?;
        let link = match (ours, flag.is_none()) {
            (Some(link), _) => Some(link),
            (None, true) => {
                let flannels = device::flannel_name(family, vni);
                let theirs = nl.link(&flannels).await?.filter(|l| l.vxlan.as_ref().is_some_and(|v| v.vni == Some(vni)));
                if let Some(link) = &theirs {
                    info!(device = %link.name, mac = link.mac.map(display), %family, "adopting flanneld's device as it is");
                    // Marked, so `overlayd cleanup` knows it is ours to remove now.
                    nl.set_alias(link.index, device::ADOPTED_ALIAS).await?;
                    *flag = Some(link.name.clone());
                }
                theirs
            }
            (None, false) => None,
        };
        kept[family as usize] = link.filter(|l| l.vxlan.is_some()).and_then(|l| l.mac);
    }
    Ok(kept)
}

/// The machine's id, which the VTEP MACs are derived from (empty where there is none).
pub async fn machine_id() -> String {
    tokio::fs::read_to_string("/etc/machine-id").await.unwrap_or_default()
}

/// What this node publishes for `public`: each family's VTEP MAC (the one
/// `kept` by its device, else one derived from `machine`) and the lease attributes.
pub fn lease_attrs(
    config: &NetConfig,
    public: PublicIps,
    kept: [Option<MacAddr>; 2],
    machine: &str,
) -> ([MacAddr; 2], LeaseAttrs) {
    let vni = config.backend.vni;
    let macs = [
        kept[0].unwrap_or_else(|| vtep_mac(machine, public.v4.map(IpAddr::V4), vni, Family::V4)),
        kept[1].unwrap_or_else(|| vtep_mac(machine, public.v6.map(IpAddr::V6), vni, Family::V6)),
    ];
    let data = |family| VxlanBackendData { vni, vtep_mac: macs[family as usize] };
    let attrs = LeaseAttrs::vxlan_families(
        public.v4.filter(|_| config.ipv4.is_some()).map(|ip| (ip, data(Family::V4))),
        public.v6.filter(|_| config.ipv6.is_some()).map(|ip| (ip, data(Family::V6))),
    );
    (macs, attrs)
}

/// A stable VTEP MAC per family: derived from the machine and its public
/// address of that family, so a restart (or a reboot) keeps the entries
/// peers hold for us valid. (The IPv4 seed is that of the IPv4-only releases.)
fn vtep_mac(machine: &str, public_ip: Option<IpAddr>, vni: u32, family: Family) -> MacAddr {
    let ip = public_ip.map(|ip| ip.to_string()).unwrap_or_default();
    let seed = match family {
        Family::V4 => format!("overlay|{}|{ip}|{vni}", machine.trim()),
        Family::V6 => format!("overlay-v6|{}|{ip}|{vni}", machine.trim()),
    };
    MacAddr::from_seed(seed.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn underlay(index: u32, v4: &str) -> Underlay {
        Underlay { index, name: "eth0".into(), v4: Some(v4.parse().unwrap()), v6: None, mtu: 1500 }
    }

    #[test]
    fn a_new_underlay_address_is_published_unless_it_was_pinned() {
        let config = NetConfig::parse(r#"{"Network":"10.244.0.0/16"}"#).unwrap();
        let flags = crate::flags::Cli::parse_from(["overlayd"]).run.node;
        let old = underlay(2, "192.168.50.11/24");
        let public = detected(&flags, &old);
        let (macs, _) = lease_attrs(&config, public, [None, None], "machine");
        let mut vteps = Vteps { underlay: old.clone(), public, macs, machine: "machine".into() };
        // Only the MTU: nothing to publish, nothing to reconnect.
        let moved = vteps.follow(Underlay { mtu: 9000, ..old.clone() }, &flags, &config);
        assert_eq!(moved, Moved::default());
        // A new address: published, the MAC follows it, connections are new.
        let moved = vteps.follow(underlay(2, "192.168.50.99/24"), &flags, &config);
        assert!(moved.reconnect);
        let attrs = moved.publish.unwrap();
        assert_eq!(attrs.public_ip, "192.168.50.99".parse::<Ipv4Addr>().unwrap());
        assert_eq!(vteps.macs, macs, "the device's MAC is kept: peers' entries stay right");
        // Pinned by the store (public-ip-overwrite): the address stays.
        let pinned: Ipv4Addr = "203.0.113.7".parse().unwrap();
        vteps.public.v4 = Some(pinned);
        let moved = vteps.follow(underlay(2, "192.168.50.100/24"), &flags, &config);
        assert!(moved.reconnect && moved.publish.is_none());
        assert_eq!(vteps.public.v4, Some(pinned));
    }

    #[test]
    fn vtep_macs_are_stable_per_machine_address_and_family() {
        let ip = Some("192.168.50.11".parse().unwrap());
        assert_eq!(vtep_mac("m", ip, 1, Family::V4), vtep_mac("m", ip, 1, Family::V4));
        assert_ne!(vtep_mac("m", ip, 1, Family::V4), vtep_mac("n", ip, 1, Family::V4));
        assert_ne!(vtep_mac("m", ip, 1, Family::V4), vtep_mac("m", ip, 1, Family::V6));
    }
}
