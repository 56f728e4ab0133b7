//! What the node must hold, planned purely from what the daemon knows: the
//! network config, the underlay, our lease and VTEPs, the flags, and the
//! peers. Nothing here reads the kernel or the applier: a watch event's
//! plan names the peers it changed, and the reconcile, which knows what it
//! applied, turns them into a delta (or asks for a whole plan when it cannot).
//!
//! Adding a node resource: plan it in [`FamilyPlan`] (or [`NodePlan`]) here,
//! apply it in `reconcile`, and list it in `node_state::Resource::ALL`.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use proto::{Address, Family, LeaseKey, MacAddr, NetConfig, SubnetEnv};

use crate::dataplane::masq::Masquerade;
use crate::dataplane::{DeviceSpec, Underlay};
use crate::lease::OwnLease;
use crate::peers::{PeerLease, PeerView, Pending};
use crate::plan::{self, Local, PeerChange, Planned};

/// What the node must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePlan {
    /// IPv4's part; a family that is off is planned too: as nothing (no
    /// device, no entries, no table).
    pub v4: FamilyPlan<Ipv4Addr>,
    /// IPv6's part.
    pub v6: FamilyPlan<Ipv6Addr>,
    /// The subnet file's content.
    pub subnet_env: SubnetEnv,
}

/// What one family needs on the node. The same resources, planned and
/// reconciled by the same (generic) code, in both families.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyPlan<A: Address> {
    /// The VXLAN device's name (`overlay.1`, `overlay-v6.1`).
    pub device_name: String,
    /// The device; none: the family is off, and no device of that name may exist.
    pub device: Option<DeviceSpec>,
    /// Every peer's neighbour, FDB entry and route (none when off).
    pub entries: EntriesPlan<A>,
    /// The masquerade table; none: no table.
    pub masquerade: Option<Masquerade>,
    /// The underlay interface, when the family is on: forwarding must be on then.
    pub forwarding: Option<String>,
}

impl<A: Address> FamilyPlan<A> {
    /// A family that is off: nothing of it may remain on the node.
    pub fn off(device_name: String) -> Self {
        FamilyPlan {
            device_name,
            device: None,
            entries: EntriesPlan::Whole(Planned::nothing()),
            masquerade: None,
            forwarding: None,
        }
    }
}

/// A family's peer entries, as planned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntriesPlan<A: Address> {
    /// Every peer's entries: for every trigger but a watch event.
    Whole(Planned<A>),
    /// The peers a watch event changed, each as it was and as it is: the
    /// reconcile applies them to what it last applied, at a cost in
    /// proportion to them, not to every peer.
    Changes(Local<A>, Vec<PeerChange<A>>),
}

/// What the node knows of itself, everything but the peers a plan is made from.
#[derive(Debug, Clone, Copy)]
pub struct NodeFacts<'a> {
    /// The network config.
    pub config: &'a NetConfig,
    /// The underlay as last found.
    pub underlay: &'a Underlay,
    /// Our lease.
    pub own: &'a OwnLease,
    /// The VTEP MAC of each family's device (IPv4, IPv6).
    pub vtep_macs: [MacAddr; 2],
    /// The VXLAN device name of each family (IPv4, IPv6).
    pub device_names: &'a [String; 2],
    /// `--ip-masq`.
    pub ip_masq: bool,
    /// TX checksum offload of the devices.
    pub tx_checksum_offload: bool,
}

/// The whole node's plan. With `changes` (a watch event's: the peers that
/// changed since the last plan), the entries are planned as those changes;
/// without, whole.
pub fn plan(facts: &NodeFacts, peers: &PeerView, changes: Option<&Pending>) -> NodePlan {
    let changed = match changes {
        Some(Pending::Peers(changed)) => Some(changed),
        _ => None,
    };
    let subnet_env = Family::ALL
        .iter()
        .filter_map(|f| Some((facts.config.pool(*f)?.network, facts.own.key.subnet(*f)?)))
        .fold(SubnetEnv::new(facts.config.pod_mtu(facts.underlay.mtu), facts.ip_masq), |env, (network, subnet)| {
            env.with(network, subnet)
        });
    NodePlan {
        v4: family_plan::<Ipv4Addr>(facts, peers, changed),
        v6: family_plan::<Ipv6Addr>(facts, peers, changed),
        subnet_env,
    }
}

