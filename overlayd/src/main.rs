//! overlayd: leases a subnet (etcd or the Kubernetes API), builds the VXLAN
//! device, programs every peer, masquerades outgoing pod traffic. See
//! docs/architecture.md.

mod admission;
mod backoff;
mod cleanup;
mod daemon;
mod dataplane;
mod drift;
mod flags;
mod health;
mod install_cni;
mod instance_lock;
mod kubernetes;
mod lease;
mod list_watch;
mod logging;
mod memory;
mod metrics;
mod nft;
mod node_plan;
mod node_state;
mod outage;
mod peers;
mod plan;
mod policy;
mod reconcile;
mod reflector;
mod status;
mod status_command;
mod version;
mod vtep;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // One malloc arena for every thread: the bulk netlink work runs on a
    // blocking thread, and a second arena would keep the megabytes a big
    // dump decodes into where `malloc_trim` cannot give them back as well.
    // SAFETY: mallopt only tunes glibc's allocator; no allocation is live on another thread yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    // flanneld's command line and environment work as they are (flags::flannel).
    let (args, env_warnings) = flags::flannel::command_line(std::env::args_os(), std::env::vars_os());
    let mut cli = flags::Cli::parse_from(args);
    let flannel = cli.run.flannel.resolve();
    cli.run.node.health_addr = cli.run.node.health_addr.or(flannel.health_addr);
    logging::init(
        cli.log.log_level.as_deref(),
        flannel.log_filter.unwrap_or(logging::DEFAULT_FILTER),
        cli.log.log_format,
    );
    for warning in env_warnings.iter().chain(&flannel.warnings) {
        tracing::warn!("{warning}");
    }
    // install-cni runs once and needs no runtime.
    let runtime = || tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(anyhow::Error::from);
    let result = match cli.command {
        Some(flags::Command::InstallCni(args)) => install_cni::run(&args),
        Some(flags::Command::Status(args)) => {
            runtime().and_then(|rt| rt.block_on(status_command::run(&cli.run, &args)))
        }
        Some(flags::Command::Explain(args)) => {
            runtime().and_then(|rt| rt.block_on(status_command::explain(&cli.run, &args)))
        }
        Some(flags::Command::Cleanup(args)) => runtime().and_then(|rt| rt.block_on(cleanup::run(&cli.run, &args))),
        // The daemon's tasks that hold the lease store run beside its loop, on its one thread.
        None => runtime().and_then(|rt| rt.block_on(tokio::task::LocalSet::new().run_until(daemon::run(cli.run)))),
    };
    exit_code(result)
}

fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Once, through the log (a JSON log stays JSON).
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
