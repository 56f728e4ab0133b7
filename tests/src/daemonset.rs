//! The DaemonSet of `deploy/overlay.yaml`, run the way a kubelet runs it,
//! with podman in a node's network namespace. Everything comes from the
//! manifest (image, command, args, env, volume mounts, security context,
//! memory limit, probes), so the manifest and the image cannot drift apart.
//! A field the translation does not know fails the test instead of being
//! dropped silently.
//!
//! What stands in for the kubelet:
//! - `hostPath` volumes are directories under the node's `host_root`
//!   (`/run/overlay` is `<host_root>/run/overlay`), made as their `type` says;
//! - a `configMap` volume is the ConfigMap's items written to a directory,
//!   mounted read-only;
//! - the service account's token and CA are mounted where the kubelet puts
//!   them, and `KUBERNETES_SERVICE_HOST`/`_PORT` name the API server;
//! - the downward API's `fieldRef`s and `$(VAR)` references are resolved;
//! - capabilities are containerd's defaults, then the container's `drop`
//!   and `add`, as the CRI does.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, Probe};

use crate::manifests::{deploy_dir, load, one};

/// containerd's default capabilities (the CRI's, before a container's own).
const CONTAINERD_DEFAULT_CAPS: [&str; 14] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// Where the kubelet mounts a pod's service-account token and CA.
pub const SERVICE_ACCOUNT_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The DaemonSet's pod template and the ConfigMap its volumes name.
pub struct DaemonSetPod {
    pub spec: PodSpec,
    config_map: ConfigMap,
    namespace: String,
}

/// One pod of the DaemonSet on one node: what the kubelet knows of it.
pub struct PodOnNode<'a> {
    pub node_name: &'a str,
    /// `status.podIP`: with hostNetwork, the node's address.
    pub pod_ip: IpAddr,
    pub pod_name: &'a str,
    /// The API server, as the kubelet tells every pod.
    pub api: SocketAddr,
    /// The node's `/`, for hostPath volumes.
    pub host_root: &'a Path,
    /// Where this pod's configMap volumes are written.
    pub volumes_dir: &'a Path,
    /// The service account's `token`, `ca.crt` and `namespace`.
    pub service_account: &'a Path,
}

