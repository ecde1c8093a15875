"""What every fleetmesh console script shares: one-line user errors and dispatch.

A subcommand sets `handler` (parsed namespace -> exit code) on its parser. User errors raise
`CliError`: one line on stderr, a distinct exit code, never a traceback.

The exit codes below are one table for `fleetmesh` and `fleetmesh-agent` (README.md, "Command
line"): a script that calls either tool reads a code the same way.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from typing import Final

EXIT_OK: Final = 0
# The coordinator refused (4xx; its error line is the message), failed (5xx) or answered
# nonsense; also a rollout that settled with a failed device, a Docker or publishing failure.
EXIT_REFUSED: Final = 1
# argparse's own code for bad arguments; bad input files and missing configuration use it too.
EXIT_USAGE: Final = 2
# Nothing answered: the coordinator (connection, TLS handshake, timeout) or a local daemon's
# socket (the WireGuard UAPI).
EXIT_UNREACHABLE: Final = 3
# The coordinator's certificate is not the pinned one: never retried, it may be an attack.
EXIT_UNTRUSTED: Final = 4
# A wait the user bounded ran out (`fleetmesh release watch --timeout`).
EXIT_TIMEOUT: Final = 5
# The local WireGuard interface could not be started or configured (`fleetmesh-agent run`).
EXIT_WIREGUARD: Final = 6
# Stopped by Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED: Final = 130


class CliError(Exception):
    """A user-facing failure: printed as one line, exits with `code`."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


# What pyproject.toml's `coordinator` extra adds to the base install, by import name: the
# server stack, which only `fleetmesh coordinator serve|install` (and the lab, which runs them)
# loads. A device and an operator's workstation install the wheel without it.
SERVER_STACK: Final = ("hypercorn", "starlette", "cryptography", "psycopg")


def missing_extra(needs: str, extra: str, modules: Sequence[str]) -> str | None:
    """The one line saying how to install `extra` when one of its `modules` is not installed
    (looked up, not imported), else None. `needs` starts it: "the coordinator needs ..."."""
    if all(find_spec(module) is not None for module in modules):
        return None
    return f"{needs}: pip install 'fleetmesh[{extra}]'"


def package_version() -> str:
    try:
        return version("fleetmesh")
    except PackageNotFoundError:
        return "unknown"


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse `argv` and call the chosen subcommand's handler."""
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
        return code
    except CliError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
