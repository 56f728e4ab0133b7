//! The end-to-end harness: a cluster of network namespaces on one machine
//! (docs/testing.md), a real etcd, and the real `overlayd` binary in each node.
//!
//! Every namespace and process belongs to a guard whose `Drop` removes it, so
//! a failing or panicking test leaves nothing behind. Nothing touches the
//! root namespace; all traffic stays inside the test's own namespaces.

pub mod bulk;
pub mod cluster;
pub mod cni;
pub mod control_plane;
pub mod daemonset;
pub mod etcd;
pub mod kube_api;
pub mod manifests;
pub mod netns;
pub mod netpol;
pub mod pki;
pub mod podman;
pub mod probe;
pub mod real_node;
pub mod scenarios;
pub mod strict;
pub mod truth_table;

pub use cluster::{Cluster, ClusterOptions, Node, Pod};
pub use etcd::Etcd;
pub use netns::{ip, Netns};

/// Whether this process runs as root, as building network namespaces needs.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Fails the calling test, by name, unless it runs as root. The tests that
/// need root carry `#[ignore = "needs root ..."]`, so a plain `cargo test`
/// lists them as ignored with that reason; `make test` runs them as root
/// (`--include-ignored`). One that is run without root fails here, clearly,
/// instead of passing without having tested anything.
pub fn require_root() {
    if !is_root() {
        let test = std::thread::current().name().unwrap_or("this test").to_string();
        panic!("{test}: needs root to create network namespaces; run `make test` as root");
    }
}

/// A short random suffix so parallel tests never share names.
pub fn random_suffix() -> String {
    let mut bytes = [0u8; 3];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut bytes);
    }
    format!("{:02x}{:02x}{:02x}", bytes[0], bytes[1], bytes[2])
}

/// The path of a workspace binary (`overlayd`), built next to the test binary.
pub fn workspace_bin(name: &str) -> std::path::PathBuf {
    let var = format!("{}_BIN", name.to_uppercase().replace('-', "_"));
    if let Ok(path) = std::env::var(&var) {
        return path.into();
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(path.exists(), "{} not found: run `cargo build --bins` first or set {var}", path.display());
    path
}

/// Polls `check` every 50 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: std::time::Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Removes a test's scratch tree, and says so on stderr when it cannot.
///
/// A process that has just been told to go (conmon's `podman container
/// cleanup`, a daemon's last write) may add an entry while the tree is being
/// removed, and `remove_dir_all` then fails with "directory not empty" and
/// leaves the rest behind. So it tries again for a few seconds.
pub fn remove_tree(dir: &std::path::Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) if std::time::Instant::now() >= deadline => {
                eprintln!("cannot remove the test directory {}: {e}", dir.display());
                return;
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    }
}

/// The processes in the mount namespace of `pid`, `pid` included.
pub fn processes_in_mount_namespace_of(pid: u32) -> Vec<i32> {
    let Ok(ns) = std::fs::read_link(format!("/proc/{pid}/ns/mnt")) else { return Vec::new() };
    let Ok(procs) = std::fs::read_dir("/proc") else { return Vec::new() };
    procs
        .flatten()
        .filter(|p| std::fs::read_link(p.path().join("ns/mnt")).is_ok_and(|other| other == ns))
        .filter_map(|p| p.file_name().to_str()?.parse().ok())
        .collect()
}

/// The last `lines` lines of the file at `path` (nothing when it cannot be read): the end of a log, for an error.
pub fn tail_of(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Under a chroot (the fresh root `fresh-machine` runs CI in) a new mount namespace's root is still the host's;
/// only the process's root is the chroot. A container runtime's `pivot_root` from there moves the container's
/// rootfs to where the chroot's root was, not to the namespace's root: the container's own process sees its image,
/// but everything that joins its mount namespace later (`kubectl exec`, exec probes) gets the namespace's root, the
/// host's whole filesystem. That failed the DNS test and every e2e netpol probe in the fresh root only.
///
/// So a namespace's holder first leaves the chroot (perl, from perl-base, which every Debian has: a chroot into a
/// subdirectory keeps the working directory outside it, whence `..` climbs to the namespace's root) and exec's
/// the setup script, which starts with [`CHROOT_BECOMES_ROOT`]. Outside a chroot this leaves the root as it was.
const LEAVE_CHROOT: &str = r#"use strict;
my @root = stat("/") or die "stat /: $!";
$ENV{OVERLAY_CHROOT} = "$root[0]:$root[1]";
$ENV{OVERLAY_CHROOT_EXIT} = "/tmp/.leave-chroot.$$";
chdir "/" or die "chdir /: $!";
mkdir $ENV{OVERLAY_CHROOT_EXIT} or die "mkdir $ENV{OVERLAY_CHROOT_EXIT}: $!";
chroot $ENV{OVERLAY_CHROOT_EXIT} or die "chroot: $!";
chdir ".." for 1 .. 256;
chroot "." or die "chroot to the namespace's root: $!";
exec @ARGV or die "exec: $!";"#;

/// The start of the setup script, at the namespace's root after [`LEAVE_CHROOT`]: the mount that was the
/// chroot's root (found by its device and inode) becomes the namespace's root, by `pivot_root`.
const CHROOT_BECOMES_ROOT: &str = r#"set -e
chroot_at=
while read -r _ _ _ _ at _; do
  if [ "$(stat -c %d:%i "$at" 2>/dev/null)" = "$OVERLAY_CHROOT" ]; then chroot_at=$at; break; fi
done </proc/self/mountinfo
[ -n "$chroot_at" ] || { echo "the mount of the root we left is not found" >&2; exit 1; }
if [ "$chroot_at" != / ]; then
  cd "$chroot_at"
  pivot_root . .
  umount -l .
  cd /
fi
rmdir "$OVERLAY_CHROOT_EXIT"
unset OVERLAY_CHROOT OVERLAY_CHROOT_EXIT"#;

/// Starts a process in a private mount namespace (`unshare --mount`) that
/// runs `script` (sh, with `args`) to set up its mounts, then holds the
/// namespace open for others to enter (`nsenter --target`). The script
/// prints `ready` when its mounts are in place; anything else, or its exit,
/// is an error naming `what`, with what the script said.
pub fn hold_mount_namespace(
    what: &str,
    script: &str,
    args: &[std::ffi::OsString],
) -> anyhow::Result<std::process::Child> {
    use anyhow::Context;
    use std::io::BufRead;
    let script = format!("{CHROOT_BECOMES_ROOT}\n{script}");
    let mut holder = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "perl", "-e", LEAVE_CHROOT, "sh", "-c", &script, "sh"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {what} (unshare, from util-linux)"))?;
    let mut line = String::new();
    if let Some(out) = holder.stdout.take() {
        std::io::BufReader::new(out).read_line(&mut line)?;
    }
    if line.trim() != "ready" {
        let _ = holder.kill();
        let out = holder.wait_with_output()?;
        anyhow::bail!("{what} could not be set up: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(holder)
}
