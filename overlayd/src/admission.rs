//! Which peer leases may reach the kernel. A lease is data that anyone with
//! write access to the store can write, and the kernel does what it is told:
//! a lease named after the underlay's subnet replaces its connected route, a
//! stolen VtepMAC moves another node's FDB entry. So every lease is checked
//! against the cluster's rules before it becomes a peer, and when two leases
//! claim one thing (a subnet, a VtepMAC, a PublicIP), the older one keeps it.
//!
//! Pure: the rules come from the net-conf and our own lease, the leases from
//! the watch; the peer view asks here which of them are peers.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use proto::{Family, LeaseAttrs, LeaseKey, MacAddr, NetConfig, VxlanBackendData};

use crate::lease::{Created, OwnLease};

/// A peer lease as the store holds it: what it says per family, parsed, and
/// how old it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// When it was first written: the older of two claims wins.
    pub created: Created,
    /// Its VTEP per family (IPv4, IPv6), or why its value does not parse.
    vteps: Result<[Option<(IpAddr, VxlanBackendData)>; 2], String>,
}

impl Lease {
    /// The lease at `key` that says `attrs`.
    pub fn new(key: &LeaseKey, attrs: &LeaseAttrs, created: Created) -> Self {
        let mut vteps = [None, None];
        let mut parsed = Ok(());
        for family in Family::ALL {
            if key.subnet(family).is_none() {
                continue;
            }
            match attrs.vxlan_peer(family) {
                Ok(vtep) => vteps[family as usize] = vtep,
                Err(e) => parsed = Err(format!("{family} backend data: {e}")),
            }
        }
        Lease { created, vteps: parsed.map(|()| vteps) }
    }
}

/// A peer node's VTEP in each family its lease carries (the subnets are the
/// lease key's): as compact as each family's addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PeerLease {
    v4: Option<(Ipv4Addr, MacAddr)>,
    v6: Option<(Ipv6Addr, MacAddr)>,
}

impl PeerLease {
    /// Its VTEP in `family`: underlay address and MAC.
    pub fn vtep(&self, family: Family) -> Option<(IpAddr, MacAddr)> {
        match family {
            Family::V4 => self.v4.map(|(ip, mac)| (ip.into(), mac)),
            Family::V6 => self.v6.map(|(ip, mac)| (ip.into(), mac)),
        }
    }

    fn set(&mut self, ip: IpAddr, mac: MacAddr) {
        match ip {
            IpAddr::V4(ip) => self.v4 = Some((ip, mac)),
            IpAddr::V6(ip) => self.v6 = Some((ip, mac)),
        }
    }
}

/// Why a lease is not a peer. Each is said once per lease, with its key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("its value does not parse: {0}")]
    Malformed(String),
    #[error("it names no VTEP of a family this network runs (PublicIP 0.0.0.0, or no BackendData)")]
    NoVtep,
    #[error("its {family} subnet {subnet} is outside the cluster network {network}")]
    OutsideNetwork { family: Family, subnet: IpNet, network: IpNet },
    #[error("its {family} subnet {subnet} is not a /{len}, as every node's is")]
    SubnetLen { family: Family, subnet: IpNet, len: u8 },
    #[error("its {family} subnet {subnet} overlaps this node's own subnet {own}")]
    OverlapsOwn { family: Family, subnet: IpNet, own: IpNet },
    #[error("its {family} subnet {subnet} is held by the older lease {by}")]
    SubnetTaken { family: Family, subnet: IpNet, by: LeaseKey },
    #[error("its {family} VNI {vni} is not this network's ({ours})")]
    Vni { family: Family, vni: u32, ours: u32 },
    #[error("its {family} VtepMAC {mac} is not a unicast MAC")]
    NotUnicastMac { family: Family, mac: MacAddr },
    #[error("its {family} VtepMAC {mac} is this node's own")]
    OwnMac { family: Family, mac: MacAddr },
    #[error("its {family} VtepMAC {mac} is claimed by the older lease {by}, at {ip}")]
    MacTaken { family: Family, mac: MacAddr, by: LeaseKey, ip: IpAddr },
    #[error("its PublicIP {ip} is claimed by the older lease {by}, with VtepMAC {mac}")]
    IpTaken { ip: IpAddr, by: LeaseKey, mac: MacAddr },
    #[error("its PublicIP {ip} is not a unicast address")]
    NotUnicastIp { ip: IpAddr },
    #[error("its PublicIP {ip} is inside the cluster network {network}")]
    IpInCluster { ip: IpAddr, network: IpNet },
    #[error("its PublicIP {ip} is this node's own")]
    OwnIp { ip: IpAddr },
}

