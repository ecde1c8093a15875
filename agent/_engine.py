"""The device's Docker engine, through the docker SDK (docker-py 7.2, API 1.41 on engine 20.10).

`DockerEngine` is synchronous: the applier calls it from a worker thread
(`trio.to_thread.run_sync`). It does only what the apply engine needs, and reads the actual
state by label (`docker ps -a --filter label=io.fleetmesh.device=NAME`), never by assumption:

    engine = DockerEngine()                                # DOCKER_HOST or the default socket
    engine = DockerEngine("unix:///run/fm/cam-1/docker.sock")
    engine.containers("cam-1", "web")                       # -> [ContainerView]

Every Docker failure is an `EngineError` with a one-line message.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import docker
import requests

from mesh.image import read_saved_image
from mesh.release import ManifestError, ReleaseError, normalize_platform

from ._apply_core import LABEL_APP, LABEL_DEVICE, LABEL_RELEASE, ContainerView, one_line

# `docker load`/`save` of a multi-GB image on a slow SD card (mesh.image.DOCKER_TIMEOUT_S).
DOCKER_TIMEOUT_S: Final = 600.0
STOP_TIMEOUT_S: Final = 10  # Docker's own default grace period before SIGKILL
IMAGE_REPO_PREFIX: Final = "fleetmesh/"
_NEVER: Final = "0001-01-01T00:00:00Z"  # State.StartedAt of a container never started
_TIME: Final = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)")


class EngineError(Exception):
    """The Docker engine refused or could not be reached; str() is one line."""


def parse_docker_time(text: str | None) -> float | None:
    """Docker's RFC 3339 times (nanoseconds, Z or offset) as Unix time; None for "never"."""
    if not text or text.startswith("0001-01-01"):
        return None
    m = _TIME.match(text)
    if m is None:
        return None
    frac = (m.group(2) or "0")[:6].ljust(6, "0")
    zone = "+00:00" if m.group(3) == "Z" else m.group(3)
    try:
        return datetime.fromisoformat(f"{m.group(1)}.{frac}{zone}").timestamp()
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class ContainerSpec:
    name: str
    image: str
    command: tuple[str, ...]  # empty: the image's CMD
    environment: tuple[tuple[str, str], ...]
    labels: Mapping[str, str]
    restart_policy: str  # "no", "on-failure", "unless-stopped", "always"
    binds: tuple[tuple[str, str, bool], ...]  # (host path or volume name, target, read-only)
    network: str  # "host" or "none"


