//! The kernel side of the node: the VXLAN device, the peer entries and
//! IPv4 forwarding, each planned, diffed and applied through
//! `overlay-netlink`; and the underlay they are built over.

pub mod device;
pub mod entries;
pub mod offload;
pub mod sysctl;
pub mod underlay;

pub use device::DeviceSpec;
pub use underlay::Underlay;
