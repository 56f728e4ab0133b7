//! overlay-cni: placeholder until the CNI plugin lands (see issue 3). It
//! answers VERSION and refuses everything else with a proper CNI error, so a
//! runtime that finds it reports a clear message instead of hanging.

use std::process::ExitCode;

const SUPPORTED: &[&str] = &["0.3.1", "0.4.0", "1.0.0", "1.1.0"];

fn main() -> ExitCode {
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    if command == "VERSION" {
        let answer = serde_json::json!({"cniVersion": "1.1.0", "supportedVersions": SUPPORTED});
        println!("{answer}");
        return ExitCode::SUCCESS;
    }
    let error = serde_json::json!({
        "cniVersion": "1.1.0",
        "code": 4,
        "msg": "overlay-cni is not implemented yet",
        "details": format!("CNI_COMMAND={command:?}: use flannel's CNI plugin (bridge + host-local) with overlayd's subnet.env meanwhile"),
    });
    println!("{error}");
    ExitCode::FAILURE
}
