"""The Mesh server presents its certificate files' current content: a renewal
(`vpblu certs`, cert-manager; kubelet swaps the mounted Secret's files) is
served to new connections without a restart, and a pair that does not load
leaves the certificate in use in place."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import trio
import trio_asyncio
from cryptography import x509
from cryptography.x509.oid import NameOID

from tests.integration.test_transport import FakeAuthenticator
from vpblu.pki import CertAuthority
from vpblu.stream.transport import MeshServer, NodeStream, ServerTLS

INTERVAL = 0.1


def _presented(port: int, ca: Path) -> str:
    """The common name of the certificate a new TLS connection is shown."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


async def test_a_renewed_certificate_is_served_without_a_restart(tmp_path: Path) -> None:
    ca = CertAuthority.create("mesh CA")
    ca.write(tmp_path / "ca.crt")
    tls = ServerTLS(tmp_path / "tls.crt", tmp_path / "tls.key")
    ca.issue("first", server=True).write(tls.cert, tls.key)
    async with trio_asyncio.open_loop():
        send, receive = trio.open_memory_channel[NodeStream](0)
        server = MeshServer(host="127.0.0.1", port=0, tls=tls, authenticator=FakeAuthenticator(),
                            new_streams=send, cert_reload_interval=INTERVAL)
        async with trio.open_nursery() as nursery, send, receive:
            await nursery.start(server.run)

            async def presented() -> str:
                return await trio.to_thread.run_sync(_presented, server.port, tmp_path / "ca.crt")

            assert await presented() == "first"
            second = ca.issue("second", server=True)
            second.write(tls.cert, tls.key)
            # Polled: what a handshake presents has no event to wait on.
            for _ in range(50):
                if await presented() == "second":
                    break
                await trio.sleep(INTERVAL)
            assert await presented() == "second"

            # A certificate with another certificate's key: refused, the one
            # in use stays and connections keep working.
            tls.cert.write_bytes(ca.issue("third", server=True).cert_pem)
            await trio.sleep(INTERVAL * 5)
            assert await presented() == "second"
            nursery.cancel_scope.cancel()
