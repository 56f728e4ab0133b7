//! `net.ipv4.ip_forward` as a resource: pods' traffic is routed through the
//! node, so forwarding must be on, and stay on.

use std::io;

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// Makes sure IPv4 forwarding is on in this network namespace; true when it had to be turned on.
pub fn ensure_ip_forward() -> io::Result<bool> {
    if std::fs::read_to_string(IP_FORWARD)?.trim() == "1" {
        return Ok(false);
    }
    std::fs::write(IP_FORWARD, "1").map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("setting net.ipv4.ip_forward=1: {e} (in an unprivileged container /proc/sys is read-only: set it on the host)"),
        )
    })?;
    Ok(true)
}
