"""The node's WireGuard identity: one X25519 private key on disk.

Owns the key file ``<state_dir>/wireguard.key`` (mode 0600, its directory
0700): generates it once, atomically, on first start, and afterwards only reads
it. A key file that group or others may read, that is truncated, or that is not
a key is refused with an error naming the file. It is never silently replaced:
a new key would cut this node off from every peer until the controller had
distributed it, and would hide whatever damaged the file.

Must never: put the private key into a log line, an exception text, a repr or
a message, or hand it to anything but a WireGuard backend write
(`KeyStore.install`). The public key is free to go anywhere.

Room for rotation (later): the active key is one `_Secret`; a rotation stages a
second one next to it (its own 0600 file), activates it by renaming it over the
key file, and retires the old one with `_Secret.zeroize`.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from vpblu.model import WG_KEY_LEN

if TYPE_CHECKING:
    from vpblu.node.wireguard import WireGuardBackend

log = logging.getLogger(__name__)

KEY_FILE_NAME = "wireguard.key"
STATE_DIR_MODE = 0o700
KEY_FILE_MODE = 0o600
# `wg genkey` format: 44 characters of base64 and a newline.
_KEY_TEXT_LEN = 44


class KeyFileError(Exception):
    """The key file cannot be used. The text names the file, never the key."""


class _Secret:
    """32 private-key bytes in a buffer we can overwrite.

    CPython may have copied the bytes elsewhere (the decode, cryptography's own
    object); zeroizing is best effort for what this process holds on purpose.
    """

    __slots__ = ("_buf",)

    def __init__(self, raw: bytes) -> None:
        if len(raw) != WG_KEY_LEN:
            raise ValueError("a WireGuard private key is 32 bytes")
        self._buf = bytearray(raw)

    def bytes(self) -> bytes:
        return bytes(self._buf)

    def public_key(self) -> str:
        public = X25519PrivateKey.from_private_bytes(bytes(self._buf)).public_key()
        return base64.b64encode(public.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()

    def zeroize(self) -> None:
        for i in range(len(self._buf)):
            self._buf[i] = 0

    def __repr__(self) -> str:
        return "<_Secret redacted>"


def public_key_of(private: bytes) -> str:
    """The base64 public key that belongs to a raw private key."""
    return _Secret(private).public_key()


class KeyStore:
    """The node's private key, loaded from (or created in) `state_dir`."""

    def __init__(self, path: Path, secret: _Secret) -> None:
        self._path = path
        self._active = secret
        self._public_key = secret.public_key()

    @classmethod
    def load_or_create(cls, state_dir: Path) -> KeyStore:
        """Read the key file, or create it if there is none. Blocking file I/O:
        call it through `trio.to_thread.run_sync` from async code."""
        _ensure_state_dir(state_dir)
        path = state_dir / KEY_FILE_NAME
        try:
            secret = _read_key_file(path)
        except FileNotFoundError:
            secret = _create_key_file(path)
            log.info(
                "generated a new WireGuard key in %s (public key %s)", path, secret.public_key()
            )
        store = cls(path, secret)
        return store

    @property
    def path(self) -> Path:
        return self._path

    @property
    def public_key(self) -> str:
        return self._public_key

    async def install(self, backend: WireGuardBackend, interface: str) -> None:
        """Write the private key into `interface`: the only way it leaves here."""
        from vpblu.node.wireguard import DeviceUpdate

        await backend.write(interface, DeviceUpdate(private_key=self._active.bytes()))

    def close(self) -> None:
        """Forget the key (zeroize what we hold); the file stays."""
        self._active.zeroize()

    def __repr__(self) -> str:
        return f"KeyStore(path={str(self._path)!r}, public_key={self._public_key!r})"


def _ensure_state_dir(state_dir: Path) -> None:
    try:
        state_dir.mkdir(mode=STATE_DIR_MODE, parents=True)
    except FileExistsError:
        return
    # mkdir's mode is masked by the umask.
    state_dir.chmod(STATE_DIR_MODE)


def _read_key_file(path: Path) -> _Secret:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{path}: not a regular file")
        if st.st_mode & 0o077:
            raise KeyFileError(
                f"{path}: mode {stat.S_IMODE(st.st_mode):04o} lets group or others read the "
                f"private key; refusing it (expected {KEY_FILE_MODE:04o}; check who read it, "
                "then fix the mode or delete the file to get a new key)"
            )
        if st.st_uid != os.geteuid():
            raise KeyFileError(f"{path}: owned by uid {st.st_uid}, not by us ({os.geteuid()})")
        text = os.read(fd, _KEY_TEXT_LEN + 2)
    finally:
        os.close(fd)
    stripped = text.strip()
    if len(stripped) != _KEY_TEXT_LEN:
        raise KeyFileError(
            f"{path}: truncated or corrupt ({len(stripped)} characters, expected a "
            f"{_KEY_TEXT_LEN}-character base64 key); refusing to replace it"
        )
    try:
        raw = base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"{path}: corrupt (not base64); refusing to replace it") from None
    if len(raw) != WG_KEY_LEN:
        raise KeyFileError(f"{path}: corrupt (not a 32-byte key); refusing to replace it")
    return _Secret(raw)


def _create_key_file(path: Path) -> _Secret:
    private = X25519PrivateKey.generate()
    raw = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    secret = _Secret(raw)
    text = base64.b64encode(raw) + b"\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, KEY_FILE_MODE)
    try:
        try:
            os.write(fd, text)
            os.fsync(fd)
        finally:
            os.close(fd)
        # link() instead of rename(): it fails if a key file appeared meanwhile,
        # so an existing key is never overwritten.
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return secret
