from __future__ import annotations

import dataclasses
import hashlib
import io
import tarfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.delta import (
    HEADER_MIN,
    DeltaError,
    Method,
    apply_delta,
    create_delta,
    plan_layer,
    read_header,
)


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
    if method is Method.TAR_MEMBERS:
        return  # needs tars: covered below
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
    assert apply_delta(_OLD, plan.patch) == _NEW
    assert len(plan.tried) >= 2
    unrelated = plan_layer(b"abc", {_diff_id(_OLD): _OLD})
    assert unrelated.patch is None and unrelated.wire_size == unrelated.full_size


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
