"""`fleetmesh-agent`: the device daemon's command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from mesh import services
from mesh.clikit import EXIT_REFUSED, EXIT_UNREACHABLE, CliError, package_version, run
from mesh.services import ServiceError, install
from vpn import DeviceStatus, UapiBackend, UapiError, UapiProtocolError

from ._commands import add_join_parser, add_run_parser
from ._doctor import diagnose

UNIT: Final = "fleetmesh-agent.service"
DEFAULT_DATA: Final = "/var/lib/fleetmesh-agent"


def status_json(status: DeviceStatus) -> dict[str, Any]:
    """A device's WireGuard state for tools: never the private or preshared keys."""
    return {
        "public_key": status.public_key,
        "listen_port": status.listen_port,
        "fwmark": status.fwmark,
        "peers": [
            {
                "public_key": p.public_key,
                "endpoint": str(p.endpoint) if p.endpoint else None,
                "allowed_ips": [str(n) for n in p.allowed_ips],
                "persistent_keepalive": p.persistent_keepalive,
                "last_handshake": p.last_handshake,
                "rx_bytes": p.rx_bytes,
                "tx_bytes": p.tx_bytes,
            }
            for p in status.peers
        ],
    }


def _ago(epoch: float | None, now: float) -> str:
    return "never" if epoch is None else f"{max(0.0, now - epoch):.0f} s ago"


def _wg_status(args: argparse.Namespace) -> int:
    try:
        status = UapiBackend(args.socket, timeout=args.timeout).get()
    except (OSError, TimeoutError) as exc:
        raise CliError(f"cannot reach WireGuard at {args.socket}: {exc}",
                       code=EXIT_UNREACHABLE) from exc
    except (UapiError, UapiProtocolError) as exc:
        raise CliError(f"WireGuard at {args.socket}: {exc}", code=EXIT_UNREACHABLE) from exc
    if args.json:
        print(json.dumps(status_json(status), indent=2))
        return 0
    now = time.time()
    print(f"public key {status.public_key}  listen port {status.listen_port}")
    for p in status.peers:
        ips = ", ".join(str(n) for n in p.allowed_ips) or "(none)"
        print(f"  peer {p.public_key}  endpoint {p.endpoint or '-'}  allowed {ips}  "
              f"handshake {_ago(p.last_handshake, now)}  rx {p.rx_bytes}  tx {p.tx_bytes}")
    return 0


def agent_unit(data: str, underlay: str | None, docker_host: str | None) -> str:
    """The unit text; ExecStart is this installation's `fleetmesh-agent run`."""
    argv = [str(services.console_script("fleetmesh-agent")), "run", "--data", data]
    caps = {"CAP_NET_ADMIN", "CAP_SYS_ADMIN"}
    if underlay:
        argv += ["--underlay", underlay]
        caps.add("CAP_NET_BIND_SERVICE")  # mDNS: UDP 5353
    if docker_host:
        argv += ["--docker-host", docker_host]
    return services.unit_text("agent", UNIT, argv, data, "fleetmesh-agent", caps)


def _install(args: argparse.Namespace) -> int:
    try:
        install(Path(args.root), UNIT, agent_unit(args.data, args.underlay, args.docker_host),
                first=f"fleetmesh-agent join URL --token T --data {args.data}  # once")
    except ServiceError as exc:
        raise CliError(str(exc)) from None
    return 0


def _doctor(args: argparse.Namespace) -> int:
    checks = diagnose(Path(args.data), args.docker_host)
    for check in checks:
        print(check.line(), flush=True)
    return EXIT_REFUSED if any(c.ok is False for c in checks) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetmesh-agent",
                                     description="The fleetmesh device agent.")
    parser.add_argument("--version", action="version",
                        version=f"fleetmesh-agent {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wg = sub.add_parser("wg-status", help="show a WireGuard device's state through its UAPI")
    wg.add_argument("--socket", required=True, metavar="PATH",
                    help="UAPI socket, e.g. /run/wireguard/wg0.sock")
    wg.add_argument("--json", action="store_true", help="machine-readable output")
    wg.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the daemon")
    wg.set_defaults(handler=_wg_status)
    add_join_parser(sub)
    add_run_parser(sub)
    install = services.add_install_parser(sub, UNIT, "fleetmesh-agent run", DEFAULT_DATA,
                                          "the agent's data directory")
    install.add_argument("--underlay", metavar="IF_OR_IPV4",
                         help="LAN interface for LAN discovery (adds CAP_NET_BIND_SERVICE "
                              "for mDNS)")
    install.add_argument("--docker-host", metavar="URL", help="the device's Docker engine")
    install.set_defaults(handler=_install)
    doctor = sub.add_parser(
        "doctor", help="check this host: WireGuard, TUN, Docker, clock, DNS, disk",
        description="One line per check, ok or FAIL with what to fix (skip when it does not "
                    "apply); exit 0 when nothing fails, 1 otherwise.")
    doctor.add_argument("--data", default=DEFAULT_DATA, metavar="DIR",
                        help=f"the agent's data directory (default {DEFAULT_DATA}); with an "
                             "enrollment, the clock is compared with the coordinator's and its "
                             "name resolved")
    doctor.add_argument("--docker-host", metavar="URL",
                        help="the engine to check (default: DOCKER_HOST, else the default "
                             "socket)")
    doctor.set_defaults(handler=_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
