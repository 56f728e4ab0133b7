//! etcd as production clusters run it: over TLS with client certificates,
//! and with authentication (a user whose role may only touch the prefix).
//! A second etcd, on 192.168.50.8 of the underlay, serves the nodes; the
//! certificates come from rcgen (tests/src/pki.rs), not the openssl binary.
//! Each mistake a user makes gets a log line that names the cause and the
//! flag to check, and the node stays unready, retrying.

use std::time::Duration;

use overlay_tests::cluster::PREFIX;
use overlay_tests::etcd::{Etcd, Security};
use overlay_tests::pki::Pki;
use overlay_tests::probe::ping_until;
use overlay_tests::{require_root, wait_until, Cluster, ClusterOptions};

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const SECURE_ETCD: &str = "192.168.50.8";

/// An etcd on 192.168.50.8 (and `security.also_on`) that serves as `security` says, holding the network config.
fn second_etcd(c: &Cluster, security: Security) -> Etcd {
    for addr in std::iter::once(SECURE_ETCD).chain(security.also_on.iter().map(String::as_str)) {
        c.underlay.ip(&["addr", "add", &format!("{addr}/24"), "dev", "br0"]).unwrap();
    }
    let etcd = Etcd::start_secure(&c.underlay, SECURE_ETCD, c.dir.join("secure-etcd"), security).unwrap();
    etcd.put(&format!("{PREFIX}/config"), CONFIG).unwrap();
    etcd
}

/// Starts a node with `flags` that cannot get going, waits until its log
/// says `expected`, checks it wrote no subnet file, and removes it.
fn fails_saying(c: &mut Cluster, flags: &[&str], expected: &[&str]) {
    let i = c.add_node(flags).unwrap();
    c.nodes[i].start().unwrap();
    let node = &c.nodes[i];
    let said = wait_until(Duration::from_secs(20), || {
        let log = node.log_text();
        expected.iter().all(|e| log.contains(e))
    });
    assert!(said, "{flags:?}: expected {expected:?} in the log:\n{}", node.log_text());
    assert!(node.subnet_env().is_err(), "{flags:?}: the node went ahead:\n{}", node.log_text());
    assert!(node.log_text().contains("retrying"), "a configuration error is retried, and said so");
    c.nodes[i].stop().unwrap();
}

