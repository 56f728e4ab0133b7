use super::super::tests::view;
use super::super::*;
use serde_json::json;

fn with_cluster(policies: &[(&str, serde_json::Value)], cluster: &[(&str, serde_json::Value)]) -> ClusterView {
    let mut v = view(policies);
    for (name, spec) in cluster {
        v.cluster_policies.insert(name.to_string(), serde_json::from_value(spec.clone()).unwrap());
    }
    v
}

fn v4(s: &str) -> u128 {
    value(s.parse().unwrap())
}

fn rules(c: &Compiled, family: Family) -> Vec<&Rule> {
    c.ruleset.rules.iter().filter(|r| r.family == family).collect()
}

fn addr_set<'a>(c: &'a Compiled, name: &str) -> &'a AddrSet {
    c.ruleset.sets.iter().find(|s| s.name == name).unwrap()
}

#[test]
fn tiers_are_in_the_order_the_api_evaluates_them() {
    // Each from another namespace, so no two merge.
    let deny_y = |tier: &str, priority: i32| {
        let from = if priority == 7 {
            json!({"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "b"}}}})
        } else {
            json!({"namespaces": {"matchLabels": {"ns": "y"}}})
        };
        json!({"tier": tier, "priority": priority, "subject": {"namespaces": {}},
               "ingress": [{"action": "Deny", "from": [from]}]})
    };
    let c = compile(
        &with_cluster(
            &[("x", json!({"podSelector": {}, "ingress": [{}]}))],
            &[("b-base", deny_y("Baseline", 1)), ("z-admin", deny_y("Admin", 5)), ("a-admin", deny_y("Admin", 7))],
        ),
        "n1",
    );
    let order: Vec<(Tier, &str)> = rules(&c, Family::V4).iter().map(|r| (r.tier, r.policy.as_str())).collect();
    assert_eq!(order.len(), 4, "{order:#?}");
    assert!(order[0].1.starts_with("ClusterNetworkPolicy z-admin (Admin, priority 5), ingress rule 0"), "{order:?}");
    assert!(order[1].1.starts_with("ClusterNetworkPolicy a-admin (Admin, priority 7)"), "{order:?}");
    assert_eq!(order[2], (Tier::NetworkPolicy, "x/p0"));
    assert_eq!(order[3].0, Tier::Baseline);
    assert!(c.problems.is_empty(), "{:?}", c.problems);
}

#[test]
fn subjects_are_policed_but_only_network_policy_isolates() {
    let c = compile(
        &with_cluster(
            &[],
            &[(
                "p",
                json!({"tier": "Admin", "priority": 1, "subject": {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "a"}}}},
                       "egress": [{"action": "Deny", "to": [{"networks": ["169.254.169.254/32"]}]}]}),
            )],
        ),
        "n1",
    );
    let policed = addr_set(&c, c.ruleset.policed_set(Direction::Egress, Family::V4));
    assert_eq!(policed.ranges, vec![(v4("10.0.1.2"), v4("10.0.1.3"))], "x/a and y/a, both on n1");
    assert!(addr_set(&c, c.ruleset.isolated_set(Direction::Egress, Family::V4)).ranges.is_empty());
    assert!(addr_set(&c, c.ruleset.policed_set(Direction::Ingress, Family::V4)).ranges.is_empty(), "no ingress rules");
    let r = rules(&c, Family::V4);
    assert_eq!(r.len(), 1, "no IPv6 network in the rule: no IPv6 rule");
    assert_eq!((r[0].action, r[0].direction), (Action::Deny, Direction::Egress));
    assert_eq!(
        addr_set(&c, r[0].peers.as_deref().unwrap()).ranges,
        vec![(v4("169.254.169.254"), v4("169.254.169.254"))]
    );
    assert_eq!((c.policies_in_effect, c.selected_pods), (1, 2));
}

