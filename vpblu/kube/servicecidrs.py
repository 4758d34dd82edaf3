"""The cluster's Service ranges, read from the API server when not given.

The controller refuses a RoutePolicy route over a Service range (Service
addresses are translated to pods before routing, so such a route only hides
where Service traffic goes). An operator may name the ranges with
`--service-cidr`; otherwise they come from the ServiceCIDR objects
(networking.k8s.io/v1, served from Kubernetes 1.33; the API server keeps one
named `kubernetes` for its --service-cluster-ip-range). Read once at start:
Service ranges are fixed for a cluster's life, or changed by an operator who
restarts things anyway.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from typing import Any

from vpblu.core.model import IPNetwork, collapse
from vpblu.kube.client import SERVICE_CIDRS, ApiError, ApiUnavailable

log = logging.getLogger(__name__)


async def service_cidrs(api: Any, given: Sequence[IPNetwork] = ()) -> tuple[IPNetwork, ...]:
    """`given` when an operator named the ranges; else every ServiceCIDR's
    ranges, or none (logged) when the API server has no ServiceCIDR API or
    cannot be asked."""
    if given:
        return tuple(given)
    try:
        listed = await api.list(SERVICE_CIDRS)
    except (ApiError, ApiUnavailable) as exc:
        log.warning("the Service ranges are unknown (no --service-cidr, and ServiceCIDRs "
                    "could not be listed: %s): RoutePolicy routes over them are not refused",
                    exc)
        return ()
    found: list[IPNetwork] = []
    for item in listed.items:
        name = item.get("metadata", {}).get("name", "?")
        for text in item.get("spec", {}).get("cidrs", ()) or ():
            try:
                found.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                log.warning("ServiceCIDR %s: %r is no CIDR; ignored", name, text)
    ranges = collapse(found)
    log.info("Service ranges from ServiceCIDRs: %s",
             ", ".join(map(str, ranges)) or "none")
    return ranges
