"""`fleetmesh-agent join` and `fleetmesh-agent run`.

Exit codes (mesh.clikit's table): 0 done, 1 coordinator refused (bad token, name taken, malformed
answer), 2 bad arguments or data directory (not enrolled, already enrolled, corrupt file),
3 coordinator unreachable, 4 certificate not the one the token names, 6 WireGuard could not be
started.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import signal
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import trio

from mesh.clikit import (
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_UNTRUSTED,
    EXIT_USAGE,
    EXIT_WIREGUARD,
    CliError,
    package_version,
)
from mesh.control import (
    ControlError,
    Enrollment,
    TokenParts,
    check_endpoint,
    check_name,
    coordinator_urls,
)
from mesh.node import ServePolicy
from mesh.release import SignedRoot
from mesh.tlspin import PinError, split_url
from vpn import WireGuardGoError, generate_keypair, public_key_from_private
from vpn._link import check_ifname

from ._agent import Agent, BackendFactory, Intervals, stderr_log
from ._datadir import DataDir, DataDirError, Identity
from ._device import DEFAULT_IFNAME, DEFAULT_WG_PORT, WireGuardGoDevice, lan_endpoints
from ._engine import DockerEngine, EngineError
from ._gossip import GOSSIP_PORT
from ._handover import Records, commit, hand_over, resolve_at_start, self_view
from ._journal import JournalError
from ._link import ClientFactory
from ._paths import LAZY_AFTER
from ._release_sync import ApplySettings, GossipSettings, host_platform

MAX_CONFIG_BYTES: Final = 64 * 1024
T = TypeVar("T")

EnrollFn = Callable[..., Awaitable[tuple[Enrollment, bytes, SignedRoot | None]]]


# --------------------------------------------------------------------------- seams for tests
# The real coordinator SDK and wireguard-go are looked up through these, so tests can replace
# them with fakes without a coordinator or root.


def sdk_enroll() -> EnrollFn:
    try:
        # start-up time: the SDK brings httpx (~170 ms of imports), for join and run only
        from ops.client import enroll_with_root
    except ImportError as exc:  # pragma: no cover - the SDK ships with fleetmesh
        raise CliError(f"the coordinator SDK is not available: {exc}") from exc
    return enroll_with_root


def sdk_client_factory() -> ClientFactory:
    try:
        # start-up time: the SDK brings httpx (~170 ms of imports), for join and run only
        from ops.client import DeviceClient
    except ImportError as exc:  # pragma: no cover
        raise CliError(f"the coordinator SDK is not available: {exc}") from exc
    return DeviceClient


def real_backend_factory(ifname: str, mountns: str | None = None) -> BackendFactory:
    return WireGuardGoDevice(ifname, mountns=mountns)


# --------------------------------------------------------------------------- helpers


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"port out of range 1..65535: {value}")
    return value


# ASCII digits with an optional fraction: no sign, exponent, "inf", "nan" or "_" separators
_RATIO_RE: Final = re.compile(r"[0-9]{1,9}(\.[0-9]{1,9})?")


def _seed_ratio(text: str) -> float:
    if _RATIO_RE.fullmatch(text) is None:
        raise argparse.ArgumentTypeError(
            f"not a seed ratio (a number >= 0 in ASCII digits, e.g. 0.5): {text!r}")
    return float(text)


def _seconds(text: str) -> float:
    if _RATIO_RE.fullmatch(text) is None or float(text) > 86400:
        raise argparse.ArgumentTypeError(
            f"not a number of seconds from 0 to 86400 in ASCII digits: {text!r}")
    return float(text)


_BUDGET_RE: Final = re.compile(r"([0-9]{1,16}(?:\.[0-9]{1,9})?)(B|KB|MB|GB)/(day|month)",
                                re.IGNORECASE)
_BUDGET_UNITS: Final = {"B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3}


def _wan_budget(text: str) -> tuple[int, str]:
    """`50MB/month` -> (50000000, "month"): decimal units, a UTC day or month."""
    m = _BUDGET_RE.fullmatch(text.strip())
    n = 0 if m is None else int(float(m.group(1)) * _BUDGET_UNITS[m.group(2).upper()])
    if m is None or not 1 <= n < 2**53:
        raise argparse.ArgumentTypeError(
            f"not a WAN budget (bytes per day or month, e.g. 50MB/month): {text!r}")
    return n, m.group(3).lower()


def _endpoint(text: str) -> str:
    try:
        return check_endpoint(text, "--lan-endpoint")
    except ControlError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _ifname(text: str) -> str:
    try:
        return check_ifname(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _read_device_json(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise CliError(f"{path}: not a device.json (not JSON)") from None
    if not isinstance(obj, dict):
        raise CliError(f"{path}: not a device.json (not an object)")
    for key in ("url", "token"):
        if not isinstance(obj.get(key), str) or not obj[key]:
            raise CliError(f"{path}: not a device.json ({key} missing)")
    for key in ("name", "fleet"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            raise CliError(f"{path}: {key} must be a string")
    urls = obj.get("urls", [])
    if not isinstance(urls, list) or not all(isinstance(u, str) and u for u in urls):
        raise CliError(f"{path}: urls must be a list of URLs")
    return obj


def join_urls(text: str) -> tuple[str, ...]:
    """`join`'s URL argument: one coordinator URL or several replicas' separated by commas
    (ControlError, one line, for a bad one)."""
    urls = tuple(dict.fromkeys(u.strip().rstrip("/") for u in text.split(",") if u.strip()))
    if not urls:
        raise ControlError("URL: no coordinator URL given")
    for u in urls:
        try:
            split_url(u)
        except PinError as exc:
            raise ControlError(f"URL: {exc}") from None
    return coordinator_urls(list(urls), "URL")


def _classify(exc: BaseException) -> CliError:
    """The SDK's failures as one line and an exit code."""
    name = type(exc).__name__
    text = " ".join(str(exc).split()) or name
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        return CliError(f"coordinator refused the enrollment: {text}", EXIT_REFUSED)
    if name in ("CoordinatorUnreachable", "TooSlowError") or isinstance(exc, OSError):
        return CliError(text, EXIT_UNREACHABLE)
    if isinstance(exc, ControlError):
        return CliError(text, EXIT_USAGE)
    if isinstance(exc, PinError) or name == "ReleaseKeyMismatch":
        return CliError(text, EXIT_UNTRUSTED)
    return CliError(text, EXIT_REFUSED)  # ProtocolError


