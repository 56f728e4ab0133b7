//! Every parser of outside input, fed arbitrary bytes and mutations of valid
//! inputs (a byte replaced, inserted or removed, a piece duplicated). Each
//! input must give a value or an error that says something, never a panic.
//! Bounded (a fixed number of cases, on stable Rust): a property test, not
//! a coverage-guided fuzzer. Whatever it ever finds becomes a unit test of
//! its own next to the parser.

use std::collections::BTreeMap;

use proptest::prelude::*;
use proto::{LeaseAttrs, LeaseKey, MacAddr, NetConfig, NodeAnnotations, SubnetEnv};

/// Valid inputs of each format, as flannel and overlay write them.
const LEASE_KEYS: &[&str] = &["10.244.18.0-24", "10.244.18.0-24&fd00:10:244:18::-64", "10.5.0.0-16"];
const LEASE_VALUES: &[&str] = &[
    r#"{"PublicIP":"192.168.50.11","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"b2:5e:e8:32:3a:be"}}"#,
    r#"{"PublicIP":"192.168.50.11","PublicIPv6":"fd00:50::11","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"b2:5e:e8:32:3a:be"},"BackendV6Data":{"VNI":1,"VtepMAC":"b2:5e:e8:32:3a:bf"}}"#,
];
const NET_CONFS: &[&str] = &[
    r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#,
    r#"{"Network":"10.244.0.0/16","SubnetLen":26,"SubnetMin":"10.244.1.0","SubnetMax":"10.244.9.192","Backend":{"Type":"vxlan","VNI":4096,"Port":4789,"GBP":true,"DirectRouting":true,"MTU":1400}}"#,
    r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","IPv6SubnetLen":64,"Backend":{"Type":"vxlan"}}"#,
    r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/120","Backend":{"Type":"vxlan"}}"#,
];
const SUBNET_ENVS: &[&str] = &[
    "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.33.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
    "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.33.1/24\nFLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:21::1/64\nFLANNEL_MTU=1430\nFLANNEL_IPMASQ=false\n",
];
const ANNOTATION_VALUES: &[&str] =
    &["vxlan", r#"{"VNI":1,"VtepMAC":"b2:5e:e8:32:3a:be"}"#, "192.168.50.12", "fd00:50::12", "true", "null"];
const POD_CIDRS: &[&str] = &["10.244.3.0/24", "fd00:10:244:3::/64", "10.244.3.7/24"];

/// One edit of a mutation.
#[derive(Debug, Clone)]
enum Edit {
    Replace(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    /// Copies `len` bytes from one place to another: repeated keys, nested objects.
    Duplicate(usize, usize, usize),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let edit = prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Edit::Replace(at, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Edit::Insert(at, b)),
        // Interesting bytes more often than random ones: JSON and env syntax.
        (any::<usize>(), prop::sample::select(b"{}[]\":,=-&/.0123456789\n\\ eE+".to_vec()))
            .prop_map(|(at, b)| Edit::Replace(at, b)),
        any::<usize>().prop_map(Edit::Remove),
        (any::<usize>(), any::<usize>(), 1usize..16).prop_map(|(from, to, len)| Edit::Duplicate(from, to, len)),
    ];
    prop::collection::vec(edit, 1..8)
}

fn mutate(valid: &str, edits: &[Edit]) -> Vec<u8> {
    let mut bytes = valid.as_bytes().to_vec();
    for edit in edits {
        let n = bytes.len().max(1);
        match *edit {
            Edit::Replace(at, b) if !bytes.is_empty() => bytes[at % n] = b,
            Edit::Insert(at, b) => bytes.insert(at % (bytes.len() + 1), b),
            Edit::Remove(at) if !bytes.is_empty() => {
                bytes.remove(at % n);
            }
            Edit::Duplicate(from, to, len) if !bytes.is_empty() => {
                let from = from % n;
                let piece: Vec<u8> = bytes[from..(from + len).min(bytes.len())].to_vec();
                let to = to % (bytes.len() + 1);
                bytes.splice(to..to, piece);
            }
            _ => {}
        }
    }
    bytes
}

/// An input: arbitrary bytes, or a mutation of one of `valid`.
fn input(valid: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        (prop::sample::select(valid), edits()).prop_map(|(v, e)| mutate(v, &e)),
        prop::sample::select(valid).prop_map(|v| v.as_bytes().to_vec()),
    ]
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// An error must say something.
fn says_something(e: impl std::fmt::Display) -> Result<(), TestCaseError> {
    prop_assert!(!e.to_string().trim().is_empty());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn lease_keys(bytes in input(LEASE_KEYS)) {
        match text(&bytes).parse::<LeaseKey>() {
            // What parses renders back to a key that parses to the same.
            Ok(key) => prop_assert_eq!(key.to_string().parse::<LeaseKey>().ok(), Some(key)),
            Err(e) => says_something(e)?,
        }
    }

    #[test]
    fn lease_values(bytes in input(LEASE_VALUES)) {
        match LeaseAttrs::from_json(&bytes) {
            Ok(attrs) => {
                // What parses is written back as flanneld would, and reads back the same.
                let again = LeaseAttrs::from_json(attrs.to_json().as_bytes());
                prop_assert!(again.is_ok(), "{:?}", again);
                let _ = (attrs.vxlan_peer(proto::Family::V4), attrs.vxlan_peer(proto::Family::V6));
            }
            Err(e) => says_something(e)?,
        }
    }

    #[test]
    fn net_confs(bytes in input(NET_CONFS)) {
        match NetConfig::parse(&text(&bytes)) {
            Ok(config) => {
                // A config that parses can be planned with: its pools, MTUs and ranges.
                for family in config.families() {
                    if let Some(pool) = config.pool(family) {
                        let _ = proto::SubnetRange::of(pool);
                    }
                    let _ = config.vxlan_mtu(family, 1500);
                }
                let _ = config.pod_mtu(1500);
            }
            Err(e) => says_something(e)?,
        }
    }

    #[test]
    fn subnet_envs(bytes in input(SUBNET_ENVS)) {
        match SubnetEnv::parse(&text(&bytes)) {
            Ok(env) => {
                let again = SubnetEnv::parse(&env.render());
                prop_assert_eq!(again.ok(), Some(env));
            }
            Err(e) => says_something(e)?,
        }
    }

    #[test]
    fn mac_addresses(bytes in input(&["b2:5e:e8:32:3a:be", "00:00:00:00:00:00"])) {
        match text(&bytes).parse::<MacAddr>() {
            Ok(mac) => prop_assert_eq!(mac.to_string().parse::<MacAddr>().ok(), Some(mac)),
            Err(e) => says_something(e)?,
        }
    }

    #[test]
    fn node_annotations(
        values in prop::collection::vec(input(ANNOTATION_VALUES), 6),
        present in prop::collection::vec(any::<bool>(), 6),
        pod_cidr in prop::option::of(input(POD_CIDRS)),
        pod_cidrs in prop::collection::vec(input(POD_CIDRS), 0..4),
    ) {
        let node = NodeAnnotations::default();
        let names = ["backend-type", "backend-data", "public-ip", "backend-v6-data", "public-ipv6", "public-ip-overwrite"];
        let annotations: BTreeMap<String, String> = names
            .iter()
            .zip(&values)
            .zip(&present)
            .filter(|(_, present)| **present)
            .map(|((name, value), _)| (format!("flannel.alpha.coreos.com/{name}"), text(value)))
            .collect();
        let pod_cidr = pod_cidr.map(|b| text(&b));
        let pod_cidrs: Vec<String> = pod_cidrs.iter().map(|b| text(b)).collect();
        match node.lease(pod_cidr.as_deref(), &pod_cidrs, &annotations) {
            Ok(_) => {}
            Err(e) => says_something(e)?,
        }
        if let Err(e) = node.public_ip_overwrite(&annotations) {
            says_something(e)?;
        }
    }
}
