"""`fleetmesh token|devices|peers|operator-config`: the operator's everyday commands, through the
SDK (ops.client) against a pinned coordinator.

Configuration: FLEETMESH_URL, FLEETMESH_API_KEY, FLEETMESH_FINGERPRINT, else the keys url,
api_key, fingerprint of `--config FILE` (default ~/.config/fleetmesh/operator.toml); the
environment wins key by key.

Output: human tables (rich) by default; `--json` prints the API's own JSON: `token create` the
token object, `devices list` `{"devices": [DeviceInfo…]}`, `devices show|revoke` one DeviceInfo,
`peers` `{"peers": [...]}`, `devices logs` the log page (`-f --json`: one JSON object per line),
`devices update` the answer. `devices provision` always prints the `join` object (device.json).

Exit codes: 0 ok (also `devices logs -f` stopped with Ctrl-C); 1 the coordinator refused (4xx,
message is its error line) or failed (5xx) or answered nonsense; 2 bad arguments or missing
configuration; 3 coordinator unreachable; 4 the coordinator's certificate is not the pinned
one; 5 a wait timed out (`release watch --timeout`).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, NoReturn

from mesh.clikit import EXIT_USAGE, CliError
from mesh.control import ControlError, check_app, check_name
from mesh.tlspin import PinError
from ops.client import (
    ApiError,
    ConfigError,
    CoordinatorUnreachable,
    OperatorClient,
    ProtocolError,
    load_operator_config,
)
from vpn import Endpoint, QuickPeer, export_wg_quick, generate_keypair

EXIT_API: Final = 1
EXIT_UNREACHABLE: Final = 3
EXIT_UNTRUSTED: Final = 4
EXIT_TIMEOUT: Final = 5
REQUEST_TIMEOUT: Final = 10.0  # s per request: a coordinator slower than that is unusable
LOG_FOLLOW_WAIT: Final = 25.0  # s per long poll while following logs (server allows 30)
LOG_FOLLOW_BACKLOG: Final = 10  # lines shown before following, as tail -f does
MAX_LOG_LINES: Final = 5000  # what a device keeps (docs/api.md)
OPERATOR_KEEPALIVE: Final = 25  # wg-quick's customary value to keep NAT mappings open (wg(8))
MAX_EXPIRY: Final = 365 * 86400
_DURATION_RE: Final = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


# --------------------------------------------------------------------------- helpers


def parse_duration(text: str) -> int:
    """`90s`, `30m`, `1h`, `2d`, combinations in that order (`1h30m`) or plain seconds → seconds.
    Raises CliError (exit 2)."""
    t = text.strip().lower() if isinstance(text, str) else ""
    if t.isdigit():
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


def _name(text: str, what: str = "name") -> str:
    try:
        return check_name(text, what)
    except ControlError as exc:
        raise CliError(str(exc)) from exc


def _one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """argparse prints usage plus the error; fleetmesh prints one line and exits 2."""
    def error(message: str) -> NoReturn:
        parser.exit(EXIT_USAGE, f"{parser.prog}: {message} (see --help)\n")
    parser.error = error  # type: ignore[method-assign]
    return parser


@contextmanager
def _api_errors() -> Iterator[None]:
    try:
        yield
    except ConfigError as exc:
        raise CliError(str(exc), code=EXIT_USAGE) from exc
    except ApiError as exc:
        raise CliError(str(exc), code=EXIT_API) from exc
    except CoordinatorUnreachable as exc:
        raise CliError(str(exc), code=EXIT_UNREACHABLE) from exc
    except PinError as exc:
        raise CliError(str(exc), code=EXIT_UNTRUSTED) from exc
    except ProtocolError as exc:
        raise CliError(f"unexpected answer from the coordinator: {exc}", code=EXIT_API) from exc


def _client(args: argparse.Namespace) -> OperatorClient:
    return load_operator_config(args.config).client(timeout=args.timeout)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def _console() -> Any:
    from rich.console import Console
    width = None if sys.stdout.isatty() else max(160, shutil.get_terminal_size().columns)
    return Console(width=width, highlight=False, soft_wrap=False)


def _table(columns: list[str], rows: list[list[str]], header: bool = True) -> None:
    from rich.table import Table
    table = Table(box=None, header_style="bold", pad_edge=False, show_header=header)
    for c in columns:
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*r)
    _console().print(table)


def _text(value: Any) -> str:
    from rich.markup import escape
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return escape(", ".join(str(v) for v in value)) or "-"
    return escape(str(value))


def _when(value: Any, now: float | None = None) -> str:
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
    return _text(value)


def _date(value: Any) -> str:
    """Epoch seconds → UTC ISO time; anything else as it is."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        moment = datetime.datetime.fromtimestamp(float(value), datetime.UTC)
        return moment.strftime("%Y-%m-%d %H:%M:%S UTC")
    return _text(value)


