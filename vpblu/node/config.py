"""The daemon's configuration: one immutable value passed to every node actor.

Owns the defaults of the data path that the kernel pieces must agree on (the
routing table and rule priority that steer pod ranges into the mesh interface,
WireGuard's socket mark, the pin path of the eBPF maps). Nothing here touches
the kernel.
"""

from __future__ import annotations

from pathlib import Path

import attrs

DEFAULT_INTERFACE = "wg-mesh"
DEFAULT_STATE_DIR = Path("/var/lib/vpblu")
DEFAULT_BPF_PIN_DIR = Path("/sys/fs/bpf/vpblu")

# Pod ranges are steered into MESH_TABLE by destination (`ip rule to <range>
# lookup MESH_TABLE priority MESH_RULE_PRIORITY`, see vpblu.node.netlink), not
# by a mark: no mark is set on pod traffic. WireGuard's own UDP socket carries
# WG_SOCKET_FWMARK, which a rule just before sends to the main table. The bit
# is chosen to stay clear of the marks others use: kube-proxy 0x4000 and
# 0x8000, Calico's mask 0xffff0000, Cilium 0x0f00 and the upper half.
# MESH_FWMARK is what the classifier's config map holds for versions that
# marked; today it is written as 0.
MESH_FWMARK = 0x00B10000
MESH_FWMARK_MASK = 0x00FF0000
WG_SOCKET_FWMARK = 0x80
WG_SOCKET_FWMARK_MASK = 0x80
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
    wg_socket_fwmark_mask: int = WG_SOCKET_FWMARK_MASK
    table: int = MESH_TABLE
    rule_priority: int = MESH_RULE_PRIORITY
    mtu_overhead: int = DEFAULT_MTU_OVERHEAD
    wireguard_backend: str = "auto"  # "auto" | "kernel" | "userspace"
    # Userspace WireGuard only: "start" wireguard-go when none answers (it then
    # runs in the daemon's session, and in a container ends with it), or
    # "external": only adopt the one the node runs (the vpblu-wireguard
    # DaemonSet), so a daemon pod's restart leaves the interface up.
    wireguard_go: str = attrs.field(
        default="start", validator=attrs.validators.in_(("start", "external")))
