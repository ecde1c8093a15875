from __future__ import annotations

import dataclasses
import hashlib
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.delta import (
    BARE_HEADER_MIN,
    DEFAULT_MAX_TARGET,
    HEADER_MIN,
    DeltaError,
    Method,
    apply_delta,
    create_delta,
    read_header,
)
from mesh.delta._container import varint
from mesh.image import plan_layer


def _diff_id(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@st.composite
def _edited(draw: st.DrawFn) -> tuple[bytes, bytes]:
    old = draw(st.binary(max_size=2048))
    new = bytearray(old)
    for _ in range(draw(st.integers(0, 6))):
        pos = draw(st.integers(0, len(new)))
        kind = draw(st.sampled_from(["insert", "delete", "replace"]))
        chunk = draw(st.binary(min_size=1, max_size=64))
        if kind == "insert":
            new[pos:pos] = chunk
        elif kind == "delete":
            del new[pos:pos + len(chunk)]
        else:
            new[pos:pos + len(chunk)] = chunk
    return old, bytes(new)


_FAST = settings(max_examples=40, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])


@_FAST
@given(st.binary(max_size=2048), st.binary(max_size=2048))
def test_random_bytes_round_trip(old: bytes, new: bytes) -> None:
    patch = create_delta(old, new)
    assert apply_delta(old, patch, _diff_id(new)) == new


@_FAST
@given(_edited(), st.sampled_from(list(Method)))
def test_random_edits_round_trip_every_method(pair: tuple[bytes, bytes], method: Method) -> None:
    old, new = pair
    if method in (Method.TAR_MEMBERS, Method.TAR_STREAM):
        return  # needs tars: covered below (and in test_delta_stream)
    patch = create_delta(old, new, method=method)
    assert read_header(patch).method is method
    assert apply_delta(old, patch, _diff_id(new)) == new


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            tar.addfile(info, io.BytesIO(files[name]))
    return buf.getvalue()


@settings(max_examples=15, deadline=None)
@given(st.dictionaries(st.sampled_from(["a", "b/c", "d/e.py", "f.so", "g"]),
                       st.binary(max_size=3000), max_size=5),
       st.dictionaries(st.sampled_from(["a", "b/c", "d/e.py", "x/e.py", "f.so"]),
                       st.binary(max_size=3000), max_size=5))
def test_tar_members_round_trip(old_files: dict[str, bytes], new_files: dict[str, bytes]) -> None:
    old, new = _tar(old_files), _tar({**old_files, **new_files})
    patch = create_delta(old, new, method=Method.TAR_MEMBERS)
    assert apply_delta(old, patch, _diff_id(new)) == new


def test_tar_members_copies_unchanged_and_patches_changed() -> None:
    blob = bytes(range(256)) * 400
    old = _tar({"keep.bin": blob, "lib.so": blob[::-1], "pkg-1.0.dist-info/RECORD": b"x" * 900})
    new = _tar({"keep.bin": blob, "lib.so": blob[::-1][:50000] + b"patched" + blob[50007:],
                "pkg-1.1.dist-info/RECORD": b"x" * 901})
    patch = create_delta(old, new, method=Method.TAR_MEMBERS)
    assert len(patch) < 2000
    assert apply_delta(old, patch) == new


def test_path_inputs(tmp_path: pytest.TempPathFactory) -> None:
    old_p, new_p = tmp_path / "old", tmp_path / "new"  # type: ignore[operator]
    old_p.write_bytes(b"hello world " * 1000)
    new_p.write_bytes(b"hello there " * 1000)
    patch = create_delta(old_p, new_p)
    assert apply_delta(old_p, patch) == new_p.read_bytes()


def test_large_inputs_switch_to_windows() -> None:
    old = bytes(range(256)) * 64
    new = old[:8000] + b"change" + old[8000:]
    patch = create_delta(old, new, hdiff_max_input=1000)
    assert read_header(patch).method is Method.ZSTD_WINDOWS
    assert apply_delta(old, patch) == new


_OLD = b"the quick brown fox jumps over the lazy dog " * 200
_NEW = _OLD.replace(b"lazy", b"sleepy")


