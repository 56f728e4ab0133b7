//! The ADD result, rendered for the cniVersion the runtime asked for.

use std::net::IpAddr;

use ipnet::IpNet;
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
    pub address: IpNet,
    /// The gateway.
    pub gateway: IpAddr,
    /// Index into `interfaces`.
    pub interface: usize,
}

/// A route in the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// Destination.
    pub dst: IpNet,
    /// Gateway.
    pub gw: IpAddr,
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
    /// The JSON for `version`: 0.3.x and 0.4.0 carry `"version": "4"` (or `"6"`) on each IP.
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
                v["version"] = json!(if ip.address.addr().is_ipv4() { "4" } else { "6" });
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

/// The container addresses and gateways a previous result gave `ifname` (one per family), for CHECK.
pub fn addresses_in(prev: &Value, ifname: &str) -> Vec<(IpNet, Option<IpAddr>)> {
    let Some(interfaces) = prev["interfaces"].as_array() else { return Vec::new() };
    let Some(index) = interfaces.iter().position(|i| i["name"] == ifname && !i["sandbox"].is_null()) else {
        return Vec::new();
    };
    let ips = prev["ips"].as_array().map(Vec::as_slice).unwrap_or_default();
    ips.iter()
        .filter(|ip| ip["interface"].as_u64() == Some(index as u64))
        .filter_map(|ip| {
            let address = ip["address"].as_str()?.parse().ok()?;
            Some((address, ip["gateway"].as_str().and_then(|g| g.parse().ok())))
        })
        .collect()
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
            addresses_in(&new, "eth0"),
            vec![("10.244.1.5/24".parse().unwrap(), Some("10.244.1.1".parse().unwrap()))]
        );
        assert_eq!(addresses_in(&new, "eth1"), vec![]);
    }

    /// The shape of the reference plugins' dual-stack result (shared/compat).
    #[test]
    fn dual_stack_results_carry_both_families() {
        let mut r = sample();
        r.ips.push(IpConfig {
            address: "fd00:10:244:8::2/64".parse().unwrap(),
            gateway: "fd00:10:244:8::1".parse().unwrap(),
            interface: 2,
        });
        r.routes.push(Route { dst: "::/0".parse().unwrap(), gw: "fd00:10:244:8::1".parse().unwrap() });
        let old = r.to_json("0.3.1", None);
        assert_eq!(old["ips"][1]["version"], "6");
        assert_eq!(old["ips"][1]["address"], "fd00:10:244:8::2/64");
        assert_eq!(old["ips"][1]["gateway"], "fd00:10:244:8::1");
        assert_eq!(old["routes"][1]["dst"], "::/0");
        assert_eq!(addresses_in(&old, "eth0").len(), 2);
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
