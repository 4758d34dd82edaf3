"""`vpblu`: the command line an operator runs (and the manifests call).

Owns argument parsing and process setup (logging, the trio-asyncio loop),
nothing else: each subcommand builds its settings value and hands it to the
module that runs it.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from vpblu import logformat
from vpblu.core.model import IPNetwork, network

CONTROLLER_GC_THRESHOLDS = (50_000, 20, 100)

if TYPE_CHECKING:
    from vpblu.node.config import DaemonConfig

log = logging.getLogger("vpblu")


def _controller_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("controller", help="run one controller replica")
    p.add_argument("--kubeconfig", type=Path, default=None,
                   help="kubeconfig file (default: in-cluster ServiceAccount)")
    p.add_argument("--listen", default="0.0.0.0:7443", help="gRPC listen address host:port")
    p.add_argument("--advertise", required=True,
                   help="address daemons reach this replica at (leader redirects point here)")
    p.add_argument("--tls-cert", type=Path, required=True)
    p.add_argument("--tls-key", type=Path, required=True)
    p.add_argument("--client-ca", type=Path, default=None,
                   help="require client certificates signed by this CA (mTLS)")
    p.add_argument("--identity", default=None, help="Lease holder identity (default: unique)")
    p.add_argument("--lease-namespace", default="vpblu-system")
    p.add_argument("--lease-name", default="vpblu-controller")
    p.add_argument("--lease-duration", type=float, default=15.0)
    p.add_argument("--renew-deadline", type=float, default=10.0)
    p.add_argument("--retry-period", type=float, default=2.0)
    p.add_argument("--resync-period", type=float, default=300.0,
                   help="seconds between full SyncStates on a warm stream")
    p.add_argument("--daemon-user", action="append", default=None,
                   help="username allowed to speak for a node (repeatable; default: the "
                        "vpblu-daemon ServiceAccount)")
    p.add_argument("--keepalive-timeout", type=float, default=15.0,
                   help="abort a mesh connection that received nothing for this many "
                        "seconds (PINGs go every 5 s; raise it for very large meshes)")
    p.add_argument("--metrics-listen", default="0.0.0.0:9090",
                   help="host:port of /metrics, /healthz and /readyz ('' to serve none)")
    p.add_argument("--dashboard-addr", default=":8082",
                   help="host:port of the web dashboard, over TLS with --tls-cert/--tls-key "
                        "(':8082' is every address; '' to serve none)")
    p.add_argument("--dashboard-plain-http", action="store_true",
                   help="serve the dashboard without TLS: only on a loopback --dashboard-addr")
    p.add_argument("--service-cidr", action="append", default=[], type=_cidr,
                   help="the cluster's Service range, as kube-apiserver's "
                        "--service-cluster-ip-range (repeatable: one per IP family); a "
                        "RoutePolicy route over it is refused")
    p.add_argument("--cluster-cidr", action="append", default=[], type=_pod_cidr,
                   help="the cluster's pod range, as kube-controller-manager's --cluster-cidr "
                        "(repeatable): traffic to it goes into the mesh or is dropped, never "
                        "in the clear, even where no Node holds it (every Node podCIDR seen "
                        "is covered anyway, also after its Node is deleted)")


def _cidr(text: str) -> IPNetwork:
    """A CIDR with its host bits zero, for argparse (its error names the value)."""
    try:
        return network(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _pod_cidr(text: str) -> IPNetwork:
    """A pod range: a CIDR, and not a default route (it would steer every packet)."""
    cidr = _cidr(text)
    if cidr.prefixlen == 0:
        raise argparse.ArgumentTypeError(f"{text} is a default route, not a pod range")
    return cidr


def _run_controller(args: argparse.Namespace) -> int:
    from vpblu import aioloop
    from vpblu.actors.controller import ControllerSettings, default_identity, run_controller
    from vpblu.actors.leader import LeaseSettings
    from vpblu.actors.session import SessionSettings
    from vpblu.stream.transport import ServerTLS, set_keepalive_timeout

    try:
        set_keepalive_timeout(args.keepalive_timeout)
    except ValueError as bad:
        print(f"vpblu controller: --keepalive-timeout: {bad}", file=sys.stderr)
        return 2
    users = (frozenset(args.daemon_user) if args.daemon_user
             else frozenset({"system:serviceaccount:vpblu-system:vpblu-daemon"}))
    from vpblu.dashboard.server import DashboardSettings

    try:
        dashboard = None if not args.dashboard_addr else DashboardSettings(
            args.dashboard_addr, *((None, None) if args.dashboard_plain_http
                                   else (args.tls_cert, args.tls_key)))
    except ValueError as bad:
        print(f"vpblu controller: --dashboard-addr: {bad}", file=sys.stderr)
        return 2
    settings = ControllerSettings(
        kubeconfig=args.kubeconfig,
        listen=args.listen,
        advertise=args.advertise,
        tls=ServerTLS(args.tls_cert, args.tls_key, args.client_ca),
        identity=args.identity or default_identity(),
        lease=LeaseSettings(args.lease_namespace, args.lease_name, args.lease_duration,
                            args.renew_deadline, args.retry_period),
        session=SessionSettings(resync_period=args.resync_period),
        daemon_users=users,
        service_cidrs=tuple(args.service_cidr),
        cluster_cidrs=tuple(args.cluster_cidr),
        metrics_listen=args.metrics_listen or None,
        dashboard=dashboard,
    )

    async def main() -> None:
        async with aioloop.open_loop():
            await _until_stopped(functools.partial(run_controller, settings))

    # The controller holds ~N^2 long-lived objects (every node's peers) and
    # allocates in bursts per event; with CPython's default thresholds (700,
    # 10, 10) the collector ran ~20 times per event at N=1000 and was half
    # of the StateActor's work per event (bench/state_actor.py: 73 -> 38 ms).
    gc.set_threshold(*CONTROLLER_GC_THRESHOLDS)
    from vpblu.kubeversion import UnsupportedKubernetes

    refused: list[BaseException] = []
    try:
        trio.run(main)
    except* UnsupportedKubernetes as group:
        # Nested as deep as the nurseries it crossed; only the leaves speak.
        pending: list[BaseException] = [group]
        while pending:
            exc = pending.pop()
            if isinstance(exc, BaseExceptionGroup):
                pending.extend(exc.exceptions)
            else:
                refused.append(exc)
    for exc in refused:
        log.error("cannot start: %s", exc)
        print(f"vpblu controller: {exc}", file=sys.stderr)
    return 2 if refused else 0


async def _until_stopped(run: Callable[[], Awaitable[None]]) -> None:
    """Run until `run` returns or SIGTERM/SIGINT comes; a signal cancels it,
    so everything shuts down in order. For the controller that means its
    Lease is released and its streams end with a reason: when a Deployment
    rolls, the next replica leads at once instead of after the lease
    expires, and no daemon is redirected to a replica that is gone. A
    daemon's end of the stream closes with a reason too."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def run_then_stop() -> None:
                await run()
                nursery.cancel_scope.cancel()

            nursery.start_soon(run_then_stop)
            async for signo in signals:
                log.info("%s: stopping", signal.Signals(signo).name)
                nursery.cancel_scope.cancel()
                break