@pytest.mark.parametrize("cut", [0, 3, HEADER_MIN - 1, HEADER_MIN, HEADER_MIN + 5, -1])
def test_truncated_patch_raises(cut: int) -> None:
    patch = create_delta(_OLD, _NEW)
    with pytest.raises(DeltaError):
        apply_delta(_OLD, patch[:cut])


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_corrupted_patch_raises(data: st.DataObject) -> None:
    patch = bytearray(create_delta(_OLD, _NEW, method=data.draw(st.sampled_from(
        [Method.HDIFF, Method.ZSTD_WINDOWS, Method.FULL]))))
    pos = data.draw(st.integers(0, len(patch) - 1))
    patch[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(DeltaError):
        apply_delta(_OLD, bytes(patch), _diff_id(_NEW))


def test_wrong_base_and_wrong_expected_id() -> None:
    patch = create_delta(_OLD, _NEW)
    with pytest.raises(DeltaError, match="made against"):
        apply_delta(_OLD + b"x", patch)
    with pytest.raises(DeltaError, match="manifest wants"):
        apply_delta(_OLD, patch, _diff_id(b"other"))


def test_plan_layer_picks_best_base_or_full() -> None:
    far = bytes(reversed(_OLD))
    plan = plan_layer(_NEW, {_diff_id(far): far, _diff_id(_OLD): _OLD}, full_size=10**6,
                      try_tar=True)
    assert plan.source_diff_id == _diff_id(_OLD) and plan.patch is not None
    assert read_header(plan.patch).bare  # the manifest form
    assert apply_delta(_OLD, plan.patch, _diff_id(_NEW)) == _NEW
    assert len(plan.tried) >= 2
    unrelated = plan_layer(b"abc", {_diff_id(_OLD): _OLD})
    assert unrelated.patch is None and unrelated.wire_size == unrelated.full_size


def test_plan_in_a_pool_is_the_plan_made_one_diff_after_the_other() -> None:
    """start_plan runs the diffs concurrently, longest first; the choice must still be the
    first smallest in candidate then method order, as create_delta makes them one by one."""
    from concurrent.futures import ThreadPoolExecutor

    from mesh.image import start_plan

    other = _TAR_OLD.replace(b"print('x')", b"print('z')")
    candidates = {_diff_id(_TAR_OLD): _TAR_OLD, _diff_id(other): other}
    expected = []
    for source_id, old in candidates.items():
        for method in (None, Method.TAR_MEMBERS, Method.TAR_STREAM, Method.ZSTD_PREFIX):
            patch = create_delta(old, _TAR_NEW, method=method, self_check=False)
            expected.append((source_id, read_header(patch).method.name, patch))
    best = min(expected, key=lambda t: len(t[2]))  # min keeps the first of equals
    with ThreadPoolExecutor(max_workers=3) as pool:
        pooled = start_plan(_TAR_NEW, candidates, pool=pool).result(10**6)
    for plan in (pooled, plan_layer(_TAR_NEW, candidates, full_size=10**6)):
        assert plan.tried == tuple((s, m, len(b)) for s, m, b in expected)
        assert (plan.source_diff_id, plan.patch) == (best[0], best[2])


_TAR_OLD = _tar({"a/lib.so": bytes(range(256)) * 40, "a/x.py": b"print('x')\n" * 50,
                 "pkg-1.0.dist-info/RECORD": b"a/x.py,sha256=abc,550\n"})
_TAR_NEW = _tar({"a/lib.so": bytes(range(256)) * 20 + b"new" + bytes(range(256)) * 20,
                 "a/x.py": b"print('y')\n" * 50, "a/new.py": b"import os\n",
                 "pkg-1.1.dist-info/RECORD": b"a/x.py,sha256=abd,550\n"})


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(list(Method)), st.data())
def test_crafted_body_with_valid_digest_raises_delta_error(method: Method,
                                                           data: st.DataObject) -> None:
    """Bodies that pass the digest check (a hostile patch) still only ever raise DeltaError."""
    import blake3

    from mesh.delta._container import SHORT_DIGEST, pack_header, parse_header

    patch = create_delta(_TAR_OLD, _TAR_NEW, method=method)
    header = parse_header(patch)
    body = bytearray(patch[header.header_size:])
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, len(body) - 1))
        body[pos] ^= data.draw(st.integers(1, 255))
    if data.draw(st.booleans()):
        del body[data.draw(st.integers(0, len(body) - 1)):]
    crafted = pack_header(dataclasses.replace(
        header, body_blake3_prefix=blake3.blake3(bytes(body)).digest()[:SHORT_DIGEST]))
    try:
        out = apply_delta(_TAR_OLD, crafted + bytes(body))
    except DeltaError:
        return
    assert out == _TAR_NEW  # a flip in padding or an unused field may be harmless


