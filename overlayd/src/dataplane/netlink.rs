//! One rtnetlink socket behind small typed calls: dumps, and batches of
//! requests sent many to a `sendmsg` with their acks collected by sequence.
//!
//! Batching is what makes 5,000 peers cheap: the kernel handles every message
//! of a `sendmsg` in one go, so a batch costs a few syscalls, not one per entry.

use std::io;

use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// Messages per `sendmsg`: their acks (16-byte header + 20 bytes each, with
/// NETLINK_CAP_ACK) stay far below the receive buffer, so none is dropped.
const BATCH: usize = 512;

/// Why a netlink call failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The socket itself failed.
    #[error("netlink socket: {0}")]
    Io(#[from] io::Error),
    /// The kernel sent something we could not decode.
    #[error("netlink decode: {0}")]
    Decode(String),
    /// The kernel refused a request.
    #[error("{what}: {source}")]
    Refused {
        /// Which request, in words.
        what: String,
        /// The kernel's errno.
        source: io::Error,
    },
}

/// A connected NETLINK_ROUTE socket in the caller's network namespace.
pub struct Netlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    /// Opens a socket in the current network namespace.
    pub fn open() -> Result<Self, NetlinkError> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        // Acks carry only the request header, not its whole payload.
        let _ = socket.set_cap_ack(true);
        let _ = socket.set_ext_ack(true);
        let _ = socket.set_rx_buf_sz(4 * 1024 * 1024);
        Ok(Netlink { socket, seq: 0, buf: vec![0; 64 * 1024] })
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
        mut each: impl FnMut(NetlinkMessage<RouteNetlinkMessage>) -> Result<(), NetlinkError>,
    ) -> Result<(), NetlinkError> {
        let n = loop {
            match self.socket.recv(&mut &mut self.buf[..], 0) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        };
        let data = std::mem::take(&mut self.buf);
        let mut offset = 0;
        let result = (|| {
            while offset < n {
                let frame =
                    NetlinkBuffer::new_checked(&data[offset..n]).map_err(|e| NetlinkError::Decode(e.to_string()))?;
                let len = frame.length() as usize;
                if len == 0 {
                    break;
                }
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..offset + len])
                    .map_err(|e| NetlinkError::Decode(e.to_string()))?;
                each(msg)?;
                offset += (len + 3) & !3;
            }
            Ok(())
        })();
        self.buf = data;
        result
    }

    /// Sends a dump request and returns every message of the answer.
    pub fn dump(&mut self, request: RouteNetlinkMessage) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        let mut out = Vec::new();
        let seq = self.encode(request, NLM_F_REQUEST | NLM_F_DUMP, &mut out);
        self.socket.send(&out, 0)?;
        let mut messages = Vec::new();
        let mut done = false;
        while !done {
            self.recv_each(|msg| {
                if msg.header.sequence_number != seq {
                    return Ok(());
                }
                match msg.payload {
                    NetlinkPayload::InnerMessage(inner) => messages.push(inner),
                    NetlinkPayload::Done(_) => done = true,
                    NetlinkPayload::Error(e) => {
                        return Err(NetlinkError::Refused { what: "dump".into(), source: e.to_io() })
                    }
                    _ => {}
                }
                Ok(())
            })?;
        }
        Ok(messages)
    }

    /// Sends one request and waits for its ack.
    pub fn request(&mut self, msg: RouteNetlinkMessage, flags: u16) -> Result<(), io::Error> {
        let results = self.batch(vec![(msg, flags)]).map_err(|e| match e {
            NetlinkError::Io(e) => e,
            other => io::Error::other(other.to_string()),
        })?;
        results.into_iter().next().unwrap_or(Ok(()))
    }

    /// Sends requests in batches and returns each one's result, in order.
    pub fn batch(
        &mut self,
        requests: Vec<(RouteNetlinkMessage, u16)>,
    ) -> Result<Vec<Result<(), io::Error>>, NetlinkError> {
        let mut results: Vec<Result<(), io::Error>> = Vec::with_capacity(requests.len());
        let mut requests = requests.into_iter().peekable();
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
            let count = results.len() - first;
            self.socket.send(&out, 0)?;
            let mut acked = 0;
            while acked < count {
                self.recv_each(|msg| {
                    let offset = msg.header.sequence_number.wrapping_sub(first_seq) as usize;
                    if offset >= count {
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