def _node_resource_flags(p: argparse.ArgumentParser) -> None:
    """What the daemon creates on a node: `run` and `cleanup` must agree on it."""
    from vpblu.node import config as c

    p.add_argument("--node-name", default=os.environ.get("NODE_NAME"),
                   help="this node's Kubernetes name (env NODE_NAME)")
    p.add_argument("--interface", default=c.DEFAULT_INTERFACE)
    p.add_argument("--state-dir", type=Path, default=c.DEFAULT_STATE_DIR)
    p.add_argument("--bpf-pin-dir", type=Path, default=c.DEFAULT_BPF_PIN_DIR)
    p.add_argument("--pod-veth-glob", default="veth*",
                   help="host-side pod veths the classifier attaches to")
    p.add_argument("--underlay-interface", default=None,
                   help="default: the device of the default route")
    p.add_argument("--mtu-overhead", type=int, default=c.DEFAULT_MTU_OVERHEAD)
    p.add_argument("--wireguard-backend", choices=["auto", "kernel", "userspace"],
                   default="auto")
    p.add_argument("--table", type=int, default=c.MESH_TABLE,
                   help="the routing table pod ranges are steered into")
    p.add_argument("--rule-priority", type=int, default=c.MESH_RULE_PRIORITY,
                   help="priority of the steering rules (the next lower one exempts WireGuard)")
    p.add_argument("--wg-fwmark", type=lambda v: int(v, 0), default=c.WG_SOCKET_FWMARK,
                   help="mark on WireGuard's own UDP; pick a bit no other component uses")


