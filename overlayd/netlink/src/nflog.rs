//! NFLOG: the packets an nftables `log group N` statement hands to user
//! space, read over nfnetlink (`NFNL_SUBSYS_ULOG`). The socket binds one
//! group and asks for the first bytes of each packet (its IP and transport
//! headers); each message gives the rule's prefix and those bytes.

use std::io;

use netlink_sys::{AsyncSocket, AsyncSocketExt, TokioSocket};

use crate::error::{Error, Result};

const NETLINK_NETFILTER: isize = 12;
const NFNL_SUBSYS_ULOG: u16 = 4;
const NFULNL_MSG_PACKET: u16 = 0;
const NFULNL_MSG_CONFIG: u16 = 1;
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_COPY_PACKET: u8 = 2;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_PREFIX: u16 = 10;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
/// The bytes of a packet asked for: an IPv6 header (40) and a transport header's ports, with room.
const COPY_RANGE: u32 = 96;

/// One logged packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedPacket {
    /// The `log` statement's prefix.
    pub prefix: String,
    /// The packet's first bytes, from its IP header on.
    pub payload: Vec<u8>,
}

/// A socket bound to one NFLOG group.
pub struct PacketLog {
    socket: TokioSocket,
    buf: Vec<u8>,
}

fn attribute(kind: u16, value: &[u8]) -> Vec<u8> {
    let len = 4 + value.len();
    let mut out = Vec::with_capacity(len.next_multiple_of(4));
    out.extend((len as u16).to_ne_bytes());
    out.extend(kind.to_ne_bytes());
    out.extend(value);
    out.resize(len.next_multiple_of(4), 0);
    out
}

/// A config request for `group`: nlmsghdr, nfgenmsg (AF_UNSPEC, version 0, the group big-endian), attributes.
fn config(group: u16, attributes: &[Vec<u8>], seq: u32) -> Vec<u8> {
    let body: Vec<u8> = attributes.concat();
    let len = 16 + 4 + body.len();
    let mut out = Vec::with_capacity(len);
    out.extend((len as u32).to_ne_bytes());
    out.extend(((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG).to_ne_bytes());
    out.extend((NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    out.extend(seq.to_ne_bytes());
    out.extend(0u32.to_ne_bytes());
    out.extend([0u8, 0u8]);
    out.extend(group.to_be_bytes());
    out.extend(body);
    out
}

impl PacketLog {
    /// Binds NFLOG group `group` in this network namespace (needs CAP_NET_ADMIN).
    pub async fn bind(group: u16) -> Result<Self> {
        let what = format!("binding NFLOG group {group}");
        let mut socket = TokioSocket::new(NETLINK_NETFILTER).map_err(Error::socket(what.clone()))?;
        socket.socket_mut().bind_auto().map_err(Error::socket(what.clone()))?;
        let mut mode = COPY_RANGE.to_be_bytes().to_vec();
        mode.extend([NFULNL_COPY_PACKET, 0]);
        let requests = [
            config(group, &[attribute(NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND])], 1),
            config(group, &[attribute(NFULA_CFG_MODE, &mode)], 2),
        ];
        let mut buf = Vec::with_capacity(64 * 1024);
        for request in requests {
            socket.socket_mut().send(&request, 0).map_err(Error::socket(what.clone()))?;
            buf.clear();
            socket.recv(&mut buf).await.map_err(Error::socket(what.clone()))?;
            // The ack: an error message whose code is 0, or the refusal (EBUSY: another listener has the group).
            if buf.len() >= 20 && u16::from_ne_bytes([buf[4], buf[5]]) == NLMSG_ERROR {
                let code = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
                if code != 0 {
                    return Err(Error::Socket { what, source: io::Error::from_raw_os_error(-code) });
                }
            }
        }
        Ok(PacketLog { socket, buf })
    }

    /// The packets of the next datagram. An overflow (the kernel dropped
    /// some, ENOBUFS) is no packet: logging is best effort.
    pub async fn next(&mut self) -> Result<Vec<LoggedPacket>> {
        self.buf.clear();
        match self.socket.recv(&mut self.buf).await {
            Ok(()) => Ok(packets(&self.buf)),
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(Vec::new()),
            Err(e) => Err(Error::socket("reading NFLOG")(e)),
        }
    }
}

/// The logged packets of one datagram.
fn packets(datagram: &[u8]) -> Vec<LoggedPacket> {
    let mut out = Vec::new();
    let mut rest = datagram;
    while rest.len() >= 20 {
        let len = (u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize).min(rest.len());
        if len < 20 {
            break;
        }
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        if kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET {
            let mut packet = LoggedPacket { prefix: String::new(), payload: Vec::new() };
            let mut attrs = &rest[20..len];
            while attrs.len() >= 4 {
                let alen = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
                let akind = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
                if alen < 4 || alen > attrs.len() {
                    break;
                }
                let value = &attrs[4..alen];
                match akind {
                    NFULA_PREFIX => {
                        packet.prefix =
                            String::from_utf8_lossy(value.split(|b| *b == 0).next().unwrap_or_default()).into()
                    }
                    NFULA_PAYLOAD => packet.payload = value.to_vec(),
                    _ => {}
                }
                attrs = attrs.get(alen.next_multiple_of(4)..).unwrap_or_default();
            }
            out.push(packet);
        }
        rest = rest.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_packet_message_gives_its_prefix_and_payload() {
        let attrs =
            [attribute(NFULA_PREFIX, b"overlay-ingress\0"), attribute(NFULA_PAYLOAD, &[0x45, 0, 0, 60])].concat();
        let len = 20 + attrs.len();
        let mut msg = Vec::new();
        msg.extend((len as u32).to_ne_bytes());
        msg.extend(((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET).to_ne_bytes());
        msg.extend([0u8; 10]);
        msg.extend([2u8, 0, 0, 7]);
        msg.extend(attrs);
        let two = [msg.clone(), msg].concat();
        let got = packets(&two);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], LoggedPacket { prefix: "overlay-ingress".into(), payload: vec![0x45, 0, 0, 60] });
    }

    #[test]
    fn a_config_request_is_laid_out_as_nfnetlink_wants() {
        let request = config(2718, &[attribute(NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND])], 1);
        assert_eq!(request.len(), 16 + 4 + 8);
        assert_eq!(u32::from_ne_bytes(request[0..4].try_into().unwrap()) as usize, request.len());
        assert_eq!(&request[18..20], &2718u16.to_be_bytes());
        assert_eq!(u16::from_ne_bytes([request[20], request[21]]), 5, "the attribute's length, unpadded");
    }
}
