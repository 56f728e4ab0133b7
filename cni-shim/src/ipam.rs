//! Address allocation inside the plugin, in host-local's on-disk layout: one
//! file per address under `<dataDir>/<network>/`, holding the container ID
//! and ifname; one range per family (`last_reserved_ip.0` for the first,
//! `.1` for the second, as host-local numbers its ranges); every change
//! under an exclusive lock, so concurrent plugin processes never hand out
//! one address twice.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use proto::family::{self, Family};

use crate::error::{code, CniError};

/// The allocations of one network, locked for as long as this value lives.
pub struct Store {
    dir: PathBuf,
    _lock: File,
}

/// One recorded allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// The address.
    pub ip: IpAddr,
    /// Owner container.
    pub container_id: String,
    /// Owner interface.
    pub ifname: String,
}

/// An exclusive hold on one container's attachments, for a whole ADD or a
/// whole DEL: a DEL that races its container's ADD runs before the ADD
/// reserves anything or after its interface exists, never in between, so
/// no pod keeps an address whose allocation is gone (and is handed out
/// again). Other containers' ADDs run in parallel.
pub struct ContainerLock {
    path: PathBuf,
    file: File,
}

impl ContainerLock {
    /// Waits for, and takes, the lock of `container_id` in `<data_dir>/<network>`.
    pub fn take(data_dir: &Path, network: &str, container_id: &str) -> Result<Self, CniError> {
        let dir = data_dir.join(network).join("containers");
        fs::create_dir_all(&dir).map_err(|e| CniError::io(format!("creating {}", dir.display()), e))?;
        let path = dir.join(container_id);
        loop {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|e| CniError::io(format!("opening {}", path.display()), e))?;
            // flock(2), released when `file` closes.
            file.lock().map_err(|e| CniError::io(format!("locking {}", path.display()), e))?;
            // A DEL that held it removed the file: the lock to take is the file there now.
            use std::os::unix::fs::MetadataExt;
            let held = file.metadata().map(|m| m.ino()).ok();
            if held.is_some() && fs::metadata(&path).map(|m| m.ino()).ok() == held {
                return Ok(ContainerLock { path, file });
            }
        }
    }

    /// Lets go, removing the lock file: the container is gone (DEL).
    pub fn forget(self) {
        let _ = fs::remove_file(&self.path);
        drop(self.file);
    }
}

