"""The classifier's tables: rule bitmaps over LPM prefixes, stable ids, decoding, diffs."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vpblu.core.model import CidrPair, IPAddress, IPNetwork, Route
from vpblu.node.kernel import bpftables
from vpblu.node.kernel.bpftables import BLOCK_RULE_LIMIT, DestKind, TooManyBlockRules


def net(text: str) -> IPNetwork:
    return ipaddress.ip_network(text)


def addr(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def lpm(table: dict[IPNetwork, int], addr: IPAddress) -> int | None:
    """What the kernel's LPM trie returns for `addr`: the longest prefix containing it."""
    best = [n for n in table if n.version == addr.version and addr in n]
    if not best:
        return None
    return table[max(best, key=lambda n: n.prefixlen)]


def classifier_drops(tables: bpftables.ClassifierTables, src: IPAddress, dst: IPAddress) -> bool:
    s, d = lpm(dict(tables.block_src), src), lpm(dict(tables.block_dst), dst)
    return s is not None and d is not None and (s & d) != 0


def test_nested_prefixes_carry_the_bits_of_every_containing_rule() -> None:
    rules = {
        0: CidrPair("10.0.0.0/8", "192.168.0.0/16"),
        1: CidrPair("10.1.0.0/16", "172.16.0.0/12"),
    }
    t = bpftables.tables(rules, ())
    assert t.block_src == {net("10.0.0.0/8"): 0b01, net("10.1.0.0/16"): 0b11}
    assert t.block_dst == {net("192.168.0.0/16"): 0b01, net("172.16.0.0/12"): 0b10}
    # 10.1.2.3 matches the /16 only (longest), which must still carry rule 0's bit.
    assert classifier_drops(t, addr("10.1.2.3"), addr("192.168.1.1"))
    assert classifier_drops(t, addr("10.1.2.3"), addr("172.16.0.9"))
    assert not classifier_drops(t, addr("10.2.0.1"), addr("172.16.0.9"))


def test_families_never_mix() -> None:
    rules = {0: CidrPair("0.0.0.0/0", "0.0.0.0/0"), 1: CidrPair("::/0", "fd00::/8")}
    t = bpftables.tables(rules, ())
    assert t.block_src == {net("0.0.0.0/0"): 0b01, net("::/0"): 0b10}


def test_rule_ids_are_stable_and_freed_ids_are_reused_lowest_first() -> None:
    a, b, c = (CidrPair(f"10.{i}.0.0/16", "10.9.0.0/16") for i in range(3))
    first = bpftables.assign_rule_ids([a, b], {})
    assert first == {0: a, 1: b}
    second = bpftables.assign_rule_ids([b, c], first)
    assert second == {1: b, 0: c}
    assert bpftables.assign_rule_ids([b, c], second) == second


def test_more_rules_than_bits_are_refused_with_a_clear_error() -> None:
    rules = [CidrPair(f"10.{i // 256}.{i % 256}.0/24", "10.200.0.0/16") for i in range(129)]
    assert len(bpftables.assign_rule_ids(rules[:BLOCK_RULE_LIMIT], {})) == BLOCK_RULE_LIMIT
    with pytest.raises(TooManyBlockRules, match=r"129 blocked CIDR pairs.*at most 128"):
        bpftables.assign_rule_ids(rules, {})


def test_dest_table_precedence_route_over_local_over_cluster() -> None:
    table = bpftables.dest_table(
        [Route("10.244.2.0/24", "b"), Route("10.244.0.0/16", "c")],
        [net("10.244.1.0/24"), net("10.244.2.0/24")],
        [net("10.244.0.0/16")],
    )
    assert table == {
        net("10.244.0.0/16"): DestKind.REMOTE,
        net("10.244.1.0/24"): DestKind.LOCAL,
        net("10.244.2.0/24"): DestKind.REMOTE,
    }


def test_diff_writes_only_what_differs() -> None:
    d = bpftables.diff(
        {net("10.0.0.0/8"): 1, net("10.1.0.0/16"): 3},
        {net("10.0.0.0/8"): 1, net("10.2.0.0/16"): 1},
    )
    assert d.upserts == {net("10.2.0.0/16"): 1}
    assert d.deletes == {net("10.1.0.0/16")}
    assert len(bpftables.diff({net("10.0.0.0/8"): 1}, {net("10.0.0.0/8"): 1})) == 0


v4_nets = st.builds(
    lambda a, p: ipaddress.ip_network((a, p), strict=False),
    st.integers(0, 2**32 - 1).map(lambda i: ipaddress.IPv4Address(i & 0x0F0F0000 | 0x0A000000)),
    st.integers(4, 24),
)
rule_sets = st.lists(st.builds(CidrPair, v4_nets, v4_nets), max_size=12, unique=True)
addrs = st.integers(0, 2**32 - 1).map(lambda i: ipaddress.IPv4Address(i & 0x0F0F0F0F | 0x0A000000))


@settings(max_examples=200, deadline=None)
@given(rule_sets, st.lists(st.tuples(addrs, addrs), min_size=1, max_size=20))
def test_lpm_lookup_of_bitmaps_equals_brute_force_over_rules(
    blocks: list[CidrPair], packets: list[tuple[IPAddress, IPAddress]]
) -> None:
    t = bpftables.tables(bpftables.assign_rule_ids(blocks, {}), ())
    for src, dst in packets:
        expected = any(src in r.src and dst in r.dst for r in blocks)
        assert classifier_drops(t, src, dst) == expected


@settings(max_examples=200, deadline=None)
@given(rule_sets, rule_sets)
def test_decoding_the_tables_gives_back_the_rules_and_their_ids(
    before: list[CidrPair], after: list[CidrPair]
) -> None:
    ids = bpftables.assign_rule_ids(after, bpftables.assign_rule_ids(before, {}))
    t = bpftables.tables(ids, ())
    assert bpftables.decode_rules(t.block_src, t.block_dst) == ids
