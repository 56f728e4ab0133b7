//! Stamps the binary with the commit it was built from and that commit's
//! date (reproducible: the same commit gives the same binary), for
//! `overlayd --version` and the `overlay_build_info` metric; and builds
//! the fast path's BPF programs (bpf/fast_path.c) with clang, which the
//! binary carries and loads when `--fast-path` is on.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}

/// Compiles bpf/fast_path.c into `$OUT_DIR/fast_path.o`: BPF bytecode with
/// its BTF (`-g`), which aya needs for the map definitions.
fn build_bpf() {
    let source = "bpf/fast_path.c";
    println!("cargo:rerun-if-changed={source}");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("fast_path.o");
    // The kernel's UAPI headers include <asm/types.h>, which Debian keeps under the multiarch triple.
    let multiarch = match std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("aarch64") => "aarch64-linux-gnu",
        _ => "x86_64-linux-gnu",
    };
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg(format!("-I/usr/include/{multiarch}"))
        .args(["-c", source, "-o"])
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{clang} failed on {source} ({s})"),
        Err(e) => panic!("cannot run {clang} for {source}: {e} (`make deps` installs clang and libbpf-dev)"),
    }
}

fn main() {
    build_bpf();
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some();
    let commit = if dirty && commit != "unknown" { format!("{commit}-dirty") } else { commit };
    let date = git(&["log", "-1", "--format=%cd", "--date=format:%Y-%m-%d"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=OVERLAY_COMMIT={commit}");
    println!("cargo:rustc-env=OVERLAY_BUILD_DATE={date}");
    // A new commit (or a checkout) changes these.
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        println!("cargo:rerun-if-changed={dir}/HEAD");
        println!("cargo:rerun-if-changed={dir}/index");
        if let Some(head) = git(&["symbolic-ref", "-q", "HEAD"]) {
            println!("cargo:rerun-if-changed={dir}/{head}");
        }
    }
}