def _data_error(exc: DataDirError, data: DataDir) -> CliError:
    if not data.enrollment_path.exists():
        return CliError(f"{data.path} is not enrolled ({data.enrollment_path.name} missing): "
                        "run `fleetmesh-agent join` first")
    return CliError(str(exc))


# --------------------------------------------------------------------------- join

ENROLL_TIMEOUT: Final = 60.0  # the SDK's own timeouts apply per request; this bounds the whole


def _join(args: argparse.Namespace) -> int:
    if args.config is not None:
        if args.url is not None or args.token is not None:
            raise CliError("give either URL --token T or --config device.json, not both")
        conf = _read_device_json(args.config)
        url, token = ",".join((conf["url"], *conf.get("urls", ()))), conf["token"]
        name = args.name or conf.get("name")
        fleet = conf.get("fleet")
    else:
        if args.url is None or args.token is None:
            raise CliError("give URL and --token T, or --config device.json")
        url, token, name, fleet = args.url, args.token, args.name, None
    try:
        token_parts = TokenParts.parse(token)
        if name is not None:
            check_name(name, "name")
        urls = join_urls(url)
    except ControlError as exc:
        raise CliError(str(exc)) from None

    data = DataDir(args.data)
    if data.is_enrolled():
        try:
            who = data.read_identity().enrollment
            what = f"as {who.name} in fleet {who.fleet}"
        except DataDirError:
            what = f"({data.enrollment_path.name} exists)"
        raise CliError(f"{data.path} is already enrolled {what}; use another --data "
                       "directory or remove it to join again")
    try:
        # A key left by an earlier join that failed is reused: it never left the device.
        if data.has_key():
            private = data.read_key()
        else:
            private = generate_keypair().private
            data.write_key(private)
    except DataDirError as exc:
        raise CliError(str(exc)) from None
    public = public_key_from_private(private)

    explicit = tuple(args.lan_endpoint) if args.lan_endpoint else None
    lan = explicit if explicit is not None else _discover_lan(args.wg_port, ())
    enroll = sdk_enroll()

    used = urls[0]

    async def go() -> tuple[Enrollment, bytes, SignedRoot | None]:
        nonlocal used
        with trio.fail_after(ENROLL_TIMEOUT):
            for i, used in enumerate(urls):  # replicas: the next one if this does not connect
                try:
                    # The private key stays here: the SDK uses it only to answer the
                    # coordinator's challenge when this device is enrolled already (its
                    # enrollment.json was lost).
                    return await enroll(used, token, public, name, lan, package_version(),
                                        private_key=private, platform=host_platform())
                except Exception as exc:
                    if type(exc).__name__ != "CoordinatorUnreachable" or i == len(urls) - 1:
                        raise
        raise AssertionError("unreachable: the last URL's failure raised")

    try:
        enrollment, cert_der, root = trio.run(go)
    except CliError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the SDK raises becomes one line
        raise _classify(exc) from None
    if root is not None:
        stderr_log(f"note: pinned release key {(enrollment.release_key or '')[:16]}… named by "
                   "the fleet's root metadata, verified from the token's root")
    elif token_parts.release_key_fp is None and enrollment.release_key is not None:
        stderr_log("note: the token carries no release key fingerprint: pinned the release key "
                   f"the coordinator gave, {enrollment.release_key[:16]}…, on first use")
    if fleet is not None and enrollment.fleet != fleet:
        stderr_log(f"note: device.json names fleet {fleet}, the coordinator put this device "
                   f"in {enrollment.fleet}")
    try:
        # The root first: a device enrolled without the root its token named could not follow
        # the fleet's key rotations; without enrollment.json the join simply runs again.
        if root is not None:
            data.write_root(root)
        others = tuple(u for u in dict.fromkeys((*urls, *enrollment.urls)) if u != used)
        data.write_identity(Identity(used, enrollment, cert_der, args.wg_port, explicit,
                                     others))
    except DataDirError as exc:
        raise CliError(str(exc)) from None
    print(f"enrolled as {enrollment.name} in fleet {enrollment.fleet}: mesh "
          f"{enrollment.mesh_ipv4} {enrollment.mesh_ipv6}; "
          f"start with: fleetmesh-agent run --data {args.data}")
    return 0


