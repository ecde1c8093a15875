"""Test helpers: synthetic `docker save` tars and an in-memory release registry that behaves
like the coordinator's release API (docs/api.md, "Releases and blobs")."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import blake3
from nacl.signing import VerifyKey

from mesh.release import (
    ReleaseError,
    decode_manifest,
    decode_signed_manifest,
    verify_manifest,
)
from ops.client import ApiError


def layer_tar(files: dict[str, bytes]) -> bytes:
    """A layer tar of regular files with fixed metadata (deterministic bytes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def diff_id(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def image_config(layers: Sequence[bytes], cmd: Sequence[str] = ("echo", "hi")) -> bytes:
    return json.dumps({
        "architecture": "amd64", "os": "linux", "config": {"Cmd": list(cmd)},
        "rootfs": {"type": "layers", "diff_ids": [diff_id(x) for x in layers]},
    }, sort_keys=True).encode()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def saved_image_tar(path: Path, layers: Sequence[bytes], config: bytes | None = None, *,
                    layout: str = "legacy", repo_tag: str = "fleetmesh-test/app:1",
                    duplicate_symlink: bool = False) -> Path:
    """What `docker save` writes: engine 20.10's legacy layout, or the OCI layout of newer
    engines (blobs/sha256/... plus index.json, oci-layout and manifest.json)."""
    config = image_config(layers) if config is None else config
    config_hex = hashlib.sha256(config).hexdigest()
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        paths: list[str] = []
        if layout == "legacy":
            for i, data in enumerate(layers):
                v1 = hashlib.sha256(f"v1-{i}".encode() + data).hexdigest()
                dir_info = tarfile.TarInfo(v1)
                dir_info.type, dir_info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(dir_info)
                _add(tar, f"{v1}/VERSION", b"1.0")
                _add(tar, f"{v1}/json", b"{}")
                if duplicate_symlink and i > 0:
                    # docker save links a layer already written elsewhere in the archive.
                    link = tarfile.TarInfo(f"{v1}/layer.tar")
                    first = paths[0].split("/")[0]
                    link.type, link.linkname = tarfile.SYMTYPE, f"../{first}/layer.tar"
                    tar.addfile(link)
                else:
                    _add(tar, f"{v1}/layer.tar", data)
                paths.append(f"{v1}/layer.tar")
            config_name = f"{config_hex}.json"
            _add(tar, config_name, config)
        else:
            for data in layers:
                name = f"blobs/sha256/{hashlib.sha256(data).hexdigest()}"
                if name not in paths:
                    _add(tar, name, data)
                paths.append(name)
            config_name = f"blobs/sha256/{config_hex}"
            _add(tar, config_name, config)
            _add(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
            _add(tar, "index.json", b'{"schemaVersion":2,"manifests":[]}')
        _add(tar, "manifest.json", json.dumps(
            [{"Config": config_name, "RepoTags": [repo_tag], "Layers": paths}]).encode())
    return path


class FakeRegistry:
    """The coordinator's blob store and release registry in memory, with its checks."""

    def __init__(self, public_key: VerifyKey | None = None) -> None:
        self.blobs: dict[str, bytes] = {}
        self.releases: dict[tuple[str, str, int], bytes] = {}
        self.public_key = public_key
        self.puts: list[str] = []
        self.gets: list[str] = []
        self.fail_after_puts: int | None = None
        self.release_keys: dict[str, str] = {}

    def __enter__(self) -> FakeRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def set_release_key(self, fleet: str, public_key_hex: str) -> None:
        self.public_key = VerifyKey(bytes.fromhex(public_key_hex))
        self.release_keys[fleet] = public_key_hex

    def release(self, fleet: str, app: str, version: int) -> dict[str, Any]:
        data = self.release_manifest(fleet, app, version)
        m = decode_manifest(decode_signed_manifest(data).manifest)
        info = self._info(data)
        info["layers"] = [{"diff_id": x.diff_id, "size": x.size, "chunks": len(x.chunks),
                           "stored_size": sum(c.stored_size for c in x.chunks),
                           "deltas": [{"source_diff_id": d.source_diff_id, "size": d.size,
                                       "method": d.method} for d in x.deltas]}
                          for x in m.layers]
        return info

    def missing_blobs(self, ids: Sequence[str]) -> list[str]:
        assert len(ids) <= 10_000
        return [i for i in ids if i not in self.blobs]

    def put_blob(self, blob_id: str, data: bytes, kind: str) -> bool:
        if self.fail_after_puts is not None and len(self.puts) >= self.fail_after_puts:
            raise ConnectionError("link dropped")
        if kind == "delta":
            ok = blake3.blake3(data).hexdigest() == blob_id
        else:
            from backports import zstd
            ok = blake3.blake3(zstd.decompress(data)).hexdigest() == blob_id
        if not ok:
            raise ApiError(400, "blob does not hash to its id")
        self.puts.append(blob_id)
        created = blob_id not in self.blobs
        self.blobs[blob_id] = data
        return created

    def get_blob(self, blob_id: str, start: int | None = None, end: int | None = None) -> bytes:
        self.gets.append(blob_id)
        return self.blobs[blob_id]

    def _info(self, data: bytes) -> dict[str, Any]:
        m = decode_manifest(decode_signed_manifest(data).manifest)
        return {"fleet": m.fleet, "app": m.app, "version": m.version,
                "created_at": m.created_at, "layers": len(m.layers),
                "size": sum(x.size for x in m.layers),
                "stored_size": sum(c.stored_size for x in m.layers for c in x.chunks),
                "delta_size": sum(d.size for x in m.layers for d in x.deltas)}

    def publish_release(self, signed_manifest: bytes, rollout: str | None = None
                        ) -> tuple[dict[str, Any], bool]:
        signed = decode_signed_manifest(signed_manifest)
        if self.public_key is not None:
            try:
                verify_manifest(signed, self.public_key, None)
            except ReleaseError as exc:
                raise ApiError(403, str(exc)) from None
        m = decode_manifest(signed.manifest)
        key = (m.fleet, m.app, m.version)
        if self.releases.get(key) == signed_manifest:
            return self._info(signed_manifest), False
        ids = [c.id.hex() for x in m.layers for c in x.chunks]
        ids += [d.blob_id.hex() for x in m.layers for d in x.deltas]
        missing = self.missing_blobs(ids)
        if missing:
            err = ApiError(409, "blobs missing")
            err.missing = missing
            raise err
        latest = max((v for f, a, v in self.releases if (f, a) == key[:2]), default=0)
        if m.version <= latest:
            raise ApiError(409, "version is not newer")
        self.releases[key] = signed_manifest
        return self._info(signed_manifest), True

    def list_releases(self, fleet: str, app: str | None = None) -> list[dict[str, Any]]:
        keys = sorted((k for k in self.releases if k[0] == fleet and app in (None, k[1])),
                      key=lambda k: -k[2])
        return [self._info(self.releases[k]) for k in keys]

    def release_manifest(self, fleet: str, app: str, version: int) -> bytes:
        try:
            return self.releases[(fleet, app, version)]
        except KeyError:
            raise ApiError(404, "no such release") from None
