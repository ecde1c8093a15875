"""`fleetmesh delta ...` and `fleetmesh release ...`: patches, the release signing key, and
publishing releases (create, list, show, set-key, grant-timestamp; docs/releases.md).

The release commands that talk to the coordinator load their configuration and map errors to
exit codes as every operator command does (ops._cli_common, mesh.clikit's table); a Docker or
publishing failure exits 1 (EXIT_REFUSED), a key file problem 2.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TransferSpeedColumn,
)

from mesh.clikit import EXIT_OK, EXIT_REFUSED, EXIT_TIMEOUT, CliError
from mesh.delta import DeltaError, apply_delta_file, create_delta, read_header
from mesh.image import ImageError
from mesh.names import unpublishable_app
from mesh.release import (
    ContainerSettings,
    HealthCheck,
    HealthKind,
    ManifestError,
    NetworkMode,
    ReleaseError,
    ReleaseManifest,
    RestartPolicy,
    TimestampGrant,
    UpdateStrategy,
    Volume,
    encode_manifest,
    key_id,
    sign_timestamp_grant,
    write_signing_key,
)
from mesh.rollout import RolloutSpec
from ops._cli_common import (
    add_common_options,
    api_errors,
    app_arg,
    console,
    date,
    load_signing_key,
    lock_text,
    name_arg,
    operator_client,
    print_json,
    progress_text,
    resolve_fleet,
    size,
    table,
    text,
    version_arg,
    when,
    xdg_path,
)
from ops._cli_rollout import add_rollout_options, rollout_spec, show_rollout, start_rollout
from ops._publish import PublishError, PublishResult, publish_image


def register(subparsers: Any) -> None:
    delta = subparsers.add_parser("delta", help="create and apply binary layer deltas")
    dsub = delta.add_subparsers(dest="delta_command", metavar="ACTION", required=True)

    create = dsub.add_parser("create", help="write a patch that turns OLD into NEW")
    create.add_argument("old", metavar="OLD", type=Path)
    create.add_argument("new", metavar="NEW", type=Path)
    create.add_argument("patch", metavar="PATCH", type=Path)
    create.add_argument("--bare", action="store_true",
                        help="write the manifest form: no self-check digests (~27 bytes less); "
                             "applying it needs --expect")
    create.set_defaults(handler=_delta_create)

    apply = dsub.add_parser("apply", help="rebuild NEW from OLD and PATCH (verified)")
    apply.add_argument("old", metavar="OLD", type=Path)
    apply.add_argument("patch", metavar="PATCH", type=Path)
    apply.add_argument("out", metavar="OUT", type=Path)
    apply.add_argument("--expect", metavar="DIFF_ID",
                       help="require the output to hash to this sha256:<hex> "
                            "(needed for a bare patch)")
    apply.set_defaults(handler=_delta_apply)

    release = subparsers.add_parser("release", help="publish and inspect releases; signing keys")
    rsub = release.add_subparsers(dest="release_command", metavar="ACTION", required=True)
    keygen = rsub.add_parser("keygen", help="generate the operator's Ed25519 release key")
    keygen.add_argument("--out", metavar="FILE", type=Path, required=True,
                        help="new key file (created 0600; never overwritten)")
    keygen.set_defaults(handler=_release_keygen)
    _register_publishing(rsub)
    _register_rollouts(rsub)


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise CliError(f"{what} {path}: no such file")


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CliError(f"cannot write {path}: {exc.strerror}") from None


def _file_diff_id(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None


def _delta_create(args: argparse.Namespace) -> int:
    _require_file(args.old, "old file")
    _require_file(args.new, "new file")
    try:
        patch = create_delta(args.old, args.new, self_check=not args.bare)
    except DeltaError as exc:
        raise CliError(str(exc)) from None
    _write_atomically(args.patch, patch)
    header = read_header(patch)
    form = "bare" if header.bare else "self-checking"
    print(f"{args.patch}: {len(patch)} bytes, {header.method.name}, {form}, "
          f"target {_file_diff_id(args.new)}")
    return 0


def _delta_apply(args: argparse.Namespace) -> int:
    _require_file(args.old, "old file")
    _require_file(args.patch, "patch")
    # Streams: the patch and the old layer are read from their files, the output is written
    # (and hashed) piece by piece and replaces OUT only once verified (docs/delta.md).
    try:
        diff_id = apply_delta_file(args.old, args.patch, args.out, args.expect)
    except DeltaError as exc:
        raise CliError(f"{args.patch}: {exc}") from None
    print(f"{args.out}: {args.out.stat().st_size} bytes, {diff_id}")
    return 0


def _release_keygen(args: argparse.Namespace) -> int:
    try:
        key = write_signing_key(args.out)
    except FileExistsError:
        raise CliError(f"{args.out} already exists; not overwriting a key") from None
    except OSError as exc:
        raise CliError(f"cannot write {args.out}: {exc.strerror}") from None
    except ReleaseError as exc:
        raise CliError(str(exc)) from None
    public = bytes(key.verify_key)
    print(f"{public.hex()}  key-id {key_id(public)}")
    return 0


# --------------------------------------------------------------------------- publishing


def default_layer_cache() -> Path:
    """`$XDG_CACHE_HOME/fleetmesh/layers`, i.e. `~/.cache/fleetmesh/layers`."""
    return xdg_path("XDG_CACHE_HOME", ".cache", "fleetmesh", "layers")


ENV_FLEET = "FLEETMESH_FLEET"  # --fleet's default, e.g. set by the lab for its operator


def _fleet_option(p: argparse.ArgumentParser) -> None:
    env = os.environ.get(ENV_FLEET) or None
    p.add_argument("--fleet", required=env is None, default=env,
                   help=f"fleet (default ${ENV_FLEET}" + (f": {env})" if env else ")"))


def _split_command(text: str | None, what: str) -> tuple[str, ...]:
    if text is None:
        return ()
    try:
        argv = tuple(shlex.split(text))
    except ValueError as exc:
        raise CliError(f"{what} {text!r}: {exc}") from None
    if not argv:
        raise CliError(f"{what} is empty")
    return argv


def _health_check(args: argparse.Namespace) -> HealthCheck | None:
    interval = float(args.health_interval)
    if args.health_cmd is not None:
        return HealthCheck(HealthKind.CMD, _split_command(args.health_cmd, "--health-cmd"),
                           interval_s=interval)
    if args.health_tcp is not None:
        return HealthCheck(HealthKind.TCP, port=args.health_tcp, interval_s=interval)
    if args.health_http is not None:
        port_text, slash, path = args.health_http.partition("/")
        if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
            raise CliError(f"--health-http {args.health_http!r}: use PORT[/PATH] with a port "
                           "in 1..65535")
        return HealthCheck(HealthKind.HTTP, port=int(port_text), path=slash + path or "/",
                           interval_s=interval)
    if args.health_running is not None:
        return HealthCheck(HealthKind.RUNNING, seconds=float(args.health_running),
                           interval_s=interval)
    return None


def _container_settings(args: argparse.Namespace) -> ContainerSettings:
    """The container settings the flags describe, checked by the manifest codec's limits (so a
    bad value is a usage error here, not a refusal after the image was cut and uploaded)."""
    env = []
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise CliError(f"--env {item!r}: use NAME=VALUE")
        env.append((name, value))
    volumes = []
    for item in args.volume:
        parts = item.split(":")
        read_only = len(parts) == 3 and parts[2] == "ro"
        if len(parts) not in (2, 3) or not parts[0] or not parts[1].startswith("/") or (
                len(parts) == 3 and parts[2] not in ("ro", "rw")):
            raise CliError(f"--volume {item!r}: use SOURCE:/TARGET[:ro]")
        volumes.append(Volume(parts[0], parts[1], read_only))
    settings = ContainerSettings(
        command=_split_command(args.command, "--command"),
        environment=tuple(env),
        restart_policy=RestartPolicy(args.restart),
        health_check=_health_check(args),
        update_strategy=UpdateStrategy(args.strategy),
        volumes=tuple(volumes),
        health_timeout_s=float(args.health_timeout),
        hand_over_timeout_s=float(args.hand_over_timeout),
        network=NetworkMode(args.network))
    try:
        encode_manifest(ReleaseManifest("check", "check", 1, 0, b"", (), settings))
    except ManifestError as exc:
        raise CliError(f"container settings: {exc}") from None
    return settings


def _short(diff_id: str | None) -> str:
    return "-" if not diff_id else diff_id.removeprefix("sha256:")[:12]


class _RichProgress:
    """A rich progress bar over the upload, on stderr (stdout stays the report)."""

    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled
        self._progress: Any = None
        self._task: Any = None

    def start(self, total_bytes: int, blobs: int) -> None:
        if not self._enabled or blobs == 0:
            return
        self.stop()
        self._progress = Progress(TextColumn("uploading {task.fields[blobs]} blobs"),
                                  BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                  console=Console(stderr=True), transient=True)
        self._progress.start()
        self._task = self._progress.add_task("upload", total=total_bytes, blobs=blobs)

    def advance(self, nbytes: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=nbytes)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


@dataclass(frozen=True, slots=True)
class PublishPlan:
    """What the publishing options ask for, checked before any image is saved or built."""

    fleet: str
    app: str
    container: ContainerSettings
    spec: RolloutSpec | None
    held: bool
    key: SigningKey


def publish_plan(args: argparse.Namespace) -> PublishPlan:
    """The options `add_publish_options` added, checked (CliError, exit 2): a bad value is a
    usage error here, not a refusal after the image was built, cut and uploaded."""
    fleet = name_arg(args.fleet, "fleet")
    app = name_arg(args.app, "app")
    reserved = unpublishable_app(app)
    if reserved is not None:
        raise CliError(reserved)
    if args.key < 0:
        raise CliError("--key must be 0 or more")
    if args.version is not None and args.version < 1:
        raise CliError("--version must be 1 or more")
    container = _container_settings(args)
    spec = rollout_spec(args)
    return PublishPlan(fleet, app, container, spec, spec is not None or args.no_rollout,
                       load_signing_key(args.signing_key))


def publish_and_report(args: argparse.Namespace, plan: PublishPlan, client: Any,
                       image: str | Sequence[str]) -> PublishResult:
    """Publish the local `image` (or images, one per platform) as `plan` says
    (ops._publish.publish_image), start its rollout if --phases, and print the report (a
    table, or --json). `release create` and `push` both end here."""
    progress = _RichProgress(enabled=not args.json and sys.stderr.isatty())

    def warn(message: str) -> None:
        print(f"fleetmesh: warning: {message}", file=sys.stderr)

    try:
        with api_errors():
            result = publish_image(
                client, fleet=plan.fleet, app=plan.app, signing_key=plan.key, image=image,
                keep=args.key, version=args.version, container=plan.container,
                cache_dir=args.cache_dir or default_layer_cache(), progress=progress,
                warn=warn, rollout="held" if plan.held else None)
            progress.stop()
            rollout = None if plan.spec is None else _start_after_publish(
                client, plan.fleet, plan.app, result.version, plan.spec, args.signing_key)
    except PublishError as exc:
        raise CliError(str(exc), code=EXIT_REFUSED) from None
    except ImageError as exc:
        raise CliError(str(exc), code=EXIT_REFUSED) from None
    except ReleaseError as exc:
        raise CliError(str(exc), code=EXIT_REFUSED) from None
    finally:
        progress.stop()
    _print_publish(args, result, rollout)
    return result


def _release_create(args: argparse.Namespace) -> int:
    plan = publish_plan(args)
    with api_errors(), operator_client(args) as client:
        publish_and_report(args, plan, client, args.images)
    return 0


def _print_publish(args: argparse.Namespace, result: PublishResult,
                   rollout: dict[str, Any] | None) -> None:
    fleet, app = result.fleet, result.app
    if args.json:
        print_json({
            "fleet": result.fleet, "app": result.app, "version": result.version,
            "created": result.created, "uploaded_blobs": result.uploaded_blobs,
            "uploaded_bytes": result.uploaded_bytes, "release": result.info,
            "layers": [{"diff_id": r.diff_id, "size": r.size, "stored_size": r.stored_size,
                        "chunks": r.chunks, "reused_from": r.reused_from,
                        "platform": r.platform,
                        "deltas": [{"source_diff_id": d.source_diff_id, "size": d.size,
                                    "method": d.method, "blob_id": d.blob_id.hex()}
                                   for d in r.deltas]} for r in result.layers],
            "rollout": rollout})
        return
    if not result.created:
        print(f"{fleet}/{app} version {result.version}: already published, nothing to do")
        _print_rollout(rollout, False)
        return
    several = len({r.platform for r in result.layers}) > 1
    rows = []
    for r in result.layers:
        best = r.best_delta
        delta = "-" if best is None else f"{size(best.size)} from {_short(best.source_diff_id)}"
        if r.reused_from is not None:
            delta = f"unchanged (v{r.reused_from})" + ("" if best is None else f"; {delta}")
        saving = "-" if r.saving is None else f"{100 * r.saving:.1f} %"
        rows.append(([r.platform] if several else [])
                    + [_short(r.diff_id), size(r.size), f"{size(r.stored_size)} ({r.chunks})",
                       delta, saving])
    table((["PLATFORM"] if several else []) + ["LAYER", "SIZE", "STORED (CHUNKS)", "DELTA",
                                               "SAVING"], rows)
    print(f"published {fleet}/{app} version {result.version}: uploaded {result.uploaded_blobs} "
          f"blobs, {size(result.uploaded_bytes)}")
    _print_rollout(rollout, args.no_rollout)


def _start_after_publish(client: Any, fleet: str, app: str, version: int, spec: RolloutSpec,
                         signing_key: Path | None) -> dict[str, Any]:
    """The rollout of a release just published held; a failure says that the release is
    published and held, and how to start its rollout."""
    try:
        with api_errors():
            return start_rollout(client, fleet, app, version, spec, signing_key)
    except CliError as exc:
        raise CliError(f"published {fleet}/{app} version {version} held, but its rollout did "
                       f"not start: {exc} (start it with `fleetmesh rollout start {version} "
                       f"--app {app} --fleet {fleet} --phases ...`)", code=exc.code) from None


def _print_rollout(rollout: dict[str, Any] | None, no_rollout: bool) -> None:
    if rollout is not None:
        print()
        show_rollout(rollout)
    elif no_rollout:
        print("held: it targets no device until `fleetmesh rollout start`")


def _release_row(r: dict[str, Any]) -> list[str]:
    return [text(r.get("app")), text(r.get("version")), text(r.get("layers")),
            size(r.get("size")), size(r.get("stored_size")), size(r.get("delta_size")),
            text(r.get("key_id")), date(r.get("published_at"))]


_RELEASE_COLUMNS = ["APP", "VERSION", "LAYERS", "SIZE", "STORED", "DELTAS", "KEY", "PUBLISHED"]


def _release_list(args: argparse.Namespace) -> int:
    fleet = name_arg(args.fleet, "fleet")
    app = None if args.app is None else name_arg(args.app, "app")
    with api_errors(), operator_client(args) as client:
        releases = client.list_releases(fleet, app)
    if args.json:
        print_json({"releases": releases})
    elif not releases:
        print(f"no releases in fleet {fleet}" + ("" if app is None else f" for app {app}"))
    else:
        table(_RELEASE_COLUMNS, [_release_row(r) for r in releases])
    return 0


def _release_show(args: argparse.Namespace) -> int:
    fleet = name_arg(args.fleet, "fleet")
    app = name_arg(args.app, "app")
    if args.version < 1:
        raise CliError("VERSION must be 1 or more")
    with api_errors(), operator_client(args) as client:
        info = client.release(fleet, app, args.version)
    if args.json:
        print_json(info)
        return 0
    listed = info.get("layers")
    # the detail lists its layers where a release row counts them
    table(_RELEASE_COLUMNS, [_release_row(
        {**info, "layers": len(listed) if isinstance(listed, list) else listed})])
    platforms = [p for p in info.get("platforms") or [] if isinstance(p, dict)]
    if platforms:
        print()
        table(["PLATFORM", "LAYERS", "SIZE", "STORED", "DELTAS"],
              [[text(p.get("platform") or "any"), text(p.get("layers")), size(p.get("size")),
                size(p.get("stored_size")), size(p.get("delta_size"))] for p in platforms])
    several = len(platforms) > 1
    layers = info.get("layers") or []
    rows = []
    for layer in layers if isinstance(layers, list) else []:
        if not isinstance(layer, dict):
            continue
        deltas = layer.get("deltas") or []
        delta_text = ", ".join(f"{size(d.get('size'))} from {_short(d.get('source_diff_id'))} "
                         f"({d.get('method')})" for d in deltas if isinstance(d, dict))
        rows.append(([text(layer.get("platform") or "any")] if several else [])
                    + [_short(layer.get("diff_id")), size(layer.get("size")),
                       f"{size(layer.get('stored_size'))} ({text(layer.get('chunks'))})",
                       delta_text or "-"])
    if rows:
        print()
        table((["PLATFORM"] if several else []) + ["LAYER", "SIZE", "STORED (CHUNKS)",
                                                   "DELTAS"], rows)
    return 0


def _release_grant_timestamp(args: argparse.Namespace) -> int:
    fleet = name_arg(args.fleet, "fleet")
    key = load_signing_key(args.signing_key)
    with api_errors(), operator_client(args) as client:
        public_hex = client.timestamp_key(fleet)
        try:
            public = bytes.fromhex(public_hex)
            grant = sign_timestamp_grant(TimestampGrant(fleet, public, int(time.time())), key)
        except (ValueError, ReleaseError):
            raise CliError(f"the coordinator's timestamp key {public_hex!r} is not an Ed25519 "
                           "public key") from None
        client.set_timestamp_grant(fleet, grant)
    print(f"fleet {fleet}: timestamp key {key_id(public)} granted; devices report 'stale' when "
          "its timestamps stop coming")
    return 0


def _release_set_key(args: argparse.Namespace) -> int:
    fleet = name_arg(args.fleet, "fleet")
    key = load_signing_key(args.signing_key)
    public = bytes(key.verify_key)
    with api_errors(), operator_client(args) as client:
        client.set_release_key(fleet, public.hex())
    print(f"fleet {fleet}: release key {key_id(public)} registered; devices enrolled from now "
          "on pin it")
    return 0


def add_publish_options(p: argparse.ArgumentParser) -> None:
    """What `release create` and `push` take beside the image: fleet, app, version, signing
    key, container settings, health checks and rollout options (publish_plan reads them)."""
    _fleet_option(p)
    p.add_argument("--app", required=True)
    p.add_argument("--key", type=int, default=3, metavar="K",
                   help="how many earlier releases to compute deltas against (default 3)")
    p.add_argument("--signing-key", type=Path, metavar="FILE",
                   help="release signing key (default $FLEETMESH_SIGNING_KEY, else "
                        "~/.config/fleetmesh/release.key)")
    p.add_argument("--version", type=int, metavar="N",
                   help="release version (default: latest + 1)")
    p.add_argument("--cache-dir", type=Path, metavar="DIR",
                   help="earlier layers rebuilt from the coordinator "
                        "(default ~/.cache/fleetmesh/layers)")
    p.add_argument("--command", metavar="CMD",
                   help="container command, shell-quoted (default: the image's)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--restart", default=RestartPolicy.UNLESS_STOPPED.value,
                   choices=[r.value for r in RestartPolicy])
    health = p.add_mutually_exclusive_group()
    health.add_argument("--health-cmd", metavar="CMD",
                        help="healthy when this command (shell-quoted) exits 0 in the container")
    health.add_argument("--health-tcp", type=int, metavar="PORT",
                        help="healthy when 127.0.0.1:PORT accepts a TCP connection")
    health.add_argument("--health-http", metavar="PORT[/PATH]",
                        help="healthy when GET http://127.0.0.1:PORT/PATH answers 2xx or 3xx")
    health.add_argument("--health-running", type=float, metavar="SECONDS",
                        help="healthy when the container has run this long without a restart")
    p.add_argument("--health-interval", type=float, default=2.0, metavar="SECONDS",
                   help="between health probes (default 2)")
    p.add_argument("--health-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="a new release not healthy this long after its start is rolled "
                        "back (default 60); without a --health-* flag the image's "
                        "HEALTHCHECK is used, else running for 5 s")
    p.add_argument("--strategy", default=UpdateStrategy.DOWNLOAD_THEN_KILL.value,
                   choices=[s.value for s in UpdateStrategy])
    p.add_argument("--hand-over-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="hand-over: stop the old container after this even if the new "
                        "one is not healthy yet (default 60)")
    p.add_argument("--network", default=NetworkMode.HOST.value,
                   choices=[n.value for n in NetworkMode],
                   help="container network (default host: the device's own)")
    p.add_argument("--volume", action="append", default=[], metavar="SOURCE:/TARGET[:ro]")
    add_rollout_options(p, publishing=True)


def _register_publishing(rsub: Any) -> None:

    create = add_common_options(rsub.add_parser(
        "create", help="publish a local Docker image as the app's next release",
        description="docker save IMAGE, cut its layers into chunks, compute deltas against the "
                    "app's last --key releases, sign with the release key and upload only the "
                    "blobs the coordinator is missing (run again to resume). Several IMAGEs "
                    "make one release with an image per platform, each the platform its image "
                    "config states (docker image inspect: Os/Architecture/Variant); devices "
                    "fetch only their own platform's."))
    create.add_argument("images", metavar="IMAGE", nargs="+",
                        help="local image (name:tag or ID); one per platform")
    add_publish_options(create)
    create.set_defaults(handler=_release_create)

    lst = add_common_options(rsub.add_parser("list", help="a fleet's releases, newest first"))
    _fleet_option(lst)
    lst.add_argument("--app")
    lst.set_defaults(handler=_release_list)

    show = add_common_options(rsub.add_parser("show", help="one release and its layers"))
    show.add_argument("fleet", metavar="FLEET")
    show.add_argument("app", metavar="APP")
    show.add_argument("version", metavar="VERSION", type=int)
    show.set_defaults(handler=_release_show)

    setkey = add_common_options(rsub.add_parser(
        "set-key", help="register the release key's public half for a fleet"), json_flag=False)
    _fleet_option(setkey)
    setkey.add_argument("--signing-key", type=Path, metavar="FILE",
                        help="release signing key (default $FLEETMESH_SIGNING_KEY, else "
                             "~/.config/fleetmesh/release.key)")
    setkey.set_defaults(handler=_release_set_key)

    grant = add_common_options(rsub.add_parser(
        "grant-timestamp", help="let the coordinator's timestamp key sign the fleet's "
        "timestamps (freeze detection)",
        description="Sign, with the release key, a grant of the coordinator's online "
                    "timestamp key for a fleet, and hand it to the coordinator: devices then "
                    "get a signed, expiring timestamp of the fleet's newest releases and report "
                    "'stale' when none newer comes (docs/security.md)."), json_flag=False)
    _fleet_option(grant)
    grant.add_argument("--signing-key", type=Path, metavar="FILE",
                       help="release signing key (default $FLEETMESH_SIGNING_KEY, else "
                            "~/.config/fleetmesh/release.key)")
    grant.set_defaults(handler=_release_grant_timestamp)


# --------------------------------------------------------------------------- rollouts

WATCH_TERMINAL = ("running", "failed", "superseded")  # states a device stays in on its own
MIN_WATCH_INTERVAL = 0.2  # s: a watch must not hammer the coordinator
MAX_WATCH_INTERVAL = 60.0


def _summary_text(status: dict[str, Any]) -> str:
    s = status.get("summary") or {}
    parts = [f"{s.get(k, 0)} {k.replace('_', ' ')}"
             for k in ("running", "downloading", "waiting", "failed", "no_platform", "pending",
                       "superseded") if s.get(k)]
    return (f"{status.get('app')} version {status.get('version')} in fleet "
            f"{status.get('fleet')}: {s.get('total', 0)} devices"
            + (f" ({', '.join(parts)})" if parts else "") + _rollout_text(status))


def _rollout_text(status: dict[str, Any]) -> str:
    """`; rollout running, phase 2 of 3` (and the reason of a halt) when the release has a
    rollout; empty otherwise."""
    r = status.get("rollout")
    if not isinstance(r, dict):
        return ""
    phase, phases = r.get("phase"), r.get("phases")
    where = f", phase {phase + 1} of {phases}" if isinstance(phase, int) and \
        isinstance(phases, int) and phases else ""
    reason = f": {r['reason']}" if r.get("reason") else ""
    return f"; rollout {r.get('state')}{where}{reason}"


def _status_rows(status: dict[str, Any]) -> list[list[str]]:
    return [[text(d.get("device")), text(d.get("state")),
             progress_text(d.get("bytes_done"), d.get("bytes_total")), text(d.get("running")),
             text(d.get("target")), text(bool(d.get("online"))),
             lock_text(d.get("lock_since"), d.get("lock_stale")), text(d.get("error")),
             when(d.get("updated_at"))]
            + ([_phase_text(d.get("phase"))] if isinstance(status.get("rollout"), dict) else [])
            for d in status.get("devices") or []]


def _phase_text(phase: Any) -> str:
    """A device's rollout phase, numbered from 1 as `rollout status` numbers them."""
    return str(phase + 1) if isinstance(phase, int) and not isinstance(phase, bool) else "-"


