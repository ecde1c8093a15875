"""What the `fleetmesh` command groups share: argument checks, the operator's client from its
configuration, the SDK's failures as exit codes (mesh.clikit's table), and the table/text
formatting of the human output.

Configuration: FLEETMESH_URL, FLEETMESH_API_KEY, FLEETMESH_FINGERPRINT, else the keys url,
api_key, fingerprint of `--config FILE` (default ~/.config/fleetmesh/operator.toml); the
environment wins key by key.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, NoReturn

from nacl.signing import SigningKey
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mesh.clikit import (
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_UNTRUSTED,
    EXIT_USAGE,
    CliError,
)
from mesh.control import ControlError, TokenParts, check_app, check_name
from mesh.release import (
    MAX_ROOT_DOCUMENT,
    ReleaseError,
    RootError,
    SignedRoot,
    decode_root_body,
    decode_signed_root,
    key_id,
    read_signing_key,
)
from mesh.tlspin import PinError
from ops.client import (
    ApiError,
    CoordinatorUnreachable,
    OperatorClient,
    OperatorConfigError,
    ProtocolError,
    load_operator_config,
)

ENV_SIGNING_KEY: Final = "FLEETMESH_SIGNING_KEY"  # --signing-key's default before the XDG path
REQUEST_TIMEOUT: Final = 10.0  # s per request: a coordinator slower than that is unusable
MAX_EXPIRY: Final = 365 * 86400
_DURATION_RE: Final = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


# --------------------------------------------------------------------------- paths


def xdg_path(env_var: str, fallback: str, *parts: str) -> Path:
    base = os.environ.get(env_var) or str(Path(os.environ.get("HOME") or Path.home()) / fallback)
    return Path(base, *parts)


def default_signing_key_path() -> Path:
    """`$XDG_CONFIG_HOME/fleetmesh/release.key`, i.e. `~/.config/fleetmesh/release.key`."""
    return xdg_path("XDG_CONFIG_HOME", ".config", "fleetmesh", "release.key")


def signing_key_path(path: Path | None) -> Path:
    """`--signing-key`, else `$FLEETMESH_SIGNING_KEY`, else the default path."""
    env = os.environ.get(ENV_SIGNING_KEY)
    return path if path is not None else Path(env) if env else default_signing_key_path()


def token_release_key(explicit: str | None) -> str | None:
    """The release public key (hex) whose fingerprint a new enrollment token carries:
    `--release-key`, else the public half of the operator's own signing key if there is one
    (never the coordinator's word: the point is to catch a coordinator that lies). Says on
    stderr which key it pins, or that it pins none."""
    if explicit is not None:
        key = explicit.strip().lower()
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise CliError("--release-key must be the release public key, 64 hex digits (as "
                           "`fleetmesh release keygen` prints it)")
        return key
    path = signing_key_path(None)
    if not path.exists():
        print(f"note: the token carries no release key fingerprint (no --release-key, no key "
              f"at {path}): devices will trust the key the coordinator gives them",
              file=sys.stderr)
        return None
    try:
        public = bytes(read_signing_key(path).verify_key)
    except ReleaseError as exc:
        raise CliError(str(exc)) from None
    print(f"note: the token pins release key {key_id(public)} ({path})", file=sys.stderr)
    return public.hex()


def load_signing_key(path: Path | None) -> SigningKey:
    """The release signing key `--signing-key` (or its defaults) names; CliError (exit 2)."""
    key_path = signing_key_path(path)
    if not key_path.exists():
        raise CliError(f"no release signing key at {key_path}: create one with "
                       f"`fleetmesh release keygen --out {key_path}` or pass --signing-key")
    try:
        return read_signing_key(key_path)
    except ReleaseError as exc:
        raise CliError(str(exc)) from None


def read_limited(path: Path, limit: int) -> bytes:
    """The file's first `limit` + 1 bytes (more than `limit`: too large for the caller's
    parser, which says so); CliError (exit 2) if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None


def read_root_file(path: Path) -> SignedRoot:
    """A `fleetmesh root` file, decoded (mesh.release's codec); CliError (exit 2) otherwise."""
    data = read_limited(path, MAX_ROOT_DOCUMENT)
    try:
        return decode_signed_root(data)
    except RootError as exc:
        raise CliError(f"{path}: {exc}") from None


