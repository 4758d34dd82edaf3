"""The dashboard's TLS context: a renewed certificate is served to new
connections without a restart; a pair that does not load leaves the old one
serving. Checked with real TLS handshakes over memory BIOs."""

from __future__ import annotations

import contextlib
import ssl
from pathlib import Path

from cryptography import x509

from vpblu.dashboard.server import _ReloadingConfig
from vpblu.pki import CertAuthority


def served_serial(server: ssl.SSLContext, ca: Path) -> int:
    """Handshake a client against `server` in memory; the serial it was shown."""
    client = ssl.create_default_context(cafile=str(ca))
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side, out, peer_in in ((c, c_out, s_in), (s, s_out, c_in)):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
            peer_in.write(out.read())
    der = c.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_a_renewed_certificate_is_served_and_a_broken_one_is_not(tmp_path: Path) -> None:
    ca = CertAuthority.create("test CA")
    ca.write(tmp_path / "ca.crt")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    first = ca.issue("vpblu-controller", dns_names=("localhost",), server=True)
    first.write(cert, key)
    config = _ReloadingConfig(cert, key)
    before = served_serial(config.context, tmp_path / "ca.crt")
    assert not config.reload()  # unchanged files: nothing to do

    ca.issue("vpblu-controller", dns_names=("localhost",), server=True).write(cert, key)
    assert config.reload()
    renewed = served_serial(config.context, tmp_path / "ca.crt")
    assert renewed != before

    key.write_text("not a key")
    assert not config.reload()
    assert served_serial(config.context, tmp_path / "ca.crt") == renewed
    assert config.create_ssl_context() is config.context
