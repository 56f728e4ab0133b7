//! Writing and deleting many synthetic flannel leases fast, for benchmarks:
//! an etcd client on a runtime whose thread lives in the etcd namespace.

use anyhow::{anyhow, Context, Result};
use etcd_client::Client;
use ipnet::Ipv4Net;
use std::net::Ipv4Addr;

use crate::netns::Netns;

/// The `i`th synthetic peer (1-based): its lease key segment and JSON value.
/// Subnets 10.0.i.0/24 counted through 10.0.0.0/9; fake underlay 172.16.0.0/12.
pub fn synthetic_lease(i: u32) -> (Ipv4Net, String) {
    let subnet = Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + (i << 8)), 24).expect("valid prefix");
    let public = Ipv4Addr::from(0xac10_0000 + i);
    let value = format!(
        r#"{{"PublicIP":"{public}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"02:00:00:{:02x}:{:02x}:{:02x}"}}}}"#,
        (i >> 16) & 0xff,
        (i >> 8) & 0xff,
        i & 0xff
    );
    (subnet, value)
}

/// The `i`th synthetic dual-stack peer (1-based, below 32768): its key
/// segment (`10.0.i.0-24&fd00:0:0:i::-64`) and a value with both families'
/// VTEPs; fake IPv6 underlay fd00:172::/64.
pub fn synthetic_lease_dual(i: u32) -> (String, String) {
    let (subnet, _) = synthetic_lease(i);
    let public = Ipv4Addr::from(0xac10_0000 + i);
    let (a, b, c) = ((i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff);
    let key = format!("{}-{}&fd00:0:0:{i:x}::-64", subnet.network(), subnet.prefix_len());
    let value = format!(
        r#"{{"PublicIP":"{public}","PublicIPv6":"fd00:172::{i:x}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"02:00:00:{a:02x}:{b:02x}:{c:02x}"}},"BackendV6Data":{{"VNI":1,"VtepMAC":"02:06:00:{a:02x}:{b:02x}:{c:02x}"}}}}"#
    );
    (key, value)
}

fn key(prefix: &str, subnet: Ipv4Net) -> String {
    format!("{prefix}/subnets/{}-{}", subnet.network(), subnet.prefix_len())
}

/// The lease of peer `i`: its full key and value, in one family or both.
fn lease(prefix: &str, i: u32, dual: bool) -> (String, String) {
    if dual {
        let (segment, value) = synthetic_lease_dual(i);
        (format!("{prefix}/subnets/{segment}"), value)
    } else {
        let (subnet, value) = synthetic_lease(i);
        (key(prefix, subnet), value)
    }
}

/// What to do with the leases 1..=n.
#[derive(Clone, Copy, Debug)]
pub enum Bulk {
    /// Put them.
    Put,
    /// Delete them.
    Delete,
}

/// Puts or deletes leases 1..=n under `prefix`, 64 requests in flight.
pub fn leases(ns: &Netns, endpoint: &str, prefix: &str, n: u32, op: Bulk) -> Result<()> {
    leases_of(ns, endpoint, prefix, n, op, false)
}

/// [`leases`], of dual-stack peers when `dual`.
pub fn leases_of(ns: &Netns, endpoint: &str, prefix: &str, n: u32, op: Bulk, dual: bool) -> Result<()> {
    let endpoint = endpoint.to_string();
    let prefix = prefix.to_string();
    crate::probe::in_netns(ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async move {
            let client = Client::connect([endpoint.as_str()], None).await.context("connect etcd")?;
            let mut next = 1u32;
            let mut in_flight = tokio::task::JoinSet::new();
            while next <= n || !in_flight.is_empty() {
                while next <= n && in_flight.len() < 64 {
                    let (path, value) = lease(&prefix, next, dual);
                    let mut client = client.clone();
                    in_flight.spawn(async move {
                        match op {
                            Bulk::Put => client.put(path, value, None).await.map(|_| ()),
                            Bulk::Delete => client.delete(path, None).await.map(|_| ()),
                        }
                    });
                    next += 1;
                }
                if let Some(done) = in_flight.join_next().await {
                    done.map_err(|e| anyhow!("{e}"))?.context("etcd write")?;
                }
            }
            Ok(())
        })
    })
    .join()
    .map_err(|_| anyhow!("bulk writer panicked"))?
}

/// Puts each `(key, value)`, values of any size (etcdctl takes a value as
/// one argument, which the kernel caps at 128 KiB).
pub fn put_values(ns: &Netns, endpoint: &str, kvs: Vec<(String, Vec<u8>)>) -> Result<()> {
    let endpoint = endpoint.to_string();
    crate::probe::in_netns(ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async move {
            let mut client = Client::connect([endpoint.as_str()], None).await.context("connect etcd")?;
            for (key, value) in kvs {
                client.put(key.as_str(), value, None).await.with_context(|| format!("put {key}"))?;
            }
            Ok(())
        })
    })
    .join()
    .map_err(|_| anyhow!("bulk writer panicked"))?
}
