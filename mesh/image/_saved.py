"""Docker image tars in and out.

`read_saved_image` parses what `docker save` writes (the legacy layout of engine 20.10 and the
OCI layout plus `manifest.json` of newer engines: both list their config and layer paths in
`manifest.json`) and checks every layer against the config's `rootfs.diff_ids`.
`build_loadable_image` writes the legacy layout, which every `docker load` accepts.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import posixpath
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final, NamedTuple

from mesh.release import MAX_IMAGE_CONFIG, ReleaseError

_COPY_BLOCK: Final = 1024 * 1024
_MAX_MANIFEST_JSON: Final = 1024 * 1024  # a saved manifest.json lists a few images' paths
_GZIP_MAGIC: Final = b"\x1f\x8b"


class ImageError(ReleaseError):
    """An image tar that is malformed, or whose layers do not match its config."""



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

