"""Image tars in and out (`read_saved_image`, `build_loadable_image`) and the device-side
rebuild of a release (`materialize_release`): each path, and each rejection leaving no file."""

from __future__ import annotations

import json
import random
import tarfile
from collections.abc import Callable
from pathlib import Path

import blake3
import pytest
from nacl.signing import SigningKey

from mesh.delta import read_header
from mesh.image import (
    ImageError,
    MaterializeError,
    build_loadable_image,
    materialize_release,
    plan_layer,
    read_saved_image,
)
from mesh.release import (
    ChunkError,
    Layer,
    LayerDelta,
    ManifestError,
    ReleaseManifest,
    SignedManifest,
    VerificationError,
    chunk_layer,
    decode_signed_manifest,
    encode_signed_manifest,
    sign_manifest,
    verify_release,
)

from ._fakes import diff_id, image_config, layer_tar, saved_image_tar


def _payload(seed: int, n: int = 40) -> dict[str, bytes]:
    rng = random.Random(seed)
    files = {}
    for i in range(n):
        files[f"app/data/{i:03d}.json"] = json.dumps(
            {"id": i, "values": [rng.randrange(1000) for _ in range(200)]}).encode()
        files[f"app/bin/{i:03d}.bin"] = rng.randbytes(2000)
    return files


BASE = layer_tar({"bin/busybox": random.Random(1).randbytes(50_000)})
APP1 = layer_tar(_payload(7))
_files2 = _payload(7)
_files2["app/data/003.json"] = b'{"changed": true}'
_files2["app/VERSION"] = b"2\n"
APP2 = layer_tar(_files2)


# --------------------------------------------------------------------------- reading / writing


@pytest.mark.parametrize("layout", ["legacy", "oci"])
def test_read_saved_image_both_layouts(tmp_path: Path, layout: str) -> None:
    tar = saved_image_tar(tmp_path / "img.tar", [BASE, APP1], layout=layout)
    image = read_saved_image(tar)
    assert image.config_bytes == image_config([BASE, APP1])
    assert [x.diff_id for x in image.layers] == [diff_id(BASE), diff_id(APP1)]
    assert [x.data for x in image.layers] == [BASE, APP1]
    assert [x.size for x in image.layers] == [len(BASE), len(APP1)]
    assert image.repo_tags == ("fleetmesh-test/app:1",)
    # Extracted: files named by diff ID, same bytes.
    extracted = read_saved_image(tar, tmp_path / "layers")
    for layer, data in zip(extracted.layers, [BASE, APP1], strict=True):
        assert isinstance(layer.data, Path) and layer.data.read_bytes() == data
        assert layer.data.name == layer.diff_id.removeprefix("sha256:") + ".tar"
    assert not list((tmp_path / "layers").glob("*.part"))


def test_read_saved_image_follows_docker_layer_symlinks(tmp_path: Path) -> None:
    tar = saved_image_tar(tmp_path / "img.tar", [BASE, BASE], duplicate_symlink=True)
    image = read_saved_image(tar, tmp_path / "layers")
    assert [x.diff_id for x in image.layers] == [diff_id(BASE)] * 2


@pytest.mark.parametrize("layout", ["legacy", "oci"])
def test_layer_not_matching_its_diff_id_is_refused(tmp_path: Path, layout: str) -> None:
    config = image_config([BASE, APP1])
    tar = saved_image_tar(tmp_path / "img.tar", [BASE, APP2], config, layout=layout)
    with pytest.raises(ImageError, match="layer 1 .* hashes to .* config says"):
        read_saved_image(tar, tmp_path / "layers")
    assert not list((tmp_path / "layers").glob("*" + diff_id(APP2)[7:] + "*"))


def test_not_an_image_tar(tmp_path: Path) -> None:
    (tmp_path / "junk.tar").write_bytes(b"nope" * 100)
    with pytest.raises(ImageError, match="cannot read image tar"):
        read_saved_image(tmp_path / "junk.tar")
    plain = tmp_path / "plain.tar"
    plain.write_bytes(layer_tar({"a": b"b"}))
    with pytest.raises(ImageError, match="no manifest.json"):
        read_saved_image(plain)


