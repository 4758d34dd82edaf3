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

Rotation (vpblu/node/rotation.py has the mechanism): `stage` writes a new key
K' to ``wireguard.key.next`` (0600, fsynced) and its rotation id next to it
*before* it returns K'.pub, so a public key is never published for a key that
is not on disk. `activate` makes K' the key file and keeps K as
``wireguard.key.old`` (a hard link first, then one atomic rename, so a crash at
any instant leaves a key file; `load_or_create` repairs a half-done activation).
`retire` zeroizes and deletes K; `roll_back` makes K the key file again and
zeroizes and deletes K'. While a rotation is in progress (`rotating`) the
primary interface may legitimately hold K or K': the NetlinkActor then leaves
its private key alone, and only the rotation steps change it.

The mechanism needs the raw bytes to write them into a device:
`staged_private_key` / `previous_private_key` / `active_private_key` hand them
to `vpblu.node.rotation` step functions, which pass them straight to a backend
write, and nowhere else.

The daemon reads the key before its Hello, so this module imports only the
X25519 primitive (not cryptography's serialization package, nor the
WireGuard backends, which it needs only in `install`).
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from vpblu.core.model import WG_KEY_LEN

if TYPE_CHECKING:
    from vpblu.node.kernel.wireguard import WireGuardBackend

log = logging.getLogger(__name__)

KEY_FILE_NAME = "wireguard.key"
NEXT_SUFFIX = ".next"
OLD_SUFFIX = ".old"
ROTATION_ID_SUFFIX = ".rotation"
STATE_DIR_MODE = 0o700
KEY_FILE_MODE = 0o600
_TMP_SUFFIX = ".tmp"
# `wg genkey` format: 44 characters of base64 and a newline.
_KEY_TEXT_LEN = 44


def public_key_of(private: bytes) -> str:
    """The base64 public key of a raw 32-byte X25519 private key (the same as
    `vpblu.node.kernel.wireguard.public_key_of`, without its imports)."""
    public = X25519PrivateKey.from_private_bytes(private).public_key()
    return base64.b64encode(public.public_bytes_raw()).decode()


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
        return public_key_of(bytes(self._buf))

    def zeroize(self) -> None:
        for i in range(len(self._buf)):
            self._buf[i] = 0

    def __repr__(self) -> str:
        return "<_Secret redacted>"


