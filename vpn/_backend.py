"""Backends that read and change a WireGuard device: userspace (UAPI) or the kernel (netlink)."""

from __future__ import annotations

import os
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Protocol, runtime_checkable

from ._keys import ZERO_KEY, public_key_from_private
from ._model import (
    DeviceConfig,
    DeviceStatus,
    Endpoint,
    IPNetwork,
    PeerConfig,
    PeerStatus,
    parse_network,
)
from ._uapi import UapiClient

KERNEL_MODULE_PATH = "/sys/module/wireguard"


@runtime_checkable
class WireGuardBackend(Protocol):
    def get(self) -> DeviceStatus: ...

    def set(self, config: DeviceConfig) -> None: ...


@runtime_checkable
class AsyncWireGuardBackend(Protocol):
    async def aget(self) -> DeviceStatus: ...

    async def aset(self, config: DeviceConfig) -> None: ...


class UapiBackend:
    """A userspace daemon (wireguard-go, boringtun) behind its UAPI socket."""

    __slots__ = ("client",)

    def __init__(self, socket_path: str | os.PathLike[str], timeout: float = 5.0) -> None:
        self.client = UapiClient(socket_path, timeout=timeout)

    def __repr__(self) -> str:
        return f"UapiBackend({self.client.socket_path!r})"

    def get(self) -> DeviceStatus:
        return self.client.get()

    def set(self, config: DeviceConfig) -> None:
        self.client.set(config)

    async def aget(self) -> DeviceStatus:
        return await self.client.aget()

    async def aset(self, config: DeviceConfig) -> None:
        await self.client.aset(config)


# --------------------------------------------------------------------------- kernel


def _b64(value: object) -> str:
    # pyroute2 decodes key NLAs to base64 *bytes*.
    if isinstance(value, bytes):
        return value.decode("ascii")
    return str(value)


def _attr(msg: Any, name: str) -> Any:
    return msg.get_attr(name)


def _status_from_netlink(messages: list[Any]) -> DeviceStatus:
    """Merge a netlink dump: big devices arrive as several messages and a peer may continue in
    the next message (its public key repeated), so peers are merged by key, in order."""
    private_key: str | None = None
    listen_port: int | None = None
    fwmark = 0
    order: list[str] = []
    peers: dict[str, dict[str, Any]] = {}
    for msg in messages:
        if (v := _attr(msg, "WGDEVICE_A_PRIVATE_KEY")) is not None:
            private_key = _b64(v)
        if (v := _attr(msg, "WGDEVICE_A_LISTEN_PORT")) is not None:
            listen_port = int(v)
        if (v := _attr(msg, "WGDEVICE_A_FWMARK")) is not None:
            fwmark = int(v)
        for nla in _attr(msg, "WGDEVICE_A_PEERS") or ():
            pub = _b64(nla.get_attr("WGPEER_A_PUBLIC_KEY"))
            if pub not in peers:
                order.append(pub)
                peers[pub] = {"allowed_ips": []}
            entry = peers[pub]
            for name in (
                "WGPEER_A_PRESHARED_KEY",
                "WGPEER_A_ENDPOINT",
                "WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL",
                "WGPEER_A_LAST_HANDSHAKE_TIME",
                "WGPEER_A_RX_BYTES",
                "WGPEER_A_TX_BYTES",
            ):
                if (v := nla.get_attr(name)) is not None:
                    entry[name] = v
            for aip in nla.get_attr("WGPEER_A_ALLOWEDIPS") or ():
                addr = aip.get("addr")
                if addr:
                    entry["allowed_ips"].append(parse_network(str(addr)))
    out: list[PeerStatus] = []
    for pub in order:
        e = peers[pub]
        psk = e.get("WGPEER_A_PRESHARED_KEY")
        psk_s = _b64(psk) if psk is not None else None
        ep = e.get("WGPEER_A_ENDPOINT")
        endpoint = None
        if ep is not None and ep.get("port"):
            addr = str(ep.get("addr"))
            host = IPv6Address(addr) if ":" in addr else IPv4Address(addr)
            if not host.is_unspecified:
                endpoint = Endpoint(host, int(ep.get("port")))
        hs = e.get("WGPEER_A_LAST_HANDSHAKE_TIME")
        handshake = None
        if hs is not None and (hs.get("tv_sec") or hs.get("tv_nsec")):
            handshake = int(hs.get("tv_sec")) + int(hs.get("tv_nsec")) / 1e9
        allowed: list[IPNetwork] = e["allowed_ips"]
        out.append(
            PeerStatus(
                public_key=pub,
                preshared_key=None if psk_s in (None, ZERO_KEY) else psk_s,
                endpoint=endpoint,
                allowed_ips=tuple(allowed),
                persistent_keepalive=int(e.get("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", 0)),
                last_handshake=handshake,
                rx_bytes=int(e.get("WGPEER_A_RX_BYTES", 0)),
                tx_bytes=int(e.get("WGPEER_A_TX_BYTES", 0)),
            )
        )
    return DeviceStatus(
        private_key=private_key,
        public_key=public_key_from_private(private_key) if private_key else None,
        listen_port=listen_port,
        fwmark=fwmark,
        peers=tuple(out),
    )


