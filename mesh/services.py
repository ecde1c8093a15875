"""systemd units of the fleetmesh services: filled in from the package's templates, installed.

`fleetmesh coordinator install` and `fleetmesh-agent install` share this: the template (package
data beside the command, `ops/systemd/`, `agent/systemd/`) names its variable parts `@NAME@`;
ExecStart is the console script of the running installation, so a unit installed from a venv
runs that venv. Nothing here runs systemctl: the commands print the lines to run.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any, Final

UNIT_DIR: Final = Path("etc/systemd/system")
_PLACEHOLDER: Final = re.compile(r"@[A-Z_]+@")
# Characters that make systemd split or expand an ExecStart word: quoted, `%` and `$` doubled.
_PLAIN_WORD: Final = re.compile(r"[A-Za-z0-9_./:=,+@\[\]-]+")


class ServiceError(Exception):
    """A unit cannot be made or written; str() is one line."""


def console_script(name: str) -> Path:
    """The console script `name` of this installation: beside the running interpreter (a venv's
    bin directory, not resolved through its symlinks), else the first on PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file() and os.access(here, os.X_OK):
        return here.absolute()
    found = shutil.which(name)
    if found is None:
        raise ServiceError(f"cannot find the {name} command of this installation (not beside "
                           f"{sys.executable}, not on PATH)")
    return Path(found).absolute()


def exec_word(word: str, variables: bool = True) -> str:
    """One ExecStart argument (or, without `variables`, one path of a list setting such as
    ReadWritePaths, where `$` is not expanded) as systemd reads it back unchanged."""
    if "\n" in word or "\x00" in word:
        raise ServiceError(f"a unit setting cannot hold a newline: {word!r}")
    text = word.replace("%", "%%")
    if variables:
        text = text.replace("$", "$$")
    if _PLAIN_WORD.fullmatch(word):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def exec_line(argv: Sequence[str]) -> str:
    if not argv or not os.path.isabs(argv[0]):
        raise ServiceError("ExecStart needs an absolute executable path")
    return " ".join(exec_word(w) for w in argv)


def capability_line(caps: Iterable[str]) -> str:
    """CapabilityBoundingSet (and AmbientCapabilities, for when User= is set by a drop-in):
    exactly `caps`; an empty set drops every capability."""
    names = " ".join(sorted(set(caps)))
    return f"CapabilityBoundingSet={names}\nAmbientCapabilities={names}"


def state_lines(data: str, state_name: str) -> str:
    """The data directory writable under ProtectSystem=strict: systemd's StateDirectory when it
    is /var/lib/<state_name>, else ReadWritePaths (the directory must exist)."""
    path = Path(data)
    if not path.is_absolute():
        raise ServiceError(f"--data must be an absolute path in a unit, got {data!r}")
    if path == Path("/var/lib") / state_name:
        return f"StateDirectory={state_name}\nStateDirectoryMode=0700"
    return f"ReadWritePaths={exec_word(str(path), variables=False)}"


def render(template: str, values: Mapping[str, str]) -> str:
    text = template
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    left = _PLACEHOLDER.search(text)
    if left is not None:
        raise ServiceError(f"unit template: no value for {left.group(0)}")
    return text


def unit_text(package: str, unit: str, argv: Sequence[str], data: str, state_name: str,
              caps: Iterable[str], extra: Mapping[str, str] | None = None) -> str:
    """`package`'s template systemd/`unit` filled in: ExecStart `argv`, the data directory
    writable, exactly `caps`, and `extra` placeholders."""
    try:
        template = files(package).joinpath("systemd", unit).read_text(encoding="utf-8")
    except OSError as exc:
        raise ServiceError(f"the {unit} template is missing from {package}: {exc}") from None
    return render(template, {"EXEC_START": exec_line(argv), "STATE": state_lines(data, state_name),
                             "CAPABILITIES": capability_line(caps), **(extra or {})})


def install_unit(root: Path, unit: str, text: str, mode: int = 0o644) -> Path:
    """Write `unit` under root/etc/systemd/system atomically; the path written."""
    target = root / UNIT_DIR / unit
    tmp = target.with_name(f".{unit}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except OSError as exc:
        raise ServiceError(f"cannot write {target}: {exc.strerror or exc}") from None
    return target


def add_install_parser(sub: Any, unit: str, runs: str, data_default: str,
                       data_help: str) -> argparse.ArgumentParser:
    """The `install` subcommand with --root and --data; the caller adds the rest."""
    p: argparse.ArgumentParser = sub.add_parser(
        "install", help=f"write the systemd unit that runs `{runs}`",
        description=f"Write {unit} (hardened: read-only system, only the data directory "
                    "writable, only the capabilities it needs) with ExecStart running "
                    f"this installation's `{runs}` with these options, and print the systemctl "
                    "lines to run. Runs no systemctl itself.")
    p.add_argument("--root", default="/", metavar="DIR",
                   help="install under DIR/etc/systemd/system (default /)")
    p.add_argument("--data", default=data_default, metavar="DIR",
                   help=f"{data_help} (default {data_default})")
    return p


def install(root: Path, unit: str, text: str, mode: int = 0o644, first: str = "") -> Path:
    """Write the unit and print where, and the lines to run (`first` before systemctl)."""
    path = install_unit(root, unit, text, mode)
    print(f"wrote {path}")
    if root != Path("/"):
        print(f"(under --root {root}: copy it to /{path.relative_to(root)} on the host)")
    print("then run:")
    for line in [first] if first else []:
        print(f"  {line}")
    for line in ("systemctl daemon-reload", f"systemctl enable --now {unit}",
                 f"journalctl -u {unit} -f"):
        print(f"  {line}")
    return path


__all__ = ["ServiceError", "add_install_parser", "capability_line", "console_script",
           "exec_line", "exec_word", "install", "install_unit", "render", "state_lines",
           "unit_text"]
