"""`fleetmesh token|devices|peers|operator-config`: the operator's everyday commands, through the
SDK (ops.client) against a pinned coordinator.

Configuration: see ops._cli_common.

Output: human tables (rich) by default; `--json` prints the API's own JSON: `token create` the
token object, `devices list` `{"devices": [DeviceInfo…]}`, `devices show|revoke` one DeviceInfo,
`peers` `{"peers": [...]}`, `devices logs` the log page (`-f --json`: one JSON object per line),
`devices update` the answer. `devices provision` always prints the `join` object (device.json).

Exit codes: mesh.clikit's table (0 also for `devices logs -f` stopped with Ctrl-C).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from mesh.clikit import CliError
from mesh.control import WAN_PURPOSES
from mesh.rollout import TAG_KEY_RE, RolloutSpecError, Selector, parse_tag_args
from ops._cli_common import (
    add_common_options,
    add_release_key_option,
    api_errors,
    app_arg,
    date,
    lock_text,
    name_arg,
    note_token_root,
    one_line_errors,
    operator_client,
    parse_duration,
    print_json,
    progress_text,
    size,
    table,
    text,
    token_release_key,
    token_root,
    when,
)
from ops.client import ProtocolError
from vpn import Endpoint, QuickPeer, export_wg_quick, generate_keypair, write_private_file

LOG_FOLLOW_WAIT: Final = 25.0  # s per long poll while following logs (server allows 30)
LOG_FOLLOW_BACKLOG: Final = 10  # lines shown before following, as tail -f does
MAX_LOG_LINES: Final = 5000  # what a device keeps (docs/api.md)
# Devices upload app logs only while someone reads them (docs/api.md, PeerMap
# `logs_wanted_until`): a read asks the device, which sends what it kept within a peer-map
# push and its next upload (2 s). `devices logs` without -f waits this long for that from an
# online device.
LOG_FRESH_WAIT: Final = 5.0
OPERATOR_KEEPALIVE: Final = 25  # wg-quick's customary value to keep NAT mappings open (wg(8))


# --------------------------------------------------------------------------- handlers


def _token_create(args: argparse.Namespace) -> int:
    fleet = name_arg(args.fleet, "fleet")
    expires = parse_duration(args.expires)
    if args.uses < 1:
        raise CliError("--uses must be at least 1")
    name = None if args.name is None else name_arg(args.name)
    tags = _tag_args(args.tag)
    with api_errors(), operator_client(args) as client:
        out = client.create_token(fleet, uses=args.uses, expires_in=expires, name=name,
                                  release_key=token_release_key(args.release_key),
                                  root=token_root(args.root, fleet), tags=tags)
    note_token_root(out["token"])
    if args.json:
        print_json(out)
    else:
        print(out["token"])
    return 0


def _tag_args(items: list[str]) -> dict[str, str]:
    """`--tag k=v` (repeatable) as a tags object, checked as the API checks it (exit 2)."""
    try:
        return parse_tag_args(items)
    except RolloutSpecError as exc:
        raise CliError(f"--tag: {exc}") from None


def _tags_text(tags: Any) -> str:
    """{"site": "berlin", "role": "cam"} → "role=cam site=berlin"; `-` without tags."""
    if not isinstance(tags, dict) or not tags:
        return "-"
    return text(" ".join(f"{k}={v}" for k, v in sorted(tags.items())))


_DEVICE_COLUMNS: Final = ["NAME", "FLEET", "STATE", "ONLINE", "RELEASE", "MESH IPV4",
                          "MESH IPV6", "ENDPOINT", "LAST SEEN", "AGENT", "PLATFORM", "REPORTED",
                          "TAGS"]


def _device_row(d: dict[str, Any]) -> list[str]:
    return [text(d.get("name")), text(d.get("fleet")), text(d.get("state")),
            text(bool(d.get("online"))), _release_text(d), text(d.get("mesh_ipv4")),
            text(d.get("mesh_ipv6")), text(d.get("endpoint")), when(d.get("last_seen")),
            text(d.get("agent_version")), text(d.get("platform")),
            _reported_text(d.get("reported_misbehaving")),
            _tags_text(d.get("tags"))]


def _reported_text(reporters: Any) -> str:
    """"! by N" when N devices report the device misbehaving (`devices show` says who and
    what), "-" otherwise."""
    if isinstance(reporters, int) and not isinstance(reporters, bool) and reporters > 0:
        return f"! by {reporters}"
    return "-"


def _counts_text(counts: Any) -> str:
    """{"corrupt_blob": 4, "ghost_member": 12} → "corrupt_blob 4, ghost_member 12"."""
    if not isinstance(counts, dict):
        return "-"
    return ", ".join(f"{_plain(reason)} {_plain(n)}" for reason, n in counts.items()
                     if n) or "-"


def _plain(value: Any) -> str:
    """A server's value as one line of plain terminal text (no control characters)."""
    return "".join(c if c.isprintable() else "?" for c in str(value))


