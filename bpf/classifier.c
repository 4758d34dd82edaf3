// vpblu's data-path programs, compiled together by bcc at daemon start and all
// tc clsact, direct-action. They only read maps (and count); every decision
// comes from data the daemon (vpblu/node/bpfmaps.py) writes. Compiled with
//   -DVPBLU_PIN_DIR="\"/sys/fs/bpf/...\""  where the maps are pinned, and
//   -DVPBLU_BLOCK_WORDS=N                  64-bit words of the block-rule bitmap.
//
// Steering into the mesh is not done here: an ip rule by destination sends the
// cluster's pod ranges to the mesh table after kube-proxy's DNAT (NetlinkActor).
//
//   classify        pod host veth, INGRESS (what the pod sends, before DNAT):
//                   a blocked (src, dst) pair is dropped at the source.
//   deliver         pod host veth, EGRESS (what reaches the pod, after routing and
//                   DNAT, whoever sent it: a local pod by IP or by Service, the
//                   host, a remote pod decrypted out of the mesh, a NodePort
//                   client): a blocked (src, dst) pair is dropped. So a block
//                   holds whether the pod is called by its IP or by a Service.
//   underlay_guard  the node's underlay device, EGRESS: counts every packet that
//                   leaves for a pod address in the clear (outer destination in
//                   `dest`, or else the inner destination of VXLAN on 4789/8472,
//                   Geneve on 6081, IPIP or IPv6-in-IP), and drops it when
//                   `config` has FLAG_STRICT. From a pod to a non-pod address is
//                   counted apart and never dropped (a pod reaching outside).
//                   WireGuard's own UDP (node IP to node IP) never matches.
//                   Assumes an Ethernet underlay; IPv6 extension headers are
//                   not walked.
//
// Blocks: src and dst are looked up in two LPM tries, each giving a bitmap of
// block rules whose src (dst) CIDR contains the address; a non-zero AND means
// some rule contains both.
//
// Both families go through the same tries: a key is (family byte, 16 address
// bytes) with prefixlen = 8 + the CIDR's length, so one lookup serves IPv4 and IPv6.
//
// Pinned maps are an ABI across daemon restarts (a new daemon opens what the
// old one pinned): never resize or reshape one, add a new map instead. That is
// why `config` still carries mark and mask (written 0, unused) and `counters`
// keeps its two retired slots.
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/udp.h>

#define FAMILY_V4 4
#define FAMILY_V6 6

#define FLAG_STRICT 1

// counters (classify)
#define COUNTER_RETIRED_MARKED 0
#define COUNTER_DROPPED_BLOCKED 1
#define COUNTER_PASSED 2
#define COUNTER_RETIRED_DROPPED_STRICT 3
#define COUNTER_COUNT 4

// delivery_counters (deliver)
#define DELIVERY_PASSED 0
#define DELIVERY_DROPPED_BLOCKED 1
#define DELIVERY_COUNT 2

// guard_counters (underlay_guard)
#define GUARD_POD_DST 0      // outer destination in a pod range: pod traffic in the clear
#define GUARD_POD_SRC_ONLY 1 // source in a pod range, destination not (outer, or else inner):
                             // a pod reaching outside the cluster, counted only
#define GUARD_INNER 2        // inner destination in a pod range, inside VXLAN / Geneve / IPIP /
                             // IPv6-in-IP (the outer addresses in no pod range)
#define GUARD_DROPPED 3      // of GUARD_POD_DST + GUARD_INNER, dropped because strict
#define GUARD_COUNT 4

#define PORT_VXLAN 4789
#define PORT_VXLAN_LINUX 8472 // the Linux default, flannel's
#define PORT_GENEVE 6081

struct addr_key {
    u32 prefixlen;
    u8 family;
    u8 addr[16];
};

struct rule_bits {
    u64 w[VPBLU_BLOCK_WORDS];
};

struct dp_config {
    u32 mark;  // retired: 0
    u32 mask;  // retired: 0
    u32 flags;
};

