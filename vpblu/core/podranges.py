"""The cluster's pod ranges when nobody names them all: every Node podCIDR seen.

Owns the leader's memory of pod ranges and the text it is kept in. Pure: no
I/O, no clock, no logging.

Why it exists. The steering (the classifier's `dest` map and `ip rule to
<range> lookup <mesh table>`) and the underlay's cleartext guard act on one
set, the DataPath's `cluster_cidrs`: traffic to it goes into the mesh, or is
dropped and counted when there is no tunnel. If that set were only the
podCIDRs of the Nodes that exist now, `kubectl delete node` would take a range
out of it while the machine behind it still runs pods (deleting a Node stops
nothing there) and a route still leads there - a host-gw CNI's or a static
route, a stale one - and traffic to those pods would then leave in the clear.
So a range, once seen as a Node's podCIDR, stays a pod range of the cluster:
the set can only grow by itself. Named ranges cover it too, and cover ranges
no Node holds yet: the TunnelPolicy's `spec.clusterCIDRs` and the controller's
`--cluster-cidr` (as kube-controller-manager's); the DataPath holds the union
of all of them and of the live Nodes' podCIDRs.

Where it is kept. ConfigMap `vpblu-system/vpblu-pod-ranges`, `data.podRanges`:
one `<cidr> <node>` a line (the Node it was first seen on), `#` comments.
The leader watches it like the kinds it reads, so nothing is pushed before it
is read (the StateActor's listed-before-push invariant): a new leader never
pushes a smaller set than its predecessor wrote. It adds every live Node's
podCIDR the ConfigMap lacks (vpblu.actors.podranges) and never removes a line:
an operator does (`kubectl edit`), to release a range that is no longer a pod
range; deleting the ConfigMap forgets every deleted Node's range (the live
Nodes' ranges are written again at once). The window it cannot cover: a Node
made and deleted before the leader's write of its range lands, and the leader
lost in that same window.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from vpblu.core.model import IPNetwork, PodRange, network
from vpblu.core.sources import NodeSource, PodRangesSource

CONFIG_MAP = "vpblu-pod-ranges"
DATA_KEY = "podRanges"
HEADER = (
    "# Every Node podCIDR the vpblu controller has seen: pod ranges it steers into the\n"
    "# mesh (or drops) and guards against cleartext, also after their Node is deleted.\n"
    "# One '<cidr> <node>' a line. The controller only adds; remove a line to release\n"
    "# a range that is no longer a pod range.\n"
)


def parse_lines(text: str) -> tuple[tuple[PodRange, ...], tuple[str, ...]]:
    """The ranges in `data.podRanges`, and what is wrong with the lines that are not
    ranges (a default route is none: it would steer every packet into the mesh)."""
    ranges: dict[IPNetwork, PodRange] = {}
    problems = []
    for number, line in enumerate(text.splitlines(), start=1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        try:
            if len(words) > 2:
                raise ValueError("expected '<cidr> <node>'")
            cidr = network(words[0])
            if cidr.prefixlen == 0:
                raise ValueError("a default route is no pod range")
        except ValueError as exc:
            problems.append(f"line {number} ({line.strip()!r}) ignored: {exc}")
            continue
        ranges.setdefault(cidr, PodRange(cidr, words[1] if len(words) == 2 else ""))
    return tuple(sorted(ranges.values(), key=_order)), tuple(problems)


def format_lines(ranges: Iterable[PodRange]) -> str:
    body = "".join(f"{r.cidr} {r.node}\n" if r.node else f"{r.cidr}\n"
                   for r in sorted(ranges, key=_order))
    return HEADER + body


def merged(text: str | None, added: Iterable[PodRange]) -> str | None:
    """`text` with the ranges of `added` it lacks appended (its own lines kept as
    they are, comments and all), or None when it has them all."""
    have = {r.cidr for r in parse_lines(text or "")[0]}
    new = sorted({r.cidr: r for r in added if r.cidr not in have}.values(), key=_order)
    if not new:
        return None
    if text is None or not text.strip():
        return format_lines(new)
    return text + ("" if text.endswith("\n") else "\n") + format_lines(new)[len(HEADER):]


def _order(r: PodRange) -> tuple[int, int, int, str]:
    return r.cidr.version, int(r.cidr.network_address), r.cidr.prefixlen, r.node


class PodRangeMemory:
    """The StateActor's view of the remembered ranges: what the ConfigMap holds,
    plus the live Nodes' podCIDRs it does not hold yet (pending: handed to the
    writer, and kept here until the ConfigMap is seen holding them). Only an
    edit of the ConfigMap makes it smaller."""

    def __init__(self) -> None:
        self._stored: dict[IPNetwork, PodRange] = {}
        self._pending: dict[IPNetwork, PodRange] = {}
        self._handed: set[IPNetwork] = set()
        self._ranges: tuple[PodRange, ...] = ()
        self._source: PodRangesSource | None = None

    @property
    def ranges(self) -> tuple[PodRange, ...]:
        """Stored and pending, in address order; the same tuple until it changes."""
        return self._ranges

    def follow(self, source: PodRangesSource | None, nodes: Iterable[NodeSource]) -> None:
        """The ConfigMap and the Nodes as the leader sees them now (taken again
        only when the ConfigMap is another object)."""
        if source is not self._source:
            self._source = source
            self.stored(source)
        self.observe(nodes)

    def stored(self, source: PodRangesSource | None) -> None:
        """The ConfigMap as listed or changed (None: there is none)."""
        self._stored = {r.cidr: r for r in source.ranges} if source is not None else {}
        for cidr in self._stored.keys() & self._pending.keys():
            del self._pending[cidr]
            self._handed.discard(cidr)
        self._rebuild()

    def observe(self, nodes: Iterable[NodeSource]) -> None:
        """The Nodes now: a podCIDR neither stored nor pending becomes pending."""
        grew = False
        for node in nodes:
            for cidr in node.pod_cidrs:
                if cidr not in self._stored and cidr not in self._pending:
                    self._pending[cidr] = PodRange(cidr, node.meta.name)
                    grew = True
        if grew:
            self._rebuild()

    def unsent(self) -> tuple[PodRange, ...]:
        """Pending ranges not handed to the writer yet."""
        if len(self._handed) == len(self._pending):
            return ()
        return tuple(r for c, r in self._pending.items() if c not in self._handed)

    def handed(self, ranges: Sequence[PodRange]) -> None:
        self._handed.update(r.cidr for r in ranges if r.cidr in self._pending)

    def _rebuild(self) -> None:
        both = {**self._stored, **self._pending}
        self._ranges = tuple(sorted(both.values(), key=_order))
