"""Every message one vpblu actor sends another, and nothing else.

Rules: frozen, slotted attrs classes; validators where a wrong value is
possible; one union type per actor inbox, dispatched with `match`; never a
dict, never a private key.
"""

from __future__ import annotations

import attrs
import trio

from vpblu.model import IPNetwork, NodeDesiredState

# --- NetlinkActor (vpblu/node/netlink.py) ----------------------------------------


@attrs.frozen(slots=True)
class Applied:
    """What an apply changed. All empty: the kernel already matched."""

    peers_added: tuple[str, ...] = ()  # public keys
    peers_changed: tuple[str, ...] = ()
    peers_removed: tuple[str, ...] = ()
    routes_added: tuple[IPNetwork, ...] = ()
    routes_removed: tuple[IPNetwork, ...] = ()
    listen_port_changed: bool = False

    @property
    def changed_anything(self) -> bool:
        return bool(
            self.peers_added
            or self.peers_changed
            or self.peers_removed
            or self.routes_added
            or self.routes_removed
            or self.listen_port_changed
        )


@attrs.frozen(slots=True)
class ApplyFailed:
    """The apply stopped at an error; what was written before it stays."""

    error: str


ApplyOutcome = Applied | ApplyFailed


@attrs.frozen(slots=True)
class ApplyDesiredState:
    """Make the mesh interface's peers and the mesh table's routes match `state`."""

    state: NodeDesiredState
    reply: trio.MemorySendChannel[ApplyOutcome] = attrs.field(eq=False, repr=False)


NetlinkInbox = ApplyDesiredState


# --- MtuActor (vpblu/node/mtu.py) -------------------------------------------------


@attrs.frozen(slots=True)
class MtuStatus:
    underlay_interface: str
    underlay_mtu: int
    mesh_mtu: int | None  # None: the mesh interface does not exist yet
    mss: int | None
    changed: bool


@attrs.frozen(slots=True)
class CheckMtu:
    """Re-check now instead of at the next period; the reply says what holds."""

    reply: trio.MemorySendChannel[MtuStatus] = attrs.field(eq=False, repr=False)


MtuInbox = CheckMtu