def _release_status(args: argparse.Namespace) -> int:
    app = app_arg(args.app)
    version = version_arg(args.version)
    with api_errors(), operator_client(args) as client:
        fleet = resolve_fleet(client, args.fleet, app, version)
        status = client.release_status(fleet, app, version)
    if args.json:
        print_json(status)
        return 0
    rows = _status_rows(status)
    if rows:
        phase = ["PHASE"] if isinstance(status.get("rollout"), dict) else []
        table(["DEVICE", "STATE", "DOWNLOAD", "RUNNING", "TARGET", "ONLINE", "LOCK", "ERROR",
               "UPDATED", *phase], rows)
    print(_summary_text(status))
    return 0


def watch_outcome(status: dict[str, Any]) -> int | None:
    """0 once every device concerned runs the release (or a newer one), 1 once all have
    settled and any failed it; None while some are still on their way."""
    rollout = status.get("rollout")
    if isinstance(rollout, dict) and rollout.get("state") in ("halted", "aborted"):
        return EXIT_REFUSED  # every device goes back to the previous release
    states = [d.get("state") for d in status.get("devices") or []]
    if not states or any(s not in WATCH_TERMINAL for s in states):
        return None
    return EXIT_REFUSED if "failed" in states else EXIT_OK


class PlainWatch:
    """`release watch` on a pipe or file: a line when a device's state or download decile
    changes."""

    def __init__(self, out: Any) -> None:
        self._out = out
        self._last: dict[str, tuple[Any, int]] = {}
        self._rollout = ""

    def update(self, status: dict[str, Any]) -> None:
        stamp = time.strftime("%H:%M:%S")
        rollout = _rollout_text(status)
        if rollout != self._rollout:
            self._rollout = rollout
            print(f"{stamp} {rollout.removeprefix('; ')}", file=self._out, flush=True)
        for d in status.get("devices") or []:
            done, total = d.get("bytes_done") or 0, d.get("bytes_total") or 0
            decile = 10 * done // total if isinstance(total, int) and total > 0 and \
                isinstance(done, int) else -1
            key = (d.get("state"), decile)
            if self._last.get(d.get("device")) != key:
                self._last[d.get("device")] = key
                extra = "" if decile < 0 else f" {progress_text(done, total)}"
                error = f" error: {d['error']}" if d.get("error") else ""
                print(f"{stamp} {d.get('device')} {d.get('state')}{extra}{error}",
                      file=self._out, flush=True)

    def stop(self) -> None:
        pass