def test_build_loadable_image_structure(tmp_path: Path) -> None:
    config = image_config([BASE, APP1])
    (tmp_path / "a").write_bytes(BASE)
    (tmp_path / "b").write_bytes(APP1)
    out = build_loadable_image(config, [tmp_path / "a", tmp_path / "b"], "fleetmesh-test/x:2",
                               tmp_path / "out.tar")
    with tarfile.open(out) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        assert manifest == [{
            "Config": f"{diff_id(config)[7:]}.json", "RepoTags": ["fleetmesh-test/x:2"],
            "Layers": [f"{diff_id(BASE)[7:]}/layer.tar", f"{diff_id(APP1)[7:]}/layer.tar"]}]
        assert tar.extractfile(manifest[0]["Config"]).read() == config  # type: ignore[union-attr]
        assert tar.extractfile(manifest[0]["Layers"][1]).read() == APP1  # type: ignore[union-attr]
    # It reads back as a saved image.
    again = read_saved_image(out)
    assert again.config_bytes == config and again.repo_tags == ("fleetmesh-test/x:2",)


def test_build_loadable_image_refuses_a_wrong_layer_and_leaves_nothing(tmp_path: Path) -> None:
    config = image_config([BASE, APP1])
    (tmp_path / "a").write_bytes(BASE)
    (tmp_path / "b").write_bytes(APP2)
    with pytest.raises(ImageError, match="is not sha256:"):
        build_loadable_image(config, [tmp_path / "a", tmp_path / "b"], "t:1",
                             tmp_path / "out.tar")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


# --------------------------------------------------------------------------- materialize


class Release:
    """v2 = [BASE, APP2], with a delta for APP2 from APP1 and chunks for both."""

    def __init__(self, key: SigningKey, version: int = 2) -> None:
        self.key = key
        self.blobs: dict[str, bytes] = {}
        layers = []
        for data, base in ((BASE, None), (APP2, APP1)):
            chunks = chunk_layer(data, chunk_size=64 * 1024)
            for c in chunks:
                self.blobs[c.ref.id.hex()] = c.data
            deltas: tuple[LayerDelta, ...] = ()
            if base is not None:
                plan = plan_layer(data, {diff_id(base): base})
                assert plan.patch is not None
                blob_id = blake3.blake3(plan.patch).digest()
                self.blobs[blob_id.hex()] = plan.patch
                self.delta_id = blob_id.hex()
                deltas = (LayerDelta(diff_id(base), blob_id, len(plan.patch),
                                     read_header(plan.patch).method.name),)
            layers.append(Layer(diff_id(data), len(data), tuple(c.ref for c in chunks), deltas))
        self.manifest = ReleaseManifest("cams", "web", version, 1_700_000_000,
                                        image_config([BASE, APP2]), tuple(layers))
        self.signed = encode_signed_manifest(sign_manifest(self.manifest, key))
        self.fetched: list[str] = []
        self.app2_chunk_bytes = sum(c.stored_size for c in layers[1].chunks)

    def fetch(self, blob_id: str) -> bytes:
        self.fetched.append(blob_id)
        return self.blobs[blob_id]


@pytest.fixture
def key() -> SigningKey:
    return SigningKey(b"\x01" * 32)


def _local(tmp_path: Path, *layers: bytes) -> dict[str, Path]:
    d = tmp_path / "local"
    d.mkdir(exist_ok=True)
    out = {}
    for data in layers:
        p = d / f"{diff_id(data)[7:]}.tar"
        p.write_bytes(data)
        out[diff_id(data)] = p
    return out


def _loaded_layers(tar_path: Path) -> list[bytes]:
    return [x.read() for x in read_saved_image(tar_path).layers]


def test_materialize_by_delta(tmp_path: Path, key: SigningKey) -> None:
    rel = Release(key)
    work = tmp_path / "work"
    out = materialize_release(verify_release(rel.signed, key.verify_key, 1), rel.fetch,
                              _local(tmp_path, BASE, APP1), work, "fleetmesh-test/web:2")
    assert _loaded_layers(out.image_tar) == [BASE, APP2]
    assert [(s.method, s.base) for s in out.layers] == [("local", None),
                                                         ("delta", diff_id(APP1))]
    assert rel.fetched == [rel.delta_id]
    assert out.fetched_bytes == len(rel.blobs[rel.delta_id]) < rel.app2_chunk_bytes / 5
    assert out.manifest.version == 2
    assert [p.name for p in work.iterdir()] == [out.image_tar.name]  # scratch removed


def test_materialize_by_chunks(tmp_path: Path, key: SigningKey) -> None:
    rel = Release(key)
    out = materialize_release(verify_release(rel.signed, key.verify_key, None), rel.fetch,
                              _local(tmp_path, BASE), tmp_path / "work", "t:2")
    assert _loaded_layers(out.image_tar) == [BASE, APP2]
    assert [s.method for s in out.layers] == ["local", "chunks"]
    assert out.fetched_bytes == rel.app2_chunk_bytes
    assert rel.delta_id not in rel.fetched


