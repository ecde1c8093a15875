"""The release round trip on the real Docker engine.

Two images built from a `docker import`ed busybox rootfs, published as v1 and v2, and a "device"
holding v1 that rebuilds v2 from v1's re-exported layers plus the v2 delta, loads it and runs
it. Once against an in-memory registry (the publishing and device code paths alone), once
against the real coordinator through the real `fleetmesh release` CLI and the SDK.

Marked `lab`: needs root and a Docker engine; everything is named `fleetmesh-test-<hex>` and
removed in `finally`.
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from mesh.image import export_local_layers, materialize_release
from mesh.release import (
    decode_signed_manifest,
    machine_platform,
    read_signing_key,
    verify_manifest,
    verify_release,
)
from tests.coordinator_process import running_coordinator

pytestmark = pytest.mark.lab

BIN = Path(sys.executable).parent
FLEETMESH = str(BIN / "fleetmesh")
BUSYBOX_APPLETS = ("sh", "echo", "cat", "ls", "true")
HOST = machine_platform(platform.machine())  # what `docker import` and builds here state


def _docker_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (Docker engine)"
    if shutil.which("docker") is None or shutil.which("busybox") is None:
        return "needs docker and busybox(-static)"
    try:
        r = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"],
                           capture_output=True, timeout=20, check=False)
    except subprocess.TimeoutExpired:
        return "docker version did not answer"
    return None if r.returncode == 0 else "the Docker engine does not answer"


def _docker(*argv: str, timeout: float = 300, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["docker", *argv], capture_output=True, text=True, timeout=timeout,
                       check=False, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"docker {' '.join(argv)}: {r.stderr.strip()}")
    return r


def _app_files(version: int) -> dict[str, bytes]:
    """~350 KB of deterministic text, JSON and binary; v2 changes three files, adds one."""
    rng = random.Random(2024)
    files: dict[str, bytes] = {}
    for i in range(40):
        files[f"docs/page{i:02d}.txt"] = "\n".join(
            f"{i}.{n}: " + " ".join(rng.choice(["mesh", "fleet", "delta", "chunk", "layer",
                                                 "device", "release", "signed"])
                                     for _ in range(12)) for n in range(40)).encode()
    for i in range(20):
        files[f"data/item{i:02d}.json"] = json.dumps(
            {"id": i, "weights": [rng.random() for _ in range(60)],
             "tags": [rng.choice("abcdefgh") * 3 for _ in range(10)]}, indent=1).encode()
    for i in range(6):
        files[f"lib/blob{i}.bin"] = rng.randbytes(16_000)
    files["VERSION"] = f"{version}\n".encode()
    if version >= 2:
        files["docs/page03.txt"] = files["docs/page03.txt"].replace(b"mesh", b"MESH")
        files["data/item05.json"] = json.dumps({"id": 5, "changed": True}).encode()
        blob = bytearray(files["lib/blob2.bin"])
        blob[100:200] = bytes(100)
        files["lib/blob2.bin"] = bytes(blob)
        files["docs/CHANGES.txt"] = b"v2: fixes\n" * 20
    return files


@dataclass
class Images:
    prefix: str
    base: str
    v1: str
    v2: str


@pytest.fixture
def images(tmp_path: Path) -> Iterator[Images]:
    reason = _docker_skip_reason()
    if reason:
        pytest.skip(reason)
    prefix = f"fleetmesh-test-{uuid.uuid4().hex[:10]}"
    imgs = Images(prefix, f"{prefix}-base:1", f"{prefix}-app:1", f"{prefix}-app:2")
    try:
        root = tmp_path / "rootfs"
        (root / "bin").mkdir(parents=True)
        shutil.copy2(shutil.which("busybox") or "/bin/busybox", root / "bin" / "busybox")
        for applet in BUSYBOX_APPLETS:
            (root / "bin" / applet).symlink_to("busybox")
        subprocess.run(["tar", "-C", str(root), "-cf", str(tmp_path / "rootfs.tar"), "."],
                       check=True, timeout=60)
        _docker("import", "--change", "CMD [\"/bin/sh\"]", str(tmp_path / "rootfs.tar"),
                imgs.base)
        env = dict(os.environ, DOCKER_BUILDKIT="0")
        for version, tag in ((1, imgs.v1), (2, imgs.v2)):
            ctx = tmp_path / f"ctx{version}"
            for name, data in _app_files(version).items():
                (ctx / "app" / name).parent.mkdir(parents=True, exist_ok=True)
                (ctx / "app" / name).write_bytes(data)
            (ctx / "Dockerfile").write_text(
                f"FROM {imgs.base}\nCOPY app /app\nCMD [\"echo\", \"v{version}\"]\n")
            _docker("build", "-q", "-t", tag, str(ctx), env=env)
        yield imgs
    finally:
        for tag in (imgs.v2, imgs.v1, imgs.base):
            _docker("rmi", "-f", tag, check=False, timeout=120)


def _device_round_trip(imgs: Images, tmp_path: Path, verify_key: bytes,
                       manifest_v2: bytes, fetch: Callable[[str], bytes]) -> dict[str, int]:
    """As a device running v1: rebuild v2 from v1's layers + fetched blobs, load it, run it."""
    local = export_local_layers(imgs.v1, tmp_path / "device-layers")
    assert len(local) == 2
    fetched: list[int] = []

    def counting_fetch(blob_id: str) -> bytes:
        data = fetch(blob_id)
        fetched.append(len(data))
        return data

    _docker("rmi", imgs.v2)  # v2 must come back from the rebuilt tar alone
    assert _docker("image", "inspect", imgs.v2, check=False).returncode != 0
    release = verify_release(manifest_v2, verify_key, 1, platform=HOST)
    rebuilt = materialize_release(release, counting_fetch, local, tmp_path / "device-work",
                                  imgs.v2)
    assert [x.method for x in rebuilt.layers] == ["local", "delta"]
    _docker("load", "-i", str(rebuilt.image_tar))
    out = _docker("run", "--rm", imgs.v2).stdout.strip()
    assert out == "v2"
    manifest = verify_manifest(decode_signed_manifest(manifest_v2), verify_key, None)
    full_chunks = sum(c.stored_size for layer in manifest.layers for c in layer.chunks)
    app_chunks = sum(c.stored_size for c in manifest.layers[1].chunks)
    stats = {"v2_full_chunk_bytes": full_chunks, "v2_app_layer_chunk_bytes": app_chunks,
             "v2_app_layer_size": manifest.layers[1].size,
             "fetched_bytes": rebuilt.fetched_bytes}
    assert sum(fetched) == rebuilt.fetched_bytes
    assert rebuilt.fetched_bytes * 10 < app_chunks, stats
    print(f"\nround trip bytes: {stats}")
    return stats