class KeyStore:
    """The node's private key, loaded from (or created in) `state_dir`, and the
    second key of a rotation in progress."""

    def __init__(self, path: Path, secret: _Secret) -> None:
        self._path = path
        self._active = secret
        self._public_key = secret.public_key()
        self._staged: _Secret | None = None  # K' before activation
        self._previous: _Secret | None = None  # K after activation, until retire
        self._rotation_id: str | None = None

    @classmethod
    def load_or_create(cls, state_dir: Path) -> KeyStore:
        """Read the key file, or create it if there is none. Blocking file I/O:
        call it through `trio.to_thread.run_sync` from async code.

        Crash-safe at every instant: a start after a SIGKILL anywhere in a
        previous start (or in `stage`) finds either no key file (and makes one)
        or a whole one, and removes the temporaries the killed process left.
        Two processes starting at once on one state directory are serialised by
        an advisory lock on the directory, held only while loading."""
        _ensure_state_dir(state_dir)
        path = state_dir / KEY_FILE_NAME
        with _locked_dir(state_dir):
            _remove_temporaries(state_dir)
            try:
                secret = _read_key_file(path)
            except FileNotFoundError:
                secret = _create_key_file(path)
                log.info(
                    "generated a new WireGuard key in %s (public key %s)",
                    path, secret.public_key(),
                )
            store = cls(path, secret)
            store._load_rotation()
        return store

    # --- rotation -------------------------------------------------------------------

    def _sibling(self, suffix: str) -> Path:
        return self._path.with_name(self._path.name + suffix)

    def _load_rotation(self) -> None:
        """Pick up a rotation a previous daemon left on disk."""
        next_path, old_path = self._sibling(NEXT_SUFFIX), self._sibling(OLD_SUFFIX)
        id_path = self._sibling(ROTATION_ID_SUFFIX)
        if next_path.exists() and old_path.exists():
            # activate() stopped between its link and its rename: not activated, and
            # the old file is a second name of the key file (unlink, never scrub).
            old_path.unlink()
        if next_path.exists():
            self._staged = _read_key_file(next_path)
        elif old_path.exists():
            self._previous = _read_key_file(old_path)
        if self.rotating and id_path.exists():
            self._rotation_id = id_path.read_text().strip() or None
        elif not self.rotating:
            id_path.unlink(missing_ok=True)

    @property
    def rotating(self) -> bool:
        """A second key exists (staged or previous): a rotation is in progress."""
        return self._staged is not None or self._previous is not None

    @property
    def rotation_id(self) -> str | None:
        return self._rotation_id

    @property
    def staged_public_key(self) -> str | None:
        return None if self._staged is None else self._staged.public_key()

    @property
    def previous_public_key(self) -> str | None:
        return None if self._previous is None else self._previous.public_key()

    def stage(self, rotation_id: str) -> str:
        """Stage K' for `rotation_id` (again: the same K') and return K'.pub, only
        once K' is on disk. Blocking file I/O."""
        if self._previous is not None:
            if self._rotation_id == rotation_id:
                return self._public_key  # already activated: K' is the active key
            raise KeyFileError(f"{self._path}: rotation {self._rotation_id} is still "
                               "activated; retire or roll it back first")
        if self._staged is not None and self._rotation_id == rotation_id:
            return self._staged.public_key()
        self._drop_staged()
        _write_atomically(self._sibling(ROTATION_ID_SUFFIX), rotation_id.encode() + b"\n")
        self._staged = _create_key_file(self._sibling(NEXT_SUFFIX))
        self._rotation_id = rotation_id
        log.info("staged a new WireGuard key for rotation %s (public %s)",
                 rotation_id, self._staged.public_key())
        return self._staged.public_key()

    def activate(self, rotation_id: str) -> None:
        """K' becomes the key file; K stays as the old file until `retire`. Idempotent."""
        if self._previous is not None and self._rotation_id == rotation_id:
            return
        if self._staged is None or self._rotation_id != rotation_id:
            raise KeyFileError(f"{self._path}: no key staged for rotation {rotation_id}")
        old_path = self._sibling(OLD_SUFFIX)
        old_path.unlink(missing_ok=True)
        os.link(self._path, old_path)
        os.rename(self._sibling(NEXT_SUFFIX), self._path)
        _fsync_dir(self._path.parent)
        self._previous, self._active, self._staged = self._active, self._staged, None
        self._public_key = self._active.public_key()

    def retire(self) -> None:
        """Zeroize and delete K: the rotation is over. Idempotent."""
        if self._staged is not None:
            raise KeyFileError(f"{self._path}: rotation {self._rotation_id} is not activated")
        _destroy(self._sibling(OLD_SUFFIX))
        if self._previous is not None:
            self._previous.zeroize()
            self._previous = None
        self._sibling(ROTATION_ID_SUFFIX).unlink(missing_ok=True)
        self._rotation_id = None

    def roll_back(self) -> None:
        """K is the key file again; K' zeroized and deleted. Idempotent."""
        if self._previous is not None:
            old_path = self._sibling(OLD_SUFFIX)
            # The key file holds K' now: overwrite it in place before K replaces it.
            _scrub(self._path)
            os.rename(old_path, self._path)
            _fsync_dir(self._path.parent)
            self._active.zeroize()
            self._active, self._previous = self._previous, None
            self._public_key = self._active.public_key()
        self._drop_staged()
        self._sibling(ROTATION_ID_SUFFIX).unlink(missing_ok=True)
        self._rotation_id = None

    def _drop_staged(self) -> None:
        _destroy(self._sibling(NEXT_SUFFIX))
        if self._staged is not None:
            self._staged.zeroize()
            self._staged = None

    def active_private_key(self) -> bytes:
        """For a rotation step's device write only."""
        return self._active.bytes()

    def staged_private_key(self) -> bytes:
        """K', for a rotation step's device write only (before activation)."""
        if self._staged is None:
            raise KeyFileError(f"{self._path}: no key is staged")
        return self._staged.bytes()

    def previous_private_key(self) -> bytes:
        """K after activation, for a rollback's device write only."""
        if self._previous is None:
            raise KeyFileError(f"{self._path}: no previous key is kept")
        return self._previous.bytes()

    @property
    def path(self) -> Path:
        return self._path

    @property
    def public_key(self) -> str:
        return self._public_key

    async def install(self, backend: WireGuardBackend, interface: str) -> None:
        """Write the private key into `interface`: the only way it leaves here."""
        from vpblu.node.kernel.wireguard import DeviceUpdate

        await backend.write(interface, DeviceUpdate(private_key=self._active.bytes()))

    def close(self) -> None:
        """Forget the keys (zeroize what we hold); the files stay."""
        for secret in (self._active, self._staged, self._previous):
            if secret is not None:
                secret.zeroize()

    def __repr__(self) -> str:
        return f"KeyStore(path={str(self._path)!r}, public_key={self._public_key!r})"


