"""X25519 key pairs in WireGuard's encodings (base64 for humans and config files, hex for UAPI)."""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from nacl.public import PrivateKey

# Curve25519 keys are 32 bytes (RFC 7748); WireGuard's base64 form is therefore 44 characters.
KEY_BYTES: Final = 32
# The all-zero key is how the UAPI and netlink protocols say "no preshared key".
ZERO_KEY: Final = base64.b64encode(bytes(KEY_BYTES)).decode("ascii")


class InvalidKeyError(ValueError):
    """A key that is not 32 bytes of valid base64 (or hex, for the UAPI form)."""


@dataclass(frozen=True, slots=True)
class KeyPair:
    private: str
    public: str

    def __repr__(self) -> str:
        # Keep private keys out of logs and tracebacks by accident.
        return f"KeyPair(private=<hidden>, public={self.public!r})"


def _decode(key: str) -> bytes:
    if not isinstance(key, str):
        raise InvalidKeyError(f"key must be a base64 string, not {type(key).__name__}")
    try:
        raw = base64.b64decode(key.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidKeyError("key is not valid base64") from exc
    if len(raw) != KEY_BYTES:
        raise InvalidKeyError(f"key must decode to {KEY_BYTES} bytes, got {len(raw)}")
    return raw


def validate_key(key: str) -> str:
    """Return the key in canonical base64 form, or raise InvalidKeyError."""
    return base64.b64encode(_decode(key)).decode("ascii")


def _clamp(raw: bytes) -> bytes:
    # RFC 7748 section 5 clamping, as `wg genkey` does. WireGuard stores and reports the clamped
    # form, so an unclamped key would never compare equal to what the daemon reports.
    b = bytearray(raw)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


def clamp_private_key(key: str) -> str:
    """The canonical (clamped) form of a private key; the public key is unchanged by it."""
    return base64.b64encode(_clamp(_decode(key))).decode("ascii")


def generate_keypair() -> KeyPair:
    private = PrivateKey(_clamp(bytes(PrivateKey.generate())))
    return KeyPair(
        private=base64.b64encode(bytes(private)).decode("ascii"),
        public=base64.b64encode(bytes(private.public_key)).decode("ascii"),
    )


def generate_preshared_key() -> str:
    # A preshared key is just 32 random bytes (wg genpsk), not a curve point.
    return base64.b64encode(os.urandom(KEY_BYTES)).decode("ascii")


def public_key_from_private(private_key: str) -> str:
    # libsodium clamps the scalar exactly as WireGuard does, so this matches `wg pubkey`.
    private = PrivateKey(_decode(private_key))
    return base64.b64encode(bytes(private.public_key)).decode("ascii")


def key_to_hex(key: str) -> str:
    return _decode(key).hex()


def key_from_hex(hex_key: str) -> str:
    if len(hex_key) != 2 * KEY_BYTES:
        raise InvalidKeyError(f"hex key must be {2 * KEY_BYTES} characters, got {len(hex_key)}")
    try:
        raw = bytes.fromhex(hex_key)
    except ValueError as exc:
        raise InvalidKeyError("key is not valid hex") from exc
    return base64.b64encode(raw).decode("ascii")


def write_private_file(path: str | os.PathLike[str], data: bytes, *,
                       exclusive: bool = False) -> None:
    """Write atomically with mode 0600: a temp file created 0600 in the same directory, fsynced,
    renamed over `path`, then the directory fsynced: the rename lives in the directory, and
    without that fsync a power loss can bring back the old file or none (a device that loses
    its credential or key that way has lost its identity). The file is born 0600 (os.open with
    an explicit mode; umask can only narrow it), so its content is never readable by others,
    not even between create and chmod. Every secret fleetmesh keeps on disk goes through here
    (keys, credentials, API keys). `exclusive`: never replace an existing file
    (FileExistsError): the temp file is hard-linked to `path`, which fails if it exists."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # in case the filesystem ignored the create mode
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            os.link(tmp, target)
        else:
            os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)  # the link's other name, or what an error left
    dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_private_key(path: str | os.PathLike[str], key: str) -> None:
    """A WireGuard private key file: validated, written with write_private_file (0600)."""
    write_private_file(path, (validate_key(key) + "\n").encode("ascii"))


def read_private_key(path: str | os.PathLike[str]) -> str:
    with open(path, encoding="ascii") as f:
        # Bounded read: a key file is 45 bytes; refuse to slurp something huge by mistake.
        text = f.read(4 * KEY_BYTES)
    return validate_key(text.strip())
