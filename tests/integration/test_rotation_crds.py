"""What the CRDs say about key rotation, against a real kube-apiserver (issue 24):
a TunnelPolicy's listenPort leaves room for the rotation bridge (listenPort + 1),
so 65535 is refused with the reason, and 65534 is the highest accepted."""

from __future__ import annotations

import pytest

from tests.integration.test_crds import create, path
from vpblu.lab.testenv import TestEnv
from vpblu.node.rotation import BRIDGE_PORT_OFFSET, MAX_UDP_PORT, BridgeLayout, RotationError

pytestmark = pytest.mark.integration


def test_listen_port_65535_is_refused_because_the_bridge_needs_the_next_port(
        vpblu_installed: TestEnv) -> None:
    env = vpblu_installed
    refused = create(env, "TunnelPolicy", "port-65535", {"listenPort": MAX_UDP_PORT})
    if refused.status == 201:  # never leave it behind
        env.request("DELETE", path("TunnelPolicy", "port-65535"))
    assert refused.status == 422, (refused.status, refused.body)
    assert "spec.listenPort" in refused.message, refused.message
    assert "listenPort + 1" in refused.message, refused.message
    highest = MAX_UDP_PORT - BRIDGE_PORT_OFFSET
    accepted = create(env, "TunnelPolicy", "port-65534", {"listenPort": highest})
    try:
        assert accepted.status == 201, (accepted.status, accepted.body)
    finally:
        env.request("DELETE", path("TunnelPolicy", "port-65534"))
    # What the API server cannot refuse any more (an object stored before the rule)
    # the daemon refuses at Prepare, by name, and the rotation rolls back.
    assert BridgeLayout.for_primary("wg-mesh", highest, 5182, 0x80).bridge_port == MAX_UDP_PORT
    with pytest.raises(RotationError, match="leaves no port for the rotation bridge"):
        BridgeLayout.for_primary("wg-mesh", MAX_UDP_PORT, 5182, 0x80)
