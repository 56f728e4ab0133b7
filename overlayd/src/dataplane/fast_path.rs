//! The fast path (`--fast-path`): a per-flow cache in tc/eBPF that carries
//! the packets of established connections past the host's forwarding,
//! bridge and netfilter, into the pod's namespace (`bpf_redirect_peer`) or
//! onto the VXLAN device (`bpf_redirect_neigh`). bpf/fast_path.c holds the
//! programs and says why NetworkPolicy stays exact; docs/architecture.md
//! ("The fast path") says why it is built this way.
//!
//! What the node must hold, planned purely from its links like every other
//! kernel setting (`plan`, `diff`), then applied and read back:
//! - `fast_in` on the ingress and `observe_pod` on the egress of each pod's
//!   host-side veth: the ports of the pod bridge, the bridge that holds a
//!   pod gateway address of the cluster network (ours, or flannel's
//!   plugin's `cni0`);
//! - `fast_in` on the ingress and `observe_tunnel` on the egress of each
//!   VXLAN device;
//! - `table inet overlay_fast_path`: the forward-hook rule that marks what
//!   may be cached (established, not NATed, let through by every filter
//!   chain of lower priority);
//! - `net.netfilter.nf_conntrack_tcp_be_liberal=1`: conntrack sees a cached
//!   connection only once a second, so its TCP window tracking must accept
//!   the jump (kube-proxy's `--conntrack-tcp-be-liberal` is the same setting).
//!
//! The programs are attached as TCX links (Linux 6.6 and later), owned by
//! this process: when the daemon stops, for whatever reason, the links go
//! with it and every packet takes the ordinary path again. Nothing of the
//! programs outlives the daemon, so `overlayd cleanup` has only the table
//! to remove.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use aya::programs::tc::{SchedClassifierLinkId, TcAttachOptions};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use aya::Ebpf;
use ipnet::IpNet;
use nftables::expr::{BinaryOperation, Expression, Meta, MetaKey, NamedExpression, CT};
use nftables::schema::{Chain, NfCmd, NfListObject, NfObject, Nftables, Rule};
use nftables::stmt::{Mangle, Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use overlay_netlink::{AddressFamily, KernelEvent, Link, Netlink};
use serde_json::Value;
use tokio::time::{Duration, Instant};
use tracing::{debug, info, warn};

use crate::nft::{self, NftError, TableId};
use crate::node_state::NodeState;

/// The skb mark bit the forward rule sets on what may be cached, and the
/// observers clear; bpf/fast_path.c's FLOW_MARK. Clear of kube-proxy's
/// 0x4000 and 0x8000.
pub const FLOW_MARK: u32 = 0x0020_0000;

/// `table inet overlay_fast_path`.
pub const TABLE: TableId = TableId { family: NfFamily::INet, name: "overlay_fast_path" };
const CHAIN: &str = "forward";
/// After the filter chains (priority 0, kube-proxy's, ours): a packet they
/// drop never reaches an observer; one they accept is marked here.
const CHAIN_PRIORITY: i32 = 100;

const BE_LIBERAL: &str = "/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal";

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/fast_path.o"));

/// Where on a device a program goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hook {
    /// A pod's host-side veth, ingress: the pod's packets.
    PodIngress,
    /// A pod's host-side veth, egress: what the slow path delivers to the pod.
    PodEgress,
    /// A VXLAN device, ingress: decapsulated packets from other nodes.
    TunnelIngress,
    /// A VXLAN device, egress: what the slow path sends to other nodes.
    TunnelEgress,
}

impl Hook {
    fn program(self) -> &'static str {
        match self {
            Hook::PodIngress | Hook::TunnelIngress => "fast_in",
            Hook::PodEgress => "observe_pod",
            Hook::TunnelEgress => "observe_tunnel",
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            Hook::PodIngress | Hook::TunnelIngress => TcAttachType::Ingress,
            Hook::PodEgress | Hook::TunnelEgress => TcAttachType::Egress,
        }
    }
}

/// One program on one device.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attachment {
    /// The device's index: a pod's veth of the same name made again is another device.
    pub index: u32,
    /// Its name, which aya attaches by.
    pub device: String,
    pub hook: Hook,
}

