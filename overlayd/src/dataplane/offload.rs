//! TX checksum offload of the VXLAN device, through the ethtool ioctl
//! (`SIOCETHTOOL`; no ethtool binary).
//!
//! Kernels up to 5.7 corrupt the UDP checksum of VXLAN packets whose outer
//! source port is later SNATed (kube-proxy's NodePort masquerade, a NAT on
//! the way): the receiver drops them and services stall for 63 s (flannel
//! #1279, #1243, #2152). Flannel leaves the fix to a manual
//! `ethtool -K flannel.1 tx-checksum-ip-generic off`; Calico turns offload
//! off on such kernels by default. So do we: `auto` is off up to 5.7.

/// `--vxlan-tx-checksum-offload`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OffloadSetting {
    /// Off on kernels up to 5.7 (the checksum bug), on after.
    Auto,
    On,
    Off,
}

impl OffloadSetting {
    /// As the flag takes it.
    pub fn name(self) -> &'static str {
        match self {
            OffloadSetting::Auto => "auto",
            OffloadSetting::On => "on",
            OffloadSetting::Off => "off",
        }
    }

    /// Whether offload should be on, on a kernel of this release (`uname -r`).
    pub fn wanted(self, kernel_release: &str) -> bool {
        match self {
            OffloadSetting::On => true,
            OffloadSetting::Off => false,
            OffloadSetting::Auto => !has_checksum_bug(kernel_release),
        }
    }
}

/// Whether a kernel of this release corrupts SNATed VXLAN checksums: 5.7 and
/// before. A release that cannot be read is assumed to (offload off is
/// always correct, only a little slower).
fn has_checksum_bug(release: &str) -> bool {
    let mut numbers = release.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty());
    let major: Option<u32> = numbers.next().and_then(|n| n.parse().ok());
    let minor: Option<u32> = numbers.next().and_then(|n| n.parse().ok());
    match (major, minor) {
        (Some(major), Some(minor)) => (major, minor) <= (5, 7),
        _ => true,
    }
}

/// This kernel's release, as `uname -r` prints it.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// Turns TX checksum offload of `device` on or off; true when it had to change.
pub fn ensure_tx_checksum(device: &str, on: bool) -> std::io::Result<bool> {
    if overlay_netlink::tx_checksum(device)? == on {
        return Ok(false);
    }
    overlay_netlink::set_tx_checksum(device, on)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_turns_offload_off_on_kernels_up_to_5_7() {
        for (release, buggy) in [
            ("3.10.0-1160.el7.x86_64", true),
            ("4.18.0-553.el8_10.x86_64", true),
            ("5.4.0-150-generic", true),
            ("5.7.19", true),
            ("5.8.0", false),
            ("5.14.0-427.el9.x86_64", false),
            ("6.1.0-18-amd64", false),
            ("10.0", false),
            ("", true),
            ("garbage", true),
        ] {
            assert_eq!(has_checksum_bug(release), buggy, "{release}");
            assert_eq!(OffloadSetting::Auto.wanted(release), !buggy, "{release}");
        }
        assert!(OffloadSetting::On.wanted("4.18.0") && !OffloadSetting::Off.wanted("6.1.0"));
    }
}
