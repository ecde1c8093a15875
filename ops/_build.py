"""Building an image from a Dockerfile on the operator's engine, for `fleetmesh push`.

The engine is reached as `release create` reaches it to save an image (mesh.image.docker_save):
the `docker` client as a child process, so DOCKER_HOST and the client's contexts apply alike.
The build's output is read line by line: every line goes to `echo` (a terminal), the line that
starts a build step to `step` (a pipe gets one line per step), and a failed build raises
BuildError with the build's last error line (or, with a platform asked for, when the image built
is for another platform).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

# The line that starts a step: the classic builder's `Step 2/4 : COPY ...`, BuildKit's plain
# progress `#5 [2/4] COPY ...` (printed again when steps interleave: shown once).
_STEP_RE: Final = re.compile(r"^(?:Step \d+/\d+ : |#\d+ \[[^\]]+\] )")
# `os/arch[/variant]` as Docker names platforms (e.g. linux/amd64, linux/arm/v7).
_PLATFORM_RE: Final = re.compile(r"^[a-z0-9]+/[a-z0-9_]+(?:/[a-z0-9]+)?$")
# Image references `push --tag` accepts: [registry[:port]/]path[:tag], lower case path.
_TAG_RE: Final = re.compile(
    r"^[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]+)?(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?$")
_TAIL_LINES: Final = 50  # output kept to find the error line of a failed build
_NOTICE: Final = ("DEPRECATED:", "Install the buildx", "https://docs.docker.com/go/buildx")
_PROBE_TIMEOUT_S: Final = 30.0  # `docker buildx version`: a local plugin, answers at once


class BuildError(Exception):
    """A one-line reason the image was not built."""


def parse_platforms(text: str) -> tuple[str, ...]:
    """`--platform linux/amd64,linux/arm64` as a tuple; ValueError with a one-line reason."""
    platforms = tuple(p.strip() for p in text.split(","))
    for p in platforms:
        if not _PLATFORM_RE.match(p):
            raise ValueError(f"--platform {text!r}: {p!r} is not os/arch[/variant] "
                             "(e.g. linux/amd64, linux/arm64, linux/arm/v7)")
    if len(set(platforms)) != len(platforms):
        raise ValueError(f"--platform {text!r}: a platform is named twice")
    return platforms


def check_tag(tag: str) -> str:
    """An image reference for `docker build -t`; ValueError with a one-line reason."""
    if len(tag) > 255 or not _TAG_RE.match(tag):
        raise ValueError(f"--tag {tag!r}: not an image reference (e.g. fleetmesh/web:3 or "
                         "registry.example:5000/web:3; lower-case name)")
    return tag


def buildx_available(docker: str = "docker") -> bool:
    """Whether the client has the buildx plugin (what building for several platforms needs)."""
    try:
        r = subprocess.run([docker, "buildx", "version"], capture_output=True,
                           timeout=_PROBE_TIMEOUT_S, check=False)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def _error_line(tail: deque[str], returncode: int) -> str:
    for line in reversed(tail):
        if line.strip() and not line.lstrip().startswith(_NOTICE):
            return " ".join(line.split())
    return f"docker build exited with {returncode}"


def docker_build(context: Path, tag: str, *, step: Callable[[str], None],
                 echo: Callable[[str], None] | None = None, platform: str | None = None,
                 build_args: Sequence[str] = (), docker: str = "docker",
                 buildx: bool = False, no_cache: bool = False) -> None:
    """`docker build --force-rm -t TAG [--platform P] [--build-arg NAME=VALUE...] CONTEXT`, its
    steps on `step` (and every line on `echo`). BuildError with the build's last error line if
    it fails. No deadline: a build takes what its Dockerfile asks (the operator stops it with
    Ctrl-C, which stops the child). `buildx`: `docker buildx build --load` instead (one of
    several platforms, whose RUN steps buildx runs under QEMU where the host has it), the
    image loaded into the engine as the classic builder leaves it. `no_cache`: without the
    build cache (the classic builder's cache does not tell platforms apart: a step cached for
    one platform would be reused for another)."""
    # --force-rm: a failed step's container is removed too (the engine keeps it otherwise).
    argv = ([docker, "buildx", "build", "--load", "-t", tag] if buildx
            else [docker, "build", "--force-rm", "-t", tag])
    if platform is not None:
        argv += ["--platform", platform]
    if no_cache:
        argv.append("--no-cache")
    for arg in build_args:
        argv += ["--build-arg", arg]
    argv.append(str(context))
    tail: deque[str] = deque(maxlen=_TAIL_LINES)
    seen: set[str] = set()
    # BuildKit (where it is the client's builder) writes plain progress lines on a pipe.
    env = dict(os.environ, BUILDKIT_PROGRESS="plain")
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", env=env)
    except FileNotFoundError:
        raise BuildError(f"{docker}: command not found") from None
    with proc:
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.rstrip("\n")
                tail.append(line)
                if echo is not None:
                    echo(line)
                if _STEP_RE.match(line) and line not in seen:
                    seen.add(line)
                    step(line)
        except BaseException:
            proc.kill()
            raise
    if proc.returncode != 0:
        raise BuildError(f"docker build {context}: {_error_line(tail, proc.returncode)}")
    if platform is not None:
        built = image_platform(tag, docker=docker)
        if not same_platform(built, platform):
            # The classic builder takes a local FROM image of another platform as it is.
            _remove_tag(tag, docker)
            raise BuildError(f"docker build {context}: the engine built a {built} image, not "
                             f"{platform} (is the FROM image there for {platform}?)")


def image_platform(image: str, *, docker: str = "docker") -> str:
    """`os/arch[/variant]` of a local image, as its config says."""
    try:
        r = subprocess.run([docker, "image", "inspect", "--format",
                            "{{.Os}}/{{.Architecture}}/{{.Variant}}", image],
                           capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S, check=False)
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"docker image inspect {image}: {exc}") from None
    if r.returncode != 0:
        raise BuildError(f"docker image inspect {image}: {' '.join(r.stderr.split())}")
    return r.stdout.strip().rstrip("/")


def same_platform(built: str, wanted: str) -> bool:
    """Whether an image of `built` serves `wanted`: same os and architecture, and the variant
    when `wanted` names one (linux/arm64 is linux/arm64/v8)."""
    b, w = built.split("/"), wanted.split("/")
    return b[:2] == w[:2] and (len(w) < 3 or b[2:3] == w[2:3])


def _remove_tag(tag: str, docker: str) -> None:
    try:
        subprocess.run([docker, "image", "rm", "--no-prune", tag], capture_output=True,
                       timeout=_PROBE_TIMEOUT_S, check=False)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        pass  # the BuildError that follows says what matters
