from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from vpblu.node.keys import KEY_FILE_NAME, KeyFileError, KeyStore


def test_first_start_creates_a_0600_key_in_a_0700_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = KeyStore.load_or_create(state)
    key_file = state / KEY_FILE_NAME
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(base64.b64decode(store.public_key)) == 32
    assert KeyStore.load_or_create(state).public_key == store.public_key
    secret = key_file.read_text().strip()
    assert secret not in repr(store)
    assert [p.name for p in state.iterdir()] == [KEY_FILE_NAME]


def _broken(kind: str, key_file: Path) -> None:
    good = key_file.read_bytes()
    if kind == "world-readable":
        os.chmod(key_file, 0o644)
    elif kind == "group-readable":
        os.chmod(key_file, 0o640)
    elif kind == "truncated":
        key_file.write_bytes(good[:20])
    elif kind == "garbage":
        key_file.write_bytes(b"!" * 44 + b"\n")
    elif kind == "empty":
        key_file.write_bytes(b"")


@pytest.mark.parametrize(
    "kind", ["world-readable", "group-readable", "truncated", "garbage", "empty"]
)
def test_a_bad_key_file_is_refused_naming_the_file_and_left_alone(
    tmp_path: Path, kind: str
) -> None:
    KeyStore.load_or_create(tmp_path)
    key_file = tmp_path / KEY_FILE_NAME
    _broken(kind, key_file)
    before = (key_file.read_bytes(), key_file.stat().st_mode)
    with pytest.raises(KeyFileError) as err:
        KeyStore.load_or_create(tmp_path)
    assert str(key_file) in str(err.value)
    assert (key_file.read_bytes(), key_file.stat().st_mode) == before
    if kind.endswith("readable"):
        assert before[0].strip().decode() not in str(err.value)
