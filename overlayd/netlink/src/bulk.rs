//! The bulk path: one blocking NETLINK_ROUTE socket that sends many requests
//! per `sendmsg` and matches their acks by sequence number, and reads the
//! node's entries back with dumps the kernel filters.
//!
//! Batching is what makes 5,000 peers cheap: the kernel handles every message
//! of a `sendmsg` in one go, so a batch costs a few syscalls, not one per
//! entry. It blocks, so an async caller runs it on a blocking thread.

use std::io;
use std::net::IpAddr;

use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::{
    neighbour::{NeighbourAttribute, NeighbourMessage},
    route::{RouteAttribute, RouteHeader, RouteMessage, RouteProtocol},
    AddressFamily, RouteNetlinkMessage,
};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::entry::{Change, Entry, FdbEntry, Neighbour, Route};
use crate::error::{Error, Result};

/// Which routes a dump reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteFilter {
    /// Those made with this route protocol (`proto 77`).
    Protocol(u8),
    /// Those through this device.
    Device(u32),
}

/// Messages per `sendmsg`: their acks (16-byte header + 20 bytes each, with
/// NETLINK_CAP_ACK) stay far below the receive buffer, so none is dropped.
const BATCH: usize = 512;

/// A blocking NETLINK_ROUTE socket for batches and filtered dumps.
pub struct Bulk {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Bulk {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> Result<Self> {
        let what = "opening a netlink socket";
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(Error::socket(what))?;
        socket.bind_auto().map_err(Error::socket(what))?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(Error::socket(what))?;
        // Acks carry only the request header, not its whole payload.
        let _ = socket.set_cap_ack(true);
        let _ = socket.set_ext_ack(true);
        // Dumps honour the filters in the request (device, protocol, table).
        socket.set_netlink_get_strict_chk(true).map_err(Error::socket(what))?;
        let _ = socket.set_rx_buf_sz(4 * 1024 * 1024);
        Ok(Bulk { socket, seq: 0, buf: vec![0; 64 * 1024] })
    }

