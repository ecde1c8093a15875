"""Real wireguard-go in real network namespaces: tunnels, reconcile, routes, wg-quick export.

Every namespace and daemon comes from the make_netns/make_wg fixtures (conftest.py), which
remove/stop them by name/PID even when a test fails.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address, ip_interface, ip_network
from pathlib import Path

import pytest

from vpn import (
    OWN_MOUNT_NAMESPACE,
    DesiredDevice,
    DesiredPeer,
    DeviceConfig,
    DeviceStatus,
    Endpoint,
    QuickPeer,
    UapiBackend,
    WireGuardGo,
    WireGuardGoError,
    add_route,
    configure_link,
    diff,
    export_wg_quick,
    generate_keypair,
    generate_preshared_key,
    mount_namespace_args,
    netns_path,
    reconcile,
    remove_route,
    routes,
)

pytestmark = pytest.mark.lab

MakeNetns = Callable[[str], str]
MakeWg = Callable[..., WireGuardGo]


class RecordingBackend:
    """Wraps a real backend to prove that an in-sync reconcile sends nothing."""

    def __init__(self, inner: UapiBackend) -> None:
        self.inner = inner
        self.sent: list[DeviceConfig] = []

    def get(self) -> DeviceStatus:
        return self.inner.get()

    def set(self, config: DeviceConfig) -> None:
        self.sent.append(config)
        self.inner.set(config)


def run_in(ns: str, *argv: str, input: str | None = None, mountns: str | None = None) -> str:
    cmd = ["nsenter", f"--net={netns_path(ns)}"]
    if mountns:
        cmd += mount_namespace_args(mountns)
    done = subprocess.run(
        [*cmd, *argv], input=input, capture_output=True, text=True, timeout=15, check=False
    )
    if done.returncode != 0:
        raise AssertionError(f"{argv} failed ({done.returncode}): {done.stderr or done.stdout}")
    return done.stdout


# iputils ping where installed, else busybox's (busybox-static is a setup dependency anyway).
PING = ["ping"] if shutil.which("ping") else ["busybox", "ping"]


def ping(ns: str, addr: str) -> None:
    # The first packet waits for the handshake; a couple of bounded tries absorb a slow start.
    last: AssertionError | None = None
    for _ in range(3):
        try:
            run_in(ns, *PING, "-c1", "-W2", addr)
            return
        except AssertionError as exc:
            last = exc
    assert last is not None
    raise last


def veth_between(a: str, b: str) -> None:
    """A veth pair with 198.51.100.1 in `a` and .2 in `b` (addresses only inside the pair)."""
    from pyroute2 import IPRoute  # type: ignore[import-untyped]

    with IPRoute(netns=netns_path(a), flags=0) as ipr:
        # Created inside `a` and then half moved: deleting the namespaces deletes the pair.
        ipr.link("add", ifname="ul0", kind="veth", peer="ul1")
        ipr.link("set", index=ipr.link_lookup(ifname="ul1")[0], net_ns_fd=netns_path(b))
        idx = ipr.link_lookup(ifname="ul0")[0]
        ipr.addr("add", index=idx, address="198.51.100.1", prefixlen=24)
        ipr.link("set", index=idx, state="up")
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
    with IPRoute(netns=netns_path(b), flags=0) as ipr:
        idx = ipr.link_lookup(ifname="ul1")[0]
        ipr.addr("add", index=idx, address="198.51.100.2", prefixlen=24)
        ipr.link("set", index=idx, state="up")
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def test_tunnel_v4_v6_and_idempotent_reconcile(make_netns: MakeNetns, make_wg: MakeWg) -> None:
    a, b = make_netns("a"), make_netns("b")
    veth_between(a, b)
    wga, wgb = make_wg("wg0", a), make_wg("wg0", b)
    ka, kb = generate_keypair(), generate_keypair()
    psk = generate_preshared_key()

    configure_link("wg0", a, [ip_interface("10.200.0.1/24"), ip_interface("fd00:200::1/64")])
    configure_link("wg0", b, [ip_interface("10.200.0.2/24"), ip_interface("fd00:200::2/64")])
    # Idempotent: same arguments again change nothing and raise nothing.
    configure_link("wg0", a, [ip_interface("10.200.0.1/24"), ip_interface("fd00:200::1/64")])

    want_a = DesiredDevice(
        ka.private,
        listen_port=51820,
        peers=(
            DesiredPeer(
                kb.public,
                frozenset({ip_network("10.200.0.2/32"), ip_network("fd00:200::2/128")}),
                Endpoint(IPv4Address("198.51.100.2"), 51820),
                preshared_key=psk,
            ),
        ),
    )
    want_b = DesiredDevice(
        kb.private,
        listen_port=51820,
        peers=(
            DesiredPeer(
                ka.public,
                frozenset({ip_network("10.200.0.1/32"), ip_network("fd00:200::1/128")}),
                None,  # learn a's endpoint from its handshake
                preshared_key=psk,
            ),
        ),
    )
    assert reconcile(want_a, wga.backend()) != []
    assert reconcile(want_b, wgb.backend()) != []

    ping(a, "10.200.0.2")
    ping(a, "fd00:200::2")
    ping(b, "10.200.0.1")  # b found a's endpoint by roaming; "don't care" must keep it

    before_a = wga.client().get().peers[0]
    before_b = wgb.client().get().peers[0]
    assert before_a.last_handshake is not None and before_a.rx_bytes > 0
    assert before_b.endpoint == Endpoint(IPv4Address("198.51.100.1"), 51820)

    rec_a, rec_b = RecordingBackend(wga.backend()), RecordingBackend(wgb.backend())
    assert reconcile(want_a, rec_a) == []
    assert reconcile(want_b, rec_b) == []
    assert rec_a.sent == [] and rec_b.sent == []

    ping(a, "10.200.0.2")
    after_a = wga.client().get().peers[0]
    after_b = wgb.client().get().peers[0]
    # Same session: no new handshake, counters kept growing, roamed endpoint untouched.
    assert after_a.last_handshake == before_a.last_handshake
    assert after_a.rx_bytes > before_a.rx_bytes and after_a.tx_bytes > before_a.tx_bytes
    assert after_b.endpoint == before_b.endpoint


def test_diff_and_apply_against_real_daemon(make_netns: MakeNetns, make_wg: MakeWg) -> None:
    ns = make_netns("r")
    wg = make_wg("wgr0", ns)
    backend = wg.backend()
    me = generate_keypair()
    p1, p2, p3 = (generate_keypair().public for _ in range(3))
    v6_ep = Endpoint(IPv6Address("2001:db8::7"), 4500)
    first = DesiredDevice(
        me.private,
        listen_port=51830,
        fwmark=9,
        peers=(
            DesiredPeer(p1, frozenset({ip_network("10.1.0.0/24")}), v6_ep, 25),
            DesiredPeer(p2, frozenset({ip_network("10.2.0.0/24"), ip_network("fd02::/64")})),
            DesiredPeer(p3, frozenset({ip_network("10.3.0.0/24")})),
        ),
    )
    assert reconcile(first, backend) != []
    assert diff(first, backend.get()) == []

    second = DesiredDevice(
        me.private,
        listen_port=51830,
        fwmark=9,
        peers=(
            DesiredPeer(p1, frozenset({ip_network("10.1.0.0/24")}), v6_ep, 25),
            # p2 gains p3's old range and loses its IPv6 range; p3 is gone.
            DesiredPeer(p2, frozenset({ip_network("10.2.0.0/24"), ip_network("10.3.0.0/24")})),
        ),
    )
    changes = reconcile(second, backend)
    assert len(changes) == 2  # remove p3, update p2's allowed IPs
    status = backend.get()
    assert {p.public_key for p in status.peers} == {p1, p2}
    assert set(status.peer(p2).allowed_ips) == {  # type: ignore[union-attr]
        ip_network("10.2.0.0/24"),
        ip_network("10.3.0.0/24"),
    }
    assert status.peer(p1).endpoint == v6_ep  # type: ignore[union-attr]
    assert status.peer(p1).persistent_keepalive == 25  # type: ignore[union-attr]
    assert (status.listen_port, status.fwmark, status.public_key) == (51830, 9, me.public)
    assert reconcile(second, backend) == []


def test_routes_and_link_config(make_netns: MakeNetns, make_wg: MakeWg) -> None:
    ns = make_netns("l")
    make_wg("wgl0", ns)
    configure_link("wgl0", ns, [ip_interface("10.210.0.1/32"), ip_interface("fd00:210::1/128")])
    out = run_in(ns, "ip", "addr", "show", "dev", "wgl0")
    assert "10.210.0.1/32" in out and "fd00:210::1/128" in out and "tentative" not in out
    assert "mtu 1420" in out and "UP" in out
    # Reconciled, not appended: a new list replaces the old addresses.
    configure_link("wgl0", ns, [ip_interface("10.210.0.9/32")], mtu=1380)
    out = run_in(ns, "ip", "addr", "show", "dev", "wgl0")
    assert "10.210.0.9/32" in out and "10.210.0.1/" not in out and "fd00:210::1" not in out
    assert "mtu 1380" in out

    v4, v6 = ip_network("10.211.0.0/24"), ip_network("fd00:211::/64")
    add_route(v4, "wgl0", ns)
    add_route(v6, "wgl0", ns)
    add_route(v4, "wgl0", ns)  # idempotent
    assert {v4, v6} <= set(routes("wgl0", ns))
    assert remove_route(v4, "wgl0", ns) is True
    assert remove_route(v4, "wgl0", ns) is False
    assert remove_route(v6, "wgl0", ns) is True
    assert not {v4, v6} & set(routes("wgl0", ns))

    with pytest.raises(FileNotFoundError):
        configure_link("nosuch0", ns, [])
    with pytest.raises(FileNotFoundError):
        add_route(v4, "wgl0", "fm-no-such-namespace")
    with pytest.raises(ValueError):
        configure_link("wgl0", ns, [], mtu=10)


def test_bad_input_fails_fast(make_netns: MakeNetns) -> None:
    ns = make_netns("e")
    with pytest.raises(ValueError):
        WireGuardGo().start("bad name; rm -rf /", ns)
    with pytest.raises(ValueError):
        WireGuardGo().start("x" * 16, ns)
    with pytest.raises(FileNotFoundError):
        WireGuardGo().start("wg0", "fm-no-such-namespace")
    with pytest.raises(FileNotFoundError):
        WireGuardGo().start("wg0", ns, mountns="/proc/nonexistent/ns/mnt")
    t0 = time.monotonic()
    with pytest.raises(WireGuardGoError, match="exited"):
        WireGuardGo(executable="/bin/false").start("wg0", ns)
    assert time.monotonic() - t0 < 5


def test_own_mount_namespace_runs_the_daemon_without_one(make_netns: MakeNetns) -> None:
    """In a container (no CAP_SYS_ADMIN, /run private already) no mount namespace is made or
    entered: wireguard-go runs as is, in the given network namespace if any."""
    ns = make_netns("o")
    wg = WireGuardGo()
    assert wg.command("wg0", None, OWN_MOUNT_NAMESPACE) == ["wireguard-go", "-f", "wg0"]
    assert wg.command("wg0", ns, OWN_MOUNT_NAMESPACE) == [
        "nsenter", f"--net={netns_path(ns)}", "wireguard-go", "-f", "wg0"]
    assert "unshare" in wg.command("wg0", None, None)
    with pytest.raises(ValueError):
        wg.command("bad name", None, OWN_MOUNT_NAMESPACE)


def test_mountns_start_and_stop(make_netns: MakeNetns, make_wg: MakeWg) -> None:
    """A second daemon joins the first one's mount namespace (as with the lab's node mountns)."""
    n1, n2 = make_netns("m1"), make_netns("m2")
    first = make_wg("wgm0", n1)
    second = make_wg("wgm1", n2, first.mount_namespace)
    assert second.socket_path.endswith("/run/wireguard/wgm1.sock")
    assert second.client().get().peers == ()
    pid = second.pid
    second.stop()
    assert not second.running
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    second.stop()  # idempotent
    assert first.client().get().peers == ()


def test_wg_quick_export_accepted_by_stock_tools(
    make_netns: MakeNetns, make_wg: MakeWg, tmp_path: Path
) -> None:
    ns = make_netns("q")
    wg = make_wg("wgq0", ns)
    me, p1, p2 = generate_keypair(), generate_keypair(), generate_keypair()
    psk = generate_preshared_key()
    text = export_wg_quick(
        me.private,
        [ip_interface("10.220.0.5/24"), ip_interface("fd00:220::5/64")],
        [
            QuickPeer(
                p1.public,
                (ip_network("10.220.0.0/24"), ip_network("fd00:220::/64")),
                Endpoint(IPv4Address("203.0.113.5"), 51820),
                25,
                psk,
            ),
            QuickPeer(p2.public, (), Endpoint(IPv6Address("2001:db8::2"), 51821)),
        ],
        listen_port=51840,
        dns=[IPv4Address("10.220.0.1")],
        mtu=1380,
    )
    conf = tmp_path / "wgq0.conf"
    conf.write_text(text)
    conf.chmod(0o600)
    stripped = subprocess.run(
        ["wg-quick", "strip", str(conf)], capture_output=True, text=True, timeout=15, check=True
    ).stdout
    assert "Address" not in stripped and "PrivateKey" in stripped
    run_in(ns, "wg", "setconf", "wgq0", "/dev/stdin", input=stripped, mountns=wg.mount_namespace)
    shown = run_in(ns, "wg", "show", "wgq0", mountns=wg.mount_namespace)
    assert f"public key: {me.public}" in shown
    assert "listening port: 51840" in shown
    assert f"peer: {p1.public}" in shown and f"peer: {p2.public}" in shown
    assert "endpoint: 203.0.113.5:51820" in shown and "endpoint: [2001:db8::2]:51821" in shown
    assert "allowed ips: 10.220.0.0/24, fd00:220::/64" in shown
    assert "persistent keepalive: every 25 seconds" in shown
    assert "preshared key: (hidden)" in shown
    status = wg.client().get()
    assert status.peer(p1.public).preshared_key == psk  # type: ignore[union-attr]