def _discover_lan(port: int, exclude_networks: tuple[str, ...],
                  ifname: str = DEFAULT_IFNAME) -> tuple[str, ...]:
    try:
        return lan_endpoints(port, (ifname,), exclude_networks)
    except OSError as exc:
        stderr_log(f"cannot list LAN addresses ({exc}); enrolling without LAN endpoints")
        return ()


def add_join_parser(sub: Any) -> None:
    p = sub.add_parser(
        "join", help="enroll this device with a coordinator (once per data directory)",
        description="Enroll with URL --token T, or with --config device.json from "
                    "`fleetmesh devices provision`. The WireGuard private key is made here and "
                    "never leaves the device.")
    p.add_argument("url", nargs="?", metavar="URL",
                   help="coordinator URL, https://host:port; replicas: every one's URL, "
                        "separated by commas (the first that answers enrolls)")
    p.add_argument("--token", metavar="T", help="enrollment token fm1.<fingerprint>.<secret>")
    p.add_argument("--config", metavar="DEVICE_JSON",
                   help="device.json with url, token, name and fleet")
    p.add_argument("--data", required=True, metavar="DIR", help="the agent's data directory")
    p.add_argument("--name", help="device name (default: from the token or device.json)")
    p.add_argument("--lan-endpoint", action="append", type=_endpoint, metavar="HOST:PORT",
                   help="LAN endpoint candidate (repeatable; default: this device's IPv4 "
                        "addresses with --wg-port)")
    p.add_argument("--wg-port", type=_port, default=DEFAULT_WG_PORT, metavar="N",
                   help=f"WireGuard listen port (default {DEFAULT_WG_PORT}); `run` uses it too")
    p.set_defaults(handler=_join)


# --------------------------------------------------------------------------- run