/// What became of a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A peer; `missing` names a family its key has a subnet in but that it
    /// names no VTEP for (that family reaches it not at all).
    Admitted { lease: PeerLease, missing: Option<Family> },
    /// Not a peer.
    Skipped(Refusal),
}

impl Outcome {
    /// The peer, when admitted.
    pub fn admitted(&self) -> Option<&PeerLease> {
        match self {
            Outcome::Admitted { lease, .. } => Some(lease),
            Outcome::Skipped(_) => None,
        }
    }
}

/// The rules of one family: its cluster network, and our own place in it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FamilyRules {
    network: IpNet,
    own_subnet: IpNet,
    own_vtep: Option<(IpAddr, MacAddr)>,
}

/// What a lease must satisfy to be a peer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rules {
    vni: u32,
    /// Per family (IPv4, IPv6), when the network runs it and we hold a subnet in it.
    families: [Option<FamilyRules>; 2],
    /// Every cluster network: no VTEP lives inside one.
    networks: Vec<IpNet>,
}

impl Rules {
    /// The rules of `config` for a node holding `own`.
    pub fn new(config: &NetConfig, own: &OwnLease) -> Self {
        let mut families = [None, None];
        for family in Family::ALL {
            let (Some(pool), Some(own_subnet)) = (config.pool(family), own.key.subnet(family)) else { continue };
            let own_vtep = own.attrs.vxlan_peer(family).ok().flatten().map(|(ip, data)| (ip, data.vtep_mac));
            families[family as usize] = Some(FamilyRules { network: pool.network, own_subnet, own_vtep });
        }
        let networks = Family::ALL.iter().filter_map(|f| config.pool(*f)).map(|p| p.network).collect();
        Rules { vni: config.backend.vni, families, networks }
    }

    /// The lease at `key` as a peer, by itself; whether another lease claims
    /// the same is for [`admit`] to decide.
    pub fn check(&self, key: &LeaseKey, lease: &Lease) -> Outcome {
        match self.checked(key, lease) {
            Ok((lease, missing)) => Outcome::Admitted { lease, missing },
            Err(refusal) => Outcome::Skipped(refusal),
        }
    }

    fn checked(&self, key: &LeaseKey, lease: &Lease) -> Result<(PeerLease, Option<Family>), Refusal> {
        let vteps = lease.vteps.as_ref().map_err(|e| Refusal::Malformed(e.clone()))?;
        let mut peer = PeerLease::default();
        let mut missing = None;
        for family in Family::ALL {
            let (Some(rules), Some(subnet)) = (&self.families[family as usize], key.subnet(family)) else { continue };
            self.check_subnet(family, rules, subnet)?;
            match vteps[family as usize] {
                Some((ip, data)) => {
                    self.check_vtep(family, rules, ip, &data)?;
                    peer.set(ip, data.vtep_mac);
                }
                None => missing = Some(family),
            }
        }
        if peer == PeerLease::default() {
            return Err(Refusal::NoVtep);
        }
        Ok((peer, missing))
    }

    fn check_subnet(&self, family: Family, rules: &FamilyRules, subnet: IpNet) -> Result<(), Refusal> {
        let network = rules.network;
        if !network.contains(&subnet) {
            return Err(Refusal::OutsideNetwork { family, subnet, network });
        }
        // Every node's subnet has one length (SubnetLen; node IPAM's mask size),
        // so a lease's either is another node's or overlaps none.
        let own = rules.own_subnet;
        if subnet.contains(&own) || own.contains(&subnet) {
            return Err(Refusal::OverlapsOwn { family, subnet, own });
        }
        if subnet.prefix_len() != own.prefix_len() {
            return Err(Refusal::SubnetLen { family, subnet, len: own.prefix_len() });
        }
        Ok(())
    }

