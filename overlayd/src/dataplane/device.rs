//! The VXLAN device as a resource: what it must look like, a pure diff
//! against the device the node holds, and the named operations that close
//! the gap. Settings the kernel cannot change in place (VNI, port, local
//! address, lower device, learning, GBP) mean the device is recreated.

use std::net::IpAddr;

use ipnet::IpNet;
use overlay_netlink::{Link, Netlink, VxlanDevice};
use proto::{Family, MacAddr};
use tracing::{info, warn};

use super::{entries::address_family, sysctl};

/// Our device names before `.<VNI>`: IPv4's, IPv6's.
pub const DEVICE_PREFIX: [&str; 2] = ["overlay", "overlay-v6"];
/// flanneld's device names before `.<VNI>`: IPv4's, IPv6's.
pub const FLANNEL_DEVICE_PREFIX: [&str; 2] = ["flannel", "flannel-v6"];
/// The alias a flanneld device carries once overlayd adopted it: `overlayd
/// cleanup` removes a flanneld device only when it is marked so (or when told to).
pub const ADOPTED_ALIAS: &str = "overlayd: adopted from flanneld";

/// A family's VXLAN device name: the flag's, else `overlay.<VNI>` or `overlay-v6.<VNI>`,
/// as flannel names its devices `flannel.<VNI>` and `flannel-v6.<VNI>`.
pub fn name(flag: Option<&str>, family: Family, vni: u32) -> String {
    match flag {
        Some(name) => name.to_string(),
        None => format!("{}.{vni}", DEVICE_PREFIX[family as usize]),
    }
}

/// flanneld's device name of `family` for `vni`.
pub fn flannel_name(family: Family, vni: u32) -> String {
    format!("{}.{vni}", FLANNEL_DEVICE_PREFIX[family as usize])
}

/// Who a default device name of `family` belongs to: `overlay.<digits>`
/// (`overlay-v6.<digits>`) is ours, `flannel.<digits>` (`flannel-v6.<digits>`) flanneld's.
pub fn default_name_owner(name: &str, family: Family) -> Option<Owner> {
    let matches = |prefix: &str| {
        name.strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix('.'))
            .is_some_and(|vni| !vni.is_empty() && vni.bytes().all(|b| b.is_ascii_digit()))
    };
    if matches(DEVICE_PREFIX[family as usize]) {
        Some(Owner::Overlayd)
    } else if matches(FLANNEL_DEVICE_PREFIX[family as usize]) {
        Some(Owner::Flanneld)
    } else {
        None
    }
}

/// Who made a device of a default name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// `overlay.<VNI>`.
    Overlayd,
    /// `flannel.<VNI>`: adopted by overlayd (its alias says so), or flanneld's still.
    Flanneld,
}

/// What a VXLAN device must look like: one per family, `overlay.1` over the
/// IPv4 underlay and `overlay-v6.1` over the IPv6 underlay, as flannel has
/// `flannel.1` and `flannel-v6.1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// The family it carries (and its underlay's family).
    pub family: Family,
    /// Device name, `overlay.1` (IPv4) or `overlay-v6.1` (IPv6) by default.
    pub name: String,
    /// VXLAN network identifier.
    pub vni: u32,
    /// UDP port.
    pub port: u16,
    /// Group-based policy extension.
    pub gbp: bool,
    /// Local VTEP address (the underlay address of this family).
    pub local: IpAddr,
    /// Underlay interface index.
    pub underlay_index: u32,
    /// Device MTU.
    pub mtu: u32,
    /// Stable VTEP MAC.
    pub mac: MacAddr,
    /// The own subnet's network address as a host route: `10.244.33.0/32`, `fd00:10:244:8::/128`.
    pub address: IpNet,
    /// TX checksum offload on (see `offload`).
    pub tx_checksum_offload: bool,
}

/// One step that takes the node's device to the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChange {
    /// There is no device: create it.
    Create,
    /// The device at this index has settings the kernel cannot change: delete it, then create it.
    Recreate(u32),
    /// Set the MTU.
    SetMtu,
    /// Set the MAC.
    SetMac,
    /// Set it up.
    SetUp,
    /// Add the spec's address.
    AddAddress(IpNet),
    /// Remove an address that is not the spec's.
    RemoveAddress(IpNet),
}

/// Whether an existing device's immutable settings match the spec.
fn compatible(link: &Link, spec: &DeviceSpec) -> bool {
    let Some(v) = &link.vxlan else { return false };
    v.vni == Some(spec.vni)
        && v.local == Some(spec.local)
        && v.port == Some(spec.port)
        && v.learning == Some(false)
        && v.gbp == spec.gbp
        && v.lower == Some(spec.underlay_index)
}

