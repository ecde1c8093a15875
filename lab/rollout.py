"""WAN bytes of a release rollout on a lab fleet, per LAN, read from the routers' WAN interface
counters: the bytes each LAN's router received during the rollout beyond what the LAN receives
when idle over the same time (keepalives, gossip, peer maps), measured just before.

`rollout` publishes lab/release.py's synthetic release and waits for the blobs; `rollout_image`
publishes a real Docker image with the operator's `fleetmesh release create` and waits until
every device runs it, accounting WAN bytes in and out, the time against the fluid bound (B over
the uplink) and the devices' progress reports at the coordinator (issue 12).

Used by the rollout lab tests and by `scripts/bench rollout`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Final

from ops.client import OperatorClient

from ._host import LabError
from .fleet import FLEET, access, blobs_held, publish_synthetic
from .network import LabNetwork, Router
from .topology import Topology, parse_topology

IDLE_SECONDS: Final = 20.0
ROLLOUT_TIMEOUT: Final = 300.0


@dataclass(frozen=True, slots=True)
class Rollout:
    release_bytes: int  # B: the blob bytes every device needs
    blobs: tuple[str, ...]  # the release's blob ids (hex)
    seconds: float
    idle_rx_per_s: dict[str, float]  # LAN -> WAN bytes/s received with no release in flight
    rollout_rx: dict[str, int]  # LAN -> WAN bytes received during the rollout, idle removed
    devices: int

    def ratio(self, lan: str) -> float:
        return self.rollout_rx[lan] / self.release_bytes


def outer_routers(lab: LabNetwork) -> dict[str, Router]:
    """Each LAN's router on the lab's WAN (the carrier NAT for nat=double)."""
    out: dict[str, Router] = {}
    for r in lab.routers:
        if r.lan and ((r.tier == "carrier") or r.lan not in out):
            out[r.lan] = r
    return out


def rx_by_lan(lab: LabNetwork, routers: dict[str, Router]) -> dict[str, int]:
    return {lan: lab.wan_counters(r)[0] for lan, r in routers.items()}


def measure_idle(lab: LabNetwork, seconds: float = IDLE_SECONDS) -> dict[str, float]:
    routers = outer_routers(lab)
    before, t0 = rx_by_lan(lab, routers), time.monotonic()
    time.sleep(seconds)
    after, t1 = rx_by_lan(lab, routers), time.monotonic()
    return {lan: (after[lan] - before[lan]) / (t1 - t0) for lan in routers}


def rollout(lab: LabNetwork, version: int, size: int, seed: int = 1,
            idle_seconds: float = IDLE_SECONDS, timeout: float = ROLLOUT_TIMEOUT,
            devices: list[str] | None = None) -> Rollout:
    """Measure idle, publish a synthetic release, wait until every device (or `devices`) holds
    all its blobs, and account the WAN bytes per LAN."""
    names = devices if devices is not None else [d.name for d in lab.devices]
    routers = outer_routers(lab)
    idle = measure_idle(lab, idle_seconds)
    before, t0 = rx_by_lan(lab, routers), time.monotonic()
    release = publish_synthetic(lab, version, size, seed)
    wanted = set(release["blobs"])
    deadline = t0 + timeout
    while True:
        missing = [n for n in names if not wanted <= blobs_held(n)]
        if not missing:
            break
        if time.monotonic() > deadline:
            raise LabError(f"rollout of v{version} incomplete after {timeout:.0f} s on: "
                           f"{', '.join(missing)}")
        time.sleep(0.25)
    after, t1 = rx_by_lan(lab, routers), time.monotonic()
    took = t1 - t0
    per_lan = {lan: max(0, round(after[lan] - before[lan] - idle[lan] * took)) for lan in routers}
    return Rollout(int(release["blob_bytes"]), tuple(release["blobs"]), took, idle, per_lan,
                   len(names))


# --------------------------------------------------------------------------- a real image

# Issue 12's control allowance: what the mesh may spend on control traffic during a rollout.
ALLOWANCE_PER_DEVICE: Final = 4_000
ALLOWANCE_PER_LAN: Final = 8_000
# TCP over IPv4 over WireGuard, as the router's interface counts it: a 52-byte TCP/IP ACK (with
# timestamps) padded to 64, a 16-byte WireGuard data header and a 16-byte tag, in UDP/IP (28)
# in an Ethernet frame (14).
ACK_WIRE_BYTES: Final = 64 + 16 + 16 + 28 + 14
SAMPLE_INTERVAL: Final = 1.0  # s between two reads of the coordinator's device list


def image_topology(uplink: str, *, devices: int = 3, lans: tuple[str, ...] = ("lana", "lanb",
                   "lanc"), seed_ratio: float | None = None, metered: bool = True,
                   source: str = "lab/rollout.py") -> Topology:
    """Issue 12's run shape: `firewall` LANs behind `uplink`, the operator on the WAN; with
    seed_ratio/metered, each LAN's agents may serve other LANs (cross-LAN serving)."""
    extra: dict[str, Any] = {}
    if seed_ratio is not None:
        extra["seed_ratio"] = seed_ratio
    if not metered:
        extra["metered"] = False
    return parse_topology({"operator": {"on": "wan"}, "lan": [
        {"name": n, "nat": "firewall", "devices": devices, "uplink": uplink, **extra}
        for n in lans]}, source=source)


