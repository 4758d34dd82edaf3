"""Fixtures of the controller tests (tests/integration/meshlab.py has the rest)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.meshlab import ControllerSetup, controller_settings, mesh_pki, unique
from vpblu.lab.testenv import TestEnv


@pytest.fixture
def mesh(vpblu_installed: TestEnv, tmp_path: Path) -> ControllerSetup:
    pki = mesh_pki(tmp_path)
    return ControllerSetup(vpblu_installed, pki,
                           controller_settings(vpblu_installed, pki, unique("lease")))