def _peer_to_pyroute2(peer: PeerConfig) -> dict[str, Any]:
    # The dict shape pyroute2's WireGuard.set() documents as `struct peer_s`.
    d: dict[str, Any] = {"public_key": peer.public_key}
    if peer.remove:
        d["remove"] = True
        return d
    if peer.update_only:
        d["update_only"] = True
    if peer.preshared_key is not None:
        d["preshared_key"] = peer.preshared_key
    if peer.endpoint is not None:
        d["endpoint_addr"] = str(peer.endpoint.host)
        d["endpoint_port"] = peer.endpoint.port
    if peer.persistent_keepalive is not None:
        d["persistent_keepalive"] = peer.persistent_keepalive
    if peer.replace_allowed_ips:
        d["replace_allowed_ips"] = True
    if peer.allowed_ips or peer.replace_allowed_ips:
        d["allowed_ips"] = [str(n) for n in peer.allowed_ips]
    return d


class KernelBackend:
    """The in-kernel WireGuard via generic netlink (pyroute2), for hosts that have the module.

    pyroute2's set() carries one peer per message and has no replace_peers flag, so a
    DeviceConfig becomes several messages (not atomic) and replace_peers is emulated by
    removing the peers the device has and the config does not name.
    """

    __slots__ = ("ifname", "netns")

    def __init__(self, ifname: str, netns: str | None = None) -> None:
        self.ifname = ifname
        self.netns = netns

    def __repr__(self) -> str:
        return f"KernelBackend({self.ifname!r}, netns={self.netns!r})"

    def _socket(self) -> Any:
        from pyroute2 import WireGuard  # start-up time: pyroute2 takes ~160 ms to import

        if self.netns is None:
            return WireGuard()
        # flags=0: never create a namespace by accident because of a typo in its name.
        return WireGuard(netns=self.netns, flags=0)

    def get(self) -> DeviceStatus:
        with self._socket() as wg:
            return _status_from_netlink(list(wg.info(self.ifname)))

    def set(self, config: DeviceConfig) -> None:
        peers = [_peer_to_pyroute2(p) for p in config.peers]
        with self._socket() as wg:
            if config.replace_peers:
                keep = {p.public_key for p in config.peers}
                current = _status_from_netlink(list(wg.info(self.ifname)))
                for p in current.peers:
                    if p.public_key not in keep:
                        wg.set(self.ifname, peer={"public_key": p.public_key, "remove": True})
            device: dict[str, Any] = {}
            if config.private_key is not None:
                device["private_key"] = config.private_key
            if config.listen_port is not None:
                device["listen_port"] = config.listen_port
            if config.fwmark is not None:
                device["fwmark"] = config.fwmark
            if device:
                wg.set(self.ifname, **device)
            for peer in peers:
                wg.set(self.ifname, peer=peer)


def kernel_wireguard_available() -> bool:
    return os.path.isdir(KERNEL_MODULE_PATH)


def open_backend(
    ifname: str,
    socket_path: str | os.PathLike[str] | None = None,
    netns: str | None = None,
) -> UapiBackend | KernelBackend:
    """Pick the backend for a device: an explicit or discoverable UAPI socket wins (a userspace
    daemon may run even where the module exists), else the kernel if the module is loaded."""
    if socket_path is not None:
        return UapiBackend(socket_path)
    default = f"/run/wireguard/{ifname}.sock"
    if netns is None and os.path.exists(default):
        return UapiBackend(default)
    if kernel_wireguard_available():
        return KernelBackend(ifname, netns)
    raise FileNotFoundError(
        f"no WireGuard control for {ifname!r}: no UAPI socket given or at {default}, "
        f"and no kernel module ({KERNEL_MODULE_PATH} missing)"
    )
