//! The plugin's outside input, fed arbitrary bytes and mutations of valid
//! inputs: the network config on stdin, the CNI_* environment, and the IPAM
//! files on disk (which anything with root can edit, or a crash can leave
//! half-written). Each gives a result or a CNI error, never a panic. Bounded
//! property tests on stable Rust; anything found becomes a unit test.

use std::net::IpAddr;

use ipnet::IpNet;
use proptest::prelude::*;

use crate::commands::Env;
use crate::config::NetConf;
use crate::ipam::Store;

const CONFS: &[&str] = &[
    r#"{"cniVersion":"1.0.0","name":"overlay","type":"overlay-cni"}"#,
    r#"{"cniVersion":"0.3.1","name":"n","type":"overlay-cni","bridge":"br9","mtu":1400,"hairpinMode":false,"isDefaultGateway":false,"subnetFile":"/run/overlay/subnet.env","dataDir":"/var/lib/cni/networks"}"#,
    r#"{"cniVersion":"1.1.0","name":"overlay","type":"overlay-cni","cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}],"prevResult":{"cniVersion":"1.1.0","interfaces":[{"name":"eth0"}],"ips":[{"address":"10.244.1.2/24","interface":0}]}}"#,
];

/// Valid bytes, mutated: a byte replaced, inserted or removed (often a JSON one).
fn mutated(valid: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
    let edit = (any::<usize>(), prop::sample::select(b"{}[]\":,0123456789.-/ \\nul".to_vec()), 0u8..3);
    (prop::sample::select(valid), prop::collection::vec(edit, 1..8)).prop_map(|(v, edits)| {
        let mut bytes = v.as_bytes().to_vec();
        for (at, b, kind) in edits {
            let at = at % (bytes.len() + 1);
            match kind {
                0 if at < bytes.len() => bytes[at] = b,
                1 => bytes.insert(at, b),
                _ if at < bytes.len() => {
                    bytes.remove(at);
                }
                _ => {}
            }
        }
        bytes
    })
}

fn input(valid: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![prop::collection::vec(any::<u8>(), 0..200), mutated(valid)]
}

/// Any subnet of either family: every prefix length, any address in it as
/// the gateway; the whole space with its first addresses taken often.
fn subnet() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        (0u8..4).prop_map(|i| IpNet::new(IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, u16::from(i)]), 0).unwrap()),
        (0u8..4).prop_map(|i| IpNet::new(IpAddr::from([0, 0, 0, i]), 0).unwrap()),
        (any::<[u8; 4]>(), 0u8..=32).prop_map(|(a, p)| IpNet::new(IpAddr::from(a), p).unwrap()),
        (any::<[u8; 16]>(), 0u8..=128).prop_map(|(a, p)| IpNet::new(IpAddr::from(a), p).unwrap()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn network_configs(bytes in input(CONFS)) {
        if let Err(e) = NetConf::parse(&bytes) {
            prop_assert!(!e.to_string().trim().is_empty());
        }
    }

    #[test]
    fn environment(container_id in ".{0,300}", ifname in ".{0,20}", netns in ".{0,40}") {
        let env = Env { command: "ADD".into(), container_id, netns, ifname };
        if env.check_container_id().is_ok() {
            prop_assert!(!env.container_id.contains('/') && !env.container_id.starts_with('.'));
        }
        if env.check_ifname().is_ok() {
            prop_assert!(!env.ifname.contains('/') && env.ifname.len() <= 15);
            let host = crate::link::host_veth_name(&env.container_id, &env.ifname);
            prop_assert!(host.len() <= 15, "{}", host);
        }
    }
}

proptest! {
    // Each case touches the disk: fewer of them.
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn ipam_files(
        subnet in subnet(),
        range in 0usize..2,
        last_reserved in input(&["10.244.1.7", "fd00::7", "10.244.1.255", "255.255.255.254", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe"]),
        files in prop::collection::vec((subnet(), prop::collection::vec(any::<u8>(), 0..80)), 0..6),
    ) {
        let dir = std::env::temp_dir().join(format!("overlay-ipam-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir, "net").unwrap();
        let net_dir = dir.join("net");
        std::fs::write(net_dir.join(format!("last_reserved_ip.{range}")), &last_reserved).unwrap();
        for (ip, content) in &files {
            std::fs::write(net_dir.join(ip.addr().to_string()), content).unwrap();
        }
        let _ = store.allocations().unwrap();
        let _ = store.find("c1", "eth0").unwrap();
        match store.allocate(subnet, range, "c1", "eth0") {
            Ok(ip) => {
                prop_assert!(subnet.contains(&ip) && ip != subnet.addr(), "{} from {}", ip, subnet);
                prop_assert!(ip != subnet.network() && ip != subnet.broadcast(), "{} from {}", ip, subnet);
                prop_assert_eq!(store.find("c1", "eth0").unwrap(), vec![ip]);
            }
            Err(e) => prop_assert!(!e.to_string().trim().is_empty()),
        }
        let _ = store.release_all_except(&[("c2".into(), "eth0".into())]).unwrap();
        prop_assert!(store.find("c1", "eth0").unwrap().is_empty());
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