def _ensure_state_dir(state_dir: Path) -> None:
    """The state directory exists, is ours, and is 0700 - also when kubelet (a
    hostPath DirectoryOrCreate) or an operator made it 0755 beforehand: the
    temporaries and the rotation files must not be listable or reachable by
    anyone else. mkdir's mode is masked by the umask, so the mode is always set."""
    state_dir.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
    st = os.lstat(state_dir)
    if not stat.S_ISDIR(st.st_mode):
        raise KeyFileError(f"{state_dir}: the state directory is not a directory")
    if st.st_uid != os.geteuid():
        raise KeyFileError(
            f"{state_dir}: the state directory is owned by uid {st.st_uid}, not by us "
            f"({os.geteuid()})"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode != STATE_DIR_MODE:
        log.warning("state directory %s had mode %04o; setting %04o",
                    state_dir, mode, STATE_DIR_MODE)
        os.chmod(state_dir, STATE_DIR_MODE)


class _locked_dir:
    """An exclusive flock on the directory itself (no lock file to leave behind);
    the kernel drops it when the holder dies, SIGKILL included."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._fd = -1

    def __enter__(self) -> None:
        self._fd = os.open(self._directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)  # closing the only descriptor releases the flock


def _temporary_name(path: Path) -> Path:
    """A fresh temporary next to `path`. Random, not the pid: in a container the
    daemon is pid 1 at every start, so a pid-named temporary left by a SIGKILL
    between create and link made every later start fail on O_EXCL."""
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}{_TMP_SUFFIX}")


def _remove_temporaries(state_dir: Path) -> None:
    """Scrub and delete the temporaries a killed process left (under the lock:
    nobody else is writing one). They may hold a key that was never linked."""
    for entry in state_dir.iterdir():
        if entry.name.startswith(f".{KEY_FILE_NAME}") and entry.name.endswith(_TMP_SUFFIX):
            log.info("removing %s, left by a process that stopped while writing it", entry)
            if os.lstat(entry).st_nlink > 1:
                # Killed between link and unlink: it is a second name of a key file
                # (found by the SIGKILL test); unlink the name, never scrub the key.
                entry.unlink()
            else:
                _destroy(entry)


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
    raw = private.private_bytes_raw()
    secret = _Secret(raw)
    text = base64.b64encode(raw) + b"\n"
    tmp = _temporary_name(path)
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


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_atomically(path: Path, content: bytes) -> None:
    tmp = _temporary_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, KEY_FILE_MODE)
    try:
        os.write(fd, content)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def _scrub(path: Path) -> None:
    """Overwrite a key file's bytes with zeros on disk (best effort on journaling
    or copy-on-write file systems, where old blocks may survive)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        size = os.fstat(fd).st_size
        os.write(fd, b"\0" * size)
        os.fsync(fd)
    finally:
        os.close(fd)


def _destroy(path: Path) -> None:
    """Zeroize and delete a key file; nothing if it is gone."""
    _scrub(path)
    path.unlink(missing_ok=True)
