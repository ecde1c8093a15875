"""`fleetmesh push [DIR] --app A`: from a Dockerfile to a published release in one command.

Builds DIR's Dockerfile on the operator's engine (ops._build), tags the image
`fleetmesh/<app>:<version>` (or --tag), then publishes it through the very path `release
create` takes (ops._cli_release.publish_and_report: deltas against earlier releases, signing,
upload, rollout options). A failed build exits 1 with its error line and publishes nothing;
bad arguments exit 2 before anything is built (docs/releases.md, "fleetmesh push").
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any, Final

from mesh.clikit import EXIT_REFUSED, CliError
from mesh.release import MAX_PLATFORMS
from ops._build import BuildError, buildx_available, check_tag, docker_build, parse_platforms
from ops._cli_common import add_common_options, api_errors, operator_client
from ops._cli_release import add_publish_options, publish_and_report, publish_plan

TAG_PREFIX: Final = "fleetmesh/"  # default tag: fleetmesh/<app>:<version>
_TAG_TIMEOUT_S: Final = 60.0


def register(subparsers: Any) -> None:
    push = add_common_options(subparsers.add_parser(
        "push", help="build DIR's Dockerfile and publish it as the app's next release",
        description="docker build DIR (default .) on the operator's engine with its steps on "
                    "stderr, tag it fleetmesh/APP:VERSION (or --tag), then publish it as "
                    "`fleetmesh release create` does: deltas against the app's last --key "
                    "releases, signed, only missing blobs uploaded, rollout options alike."))
    push.add_argument("dir", metavar="DIR", nargs="?", type=Path, default=Path("."),
                      help="build context holding the Dockerfile (default .)")
    push.add_argument("--tag", metavar="IMAGE",
                      help="tag the built image so (default fleetmesh/APP:VERSION)")
    push.add_argument("--platform", metavar="OS/ARCH[,OS/ARCH...]",
                      help="build for this platform (e.g. linux/arm64; the engine must be able "
                           "to run its RUN steps). Several, comma-separated, are built one by "
                           "one (with docker buildx where the client has it, else the classic "
                           "builder) and published as one release with an image per platform")
    push.add_argument("--build-arg", action="append", default=[], metavar="NAME=VALUE",
                      help="a Dockerfile ARG (repeatable), e.g. --build-arg BASE=busybox:1.36")
    add_publish_options(push)
    push.set_defaults(handler=_push)


def _platforms(text: str | None) -> tuple[str, ...]:
    """The platforms to build (none: the engine's own)."""
    if text is None:
        return ()
    try:
        platforms = parse_platforms(text)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if len(platforms) > MAX_PLATFORMS:
        raise CliError(f"--platform {text}: a release has at most {MAX_PLATFORMS} platforms")
    return platforms


def platform_tag(image: str, platform: str) -> str:
    """The tag of one platform's image of a several-platform push: IMAGE-os-arch[-variant]
    (fleetmesh/web:3 -> fleetmesh/web:3-linux-arm-v7)."""
    return f"{image}-{platform.replace('/', '-')}"


def _context(directory: Path) -> Path:
    if not directory.is_dir():
        raise CliError(f"{directory}: no such directory")
    if not (directory / "Dockerfile").is_file():
        raise CliError(f"{directory}: no Dockerfile in it")
    return directory


def _next_version(client: Any, fleet: str, app: str, asked: int | None) -> int:
    versions = [r.get("version") for r in client.list_releases(fleet, app)]
    latest = max((v for v in versions if isinstance(v, int) and not isinstance(v, bool)),
                 default=0)
    if asked is None:
        return latest + 1
    if asked <= latest:
        raise CliError(f"version {asked} is not newer than {fleet}/{app} version {latest}",
                       code=EXIT_REFUSED)
    return asked


def _docker_quietly(*argv: str) -> None:
    """A tag change after the release is published: its failure costs a tag, not the release."""
    try:
        subprocess.run(["docker", *argv], capture_output=True, timeout=_TAG_TIMEOUT_S,
                       check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"fleetmesh: warning: docker {' '.join(argv)}: {exc}", file=sys.stderr)


def _fix_tag(image: str, app: str, created: bool, published: int) -> None:
    """The default tag names the version published: none when nothing new was published (the
    image stays under its other tags), the right one when another publisher took the version
    between the listing and the publish."""
    if created and image != f"{TAG_PREFIX}{app}:{published}":
        _docker_quietly("tag", image, f"{TAG_PREFIX}{app}:{published}")
    if not created or image != f"{TAG_PREFIX}{app}:{published}":
        _docker_quietly("image", "rm", "--no-prune", image)


def _push(args: argparse.Namespace) -> int:
    plan = publish_plan(args)
    context = _context(args.dir)
    platforms = _platforms(args.platform)
    tag = None if args.tag is None else _checked_tag(args.tag)
    for item in args.build_arg:
        name, sep, _ = item.partition("=")
        if not sep or not name or not name.isidentifier():
            raise CliError(f"--build-arg {item!r}: use NAME=VALUE")
    terminal = sys.stderr.isatty() and not args.json

    def step(line: str) -> None:
        if not terminal:
            print(line, file=sys.stderr, flush=True)

    def echo(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    with api_errors(), operator_client(args) as client:
        version = _next_version(client, plan.fleet, plan.app, args.version)
        image = tag or f"{TAG_PREFIX}{plan.app}:{version}"
        several = len(platforms) > 1
        # buildx where the client has it (its RUN steps under QEMU); else the classic builder,
        # one platform at a time and without its cache, which does not tell platforms apart:
        # any Dockerfile whose RUN steps the engine can run for that platform (none, or QEMU's
        # binfmt handlers), each image's platform checked
        buildx = several and buildx_available()
        built = [platform_tag(image, p) for p in platforms] if several else [image]
        for name, platform in zip(built, platforms or (None,), strict=True):
            print(f"building {context} as {name}", file=sys.stderr, flush=True)
            try:
                docker_build(context, name, step=step, echo=echo if terminal else None,
                             platform=platform, build_args=args.build_arg, buildx=buildx,
                             no_cache=several and not buildx)
            except BuildError as exc:
                raise CliError(str(exc), code=EXIT_REFUSED) from None
        result = publish_and_report(args, plan, client, built)
    if tag is None and not several:
        _fix_tag(image, plan.app, result.created, result.version)
    return 0


def _checked_tag(text: str) -> str:
    try:
        return check_tag(text)
    except ValueError as exc:
        raise CliError(str(exc)) from None
