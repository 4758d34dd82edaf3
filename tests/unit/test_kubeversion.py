"""The minimum Kubernetes version and how /version is read (vpblu/kubeversion.py)."""

from __future__ import annotations

from typing import Any

import pytest

from vpblu.kube.client import ApiUnavailable
from vpblu.kubeversion import (
    MINIMUM,
    UnsupportedKubernetes,
    check_version,
    parse_version,
    require_supported,
)


@pytest.mark.parametrize(("info", "want"), [
    ({"major": "1", "minor": "34", "gitVersion": "v1.34.4"}, (1, 34)),
    ({"major": "1", "minor": "31+", "gitVersion": "v1.31.2-eks-7f9249a"}, (1, 31)),
    ({"major": "", "minor": "", "gitVersion": "v1.32.0-gke.1"}, (1, 32)),
])
def test_parse_version(info: dict[str, str], want: tuple[int, int]) -> None:
    assert parse_version(info) == want


def test_the_minimum_is_1_31_and_older_is_refused_with_the_reason() -> None:
    assert MINIMUM == (1, 31)
    check_version({"major": "1", "minor": "31", "gitVersion": "v1.31.0"})
    with pytest.raises(UnsupportedKubernetes,
                       match=r"v1\.30\.5; vpblu needs 1\.31 or newer: .*CIDR"):
        check_version({"major": "1", "minor": "30", "gitVersion": "v1.30.5"})


class FakeApi:
    def __init__(self, answer: Any) -> None:
        self.answer = answer

    async def server_version(self) -> Any:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


async def test_an_old_server_stops_the_controller_an_unreachable_one_does_not() -> None:
    with pytest.raises(UnsupportedKubernetes):
        await require_supported(FakeApi({"major": "1", "minor": "29"}))
    await require_supported(FakeApi({"major": "1", "minor": "33"}))
    await require_supported(FakeApi(ApiUnavailable("connection refused")))
    await require_supported(FakeApi({"weird": True}))