class RichWatch:
    """`release watch` on a terminal: a progress bar per device and a total."""

    def __init__(self, console: Any) -> None:
        # refreshed twice a second: the bars never lag the polls by more than 1 s
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                  TextColumn("{task.fields[bytes]}"),
                                  TextColumn("{task.fields[state]}"),
                                  console=console, refresh_per_second=2)
        self._total = self._progress.add_task("[bold]total", total=None, state="", bytes="")
        self._tasks: dict[str, Any] = {}
        self._progress.start()

    def update(self, status: dict[str, Any]) -> None:
        done_all = total_all = bytes_done = bytes_total = 0
        for d in status.get("devices") or []:
            name = str(d.get("device"))
            state = str(d.get("state"))
            done, total = d.get("bytes_done") or 0, d.get("bytes_total") or 0
            fetched = progress_text(done, total)
            if isinstance(done, int) and isinstance(total, int):
                bytes_done, bytes_total = bytes_done + done, bytes_total + total
            if state in ("running", "superseded") and not total:
                done = total = 1  # reported on another target: nothing left to fetch
            style = {"failed": "red", "running": "green"}.get(state, "")
            label = f"[{style}]{escape(state)}[/]" if style else escape(state)
            if d.get("lock_stale"):
                label += " [yellow](lock stale)[/]"
            if name not in self._tasks:
                self._tasks[name] = self._progress.add_task(escape(name), total=None,
                                                            state="", bytes="")
            self._progress.update(self._tasks[name], completed=done, total=total or None,
                                  state=label, bytes=escape(fetched))
            done_all += done
            total_all += total
        summary = status.get("summary") or {}
        self._progress.update(self._total, completed=done_all, total=total_all or None,
                              bytes=escape(progress_text(bytes_done, bytes_total)),
                              state=f"{summary.get('running', 0)}/"
                                    f"{summary.get('total', 0)} running"
                                    + escape(_rollout_text(status)))

    def stop(self) -> None:
        self._progress.stop()


