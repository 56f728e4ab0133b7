//! Address allocation inside the plugin, in host-local's on-disk layout: one
//! file per address under `<dataDir>/<network>/`, holding the container ID
//! and ifname; every change under an exclusive lock, so concurrent plugin
//! processes never hand out one address twice.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;

use crate::error::{code, CniError};

const LAST_RESERVED: &str = "last_reserved_ip.0";

/// The allocations of one network, locked for as long as this value lives.
pub struct Store {
    dir: PathBuf,
    _lock: File,
}

/// One recorded allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// The address.
    pub ip: Ipv4Addr,
    /// Owner container.
    pub container_id: String,
    /// Owner interface.
    pub ifname: String,
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
        // SAFETY: flock on a file descriptor we own; released when `lock` closes.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(CniError::io(format!("locking {}", lock_path.display()), std::io::Error::last_os_error()));
        }
        Ok(Store { dir, _lock: lock })
    }

    /// Every allocation on disk.
    pub fn allocations(&self) -> Result<Vec<Allocation>, CniError> {
        let entries =
            fs::read_dir(&self.dir).map_err(|e| CniError::io(format!("reading {}", self.dir.display()), e))?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let Some(ip) = entry.file_name().to_str().and_then(|n| n.parse::<Ipv4Addr>().ok()) else { continue };
            let text = fs::read_to_string(entry.path()).unwrap_or_default();
            let mut lines = text.lines().map(str::trim);
            let container_id = lines.next().unwrap_or_default().to_string();
            let ifname = lines.next().unwrap_or_default().to_string();
            out.push(Allocation { ip, container_id, ifname });
        }
        Ok(out)
    }

    /// The address held by this attachment, if any.
    pub fn find(&self, container_id: &str, ifname: &str) -> Result<Option<Ipv4Addr>, CniError> {
        Ok(self.allocations()?.into_iter().find(|a| a.container_id == container_id && a.ifname == ifname).map(|a| a.ip))
    }

    /// Allocates an address of `subnet` (whose `.addr()` is the gateway),
    /// never the network, gateway or broadcast address; round-robin after the
    /// last one handed out, as host-local does.
    pub fn allocate(&self, subnet: Ipv4Net, container_id: &str, ifname: &str) -> Result<Ipv4Addr, CniError> {
        let network = subnet.trunc();
        let gateway = subnet.addr();
        let first = u32::from(network.network()) + 1;
        let last = u32::from(network.broadcast()).saturating_sub(1);
        if last < first {
            return Err(CniError::new(code::INVALID_CONFIG, format!("subnet {network} has no room for pods")));
        }
        let size = last - first + 1;
        let start = fs::read_to_string(self.dir.join(LAST_RESERVED))
            .ok()
            .and_then(|t| t.trim().parse::<Ipv4Addr>().ok())
            .filter(|ip| network.contains(ip))
            .map(|ip| u32::from(ip).saturating_sub(first) + 1)
            .unwrap_or(0);
        for step in 0..size {
            let ip = Ipv4Addr::from(first + (start + step) % size);
            if ip == gateway {
                continue;
            }
            let path = self.dir.join(ip.to_string());
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    f.write_all(format!("{container_id}\r\n{ifname}").as_bytes())
                        .map_err(|e| CniError::io(format!("writing {}", path.display()), e))?;
                    let _ = fs::write(self.dir.join(LAST_RESERVED), ip.to_string());
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
    pub fn release(&self, container_id: &str, ifname: &str) -> Result<Vec<Ipv4Addr>, CniError> {
        self.release_where(|a| a.container_id == container_id && a.ifname == ifname)
    }

    /// Releases every allocation whose attachment is not in `valid` (GC).
    pub fn release_all_except(&self, valid: &[(String, String)]) -> Result<Vec<Ipv4Addr>, CniError> {
        self.release_where(|a| !valid.iter().any(|(id, ifname)| *id == a.container_id && *ifname == a.ifname))
    }

    fn release_where(&self, doomed: impl Fn(&Allocation) -> bool) -> Result<Vec<Ipv4Addr>, CniError> {
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

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("overlay-ipam-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn never_hands_out_network_gateway_or_broadcast_and_fills_up() {
        let dir = temp("fill");
        let subnet: Ipv4Net = "10.244.1.1/29".parse().unwrap();
        let store = Store::open(&dir, "net").unwrap();
        let mut got = HashSet::new();
        for i in 0..5 {
            got.insert(store.allocate(subnet, &format!("c{i}"), "eth0").unwrap());
        }
        let want: HashSet<Ipv4Addr> = (2..=6).map(|h| Ipv4Addr::new(10, 244, 1, h)).collect();
        assert_eq!(got, want);
        let e = store.allocate(subnet, "c9", "eth0").unwrap_err();
        assert!(e.msg.contains("no free address"), "{e}");
        assert_eq!(store.find("c3", "eth0").unwrap(), Some(Ipv4Addr::new(10, 244, 1, 5)));
        assert_eq!(store.release("c3", "eth0").unwrap(), vec![Ipv4Addr::new(10, 244, 1, 5)]);
        assert!(store.release("c3", "eth0").unwrap().is_empty(), "release is idempotent");
        assert_eq!(store.allocate(subnet, "c9", "eth0").unwrap(), Ipv4Addr::new(10, 244, 1, 5));
        drop(store);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn host_local_file_layout_and_gc() {
        let dir = temp("gc");
        let store = Store::open(&dir, "net").unwrap();
        let subnet: Ipv4Net = "10.244.1.1/24".parse().unwrap();
        let a = store.allocate(subnet, "keep", "eth0").unwrap();
        let b = store.allocate(subnet, "leak", "eth0").unwrap();
        assert_eq!(fs::read_to_string(dir.join("net").join(a.to_string())).unwrap(), "keep\r\neth0");
        assert_eq!(store.release_all_except(&[("keep".into(), "eth0".into())]).unwrap(), vec![b]);
        assert_eq!(store.allocations().unwrap().len(), 1);
        drop(store);
        fs::remove_dir_all(dir).unwrap();
    }
}
