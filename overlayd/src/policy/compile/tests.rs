use super::*;
use serde_json::json;

pub(crate) fn pod(node: &str, labels: &[(&str, &str)], ips: &[&str]) -> PodInfo {
    let mut interner = super::super::selector::Interner::default();
    PodInfo {
        node: node.into(),
        labels: Labels::from_pairs(labels.iter().copied(), &mut interner),
        ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
        ports: vec![ContainerPort { name: "http".into(), protocol: Protocol::Tcp, port: 8080 }],
    }
}

pub(crate) fn view(policies: &[(&str, serde_json::Value)]) -> ClusterView {
    let mut v = ClusterView::default();
    v.pods.insert(("x".into(), "a".into()), pod("n1", &[("pod", "a")], &["10.0.1.2", "fd00::1:2"]));
    v.pods.insert(("x".into(), "b".into()), pod("n2", &[("pod", "b")], &["10.0.2.2", "fd00::2:2"]));
    v.pods.insert(("y".into(), "a".into()), pod("n1", &[("pod", "a")], &["10.0.1.3"]));
    let mut interner = super::super::selector::Interner::default();
    v.namespaces.insert(
        "x".into(),
        NamespaceInfo { labels: Labels::from_pairs([("ns", "x")], &mut interner), log_drops: false },
    );
    v.namespaces.insert(
        "y".into(),
        NamespaceInfo { labels: Labels::from_pairs([("ns", "y")], &mut interner), log_drops: false },
    );
    for (i, (ns, spec)) in policies.iter().enumerate() {
        v.policies.insert((ns.to_string(), format!("p{i}")), serde_json::from_value(spec.clone()).unwrap());
    }
    v
}

fn set<'a>(r: &'a Ruleset, name: &str) -> &'a AddrSet {
    let name = match name {
        "ingress_v4" => r.isolated_set(Direction::Ingress, Family::V4),
        "ingress_v6" => r.isolated_set(Direction::Ingress, Family::V6),
        "egress_v4" => r.isolated_set(Direction::Egress, Family::V4),
        "egress_v6" => r.isolated_set(Direction::Egress, Family::V6),
        other => other,
    };
    r.sets.iter().find(|s| s.name == name).unwrap()
}

fn v4(s: &str) -> u128 {
    value(s.parse().unwrap())
}

#[test]
fn no_policy_isolates_nothing() {
    let c = compile(&view(&[]), "n1");
    assert!(c.ruleset.rules.is_empty());
    assert!(c.ruleset.sets.iter().all(|s| s.ranges.is_empty()));
    assert_eq!(c.ruleset.sets.len(), 2, "the four isolation sets always exist: empty, one per family");
}

#[test]
fn only_this_node_s_selected_pods_are_isolated() {
    let c = compile(&view(&[("x", json!({"podSelector": {}}))]), "n1");
    let ingress = set(&c.ruleset, "ingress_v4");
    assert_eq!(
        ingress.ranges,
        vec![(v4("10.0.1.2"), v4("10.0.1.2"))],
        "x/a only: x/b is on n2, y/a in another namespace"
    );
    assert_eq!(set(&c.ruleset, "ingress_v6").ranges.len(), 1);
    assert!(set(&c.ruleset, "egress_v4").ranges.is_empty(), "policyTypes defaults to Ingress only");
    assert_eq!((c.policies_in_effect, c.selected_pods), (1, 1));
    assert!(c.ruleset.rules.is_empty(), "deny-all has no allowing rule");
}

#[test]
fn egress_is_implied_by_egress_rules() {
    let c = compile(&view(&[("x", json!({"podSelector": {}, "egress": [{}]}))]), "n1");
    assert_eq!(set(&c.ruleset, "egress_v4").ranges.len(), 1);
    assert_eq!(c.ruleset.rules.iter().filter(|r| r.direction == Direction::Egress).count(), 2, "one per family");
    assert!(c.ruleset.rules.iter().all(|r| r.peers.is_none() && r.ports == PortMatch::Any));
}

#[test]
fn peers_are_pods_anywhere_and_blocks_minus_except() {
    let c = compile(
        &view(&[(
            "x",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [
                {"podSelector": {"matchLabels": {"pod": "b"}}},
                {"ipBlock": {"cidr": "192.168.0.0/24", "except": ["192.168.0.128/25"]}}]}]}),
        )]),
        "n1",
    );
    let rule = c.ruleset.rules.iter().find(|r| r.family == Family::V4).unwrap();
    let peers = set(&c.ruleset, rule.peers.as_deref().unwrap());
    assert_eq!(
        peers.ranges,
        vec![(v4("10.0.2.2"), v4("10.0.2.2")), (v4("192.168.0.0"), v4("192.168.0.127"))],
        "x/b on the other node, and the block without its except"
    );
}

#[test]
fn sets_are_shared_by_content() {
    let spec = json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"podSelector": {}}]}]});
    let c = compile(&view(&[("x", spec.clone()), ("x", spec)]), "n1");
    assert_eq!(c.ruleset.rules.len(), 2, "the same pods and peers: one rule per family");
    assert_eq!(c.ruleset.rules[0].policy, "x/p0 and 1 more");
    // Pods and peers of each family, plus the empty isolation set of each family.
    assert_eq!(c.ruleset.sets.len(), 4 + 2, "{:#?}", c.ruleset.sets);
}

