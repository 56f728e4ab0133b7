//! `overlayd cleanup`: removes what the daemon made on this node: its VXLAN
//! devices (and with them every peer entry on them), its direct routes, its
//! nftables tables (masquerade and NetworkPolicy) and the subnet file. The
//! etcd lease is left to expire.
//!
//! It first finds what there is (a plan), then removes it, or with
//! `--dry-run` prints it. It refuses while a daemon holds the node's lock:
//! the running daemon would put everything back at its next repair. A
//! flanneld device (`flannel.<VNI>`) goes only when overlayd adopted it (the
//! device's alias says so) or with `--include-flannel`: flanneld may still
//! be running on it.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use overlay_netlink::{Bulk, Link, Netlink};
use proto::{Address, Family};
use tracing::{debug, info, warn};

use crate::dataplane::device::{self, Owner};
use crate::dataplane::entries;
use crate::dataplane::fast_path;
use crate::dataplane::masq;
use crate::flags::{CleanupArgs, RunArgs};
use crate::instance_lock::{self, InstanceLock};
use crate::plan::{Op, RouteVia};

/// What cleanup found on the node, to remove or to print.
#[derive(Debug, Default)]
struct Found {
    /// VXLAN devices to delete.
    devices: Vec<String>,
    /// flanneld's devices that stay (not adopted, no `--include-flannel`).
    kept_flannel: Vec<String>,
    /// Our routes off the devices (DirectRouting), per family.
    routes_v4: Vec<Op<Ipv4Addr>>,
    routes_v6: Vec<Op<Ipv6Addr>>,
    /// Masquerade tables present.
    masquerade: Vec<Family>,
    /// The NetworkPolicy table is present.
    policy_table: bool,
    /// The fast path's marking table is present (its programs went with the daemon).
    fast_path_table: bool,
    /// The subnet file, when it exists.
    subnet_file: Option<PathBuf>,
}

/// Runs `overlayd cleanup`.
pub async fn run(run: &RunArgs, args: &CleanupArgs) -> Result<()> {
    let lock = instance_lock::path_for(&run.node.subnet_file);
    InstanceLock::check_free(&lock).context("overlayd cleanup refuses to run while the daemon runs")?;
    let found = find(run, args).await?;
    for name in &found.kept_flannel {
        warn!(device = %name, "left flanneld's device: overlayd did not adopt it (flanneld may run on it); --include-flannel removes it");
    }
    if args.dry_run {
        print!("{}", found.describe());
        return Ok(());
    }
    remove(found).await
}

async fn find(run: &RunArgs, args: &CleanupArgs) -> Result<Found> {
    let nl = Netlink::connect()?;
    let mut bulk = Bulk::open()?;
    let links = nl.links().await?;
    let mut found = Found::default();
    for family in Family::ALL {
        let flag = match family {
            Family::V4 => run.node.device.as_deref(),
            Family::V6 => run.node.device_v6.as_deref(),
        };
        let (remove, keep) = devices(&links, flag, family, args.include_flannel);
        found.devices.extend(remove);
        found.kept_flannel.extend(keep);
        if masq::exists(family).await.with_context(|| format!("reading the {family} masquerade table"))? {
            found.masquerade.push(family);
        }
    }
    let devices: Vec<u32> = links.iter().filter(|l| found.devices.contains(&l.name)).map(|l| l.index).collect();
    found.routes_v4 = direct_routes::<Ipv4Addr>(&mut bulk, &devices)?;
    found.routes_v6 = direct_routes::<Ipv6Addr>(&mut bulk, &devices)?;
    found.policy_table = crate::policy::table::list().await.context("reading the NetworkPolicy table")?.is_some();
    found.fast_path_table = fast_path::table_exists().await.context("reading the fast path's table")?;
    found.subnet_file = Some(run.node.subnet_file.clone()).filter(|p| p.exists());
    Ok(found)
}

/// The VXLAN devices of `family` to remove, and flanneld's to leave: the one
/// `--device` names, else every one of a default name, flanneld's only when
/// adopted or `include_flannel`.
fn devices(links: &[Link], flag: Option<&str>, family: Family, include_flannel: bool) -> (Vec<String>, Vec<String>) {
    let (mut remove, mut keep) = (Vec::new(), Vec::new());
    for link in links.iter().filter(|l| l.vxlan.is_some()) {
        let owner = match flag {
            Some(name) if link.name == name => Some(Owner::Overlayd),
            Some(_) => None,
            None => device::default_name_owner(&link.name, family),
        };
        match owner {
            Some(Owner::Overlayd) => remove.push(link.name.clone()),
            Some(Owner::Flanneld) if include_flannel || link.alias.as_deref() == Some(device::ADOPTED_ALIAS) => {
                remove.push(link.name.clone())
            }
            Some(Owner::Flanneld) => keep.push(link.name.clone()),
            None => {}
        }
    }
    (remove, keep)
}

/// Our routes that are not on a device that goes (DirectRouting's live on the underlay).
fn direct_routes<A: Address>(bulk: &mut Bulk, devices: &[u32]) -> Result<Vec<Op<A>>> {
    let filter = overlay_netlink::RouteFilter::Protocol(entries::ROUTE_PROTOCOL);
    let routes = match bulk.routes(entries::address_family(A::FAMILY), filter) {
        Ok(routes) => routes,
        Err(e) if A::FAMILY == Family::V6 => {
            debug!(error = %e, "no IPv6 routes to read");
            Vec::new()
        }
        Err(e) => return Err(e).context("reading overlay routes"),
    };
    Ok(routes
        .into_iter()
        .filter(|r| !r.oif.is_some_and(|i| devices.contains(&i)))
        .filter_map(|r| {
            Some(Op::DelRoute(A::net_from(r.destination)?, RouteVia::Direct(r.gateway.and_then(A::from_ip)?)))
        })
        .collect())
}

