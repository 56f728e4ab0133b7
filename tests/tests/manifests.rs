//! The deploy manifests: each document decodes strictly into its
//! `k8s-openapi` type, and the DaemonSet says what the issue and the daemon
//! need. (`make test` also runs `kubernetes-validate --strict` on them.)

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use overlay_tests::manifests::{cluster_role_grants, deploy_dir, load, one};
use overlay_tests::strict::decode;
use serde_json::Value;

fn docs() -> Vec<Value> {
    load(&deploy_dir().join("overlay.yaml")).unwrap()
}

#[test]
fn every_document_decodes_strictly() {
    let docs = docs();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"]);
    for doc in &docs {
        let result = match doc["kind"].as_str().unwrap() {
            "Namespace" => decode::<Namespace>(doc).map(|_| ()),
            "ServiceAccount" => decode::<ServiceAccount>(doc).map(|_| ()),
            "ClusterRole" => decode::<ClusterRole>(doc).map(|_| ()),
            "ClusterRoleBinding" => decode::<ClusterRoleBinding>(doc).map(|_| ()),
            "ConfigMap" => decode::<ConfigMap>(doc).map(|_| ()),
            "DaemonSet" => decode::<DaemonSet>(doc).map(|_| ()),
            other => panic!("unexpected kind {other}"),
        };
        result.unwrap_or_else(|e| panic!("{}: {e}", doc["kind"]));
    }
}

#[test]
fn cluster_role_is_what_the_daemon_uses_and_nothing_else() {
    // tests/tests/kube_overlay.rs compares this with the requests the
    // daemons really made; here: exactly the documented set. No patch on
    // Nodes themselves: everything is written through nodes/status.
    // NetworkPolicy grew it by exactly list and watch on pods, namespaces
    // and networkpolicies; ClusterNetworkPolicy by list and watch on
    // clusternetworkpolicies.
    let grants = cluster_role_grants().unwrap();
    let expected: Vec<(String, String)> = [
        ("get", "nodes"),
        ("list", "clusternetworkpolicies"),
        ("list", "namespaces"),
        ("list", "networkpolicies"),
        ("list", "nodes"),
        ("list", "pods"),
        ("patch", "nodes/status"),
        ("watch", "clusternetworkpolicies"),
        ("watch", "namespaces"),
        ("watch", "networkpolicies"),
        ("watch", "nodes"),
        ("watch", "pods"),
    ]
    .iter()
    .map(|(v, r)| (v.to_string(), r.to_string()))
    .collect();
    assert_eq!(grants.into_iter().collect::<Vec<_>>(), expected);
    let docs = docs();
    let binding: ClusterRoleBinding = decode(one(&docs, "ClusterRoleBinding").unwrap()).unwrap();
    let sa: ServiceAccount = decode(one(&docs, "ServiceAccount").unwrap()).unwrap();
    let ds: DaemonSet = decode(one(&docs, "DaemonSet").unwrap()).unwrap();
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(binding.role_ref.name, "overlay");
    assert_eq!((subject.name.as_str(), subject.namespace.as_deref()), ("overlay", sa.metadata.namespace.as_deref()));
    assert_eq!(ds.spec.unwrap().template.spec.unwrap().service_account_name.as_deref(), Some("overlay"));
}

#[test]
fn config_map_holds_a_valid_net_conf_and_the_conflist() {
    let docs = docs();
    let cm: ConfigMap = decode(one(&docs, "ConfigMap").unwrap()).unwrap();
    let data: BTreeMap<String, String> = cm.data.unwrap();
    let config = proto::NetConfig::parse(&data["net-conf.json"]).unwrap();
    assert_eq!(config.network_v4().unwrap().to_string(), "10.244.0.0/16");
    // The conflist is the one shipped for hosts, so the two never drift.
    let in_map: Value = serde_json::from_str(&data["cni-conf.json"]).unwrap();
    let shipped: Value =
        serde_json::from_str(&std::fs::read_to_string(deploy_dir().join("10-overlay.conflist")).unwrap()).unwrap();
    assert_eq!(in_map, shipped);
}

#[test]
fn daemon_set_runs_on_every_node_with_the_least_it_needs() {
    let docs = docs();
    let ds: DaemonSet = decode(one(&docs, "DaemonSet").unwrap()).unwrap();
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
    let tolerations = pod.tolerations.unwrap();
    assert!(tolerations
        .iter()
        .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()));

    let daemon = &pod.containers[0];
    let security = daemon.security_context.clone().unwrap();
    assert_ne!(security.privileged, Some(true), "privileged without a written reason");
    let mut added = security.capabilities.clone().unwrap().add.unwrap();
    added.sort();
    assert_eq!(added, ["NET_ADMIN", "NET_RAW"]);
    let env = daemon.env.clone().unwrap();
    let node_name = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
    let field = node_name.value_from.as_ref().unwrap().field_ref.as_ref().unwrap();
    assert_eq!(field.field_path, "spec.nodeName");
    assert!(env.iter().any(|e| e.name == "OVERLAYD_KUBE_SUBNET_MGR" && e.value.as_deref() == Some("true")));
    // Every OVERLAYD_* variable set is one overlayd reads.
    let help = std::process::Command::new(overlay_tests::workspace_bin("overlayd")).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for e in env.iter().filter(|e| e.name.starts_with("OVERLAYD_")) {
        let known = help.contains(&format!("env: {}=", e.name)) || help.contains(&format!("set {} to", e.name));
        assert!(known, "overlayd has no {}:\n{help}", e.name);
    }
    let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| p.clone().unwrap().http_get.unwrap().path.unwrap();
    assert_eq!(probe_path(&daemon.liveness_probe), "/healthz");
    assert_eq!(probe_path(&daemon.readiness_probe), "/readyz");
    let requests = daemon.resources.clone().unwrap().requests.unwrap();
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"));

    let host_paths: Vec<String> =
        pod.volumes.unwrap().iter().filter_map(|v| v.host_path.as_ref().map(|h| h.path.clone())).collect();
    for path in ["/run/overlay", "/etc/cni/net.d", "/opt/cni/bin"] {
        assert!(host_paths.iter().any(|p| p == path), "no host mount of {path}: {host_paths:?}");
    }
    // The init container installs through overlayd (no shell in the image), with no capability at all.
    // tests/tests/image.rs runs both containers from the manifest.
    let init = &pod.init_containers.unwrap()[0];
    let command = init.command.clone().unwrap();
    assert_eq!(command[..2], ["/usr/local/bin/overlayd", "install-cni"]);
    assert!(command.contains(&"--bin-dir=/host/opt/cni/bin".to_string()), "{command:?}");
    let init_security = init.security_context.clone().unwrap();
    assert_eq!(init_security.capabilities.clone().unwrap().drop.unwrap(), ["ALL"]);
    for security in [&init_security, &security] {
        assert_eq!(
            (security.read_only_root_filesystem, security.allow_privilege_escalation),
            (Some(true), Some(false))
        );
    }
}