def _misbehaviour_lines(d: dict[str, Any]) -> list[str]:
    """What others report this device doing wrong, and what it reports of others: claims of
    the reporters (docs/security.md, "Misbehaving peers")."""
    lines = []
    for key, who, label in (("reported_by", "reporter", "reported misbehaving by"),
                            ("reports_about", "name", "reports misbehaving")):
        entries = d.get(key)
        for e in entries if isinstance(entries, list) else []:
            if isinstance(e, dict):
                lines.append(f"{label} {_plain(e.get(who))}: {_counts_text(e.get('counts'))}")
    return lines


def _nat_text(link: Any) -> str:
    """How the device holds its NAT binding to the hub (agent/_keepalive.py), from its last
    report: "keepalive 80 s; binding >= 105 s, < 130 s"."""
    if not isinstance(link, dict) or not isinstance(link.get("hub_keepalive"), int):
        return "-"
    out = f"keepalive {link['hub_keepalive']} s"
    survived, lost = link.get("binding_survived"), link.get("binding_lost")
    known = []
    if isinstance(survived, (int, float)) and survived > 0:
        known.append(f">= {survived:.0f} s")
    if isinstance(lost, (int, float)):
        known.append(f"< {lost:.0f} s")
    return out + (f"; binding {', '.join(known)}" if known else "; binding not measured yet")


def _budget_text(budget: Any) -> str:
    """The device's WAN budget from its last report: "12.0 MB of 50.0 MB this month" and,
    past it, that log shipping is deferred; `-` without one."""
    if not isinstance(budget, dict):
        return "-"
    limit, used, period = budget.get("limit"), budget.get("used"), budget.get("period")
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in (limit, used)):
        return "-"
    out = f"{size(used)} of {size(limit)} this {text(period)}"
    return out + ("; used up: log shipping deferred" if budget.get("over") else "")


def _release_text(d: dict[str, Any]) -> str:
    """The running release, and "stale" when the device reports that the fleet's signed
    timestamp expired (a frozen coordinator; docs/security.md)."""
    apps = d.get("apps")
    stale = isinstance(apps, list) and any(isinstance(a, dict) and a.get("stale") is True
                                           for a in apps)
    release = text(d.get("release"))
    return f"{release} stale" if stale else release


def _apps_table(apps: list[Any]) -> None:
    rows = [[text(a.get("app")), text(a.get("running")), text(a.get("target")),
             text(a.get("state")), progress_text(a.get("bytes_done"), a.get("bytes_total")),
             lock_text(a.get("lock_since"), a.get("lock_stale")), text(a.get("error"))]
            for a in apps if isinstance(a, dict)]
    if rows:
        print()
        table(["APP", "RUNNING", "TARGET", "STATE", "DOWNLOAD", "LOCK", "ERROR"], rows)


def _devices_list(args: argparse.Namespace) -> int:
    fleet = None if args.fleet is None else name_arg(args.fleet, "fleet")
    selector = None
    if args.selector is not None:
        try:
            selector = str(Selector.parse(args.selector))
        except RolloutSpecError as exc:
            raise CliError(f"--selector {args.selector!r}: {exc}") from None
    with api_errors(), operator_client(args) as client:
        devices = client.list_devices(fleet, selector=selector)
    if args.json:
        print_json({"devices": devices})
    elif not devices:
        print("no devices" + ("" if fleet is None else f" in fleet {fleet}")
              + ("" if selector is None else f" matching {selector}"))
    else:
        table(_DEVICE_COLUMNS, [_device_row(d) for d in devices])
    return 0