impl Found {
    /// What would go, one line each, as `--dry-run` prints it.
    fn describe(&self) -> String {
        let mut lines = Vec::new();
        lines.extend(self.devices.iter().map(|d| format!("device {d} (with every peer entry on it)")));
        lines.extend(self.routes_v4.iter().map(|op| format!("route: {}", entries::describe(op))));
        lines.extend(self.routes_v6.iter().map(|op| format!("route: {}", entries::describe(op))));
        for family in &self.masquerade {
            lines.push(format!("nftables table {} {}", masq::nft_family_name(*family), masq::TABLE));
        }
        if self.policy_table {
            lines.push(format!("nftables table inet {}", crate::policy::table::TABLE));
        }
        if self.fast_path_table {
            lines.push(format!("nftables table {}", fast_path::TABLE));
        }
        if let Some(path) = &self.subnet_file {
            lines.push(format!("file {}", path.display()));
        }
        if lines.is_empty() {
            return "overlayd cleanup --dry-run: nothing of overlayd's is on this node\n".into();
        }
        let mut text = String::from("overlayd cleanup --dry-run: would remove\n");
        for line in lines {
            text.push_str("  ");
            text.push_str(&line);
            text.push('\n');
        }
        text
    }
}

async fn remove(found: Found) -> Result<()> {
    let nl = Netlink::connect()?;
    let mut bulk = Bulk::open()?;
    for name in &found.devices {
        if device::remove(&nl, name).await? {
            info!(device = %name, "removed VXLAN device and with it every peer entry");
        }
    }
    let mut left = 0;
    if !found.routes_v4.is_empty() {
        left += entries::apply(&mut bulk, 0, &found.routes_v4)?.failed.len();
    }
    if !found.routes_v6.is_empty() {
        left += entries::apply(&mut bulk, 0, &found.routes_v6)?.failed.len();
    }
    for family in Family::ALL {
        masq::remove(family).await.with_context(|| format!("removing {family} masquerade rules"))?;
    }
    crate::policy::cleanup().await.context("removing the NetworkPolicy table")?;
    if found.fast_path_table {
        fast_path::remove_table().await.context("removing the fast path's table")?;
        info!(table = %fast_path::TABLE, "removed the fast path's marking table");
    }
    if let Some(path) = &found.subnet_file {
        remove_file(path)?;
    }
    if left > 0 {
        anyhow::bail!("{left} overlay routes could not be removed");
    }
    Ok(())
}

fn remove_file(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => info!(path = %path.display(), "removed subnet file"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vxlan(name: &str, alias: Option<&str>) -> Link {
        Link { name: name.into(), alias: alias.map(str::to_string), vxlan: Some(Default::default()), ..Link::default() }
    }

    #[test]
    fn flanneld_s_device_goes_only_when_adopted_or_asked_for() {
        let links = [
            vxlan("overlay.1", None),
            vxlan("flannel.1", None),
            vxlan("flannel.2", Some(device::ADOPTED_ALIAS)),
            vxlan("overlay-v6.1", None),
            vxlan("vx0", None),
            Link { name: "overlay.3".into(), ..Link::default() },
        ];
        let (remove, keep) = devices(&links, None, Family::V4, false);
        assert_eq!(remove, ["overlay.1", "flannel.2"]);
        assert_eq!(keep, ["flannel.1"]);
        let (remove, keep) = devices(&links, None, Family::V4, true);
        assert_eq!(remove, ["overlay.1", "flannel.1", "flannel.2"]);
        assert!(keep.is_empty());
        assert_eq!(devices(&links, None, Family::V6, false).0, ["overlay-v6.1"]);
        assert_eq!(devices(&links, Some("vx0"), Family::V4, false), (vec!["vx0".to_string()], vec![]));
    }

    #[test]
    fn default_device_names_are_told_apart_by_family_and_owner() {
        use device::default_name_owner as owner;
        assert_eq!(owner("overlay.1", Family::V4), Some(Owner::Overlayd));
        assert_eq!(owner("overlay.4096", Family::V4), Some(Owner::Overlayd));
        assert_eq!(owner("overlay-v6.1", Family::V6), Some(Owner::Overlayd));
        assert_eq!(owner("overlay-v6.1", Family::V4), None);
        assert_eq!(owner("overlay.1", Family::V6), None);
        for not in ["overlay.", "overlay.x", "overlay", "flannel.x"] {
            assert_eq!(owner(not, Family::V4), None, "{not}");
        }
        assert_eq!(owner("flannel.1", Family::V4), Some(Owner::Flanneld));
        assert_eq!(owner("flannel-v6.1", Family::V6), Some(Owner::Flanneld));
        assert_eq!(owner("flannel.1", Family::V6), None);
    }

    #[test]
    fn a_dry_run_names_everything_that_would_go() {
        let found = Found {
            devices: vec!["overlay.1".into()],
            routes_v4: vec![Op::DelRoute(
                "10.244.7.0/24".parse().unwrap(),
                crate::plan::RouteVia::Direct("192.168.50.12".parse().unwrap()),
            )],
            masquerade: vec![Family::V4],
            policy_table: true,
            subnet_file: Some("/run/overlay/subnet.env".into()),
            ..Found::default()
        };
        let text = found.describe();
        for part in [
            "device overlay.1",
            "route: delete route 10.244.7.0/24 via 192.168.50.12",
            "table ip overlay",
            "table inet overlay_policy",
            "file /run/overlay/subnet.env",
        ] {
            assert!(text.contains(part), "{part}: {text}");
        }
        assert!(Found::default().describe().contains("nothing"));
    }
}
