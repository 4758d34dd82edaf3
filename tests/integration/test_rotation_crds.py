"""What the CRDs say about key rotation, against a real kube-apiserver (issue 24):
a TunnelPolicy's listenPort leaves room for the rotation bridge (listenPort + 1),
so 65535 is refused with the reason, and 65534 is the highest accepted; a
RotationPolicy's maxConcurrent is 1..16 with a default, and the controller reads it."""

from __future__ import annotations

import pytest

from tests.integration.test_crds import create, path
from vpblu.core.model import DEFAULT_MAX_CONCURRENT, MAX_CONCURRENT, RotationPolicy
from vpblu.kube.resources import parse_rotation_policy
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


def test_max_concurrent_is_1_to_16_and_defaults_to_the_measured_value(
        vpblu_installed: TestEnv) -> None:
    env = vpblu_installed
    for bad in (0, MAX_CONCURRENT + 1):
        refused = create(env, "RotationPolicy", f"concurrent-{bad}",
                         {"schedule": "0 3 * * 0", "maxConcurrent": bad})
        if refused.status == 201:
            env.request("DELETE", path("RotationPolicy", f"concurrent-{bad}"))
        assert refused.status == 422, (bad, refused.status, refused.body)
        assert "spec.maxConcurrent" in refused.message, refused.message
    for name, spec in (("concurrent-default", {"schedule": "0 3 * * 0"}),
                       ("concurrent-16", {"schedule": "0 3 * * 0",
                                          "maxConcurrent": MAX_CONCURRENT})):
        accepted = create(env, "RotationPolicy", name, spec)
        try:
            assert accepted.status == 201, (accepted.status, accepted.body)
            stored = env.request("GET", path("RotationPolicy", name)).body
            policy = parse_rotation_policy(stored).policy
            assert isinstance(policy, RotationPolicy)
            assert policy.max_concurrent == spec.get("maxConcurrent", DEFAULT_MAX_CONCURRENT)
            assert stored["spec"]["maxConcurrent"] == policy.max_concurrent
        finally:
            env.request("DELETE", path("RotationPolicy", name))
    # Slot k's bridge is on listenPort + k: the ports to open are listenPort ..
    # listenPort + maxConcurrent, and a slot beyond 65535 is refused by the daemon.
    layout = BridgeLayout.for_primary("wg-mesh", 51820, 5182, 0x80, slot=MAX_CONCURRENT)
    assert (layout.bridge, layout.bridge_port) == ("wg-mesh-rot16", 51820 + MAX_CONCURRENT)
    assert BridgeLayout.for_primary("wg-mesh", 51820, 5182, 0x80, slot=1).bridge == "wg-mesh-rot"
    with pytest.raises(RotationError, match="leaves no port for the rotation bridge of slot 2"):
        BridgeLayout.for_primary("wg-mesh", MAX_UDP_PORT - 1, 5182, 0x80, slot=2)