    fn check_vtep(
        &self,
        family: Family,
        rules: &FamilyRules,
        ip: IpAddr,
        data: &VxlanBackendData,
    ) -> Result<(), Refusal> {
        if data.vni != self.vni {
            return Err(Refusal::Vni { family, vni: data.vni, ours: self.vni });
        }
        let mac = data.vtep_mac;
        if mac.0[0] & 1 != 0 || mac.0 == [0; 6] {
            return Err(Refusal::NotUnicastMac { family, mac });
        }
        if !is_unicast(ip) {
            return Err(Refusal::NotUnicastIp { ip });
        }
        if let Some(network) = self.networks.iter().find(|n| n.contains(&ip)) {
            return Err(Refusal::IpInCluster { ip, network: *network });
        }
        match rules.own_vtep {
            Some((own_ip, _)) if own_ip == ip => Err(Refusal::OwnIp { ip }),
            Some((_, own_mac)) if own_mac == mac => Err(Refusal::OwnMac { family, mac }),
            _ => Ok(()),
        }
    }
}

/// Whether `ip` can be a VXLAN destination: one host, reachable by address alone.
fn is_unicast(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => {
            !(ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip.is_broadcast() || ip.octets()[0] == 0)
        }
        // A link-local destination needs a scope an FDB entry cannot carry.
        IpAddr::V6(ip) => {
            !(ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || proto::family::is_link_local(ip.into()))
        }
    }
}

/// One thing a peer lease claims. A subnet is one node's; a VtepMAC leads to
/// one address and an address to one VtepMAC (a node whose two leases say
/// the same VTEP claims nothing from itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Claim {
    Subnet(IpNet),
    Mac(Family, MacAddr),
    Ip(IpAddr),
}

/// The claims of a peer at `key`.
pub fn claims(key: LeaseKey, peer: PeerLease) -> impl Iterator<Item = Claim> {
    Family::ALL.into_iter().flat_map(move |family| {
        let subnet = key.subnet(family).map(Claim::Subnet);
        let vtep = peer.vtep(family);
        subnet.into_iter().chain(vtep.into_iter().flat_map(move |(ip, mac)| [Claim::Mac(family, mac), Claim::Ip(ip)]))
    })
}

/// Every lease's outcome: each is checked by itself, then admitted oldest
/// first (the key orders leases of one age), so a claim stays with the lease
/// that made it first however the leases arrived.
pub fn admit<'a>(
    rules: &Rules,
    leases: impl IntoIterator<Item = (&'a LeaseKey, &'a Lease)>,
) -> BTreeMap<LeaseKey, Outcome> {
    let mut checked: Vec<(Created, LeaseKey, Outcome)> =
        leases.into_iter().map(|(key, lease)| (lease.created, *key, rules.check(key, lease))).collect();
    checked.sort_by_key(|(created, key, _)| (*created, *key));
    // What each claim was taken with: the subnet by itself, a MAC with its address, an address with its MAC.
    let mut held: HashMap<Claim, (LeaseKey, Option<IpAddr>, Option<MacAddr>)> = HashMap::new();
    let mut outcomes = BTreeMap::new();
    for (_, key, outcome) in checked {
        let outcome = match outcome {
            Outcome::Admitted { lease, missing } => match contest(&held, &key, &lease) {
                Some(refusal) => Outcome::Skipped(refusal),
                None => {
                    for family in Family::ALL {
                        if let Some(subnet) = key.subnet(family) {
                            held.insert(Claim::Subnet(subnet), (key, None, None));
                        }
                        if let Some((ip, mac)) = lease.vtep(family) {
                            held.insert(Claim::Mac(family, mac), (key, Some(ip), None));
                            held.insert(Claim::Ip(ip), (key, None, Some(mac)));
                        }
                    }
                    Outcome::Admitted { lease, missing }
                }
            },
            skipped => skipped,
        };
        outcomes.insert(key, outcome);
    }
    outcomes
}

