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

fn key(prefix: &str, subnet: Ipv4Net) -> String {
    format!("{prefix}/subnets/{}-{}", subnet.network(), subnet.prefix_len())
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
                    let (subnet, value) = synthetic_lease(next);
                    let path = key(&prefix, subnet);
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
