"""vpblu's kustomize base on a TestEnv: re-exported for the tests from vpblu.testenv."""

from vpblu.testenv import (
    BASE,
    CRD_NAMES,
    ESTABLISHED_TIMEOUT,
    REPO,
    SAMPLES,
    established_crds,
    install_base,
    wait_established,
)

__all__ = ["BASE", "CRD_NAMES", "ESTABLISHED_TIMEOUT", "REPO", "SAMPLES", "established_crds",
           "install_base", "wait_established"]
