"""X.509 for the mesh's gRPC TLS: a CA, the certificates it issues, and what a
certificate says about itself.

Owns certificate and key generation (EC P-256, via `cryptography`), loading a
CA back from PEM, and writing keys to disk with the right modes. Private keys
are written 0600 and never logged or printed (the reprs redact them).
`vpblu certs` (vpblu/certs.py) keeps the cluster's CA and the controller's
serving certificate with it; the test harness makes throwaway authorities with
it (vpblu/lab/pki.py).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_VALIDITY = datetime.timedelta(days=3650)
LEAF_VALIDITY = datetime.timedelta(days=365)
CLOCK_SKEW = datetime.timedelta(minutes=5)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_private(path: Path, data: bytes) -> None:
    """Create `path` 0600 from the start (no window where it is world-readable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@attrs.frozen(slots=True, repr=False)
class IssuedCert:
    cert_pem: bytes
    key_pem: bytes

    def __repr__(self) -> str:  # never print a private key
        return "IssuedCert(<redacted>)"

    def write(self, cert_path: Path, key_path: Path) -> None:
        cert_path.write_bytes(self.cert_pem)
        write_private(key_path, self.key_pem)


@attrs.frozen(slots=True, repr=False)
class CertAuthority:
    """A self-signed CA that issues leaf certificates."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def __repr__(self) -> str:
        return f"CertAuthority({self.cert.subject.rfc4514_string()})"

    @classmethod
    def create(cls, common_name: str, *,
               validity: datetime.timedelta = CA_VALIDITY) -> CertAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, cert_pem: bytes, key_pem: bytes) -> CertAuthority:
        """A CA back from PEM; ValueError when the key is not the certificate's
        or the certificate is no CA."""
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the CA key is not an EC key")
        public = cert.public_key()
        if (not isinstance(public, ec.EllipticCurvePublicKey)
                or key.public_key().public_numbers() != public.public_numbers()):
            raise ValueError("the CA key does not belong to the CA certificate")
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            raise ValueError("the CA certificate has no basicConstraints") from None
        if not constraints.ca:
            raise ValueError("the CA certificate is not a CA")
        return cls(cert, key)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self.key)

    def issue(
        self,
        common_name: str,
        *,
        organizations: tuple[str, ...] = (),
        dns_names: tuple[str, ...] = (),
        ip_addresses: tuple[str, ...] = (),
        server: bool = False,
        client: bool = False,
        validity: datetime.timedelta = LEAF_VALIDITY,
    ) -> IssuedCert:
        key = ec.generate_private_key(ec.SECP256R1())
        attrs_ = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
        attrs_.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        now = _now()
        # Never valid past the CA: a leaf outliving its issuer fails anyway.
        not_after = min(now + validity, self.cert.not_valid_after_utc)
        usages = []
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs_))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False)
        )
        if usages:
            builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return IssuedCert(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))

    def write(self, cert_path: Path, key_path: Path | None = None) -> None:
        cert_path.write_bytes(self.cert_pem)
        if key_path is not None:
            write_private(key_path, self.key_pem)


@attrs.frozen(slots=True)
class CertInfo:
    """What a certificate says about itself, for deciding whether to renew it."""

    not_after: datetime.datetime
    dns_names: frozenset[str]
    ip_addresses: frozenset[str]
    issuer_key_id: bytes | None

    @classmethod
    def read(cls, cert_pem: bytes) -> CertInfo:
        cert = x509.load_pem_x509_certificate(cert_pem)
        try:
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            dns = frozenset(sans.get_values_for_type(x509.DNSName))
            ips = frozenset(str(ip) for ip in sans.get_values_for_type(x509.IPAddress))
        except x509.ExtensionNotFound:
            dns, ips = frozenset(), frozenset()
        try:
            aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
            issuer_key_id = aki.key_identifier
        except x509.ExtensionNotFound:
            issuer_key_id = None
        return cls(cert.not_valid_after_utc, dns, ips, issuer_key_id)

    def covers(self, dns_names: Iterable[str], ip_addresses: Iterable[str] = ()) -> bool:
        return set(dns_names) <= self.dns_names and set(ip_addresses) <= self.ip_addresses


def signed_by(cert_pem: bytes, ca: x509.Certificate) -> bool:
    """Whether `ca` signed this certificate (its signature verifies)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    if cert.issuer != ca.subject:
        return False
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
