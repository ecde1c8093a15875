"""What the attacks against a running coordinator share: `h`, a coordinator on loopback (no
hub) with the default limits and its harness (tests/coordinator/conftest.py). A module that
needs other settings defines its own `h`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from coordinator._server import CoordinatorConfig
from tests.coordinator.conftest import Harness, running_harness


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_harness(CoordinatorConfig(
            data_dir=tmp_path / "coord", listen="127.0.0.1:0", hub=False,
            batch_window=0.05)) as harness:
        yield harness
