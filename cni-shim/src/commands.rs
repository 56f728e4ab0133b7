//! The CNI verbs: ADD, DEL, CHECK, STATUS, GC, VERSION.

use std::net::IpAddr;

use ipnet::IpNet;
use proto::{Family, FamilyEnv, SubnetEnv};
use serde_json::{json, Value};

use crate::config::{NetConf, SUPPORTED_VERSIONS};
use crate::error::{code, CniError};
use crate::ipam::{ContainerLock, Store};
use crate::link;
use crate::result::{addresses_in, CniResult, Interface, IpConfig, Route};

/// The runtime's CNI_* variables.
#[derive(Debug, Clone, Default)]
pub struct Env {
    /// CNI_COMMAND.
    pub command: String,
    /// CNI_CONTAINERID.
    pub container_id: String,
    /// CNI_NETNS (may be empty on DEL).
    pub netns: String,
    /// CNI_IFNAME.
    pub ifname: String,
}

impl Env {
    /// Reads the process environment.
    pub fn from_process() -> Self {
        let var = |k: &str| std::env::var(k).unwrap_or_default();
        Env {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
        }
    }

    pub(crate) fn check_container_id(&self) -> Result<(), CniError> {
        let ok = !self.container_id.is_empty()
            && self.container_id.len() <= 256
            && self.container_id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && !self.container_id.starts_with('.');
        if ok {
            Ok(())
        } else {
            Err(CniError::new(
                code::INVALID_ENV,
                format!(
                    "CNI_CONTAINERID {:?} is empty or has characters other than letters, digits, '-', '_' and '.'",
                    self.container_id
                ),
            ))
        }
    }

    pub(crate) fn check_ifname(&self) -> Result<(), CniError> {
        let n = &self.ifname;
        if n.is_empty() || n.len() > 15 || n.contains('/') || n.contains(char::is_whitespace) || n == "." || n == ".." {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!(
                    "CNI_IFNAME {n:?} is not a valid interface name (1-15 bytes, no '/' or spaces, not '.' or '..')"
                ),
            ));
        }
        Ok(())
    }
}

fn read_subnet_env(conf: &NetConf) -> Result<SubnetEnv, CniError> {
    let path = &conf.subnet_file;
    let text = std::fs::read_to_string(path).map_err(|e| {
        CniError::new(
            code::TRY_AGAIN,
            format!("cannot read {}: the overlay daemon is not ready on this node", path.display()),
        )
        .details(e.to_string())
    })?;
    SubnetEnv::parse(&text).map_err(|e| {
        CniError::new(
            code::TRY_AGAIN,
            format!("{} is not a valid subnet file: the overlay daemon is not ready", path.display()),
        )
        .details(e.to_string())
    })
}

/// How long ADD waits for the daemon's subnet file. The DaemonSet's init container installs the conflist a moment
/// before the daemon writes that file, and a runtime that reads only the conflist (containerd 1.6 has no CNI STATUS)
/// may send a pod in between; waiting a little spares it a failed sandbox and the kubelet's backoff.
const SUBNET_FILE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The subnet file, waited for up to [`SUBNET_FILE_WAIT`] while it is not there or not whole yet.
async fn wait_for_subnet_env(conf: &NetConf) -> Result<SubnetEnv, CniError> {
    let deadline = tokio::time::Instant::now() + SUBNET_FILE_WAIT;
    loop {
        match read_subnet_env(conf) {
            Err(e) if tokio::time::Instant::now() < deadline && e.code == code::TRY_AGAIN => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            done => return done,
        }
    }
}