#[test]
fn peers_are_namespaces_pods_nodes_and_networks() {
    let mut v = with_cluster(
        &[],
        &[(
            "p",
            json!({"tier": "Admin", "priority": 1, "subject": {"namespaces": {"matchLabels": {"ns": "x"}}},
                   "egress": [{"action": "Accept", "to": [
                        {"namespaces": {"matchLabels": {"ns": "y"}}},
                        {"pods": {"namespaceSelector": {"matchLabels": {"ns": "x"}}, "podSelector": {"matchLabels": {"pod": "b"}}}},
                        {"nodes": {"matchLabels": {"role": "worker"}}},
                        {"networks": ["192.168.0.0/24", "fd00:ff::/64"]}],
                    "protocols": [{"tcp": {"destinationPort": {"number": 80}}}, {"udp": {"destinationPort": {"range": {"start": 53, "end": 54}}}}]}]}),
        )],
    );
    let mut interner = crate::policy::selector::Interner::default();
    v.nodes.insert(
        "w1".into(),
        NodeInfo {
            labels: Labels::from_pairs([("role", "worker")], &mut interner),
            ips: vec!["172.16.0.1".parse().unwrap()],
        },
    );
    v.nodes.insert("cp".into(), NodeInfo { labels: Labels::new(), ips: vec!["172.16.0.9".parse().unwrap()] });
    let c = compile(&v, "n1");
    let r = rules(&c, Family::V4);
    assert_eq!(r.len(), 1);
    assert_eq!(
        addr_set(&c, r[0].peers.as_deref().unwrap()).ranges,
        vec![
            (v4("10.0.1.3"), v4("10.0.1.3")),
            (v4("10.0.2.2"), v4("10.0.2.2")),
            (v4("172.16.0.1"), v4("172.16.0.1")),
            (v4("192.168.0.0"), v4("192.168.0.255"))
        ],
        "y/a, x/b, the worker node, the network"
    );
    assert_eq!(r[0].ports, PortMatch::Ports(vec![(Protocol::Tcp, 80, 80), (Protocol::Udp, 53, 54)]));
    let r6 = rules(&c, Family::V6);
    assert_eq!(r6.len(), 1, "x/a has an IPv6 address");
    assert_eq!(addr_set(&c, r6[0].peers.as_deref().unwrap()).ranges.len(), 2, "x/b's and the network");
}

#[test]
fn named_ports_are_the_destination_s() {
    let c = compile(
        &with_cluster(
            &[],
            &[(
                "p",
                json!({"tier": "Baseline", "priority": 1, "subject": {"namespaces": {"matchLabels": {"ns": "x"}}},
                       "egress": [{"action": "Accept", "to": [{"namespaces": {}}], "protocols": [{"destinationNamedPort": "http"}]}],
                       "ingress": [{"action": "Deny", "from": [{"namespaces": {}}], "protocols": [{"destinationNamedPort": "http"}]}]}),
            )],
        ),
        "n1",
    );
    let egress = c.ruleset.rules.iter().find(|r| r.direction == Direction::Egress && r.family == Family::V4).unwrap();
    let PortMatch::Named(set) = &egress.ports else { panic!("{egress:?}") };
    let set = c.ruleset.port_sets.iter().find(|s| &s.name == set).unwrap();
    assert_eq!(set.elements.len(), 3, "every pod's http port: x/a, x/b, y/a");
    assert!(egress.peers.is_none(), "the set names the destinations");
    let ingress = c.ruleset.rules.iter().find(|r| r.direction == Direction::Ingress && r.family == Family::V4).unwrap();
    let PortMatch::Named(set) = &ingress.ports else { panic!("{ingress:?}") };
    let set = c.ruleset.port_sets.iter().find(|s| &s.name == set).unwrap();
    assert_eq!(set.elements, vec![(v4("10.0.1.2"), Protocol::Tcp, 8080)], "the subject's own port");
    assert_eq!(ingress.action, Action::Deny);
}

#[test]
fn what_cannot_be_read_fails_closed() {
    let c = compile(
        &with_cluster(
            &[],
            &[
                (
                    "accept-domains",
                    json!({"tier": "Admin", "priority": 1, "subject": {"namespaces": {}},
                           "egress": [{"action": "Accept", "to": [{"domainNames": ["example.com"]}]}]}),
                ),
                (
                    "pass-unknown-peer",
                    json!({"tier": "Admin", "priority": 2, "subject": {"namespaces": {}},
                           "egress": [{"action": "Pass", "to": [{}], "protocols": [{"tcp": {"destinationPort": {"number": 80}}}]}]}),
                ),
                (
                    "odd-action",
                    json!({"tier": "Admin", "priority": 3, "subject": {"namespaces": {}},
                           "egress": [{"action": "Log", "to": [{"networks": ["10.9.0.0/16"]}]}]}),
                ),
                ("odd-tier", json!({"tier": "Platform", "priority": 3, "subject": {"namespaces": {}}, "egress": []})),
            ],
        ),
        "n1",
    );
    let r = rules(&c, Family::V4);
    assert_eq!(r.len(), 2, "{r:#?}");
    assert!(r[0].policy.contains("pass-unknown-peer"));
    assert_eq!((r[0].action, &r[0].peers, &r[0].ports), (Action::Deny, &None, &PortMatch::Any), "deny all");
    assert!(r[1].policy.contains("odd-action") && r[1].action == Action::Deny);
    let said: Vec<String> = c.problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(said.len(), 4, "{said:#?}");
    assert!(said.iter().any(|s| s.contains("accept-domains") && s.contains("domainNames")), "{said:#?}");
    assert!(said.iter().any(|s| s.contains("odd-action") && s.contains("\"Log\"")), "{said:#?}");
    assert!(said.iter().any(|s| s.starts_with("ClusterNetworkPolicy odd-tier: unknown tier")), "{said:#?}");
}

