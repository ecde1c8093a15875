"""The agent's data directory: its private key, its enrollment and the last peer map.

    DIR/private.key       WireGuard private key, made on the device and never sent (0600)
    DIR/enrollment.json   the Enrollment, the coordinator URL, the pinned certificate (0600)
    DIR/peermap.json      the last peer map, so a restart with the coordinator down keeps the
                          mesh (0600: it is not secret, but it is the device's view of the fleet)
    DIR/wan_bytes.json    the WAN byte account (agent/_account.py), so a restart keeps the day

Every problem with a file is a `DataDirError` whose str() is one line naming the file.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from mesh.control import (
    MAX_PEERMAP_BYTES,
    ControlError,
    Enrollment,
    PeerMap,
    check_endpoint,
    coordinator_urls,
)
from mesh.release import (
    MAX_ROOT_DOCUMENT,
    RootError,
    SignedRoot,
    decode_signed_root,
    encode_signed_root,
)
from vpn import InvalidKeyError, read_private_key, write_private_file, write_private_key

PRIVATE_KEY: Final = "private.key"
ENROLLMENT: Final = "enrollment.json"
PEERMAP: Final = "peermap.json"
# The newest root metadata this device verified (docs/security.md, "Release key rotation"):
# where its walk to newer roots starts. Absent on a device whose token named no root.
ROOT: Final = "root.json"
WAN_ACCOUNT: Final = "wan_bytes.json"
FORMAT: Final = 1
# The files other than the peer map are a few KB; the peer map is bounded as on the wire
# (mesh.control.MAX_PEERMAP_BYTES). Anything bigger is not ours.
MAX_FILE_BYTES: Final = 1024 * 1024


class DataDirError(Exception):
    """A data-directory file is missing, unreadable or corrupt; str() is one line."""


@dataclass(frozen=True, slots=True)
class Identity:
    """What `join` stored: everything `run` needs besides the key."""

    url: str  # the coordinator as given to join (reachable without the mesh)
    enrollment: Enrollment
    cert_der: bytes  # the coordinator certificate pinned at join
    wg_port: int
    lan_endpoints: tuple[str, ...] | None = None  # None: discover them at every start
    # the other coordinator replicas' URLs, failed over to when `url` does not connect
    # (given at join and by the enrollment; docs/scale.md, "Replicas")
    urls: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out = {"format": FORMAT, "url": self.url, "enrollment": self.enrollment.to_json(),
               "cert_der": base64.b64encode(self.cert_der).decode("ascii"),
               "wg_port": self.wg_port,
               "lan_endpoints": None if self.lan_endpoints is None else list(self.lan_endpoints)}
        if self.urls:
            out["urls"] = list(self.urls)
        return out

    @classmethod
    def from_json(cls, obj: Any) -> Identity:
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        if obj.get("format") != FORMAT:
            raise ValueError(f"unknown format {obj.get('format')!r} (this agent reads {FORMAT})")
        url, cert, port = obj.get("url"), obj.get("cert_der"), obj.get("wg_port")
        if not isinstance(url, str) or not url:
            raise ValueError("url: missing")
        if not isinstance(cert, str):
            raise ValueError("cert_der: missing")
        try:
            der = base64.b64decode(cert, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("cert_der: not base64") from None
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError("wg_port: must be a port number")
        lan = obj.get("lan_endpoints")
        if lan is not None:
            if not isinstance(lan, list):
                raise ValueError("lan_endpoints: must be a list")
            lan = tuple(check_endpoint(e, "lan_endpoints") for e in lan)
        urls = obj.get("urls", [])
        if not isinstance(urls, list):
            raise ValueError("urls: must be a list")
        return cls(url, Enrollment.from_json(obj.get("enrollment")), der, port, lan,
                   coordinator_urls(urls, "urls"))




class DataDir:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"DataDir({str(self.path)!r})"

    @property
    def key_path(self) -> Path:
        return self.path / PRIVATE_KEY

    @property
    def enrollment_path(self) -> Path:
        return self.path / ENROLLMENT

    @property
    def peermap_path(self) -> Path:
        return self.path / PEERMAP

    @property
    def root_path(self) -> Path:
        return self.path / ROOT

    def ensure(self) -> None:
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise DataDirError(f"cannot create {self.path}: {exc.strerror or exc}") from exc
        if not self.path.is_dir():
            raise DataDirError(f"{self.path} is not a directory")

    # -- private key -------------------------------------------------------

    def has_key(self) -> bool:
        return self.key_path.exists()

    def write_key(self, private_key: str) -> None:
        self.ensure()
        try:
            write_private_key(self.key_path, private_key)
        except OSError as exc:
            raise DataDirError(f"cannot write {self.key_path}: {exc.strerror or exc}") from exc

    def read_key(self) -> str:
        try:
            return read_private_key(self.key_path)
        except FileNotFoundError:
            raise DataDirError(f"{self.key_path}: missing") from None
        except (InvalidKeyError, UnicodeDecodeError) as exc:
            raise DataDirError(f"{self.key_path}: corrupt private key ({exc})") from None
        except OSError as exc:
            raise DataDirError(f"cannot read {self.key_path}: {exc.strerror or exc}") from None

    # -- enrollment --------------------------------------------------------

    def is_enrolled(self) -> bool:
        return self.enrollment_path.exists()

    def write_identity(self, identity: Identity) -> None:
        self.ensure()
        try:
            write_private_file(self.enrollment_path,
                           (json.dumps(identity.to_json(), indent=2) + "\n").encode())
        except OSError as exc:
            raise DataDirError(f"cannot write {self.enrollment_path}: "
                               f"{exc.strerror or exc}") from exc

    def read_identity(self) -> Identity:
        obj = self._read_json(self.enrollment_path)
        try:
            return Identity.from_json(obj)
        except (ValueError, ControlError) as exc:  # ControlError is a ValueError too
            raise DataDirError(f"{self.enrollment_path}: corrupt ({exc})") from None

    # -- root metadata -----------------------------------------------------

    def write_root(self, signed: SignedRoot) -> None:
        """Keep the newest verified root: whole or absent after a crash (write_private_file:
        temporary file, fsync, rename, directory fsync)."""
        self.ensure()
        try:
            write_private_file(self.root_path, encode_signed_root(signed))
        except OSError as exc:
            raise DataDirError(f"cannot write {self.root_path}: "
                               f"{exc.strerror or exc}") from exc

    def read_root(self) -> SignedRoot | None:
        """The newest root this device verified, None if its token named none; DataDirError
        if the file is corrupt (it was verified when written: only the disk can break it)."""
        try:
            with open(self.root_path, "rb") as f:
                raw = f.read(MAX_ROOT_DOCUMENT + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise DataDirError(f"cannot read {self.root_path}: {exc.strerror or exc}") from None
        try:
            return decode_signed_root(raw)
        except RootError as exc:
            raise DataDirError(f"{self.root_path}: corrupt ({exc})") from None

    # -- peer map cache ----------------------------------------------------

    def write_peermap(self, peermap: PeerMap) -> None:
        try:
            write_private_file(self.peermap_path, json.dumps(peermap.to_json()).encode())
        except OSError as exc:
            raise DataDirError(f"cannot write {self.peermap_path}: "
                               f"{exc.strerror or exc}") from exc

    def read_peermap(self) -> PeerMap | None:
        """The cached map, None if there is none; DataDirError if it is corrupt."""
        if not self.peermap_path.exists():
            return None
        obj = self._read_json(self.peermap_path, MAX_PEERMAP_BYTES)
        try:
            return PeerMap.from_json(obj)
        except ValueError as exc:
            raise DataDirError(f"{self.peermap_path}: corrupt ({exc})") from None

    # -- the WAN byte account ----------------------------------------------

    @property
    def wan_account_path(self) -> Path:
        return self.path / WAN_ACCOUNT

    def write_wan_account(self, obj: Any) -> None:
        """Atomically (a crash leaves the old file or the new one)."""
        try:
            write_private_file(self.wan_account_path, json.dumps(obj).encode())
        except OSError as exc:
            raise DataDirError(f"cannot write {self.wan_account_path}: "
                               f"{exc.strerror or exc}") from exc

    def read_wan_account(self) -> Any:
        """The saved account's JSON (the caller validates it), None if there is none;
        DataDirError if it cannot be read or is no JSON."""
        if not self.wan_account_path.exists():
            return None
        return self._read_json(self.wan_account_path)

    # -- helpers -----------------------------------------------------------

    @staticmethod
    def _read_json(path: Path, limit: int = MAX_FILE_BYTES) -> Any:
        try:
            with open(path, "rb") as f:
                raw = f.read(limit + 1)
        except FileNotFoundError:
            raise DataDirError(f"{path}: missing") from None
        except OSError as exc:
            raise DataDirError(f"cannot read {path}: {exc.strerror or exc}") from None
        if len(raw) > limit:
            raise DataDirError(f"{path}: corrupt (larger than {limit} bytes)")
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            msg = " ".join(str(exc).split())
            raise DataDirError(f"{path}: corrupt (not JSON: {msg})") from None
