"""Attack (or accident): the device's disk is full while it fetches a release from an honest
LAN neighbour. Before the fix the driver took the store's OSError (ENOSPC) for bad bytes and
banned the honest source for the release.

Expected: a full disk bans no one; it is counted (`disk_full`) and logged, the node keeps
running, and it completes the release once space returns. The store's directory is on a real
tmpfs of a few hundred KB, mounted for the test (needs root) and unmounted after.
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from agent._blobstore import BlobStore
from agent._gossip import GossipNode
from mesh.rumor import make_verifier
from tests.gossip.helpers import APP, FLEET, KEY, inline, make_blobs, make_manifest
from tests.gossip.memnet import MemoryNetwork

PEERS = {"a": "10.0.0.1", "b": "10.0.0.2"}


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs, unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def fill(directory: Path) -> Path:
    """A file that takes every free block of `directory`'s file system."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def make(net: MemoryNetwork, root: Path, name: str, log: list[str]) -> GossipNode:
    return GossipNode(name, PEERS[name], peers=PEERS,
                      verify=make_verifier(bytes(KEY.verify_key), fleet=FLEET),
                      store=BlobStore(root / "blobs"), client=None, fleet=FLEET,
                      rng=random.Random(name), network=net, log=log.append,
                      run_blocking=inline)


async def wait_until(predicate: object, step: float = 0.5) -> None:
    assert callable(predicate)
    while not predicate():
        await trio.sleep(step)


async def test_a_full_disk_bans_no_one_and_fetching_resumes_when_space_returns(
        tmp_path: Path, tiny_fs: Path, autojump_clock: trio.abc.Clock) -> None:
    """b's store is on a full tmpfs: storing a's (honest, verified) blobs fails with ENOSPC.
    a is not banned, the failure is counted and logged as a full disk, and once the filler is
    removed b completes the release from a."""
    net = MemoryNetwork()
    blobs = make_blobs(3, large=0)
    log_b: list[str] = []
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            a = make(net, tmp_path / "a", "a", [])
            b = make(net, tiny_fs, "b", log_b)
            for blob in blobs:
                a.store.put(blob.ref.id, blob.frame, "chunk", ref=blob.ref)
            filler = fill(tiny_fs)
            await nursery.start(a.run)
            await nursery.start(b.run)
            a.set_lan({"b"})
            b.set_lan({"a"})
            assert a.offer_manifest(make_manifest(blobs))
            await wait_until(lambda: b.stats.counters["store_errors"] >= 1)
            assert b.core.banned(FLEET, APP) == frozenset()
            assert b.stats.counters["disk_full"] >= 1
            assert any("disk full" in line for line in log_b)
            assert not b.complete(FLEET, APP)
            filler.unlink()
            await wait_until(lambda: b.complete(FLEET, APP))
            assert all(b.store.has(blob.ref.id) for blob in blobs)
            assert b.core.banned(FLEET, APP) == frozenset()
            nursery.cancel_scope.cancel()
