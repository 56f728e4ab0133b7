//! The ADD result, rendered for the cniVersion the runtime asked for.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde_json::{json, Value};

/// An interface the plugin created or touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// Its name.
    pub name: String,
    /// Its MAC.
    pub mac: String,
    /// The netns path, for the container's interface.
    pub sandbox: Option<String>,
}

/// An address given to an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpConfig {
    /// The address with the subnet's prefix.
    pub address: Ipv4Net,
    /// The gateway.
    pub gateway: Ipv4Addr,
    /// Index into `interfaces`.
    pub interface: usize,
}

/// A route in the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// Destination.
    pub dst: Ipv4Net,
    /// Gateway.
    pub gw: Ipv4Addr,
}

/// The result of ADD.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CniResult {
    /// Interfaces: bridge, host veth, container veth.
    pub interfaces: Vec<Interface>,
    /// Addresses.
    pub ips: Vec<IpConfig>,
    /// Routes.
    pub routes: Vec<Route>,
    /// DNS, passed through from the config.
    pub dns: Option<Value>,
}

impl CniResult {
    /// The JSON for `version`: 0.3.x and 0.4.0 carry `"version": "4"` on each IP.
    pub fn to_json(&self, version: &str, prev: Option<&Value>) -> Value {
        let legacy = version.starts_with("0.");
        let mut interfaces: Vec<Value> = prev.and_then(|p| p["interfaces"].as_array().cloned()).unwrap_or_default();
        let mut ips: Vec<Value> = prev.and_then(|p| p["ips"].as_array().cloned()).unwrap_or_default();
        let mut routes: Vec<Value> = prev.and_then(|p| p["routes"].as_array().cloned()).unwrap_or_default();
        let offset = interfaces.len();
        for i in &self.interfaces {
            let mut v = json!({"name": i.name, "mac": i.mac});
            if let Some(s) = &i.sandbox {
                v["sandbox"] = json!(s);
            }
            interfaces.push(v);
        }
        for ip in &self.ips {
            let mut v = json!({"address": ip.address.to_string(), "gateway": ip.gateway.to_string(), "interface": ip.interface + offset});
            if legacy {
                v["version"] = json!("4");
            }
            ips.push(v);
        }
        for r in &self.routes {
            routes.push(json!({"dst": r.dst.to_string(), "gw": r.gw.to_string()}));
        }
        let dns =
            self.dns.clone().or_else(|| prev.map(|p| p["dns"].clone()).filter(|d| !d.is_null())).unwrap_or(json!({}));
        json!({"cniVersion": version, "interfaces": interfaces, "ips": ips, "routes": routes, "dns": dns})
    }
}

/// The container address and gateway a previous result gave `ifname`, for CHECK.
pub fn address_in(prev: &Value, ifname: &str) -> Option<(Ipv4Net, Option<Ipv4Addr>)> {
    let interfaces = prev["interfaces"].as_array()?;
    let index = interfaces.iter().position(|i| i["name"] == ifname && !i["sandbox"].is_null())?;
    prev["ips"].as_array()?.iter().find_map(|ip| {
        if ip["interface"].as_u64() != Some(index as u64) {
            return None;
        }
        let address = ip["address"].as_str()?.parse().ok()?;
        Some((address, ip["gateway"].as_str().and_then(|g| g.parse().ok())))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![
                Interface { name: "cni0".into(), mac: "02:00:00:00:00:01".into(), sandbox: None },
                Interface { name: "veth1234".into(), mac: "02:00:00:00:00:02".into(), sandbox: None },
                Interface {
                    name: "eth0".into(),
                    mac: "02:00:00:00:00:03".into(),
                    sandbox: Some("/run/netns/x".into()),
                },
            ],
            ips: vec![IpConfig {
                address: "10.244.1.5/24".parse().unwrap(),
                gateway: "10.244.1.1".parse().unwrap(),
                interface: 2,
            }],
            routes: vec![Route { dst: "0.0.0.0/0".parse().unwrap(), gw: "10.244.1.1".parse().unwrap() }],
            dns: None,
        }
    }

    #[test]
    fn versions_differ_only_where_the_spec_does() {
        let new = sample().to_json("1.1.0", None);
        assert_eq!(new["cniVersion"], "1.1.0");
        assert!(new["ips"][0].get("version").is_none());
        assert_eq!(new["ips"][0]["interface"], 2);
        assert_eq!(new["interfaces"][2]["sandbox"], "/run/netns/x");
        let old = sample().to_json("0.3.1", None);
        assert_eq!(old["ips"][0]["version"], "4");
        assert_eq!(old["routes"][0]["gw"], "10.244.1.1");
        assert_eq!(
            address_in(&new, "eth0"),
            Some(("10.244.1.5/24".parse().unwrap(), Some("10.244.1.1".parse().unwrap())))
        );
        assert_eq!(address_in(&new, "eth1"), None);
    }

    #[test]
    fn chained_results_are_appended() {
        let prev = json!({"interfaces":[{"name":"lo0","mac":"00:00:00:00:00:00"}],"ips":[],"routes":[],"dns":{"nameservers":["10.96.0.10"]}});
        let v = sample().to_json("1.0.0", Some(&prev));
        assert_eq!(v["interfaces"].as_array().unwrap().len(), 4);
        assert_eq!(v["ips"][0]["interface"], 3);
        assert_eq!(v["dns"]["nameservers"][0], "10.96.0.10");
    }
}
