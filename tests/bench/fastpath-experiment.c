// An experiment, not part of the product (issue 25, docs/benchmarks.md "The dataplane"): what a tc/eBPF fast path
// would give on today's layout. On a pod's node, `from_pod` on the ingress of the pod's host-side veth sends its
// packets for other nodes' pods (10.244.0.0/16 outside its own /24) straight to the VXLAN device with
// bpf_redirect_neigh (the route and the permanent neighbour entry the daemon programs give the next hop), and
// `to_pod` on the VXLAN device's ingress puts packets for the pod into its namespace with bpf_redirect_peer. Both
// skip the host's IP forwarding, the bridge and netfilter: no NetworkPolicy, no conntrack. Built per node:
//   clang -O2 -target bpf -DPOD_IP=0x0af45a02 -D'POD_MAC=0x6a,...' -D'GW_MAC=0x02,...' -DHOST_VETH=5 -DVXLAN=3 \
//     -I/usr/include/x86_64-linux-gnu -c fastpath-experiment.c -o n1.o
//   tc qdisc add dev VETH clsact; tc filter add dev VETH ingress bpf da obj n1.o sec tc/from_pod
//   tc qdisc add dev overlay.1 clsact; tc filter add dev overlay.1 ingress bpf da obj n1.o sec tc/to_pod
// (Debian's clang and libbpf-dev; GW_MAC is cni0's, the gateway the pod knows.)
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

static __always_inline struct iphdr *ipv4(struct __sk_buff *skb) {
  void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
  struct ethhdr *eth = data;
  if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP)) return 0;
  struct iphdr *ip = (void *)(eth + 1);
  if ((void *)(ip + 1) > end) return 0;
  return ip;
}

SEC("tc/to_pod") int to_pod(struct __sk_buff *skb) {
  struct iphdr *ip = ipv4(skb);
  if (!ip || ip->daddr != bpf_htonl(POD_IP)) return TC_ACT_OK;
  __u8 macs[12] = {POD_MAC, GW_MAC};
  bpf_skb_store_bytes(skb, 0, macs, 12, 0);
  return bpf_redirect_peer(HOST_VETH, 0);
}

SEC("tc/from_pod") int from_pod(struct __sk_buff *skb) {
  struct iphdr *ip = ipv4(skb);
  if (!ip) return TC_ACT_OK;
  __u32 d = bpf_ntohl(ip->daddr);
  if ((d & 0xffff0000) != 0x0af40000 || (d & 0xffffff00) == (POD_IP & 0xffffff00)) return TC_ACT_OK;
  return bpf_redirect_neigh(VXLAN, 0, 0, 0);
}
char _license[] SEC("license") = "GPL";
