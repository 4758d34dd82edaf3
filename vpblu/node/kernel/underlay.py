"""The node's underlay interface, found one way for every actor that needs it:
`config.underlay_interface` when set, else the device of the IPv4 default route
in the main table. The MtuActor sizes the mesh from its MTU; the BpfMapActor
puts the cleartext guard on its egress."""

from __future__ import annotations

import socket
from typing import Any

import attrs

MAIN_TABLE = 254


@attrs.frozen(slots=True)
class UnderlayLink:
    index: int
    name: str
    mtu: int


def find_underlay(ipr: Any, configured: str | None) -> UnderlayLink:
    """Through a pyroute2 IPRoute; OSError when the configured link does not
    exist or, unconfigured, when there is no default route."""
    if configured is not None:
        index = ipr.link_lookup(ifname=configured)
        if not index:
            raise OSError(f"underlay interface {configured} does not exist")
    else:
        defaults = [
            r
            for r in ipr.get_routes(family=socket.AF_INET, table=MAIN_TABLE)
            if r["dst_len"] == 0 and r.get_attr("RTA_OIF")
        ]
        if not defaults:
            raise OSError("no default route: set underlay_interface")
        index = [defaults[0].get_attr("RTA_OIF")]
    link = ipr.get_links(index[0])[0]
    return UnderlayLink(
        int(link["index"]), str(link.get_attr("IFLA_IFNAME")), int(link.get_attr("IFLA_MTU"))
    )
