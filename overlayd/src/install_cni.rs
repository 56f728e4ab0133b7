//! `overlayd install-cni`: puts the CNI plugin and the network config list
//! onto the host, for the DaemonSet's init container. It replaces the shell
//! script such containers usually run, so the image needs no shell.
//!
//! Each file is written beside its destination and renamed over it: a
//! container runtime that execs the plugin or reads the config at that
//! moment sees the old file or the new one, never half of one, and a
//! running plugin's binary is replaced rather than rewritten in place
//! (which would fail with ETXTBSY). The plugin goes first, because a runtime
//! starts using the network as soon as its config appears. A conflist that
//! is not one overlay can use is refused before anything is written.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tracing::info;

use crate::flags::InstallCniArgs;

/// The plugin's file name in the host's CNI binary directory; the conflist's `type`.
const PLUGIN: &str = "overlay-cni";

/// What became of one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Installed,
    /// Already there, with the same content and mode: left alone.
    Unchanged,
}

pub fn run(args: &InstallCniArgs) -> Result<()> {
    let conflist = std::fs::read(&args.conflist).with_context(|| format!("reading {}", args.conflist.display()))?;
    check_conflist(&conflist)
        .with_context(|| format!("{} is not a network config list for overlay", args.conflist.display()))?;
    if args.conflist_name.contains('/') || !args.conflist_name.ends_with(".conflist") {
        bail!(
            "--conflist-name {:?}: must be a file name ending in .conflist (runtimes ignore others)",
            args.conflist_name
        );
    }
    let source = match &args.plugin {
        Some(path) => path.clone(),
        None => beside_this_binary(PLUGIN)?,
    };
    let plugin = std::fs::read(&source).with_context(|| format!("reading the plugin {}", source.display()))?;
    let outcome = install(&args.bin_dir, PLUGIN, &plugin, 0o755)?;
    info!(path = %args.bin_dir.join(PLUGIN).display(), bytes = plugin.len(), ?outcome, "CNI plugin");
    let outcome = install(&args.conf_dir, &args.conflist_name, &conflist, 0o644)?;
    info!(path = %args.conf_dir.join(&args.conflist_name).display(), ?outcome, "CNI network config");
    Ok(())
}

/// `name` in the directory of the running executable.
fn beside_this_binary(name: &str) -> Result<PathBuf> {
    let me =
        std::env::current_exe().context("finding this executable (to find the plugin beside it; or use --plugin)")?;
    Ok(me.with_file_name(name))
}

/// Checks that `bytes` is a CNI network config list whose chain has overlay's plugin.
fn check_conflist(bytes: &[u8]) -> Result<()> {
    let value: Value = serde_json::from_slice(bytes).context("not JSON")?;
    let Some(list) = value.as_object() else { bail!("not a JSON object") };
    for field in ["cniVersion", "name"] {
        match list.get(field) {
            Some(Value::String(s)) if !s.is_empty() => {}
            Some(_) => bail!("{field:?} must be a non-empty string"),
            None => bail!("no {field:?}"),
        }
    }
    let Some(plugins) = list.get("plugins").and_then(Value::as_array) else {
        if list.contains_key("type") {
            bail!("a single network config, not a list: put it in a \"plugins\" list");
        }
        bail!("no \"plugins\" list");
    };
    let mut types = Vec::with_capacity(plugins.len());
    for (i, plugin) in plugins.iter().enumerate() {
        match plugin.get("type").and_then(Value::as_str) {
            Some(t) if !t.is_empty() => types.push(t),
            _ => bail!("plugins[{i}] has no \"type\""),
        }
    }
    if !types.contains(&PLUGIN) {
        bail!("no plugin of type {PLUGIN:?} in its chain {types:?}");
    }
    Ok(())
}

/// Writes `content` with `mode` to `dir/name` through a rename, unless it is already there.
fn install(dir: &Path, name: &str, content: &[u8], mode: u32) -> Result<Outcome> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp_prefix = format!(".{name}.tmp.");
    remove_stale(dir, &tmp_prefix);
    let dest = dir.join(name);
    let same_mode = std::fs::metadata(&dest).is_ok_and(|m| m.permissions().mode() & 0o7777 == mode);
    if same_mode && std::fs::read(&dest).is_ok_and(|old| old == content) {
        return Ok(Outcome::Unchanged);
    }
    let tmp = dir.join(format!("{tmp_prefix}{}", std::process::id()));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        file.write_all(content)?;
        // The umask may have narrowed the mode given to open.
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        std::fs::rename(&tmp, &dest)?;
        // The rename itself survives a crash only once the directory is on disk.
        std::fs::File::open(dir)?.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("installing {}", dest.display()));
    }
    Ok(Outcome::Installed)
}

