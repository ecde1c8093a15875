"""A fake Docker engine with an explicit clock, and signed synthetic releases in a real
BlobStore: what the apply engine's unit tests run against.

The fake keeps the state `docker ps -a` and `docker images` would show and lets a test say how
each release's app behaves once started (keeps running, exits, crash-loops, what its health
command returns, what its image HEALTHCHECK reports). `docker load` reads the real tar the
applier built (mesh.image.read_saved_image), so the image ID it records is the real one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nacl.signing import SigningKey

from agent._apply_core import LABEL_APP, LABEL_DEVICE, LABEL_RELEASE, ContainerView
from agent._blobstore import BlobStore
from agent._engine import ContainerSpec, EngineError, NotFoundError
from mesh.image import read_saved_image
from mesh.release import (
    ContainerSettings,
    Layer,
    ReleaseManifest,
    VerifiedRelease,
    chunk_layer,
    diff_id,
    encode_signed_manifest,
    sign_manifest,
    verify_release,
)
from tests.release._fakes import layer_tar


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


@dataclass
class Behaviour:
    """How a release's app behaves in the fake engine."""

    exits: int | None = None  # exits with this code right after start
    restarting: bool = False  # crash-loops under its restart policy
    health_cmd_code: int = 0  # what a cmd health check returns
    docker_health: str | None = None  # State.Health.Status with an image HEALTHCHECK


@dataclass
class FakeContainer:
    id: str
    spec: ContainerSpec
    status: str = "created"
    started_at: float | None = None
    exit_code: int = 0
    restart_policy: str = "no"

    @property
    def version(self) -> int:
        return int(self.spec.labels[LABEL_RELEASE])


@dataclass
class FakeEngine:
    clock: Clock
    containers_: dict[str, FakeContainer] = field(default_factory=dict)
    images: dict[str, str] = field(default_factory=dict)  # tag -> image id
    layers: dict[str, list[str]] = field(default_factory=dict)  # image id -> diff ids
    behaviour: dict[int, Behaviour] = field(default_factory=dict)
    calls: list[tuple[str, ...]] = field(default_factory=list)  # mutating calls, in order
    down: bool = False  # the engine does not answer
    platform_: str = "linux/amd64"  # what `docker info` says
    _seq: int = 0

    def _check(self) -> None:
        if self.down:
            raise EngineError("docker ps: Cannot connect to the Docker daemon")

    def _get(self, cid: str) -> FakeContainer:
        c = self.containers_.get(cid)
        if c is None:
            raise NotFoundError(f"No such container: {cid}")
        return c

    def platform(self) -> str:
        self._check()
        return self.platform_

    # -- what the applier reads
    def containers(self, device: str, app: str | None = None) -> list[ContainerView]:
        self._check()
        out = []
        for c in self.containers_.values():
            labels = c.spec.labels
            if labels.get(LABEL_DEVICE) != device or (app is not None
                                                      and labels.get(LABEL_APP) != app):
                continue
            b = self.behaviour.get(c.version, Behaviour())
            out.append(ContainerView(c.id, c.spec.name, c.version, c.status, c.started_at,
                                     b.docker_health if c.status == "running" else None,
                                     c.exit_code))
        return out

    def app_images(self, app: str) -> dict[int, str]:
        self._check()
        out = {}
        for tag, iid in self.images.items():
            repo, _, version = tag.rpartition(":")
            if repo == f"fleetmesh/{app}":
                out[int(version)] = iid
        return out

    def image_layers(self, image: str) -> list[str]:
        iid = self.images.get(image, image)
        return list(self.layers.get(iid, []))

    def image_id(self, image: str) -> str | None:
        return self.images.get(image)

    # -- what the applier changes
    def load(self, tar: Path) -> None:
        self._check()
        saved = read_saved_image(tar)
        self.layers[saved.image_id] = [x.diff_id for x in saved.layers]
        for tag in saved.repo_tags:
            self.images[tag] = saved.image_id
        self.calls.append(("load", *saved.repo_tags))

    def save_layers(self, image: str, workdir: Path) -> dict[str, Path]:
        raise EngineError("the fake engine keeps no layer bytes")

    def remove_image(self, image: str) -> None:
        self._check()
        iid = self.images.get(image)
        if any(c.spec.image == image for c in self.containers_.values()):
            raise EngineError(f"conflict: unable to remove {image}: in use")
        self.images.pop(image, None)
        self.calls.append(("rmi", image))
        if iid is not None and iid not in self.images.values():
            self.layers.pop(iid, None)

    def create(self, spec: ContainerSpec) -> str:
        self._check()
        if spec.image not in self.images:
            raise EngineError(f"No such image: {spec.image}")
        if any(c.spec.name == spec.name for c in self.containers_.values()):
            raise EngineError(f"Conflict. The container name /{spec.name} is already in use")
        self._seq += 1
        cid = hashlib.sha256(f"c{self._seq}".encode()).hexdigest()
        self.containers_[cid] = FakeContainer(cid, spec, restart_policy=spec.restart_policy)
        self.calls.append(("create", spec.name, str(spec.labels[LABEL_RELEASE])))
        return cid

    def start(self, cid: str, restart_policy: str | None = None) -> None:
        self._check()
        c = self._get(cid)
        if restart_policy is not None:
            c.restart_policy = restart_policy
        b = self.behaviour.get(c.version, Behaviour())
        c.started_at = self.clock()
        if b.exits is not None:
            c.status, c.exit_code = "exited", b.exits
        elif b.restarting:
            c.status = "restarting"
        else:
            c.status = "running"
        self.calls.append(("start", str(c.version)))

    def stop(self, cid: str, timeout: int = 10) -> None:
        self._check()
        c = self._get(cid)
        c.restart_policy = "no"
        c.status, c.exit_code = "exited", 137
        self.calls.append(("stop", str(c.version)))

    def remove(self, cid: str) -> None:
        self._check()
        c = self.containers_.pop(cid, None)
        if c is not None:
            self.calls.append(("rm", str(c.version)))

    def rename(self, cid: str, name: str) -> None:
        self._check()
        c = self._get(cid)
        if any(o.spec.name == name and o.id != cid for o in self.containers_.values()):
            raise EngineError(f"Conflict. The container name /{name} is already in use")
        c.spec = ContainerSpec(name, c.spec.image, c.spec.command, c.spec.environment,
                               c.spec.labels, c.spec.restart_policy, c.spec.binds,
                               c.spec.network)
        self.calls.append(("rename", name))

    def exec(self, cid: str, argv: Sequence[str], timeout: float) -> tuple[int | None, str]:
        c = self._get(cid)
        if c.status != "running":
            raise EngineError(f"Container {cid[:12]} is not running")
        code = self.behaviour.get(c.version, Behaviour()).health_cmd_code
        return code, "" if code == 0 else "unhealthy"

    def logs(self, cid: str, stream: str, since: float | None) -> Iterator[bytes]:
        return iter(())

    # -- test helpers
    def running(self, device: str, app: str) -> list[FakeContainer]:
        return [c for c in self.containers_.values() if c.status == "running"
                and c.spec.labels[LABEL_DEVICE] == device and c.spec.labels[LABEL_APP] == app]


