//! What a user would check: pings, and the source address a TCP server sees.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::netns::Netns;

/// One ping from `from` to `to`; true when a reply came back.
pub fn ping(from: &Netns, to: impl Into<IpAddr>) -> bool {
    from.exec("ping", &["-c", "1", "-W", "1", "-q", &to.into().to_string()]).is_ok()
}

/// Pings until a reply comes or `timeout` passes.
pub fn ping_until(from: &Netns, to: impl Into<IpAddr>, timeout: Duration) -> bool {
    let to = to.into().to_string();
    crate::wait_until(timeout, || from.exec("ping", &["-c", "1", "-W", "0.3", "-q", &to]).is_ok())
}

/// One ping whose packets are exactly `mtu` bytes, with fragmentation
/// forbidden (DF; IPv6 never fragments in transit): true when it came back
/// whole. The ICMP payload is the MTU minus the IP and ICMP headers.
pub fn ping_full_size(from: &Netns, to: impl Into<IpAddr>, mtu: u32) -> Result<()> {
    let to = to.into();
    let headers = if to.is_ipv4() { 20 + 8 } else { 40 + 8 };
    let size = (mtu - headers).to_string();
    from.exec("ping", &["-c", "2", "-W", "1", "-q", "-M", "do", "-s", &size, &to.to_string()]).map(|_| ())
}

/// A background `ping -c count -i interval`; finish with [`PingRun::finish`].
pub struct PingRun {
    child: Child,
}

impl PingRun {
    /// Starts pinging.
    pub fn start(from: &Netns, to: impl Into<IpAddr>, count: u32, interval: &str) -> Result<Self> {
        let to = to.into();
        let child = from
            .command("ping", &["-q", "-c", &count.to_string(), "-i", interval, "-W", "2", &to.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        Ok(PingRun { child })
    }

    /// Waits for the end; returns (sent, received).
    pub fn finish(self) -> Result<(u32, u32)> {
        let out = self.child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .ok_or_else(|| anyhow!("no ping summary in {text:?}"))?;
        let nums: Vec<u32> = line.split(|c: char| !c.is_ascii_digit()).filter_map(|s| s.parse().ok()).collect();
        if nums.len() < 2 {
            bail!("cannot read ping summary {line:?}");
        }
        Ok((nums[0], nums[1]))
    }
}

/// Runs `f` on a thread that has entered `ns`'s network namespace: sockets it
/// opens live in that namespace.
pub fn in_netns<T: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> std::thread::JoinHandle<Result<T>> {
    in_netns_path(&ns.path(), f)
}

/// [`in_netns`] for a namespace given by its path.
pub fn in_netns_path<T: Send + 'static>(
    path: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> std::thread::JoinHandle<Result<T>> {
    let path = path.to_string();
    std::thread::spawn(move || {
        let file = File::open(&path).with_context(|| format!("opening {path}"))?;
        // SAFETY: setns on a valid namespace fd affects only this thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns {path}: {}", std::io::Error::last_os_error());
        }
        f()
    })
}

/// Connects from `client` to a TCP server started in `server` on `server_ip`,
/// and returns the source address the server saw.
pub fn tcp_source_seen(server: &Netns, server_ip: Ipv4Addr, client: &Netns) -> Result<Ipv4Addr> {
    match tcp_source_seen_ip(server, server_ip.into(), client)? {
        IpAddr::V4(ip) => Ok(ip),
        other => bail!("unexpected peer {other}"),
    }
}

/// [`tcp_source_seen`] in either family.
pub fn tcp_source_seen_ip(server: &Netns, server_ip: IpAddr, client: &Netns) -> Result<IpAddr> {
    let (port_tx, port_rx) = mpsc::channel();
    let server_thread = in_netns(server, move || {
        let listener = TcpListener::bind((server_ip, 0))?;
        port_tx.send(listener.local_addr()?.port())?;
        listener.set_nonblocking(true)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match listener.accept() {
                Ok((_, peer)) => return Ok(peer),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => bail!("server accepted nothing: {e}"),
            }
        }
    });
    let port = port_rx.recv_timeout(Duration::from_secs(5)).context("server did not start")?;
    let client_thread = in_netns(client, move || {
        TcpStream::connect_timeout(&SocketAddr::from((server_ip, port)), Duration::from_secs(5))
            .context("connecting")?;
        Ok(())
    });
    client_thread.join().map_err(|_| anyhow!("client thread panicked"))??;
    let peer = server_thread.join().map_err(|_| anyhow!("server thread panicked"))??;
    Ok(peer.ip())
}

