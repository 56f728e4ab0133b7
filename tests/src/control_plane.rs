//! A real Kubernetes control plane for the tests: kube-apiserver,
//! kube-controller-manager and kube-scheduler built from Kubernetes' own Go
//! modules at one release (`make k8s`, `tests/k8s/build`), with an etcd of
//! its own (the release Kubernetes is tested with, beside the overlay's etcd
//! on the same address), all inside the cluster's underlay namespace (the
//! API server on `192.168.50.2:6443`, where the nodes reach it; nothing in
//! the root namespace).
//!
//! The API server runs with Node and RBAC authorization, the NodeRestriction
//! admission plugin, ServiceAccount token signing, a dual-stack service
//! range and a JSON audit log; the controller-manager allocates podCIDRs
//! (node IPAM), signs ServiceAccount tokens and runs the node lifecycle
//! controller. Certificates come from rcgen: a CA, the API server's serving
//! certificate, and a client certificate per identity (admin, the
//! controllers, each node as `system:node:<name>`).

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ipnet::IpNet;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use serde_json::Value;

use crate::netns::Netns;

/// The Kubernetes release the tests run, as `tests/k8s/release` pins it.
pub const RELEASE: &str = include_str!("../k8s/release").trim_ascii();
/// The etcd release the Kubernetes release is tested with (`tests/k8s/etcd-release`).
pub const ETCD_RELEASE: &str = include_str!("../k8s/etcd-release").trim_ascii();
/// The control plane's etcd ports, beside the overlay's etcd on the same address.
const ETCD_CLIENT_PORT: u16 = 12379;
const ETCD_PEER_PORT: u16 = 12380;
/// The API server's port, on the underlay's control-plane address.
pub const API_PORT: u16 = 6443;
/// The service ranges (both families), as kube-apiserver and the controller-manager are given them.
pub const SERVICE_CIDRS: &str = "10.96.0.0/16,fd00:10:96::/108";

/// Where `tests/k8s/build` puts the binaries of a release.
pub fn bin_dir() -> PathBuf {
    let root = std::env::var_os("OVERLAY_K8S_CACHE").map(PathBuf::from).unwrap_or("/var/cache/overlay-k8s".into());
    root.join(RELEASE).join("bin")
}

/// Whether the binaries are built (`make k8s`).
pub fn built() -> bool {
    ["kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", &etcd_binary()]
        .iter()
        .all(|b| bin_dir().join(b).is_file())
}

/// etcd's binary in the bin directory: it carries its release.
fn etcd_binary() -> String {
    format!("etcd-{ETCD_RELEASE}")
}

/// The files of the control plane's PKI.
struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new(dir: &Path, api_ip: Ipv4Addr) -> Result<Pki> {
        std::fs::create_dir_all(dir)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "overlay test kubernetes CA");
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let pki = Pki { dir: dir.to_path_buf(), ca };
        std::fs::write(pki.path("ca.crt"), pki.ca.pem())?;
        let names = vec![
            api_ip.to_string(),
            "10.96.0.1".into(),
            "fd00:10:96::1".into(),
            "kubernetes".into(),
            "kubernetes.default".into(),
            "kubernetes.default.svc".into(),
        ];
        pki.issue("apiserver", "kube-apiserver", None, names, ExtendedKeyUsagePurpose::ServerAuth)?;
        // The ServiceAccount token signing key: kube-apiserver signs and checks, the controller-manager signs.
        let sa = KeyPair::generate()?;
        std::fs::write(pki.path("sa.key"), sa.serialize_pem())?;
        std::fs::write(pki.path("sa.pub"), sa.public_key_pem())?;
        Ok(pki)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `<name>.crt` and `<name>.key`: a certificate for `cn` (in `org`) with `names` as SANs.
    fn issue(
        &self,
        name: &str,
        cn: &str,
        org: Option<&str>,
        names: Vec<String>,
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<(PathBuf, PathBuf)> {
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name.push(DnType::CommonName, cn);
        if let Some(org) = org {
            params.distinguished_name.push(DnType::OrganizationName, org);
        }
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca)?;
        let (crt, key_path) = (self.path(&format!("{name}.crt")), self.path(&format!("{name}.key")));
        std::fs::write(&crt, cert.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        Ok((crt, key_path))
    }

    /// A kubeconfig for the client certificate of `cn` in `org`.
    fn client_kubeconfig(&self, name: &str, cn: &str, org: Option<&str>, server: &str) -> Result<PathBuf> {
        let (crt, key) = self.issue(name, cn, org, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)?;
        let user = serde_json::json!({"client-certificate": crt, "client-key": key});
        self.kubeconfig(name, server, user)
    }

    /// A kubeconfig for `server` with `user`'s credentials, `<name>.kubeconfig`.
    fn kubeconfig(&self, name: &str, server: &str, user: Value) -> Result<PathBuf> {
        let config = serde_json::json!({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": server, "certificate-authority": self.path("ca.crt")}}],
            "users": [{"name": name, "user": user}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": name}}],
        });
        let path = self.path(&format!("{name}.kubeconfig"));
        std::fs::write(&path, serde_json::to_string_pretty(&config)?)?;
        Ok(path)
    }
}

/// What the audit log is told to keep: every request, without bodies.
const AUDIT_POLICY: &str = r#"{"apiVersion":"audit.k8s.io/v1","kind":"Policy","omitStages":["RequestReceived"],
"rules":[{"level":"Metadata"}]}"#;