# --------------------------------------------------------------------------- handlers


def _token_create(args: argparse.Namespace) -> int:
    fleet = _name(args.fleet, "fleet")
    expires = parse_duration(args.expires)
    if args.uses < 1:
        raise CliError("--uses must be at least 1")
    name = None if args.name is None else _name(args.name)
    with _api_errors(), _client(args) as client:
        out = client.create_token(fleet, uses=args.uses, expires_in=expires, name=name)
    if args.json:
        _print_json(out)
    else:
        print(out["token"])
    return 0


_DEVICE_COLUMNS: Final = ["NAME", "FLEET", "STATE", "ONLINE", "RELEASE", "MESH IPV4",
                          "MESH IPV6", "ENDPOINT", "LAST SEEN", "AGENT"]


def _device_row(d: dict[str, Any]) -> list[str]:
    return [_text(d.get("name")), _text(d.get("fleet")), _text(d.get("state")),
            _text(bool(d.get("online"))), _text(d.get("release")), _text(d.get("mesh_ipv4")),
            _text(d.get("mesh_ipv6")), _text(d.get("endpoint")), _when(d.get("last_seen")),
            _text(d.get("agent_version"))]


def progress_text(done: Any, total: Any) -> str:
    """`12.5 MB / 40.0 MB (31 %)`; `-` when nothing is known."""
    from ops._cli_release import _size
    if not isinstance(total, int) or isinstance(total, bool) or total <= 0:
        return "-"
    done = done if isinstance(done, int) and not isinstance(done, bool) else 0
    return f"{_size(done)} / {_size(total)} ({100 * done // total} %)"


def lock_text(since: Any, stale: Any) -> str:
    """The app's update lock: `-`, `held since 5 min ago`, `… (stale)`."""
    if since is None:
        return "-"
    return f"held since {_when(since)}" + (" (stale)" if stale else "")


def _apps_table(apps: list[Any]) -> None:
    rows = [[_text(a.get("app")), _text(a.get("running")), _text(a.get("target")),
             _text(a.get("state")), progress_text(a.get("bytes_done"), a.get("bytes_total")),
             lock_text(a.get("lock_since"), a.get("lock_stale")), _text(a.get("error"))]
            for a in apps if isinstance(a, dict)]
    if rows:
        print()
        _table(["APP", "RUNNING", "TARGET", "STATE", "DOWNLOAD", "LOCK", "ERROR"], rows)


def _devices_list(args: argparse.Namespace) -> int:
    fleet = None if args.fleet is None else _name(args.fleet, "fleet")
    with _api_errors(), _client(args) as client:
        devices = client.list_devices(fleet)
    if args.json:
        _print_json({"devices": devices})
    elif not devices:
        print("no devices" + ("" if fleet is None else f" in fleet {fleet}"))
    else:
        _table(_DEVICE_COLUMNS, [_device_row(d) for d in devices])
    return 0


def _show_device(d: dict[str, Any]) -> None:
    fields = [("name", d.get("name")), ("fleet", d.get("fleet")), ("state", d.get("state")),
              ("online", bool(d.get("online"))), ("public key", d.get("public_key")),
              ("mesh IPv4", d.get("mesh_ipv4")), ("mesh IPv6", d.get("mesh_ipv6")),
              ("endpoint", d.get("endpoint")), ("LAN endpoints", d.get("lan_endpoints")),
              ("agent", d.get("agent_version"))]
    rows = [[k, _text(v)] for k, v in fields]
    rows.append(["last seen", _when(d.get("last_seen"))])
    rows.append(["enrolled", _date(d.get("enrolled_at"))])
    rows.append(["release", _text(d.get("release"))])
    _table(["FIELD", "VALUE"], rows, header=False)
    apps = d.get("apps")
    _apps_table(apps if isinstance(apps, list) else [])


def _devices_show(args: argparse.Namespace) -> int:
    name = _name(args.name)
    with _api_errors(), _client(args) as client:
        device = client.device(name)
    if args.json:
        _print_json(device)
    else:
        _show_device(device)
    return 0


def _devices_revoke(args: argparse.Namespace) -> int:
    name = _name(args.name)
    with _api_errors(), _client(args) as client:
        device = client.revoke(name)
    if args.json:
        _print_json(device)
    else:
        print(f"revoked {device.get('name', name)}")
    return 0


def _devices_update(args: argparse.Namespace) -> int:
    name = _name(args.name)
    app = _app(args.app)
    with _api_errors(), _client(args) as client:
        out = client.update_device(name, app, force=args.force)
    if args.json:
        _print_json(out)
    elif out.get("force"):
        print(f"{name}: {app} version {out.get('version')} forced past its update lock")
    else:
        print(f"{name}: {app} version {out.get('version')} waits for its update lock again")
    return 0