def _release_watch(args: argparse.Namespace) -> int:

    app = app_arg(args.app)
    version = version_arg(args.version)
    if not MIN_WATCH_INTERVAL <= args.interval <= MAX_WATCH_INTERVAL:
        raise CliError(f"--interval must be {MIN_WATCH_INTERVAL:g}..{MAX_WATCH_INTERVAL:g} s")
    if args.wait_timeout is not None and not args.wait_timeout > 0:
        raise CliError("--timeout must be more than 0 seconds")
    deadline = None if args.wait_timeout is None else time.monotonic() + args.wait_timeout
    with api_errors(), operator_client(args) as client:
        fleet = resolve_fleet(client, args.fleet, app, version)
        view: Any = RichWatch(console()) if sys.stdout.isatty() else PlainWatch(sys.stdout)
        try:
            while True:
                status = client.release_status(fleet, app, version)
                view.update(status)
                outcome = watch_outcome(status)
                if outcome is not None:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    view.stop()
                    raise CliError(f"timed out after {args.wait_timeout:g} s: "
                                   f"{_summary_text(status)}", code=EXIT_TIMEOUT)
                time.sleep(args.interval)
        finally:
            view.stop()
    print(_summary_text(status), flush=True)
    return outcome


def _release_retry(args: argparse.Namespace) -> int:
    app = app_arg(args.app)
    version = version_arg(args.version)
    device = None if args.device is None else name_arg(args.device, "--device")
    with api_errors(), operator_client(args) as client:
        if device is not None:
            out = client.retry(app, device=device)
        else:
            fleet = resolve_fleet(client, args.fleet, app, version)
            out = client.retry(app, fleet=fleet, version=version)
    if args.json:
        print_json(out)
    elif device is not None:
        print(f"{device}: {app} retry {out.get('retry')} (it tries again the version it "
              "marked failed)")
    elif not out.get("devices"):
        print(f"no device failed {app} version {version}")
    else:
        names = ", ".join(str(d.get("device")) for d in out["devices"])
        print(f"{app} version {version}: retry on {len(out['devices'])} devices ({names})")
    return 0


