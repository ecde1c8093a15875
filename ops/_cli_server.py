"""`fleetmesh coordinator serve`: run the coordinator until SIGINT/SIGTERM; `fleetmesh
coordinator install`: its systemd unit."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio

from mesh import services
from mesh.clikit import EXIT_REFUSED, SERVER_STACK, CliError, missing_extra
from mesh.services import ServiceError, install
from ops._cli_common import parse_duration

if TYPE_CHECKING:  # annotations only: the server itself is loaded by _run
    from coordinator._server import Coordinator, CoordinatorConfig


def _port(text: str) -> int:
    # checked here, not by argparse, so that the error is one line (argparse adds its usage)
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) < 65536:
        raise CliError(f"--wg-port: must be a port 1..65535, got {text!r}")
    return int(text)


async def _serve(coord: Coordinator) -> None:
    # The receiver is open before anything starts, so an early Ctrl-C is a clean stop too.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(coord.run)
            if coord.operator_key_created:
                print(f"operator API key written to {coord.operator_key_path} (mode 0600)",
                      flush=True)
            print(f"coordinator on {coord.url} (devices join via {coord.public_url}); "
                  f"certificate sha256 {coord.fingerprint}", flush=True)
            async for signum in signals:
                print(f"stopping on {signal.Signals(signum).name}", file=sys.stderr,
                      flush=True)
                coord.stop()
                break


def _require_server() -> None:
    """One line and exit 2, not an ImportError's traceback, when the wheel was installed
    without the `coordinator` extra (a device, an operator's workstation)."""
    line = missing_extra("the coordinator needs the server extra", "coordinator", SERVER_STACK)
    if line is not None:
        raise CliError(line)


def _config(args: argparse.Namespace) -> CoordinatorConfig:
    """`serve`'s options as the server's configuration (checked by the server, not here)."""
    # start-up time: the server (hypercorn, Starlette, the store) only for serve and install
    from coordinator._server import CoordinatorConfig

    return CoordinatorConfig(
        data_dir=Path(args.data), listen=args.listen, wg_port=_port(args.wg_port),
        hub_endpoint=args.hub_endpoint, mesh_ipv4=args.mesh_ipv4, mesh_ipv6=args.mesh_ipv6,
        hub=not args.no_hub, store=args.store,
        lock_stale_after=float(parse_duration(args.lock_stale_after)),
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
        metrics_token_file=Path(args.metrics_token_file) if args.metrics_token_file else None,
        blobs=args.blobs or None,
        blobs_credentials_file=(Path(args.blobs_credentials_file)
                                if args.blobs_credentials_file else None),
        peer_urls=tuple(args.peer_url or ()))


def _run(args: argparse.Namespace) -> int:
    _require_server()
    # Loaded here, not at the top: operator commands must start without loading the server
    # (hypercorn, Starlette, the store), an optional dependency (the coordinator extra).
    from coordinator._server import Coordinator, CoordinatorConfigError

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    if not args.data:
        raise CliError("--data DIR is required (the coordinator's state directory)")
    try:
        coord = Coordinator(_config(args))
        trio.run(_serve, coord)
    except CoordinatorConfigError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"coordinator: {exc}", code=EXIT_REFUSED) from None
    except ExceptionGroup as group:  # nursery-wrapped startup failures
        first = group.exceptions[0]
        while isinstance(first, ExceptionGroup):
            first = first.exceptions[0]
        if isinstance(first, CoordinatorConfigError):
            raise CliError(str(first)) from None
        if isinstance(first, OSError):
            raise CliError(f"coordinator: {first}", code=EXIT_REFUSED) from None
        raise
    return 0


UNIT: Final = "fleetmesh-coordinator.service"
DEFAULT_DATA: Final = "/var/lib/fleetmesh"


