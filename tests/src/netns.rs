//! Network namespaces owned by a test, and running commands inside them.

use std::process::{Command, Output};

use anyhow::{bail, Context, Result};

/// Runs `ip` with `args` and fails with its stderr if it fails.
pub fn ip(args: &[&str]) -> Result<String> {
    run("ip", args)
}

/// Runs a command and returns stdout; an error carries stderr.
pub fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd).args(args).output().with_context(|| format!("running {cmd}"))?;
    check(cmd, args, out)
}

fn check(cmd: &str, args: &[&str], out: Output) -> Result<String> {
    if !out.status.success() {
        bail!("{cmd} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    /// Its name under /run/netns.
    pub name: String,
}

impl Netns {
    /// Creates the namespace with loopback up.
    pub fn new(name: &str) -> Result<Self> {
        ip(&["netns", "add", name])?;
        let ns = Netns { name: name.to_string() };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Runs `cmd args` inside the namespace.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> Result<String> {
        let out = self.command(cmd, args).output().with_context(|| format!("running {cmd} in {}", self.name))?;
        check(cmd, args, out)
    }

    /// A `Command` that runs inside the namespace.
    pub fn command(&self, cmd: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.name.as_str(), cmd]).args(args);
        c
    }

    /// The path for setns(2).
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}
