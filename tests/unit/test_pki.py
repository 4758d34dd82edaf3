"""The CA and the renewal rule `vpblu certs` decides with (vpblu/pki.py,
vpblu/certs.py): what makes a serving certificate due, on a fixed clock."""

from __future__ import annotations

import datetime

import pytest

from vpblu.certs import CertsSettings, parse_duration, renewal_reason
from vpblu.pki import CertAuthority, CertInfo, signed_by

DAY = datetime.timedelta(days=1)
NAMES = CertsSettings().dns_names


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def test_the_serving_names_are_the_services_in_every_form() -> None:
    assert NAMES == ("vpblu-controller", "vpblu-controller.vpblu-system",
                     "vpblu-controller.vpblu-system.svc",
                     "vpblu-controller.vpblu-system.svc.cluster.local")


def test_a_ca_round_trips_through_pem_and_refuses_a_foreign_key() -> None:
    ca = CertAuthority.create("test CA")
    again = CertAuthority.load(ca.cert_pem, ca.key_pem)
    assert again.cert == ca.cert
    with pytest.raises(ValueError, match="does not belong"):
        CertAuthority.load(ca.cert_pem, CertAuthority.create("other").key_pem)
    leaf = ca.issue("leaf", server=True)
    with pytest.raises(ValueError, match="not a CA"):
        CertAuthority.load(leaf.cert_pem, leaf.key_pem)


def test_a_leaf_never_outlives_its_ca() -> None:
    ca = CertAuthority.create("short CA", validity=10 * DAY)
    info = CertInfo.read(ca.issue("leaf", validity=365 * DAY).cert_pem)
    assert info.not_after == ca.cert.not_valid_after_utc


def test_renewal_is_due_when_missing_foreign_misnamed_or_expiring() -> None:
    ca = CertAuthority.create("mesh CA")
    good = ca.issue("c", dns_names=NAMES, server=True, validity=365 * DAY).cert_pem
    now = _now()
    assert renewal_reason(good, ca, NAMES, 30 * DAY, now) is None
    assert renewal_reason(None, ca, NAMES, 30 * DAY, now) == "there is none"
    assert renewal_reason(b"junk", ca, NAMES, 30 * DAY, now) == "it is not a PEM certificate"
    foreign = CertAuthority.create("mesh CA").issue("c", dns_names=NAMES).cert_pem
    assert not signed_by(foreign, ca.cert)
    assert renewal_reason(foreign, ca, NAMES, 30 * DAY, now) == (
        "it is not signed by the current CA")
    short = ca.issue("c", dns_names=NAMES[2:]).cert_pem
    assert renewal_reason(short, ca, NAMES, 30 * DAY, now) == (
        "it does not name vpblu-controller, vpblu-controller.vpblu-system")
    reason = renewal_reason(good, ca, NAMES, 30 * DAY, now + 336 * DAY)
    assert reason is not None and reason.startswith("it expires at")


@pytest.mark.parametrize(("text", "delta"), [
    ("30d", 30 * DAY), ("12h", datetime.timedelta(hours=12)),
    ("90m", datetime.timedelta(minutes=90)), ("45s", datetime.timedelta(seconds=45))])
def test_durations(text: str, delta: datetime.timedelta) -> None:
    assert parse_duration(text) == delta


@pytest.mark.parametrize("text", ["", "30", "d", "-1d", "0d", "1w", "1.5d"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)
