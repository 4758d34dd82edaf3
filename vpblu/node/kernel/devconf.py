"""An interface's IPv4 settings (net.ipv4.conf.<iface>.*) set over rtnetlink.

A container that is not privileged has /proc/sys mounted read-only, so the
daemon cannot write conf/<iface>/rp_filter there; the same setting goes
through RTM_SETLINK with IFLA_AF_SPEC { AF_INET { IFLA_INET_CONF { <index>:
u32 } } } (the kernel's inet_set_link_af), which needs CAP_NET_ADMIN in the
interface's network namespace and nothing else. pyroute2 decodes that
attribute as a flat array and cannot encode the nested form the kernel
expects, so the message is built here.

Owns one netlink socket per call, opened and closed inside it. Call on a
worker thread already in the right network namespace (nsexec.call_in_netns).
"""

from __future__ import annotations

import errno
import os
import socket
import struct

NETLINK_ROUTE = 0
RTM_SETLINK = 19
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 2
IFLA_AF_SPEC = 26
IFLA_INET_CONF = 1
NLA_F_NESTED = 0x8000
# include/uapi/linux/ip.h, enum IPV4_DEVCONF_* (1-based).
IPV4_DEVCONF_RP_FILTER = 8

_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_NLATTR = struct.Struct("=HH")
_NLMSGERR = struct.Struct("=i")


def _attr(kind: int, payload: bytes) -> bytes:
    length = _NLATTR.size + len(payload)
    pad = (4 - length % 4) % 4
    return _NLATTR.pack(length, kind) + payload + b"\0" * pad


def setlink_ipv4_devconf(ifindex: int, values: dict[int, int]) -> None:
    """Set IPV4_DEVCONF_* `values` (index -> value) on interface `ifindex`.

    OSError with the kernel's errno if it refuses (EPERM without CAP_NET_ADMIN,
    ENODEV for a missing interface, EINVAL for an index it does not know)."""
    if not values:
        return
    conf = b"".join(_attr(index, struct.pack("=I", value & 0xFFFFFFFF))
                    for index, value in sorted(values.items()))
    af_inet = _attr(socket.AF_INET | NLA_F_NESTED, _attr(IFLA_INET_CONF | NLA_F_NESTED, conf))
    body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, ifindex, 0, 0) + _attr(
        IFLA_AF_SPEC | NLA_F_NESTED, af_inet)
    seq = int.from_bytes(os.urandom(4), "little") or 1
    message = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_SETLINK,
                             NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE) as sock:
        sock.settimeout(5.0)
        sock.bind((0, 0))
        sock.sendto(message, (0, 0))
        while True:
            data = sock.recv(65536)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _flags, got_seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    raise OSError(errno.EPROTO, "a netlink reply too short to parse")
                if got_seq == seq and kind == NLMSG_ERROR:
                    (code,) = _NLMSGERR.unpack_from(data, offset + _NLMSGHDR.size)
                    if code == 0:
                        return
                    raise OSError(-code, f"RTM_SETLINK ipv4 devconf on ifindex {ifindex}: "
                                         f"{os.strerror(-code)}")
                offset += (length + 3) & ~3