def _wan_rows(wan: Any) -> list[list[str]]:
    """The device's byte account, a row per UTC day, newest first: DAY, a column per purpose
    (mesh.control WAN_PURPOSES), TOTAL."""
    if not isinstance(wan, dict):
        return []
    rows = []
    for day in sorted(wan, reverse=True):
        counts = wan[day] if isinstance(wan[day], dict) else {}
        values = [counts.get(p) for p in WAN_PURPOSES]
        numbers = [v if isinstance(v, int) and not isinstance(v, bool) else None
                   for v in values]
        rows.append([text(day), *(size(n) for n in numbers),
                     size(sum(n for n in numbers if n is not None))])
    return rows


def _show_device(d: dict[str, Any]) -> None:
    fields = [("name", d.get("name")), ("fleet", d.get("fleet")), ("state", d.get("state")),
              ("online", bool(d.get("online"))), ("public key", d.get("public_key")),
              ("mesh IPv4", d.get("mesh_ipv4")), ("mesh IPv6", d.get("mesh_ipv6")),
              ("endpoint", d.get("endpoint")), ("LAN endpoints", d.get("lan_endpoints")),
              ("agent", d.get("agent_version")), ("platform", d.get("platform"))]
    rows = [[k, text(v)] for k, v in fields]
    rows.append(["last seen", when(d.get("last_seen"))])
    rows.append(["enrolled", date(d.get("enrolled_at"))])
    rows.append(["release", text(d.get("release"))])
    rows.append(["tags", _tags_text(d.get("tags"))])
    rows.append(["time zone", text(d.get("timezone"))])
    rows.append(["NAT", _nat_text(d.get("link"))])
    rows.append(["WAN budget", _budget_text(d.get("wan_budget"))])
    table(["FIELD", "VALUE"], rows, header=False)
    lines = _misbehaviour_lines(d)
    if lines:
        print()
        print("\n".join(lines))
    apps = d.get("apps")
    _apps_table(apps if isinstance(apps, list) else [])
    wan = _wan_rows(d.get("wan_bytes"))
    if wan:
        print()
        print("WAN bytes by purpose (the device's own account, UTC days):")
        table(["DAY", *(p.upper() for p in WAN_PURPOSES), "TOTAL"], wan)


def _devices_show(args: argparse.Namespace) -> int:
    name = name_arg(args.name)
    with api_errors(), operator_client(args) as client:
        device = client.device(name)
    if args.json:
        print_json(device)
    else:
        _show_device(device)
    return 0


def _devices_tag(args: argparse.Namespace) -> int:
    name = name_arg(args.name)
    try:
        tags = parse_tag_args(args.tags)
    except RolloutSpecError as exc:
        raise CliError(str(exc)) from None
    for key in args.remove:
        if TAG_KEY_RE.fullmatch(key) is None:
            raise CliError(f"--remove {key!r}: not a tag key ([a-z0-9][a-z0-9._-]{{0,31}})")
    if not tags and not args.remove:
        raise CliError("nothing to change: give KEY=VALUE tags or --remove KEY")
    with api_errors(), operator_client(args) as client:
        out = client.tag_device(name, set=tags, remove=args.remove)
    if args.json:
        print_json(out)
    else:
        print(f"{out.get('device', name)}: {_tags_text(out.get('tags'))}")
    return 0


def _devices_revoke(args: argparse.Namespace) -> int:
    name = name_arg(args.name)
    with api_errors(), operator_client(args) as client:
        device = client.revoke(name)
    if args.json:
        print_json(device)
    else:
        print(f"revoked {device.get('name', name)}")
    return 0


def _devices_update(args: argparse.Namespace) -> int:
    name = name_arg(args.name)
    app = app_arg(args.app)
    with api_errors(), operator_client(args) as client:
        out = client.update_device(name, app, force=args.force)
    if args.json:
        print_json(out)
    elif out.get("force"):
        print(f"{name}: {app} version {out.get('version')} forced past its update lock")
    else:
        print(f"{name}: {app} version {out.get('version')} waits for its update lock again")
    return 0


