"""`vpblu certs` against the real API server: it makes the CA, publishes its
certificate, issues the controller's serving certificate, changes nothing
when nothing is due, renews before expiry with the same CA, repairs what was
deleted, and refuses a damaged CA. The certificate it issues is accepted by a
daemon that dials an address the certificate does not name (a follower's
redirect to a pod IP) and checks the Service name instead."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from tests.integration.meshlab import unique
from vpblu.cli import main
from vpblu.lab.testenv import TestEnv
from vpblu.pki import CertInfo, signed_by
from vpblu.stream.transport import ClientTLS, client_ssl_context

pytestmark = pytest.mark.integration

CERTS_YAML = Path(__file__).resolve().parents[2] / "kustomize" / "base" / "certs.yaml"


@pytest.fixture
def namespace(kube: TestEnv) -> Iterator[str]:
    name = unique("certs")
    kube.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        kube.kubectl("delete", "namespace", name, "--wait=false")


def _certs(kube: TestEnv, namespace: str, *args: str) -> int:
    return main(["certs", "--kubeconfig", str(kube.kubeconfig_path), "--namespace", namespace,
                 *args])


def _get(kube: TestEnv, namespace: str, kind: str, name: str) -> dict[str, Any]:
    out = kube.kubectl("get", "-n", namespace, kind, name, "-o", "json").stdout
    return json.loads(out)  # type: ignore[no-any-return]


def _secret(kube: TestEnv, namespace: str, name: str) -> dict[str, bytes]:
    obj = _get(kube, namespace, "secret", name)
    return {k: base64.b64decode(v) for k, v in obj["data"].items()}


def _serial(pem: bytes) -> int:
    return x509.load_pem_x509_certificate(pem).serial_number


def _handshake(cert: bytes, key: bytes, ca: bytes, server_name: str, tmp: Path) -> None:
    """A TLS server on 127.0.0.1 with the serving certificate; the daemon's
    client context (vpblu.stream.transport) dials 127.0.0.1 and checks
    `server_name`. Raises ssl.SSLError when the certificate does not verify."""
    (tmp / "tls.crt").write_bytes(cert)
    (tmp / "tls.key").write_bytes(key)
    (tmp / "ca.crt").write_bytes(ca)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp / "tls.crt", tmp / "tls.key")
    client_ctx = client_ssl_context(ClientTLS(tmp / "ca.crt", server_name=server_name))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            with conn, contextlib.suppress(ssl.SSLError, OSError), \
                    server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                    client_ctx.wrap_socket(raw, server_hostname=server_name) as tls:
                tls.sendall(b"x")
        finally:
            server.join(timeout=10)


def test_certs_makes_the_ca_and_a_serving_certificate_daemons_accept(
        kube: TestEnv, namespace: str, tmp_path: Path) -> None:
    assert _certs(kube, namespace) == 0

    ca_key = _secret(kube, namespace, "vpblu-ca-key")
    ca_pem = ca_key["tls.crt"]
    assert _get(kube, namespace, "configmap", "vpblu-ca")["data"]["ca.crt"] == ca_pem.decode()
    serving_obj = _get(kube, namespace, "secret", "vpblu-controller-tls")
    assert serving_obj["type"] == "kubernetes.io/tls"
    serving = _secret(kube, namespace, "vpblu-controller-tls")
    assert serving["ca.crt"] == ca_pem
    assert signed_by(serving["tls.crt"], x509.load_pem_x509_certificate(ca_pem))
    info = CertInfo.read(serving["tls.crt"])
    svc = f"vpblu-controller.{namespace}.svc"
    assert info.dns_names == {"vpblu-controller", f"vpblu-controller.{namespace}", svc,
                              f"{svc}.cluster.local"}
    assert not info.ip_addresses

    # A daemon redirected to a pod IP dials an address the certificate does
    # not name, and checks the Service name: accepted. Checking the address
    # itself would fail - which is why the DaemonSet passes --server-name.
    _handshake(serving["tls.crt"], serving["tls.key"], ca_pem, svc, tmp_path)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(serving["tls.crt"], serving["tls.key"], ca_pem, "127.0.0.1", tmp_path)


def test_certs_changes_nothing_until_renewal_is_due_then_renews_with_the_same_ca(
        kube: TestEnv, namespace: str) -> None:
    assert _certs(kube, namespace) == 0
    first = _get(kube, namespace, "secret", "vpblu-controller-tls")
    ca_before = _secret(kube, namespace, "vpblu-ca-key")["tls.crt"]

    assert _certs(kube, namespace, "--renew-before", "30d") == 0
    again = _get(kube, namespace, "secret", "vpblu-controller-tls")
    assert again["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]

    # 365 days left is within a 400-day window: renewed, by the same CA.
    assert _certs(kube, namespace, "--renew-before", "400d", "--validity", "500d") == 0
    renewed = _secret(kube, namespace, "vpblu-controller-tls")
    assert _serial(renewed["tls.crt"]) != _serial(base64.b64decode(first["data"]["tls.crt"]))
    assert _secret(kube, namespace, "vpblu-ca-key")["tls.crt"] == ca_before
    assert renewed["ca.crt"] == ca_before


def test_certs_repairs_a_deleted_configmap_and_refuses_a_damaged_ca(
        kube: TestEnv, namespace: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert _certs(kube, namespace) == 0
    serving_rv = _get(kube, namespace, "secret", "vpblu-controller-tls")["metadata"][
        "resourceVersion"]
    kube.kubectl("delete", "-n", namespace, "configmap", "vpblu-ca")
    assert _certs(kube, namespace) == 0
    ca_pem = _secret(kube, namespace, "vpblu-ca-key")["tls.crt"].decode()
    assert _get(kube, namespace, "configmap", "vpblu-ca")["data"]["ca.crt"] == ca_pem
    assert _get(kube, namespace, "secret", "vpblu-controller-tls")["metadata"][
        "resourceVersion"] == serving_rv

    kube.kubectl("patch", "-n", namespace, "secret", "vpblu-ca-key", "--type=merge", "-p",
                 json.dumps({"data": {"tls.key": base64.b64encode(b"not a key").decode()}}))
    capsys.readouterr()
    assert _certs(kube, namespace) == 1
    err = capsys.readouterr().err
    assert f"Secret {namespace}/vpblu-ca-key" in err
    assert "not a key" not in err


def test_the_certs_jobs_rbac_is_enough_and_no_more(
        kube: TestEnv, namespace: str, tmp_path: Path) -> None:
    """As the Job runs it: the ServiceAccount, Role and RoleBinding of
    kustomize/base/certs.yaml (moved to the test's namespace), the command
    with that ServiceAccount's token; first run, a renewal, and nothing else
    readable."""
    docs = [d for d in yaml.safe_load_all(CERTS_YAML.read_text())
            if d and d["kind"] in {"ServiceAccount", "Role", "RoleBinding"}]
    assert len(docs) == 3
    for doc in docs:
        doc["metadata"]["namespace"] = namespace
        for subject in doc.get("subjects", []):
            subject["namespace"] = namespace
    kube.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    token = kube.create_token("vpblu-certs", namespace)
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "job",
        "clusters": [{"name": "c", "cluster": {
            "server": kube.server_url,
            "certificate-authority-data": base64.b64encode(kube.ca_pem).decode()}}],
        "users": [{"name": "job", "user": {"token": token}}],
        "contexts": [{"name": "job", "context": {"cluster": "c", "user": "job"}}],
    }
    kubeconfig = tmp_path / "job.kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))

    def as_job(*args: str) -> int:
        return main(["certs", "--kubeconfig", str(kubeconfig), "--namespace", namespace, *args])

    assert as_job() == 0
    assert as_job("--renew-before", "400d", "--validity", "500d") == 0  # updates all it made
    assert _secret(kube, namespace, "vpblu-controller-tls")["tls.crt"]
    user = f"system:serviceaccount:{namespace}:vpblu-certs"
    can_i = kube.kubectl("auth", "can-i", "get", "secret/someone-elses", "-n", namespace,
                         "--as", user, check=False)
    assert can_i.stdout.strip() == "no"
    can_list = kube.kubectl("auth", "can-i", "list", "secrets", "-n", namespace, "--as", user,
                            check=False)
    assert can_list.stdout.strip() == "no"