#[test]
fn named_ports_resolve_per_pod_and_missing_ones_are_reported() {
    let c = compile(
        &view(&[("x", json!({"podSelector": {}, "ingress": [{"ports": [{"port": "http"}, {"port": "metrics"}]}]}))]),
        "n1",
    );
    let named: Vec<&PortSet> = c.ruleset.port_sets.iter().collect();
    assert_eq!(named.len(), 2, "one per family");
    assert!(named.iter().any(|s| s.elements == vec![(v4("10.0.1.2"), Protocol::Tcp, 8080)]));
    assert_eq!(c.problems.len(), 1, "{:?}", c.problems);
    assert!(c.problems[0].to_string().contains("\"metrics\""), "{}", c.problems[0]);
}

#[test]
fn broken_parts_allow_nothing_and_the_rest_is_enforced() {
    let c = compile(
        &view(&[
            ("x", json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]})),
            (
                "x",
                json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80, "protocol": "ICMP"}, {"port": 0}, {"port": 90, "endPort": 80}]}]}),
            ),
            ("x", json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Has"}]}})),
            ("x", json!({"podSelector": {}, "ingress": [{"ports": [{"port": 443}]}]})),
        ]),
        "n1",
    );
    assert_eq!(c.problems.len(), 5, "{:#?}", c.problems);
    assert_eq!(set(&c.ruleset, "ingress_v4").ranges.len(), 1, "the broken policies still isolate x/a");
    let rules: Vec<&PortMatch> = c.ruleset.rules.iter().map(|r| &r.ports).collect();
    assert_eq!(
        rules,
        vec![&PortMatch::Ports(vec![(Protocol::Tcp, 443, 443)]); 2],
        "only the sound rule allows anything"
    );
}

#[test]
fn ranges_merge_when_they_touch_or_overlap() {
    assert_eq!(merge(vec![(5, 9), (1, 3), (4, 4), (20, 30), (25, 26)]), vec![(1, 9), (20, 30)]);
    assert_eq!(subtract((0, 255), &[(128, 255), (0, 0)]), vec![(1, 127)]);
}

#[test]
fn a_set_keeps_its_name_while_its_content_stays() {
    let spec = json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]});
    let before = compile(&view(&[("x", spec.clone())]), "n1").ruleset;
    let mut v = view(&[("x", spec)]);
    v.policies.insert(
        ("x".into(), "other".into()),
        serde_json::from_value(json!({"podSelector": {}, "egress": [{}]})).unwrap(),
    );
    let after = compile(&v, "n1").ruleset;
    let names = |r: &Ruleset| {
        r.rules.iter().filter(|r| r.policy == "x/p0").map(|r| (r.pods.clone(), r.peers.clone())).collect::<Vec<_>>()
    };
    assert_eq!(names(&before), names(&after), "another policy changed nothing of p0's sets");
    assert_ne!(before.isolated_set(Direction::Egress, Family::V4), after.isolated_set(Direction::Egress, Family::V4));
}

#[test]
fn rules_that_differ_only_in_ports_are_one() {
    let port = |p: serde_json::Value| json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"podSelector": {}}], "ports": p}]});
    let c = compile(
        &view(&[
            ("x", port(json!([{"port": 80}]))),
            ("x", port(json!([{"port": 81, "endPort": 90}, {"port": 53, "protocol": "UDP"}]))),
            ("x", port(json!([{"port": 85}, {"protocol": "SCTP"}]))),
        ]),
        "n1",
    );
    let v4: Vec<&Rule> = c.ruleset.rules.iter().filter(|r| r.family == Family::V4).collect();
    assert_eq!(v4.len(), 1, "{v4:#?}");
    assert_eq!(
        v4[0].ports,
        PortMatch::Ports(vec![(Protocol::Tcp, 80, 90), (Protocol::Udp, 53, 53), (Protocol::Sctp, 0, u16::MAX)])
    );
    assert_eq!(v4[0].policy, "x/p0 and 2 more");
    // A rule without ports opens everything for those peers.
    let c = compile(&view(&[("x", port(json!([{"port": 80}]))), ("x", port(json!(null)))]), "n1");
    assert!(c.ruleset.rules.iter().all(|r| r.ports == PortMatch::Any), "{:#?}", c.ruleset.rules);
}

#[test]
fn an_annotated_namespace_logs_the_drops_of_its_pods_on_this_node() {
    let mut v = view(&[]);
    assert_eq!(compile(&v, "n1").ruleset.log_drops, DropLogging::Off);
    let labels = v.namespaces.get("x").unwrap().labels.clone();
    v.namespaces.insert("x".into(), NamespaceInfo { labels, log_drops: true });
    let r = compile(&v, "n1").ruleset;
    let DropLogging::Pods([l4, l6]) = &r.log_drops else { panic!("{:?}", r.log_drops) };
    // x/a is on n1; x/b (n2) and y/a (not annotated) are not logged here.
    assert_eq!(set(&r, l4).ranges, vec![(v4("10.0.1.2"), v4("10.0.1.2"))]);
    assert_eq!(set(&r, l6).ranges.len(), 1);
    assert_eq!(compile(&v, "n3").ruleset.log_drops, DropLogging::Off);
}