@dataclass(frozen=True, slots=True)
class WanWindow:
    """A LAN's WAN counters over a window, idle rate removed (bytes) or raw (packets)."""

    rx: int
    tx: int
    rx_packets: int
    tx_packets: int


@dataclass(frozen=True, slots=True)
class ImageRollout:
    """One `fleetmesh release create` of a real image until every device runs it (or the cap)."""

    version: int
    release_bytes: int  # B: what one device must fetch (layer deltas / chunks)
    image_bytes: int  # the image unpacked (its layers' tar bytes)
    stored_bytes: int  # the release's blobs as stored (every chunk of every layer)
    publish_seconds: float  # the operator's command itself (docker save, deltas, uploads)
    seconds: float  # from the operator's command to every device running (or to the cap)
    complete: bool  # every device runs `version`
    devices_per_lan: dict[str, int]
    uplink_bps: dict[str, int | None]
    wan: dict[str, WanWindow]  # LAN -> WAN counters during the rollout, idle removed
    max_report_gap: float  # the longest interval between two reports reaching the coordinator
    gap_device: str  # (its device list's last_report, from publish until the device runs it)
    max_progress_gap: float  # the longest interval without a change in any device's app status
    states: dict[str, str]  # device -> "state running/target bytes_done/bytes_total" at the end

    def allowance(self, lan: str) -> int:
        return ALLOWANCE_PER_DEVICE * self.devices_per_lan[lan] + ALLOWANCE_PER_LAN

    def fluid_seconds(self) -> float:
        """B across the slowest shaped uplink (every LAN needs B in at least once)."""
        rates = [r for r in self.uplink_bps.values() if r]
        return self.release_bytes * 8 / min(rates) if rates else 0.0

    def ack_bytes(self, lan: str) -> int:
        """An estimate of the TCP ACKs the LAN sends for what it receives: one ACK per two
        packets received (Linux's delayed ACK) x ACK_WIRE_BYTES, at most what it sent. The
        counters do not tell data from ACKs, so inbound ACKs of the LAN's own uploads count as
        received packets too: an upper estimate when the LAN also serves."""
        w = self.wan[lan]
        return min(w.tx, (w.rx_packets + 1) // 2 * ACK_WIRE_BYTES)

    def lines(self) -> list[str]:
        b = self.release_bytes
        fluid = self.fluid_seconds()
        out = [f"v{self.version}: B {b} bytes (image {self.image_bytes} unpacked, "
               f"{self.stored_bytes} stored); {'all running' if self.complete else 'CAPPED'} "
               f"after {self.seconds:.1f} s (publish {self.publish_seconds:.1f} s), fluid bound "
               f"{fluid:.1f} s, x{self.seconds / max(fluid, 1e-9):.2f}; largest report gap "
               f"{self.max_report_gap:.1f} s ({self.gap_device}), status unchanged for at most "
               f"{self.max_progress_gap:.1f} s"]
        for lan, w in sorted(self.wan.items()):
            out.append(f"  {lan}: WAN in {w.rx} (x{w.rx / b:.2f} B, {w.rx_packets} packets), out "
                       f"{w.tx} (x{w.tx / b:.3f} B, {w.tx_packets} packets; ACK estimate "
                       f"{self.ack_bytes(lan)}), allowance {self.allowance(lan)}")
        return out

    def failures(self, report_gap_limit: float | None = None) -> list[str]:
        """Issue 12's acceptance, one line per criterion missed (empty: all met)."""
        bad: list[str] = []
        b = self.release_bytes
        if not self.complete:
            bad.append(f"v{self.version}: not every device runs it: {self.states}")
        for lan, w in sorted(self.wan.items()):
            if w.rx > 1.05 * b + self.allowance(lan):
                bad.append(f"v{self.version} {lan}: WAN in {w.rx} > 1.05 x B + allowance = "
                           f"{1.05 * b + self.allowance(lan):.0f}")
            if w.tx > self.allowance(lan):
                bad.append(f"v{self.version} {lan}: WAN out {w.tx} > allowance "
                           f"{self.allowance(lan)}")
        limit = 1.3 * self.fluid_seconds() + 30
        if self.seconds > limit:
            bad.append(f"v{self.version}: {self.seconds:.1f} s to all running > 1.3 x fluid + "
                       f"30 s = {limit:.1f} s")
        if report_gap_limit is not None and self.max_report_gap > report_gap_limit:
            bad.append(f"v{self.version}: {self.gap_device} went {self.max_report_gap:.1f} s "
                       f"without a progress report (limit {report_gap_limit:.0f} s)")
        return bad

    def overhead(self, lan: str) -> int:
        """WAN bytes in and out of the LAN beyond B (the release's bytes, in once): what the
        release cost in control (manifests, targets, reports, gossip) and transport framing."""
        w = self.wan[lan]
        return max(0, w.rx + w.tx - self.release_bytes)

    def overhead_lines(self) -> list[str]:
        """Issue 14 item 3: per LAN, the overhead against 4 kB per device + 8 kB per LAN."""
        return [f"v{self.version} {lan}: WAN in + out beyond B ({self.release_bytes} B): "
                f"{self.overhead(lan)} bytes, x{self.overhead(lan) / self.allowance(lan):.2f} of "
                f"the allowance {self.allowance(lan)} ({self.devices_per_lan[lan]} devices)"
                for lan in sorted(self.wan)]

    def ratio_lines(self) -> list[str]:
        """One ratio per acceptance item (issue 12), worst LAN."""
        b = self.release_bytes
        worst_in = max(self.wan, key=lambda n: self.wan[n].rx - self.allowance(n))
        worst_out = max(self.wan, key=lambda n: self.wan[n].tx - self.allowance(n))
        win, wout = self.wan[worst_in], self.wan[worst_out]
        fluid = self.fluid_seconds()
        return [
            f"v{self.version} WAN in / (1.05 B + allowance): "
            f"{win.rx / (1.05 * b + self.allowance(worst_in)):.2f} ({worst_in})",
            f"v{self.version} WAN out / allowance: {wout.tx / self.allowance(worst_out):.2f} "
            f"({worst_out}); without the ACK estimate "
            f"{max(0, wout.tx - self.ack_bytes(worst_out)) / self.allowance(worst_out):.2f}",
            f"v{self.version} time / (1.3 fluid + 30 s): {self.seconds / (1.3 * fluid + 30):.2f}"
            + ("" if self.complete else " (capped: at least)"),
            f"v{self.version} largest report gap / 30 s: {self.max_report_gap / 30:.2f}",
        ]


def _lan_stats(lab: LabNetwork, routers: dict[str, Router]) -> dict[str, dict[str, int]]:
    return {lan: lab.wan_stats(r) for lan, r in routers.items()}


def _app_of(device: dict[str, Any], app: str) -> dict[str, Any]:
    return next((a for a in device.get("apps", []) if a.get("app") == app), {})


def release_bytes(published: dict[str, Any]) -> tuple[int, int]:
    """(B, stored) from `fleetmesh release create --json`: B is what a device holding every
    earlier release must fetch: nothing for an unchanged layer, else its smallest delta or, with
    none, its chunks; stored is every chunk of every layer."""
    b = stored = 0
    for layer in published["layers"]:
        stored += int(layer["stored_size"])
        if layer.get("reused_from") is not None:
            continue
        sizes = [int(d["size"]) for d in layer.get("deltas", [])]
        b += min([int(layer["stored_size"]), *sizes])
    return b, stored


def rollout_image(lab: LabNetwork, image: str, app: str, version: int, *,
                  health_port: int, image_bytes: int, timeout: float,
                  idle_seconds: float = IDLE_SECONDS, health_path: str = "/health"
                  ) -> ImageRollout:
    """Publish IMAGE with the operator's `fleetmesh release create` (on the operator node), wait
    until every device runs `version` or `timeout` passes, and account each LAN's WAN bytes in
    and out (idle rates, measured just before, removed) and the gaps between the devices'
    progress reports at the coordinator."""
    acc = access(lab)
    if acc is None:
        raise LabError("no fleet is running in this lab (it was brought up --network-only)")
    routers = outer_routers(lab)
    names = [d.name for d in lab.devices]
    s0, i0 = _lan_stats(lab, routers), time.monotonic()
    time.sleep(idle_seconds)
    s1, i1 = _lan_stats(lab, routers), time.monotonic()
    idle = {lan: ((s1[lan]["rx_bytes"] - s0[lan]["rx_bytes"]) / (i1 - i0),
                  (s1[lan]["tx_bytes"] - s0[lan]["tx_bytes"]) / (i1 - i0)) for lan in routers}
    # the operator node has the fleet's config, key and fleet name (lab/network.py node_env)
    argv = ["fleetmesh", "release", "create", image, "--app", app, "--version", str(version),
            "--health-http", f"{health_port}{health_path}", "--health-timeout", "120", "--timeout",
            "120", "--json"]
    before, t0 = _lan_stats(lab, routers), time.monotonic()
    published = lab.run("operator", argv, capture_output=True, text=True, timeout=1800)
    publish_seconds = time.monotonic() - t0
    if published.returncode != 0:
        detail = (published.stderr or published.stdout).strip().splitlines()[-1:] or ["failed"]
        raise LabError(f"fleetmesh release create {image}: {detail[0]}")
    b, stored = release_bytes(json.loads(published.stdout))
    wall0 = time.time()  # last_report is the coordinator's wall clock (same host)
    last_report: dict[str, float] = {}
    last_change: dict[str, float] = {n: t0 for n in names}
    seen: dict[str, tuple[Any, ...]] = {}
    gap, gap_device, progress_gap = 0.0, "", 0.0
    states: dict[str, str] = {}
    complete = False
    with OperatorClient(acc.url, acc.api_key, fingerprint=acc.fingerprint,
                        timeout=30) as client:
        while True:
            now, wall = time.monotonic(), time.time()
            listed = {d["name"]: d for d in client.list_devices(FLEET)}
            done = 0
            for n in names:
                d = listed.get(n, {})
                a = _app_of(d, app)
                running = a.get("state") == "running" and a.get("running") == version
                # when its last state report arrived; last_seen also counts hub keepalives
                reported = d.get("last_report")
                if isinstance(reported, (int, float)) and not running:
                    previous = max(last_report.get(n, wall0), wall0)
                    open_gap = max(reported, wall) - previous if reported <= previous else \
                        reported - previous
                    if open_gap > gap:
                        gap, gap_device = open_gap, n
                if isinstance(reported, (int, float)):
                    last_report[n] = max(reported, last_report.get(n, 0.0))
                progress = (a.get("state"), a.get("running"), a.get("target"),
                            a.get("bytes_done"), a.get("updated_at"))
                if progress != seen.get(n) or not running:
                    progress_gap = max(progress_gap, now - last_change[n])
                if progress != seen.get(n):
                    seen[n], last_change[n] = progress, now
                states[n] = (f"{a.get('state')} {a.get('running')}/{a.get('target')} "
                             f"{a.get('bytes_done')}/{a.get('bytes_total')}")
                done += running
            if done == len(names):
                complete = True
                break
            if now - t0 > timeout:
                break
            time.sleep(max(0.0, SAMPLE_INTERVAL - (time.monotonic() - now)))
    after, t1 = _lan_stats(lab, routers), time.monotonic()
    took = t1 - t0
    wan = {lan: WanWindow(
        rx=max(0, round(after[lan]["rx_bytes"] - before[lan]["rx_bytes"] - idle[lan][0] * took)),
        tx=max(0, round(after[lan]["tx_bytes"] - before[lan]["tx_bytes"] - idle[lan][1] * took)),
        rx_packets=after[lan]["rx_packets"] - before[lan]["rx_packets"],
        tx_packets=after[lan]["tx_packets"] - before[lan]["tx_packets"]) for lan in routers}
    per_lan = {lan: sum(1 for d in lab.devices if d.lan == lan) for lan in routers}
    uplinks = {lan.name: lan.shaping.rate_bps for lan in lab.topology.lans}
    return ImageRollout(version, b, image_bytes, stored, publish_seconds, took, complete,
                        per_lan, uplinks, wan, gap, gap_device, progress_gap, states)