/// ADD: an address per family, a veth into the pod, the routes; rolled back on any failure.
pub async fn add(conf: &NetConf, env: &Env) -> Result<Value, CniError> {
    env.check_container_id()?;
    env.check_ifname()?;
    let ns = link::open_netns(&env.netns)?;
    let subnet_env = wait_for_subnet_env(conf).await?;
    // Held until the interface exists (or is rolled back): see ContainerLock.
    let _container = ContainerLock::take(&conf.data_dir, &conf.name, &env.container_id)?;
    let mtu = conf.mtu.unwrap_or(subnet_env.mtu);
    let families = subnet_env.families();
    // The lock covers choosing the addresses only, so parallel ADDs do their
    // kernel work in parallel. One range per family, numbered as host-local numbers them.
    let addresses = {
        let store = Store::open(&conf.data_dir, &conf.name)?;
        let held = store.find(&env.container_id, &env.ifname)?;
        let mut addresses = Vec::with_capacity(families.len());
        for (range, half) in families.iter().enumerate() {
            let ip = match held.iter().find(|ip| half.gateway.contains(*ip)) {
                Some(ip) => *ip,
                None => match store.allocate(half.gateway, range, &env.container_id, &env.ifname) {
                    Ok(ip) => ip,
                    Err(e) => {
                        // Nothing half-allocated stays behind.
                        let _ = store.release(&env.container_id, &env.ifname);
                        return Err(e);
                    }
                },
            };
            addresses
                .push(IpNet::new(ip, half.gateway.prefix_len()).map_err(|e| CniError::new(code::IO, e.to_string()))?);
        }
        addresses
    };
    let host = link::host_veth_name(&env.container_id, &env.ifname);
    let nl = link::connect()?;
    let wired = wire(&nl, conf, env, &ns, &host, &addresses, &families, mtu).await;
    match wired {
        Ok(result) => Ok(result.to_json(&conf.cni_version, conf.prev_result.as_ref())),
        Err(e) => {
            // Roll back: the host end takes the pair with it; then the addresses.
            let _ = link::delete_host_link(&nl, &host).await;
            let _ = link::delete_in_container(&ns, &env.ifname);
            let _ = Store::open(&conf.data_dir, &conf.name).and_then(|s| s.release(&env.container_id, &env.ifname));
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn wire(
    nl: &overlay_netlink::Netlink,
    conf: &NetConf,
    env: &Env,
    ns: &std::fs::File,
    host: &str,
    addresses: &[IpNet],
    families: &[FamilyEnv],
    mtu: u32,
) -> Result<CniResult, CniError> {
    let bridge = link::ensure_bridge(nl, &conf.bridge, families, mtu).await?;
    let host_link = link::create_veth(nl, host, &env.ifname, ns, mtu, &bridge, conf.hairpin_mode).await?;
    let routes = planned_routes(conf, families);
    let container = link::configure_container(ns, &env.ifname, addresses, &routes)?;
    let mac = |l: &overlay_netlink::Link| l.mac.map(|m| m.to_string()).unwrap_or_default();
    Ok(CniResult {
        interfaces: vec![
            Interface { name: conf.bridge.clone(), mac: mac(&bridge), sandbox: None },
            Interface { name: host.to_string(), mac: mac(&host_link), sandbox: None },
            Interface { name: env.ifname.clone(), mac: mac(&container), sandbox: Some(env.netns.clone()) },
        ],
        ips: addresses
            .iter()
            .zip(families)
            .map(|(address, half)| IpConfig { address: *address, gateway: half.gateway.addr(), interface: 2 })
            .collect(),
        routes: routes.iter().map(|(dst, gw)| Route { dst: *dst, gw: *gw }).collect(),
        dns: conf.dns.clone(),
    })
}

/// Each family's cluster network via its gateway, then (isDefaultGateway) each family's default route.
fn planned_routes(conf: &NetConf, families: &[FamilyEnv]) -> Vec<(IpNet, IpAddr)> {
    let mut routes: Vec<(IpNet, IpAddr)> = families.iter().map(|f| (f.network, f.gateway.addr())).collect();
    if conf.is_default_gateway {
        for f in families {
            let default = match Family::of_net(&f.network) {
                Family::V4 => IpNet::V4(Default::default()),
                Family::V6 => IpNet::V6(Default::default()),
            };
            routes.push((default, f.gateway.addr()));
        }
    }
    routes
}

/// DEL: idempotent; releases the address whatever state the pod is in.
pub async fn del(conf: &NetConf, env: &Env) -> Result<(), CniError> {
    env.check_container_id()?;
    let container = ContainerLock::take(&conf.data_dir, &conf.name, &env.container_id)?;
    // containerd sends an empty CNI_NETNS; a namespace that is gone took the veth with it.
    if !env.netns.is_empty() && !env.ifname.is_empty() {
        if let Ok(ns) = link::open_netns(&env.netns) {
            link::delete_in_container(&ns, &env.ifname)?;
        }
    }
    if !env.ifname.is_empty() {
        let nl = link::connect()?;
        link::delete_host_link(&nl, &link::host_veth_name(&env.container_id, &env.ifname)).await?;
    }
    let store = Store::open(&conf.data_dir, &conf.name)?;
    store.release(&env.container_id, &env.ifname)?;
    drop(store);
    container.forget();
    Ok(())
}

/// CHECK: the interface, its addresses, its routes and the allocations are all as ADD left them.
pub fn check(conf: &NetConf, env: &Env) -> Result<(), CniError> {
    env.check_container_id()?;
    env.check_ifname()?;
    let prev =
        conf.prev_result.as_ref().ok_or_else(|| CniError::new(code::INVALID_CONFIG, "CHECK needs prevResult"))?;
    let expected = addresses_in(prev, &env.ifname);
    if expected.is_empty() {
        return Err(CniError::new(code::INVALID_CONFIG, format!("prevResult has no address for {}", env.ifname)));
    }
    let fail = |msg: String| Err(CniError::new(code::IO, msg));
    let ns = link::open_netns(&env.netns)?;
    let store = Store::open(&conf.data_dir, &conf.name)?;
    let mut held = store.find(&env.container_id, &env.ifname)?;
    if held.is_empty() {
        return Err(CniError::new(
            code::UNKNOWN_CONTAINER,
            format!("no address is allocated to {}/{}", env.container_id, env.ifname),
        ));
    }
    let mut want: Vec<IpAddr> = expected.iter().map(|(a, _)| a.addr()).collect();
    held.sort();
    want.sort();
    if held != want {
        return fail(format!("allocations are {held:?}, prevResult says {want:?}"));
    }
    let view = link::inspect_container(&ns, &env.ifname)?;
    if view.link.is_none() {
        return fail(format!("{} does not exist in {}", env.ifname, env.netns));
    }
    for (address, _) in &expected {
        if !view.addresses.contains(address) {
            return fail(format!("{} has {:?}, expected {address}", env.ifname, view.addresses));
        }
    }
    let subnet_env = read_subnet_env(conf)?;
    for (dst, gw) in planned_routes(conf, &subnet_env.families()) {
        if !view.routes.contains(&(dst, Some(gw))) {
            return fail(format!("route {dst} via {gw} is missing on {}", env.ifname));
        }
    }
    Ok(())
}

/// STATUS: ready when the daemon's subnet file is there and valid.
pub fn status(conf: &NetConf) -> Result<(), CniError> {
    read_subnet_env(conf).map(|_| ()).map_err(|e| CniError { code: code::NOT_AVAILABLE, ..e })
}

/// GC: releases every allocation not in `cni.dev/valid-attachments`.
pub fn gc(conf: &NetConf) -> Result<(), CniError> {
    let valid = conf.valid_attachments.clone().unwrap_or_default();
    let store = Store::open(&conf.data_dir, &conf.name)?;
    for ip in store.release_all_except(&valid)? {
        eprintln!("overlay-cni: GC released {ip}");
    }
    Ok(())
}

/// VERSION: the versions we speak.
pub fn version() -> Value {
    json!({"cniVersion": "1.1.0", "supportedVersions": SUPPORTED_VERSIONS})
}