def token_root(path: Path | None, fleet: str) -> SignedRoot | None:
    """`--root`: the operator's root version 1 of `fleet`, whose fingerprint a new token
    carries; None without the option."""
    if path is None:
        return None
    signed = read_root_file(path)
    meta = decode_root_body(signed.body)
    if meta.version != 1 or meta.fleet != fleet:
        raise CliError(f"{path}: a token pins root version 1 of fleet {fleet}, this is version "
                       f"{meta.version} of fleet {meta.fleet}")
    return signed


def note_token_root(token: str) -> None:
    """Say on stderr when a token pins the fleet's root rather than (or without) a key."""
    root_fp = TokenParts.parse(token).root_fp
    if root_fp is not None:
        print(f"note: the token pins the fleet's root version 1 ({root_fp[:16]}…): devices "
              "follow its release key rotations", file=sys.stderr)


def add_release_key_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--release-key", metavar="HEX",
                   help="the fleet's release public key, whose fingerprint the token carries "
                        "so that devices refuse any other (default: the public half of "
                        f"--signing-key's default, ${ENV_SIGNING_KEY} or "
                        "~/.config/fleetmesh/release.key, if present)")
    p.add_argument("--root", type=Path, metavar="ROOT_1_JSON",
                   help="the fleet's root version 1 (`fleetmesh root`): the token carries its "
                        "fingerprint and devices follow the fleet's release key rotations "
                        "(default: the coordinator's roots of the fleet, if any, once they "
                        "verify and name the release key above)")


# --------------------------------------------------------------------------- arguments


def parse_duration(text: str) -> int:
    """`90s`, `30m`, `1h`, `2d`, combinations in that order (`1h30m`) or plain seconds → seconds.
    Raises CliError (exit 2)."""
    t = text.strip().lower() if isinstance(text, str) else ""
    if t.isascii() and t.isdigit():
        seconds = int(t)
    else:
        m = _DURATION_RE.match(t)
        if not t or m is None:
            raise CliError(f"bad duration {text!r}: use e.g. 90s, 30m, 1h, 2d or 1h30m")
        d, h, mi, s = (int(g) if g else 0 for g in m.groups())
        seconds = ((d * 24 + h) * 60 + mi) * 60 + s
    if not 0 < seconds <= MAX_EXPIRY:
        raise CliError(f"bad duration {text!r}: must be between 1s and {MAX_EXPIRY // 86400}d")
    return seconds


def name_arg(text: str, what: str = "name") -> str:
    """A device, fleet or app name as the API accepts it, else a usage error."""
    try:
        return check_name(text, what)
    except ControlError as exc:
        raise CliError(str(exc)) from exc


def app_arg(text: str) -> str:
    """An `--app` value as the API accepts it, else a usage error."""
    try:
        return check_app(text, "--app")
    except ControlError as exc:
        raise CliError(str(exc)) from exc


def version_arg(version: int) -> int:
    """A release VERSION argument, else a usage error."""
    if version < 1:
        raise CliError("VERSION must be 1 or more")
    return version


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """argparse prints usage plus the error; fleetmesh prints one line and exits 2."""
    def error(message: str) -> NoReturn:
        parser.exit(EXIT_USAGE, f"{parser.prog}: {message} (see --help)\n")
    parser.error = error  # type: ignore[method-assign]
    return parser


def add_common_options(p: argparse.ArgumentParser, json_flag: bool = True,
                       timeout_flag: bool = True) -> argparse.ArgumentParser:
    """--config, --timeout (per request; a command whose own --timeout means something else
    passes timeout_flag=False and gets the default) and --json."""
    p.add_argument("--config", metavar="FILE",
                   help="operator config (TOML: url, api_key, fingerprint; default "
                        "~/.config/fleetmesh/operator.toml; FLEETMESH_* variables win)")
    if timeout_flag:
        p.add_argument("--timeout", type=float, default=REQUEST_TIMEOUT, metavar="SECONDS",
                       help="network timeout per request (default 10)")
    else:
        p.set_defaults(timeout=REQUEST_TIMEOUT)
    if json_flag:
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return one_line_errors(p)