def test_tar_patch_truncated_or_against_non_tar() -> None:
    patch = create_delta(_TAR_OLD, _TAR_NEW, method=Method.TAR_MEMBERS)
    for cut in (len(patch) // 2, len(patch) - 1):
        with pytest.raises(DeltaError):
            apply_delta(_TAR_OLD, patch[:cut])
    with pytest.raises(DeltaError):
        create_delta(b"not a tar" * 100, _TAR_NEW, method=Method.TAR_MEMBERS)


def test_header_is_compact_and_carries_a_digest_prefix() -> None:
    patch = create_delta(_OLD, _NEW)
    header = read_header(patch)
    assert header.header_size <= 40  # format 1 carried the full sha256: ~60 bytes
    assert header.target_sha256_prefix == hashlib.sha256(_NEW).digest()[:8]
    assert header.matches_diff_id(_diff_id(_NEW)) and not header.matches_diff_id(_diff_id(b"x"))
    assert header.target_short_id == "sha256:" + hashlib.sha256(_NEW).hexdigest()[:16] + "..."
    assert not header.bare


@pytest.mark.parametrize("version", [0, 1, 3, 255])
def test_old_or_unknown_format_version_is_refused(version: int) -> None:
    patch = bytearray(create_delta(_OLD, _NEW))
    patch[3] = version
    with pytest.raises(DeltaError, match=f"unsupported patch format version {version}"):
        apply_delta(_OLD, bytes(patch), _diff_id(_NEW))
    with pytest.raises(DeltaError, match="format version"):
        read_header(bytes(patch))


def test_format_1_patch_is_refused() -> None:
    """A patch as format 1 wrote it (full 32-byte target digest) is refused as such."""
    from mesh.delta._container import MAGIC, varint

    old_style = (MAGIC + bytes([1, int(Method.FULL)]) + varint(len(_NEW))
                 + hashlib.sha256(_NEW).digest() + varint(len(_OLD)) + bytes(16) + b"body")
    with pytest.raises(DeltaError, match="version 1"):
        apply_delta(_OLD, old_style, _diff_id(_NEW))


def test_expected_diff_id_is_checked_in_full() -> None:
    """The header has only a prefix of the target digest; the manifest's diff ID is checked
    whole against the output, and a malformed one is refused."""
    patch = create_delta(_OLD, _NEW)
    good = _diff_id(_NEW)
    same_prefix = good[:7 + 16] + ("0" if good[-1] != "0" else "1") * (64 - 16)
    with pytest.raises(DeltaError, match="manifest wants"):
        apply_delta(_OLD, patch, same_prefix)
    with pytest.raises(DeltaError, match="not a sha256 diff ID"):
        apply_delta(_OLD, patch, "sha256:abc")
    assert apply_delta(_OLD, patch, good) == _NEW


def test_zstd_prefix_frames_are_trimmed_and_round_trip() -> None:
    patch = create_delta(_OLD, _NEW, method=Method.ZSTD_PREFIX)
    header = read_header(patch)
    assert not patch[header.header_size:].startswith(b"\x28\xb5\x2f\xfd")  # magic stripped
    assert apply_delta(_OLD, patch, _diff_id(_NEW)) == _NEW
    assert apply_delta(b"", create_delta(b"", _NEW, method=Method.ZSTD_PREFIX)) == _NEW


# ---- bare patches (the manifest form: no digests in the header) ------------------------------

def _bare(method: Method | None = None, old: bytes = _TAR_OLD, new: bytes = _TAR_NEW) -> bytes:
    return create_delta(old, new, method=method, self_check=False)


@_FAST
@given(_edited(), st.sampled_from([m for m in Method
                                   if m not in (Method.TAR_MEMBERS, Method.TAR_STREAM)]))
def test_bare_patch_round_trip(pair: tuple[bytes, bytes], method: Method) -> None:
    old, new = pair
    patch = _bare(method, old, new)
    header = read_header(patch)
    assert header.bare and header.method is method and header.target_size == len(new)
    assert header.target_short_id is None and header.source_size is None
    assert apply_delta(old, patch, _diff_id(new)) == new


@pytest.mark.parametrize("method", list(Method))
def test_bare_patch_is_the_self_checking_one_minus_its_digests(method: Method) -> None:
    full, bare = (create_delta(_TAR_OLD, _TAR_NEW, method=method, self_check=check)
                  for check in (True, False))
    full_header, bare_header = read_header(full), read_header(bare)
    assert full[full_header.header_size:] == bare[bare_header.header_size:]
    # magic, format, method|flag, target length: nothing else
    assert bare_header.header_size == BARE_HEADER_MIN + len(varint(len(_TAR_NEW))) - 1
    assert full_header.header_size - bare_header.header_size >= 3 * 8
    assert apply_delta(_TAR_OLD, bare, _diff_id(_TAR_NEW)) == _TAR_NEW


def test_bare_patch_without_expected_diff_id_is_refused() -> None:
    with pytest.raises(DeltaError, match=r"^a bare patch needs the expected diff ID \(it carries "
                                         r"no digest of its own\)$"):
        apply_delta(_TAR_OLD, _bare())


def test_bare_patch_with_wrong_expected_diff_id_is_refused() -> None:
    patch = _bare()
    good = _diff_id(_TAR_NEW)
    same_prefix = good[:7 + 16] + ("0" if good[-1] != "0" else "1") * (64 - 16)
    for wrong in (_diff_id(b"other"), same_prefix):
        with pytest.raises(DeltaError, match="manifest wants"):
            apply_delta(_TAR_OLD, patch, wrong)
    with pytest.raises(DeltaError, match="not a sha256 diff ID"):
        apply_delta(_TAR_OLD, patch, "sha256:abc")
    # a wrong base is caught by the output check (the manifest's source diff ID guards it first)
    with pytest.raises(DeltaError):
        apply_delta(_TAR_OLD + b"x", patch, good)


@pytest.mark.parametrize("method", list(Method))
def test_truncated_bare_patch_raises(method: Method) -> None:
    patch = _bare(method)
    for cut in {0, 3, 4, 5, 6, BARE_HEADER_MIN, BARE_HEADER_MIN + 3, len(patch) // 2,
                len(patch) - 1}:
        with pytest.raises(DeltaError):
            apply_delta(_TAR_OLD, patch[:cut], _diff_id(_TAR_NEW))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(list(Method)), st.data())
