//! podman (Debian's 4.3) as a real container runtime calling overlay-cni,
//! offline: containers run from a local busybox rootfs, with a
//! containers.conf and storage of the test's own (docs/testing.md).
//!
//! podman and runc keep state in fixed places no config moves: the lock in
//! `/dev/shm/libpod_lock`, runc's in `/run/runc`, libcni's result cache in
//! `/var/lib/cni`. Every podman call therefore runs inside one private mount
//! namespace, held open by a process of the test's, with fresh tmpfs over
//! those three places: the state lives as long as the test and never lands
//! on the host.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use anyhow::{bail, Context, Result};

use crate::cluster::Node;

/// podman set up for one node: its own config, storage and conflist.
pub struct Podman {
    dir: PathBuf,
    rootfs: PathBuf,
    ns: String,
    /// Holds the private mount namespace every podman call enters.
    holder: Child,
}

/// Starts the process that holds podman's private mount namespace and
/// waits until its mounts are in place. Each `(dir, at)` of `binds` is
/// bind-mounted at `at`, which must lie in one of the namespace's fresh
/// tmpfs (`/run`, `/var/lib`), so no directory is made on the host.
fn mount_namespace_holder(binds: &[(PathBuf, &str)]) -> Result<Child> {
    const SCRIPT: &str = "set -e
mount -n -t tmpfs podman-shm /dev/shm
mount -n -t tmpfs -o mode=0755 podman-run /run
mount -n -t tmpfs -o mode=0755 podman-varlib /var/lib
while [ $# -gt 0 ]; do mkdir -p \"$2\"; mount -n --bind \"$1\" \"$2\"; shift 2; done
echo ready
exec sleep infinity";
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    for (dir, at) in binds {
        if !(at.starts_with("/run/") || at.starts_with("/var/lib/")) {
            bail!("{at}: binds go under /run or /var/lib only, the namespace's own tmpfs");
        }
        args.push(dir.clone().into());
        args.push(at.into());
    }
    crate::hold_mount_namespace("podman's mount namespace", SCRIPT, &args)
}

/// A busybox rootfs with the applets the tests use.
pub fn busybox_rootfs(dir: &Path) -> Result<PathBuf> {
    let rootfs = dir.join("rootfs");
    let bin = rootfs.join("bin");
    std::fs::create_dir_all(&bin)?;
    for d in ["etc", "proc", "sys", "dev", "tmp", "www", "run"] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("busybox-static is not installed (make deps)")?;
    std::fs::copy(busybox, bin.join("busybox"))?;
    for applet in ["sh", "httpd", "nc", "printf", "sleep", "cat", "echo", "ip", "hostname", "ping"] {
        let link = bin.join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", link)?;
        }
    }
    std::fs::write(rootfs.join("www/index.html"), "hello from overlay\n")?;
    std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n")?;
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\n")?;
    Ok(rootfs)
}

/// Where a node's podman finds its CNI plugins and network configs, as a
/// kubelet's runtime has them in its `bin_dir` and `conf_dir`.
pub struct CniDirs {
    /// Searched in order for plugins.
    pub plugin_dirs: Vec<PathBuf>,
    /// The network config directory; `None`: a conflist written for the harness's node.
    pub conf_dir: Option<PathBuf>,
    /// Bind mounts into podman's namespace (see `mount_namespace_holder`).
    pub binds: Vec<(PathBuf, &'static str)>,
}

impl Podman {
    /// podman for `node`, calling the workspace's overlay-cni (in
    /// `plugin_dir`) with a conflist for the harness's node layout.
    pub fn for_node(node: &Node, dir: &Path, plugin_dir: &Path) -> Result<Self> {
        let dirs = CniDirs { plugin_dirs: vec![plugin_dir.to_path_buf()], conf_dir: None, binds: Vec::new() };
        Self::with_cni(node, dir, dirs)
    }