    /// The permanent and non-permanent neighbour entries of `family` on `ifindex`.
    pub fn neighbours(&mut self, ifindex: u32, family: AddressFamily) -> Result<Vec<(Neighbour, bool)>> {
        let mut req = NeighbourMessage::default();
        req.header.family = family;
        req.attributes.push(NeighbourAttribute::IfIndex(ifindex));
        let messages = self.dump(RouteNetlinkMessage::GetNeighbour(req), "reading neighbour entries")?;
        Ok(messages
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) => Neighbour::from_message(n),
                _ => None,
            })
            .filter(|(n, _)| n.ifindex == ifindex)
            .collect())
    }

    /// The FDB entries of device `ifindex` that point at a remote VTEP.
    pub fn fdb(&mut self, ifindex: u32) -> Result<Vec<FdbEntry>> {
        let mut req = NeighbourMessage::default();
        req.header.family = AddressFamily::Bridge;
        req.header.ifindex = ifindex;
        let messages = self.dump(RouteNetlinkMessage::GetNeighbour(req), "reading FDB entries")?;
        Ok(messages
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) => FdbEntry::from_message(n),
                _ => None,
            })
            .filter(|f| f.ifindex == ifindex)
            .collect())
    }

    /// The main table's routes of `family` that `filter` selects, filtered
    /// by the kernel: a node with a large routing table (a BGP full table)
    /// costs no more to read than one without.
    pub fn routes(&mut self, family: AddressFamily, filter: RouteFilter) -> Result<Vec<Route>> {
        let mut req = RouteMessage::default();
        req.header.address_family = family;
        req.header.table = RouteHeader::RT_TABLE_MAIN;
        match filter {
            RouteFilter::Protocol(protocol) => req.header.protocol = RouteProtocol::from(protocol),
            RouteFilter::Device(index) => req.attributes.push(RouteAttribute::Oif(index)),
        }
        let messages = self.dump(RouteNetlinkMessage::GetRoute(req), "reading routes")?;
        Ok(messages
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => Route::from_message(r),
                _ => None,
            })
            // Older kernels ignore a filter they do not know: held to it here too.
            .filter(|r| match filter {
                RouteFilter::Protocol(protocol) => r.protocol == protocol,
                RouteFilter::Device(index) => r.oif == Some(index),
            })
            .collect())
    }

    /// Sends `changes` in batches and returns each one's result, in order. A
    /// delete of something already gone counts as done.
    pub fn apply(&mut self, changes: &[Change]) -> Result<Vec<Result<()>>> {
        const SET: u16 = NLM_F_CREATE | NLM_F_REPLACE;
        const ADD: u16 = NLM_F_CREATE | NLM_F_EXCL;
        let requests = changes.iter().map(|change| match *change {
            Change::Add(Entry::Neighbour(n)) => (RouteNetlinkMessage::NewNeighbour(n.message()), ADD),
            Change::Add(Entry::Fdb(f)) => (RouteNetlinkMessage::NewNeighbour(f.message()), ADD),
            Change::Add(Entry::Route(r)) => (RouteNetlinkMessage::NewRoute(r.message()), ADD),
            Change::Set(Entry::Neighbour(n)) => (RouteNetlinkMessage::NewNeighbour(n.message()), SET),
            Change::Set(Entry::Fdb(f)) => (RouteNetlinkMessage::NewNeighbour(f.message()), SET),
            Change::Set(Entry::Route(r)) => (RouteNetlinkMessage::NewRoute(r.message()), SET),
            Change::Delete(Entry::Neighbour(n)) => (RouteNetlinkMessage::DelNeighbour(n.message()), 0),
            Change::Delete(Entry::Fdb(f)) => (RouteNetlinkMessage::DelNeighbour(f.message()), 0),
            Change::Delete(Entry::Route(r)) => (RouteNetlinkMessage::DelRoute(r.message()), 0),
        });
        let acks = self.batch(requests, changes.len())?;
        Ok(changes
            .iter()
            .zip(acks)
            .map(|(change, ack)| match ack {
                Err(e) if change.is_delete() && matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) => Ok(()),
                Err(source) => Err(Error::Refused { what: describe(change), source }),
                Ok(()) => Ok(()),
            })
            .collect())
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn encode(&mut self, msg: RouteNetlinkMessage, flags: u16, out: &mut Vec<u8>) -> u32 {
        let seq = self.next_seq();
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        packet.finalize();
        let start = out.len();
        out.resize(start + packet.buffer_len(), 0);
        packet.serialize(&mut out[start..]);
        seq
    }

    /// Reads one datagram and calls `each` for every message in it.
    fn recv_each(
        &mut self,
        what: &str,
        mut each: impl FnMut(NetlinkMessage<RouteNetlinkMessage>) -> Result<()>,
    ) -> Result<()> {
        let n = loop {
            match self.socket.recv(&mut &mut self.buf[..], 0) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::socket(what)(e)),
            }
        };
        let data = std::mem::take(&mut self.buf);
        let mut offset = 0;
        let result = (|| {
            while offset < n {
                let frame = NetlinkBuffer::new_checked(&data[offset..n])
                    .map_err(|e| Error::Protocol { what: what.into(), detail: e.to_string() })?;
                let len = frame.length() as usize;
                if len == 0 {
                    break;
                }
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..offset + len])
                    .map_err(|e| Error::Protocol { what: what.into(), detail: e.to_string() })?;
                each(msg)?;
                offset += (len + 3) & !3;
            }
            Ok(())
        })();
        self.buf = data;
        result
    }

    /// Sends a dump request and returns every message of the answer.
    fn dump(&mut self, request: RouteNetlinkMessage, what: &str) -> Result<Vec<RouteNetlinkMessage>> {
        let mut out = Vec::new();
        let seq = self.encode(request, NLM_F_REQUEST | NLM_F_DUMP, &mut out);
        self.socket.send(&out, 0).map_err(Error::socket(what))?;
        let mut messages = Vec::new();
        let mut done = false;
        while !done {
            self.recv_each(what, |msg| {
                if msg.header.sequence_number != seq {
                    return Ok(());
                }
                match msg.payload {
                    NetlinkPayload::InnerMessage(inner) => messages.push(inner),
                    NetlinkPayload::Done(_) => done = true,
                    NetlinkPayload::Error(e) => return Err(Error::Refused { what: what.into(), source: e.to_io() }),
                    _ => {}
                }
                Ok(())
            })?;
        }
        Ok(messages)
    }

    /// Sends requests many to a `sendmsg` and returns each ack, in order.
    fn batch(
        &mut self,
        requests: impl Iterator<Item = (RouteNetlinkMessage, u16)>,
        count: usize,
    ) -> Result<Vec<io::Result<()>>> {
        let what = "sending a batch of entries";
        let mut results: Vec<io::Result<()>> = Vec::with_capacity(count);
        let mut requests = requests.peekable();
        let mut out = Vec::new();
        while requests.peek().is_some() {
            out.clear();
            let first = results.len();
            let mut first_seq = None;
            for (msg, flags) in requests.by_ref().take(BATCH) {
                let seq = self.encode(msg, flags | NLM_F_REQUEST | NLM_F_ACK, &mut out);
                first_seq.get_or_insert(seq);
                results.push(Ok(()));
            }
            let first_seq = first_seq.unwrap_or(0);
            let sent = results.len() - first;
            self.socket.send(&out, 0).map_err(Error::socket(what))?;
            let mut acked = 0;
            while acked < sent {
                self.recv_each(what, |msg| {
                    let offset = msg.header.sequence_number.wrapping_sub(first_seq) as usize;
                    if offset >= sent {
                        return Ok(());
                    }
                    if let NetlinkPayload::Error(e) = msg.payload {
                        acked += 1;
                        if e.code.is_some() {
                            results[first + offset] = Err(e.to_io());
                        }
                    }
                    Ok(())
                })?;
            }
        }
        Ok(results)
    }
}

/// A change in words, for errors: `set route 10.244.2.0/24 via 10.244.2.0`.
fn describe(change: &Change) -> String {
    let (verb, entry) = match change {
        Change::Set(e) => ("set", e),
        Change::Add(e) => ("add", e),
        Change::Delete(e) => ("delete", e),
    };
    match entry {
        Entry::Neighbour(n) => format!("{verb} neighbour {} lladdr {}", n.ip, n.mac),
        Entry::Fdb(f) => format!("{verb} FDB entry {} dst {}", f.mac, f.dst),
        Entry::Route(r) => {
            let via = r.gateway.map(|g: IpAddr| format!(" via {g}")).unwrap_or_default();
            format!("{verb} route {}{via}", r.destination)
        }
    }
}