def test_round_trip_with_in_memory_registry(images: Images, tmp_path: Path) -> None:
    from ops._publish import publish_image

    from ._fakes import FakeRegistry
    key = SigningKey(os.urandom(32))
    reg = FakeRegistry(key.verify_key)
    for tag in (images.v1, images.v2):
        publish_image(reg, fleet="cams", app="web", signing_key=key, image=tag,
                      cache_dir=tmp_path / "cache")
    again = publish_image(reg, fleet="cams", app="web", signing_key=key, image=images.v2,
                          cache_dir=tmp_path / "cache")
    assert not again.created and len(reg.releases) == 2
    manifest = reg.release_manifest("cams", "web", 2)
    layers = verify_manifest(decode_signed_manifest(manifest), key.verify_key, 1).layers
    assert not layers[0].deltas and layers[1].deltas
    _device_round_trip(images, tmp_path, bytes(key.verify_key), manifest, reg.get_blob)


# --------------------------------------------------------------------------- real coordinator


@pytest.fixture
def coordinator_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    (tmp_path / "coord").mkdir()
    (tmp_path / "home").mkdir()
    with running_coordinator(tmp_path / "coord", tmp_path / "coord.log") as coord:
        yield coord.operator_env(tmp_path / "home")


Cli = Callable[..., subprocess.CompletedProcess[str]]