#[test]
fn one_priority_twice_is_ordered_by_name_and_said() {
    let spec = |from: &str| {
        json!({"tier": "Admin", "priority": 10, "subject": {"namespaces": {}},
               "ingress": [{"action": "Accept", "from": [{"namespaces": {"matchLabels": {"ns": from}}}]}]})
    };
    let c = compile(&with_cluster(&[], &[("beta", spec("x")), ("alpha", spec("y"))]), "n1");
    let r = rules(&c, Family::V4);
    assert!(r[0].policy.contains("alpha") && r[1].policy.contains("beta"), "{r:#?}");
    assert_eq!(c.problems.len(), 1);
    assert!(c.problems[0].to_string().contains("beta: has the priority of alpha"), "{}", c.problems[0]);
}

#[test]
fn a_thousand_policies_that_deny_ports_to_the_same_peers_are_one_rule_per_tier() {
    let policies: Vec<(String, serde_json::Value)> = (0..1000)
        .map(|i| {
            (
                format!("p{i:04}"),
                json!({"tier": if i % 2 == 0 { "Admin" } else { "Baseline" }, "priority": i % 1000,
                       "subject": {"namespaces": {"matchLabels": {"ns": "x"}}},
                       "ingress": [{"action": "Deny", "from": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "b"}}}}],
                                    "protocols": [{"tcp": {"destinationPort": {"number": 1000 + i}}}]}]}),
            )
        })
        .collect();
    let refs: Vec<(&str, serde_json::Value)> = policies.iter().map(|(n, s)| (n.as_str(), s.clone())).collect();
    let c = compile(&with_cluster(&[], &refs), "n1");
    assert_eq!(c.ruleset.rules.len(), 4, "one per tier and family: each tier's rules deny ports to the same peers");
    let admin = c.ruleset.rules.iter().find(|r| r.tier == Tier::Admin && r.family == Family::V4).unwrap();
    let PortMatch::Ports(ports) = &admin.ports else { panic!("{admin:?}") };
    assert_eq!(ports.len(), 500, "every Admin policy's port, each its own");
    assert!(admin.policy.ends_with("and 499 more"), "{}", admin.policy);
    assert!(c.ruleset.sets.len() < 10, "the same subjects and peers: shared sets ({})", c.ruleset.sets.len());
    assert!(c.problems.is_empty());
}

#[test]
fn rules_merge_only_with_the_rule_before_them_in_their_chain() {
    let rule = |action: &str, port: i32| json!({"action": action, "from": [{"namespaces": {}}], "protocols": [{"tcp": {"destinationPort": {"number": port}}}]});
    let admin = |priority: i32, ingress: serde_json::Value| json!({"tier": "Admin", "priority": priority, "subject": {"namespaces": {"matchLabels": {"ns": "x"}}}, "ingress": ingress});
    let c = compile(
        &with_cluster(
            &[],
            &[
                ("a", admin(1, json!([rule("Deny", 81), rule("Deny", 82)]))),
                ("b", admin(2, json!([rule("Accept", 82), rule("Deny", 83)]))),
            ],
        ),
        "n1",
    );
    let r: Vec<(Action, &PortMatch)> = rules(&c, Family::V4).iter().map(|r| (r.action, &r.ports)).collect();
    assert_eq!(
        r,
        vec![
            (Action::Deny, &PortMatch::Ports(vec![(Protocol::Tcp, 81, 82)])),
            (Action::Accept, &PortMatch::Ports(vec![(Protocol::Tcp, 82, 82)])),
            (Action::Deny, &PortMatch::Ports(vec![(Protocol::Tcp, 83, 83)])),
        ],
        "the Accept between keeps the second Deny apart"
    );
}
