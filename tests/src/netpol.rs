//! The NetworkPolicy conformance setup, after upstream's netpol e2e suite:
//! pods `a`, `b`, `c` in namespaces `x`, `y`, `z`, spread over three nodes,
//! each serving TCP and UDP on ports 80 and 81 (in both families), and a
//! prober that tries every pair at once and returns the reachability matrix.
//!
//! SCTP is not probed: this kernel has no SCTP (`socket(AF_INET,
//! SOCK_STREAM, IPPROTO_SCTP)` fails with EPROTONOSUPPORT); SCTP rules are
//! checked in the table instead.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use serde_json::{json, Value};

use crate::probe::in_netns_path;

/// A pod of the truth table: `x/a` and so on.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodName {
    pub ns: &'static str,
    pub name: &'static str,
}

impl fmt::Display for PodName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.ns, self.name)
    }
}

/// A protocol the prober speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

/// One pod of the table: its name, namespace path and addresses.
#[derive(Debug, Clone)]
pub struct TablePod {
    pub name: PodName,
    pub netns: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
}

/// The Pod object the API holds for it: labels `pod: <name>`, named
/// container ports `serve-<port>-<proto>` as upstream's agnhost pods declare.
pub fn pod_object(p: &TablePod, labels: &BTreeMap<String, String>) -> Value {
    let mut ports = Vec::new();
    for port in [80, 81] {
        for proto in ["TCP", "UDP", "SCTP"] {
            ports.push(json!({"name": format!("serve-{port}-{}", proto.to_lowercase()),
                              "containerPort": port, "protocol": proto}));
        }
    }
    json!({
        "metadata": {"name": p.name.name, "namespace": p.name.ns, "labels": labels},
        "spec": {"nodeName": p.node, "containers": [{"name": "cont", "image": "agnhost", "ports": ports}]},
        "status": {"phase": "Running", "podIP": p.ips[0].to_string(),
                   "podIPs": p.ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect::<Vec<_>>()},
    })
}

/// A Namespace object with upstream's labels: `ns: <name>` and the
/// automatic `kubernetes.io/metadata.name`.
pub fn namespace_object(name: &str, extra: &[(&str, &str)]) -> Value {
    let mut labels = json!({"ns": name, "kubernetes.io/metadata.name": name});
    for (k, v) in extra {
        labels[*k] = json!(v);
    }
    json!({"metadata": {"name": name, "labels": labels}})
}

/// TCP and UDP servers on ports 80 and 81 (both families) in every pod.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<()>>>,
}

impl Servers {
    pub fn start(pods: &[TablePod]) -> Result<Servers> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for p in pods {
            for port in [80u16, 81] {
                let s = stop.clone();
                threads.push(in_netns_path(&p.netns, move || {
                    let l = TcpListener::bind(("::", port))?;
                    l.set_nonblocking(true)?;
                    while !s.load(Ordering::Relaxed) {
                        match l.accept() {
                            // "ok", then an echo of what the prober sends: a few packets
                            // of an established connection, which a fast path carries.
                            Ok((mut c, _)) => {
                                std::thread::spawn(move || {
                                    let _ = c.set_nonblocking(false);
                                    let _ = c.set_read_timeout(Some(PROBE_TIMEOUT));
                                    let mut b = [0u8; 2];
                                    let _ = c
                                        .write_all(b"ok")
                                        .and_then(|_| c.read_exact(&mut b))
                                        .and_then(|_| c.write_all(&b));
                                });
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                std::thread::sleep(Duration::from_millis(5))
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                    Ok(())
                }));
                let s = stop.clone();
                threads.push(in_netns_path(&p.netns, move || {
                    let u = UdpSocket::bind(("::", port))?;
                    u.set_read_timeout(Some(Duration::from_millis(50)))?;
                    let mut buf = [0u8; 64];
                    while !s.load(Ordering::Relaxed) {
                        if let Ok((n, from)) = u.recv_from(&mut buf) {
                            let _ = u.send_to(&buf[..n], from);
                        }
                    }
                    Ok(())
                }));
            }
        }
        // Listening before anyone probes.
        std::thread::sleep(Duration::from_millis(100));
        Ok(Servers { stop, threads })
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// How long a blocked probe waits.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

fn probe_one(proto: Proto, to: SocketAddr) -> bool {
    match proto {
        Proto::Tcp => TcpStream::connect_timeout(&to, PROBE_TIMEOUT)
            .and_then(|mut s| {
                s.set_read_timeout(Some(PROBE_TIMEOUT))?;
                let mut b = [0u8; 2];
                s.read_exact(&mut b)?;
                s.write_all(b"go")?;
                s.read_exact(&mut b)?;
                Ok(&b == b"go")
            })
            .unwrap_or(false),
        Proto::Udp => {
            let bind: SocketAddr = if to.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
            let Ok(u) = UdpSocket::bind(bind) else { return false };
            let _ = u.set_read_timeout(Some(PROBE_TIMEOUT / 4));
            let deadline = Instant::now() + PROBE_TIMEOUT;
            let mut buf = [0u8; 16];
            while Instant::now() < deadline {
                if u.send_to(b"probe", to).is_err() {
                    return false;
                }
                if u.recv_from(&mut buf).is_ok() {
                    return true;
                }
            }
            false
        }
    }
}

/// A reachability matrix: (from, to) → connected. Self pairs are left out
/// (a pod reaching itself never leaves its namespace).
pub type Matrix = BTreeMap<(PodName, PodName), bool>;

/// Tries every pair at once, over `family` (4 or 6), and returns what connected.
pub fn probe(pods: &[TablePod], proto: Proto, port: u16, family: u8) -> Result<Matrix> {
    probe_to(pods, pods, proto, port, family)
}

/// Tries every pair of a pod of `from` and a server of `to` at once.
pub fn probe_to(from: &[TablePod], to: &[TablePod], proto: Proto, port: u16, family: u8) -> Result<Matrix> {
    let mut handles = Vec::new();
    for from in from {
        let targets: Vec<(PodName, SocketAddr)> = to
            .iter()
            .filter(|to| to.name != from.name)
            .filter_map(|to| {
                let ip = to.ips.iter().find(|ip| if family == 4 { ip.is_ipv4() } else { ip.is_ipv6() })?;
                Some((to.name.clone(), SocketAddr::new(*ip, port)))
            })
            .collect();
        let name = from.name.clone();
        handles.push(in_netns_path(&from.netns, move || {
            // Threads made here are in the pod's namespace too.
            let probes: Vec<_> = targets
                .into_iter()
                .map(|(to, addr)| (to, std::thread::spawn(move || probe_one(proto, addr))))
                .collect();
            Ok(probes.into_iter().map(|(to, h)| ((name.clone(), to), h.join().unwrap_or(false))).collect::<Vec<_>>())
        }));
    }
    let mut m = Matrix::new();
    for h in handles {
        m.extend(h.join().map_err(|_| anyhow!("prober panicked"))??);
    }
    Ok(m)
}

/// Where `got` differs from `want`, as lines a reader can check against the case.
pub fn differences(want: &Matrix, got: &Matrix) -> Vec<String> {
    want.iter()
        .filter(|(k, w)| got.get(*k) != Some(*w))
        .map(|((f, t), w)| {
            format!(
                "{f} -> {t}: expected {}, got {}",
                if *w { "open" } else { "blocked" },
                if *w { "blocked" } else { "open" }
            )
        })
        .collect()
}
