"""The daemon's configuration: one immutable value passed to every node actor.

Owns the defaults of the data path that the kernel pieces must agree on (the
fwmark the classifier sets, the routing table and rule that send marked packets
into the mesh interface, the pin path of the eBPF maps). Nothing here touches
the kernel.
"""

from __future__ import annotations

from pathlib import Path

import attrs

DEFAULT_INTERFACE = "wg-mesh"
DEFAULT_STATE_DIR = Path("/var/lib/vpblu")
DEFAULT_BPF_PIN_DIR = Path("/sys/fs/bpf/vpblu")

# The classifier sets MESH_FWMARK (under MESH_FWMARK_MASK, so other users of
# skb->mark keep their bits); `ip rule fwmark MESH_FWMARK/MASK lookup
# MESH_TABLE` sends those packets to a table whose routes all point into the
# mesh interface. WireGuard's own UDP socket carries WG_SOCKET_FWMARK so its
# encrypted packets never match that rule and loop back into the tunnel.
MESH_FWMARK = 0x00B10000
MESH_FWMARK_MASK = 0x00FF0000
WG_SOCKET_FWMARK = 0x00B20000
MESH_TABLE = 5182
MESH_RULE_PRIORITY = 5182

# WireGuard over IPv4 UDP adds 60 bytes, over IPv6 80: 80 fits both.
DEFAULT_MTU_OVERHEAD = 80


@attrs.frozen(slots=True)
class DaemonConfig:
    node_name: str
    interface: str = DEFAULT_INTERFACE
    state_dir: Path = DEFAULT_STATE_DIR
    bpf_pin_dir: Path = DEFAULT_BPF_PIN_DIR
    # Host-side veths of pods are found by name (a CNI names them: cali*, veth*, lxc*).
    pod_veth_glob: str = "veth*"
    underlay_interface: str | None = None  # None: the interface of the default route
    fwmark: int = MESH_FWMARK
    fwmark_mask: int = MESH_FWMARK_MASK
    wg_socket_fwmark: int = WG_SOCKET_FWMARK
    table: int = MESH_TABLE
    rule_priority: int = MESH_RULE_PRIORITY
    mtu_overhead: int = DEFAULT_MTU_OVERHEAD
    wireguard_backend: str = "auto"  # "auto" | "kernel" | "userspace"
