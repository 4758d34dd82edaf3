"""The controller's command line: flags that are policy limits, parsed strictly."""

from __future__ import annotations

import ipaddress

import pytest

from vpblu.cli import build_parser

BASE = ["controller", "--advertise=10.0.0.1:7443", "--tls-cert=c", "--tls-key=k"]


def test_service_cidrs_are_repeatable_one_per_family() -> None:
    args = build_parser().parse_args(
        [*BASE, "--service-cidr=10.96.0.0/12", "--service-cidr=fd00:10:96::/108"])
    assert args.service_cidr == [ipaddress.ip_network("10.96.0.0/12"),
                                 ipaddress.ip_network("fd00:10:96::/108")]
    assert build_parser().parse_args(BASE).service_cidr == []


def test_a_service_cidr_with_host_bits_is_refused_by_name(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args([*BASE, "--service-cidr=10.96.0.1/12"])
    assert "--service-cidr" in capsys.readouterr().err


def test_cluster_cidrs_are_repeatable_and_never_a_default_route(
        capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(
        [*BASE, "--cluster-cidr=10.244.0.0/16", "--cluster-cidr=fd00:10:244::/56"])
    assert args.cluster_cidr == [ipaddress.ip_network("10.244.0.0/16"),
                                 ipaddress.ip_network("fd00:10:244::/56")]
    assert build_parser().parse_args(BASE).cluster_cidr == []
    for bad, why in (("0.0.0.0/0", "default route"), ("10.244.1.7/16", "host bits")):
        with pytest.raises(SystemExit):
            build_parser().parse_args([*BASE, f"--cluster-cidr={bad}"])
        err = capsys.readouterr().err
        assert "--cluster-cidr" in err and why in err, err
