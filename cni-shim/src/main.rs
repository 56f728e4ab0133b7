//! overlay-cni: one binary that does the whole CNI job for the overlay
//! (bridge, veth, IPAM), reading the subnet from overlayd's subnet.env.
//! See README "CNI plugin" for its config keys.

mod commands;
mod config;
mod error;
#[cfg(test)]
mod fuzz;
mod ipam;
mod link;
mod result;

use std::io::Read;
use std::process::ExitCode;

use commands::Env;
use config::NetConf;
use error::{code, CniError};

fn run(env: &Env, stdin: &[u8]) -> Result<Option<serde_json::Value>, (CniError, String)> {
    let fallback = "1.1.0".to_string();
    if env.command == "VERSION" {
        return Ok(Some(commands::version()));
    }
    let conf = NetConf::parse(stdin).map_err(|e| (e, fallback.clone()))?;
    let version = conf.cni_version.clone();
    let with_version = |e: CniError| (e, version.clone());
    match env.command.as_str() {
        "ADD" => block_on(commands::add(&conf, env)).map(Some).map_err(with_version),
        "DEL" => block_on(commands::del(&conf, env)).map(|_| None).map_err(with_version),
        "CHECK" => commands::check(&conf, env).map(|_| None).map_err(with_version),
        "STATUS" => commands::status(&conf).map(|_| None).map_err(with_version),
        "GC" => commands::gc(&conf).map(|_| None).map_err(with_version),
        other => Err(with_version(CniError::new(
            code::INVALID_ENV,
            format!("CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, STATUS, GC, VERSION"),
        ))),
    }
}

/// The about line of a plugin run without CNI_COMMAND (libcni's skel prints one).
fn about() -> String {
    format!(
        "CNI overlay plugin v{}\nCNI protocol versions supported: {}",
        env!("CARGO_PKG_VERSION"),
        config::SUPPORTED_VERSIONS.join(", ")
    )
}

/// Runs a verb's netlink work on a single-threaded runtime (the netlink
/// connection's I/O is a task on it).
fn block_on<T>(work: impl std::future::Future<Output = Result<T, CniError>>) -> Result<T, CniError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| CniError::io("starting the netlink runtime", e))?
        .block_on(work)
}

fn main() -> ExitCode {
    let env = Env::from_process();
    // Run by hand: say what this is, as the reference plugins do, instead of waiting on stdin.
    if env.command.is_empty() {
        eprintln!("{}", about());
        return ExitCode::SUCCESS;
    }
    let mut stdin = Vec::new();
    if env.command != "VERSION" {
        if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
            println!("{}", CniError::io("reading the network config from stdin", e).to_json("1.1.0"));
            return ExitCode::FAILURE;
        }
    }
    match run(&env, &stdin) {
        Ok(Some(result)) => {
            println!("{result}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err((e, version)) => {
            println!("{}", e.to_json(&version));
            eprintln!("overlay-cni: {e}");
            ExitCode::FAILURE
        }
    }
}
