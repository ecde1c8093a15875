"""`ops._publish.publish_image` against an in-memory registry with the coordinator's
checks: deltas against earlier releases, reuse of unchanged layers, idempotence, resuming an
interrupted upload, and a device rebuilding the result."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from mesh.image import materialize_release, plan_layer, read_saved_image
from mesh.release import (
    ContainerSettings,
    Layer,
    chunk_layer,
    decode_signed_manifest,
    verify_manifest,
    verify_release,
)
from ops._publish import PublishError, PublishResult, publish_image

from ._fakes import FakeRegistry, diff_id, image_config, layer_tar, saved_image_tar


def _app(version: int) -> bytes:
    rng = random.Random(42)
    files = {f"srv/{i:03d}.txt": (f"line {i} " * 300).encode() + rng.randbytes(1500)
             for i in range(60)}
    files["srv/VERSION"] = f"{version}\n".encode()
    if version >= 2:
        files["srv/007.txt"] = b"rewritten in v2 " * 100
    return layer_tar(files)


BASE = layer_tar({"bin/busybox": random.Random(3).randbytes(80_000)})


@pytest.fixture
def key() -> SigningKey:
    return SigningKey(b"\x07" * 32)


def _image(tmp_path: Path, version: int) -> Path:
    layers = [BASE, _app(version)]
    return saved_image_tar(tmp_path / f"v{version}.tar", layers,
                           image_config(layers, ("echo", f"v{version}")))


def _publish(reg: FakeRegistry, key: SigningKey, tar: Path, tmp_path: Path,
             **kw: object) -> PublishResult:
    return publish_image(reg, fleet="cams", app="web", signing_key=key, saved_tar=tar,
                         cache_dir=tmp_path / "cache", **kw)  # type: ignore[arg-type]


def test_publish_v1_v2_delta_reuse_and_idempotence(tmp_path: Path, key: SigningKey) -> None:
    reg = FakeRegistry(key.verify_key)
    r1 = _publish(reg, key, _image(tmp_path, 1), tmp_path)
    assert (r1.version, r1.created) == (1, True)
    assert all(not x.deltas and x.reused_from is None for x in r1.layers)
    v1_puts = len(reg.puts)

    # v2 from a fresh cache: the publisher rebuilds v1's app layer from the registry's chunks.
    r2 = _publish(reg, key, _image(tmp_path, 2), tmp_path)
    assert (r2.version, r2.created) == (2, True)
    base, app = r2.layers
    assert base.reused_from == 1 and not base.deltas
    assert app.reused_from is None
    assert [d.source_diff_id for d in app.deltas] == [diff_id(_app(1))]
    assert app.saving is not None and app.saving > 0.8
    assert (tmp_path / "cache" / f"{diff_id(_app(1))[7:]}.tar").read_bytes() == _app(1)
    # Only v2's new chunks and its delta went up; the base layer's chunks were reused.
    assert r2.uploaded_blobs == len(reg.puts) - v1_puts == app.chunks + 1
    signed = decode_signed_manifest(reg.release_manifest("cams", "web", 2))
    manifest = verify_manifest(signed, key.verify_key, 1)
    assert manifest.layers[1].deltas[0].method

    # Publishing the same image again is a no-op.
    puts = len(reg.puts)
    again = _publish(reg, key, _image(tmp_path, 2), tmp_path)
    assert (again.version, again.created, len(reg.puts)) == (2, False, puts)
    assert len(reg.releases) == 2

    # ...unless its container settings change: then it is version 3 and uploads nothing new.
    r3 = _publish(reg, key, _image(tmp_path, 2), tmp_path,
                  container=ContainerSettings(environment=(("MODE", "x"),)))
    assert (r3.version, r3.created, r3.uploaded_blobs) == (3, True, 0)
    assert [x.reused_from for x in r3.layers] == [2, 2]

    # A device on v1 rebuilds v2 from the delta alone.
    v1 = read_saved_image(_image(tmp_path, 1), tmp_path / "device-layers")
    local = {x.diff_id: x.data for x in v1.layers}
    release = verify_release(reg.release_manifest("cams", "web", 2), key.verify_key, 1)
    out = materialize_release(release, reg.get_blob, local, tmp_path / "device", "t:2")  # type: ignore[arg-type]
    assert [x.method for x in out.layers] == ["local", "delta"]
    assert [x.read() for x in read_saved_image(out.image_tar).layers] == [BASE, _app(2)]


def test_interrupted_upload_resumes_with_only_the_missing_blobs(tmp_path: Path,
                                                                 key: SigningKey) -> None:
    reg = FakeRegistry(key.verify_key)
    tar = saved_image_tar(tmp_path / "big.tar", [BASE, layer_tar(
        {f"f{i}": random.Random(i).randbytes(600_000) for i in range(14)})])  # > 2 chunks
    reg.fail_after_puts = 2
    with pytest.raises(ConnectionError):
        _publish(reg, key, tar, tmp_path)
    assert len(reg.puts) == 2 and not reg.releases
    first = set(reg.puts)
    reg.fail_after_puts = None
    result = _publish(reg, key, tar, tmp_path)
    assert result.created and result.version == 1
    assert not first & set(reg.puts[2:])  # nothing uploaded twice
    assert result.uploaded_blobs == len(reg.puts) - 2


def test_version_not_newer_is_refused(tmp_path: Path, key: SigningKey) -> None:
    reg = FakeRegistry(key.verify_key)
    _publish(reg, key, _image(tmp_path, 1), tmp_path)
    with pytest.raises(PublishError, match="not newer"):
        _publish(reg, key, _image(tmp_path, 2), tmp_path, version=1)


def test_key_zero_means_no_deltas(tmp_path: Path, key: SigningKey) -> None:
    reg = FakeRegistry(key.verify_key)
    _publish(reg, key, _image(tmp_path, 1), tmp_path)
    r2 = _publish(reg, key, _image(tmp_path, 2), tmp_path, keep=0)
    assert r2.version == 2 and all(not x.deltas for x in r2.layers)
    assert r2.layers[0].reused_from is None  # nothing looked at: the base is chunked again


# ---- work not done twice: parallel chunks and deltas, chunks reused from earlier releases ----

_BIG = random.Random(11).randbytes(5 * 1024 * 1024)  # > one chunk, the same in both versions


def _big_layer(version: int) -> bytes:
    return layer_tar({"data/big.bin": _BIG,
                      "data/tail.bin": random.Random(100 + version).randbytes(300_000)})


def _big_image(tmp_path: Path, version: int) -> Path:
    layers = [BASE, _big_layer(version)]
    return saved_image_tar(tmp_path / f"big{version}.tar", layers,
                           image_config(layers, ("echo", f"v{version}")))


def _cold_layer(reg: FakeRegistry, key: SigningKey, version: int) -> Layer:
    """What the registry's manifest says of the big layer, checked against a cold computation:
    chunk_layer on one thread and plan_layer in place, the publisher's code paths not used."""
    manifest = verify_manifest(decode_signed_manifest(reg.release_manifest("cams", "web",
                                                                           version)),
                               key.verify_key, None)
    layer = manifest.layers[1]
    cold = chunk_layer(_big_layer(version))
    assert layer.chunks == tuple(c.ref for c in cold)
    for c in cold:
        assert reg.blobs[c.ref.id.hex()] == c.data
    return layer


