from __future__ import annotations

import base64
from typing import Any

import pytest

from vpblu.core.model import Endpoint, network
from vpblu.node.kernel.iptables import ClampRule, parse_clamp_rules
from vpblu.node.kernel.wireguard import (
    DeviceState,
    DeviceUpdate,
    PeerConfig,
    PeerUpdate,
    WireGuardError,
    diff_peers,
    kernel_peer,
    parse_get,
    parse_kernel_info,
    plan_update,
    public_key_of,
    serialize_set,
)

K1 = base64.b64encode(bytes([1]) * 32).decode()
K2 = base64.b64encode(bytes([2]) * 32).decode()
K3 = base64.b64encode(bytes([3]) * 32).decode()
PRIV = bytes(range(32))


def peer(key: str, *cidrs: str, ep: str | None = "10.0.0.2:51820", ka: int = 0) -> PeerConfig:
    return PeerConfig(key, Endpoint.parse(ep) if ep else None, cidrs, ka)


GET_RESPONSE = (
    f"private_key={PRIV.hex()}\nlisten_port=51820\nfwmark=11665408\n"
    f"public_key={bytes([1]) * 32!r}\n"
).replace(f"{bytes([1]) * 32!r}", (bytes([1]) * 32).hex()) + (
    "preshared_key=" + "00" * 32 + "\nprotocol_version=1\nendpoint=10.0.0.2:51820\n"
    "last_handshake_time_sec=0\nlast_handshake_time_nsec=0\ntx_bytes=0\nrx_bytes=0\n"
    "persistent_keepalive_interval=25\nallowed_ip=10.78.2.0/24\nallowed_ip=fd00::/64\n"
    f"public_key={(bytes([2]) * 32).hex()}\nendpoint=[fd00::2]:51821\n"
    "persistent_keepalive_interval=0\nerrno=0\n\n"
)


def test_parse_get_keeps_only_the_public_half_of_the_private_key() -> None:
    state = parse_get(GET_RESPONSE)
    assert state.public_key == public_key_of(PRIV)
    assert PRIV.hex() not in repr(state)
    assert state.listen_port == 51820 and state.fwmark == 0xB20000
    assert state.peers == (
        peer(K1, "10.78.2.0/24", "fd00::/64", ka=25),
        PeerConfig(K2, Endpoint.parse("[fd00::2]:51821"), ()),
    )


@pytest.mark.parametrize("tail", ["errno=-22\n\n", "errno=1\n\n", "\n"])
def test_any_nonzero_or_missing_errno_is_failure(tail: str) -> None:
    with pytest.raises(WireGuardError):
        parse_get("listen_port=1\n" + tail)


def test_serialize_set_adds_updates_removes_and_never_replaces_peers() -> None:
    update = DeviceUpdate(
        private_key=PRIV,
        listen_port=51820,
        fwmark=7,
        peers=(
            PeerUpdate(
                K1,
                endpoint=Endpoint.parse("10.0.0.2:51820"),
                allowed_ips=(network("10.78.2.0/24"),),
                persistent_keepalive=25,
            ),
            PeerUpdate(K2, persistent_keepalive=0),
            PeerUpdate(K3, remove=True),
        ),
    )
    assert PRIV.hex() not in repr(update)
    text = serialize_set(update).decode()
    assert "replace_peers" not in text
    assert text == (
        f"set=1\nprivate_key={PRIV.hex()}\nlisten_port=51820\nfwmark=7\n"
        f"public_key={(bytes([1]) * 32).hex()}\nendpoint=10.0.0.2:51820\n"
        "persistent_keepalive_interval=25\nreplace_allowed_ips=true\nallowed_ip=10.78.2.0/24\n"
        f"public_key={(bytes([2]) * 32).hex()}\npersistent_keepalive_interval=0\n"
        f"public_key={(bytes([3]) * 32).hex()}\nremove=true\n\n"
    )