/// Why `lease` cannot have what it claims, given what older leases `held`.
fn contest(
    held: &HashMap<Claim, (LeaseKey, Option<IpAddr>, Option<MacAddr>)>,
    key: &LeaseKey,
    lease: &PeerLease,
) -> Option<Refusal> {
    for family in Family::ALL {
        if let Some(subnet) = key.subnet(family) {
            if let Some((by, ..)) = held.get(&Claim::Subnet(subnet)) {
                return Some(Refusal::SubnetTaken { family, subnet, by: *by });
            }
        }
        let Some((ip, mac)) = lease.vtep(family) else { continue };
        if let Some((by, Some(held_ip), _)) = held.get(&Claim::Mac(family, mac)) {
            if *held_ip != ip {
                return Some(Refusal::MacTaken { family, mac, by: *by, ip: *held_ip });
            }
        }
        if let Some((by, _, Some(held_mac))) = held.get(&Claim::Ip(ip)) {
            if *held_mac != mac {
                return Some(Refusal::IpTaken { ip, by: *by, mac: *held_mac });
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> NetConfig {
        NetConfig::parse(text).unwrap()
    }

    fn v4() -> NetConfig {
        config(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#)
    }

    fn attrs(ip: &str, mac: &str, vni: u32) -> LeaseAttrs {
        LeaseAttrs::vxlan(ip.parse().unwrap(), VxlanBackendData { vni, vtep_mac: mac.parse().unwrap() })
    }

    fn own() -> OwnLease {
        OwnLease { key: "10.244.1.0-24".parse().unwrap(), attrs: attrs("192.168.50.1", "02:00:00:00:00:01", 1) }
    }

    fn lease(key: &str, ip: &str, mac: &str, created: i64) -> (LeaseKey, Lease) {
        let key: LeaseKey = key.parse().unwrap();
        let lease = Lease::new(&key, &attrs(ip, mac, 1), Created(created));
        (key, lease)
    }

    fn refusal(rules: &Rules, (key, lease): &(LeaseKey, Lease)) -> Option<String> {
        match rules.check(key, lease) {
            Outcome::Skipped(r) => Some(r.to_string()),
            Outcome::Admitted { .. } => None,
        }
    }

    #[test]
    fn a_lease_is_a_peer_only_inside_the_network_at_the_nodes_length_and_not_over_ours() {
        let rules = Rules::new(&v4(), &own());
        let ok = lease("10.244.2.0-24", "192.168.50.2", "02:00:00:00:00:02", 1);
        assert_eq!(refusal(&rules, &ok), None);
        let cases = [
            ("192.168.50.0-24", "outside the cluster network 10.244.0.0/16"),
            ("10.245.2.0-24", "outside the cluster network"),
            ("10.244.1.128-25", "overlaps this node's own subnet 10.244.1.0/24"),
            ("10.244.0.0-23", "overlaps this node's own subnet"),
            ("10.244.1.0-24", "overlaps this node's own subnet"),
            ("10.244.4.0-23", "is not a /24"),
            ("10.244.2.0-25", "is not a /24"),
        ];
        for (key, expected) in cases {
            let why = refusal(&rules, &lease(key, "192.168.50.2", "02:00:00:00:00:02", 1));
            assert!(why.as_deref().is_some_and(|w| w.contains(expected)), "{key}: {why:?}");
        }
    }

    #[test]
    fn a_vtep_is_a_unicast_address_outside_the_cluster_and_not_ours_with_our_vni_and_a_unicast_mac() {
        let dual = config(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#,
        );
        let rules = Rules::new(&dual, &own());
        let cases = [
            ("127.0.0.1", "02:00:00:00:00:02", "PublicIP 127.0.0.1 is not a unicast"),
            ("224.0.0.1", "02:00:00:00:00:02", "not a unicast address"),
            ("255.255.255.255", "02:00:00:00:00:02", "not a unicast address"),
            ("192.168.50.1", "02:00:00:00:00:02", "PublicIP 192.168.50.1 is this node's own"),
            ("10.244.7.3", "02:00:00:00:00:02", "inside the cluster network 10.244.0.0/16"),
            ("192.168.50.2", "00:00:00:00:00:00", "not a unicast MAC"),
            ("192.168.50.2", "ff:ff:ff:ff:ff:ff", "not a unicast MAC"),
            ("192.168.50.2", "01:00:5e:00:00:01", "not a unicast MAC"),
            ("192.168.50.2", "02:00:00:00:00:01", "VtepMAC 02:00:00:00:00:01 is this node's own"),
        ];
        for (ip, mac, expected) in cases {
            let why = refusal(&rules, &lease("10.244.2.0-24", ip, mac, 1));
            assert!(why.as_deref().is_some_and(|w| w.contains(expected)), "{ip} {mac}: {why:?}");
        }
        let key: LeaseKey = "10.244.2.0-24".parse().unwrap();
        let other_vni = Lease::new(&key, &attrs("192.168.50.2", "02:00:00:00:00:02", 7), Created(1));
        assert_eq!(refusal(&rules, &(key, other_vni)).as_deref(), Some("its IPv4 VNI 7 is not this network's (1)"));
        let mut nothing = attrs("0.0.0.0", "02:00:00:00:00:02", 1);
        assert!(refusal(&rules, &(key, Lease::new(&key, &nothing, Created(1)))).unwrap().contains("no VTEP"));
        nothing.backend_data = proto::BackendData::Null;
        nothing.public_ip = "192.168.50.2".parse().unwrap();
        assert!(refusal(&rules, &(key, Lease::new(&key, &nothing, Created(1)))).unwrap().contains("no VTEP"));
    }

    #[test]
    fn a_contested_claim_stays_with_the_older_lease_whatever_the_order() {
        let rules = Rules::new(&v4(), &own());
        let real = lease("10.244.2.0-24", "192.168.50.2", "02:00:00:00:00:02", 10);
        let mac_thief = lease("10.244.3.0-24", "192.168.50.66", "02:00:00:00:00:02", 20);
        let ip_thief = lease("10.244.0.0-24", "192.168.50.2", "02:00:00:00:00:66", 30);
        let same_node = lease("10.244.9.0-24", "192.168.50.2", "02:00:00:00:00:02", 40);
        let leases = [mac_thief.clone(), ip_thief.clone(), real.clone(), same_node.clone()];
        let outcomes = admit(&rules, leases.iter().map(|(k, l)| (k, l)));
        assert!(outcomes[&real.0].admitted().is_some());
        assert!(outcomes[&same_node.0].admitted().is_some(), "one node's two leases, one VTEP: nothing contested");
        let why = |k: &LeaseKey| match &outcomes[k] {
            Outcome::Skipped(r) => r.to_string(),
            o => panic!("{k} admitted: {o:?}"),
        };
        assert_eq!(
            why(&mac_thief.0),
            "its IPv4 VtepMAC 02:00:00:00:00:02 is claimed by the older lease 10.244.2.0-24, at 192.168.50.2"
        );
        assert!(why(&ip_thief.0).contains("PublicIP 192.168.50.2 is claimed by the older lease 10.244.2.0-24"));
        // The thief older than the real node keeps what it claimed: age decides, not the key.
        let old_thief = lease("10.244.3.0-24", "192.168.50.66", "02:00:00:00:00:02", 5);
        let outcomes = admit(&rules, [&real, &old_thief].map(|(k, l)| (k, l)));
        assert!(outcomes[&old_thief.0].admitted().is_some() && outcomes[&real.0].admitted().is_none());
    }

    #[test]
    fn a_dual_stack_subnet_held_in_one_family_is_contested() {
        let dual = config(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#,
        );
        let own = OwnLease { key: "10.244.1.0-24&fd00:10:244:1::-64".parse().unwrap(), attrs: own().attrs };
        let rules = Rules::new(&dual, &own);
        let a = lease("10.244.2.0-24", "192.168.50.2", "02:00:00:00:00:02", 1);
        let b = lease("10.244.2.0-24&fd00:10:244:2::-64", "192.168.50.3", "02:00:00:00:00:03", 2);
        let outcomes = admit(&rules, [&a, &b].map(|(k, l)| (k, l)));
        assert!(matches!(&outcomes[&b.0], Outcome::Skipped(Refusal::SubnetTaken { .. })));
        // b names no IPv6 VTEP: a peer in IPv4 only, and said.
        let alone = admit(&rules, [&b].map(|(k, l)| (k, l)));
        assert!(matches!(alone[&b.0], Outcome::Admitted { missing: Some(Family::V6), .. }));
    }
}
