//! A real etcd (Debian's etcd-server), run inside a test namespace.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::netns::Netns;

/// An etcd process listening on `<addr>:2379` inside a namespace.
pub struct Etcd {
    ns_name: String,
    addr: String,
    data_dir: std::path::PathBuf,
    child: Option<Child>,
}

impl Etcd {
    /// Starts etcd in `ns` on `addr`, with its data in `data_dir`.
    pub fn start(ns: &Netns, addr: &str, data_dir: std::path::PathBuf) -> Result<Self> {
        let mut etcd = Etcd { ns_name: ns.name.clone(), addr: addr.to_string(), data_dir, child: None };
        etcd.spawn()?;
        Ok(etcd)
    }

    fn spawn(&mut self) -> Result<()> {
        let url = self.endpoint();
        let log = std::fs::File::create(self.data_dir.with_extension("log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns_name, "etcd"])
            .args(["--name", "test", "--data-dir"])
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
            .args([
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
            ])
            .args(["--initial-cluster", "test=http://127.0.0.1:2380"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting etcd (is etcd-server installed? run `make deps`)")?;
        self.child = Some(child);
        if !crate::wait_until(Duration::from_secs(20), || self.ctl(&["endpoint", "health"]).is_ok()) {
            bail!("etcd did not become healthy at {url}");
        }
        Ok(())
    }

    /// The client URL.
    pub fn endpoint(&self) -> String {
        format!("http://{}:2379", self.addr)
    }

    /// Runs etcdctl against this etcd.
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        let endpoint = format!("--endpoints={}", self.endpoint());
        let mut full =
            vec!["netns", "exec", self.ns_name.as_str(), "etcdctl", endpoint.as_str(), "--command-timeout=5s"];
        full.extend_from_slice(args);
        crate::netns::run("ip", &full)
    }

    /// `put key value`.
    pub fn put(&self, key: &str, value: &str) -> Result<()> {
        self.ctl(&["put", key, value]).map(|_| ())
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

    /// Stops etcd (SIGTERM) and waits for it.
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
        self.spawn()
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
