"""`fleetmesh rollout start|status|pause|resume|abort|promote`, and the rollout options that
`release create` shares with `rollout start` (docs/rollouts.md, "Phased rollouts").

Every option is checked with `mesh.rollout`'s parsers before any network call: a bad value is
one line and exit 2. `rollout start` signs, with the operator's release key, the pin that
sends devices back to the previous release if the rollout halts (`rollback_pin`); the
coordinator never holds that key.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Final

from mesh.clikit import CliError
from mesh.release import encode_signed_pin, new_pin, sign_pin
from mesh.rollout import (
    MAX_MIN_DEVICES,
    MaxFailures,
    RolloutSpec,
    RolloutSpecError,
    Selector,
    Window,
    parse_duration,
    parse_phases,
)
from ops._cli_common import (
    add_common_options,
    api_errors,
    app_arg,
    date,
    load_signing_key,
    one_line_errors,
    operator_client,
    print_json,
    resolve_fleet,
    table,
    text,
    version_arg,
)
from ops.client import ROLLOUT_ACTIONS, OperatorClient

ROLLBACK_PIN_LIFETIME: Final = 30 * 86400  # s: a halted rollout's way back stays valid a month
BAD_STATES: Final = ("halted", "aborted")  # a release whose rollout ended so is never previous
def _min_devices(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_MIN_DEVICES:
        raise RolloutSpecError(f"must be a whole number from 1 to {MAX_MIN_DEVICES}")
    return int(text)


# The options beside --phases (RolloutSpec's fields): parser, metavar, help. Without --phases
# they have nothing to shape.
_SHAPING: Final[dict[str, tuple[Any, str, str]]] = {
    "soak": (parse_duration, "DURATION",
             "how long a phase's devices run the release healthily before the next phase "
             "starts (90s, 5m, 2h; default 10m)"),
    "max_failures": (MaxFailures.parse, "N|P%",
                     "halt when the failures in the started phases exceed this count "
                     "or percentage (default 0)"),
    "min_devices": (_min_devices, "N",
                    "evaluate a percentage --max-failures only once N devices have an "
                    "outcome (default 1)"),
    "selector": (Selector.parse, "SELECTOR",
                 "only devices whose tags match (site=berlin,role=cam)"),
    "window": (Window.parse, "HH:MM-HH:MM",
               "apply only inside this window of the device's local time (default: each "
               "device's `window` tag, if any)"),
    "deadline": (parse_duration, "DURATION",
                 "a phase device not running the release healthily this long after its "
                 "phase started counts as failed (default 1h)"),
}


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def add_rollout_options(p: argparse.ArgumentParser, *, publishing: bool) -> None:
    """--phases and what shapes a rollout; `publishing` (release create) adds --no-rollout
    and makes --phases optional."""
    group = p.add_argument_group("rollout (docs/rollouts.md)")
    group.add_argument("--phases", metavar="PHASES", required=not publishing,
                       help="comma list of counts, percentages (cumulative) or selectors "
                            "(k=v+k2=v2): e.g. 1,10%%,50%%,100%% or role=canary,100%%"
                            + ("; publishes the release held, then starts its rollout"
                               if publishing else ""))
    for field, (_, metavar, help_text) in _SHAPING.items():
        group.add_argument(_flag(field), metavar=metavar, help=help_text)
    if publishing:
        group.add_argument("--no-rollout", action="store_true",
                           help="publish without targeting any device until `fleetmesh "
                                "rollout start`")


def _parsed(option: str, parse: Any, value: str) -> Any:
    try:
        return parse(value)
    except RolloutSpecError as exc:
        raise CliError(f"{option} {value!r}: {exc}") from None


def rollout_spec(args: argparse.Namespace) -> RolloutSpec | None:
    """The RolloutSpec the options describe, None without --phases; CliError (exit 2) for a
    bad value or a shaping option without --phases."""
    if getattr(args, "no_rollout", False) and args.phases is not None:
        raise CliError("--phases and --no-rollout exclude each other")
    given = [field for field in _SHAPING if getattr(args, field) is not None]
    if args.phases is None:
        if given:
            raise CliError(f"{_flag(given[0])} shapes a rollout: it needs --phases")
        return None
    fields: dict[str, Any] = {"phases": _parsed("--phases", parse_phases, args.phases)}
    for field in given:
        fields[field] = _parsed(_flag(field), _SHAPING[field][0], getattr(args, field))
    return RolloutSpec(**fields)


def previous_version(client: OperatorClient, fleet: str, app: str, version: int) -> int | None:
    """The release devices go back to if `version`'s rollout halts, as the coordinator picks
    it: the highest published version below `version` whose own rollout is not halted or
    aborted; None for the app's first release."""
    bad = {r.get("version") for r in client.rollouts(fleet)
           if r.get("app") == app and r.get("state") in BAD_STATES}
    below = [r["version"] for r in client.list_releases(fleet, app)
             if isinstance(r.get("version"), int) and r["version"] < version]
    return max((v for v in below if v not in bad), default=None)


