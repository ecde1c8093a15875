"""Health probes the agent runs itself for a new release: cmd, tcp and http checks.

Whether a release has passed is decided by the pure core (agent/_apply_core.py `health_verdict`);
`running` checks and the image's own Docker HEALTHCHECK need no probe (the engine's container
state says it). The probes run in the applier's worker thread and each is bounded by
PROBE_TIMEOUT_S, so a hung app cannot stall the agent:

    cmd   `docker exec CONTAINER COMMAND...`; healthy when it exits 0
    tcp   connect to 127.0.0.1:PORT (the container shares the device's network, --network host)
    http  GET http://127.0.0.1:PORT/PATH; healthy on a 2xx or 3xx status (redirects not followed)
"""

from __future__ import annotations

import http.client
import socket
from typing import Final, Protocol

from mesh.release import HealthCheck, HealthKind

from ._apply_core import one_line

# Docker's HEALTHCHECK --timeout default is 30 s; a device check that takes longer than this
# is a failed probe, and the next one follows after the check's interval.
PROBE_TIMEOUT_S: Final = 10.0
PROBE_HOST: Final = "127.0.0.1"


class Exec(Protocol):
    def exec(self, container_id: str, argv: tuple[str, ...] | list[str], timeout: float
             ) -> tuple[int | None, str]: ...


def probe(engine: Exec, container_id: str, check: HealthCheck,
          timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """Run one probe: (healthy, one line saying why not)."""
    if check.kind is HealthKind.CMD:
        try:
            code, first_line = engine.exec(container_id, check.command, timeout)
        except Exception as exc:  # noqa: BLE001 - the engine's errors, one line each
            return False, one_line(f"exec: {exc}")
        if code is None:
            return False, f"command did not finish within {timeout:g} s"
        return code == 0, "" if code == 0 else one_line(f"command exited {code}: {first_line}")
    if check.kind is HealthKind.TCP:
        try:
            with socket.create_connection((PROBE_HOST, check.port), timeout=timeout):
                return True, ""
        except OSError as exc:
            return False, one_line(f"tcp {check.port}: {exc.strerror or exc}")
    if check.kind is HealthKind.HTTP:
        conn = http.client.HTTPConnection(PROBE_HOST, check.port, timeout=timeout)
        try:
            conn.request("GET", check.path, headers={"User-Agent": "fleetmesh-agent"})
            status = conn.getresponse().status
        except (OSError, http.client.HTTPException) as exc:
            return False, one_line(f"http {check.port}{check.path}: "
                                   f"{getattr(exc, 'strerror', None) or exc}")
        finally:
            conn.close()
        ok = 200 <= status < 400
        return ok, "" if ok else f"http {check.port}{check.path}: status {status}"
    raise ValueError(f"no probe for {check.kind.value} checks")


__all__ = ["PROBE_TIMEOUT_S", "probe"]