/// A plain HTTP GET from inside `ns`; returns (status code, body).
/// GETs each of `paths` from `addr` in `ns`, one connection each, at once:
/// status and body of each, in order (for many quick questions).
pub fn http_get_many(ns: &Netns, addr: SocketAddr, paths: Vec<String>) -> Result<Vec<(u16, String)>> {
    in_netns(ns, move || {
        use std::io::{Read, Write};
        paths
            .iter()
            .map(|path| {
                let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
                stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
                let mut text = String::new();
                stream.read_to_string(&mut text)?;
                status_and_body(&text)
            })
            .collect()
    })
    .join()
    .map_err(|_| anyhow!("http thread panicked"))?
}

/// An HTTP/1.0 response's status code and body.
fn status_and_body(text: &str) -> Result<(u16, String)> {
    let status =
        text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| anyhow!("bad response {text:?}"))?;
    Ok((status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
}

pub fn http_get(ns: &Netns, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let path = path.to_string();
    in_netns(ns, move || {
        use std::io::{Read, Write};
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        // The request line and the headers go in separate segments, as slow
        // clients send them: the server must wait for the whole head (one that
        // answers early closes with unread bytes, and the client gets a reset).
        stream.write_all(format!("GET {path} HTTP/1.0\r\n").as_bytes())?;
        stream.set_read_timeout(Some(Duration::from_millis(200)))?;
        let mut early = [0u8; 1];
        match stream.peek(&mut early) {
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            other => bail!("server answered before the request was complete: {other:?}"),
        }
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        stream.write_all(format!("Host: {addr}\r\n\r\n").as_bytes())?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        status_and_body(&text)
    })
    .join()
    .map_err(|_| anyhow!("http thread panicked"))?
}

/// The value of metric `name` (its full sample name, without labels or with
/// them, e.g. `overlay_resyncs_total`) on the `/metrics` endpoint at `addr` inside `ns`.
pub fn metric(ns: &Netns, addr: SocketAddr, name: &str) -> Result<u64> {
    let (_, text) = http_get(ns, addr, "/metrics")?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow!("no {name} in\n{text}"))
}

/// Sends `bytes` of a pattern from `client` to `connect_to` over TCP, where
/// a server bound in `server` on `listen` echoes everything back, and checks
/// that what came back is what was sent, byte for byte: both directions of
/// a long connection, which a fast path carries. The server answers one
/// connection; `connect_to` may differ from `listen` (a DNAT on the way).
/// Namespaces are given by path (`Netns::path`).
pub fn tcp_echo(server: &str, listen: SocketAddr, client: &str, connect_to: SocketAddr, bytes: usize) -> Result<()> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let server_thread = in_netns_path(server, move || {
        let listener = TcpListener::bind(listen)?;
        ready_tx.send(())?;
        listener.set_nonblocking(true)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut conn = loop {
            match listener.accept() {
                Ok((c, _)) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => bail!("echo server accepted nothing: {e}"),
            }
        };
        conn.set_nonblocking(false)?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = std::io::Read::read(&mut conn, &mut buf)?;
            if n == 0 {
                return Ok(());
            }
            std::io::Write::write_all(&mut conn, &buf[..n])?;
        }
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).context("echo server did not start")?;
    let client_thread = in_netns_path(client, move || {
        let pattern: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
        let conn = TcpStream::connect_timeout(&connect_to, Duration::from_secs(5)).context("connecting")?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut writer = conn.try_clone()?;
        let sent = pattern.clone();
        let write = std::thread::spawn(move || -> std::io::Result<()> {
            std::io::Write::write_all(&mut writer, &sent)?;
            writer.shutdown(std::net::Shutdown::Write)
        });
        let mut back = Vec::with_capacity(bytes);
        std::io::Read::read_to_end(&mut (&conn), &mut back).context("reading the echo")?;
        write.join().map_err(|_| anyhow!("writer panicked"))?.context("sending")?;
        if back != pattern {
            let at = back.iter().zip(&pattern).position(|(a, b)| a != b).unwrap_or(back.len().min(bytes));
            bail!("the echo differs from what was sent at byte {at} ({} bytes back of {bytes})", back.len());
        }
        Ok(())
    });
    client_thread.join().map_err(|_| anyhow!("client thread panicked"))??;
    server_thread.join().map_err(|_| anyhow!("server thread panicked"))??;
    Ok(())
}
