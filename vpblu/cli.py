"""`vpblu`: the command line an operator runs (and the manifests call).

Owns argument parsing and process setup (logging, the trio-asyncio loop),
nothing else: each subcommand builds its settings value and hands it to the
module that runs it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from vpblu.actors.leader import LeaseSettings
from vpblu.actors.session import SessionSettings
from vpblu.transport import ServerTLS

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


def _run_controller(args: argparse.Namespace) -> int:
    import trio_asyncio

    from vpblu.controller import ControllerSettings, default_identity, run_controller

    users = (frozenset(args.daemon_user) if args.daemon_user
             else frozenset({"system:serviceaccount:vpblu-system:vpblu-daemon"}))
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
    )

    async def main() -> None:
        async with trio_asyncio.open_loop():
            await run_controller(settings)

    trio.run(main)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vpblu", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)
    _controller_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "controller":
            return _run_controller(args)
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