def _log_text(line: dict[str, Any]) -> str:
    """`TIME APP STREAM LINE`, the line's own CR/LF shown escaped (one line stays one)."""
    ts = line.get("ts")
    stamp = "-"
    if isinstance(ts, (int, float)) and not isinstance(ts, bool):
        stamp = datetime.datetime.fromtimestamp(float(ts), datetime.UTC).strftime(
            "%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    escaped = str(line.get("line", "")).replace("\r", "\\r").replace("\n", "\\n")
    return f"{stamp} {line.get('app', '-')} {line.get('stream', '-')} {escaped}"


def _devices_logs(args: argparse.Namespace) -> int:
    name = name_arg(args.name)
    if args.tail is not None and not 1 <= args.tail <= MAX_LOG_LINES:
        raise CliError(f"--tail must be 1..{MAX_LOG_LINES}")
    dropped_seen: int | None = None

    def show(page: dict[str, Any], as_lines: bool) -> None:
        nonlocal dropped_seen
        if args.json and not as_lines:
            print_json(page)
            return
        for line in page.get("lines") or []:
            print(json.dumps(line) if args.json else _log_text(line), flush=True)
        dropped = page.get("dropped")
        if isinstance(dropped, int) and dropped and dropped != dropped_seen:
            print(f"fleetmesh: {name} dropped {dropped} log lines in all (its buffer was "
                  "full, or over the coordinator's log rate limit)", file=sys.stderr,
                  flush=True)
            dropped_seen = dropped

    try:
        with api_errors(), operator_client(args) as client:
            if not args.follow:
                tail = args.tail or MAX_LOG_LINES
                page = client.device_logs(name, tail=tail)  # this read asks the device too
                if client.device(name).get("online") is True:
                    fresh = client.device_logs(name, after=int(page["next"]),
                                               wait=LOG_FRESH_WAIT)
                    page = {"lines": [*page["lines"], *fresh["lines"]][-tail:],
                            "next": fresh["next"], "dropped": fresh["dropped"]}
                else:
                    print(f"fleetmesh: {name} is offline: these are the lines it uploaded "
                          "before; it keeps newer ones until it is back and they are read",
                          file=sys.stderr, flush=True)
                show(page, False)
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
    name = name_arg(args.name)
    fleet = name_arg(args.fleet, "fleet")
    expires = None if args.expires is None else parse_duration(args.expires)
    tags = _tag_args(args.tag)
    with api_errors(), operator_client(args) as client:
        out = client.provision(name, fleet, expires,
                               release_key=token_release_key(args.release_key),
                               root=token_root(args.root, fleet), tags=tags)
    note_token_root(out["join"]["token"])
    print_json(out["join"])
    if sys.stdout.isatty():
        print("(save this as device.json for `fleetmesh-agent join --config`)", file=sys.stderr)
    return 0


def _peers(args: argparse.Namespace) -> int:
    name = name_arg(args.name)
    with api_errors(), operator_client(args) as client:
        peers = client.peers(name)
    if args.json:
        print_json({"peers": peers})
    elif not peers:
        print(f"{name} has reported no peers")
    else:
        table(["PEER", "PATH", "ENDPOINT", "LAST HANDSHAKE"],
               [[text(p.get("peer")), text(p.get("path")), text(p.get("endpoint")),
                 when(p.get("last_handshake"))] for p in peers])
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
    """0600 (it holds a private key), whole or absent after a crash, durable; an existing file
    is replaced only with `force` (else FileExistsError)."""
    write_private_file(path, text.encode("ascii"), exclusive=not force)


def _operator_config(args: argparse.Namespace) -> int:
    name = name_arg(args.name)
    out = None if args.out is None else Path(args.out)
    # Check before registering: a key registered but never written would be lost.
    if out is not None:
        if out.exists() and not args.force:
            raise CliError(f"{out} exists; pass --force to replace it")
        if not out.parent.is_dir():
            raise CliError(f"cannot write {out}: no such directory")
    pair = generate_keypair()
    with api_errors(), operator_client(args) as client:
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


def _tag_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                   help="a tag the enrolled device gets (repeatable)")


