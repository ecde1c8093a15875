"""`fleetmesh-agent`: the device daemon's command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from mesh.clikit import EXIT_UNREACHABLE, CliError, package_version, run
from vpn import DeviceStatus, UapiBackend, UapiError, UapiProtocolError

from ._commands import add_join_parser, add_run_parser


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
