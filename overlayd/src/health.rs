//! `/healthz`, `/readyz` and `/metrics` over a deliberately tiny HTTP/1.0
//! server: three fixed GET endpoints do not justify an HTTP framework's
//! memory and build time.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::warn;

/// Counters and gauges shared by the daemon loop and the HTTP server.
#[derive(Default)]
pub struct Metrics {
    /// Peers currently programmed.
    pub peers: AtomicU64,
    /// Leases seen in the store (peers plus ours).
    pub leases: AtomicU64,
    /// Netlink operations sent.
    pub netlink_ops: AtomicU64,
    /// Netlink operations the kernel refused, and failed reconciles.
    pub netlink_errors: AtomicU64,
    /// Reconciles run.
    pub resyncs: AtomicU64,
    /// Duration of the last reconcile, microseconds.
    pub last_resync_micros: AtomicU64,
    /// Unix time of the last successful lease renewal.
    pub last_renewal_unix: AtomicU64,
    /// Lease renewals that failed.
    pub renewal_errors: AtomicU64,
    /// Peer events received from the lease store.
    pub watch_events: AtomicU64,
    /// Lease held.
    pub lease_held: AtomicBool,
    /// Device up and entries programmed at least once.
    pub dataplane_ready: AtomicBool,
    /// subnet.env written.
    pub subnet_file_written: AtomicBool,
}

impl Metrics {
    /// Records a successful renewal now.
    pub fn renewed_now(&self) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        self.last_renewal_unix.store(now, Relaxed);
    }

    /// Ready means: lease held, device up and programmed, subnet file written.
    pub fn ready(&self) -> bool {
        self.lease_held.load(Relaxed) && self.dataplane_ready.load(Relaxed) && self.subnet_file_written.load(Relaxed)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let get = |c: &AtomicU64| c.load(Relaxed) as f64;
        let rows: [(&str, &str, &str, f64); 10] = [
            ("overlay_peers", "gauge", "Peer nodes programmed into the dataplane.", get(&self.peers)),
            ("overlay_leases", "gauge", "Leases in the lease store, ours included.", get(&self.leases)),
            ("overlay_netlink_ops_total", "counter", "Netlink operations sent.", get(&self.netlink_ops)),
            (
                "overlay_netlink_errors_total",
                "counter",
                "Netlink operations refused by the kernel.",
                get(&self.netlink_errors),
            ),
            ("overlay_resyncs_total", "counter", "Reconciles of the dataplane.", get(&self.resyncs)),
            (
                "overlay_resync_duration_seconds",
                "gauge",
                "Duration of the last reconcile.",
                get(&self.last_resync_micros) / 1e6,
            ),
            (
                "overlay_lease_last_renewal_timestamp_seconds",
                "gauge",
                "Unix time of the last successful lease renewal.",
                get(&self.last_renewal_unix),
            ),
            ("overlay_lease_renewal_errors_total", "counter", "Failed lease renewals.", get(&self.renewal_errors)),
            (
                "overlay_watch_events_total",
                "counter",
                "Peer events received from the lease store.",
                get(&self.watch_events),
            ),
            (
                "overlay_ready",
                "gauge",
                "1 when lease, dataplane and subnet file are in place.",
                if self.ready() { 1.0 } else { 0.0 },
            ),
        ];
        for (name, kind, help, value) in rows {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        }
        out
    }
}

/// Serves the endpoints on `addr` until the process exits.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let Some(n) = read_request_head(&mut stream, &mut buf).await else {
                    return;
                };
                let request = String::from_utf8_lossy(&buf[..n]);
                let path = request.split_whitespace().nth(1).unwrap_or("");
                let (status, body) = match path {
                    "/healthz" => ("200 OK", "ok\n".to_string()),
                    "/readyz" if metrics.ready() => ("200 OK", "ready\n".to_string()),
                    "/readyz" => ("503 Service Unavailable", readiness_detail(&metrics)),
                    "/metrics" => ("200 OK", metrics.render()),
                    _ => ("404 Not Found", "not found\n".to_string()),
                };
                let response = format!(
                    "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                if let Err(e) = stream.write_all(response.as_bytes()).await {
                    warn!(error = %e, "health endpoint write failed");
                }
            });
        }
    });
    Ok(())
}

/// Reads until the end of the request head (a closing socket with unread
/// bytes would reset the connection instead of delivering our answer).
async fn read_request_head(stream: &mut tokio::net::TcpStream, buf: &mut [u8]) -> Option<usize> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut n = 0;
    while n < buf.len() {
        let read = tokio::time::timeout_at(deadline, stream.read(&mut buf[n..])).await.ok()?.ok()?;
        if read == 0 {
            break;
        }
        n += read;
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    Some(n)
}

fn readiness_detail(m: &Metrics) -> String {
    format!(
        "not ready: lease_held={} dataplane_ready={} subnet_file_written={}\n",
        m.lease_held.load(Relaxed),
        m.dataplane_ready.load(Relaxed),
        m.subnet_file_written.load(Relaxed)
    )
}