def _app(text: str) -> str:
    try:
        return check_app(text, "--app")
    except ControlError as exc:
        raise CliError(str(exc)) from exc


def _log_text(line: dict[str, Any]) -> str:
    """`TIME APP STREAM LINE`, the line's own CR/LF shown escaped (one line stays one)."""
    ts = line.get("ts")
    when = "-"
    if isinstance(ts, (int, float)) and not isinstance(ts, bool):
        when = datetime.datetime.fromtimestamp(float(ts), datetime.UTC).strftime(
            "%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    text = str(line.get("line", "")).replace("\r", "\\r").replace("\n", "\\n")
    return f"{when} {line.get('app', '-')} {line.get('stream', '-')} {text}"


def _devices_logs(args: argparse.Namespace) -> int:
    name = _name(args.name)
    if args.tail is not None and not 1 <= args.tail <= MAX_LOG_LINES:
        raise CliError(f"--tail must be 1..{MAX_LOG_LINES}")
    dropped_seen: int | None = None

    def show(page: dict[str, Any], as_lines: bool) -> None:
        nonlocal dropped_seen
        if args.json and not as_lines:
            _print_json(page)
            return
        for line in page.get("lines") or []:
            print(json.dumps(line) if args.json else _log_text(line), flush=True)
        dropped = page.get("dropped")
        if isinstance(dropped, int) and dropped and dropped != dropped_seen:
            print(f"fleetmesh: {name} dropped {dropped} log lines in all (its buffer was "
                  "full)", file=sys.stderr, flush=True)
            dropped_seen = dropped

    try:
        with _api_errors(), _client(args) as client:
            if not args.follow:
                show(client.device_logs(name, tail=args.tail or MAX_LOG_LINES), False)
                return 0
            page = client.device_logs(name, tail=args.tail or LOG_FOLLOW_BACKLOG)
            show(page, True)
            after = int(page["next"])
            while True:
                page = client.device_logs(name, after=after, wait=LOG_FOLLOW_WAIT)
                show(page, True)
                after = int(page["next"])
    except KeyboardInterrupt:  # Ctrl-C is how one stops following
        return 0


def _devices_provision(args: argparse.Namespace) -> int:
    name = _name(args.name)
    fleet = _name(args.fleet, "fleet")
    expires = None if args.expires is None else parse_duration(args.expires)
    with _api_errors(), _client(args) as client:
        out = client.provision(name, fleet, expires)
    _print_json(out["join"])
    if sys.stdout.isatty():
        print("(save this as device.json for `fleetmesh-agent join --config`)", file=sys.stderr)
    return 0


def _peers(args: argparse.Namespace) -> int:
    name = _name(args.name)
    with _api_errors(), _client(args) as client:
        peers = client.peers(name)
    if args.json:
        _print_json({"peers": peers})
    elif not peers:
        print(f"{name} has reported no peers")
    else:
        _table(["PEER", "PATH", "ENDPOINT", "LAST HANDSHAKE"],
               [[_text(p.get("peer")), _text(p.get("path")), _text(p.get("endpoint")),
                 _when(p.get("last_handshake"))] for p in peers])
    return 0


def operator_wg_quick(private_key: str, registered: dict[str, Any]) -> str:
    """The workstation's wg-quick config from `OperatorClient.add_operator`'s answer."""
    hub = registered["hub"]
    try:
        addresses = [ipaddress.ip_interface(f"{registered['mesh_ipv4']}/32"),
                     ipaddress.ip_interface(f"{registered['mesh_ipv6']}/128")]
        prefixes = (ipaddress.ip_network(registered["mesh_prefix_v4"]),
                    ipaddress.ip_network(registered["mesh_prefix_v6"]))
        endpoint = Endpoint.parse(hub.endpoint)
    except (ValueError, TypeError) as exc:
        raise ProtocolError(f"operator: {exc}") from exc
    peer = QuickPeer(hub.public_key, allowed_ips=prefixes, endpoint=endpoint,
                     persistent_keepalive=OPERATOR_KEEPALIVE)
    return export_wg_quick(private_key, addresses, [peer])


def _write_secret(path: Path, text: str, force: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_TRUNC if force else os.O_EXCL)
    fd = os.open(path, flags, 0o600)  # born 0600: it holds a private key
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode("ascii"))
    finally:
        os.close(fd)


