"""The device-side rebuild of a release into a `docker load`-able image tar.

`materialize_release` turns a verified release plus local layers and fetched blobs into such a
tar, checking every byte against the signed manifest before Docker sees any of it. Deltas are
applied with mesh.delta; chunks are opened with mesh.release.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from mesh.blobs import BlobVerifyError, check_digest
from mesh.delta import DeltaError, apply_delta_file, read_header
from mesh.image._saved import ImageError, build_loadable_image, config_diff_ids, file_diff_id
from mesh.release import (
    ChunkError,
    Layer,
    ReleaseError,
    ReleaseManifest,
    VerifiedRelease,
    open_chunk,
)


class MaterializeError(ReleaseError):
    """A release that cannot be rebuilt: a blob or a layer does not match the signed manifest."""


class LayerSource(NamedTuple):
    diff_id: str
    method: str  # "local", "delta" or "chunks"
    fetched_bytes: int  # blob bytes fetched for this layer
    size: int  # uncompressed layer bytes
    base: str | None = None  # source diff ID of the delta used


@dataclass(frozen=True, slots=True)
class MaterializedRelease:
    image_tar: Path
    manifest: ReleaseManifest
    layers: tuple[LayerSource, ...]

    @property
    def fetched_bytes(self) -> int:
        return sum(layer.fetched_bytes for layer in self.layers)


FetchBlob = Callable[[str], bytes]


def check_manifest_layers(manifest: ReleaseManifest) -> None:
    """The manifest's layers must be exactly the image config's `rootfs.diff_ids`."""
    wanted = config_diff_ids(manifest.image_config)
    got = [layer.diff_id for layer in manifest.layers]
    if wanted != got:
        raise MaterializeError("release layers do not match its image config's diff IDs")


def materialize_release(release: VerifiedRelease, fetch_blob: FetchBlob,
                        local_layers: Mapping[str, str | os.PathLike[str]],
                        workdir: str | os.PathLike[str], repo_tag: str) -> MaterializedRelease:
    """Rebuild a release as a `docker load`-able tar in `workdir`, fetching as little as possible.

    The release's signature was verified where its bytes arrived (`verify_release`), and whether
    it may replace the running version was decided there too; nothing is written before the
    manifest's layers are checked. Per layer: a local layer with the same diff ID is reused;
    else a delta whose base is local is fetched (checked against its blake3 blob ID and size),
    its declared target size checked against the layer's size (which bounds every allocation
    of the apply), and applied to the base (checked against the delta's source diff ID), the
    output checked against the layer's diff ID; else every chunk is fetched and checked against
    its ID, the layer against its diff ID. Any mismatch raises a ReleaseError subclass
    (MaterializeError, ChunkError, ManifestError) and leaves no file behind.
    """
    manifest = release.manifest
    check_manifest_layers(manifest)
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    verified_local = _LocalLayers(local_layers)
    out = work / f"{manifest.fleet}-{manifest.app}-{manifest.version}.tar"
    with _scratch(work) as scratch:
        files: list[Path] = []
        sources: list[LayerSource] = []
        for layer in manifest.layers:
            path, source = _materialize_layer(layer, verified_local, fetch_blob, scratch)
            files.append(path)
            sources.append(source)
        try:
            build_loadable_image(manifest.image_config, files, repo_tag, out)
        except ImageError as exc:
            raise MaterializeError(str(exc)) from None
    return MaterializedRelease(out, manifest, tuple(sources))


@contextmanager
def _scratch(work: Path) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=".materialize-", dir=work))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class _LocalLayers:
    """Local layer files, each hashed once, on first use: a file that does not hash to its
    claimed diff ID is treated as absent."""

    def __init__(self, layers: Mapping[str, str | os.PathLike[str]]) -> None:
        self._layers = dict(layers)
        self._checked: dict[str, bool] = {}

    def get(self, diff_id: str) -> Path | None:
        path = self._layers.get(diff_id)
        if path is None:
            return None
        if diff_id not in self._checked:
            try:
                self._checked[diff_id] = file_diff_id(path) == diff_id
            except OSError:
                self._checked[diff_id] = False
        return Path(path) if self._checked[diff_id] else None


def _fetch(fetch_blob: FetchBlob, blob_id: bytes, size: int, what: str) -> bytes:
    data = fetch_blob(blob_id.hex())
    if not isinstance(data, (bytes, bytearray)):
        raise MaterializeError(f"{what} {blob_id.hex()[:16]}: fetch returned no bytes")
    blob = bytes(data)
    try:
        check_digest(blob_id, blob, size=size, what=what)
    except BlobVerifyError as exc:
        raise MaterializeError(str(exc)) from None
    return blob


def _materialize_layer(layer: Layer, local: _LocalLayers, fetch_blob: FetchBlob,
                       scratch: Path) -> tuple[Path, LayerSource]:
    own = local.get(layer.diff_id)
    if own is not None:
        return own, LayerSource(layer.diff_id, "local", 0, layer.size)
    out = scratch / f"{layer.diff_id.removeprefix('sha256:')}.tar"
    usable = [(d, base) for d in layer.deltas
              if (base := local.get(d.source_diff_id)) is not None]
    if usable:
        delta, base = min(usable, key=lambda db: db[0].size)
        patch = _fetch(fetch_blob, delta.blob_id, delta.size, "delta")
        where = f"layer {layer.diff_id[:19]}: delta from {delta.source_diff_id[:19]}"
        try:
            # The signed manifest's layer size is the target's, exactly: every decoder is
            # bounded by the patch's declared target, so that must be it (not the engine's
            # 8 GiB default) before the body is decoded.
            declared = read_header(patch).target_size
            if declared != layer.size:
                raise MaterializeError(f"{where} declares a {declared}-byte target, the "
                                       f"manifest's layer has {layer.size} bytes")
            # Streamed to disk: the base is read with positioned reads and the layer written
            # and hashed piece by piece (bounded memory for TAR_STREAM patches, docs/delta.md).
            apply_delta_file(base, patch, out, expected_diff_id=layer.diff_id,
                             max_target=layer.size)
        except DeltaError as exc:
            raise MaterializeError(f"{where}: {exc}") from None
        return out, LayerSource(layer.diff_id, "delta", len(patch), layer.size,
                                delta.source_diff_id)
    h = hashlib.sha256()
    fetched = 0
    with open(out, "wb") as f:
        for ref in layer.chunks:
            frame = fetch_blob(ref.id.hex())
            if not isinstance(frame, (bytes, bytearray)):
                raise MaterializeError(f"chunk {ref.id.hex()[:16]}: fetch returned no bytes")
            fetched += len(frame)
            piece = open_chunk(ref, bytes(frame))  # length, decompression, blake3 id
            h.update(piece)
            f.write(piece)
    got = "sha256:" + h.hexdigest()
    if got != layer.diff_id:
        raise ChunkError(f"assembled layer is {got}, expected {layer.diff_id}")
    return out, LayerSource(layer.diff_id, "chunks", fetched, layer.size)