def test_diff_of_equal_peer_sets_is_empty() -> None:
    peers = [peer(K1, "10.1.0.0/24"), peer(K2, "10.2.0.0/24")]
    assert diff_peers(peers, list(reversed(peers))) == ()
    state = DeviceState(None, 51820, 7, peers)
    assert plan_update(state, listen_port=51820, fwmark=7, peers=peers).is_empty()


def test_diff_touches_only_differing_fields_and_removes_last() -> None:
    current = [peer(K1, "10.1.0.0/24"), peer(K3, "10.3.0.0/24")]
    desired = [peer(K1, "10.1.0.0/24", "10.9.0.0/24"), peer(K2, "10.2.0.0/24", ka=25)]
    assert diff_peers(current, desired) == (
        PeerUpdate(K1, allowed_ips=(network("10.1.0.0/24"), network("10.9.0.0/24"))),
        PeerUpdate(
            K2,
            endpoint=Endpoint.parse("10.0.0.2:51820"),
            allowed_ips=(network("10.2.0.0/24"),),
            persistent_keepalive=25,
        ),
        PeerUpdate(K3, remove=True),
    )


def test_a_desired_endpoint_of_none_leaves_the_learned_one() -> None:
    assert diff_peers([peer(K1, "10.1.0.0/24")], [peer(K1, "10.1.0.0/24", ep=None)]) == ()


def test_kernel_peer_form() -> None:
    update = PeerUpdate(
        K1,
        endpoint=Endpoint.parse("[fd00::2]:1"),
        allowed_ips=(network("10.1.0.0/24"),),
        persistent_keepalive=0,
    )
    assert kernel_peer(update) == {
        "public_key": K1,
        "endpoint_addr": "fd00::2",
        "endpoint_port": 1,
        "persistent_keepalive": 0,
        "replace_allowed_ips": True,
        "allowed_ips": ["10.1.0.0/24"],
    }
    assert kernel_peer(PeerUpdate(K2, remove=True)) == {"public_key": K2, "remove": True}


class FakeNla(dict[str, Any]):
    def __init__(self, attrs: dict[str, Any], **fields: Any) -> None:
        super().__init__(fields)
        self.attrs = attrs

    def get_attr(self, name: str) -> Any:
        return self.attrs.get(name)


def test_parse_kernel_info_merges_a_peer_split_over_messages() -> None:
    def p(*cidrs: str) -> FakeNla:
        return FakeNla(
            {
                "WGPEER_A_PUBLIC_KEY": FakeNla({}, value=K1.encode()),
                "WGPEER_A_ENDPOINT": {"addr": "10.0.0.2", "port": 51820},
                "WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL": 25,
                "WGPEER_A_ALLOWEDIPS": [FakeNla({}, addr=c) for c in cidrs],
            }
        )

    first = FakeNla(
        {
            "WGDEVICE_A_PRIVATE_KEY": FakeNla({}, value=base64.b64encode(PRIV)),
            "WGDEVICE_A_LISTEN_PORT": 51820,
            "WGDEVICE_A_FWMARK": 7,
            "WGDEVICE_A_PEERS": [p("10.1.0.0/24")],
        }
    )
    second = FakeNla({"WGDEVICE_A_PEERS": [p("10.9.0.0/24")]})
    state = parse_kernel_info([first, second])
    assert state == DeviceState(
        public_key_of(PRIV), 51820, 7, [peer(K1, "10.1.0.0/24", "10.9.0.0/24", ka=25)]
    )


def test_parse_clamp_rules_finds_only_ours() -> None:
    saved = (
        "-P FORWARD ACCEPT\n"
        "-A FORWARD -o wg-mesh -p tcp -m tcp --tcp-flags SYN,RST SYN -m comment --comment vpblu "
        "-j TCPMSS --set-mss 1380\n"
        "-A FORWARD -o eth0 -p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --set-mss 1000\n"
    )
    rules = parse_clamp_rules(saved)
    assert [r for r, _ in rules] == [ClampRule("-o", "wg-mesh", 1380)]