class Releases:
    """Signed one-layer releases of one app; their chunks go into a real BlobStore."""

    def __init__(self, root: Path, fleet: str = "cams", app: str = "web") -> None:
        self.fleet, self.app = fleet, app
        self.key = SigningKey(os.urandom(32))
        self.key_hex = bytes(self.key.verify_key).hex()
        self.store = BlobStore(root / "blobs")

    def make(self, version: int, settings: ContainerSettings | None = None, *,
             image_healthcheck: bool = False, store: bool = True,
             bad_config: bool = False, payload: int = 2000, arch: str = "amd64") -> bytes:
        layer = layer_tar({"app/VERSION": f"{version}\n".encode(),
                           "app/data.bin": random.Random(version).randbytes(payload)})
        chunks = chunk_layer(layer)
        did = diff_id(layer)
        cfg: dict[str, object] = {"Cmd": ["sh", "-c", f"echo v{version}"]}
        if image_healthcheck:
            cfg["Healthcheck"] = {"Test": ["CMD-SHELL", "true"], "Interval": 1_000_000_000}
        diff_ids = [did] if not bad_config else ["sha256:" + "0" * 64]
        config = json.dumps({"architecture": arch, "os": "linux", "config": cfg,
                             "rootfs": {"type": "layers", "diff_ids": diff_ids}},
                            sort_keys=True).encode()
        manifest = ReleaseManifest(self.fleet, self.app, version, 1_700_000_000, config,
                                   (Layer(did, len(layer), tuple(c.ref for c in chunks)),),
                                   settings or ContainerSettings())
        if store:
            for c in chunks:
                self.store.put(c.ref.id, c.data, "chunk", ref=c.ref)
        return encode_signed_manifest(sign_manifest(manifest, self.key))

    def verified(self, signed: bytes) -> VerifiedRelease:
        """`signed` as the agent passes it on once it arrived: verified (with our key)."""
        return verify_release(signed, self.key.verify_key)
