"""The streaming apply (`apply_delta_file`) and the method whose apply streams (TAR_STREAM)."""

from __future__ import annotations

import hashlib
import io
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.delta import (
    DeltaError,
    Method,
    _stream,
    apply_delta,
    apply_delta_file,
    create_delta,
    read_header,
)
from tests.release.test_delta_engine import _diff_id, _tar


def _apply_file(tmp: Path, old: bytes, patch: bytes, diff_id: str | None) -> bytes:
    (tmp / "old").write_bytes(old)
    (tmp / "patch").write_bytes(patch)
    got = apply_delta_file(tmp / "old", tmp / "patch", tmp / "out", diff_id)
    out = (tmp / "out").read_bytes()
    assert got == _diff_id(out)
    return out


_NAMES = ["a", "b/c", "d/e.py", "x/e.py", "f.so", "pkg-1.0.dist-info/RECORD",
          "pkg-1.1.dist-info/RECORD", "lib/libz-0cf96a72.so.1"]


@st.composite
def _tar_pair(draw: st.DrawFn) -> tuple[bytes, bytes]:
    files = draw(st.dictionaries(st.sampled_from(_NAMES), st.binary(max_size=3000), max_size=6))
    new = dict(files)
    for name in draw(st.lists(st.sampled_from(_NAMES), max_size=4)):
        base = new.get(name, b"")
        pos = draw(st.integers(0, len(base)))
        new[name] = base[:pos] + draw(st.binary(max_size=200)) + base[pos + draw(
            st.integers(0, 300)):]
    for name in draw(st.lists(st.sampled_from(_NAMES), max_size=2)):
        new.pop(name, None)
    return _tar(files), _tar(new)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(_tar_pair(), st.sampled_from(list(Method)), st.booleans())
def test_streaming_apply_equals_in_memory_apply(tmp_path: Path, pair: tuple[bytes, bytes],
                                                method: Method, bare: bool) -> None:
    old, new = pair
    if method is Method.TAR_MEMBERS and not old:
        return
    patch = create_delta(old, new, method=method, self_check=not bare)
    diff_id = _diff_id(new)
    assert apply_delta(old, patch, diff_id) == new
    assert _apply_file(tmp_path, old, patch, diff_id) == new
    if not bare:  # a self-checking patch applies without the diff ID
        assert _apply_file(tmp_path, old, patch, None) == new


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(_tar_pair())
def test_small_pieces_round_trip(monkeypatch: pytest.MonkeyPatch, pair: tuple[bytes, bytes]
                                 ) -> None:
    """With tiny piece constants every changed member is cut into several PATCH records, each
    against a slice of its base, and literals and copies move in several pieces."""
    monkeypatch.setattr(_stream, "CHUNK_NEW", 512)
    monkeypatch.setattr(_stream, "CHUNK_OLD", 1024)
    monkeypatch.setattr(_stream, "PIECE", 100)
    old, new = pair
    patch = create_delta(old, new, method=Method.TAR_STREAM, self_check=False)
    assert apply_delta(old, patch, _diff_id(new)) == new


def test_changed_members_are_patched_and_renamed_versions_matched(tmp_path: Path) -> None:
    rng = random.Random(7)
    lib = rng.randbytes(300_000)
    gfortran = rng.randbytes(200_000)
    old = _tar({"keep.bin": rng.randbytes(100_000), "scipy.libs/libopenblas-23e5df77.so": lib,
                "scipy.libs/libgfortran-040039e1.so.5": gfortran,
                "pkg-1.0.dist-info/RECORD": b"x" * 900})
    new = _tar({"keep.bin": _member(old, "keep.bin"),
                # renamed with a new hash and a new suffix: matched by directory and stem
                "scipy.libs/libopenblas-9c1e04b4.dev.so":
                    lib[:150_000] + b"patched" + lib[150_007:],
                # renamed with a new hash only
                "scipy.libs/libgfortran-7f3e2b11.so.5": gfortran[:-1] + b"!",
                "pkg-1.1.dist-info/RECORD": b"x" * 901})
    patch = create_delta(old, new, method=Method.TAR_STREAM)
    assert len(patch) < 3000  # the copy and the renamed members' patches, not literals
    assert _apply_file(tmp_path, old, patch, _diff_id(new)) == new


