"""The agent supervisor's program (lab/supervisor.py has its logic and status file):

    python -m lab.supervise --status FILE -- ARGV...

Restarts ARGV whenever it exits; SIGTERM/SIGINT stop it for good. Exit code 2 without ARGV.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .supervisor import Supervisor


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.supervise",
                                description="restart a command whenever it exits")
    p.add_argument("--status", type=Path, required=True, metavar="FILE")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- ARGV")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("supervise: no command given (usage: --status FILE -- ARGV...)", file=sys.stderr)
        return 2
    args.status.parent.mkdir(parents=True, exist_ok=True)
    return Supervisor(command, args.status).run()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
