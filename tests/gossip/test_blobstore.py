"""BlobStore: verify before storing, atomic writes, whole-or-absent."""

from __future__ import annotations

from pathlib import Path

import blake3
import pytest
from backports import zstd

from agent._blobstore import BlobStore, verify_blob
from mesh.blobs import BlobVerifyError
from mesh.node import wanted_blobs
from mesh.release import CHUNK_SIZE, Layer, LayerDelta, ReleaseManifest, chunk_id

from .helpers import make_blobs


def test_put_verifies_chunks_and_deltas(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    b = make_blobs(1, large=0)[0]
    assert store.put(b.ref.id, b.frame, "chunk", ref=b.ref)
    assert not store.put(b.ref.id, b.frame, "chunk")  # already there (checked without a ref)
    assert store.get(b.ref.id) == b.frame and store.has(b.ref.id.hex())
    assert store.read(b.ref.id, 10, 5) == b.frame[10:15]
    patch = b"a patch"
    pid = blake3.blake3(patch).digest()
    assert store.put(pid, patch, "delta", size=len(patch))
    assert store.ids() == {b.ref.id, pid}
    assert BlobStore(tmp_path / "blobs").ids() == {b.ref.id, pid}  # survives a restart


@pytest.mark.parametrize("case", ["flipped", "truncated", "trailing", "wrong-id", "not-zstd"])
def test_corrupt_chunks_never_enter(tmp_path: Path, case: str) -> None:
    store = BlobStore(tmp_path / "blobs")
    b = make_blobs(2, large=0)
    frame = b[0].frame
    bid = b[0].ref.id
    bad = {"flipped": frame[:-8] + bytes(x ^ 1 for x in frame[-8:]),
           "truncated": frame[:-1], "trailing": frame + b"\0", "wrong-id": b[1].frame,
           "not-zstd": b"hello"}[case]
    for ref in (None, b[0].ref):
        with pytest.raises(BlobVerifyError):
            store.put(bid, bad, "chunk", ref=ref)
    assert store.ids() == set() and not list((tmp_path / "blobs").iterdir())
    assert store.rejected == 2


def test_decompression_is_bounded(tmp_path: Path) -> None:
    piece = b"\0" * (CHUNK_SIZE + 1)  # a zip bomb's little sibling: one byte over the bound
    frame = zstd.compress(piece, level=1)
    with pytest.raises(BlobVerifyError):
        verify_blob(chunk_id(piece), frame, "chunk")
    with pytest.raises(BlobVerifyError):
        verify_blob(blake3.blake3(b"x").digest(), b"y", "delta")
    with pytest.raises(BlobVerifyError):
        verify_blob(blake3.blake3(b"x").digest(), b"x", "delta", size=2)


def test_leftover_temp_files_are_removed(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    root.mkdir()
    (root / ".tmp-abc-1234").write_bytes(b"half a blob")
    store = BlobStore(root)
    assert store.ids() == set() and not list(root.iterdir())


def test_wanted_blobs_prefers_a_delta_on_a_complete_base(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    old, new = make_blobs(2, large=0), make_blobs(2, seed=7, large=0)
    base = "sha256:" + "1" * 64
    for b in old:
        store.put(b.ref.id, b.frame, "chunk", ref=b.ref)
    store.record_layers({base: [b.ref.id for b in old]})
    assert store.complete_layers() == {base}
    delta = LayerDelta(base, b"\x09" * 32, 123, "HDIFF")
    other = LayerDelta("sha256:" + "2" * 64, b"\x08" * 32, 99, "HDIFF")
    layers = (Layer("sha256:" + "3" * 64, sum(b.ref.size for b in new),
                    tuple(b.ref for b in new), (other, delta)),
              Layer("sha256:" + "4" * 64, sum(b.ref.size for b in new),
                    tuple(b.ref for b in new), (other,)))
    m = ReleaseManifest("cams", "cam", 2, 0, b"{}", layers)
    w = wanted_blobs(m, store.complete_layers(), store.has)
    assert w[delta.blob_id].kind == "delta" and w[delta.blob_id].size == 123
    assert other.blob_id not in w
    assert {b.ref.id for b in new} <= set(w)  # the second layer has no usable base
