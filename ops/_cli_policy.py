"""`fleetmesh policy check|set|show|explain`: a fleet's reachability policy (docs/policy.md).

`check` works offline; `set` checks the file the same way (mesh.policy) before it sends it, so a
bad file is one line naming its line number and exit 2 either way.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mesh.clikit import CliError
from mesh.policy import MAX_POLICY_BYTES, Policy, PolicyError, parse_policy
from ops._cli_common import (
    add_common_options,
    api_errors,
    name_arg,
    one_line_errors,
    operator_client,
    print_json,
    read_limited,
    table,
    text,
)


def read_policy(path: Path) -> tuple[str, Policy]:
    """The file's text and its parsed policy; CliError (exit 2) naming the file otherwise."""
    try:
        body = read_limited(path, MAX_POLICY_BYTES).decode()
    except UnicodeDecodeError:
        raise CliError(f"{path}: not UTF-8 text") from None
    try:
        return body, parse_policy(body)
    except PolicyError as exc:
        raise CliError(f"{path}: {exc}") from None


def _rules(n: int) -> str:
    return f"{n} rule{'' if n == 1 else 's'}"


def _check(args: argparse.Namespace) -> int:
    _, policy = read_policy(args.file)
    if args.json:
        print_json(policy.to_json())
    else:
        print(f"{args.file}: valid, {_rules(len(policy.rules))}")
    return 0


def _set(args: argparse.Namespace) -> int:
    fleet = name_arg(args.fleet, "fleet")
    body, _ = read_policy(args.file)
    with api_errors(), operator_client(args) as client:
        stored = client.set_policy(fleet, body)
    if args.json:
        print_json(stored)
    else:
        print(f"fleet {fleet}: policy version {stored.get('version')}, "
              f"{_rules(len(stored.get('rules') or []))}")
    return 0


def _show(args: argparse.Namespace) -> int:
    fleet = name_arg(args.fleet, "fleet")
    with api_errors(), operator_client(args) as client:
        stored = client.policy(fleet)
    if args.json:
        print_json(stored)
        return 0
    if not stored.get("version"):
        print(f"fleet {fleet}: no policy (the default only: devices reach their LAN "
              "neighbours; operators and hubs reach every device)")
        return 0
    print(f"# fleet {fleet}, policy version {stored.get('version')}")
    print(str(stored.get("policy", "")), end="" if str(stored.get("policy", "")).endswith(
        "\n") else "\n")
    return 0


def _rows(direction: str, grants: Any) -> list[list[str]]:
    return [[direction, text(g.get("peer")), text(g.get("ports")), "; ".join(
        str(w) for w in g.get("why") or [])] for g in grants or [] if isinstance(g, dict)]


def _explain(args: argparse.Namespace) -> int:
    fleet, device = name_arg(args.fleet, "fleet"), name_arg(args.device, "device")
    with api_errors(), operator_client(args) as client:
        compiled = client.compiled_policy(fleet, device)
    if args.json:
        print_json(compiled)
        return 0
    rows = _rows("reaches", compiled.get("reach")) + _rows("reached by",
                                                           compiled.get("reached_by"))
    print(f"{device} in fleet {fleet} (policy version {compiled.get('version')}): operators "
          f"and hubs {compiled.get('operators')}, both ways; {len(rows)} device grants")
    if rows:
        table(["DIRECTION", "PEER", "PORTS", "WHY"], rows)
    return 0


def register(sub: Any) -> None:
    policy = one_line_errors(sub.add_parser(
        "policy", help="a fleet's reachability policy: who may reach whom (docs/policy.md)"))
    psub = policy.add_subparsers(dest="policy_command", metavar="ACTION", required=True)

    check = one_line_errors(psub.add_parser(
        "check", help="validate a policy file offline",
        description="validate a policy file offline: one line naming the line number and "
                    "exit 2 if it is not valid"))
    check.add_argument("file", metavar="FILE", type=Path)
    check.add_argument("--json", action="store_true", help="print the parsed rules as JSON")
    check.set_defaults(handler=_check)

    put = add_common_options(one_line_errors(psub.add_parser(
        "set", help="set the fleet's policy from FILE (checked first)",
        description="set the fleet's policy from FILE (checked first)")))
    put.add_argument("file", metavar="FILE", type=Path)
    put.add_argument("--fleet", required=True)
    put.set_defaults(handler=_set)

    show = add_common_options(one_line_errors(psub.add_parser(
        "show", help="the fleet's policy as stored", description="the fleet's policy as "
        "stored (with its comments); --json adds the parsed rules")))
    show.add_argument("--fleet", required=True)
    show.set_defaults(handler=_show)

    explain = add_common_options(one_line_errors(psub.add_parser(
        "explain", help="which devices DEVICE may reach and which may reach it, and why",
        description="which devices DEVICE may reach and which may reach it, with the ports "
                    "and the rule (or default) that allows each")))
    explain.add_argument("device", metavar="DEVICE")
    explain.add_argument("--fleet", required=True)
    explain.set_defaults(handler=_explain)