def _daemon_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("daemon", help="the node daemon")
    dsub = p.add_subparsers(dest="daemon_command", required=True)
    run = dsub.add_parser("run", help="run the node daemon")
    _node_resource_flags(run)
    env_controllers = os.environ.get("VPBLU_CONTROLLER", "")
    run.add_argument("--controller", action="append", default=None,
                     help="controller address host:port (repeatable; env VPBLU_CONTROLLER, "
                          "comma-separated)")
    run.add_argument("--ca", type=Path, required=True,
                     help="CA that signed the controller's certificate")
    run.add_argument("--server-name", default=None,
                     help="name to check in the controller's certificate")
    run.add_argument("--token-file", type=Path, default=os.environ.get("VPBLU_TOKEN_FILE"),
                     help="the projected ServiceAccount token (env VPBLU_TOKEN_FILE)")
    run.add_argument("--keepalive-timeout", type=float, default=15.0,
                     help="abort a mesh connection that received nothing for this many "
                          "seconds (PINGs go every 5 s)")
    run.add_argument("--metrics-listen", default="0.0.0.0:9091",
                     help="host:port of /metrics, /healthz and /readyz ('' to serve none)")
    run.add_argument("--metrics-per-peer-limit", type=int, default=100,
                     help="export per-peer series only up to this many peers (cardinality)")
    run.add_argument("--wireguard-go", choices=["start", "external"], default="start",
                     help="userspace WireGuard: start wireguard-go when none answers (it ends "
                          "with this process's container), or external: only adopt the one "
                          "`vpblu daemon wireguard-go` runs on the node (the DaemonSet's way)")
    run.set_defaults(env_controllers=[a for a in env_controllers.split(",") if a.strip()])
    wgo = dsub.add_parser("wireguard-go", help="the node's wireguard-go, outliving daemon "
                                              "restarts (idles where the kernel has WireGuard)")
    wgo.add_argument("--interface", default=None, help="default: the daemon's (wg-mesh)")
    wgo.add_argument("--wireguard-backend", choices=["auto", "kernel", "userspace"],
                     default="auto")
    clean = dsub.add_parser("cleanup", help="remove everything the daemon created on this node")
    _node_resource_flags(clean)
    clean.add_argument("--remove-key", action="store_true",
                       help="also delete the node's private key file")


def _daemon_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> DaemonConfig:
    from vpblu.node.config import DaemonConfig

    if not args.node_name:
        parser.error("--node-name (or env NODE_NAME) is required")
    return DaemonConfig(
        node_name=args.node_name,
        interface=args.interface,
        state_dir=args.state_dir,
        bpf_pin_dir=args.bpf_pin_dir,
        pod_veth_glob=args.pod_veth_glob,
        underlay_interface=args.underlay_interface,
        mtu_overhead=args.mtu_overhead,
        wireguard_backend=args.wireguard_backend,
        wireguard_go=getattr(args, "wireguard_go", "start"),
        table=args.table,
        rule_priority=args.rule_priority,
        wg_socket_fwmark=args.wg_fwmark,
        wg_socket_fwmark_mask=args.wg_fwmark,
    )


