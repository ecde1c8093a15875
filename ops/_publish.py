"""Publishing a Docker image as a signed release: layers, chunks, deltas, upload (resumable).

`publish_image` is the engine behind `fleetmesh release create`; it talks to the coordinator
only through the `RegistryApi` methods of `ops.client.OperatorClient`, so tests can hand it
a fake. Nothing here holds more than one layer (plus its delta bases) in memory; chunk
frames and patches are staged on disk until uploaded.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import blake3
from nacl.signing import SigningKey

from mesh.delta import read_header
from mesh.image import SavedImage, docker_save, file_diff_id, read_saved_image, start_plan
from mesh.release import (
    CHUNK_SIZE,
    MAX_DELTAS_PER_LAYER,
    MAX_PLATFORMS,
    Chunk,
    ChunkRef,
    ContainerSettings,
    Layer,
    LayerDelta,
    PlatformImage,
    ReleaseError,
    ReleaseManifest,
    all_layers,
    chunk_id,
    compress_chunk,
    decode_signed_manifest,
    encode_signed_manifest,
    for_platform,
    image_platform,
    open_chunk,
    release_images,
    sign_manifest,
    verify_manifest,
)
from ops.client import ApiError

# Candidate bases tried per earlier release for one new layer: the layer at the same position
# and its nearest neighbour (a Dockerfile edit usually changes the layer in place; an inserted
# step shifts it by one). Each candidate costs up to three diffs (mesh.image.plan_layer).
BASES_PER_RELEASE: Final = 2
MISSING_BATCH: Final = 10_000  # docs/api.md: POST /blobs/missing takes at most 10,000 ids
DEFAULT_KEEP: Final = 3


class PublishError(Exception):
    """A one-line reason the release was not published."""


class RegistryApi(Protocol):
    """What publishing needs of the coordinator (ops.client.OperatorClient)."""

    def list_releases(self, fleet: str, app: str | None = None) -> list[dict[str, Any]]: ...
    def release_manifest(self, fleet: str, app: str, version: int) -> bytes: ...
    def get_blob(self, blob_id: str, start: int | None = None,
                 end: int | None = None) -> bytes: ...
    def missing_blobs(self, ids: Sequence[str]) -> list[str]: ...
    def put_blob(self, blob_id: str, data: bytes, kind: str) -> bool: ...
    def publish_release(self, signed_manifest: bytes, rollout: str | None = None
                        ) -> tuple[dict[str, Any], bool]: ...


class UploadProgress(Protocol):
    def start(self, total_bytes: int, blobs: int) -> None: ...
    def advance(self, nbytes: int) -> None: ...


@dataclass(frozen=True, slots=True)
class LayerReport:
    index: int
    diff_id: str
    size: int  # uncompressed
    stored_size: int  # sum of chunk frames
    chunks: int
    deltas: tuple[LayerDelta, ...]
    reused_from: int | None  # the earlier version whose chunks this layer reuses
    platform: str = ""  # of the image it belongs to ("" for one image stating none)

    @property
    def best_delta(self) -> LayerDelta | None:
        return min(self.deltas, key=lambda d: d.size) if self.deltas else None

    @property
    def saving(self) -> float | None:
        """1 - smallest delta / stored size: what a device holding the base saves."""
        best = self.best_delta
        if best is None or self.stored_size == 0:
            return None
        return 1.0 - best.size / self.stored_size


@dataclass(slots=True)
class PublishResult:
    fleet: str
    app: str
    version: int
    created: bool  # False: the coordinator already had this release (or the latest is it)
    layers: tuple[LayerReport, ...] = ()
    uploaded_blobs: int = 0
    uploaded_bytes: int = 0
    info: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Earlier:
    version: int
    manifest: ReleaseManifest


def _hex(diff_id: str) -> str:
    return diff_id.removeprefix("sha256:")


def _version_of(info: dict[str, Any]) -> int:
    v = info.get("version")
    if not isinstance(v, int) or isinstance(v, bool):
        raise PublishError("the coordinator listed a release without a version")
    return v


class _Publisher:
    def __init__(self, registry: RegistryApi, fleet: str, app: str, key: SigningKey,
                 work: Path, cache_dir: Path, warn: Callable[[str], None]) -> None:
        self.registry, self.fleet, self.app, self.key = registry, fleet, app, key
        self.work, self.cache_dir, self.warn = work, cache_dir, warn
        self.staged: dict[str, tuple[Path, str]] = {}  # blob id hex -> (file, kind)
        self.local: dict[str, Path] = {}  # diff id -> a verified layer file
        (work / "blobs").mkdir(parents=True, exist_ok=True)

    # ---- earlier releases ----------------------------------------------------------------

    def earlier(self, releases: list[dict[str, Any]], keep: int) -> list[_Earlier]:
        out = []
        for info in releases[:keep]:
            version = _version_of(info)
            data = self.registry.release_manifest(self.fleet, self.app, version)
            try:
                manifest = verify_manifest(decode_signed_manifest(data), self.key.verify_key,
                                           None, fleet=self.fleet, app=self.app)
            except ReleaseError as exc:
                # Signed with another (older) key, or not what it claims: not a base we trust.
                self.warn(f"version {version} not used as a base: {exc}")
                continue
            out.append(_Earlier(version, manifest))
        return out

    def base_layer(self, layer: Layer) -> Path:
        """A verified file of an earlier release's layer: from this image, the cache, or
        rebuilt from its chunks on the coordinator (then cached)."""
        have = self.local.get(layer.diff_id)
        if have is not None:
            return have
        cached = self.cache_dir / f"{_hex(layer.diff_id)}.tar"
        if cached.is_file() and file_diff_id(cached) == layer.diff_id:
            self.local[layer.diff_id] = cached
            return cached
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        part = cached.with_name(f".{cached.name}.part{os.getpid()}")
        try:
            h = hashlib.sha256()
            with open(part, "wb") as f:
                for ref in layer.chunks:
                    piece = open_chunk(ref, self.registry.get_blob(ref.id.hex()))
                    h.update(piece)
                    f.write(piece)
            if "sha256:" + h.hexdigest() != layer.diff_id:
                raise PublishError(f"base layer {layer.diff_id[:19]} from the coordinator does "
                                   "not match its diff ID")
            os.replace(part, cached)
        finally:
            part.unlink(missing_ok=True)
        self.local[layer.diff_id] = cached
        return cached

    # ---- staging ---------------------------------------------------------------------------

    def stage(self, blob_id: bytes, data: bytes, kind: str) -> None:
        name = blob_id.hex()
        if name in self.staged:
            return
        path = self.work / "blobs" / name
        path.write_bytes(data)
        self.staged[name] = (path, kind)

    def chunk(self, data: bytes, pool: Executor, published: Mapping[bytes, ChunkRef]
              ) -> tuple[ChunkRef, ...]:
        """`data` as chunks (mesh.release.chunk_layer's cut), compressed in `pool`; a piece an
        earlier release already has (same blake3, same size: `published`, whose blobs the
        coordinator still holds) keeps that release's chunk instead of being compressed again."""
        view = memoryview(data)
        parts: list[ChunkRef | Future[Chunk]] = []
        for start in range(0, len(data), CHUNK_SIZE):
            piece = view[start:start + CHUNK_SIZE]
            ref = published.get(chunk_id(piece))
            parts.append(ref if ref is not None and ref.size == len(piece)
                         else pool.submit(compress_chunk, piece))
        refs = []
        for part in parts:
            if isinstance(part, ChunkRef):
                refs.append(part)
                continue
            chunk = part.result()
            self.stage(chunk.ref.id, chunk.data, "chunk")
            refs.append(chunk.ref)
        return tuple(refs)


def _chunks_match(data: bytes, refs: Sequence[ChunkRef]) -> bool:
    """Whether `refs` cut `data` (ids and sizes; cheap, no compression)."""
    pos = 0
    for ref in refs:
        piece = data[pos:pos + ref.size]
        if len(piece) != ref.size or chunk_id(piece) != ref.id:
            return False
        pos += ref.size
    return pos == len(data)


def _candidates(index: int, earlier: ReleaseManifest, exclude: set[str]) -> list[Layer]:
    order = sorted(range(len(earlier.layers)), key=lambda j: (abs(j - index), j))
    out: list[Layer] = []
    for j in order:
        layer = earlier.layers[j]
        if layer.diff_id not in exclude and all(x.diff_id != layer.diff_id for x in out):
            out.append(layer)
        if len(out) == BASES_PER_RELEASE:
            break
    return out


def publish_image(registry: RegistryApi, *, fleet: str, app: str, signing_key: SigningKey,
                  image: str | Sequence[str] | None = None,
                  saved_tar: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
                  | None = None,
                  keep: int = DEFAULT_KEEP, version: int | None = None,
                  container: ContainerSettings | None = None,
                  cache_dir: str | os.PathLike[str],
                  workdir: str | os.PathLike[str] | None = None,
                  progress: UploadProgress | None = None, docker: str = "docker",
                  now: Callable[[], float] = time.time,
                  warn: Callable[[str], None] | None = None,
                  workers: int | None = None, rollout: str | None = None) -> PublishResult:
    """Publish `image` (via `docker save`) or an already saved tar as the next release.

    Several images (or tars) make one release with an image per platform, each platform the
    one its image config states (docs/releases.md, "Several platforms"); each image's deltas
    are against the same platform's image of earlier releases. The first is the release's
    first image.

    Raises PublishError (one line), ImageError, or the registry's own errors (ApiError,
    CoordinatorUnreachable...). Interrupted runs are resumed by running again: only the blobs
    the coordinator is missing are uploaded.

    Chunk compression and delta search run in `workers` threads (default: the CPUs this process
    may use); the release is the same for any number of workers.

    `rollout="held"` publishes the release held: it targets no device until its rollout
    starts (docs/rollouts.md).
    """
    images = [image] if isinstance(image, str) else list(image or ())
    tars = ([saved_tar] if isinstance(saved_tar, (str, os.PathLike))
            else list(saved_tar or ()))
    if bool(images) == bool(tars):
        raise ValueError("give exactly one of image and saved_tar")
    if keep < 0:
        raise PublishError("--key must be 0 or more")
    if len(images) + len(tars) > MAX_PLATFORMS:
        raise PublishError(f"a release has at most {MAX_PLATFORMS} images (one per platform), "
                           f"not {len(images) + len(tars)}")
    warnings: list[str] = []

    def _warn(message: str) -> None:
        warnings.append(message)
        if warn is not None:
            warn(message)

    with tempfile.TemporaryDirectory(prefix="fleetmesh-publish-",
                                     dir=None if workdir is None else str(workdir)) as tmp:
        work = Path(tmp)
        saved: list[tuple[str, SavedImage]] = []
        for i, name in enumerate(images):
            exported = docker_save(name, work / f"image{i}.tar", docker=docker)
            saved.append((name, read_saved_image(exported, work / f"layers{i}")))
            Path(exported).unlink(missing_ok=True)  # the layers are extracted
        for i, tar in enumerate(tars):
            saved.append((str(tar), read_saved_image(tar, work / f"layers{i}")))
        pub = _Publisher(registry, fleet, app, signing_key, work, Path(cache_dir), _warn)
        with ThreadPoolExecutor(max_workers=workers or len(os.sched_getaffinity(0)),
                                thread_name_prefix="fleetmesh-publish") as pool:
            result = _publish(pub, pool, saved, keep, version, container or ContainerSettings(),
                              progress, now, rollout)
        result.warnings = warnings
        return result


def _platforms(saved: Sequence[tuple[str, SavedImage]]) -> list[str]:
    """The platform of each image ("" for the one image of a release whose config states
    none); PublishError for a second image of a platform or, among several, one stating none."""
    out: list[str] = []
    for name, image in saved:
        platform = image_platform(image.config_bytes)
        if platform is None and len(saved) > 1:
            raise PublishError(f"image {name} states no platform (os, architecture) in its "
                               "config; each image of a release is one platform's")
        if platform in out:
            raise PublishError(f"two images for {platform}: a release has one per platform")
        out.append(platform or "")
    return out


def _publish(pub: _Publisher, pool: Executor, saved: Sequence[tuple[str, SavedImage]],
             keep: int, version: int | None,
             container: ContainerSettings, progress: UploadProgress | None,
             now: Callable[[], float], rollout: str | None) -> PublishResult:
    reg, fleet, app = pub.registry, pub.fleet, pub.app
    platforms = _platforms(saved)
    for _, image in saved:
        for saved_layer in image.layers:
            assert isinstance(saved_layer.data, Path)
            pub.local[saved_layer.diff_id] = saved_layer.data
    releases = sorted(reg.list_releases(fleet, app), key=_version_of, reverse=True)
    latest = _version_of(releases[0]) if releases else 0
    earlier = pub.earlier(releases, max(keep, 1))
    if (earlier and earlier[0].version == latest
            and [i.image_config for i in release_images(earlier[0].manifest)]
            == [image.config_bytes for _, image in saved]
            and earlier[0].manifest.container == container
            and version in (None, latest)):
        return PublishResult(fleet, app, latest, created=False)
    earlier = earlier[:keep]
    if version is None:
        version = latest + 1
    elif version <= latest:
        raise PublishError(f"version {version} is not newer than {fleet}/{app} version {latest}")

    # Layers already published (by any platform's image: a diff ID is the same bytes): reuse
    # their chunks (and their deltas) if the coordinator still has every blob they name.
    known: dict[str, tuple[int, Layer]] = {}
    for e in reversed(earlier):  # newest last: it wins
        for layer in all_layers(e.manifest):
            known[layer.diff_id] = (e.version, layer)
    wanted = {ref.id.hex() for _, layer in known.values() for ref in layer.chunks}
    wanted |= {d.blob_id.hex() for _, layer in known.values() for d in layer.deltas}
    gone = set(_missing(reg, sorted(wanted)))
    published = {ref.id: ref for e in earlier for layer in all_layers(e.manifest)
                 for ref in layer.chunks if ref.id.hex() not in gone}

    images: list[PlatformImage] = []
    reports: list[LayerReport] = []
    for (_, image), platform in zip(saved, platforms, strict=True):
        # Deltas against the same platform's image of earlier releases only: a device holds
        # its own platform's layers, never another's.
        same = [_Earlier(e.version, m) for e in earlier
                if (m := e.manifest if len(saved) == 1 and not platform
                    else for_platform(e.manifest, platform)) is not None]
        layers = _image_layers(pub, pool, image, same, known, gone, published, platform,
                               reports)
        images.append(PlatformImage(platform, image.config_bytes, layers))

    first = images[0]
    manifest = ReleaseManifest(fleet, app, version, int(now()), first.image_config,
                               first.layers, container,
                               platform=first.platform if len(images) > 1 else "",
                               more_images=tuple(images[1:]))
    try:
        signed = encode_signed_manifest(sign_manifest(manifest, pub.key))
    except ReleaseError as exc:
        raise PublishError(f"cannot encode the release: {exc}") from None

    every = list(all_layers(manifest))
    ids = sorted({r.id.hex() for layer in every for r in layer.chunks}
                 | {d.blob_id.hex() for layer in every for d in layer.deltas})
    missing = _missing(reg, ids)
    count, nbytes = _upload(pub, missing, progress)
    try:
        info, created = reg.publish_release(signed, rollout)
    except ApiError as exc:
        late = getattr(exc, "missing", None)
        if exc.status != 409 or not late:
            raise
        # Blobs removed while we uploaded (a release deleted meanwhile): send them, once more.
        more, more_bytes = _upload(pub, list(late), progress)
        count, nbytes = count + more, nbytes + more_bytes
        info, created = reg.publish_release(signed, rollout)
    return PublishResult(fleet, app, version, created, tuple(reports), count, nbytes, info)


def _image_layers(pub: _Publisher, pool: Executor, saved: SavedImage,
                  earlier: Sequence[_Earlier], known: Mapping[str, tuple[int, Layer]],
                  gone: set[str], published: Mapping[bytes, ChunkRef], platform: str,
                  reports: list[LayerReport]) -> tuple[Layer, ...]:
    """One image's layers: chunks (reused where published) and deltas against `earlier`
    (that platform's images); a LayerReport for each is appended to `reports`."""
    layers: list[Layer] = []
    new_ids = {layer.diff_id for layer in saved.layers}
    for index, saved_layer in enumerate(saved.layers):
        data = saved_layer.read()
        reused = known.get(saved_layer.diff_id)
        if (reused is not None and not any(r.id.hex() in gone for r in reused[1].chunks)
                and _chunks_match(data, reused[1].chunks)):
            version_from, old = reused
            deltas = tuple(d for d in old.deltas if d.blob_id.hex() not in gone)
            layer = Layer(saved_layer.diff_id, len(data), old.chunks, deltas)
            layers.append(layer)
            reports.append(LayerReport(index, layer.diff_id, layer.size,
                                       sum(c.stored_size for c in old.chunks), len(old.chunks),
                                       deltas, version_from, platform))
            continue
        # The diffs against every earlier release start first (the longest jobs), then the
        # chunks fill the other workers; the plans are read in release order as before.
        plans = []
        tried: set[str] = set(new_ids)
        for e in earlier:
            bases = _candidates(index, e.manifest, tried)
            tried.update(b.diff_id for b in bases)
            # A base whose chunks the coordinator lost can come only from here or the cache.
            bases = [b for b in bases if b.diff_id in pub.local
                     or (pub.cache_dir / f"{_hex(b.diff_id)}.tar").is_file()
                     or not any(r.id.hex() in gone for r in b.chunks)]
            if bases:
                plans.append(start_plan(
                    data, {b.diff_id: pub.base_layer(b).read_bytes() for b in bases}, pool=pool))
        refs = pub.chunk(data, pool, published)
        stored = sum(r.stored_size for r in refs)
        deltas_list: list[LayerDelta] = []
        for pending in plans:
            if len(deltas_list) >= MAX_DELTAS_PER_LAYER:
                break
            plan = pending.result(stored)
            if plan.patch is None or plan.source_diff_id is None:
                continue
            blob_id = blake3.blake3(plan.patch).digest()
            pub.stage(blob_id, plan.patch, "delta")
            deltas_list.append(LayerDelta(plan.source_diff_id, blob_id, len(plan.patch),
                                          read_header(plan.patch).method.name))
        layer = Layer(saved_layer.diff_id, len(data), refs, tuple(deltas_list))
        layers.append(layer)
        reports.append(LayerReport(index, layer.diff_id, layer.size, stored, len(refs),
                                   layer.deltas, None, platform))
        del data
    return tuple(layers)


def _missing(reg: RegistryApi, ids: Sequence[str]) -> list[str]:
    out: list[str] = []
    for start in range(0, len(ids), MISSING_BATCH):
        out.extend(reg.missing_blobs(list(ids[start:start + MISSING_BATCH])))
    return out


def _upload(pub: _Publisher, missing: Sequence[str], progress: UploadProgress | None
            ) -> tuple[int, int]:
    todo = []
    for blob_id in missing:
        staged = pub.staged.get(blob_id)
        if staged is None:
            raise PublishError(f"the coordinator lacks blob {blob_id[:16]}, which this run "
                               "did not produce; run again")
        todo.append((blob_id, *staged))
    total = sum(path.stat().st_size for _, path, _ in todo)
    if progress is not None:
        progress.start(total, len(todo))
    for blob_id, path, kind in todo:
        data = path.read_bytes()
        pub.registry.put_blob(blob_id, data, kind)
        if progress is not None:
            progress.advance(len(data))
    return len(todo), total