def test_chunks_reused_by_id_and_parallel_work_match_a_cold_run(tmp_path: Path,
                                                                 key: SigningKey) -> None:
    reg = FakeRegistry(key.verify_key)
    _publish(reg, key, _big_image(tmp_path, 1), tmp_path, workers=2)
    first = _cold_layer(reg, key, 1)
    puts = len(reg.puts)
    r2 = _publish(reg, key, _big_image(tmp_path, 2), tmp_path, workers=2)
    second = _cold_layer(reg, key, 2)
    # The first 4 MiB of the layer did not change: v1's chunk is named again, not sent again.
    assert second.chunks[0] == first.chunks[0] and second.chunks[1:] != first.chunks[1:]
    assert first.chunks[0].id.hex() not in reg.puts[puts:]
    assert r2.uploaded_blobs == len(second.chunks) - 1 + len(second.deltas)
    # The delta is the one plan_layer picks alone, byte for byte.
    plan = plan_layer(_big_layer(2), {diff_id(_big_layer(1)): _big_layer(1)},
                      full_size=sum(c.stored_size for c in second.chunks))
    assert plan.patch is not None and len(second.deltas) == 1
    assert reg.blobs[second.deltas[0].blob_id.hex()] == plan.patch


def test_a_chunk_gone_from_the_coordinator_is_compressed_and_sent_again(
        tmp_path: Path, key: SigningKey) -> None:
    reg = FakeRegistry(key.verify_key)
    _publish(reg, key, _big_image(tmp_path, 1), tmp_path)
    shared = _cold_layer(reg, key, 1).chunks[0].id.hex()
    del reg.blobs[shared]  # e.g. removed by the coordinator's blob GC, or lost
    puts = len(reg.puts)
    _publish(reg, key, _big_image(tmp_path, 2), tmp_path)
    assert shared in reg.puts[puts:]
    _cold_layer(reg, key, 2)  # same manifest entry and the very frame of a cold run


def test_a_corrupted_cached_base_layer_is_rebuilt_not_used(tmp_path: Path,
                                                          key: SigningKey) -> None:
    reg = FakeRegistry(key.verify_key)
    _publish(reg, key, _image(tmp_path, 1), tmp_path)
    cached = tmp_path / "cache" / f"{diff_id(_app(1))[7:]}.tar"
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(_app(1)[:-10] + b"x" * 10)  # same size, wrong bytes
    r2 = _publish(reg, key, _image(tmp_path, 2), tmp_path)
    assert cached.read_bytes() == _app(1)  # rebuilt from the registry's chunks
    delta = r2.layers[1].deltas[0]
    plan = plan_layer(_app(2), {diff_id(_app(1)): _app(1)}, full_size=r2.layers[1].stored_size)
    assert plan.patch is not None and reg.blobs[delta.blob_id.hex()] == plan.patch
