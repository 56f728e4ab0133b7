//! overlayd as a library: the daemon's modules, and the netlink layer the CNI
//! plugin (`overlay-cni`) shares with it.

pub mod backoff;
pub mod daemon;
pub mod dataplane;
pub mod flags;
pub mod health;
pub mod lease;
pub mod masq;
pub mod plan;
pub mod subnet_file;
