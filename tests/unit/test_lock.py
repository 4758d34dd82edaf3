"""The lock files say the same thing as pyproject.toml, and the same versions
to the image (requirements.lock) and to the tests (requirements-dev.lock):
a dependency added to pyproject.toml without `make lock` fails here, not in
the image."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.MULTILINE)


def _pins(name: str) -> dict[str, str]:
    text = (ROOT / name).read_text()
    pins = {canonicalize_name(m[1]): m[2] for m in PIN.finditer(text)}
    # Every pin carries its hashes: pip installs them with --require-hashes.
    assert text.count("==") == len(pins)
    for block in re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[-1]):
        if PIN.match(block):
            assert "--hash=sha256:" in block, block.splitlines()[0]
    return pins


def _project() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _satisfied(requirements: list[str], pins: dict[str, str], lock: str) -> None:
    for line in requirements:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in {lock}: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{lock} pins {req.name}=={pins[name]}, pyproject.toml wants {req.specifier}: "
            "run `make lock`")


def test_the_runtime_lock_covers_the_products_dependencies() -> None:
    project = _project()
    _satisfied(list(project["dependencies"]), _pins("requirements.lock"),
               "requirements.lock")


def test_the_dev_lock_covers_the_extras_too() -> None:
    project = _project()
    extras = project["optional-dependencies"]
    wanted = [*project["dependencies"], *extras["test"], *extras["bench"],
              *extras["docs"]]
    _satisfied(wanted, _pins("requirements-dev.lock"), "requirements-dev.lock")


def test_the_image_and_the_tests_run_the_same_versions() -> None:
    runtime, dev = _pins("requirements.lock"), _pins("requirements-dev.lock")
    assert set(runtime) <= set(dev)
    assert {n: v for n, v in dev.items() if n in runtime} == runtime
