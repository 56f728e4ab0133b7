//! `overlayd status`: asks the running daemon of this node over its health
//! address, or its local socket, and prints its report (`status`).

use crate::flags::{ExplainArgs, RunArgs, StatusArgs};
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

/// `overlayd explain SRC DST PORT/PROTO`: asks the running daemon and
/// prints its decision and the rules that made it. Exit 0 when it answered
/// (allowed or denied), 1 when it could not.
pub async fn explain(run: &RunArgs, args: &ExplainArgs) -> anyhow::Result<()> {
    let endpoint = match args.address.or(run.node.health_addr) {
        Some(addr) => Endpoint::Tcp(addr),
        None => Endpoint::Unix(socket_path(&run.node.subnet_file)),
    };
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.append_pair("src", &args.src).append_pair("dst", &args.dst).append_pair("port", &args.port);
    if let Some(family) = args.family {
        query.append_pair("family", &family.to_string());
    }
    let (code, body) = fetch(&endpoint, &format!("/explain?{}", query.finish())).await?;
    if code != 200 {
        anyhow::bail!("the daemon at {endpoint} answered {code}: {}", body.trim());
    }
    if args.json {
        print!("{body}");
        return Ok(());
    }
    let answer: crate::policy::explain::Explanation = serde_json::from_str(&body)
        .map_err(|e| anyhow::anyhow!("the daemon at {endpoint} sent an answer this overlayd cannot read: {e}"))?;
    print!("{}", answer.to_text());
    Ok(())
}