impl DaemonSetPod {
    /// Reads the DaemonSet and its ConfigMap from `deploy/overlay.yaml`.
    pub fn from_manifest() -> Result<Self> {
        let docs = load(&deploy_dir().join("overlay.yaml"))?;
        let ds: DaemonSet = crate::strict::decode(one(&docs, "DaemonSet")?).map_err(anyhow::Error::msg)?;
        let config_map: ConfigMap = crate::strict::decode(one(&docs, "ConfigMap")?).map_err(anyhow::Error::msg)?;
        let namespace = ds.metadata.namespace.clone().context("the DaemonSet has no namespace")?;
        let spec = ds.spec.and_then(|s| s.template.spec).context("the DaemonSet has no pod template")?;
        if spec.host_network != Some(true) {
            bail!("the pod is not on the host network; the test runs it in the node's namespace");
        }
        Ok(DaemonSetPod { spec, config_map, namespace })
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The ConfigMap's value of `key`.
    pub fn config(&self, key: &str) -> Result<String> {
        self.config_map
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .cloned()
            .with_context(|| format!("no {key} in the ConfigMap"))
    }

    /// The init containers, in order.
    pub fn init_containers(&self) -> &[Container] {
        self.spec.init_containers.as_deref().unwrap_or_default()
    }

    /// The one main container.
    pub fn container(&self) -> Result<&Container> {
        match self.spec.containers.as_slice() {
            [one] => Ok(one),
            other => bail!("expected one container, found {}", other.len()),
        }
    }

    /// The image every container runs (one image for the whole pod).
    pub fn image(&self) -> Result<String> {
        let mut images: Vec<&str> =
            self.init_containers().iter().chain(&self.spec.containers).filter_map(|c| c.image.as_deref()).collect();
        images.dedup();
        match images.as_slice() {
            [one] => Ok(one.to_string()),
            other => bail!("expected one image for every container, found {other:?}"),
        }
    }

    /// `podman run` arguments for `container`, up to and including its
    /// image and args: everything but `run` and `-d`/`--rm`.
    pub fn podman_args(&self, container: &Container, pod: &PodOnNode) -> Result<Vec<String>> {
        let mut args = vec!["--network=host".to_string(), format!("--name={}", container.name)];
        args.extend(security_args(container)?);
        if let Some(memory) = container.resources.as_ref().and_then(|r| r.limits.as_ref()).and_then(|l| l.get("memory"))
        {
            args.push(format!("--memory={}", podman_size(&memory.0)?));
        }
        if let Some(grace) = self.spec.termination_grace_period_seconds {
            args.push(format!("--stop-timeout={grace}"));
        }
        for (name, value) in self.env(container, pod)? {
            args.push(format!("--env={name}={value}"));
        }
        args.extend(self.volume_args(container, pod)?);
        if self.spec.automount_service_account_token != Some(false) {
            args.push(format!("--volume={}:{SERVICE_ACCOUNT_MOUNT}:ro", pod.service_account.display()));
        }
        let command = container.command.clone().unwrap_or_default();
        if !command.is_empty() {
            args.push(format!("--entrypoint={}", serde_json::to_string(&command)?));
        }
        args.push(container.image.clone().context("a container without an image")?);
        args.extend(container.args.clone().unwrap_or_default());
        Ok(args)
    }

    /// The environment the kubelet gives `container`: its `env`, resolved
    /// in order, then the API server's address.
    pub fn env(&self, container: &Container, pod: &PodOnNode) -> Result<Vec<(String, String)>> {
        if container.env_from.is_some() {
            bail!("{}: envFrom is not emulated", container.name);
        }
        let mut env: Vec<(String, String)> = Vec::new();
        for var in container.env.clone().unwrap_or_default() {
            let value = match (&var.value, &var.value_from) {
                (Some(value), None) => expand(value, &env),
                (None, Some(from)) => {
                    let field =
                        from.field_ref.as_ref().ok_or_else(|| anyhow!("{}: only fieldRef is emulated", var.name))?;
                    match field.field_path.as_str() {
                        "spec.nodeName" => pod.node_name.to_string(),
                        "status.podIP" | "status.hostIP" => pod.pod_ip.to_string(),
                        "metadata.name" => pod.pod_name.to_string(),
                        "metadata.namespace" => self.namespace.clone(),
                        other => bail!("{}: fieldRef {other} is not emulated", var.name),
                    }
                }
                (None, None) => String::new(),
                (Some(_), Some(_)) => bail!("{}: both value and valueFrom", var.name),
            };
            env.push((var.name, value));
        }
        env.push(("KUBERNETES_SERVICE_HOST".into(), pod.api.ip().to_string()));
        env.push(("KUBERNETES_SERVICE_PORT".into(), pod.api.port().to_string()));
        Ok(env)
    }

    fn volume_args(&self, container: &Container, pod: &PodOnNode) -> Result<Vec<String>> {
        let volumes = self.spec.volumes.clone().unwrap_or_default();
        let mut args = Vec::new();
        for mount in container.volume_mounts.clone().unwrap_or_default() {
            if mount.sub_path.is_some() || mount.mount_propagation.is_some() {
                bail!("{}: subPath and mountPropagation are not emulated", mount.name);
            }
            let volume =
                volumes.iter().find(|v| v.name == mount.name).with_context(|| format!("no volume {}", mount.name))?;
            let mut read_only = mount.read_only == Some(true);
            let source = if let Some(host) = &volume.host_path {
                let dir = pod.host_root.join(host.path.trim_start_matches('/'));
                match host.type_.as_deref() {
                    Some("DirectoryOrCreate") => std::fs::create_dir_all(&dir)?,
                    Some("Directory") if dir.is_dir() => {}
                    other => {
                        bail!("{}: hostPath type {other:?} is not emulated (or the directory is missing)", volume.name)
                    }
                }
                dir
            } else if let Some(source) = &volume.config_map {
                if source.name != self.config_map.metadata.name.clone().unwrap_or_default() {
                    bail!("{}: ConfigMap {} is not the manifest's", volume.name, source.name);
                }
                // The kubelet projects configMaps read-only.
                read_only = true;
                self.write_config_map(&volume.name, source.items.as_deref(), pod.volumes_dir)?
            } else {
                bail!("{}: only hostPath and configMap volumes are emulated", volume.name);
            };
            let ro = if read_only { ":ro" } else { "" };
            args.push(format!("--volume={}:{}{ro}", source.display(), mount.mount_path));
        }
        Ok(args)
    }

    fn write_config_map(
        &self,
        volume: &str,
        items: Option<&[k8s_openapi::api::core::v1::KeyToPath]>,
        dir: &Path,
    ) -> Result<PathBuf> {
        let data: BTreeMap<String, String> = self.config_map.data.clone().unwrap_or_default();
        let dir = dir.join(volume);
        std::fs::create_dir_all(&dir)?;
        let files: Vec<(String, String)> = match items {
            Some(items) => items.iter().map(|i| (i.key.clone(), i.path.clone())).collect(),
            None => data.keys().map(|k| (k.clone(), k.clone())).collect(),
        };
        for (key, path) in files {
            let value = data.get(&key).with_context(|| format!("{volume}: no key {key} in the ConfigMap"))?;
            std::fs::write(dir.join(path), value)?;
        }
        Ok(dir)
    }

    /// The HTTP GET of `probe` on `container`: (path, port), the port
    /// resolved from the container's named ports.
    pub fn http_probe(container: &Container, probe: Option<&Probe>) -> Result<(String, u16)> {
        let get =
            probe.and_then(|p| p.http_get.as_ref()).with_context(|| format!("{}: no httpGet probe", container.name))?;
        if get.host.is_some() || get.scheme.as_deref().is_some_and(|s| s != "HTTP") {
            bail!("{}: only plain HTTP probes at the pod's address are emulated", container.name);
        }
        use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
        let port = match &get.port {
            IntOrString::Int(port) => u16::try_from(*port)?,
            IntOrString::String(name) => {
                let ports = container.ports.clone().unwrap_or_default();
                let port = ports.iter().find(|p| p.name.as_deref() == Some(name));
                u16::try_from(port.with_context(|| format!("no container port named {name}"))?.container_port)?
            }
        };
        Ok((get.path.clone().unwrap_or_else(|| "/".into()), port))
    }
}

/// Replaces each `$(NAME)` of a variable defined before with its value, as the kubelet does.
fn expand(value: &str, env: &[(String, String)]) -> String {
    env.iter().fold(value.to_string(), |v, (k, val)| v.replace(&format!("$({k})"), val))
}

/// Capabilities, privilege and root filesystem, as the CRI sets them.
fn security_args(container: &Container) -> Result<Vec<String>> {
    let mut caps: Vec<String> = CONTAINERD_DEFAULT_CAPS.iter().map(|c| c.to_string()).collect();
    let mut args = vec!["--cap-drop=ALL".to_string()];
    let Some(security) = &container.security_context else {
        args.extend(caps.iter().map(|c| format!("--cap-add={c}")));
        return Ok(args);
    };
    if security.privileged == Some(true) {
        bail!("{}: privileged is not emulated", container.name);
    }
    if security.run_as_user.is_some() || security.run_as_group.is_some() || security.se_linux_options.is_some() {
        bail!("{}: runAsUser, runAsGroup and seLinuxOptions are not emulated", container.name);
    }
    if let Some(capabilities) = &security.capabilities {
        let drop = capabilities.drop.clone().unwrap_or_default();
        if drop.iter().any(|c| c == "ALL") {
            caps.clear();
        }
        caps.retain(|c| !drop.contains(c));
        caps.extend(capabilities.add.clone().unwrap_or_default());
    }
    args.extend(caps.iter().map(|c| format!("--cap-add={c}")));
    if security.allow_privilege_escalation == Some(false) {
        args.push("--security-opt=no-new-privileges".into());
    }
    if security.read_only_root_filesystem == Some(true) {
        // Kubernetes mounts no tmpfs of its own on a read-only root; podman would.
        args.extend(["--read-only".into(), "--read-only-tmpfs=false".into()]);
    }
    Ok(args)
}

/// A Kubernetes memory quantity (`128Mi`) as podman takes it.
fn podman_size(quantity: &str) -> Result<String> {
    let (number, unit) = quantity.split_at(quantity.find(|c: char| !c.is_ascii_digit()).unwrap_or(quantity.len()));
    let factor: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        other => bail!("memory unit {other:?} is not emulated"),
    };
    Ok((number.parse::<u64>()? * factor).to_string())
}