def _member(tar: bytes, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        f = t.extractfile(name)
        assert f is not None
        return f.read()


def test_large_tars_default_to_the_streaming_method() -> None:
    old = _tar({"a": bytes(range(256)) * 64})
    new = _tar({"a": bytes(range(256)) * 63 + b"b" * 256})
    patch = create_delta(old, new, hdiff_max_input=1000)
    assert read_header(patch).method is Method.TAR_STREAM
    assert apply_delta(old, patch) == new
    # not tars: zstd windows, as before
    assert read_header(create_delta(b"x" * 900, b"y" * 900, hdiff_max_input=1000)
                       ).method is Method.ZSTD_WINDOWS


def test_failed_apply_leaves_no_file(tmp_path: Path) -> None:
    old = _tar({"a": b"1" * 5000})
    new = _tar({"a": b"1" * 4000 + b"2" * 1000})
    patch = create_delta(old, new, method=Method.TAR_STREAM, self_check=False)
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "out").write_bytes(b"previous")
    with pytest.raises(DeltaError, match="manifest wants"):
        apply_delta_file(tmp_path / "old", patch, tmp_path / "out", _diff_id(b"other"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "out"]
    assert (tmp_path / "out").read_bytes() == b"previous"
    with pytest.raises(DeltaError, match="cannot read"):
        apply_delta_file(tmp_path / "missing", patch, tmp_path / "out", _diff_id(new))
    with pytest.raises(DeltaError, match="bare patch needs"):
        apply_delta_file(tmp_path / "old", patch, tmp_path / "out")


_FUZZ_OLD = _tar({"lib.so": bytes(range(256)) * 200, "a.py": b"print(1)\n" * 300,
                  "pkg-1.0.dist-info/RECORD": b"a.py,sha256=abc,550\n", "gone": b"z" * 700})
_FUZZ_NEW = _tar({"lib.so": bytes(range(256)) * 100 + b"new" + bytes(range(256)) * 100,
                  "a.py": b"print(1)\n" * 300, "b.py": b"import os\n" * 20,
                  "pkg-1.1.dist-info/RECORD": b"a.py,sha256=abd,550\n"})


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_mutated_stream_patches_give_delta_error_only(tmp_path: Path,
                                                      data: st.DataObject) -> None:
    """Bare TAR_STREAM patches mutated anywhere (header included) on the file path: a
    DeltaError, or exactly the right bytes (a flip in an unused bit), and never a file left
    behind on failure."""
    patch = bytearray(create_delta(_FUZZ_OLD, _FUZZ_NEW, method=Method.TAR_STREAM,
                                   self_check=False))
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, len(patch) - 1))
        patch[pos] ^= data.draw(st.integers(1, 255))
    if data.draw(st.booleans()):
        del patch[data.draw(st.integers(0, len(patch) - 1)):]
    work = tmp_path / "fuzz"
    work.mkdir(exist_ok=True)
    (work / "old").write_bytes(_FUZZ_OLD)
    try:
        apply_delta_file(work / "old", bytes(patch), work / "out", _diff_id(_FUZZ_NEW))
    except DeltaError:
        assert sorted(p.name for p in work.iterdir()) == ["old"]
        return
    assert (work / "out").read_bytes() == _FUZZ_NEW
    (work / "out").unlink()


