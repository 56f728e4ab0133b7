//! Pure types and formats shared by `overlayd` and `overlay-cni`.
//!
//! Everything here is flannel-compatible on the wire (etcd keys and values,
//! net-conf.json, subnet.env), so mixed clusters and drop-in migration work.
//! No I/O, no async: these are the parts worth property-testing.

pub mod alloc;
pub mod family;
pub mod hash;
pub mod lease;
pub mod mac;
pub mod net_config;
pub mod node_annotations;
pub mod subnet_env;

pub use alloc::SubnetRange;
pub use family::{Address, Family};
pub use lease::{BackendData, LeaseAttrs, LeaseKey, LeaseKeyError, VxlanBackendData};
pub use mac::MacAddr;
pub use net_config::{unknown_keys, Backend, ConfigError, NetConfig, Pool, UnknownKey};
pub use node_annotations::{NodeAnnotations, NodeLeaseError};
pub use subnet_env::{FamilyEnv, SubnetEnv, SubnetEnvError};