async def run_agent(agent: Agent) -> None:
    """Run until SIGINT or SIGTERM, or until the agent ends itself (a hand-over); the
    backend's context (wireguard-go) is left cleanly."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            async def run() -> None:
                await agent.run()
                nursery.cancel_scope.cancel()

            nursery.start_soon(run)

            async def stop_on_signal() -> None:
                async for signum in signals:
                    agent.log(f"stopping ({signal.Signals(signum).name})")
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)


def _run(args: argparse.Namespace) -> int:
    data = DataDir(args.data)
    try:
        identity = data.read_identity()
        data.read_key()
    except DataDirError as exc:
        raise _data_error(exc, data) from None
    port = args.wg_port if args.wg_port is not None else identity.wg_port
    enrollment = identity.enrollment
    lan: Any
    if args.lan_endpoint:
        lan = tuple(args.lan_endpoint)
    elif identity.lan_endpoints is not None:
        lan = identity.lan_endpoints
    else:
        exclude = (enrollment.mesh_prefix_v4,)

        def lan() -> tuple[str, ...]:
            return lan_endpoints(port, (args.interface,), exclude)

    gossip: GossipSettings | None = None
    if not args.no_gossip:
        underlay = args.underlay
        if underlay is None and args.lan_endpoint:
            underlay = args.lan_endpoint[0].rsplit(":", 1)[0]  # the LAN address we report
        gossip = GossipSettings(port=args.gossip_port, peer_sharing=not args.no_peer_sharing,
                                serve=ServePolicy(args.seed_ratio, args.unmetered),
                                underlay=underlay, profile=args.gossip_profile,
                                apply=None if args.no_apply else
                                ApplySettings(docker_host=args.docker_host))
    # In a container of the engine that runs the apps, the agent can be replaced by an agent
    # release (agent/_selfupdate.py): the hand-overs run between two runs of the agent.
    engine = _engine(args) if gossip is not None and gossip.apply is not None else None
    while True:
        start = _sigterm_ends(_resolve_handover, engine, data) if engine is not None else "run"
        if start in ("exit", None):
            return 0
        candidate = None if start != "candidate" or engine is None else \
            functools.partial(_commit, engine, data)
        try:
            backend = real_backend_factory(args.interface, args.wg_mount_namespace)
            lan_profile = args.gossip_profile == "lan"
            lazy = args.lazy_after if args.lazy_after is not None else \
                (0.0 if lan_profile else LAZY_AFTER)
            agent = Agent(data, backend, sdk_client_factory(),
                          wg_port=port, lan_endpoints=lan, gossip=gossip,
                          intervals=Intervals(lazy_after=lazy, tune_keepalive=not lan_profile),
                          wan_budget=args.wan_budget, candidate=candidate)
        except DataDirError as exc:
            raise _data_error(exc, data) from None
        agent.log(f"{enrollment.name} in fleet {enrollment.fleet}, mesh "
                  f"{enrollment.mesh_ipv4}, coordinator {identity.url}"
                  + (" (the new agent of a hand-over)" if candidate is not None else ""))
        try:
            trio.run(run_agent, agent)
        except Exception as exc:  # noqa: BLE001 - unwrapped below; anything else is a bug
            leaf = _leaf(exc)
            if isinstance(leaf, WireGuardGoError):
                raise CliError(f"cannot start WireGuard: {leaf}", EXIT_WIREGUARD) from None
            if isinstance(leaf, (OSError, ValueError)):
                # configure_link (not root, interface taken) and similar environment failures
                raise CliError(f"cannot set up {args.interface}: {leaf}",
                               EXIT_WIREGUARD) from None
            raise
        if agent.handover is None or engine is None:
            return 0
        me = self_view(engine).container
        if me is None:  # pragma: no cover - the applier found it a moment ago
            return 0
        if _sigterm_ends(hand_over, engine, data.path, me, enrollment.name,
                         *agent.handover, agent.log) is not False:
            return 0  # the new agent took over (True), or SIGTERM (None)


class _Stopped(Exception):
    """SIGTERM between two runs of the agent (during a hand-over)."""


def _sigterm_ends(fn: Callable[..., T], *args: Any) -> T | None:
    """`fn(*args)`, or None if SIGTERM came first: outside trio.run (which has its own
    receiver) the agent, PID 1 of its container, would ignore it and `docker stop` (the new
    agent's, ending us) would wait its whole timeout."""
    def stop(signum: int, frame: object) -> None:
        raise _Stopped

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return fn(*args)
    except _Stopped:
        stderr_log("stopping (SIGTERM)")
        return None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _engine(args: argparse.Namespace) -> DockerEngine | None:
    try:
        return DockerEngine(args.docker_host, timeout=60)
    except EngineError:
        return None  # the applier says why, and retries


def _resolve_handover(engine: DockerEngine, data: DataDir) -> str:
    try:
        return resolve_at_start(engine, data.path, stderr_log)
    except (EngineError, OSError, JournalError) as exc:
        stderr_log(f"hand-over record: {exc}; starting as usual")
        return "run"


def _commit(engine: DockerEngine, data: DataDir) -> bool:
    me = self_view(engine).container
    return me is not None and commit(engine, Records(data.path), me, stderr_log)


def _leaf(exc: BaseException) -> BaseException:
    """trio wraps a task's exception in ExceptionGroups; a single failure is the real one."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def add_run_parser(sub: Any) -> None:
    p = sub.add_parser("run", help="run the agent: WireGuard up, peer map, paths, reports",
                       description="Bring up wireguard-go on --interface in this network "
                                   "namespace and keep it converged on the peer map until "
                                   "SIGINT or SIGTERM.")
    p.add_argument("--data", required=True, metavar="DIR", help="the agent's data directory")
    p.add_argument("--wg-port", type=_port, default=None, metavar="N",
                   help="WireGuard listen port (default: the one given to join, else "
                        f"{DEFAULT_WG_PORT})")
    p.add_argument("--interface", type=_ifname, default=DEFAULT_IFNAME, metavar="IF",
                   help=f"WireGuard interface name (default {DEFAULT_IFNAME})")
    p.add_argument("--lan-endpoint", action="append", type=_endpoint, metavar="HOST:PORT",
                   help="LAN endpoint candidate to report (repeatable; default: as at join, "
                        "else this device's IPv4 addresses)")
    p.add_argument("--wg-mount-namespace", metavar="PATH", default=None,
                   help="run wireguard-go in this mount namespace (e.g. /proc/PID/ns/mnt, whose "
                        "/run/wireguard is private) instead of a new private one, so that `wg` "
                        "run there sees the interface; `self`: the agent's own, as in a container "
                        "whose /run is private already)")
    p.add_argument("--no-gossip", action="store_true",
                   help="no mesh node: no membership gossip, manifest spread or blob exchange")
    p.add_argument("--gossip-port", type=_port, default=GOSSIP_PORT, metavar="N",
                   help=f"TCP port of the mesh node on the mesh address (default {GOSSIP_PORT}, "
                        "memberlist's)")
    p.add_argument("--gossip-profile", choices=("metered", "lan"), default="metered",
                   help="membership pace: metered (default; memberlist's WAN probe timings, "
                        "push-pull every 120 s, gossip with LAN neighbours only while the "
                        "coordinator answers, lazy direct paths) or lan (memberlist's LAN "
                        "defaults with the whole fleet, every path kept alive: faster to notice "
                        "a dead device, ~5x the idle traffic)")
    p.add_argument("--lazy-after", type=_seconds, default=None, metavar="SECONDS",
                   help=f"a direct path to a peer behind another NAT that carries nothing but "
                        f"keepalives this long stops its keepalives until traffic wakes it "
                        f"(default {LAZY_AFTER:g} with the metered profile, 0 = never with lan)")
    p.add_argument("--no-apply", action="store_true",
                   help="fetch releases but do not run them on Docker (no engine needed)")
    p.add_argument("--docker-host", metavar="URL", default=None,
                   help="the device's Docker engine, e.g. unix:///run/docker.sock (default: "
                        "DOCKER_HOST, else the default socket)")
    p.add_argument("--no-peer-sharing", action="store_true",
                   help="fetch every blob from the coordinator (the baseline for comparison)")
    p.add_argument("--seed-ratio", type=_seed_ratio, default=0.0, metavar="R",
                   help="serve devices on other LANs at most R x the bytes held of each release "
                        "(default 0: a metered uplink serves no other LAN and announces nothing "
                        "to it, except while the coordinator is unreachable)")
    p.add_argument("--unmetered", action="store_true",
                   help="serve devices on other LANs without bound (the uplink is not metered)")
    p.add_argument("--underlay", metavar="IF_OR_IPV4", default=None,
                   help="LAN interface (or its IPv4 address) for LAN discovery (mDNS); default: "
                        "the address of the first --lan-endpoint, else no LAN discovery")
    p.add_argument("--wan-budget", type=_wan_budget, default=None, metavar="SIZE/PERIOD",
                   help="WAN bytes allowed per UTC day or month by the device's own account, "
                        "e.g. 50MB/month (decimal units B, KB, MB, GB): past it, app logs are "
                        "not shipped (but the tail of an app that fails) and reports say so")
    p.set_defaults(handler=_run)


__all__ = ["add_join_parser", "add_run_parser", "run_agent"]
