// vpblu's pod-egress classifier: tc clsact ingress on every pod's host-side veth,
// direct-action. It only reads maps; every decision comes from data the daemon
// (vpblu/node/bpfmaps.py) writes. Compiled by bcc at daemon start with
//   -DVPBLU_PIN_DIR="\"/sys/fs/bpf/...\""  where the maps are pinned, and
//   -DVPBLU_BLOCK_WORDS=N                  64-bit words of the block-rule bitmap.
//
// Decision order (DESIGN §3 precedence: BlockPolicy first):
//   1. src and dst are looked up in two LPM tries, each giving a bitmap of block
//      rules whose src (dst) CIDR contains the address. A non-zero AND means some
//      rule contains both: TC_ACT_SHOT, counted.
//   2. dst in `dest`: REMOTE -> set the mesh fwmark under its mask (other bits of
//      skb->mark kept), TC_ACT_OK; the fwmark rule routes it into the mesh.
//      LOCAL -> untouched. CLUSTER (pod range with no remote route) -> dropped
//      only when the `strict` flag is set in `config` (fail-closed), else untouched.
//   3. anything else: TC_ACT_OK untouched.
//
// Both families go through the same tries: a key is (family byte, 16 address
// bytes) with prefixlen = 8 + the CIDR's length, so one lookup serves IPv4 and IPv6.
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>

#define FAMILY_V4 4
#define FAMILY_V6 6

#define DEST_REMOTE 1
#define DEST_LOCAL 2
#define DEST_CLUSTER 3

#define FLAG_STRICT 1

#define COUNTER_MARKED 0
#define COUNTER_DROPPED_BLOCKED 1
#define COUNTER_PASSED 2
#define COUNTER_DROPPED_STRICT 3
#define COUNTER_COUNT 4

struct addr_key {
    u32 prefixlen;
    u8 family;
    u8 addr[16];
};

struct rule_bits {
    u64 w[VPBLU_BLOCK_WORDS];
};

struct dp_config {
    u32 mark;
    u32 mask;
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

static __always_inline void count(u32 which) {
    u64 *value = counters.lookup(&which);
    if (value)
        *value += 1;
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

int classify(struct __sk_buff *skb) {
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    struct addr_key src = {};
    struct addr_key dst = {};

    if ((void *)(eth + 1) > data_end)
        goto pass;
    if (eth->h_proto == htons(ETH_P_IP)) {
        struct iphdr *ip = (void *)(eth + 1);
        if ((void *)(ip + 1) > data_end)
            goto pass;
        src.prefixlen = 8 + 32;
        src.family = FAMILY_V4;
        __builtin_memcpy(src.addr, &ip->saddr, 4);
        dst.prefixlen = 8 + 32;
        dst.family = FAMILY_V4;
        __builtin_memcpy(dst.addr, &ip->daddr, 4);
    } else if (eth->h_proto == htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        if ((void *)(ip6 + 1) > data_end)
            goto pass;
        src.prefixlen = 8 + 128;
        src.family = FAMILY_V6;
        __builtin_memcpy(src.addr, &ip6->saddr, 16);
        dst.prefixlen = 8 + 128;
        dst.family = FAMILY_V6;
        __builtin_memcpy(dst.addr, &ip6->daddr, 16);
    } else {
        goto pass;
    }

    if (blocked(&src, &dst)) {
        count(COUNTER_DROPPED_BLOCKED);
        return TC_ACT_SHOT;
    }

    u32 *kind = dest.lookup(&dst);
    if (kind && *kind == DEST_REMOTE) {
        u32 zero = 0;
        struct dp_config *cfg = config.lookup(&zero);
        if (cfg) {
            skb->mark = (skb->mark & ~cfg->mask) | (cfg->mark & cfg->mask);
            count(COUNTER_MARKED);
            return TC_ACT_OK;
        }
    } else if (kind && *kind == DEST_CLUSTER) {
        u32 zero = 0;
        struct dp_config *cfg = config.lookup(&zero);
        if (cfg && (cfg->flags & FLAG_STRICT)) {
            count(COUNTER_DROPPED_STRICT);
            return TC_ACT_SHOT;
        }
    }
pass:
    count(COUNTER_PASSED);
    return TC_ACT_OK;
}
