"""What every fleetmesh console script shares: one-line user errors and dispatch.

A subcommand sets `handler` (parsed namespace -> exit code) on its parser. User errors raise
`CliError`: one line on stderr, a distinct exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Final

EXIT_USAGE: Final = 2  # argparse's own code for bad arguments; bad input files use it too
EXIT_INTERRUPTED: Final = 130


class CliError(Exception):
    """A user-facing failure: printed as one line, exits with `code`."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


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