def coordinator_unit(args: argparse.Namespace) -> str:
    """The unit text for these serve options; ExecStart is this installation's `fleetmesh`."""
    _require_server()
    # start-up time: loaded for install only, as for serve
    from coordinator._server import CoordinatorConfigError

    # the server's own check: a unit whose service would refuse to start is not written
    config = _config(args)
    try:
        config.check()
    except CoordinatorConfigError as exc:
        raise CliError(str(exc)) from None
    wg_port = config.wg_port
    listen_port = int(config.listen.rpartition(":")[2])
    argv = [str(services.console_script("fleetmesh")), "coordinator", "serve",
            "--data", args.data, "--listen", args.listen, "--wg-port", str(wg_port),
            "--mesh-ipv4", args.mesh_ipv4, "--mesh-ipv6", args.mesh_ipv6,
            "--lock-stale-after", args.lock_stale_after]
    for flag, value in (("--hub-endpoint", args.hub_endpoint), ("--store", args.store),
                        ("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key),
                        ("--metrics-token-file", args.metrics_token_file),
                        ("--blobs", args.blobs),
                        ("--blobs-credentials-file", args.blobs_credentials_file)):
        if value:
            argv += [flag, value]
    for url in args.peer_url or ():
        argv += ["--peer-url", url]
    caps: set[str] = set()
    if args.no_hub:
        argv.append("--no-hub")
        hub = "ProtectKernelTunables=yes"
    else:
        caps |= {"CAP_NET_ADMIN", "CAP_SYS_ADMIN"}
        hub = ("RuntimeDirectory=wireguard\nRuntimeDirectoryPreserve=yes\n"
               "ReadWritePaths=/proc/sys/net")
    if listen_port < 1024 or (not args.no_hub and wg_port < 1024):
        caps.add("CAP_NET_BIND_SERVICE")
    return services.unit_text("ops", UNIT, argv, args.data, "fleetmesh", caps, {"HUB": hub})


def _install(args: argparse.Namespace) -> int:
    try:
        # a --store URL may carry a password: then only root reads the unit
        install(Path(args.root), UNIT, coordinator_unit(args), 0o600 if args.store else 0o644)
    except ServiceError as exc:
        raise CliError(str(exc)) from None
    return 0


def _server_options(p: argparse.ArgumentParser) -> None:
    """What `serve` takes besides --data; `install` puts the same into the unit's ExecStart."""
    p.add_argument("--listen", default="0.0.0.0:8443", metavar="HOST:PORT",
                   help="API address (default 0.0.0.0:8443)")
    p.add_argument("--wg-port", default="51820", metavar="N",
                   help="hub WireGuard UDP port (default 51820)")
    p.add_argument("--hub-endpoint", metavar="HOST:PORT",
                   help="where devices reach the hub (and the API host); required when "
                        "--listen is a wildcard address")
    p.add_argument("--store", metavar="URL",
                   help="a PostgreSQL database (postgresql://USER[:PASSWORD]@HOST[:PORT]/"
                        "DATABASE, libpq's URL; empty or made by fleetmesh) instead of the "
                        "default SQLite file in DIR; DIR still holds the keys, certificate and "
                        "blobs (`install` then writes the unit mode 0600)")
    p.add_argument("--peer-url", action="append", metavar="URL",
                   help="another replica's public URL, https://HOST:PORT, on the same --store "
                        "database (repeat for each): devices get every replica's URL at "
                        "enrollment and fail over to them (docs/scale.md, \"Replicas\")")
    p.add_argument("--mesh-ipv4", default="10.250.0.0/16", metavar="PREFIX")
    p.add_argument("--mesh-ipv6", default="fd7a:f1ee:7000::/48", metavar="PREFIX")
    p.add_argument("--no-hub", action="store_true",
                   help="no WireGuard hub (tests, benchmarks): endpoints only from reports; "
                        "the unit then keeps no capability")
    p.add_argument("--tls-cert", metavar="FILE", help="PEM certificate (default: "
                   "self-signed, made at first start)")
    p.add_argument("--tls-key", metavar="FILE", help="PEM private key for --tls-cert")
    p.add_argument("--lock-stale-after", default="1h", metavar="DURATION",
                   help="show an app's update lock as stale when held longer (90s, 30m, "
                        "1h, 2d; default 1h); never broken automatically")
    p.add_argument("--metrics-token-file", metavar="FILE",
                   help="a file holding a scrape token (32-256 characters, e.g. `openssl "
                        "rand -hex 32`) that reads GET /metrics and nothing else; without "
                        "it /metrics takes the operator key (docs/metrics.md)")
    p.add_argument("--blobs", metavar="URL",
                   help="keep blobs in an S3-compatible bucket, s3://BUCKET[/PREFIX]?endpoint="
                        "http(s)://HOST[:PORT]&region=NAME, instead of files in DIR "
                        "(docs/scale.md)")
    p.add_argument("--blobs-credentials-file", metavar="FILE",
                   help="the bucket's credentials: lines aws_access_key_id = … and "
                        "aws_secret_access_key = … (default: AWS_ACCESS_KEY_ID and "
                        "AWS_SECRET_ACCESS_KEY from the environment)")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    coordinator = sub.add_parser("coordinator", help="run the coordinator or install its unit")
    csub = coordinator.add_subparsers(dest="coordinator_command", metavar="COMMAND",
                                      required=True)
    serve = csub.add_parser(
        "serve", help="serve the HTTPS API and the WireGuard relay hub",
        description="Serve the coordinator API (HTTPS) and its WireGuard relay hub (fmhub0, "
                    "wireguard-go) from DIR. The first start creates the database, a "
                    "self-signed certificate and the operator API key in DIR.")
    serve.add_argument("--data", metavar="DIR", help="state directory (required)")
    _server_options(serve)
    serve.set_defaults(handler=_run)

    install = services.add_install_parser(
        csub, UNIT, "fleetmesh coordinator serve", DEFAULT_DATA,
        "state directory: keys, certificate, blobs, the SQLite database")
    _server_options(install)
    install.set_defaults(handler=_install)