def _run_daemon(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from vpblu import aioloop
    from vpblu.node.daemon import DaemonSettings, cleanup_node, run_daemon
    from vpblu.node.keys import KeyFileError
    from vpblu.node.stream import StreamSettings
    from vpblu.stream.transport import ClientTLS, set_keepalive_timeout
    from vpblu.supervisor import SupervisorEscalation

    if args.daemon_command == "wireguard-go":
        from vpblu.node.config import DEFAULT_INTERFACE
        from vpblu.node.wireguardgo import run_wireguard_go

        return run_wireguard_go(args.interface or DEFAULT_INTERFACE, args.wireguard_backend)
    config = _daemon_config(args, parser)
    if args.daemon_command == "cleanup":
        remove_key: bool = args.remove_key

        async def cleanup() -> None:
            await cleanup_node(config, remove_key=remove_key)

        trio.run(cleanup)
        return 0
    try:
        set_keepalive_timeout(args.keepalive_timeout)
    except ValueError as bad:
        parser.error(f"--keepalive-timeout: {bad}")
    controllers = tuple(args.controller or args.env_controllers)
    if not controllers:
        parser.error("--controller (or env VPBLU_CONTROLLER) is required")
    if args.token_file is None:
        parser.error("--token-file (or env VPBLU_TOKEN_FILE) is required")
    settings = DaemonSettings(
        config=config,
        stream=StreamSettings(
            addresses=controllers,
            tls=ClientTLS(args.ca, server_name=args.server_name),
            token_file=args.token_file,
        ),
        metrics_listen=args.metrics_listen or None,
        metrics_per_peer_limit=args.metrics_per_peer_limit,
    )

    async def main() -> None:
        async with aioloop.open_loop():
            # On SIGTERM (a DaemonSet rolling) the stream ends with a reason
            # and the key is wiped from memory; the kernel state stays, as
            # after any exit, for the next daemon to adopt.
            await _until_stopped(functools.partial(run_daemon, settings))

    try:
        trio.run(main)
    except KeyFileError as exc:
        # The text names the file and never the key.
        log.error("cannot start: %s", exc)
        print(f"vpblu daemon: {exc}", file=sys.stderr)
        return 2
    except SupervisorEscalation as exc:
        log.error("stopping: %s", exc)
        return 1
    return 0


def _certs_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # vpblu.certs imports the Kubernetes client (about a second of imports):
    # its defaults are filled in by _run_certs, so that no other subcommand,
    # the daemon's start above all, pays for it.
    p = sub.add_parser("certs", help="make the mesh's CA and the controller's serving "
                                     "certificate in the cluster, renew it before it expires")
    p.add_argument("--kubeconfig", type=Path, default=None,
                   help="kubeconfig file (default: in-cluster ServiceAccount)")
    p.add_argument("--namespace", default=None, help="default vpblu-system")
    p.add_argument("--service", default=None,
                   help="the controller's Service (default vpblu-controller)")
    p.add_argument("--cluster-domain", default=None, help="default cluster.local")
    p.add_argument("--renew-before", type=_duration, default=None,
                   help="renew the serving certificate when it expires within this "
                        "(30d, 12h, ...; default 30d)")
    p.add_argument("--validity", type=_duration, default=None,
                   help="lifetime of a new serving certificate (default 365d)")
    p.add_argument("--ca-validity", type=_duration, default=None,
                   help="lifetime of a new CA (default 3650d)")


def _duration(text: str) -> datetime.timedelta:
    from vpblu.certs import parse_duration

    return parse_duration(text)


def _run_certs(args: argparse.Namespace) -> int:
    from vpblu import aioloop, pki
    from vpblu import certs as c
    from vpblu.certs import CertsError, CertsSettings, ensure_certs
    from vpblu.kube.client import ApiError, ApiUnavailable, open_kube_client

    settings = CertsSettings(
        namespace=args.namespace or c.NAMESPACE, service=args.service or c.SERVICE,
        cluster_domain=args.cluster_domain or c.CLUSTER_DOMAIN,
        renew_before=args.renew_before or c.RENEW_BEFORE,
        validity=args.validity or pki.LEAF_VALIDITY,
        ca_validity=args.ca_validity or pki.CA_VALIDITY)
    if settings.renew_before >= settings.validity:
        print("vpblu certs: --renew-before must be shorter than --validity", file=sys.stderr)
        return 2
    kubeconfig: Path | None = args.kubeconfig

    async def main() -> int:
        async with aioloop.open_loop(), open_kube_client(kubeconfig) as kube:
            try:
                outcome = await ensure_certs(kube, settings)
            except (CertsError, ApiError, ApiUnavailable) as exc:
                print(f"vpblu certs: {exc}", file=sys.stderr)
                return 1
        done = "issued" if outcome.serving_issued else "kept"
        print(f"vpblu certs: {done} the serving certificate ({outcome.reason}), valid until "
              f"{outcome.not_after:%Y-%m-%d %H:%M} UTC; CA "
              f"{'created' if outcome.ca_created else 'kept'}")
        return 0

    return trio.run(main)


def _status_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("status", help="the mesh's health from the VpbluNodes' status "
                                      "(exit 0 healthy, 1 not, 2 cannot ask)")
    p.add_argument("--kubeconfig", type=Path, default=None,
                   help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster)")
    p.add_argument("--node", default=None, help="one node's conditions in full")
    p.add_argument("-o", "--output", choices=["table", "wide", "json", "yaml"],
                   default="table")
    p.add_argument("-w", "--watch", action="store_true", help="print again on every change")
    p.add_argument("--dashboard", default=None, metavar="URL",
                   help="with --node: its tunnels' handshake ages and bytes from the "
                        "controller's dashboard (e.g. https://localhost:8082 through kubectl "
                        "port-forward)")
    _dashboard_client_options(p)


def _dashboard_client_options(p: argparse.ArgumentParser) -> None:
    """How `status` and `meshtop` sign in to the dashboard named by --dashboard."""
    p.add_argument("--token-file", type=Path, default=None,
                   help="bearer token for --dashboard (e.g. from kubectl create token)")
    p.add_argument("--dashboard-ca", type=Path, default=None,
                   help="CA that signed the dashboard's certificate (the ConfigMap vpblu-ca)")
    p.add_argument("--insecure-skip-tls-verify", action="store_true",
                   help="do not check the dashboard's certificate")


def _run_status(args: argparse.Namespace) -> int:
    import trio_asyncio

    from vpblu.meshstatus import StatusOptions, TunnelSource, default_kubeconfig, run_status

    tunnels: TunnelSource | None = None
    if args.dashboard:
        if args.token_file is None:
            print("vpblu status: --dashboard needs --token-file", file=sys.stderr)
            return 2
        from vpblu.meshtop import DashboardSource

        tunnels = DashboardSource(args.dashboard, args.token_file.read_text().strip(),
                                  args.dashboard_ca, args.insecure_skip_tls_verify)
    options = StatusOptions(kubeconfig=args.kubeconfig or default_kubeconfig(),
                            output=args.output, node=args.node, watch=args.watch,
                            tunnels=tunnels)

    from vpblu import aioloop

    async def main() -> int:
        async with aioloop.open_loop():
            try:
                return await run_status(options)
            finally:
                if tunnels is not None:  # its aiohttp session, or the loop complains
                    with trio.CancelScope(shield=True):
                        await trio_asyncio.aio_as_trio(tunnels.close)()

    return trio.run(main)


def _meshtop_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("meshtop", help="the mesh live in the terminal: nodes, tunnels, "
                                       "handshakes, throughput, rotation, the leader")
    p.add_argument("--kubeconfig", type=Path, default=None,
                   help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster)")
    p.add_argument("--dashboard", default=None, metavar="URL",
                   help="read the controller's dashboard instead (tunnels included), e.g. "
                        "https://localhost:8082 through kubectl port-forward")
    _dashboard_client_options(p)
    p.add_argument("--refresh", type=float, default=2.0, help="seconds between reads")
    p.add_argument("--lease-namespace", default="vpblu-system")
    p.add_argument("--lease-name", default="vpblu-controller")


def _run_meshtop(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from vpblu.meshstatus import default_kubeconfig
    from vpblu.meshtop import ApiSource, DashboardSource, MeshSource, run_meshtop

    if args.refresh <= 0:
        parser.error("--refresh must be positive")
    source: MeshSource
    if args.dashboard:
        if args.token_file is None:
            parser.error("--dashboard needs --token-file")
        token = args.token_file.read_text().strip()
        source = DashboardSource(args.dashboard, token, args.dashboard_ca,
                                 args.insecure_skip_tls_verify)
    else:
        source = ApiSource(args.kubeconfig or default_kubeconfig(), args.lease_namespace,
                           args.lease_name)
    return run_meshtop(source, args.refresh)


def _version() -> str:
    """The installed distribution's version (the wheel's, the image's)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vpblu")
    except PackageNotFoundError:  # a checkout on sys.path without an install
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vpblu", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"vpblu {_version()}")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--log-format", choices=logformat.FORMATS,
                        default=os.environ.get("VPBLU_LOG_FORMAT", "text"),
                        help="text, or json: one object per line with node and generation "
                             "(default $VPBLU_LOG_FORMAT or text)")
    sub = parser.add_subparsers(dest="command", required=True)
    _controller_parser(sub)
    _daemon_parser(sub)
    _status_parser(sub)
    _meshtop_parser(sub)
    _certs_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logformat.configure(args.log_level, args.log_format,
                        node=getattr(args, "node_name", None) or os.environ.get("NODE_NAME"))
    try:
        if args.command == "controller":
            return _run_controller(args)
        if args.command == "daemon":
            return _run_daemon(args, parser)
        if args.command == "status":
            return _run_status(args)
        if args.command == "meshtop":
            return _run_meshtop(args, parser)
        if args.command == "certs":
            return _run_certs(args)
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
