"""The data directory: modes, round trips, and one clear line for every corrupt file."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from agent import DataDir, DataDirError, Identity

from .conftest import URL
from .fakes import enrollment, peer, peermap


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_are_0600_and_round_trip(enrolled: DataDir) -> None:
    assert mode(enrolled.key_path) == 0o600
    assert mode(enrolled.enrollment_path) == 0o600
    assert mode(enrolled.path) == 0o700
    ident = enrolled.read_identity()
    assert ident == Identity(URL, enrollment(), b"\x30\x82fake-der", 51820, None)
    pm = peermap(3, peer(1, "203.0.113.7:51820"), relay_ips=("10.250.9.0/24",))
    assert enrolled.read_peermap() is None
    enrolled.write_peermap(pm)
    assert mode(enrolled.peermap_path) == 0o600
    assert enrolled.read_peermap() == pm
    assert len(enrolled.read_key()) == 44


def test_identity_keeps_explicit_lan_endpoints(tmp_path: Path) -> None:
    data = DataDir(tmp_path)
    ident = Identity(URL, enrollment(), b"x", 51999, ("192.168.1.2:51999",))
    data.write_identity(ident)
    assert data.read_identity() == ident


@pytest.mark.parametrize("content, needle", [
    (b"{not json", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[]", "not a JSON object"),
    (b'{"format": 9}', "unknown format"),
    (b'{"format": 1, "url": "https://x", "cert_der": "!!", "wg_port": 1}', "cert_der"),
    (b'{"format": 1, "url": "https://x", "cert_der": "", "wg_port": 0}', "wg_port"),
    (b'{"format": 1, "url": "https://x", "cert_der": "", "wg_port": 1, "enrollment": {}}',
     "enrollment.device_id: missing"),
])
def test_corrupt_enrollment_is_one_line(enrolled: DataDir, content: bytes, needle: str) -> None:
    enrolled.enrollment_path.write_bytes(content)
    with pytest.raises(DataDirError) as err:
        enrolled.read_identity()
    text = str(err.value)
    assert needle in text and str(enrolled.enrollment_path) in text and "\n" not in text


def test_corrupt_key_and_peermap_are_one_line(enrolled: DataDir) -> None:
    enrolled.key_path.write_text("not a key\n")
    with pytest.raises(DataDirError, match="corrupt private key"):
        enrolled.read_key()
    enrolled.peermap_path.write_text(json.dumps({"version": "x"}))
    with pytest.raises(DataDirError, match=r"peermap.json: corrupt \(peermap"):
        enrolled.read_peermap()
    enrolled.peermap_path.write_bytes(b"x" * (1024 * 1024 + 1))
    with pytest.raises(DataDirError, match="larger than"):
        enrolled.read_peermap()


def test_missing_files(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "nothing")
    assert not data.is_enrolled()
    with pytest.raises(DataDirError, match="missing"):
        data.read_identity()
    with pytest.raises(DataDirError, match="missing"):
        data.read_key()