def _operator(env: dict[str, str]) -> tuple[Cli, SigningKey]:
    """The `fleetmesh` CLI against the coordinator of `env`, and a new release key for it."""
    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([FLEETMESH, *argv], capture_output=True, text=True, timeout=300,
                           env=env, check=False)
        assert "Traceback" not in r.stderr, r.stderr
        return r

    key_file = Path(env["HOME"]) / ".config" / "fleetmesh" / "release.key"
    key_file.parent.mkdir(parents=True)
    assert cli("release", "keygen", "--out", str(key_file)).returncode == 0
    return cli, read_signing_key(key_file)


def test_round_trip_with_coordinator_and_cli(images: Images, coordinator_env: dict[str, str],
                                             tmp_path: Path) -> None:
    from ops.client import OperatorClient
    env = coordinator_env
    cli, key = _operator(env)
    r = cli("release", "set-key", "--fleet", "cams")
    assert r.returncode == 0, r.stderr
    for tag in (images.v1, images.v2):
        r = cli("release", "create", tag, "--fleet", "cams", "--app", "web")
        assert r.returncode == 0, r.stderr
        assert "published cams/web version" in r.stdout
    r = cli("release", "create", images.v2, "--fleet", "cams", "--app", "web")
    assert r.returncode == 0 and "already published" in r.stdout, (r.stdout, r.stderr)

    listed = json.loads(cli("release", "list", "--fleet", "cams", "--json").stdout)
    assert [x["version"] for x in listed["releases"]] == [2, 1]
    shown = json.loads(cli("release", "show", "cams", "web", "2", "--json").stdout)
    assert not shown["layers"][0]["deltas"] and shown["layers"][1]["deltas"]
    assert "web" in cli("release", "list", "--fleet", "cams").stdout
    bad = cli("release", "show", "cams", "web", "9")
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1

    with OperatorClient(env["FLEETMESH_URL"], env["FLEETMESH_API_KEY"],
                        fingerprint=env["FLEETMESH_FINGERPRINT"]) as client:
        manifest = client.release_manifest("cams", "web", 2)
        stats = _device_round_trip(images, tmp_path, bytes(key.verify_key), manifest,
                                   client.get_blob)
    assert stats["fetched_bytes"] < stats["v2_full_chunk_bytes"]



# --------------------------------------------------------------------------- two platforms


