//! Calling the real `overlay-cni` binary as a container runtime does: CNI_*
//! variables, the network config on stdin, the result or error on stdout.

use std::io::Write;
use std::process::Stdio;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::netns::Netns;

/// What one plugin call returned.
#[derive(Debug)]
pub struct Reply {
    /// Exit status was zero.
    pub ok: bool,
    /// stdout as JSON (Null when empty).
    pub json: Value,
    /// stderr.
    pub stderr: String,
}

impl Reply {
    /// The CNI error code, when it failed.
    pub fn code(&self) -> Option<u64> {
        self.json["code"].as_u64()
    }
}

/// Runs `overlay-cni` inside `host` (the node's namespace).
pub fn call(host: &Netns, command: &str, container_id: &str, netns: &str, ifname: &str, conf: &Value) -> Result<Reply> {
    let bin = crate::workspace_bin("overlay-cni");
    let mut child = host
        .command(bin.to_str().unwrap_or("overlay-cni"), &[])
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", ifname)
        .env("CNI_PATH", bin.parent().unwrap_or(&bin))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running overlay-cni")?;
    child.stdin.take().context("stdin")?.write_all(conf.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let json = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).with_context(|| format!("plugin printed non-JSON: {text:?}"))?
    };
    Ok(Reply { ok: out.status.success(), json, stderr: String::from_utf8_lossy(&out.stderr).into_owned() })
}

/// The container address of an ADD result (`10.244.1.5/24` → 10.244.1.5).
pub fn result_ip(result: &Value) -> Option<std::net::Ipv4Addr> {
    result["ips"][0]["address"].as_str()?.split('/').next()?.parse().ok()
}

/// Every container address of an ADD result, in its order (IPv4 first on a dual-stack node).
pub fn result_ips(result: &Value) -> Vec<std::net::IpAddr> {
    let ips = result["ips"].as_array().map(Vec::as_slice).unwrap_or_default();
    ips.iter().filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok()).collect()
}
