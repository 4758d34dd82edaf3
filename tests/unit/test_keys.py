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


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_rotation_stages_activates_and_retires_on_disk(tmp_path: Path) -> None:
    store = KeyStore.load_or_create(tmp_path)
    old = store.public_key
    old_text = (tmp_path / KEY_FILE_NAME).read_bytes()
    new = store.stage("r1")
    assert new != old and store.stage("r1") == new  # staging again: the same key
    staged = tmp_path / (KEY_FILE_NAME + ".next")
    assert _mode(staged) == 0o600 and store.rotating and store.public_key == old
    # A daemon restarting now finds the staged key.
    assert KeyStore.load_or_create(tmp_path).staged_public_key == new
    store.activate("r1")
    store.activate("r1")
    assert store.public_key == new and store.previous_public_key == old
    restarted = KeyStore.load_or_create(tmp_path)
    assert (restarted.public_key, restarted.previous_public_key) == (new, old)
    assert restarted.rotation_id == "r1"
    store.retire()
    store.retire()
    assert not store.rotating and store.public_key == new
    assert sorted(p.name for p in tmp_path.iterdir()) == [KEY_FILE_NAME]
    assert (tmp_path / KEY_FILE_NAME).read_bytes() != old_text
    assert not KeyStore.load_or_create(tmp_path).rotating


def test_a_rollback_after_activation_restores_the_old_key(tmp_path: Path) -> None:
    store = KeyStore.load_or_create(tmp_path)
    old = store.public_key
    old_text = (tmp_path / KEY_FILE_NAME).read_bytes()
    store.stage("r1")
    store.activate("r1")
    store.roll_back()
    store.roll_back()
    assert store.public_key == old and not store.rotating
    assert (tmp_path / KEY_FILE_NAME).read_bytes() == old_text
    assert sorted(p.name for p in tmp_path.iterdir()) == [KEY_FILE_NAME]


def test_a_rollback_before_activation_drops_the_staged_key(tmp_path: Path) -> None:
    store = KeyStore.load_or_create(tmp_path)
    old = store.public_key
    store.stage("r1")
    store.roll_back()
    assert store.public_key == old and not store.rotating
    assert sorted(p.name for p in tmp_path.iterdir()) == [KEY_FILE_NAME]
    # A new rotation stages a different key.
    assert store.stage("r2") != old


def test_an_activation_cut_short_is_repaired_on_load(tmp_path: Path) -> None:
    store = KeyStore.load_or_create(tmp_path)
    old = store.public_key
    new = store.stage("r1")
    os.link(tmp_path / KEY_FILE_NAME, tmp_path / (KEY_FILE_NAME + ".old"))
    restarted = KeyStore.load_or_create(tmp_path)
    assert restarted.public_key == old and restarted.staged_public_key == new
    assert restarted.previous_public_key is None
    assert KeyStore.load_or_create(tmp_path).public_key == old


def test_no_key_appears_in_a_repr(tmp_path: Path) -> None:
    store = KeyStore.load_or_create(tmp_path)
    store.stage("r1")
    for raw in (store.active_private_key(), store.staged_private_key()):
        assert base64.b64encode(raw).decode() not in repr(store)
