//! A real runtime: podman calls overlay-cni (then the reference portmap
//! plugin) on a 2-node overlay; a container on node 1 fetches a page from an
//! HTTP server container on node 2 by its pod IP.

use std::time::Duration;

use overlay_tests::cluster::DUAL_STACK_CONFIG;
use overlay_tests::podman::Podman;
use overlay_tests::{require_root, wait_until, Cluster, ClusterOptions};

/// Two ready nodes with podman each, and an HTTP server container "web" on node 2.
fn two_nodes_with_a_web_server(options: ClusterOptions) -> (Cluster, Podman, Podman) {
    let mut c = Cluster::new(options).unwrap();
    c.add_ready_node(&[], 0).unwrap();
    c.add_ready_node(&[], 0).unwrap();
    let plugin_dir = overlay_tests::workspace_bin("overlay-cni").parent().unwrap().to_path_buf();
    let p1 = Podman::for_node(&c.nodes[0], &c.dir, &plugin_dir).unwrap();
    let p2 = Podman::for_node(&c.nodes[1], &c.dir, &plugin_dir).unwrap();
    p2.serve_web("web").unwrap();
    (c, p1, p2)
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn podman_containers_talk_across_nodes_through_overlay_cni() {
    require_root();
    let (c, p1, p2) = two_nodes_with_a_web_server(ClusterOptions::default());
    let ip = p2.run(&["inspect", "web", "--format", "{{.NetworkSettings.Networks.overlay.IPAddress}}"]).unwrap();
    assert!(c.nodes[1].subnet().unwrap().contains(&ip.parse::<std::net::Ipv4Addr>().unwrap()), "web got {ip}");

    let url = format!("http://{ip}/index.html");
    let mut page = String::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            page = p1.fetch_page(&ip);
            page.contains("hello from overlay")
        }),
        "container on node 1 could not fetch {url}: {page:?}"
    );

    // podman rm releases the address.
    let ipam = c.nodes[1].subnet_file.parent().unwrap().join("ipam/overlay").join(&ip);
    assert!(ipam.exists(), "no allocation file for {ip}");
    p2.run(&["rm", "--force", "--time", "0", "web"]).unwrap();
    assert!(!ipam.exists(), "podman rm did not release {ip}");
}

#[test]
#[ignore = "needs root (network namespaces): run by `make test`"]
fn podman_dual_stack_containers_ping_across_nodes_over_ipv4_and_ipv6() {
    require_root();
    let options = ClusterOptions { config: Some(DUAL_STACK_CONFIG.into()), ..Default::default() };
    let (c, p1, p2) = two_nodes_with_a_web_server(options);
    let ip4 = p2.run(&["inspect", "web", "--format", "{{.NetworkSettings.Networks.overlay.IPAddress}}"]).unwrap();
    let ip6 =
        p2.run(&["inspect", "web", "--format", "{{.NetworkSettings.Networks.overlay.GlobalIPv6Address}}"]).unwrap();
    assert!(c.nodes[1].subnet().unwrap().contains(&ip4.parse::<std::net::Ipv4Addr>().unwrap()), "web got {ip4}");
    assert!(c.nodes[1].subnet_v6().unwrap().contains(&ip6.parse::<std::net::Ipv6Addr>().unwrap()), "web got {ip6:?}");

    let rootfs = p1.rootfs();
    for ip in [&ip4, &ip6] {
        let mut out = String::new();
        assert!(
            wait_until(Duration::from_secs(10), || {
                let ping =
                    format!("ping -c 1 -W 2 {ip} && printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {ip} 80");
                out = p1
                    .run(&["run", "--rm", "--network", "overlay", "--rootfs", &rootfs, "/bin/sh", "-c", &ping])
                    .unwrap_or_else(|e| e.to_string());
                out.contains("1 packets received") && out.contains("hello from overlay")
            }),
            "a container on node 1 cannot ping and fetch from {ip}: {out:?}"
        );
    }
    p2.run(&["rm", "--force", "--time", "0", "web"]).unwrap();
    let ipam = c.nodes[1].subnet_file.parent().unwrap().join("ipam/overlay");
    assert!(!ipam.join(&ip4).exists() && !ipam.join(&ip6).exists(), "podman rm did not release both addresses");
}
