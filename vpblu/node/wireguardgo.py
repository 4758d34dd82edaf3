"""`vpblu daemon wireguard-go`: the node's userspace WireGuard, in a pod of its own.

Owns one thing: the wireguard-go process behind the mesh interface on a node
whose kernel has no WireGuard. It must never configure the interface (key,
peers, routes: the daemon's NetlinkActor does, over the UAPI socket) and never
run beside kernel WireGuard.

Why a process of its own: wireguard-go *is* the interface (a TUN device that
goes when its process ends). Run by the daemon, it lived in the daemon pod's
container and ended with it, so `kubectl rollout restart ds/vpblu-daemon` took
every node's tunnel down for seconds (913-2945 datagrams lost at 200/s on the
kubelet nodes). Run here, by the vpblu-wireguard DaemonSet
(kustomize/base/wireguard.yaml, `updateStrategy: OnDelete`), with its UAPI
socket on the hostPath /var/run/wireguard, it outlives any number of daemon
restarts; the daemon (`--wireguard-go=external`) only adopts it.

What it does, by what the kernel can do (`--wireguard-backend`, as the daemon):
- the kernel makes WireGuard links (auto, or `kernel`): nothing to run; it
  idles until SIGTERM, so the DaemonSet is the same on every node and the
  kernel's interface is the daemon's alone;
- otherwise it waits until no link of the interface's name is left (one made
  by a daemon of an older layout, whose own wireguard-go still holds it), then
  replaces itself with `wireguard-go -f <interface>`: the foreground process is
  the container's, SIGTERM reaches it directly, and it removes its link and
  socket as it exits (an uninstall leaves neither).
"""

from __future__ import annotations

import logging
import os
import signal
import time

from vpblu.node.kernel.wireguard import kernel_has_wireguard

log = logging.getLogger(__name__)

# Not the daemon's probe name: both may probe at the same moment.
PROBE_INTERFACE = "vpblu-probe1"
LINK_GONE_POLL = 1.0
LINK_WAIT_LOG_EVERY = 30.0


def _link_exists(interface: str) -> bool:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=interface))


def _idle_until_stopped(why: str) -> int:
    """Say `why`, then block until SIGTERM or SIGINT (a container's PID 1 has no
    default action for them: they must be waited for). Blocked before saying
    it: one that comes right after is waited for, not fatal."""
    stop = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    log.info("%s", why)
    signo = signal.sigwait(stop)
    log.info("%s: stopping", signal.Signals(signo).name)
    return 0


def run_wireguard_go(interface: str, backend: str, *, executable: str = "wireguard-go") -> int:
    """Idle (kernel WireGuard) or become wireguard-go for `interface` (exec: returns
    only when idling ends or exec fails)."""
    if backend not in ("auto", "kernel", "userspace"):
        raise ValueError(f"backend must be auto, kernel or userspace, not {backend!r}")
    kernel = backend == "kernel" or (backend == "auto" and kernel_has_wireguard(PROBE_INTERFACE))
    if kernel:
        return _idle_until_stopped(
            f"{interface}: kernel WireGuard ("
            f"{'configured' if backend == 'kernel' else 'the kernel makes WireGuard links'}): "
            "no wireguard-go to run; idling")
    logged = float("-inf")
    while _link_exists(interface):
        now = time.monotonic()
        if now - logged >= LINK_WAIT_LOG_EVERY:
            log.warning("%s exists and is not this pod's wireguard-go (a daemon that ran "
                        "its own?): waiting for it to go", interface)
            logged = now
        time.sleep(LINK_GONE_POLL)
    log.info("%s: starting %s in the foreground", interface, executable)
    env = {k: v for k, v in os.environ.items() if k != "WG_PROCESS_FOREGROUND"}
    os.execvpe(executable, [executable, "-f", interface], env)
