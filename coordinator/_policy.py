"""Fleet reachability policies in the process (docs/policy.md): the API's set, get and
compiled view. The format and the compiler are mesh.policy (no I/O); this module stores the
operator's text once it parses and compiles it against the fleet's active devices on request.

A stored policy is handed to the peer-map core (`on_set`), which then gives the fleet's
devices partial maps (coordinator/_peermap.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mesh.control import ControlError
from mesh.policy import FleetDevice, Policy, PolicyError, compile_policy, parse_policy

from ._model import FleetPolicy, NotFound
from ._store import Store


def check_policy(text: str) -> Policy:
    """The policy text parsed; ControlError (400) with the parser's one line otherwise."""
    try:
        return parse_policy(text)
    except PolicyError as exc:
        raise ControlError(f"policy: {exc}") from None


def policy_of(stored: FleetPolicy | None) -> Policy | None:
    """The stored text parsed (it parsed when it was stored); None: the fleet has none."""
    return None if stored is None else parse_policy(stored.policy)


def policy_info(p: FleetPolicy | None, fleet: str) -> dict[str, Any]:
    """What GET answers: the text as stored, its version, and the rules as parsed."""
    if p is None:
        return {"fleet": fleet, "version": 0, "updated_at": None, "policy": "",
                **parse_policy("").to_json()}
    return {"fleet": fleet, "version": p.version, "updated_at": p.updated_at,
            "policy": p.policy, **parse_policy(p.policy).to_json()}


class PolicyService:
    """`site_of(name)`: a device's public address as the coordinator sees it (None: not seen),
    the key that makes devices LAN neighbours; `on_set(fleet, policy)`: told each stored
    policy."""

    def __init__(self, store: Store, clock: Callable[[], float],
                 site_of: Callable[[str], str | None],
                 on_set: Callable[[str, Policy], None] | None = None) -> None:
        self._store = store
        self._clock = clock
        self._site_of = site_of
        self._on_set = on_set

    def set(self, fleet: str, text: str) -> dict[str, Any]:
        policy = check_policy(text)
        info = policy_info(self._store.set_policy(fleet, text, self._clock()), fleet)
        if self._on_set is not None:
            self._on_set(fleet, policy)
        return info

    def get(self, fleet: str) -> dict[str, Any]:
        return policy_info(self._store.get_policy(fleet), fleet)

    def compiled(self, fleet: str, device: str) -> dict[str, Any]:
        """What `device` may reach and what may reach it, with the rules (mesh.policy
        CompiledPolicy.explain), under the fleet's stored policy and its active devices."""
        stored = self._store.get_policy(fleet)
        policy = parse_policy("" if stored is None else stored.policy)
        devices = [FleetDevice(name, tags, self._site_of(name))
                   for name, tags in self._store.active_tags(fleet)]
        compiled = compile_policy(policy, devices)
        if device not in compiled:
            raise NotFound(f"no active device {device!r} in fleet {fleet}")
        return {"fleet": fleet, "version": 0 if stored is None else stored.version,
                **compiled.explain(device)}