    /// Writes containers.conf and storage.conf for `node` under `dir`, with the CNI setup `cni`.
    pub fn with_cni(node: &Node, dir: &Path, cni: CniDirs) -> Result<Self> {
        let dir = dir.join(format!("podman-n{}", node.index));
        std::fs::create_dir_all(&dir)?;
        let rootfs = busybox_rootfs(&dir)?;
        let conf_dir = match cni.conf_dir {
            Some(conf_dir) => conf_dir,
            None => {
                let conf_dir = dir.join("net.d");
                std::fs::create_dir_all(&conf_dir)?;
                let mut entry = node.cni_conf();
                entry.as_object_mut().map(|o| o.remove("cniVersion"));
                let conflist = serde_json::json!({
                    "cniVersion": "1.0.0",
                    "name": "overlay",
                    "plugins": [entry, {"type": "portmap", "capabilities": {"portMappings": true}}],
                });
                std::fs::write(conf_dir.join("10-overlay.conflist"), serde_json::to_string_pretty(&conflist)?)?;
                conf_dir
            }
        };
        // The reference plugins (portmap) come from Debian's containernetworking-plugins.
        let plugin_dirs: Vec<String> = cni
            .plugin_dirs
            .iter()
            .map(|d| format!("{:?}", d.display().to_string()))
            .chain(std::iter::once("\"/usr/lib/cni\"".to_string()))
            .collect();
        // No static_dir: podman's exit command (`podman container cleanup`,
        // run by conmon) does not get this file, so it must find the
        // database where --root puts it; else every attached `podman run`
        // waits 20 s for an exit code that never lands.
        let containers_conf = format!(
            r#"[network]
network_backend = "cni"
cni_plugin_dirs = [{plugins}]
network_config_dir = "{netd}"
default_network = "overlay"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{dir}/events.log"
tmp_dir = "{dir}/tmp"
volume_path = "{dir}/volumes"

[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
"#,
            plugins = plugin_dirs.join(", "),
            netd = conf_dir.display(),
            dir = dir.display(),
        );
        std::fs::write(dir.join("containers.conf"), containers_conf)?;
        std::fs::write(
            dir.join("storage.conf"),
            format!("[storage]\ndriver = \"vfs\"\nrunroot = \"{0}/run\"\ngraphroot = \"{0}/root\"\n", dir.display()),
        )?;
        Ok(Podman { dir, rootfs, ns: node.ns.name.clone(), holder: mount_namespace_holder(&cni.binds)? })
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = self.in_namespace("podman");
        c.args(args);
        c
    }

    /// `program` in the node's network namespace and podman's mount
    /// namespace, with this podman's configuration in its environment.
    pub fn in_namespace(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.nsenter(true, program.as_ref())
    }

    /// `program` in podman's mount namespace but the test's own network
    /// namespace (which reaches Debian's mirrors), with this podman's configuration.
    pub fn in_mount_namespace(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.nsenter(false, program.as_ref())
    }

    fn nsenter(&self, node_network: bool, program: &std::ffi::OsStr) -> Command {
        // nsenter, not `ip netns exec`: the latter remounts /sys and hides the
        // cgroup mount runc needs. nsenter opens every namespace before it
        // enters any, so the node's /run/netns path is read where the test
        // runs. Entering a mount namespace resets the root directory to that
        // namespace's, so `--root` and `--wd` take the holder's: under a
        // chroot (a fresh-machine run) that is the chroot, not the host's `/`.
        let mut c = Command::new("nsenter");
        c.arg(format!("--target={}", self.holder.id())).args(["--mount", "--root", "--wd"]);
        if node_network {
            c.arg(format!("--net=/run/netns/{}", self.ns));
        }
        c.arg(program)
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"))
            .env("XDG_RUNTIME_DIR", self.dir.join("xdg"))
            .env("TMPDIR", self.dir.join("tmp"));
        c
    }

    /// Runs podman and returns stdout.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let out = self.output(args)?;
        if !out.status.success() {
            bail!("podman {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Runs podman and returns how it ended, whatever that was.
    pub fn output(&self, args: &[&str]) -> Result<std::process::Output> {
        std::fs::create_dir_all(self.dir.join("tmp"))?;
        std::fs::create_dir_all(self.dir.join("xdg"))?;
        self.command(args).output().context("running podman (make deps installs it)")
    }

    /// Builds the overlay image as `make image` does (deploy/build-image,
    /// from Debian's packages, the base root cached in target/image), from
    /// the binaries in `bin_dir`, named `tag`.
    pub fn build_image(&self, bin_dir: &Path, tag: &str) -> Result<()> {
        std::fs::create_dir_all(self.dir.join("tmp"))?;
        std::fs::create_dir_all(self.dir.join("xdg"))?;
        let script = crate::manifests::deploy_dir().join("build-image");
        // The base root is fetched from Debian's mirrors: not from the node's namespace.
        let out = self
            .in_mount_namespace(&script)
            .args(["--engine", "podman", "--tag", tag, "--bin-dir"])
            .arg(bin_dir)
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        if !out.status.success() {
            bail!("{} failed: {}", script.display(), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    /// Copies image `tag` into `other`'s storage.
    pub fn copy_image_to(&self, tag: &str, other: &Podman) -> Result<()> {
        let archive = self.dir.join("image.tar");
        let archive = archive.to_str().context("non-UTF-8 test directory")?;
        self.run(&["save", "--quiet", "-o", archive, tag])?;
        other.run(&["load", "--quiet", "-i", archive])?;
        std::fs::remove_file(archive)?;
        Ok(())
    }

    /// Writes image `tag` to `archive` in docker's format, which `ctr images import` reads too.
    pub fn save_image(&self, tag: &str, archive: &Path) -> Result<()> {
        let path = archive.to_str().context("non-UTF-8 test directory")?;
        self.run(&["save", "--quiet", "--format", "docker-archive", "-o", path, tag])?;
        Ok(())
    }

    /// Starts container `name` on the overlay network serving the rootfs's
    /// `/www` over HTTP on port 80; returns its IPv4 address.
    pub fn serve_web(&self, name: &str) -> Result<String> {
        let rootfs = self.rootfs();
        let args = ["run", "-d", "--name", name, "--network", "overlay", "--rootfs", &rootfs];
        self.run(&[&args[..], &["/bin/httpd", "-f", "-p", "80", "-h", "/www"]].concat())?;
        self.run(&["inspect", name, "--format", "{{.NetworkSettings.Networks.overlay.IPAddress}}"])
    }

    /// From a fresh container on the overlay network, an HTTP GET of
    /// `/index.html` at `ip`: the response, or the error.
    pub fn fetch_page(&self, ip: &str) -> String {
        let rootfs = self.rootfs();
        // busybox-static's wget crashes in static glibc's resolver; nc speaks HTTP fine.
        let fetch = format!("printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {ip} 80");
        self.run(&["run", "--rm", "--network", "overlay", "--rootfs", &rootfs, "/bin/sh", "-c", &fetch])
            .unwrap_or_else(|e| e.to_string())
    }

    /// The busybox rootfs path, for `--rootfs`.
    pub fn rootfs(&self) -> String {
        self.rootfs.display().to_string()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Containers go first, so their network is torn down through the plugin.
        let _ = self.command(&["rm", "--all", "--force", "--time", "0"]).output();
        // conmon exits a moment after `rm` returns; then the holder goes, and
        // with the last process in it the namespace and its tmpfs mounts.
        let holder = self.holder.id();
        let settled = crate::wait_until(std::time::Duration::from_secs(20), || {
            crate::processes_in_mount_namespace_of(holder).len() <= 1
        });
        if !settled {
            // Whatever still runs there (a slow `podman container cleanup`)
            // would write into this podman's directory after the test removed
            // it: it goes now, so nothing outlives the test.
            for pid in crate::processes_in_mount_namespace_of(holder) {
                if pid != holder as i32 {
                    // SAFETY: kill(2) with a pid read from /proc.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            crate::wait_until(std::time::Duration::from_secs(5), || {
                crate::processes_in_mount_namespace_of(holder).len() <= 1
            });
        }
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}