BPF_TABLE_PINNED("lpm_trie", struct addr_key, struct rule_bits, block_src, 16384,
                 VPBLU_PIN_DIR "/block_src", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct addr_key, struct rule_bits, block_dst, 16384,
                 VPBLU_PIN_DIR "/block_dst", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct addr_key, u32, dest, 65536,
                 VPBLU_PIN_DIR "/dest", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("array", u32, struct dp_config, config, 1, VPBLU_PIN_DIR "/config");
BPF_TABLE_PINNED("percpu_array", u32, u64, counters, COUNTER_COUNT,
                 VPBLU_PIN_DIR "/counters");
BPF_TABLE_PINNED("percpu_array", u32, u64, delivery_counters, DELIVERY_COUNT,
                 VPBLU_PIN_DIR "/delivery_counters");
BPF_TABLE_PINNED("percpu_array", u32, u64, guard_counters, GUARD_COUNT,
                 VPBLU_PIN_DIR "/guard_counters");

static __always_inline void count(u32 which) {
    u64 *value = counters.lookup(&which);
    if (value)
        *value += 1;
}

static __always_inline void count_delivery(u32 which) {
    u64 *value = delivery_counters.lookup(&which);
    if (value)
        *value += 1;
}

static __always_inline void count_guard(u32 which) {
    u64 *value = guard_counters.lookup(&which);
    if (value)
        *value += 1;
}

static __always_inline int strict(void) {
    u32 zero = 0;
    struct dp_config *cfg = config.lookup(&zero);
    return cfg && (cfg->flags & FLAG_STRICT);
}

static __always_inline int blocked(struct addr_key *src, struct addr_key *dst) {
    struct rule_bits *s = block_src.lookup(src);
    if (!s)
        return 0;
    struct rule_bits *d = block_dst.lookup(dst);
    if (!d)
        return 0;
#pragma unroll
    for (int i = 0; i < VPBLU_BLOCK_WORDS; i++) {
        if (s->w[i] & d->w[i])
            return 1;
    }
    return 0;
}

// The (src, dst) keys of an Ethernet frame's IPv4/IPv6 header; 0 if it has none.
static __always_inline int frame_addrs(struct __sk_buff *skb, struct addr_key *src,
                                       struct addr_key *dst) {
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;

    if ((void *)(eth + 1) > data_end)
        return 0;
    if (eth->h_proto == htons(ETH_P_IP)) {
        struct iphdr *ip = (void *)(eth + 1);
        if ((void *)(ip + 1) > data_end)
            return 0;
        src->prefixlen = dst->prefixlen = 8 + 32;
        src->family = dst->family = FAMILY_V4;
        __builtin_memcpy(src->addr, &ip->saddr, 4);
        __builtin_memcpy(dst->addr, &ip->daddr, 4);
        return 1;
    }
    if (eth->h_proto == htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        if ((void *)(ip6 + 1) > data_end)
            return 0;
        src->prefixlen = dst->prefixlen = 8 + 128;
        src->family = dst->family = FAMILY_V6;
        __builtin_memcpy(src->addr, &ip6->saddr, 16);
        __builtin_memcpy(dst->addr, &ip6->daddr, 16);
        return 1;
    }
    return 0;
}

int classify(struct __sk_buff *skb) {
    struct addr_key src = {};
    struct addr_key dst = {};

    if (frame_addrs(skb, &src, &dst) && blocked(&src, &dst)) {
        count(COUNTER_DROPPED_BLOCKED);
        return TC_ACT_SHOT;
    }
    count(COUNTER_PASSED);
    return TC_ACT_OK;
}

int deliver(struct __sk_buff *skb) {
    struct addr_key src = {};
    struct addr_key dst = {};

    if (frame_addrs(skb, &src, &dst) && blocked(&src, &dst)) {
        count_delivery(DELIVERY_DROPPED_BLOCKED);
        return TC_ACT_SHOT;
    }
    count_delivery(DELIVERY_PASSED);
    return TC_ACT_OK;
}

#define HIT_DST 1
#define HIT_SRC 2

// Looks at the IP header at `off` (ethertype `proto`): HIT_DST if its destination
// is in a pod range, HIT_SRC if its source is. Sets *l4 (0: do not look further,
// e.g. a non-first IPv4 fragment) and *l4off for the caller.
static __always_inline int pod_addressed(struct __sk_buff *skb, u32 off, u16 proto, u8 *l4,
                                         u32 *l4off) {
    struct addr_key src = {};
    struct addr_key dst = {};
    int hit = 0;

    *l4 = 0;
    if (proto == ETH_P_IP) {
        struct iphdr ip;
        if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) < 0 || ip.ihl < 5)
            return 0;
        src.prefixlen = dst.prefixlen = 8 + 32;
        src.family = dst.family = FAMILY_V4;
        __builtin_memcpy(src.addr, &ip.saddr, 4);
        __builtin_memcpy(dst.addr, &ip.daddr, 4);
        if (!(ip.frag_off & htons(0x1fff)))
            *l4 = ip.protocol;
        *l4off = off + ip.ihl * 4;
    } else if (proto == ETH_P_IPV6) {
        struct ipv6hdr ip6;
        if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)) < 0)
            return 0;
        src.prefixlen = dst.prefixlen = 8 + 128;
        src.family = dst.family = FAMILY_V6;
        __builtin_memcpy(src.addr, &ip6.saddr, 16);
        __builtin_memcpy(dst.addr, &ip6.daddr, 16);
        *l4 = ip6.nexthdr; // extension headers are not walked
        *l4off = off + sizeof(ip6);
    } else {
        return 0;
    }
    if (dest.lookup(&dst))
        hit |= HIT_DST;
    if (dest.lookup(&src))
        hit |= HIT_SRC;
    return hit;
}