def register(sub: Any) -> None:
    add: Callable[..., argparse.ArgumentParser] = sub.add_parser

    token = one_line_errors(add("token", help="enrollment tokens"))
    tsub = token.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    create = add_common_options(tsub.add_parser(
        "create", help="make an enrollment token (prints it)",
        description="Make an enrollment token fm1.<fingerprint>.<secret>[.<release key "
                    "fingerprint>] for a fleet."))
    create.add_argument("--fleet", required=True, help="fleet the enrolled devices join")
    create.add_argument("--uses", type=int, default=1, help="how many enrollments (default 1)")
    create.add_argument("--expires", default="1h", metavar="DURATION",
                        help="lifetime: 90s, 30m, 1h, 2d (default 1h)")
    create.add_argument("--name", help="bind the token to one device name")
    _tag_option(create)
    add_release_key_option(create)
    create.set_defaults(handler=_token_create)

    devices = one_line_errors(add("devices", help="list, show, provision and revoke devices"))
    dsub = devices.add_subparsers(dest="devices_command", metavar="ACTION", required=True)
    lst = add_common_options(
        dsub.add_parser("list", help="all devices (JSON: {\"devices\": [...]})"))
    lst.add_argument("--fleet", help="only this fleet")
    lst.add_argument("--selector", metavar="SELECTOR",
                     help="only devices whose tags match all of k=v,k2=v2 (k= : tag absent)")
    lst.set_defaults(handler=_devices_list)
    tag = add_common_options(dsub.add_parser(
        "tag", help="set or remove a device's tags (key=value)",
        description="Set tags (KEY=VALUE; an empty value is allowed) and remove tags of a "
                    "device. Rollouts select devices by their tags (docs/rollouts.md); the "
                    "tag `window` (HH:MM-HH:MM) is the device's maintenance window."))
    tag.add_argument("name", metavar="NAME")
    tag.add_argument("tags", metavar="KEY=VALUE", nargs="*")
    tag.add_argument("--remove", action="append", default=[], metavar="KEY",
                     help="remove this tag (repeatable)")
    tag.set_defaults(handler=_devices_tag)
    show = add_common_options(dsub.add_parser("show", help="one device"))
    show.add_argument("name", metavar="NAME")
    show.set_defaults(handler=_devices_show)
    revoke = add_common_options(dsub.add_parser(
        "revoke", help="revoke a device: it leaves every peer map, its credential stops working"))
    revoke.add_argument("name", metavar="NAME")
    revoke.set_defaults(handler=_devices_revoke)
    update = add_common_options(dsub.add_parser(
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
    logs = add_common_options(dsub.add_parser(
        "logs", help="the device's app logs (TIME APP STREAM LINE); -f follows",
        description="Print the log lines the device's apps wrote, as its agent uploaded them "
                    "(the coordinator keeps the newest 5,000 per device). -f follows until "
                    "Ctrl-C. --json: the API's log page, or with -f one JSON object a line."))
    logs.add_argument("name", metavar="NAME")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument("--tail", type=int, metavar="N",
                      help="only the newest N lines (default: all kept; 10 with -f)")
    logs.set_defaults(handler=_devices_logs)
    prov = add_common_options(dsub.add_parser(
        "provision", help="pre-register a device; prints its device.json (join object)"),
        json_flag=False)
    prov.add_argument("name", metavar="NAME")
    prov.add_argument("--fleet", required=True)
    prov.add_argument("--expires", metavar="DURATION",
                      help="lifetime of the join token: 90s, 30m, 1h, 2d (default 1h)")
    _tag_option(prov)
    add_release_key_option(prov)
    prov.set_defaults(handler=_devices_provision)

    peers = add_common_options(
        add("peers", help="how a device reaches its peers (direct, relay, none)"))
    peers.add_argument("name", metavar="NAME")
    peers.set_defaults(handler=_peers)

    opc = add_common_options(add(
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