/// The attachments the node's links call for: both hooks of every VXLAN
/// device named in `tunnels`, and of every port of the pod bridge, the
/// bridge holding an address inside one of `networks` (the cluster
/// network, per family). Addresses are `(link index, address)`.
pub fn plan(
    links: &[Link],
    addresses: &[(u32, IpNet)],
    networks: &[IpNet],
    tunnels: &[String],
) -> BTreeSet<Attachment> {
    let bridges: BTreeSet<u32> = links
        .iter()
        .filter(|l| l.kind.as_deref() == Some("bridge"))
        .filter(|l| addresses.iter().any(|(i, a)| *i == l.index && networks.iter().any(|n| n.contains(&a.addr()))))
        .map(|l| l.index)
        .collect();
    let mut wanted = BTreeSet::new();
    for link in links {
        let hooks = if tunnels.contains(&link.name) {
            [Hook::TunnelIngress, Hook::TunnelEgress]
        } else if link.controller.is_some_and(|c| bridges.contains(&c)) && link.kind.as_deref() == Some("veth") {
            [Hook::PodIngress, Hook::PodEgress]
        } else {
            continue;
        };
        for hook in hooks {
            wanted.insert(Attachment { index: link.index, device: link.name.clone(), hook });
        }
    }
    wanted
}

/// What takes `actual` to `desired`: the attachments to make, and those to drop.
pub fn diff(desired: &BTreeSet<Attachment>, actual: &BTreeSet<Attachment>) -> (Vec<Attachment>, Vec<Attachment>) {
    (desired.difference(actual).cloned().collect(), actual.difference(desired).cloned().collect())
}

