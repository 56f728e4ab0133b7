//! Forwarding and router advertisements as resources: pods' traffic is
//! routed through the node, so forwarding must be on (and stay on) in every
//! family the network carries; a VXLAN device must not take part in SLAAC.

use std::io;
use std::path::Path;

use proto::Family;
use tracing::info;

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
const IPV6_FORWARDING: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

fn read(path: &Path) -> io::Result<String> {
    Ok(std::fs::read_to_string(path)?.trim().to_string())
}

fn write(path: &Path, value: &str, name: &str) -> io::Result<()> {
    std::fs::write(path, value).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "setting {name}={value}: {e} (in an unprivileged container /proc/sys is read-only: set it on the host)"
            ),
        )
    })
}

/// Makes sure forwarding of `family` is on in this network namespace; true
/// when it had to be turned on. For IPv6, an underlay interface that
/// accepts router advertisements (`accept_ra=1`) would stop doing so once
/// the host forwards, and lose its default route: it is moved to
/// `accept_ra=2` (accept them while forwarding) first.
pub fn ensure_forwarding(family: Family, underlay: Option<&str>) -> io::Result<bool> {
    match family {
        Family::V4 => {
            if read(Path::new(IP_FORWARD))? == "1" {
                return Ok(false);
            }
            write(Path::new(IP_FORWARD), "1", "net.ipv4.ip_forward")?;
            Ok(true)
        }
        Family::V6 => {
            if read(Path::new(IPV6_FORWARDING))? == "1" {
                return Ok(false);
            }
            if let Some(iface) = underlay {
                let accept_ra = Path::new("/proc/sys/net/ipv6/conf").join(iface).join("accept_ra");
                if read(&accept_ra).is_ok_and(|v| v == "1") {
                    write(&accept_ra, "2", &format!("net.ipv6.conf.{iface}.accept_ra"))?;
                    info!(iface, "set accept_ra=2 so the underlay keeps its router advertisements while forwarding");
                }
            }
            write(Path::new(IPV6_FORWARDING), "1", "net.ipv6.conf.all.forwarding")?;
            Ok(true)
        }
    }
}

/// Makes sure `device` ignores router advertisements; true when it had to be changed.
///
/// In an unprivileged container `/proc/sys` is read-only. The device then
/// keeps the kernel's default `accept_ra=1`, which ignores advertisements as
/// long as the device forwards (forwarding is a precondition of the network
/// anyway), so that is accepted, not retried for ever.
pub fn ensure_accept_ra_off(device: &str) -> io::Result<bool> {
    let conf = Path::new("/proc/sys/net/ipv6/conf").join(device);
    let path = conf.join("accept_ra");
    let value = read(&path)?;
    if value == "0" {
        return Ok(false);
    }
    match write(&path, "0", &format!("net.ipv6.conf.{device}.accept_ra")) {
        Ok(()) => Ok(true),
        Err(e) if value == "1" && read(&conf.join("forwarding")).is_ok_and(|f| f == "1") => {
            tracing::debug!(device, error = %e, "accept_ra stays 1: the device forwards, so router advertisements are ignored");
            Ok(false)
        }
        Err(e) => Err(e),
    }
}