class DockerEngine:
    """The apply engine's view of one Docker engine. Thread-safe for the calls the applier and
    the log collector make (each call is one HTTP request on docker-py's session pool)."""

    def __init__(self, base_url: str | None = None, *, timeout: float = DOCKER_TIMEOUT_S
                 ) -> None:
        try:
            if base_url is None:
                self._client = docker.from_env(timeout=int(timeout))
            else:
                self._client = docker.DockerClient(base_url=base_url, timeout=int(timeout))
        except docker.errors.DockerException as exc:
            raise EngineError(f"docker: {one_line(str(exc))}") from None
        self.api = self._client.api

    def close(self) -> None:
        self._client.close()

    def _call(self, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except docker.errors.NotFound as exc:
            raise NotFoundError(f"{what}: {one_line(_explain(exc))}") from None
        except (docker.errors.DockerException, requests.RequestException, OSError) as exc:
            raise EngineError(f"{what}: {one_line(_explain(exc))}") from None

    def ping(self) -> None:
        self._call("docker ping", self.api.ping)

    def platform(self) -> str:
        """The engine's platform, `os/arch[/variant]` (docker info: OSType, and Architecture as
        its kernel names it: x86_64, aarch64, armv7l); EngineError if it does not say."""
        info = self._call("docker info", self.api.info)
        os_type, arch = info.get("OSType"), info.get("Architecture")
        if not isinstance(os_type, str) or not isinstance(arch, str):
            raise EngineError("docker info: no OSType or Architecture")
        try:
            return normalize_platform(os_type, arch)
        except ManifestError as exc:
            raise EngineError(f"docker info: {exc}") from None

    # -- containers ------------------------------------------------------------------------

    def containers(self, device: str, app: str | None = None) -> list[ContainerView]:
        """The containers labelled for `device` (and `app`), running or not."""
        labels = [f"{LABEL_DEVICE}={device}"] + ([] if app is None else [f"{LABEL_APP}={app}"])
        listed = self._call("docker ps", self.api.containers, all=True,
                            filters={"label": labels})
        out = []
        for entry in listed:
            try:
                info = self._call("docker inspect", self.api.inspect_container, entry["Id"])
            except NotFoundError:
                continue  # removed meanwhile
            view = _view(info)
            if view is not None:
                out.append(view)
        return out

    def container_app(self, container_id: str) -> str | None:
        info = self._call("docker inspect", self.api.inspect_container, container_id)
        labels = (info.get("Config") or {}).get("Labels") or {}
        app = labels.get(LABEL_APP)
        return app if isinstance(app, str) else None

    def create(self, spec: ContainerSpec) -> str:
        host_config = self.api.create_host_config(
            binds={src: {"bind": dst, "mode": "ro" if ro else "rw"}
                   for src, dst, ro in spec.binds},
            restart_policy={"Name": spec.restart_policy},
            network_mode=spec.network)
        created = self._call(
            f"docker create {spec.name}", self.api.create_container, spec.image,
            command=list(spec.command) or None, name=spec.name, labels=dict(spec.labels),
            environment=[f"{k}={v}" for k, v in spec.environment], host_config=host_config,
            detach=True)
        return str(created["Id"])

    def start(self, container_id: str, restart_policy: str | None = None) -> None:
        if restart_policy is not None:
            self._call("docker update", self.api.update_container, container_id,
                       restart_policy={"Name": restart_policy})
        self._call("docker start", self.api.start, container_id)

    def stop(self, container_id: str, timeout: int = STOP_TIMEOUT_S) -> None:
        """Stop without letting the restart policy bring it back (until `start` sets it)."""
        self._call("docker update", self.api.update_container, container_id,
                   restart_policy={"Name": "no"})
        self._call("docker stop", self.api.stop, container_id, timeout=timeout)

    def remove(self, container_id: str) -> None:
        try:
            self._call("docker rm", self.api.remove_container, container_id, force=True)
        except NotFoundError:
            pass

    def rename(self, container_id: str, name: str) -> None:
        self._call("docker rename", self.api.rename, container_id, name)

    def inspect(self, container_id: str) -> dict[str, Any]:
        """`docker inspect` of a container, as the engine answers it."""
        return dict(self._call("docker inspect", self.api.inspect_container, container_id))

    def image_config(self, image: str) -> dict[str, Any]:
        """The `Config` of a local image (its Env, Labels, Cmd...)."""
        info = self._call("docker image inspect", self.api.inspect_image, image)
        return dict(info.get("Config") or {})

    def create_like(self, name: str, image: str, command: Sequence[str] | None,
                    environment: Sequence[str], labels: Mapping[str, str],
                    host_config: Mapping[str, Any]) -> str:
        """Create a container with another's raw HostConfig (as `inspect` shows it): the agent
        starting its successor with its own binds, devices, capabilities and network."""
        created = self._call(
            f"docker create {name}", self.api.create_container, image,
            command=list(command) if command else None, name=name, labels=dict(labels),
            environment=list(environment), host_config=dict(host_config), detach=True)
        return str(created["Id"])

    def set_restart_policy(self, container_id: str, policy: str) -> None:
        self._call("docker update", self.api.update_container, container_id,
                   restart_policy={"Name": policy})

    def last_log_line(self, container_id: str) -> str:
        """The container's last non-empty output line (stdout and stderr), "" if none."""
        try:
            out = self._call("docker logs", self.api.logs, container_id, stdout=True,
                             stderr=True, tail=5)
        except EngineError:
            return ""
        lines = [x.strip() for x in bytes(out).decode("utf-8", "replace").splitlines()]
        return one_line(next((x for x in reversed(lines) if x), ""))

    def exec(self, container_id: str, argv: Sequence[str], timeout: float) -> tuple[int | None,
                                                                                    str]:
        """Run `argv` in the container: (exit code, None when it did not finish in time;
        the first line of its output)."""
        ex = self._call("docker exec", self.api.exec_create, container_id, list(argv),
                        stdout=True, stderr=True)
        output = self._call("docker exec", self.api.exec_start, ex["Id"], detach=False,
                            stream=True)
        result: list[bytes] = []
        done = threading.Event()

        def drain() -> None:
            try:
                for part in output:
                    if sum(map(len, result)) < 4096:
                        result.append(part)
            except Exception:  # noqa: BLE001 - a broken stream ends the output, nothing else
                pass
            done.set()

        threading.Thread(target=drain, daemon=True, name="fleetmesh-exec").start()
        finished = done.wait(timeout)
        if not finished:
            return None, ""
        info = self._call("docker exec", self.api.exec_inspect, ex["Id"])
        code = info.get("ExitCode")
        text = b"".join(result).decode("utf-8", "replace").strip().splitlines()
        return (code if isinstance(code, int) else None), (text[0] if text else "")

    def logs(self, container_id: str, stream: str, since: float | None) -> Iterator[bytes]:
        """Follow one stream ("stdout"/"stderr") of a container: lines with timestamps."""
        return self._call(  # type: ignore[no-any-return]
            "docker logs", self.api.logs, container_id, stdout=stream == "stdout",
            stderr=stream == "stderr", stream=True, follow=True, timestamps=True,
            since=since if since else None)

    # -- images ----------------------------------------------------------------------------

    def app_images(self, app: str) -> dict[int, str]:
        """`fleetmesh/<app>:<version>` tags present: {version: image ID}."""
        repo = IMAGE_REPO_PREFIX + app
        images = self._call("docker images", self.api.images, name=repo)
        out: dict[int, str] = {}
        for img in images:
            for tag in img.get("RepoTags") or []:
                name, _, version = tag.rpartition(":")
                if name == repo and version.isascii() and version.isdigit() and int(version) > 0:
                    out[int(version)] = str(img["Id"])
        return out

    def image_layers(self, image: str) -> list[str]:
        """RootFS.Layers (the diff IDs) of a local image."""
        info = self._call("docker image inspect", self.api.inspect_image, image)
        layers = (info.get("RootFS") or {}).get("Layers") or []
        return [x for x in layers if isinstance(x, str)]

    def image_id(self, image: str) -> str | None:
        try:
            info = self._call("docker image inspect", self.api.inspect_image, image)
        except NotFoundError:
            return None
        return str(info["Id"])

    def remove_image(self, image: str) -> None:
        try:
            self._call("docker rmi", self.api.remove_image, image, noprune=False)
        except NotFoundError:
            pass

    def load(self, tar: Path) -> None:
        """`docker load -i tar`, streaming the file; EngineError with Docker's message."""
        with open(tar, "rb") as f:
            progress = self._call("docker load", self.api.load_image, f)
            for message in progress or ():
                if isinstance(message, dict) and message.get("error"):
                    raise EngineError(f"docker load: {one_line(str(message['error']))}")

    def save_layers(self, image: str, workdir: Path) -> dict[str, Path]:
        """The layers of a local image as verified files `{diff_id: workdir/<hex>.tar}` (the
        delta bases of the next release): `docker save`, each layer checked against the
        image config's diff IDs (mesh.image.read_saved_image)."""
        workdir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".save-", suffix=".tar", dir=workdir)
        try:
            with os.fdopen(fd, "wb") as f:
                chunks = self._call("docker save", self.api.get_image, image)
                try:
                    for block in chunks:
                        f.write(block)
                except Exception as exc:  # noqa: BLE001 - the stream's errors, any class
                    raise EngineError(f"docker save {image}: {one_line(str(exc))}") from None
            try:
                saved = read_saved_image(name, workdir)
            except ReleaseError as exc:
                raise EngineError(f"docker save {image}: {exc}") from None
        finally:
            Path(name).unlink(missing_ok=True)
        return {layer.diff_id: Path(layer.data) for layer in saved.layers
                if isinstance(layer.data, Path)}


