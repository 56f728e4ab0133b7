//! The plugin's network configuration (one conflist entry, `"type": "overlay-cni"`).

use std::path::PathBuf;

use serde_json::Value;

use crate::error::{code, CniError};

/// CNI versions this plugin speaks.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// A parsed and validated network configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    /// The config's cniVersion, also the version of our result.
    pub cni_version: String,
    /// Network name: names the IPAM directory.
    pub name: String,
    /// The daemon's subnet file.
    pub subnet_file: PathBuf,
    /// Where allocations are recorded.
    pub data_dir: PathBuf,
    /// The bridge pods attach to.
    pub bridge: String,
    /// MTU override; by default the subnet file's.
    pub mtu: Option<u32>,
    /// Hairpin mode on the host end, so a pod reaches itself through a service IP.
    pub hairpin_mode: bool,
    /// A default route via the gateway in the pod.
    pub is_default_gateway: bool,
    /// The previous plugin's result (chained), if any.
    pub prev_result: Option<Value>,
    /// DNS settings passed through to the result.
    pub dns: Option<Value>,
    /// `cni.dev/valid-attachments` (GC).
    pub valid_attachments: Option<Vec<(String, String)>>,
}

fn invalid(key: &str, want: &str) -> CniError {
    CniError::new(code::INVALID_CONFIG, format!("invalid network config: {key:?} must be {want}"))
}

fn string(v: &Value, key: &str, default: &str) -> Result<String, CniError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default.to_string()),
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(_) => Err(invalid(key, "a non-empty string")),
    }
}

fn boolean(v: &Value, key: &str, default: bool) -> Result<bool, CniError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(invalid(key, "true or false")),
    }
}

impl NetConf {
    /// Parses stdin. Malformed JSON is error 6; a bad value is error 7 naming the key.
    pub fn parse(bytes: &[u8]) -> Result<Self, CniError> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| {
            CniError::new(code::DECODE, "decoding failure: network config is not JSON").details(e.to_string())
        })?;
        if !v.is_object() {
            return Err(CniError::new(code::DECODE, "decoding failure: network config is not a JSON object"));
        }
        let cni_version = string(&v, "cniVersion", "0.4.0")?;
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("cniVersion {cni_version} is not supported"),
            )
            .details(format!("supported: {}", SUPPORTED_VERSIONS.join(", "))));
        }
        let name = string(&v, "name", "")?;
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(invalid("name", "a network name without '/'"));
        }
        let mtu = match v.get("mtu") {
            None | Some(Value::Null) => None,
            Some(m) => Some(
                m.as_u64()
                    .filter(|m| (68..=65535).contains(m))
                    .ok_or_else(|| invalid("mtu", "a number from 68 to 65535"))? as u32,
            ),
        };
        let bridge = string(&v, "bridge", "cni0")?;
        if bridge.len() > 15 || bridge.contains('/') {
            return Err(invalid("bridge", "an interface name of at most 15 bytes"));
        }
        let valid_attachments = match v.get("cni.dev/valid-attachments") {
            None | Some(Value::Null) => None,
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|a| {
                        let id = a.get("containerID").and_then(Value::as_str);
                        let ifname = a.get("ifname").and_then(Value::as_str);
                        match (id, ifname) {
                            (Some(id), Some(ifname)) => Ok((id.to_string(), ifname.to_string())),
                            _ => Err(invalid("cni.dev/valid-attachments", "a list of {containerID, ifname}")),
                        }
                    })
                    .collect::<Result<_, _>>()?,
            ),
            Some(_) => return Err(invalid("cni.dev/valid-attachments", "a list")),
        };
        Ok(NetConf {
            cni_version,
            name,
            subnet_file: string(&v, "subnetFile", "/run/overlay/subnet.env")?.into(),
            data_dir: string(&v, "dataDir", "/var/lib/cni/networks")?.into(),
            bridge,
            mtu,
            hairpin_mode: boolean(&v, "hairpinMode", true)?,
            is_default_gateway: boolean(&v, "isDefaultGateway", true)?,
            prev_result: v.get("prevResult").filter(|p| !p.is_null()).cloned(),
            dns: v.get("dns").filter(|p| !p.is_null()).cloned(),
            valid_attachments,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let c = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"overlay","type":"overlay-cni"}"#).unwrap();
        assert_eq!(c.subnet_file, PathBuf::from("/run/overlay/subnet.env"));
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/cni/networks"));
        assert_eq!(c.bridge, "cni0");
        assert!(c.hairpin_mode && c.is_default_gateway);
        let c = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"n","type":"overlay-cni","bridge":"br9","mtu":1400,"hairpinMode":false,
                 "isDefaultGateway":false,"somethingElse":{"x":1},"cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}]}"#,
        )
        .unwrap();
        assert_eq!((c.bridge.as_str(), c.mtu, c.hairpin_mode, c.is_default_gateway), ("br9", Some(1400), false, false));
        assert_eq!(c.valid_attachments.unwrap(), vec![("a".to_string(), "eth0".to_string())]);
    }

    #[test]
    fn errors_have_the_spec_codes_and_name_the_key() {
        let e = NetConf::parse(b"{nope").unwrap_err();
        assert_eq!(e.code, 6);
        assert!(e.msg.starts_with("decoding failure"));
        let e = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","mtu":"big"}"#).unwrap_err();
        assert_eq!((e.code, e.msg.contains("\"mtu\"")), (7, true));
        let e = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","hairpinMode":"yes"}"#).unwrap_err();
        assert!(e.msg.contains("hairpinMode"));
        let e = NetConf::parse(br#"{"cniVersion":"9.9.9","name":"n"}"#).unwrap_err();
        assert_eq!(e.code, 1);
        let e = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"../x"}"#).unwrap_err();
        assert_eq!(e.code, 7);
    }
}