def _register_rollouts(rsub: Any) -> None:

    def add(name: str, help_text: str, description: str, watching: bool = False
            ) -> argparse.ArgumentParser:
        p = add_common_options(rsub.add_parser(name, help=help_text, description=description),
                    json_flag=not watching, timeout_flag=not watching)
        p.add_argument("version", metavar="VERSION", type=int)
        p.add_argument("--app", required=True)
        p.add_argument("--fleet", help="default: the one fleet with devices that has VERSION")
        return p

    status = add("status", "where each device stands in a release's rollout",
                 "Per device: state, download progress, running and target versions, update "
                 "lock (stale past the coordinator's --lock-stale-after), error.")
    status.set_defaults(handler=_release_status)
    watch = add("watch", "follow a rollout until every device runs it",
                "Progress bars per device and a total on a terminal (plain lines otherwise), "
                "with the rollout's phase and state. Exits 0 when every device concerned runs "
                "VERSION (or a newer one), 1 when all have settled and any failed or the "
                "rollout halted or was aborted, 5 on --timeout.", watching=True)
    watch.add_argument("--timeout", dest="wait_timeout", type=float, metavar="SECONDS",
                       help="give up after this long (exit 5; default: never)")
    watch.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                       help="seconds between polls (default 1)")
    watch.set_defaults(handler=_release_watch)
    retry = add("retry", "let devices retry a release they failed",
                "Every device that failed VERSION (or only --device) tries it again.")
    retry.add_argument("--device", metavar="NAME", help="only this device")
    retry.set_defaults(handler=_release_retry)
