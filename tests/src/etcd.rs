//! A real etcd (Debian's etcd-server) inside a test namespace: one member, or
//! a cluster of several on different addresses of the underlay bridge.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::netns::Netns;

/// One etcd member listening on `<addr>:2379` inside a namespace.
pub struct Etcd {
    ns_name: String,
    name: String,
    addr: String,
    initial_cluster: String,
    data_dir: std::path::PathBuf,
    child: Option<Child>,
    security: Security,
    /// The root user's password, once authentication is on (for etcdctl).
    root_password: Option<String>,
}

/// How a member serves its clients beyond plain HTTP.
#[derive(Debug, Clone, Default)]
pub struct Security {
    /// HTTPS with this PKI's server certificate, and client certificates
    /// signed by its CA required (`--client-cert-auth`).
    pub tls: Option<crate::pki::Pki>,
    /// More addresses to serve clients on, e.g. one the certificate does not name.
    pub also_on: Vec<String>,
}

impl Etcd {
    /// Starts a single-member etcd in `ns` on `addr`, with its data in `data_dir`.
    pub fn start(ns: &Netns, addr: &str, data_dir: std::path::PathBuf) -> Result<Self> {
        let mut members = Self::start_cluster(ns, &[addr], data_dir)?;
        Ok(members.remove(0))
    }

    /// Starts one member per address (peers on `<addr>:2380`) and waits until all are healthy.
    pub fn start_cluster(ns: &Netns, addrs: &[&str], data_dir: std::path::PathBuf) -> Result<Vec<Self>> {
        let initial_cluster =
            addrs.iter().enumerate().map(|(i, a)| format!("m{i}=http://{a}:2380")).collect::<Vec<_>>().join(",");
        let mut members: Vec<Etcd> = addrs
            .iter()
            .enumerate()
            .map(|(i, addr)| Etcd {
                ns_name: ns.name.clone(),
                name: format!("m{i}"),
                addr: addr.to_string(),
                initial_cluster: initial_cluster.clone(),
                data_dir: data_dir.join(format!("m{i}")),
                child: None,
                security: Security::default(),
                root_password: None,
            })
            .collect();
        // All members first: a member of a larger cluster is healthy only with a quorum.
        for m in &mut members {
            m.spawn()?;
        }
        for m in &members {
            m.wait_healthy()?;
        }
        Ok(members)
    }

    /// Starts a single-member etcd in `ns` on `addr` that serves as `security` says.
    pub fn start_secure(ns: &Netns, addr: &str, data_dir: std::path::PathBuf, security: Security) -> Result<Self> {
        let mut member = Etcd {
            ns_name: ns.name.clone(),
            name: "m0".into(),
            addr: addr.to_string(),
            initial_cluster: format!("m0=http://{addr}:2380"),
            data_dir: data_dir.join("m0"),
            child: None,
            security,
            root_password: None,
        };
        member.spawn()?;
        member.wait_healthy()?;
        Ok(member)
    }

    /// Turns etcd's authentication on, with a root user of this password.
    pub fn enable_auth(&mut self, root_password: &str) -> Result<()> {
        self.ctl(&["user", "add", &format!("root:{root_password}"), "--interactive=false"])?;
        self.ctl(&["auth", "enable"])?;
        self.root_password = Some(root_password.to_string());
        Ok(())
    }

    /// A user with `password`, and, when given, a role of its own that may read and write under `prefix`.
    pub fn add_user(&self, user: &str, password: &str, prefix: Option<&str>) -> Result<()> {
        self.ctl(&["user", "add", &format!("{user}:{password}"), "--interactive=false"])?;
        if let Some(prefix) = prefix {
            let role = format!("{user}-role");
            self.ctl(&["role", "add", &role])?;
            self.ctl(&["role", "grant-permission", &role, "--prefix=true", "readwrite", prefix])?;
            self.ctl(&["user", "grant-role", user, &role])?;
        }
        Ok(())
    }

    fn spawn(&mut self) -> Result<()> {
        let url = self.endpoint();
        let scheme = if self.security.tls.is_some() { "https" } else { "http" };
        let listen = std::iter::once(&self.addr)
            .chain(&self.security.also_on)
            .map(|a| format!("{scheme}://{a}:2379"))
            .collect::<Vec<_>>()
            .join(",");
        let peer = format!("http://{}:2380", self.addr);
        std::fs::create_dir_all(self.data_dir.parent().unwrap_or(&self.data_dir))?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.data_dir.with_extension("log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns_name, "etcd"])
            .args(["--name", &self.name, "--data-dir"])
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &listen, "--advertise-client-urls", &url])
            .args(self.security.tls.iter().flat_map(|pki| {
                [
                    "--client-cert-auth".into(),
                    format!("--trusted-ca-file={}", pki.ca.display()),
                    format!("--cert-file={}", pki.server_cert.display()),
                    format!("--key-file={}", pki.server_key.display()),
                ]
            }))
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster, "--initial-cluster-state", "new"])
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting etcd (is etcd-server installed? run `make deps`)")?;
        self.child = Some(child);
        Ok(())
    }

    fn wait_healthy(&self) -> Result<()> {
        if !crate::wait_until(Duration::from_secs(30), || self.ctl(&["endpoint", "health"]).is_ok()) {
            bail!("etcd member {} did not become healthy at {}", self.name, self.endpoint());
        }
        Ok(())
    }

    /// The client URL.
    pub fn endpoint(&self) -> String {
        let scheme = if self.security.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:2379", self.addr)
    }

    /// Runs etcdctl against this member (as root once authentication is on).
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        let mut full: Vec<String> = ["netns", "exec", &self.ns_name, "etcdctl"].map(String::from).to_vec();
        full.push(format!("--endpoints={}", self.endpoint()));
        full.push("--command-timeout=5s".into());
        if let Some(pki) = &self.security.tls {
            full.push(format!("--cacert={}", pki.ca.display()));
            full.push(format!("--cert={}", pki.client_cert.display()));
            full.push(format!("--key={}", pki.client_key.display()));
        }
        if let Some(password) = &self.root_password {
            full.push(format!("--user=root:{password}"));
        }
        full.extend(args.iter().map(|a| a.to_string()));
        let full: Vec<&str> = full.iter().map(String::as_str).collect();
        crate::netns::run("ip", &full)
    }

    /// `put key value`.
    pub fn put(&self, key: &str, value: &str) -> Result<()> {
        self.ctl(&["put", key, value]).map(|_| ())
    }

    /// `get key`: its value, if the key exists.
    pub fn get(&self, key: &str) -> Result<Option<String>> {
        let out = self.ctl(&["get", "--print-value-only", key])?;
        Ok(Some(out.trim_end_matches('\n').to_string()).filter(|v| !v.is_empty()))
    }

    /// `del key`.
    pub fn delete(&self, key: &str) -> Result<()> {
        self.ctl(&["del", key]).map(|_| ())
    }

    /// The keys under `prefix`.
    pub fn keys(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self
            .ctl(&["get", "--prefix", "--keys-only", prefix])?
            .lines()
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect())
    }

    /// Stops the member (SIGTERM) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }

    /// Starts it again on the same data.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn()?;
        self.wait_healthy()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
