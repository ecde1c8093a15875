"""Fixtures for agent tests: an enrolled data directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import DataDir, Identity
from vpn import generate_keypair

from .fakes import enrollment

URL = "https://198.51.100.1:8443"


@pytest.fixture
def enrolled(tmp_path: Path) -> DataDir:
    data = DataDir(tmp_path / "data")
    data.write_key(generate_keypair().private)
    data.write_identity(Identity(URL, enrollment(), b"\x30\x82fake-der", 51820, None))
    return data
