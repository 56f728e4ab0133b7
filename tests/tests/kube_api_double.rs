//! The Kubernetes API test double keeps the promises its docs make: the
//! semantics overlayd depends on, and strictness where a real API server is
//! strict. Raw HTTP on loopback, so the bytes on the wire are what is tested.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use overlay_tests::kube_api::KubeApi;
use serde_json::{json, Value};

fn api() -> (KubeApi, SocketAddr) {
    let api = KubeApi::start_on_loopback(vec!["10.244.0.0/16".parse().unwrap()]).unwrap();
    let addr: SocketAddr = api.url().trim_start_matches("http://").parse().unwrap();
    (api, addr)
}

/// One request; returns the status code and the JSON body.
fn call(addr: SocketAddr, method: &str, path: &str, content_type: &str, body: &str) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    // A whole body (Content-Length), or a chunked one (a list from the cache), read to its end.
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_string() };
    (code, serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
    out
}

fn patch(addr: SocketAddr, path: &str, content_type: &str, body: Value) -> (u16, Value) {
    call(addr, "PATCH", path, content_type, &body.to_string())
}

/// Opens a watch and returns a reader positioned at the first event line.
fn watch(addr: SocketAddr, query: &str) -> BufReader<TcpStream> {
    watch_path(addr, "/api/v1/nodes", query)
}

fn watch_path(addr: SocketAddr, path: &str, query: &str) -> BufReader<TcpStream> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path}?watch=true&{query} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line == "\r\n" {
            return r;
        }
    }
}

/// The next watch event (chunked encoding: a size line, the event, CRLF).
fn next_event(r: &mut BufReader<TcpStream>) -> Value {
    let mut size = String::new();
    r.read_line(&mut size).unwrap();
    let n = usize::from_str_radix(size.trim(), 16).unwrap();
    let mut chunk = vec![0; n + 2];
    r.read_exact(&mut chunk).unwrap();
    serde_json::from_slice(&chunk[..n]).unwrap()
}

#[test]
fn lists_in_pages_and_assigns_pod_cidrs_like_node_ipam() {
    let (api, addr) = api();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        let cidr = api.add_node(name, std::net::Ipv4Addr::new(192, 168, 0, i as u8 + 1), true).unwrap().unwrap();
        assert_eq!(cidr.to_string(), format!("10.244.{i}.0/24"));
    }
    let (code, page) = call(addr, "GET", "/api/v1/nodes?limit=2", "", "");
    assert_eq!(code, 200);
    assert_eq!(page["kind"], "NodeList");
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    assert!(page["items"][0].get("kind").is_none(), "list items carry no kind");
    let token = page["metadata"]["continue"].as_str().unwrap().replace('/', "%2F");
    let (_, rest) = call(addr, "GET", &format!("/api/v1/nodes?limit=2&continue={token}"), "", "");
    assert_eq!(rest["items"][0]["metadata"]["name"], "c");
    assert!(rest["metadata"].get("continue").is_none());
    assert_eq!(rest["items"][0]["spec"]["podCIDRs"], json!(["10.244.2.0/24"]));
    // Deleting a node frees its subnet for the next one.
    api.delete_node("b").unwrap();
    assert_eq!(api.add_node("d", "192.168.0.4".parse().unwrap(), true).unwrap().unwrap().to_string(), "10.244.1.0/24");
}