/// The changes that take `link` (with its `addresses` of the spec's family,
/// link-local ones left out: those are the kernel's) to `spec`. Pure.
pub fn diff(spec: &DeviceSpec, link: Option<&Link>, addresses: &[IpNet]) -> Vec<DeviceChange> {
    let link = match link {
        None => return vec![DeviceChange::Create],
        Some(link) if !compatible(link, spec) => return vec![DeviceChange::Recreate(link.index)],
        Some(link) => link,
    };
    let mut changes = Vec::new();
    if link.mtu != spec.mtu {
        changes.push(DeviceChange::SetMtu);
    }
    if link.mac != Some(spec.mac) {
        changes.push(DeviceChange::SetMac);
    }
    for address in addresses.iter().filter(|a| **a != spec.address) {
        changes.push(DeviceChange::RemoveAddress(*address));
    }
    if !addresses.contains(&spec.address) {
        changes.push(DeviceChange::AddAddress(spec.address));
    }
    // Up last: the device carries traffic only once it is right.
    if !link.up {
        changes.push(DeviceChange::SetUp);
    }
    changes
}

/// The device as the node holds it after a reconcile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Device {
    /// Its index.
    pub index: u32,
    /// Whether this reconcile (re)created it: every peer entry must then be programmed again.
    pub created: bool,
    /// How many changes were made.
    pub changes: usize,
}

/// Why the device could not be made right.
#[derive(Debug, thiserror::Error)]
#[error("VXLAN device {device}: {source}")]
pub struct DeviceError {
    device: String,
    #[source]
    source: overlay_netlink::Error,
}

/// Reads the device, diffs it with `spec` and applies the changes. A created
/// device is read and diffed once more, for its address and up state.
pub async fn reconcile(nl: &Netlink, spec: &DeviceSpec) -> Result<Device, DeviceError> {
    let fail = |source| DeviceError { device: spec.name.clone(), source };
    let mut created = false;
    let mut changes = 0;
    for _pass in 0..2 {
        let link = nl.link(&spec.name).await.map_err(fail)?;
        let addresses = match &link {
            Some(link) => {
                managed(spec.family, nl.addresses(link.index, address_family(spec.family)).await.map_err(fail)?)
            }
            None => Vec::new(),
        };
        let todo = diff(spec, link.as_ref(), &addresses);
        if todo.is_empty() {
            let index = link.map(|l| l.index).unwrap_or_default();
            changes += settings(spec).await?;
            return Ok(Device { index, created, changes });
        }
        for change in &todo {
            apply(nl, spec, link.as_ref(), *change).await.map_err(fail)?;
            created |= matches!(change, DeviceChange::Create | DeviceChange::Recreate(_));
        }
        changes += todo.len();
    }
    // Two passes always suffice (create, then settle); a third means someone fights us.
    let link = nl.link(&spec.name).await.map_err(fail)?;
    match link {
        Some(link) => {
            changes += settings(spec).await?;
            Ok(Device { index: link.index, created, changes })
        }
        None => Err(fail(overlay_netlink::Error::Protocol {
            what: "creating the device".into(),
            detail: "it vanished right after it was made".into(),
        })),
    }
}

/// The device's settings outside rtnetlink, once it exists: TX checksum
/// offload, and for IPv6 no router advertisements. How many had to change.
/// An ioctl and a /proc write: on a blocking thread, not the runtime's.
async fn settings(spec: &DeviceSpec) -> Result<usize, DeviceError> {
    let (name, family, offload) = (spec.name.clone(), spec.family, spec.tx_checksum_offload);
    let fail = |what: &str, e: std::io::Error| DeviceError {
        device: spec.name.clone(),
        source: overlay_netlink::Error::Protocol { what: what.into(), detail: e.to_string() },
    };
    let (offload, ra) = tokio::task::spawn_blocking(move || {
        let offload = super::offload::ensure_tx_checksum(&name, offload);
        // Router advertisements have no business on a VXLAN device (flannel turns them off too).
        let ra = (family == Family::V6).then(|| sysctl::ensure_accept_ra_off(&name));
        (offload, ra)
    })
    .await
    .map_err(|e| fail("setting the device up", std::io::Error::other(e)))?;
    let mut changes = usize::from(offload.map_err(|e| fail("setting TX checksum offload (ethtool)", e))?);
    if let Some(ra) = ra {
        changes += usize::from(ra.map_err(|e| fail("turning accept_ra off", e))?);
    }
    Ok(changes)
}

async fn apply(
    nl: &Netlink,
    spec: &DeviceSpec,
    link: Option<&Link>,
    change: DeviceChange,
) -> Result<(), overlay_netlink::Error> {
    let index = link.map(|l| l.index).unwrap_or_default();
    match change {
        DeviceChange::Create => create(nl, spec).await,
        DeviceChange::Recreate(old) => {
            warn!(device = %spec.name, kind = ?link.and_then(|l| l.kind.clone()), "device exists with other settings (VNI, port, local address or kind); recreating it");
            nl.delete_link(old).await?;
            create(nl, spec).await
        }
        DeviceChange::SetMtu => nl.set_mtu(index, spec.mtu).await,
        DeviceChange::SetMac => nl.set_mac(index, spec.mac).await,
        DeviceChange::SetUp => nl.set_up(index).await,
        DeviceChange::AddAddress(a) => nl.add_address(index, a).await,
        DeviceChange::RemoveAddress(a) => nl.delete_address(index, a).await,
    }
}

