// SPDX-License-Identifier: GPL-2.0
//
// The fast path (`--fast-path`, docs/architecture.md "The fast path"): a per-flow cache that carries the packets of
// connections the kernel's own slow path has already accepted past the host's forwarding, bridge and netfilter.
//
//   observe_tunnel (egress of the VXLAN device) and observe_pod (egress of each pod's host-side veth) see what the
//   slow path delivered. Netfilter has marked it (FLOW_MARK, a rule in table inet overlay_policy's forward chain)
//   when conntrack holds the connection established and un-NATed, and every filter chain before ours let it pass.
//   Such a packet's flow goes into `flows`: for the tunnel, "send it to the VXLAN device"; for a pod, "put it into
//   this veth's peer, with these MACs".
//   fast_in (ingress of each pod's host-side veth and of the VXLAN device) looks each packet's flow up and, on a
//   fresh hit, redirects it there: bpf_redirect_neigh to the VXLAN device (the route and the permanent neighbour
//   entry the daemon programs give the next hop), bpf_redirect_peer into the pod's namespace.
//
// Why this keeps NetworkPolicy exact: the policy chains accept every established connection first, before any
// policy rule, so a flow the slow path has seen established is one the slow path accepts, packet after packet.
// Connection starts and ends (SYN, FIN, RST) always take the slow path and drop the flow's entry, so a new
// connection meets the policy and conntrack sees every close. An entry lives ENTRY_LIFETIME_NS: then one packet
// takes the slow path again, which refreshes conntrack's timeout and puts the entry back if the connection is
// still established and un-NATed (a Service's DNAT, a hostPort, a masquerade never take the fast path).
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

// The skb mark bit netfilter sets on what may be cached; overlayd's FAST_PATH_MARK says the same.
#define FLOW_MARK 0x00200000
#define ENTRY_LIFETIME_NS 1000000000ULL

#define KIND_TUNNEL 1
#define KIND_POD 2

struct flow_key {
  __u32 src[4];
  __u32 dst[4];
  __u16 sport;
  __u16 dport;
  __u8 proto;
  __u8 family;
  __u16 pad;
};

struct flow_target {
  __u64 expires_ns;
  __u32 ifindex;
  __u8 kind;
  __u8 pad;
  __u8 macs[12];  // destination, source: what the slow path wrote into a pod's frames
};

struct {
  __uint(type, BPF_MAP_TYPE_LRU_HASH);
  __uint(max_entries, 32768);
  __type(key, struct flow_key);
  __type(value, struct flow_target);
} flows SEC(".maps");

// [0] packets the fast path carried, [1] flows it learned.
struct {
  __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
  __uint(max_entries, 2);
  __type(key, __u32);
  __type(value, __u64);
} counters SEC(".maps");

static __always_inline void count(__u32 which) {
  __u64 *n = bpf_map_lookup_elem(&counters, &which);
  if (n) *n += 1;
}

#define FLAGS_SLOW 1  // a TCP SYN, FIN or RST: never cached, never fast

// The flow of an Ethernet frame carrying IPv4 or IPv6 with TCP or UDP right after the IP header (no options on
// IPv6, no fragment); 0 when it is anything else, which the fast path leaves alone.
static __always_inline int flow_of(struct __sk_buff *skb, struct flow_key *key, int *flags) {
  void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
  struct ethhdr *eth = data;
  void *l4;
  if ((void *)(eth + 1) > end) return 0;
  __builtin_memset(key, 0, sizeof(*key));
  if (eth->h_proto == bpf_htons(ETH_P_IP)) {
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end || ip->ihl != 5 || (ip->frag_off & bpf_htons(0x3fff))) return 0;
    key->family = 4;
    key->proto = ip->protocol;
    key->src[0] = ip->saddr;
    key->dst[0] = ip->daddr;
    l4 = ip + 1;
  } else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
    struct ipv6hdr *ip6 = (void *)(eth + 1);
    if ((void *)(ip6 + 1) > end) return 0;
    key->family = 6;
    key->proto = ip6->nexthdr;
    __builtin_memcpy(key->src, &ip6->saddr, 16);
    __builtin_memcpy(key->dst, &ip6->daddr, 16);
    l4 = ip6 + 1;
  } else {
    return 0;
  }
  *flags = 0;
  if (key->proto == IPPROTO_TCP) {
    struct tcphdr *tcp = l4;
    if ((void *)(tcp + 1) > end) return 0;
    key->sport = tcp->source;
    key->dport = tcp->dest;
    if (tcp->syn || tcp->fin || tcp->rst) *flags = FLAGS_SLOW;
  } else if (key->proto == IPPROTO_UDP) {
    struct udphdr *udp = l4;
    if ((void *)(udp + 1) > end) return 0;
    key->sport = udp->source;
    key->dport = udp->dest;
  } else {
    return 0;
  }
  return 1;
}

SEC("classifier") int fast_in(struct __sk_buff *skb) {
  struct flow_key key;
  int flags;
  if (!flow_of(skb, &key, &flags)) return TC_ACT_OK;
  struct flow_target *to = bpf_map_lookup_elem(&flows, &key);
  if (!to) return TC_ACT_OK;
  if (flags & FLAGS_SLOW || bpf_ktime_get_ns() > to->expires_ns) {
    bpf_map_delete_elem(&flows, &key);
    return TC_ACT_OK;
  }
  __u32 ifindex = to->ifindex;
  if (to->kind == KIND_TUNNEL) {
    count(0);
    return bpf_redirect_neigh(ifindex, 0, 0, 0);
  }
  if (to->kind == KIND_POD) {
    __u8 macs[12];
    __builtin_memcpy(macs, to->macs, 12);
    if (bpf_skb_store_bytes(skb, 0, macs, 12, 0)) return TC_ACT_OK;
    count(0);
    return bpf_redirect_peer(ifindex, 0);
  }
  return TC_ACT_OK;
}

static __always_inline int observe(struct __sk_buff *skb, __u8 kind) {
  if (!(skb->mark & FLOW_MARK)) return TC_ACT_OK;
  // The mark is ours to the end of this device: the underlay's routing (fwmark rules) must not see it.
  skb->mark &= ~FLOW_MARK;
  struct flow_key key;
  int flags;
  if (!flow_of(skb, &key, &flags) || flags & FLAGS_SLOW) return TC_ACT_OK;
  struct flow_target to = {};
  to.expires_ns = bpf_ktime_get_ns() + ENTRY_LIFETIME_NS;
  to.ifindex = skb->ifindex;
  to.kind = kind;
  if (kind == KIND_POD) {
    void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
    if (data + 12 > end) return TC_ACT_OK;
    __builtin_memcpy(to.macs, data, 12);
  }
  bpf_map_update_elem(&flows, &key, &to, BPF_ANY);
  count(1);
  return TC_ACT_OK;
}

SEC("classifier") int observe_tunnel(struct __sk_buff *skb) { return observe(skb, KIND_TUNNEL); }

SEC("classifier") int observe_pod(struct __sk_buff *skb) { return observe(skb, KIND_POD); }

char _license[] SEC("license") = "GPL";