@pytest.fixture
def arm_images(images: Images, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two linux/arm64 images, never run: `FROM scratch` + COPY of a file, built with
    `--platform linux/arm64` (no QEMU needed: no RUN step). --no-cache: the classic builder's
    cache ignores the platform and would hand back an image of another one."""
    tags = (f"{images.prefix}-arm:1", f"{images.prefix}-arm:2")
    env = dict(os.environ, DOCKER_BUILDKIT="0")
    rng = random.Random(64)
    text = "\n".join(f"line {n}: {rng.random()}" for n in range(4000))
    try:
        for version, tag in enumerate(tags, start=1):
            ctx = tmp_path / f"arm{version}"
            ctx.mkdir()
            body = text if version == 1 else text.replace("line 7:", "LINE 7:")
            (ctx / "payload.txt").write_text(body + f"\nversion {version}\n")
            (ctx / "Dockerfile").write_text("FROM scratch\nCOPY payload.txt /payload.txt\n")
            _docker("build", "-q", "--no-cache", "--platform", "linux/arm64", "-t", tag,
                    str(ctx), env=env)
            inspected = _docker("image", "inspect", "--format", "{{.Os}}/{{.Architecture}}",
                                tag).stdout.strip()
            assert inspected == "linux/arm64", inspected
        yield tags
    finally:
        for tag in tags:
            _docker("rmi", "-f", tag, check=False, timeout=120)


def test_two_platform_release_with_coordinator_and_cli(
        images: Images, arm_images: tuple[str, str], coordinator_env: dict[str, str],
        tmp_path: Path) -> None:
    """`release create AMD64_IMAGE ARM64_IMAGE` publishes one release with both; deltas are per
    platform; `release show` lists the platforms; an amd64 device rebuilds and runs its image
    from amd64 blobs alone, an arm/v7 device is told the release has nothing for it."""
    from ops.client import OperatorClient
    if HOST != "linux/amd64":
        pytest.skip(f"the first images are this engine's {HOST}, the test wants linux/amd64")
    env = coordinator_env
    cli, key = _operator(env)
    assert cli("release", "set-key", "--fleet", "cams").returncode == 0
    for amd, arm in ((images.v1, arm_images[0]), (images.v2, arm_images[1])):
        r = cli("release", "create", amd, arm, "--fleet", "cams", "--app", "web")
        assert r.returncode == 0, r.stderr
        assert "PLATFORM" in r.stdout and "linux/arm64" in r.stdout, r.stdout
    # two images of one platform: refused, one line
    r = cli("release", "create", arm_images[0], arm_images[1], "--fleet", "cams",
            "--app", "web")
    assert r.returncode == 1 and "two images for linux/arm64" in r.stderr, r.stderr

    shown = json.loads(cli("release", "show", "cams", "web", "2", "--json").stdout)
    assert [p["platform"] for p in shown["platforms"]] == ["linux/amd64", "linux/arm64"]
    assert all(p["stored_size"] > 0 for p in shown["platforms"])
    v1 = json.loads(cli("release", "show", "cams", "web", "1", "--json").stdout)
    v1_ids = {p: {x["diff_id"] for x in v1["layers"] if x["platform"] == p}
              for p in ("linux/amd64", "linux/arm64")}
    for layer in shown["layers"]:
        for delta in layer["deltas"]:  # every base is the same platform's layer
            assert delta["source_diff_id"] in v1_ids[layer["platform"]], layer
    arm_layer = next(x for x in shown["layers"] if x["platform"] == "linux/arm64")
    assert arm_layer["deltas"], arm_layer
    text_out = cli("release", "show", "cams", "web", "2").stdout
    assert "linux/amd64" in text_out and "linux/arm64" in text_out
    assert "diff_id" not in text_out  # the release row counts the layers (3), it does not list them
    print(f"\n{text_out}")  # pytest -s: the platforms of v2 and their bytes

    with OperatorClient(env["FLEETMESH_URL"], env["FLEETMESH_API_KEY"],
                        fingerprint=env["FLEETMESH_FINGERPRINT"]) as client:
        manifest = client.release_manifest("cams", "web", 2)
        amd = verify_release(manifest, bytes(key.verify_key), platform="linux/amd64")
        arm = verify_release(manifest, bytes(key.verify_key), platform="linux/arm64")
        arm_blobs = {c.id.hex() for layer in arm.manifest.layers for c in layer.chunks}
        arm_blobs |= {d.blob_id.hex() for layer in arm.manifest.layers for d in layer.deltas}
        fetched: list[str] = []

        def fetch(blob_id: str) -> bytes:
            fetched.append(blob_id)
            return client.get_blob(blob_id)

        stats = _device_round_trip(images, tmp_path, bytes(key.verify_key), manifest, fetch)
    assert stats["fetched_bytes"] < stats["v2_full_chunk_bytes"]
    assert fetched and not set(fetched) & arm_blobs
    assert amd.manifest.layers and amd.platform_error == ""
    none = verify_release(manifest, bytes(key.verify_key), platform="linux/arm/v7")
    assert none.platform_error == ("release 2 has no image for linux/arm/v7 "
                                   "(has linux/amd64, linux/arm64)")
