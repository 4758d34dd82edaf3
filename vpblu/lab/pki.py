"""Throwaway X.509 authorities for the test API server and the mesh's gRPC TLS.

The product's `vpblu.pki` (the CA and the certificates `vpblu certs` keeps on
a real cluster); the harness makes a new CA per run with it and never keeps
one. Private keys are written 0600 and never logged.
"""

from __future__ import annotations

from vpblu.pki import CertAuthority, IssuedCert, write_private

__all__ = ["CertAuthority", "IssuedCert", "write_private"]