def test_corrupted_bare_patch_raises(method: Method, data: st.DataObject) -> None:
    """No digest stands between a bare body and the C decoders: a corrupted one (header
    included) still only ever raises DeltaError, or yields exactly the right bytes."""
    patch = bytearray(_bare(method))
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, len(patch) - 1))
        patch[pos] ^= data.draw(st.integers(1, 255))
    if data.draw(st.booleans()):
        del patch[data.draw(st.integers(0, len(patch) - 1)):]
    try:
        out = apply_delta(_TAR_OLD, bytes(patch), _diff_id(_TAR_NEW))
    except DeltaError:
        return
    assert out == _TAR_NEW  # a flip in padding or an unused field may be harmless


_HUGE_LENGTHS = (len(_TAR_NEW) + 1, len(_TAR_NEW) - 1, 0, 1 << 27, (1 << 32) + 5,
                 DEFAULT_MAX_TARGET, DEFAULT_MAX_TARGET + 1, 1 << 63, (1 << 70) - 1)


def _with_target_length(patch: bytes, length: int) -> bytes:
    header = read_header(patch)
    return patch[:5] + varint(length) + patch[header.header_size:]


@pytest.mark.parametrize("method", list(Method))
def test_bare_patch_with_corrupt_length_varint_raises(method: Method) -> None:
    patch = _bare(method)
    for length in _HUGE_LENGTHS:
        with pytest.raises(DeltaError):
            apply_delta(_TAR_OLD, _with_target_length(patch, length), _diff_id(_TAR_NEW))
    for bad in (b"\xff" * 10 + b"\x01", b"\x80", b"\xff\xff"):  # overlong, truncated
        with pytest.raises(DeltaError, match="varint|truncated"):
            apply_delta(_TAR_OLD, patch[:5] + bad, _diff_id(_TAR_NEW))