# --------------------------------------------------------------------------- the coordinator


@contextmanager
def api_errors() -> Iterator[None]:
    """The SDK's failures as one-line CliErrors with mesh.clikit's exit codes."""
    try:
        yield
    except OperatorConfigError as exc:
        raise CliError(str(exc), code=EXIT_USAGE) from exc
    except ApiError as exc:
        raise CliError(str(exc), code=EXIT_REFUSED) from exc
    except CoordinatorUnreachable as exc:
        raise CliError(str(exc), code=EXIT_UNREACHABLE) from exc
    except PinError as exc:
        raise CliError(str(exc), code=EXIT_UNTRUSTED) from exc
    except ProtocolError as exc:
        raise CliError(f"unexpected answer from the coordinator: {exc}",
                       code=EXIT_REFUSED) from exc


def resolve_fleet(client: OperatorClient, fleet: str | None, app: str, version: int) -> str:
    """--fleet, or the one fleet (among those with devices) that has this release."""
    if fleet is not None:
        return name_arg(fleet, "fleet")
    fleets = sorted({d["fleet"] for d in client.list_devices() if isinstance(d.get("fleet"), str)})
    having = [f for f in fleets
              if any(r.get("version") == version for r in client.list_releases(f, app))]
    if not having:
        raise CliError(f"no fleet with devices has {app} version {version}; pass --fleet",
                       code=EXIT_REFUSED)
    if len(having) > 1:
        raise CliError(f"{app} version {version} is in fleets {', '.join(having)}: pass --fleet")
    return str(having[0])


def operator_client(args: argparse.Namespace) -> OperatorClient:
    """The client `--config`/FLEETMESH_* describe, with `--timeout` per request."""
    return load_operator_config(args.config).client(timeout=args.timeout)


# --------------------------------------------------------------------------- output


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def console() -> Console:
    width = None if sys.stdout.isatty() else max(160, shutil.get_terminal_size().columns)
    return Console(width=width, highlight=False, soft_wrap=False)


def table(columns: list[str], rows: list[list[str]], header: bool = True) -> None:
    drawn = Table(box=None, header_style="bold", pad_edge=False, show_header=header)
    for c in columns:
        drawn.add_column(c, overflow="fold")
    for r in rows:
        drawn.add_row(*r)
    console().print(drawn)


def text(value: Any) -> str:
    """A JSON value as table text, escaped for rich markup; empty → `-`."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return escape(", ".join(str(v) for v in value)) or "-"
    return escape(str(value))


def when(value: Any, now: float | None = None) -> str:
    """Epoch seconds → `12 s ago`; strings (ISO times) as they are; None → never."""
    if value is None or value == "":
        return "never"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        ago = max(0.0, (time.time() if now is None else now) - float(value))
        if ago < 120:
            return f"{ago:.0f} s ago"
        if ago < 7200:
            return f"{ago / 60:.0f} min ago"
        if ago < 172800:
            return f"{ago / 3600:.0f} h ago"
        return f"{ago / 86400:.0f} d ago"
    return text(value)


def date(value: Any) -> str:
    """Epoch seconds → UTC ISO time; anything else as it is."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        moment = datetime.datetime.fromtimestamp(float(value), datetime.UTC)
        return moment.strftime("%Y-%m-%d %H:%M:%S UTC")
    return text(value)


def size(n: int | None) -> str:
    """Bytes in decimal units: `512 B`, `12.5 MB`; None → `-`."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"


def progress_text(done: Any, total: Any) -> str:
    """`12.5 MB / 40.0 MB (31 %)`; `-` when nothing is known."""
    if not isinstance(total, int) or isinstance(total, bool) or total <= 0:
        return "-"
    done = done if isinstance(done, int) and not isinstance(done, bool) else 0
    return f"{size(done)} / {size(total)} ({100 * done // total} %)"


def lock_text(since: Any, stale: Any) -> str:
    """The app's update lock: `-`, `held since 5 min ago`, `… (stale)`."""
    if since is None:
        return "-"
    return f"held since {when(since)}" + (" (stale)" if stale else "")
