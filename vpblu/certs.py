"""`vpblu certs`: the mesh's TLS, made and renewed in the cluster, no hand work.

Owns three objects in the controller's namespace (vpblu-system):

- Secret `vpblu-ca-key` (kubernetes.io/tls): the CA's certificate and key.
  Only the certs Job's ServiceAccount can read it (kustomize/base/certs.yaml);
  neither the controller nor the daemons ever see it.
- ConfigMap `vpblu-ca` (`ca.crt`): the CA certificate the daemons trust.
- Secret `vpblu-controller-tls` (kubernetes.io/tls: `tls.crt`, `tls.key`,
  `ca.crt`): the controller's serving certificate.

Each run makes what is missing and renews the serving certificate when it is
missing, not signed by the current CA, does not name every Service name, or
expires within `--renew-before`; otherwise it changes nothing (the install's
Job runs it once, a daily CronJob with `--renew-before 30d` keeps it fresh).
The controller reloads its certificate files when kubelet updates the
mounted Secret (vpblu/stream/transport.py), so a renewal needs no restart.

Which names the certificate carries. Daemons dial the Service
(`vpblu-controller.vpblu-system.svc:7443`), and a follower redirects them to
the leader's pod IP, which nobody knows before the pod exists and which
changes with every reschedule. The daemons therefore check the certificate
against the Service name whatever address they dialled (`--server-name`,
the DaemonSet sets it; grpclib's `ssl_target_name_override`), so the
certificate names the Service only - its short, namespaced and cluster
forms - and stays valid across pod restarts. The CA is kept for ten years
and is not rotated by this command; rotating it means a new `vpblu-ca-key`
(delete it, run `vpblu certs`, restart the daemons).

Nothing here logs, prints or returns a private key.
"""

from __future__ import annotations

import base64
import datetime
import logging
from collections.abc import Mapping
from typing import Any, Protocol

import attrs

from vpblu.kube.client import Conflict, NotFound, ResourceKind
from vpblu.pki import CA_VALIDITY, LEAF_VALIDITY, CertAuthority, CertInfo, signed_by

log = logging.getLogger(__name__)

NAMESPACE = "vpblu-system"
SERVICE = "vpblu-controller"
CA_SECRET = "vpblu-ca-key"
CA_CONFIGMAP = "vpblu-ca"
SERVING_SECRET = "vpblu-controller-tls"
CLUSTER_DOMAIN = "cluster.local"
RENEW_BEFORE = datetime.timedelta(days=30)
MANAGED_BY = {"app.kubernetes.io/part-of": "vpblu", "app.kubernetes.io/managed-by": "vpblu-certs"}

CONFIGMAPS = ResourceKind("ConfigMap", "", "v1", "configmaps", namespaced=True)
SECRETS = ResourceKind("Secret", "", "v1", "secrets", namespaced=True)

RawObject = dict[str, Any]


class ObjectApi(Protocol):
    """The calls this needs from `vpblu.kube.client.KubeClient`."""

    async def get(self, kind: ResourceKind, name: str, *,
                  namespace: str | None = None) -> RawObject: ...

    async def create(self, kind: ResourceKind, body: RawObject, *,
                     namespace: str | None = None) -> RawObject: ...

    async def replace(self, kind: ResourceKind, name: str, body: RawObject, *,
                      namespace: str | None = None) -> RawObject: ...


class CertsError(Exception):
    """What is in the cluster cannot be used (a damaged CA Secret, say); the
    message says which object and why, never a key."""


@attrs.frozen(slots=True)
class CertsSettings:
    namespace: str = NAMESPACE
    service: str = SERVICE
    cluster_domain: str = CLUSTER_DOMAIN
    renew_before: datetime.timedelta = RENEW_BEFORE
    validity: datetime.timedelta = LEAF_VALIDITY
    ca_validity: datetime.timedelta = CA_VALIDITY

    @property
    def dns_names(self) -> tuple[str, ...]:
        s, ns = self.service, self.namespace
        return (s, f"{s}.{ns}", f"{s}.{ns}.svc", f"{s}.{ns}.svc.{self.cluster_domain}")


@attrs.frozen(slots=True)
class CertsOutcome:
    ca_created: bool
    ca_published: bool
    serving_issued: bool
    reason: str  # why the serving certificate was (re)issued, or why not
    not_after: datetime.datetime


def parse_duration(text: str) -> datetime.timedelta:
    """`30d`, `12h`, `90m`, `45s` (one unit), for --renew-before and --validity."""
    units = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}
    value, unit = text[:-1], text[-1:]
    if unit not in units or not value.isdigit() or int(value) <= 0:
        raise ValueError(f"not a duration: {text!r} (say 30d, 12h, 90m or 45s)")
    return datetime.timedelta(**{units[unit]: int(value)})


def renewal_reason(cert_pem: bytes | None, ca: CertAuthority, dns_names: tuple[str, ...],
                   renew_before: datetime.timedelta, now: datetime.datetime) -> str | None:
    """Why the serving certificate must be issued anew, or None if it is fine."""
    if cert_pem is None:
        return "there is none"
    try:
        info = CertInfo.read(cert_pem)
    except ValueError:
        return "it is not a PEM certificate"
    if not signed_by(cert_pem, ca.cert):
        return "it is not signed by the current CA"
    if not info.covers(dns_names):
        missing = sorted(set(dns_names) - info.dns_names)
        return f"it does not name {', '.join(missing)}"
    if info.not_after - now <= renew_before:
        return f"it expires at {info.not_after:%Y-%m-%d %H:%M} UTC, within {renew_before}"
    return None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _data(obj: Mapping[str, Any], key: str) -> bytes | None:
    value = (obj.get("data") or {}).get(key)
    return base64.b64decode(value) if value else None