def test_corrupt_length_varint_allocates_nothing_huge() -> None:
    """In a child process capped at 1 GiB of address space: lengths up to the 8 GiB default
    limit in a bare patch's header are refused before any decoder allocates from them."""
    code = f"""
import hashlib, resource, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
import test_delta_engine as t
from mesh.delta import DeltaError, Method, create_delta
for method in Method:
    patch = create_delta(t._TAR_OLD, t._TAR_NEW, method=method, self_check=False)
    for length in t._HUGE_LENGTHS:
        try:
            t.apply_delta(t._TAR_OLD, t._with_target_length(patch, length),
                          t._diff_id(t._TAR_NEW))
        except DeltaError as exc:
            # zstd's own "Frame requires too much memory" is a refusal, not an allocation
            assert not isinstance(exc.__context__, MemoryError), exc
        else:
            raise SystemExit("accepted a wrong length")
# VmHWM, not ru_maxrss: the kernel keeps ru_maxrss across exec, so a child of a large pytest
# process would report the parent's peak; VmHWM belongs to this process's own memory map
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print("ok", hwm)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("ok")
    assert int(proc.stdout.split()[1]) < 400 * 1024  # KiB


def test_hdiff_body_declaring_another_size_is_refused_before_decoding() -> None:
    from mesh.delta._hdiff import declared_sizes

    patch = _bare(Method.HDIFF, _OLD, _NEW)
    body = patch[read_header(patch).header_size:]
    assert declared_sizes(body) == (len(_NEW), len(_OLD))
    with pytest.raises(DeltaError, match="declared sizes"):
        apply_delta(_OLD[:-1], patch, _diff_id(_NEW))


def test_hdiff_stream_asking_for_a_huge_window_is_refused_before_decoding() -> None:
    """A body whose LZMA stream declares a 4 GiB dictionary (which HDiffPatch would allocate)
    is refused by the checks in front of the C decoder."""
    from mesh.delta._hdiff import _head

    patch = _bare(Method.HDIFF)
    start = read_header(patch).header_size
    codec, fields, pos = _head(patch[start:])
    assert codec == b"lzma"  # the smaller codec on this pair
    pos += fields[4] or fields[3]  # skip the first stream to a compressed one
    assert fields[6] and patch[start + pos] == 5  # props size, then lc/lp/pb, then dictionary
    crafted = bytearray(patch)
    crafted[start + pos + 2:start + pos + 6] = b"\xff\xff\xff\xff"
    with pytest.raises(DeltaError, match="dictionary too large"):
        apply_delta(_TAR_OLD, bytes(crafted), _diff_id(_TAR_NEW))


def test_multi_piece_outputs_round_trip_and_truncation_is_refused() -> None:
    """Targets larger than the decoders' output pieces (256 KiB) and input pieces (64 KiB),
    written in place into the preallocated output (mesh.delta._output)."""
    import random

    rng = random.Random(7)
    member = bytes(rng.getrandbits(8) for _ in range(300_000))
    old = _tar({"a.so": member * 3, "b.so": member[::-1], "c.txt": b"x" * 700_000})
    new = _tar({"a.so": member * 2 + b"patched" + member, "b.so": member[::-1][:-5] + b"1",
                "c.txt": b"x" * 700_001, "d.txt": member[:1000]})
    for method in (Method.ZSTD_PREFIX, Method.FULL, Method.TAR_MEMBERS, Method.HDIFF):
        patch = create_delta(old, new, method=method, self_check=False)
        assert apply_delta(old, patch, _diff_id(new)) == new, method
        with pytest.raises(DeltaError):
            apply_delta(old, patch[:-1], _diff_id(new))
        with pytest.raises(DeltaError):
            apply_delta(old, patch + b"\0", _diff_id(new))
    patch = create_delta(old, new, method=Method.ZSTD_WINDOWS)
    assert apply_delta(old, patch, _diff_id(new)) == new
    patch = create_delta(old, new, hdiff_max_input=1000)  # tars above the limit: streaming
    assert read_header(patch).method is Method.TAR_STREAM
    assert apply_delta(old, patch, _diff_id(new)) == new
