//! `overlayd status`: asks the running daemon of this node over its health
//! address, or its local socket, and prints its report (`status`).

use crate::flags::{RunArgs, StatusArgs};
use crate::health::{fetch, socket_path, Endpoint};
use crate::status::{Event, Report};

/// `overlayd status`: asks the running daemon and prints what it says.
/// Fails (exit 1) when no daemon answers; prints the report either way
/// when one does, ready or not.
pub async fn run(run: &RunArgs, args: &StatusArgs) -> anyhow::Result<()> {
    let endpoint = match args.address.or(run.node.health_addr) {
        Some(addr) => Endpoint::Tcp(addr),
        None => Endpoint::Unix(socket_path(&run.node.subnet_file)),
    };
    let (code, body) = fetch(&endpoint, "/status").await?;
    if code != 200 {
        anyhow::bail!("the daemon at {endpoint} answered {code}: {}", body.trim());
    }
    if args.json {
        print!("{body}");
        return Ok(());
    }
    let report: Report = serde_json::from_str(&body)
        .map_err(|e| anyhow::anyhow!("the daemon at {endpoint} sent a report this overlayd cannot read: {e}"))?;
    print!("{}", report.to_text(Event::now("").at));
    Ok(())
}