def test_materialize_reuses_local_layers(tmp_path: Path, key: SigningKey) -> None:
    rel = Release(key)
    out = materialize_release(verify_release(rel.signed, key.verify_key, 1), rel.fetch,
                              _local(tmp_path, BASE, APP2), tmp_path / "work", "t:2")
    assert [s.method for s in out.layers] == ["local", "local"]
    assert rel.fetched == [] and out.fetched_bytes == 0
    assert _loaded_layers(out.image_tar) == [BASE, APP2]


def test_local_layer_that_lies_about_its_content_is_not_used(tmp_path: Path,
                                                              key: SigningKey) -> None:
    rel = Release(key)
    local = _local(tmp_path, BASE, APP1)
    local[diff_id(APP1)].write_bytes(_flip(APP1))  # no longer the delta's base
    out = materialize_release(verify_release(rel.signed, key.verify_key, 1), rel.fetch, local,
                              tmp_path / "work", "t:2")
    assert [s.method for s in out.layers] == ["local", "chunks"]


def _tamper_manifest(signed: bytes) -> bytes:
    s = decode_signed_manifest(signed)
    body = bytearray(s.manifest)
    body[len(body) // 2] ^= 0x01
    return encode_signed_manifest(SignedManifest(bytes(body), s.signature, s.key_id))


def _flip(data: bytes) -> bytes:
    b = bytearray(data)
    b[len(b) // 2] ^= 0x40
    return bytes(b)


REJECTIONS: list[tuple[str, type[Exception], str]] = [
    ("tampered manifest", VerificationError, "bad signature"),
    ("wrong key", VerificationError, "signed by key"),
    ("replayed older version", VerificationError, "not newer"),
    ("garbage envelope", ManifestError, "msgpack|signed"),
    ("truncated delta", MaterializeError, "expected"),
    ("corrupted delta", MaterializeError, "does not hash to its id"),
    ("corrupted chunk", ChunkError, "chunk"),
    ("truncated chunk", ChunkError, "chunk"),
]


@pytest.mark.parametrize(("case", "error", "message"), REJECTIONS, ids=[r[0] for r in REJECTIONS])
def test_rejections_leave_no_output(tmp_path: Path, key: SigningKey, case: str,
                                    error: type[Exception], message: str) -> None:
    rel = Release(key)
    signed, pinned, running = rel.signed, key.verify_key, 1
    local = _local(tmp_path, BASE, APP1)
    fetch: Callable[[str], bytes] = rel.fetch
    if case == "tampered manifest":
        signed = _tamper_manifest(signed)
    elif case == "wrong key":
        pinned = SigningKey(b"\x02" * 32).verify_key
    elif case == "replayed older version":
        running = 2
    elif case == "garbage envelope":
        signed = b"\x93garbage"
    elif case in ("truncated delta", "corrupted delta"):
        rel.blobs[rel.delta_id] = (rel.blobs[rel.delta_id][:-3] if case.startswith("trunc")
                                   else _flip(rel.blobs[rel.delta_id]))
    else:  # a chunk of the layer fetched in full
        local = _local(tmp_path, BASE)
        first = rel.manifest.layers[1].chunks[0].id.hex()
        rel.blobs[first] = (rel.blobs[first][:-5] if case.startswith("trunc")
                            else _flip(rel.blobs[first]))
    work = tmp_path / "work"
    with pytest.raises(error, match=message) as caught:
        materialize_release(verify_release(signed, pinned, running), fetch, local, work, "t:2")
    assert "\n" not in str(caught.value)
    leftovers = list(work.rglob("*")) if work.exists() else []
    assert leftovers == [], leftovers
    if case in ("tampered manifest", "wrong key", "replayed older version", "garbage envelope"):
        assert rel.fetched == []  # verified before anything was fetched or written


def test_manifest_whose_layers_disagree_with_its_config_is_refused(tmp_path: Path,
                                                                   key: SigningKey) -> None:
    rel = Release(key)
    m = rel.manifest
    bad = ReleaseManifest(m.fleet, m.app, m.version, m.created_at, image_config([BASE, APP1]),
                          m.layers)
    signed = encode_signed_manifest(sign_manifest(bad, key))
    with pytest.raises(MaterializeError, match="do not match its image config"):
        materialize_release(verify_release(signed, key.verify_key, 1), rel.fetch, {},
                            tmp_path / "w", "t:2")
    assert rel.fetched == []