/// Why the fast path could not be set up or kept.
#[derive(Debug, thiserror::Error)]
pub enum FastPathError {
    #[error("loading the fast path's BPF programs: {0} (it needs CAP_BPF beside CAP_NET_ADMIN)")]
    Load(#[from] aya::EbpfError),
    #[error("fast path program {program}: {source}")]
    Program { program: &'static str, source: aya::programs::ProgramError },
    #[error("attaching {program} to {device} ({hook:?}): {source} (the fast path needs Linux 6.6 or later, for TCX)")]
    Attach { program: &'static str, device: String, hook: Hook, source: aya::programs::ProgramError },
    #[error("reading the fast path's counters: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error(transparent)]
    Nft(#[from] NftError),
    #[error("setting net.netfilter.nf_conntrack_tcp_be_liberal=1: {0}")]
    Sysctl(std::io::Error),
    #[error("reading the links: {0}")]
    Netlink(overlay_netlink::Error),
}

/// The loaded programs and the links this process holds.
pub struct FastPath {
    ebpf: Ebpf,
    held: BTreeMap<Attachment, SchedClassifierLinkId>,
}

/// What the fast path has done, from its counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Packets it carried.
    pub packets: u64,
    /// Flows it learned (and learned again, once a second each).
    pub learned: u64,
}

impl FastPath {
    /// Loads the programs into the kernel; nothing is attached yet.
    pub fn load() -> Result<Self, FastPathError> {
        let mut ebpf = Ebpf::load(OBJECT)?;
        for name in ["fast_in", "observe_pod", "observe_tunnel"] {
            let program = classifier(&mut ebpf, name)?;
            program.load().map_err(|source| FastPathError::Program { program: name, source })?;
        }
        Ok(FastPath { ebpf, held: BTreeMap::new() })
    }

    /// The attachments in place: those this process holds whose program the
    /// device still runs (someone may have detached one, or the device gone).
    pub fn actual(&mut self) -> BTreeSet<Attachment> {
        let mut ids = BTreeMap::new();
        for name in ["fast_in", "observe_pod", "observe_tunnel"] {
            if let Some(id) = classifier(&mut self.ebpf, name).ok().and_then(|p| p.info().ok()).map(|i| i.id()) {
                ids.insert(name, id);
            }
        }
        self.held
            .keys()
            .filter(|a| {
                let Ok((_, running)) = SchedClassifier::query_tcx(&a.device, a.hook.attach_type()) else {
                    return false;
                };
                let ours = ids.get(a.hook.program());
                running.iter().any(|p| Some(&p.id()) == ours)
            })
            .cloned()
            .collect()
    }

    /// Drops what is held but not in place (so that it can be made again).
    pub fn forget_missing(&mut self, actual: &BTreeSet<Attachment>) {
        let gone: Vec<Attachment> = self.held.keys().filter(|a| !actual.contains(a)).cloned().collect();
        for attachment in gone {
            self.detach(&attachment);
        }
    }

    /// Attaches one program; a device that went meanwhile is not an error.
    pub fn attach(&mut self, a: &Attachment) -> Result<(), FastPathError> {
        let name = a.hook.program();
        let program = classifier(&mut self.ebpf, name)?;
        match program.attach_with_options(&a.device, a.hook.attach_type(), TcAttachOptions::TcxOrder(LinkOrder::last()))
        {
            Ok(id) => {
                self.held.insert(a.clone(), id);
                Ok(())
            }
            Err(source) if device_gone(&a.device) => {
                tracing::debug!(device = %a.device, error = %source, "device went before the fast path reached it");
                Ok(())
            }
            Err(source) => Err(FastPathError::Attach { program: name, device: a.device.clone(), hook: a.hook, source }),
        }
    }

    /// Detaches one program (a link whose device went is already gone).
    pub fn detach(&mut self, a: &Attachment) {
        let Some(id) = self.held.remove(a) else { return };
        if let Ok(program) = classifier(&mut self.ebpf, a.hook.program()) {
            let _ = program.detach(id);
        }
    }

    /// The counters, summed over the CPUs.
    pub fn counts(&self) -> Result<Counts, FastPathError> {
        let map = self.ebpf.map("counters").ok_or(aya::maps::MapError::InvalidName { name: "counters".into() })?;
        let counters: aya::maps::PerCpuArray<_, u64> = aya::maps::PerCpuArray::try_from(map)?;
        let sum = |i: u32| counters.get(&i, 0).map(|values| values.iter().sum::<u64>());
        Ok(Counts { packets: sum(0)?, learned: sum(1)? })
    }
}

fn classifier<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier, FastPathError> {
    let program = ebpf
        .program_mut(name)
        .ok_or(FastPathError::Program { program: name, source: aya::programs::ProgramError::UnexpectedProgramType })?;
    program.try_into().map_err(|source| FastPathError::Program { program: name, source })
}

fn device_gone(name: &str) -> bool {
    !std::path::Path::new("/sys/class/net").join(name).exists()
}

/// The rule that marks what may be cached: `ct state established ct status
/// ! snat,dnat meta mark set meta mark | FLOW_MARK`.
fn mark_rule() -> Vec<Statement<'static>> {
    let ct =
        |key: &'static str| Expression::Named(NamedExpression::CT(CT { key: Cow::Borrowed(key), ..CT::default() }));
    let mark = || Expression::Named(NamedExpression::Meta(Meta { key: MetaKey::Mark }));
    vec![
        Statement::Match(Match {
            left: ct("state"),
            right: Expression::String(Cow::Borrowed("established")),
            op: Operator::IN,
        }),
        // Not NATed: a Service's DNAT, a hostPort, a masquerade need netfilter on every packet.
        Statement::Match(Match {
            left: Expression::BinaryOperation(Box::new(BinaryOperation::AND(
                ct("status"),
                Expression::BinaryOperation(Box::new(BinaryOperation::OR(vec![
                    Expression::String(Cow::Borrowed("snat")),
                    Expression::String(Cow::Borrowed("dnat")),
                ]))),
            ))),
            right: Expression::Number(0),
            op: Operator::EQ,
        }),
        Statement::Mangle(Mangle {
            key: mark(),
            value: Expression::BinaryOperation(Box::new(BinaryOperation::OR(vec![
                mark(),
                Expression::Number(FLOW_MARK),
            ]))),
        }),
    ]
}

/// The table, replaced whole in one transaction.
pub fn ruleset() -> Nftables<'static> {
    let mut objects = nft::delete_commands(TABLE);
    objects.push(NfObject::CmdObject(NfCmd::Add(NfListObject::Table(TABLE.table()))));
    objects.push(NfObject::CmdObject(NfCmd::Add(NfListObject::Chain(Chain {
        family: TABLE.family,
        table: Cow::Borrowed(TABLE.name),
        name: Cow::Borrowed(CHAIN),
        _type: Some(NfChainType::Filter),
        hook: Some(NfHook::Forward),
        prio: Some(CHAIN_PRIORITY),
        policy: Some(NfChainPolicy::Accept),
        ..Chain::default()
    }))));
    objects.push(NfObject::CmdObject(NfCmd::Add(NfListObject::Rule(Rule {
        family: TABLE.family,
        table: Cow::Borrowed(TABLE.name),
        chain: Cow::Borrowed(CHAIN),
        expr: Cow::Owned(mark_rule()),
        ..Rule::default()
    }))));
    Nftables { objects: Cow::Owned(objects) }
}

/// Whether a listing of the table holds the marking rule.
fn holds_mark_rule(listing: &Value) -> bool {
    let Some(objects) = listing.get("nftables").and_then(Value::as_array) else { return false };
    objects.iter().filter_map(|o| o.get("rule")).any(|rule| {
        rule.get("chain").and_then(Value::as_str) == Some(CHAIN)
            && rule.to_string().contains("mangle")
            && rule.to_string().contains(&FLOW_MARK.to_string())
    })
}

/// Makes the table and the conntrack setting what the fast path needs;
/// true when something had to change.
pub async fn ensure_netfilter() -> Result<bool, FastPathError> {
    let mut changed = false;
    let held = nft::list(TABLE, true).await?.is_some_and(|l| holds_mark_rule(&l));
    if !held {
        nft::apply(TABLE, "adding the fast path's marking rule", &ruleset()).await?;
        changed = true;
    }
    if std::fs::read_to_string(BE_LIBERAL).map_err(FastPathError::Sysctl)?.trim() != "1" {
        std::fs::write(BE_LIBERAL, "1").map_err(FastPathError::Sysctl)?;
        changed = true;
    }
    Ok(changed)
}

/// Whether the table exists (for `overlayd cleanup`).
pub async fn table_exists() -> Result<bool, NftError> {
    Ok(nft::list(TABLE, true).await?.is_some())
}

/// Removes the table (`overlayd cleanup`, and a daemon started without `--fast-path`).
pub async fn remove_table() -> Result<(), NftError> {
    nft::delete(TABLE).await
}

/// Keeps the fast path in place for as long as the daemon runs: plans it
/// from the links at start, after every burst of link or address news (a
/// pod's veth made or gone) or news of its table, and every `resync`; then makes the kernel hold
/// the plan. A failure is said (once until it changes) and tried again at
/// the next trigger; the slow path carries everything meanwhile.
pub async fn keep(
    mut fast: FastPath,
    nl: Netlink,
    networks: Vec<IpNet>,
    tunnels: Vec<String>,
    resync: Duration,
    event_buffer: usize,
    state: Arc<NodeState>,
) {
    // Its own subscription to the kernel's news (rtnetlink and nftables), as the reconcile has.
    let mut events = crate::drift::watch_kernel(event_buffer);
    let mut last_error = String::new();
    let mut counted = Counts::default();
    loop {
        match reconcile(&mut fast, &nl, &networks, &tunnels).await {
            Ok(attached) => {
                if !last_error.is_empty() || attached > 0 {
                    debug!(attached, "fast path in place");
                }
                last_error.clear();
            }
            Err(e) => {
                let text = e.to_string();
                if text != last_error {
                    warn!(error = %text, "the fast path is not (fully) in place; the slow path carries those pods");
                }
                last_error = text;
            }
        }
        publish_counts(&fast, &mut counted, &state);
        // The next trigger: news of a link, an address or our table, settled for a moment; or the resync.
        // Meanwhile the counters are read into the metrics every few seconds.
        let resync_at = Instant::now() + resync;
        let mut due: Option<Instant> = None;
        let mut counts_at = Instant::now() + COUNTS_EVERY;
        loop {
            let wake = due.unwrap_or(resync_at).min(resync_at);
            tokio::select! {
                Some(event) = events.recv() => if calls_for_reconcile(&event) {
                    due.get_or_insert(Instant::now() + SETTLE);
                },
                _ = tokio::time::sleep_until(counts_at) => {
                    publish_counts(&fast, &mut counted, &state);
                    counts_at = Instant::now() + COUNTS_EVERY;
                }
                _ = tokio::time::sleep_until(wake) => break,
            }
        }
    }
}

/// How often the programs' counters are read into the metrics.
const COUNTS_EVERY: Duration = Duration::from_secs(5);

/// Adds what the counters gained since `counted` to the metrics.
fn publish_counts(fast: &FastPath, counted: &mut Counts, state: &NodeState) {
    if let Ok(now) = fast.counts() {
        state.metrics.fast_path_packets.inc_by(now.packets.saturating_sub(counted.packets));
        state.metrics.fast_path_flows_learned.inc_by(now.learned.saturating_sub(counted.learned));
        *counted = now;
    }
}

/// How long a link event waits for the rest of its burst (a pod's veth is
/// made, renamed, moved to the bridge and set up in a few messages).
const SETTLE: Duration = Duration::from_millis(20);

/// Whether a kernel event may change the plan or undo what was applied:
/// a link or address (a pod's veth made or gone), our table, or lost events.
fn calls_for_reconcile(event: &KernelEvent) -> bool {
    match event {
        KernelEvent::Link { .. } | KernelEvent::Address { .. } | KernelEvent::Overflow => true,
        KernelEvent::Nft { table, .. } => table == TABLE.name,
        _ => false,
    }
}

/// One pass of plan, read back, diff and apply; how many programs it attached.
async fn reconcile(
    fast: &mut FastPath,
    nl: &Netlink,
    networks: &[IpNet],
    tunnels: &[String],
) -> Result<usize, FastPathError> {
    if ensure_netfilter().await? {
        info!(table = %TABLE, "fast path: marking rule and conntrack's liberal TCP window tracking in place");
    }
    let links = nl.links().await.map_err(FastPathError::Netlink)?;
    let mut addresses = nl.all_addresses(AddressFamily::Inet).await.map_err(FastPathError::Netlink)?;
    addresses.extend(nl.all_addresses(AddressFamily::Inet6).await.map_err(FastPathError::Netlink)?);
    let desired = plan(&links, &addresses, networks, tunnels);
    let actual = fast.actual();
    fast.forget_missing(&actual);
    let (attach, detach) = diff(&desired, &actual);
    for a in &detach {
        fast.detach(a);
    }
    let mut first_error = None;
    for a in &attach {
        if let Err(e) = fast.attach(a) {
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(attach.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, kind: &str, controller: Option<u32>) -> Link {
        Link { index, name: name.into(), kind: Some(kind.into()), controller, ..Link::default() }
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn the_plan_covers_the_tunnels_and_the_pod_bridges_ports_only() {
        let links = vec![
            link(2, "eth0", "veth", None),
            link(3, "overlay.1", "vxlan", None),
            link(4, "cni0", "bridge", None),
            link(5, "veth1", "veth", Some(4)),
            link(6, "docker0", "bridge", None),
            link(7, "vethd", "veth", Some(6)),
            link(8, "overlay-v6.1", "vxlan", None),
        ];
        let addresses = vec![(4, net("10.244.3.1/24")), (6, net("172.17.0.1/16")), (2, net("192.168.1.2/24"))];
        let tunnels = vec!["overlay.1".to_string(), "overlay-v6.1".to_string()];
        let wanted = plan(&links, &addresses, &[net("10.244.0.0/16")], &tunnels);
        let got: Vec<(&str, Hook)> = wanted.iter().map(|a| (a.device.as_str(), a.hook)).collect();
        assert_eq!(
            got,
            vec![
                ("overlay.1", Hook::TunnelIngress),
                ("overlay.1", Hook::TunnelEgress),
                ("veth1", Hook::PodIngress),
                ("veth1", Hook::PodEgress),
                ("overlay-v6.1", Hook::TunnelIngress),
                ("overlay-v6.1", Hook::TunnelEgress),
            ]
        );
        // No bridge holds the gateway yet (no pod has started): the tunnels alone.
        assert_eq!(plan(&links, &[], &[net("10.244.0.0/16")], &tunnels).len(), 4);
    }

    #[test]
    fn the_diff_attaches_what_is_missing_and_drops_what_went() {
        let a = |index: u32, hook| Attachment { index, device: format!("veth{index}"), hook };
        let desired: BTreeSet<_> = [a(5, Hook::PodIngress), a(5, Hook::PodEgress), a(9, Hook::PodIngress)].into();
        let actual: BTreeSet<_> = [a(5, Hook::PodIngress), a(7, Hook::PodIngress)].into();
        let (attach, detach) = diff(&desired, &actual);
        assert_eq!(attach, vec![a(5, Hook::PodEgress), a(9, Hook::PodIngress)]);
        assert_eq!(detach, vec![a(7, Hook::PodIngress)]);
        // A veth made again under the same name is a new device: the old link goes, a new one comes.
        let (attach, detach) = diff(&[a(10, Hook::PodIngress)].into(), &[a(9, Hook::PodIngress)].into());
        assert_eq!((attach.len(), detach.len()), (1, 1));
    }

    #[test]
    fn the_mark_rule_reads_back_as_held() {
        let json = serde_json::to_value(ruleset()).unwrap();
        let rule = json["nftables"].as_array().unwrap().iter().find_map(|o| o["add"].get("rule")).unwrap().clone();
        let listing = serde_json::json!({"nftables": [{"rule": rule}]});
        assert!(holds_mark_rule(&listing));
        assert!(!holds_mark_rule(&serde_json::json!({"nftables": []})));
        assert!(json.to_string().contains("\"prio\":100"));
    }
}