/// The control plane, inside `ns`.
pub struct ControlPlane {
    ns: String,
    ip: Ipv4Addr,
    dir: PathBuf,
    pki: Pki,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    controller_manager: Option<Child>,
    scheduler: Option<Child>,
    /// The node IPAM's cluster networks, as the controller-manager runs now.
    cluster_cidrs: Vec<IpNet>,
    /// How long each component took to answer at start, for docs/testing.md.
    pub started_in: Vec<(&'static str, Duration)>,
}

impl ControlPlane {
    /// Starts the control plane in `ns` on `ip`, with an etcd of its own (the
    /// release the Kubernetes release is tested with), node IPAM handing out
    /// podCIDRs of `cluster_cidrs`.
    pub fn start(ns: &Netns, ip: Ipv4Addr, dir: &Path, cluster_cidrs: &[IpNet]) -> Result<Self> {
        if !built() {
            bail!(
                "the Kubernetes {RELEASE} binaries are not in {} (run `make k8s`, which `make test` runs through `make deps`)",
                bin_dir().display()
            );
        }
        let pki = Pki::new(&dir.join("pki"), ip)?;
        std::fs::write(dir.join("audit-policy.json"), AUDIT_POLICY)?;
        let mut cp = ControlPlane {
            ns: ns.name.clone(),
            ip,
            dir: dir.to_path_buf(),
            pki,
            etcd: None,
            apiserver: None,
            controller_manager: None,
            scheduler: None,
            cluster_cidrs: cluster_cidrs.to_vec(),
            started_in: Vec::new(),
        };
        let server = cp.server();
        cp.pki.client_kubeconfig("admin", "kubernetes-admin", Some("system:masters"), &server)?;
        cp.pki.client_kubeconfig("controller-manager", "system:kube-controller-manager", None, &server)?;
        cp.pki.client_kubeconfig("scheduler", "system:kube-scheduler", None, &server)?;
        // What the API server shows a kubelet it calls (logs, exec, port-forward): a client of the CA, as
        // kubeadm's apiserver-kubelet-client, here in system:masters so a kubelet's webhook authorizer lets it in.
        cp.pki.issue(
            "apiserver-kubelet-client",
            "kube-apiserver-kubelet-client",
            Some("system:masters"),
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        let started = Instant::now();
        cp.start_etcd()?;
        cp.started_in.push(("etcd", started.elapsed()));
        let started = Instant::now();
        cp.start_apiserver()?;
        cp.started_in.push(("kube-apiserver", started.elapsed()));
        let started = Instant::now();
        cp.start_controller_manager()?;
        cp.start_scheduler()?;
        cp.started_in.push(("kube-controller-manager and kube-scheduler", started.elapsed()));
        Ok(cp)
    }

    /// The API server's URL.
    pub fn server(&self) -> String {
        format!("https://{}:{API_PORT}", self.ip)
    }

    fn spawn(&self, name: &str, args: Vec<String>) -> Result<Child> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join(format!("{name}.log")))?;
        Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(bin_dir().join(name))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name}"))
    }

    fn etcd_endpoint(&self) -> String {
        format!("http://{}:{ETCD_CLIENT_PORT}", self.ip)
    }

    fn start_etcd(&mut self) -> Result<()> {
        let peer = format!("http://{}:{ETCD_PEER_PORT}", self.ip);
        let args = vec![
            "--name=k8s".into(),
            format!("--data-dir={}", self.dir.join("etcd").display()),
            format!("--listen-client-urls={}", self.etcd_endpoint()),
            format!("--advertise-client-urls={}", self.etcd_endpoint()),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster=k8s={peer}"),
            "--log-level=warn".into(),
        ];
        self.etcd = Some(self.spawn(&etcd_binary(), args)?);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.etcd_ctl(&["endpoint", "health"]).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("the control plane's etcd did not become healthy:\n{}", self.log_tail(&etcd_binary()))
    }

    /// etcdctl (Debian's) against the control plane's etcd.
    pub fn etcd_ctl(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "etcdctl"])
            .arg(format!("--endpoints={}", self.etcd_endpoint()))
            .arg("--command-timeout=5s")
            .args(args)
            .env("ETCDCTL_API", "3")
            .output()?;
        if !out.status.success() {
            bail!("etcdctl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Stops the control plane's etcd and starts it again.
    pub fn restart_etcd(&mut self) -> Result<()> {
        stop(&mut self.etcd);
        self.start_etcd()
    }

    fn start_apiserver(&mut self) -> Result<()> {
        let p = |n: &str| self.pki.path(n).display().to_string();
        let args = vec![
            format!("--etcd-servers={}", self.etcd_endpoint()),
            format!("--bind-address={}", self.ip),
            format!("--advertise-address={}", self.ip),
            format!("--secure-port={API_PORT}"),
            format!("--tls-cert-file={}", p("apiserver.crt")),
            format!("--tls-private-key-file={}", p("apiserver.key")),
            format!("--client-ca-file={}", p("ca.crt")),
            "--authorization-mode=Node,RBAC".into(),
            "--enable-admission-plugins=NodeRestriction".into(),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--service-cluster-ip-range={}", self.service_cidrs()),
            format!("--audit-policy-file={}", self.dir.join("audit-policy.json").display()),
            format!("--audit-log-path={}", self.audit_log_path().display()),
            "--audit-log-format=json".into(),
            "--audit-log-mode=blocking".into(),
            "--allow-privileged=true".into(),
            // Real kubelets: reached at their node's InternalIP (the names are not resolvable), with a client certificate.
            "--kubelet-preferred-address-types=InternalIP".into(),
            format!("--kubelet-client-certificate={}", p("apiserver-kubelet-client.crt")),
            format!("--kubelet-client-key={}", p("apiserver-kubelet-client.key")),
            format!("--cert-dir={}", self.dir.join("apiserver-certs").display()),
            "--profiling=false".into(),
            "--v=1".into(),
        ];
        self.apiserver = Some(self.spawn("kube-apiserver", args)?);
        self.wait_ready(Duration::from_secs(90))
    }

    /// Waits until the API server answers `/readyz` again (after etcd came back, say).
    pub fn wait_ready_after_restart(&self) -> Result<()> {
        self.wait_ready(Duration::from_secs(60))
    }

    /// Waits until the API server answers `/readyz` (as admin).
    fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.kubectl(&["get", "--raw", "/readyz"]).is_ok_and(|o| o.trim() == "ok") {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        bail!("kube-apiserver not ready after {timeout:?}:\n{}", self.log_tail("kube-apiserver"))
    }

    /// The ranges of [`SERVICE_CIDRS`] of the families the cluster's pods have: a single-stack cluster
    /// has single-stack Services.
    fn service_cidrs(&self) -> String {
        let ranges = SERVICE_CIDRS.split(',');
        let has = |range: &str| self.cluster_cidrs.iter().any(|c| c.addr().is_ipv6() == range.contains(':'));
        ranges.filter(|r| has(r)).collect::<Vec<_>>().join(",")
    }

    fn start_controller_manager(&mut self) -> Result<()> {
        let p = |n: &str| self.pki.path(n).display().to_string();
        let cidrs: Vec<String> = self.cluster_cidrs.iter().map(|c| c.to_string()).collect();
        let mut args = vec![
            format!("--kubeconfig={}", p("controller-manager.kubeconfig")),
            format!("--authentication-kubeconfig={}", p("controller-manager.kubeconfig")),
            format!("--authorization-kubeconfig={}", p("controller-manager.kubeconfig")),
            format!("--bind-address={}", self.ip),
            "--secure-port=10257".into(),
            "--leader-elect=false".into(),
            "--allocate-node-cidrs=true".into(),
            format!("--cluster-cidr={}", cidrs.join(",")),
            format!("--service-cluster-ip-range={}", self.service_cidrs()),
            format!("--service-account-private-key-file={}", p("sa.key")),
            format!("--root-ca-file={}", p("ca.crt")),
            "--use-service-account-credentials=true".into(),
            // Nodes are registered by the tests, without a kubelet's heartbeat: the node
            // lifecycle controller runs, but gives them an hour before it calls them gone.
            "--node-monitor-grace-period=1h".into(),
            "--v=1".into(),
        ];
        for net in &self.cluster_cidrs {
            match net {
                IpNet::V4(_) => args.push("--node-cidr-mask-size-ipv4=24".into()),
                IpNet::V6(_) => args.push("--node-cidr-mask-size-ipv6=64".into()),
            }
        }
        self.controller_manager = Some(self.spawn("kube-controller-manager", args)?);
        Ok(())
    }

    fn start_scheduler(&mut self) -> Result<()> {
        let p = |n: &str| self.pki.path(n).display().to_string();
        let args = vec![
            format!("--kubeconfig={}", p("scheduler.kubeconfig")),
            format!("--authentication-kubeconfig={}", p("scheduler.kubeconfig")),
            format!("--authorization-kubeconfig={}", p("scheduler.kubeconfig")),
            format!("--bind-address={}", self.ip),
            "--secure-port=10259".into(),
            "--leader-elect=false".into(),
            "--v=1".into(),
        ];
        self.scheduler = Some(self.spawn("kube-scheduler", args)?);
        Ok(())
    }

    /// Runs the controller-manager again, its node IPAM handing out podCIDRs of `cluster_cidrs`.
    pub fn restart_controller_manager(&mut self, cluster_cidrs: &[IpNet]) -> Result<()> {
        stop(&mut self.controller_manager);
        self.cluster_cidrs = cluster_cidrs.to_vec();
        self.start_controller_manager()
    }

    /// Stops the API server and starts it again (its watch cache, every watch, every connection).
    pub fn restart_apiserver(&mut self) -> Result<()> {
        stop(&mut self.apiserver);
        self.start_apiserver()
    }

    /// Stops the API server; [`start_apiserver_again`](Self::start_apiserver_again) brings it back.
    pub fn stop_apiserver(&mut self) {
        stop(&mut self.apiserver);
    }

    /// Starts the API server that [`stop_apiserver`](Self::stop_apiserver) stopped.
    pub fn start_apiserver_again(&mut self) -> Result<()> {
        self.start_apiserver()
    }

    /// The admin kubeconfig.
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.pki.path("admin.kubeconfig")
    }

    /// The PEM of the cluster's CA.
    pub fn ca(&self) -> PathBuf {
        self.pki.path("ca.crt")
    }

    /// A kubeconfig with the credentials a kubelet of `node` has (`system:node:<node>`, group `system:nodes`).
    pub fn node_kubeconfig(&self, node: &str) -> Result<PathBuf> {
        self.pki.client_kubeconfig(
            &format!("node-{node}"),
            &format!("system:node:{node}"),
            Some("system:nodes"),
            &self.server(),
        )
    }

    /// A kubeconfig with a client certificate of the cluster's CA for `cn` in group `org`, named `name`.
    pub fn client_kubeconfig(&self, name: &str, cn: &str, org: Option<&str>) -> Result<PathBuf> {
        self.pki.client_kubeconfig(name, cn, org, &self.server())
    }

    /// A kubeconfig that reads the token of `token_file` at every request (as a
    /// projected ServiceAccount token is read), named `name`.
    pub fn token_kubeconfig(&self, name: &str, token_file: &Path) -> Result<PathBuf> {
        self.pki.kubeconfig(name, &self.server(), serde_json::json!({"tokenFile": token_file}))
    }

    /// A bound ServiceAccount token for `namespace/name`, valid for `duration` (`kubectl create token`).
    pub fn service_account_token(&self, namespace: &str, name: &str, duration: &str) -> Result<String> {
        Ok(self
            .kubectl(&["create", "token", name, "-n", namespace, &format!("--duration={duration}")])?
            .trim()
            .to_string())
    }

    /// Applies deploy/cluster-network-policy-crds.yaml (server-side) and waits until the CRD is Established.
    pub fn apply_cluster_policy_crd(&self) -> Result<()> {
        let crds = crate::manifests::deploy_dir().join("cluster-network-policy-crds.yaml");
        self.kubectl(&["apply", "--server-side", "-f", &crds.display().to_string()])?;
        self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=30s",
            "crd/clusternetworkpolicies.policy.networking.k8s.io",
        ])?;
        Ok(())
    }

    /// Runs kubectl as admin; its stdout, or an error with its stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl_as(&self.admin_kubeconfig(), args, None)
    }

    /// Runs kubectl as admin with `input` on stdin.
    pub fn kubectl_input(&self, args: &[&str], input: &str) -> Result<String> {
        self.kubectl_as(&self.admin_kubeconfig(), args, Some(input))
    }

    /// Runs kubectl with `kubeconfig` (in the control plane's namespace, where the server is).
    pub fn kubectl_as(&self, kubeconfig: &Path, args: &[&str], input: Option<&str>) -> Result<String> {
        let out = self.kubectl_output(kubeconfig, args, input)?;
        if !out.status.success() {
            bail!("kubectl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs kubectl with `kubeconfig` and gives its whole output, whatever its exit status.
    pub fn kubectl_output(&self, kubeconfig: &Path, args: &[&str], input: Option<&str>) -> Result<Output> {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(bin_dir().join("kubectl"))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .args(["--request-timeout=15s"])
            .args(args)
            .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running kubectl")?;
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin.write_all(input.as_bytes())?;
        }
        Ok(child.wait_with_output()?)
    }

    /// An object as JSON (`kubectl get <what> -o json`).
    pub fn get(&self, what: &[&str]) -> Result<Value> {
        let mut args = vec!["get"];
        args.extend_from_slice(what);
        args.extend_from_slice(&["-o", "json", "--show-managed-fields"]);
        Ok(serde_json::from_str(&self.kubectl(&args)?)?)
    }

    /// Registers `node` as its kubelet does, with its own credentials: the
    /// Node with its labels and InternalIP, then its status Ready.
    pub fn register_node(&self, node: &str, ips: &[IpAddr]) -> Result<()> {
        let kubeconfig = self.node_kubeconfig(node)?;
        let object = serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node, "labels": {
                "kubernetes.io/hostname": node, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}},
        });
        self.kubectl_as(&kubeconfig, &["create", "-f", "-"], Some(&object.to_string()))?;
        let now = "2026-01-01T00:00:00Z";
        let addresses: Vec<Value> = ips
            .iter()
            .map(|ip| serde_json::json!({"type": "InternalIP", "address": ip.to_string()}))
            .chain([serde_json::json!({"type": "Hostname", "address": node})])
            .collect();
        let status = serde_json::json!({
            "addresses": addresses,
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "registered by the test as a kubelet would be",
                            "lastHeartbeatTime": now, "lastTransitionTime": now}],
            "nodeInfo": {"kubeletVersion": RELEASE, "kubeProxyVersion": RELEASE, "operatingSystem": "linux",
                         "architecture": "amd64", "containerRuntimeVersion": "none", "kernelVersion": "",
                         "osImage": "", "machineID": "", "systemUUID": "", "bootID": ""},
        });
        // As a kubelet: its own Node read, its status written (a node may update, not get,
        // nodes/status). A controller that changed the Node meanwhile (a taint) means: read again.
        let path = format!("/api/v1/nodes/{node}/status");
        let mut tries = 0;
        loop {
            let mut current: Value =
                serde_json::from_str(&self.kubectl_as(&kubeconfig, &["get", "node", node, "-o", "json"], None)?)?;
            current["status"] = status.clone();
            match self.kubectl_as(&kubeconfig, &["replace", "--raw", &path, "-f", "-"], Some(&current.to_string())) {
                Ok(_) => return Ok(()),
                Err(e) if tries < 10 => {
                    tries += 1;
                    eprintln!("registering {node}: {e:#}; again");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits until node IPAM has given `node` its podCIDRs; gives them.
    pub fn wait_pod_cidrs(&self, node: &str, timeout: Duration) -> Result<Vec<IpNet>> {
        let deadline = Instant::now() + timeout;
        loop {
            let cidrs: Vec<IpNet> = self
                .get(&["node", node])
                .ok()
                .and_then(|n| n["spec"]["podCIDRs"].as_array().cloned())
                .unwrap_or_default()
                .iter()
                .filter_map(|c| c.as_str()?.parse().ok())
                .collect();
            if !cidrs.is_empty() {
                return Ok(cidrs);
            }
            if Instant::now() > deadline {
                bail!("node {node} has no podCIDR after {timeout:?}:\n{}", self.log_tail("kube-controller-manager"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The audit log's events, one JSON object each.
    pub fn audit_events(&self) -> Result<Vec<Value>> {
        let text = std::fs::read_to_string(self.audit_log_path())?;
        Ok(text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
    }

    fn audit_log_path(&self) -> PathBuf {
        self.dir.join("audit.log")
    }

    /// The last lines a component logged.
    pub fn log_tail(&self, name: &str) -> String {
        crate::tail_of(&self.dir.join(format!("{name}.log")), 30)
    }

    /// Where the control plane listens.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// kube-apiserver's process (`ip netns exec` execs it: the child is the server), for its CPU time.
    pub fn apiserver_pid(&self) -> Option<u32> {
        self.apiserver.as_ref().map(Child::id)
    }
}

/// Stops a component and waits for it.
fn stop(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(c.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        stop(&mut self.scheduler);
        stop(&mut self.controller_manager);
        stop(&mut self.apiserver);
        stop(&mut self.etcd);
    }
}

/// Sums a counter of Prometheus text over the series whose labels contain every one of `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// An error when a kubectl answer does not hold what it should.
pub fn missing(what: &str, object: &Value) -> anyhow::Error {
    anyhow!("{what} missing in {}", serde_json::to_string_pretty(object).unwrap_or_default())
}

impl crate::Cluster {
    /// Adds node N+1 in Kubernetes mode on the real control plane `cp`: the
    /// test registers it as its kubelet would (its own credentials), node
    /// IPAM gives it its podCIDRs, and its daemon (configured, not started)
    /// reaches the API server with a bound token of the manifest's
    /// ServiceAccount, read from a file at every request, as in a pod.
    pub fn add_real_kube_node(&mut self, cp: &ControlPlane, extra: &[&str]) -> Result<usize> {
        let name = self.next_node_name();
        let net_conf = self.dir.join("net-conf.json");
        let dir = self.dir.join(&name);
        std::fs::create_dir_all(&dir)?;
        let token = dir.join("token");
        std::fs::write(&token, cp.service_account_token("kube-overlay", "overlay", "2h")?)?;
        let kubeconfig = cp.token_kubeconfig(&format!("overlay-{name}"), &token)?;
        let mut flags = vec![
            "--kube-subnet-mgr".to_string(),
            "--node-name".into(),
            name.clone(),
            "--kubeconfig".into(),
            kubeconfig.display().to_string(),
            "--net-config-path".into(),
            net_conf.display().to_string(),
        ];
        flags.extend(extra.iter().map(|f| f.to_string()));
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let i = self.add_node(&flags)?;
        let node = &self.nodes[i];
        cp.register_node(&name, &[IpAddr::V4(node.ip), IpAddr::V6(node.ip6)])?;
        cp.wait_pod_cidrs(&name, Duration::from_secs(30))?;
        Ok(i)
    }

    /// Adds a node on `cp` (see [`add_real_kube_node`](Self::add_real_kube_node)), starts its daemon, waits until it is ready, adds `pods` pods.
    pub fn add_ready_real_kube_node(&mut self, cp: &ControlPlane, extra: &[&str], pods: usize) -> Result<usize> {
        let i = self.add_real_kube_node(cp, extra)?;
        let node = &mut self.nodes[i];
        node.start()?;
        node.wait_ready(Duration::from_secs(30))?;
        for _ in 0..pods {
            node.add_pod()?;
        }
        Ok(i)
    }
}

/// The truth table's writes on the real API server, through kubectl as
/// admin: objects applied (a Pod's status written through its status
/// subresource, as its kubelet writes it), policies replaced in two calls.
pub struct KubectlApi<'a>(pub &'a ControlPlane);

impl crate::truth_table::PolicyApi for KubectlApi<'_> {
    fn put(&self, resource: &str, mut object: Value) -> Result<()> {
        let (api_version, kind) = match resource {
            "namespaces" => ("v1", "Namespace"),
            "pods" => ("v1", "Pod"),
            "networkpolicies" => ("networking.k8s.io/v1", "NetworkPolicy"),
            other => bail!("the truth table writes no {other}"),
        };
        let status = object.as_object_mut().and_then(|o| o.remove("status"));
        object["apiVersion"] = api_version.into();
        object["kind"] = kind.into();
        self.0.kubectl_input(&["apply", "-f", "-"], &object.to_string())?;
        if let Some(status) = status {
            let name = object["metadata"]["name"].as_str().unwrap_or_default();
            let ns = object["metadata"]["namespace"].as_str().unwrap_or_default();
            let patch = serde_json::json!({ "status": status }).to_string();
            self.0.kubectl(&["patch", "pod", name, "-n", ns, "--subresource=status", "--type=merge", "-p", &patch])?;
        }
        Ok(())
    }

    fn set_policies(&self, namespaces: &[&str], policies: &[(&str, &str, Value)]) -> Result<bool> {
        let mut changed = !policies.is_empty();
        for ns in namespaces {
            let out = self.0.kubectl(&["delete", "networkpolicies", "--all", "-n", ns, "--wait=false"])?;
            changed |= out.contains("deleted");
        }
        if !policies.is_empty() {
            let items: Vec<Value> = policies
                .iter()
                .map(|(ns, name, spec)| {
                    serde_json::json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                                       "metadata": {"name": name, "namespace": ns}, "spec": spec})
                })
                .collect();
            let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
            self.0.kubectl_input(&["apply", "-f", "-"], &list.to_string())?;
        }
        Ok(changed)
    }

    fn set_cluster_policies(&self, policies: &[(&str, Value)]) -> Result<bool> {
        let out = self.0.kubectl(&["delete", "clusternetworkpolicies", "--all", "--wait=false"])?;
        let changed = !policies.is_empty() || out.contains("deleted");
        if !policies.is_empty() {
            let items: Vec<Value> = policies
                .iter()
                .map(|(name, spec)| {
                    serde_json::json!({"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
                                       "metadata": {"name": name}, "spec": spec})
                })
                .collect();
            let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
            self.0.kubectl_input(&["apply", "-f", "-"], &list.to_string())?;
        }
        Ok(changed)
    }
}
