//! The node's resources, each planned, diffed and applied: forwarding
//! (`sysctl`), the VXLAN device (`device`), the peer entries (`entries`,
//! through `overlay-netlink`), the masquerade table (`masq`, nftables) and
//! the subnet file (`subnet_file`); and the underlay they are built over.

pub mod device;
pub mod entries;
pub mod fast_path;
pub mod masq;
pub mod offload;
pub mod subnet_file;
pub mod sysctl;
pub mod underlay;

pub use device::DeviceSpec;
pub use underlay::Underlay;
