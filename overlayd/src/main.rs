//! overlayd: leases a subnet (etcd or the Kubernetes API), builds the VXLAN
//! device, programs every peer, masquerades outgoing pod traffic. See
//! docs/architecture.md.

mod backoff;
mod daemon;
mod dataplane;
mod flags;
mod health;
mod lease;
mod masq;
mod metrics;
mod peers;
mod plan;
mod reconcile;
mod subnet_file;

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // One malloc arena for every thread: the bulk netlink work runs on a
    // blocking thread, and a second arena would keep the megabytes a big
    // dump decodes into where `malloc_trim` cannot give them back as well.
    // SAFETY: mallopt only tunes glibc's allocator; no allocation is live on another thread yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    let cli = flags::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_env("OVERLAYD_LOG").unwrap_or_else(|_| EnvFilter::new("info")))
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let result =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(anyhow::Error::from).and_then(
            |rt| match cli.command {
                Some(flags::Command::Cleanup) => rt.block_on(daemon::cleanup(&cli.run)),
                None => rt.block_on(daemon::run(cli.run)),
            },
        );
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("overlayd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