class NotFoundError(EngineError):
    """The container or image does not exist (any more)."""


def _explain(exc: BaseException) -> str:
    explanation = getattr(exc, "explanation", None)
    if explanation:
        return str(explanation.decode() if isinstance(explanation, bytes) else explanation)
    return str(exc) or type(exc).__name__


def _view(info: Mapping[str, Any]) -> ContainerView | None:
    labels = (info.get("Config") or {}).get("Labels") or {}
    release = labels.get(LABEL_RELEASE, "")
    if not isinstance(release, str) or not (release.isascii() and release.isdigit()) \
            or int(release) < 1:
        return None  # not one of ours, or damaged: left alone
    state = info.get("State") or {}
    health = (state.get("Health") or {}).get("Status")
    started = state.get("StartedAt")
    return ContainerView(
        id=str(info["Id"]), name=str(info.get("Name", "")).lstrip("/"), version=int(release),
        status=str(state.get("Status", "unknown")),
        started_at=None if started == _NEVER else parse_docker_time(started),
        health=health if isinstance(health, str) else None,
        exit_code=int(state.get("ExitCode") or 0),
        restart_count=int(info.get("RestartCount") or 0))


def docker_available(base_url: str | None = None) -> str | None:
    """None if an engine answers, else why not (one line); for tests and the CLI."""
    if base_url is None and shutil.which("docker") is None and not os.environ.get("DOCKER_HOST") \
            and not os.path.exists("/var/run/docker.sock"):
        return "no Docker engine (no DOCKER_HOST, no /var/run/docker.sock)"
    try:
        engine = DockerEngine(base_url, timeout=20)
        try:
            engine.ping()
        finally:
            engine.close()
    except EngineError as exc:
        return str(exc)
    return None


__all__ = ["ContainerSpec", "DockerEngine", "EngineError", "NotFoundError", "docker_available",
           "parse_docker_time"]