/// What the family of `A` needs: the same plan for both families.
fn family_plan<A: Address>(
    facts: &NodeFacts,
    peers: &PeerView,
    changed: Option<&BTreeMap<LeaseKey, Option<PeerLease>>>,
) -> FamilyPlan<A> {
    let family = A::FAMILY;
    let name = facts.device_names[family as usize].clone();
    let (Some(pool), Some(subnet), Some(underlay)) =
        (facts.config.pool(family), facts.own.key.subnet(family), facts.underlay.addr(family))
    else {
        return FamilyPlan::off(name);
    };
    let (Some(own), Some(underlay_net)) = (A::net_from(subnet), A::net_from(underlay)) else {
        return FamilyPlan::off(name);
    };
    let local = Local { subnet: own, underlay: underlay_net, direct_routing: facts.config.backend.direct_routing };
    let entries = match changed {
        Some(changed) => EntriesPlan::Changes(local, peers.changes::<A>(changed).collect()),
        None => EntriesPlan::Whole(plan::plan(&local, peers.peers::<A>())),
    };
    FamilyPlan {
        device: Some(DeviceSpec {
            family,
            name: name.clone(),
            vni: facts.config.backend.vni,
            port: facts.config.backend.port,
            gbp: facts.config.backend.gbp,
            local: underlay.addr(),
            underlay_index: facts.underlay.index,
            mtu: facts.config.vxlan_mtu(family, facts.underlay.mtu),
            mac: facts.vtep_macs[family as usize],
            tx_checksum_offload: facts.tx_checksum_offload,
            address: device_address(subnet),
        }),
        device_name: name,
        entries,
        masquerade: facts.ip_masq.then_some(Masquerade { network: pool.network, subnet }),
        forwarding: Some(facts.underlay.name.clone()),
    }
}

/// The subnet's network address as a host address (`10.244.33.0/32`,
/// `fd00:10:244:8::/128`): the VXLAN device's address, as flannel gives it.
pub fn device_address(subnet: IpNet) -> IpNet {
    Family::host(subnet.network())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{LeaseAttrs, VxlanBackendData};

    use crate::lease::{Created, WatchEvent};

    fn config() -> NetConfig {
        NetConfig::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap()
    }

    fn attrs(ip: &str, mac: &str) -> LeaseAttrs {
        LeaseAttrs::vxlan(ip.parse().unwrap(), VxlanBackendData { vni: 1, vtep_mac: mac.parse().unwrap() })
    }

    #[test]
    fn the_device_address_is_the_subnet_s_zero() {
        assert_eq!(device_address("10.244.33.0/24".parse().unwrap()), "10.244.33.0/32".parse().unwrap());
        assert_eq!(device_address("fd00:10:244:8::/64".parse().unwrap()), "fd00:10:244:8::/128".parse().unwrap());
    }

    #[test]
    fn a_watch_event_is_planned_as_its_changes_and_anything_else_whole() {
        let config = config();
        let own = OwnLease {
            key: LeaseKey::v4("10.244.33.0/24".parse().unwrap()),
            attrs: attrs("192.168.50.11", "02:00:00:00:00:11"),
        };
        let underlay = Underlay {
            index: 2,
            name: "eth0".into(),
            v4: Some("192.168.50.11/24".parse().unwrap()),
            v6: None,
            mtu: 1500,
        };
        let names = ["overlay.1".to_string(), "overlay-v6.1".to_string()];
        let facts = NodeFacts {
            config: &config,
            underlay: &underlay,
            own: &own,
            vtep_macs: [MacAddr([2, 0, 0, 0, 0, 0x11]), MacAddr([2, 0, 0, 0, 0, 0x12])],
            device_names: &names,
            ip_masq: true,
            tx_checksum_offload: true,
        };
        let mut peers = PeerView::new(&config, &own);
        let peer = LeaseKey::v4("10.244.7.0/24".parse().unwrap());
        peers.apply(
            &own,
            [
                WatchEvent::Init,
                WatchEvent::InitApply(peer, (attrs("192.168.50.12", "02:00:00:00:00:12"), Created(1))),
                WatchEvent::InitDone,
            ],
        );
        let changes = peers.take_changes();
        let whole = plan(&facts, &peers, Some(&changes));
        let EntriesPlan::Whole(planned) = &whole.v4.entries else { panic!("a listing plans whole") };
        assert_eq!(planned.state.routes.len(), 1);
        assert_eq!(whole.v4.device.as_ref().map(|d| d.mtu), Some(1450));
        assert_eq!(whole.v4.masquerade.map(|m| m.subnet.to_string()), Some("10.244.33.0/24".into()));
        assert_eq!(whole.v6, FamilyPlan::off("overlay-v6.1".into()), "IPv6 is off");
        assert_eq!(whole.subnet_env.mtu, 1450);
        peers.apply(&own, [WatchEvent::Apply(peer, (attrs("192.168.50.14", "02:00:00:00:00:12"), Created(1)))]);
        let changes = peers.take_changes();
        let event = plan(&facts, &peers, Some(&changes));
        let EntriesPlan::Changes(_, changes) = &event.v4.entries else { panic!("a watch event plans its changes") };
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].after.map(|p| p.public_ip.to_string()), Some("192.168.50.14".into()));
        let EntriesPlan::Whole(_) = plan(&facts, &peers, None).v4.entries else { panic!("no changes: whole") };
    }
}