/// Two nodes with `flags` become ready, with a pod each, and their pods reach each other.
fn two_nodes_reach_each_other(c: &mut Cluster, flags: &[&str]) {
    for _ in 0..2 {
        c.add_ready_node(flags, 1).unwrap();
    }
    assert!(
        ping_until(&c.nodes[0].pods[0].ns, c.nodes[1].pods[0].ip, Duration::from_secs(5)),
        "{}",
        c.nodes[0].log_text()
    );
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn etcd_over_tls_with_client_certificates_and_each_tls_mistake_said() {
    require_root();
    let mut c = Cluster::new(ClusterOptions { config: None, ..ClusterOptions::default() }).unwrap();
    let pki = Pki::make(&c.dir.join("pki"), SECURE_ETCD.parse().unwrap()).unwrap();
    // 192.168.50.9 reaches the same etcd, under a name its certificate does not carry.
    let _etcd = second_etcd(&c, Security { tls: Some(pki.clone()), also_on: vec!["192.168.50.9".into()] });
    let (ca, cert, key) =
        (pki.ca.to_str().unwrap(), pki.client_cert.to_str().unwrap(), pki.client_key.to_str().unwrap());
    let endpoint = format!("https://{SECURE_ETCD}:2379");
    let good = ["--etcd-endpoints", &endpoint, "--etcd-cafile", ca, "--etcd-certfile", cert, "--etcd-keyfile", key];
    two_nodes_reach_each_other(&mut c, &good);

    // No client certificate: etcd refuses the connection.
    fails_saying(&mut c, &["--etcd-endpoints", &endpoint, "--etcd-cafile", ca], &["TLS", "--etcd-certfile"]);
    // A CA that did not sign etcd's certificate.
    let other = pki.other_ca.to_str().unwrap();
    fails_saying(
        &mut c,
        &["--etcd-endpoints", &endpoint, "--etcd-cafile", other, "--etcd-certfile", cert, "--etcd-keyfile", key],
        &["TLS", "--etcd-cafile"],
    );
    // An endpoint the certificate does not name.
    fails_saying(
        &mut c,
        &[
            "--etcd-endpoints",
            "https://192.168.50.9:2379",
            "--etcd-cafile",
            ca,
            "--etcd-certfile",
            cert,
            "--etcd-keyfile",
            key,
        ],
        &["TLS", "--etcd-endpoints"],
    );
    // The nodes that had it right never noticed.
    assert!(ping_until(&c.nodes[1].pods[0].ns, c.nodes[0].pods[0].ip, Duration::from_secs(5)));
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn etcd_with_authentication_a_role_on_the_prefix_and_each_mistake_said() {
    require_root();
    let mut c = Cluster::new(ClusterOptions { config: None, ..ClusterOptions::default() }).unwrap();
    let mut etcd = second_etcd(&c, Security::default());
    etcd.enable_auth("root-secret").unwrap();
    etcd.add_user("overlay", "overlay-secret", Some(&format!("{PREFIX}/"))).unwrap();
    etcd.add_user("nobody", "nobody-secret", None).unwrap();
    let endpoint = etcd.endpoint();
    let as_user = |user: &'static str, password: &'static str| {
        vec![
            "--etcd-endpoints".to_string(),
            endpoint.clone(),
            "--etcd-username".into(),
            user.into(),
            "--etcd-password".into(),
            password.into(),
        ]
    };
    let good = as_user("overlay", "overlay-secret");
    let good: Vec<&str> = good.iter().map(String::as_str).collect();
    two_nodes_reach_each_other(&mut c, &good);
    // etcd's simple tokens die with a restart: the watch comes back with a
    // token it had to get again, and a node that joins after is programmed.
    etcd.restart().unwrap();
    let k = c.add_ready_node(&good, 1).unwrap();
    let (subnet, mac) = (c.nodes[k].subnet().unwrap(), c.nodes[k].vtep_mac().unwrap());
    assert!(
        wait_until(Duration::from_secs(20), || c.nodes[0].has_peer(subnet, &mac)),
        "node 1 did not learn of node {} after etcd restarted:\n{}",
        k + 1,
        c.nodes[0].log_text()
    );

    let wrong = as_user("overlay", "not-the-password");
    let wrong: Vec<&str> = wrong.iter().map(String::as_str).collect();
    fails_saying(&mut c, &wrong, &["authenticate as user \"overlay\"", "--etcd-password"]);
    let no_role = as_user("nobody", "nobody-secret");
    let no_role: Vec<&str> = no_role.iter().map(String::as_str).collect();
    fails_saying(&mut c, &no_role, &["permission denied", "--etcd-prefix"]);
    fails_saying(&mut c, &["--etcd-endpoints", &endpoint], &["--etcd-username"]);
    // The user holds exactly its prefix: overlayd wrote nothing else.
    let keys = etcd.ctl(&["get", "", "--prefix", "--keys-only"]).unwrap();
    assert!(keys.lines().filter(|l| !l.is_empty()).all(|k| k.starts_with(PREFIX)), "{keys}");
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn etcd_with_tls_and_authentication_together() {
    require_root();
    let mut c = Cluster::new(ClusterOptions { config: None, ..ClusterOptions::default() }).unwrap();
    let pki = Pki::make(&c.dir.join("pki"), SECURE_ETCD.parse().unwrap()).unwrap();
    let mut etcd = second_etcd(&c, Security { tls: Some(pki.clone()), also_on: Vec::new() });
    etcd.enable_auth("root-secret").unwrap();
    etcd.add_user("overlay", "overlay-secret", Some(&format!("{PREFIX}/"))).unwrap();
    let (ca, cert, key) =
        (pki.ca.to_str().unwrap(), pki.client_cert.to_str().unwrap(), pki.client_key.to_str().unwrap());
    let endpoint = etcd.endpoint();
    let tls = ["--etcd-endpoints", &endpoint, "--etcd-cafile", ca, "--etcd-certfile", cert, "--etcd-keyfile", key];
    let good: Vec<&str> =
        tls.iter().copied().chain(["--etcd-username", "overlay", "--etcd-password", "overlay-secret"]).collect();
    two_nodes_reach_each_other(&mut c, &good);
    let wrong: Vec<&str> =
        tls.iter().copied().chain(["--etcd-username", "overlay", "--etcd-password", "nope"]).collect();
    fails_saying(&mut c, &wrong, &["authenticate as user \"overlay\"", "--etcd-password"]);
}
