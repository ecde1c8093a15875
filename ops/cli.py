"""`fleetmesh`: the operator's and the coordinator's command line.

Each group of subcommands lives in a private module with a `register(subparsers)` function.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mesh.clikit import package_version, run
from ops import (
    _cli_keys,
    _cli_ops,
    _cli_policy,
    _cli_push,
    _cli_release,
    _cli_rollout,
    _cli_root,
    _cli_server,
)

_GROUPS = (_cli_keys.register, _cli_release.register, _cli_push.register, _cli_rollout.register,
           _cli_root.register, _cli_ops.register, _cli_policy.register, _cli_server.register)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleetmesh", description="Operate a fleetmesh fleet and its coordinator.")
    parser.add_argument("--version", action="version", version=f"fleetmesh {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in _GROUPS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