#[test]
fn patches_by_content_type_each_on_its_own_part() {
    let (api, addr) = api();
    api.add_node("a", "192.168.0.1".parse().unwrap(), true).unwrap();
    let rv = |v: &Value| v["metadata"]["resourceVersion"].as_str().unwrap().to_string();

    let (code, merged) = patch(
        addr,
        "/api/v1/nodes/a",
        "application/merge-patch+json",
        json!({"metadata": {"annotations": {"x": "1"}}}),
    );
    assert_eq!(code, 200, "{merged}");
    assert_eq!(merged["metadata"]["annotations"]["x"], "1");
    // The same patch again changes nothing, so the version stays.
    let (_, again) = patch(
        addr,
        "/api/v1/nodes/a",
        "application/merge-patch+json",
        json!({"metadata": {"annotations": {"x": "1"}}}),
    );
    assert_eq!(rv(&again), rv(&merged));

    let (code, json_patched) = patch(
        addr,
        "/api/v1/nodes/a",
        "application/json-patch+json",
        json!([{"op": "add", "path": "/metadata/labels/role", "value": "edge"}]),
    );
    assert_eq!(code, 200, "{json_patched}");
    assert_eq!(json_patched["metadata"]["labels"]["role"], "edge");

    // Strategic merge on the status: conditions merge by type.
    let condition = json!({"type": "NetworkUnavailable", "status": "False", "reason": "OverlayIsUp"});
    let (code, status) = patch(
        addr,
        "/api/v1/nodes/a/status",
        "application/strategic-merge-patch+json",
        json!({"status": {"conditions": [condition]}}),
    );
    assert_eq!(code, 200, "{status}");
    let types: Vec<&str> =
        status["status"]["conditions"].as_array().unwrap().iter().map(|c| c["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["Ready", "NetworkUnavailable"]);
    // The main resource ignores status; the status subresource ignores the rest.
    let (_, ignored) =
        patch(addr, "/api/v1/nodes/a", "application/merge-patch+json", json!({"status": {"conditions": null}}));
    assert_eq!(ignored["status"]["conditions"].as_array().unwrap().len(), 2);
    let (_, ignored) =
        patch(addr, "/api/v1/nodes/a/status", "application/merge-patch+json", json!({"spec": {"unschedulable": true}}));
    assert!(ignored["spec"].get("unschedulable").is_none());
    assert!(api.node("a").unwrap().spec.unwrap().unschedulable.is_none());
}

#[test]
fn refuses_what_a_real_server_refuses() {
    let (api, addr) = api();
    api.add_node("a", "192.168.0.1".parse().unwrap(), true).unwrap();
    let before = serde_json::to_value(api.node("a").unwrap()).unwrap();

    let (code, status) =
        patch(addr, "/api/v1/nodes/a", "application/merge-patch+json", json!({"spec": {"podCidr": "x"}}));
    assert_eq!((code, status["reason"].as_str()), (400, Some("BadRequest")));
    assert!(status["message"].as_str().unwrap().contains("unknown field \"spec.podCidr\""), "{status}");

    let (code, _) = patch(addr, "/api/v1/nodes/a", "application/json", json!({}));
    assert_eq!(code, 415);
    let (code, _) = patch(addr, "/api/v1/nodes/a", "application/apply-patch+yaml", json!({}));
    assert_eq!(code, 415);

    let (code, status) =
        patch(addr, "/api/v1/nodes/a", "application/merge-patch+json", json!({"spec": {"podCIDR": "10.244.9.0/24"}}));
    assert_eq!(code, 422, "{status}");

    let (code, _) =
        patch(addr, "/api/v1/nodes/a", "application/merge-patch+json", json!({"metadata": {"resourceVersion": "1"}}));
    assert_eq!(code, 409);

    let (code, _) = call(addr, "GET", "/api/v1/nodes?labelSelector=a%3Db", "", "");
    assert_eq!(code, 400);
    let (code, status) = call(addr, "GET", "/api/v1/nodes/zz", "", "");
    assert_eq!((code, status["kind"].as_str()), (404, Some("Status")));
    let (code, _) = call(addr, "DELETE", "/api/v1/nodes/a", "", "");
    assert_eq!(code, 405);
    let (code, _) = call(addr, "GET", "/api/v1/services", "", "");
    assert_eq!(code, 404);

    // None of it changed the node.
    assert_eq!(serde_json::to_value(api.node("a").unwrap()).unwrap(), before);

    // With RBAC: what is not granted is forbidden.
    api.enforce_rbac([("get".to_string(), "nodes".to_string())].into());
    assert_eq!(call(addr, "GET", "/api/v1/nodes/a", "", "").0, 200);
    let (code, status) = patch(addr, "/api/v1/nodes/a/status", "application/merge-patch+json", json!({}));
    assert_eq!((code, status["reason"].as_str()), (403, Some("Forbidden")));
    assert!(status["message"].as_str().unwrap().contains("cannot patch resource \"nodes/status\""), "{status}");
    assert_eq!(call(addr, "GET", "/api/v1/nodes", "", "").0, 403);
}

#[test]
fn watch_replays_history_bookmarks_and_expires() {
    let (api, addr) = api();
    api.add_node("a", "192.168.0.1".parse().unwrap(), false).unwrap();
    let (_, list) = call(addr, "GET", "/api/v1/nodes", "", "");
    let listed_at: u64 = list["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap();
    api.allocate_pod_cidr("a").unwrap();

    // From the list's version: the change made since, then bookmarks.
    let mut w = watch(addr, &format!("resourceVersion={listed_at}&allowWatchBookmarks=true"));
    let event = next_event(&mut w);
    assert_eq!(event["type"], "MODIFIED");
    assert_eq!(event["object"]["spec"]["podCIDR"], "10.244.0.0/24");
    let mark = next_event(&mut w);
    assert_eq!(mark["type"], "BOOKMARK");
    assert_eq!(mark["object"]["metadata"]["resourceVersion"], event["object"]["metadata"]["resourceVersion"]);
    api.delete_node("a").unwrap();
    assert_eq!(next_event(&mut w)["type"], "DELETED");

    // Expiry ends the open watch with a 410, and a watch from before it gets one too.
    api.expire_watches();
    let gone = next_event(&mut w);
    assert_eq!((gone["type"].as_str(), gone["object"]["code"].as_u64()), (Some("ERROR"), Some(410)));
    let mut late = watch(addr, &format!("resourceVersion={listed_at}"));
    assert_eq!(next_event(&mut late)["object"]["reason"], "Expired");
    assert!(api.stats().expired >= 2);
}

#[test]
fn a_resource_version_0_list_comes_whole_from_the_cache_and_user_agents_are_recorded() {
    let (api, addr) = api();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        api.add_node(name, std::net::Ipv4Addr::new(192, 168, 0, i as u8 + 1), false).unwrap();
    }
    // As a real API server's watch cache: the limit is ignored, no continue token.
    let (code, list) =
        call(addr, "GET", "/api/v1/nodes?resourceVersion=0&resourceVersionMatch=NotOlderThan&limit=1", "", "");
    assert_eq!(code, 200);
    assert_eq!(list["items"].as_array().unwrap().len(), 3);
    assert!(list["metadata"].get("continue").is_none(), "{}", list["metadata"]);
    // A quorum read pages.
    let (_, page) = call(addr, "GET", "/api/v1/nodes?limit=1", "", "");
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    let stats = api.stats();
    assert_eq!((stats.lists, stats.cached_lists), (2, 1));
    assert!(stats.list_bytes > 0);
    // Raw requests here send no User-Agent.
    assert!(api.user_agents().contains(""), "{:?}", api.user_agents());
}

#[test]
fn status_patches_take_annotations_but_never_the_spec() {
    let (api, addr) = api();
    api.add_node("a", "192.168.0.1".parse().unwrap(), true).unwrap();
    let (code, node) = patch(
        addr,
        "/api/v1/nodes/a/status",
        "application/strategic-merge-patch+json",
        json!({"metadata": {"annotations": {"x": "y"}}, "spec": {"unschedulable": true}}),
    );
    assert_eq!(code, 200, "{node}");
    assert_eq!(node["metadata"]["annotations"]["x"], "y", "flanneld writes its annotations through nodes/status");
    assert!(node["spec"].get("unschedulable").is_none(), "nodes/status never changes the spec: {node}");
}

#[test]
fn pods_namespaces_and_policies_list_in_pages_and_watch_on_their_own() {
    let (api, addr) = api();
    let pod = |name: &str, label: &str| json!({"metadata": {"name": name, "namespace": "x", "labels": {"pod": label}}, "spec": {"containers": []}});
    for i in 0..3 {
        api.put("pods", pod(&format!("p{i}"), "a")).unwrap();
    }
    let (code, page) = call(addr, "GET", "/api/v1/pods?limit=2", "", "");
    assert_eq!((code, page["kind"].as_str(), page["items"].as_array().unwrap().len()), (200, Some("PodList"), 2));
    let token = page["metadata"]["continue"].as_str().unwrap().replace('|', "%7C");
    let (_, rest) = call(addr, "GET", &format!("/api/v1/pods?limit=2&continue={token}"), "", "");
    assert_eq!(rest["items"].as_array().unwrap().len(), 1);
    assert_eq!(rest["items"][0]["metadata"]["name"], "p2");
    assert!(rest["metadata"].get("continue").is_none(), "{rest}");
    let (_, cached) = call(addr, "GET", "/api/v1/pods?resourceVersion=0&limit=1", "", "");
    assert_eq!(cached["items"].as_array().unwrap().len(), 3, "the cache answers whole");

    // A watch of pods sees pods only, from the list's resourceVersion on.
    let rv = page["metadata"]["resourceVersion"].as_str().unwrap().to_string();
    let mut w = watch_path(addr, "/api/v1/pods", &format!("resourceVersion={rv}"));
    api.put("namespaces", json!({"metadata": {"name": "x", "labels": {"ns": "x"}}})).unwrap();
    api.put("pods", pod("p0", "b")).unwrap();
    api.remove("pods", "x", "p1").unwrap();
    let modified = next_event(&mut w);
    assert_eq!(
        (modified["type"].as_str(), modified["object"]["metadata"]["labels"]["pod"].as_str()),
        (Some("MODIFIED"), Some("b"))
    );
    let deleted = next_event(&mut w);
    assert_eq!(
        (deleted["type"].as_str(), deleted["object"]["metadata"]["name"].as_str()),
        (Some("DELETED"), Some("p1"))
    );

    api.put("networkpolicies", json!({"metadata": {"name": "np", "namespace": "x"}, "spec": {"podSelector": {}}}))
        .unwrap();
    let (code, list) = call(addr, "GET", "/apis/networking.k8s.io/v1/networkpolicies", "", "");
    assert_eq!(
        (code, list["kind"].as_str(), list["apiVersion"].as_str(), list["items"].as_array().unwrap().len()),
        (200, Some("NetworkPolicyList"), Some("networking.k8s.io/v1"), 1)
    );
    let (_, namespaces) = call(addr, "GET", "/api/v1/namespaces", "", "");
    assert_eq!(namespaces["items"][0]["metadata"]["labels"]["ns"], "x");

    // Objects a real server would refuse are refused.
    assert!(api.put("pods", json!({"metadata": {"name": "p"}, "spec": {"containers": []}})).is_err(), "no namespace");
    assert!(api
        .put("networkpolicies", json!({"metadata": {"name": "n", "namespace": "x"}, "spec": {"podSelector": 5}}))
        .is_err());
    assert!(api.remove("pods", "x", "nope").is_err());
    let (code, _) = call(addr, "POST", "/api/v1/pods", "application/json", "{}");
    assert_eq!(code, 405);
}