impl Store {
    /// Opens (creating) `<data_dir>/<network>` and takes its lock.
    pub fn open(data_dir: &Path, network: &str) -> Result<Self, CniError> {
        let dir = data_dir.join(network);
        fs::create_dir_all(&dir).map_err(|e| CniError::io(format!("creating {}", dir.display()), e))?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| CniError::io(format!("opening {}", lock_path.display()), e))?;
        // flock(2), released when `lock` closes.
        lock.lock().map_err(|e| CniError::io(format!("locking {}", lock_path.display()), e))?;
        Ok(Store { dir, _lock: lock })
    }

    /// Every allocation on disk.
    pub fn allocations(&self) -> Result<Vec<Allocation>, CniError> {
        let entries =
            fs::read_dir(&self.dir).map_err(|e| CniError::io(format!("reading {}", self.dir.display()), e))?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let Some(ip) = entry.file_name().to_str().and_then(|n| n.parse::<IpAddr>().ok()) else { continue };
            let text = fs::read_to_string(entry.path()).unwrap_or_default();
            let mut lines = text.lines().map(str::trim);
            let container_id = lines.next().unwrap_or_default().to_string();
            let ifname = lines.next().unwrap_or_default().to_string();
            out.push(Allocation { ip, container_id, ifname });
        }
        Ok(out)
    }

    /// The addresses held by this attachment (one per family at most).
    pub fn find(&self, container_id: &str, ifname: &str) -> Result<Vec<IpAddr>, CniError> {
        Ok(self
            .allocations()?
            .into_iter()
            .filter(|a| a.container_id == container_id && a.ifname == ifname)
            .map(|a| a.ip)
            .collect())
    }

    /// Allocates an address of `subnet` (whose `.addr()` is the gateway),
    /// range number `range` of the network: never the network, gateway or
    /// (IPv4) broadcast address, nor the last address of an IPv6 subnet;
    /// round-robin after the last one handed out, as host-local does.
    pub fn allocate(&self, subnet: IpNet, range: usize, container_id: &str, ifname: &str) -> Result<IpAddr, CniError> {
        let network = subnet.trunc();
        let gateway = subnet.addr();
        let fam = Family::of_net(&network);
        let first = family::value(network.network()) + 1;
        let last = family::value(network.broadcast()).saturating_sub(1);
        if last < first {
            return Err(CniError::new(code::INVALID_CONFIG, format!("subnet {network} has no room for pods")));
        }
        let size = last - first + 1;
        let last_reserved = self.dir.join(format!("last_reserved_ip.{range}"));
        let start = fs::read_to_string(&last_reserved)
            .ok()
            .and_then(|t| t.trim().parse::<IpAddr>().ok())
            .filter(|ip| network.contains(ip))
            .map(|ip| family::value(ip).saturating_sub(first) + 1)
            .unwrap_or(0);
        // Stops at the first free address: a /64 is never scanned whole.
        // The offset wraps without an overflow: a range can span all of u128.
        let start = start % size;
        let mut step = 0u128;
        while step < size {
            let offset = if step < size - start { start + step } else { step - (size - start) };
            let ip = fam.addr(first + offset);
            step += 1;
            if ip == gateway {
                continue;
            }
            let path = self.dir.join(ip.to_string());
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    f.write_all(format!("{container_id}\r\n{ifname}").as_bytes())
                        .map_err(|e| CniError::io(format!("writing {}", path.display()), e))?;
                    let _ = fs::write(&last_reserved, ip.to_string());
                    return Ok(ip);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(CniError::io(format!("creating {}", path.display()), e)),
            }
        }
        Err(CniError::new(code::IO, format!("no free address left in {network}")).details(format!(
            "{} addresses allocated under {}",
            size - 1,
            self.dir.display()
        )))
    }

    /// Releases what this attachment holds; returns the addresses freed.
    pub fn release(&self, container_id: &str, ifname: &str) -> Result<Vec<IpAddr>, CniError> {
        self.release_where(|a| a.container_id == container_id && a.ifname == ifname)
    }

    /// Releases every allocation whose attachment is not in `valid` (GC).
    pub fn release_all_except(&self, valid: &[(String, String)]) -> Result<Vec<IpAddr>, CniError> {
        self.release_where(|a| !valid.iter().any(|(id, ifname)| *id == a.container_id && *ifname == a.ifname))
    }

    fn release_where(&self, doomed: impl Fn(&Allocation) -> bool) -> Result<Vec<IpAddr>, CniError> {
        let mut freed = Vec::new();
        for a in self.allocations()?.into_iter().filter(|a| doomed(a)) {
            let path = self.dir.join(a.ip.to_string());
            match fs::remove_file(&path) {
                Ok(()) => freed.push(a.ip),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(CniError::io(format!("removing {}", path.display()), e)),
            }
        }
        Ok(freed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::net::Ipv4Addr;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("overlay-ipam-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_last_reserved_address_at_the_top_of_a_huge_range_does_not_overflow() {
        // Found by the IPAM property test's shape: start + step wrapped past u128::MAX.
        let dir = temp("top");
        let store = Store::open(&dir, "net").unwrap();
        let subnet: IpNet = "::1/0".parse().unwrap();
        fs::write(dir.join("net/last_reserved_ip.0"), "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe").unwrap();
        fs::write(dir.join("net/::2"), "other\r\neth0").unwrap();
        assert_eq!(store.allocate(subnet, 0, "c", "eth0").unwrap(), "::3".parse::<IpAddr>().unwrap());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn never_hands_out_network_gateway_or_broadcast_and_fills_up() {
        let dir = temp("fill");
        let subnet: IpNet = "10.244.1.1/29".parse().unwrap();
        let store = Store::open(&dir, "net").unwrap();
        let mut got = HashSet::new();
        for i in 0..5 {
            got.insert(store.allocate(subnet, 0, &format!("c{i}"), "eth0").unwrap());
        }
        let want: HashSet<IpAddr> = (2..=6).map(|h| IpAddr::V4(Ipv4Addr::new(10, 244, 1, h))).collect();
        assert_eq!(got, want);
        let e = store.allocate(subnet, 0, "c9", "eth0").unwrap_err();
        assert!(e.msg.contains("no free address"), "{e}");
        let c3: IpAddr = "10.244.1.5".parse().unwrap();
        assert_eq!(store.find("c3", "eth0").unwrap(), vec![c3]);
        assert_eq!(store.release("c3", "eth0").unwrap(), vec![c3]);
        assert!(store.release("c3", "eth0").unwrap().is_empty(), "release is idempotent");
        assert_eq!(store.allocate(subnet, 0, "c9", "eth0").unwrap(), c3);
        drop(store);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn host_local_file_layout_and_gc() {
        let dir = temp("gc");
        let store = Store::open(&dir, "net").unwrap();
        let subnet: IpNet = "10.244.1.1/24".parse().unwrap();
        let a = store.allocate(subnet, 0, "keep", "eth0").unwrap();
        let b = store.allocate(subnet, 0, "leak", "eth0").unwrap();
        assert_eq!(fs::read_to_string(dir.join("net").join(a.to_string())).unwrap(), "keep\r\neth0");
        assert_eq!(store.release_all_except(&[("keep".into(), "eth0".into())]).unwrap(), vec![b]);
        assert_eq!(store.allocations().unwrap().len(), 1);
        drop(store);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn dual_stack_one_range_per_family_in_host_local_layout() {
        let dir = temp("dual");
        let store = Store::open(&dir, "net").unwrap();
        let v4: IpNet = "10.244.40.1/24".parse().unwrap();
        let v6: IpNet = "fd00:10:244:8::1/64".parse().unwrap();
        let a4 = store.allocate(v4, 0, "pod", "eth0").unwrap();
        let a6 = store.allocate(v6, 1, "pod", "eth0").unwrap();
        assert_eq!((a4.to_string(), a6.to_string()), ("10.244.40.2".into(), "fd00:10:244:8::2".into()));
        let net = dir.join("net");
        assert_eq!(fs::read_to_string(net.join("fd00:10:244:8::2")).unwrap(), "pod\r\neth0");
        assert_eq!(fs::read_to_string(net.join("last_reserved_ip.1")).unwrap(), "fd00:10:244:8::2");
        assert_eq!(fs::read_to_string(net.join("last_reserved_ip.0")).unwrap(), "10.244.40.2");
        let mut held = store.find("pod", "eth0").unwrap();
        held.sort();
        assert_eq!(held, vec![a4, a6]);
        let mut freed = store.release("pod", "eth0").unwrap();
        freed.sort();
        assert_eq!(freed, vec![a4, a6], "DEL frees both families");
        // Round-robin goes on after the last one handed out.
        assert_eq!(store.allocate(v6, 1, "next", "eth0").unwrap().to_string(), "fd00:10:244:8::3");
        drop(store);
        fs::remove_dir_all(dir).unwrap();
    }
}
