//! Named rtnetlink operations shared by overlayd and overlay-cni. Callers
//! ask for a link by name, set it up, add an address, a route or a
//! neighbour; they never build a netlink message themselves.
//!
//! Two sockets for two jobs:
//! - [`Netlink`], rtnetlink's async handle, for the few named operations on
//!   devices, addresses and single routes;
//! - [`Bulk`], one blocking socket that sends hundreds of requests per
//!   `sendmsg`, for the thousands of peer entries a reconcile may write and
//!   the filtered dumps that read them back.

mod bulk;
mod entry;
mod error;
mod ethtool;
mod events;
mod handle;
mod link;
mod nflog;

pub use bulk::{Bulk, RouteFilter};
pub use entry::{Change, Entry, FdbEntry, Neighbour, Route, PROTOCOL_BOOT};
pub use error::{Error, Result};
pub use ethtool::{set_tx_checksum, tx_checksum};
pub use events::{KernelEvent, KernelEvents, DEFAULT_BUFFER, NFPROTO_IPV4, NFPROTO_IPV6};
pub use handle::{Netlink, VxlanDevice};
pub use link::{Link, VxlanSettings};
pub use netlink_packet_route::AddressFamily;
pub use nflog::{LoggedPacket, PacketLog};
