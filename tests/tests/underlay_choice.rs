//! The underlay interface, chosen as flanneld chooses it: `--iface` in order
//! of preference, else `--iface-regex`, else `--iface-can-reach`, else the
//! default route; and when nothing matches, an error that names what was
//! tried and what there is, before anything on the node is touched.

use std::time::Duration;

use overlay_tests::{require_root, Cluster, ClusterOptions};

/// Node `i`'s log line that says which underlay it chose.
fn chosen(c: &Cluster, i: usize) -> String {
    let log = c.nodes[i].log_text();
    log.lines().find(|l| l.contains(" underlay ")).unwrap_or_default().to_string()
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn the_underlay_is_chosen_as_flanneld_chooses_it_and_a_miss_names_what_was_tried() {
    require_root();
    let mut c = Cluster::new(ClusterOptions::default()).unwrap();
    // Each node gets a second, down interface with an address of its own, so a wrong choice shows.
    let ready: [Vec<String>; 5] = [
        // The first that exists, by name or by address (node 2 is 192.168.50.12).
        vec!["--iface=nosuch0".into(), "--iface=eth0".into()],
        vec!["--iface".into(), "10.98.0.1".into(), "--iface".into(), "192.168.50.12".into()],
        // A pattern on addresses first, then on names.
        vec!["--iface-regex=^192\\.168\\.50\\.".into()],
        vec!["--iface-regex=^nomatch".into(), "--iface-regex=^eth".into()],
        // The route to an address.
        vec!["--iface-can-reach=192.168.50.2".into()],
    ];
    for flags in &ready {
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let i = c.add_node(&flags).unwrap();
        c.nodes[i].ns.ip(&["link", "add", "extra9", "type", "bridge"]).unwrap();
        c.nodes[i].ns.ip(&["addr", "add", "10.99.0.9/24", "dev", "extra9"]).unwrap();
        c.nodes[i].start().unwrap();
        c.nodes[i].wait_ready(Duration::from_secs(20)).unwrap();
        let line = chosen(&c, i);
        assert!(line.contains("iface=eth0") && line.contains(&c.nodes[i].ip.to_string()), "{flags:?}: {line}");
    }
    // --iface-regex on an address picks that address's interface, even a second one.
    let i = c.add_node(&["--iface-regex=^10\\.99\\."]).unwrap();
    c.nodes[i].ns.ip(&["link", "add", "extra9", "type", "bridge"]).unwrap();
    c.nodes[i].ns.ip(&["addr", "add", "10.99.0.9/24", "dev", "extra9"]).unwrap();
    c.nodes[i].start().unwrap();
    assert!(
        overlay_tests::wait_until(Duration::from_secs(10), || chosen(&c, i).contains("iface=extra9")),
        "{}",
        c.nodes[i].log_text()
    );
    c.nodes[i].stop().unwrap();

    for (flags, expected) in [
        (&["--iface=nosuch0", "--iface=10.1.2.3"][..], &["--iface nosuch0, 10.1.2.3", "eth0 (192.168.50."][..]),
        (&["--iface-regex=^wlan", "--iface-regex=^ib"], &["--iface-regex ^wlan, ^ib", "eth0"]),
        (&["--iface-regex=eth[0"], &["--iface-regex", "not a regular expression"]),
        (&["--iface-can-reach=2001:db8:ffff::1"], &["--iface-can-reach 2001:db8:ffff::1", "no route"]),
    ] {
        let i = c.add_node(flags).unwrap();
        // No IPv6 default route on this node: nothing reaches the address above.
        c.nodes[i].ns.ip(&["-6", "route", "del", "default"]).unwrap();
        c.nodes[i].start().unwrap();
        let status = c.nodes[i].wait_exit(Duration::from_secs(20)).unwrap();
        let log = c.nodes[i].log_text();
        assert!(!status.success(), "{flags:?} went ahead:\n{log}");
        assert!(expected.iter().all(|e| log.contains(e)), "{flags:?}: expected {expected:?} in:\n{log}");
        // Nothing was made on the node.
        assert!(c.nodes[i].ns.ip(&["link", "show", "overlay.1"]).is_err(), "{flags:?} made a device");
    }
}