async fn create(nl: &Netlink, spec: &DeviceSpec) -> Result<(), overlay_netlink::Error> {
    nl.create_vxlan(&VxlanDevice {
        name: spec.name.clone(),
        vni: spec.vni,
        port: spec.port,
        gbp: spec.gbp,
        local: spec.local,
        lower: spec.underlay_index,
        mtu: spec.mtu,
        mac: spec.mac,
    })
    .await?;
    info!(device = %spec.name, vni = spec.vni, port = spec.port, local = %spec.local, mtu = spec.mtu, mac = %spec.mac, "created VXLAN device");
    Ok(())
}

/// The addresses of `family` that are ours to manage: not the kernel's link-local ones.
fn managed(family: Family, addresses: Vec<IpNet>) -> Vec<IpNet> {
    addresses.into_iter().filter(|a| Family::of_net(a) == family && !proto::family::is_link_local(a.addr())).collect()
}

/// Removes the device named `name`, if present (for `overlayd cleanup`).
pub async fn remove(nl: &Netlink, name: &str) -> Result<bool, DeviceError> {
    let fail = |source| DeviceError { device: name.to_string(), source };
    let Some(link) = nl.link(name).await.map_err(fail)? else {
        return Ok(false);
    };
    nl.delete_link(link.index).await.map_err(fail)?;
    Ok(true)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use overlay_netlink::VxlanSettings;

    /// A device spec for tests: `overlay.1` on 192.168.50.11 (lower device 2), subnet 10.244.33.0/24.
    pub(crate) fn spec() -> DeviceSpec {
        DeviceSpec {
            family: Family::V4,
            name: "overlay.1".into(),
            vni: 1,
            port: 8472,
            gbp: false,
            local: "192.168.50.11".parse().unwrap(),
            underlay_index: 2,
            mtu: 1450,
            mac: "b2:5e:e8:32:3a:be".parse().unwrap(),
            address: "10.244.33.0/32".parse().unwrap(),
            tx_checksum_offload: true,
        }
    }

    fn matching(spec: &DeviceSpec) -> Link {
        Link {
            index: 7,
            name: spec.name.clone(),
            mac: Some(spec.mac),
            mtu: spec.mtu,
            up: true,
            loopback: false,
            alias: None,
            kind: Some("vxlan".into()),
            controller: None,
            vxlan: Some(VxlanSettings {
                vni: Some(spec.vni),
                local: Some(spec.local),
                port: Some(spec.port),
                learning: Some(false),
                gbp: false,
                lower: Some(spec.underlay_index),
            }),
        }
    }

    #[test]
    fn a_matching_device_needs_nothing() {
        let s = spec();
        assert_eq!(diff(&s, Some(&matching(&s)), &[s.address]), []);
    }

    #[test]
    fn a_missing_device_is_created_and_an_incompatible_one_recreated() {
        let s = spec();
        assert_eq!(diff(&s, None, &[]), [DeviceChange::Create]);
        let mut other_vni = matching(&s);
        other_vni.vxlan.as_mut().unwrap().vni = Some(2);
        assert_eq!(diff(&s, Some(&other_vni), &[s.address]), [DeviceChange::Recreate(7)]);
        let mut a_bridge = matching(&s);
        a_bridge.vxlan = None;
        assert_eq!(diff(&s, Some(&a_bridge), &[]), [DeviceChange::Recreate(7)]);
    }

    #[test]
    fn drift_is_repaired_in_place_and_up_comes_last() {
        let s = spec();
        let mut drifted = matching(&s);
        drifted.mtu = 1500;
        drifted.mac = Some("02:00:00:00:00:01".parse().unwrap());
        drifted.up = false;
        let stale: IpNet = "10.244.9.0/32".parse().unwrap();
        assert_eq!(
            diff(&s, Some(&drifted), &[stale]),
            [
                DeviceChange::SetMtu,
                DeviceChange::SetMac,
                DeviceChange::RemoveAddress(stale),
                DeviceChange::AddAddress(s.address),
                DeviceChange::SetUp
            ]
        );
    }

    #[test]
    fn the_kernel_s_link_local_addresses_are_left_alone() {
        let found: Vec<IpNet> = ["fe80::fce4:caff:fe57:1c83/64", "fd00:10:244:8::/128", "10.0.0.1/32"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(managed(Family::V6, found), ["fd00:10:244:8::/128".parse::<IpNet>().unwrap()]);
    }
}