def start_rollout(client: OperatorClient, fleet: str, app: str, version: int,
                  spec: RolloutSpec, signing_key: Path | None) -> dict[str, Any]:
    """Start the rollout of a published release, with the rollback pin to the previous
    release signed here (when there is one) → the API's Rollout."""
    previous = previous_version(client, fleet, app, version)
    pin = None
    if previous is not None:
        key = load_signing_key(signing_key)
        pin = encode_signed_pin(sign_pin(new_pin(fleet, app, previous, None, now=time.time(),
                                                 lifetime=ROLLBACK_PIN_LIFETIME), key))
    return client.start_rollout(fleet, app, version, spec.to_json(), pin)


# --------------------------------------------------------------------------- output


def _when(value: Any) -> str:
    return "-" if value is None else date(value)


def _names(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def _phase_rows(rollout: dict[str, Any]) -> list[list[str]]:
    current = rollout.get("phase")
    rows = []
    for p in rollout.get("phases") or []:
        if not isinstance(p, dict):
            continue
        index = p.get("index")
        devices = _names(p.get("devices"))
        healthy = _names(p.get("healthy"))
        mark = "*" if index == current and rollout.get("state") != "done" else ""
        number = index + 1 if isinstance(index, int) else index
        rows.append([f"{text(number)}{mark}", text(p.get("spec")), text(devices),
                     _when(p.get("started_at")), _when(p.get("ended_at")),
                     f"{len(healthy)}/{len(devices)}", text(p.get("failed"))])
    return rows


def headline(rollout: dict[str, Any]) -> str:
    """`web version 3 in fleet cams: rollout halted, phase 1 of 3 (previous: 2)`."""
    phases = rollout.get("phases")
    phase = rollout.get("phase")
    where = f", phase {phase + 1} of {len(phases)}" if isinstance(phase, int) and \
        isinstance(phases, list) and phases else ""
    previous = rollout.get("previous")
    return (f"{rollout.get('app')} version {rollout.get('version')} in fleet "
            f"{rollout.get('fleet')}: rollout {rollout.get('state')}{where} (previous: "
            f"{'none' if previous is None else previous})")


def show_rollout(rollout: dict[str, Any]) -> None:
    """State and reason, the phases table, the events timeline (UTC)."""
    print(headline(rollout))
    if rollout.get("reason"):
        print(f"reason: {rollout['reason']}")
    rows = _phase_rows(rollout)
    if rows:
        print()
        table(["PHASE", "SPEC", "DEVICES", "STARTED", "ENDED", "HEALTHY", "FAILED"], rows)
    events = [e for e in rollout.get("events") or [] if isinstance(e, dict)]
    if events:
        print()
        print("timeline:")
        for e in events:
            print(f"  {_when(e.get('at'))}  {e.get('text')}")


# --------------------------------------------------------------------------- handlers


def _rollout_command(args: argparse.Namespace) -> int:
    """start, status and the actions: each prints the API's Rollout (`--json`) or a view of
    it (`start` and `status` the whole of it, an action its new state)."""
    app, version, command = app_arg(args.app), version_arg(args.version), args.rollout_command
    spec = rollout_spec(args) if command == "start" else None
    with api_errors(), operator_client(args) as client:
        fleet = resolve_fleet(client, args.fleet, app, version)
        if spec is not None:
            rollout = start_rollout(client, fleet, app, version, spec, args.signing_key)
        elif command == "status":
            rollout = client.rollout(fleet, app, version)
        else:
            rollout = client.rollout_action(fleet, app, version, command)
    if args.json:
        print_json(rollout)
    elif command in ROLLOUT_ACTIONS:
        print(headline(rollout))
        if rollout.get("reason"):
            print(f"reason: {rollout['reason']}")
    else:
        show_rollout(rollout)
    return 0


_ACTION_HELP: Final = {
    "pause": "stop advancing phases and evaluating halts (started phases go on)",
    "resume": "let a paused rollout advance again",
    "abort": "stop the rollout: every device that took the release goes back to the "
             "previous one, and the release is marked bad",
    "promote": "end the current phase now (skip its soak) and start the next",
}


def register(sub: Any) -> None:
    rollout = one_line_errors(sub.add_parser(
        "rollout", help="phased rollouts of a release (docs/rollouts.md)"))
    rsub = rollout.add_subparsers(dest="rollout_command", metavar="ACTION", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = add_common_options(rsub.add_parser(name, help=help_text, description=help_text))
        p.add_argument("version", metavar="VERSION", type=int)
        p.add_argument("--app", required=True)
        p.add_argument("--fleet", help="default: the one fleet with devices that has VERSION")
        p.set_defaults(handler=_rollout_command)
        return p

    start = add("start", "start (or restart) a release's phased rollout")
    add_rollout_options(start, publishing=False)
    start.add_argument("--signing-key", type=Path, metavar="FILE",
                       help="release signing key for the rollback pin (default "
                            "$FLEETMESH_SIGNING_KEY, else ~/.config/fleetmesh/release.key)")
    add("status", "a rollout's state, reason, phases and timeline")
    for action in ROLLOUT_ACTIONS:
        add(action, _ACTION_HELP[action])
