"""Defect (issue 13 item 15): a secret written atomically (temp file, fsync, rename) was not
durable: the rename lives in the directory, and without an fsync of the directory a power loss
right after it can bring back the old file or none at all. A device that lost its
`enrollment.json` or `private.key` that way has lost its identity (the coordinator already
handed out the credential); a coordinator that lost `hub.key` or `operator.key` has lost its
hub or its operator API key.

Expected: every atomic write of a secret (the agent's private key and enrollment, the
coordinator's hub key, operator key and TLS key) fsyncs the directory after the rename, which
the test observes by wrapping os.replace and os.fsync around the real writers."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent._datadir import DataDir, Identity
from coordinator._server import Coordinator, CoordinatorConfig
from mesh.release import read_signing_key, write_signing_key
from ops._cli_ops import _write_secret
from tests.agent.fakes import enrollment
from vpn import generate_keypair

URL = "https://198.51.100.1:8443"


@dataclass
class DiskLog:
    """What reached the disk calls, in order: ("replace", target) for a rename or link that
    names a file, and ("fsync", path, is_dir)."""

    events: list[tuple[str, str, bool]] = field(default_factory=list)

    def durable(self, target: Path) -> bool:
        """`target` was renamed into place and its directory fsynced after that rename."""
        renamed = [i for i, e in enumerate(self.events)
                   if e[0] == "replace" and Path(e[1]) == target]
        if not renamed:
            return False
        return any(e == ("fsync", str(target.parent), True)
                   for e in self.events[renamed[-1] + 1:])


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> DiskLog:
    log = DiskLog()
    real_replace, real_fsync, real_link = os.replace, os.fsync, os.link

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str], **kw: object) -> None:
        real_replace(src, dst, **kw)  # type: ignore[arg-type]
        log.events.append(("replace", str(Path(dst).resolve()), False))

    def link(src: str | os.PathLike[str], dst: str | os.PathLike[str], **kw: object) -> None:
        real_link(src, dst, **kw)  # type: ignore[arg-type]
        log.events.append(("replace", str(Path(dst).resolve()), False))  # named, never overwriting

    def fsync(fd: int) -> None:
        real_fsync(fd)
        path = os.readlink(f"/proc/self/fd/{fd}")
        log.events.append(("fsync", path, stat.S_ISDIR(os.fstat(fd).st_mode)))

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(os, "fsync", fsync)
    return log


def test_agent_key_and_enrollment_are_durable(tmp_path: Path, disk: DiskLog) -> None:
    """DataDir.write_key (private.key) fsyncs the data directory after its rename."""
    data = DataDir(tmp_path / "agent")
    data.write_key(generate_keypair().private)
    assert disk.durable(data.key_path.resolve()), disk.events


def test_agent_enrollment_is_durable(tmp_path: Path, disk: DiskLog) -> None:
    """DataDir.write_identity (enrollment.json, which holds the device credential) likewise."""
    data = DataDir(tmp_path / "agent")
    data.write_identity(Identity(URL, enrollment(), b"\x30\x82fake-der", 51820, None))
    assert disk.durable(data.enrollment_path.resolve()), disk.events


def test_coordinator_keys_are_durable(tmp_path: Path, disk: DiskLog) -> None:
    """A new coordinator's data directory: hub.key, operator.key and the TLS key (and its
    certificate) each fsync the directory after their rename."""
    coord = Coordinator(CoordinatorConfig(data_dir=tmp_path / "coord", listen="127.0.0.1:0",
                                          hub=False))
    coord._prepare()
    try:
        root = (tmp_path / "coord").resolve()
        for name in ("hub.key", "operator.key", "tls.key", "tls.crt"):
            assert disk.durable(root / name), (name, disk.events)
    finally:
        coord.store.close()


def test_operator_secrets_are_durable(tmp_path: Path, disk: DiskLog) -> None:
    """The operator's side: the release signing key (`fleetmesh release keygen`) and the
    workstation's wg-quick config (`fleetmesh operator config --out`) are whole or absent after
    a crash, and their directory is fsynced; an existing file is still never overwritten
    unless asked (--force)."""
    key_path = tmp_path / "release.key"
    write_signing_key(key_path)
    assert disk.durable(key_path.resolve()), disk.events
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        write_signing_key(key_path)
    assert read_signing_key(key_path)  # still the first key, whole
    config = tmp_path / "operator.conf"
    _write_secret(config, "[Interface]\nPrivateKey = x\n", force=False)
    assert disk.durable(config.resolve()), disk.events
    with pytest.raises(FileExistsError):
        _write_secret(config, "[Interface]\n", force=False)
    _write_secret(config, "[Interface]\nPrivateKey = y\n", force=True)
    assert config.read_text().endswith("= y\n") and stat.S_IMODE(config.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left