/// Removes temporary files an earlier, interrupted install left in `dir`.
fn remove_stale(dir: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        if entry.file_name().to_str().is_some_and(|n| n.starts_with(prefix)) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    const CONFLIST: &str = r#"{"cniVersion": "1.0.0", "name": "overlay",
        "plugins": [{"type": "overlay-cni"}, {"type": "portmap", "capabilities": {"portMappings": true}}]}"#;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("overlay-install-cni-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn args(dir: &Path) -> InstallCniArgs {
        std::fs::write(dir.join("cni-conf.json"), CONFLIST).unwrap();
        std::fs::write(dir.join("plugin"), b"\x7fELF new plugin").unwrap();
        InstallCniArgs {
            plugin: Some(dir.join("plugin")),
            bin_dir: dir.join("host/opt/cni/bin"),
            conflist: dir.join("cni-conf.json"),
            conf_dir: dir.join("host/etc/cni/net.d"),
            conflist_name: "10-overlay.conflist".into(),
        }
    }

    #[test]
    fn conflists_overlay_cannot_use_are_refused_with_the_reason() {
        check_conflist(CONFLIST.as_bytes()).unwrap();
        for (bad, says) in [
            ("", "not JSON"),
            ("[]", "not a JSON object"),
            (
                r#"{"cniVersion": "1.0.0", "name": "overlay", "type": "overlay-cni"}"#,
                "not a list: put it in a \"plugins\" list",
            ),
            (r#"{"cniVersion": "1.0.0", "name": "", "plugins": []}"#, "\"name\" must be"),
            (r#"{"cniVersion": "1.0.0", "name": "overlay"}"#, "no \"plugins\""),
            (r#"{"name": "overlay", "plugins": []}"#, "no \"cniVersion\""),
            (r#"{"cniVersion": "1.0.0", "name": "overlay", "plugins": [{"types": "x"}]}"#, "plugins[0] has no"),
            (r#"{"cniVersion": "1.0.0", "name": "overlay", "plugins": [{"type": "bridge"}]}"#, "no plugin of type"),
        ] {
            let e = format!("{:#}", check_conflist(bad.as_bytes()).unwrap_err());
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn installs_each_file_by_rename_and_leaves_an_unchanged_one_alone() {
        let dir = scratch("rename");
        let args = args(&dir);
        // An old plugin, held open as a running plugin would be, and a temp file of a killed install.
        std::fs::create_dir_all(&args.bin_dir).unwrap();
        std::fs::write(args.bin_dir.join(PLUGIN), b"old plugin").unwrap();
        let old = std::fs::File::open(args.bin_dir.join(PLUGIN)).unwrap();
        std::fs::write(args.bin_dir.join(".overlay-cni.tmp.1"), b"half").unwrap();
        run(&args).unwrap();

        let plugin = args.bin_dir.join(PLUGIN);
        assert_eq!(std::fs::read(&plugin).unwrap(), b"\x7fELF new plugin");
        assert_eq!(std::fs::metadata(&plugin).unwrap().permissions().mode() & 0o777, 0o755);
        assert_ne!(std::fs::metadata(&plugin).unwrap().ino(), old.metadata().unwrap().ino(), "replaced, not rewritten");
        assert_eq!(std::io::read_to_string(&old).unwrap(), "old plugin", "the open old file is untouched");
        let conf = args.conf_dir.join("10-overlay.conflist");
        assert_eq!(std::fs::read_to_string(&conf).unwrap(), CONFLIST);
        assert_eq!(std::fs::metadata(&conf).unwrap().permissions().mode() & 0o777, 0o644);
        let names: Vec<String> =
            std::fs::read_dir(&args.bin_dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert_eq!(names, [PLUGIN], "no temporary file is left");

        let inode = std::fs::metadata(&plugin).unwrap().ino();
        assert_eq!(install(&args.bin_dir, PLUGIN, b"\x7fELF new plugin", 0o755).unwrap(), Outcome::Unchanged);
        assert_eq!(std::fs::metadata(&plugin).unwrap().ino(), inode);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_bad_conflist_installs_nothing() {
        let dir = scratch("bad");
        let args = args(&dir);
        std::fs::write(
            &args.conflist,
            r#"{"cniVersion": "1.0.0", "name": "overlay", "plugins": [{"type": "flannel"}]}"#,
        )
        .unwrap();
        let e = format!("{:#}", run(&args).unwrap_err());
        assert!(e.contains("cni-conf.json is not a network config list for overlay") && e.contains("flannel"), "{e}");
        assert!(!args.bin_dir.exists() && !args.conf_dir.exists());
        let mut named = args.clone();
        std::fs::write(&named.conflist, CONFLIST).unwrap();
        named.conflist_name = "overlay.json".into();
        assert!(format!("{:#}", run(&named).unwrap_err()).contains("ending in .conflist"));
        assert!(!args.bin_dir.exists());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
