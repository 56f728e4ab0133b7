//! The one ethtool setting we need, TX checksum offload, through the
//! `SIOCETHTOOL` ioctl (no ethtool binary). The legacy `ETHTOOL_[GS]TXCSUM`
//! commands cover every TX checksum feature of the device at once
//! (`tx-checksum-ip-generic` on a VXLAN device).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_STXCSUM: u32 = 0x17;

#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// `struct ifreq` with the `ifr_data` member of its union.
#[repr(C)]
struct IfreqData {
    name: [u8; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    _rest: [u8; 16],
}

fn ethtool(device: &str, cmd: u32, data: u32) -> io::Result<u32> {
    let bytes = device.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad device name {device:?}")));
    }
    // SAFETY: socket() either fails or returns a descriptor that we own from here on.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor, owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut value = EthtoolValue { cmd, data };
    let mut request = IfreqData { name: [0; libc::IFNAMSIZ], data: std::ptr::null_mut(), _rest: [0; 16] };
    request.name[..bytes.len()].copy_from_slice(bytes);
    request.data = (&mut value as *mut EthtoolValue).cast();
    // SAFETY: request is a valid ifreq whose data points at a live ethtool_value for the whole call.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCETHTOOL, &mut request) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value.data)
}

/// Whether TX checksum offload is on for `device`.
pub fn tx_checksum(device: &str) -> io::Result<bool> {
    Ok(ethtool(device, ETHTOOL_GTXCSUM, 0)? != 0)
}

/// Turns TX checksum offload of `device` on or off.
pub fn set_tx_checksum(device: &str, on: bool) -> io::Result<()> {
    ethtool(device, ETHTOOL_STXCSUM, u32::from(on)).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_device_name_is_an_error_not_an_ioctl() {
        assert_eq!(tx_checksum("").unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(tx_checksum("a-name-far-too-long-for-linux").unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }
}