def _meta(name: str, namespace: str) -> RawObject:
    return {"name": name, "namespace": namespace, "labels": dict(MANAGED_BY)}


def _tls_secret(name: str, namespace: str, cert: bytes, key: bytes,
                ca: bytes | None = None) -> RawObject:
    data = {"tls.crt": _b64(cert), "tls.key": _b64(key)}
    if ca is not None:
        data["ca.crt"] = _b64(ca)
    return {"apiVersion": "v1", "kind": "Secret", "metadata": _meta(name, namespace),
            "type": "kubernetes.io/tls", "data": data}


async def _get(api: ObjectApi, kind: ResourceKind, name: str,
               namespace: str) -> RawObject | None:
    try:
        return await api.get(kind, name, namespace=namespace)
    except NotFound:
        return None


async def _put(api: ObjectApi, kind: ResourceKind, body: RawObject,
               existing: RawObject | None) -> None:
    """Create, or replace onto the version read (a concurrent writer makes
    this fail with Conflict rather than be overwritten)."""
    meta = body["metadata"]
    if existing is None:
        await api.create(kind, body, namespace=meta["namespace"])
        return
    meta["resourceVersion"] = existing["metadata"]["resourceVersion"]
    # Labels and annotations someone else added stay.
    meta["labels"] = {**(existing["metadata"].get("labels") or {}), **meta["labels"]}
    if existing["metadata"].get("annotations"):
        meta["annotations"] = existing["metadata"]["annotations"]
    await api.replace(kind, meta["name"], body, namespace=meta["namespace"])


async def _ensure_ca(api: ObjectApi, settings: CertsSettings) -> tuple[CertAuthority, bool]:
    ns = settings.namespace
    secret = await _get(api, SECRETS, CA_SECRET, ns)
    if secret is None:
        ca = CertAuthority.create(f"vpblu mesh CA ({ns})", validity=settings.ca_validity)
        try:
            await api.create(SECRETS, _tls_secret(CA_SECRET, ns, ca.cert_pem, ca.key_pem),
                             namespace=ns)
        except Conflict:
            # Another run (the install's Job and the CronJob) made it first: use theirs.
            secret = await api.get(SECRETS, CA_SECRET, namespace=ns)
        else:
            log.info("created the CA in Secret %s/%s", ns, CA_SECRET)
            return ca, True
    cert, key = _data(secret, "tls.crt"), _data(secret, "tls.key")
    if cert is None or key is None:
        raise CertsError(f"Secret {ns}/{CA_SECRET} lacks tls.crt or tls.key")
    try:
        return CertAuthority.load(cert, key), False
    except ValueError as exc:
        raise CertsError(f"Secret {ns}/{CA_SECRET}: {exc}") from None


async def _publish_ca(api: ObjectApi, settings: CertsSettings, ca: CertAuthority) -> bool:
    ns = settings.namespace
    existing = await _get(api, CONFIGMAPS, CA_CONFIGMAP, ns)
    want = ca.cert_pem.decode()
    if existing is not None and (existing.get("data") or {}).get("ca.crt") == want:
        return False
    body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(CA_CONFIGMAP, ns),
            "data": {"ca.crt": want}}
    await _put(api, CONFIGMAPS, body, existing)
    log.info("published the CA certificate in ConfigMap %s/%s", ns, CA_CONFIGMAP)
    return True


async def ensure_certs(api: ObjectApi, settings: CertsSettings,
                       now: datetime.datetime | None = None) -> CertsOutcome:
    """Make or renew what is needed (see the module's docstring); idempotent."""
    now = now or datetime.datetime.now(datetime.UTC)
    ns = settings.namespace
    ca, ca_created = await _ensure_ca(api, settings)
    published = await _publish_ca(api, settings, ca)
    existing = await _get(api, SECRETS, SERVING_SECRET, ns)
    current = _data(existing, "tls.crt") if existing is not None else None
    reason = renewal_reason(current, ca, settings.dns_names, settings.renew_before, now)
    if reason is None:
        assert current is not None
        not_after = CertInfo.read(current).not_after
        log.info("Secret %s/%s is valid until %s: nothing to do", ns, SERVING_SECRET, not_after)
        return CertsOutcome(ca_created, published, False, "valid", not_after)
    issued = ca.issue(settings.dns_names[2], dns_names=settings.dns_names, server=True,
                      validity=settings.validity)
    await _put(api, SECRETS, _tls_secret(SERVING_SECRET, ns, issued.cert_pem, issued.key_pem,
                                         ca.cert_pem), existing)
    not_after = CertInfo.read(issued.cert_pem).not_after
    log.info("issued the controller's certificate into Secret %s/%s (valid until %s): %s",
             ns, SERVING_SECRET, not_after, reason)
    return CertsOutcome(ca_created, published, True, reason, not_after)