def test_mutated_stream_records_allocate_nothing_beyond_bounds(tmp_path: Path) -> None:
    """Record lengths rewritten to huge values inside a valid LZMA stream (what a flipped
    byte cannot reach: the stream's own coding), applied in a child capped at 512 MiB of
    address space: every one is refused before it is read or allocated."""
    code = f"""
import lzma, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (512 << 20, 512 << 20))
from mesh.delta import DeltaError, apply_delta_file
from mesh.delta._container import varint
from mesh.delta._stream import _LZMA_FILTERS
old, out = sys.argv[1], sys.argv[2]
target = {len(_FUZZ_NEW)}
header = b"FMD" + bytes([2, 6 | 0x80]) + varint(target)
huge = (1 << 62, 1 << 40, 1 << 31, 300 << 20, target + 1)
records = []
for n in huge:
    records += [b"\\0" + varint(n) + b"x" * 100,                         # literal
                b"\\1" + varint(0) + varint(n),                          # copy
                b"\\2" + varint(0) + varint(n) + varint(100) + varint(10) + b"y" * 10,
                b"\\2" + varint(0) + varint(100) + varint(n) + varint(10) + b"y" * 10,
                b"\\2" + varint(0) + varint(100) + varint(100) + varint(n) + b"y" * 10]
records += [b"\\3", b"\\0" + b"\\xff" * 11, b""]
for rec in records:
    body = lzma.compress(rec, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    try:
        apply_delta_file(old, header + body, out, "sha256:" + "0" * 64)
    except DeltaError as exc:
        assert not isinstance(exc.__context__, MemoryError), exc
    else:
        raise SystemExit("accepted " + repr(rec[:20]))
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print("ok", hwm)
"""
    (tmp_path / "old").write_bytes(_FUZZ_OLD)
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "old"),
                           str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("ok")
    assert int(proc.stdout.split()[1]) < 100 * 1024  # KiB
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


_MIB = 1 << 20


def _write_layer(path: Path, members: list[tuple[str, int, int]], edits: bool) -> None:
    """A tar of (name, size, seed) members of pseudo-random bytes, written member by member;
    with `edits`, every 8th member and the big one get a few changed bytes."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for i, (name, size, seed) in enumerate(members):
            data = bytearray(random.Random(seed).randbytes(size))
            if edits and (i % 8 == 3 or size > 32 * _MIB):
                for pos in range(1000, size, size // 5 + 1):
                    data[pos:pos + 16] = b"edited-by-test.."
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(data))
            del data


def test_streaming_apply_of_a_300_mib_layer_stays_under_128_mib(tmp_path: Path) -> None:
    """A 300 MiB layer on disk (unchanged, edited, removed and added members, one 48 MiB
    member edited in several places), applied by `fleetmesh delta apply` in a child process:
    its peak resident memory (VmHWM) stays far below the layer, and the output is exact."""
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"fm-stream-{os.getpid()}"
    work.mkdir()
    try:
        members = [(f"usr/lib/m{i:03}.so", 2 * _MIB, i) for i in range(130)]
        members.append(("usr/lib/big.so", 48 * _MIB, 999))
        old_members = [*members, ("usr/lib/gone.so", 3 * _MIB, 1001)]
        new_members = [*members, ("usr/lib/added.so", _MIB, 1002)]
        _write_layer(work / "old.tar", old_members, edits=False)
        _write_layer(work / "new.tar", new_members, edits=True)
        assert (work / "new.tar").stat().st_size > 300 * _MIB
        patch = create_delta(work / "old.tar", work / "new.tar", self_check=False,
                             hdiff_max_input=256 * _MIB)
        assert read_header(patch).method is Method.TAR_STREAM
        assert len(patch) < 4 * _MIB  # the added member and the edits, not the layer
        (work / "patch").write_bytes(patch)
        del patch
        with open(work / "new.tar", "rb") as f:
            diff_id = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
        code = (
            "import sys\n"
            "from ops.cli import main\n"
            "rc = main(['delta', 'apply', *sys.argv[1:]])\n"
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')]\n"
            "print('hwm', hwm[0].split()[1], rc)\n")
        proc = subprocess.run(
            [sys.executable, "-c", code, str(work / "old.tar"), str(work / "patch"),
             str(work / "out.tar"), "--expect", diff_id],
            capture_output=True, text=True, timeout=900, check=False,
            cwd=Path(__file__).parents[2])
        assert proc.returncode == 0, proc.stderr[-2000:]
        lines = proc.stdout.splitlines()
        assert lines[0].endswith(diff_id)
        _, hwm, rc = lines[-1].split()
        assert rc == "0"
        print(f"apply peak RSS (VmHWM) {int(hwm) // 1024} MiB")  # shown with -s
        assert int(hwm) < 128 * 1024, f"peak RSS {int(hwm) // 1024} MiB"  # KiB
        with open(work / "out.tar", "rb") as f:
            assert "sha256:" + hashlib.file_digest(f, "sha256").hexdigest() == diff_id
    finally:
        for p in work.iterdir():
            p.unlink()
        work.rmdir()