def _operator_config(args: argparse.Namespace) -> int:
    name = _name(args.name)
    out = None if args.out is None else Path(args.out)
    # Check before registering: a key registered but never written would be lost.
    if out is not None:
        if out.exists() and not args.force:
            raise CliError(f"{out} exists; pass --force to replace it")
        if not out.parent.is_dir():
            raise CliError(f"cannot write {out}: no such directory")
    pair = generate_keypair()
    with _api_errors(), _client(args) as client:
        registered = client.add_operator(name, pair.public)
        config = operator_wg_quick(pair.private, registered)
    if out is None:
        sys.stdout.write(config)
        return 0
    try:
        _write_secret(out, config, args.force)
    except OSError as exc:
        raise CliError(f"cannot write {out}: {exc.strerror or exc}") from exc
    print(f"wrote {out} for operator {name} ({registered['mesh_ipv4']}, "
          f"{registered['mesh_ipv6']}); bring it up with: wg-quick up {out}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- registration


def _common(p: argparse.ArgumentParser, json_flag: bool = True, timeout_flag: bool = True
            ) -> argparse.ArgumentParser:
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
    return _one_line_errors(p)


def register(sub: Any) -> None:
    add: Callable[..., argparse.ArgumentParser] = sub.add_parser

    token = _one_line_errors(add("token", help="enrollment tokens"))
    tsub = token.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    create = _common(tsub.add_parser(
        "create", help="make an enrollment token (prints it)",
        description="Make an enrollment token fm1.<fingerprint>.<secret> for a fleet."))
    create.add_argument("--fleet", required=True, help="fleet the enrolled devices join")
    create.add_argument("--uses", type=int, default=1, help="how many enrollments (default 1)")
    create.add_argument("--expires", default="1h", metavar="DURATION",
                        help="lifetime: 90s, 30m, 1h, 2d (default 1h)")
    create.add_argument("--name", help="bind the token to one device name")
    create.set_defaults(handler=_token_create)

    devices = _one_line_errors(add("devices", help="list, show, provision and revoke devices"))
    dsub = devices.add_subparsers(dest="devices_command", metavar="ACTION", required=True)
    lst = _common(dsub.add_parser("list", help="all devices (JSON: {\"devices\": [...]})"))
    lst.add_argument("--fleet", help="only this fleet")
    lst.set_defaults(handler=_devices_list)
    show = _common(dsub.add_parser("show", help="one device"))
    show.add_argument("name", metavar="NAME")
    show.set_defaults(handler=_devices_show)
    revoke = _common(dsub.add_parser(
        "revoke", help="revoke a device: it leaves every peer map, its credential stops working"))
    revoke.add_argument("name", metavar="NAME")
    revoke.set_defaults(handler=_devices_revoke)
    update = _common(dsub.add_parser(
        "update", help="force a device past its app's update lock",
        description="--force: the device updates its app to its current target now, even "
                    "while the app holds its update lock; the force ends by itself once the "
                    "device runs that version. --no-force takes it back."))
    update.add_argument("name", metavar="NAME")
    update.add_argument("--app", required=True)
    force = update.add_mutually_exclusive_group(required=True)
    force.add_argument("--force", dest="force", action="store_true", default=None)
    force.add_argument("--no-force", dest="force", action="store_false")
    update.set_defaults(handler=_devices_update)
    logs = _common(dsub.add_parser(
        "logs", help="the device's app logs (TIME APP STREAM LINE); -f follows",
        description="Print the log lines the device's apps wrote, as its agent uploaded them "
                    "(the coordinator keeps the newest 5,000 per device). -f follows until "
                    "Ctrl-C. --json: the API's log page, or with -f one JSON object a line."))
    logs.add_argument("name", metavar="NAME")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument("--tail", type=int, metavar="N",
                      help="only the newest N lines (default: all kept; 10 with -f)")
    logs.set_defaults(handler=_devices_logs)
    prov = _common(dsub.add_parser(
        "provision", help="pre-register a device; prints its device.json (join object)"),
        json_flag=False)
    prov.add_argument("name", metavar="NAME")
    prov.add_argument("--fleet", required=True)
    prov.add_argument("--expires", metavar="DURATION",
                      help="lifetime of the join token: 90s, 30m, 1h, 2d (default 1h)")
    prov.set_defaults(handler=_devices_provision)

    peers = _common(add("peers", help="how a device reaches its peers (direct, relay, none)"))
    peers.add_argument("name", metavar="NAME")
    peers.set_defaults(handler=_peers)

    opc = _common(add(
        "operator-config",
        help="join this workstation to the mesh: prints a wg-quick config",
        description="Generate a WireGuard key pair here, register its public key with the "
                    "coordinator and print (or write, 0600) a wg-quick config that reaches "
                    "the mesh through the hub. The private key never leaves this machine."),
        json_flag=False)
    opc.add_argument("name", metavar="NAME", help="operator workstation name")
    opc.add_argument("--out", metavar="FILE", help="write the config here (0600) instead")
    opc.add_argument("--force", action="store_true", help="replace an existing --out file")
    opc.set_defaults(handler=_operator_config)
