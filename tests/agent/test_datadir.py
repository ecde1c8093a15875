"""The data directory: modes, round trips, and one clear line for every corrupt file."""

from __future__ import annotations

import json
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from agent import DataDir, DataDirError, Identity
from mesh.control import MAX_PEERMAP_BYTES

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
    # the small files stay bounded at 1 MiB (the peer map's own bound: the test below)
    enrolled.enrollment_path.write_bytes(b"x" * (1024 * 1024 + 1))
    with pytest.raises(DataDirError, match="larger than"):
        enrolled.read_identity()


def test_missing_files(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "nothing")
    assert not data.is_enrolled()
    with pytest.raises(DataDirError, match="missing"):
        data.read_identity()
    with pytest.raises(DataDirError, match="missing"):
        data.read_key()


def test_a_10000_peer_map_is_cached_and_a_larger_file_is_not_ours(enrolled: DataDir) -> None:
    """The cache is bounded like the wire (mesh.control.MAX_PEERMAP_BYTES), not like the
    data directory's small files: a full 10,000-device fleet's map (~2 MB) comes back."""
    base = peer(1, "203.0.113.7:51820")
    peers = tuple(replace(base, name=f"device-{i:05d}", mesh_ipv4=f"10.250.{i // 250}."
                          f"{i % 250 + 2}", mesh_ipv6=f"fd7a:f1ee:7000::{i + 2:x}")
                  for i in range(10_000))
    pm = peermap(5, *peers)
    enrolled.write_peermap(pm)
    assert enrolled.peermap_path.stat().st_size > 1024 * 1024
    assert enrolled.read_peermap() == pm
    enrolled.peermap_path.write_bytes(b" " * (MAX_PEERMAP_BYTES + 1))
    with pytest.raises(DataDirError, match="larger than"):
        enrolled.read_peermap()
