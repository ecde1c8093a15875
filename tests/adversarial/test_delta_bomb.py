"""Attack: a release's delta is a decompression bomb. A tar delta of a few KB declared a target
far larger than the layer the signed manifest names (the manifest's layer size was never passed
to the delta engine as its bound), and its body, up to 2 x that target + 16 MiB, was inflated
in memory before any operation in it was checked: one such patch raised the agent's peak RSS
from ~23 to ~319 MiB. A patch declaring the honest target size could still inflate 16 MiB more
than the layer.

Expected: every allocation of the rebuild is bounded by what the signed manifest declares (the
layer's size, the base layer's, the delta's): a patch whose target size differs from the
manifest's layer size is refused before its body is decoded, and a tar body that inflates past
what a target of that size can need is cut off there; both with one clear error. The rebuild
runs through the real path (`mesh.image.materialize_release` on a signed, verified release, the
base layer a real file, the blobs fetched by id) in a child process, whose peak RSS
(`resource.getrusage`) must stay within a bound tied to the declared sizes. An honest delta is
rebuilt within the same bound.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import blake3
import pytest
from backports import zstd
from nacl.signing import SigningKey

from mesh.delta import Method, create_delta, read_header
from mesh.delta._container import FLAG_BARE, FORMAT_VERSION, MAGIC, varint
from mesh.release import (
    Layer,
    LayerDelta,
    ReleaseManifest,
    chunk_layer,
    encode_signed_manifest,
    sign_manifest,
)
from tests.release._fakes import diff_id, image_config, layer_tar

MiB = 1024 * 1024
# What the rebuild may take on top of the declared sizes: the decoders' fixed state (zstd's
# context, the LZMA2 decoder), Python's allocator arenas, the image tar's writer.
FIXED_OVERHEAD = 8 * MiB
# Per declared byte: the base (read or mapped), the decoded body (bounded by the target), the
# target itself; 3 x is what the tar method's replay can hold at once.
PER_DECLARED_BYTE = 3

# The rebuild runs in a process forked by the child: Linux carries a process's peak RSS across
# execve (the child would report pytest's), not across fork, so the fork's ru_maxrss is its own.
CHILD = r"""
import json, os, resource, sys
from pathlib import Path
from nacl.signing import VerifyKey
from mesh.image import materialize_release
from mesh.release import ReleaseError, verify_release

spec = json.loads(Path(sys.argv[1]).read_text())
blobs = Path(spec["blobs"])
release = verify_release(Path(spec["manifest"]).read_bytes(), VerifyKey(bytes.fromhex(spec["key"])))
fetch = lambda blob_hex: (blobs / blob_hex).read_bytes()
pid = os.fork()
if pid == 0:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    error = None
    try:
        materialize_release(release, fetch, {spec["base_id"]: spec["base"]}, spec["work"], "t:2")
    except ReleaseError as exc:
        error = f"{type(exc).__name__}: {exc}"
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"before_kib": before, "after_kib": after, "error": error}), flush=True)
    os._exit(0)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _files(seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {f"app/{i:03d}.bin": rng.randbytes(4000) for i in range(64)}


BASE = layer_tar(_files(1))
_new = _files(1)
_new["app/007.bin"] = b"changed" + _new["app/007.bin"][7:]
_new["app/VERSION"] = b"2\n"
TARGET = layer_tar(_new)


def zeros_frame(n: int, options: dict[int, int] | None = None) -> bytes:
    """A zstd frame of `n` zero bytes, compressed piecewise (a few KB for hundreds of MiB)."""
    comp = zstd.ZstdCompressor(options=options or {
        zstd.CompressionParameter.compression_level: 19})
    piece = bytes(MiB)
    out = [comp.compress(piece[:min(MiB, n - i)]) for i in range(0, n, MiB)]
    return b"".join(out) + comp.flush()


def bare_tar_patch(target_size: int, inflated: int) -> bytes:
    """A bare TAR_MEMBERS patch declaring `target_size`, whose body (flag 0: plain zstd)
    inflates to `inflated` zero bytes: no op table a real encoder would write."""
    header = MAGIC + bytes([FORMAT_VERSION, int(Method.TAR_MEMBERS) | FLAG_BARE])
    return header + varint(target_size) + b"\x00" + zeros_frame(inflated)


def bare_prefix_patch(target_size: int, inflated: int) -> bytes:
    """A bare ZSTD_PREFIX patch declaring `target_size`, its one frame inflating to `inflated`
    zero bytes (stored as the engine stores frames: without their constant first 5 bytes)."""
    frame = zeros_frame(inflated, {zstd.CompressionParameter.compression_level: 19,
                                   zstd.CompressionParameter.window_log: 17,
                                   zstd.CompressionParameter.content_size_flag: 0,
                                   zstd.CompressionParameter.checksum_flag: 0,
                                   zstd.CompressionParameter.dict_id_flag: 0})
    assert frame[:5] == b"\x28\xb5\x2f\xfd\x00"
    header = MAGIC + bytes([FORMAT_VERSION, int(Method.ZSTD_PREFIX) | FLAG_BARE])
    return header + varint(target_size) + frame[5:]


def rebuild(tmp: Path, patch: bytes) -> tuple[dict[str, object], int]:
    """Publish v2 = [TARGET] with `patch` as its delta from BASE (signed, chunks too), rebuild
    it in a child; (the child's report, the bound on its peak RSS growth in KiB)."""
    key = SigningKey(b"\x02" * 32)
    blobs = tmp / "blobs"
    blobs.mkdir()
    chunks = chunk_layer(TARGET, chunk_size=64 * 1024)
    for c in chunks:
        (blobs / c.ref.id.hex()).write_bytes(c.data)
    blob_id = blake3.blake3(patch).digest()
    (blobs / blob_id.hex()).write_bytes(patch)
    delta = LayerDelta(diff_id(BASE), blob_id, len(patch), read_header(patch).method.name)
    layer = Layer(diff_id(TARGET), len(TARGET), tuple(c.ref for c in chunks), (delta,))
    manifest = ReleaseManifest("cams", "web", 2, 1_700_000_000, image_config([TARGET]),
                               (layer,))
    (tmp / "manifest").write_bytes(encode_signed_manifest(sign_manifest(manifest, key)))
    (tmp / "base.tar").write_bytes(BASE)
    spec = {"blobs": str(blobs), "manifest": str(tmp / "manifest"),
            "key": bytes(key.verify_key).hex(), "base_id": diff_id(BASE),
            "base": str(tmp / "base.tar"), "work": str(tmp / "work")}
    (tmp / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp / "spec.json")],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    declared = layer.size + len(BASE) + delta.size
    return report, (PER_DECLARED_BYTE * declared + FIXED_OVERHEAD) // 1024


