"""Docker image tars in and out, and the device-side rebuild of a release into one.

`read_saved_image` parses what `docker save` writes (the legacy layout of engine 20.10 and the
OCI layout plus `manifest.json` of newer engines: both list their config and layer paths in
`manifest.json`) and checks every layer against the config's `rootfs.diff_ids`.
`build_loadable_image` writes the legacy layout, which every `docker load` accepts.
`materialize_release` turns a signed manifest plus local layers and fetched blobs into such a
tar, checking every byte against the signed manifest before Docker sees any of it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import posixpath
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final, NamedTuple

import blake3

from mesh.release._chunks import open_chunk
from mesh.release._codec import MAX_IMAGE_CONFIG
from mesh.release._model import (
    ChunkError,
    Layer,
    ReleaseError,
    ReleaseManifest,
)
from mesh.release._signing import VerifiedRelease

_COPY_BLOCK: Final = 1024 * 1024
_MAX_MANIFEST_JSON: Final = 1024 * 1024  # a saved manifest.json lists a few images' paths
_GZIP_MAGIC: Final = b"\x1f\x8b"
DOCKER_TIMEOUT_S: Final = 600.0  # `docker save` of a multi-GB image on a slow disk


class ImageError(ReleaseError):
    """An image tar that is malformed, or whose layers do not match its config."""


class MaterializeError(ReleaseError):
    """A release that cannot be rebuilt: a blob or a layer does not match the signed manifest."""


class SavedLayer(NamedTuple):
    diff_id: str  # "sha256:<hex>" of the uncompressed layer tar
    data: Path | bytes  # a file (when extracted to a directory) or the bytes
    size: int

    def read(self) -> bytes:
        return self.data if isinstance(self.data, bytes) else Path(self.data).read_bytes()


@dataclass(frozen=True, slots=True)
class SavedImage:
    config_bytes: bytes  # exactly as saved: its sha256 is the image ID
    layers: tuple[SavedLayer, ...]
    repo_tags: tuple[str, ...]

    @property
    def image_id(self) -> str:
        return "sha256:" + hashlib.sha256(self.config_bytes).hexdigest()


def config_diff_ids(config_bytes: bytes) -> list[str]:
    """`rootfs.diff_ids` of an image config; ImageError if there is no such list."""
    if len(config_bytes) > MAX_IMAGE_CONFIG:
        raise ImageError(f"image config of {len(config_bytes)} bytes exceeds "
                         f"{MAX_IMAGE_CONFIG}")
    try:
        config = json.loads(config_bytes)
        ids = config["rootfs"]["diff_ids"]
    except (ValueError, TypeError, KeyError):
        raise ImageError("image config has no rootfs.diff_ids") from None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ImageError("image config: rootfs.diff_ids is not a list of strings")
    return ids


# --------------------------------------------------------------------------- reading


def _member(tar: tarfile.TarFile, name: str, depth: int = 0) -> tarfile.TarInfo:
    """The regular file `name` in `tar`, following the symlinks `docker save` writes between
    layer directories (`<id>/layer.tar -> ../<other>/layer.tar`)."""
    norm = posixpath.normpath(name)
    try:
        info = tar.getmember(norm)
    except KeyError:
        try:
            info = tar.getmember("./" + norm)
        except KeyError:
            raise ImageError(f"image tar has no {name}") from None
    if (info.issym() or info.islnk()) and depth < 8:
        target = info.linkname if info.islnk() else posixpath.join(
            posixpath.dirname(norm), info.linkname)
        return _member(tar, target, depth + 1)
    if not info.isfile():
        raise ImageError(f"image tar: {name} is not a regular file")
    return info


def _copy_hashing(src: IO[bytes], dst: IO[bytes] | None) -> tuple[str, int, bytes | None]:
    """sha256 and length of `src`, copied to `dst` (or returned when `dst` is None)."""
    h = hashlib.sha256()
    size = 0
    kept: list[bytes] | None = [] if dst is None else None
    while block := src.read(_COPY_BLOCK):
        h.update(block)
        size += len(block)
        if dst is not None:
            dst.write(block)
        else:
            assert kept is not None
            kept.append(block)
    return "sha256:" + h.hexdigest(), size, None if kept is None else b"".join(kept)


def read_saved_image(tar_path: str | os.PathLike[str], extract_to: str | os.PathLike[str]
                     | None = None, *, repo_tag: str | None = None) -> SavedImage:
    """The config and layers of the (first, or `repo_tag`'s) image in a `docker save` tar.

    With `extract_to`, each layer is streamed to `<extract_to>/<diff hex>.tar` (bounded memory)
    and `SavedLayer.data` is that path; without it the layers are returned as bytes. Every layer
    must hash to its `rootfs.diff_ids` entry (gzip-compressed OCI blobs are decompressed first).
    """
    out_dir = None if extract_to is None else Path(extract_to)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    try:
        tar = tarfile.open(tar_path, "r:")
    except (OSError, tarfile.TarError) as exc:
        raise ImageError(f"cannot read image tar {tar_path}: {exc}") from None
    with tar:
        try:
            raw = tar.extractfile(_member(tar, "manifest.json"))
            assert raw is not None
            text = raw.read(_MAX_MANIFEST_JSON + 1)
            if len(text) > _MAX_MANIFEST_JSON:
                raise ImageError("image tar: manifest.json is too large")
            entries = json.loads(text)
        except ValueError:
            raise ImageError("image tar: manifest.json is not JSON") from None
        if not isinstance(entries, list) or not entries:
            raise ImageError("image tar: manifest.json lists no image")
        entry = entries[0]
        if repo_tag is not None:
            tagged = [e for e in entries if isinstance(e, dict)
                      and repo_tag in (e.get("RepoTags") or [])]
            if not tagged:
                raise ImageError(f"image tar has no image tagged {repo_tag}")
            entry = tagged[0]
        if (not isinstance(entry, dict) or not isinstance(entry.get("Config"), str)
                or not isinstance(entry.get("Layers"), list)
                or not all(isinstance(p, str) for p in entry["Layers"])):
            raise ImageError("image tar: manifest.json entry lacks Config or Layers")
        info = _member(tar, entry["Config"])
        if info.size > MAX_IMAGE_CONFIG:
            raise ImageError(f"image config of {info.size} bytes exceeds {MAX_IMAGE_CONFIG}")
        f = tar.extractfile(info)
        assert f is not None
        config = f.read()
        # Both layouts name the config by its sha256 (`<hex>.json`, `blobs/sha256/<hex>`).
        named = posixpath.basename(entry["Config"]).removesuffix(".json")
        if len(named) == 64 and named != hashlib.sha256(config).hexdigest():
            raise ImageError(f"image config {entry['Config']} does not hash to its name")
        diff_ids = config_diff_ids(config)
        if len(diff_ids) != len(entry["Layers"]):
            raise ImageError(f"image has {len(entry['Layers'])} layers but its config lists "
                             f"{len(diff_ids)} diff IDs")
        layers: list[SavedLayer] = []
        for i, (path, want) in enumerate(zip(entry["Layers"], diff_ids, strict=True)):
            layers.append(_read_layer(tar, path, want, i, out_dir))
        tags = entry.get("RepoTags") or []
        return SavedImage(config, tuple(layers),
                          tuple(t for t in tags if isinstance(t, str)))


def _read_layer(tar: tarfile.TarFile, path: str, want: str, index: int,
                out_dir: Path | None) -> SavedLayer:
    info = _member(tar, path)
    src = tar.extractfile(info)
    assert src is not None
    head = src.read(2)
    src.seek(0)
    stream: IO[bytes] = src
    if head == _GZIP_MAGIC:  # an OCI blob may be a compressed layer; diff IDs are uncompressed
        stream = gzip.GzipFile(fileobj=src, mode="rb")  # type: ignore[assignment]
    target = None if out_dir is None else out_dir / f"{want.removeprefix('sha256:')}.tar"
    try:
        if target is None:
            got, size, data = _copy_hashing(stream, None)
        else:
            tmp = target.with_name(target.name + ".part")
            with open(tmp, "wb") as dst:
                got, size, data = _copy_hashing(stream, dst)
            if got == want:
                os.replace(tmp, target)
            else:
                tmp.unlink(missing_ok=True)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise ImageError(f"image tar: cannot read layer {index} ({path}): {exc}") from None
    if got != want:
        raise ImageError(f"layer {index} ({path}) hashes to {got}, but the config says {want}")
    if target is not None:
        return SavedLayer(want, target, size)
    assert data is not None
    return SavedLayer(want, data, size)


# --------------------------------------------------------------------------- writing


def build_loadable_image(config_bytes: bytes, layer_files: Sequence[str | os.PathLike[str]],
                         repo_tag: str, out: str | os.PathLike[str]) -> Path:
    """Write `out`: a legacy-layout image tar (`manifest.json`, `<sha256>.json`,
    `<diff hex>/layer.tar`) that `docker load` accepts, tagged `repo_tag`.

    Layers are streamed from their files and hashed on the way: each must match its
    `rootfs.diff_ids` entry, else ImageError and `out` is not left behind. Written to a
    temporary name and renamed, so `out` is either whole or absent.
    """
    diff_ids = config_diff_ids(config_bytes)
    if len(diff_ids) != len(layer_files):
        raise ImageError(f"{len(layer_files)} layer files for a config of {len(diff_ids)} layers")
    out_path = Path(out)
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    layer_names = [f"{d.removeprefix('sha256:')}/layer.tar" for d in diff_ids]
    manifest = json.dumps([{"Config": config_name, "RepoTags": [repo_tag],
                            "Layers": layer_names}]).encode()
    tmp = out_path.with_name(f".{out_path.name}.part{os.getpid()}")
    try:
        with tarfile.open(tmp, "w:", format=tarfile.PAX_FORMAT) as tar:
            written: set[str] = set()
            for name, path, want in zip(layer_names, layer_files, diff_ids, strict=True):
                if name in written:
                    continue
                written.add(name)
                dir_info = tarfile.TarInfo(posixpath.dirname(name))
                dir_info.type, dir_info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(dir_info)
                size = os.stat(path).st_size
                info = tarfile.TarInfo(name)
                info.size, info.mode = size, 0o644
                with open(path, "rb") as src:
                    hashing = _HashingReader(src)
                    tar.addfile(info, hashing)
                if hashing.size != size or hashing.digest() != want:
                    raise ImageError(f"layer file {path} is not {want}")
            _add_bytes(tar, config_name, config_bytes)
            _add_bytes(tar, "manifest.json", manifest)
        os.replace(tmp, out_path)
    except OSError as exc:
        raise ImageError(f"cannot write {out_path}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


class _HashingReader(io.RawIOBase):
    def __init__(self, src: IO[bytes]) -> None:
        self._src = src
        self._h = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        block = self._src.read(n)
        self._h.update(block)
        self.size += len(block)
        return block

    def digest(self) -> str:
        return "sha256:" + self._h.hexdigest()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def file_diff_id(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


# --------------------------------------------------------------------------- device side


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
    manifest's layers are checked. Per layer: a local layer with the same diff
    ID is reused; else a delta whose base is local is fetched (checked against its blake3 blob
    ID) and applied to the base (checked against the delta's source diff ID), the output checked
    against the layer's diff ID; else every chunk is fetched and checked against its ID, the
    layer against its diff ID. Any mismatch raises a ReleaseError subclass (MaterializeError,
    ChunkError, ManifestError) and leaves no file behind.
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
    if not isinstance(data, (bytes, bytearray)) or len(data) != size:
        got = len(data) if isinstance(data, (bytes, bytearray)) else type(data).__name__
        raise MaterializeError(f"{what} {blob_id.hex()[:16]}: got {got} bytes, expected {size}")
    if blake3.blake3(data).digest() != blob_id:
        raise MaterializeError(f"{what} {blob_id.hex()[:16]}: content does not match its id")
    return bytes(data)


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
        from mesh.delta import DeltaError, apply_delta  # mesh.release does not need mesh.delta
        try:
            data = apply_delta(base, patch, expected_diff_id=layer.diff_id)
        except DeltaError as exc:
            raise MaterializeError(f"layer {layer.diff_id[:19]}: delta from "
                                   f"{delta.source_diff_id[:19]}: {exc}") from None
        out.write_bytes(data)
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


# --------------------------------------------------------------------------- Docker


def docker_save(image_ref: str, out: str | os.PathLike[str], *, docker: str = "docker",
                timeout: float = DOCKER_TIMEOUT_S) -> Path:
    """`docker save image_ref -o out`; ImageError with Docker's own message if it fails."""
    try:
        result = subprocess.run([docker, "save", "-o", str(out), image_ref],
                                capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise ImageError(f"{docker}: command not found") from None
    except subprocess.TimeoutExpired:
        raise ImageError(f"docker save {image_ref}: timed out after {timeout:.0f} s") from None
    if result.returncode != 0:
        message = " ".join(result.stderr.split()) or f"exit code {result.returncode}"
        raise ImageError(f"docker save {image_ref}: {message}")
    return Path(out)


def export_local_layers(image_ref: str, workdir: str | os.PathLike[str], *,
                        docker: str = "docker") -> dict[str, Path]:
    """The layers of a local image as files `{diff_id: <workdir>/<hex>.tar}`, via `docker save`
    (each checked against the image config), for use as delta bases."""
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".save-", suffix=".tar", dir=work)
    os.close(fd)
    try:
        docker_save(image_ref, name, docker=docker)
        image = read_saved_image(name, work)
    finally:
        os.unlink(name)
    return {layer.diff_id: Path(layer.data) for layer in image.layers
            if isinstance(layer.data, Path)}