// Where an encapsulated packet starts and its ethertype; 0 if not a tunnel we know.
static __always_inline u32 inner_packet(struct __sk_buff *skb, u8 l4, u32 l4off, u16 *proto) {
    if (l4 == IPPROTO_IPIP) {
        *proto = ETH_P_IP;
        return l4off;
    }
    if (l4 == IPPROTO_IPV6) {
        *proto = ETH_P_IPV6;
        return l4off;
    }
    if (l4 != IPPROTO_UDP)
        return 0;
    struct udphdr udp;
    if (bpf_skb_load_bytes(skb, l4off, &udp, sizeof(udp)) < 0)
        return 0;
    u16 port = ntohs(udp.dest);
    u32 off = l4off + sizeof(udp);
    u16 type = ETH_P_TEB;
    if (port == PORT_GENEVE) {
        u8 hdr[4];
        if (bpf_skb_load_bytes(skb, off, hdr, sizeof(hdr)) < 0)
            return 0;
        type = ((u16)hdr[2] << 8) | hdr[3];
        off += 8 + (hdr[0] & 0x3f) * 4; // fixed header + options
    } else if (port == PORT_VXLAN || port == PORT_VXLAN_LINUX) {
        off += 8;
    } else {
        return 0;
    }
    if (type == ETH_P_TEB) {
        struct ethhdr eth;
        if (bpf_skb_load_bytes(skb, off, &eth, sizeof(eth)) < 0)
            return 0;
        *proto = ntohs(eth.h_proto);
        return off + sizeof(eth);
    }
    *proto = type; // Geneve may carry IP directly
    return off;
}

int underlay_guard(struct __sk_buff *skb) {
    u8 l4 = 0;
    u32 l4off = 0;
    int leak = 0;
    int hit = pod_addressed(skb, ETH_HLEN, ntohs(skb->protocol), &l4, &l4off);

    if (hit & HIT_DST) {
        count_guard(GUARD_POD_DST);
        leak = 1;
    } else if (hit & HIT_SRC) {
        count_guard(GUARD_POD_SRC_ONLY);
    } else {
        u16 proto = 0;
        u8 inner_l4 = 0;
        u32 inner_l4off = 0;
        u32 off = inner_packet(skb, l4, l4off, &proto);
        int inner = off ? pod_addressed(skb, off, proto, &inner_l4, &inner_l4off) : 0;
        if (inner & HIT_DST) {
            count_guard(GUARD_INNER);
            leak = 1;
        } else if (inner & HIT_SRC) {
            count_guard(GUARD_POD_SRC_ONLY);
        }
    }
    if (leak && strict()) {
        count_guard(GUARD_DROPPED);
        return TC_ACT_SHOT;
    }
    return TC_ACT_OK;
}
