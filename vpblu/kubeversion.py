"""The oldest Kubernetes vpblu runs on, and the check the controller makes at start.

Kubernetes 1.31, for two features (read from the k8s.io/apiserver and
k8s.io/kubernetes v1.34 sources):

- The CRDs validate CIDRs with CEL's IP and CIDR libraries (`isCIDR`,
  `cidr(...).masked()`, `prefixLength()`, `ip(...).family()`). They entered
  the API server's CEL environment in 1.30, but new expressions compile
  against the previous minor's environment (kept for rollback), so a CRD
  using them is accepted from 1.31 on; a 1.30 API server refuses
  `kubectl apply -k kustomize/base`.
- The daemons prove their node with the projected ServiceAccount token,
  whose TokenReview carries the `authentication.kubernetes.io/node-name`
  extra (feature ServiceAccountTokenPodNodeInfo: beta and on by default in
  1.30, GA in 1.32).

An older API server stops the controller at start with a message saying so;
an API server that cannot be asked is not a reason to stop (the controller
retries everything else the same way).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

MINIMUM = (1, 31)
WHY = ("its CRDs validate CIDRs with CEL's CIDR library (1.31) and daemons prove their node "
       "with the node-name claim of bound ServiceAccount tokens (1.30)")


class UnsupportedKubernetes(Exception):
    """The API server is older than MINIMUM."""


def parse_version(info: Mapping[str, Any]) -> tuple[int, int]:
    """(major, minor) from /version; managed clusters say minor "31+"."""
    try:
        major = int(re.sub(r"\D", "", str(info["major"])))
        minor = int(re.sub(r"\D", "", str(info["minor"])))
    except (KeyError, ValueError):
        match = re.match(r"v?(\d+)\.(\d+)", str(info.get("gitVersion", "")))
        if match is None:
            raise ValueError(f"no version in {dict(info)!r}") from None
        major, minor = int(match[1]), int(match[2])
    return major, minor


def check_version(info: Mapping[str, Any]) -> None:
    """Raise UnsupportedKubernetes when the API server is too old."""
    found = parse_version(info)
    if found < MINIMUM:
        name = info.get("gitVersion") or f"{found[0]}.{found[1]}"
        raise UnsupportedKubernetes(
            f"the API server runs Kubernetes {name}; vpblu needs {MINIMUM[0]}.{MINIMUM[1]} or "
            f"newer: {WHY}")


async def require_supported(api: Any) -> None:
    """Check the API server behind a `vpblu.kube.client.KubeClient` (its
    /version); log and go on if it cannot be asked."""
    from vpblu.kube.client import ApiError, ApiUnavailable

    try:
        info = await api.server_version()
        check_version(info)
    except (ApiError, ApiUnavailable, ValueError) as exc:
        log.warning("could not check the API server's version: %s", exc)
        return
    log.info("API server: Kubernetes %s (vpblu needs %d.%d or newer)",
             info.get("gitVersion"), *MINIMUM)