def growth_kib(report: dict[str, object]) -> int:
    after, before = report["after_kib"], report["before_kib"]
    assert isinstance(after, int) and isinstance(before, int)
    return after - before


def test_an_honest_delta_is_rebuilt_within_the_bound(tmp_path: Path) -> None:
    patch = create_delta(BASE, TARGET, method=Method.TAR_MEMBERS, self_check=False)
    report, bound = rebuild(tmp_path, patch)
    assert report["error"] is None
    assert growth_kib(report) <= bound, (report, bound)
    assert len(list((tmp_path / "work").glob("*.tar"))) == 1


def test_a_delta_declaring_a_larger_target_than_the_manifest_is_refused_unread(
        tmp_path: Path) -> None:
    """Under 10 KB of patch: a 150 MiB target (the manifest's layer is ~290 KB), a body
    inflating to 300 MiB (before: +610 MiB of peak RSS, then "unused data")."""
    patch = bare_tar_patch(150 * MiB, 300 * MiB)
    assert len(patch) < 10 * 1024 and read_header(patch).target_size == 150 * MiB
    report, bound = rebuild(tmp_path, patch)
    assert growth_kib(report) <= bound, (report, bound)
    assert report["error"] == (
        f"MaterializeError: layer {diff_id(TARGET)[:19]}: delta from {diff_id(BASE)[:19]} "
        f"declares a {150 * MiB}-byte target, the manifest's layer has {len(TARGET)} bytes")
    assert list((tmp_path / "work").iterdir()) == []


@pytest.mark.parametrize("inflated", [2 * len(TARGET) + 16 * MiB, 64 * MiB])
def test_a_tar_delta_body_inflating_past_its_target_is_cut_off(tmp_path: Path,
                                                               inflated: int) -> None:
    """The header declares the manifest's layer size; the body inflates to 2 x that + 16 MiB
    (the old limit) or beyond it: cut off once it exceeds what a target of that size needs
    (before: +44 MiB of peak RSS for either)."""
    report, bound = rebuild(tmp_path, bare_tar_patch(len(TARGET), inflated))
    assert growth_kib(report) <= bound, (report, bound)
    error = report["error"]
    assert isinstance(error, str) and error.startswith("MaterializeError: layer ")
    assert "corrupt tar-delta body" in error and "\n" not in error
    assert list((tmp_path / "work").iterdir()) == []


def test_a_zstd_prefix_delta_inflating_past_its_target_is_cut_off(tmp_path: Path) -> None:
    """The same bomb in the other zstd method: its decoder writes into the target piece by
    piece and stops one byte past it."""
    report, bound = rebuild(tmp_path, bare_prefix_patch(len(TARGET), 64 * MiB))
    assert growth_kib(report) <= bound, (report, bound)
    error = report["error"]
    assert isinstance(error, str) and error.startswith("MaterializeError: layer ")
    assert "corrupt zstd frame" in error
