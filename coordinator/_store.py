"""What the coordinator needs from its database, in domain terms (coordinator/_model.py).

`SqlStore` (_store_sql.py) implements it once in SQL, on SQLite (`SqliteStore`, the default) or
PostgreSQL (`PostgresStore`, `serve --store postgresql://...`); nothing else in the coordinator
knows which. Every method is one transaction. Methods take `now` (epoch seconds) instead of
reading a clock, so expiry is testable exactly. A database that does not answer raises
StoreUnavailable (503).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from mesh.control import (
    AppStatus,
    LinkState,
    LogLine,
    PeerMisbehaviour,
    PeerPath,
    WanBudget,
    WanBytes,
)

from ._model import (
    AppControl,
    Device,
    EnrollmentToken,
    EnrollParams,
    FleetPolicy,
    FleetReleaseKey,
    FleetTarget,
    LogPage,
    MisbehaviourReport,
    Operator,
    Release,
    RolloutRecord,
)


class Store(Protocol):
    def close(self) -> None: ...

    # -- settings fixed at the first start (prefixes, key hashes) --------------------------
    def get_meta(self, key: str) -> str | None: ...

    def set_meta(self, key: str, value: str) -> None: ...

    # -- tokens ----------------------------------------------------------------------------
    def create_token(self, token: EnrollmentToken) -> None:
        """Creates the fleet if it is new."""

    def get_token(self, secret_hash: str) -> EnrollmentToken | None: ...

    # -- devices ---------------------------------------------------------------------------
    def enroll(self, params: EnrollParams) -> Device:
        """Check the token (TokenUnknown / TokenExpired / TokenUsedUp), use it once, and make
        the device active with fresh addresses (or re-key a provisioned device of that name).
        Conflict if the name belongs to another live device or the key to another device,
        ProofRequired if the name is active and `proven_device_id` is not its id, Conflict if
        the name is provisioned and the token is not its own."""

    def provision(self, device_id: str, name: str, fleet: str, token: EnrollmentToken,
                  now: float) -> Device:
        """A `provisioned` device plus its single-use token bound to its name; Conflict if a
        live device has the name."""

    def device_by_name(self, name: str) -> Device | None:
        """The live (not revoked) device of that name, else the newest revoked one."""

    def device_by_credential(self, credential_hash: str) -> Device | None:
        """Only active devices have a working credential."""

    def credential_revoked(self, credential_hash: str) -> bool:
        """True if the credential was that of a device the operator revoked (not merely
        replaced by a later enrollment, nor unknown)."""

    def list_devices(self, fleet: str | None = None) -> list[Device]: ...

    def fleet_size(self, fleet: str) -> int:
        """How many devices of `fleet` hold or await a place: active and provisioned ones."""

    def revoke(self, name: str, now: float) -> Device:
        """NotFound if no live device has the name; idempotent on an already revoked one."""

    def record_report(self, device_id: str, lan_endpoints: Sequence[str], agent_version: str,
                      peers: Sequence[PeerPath], now: float, apps: Sequence[AppStatus] = (),
                      misbehaving: Sequence[PeerMisbehaviour] = (),
                      link: LinkState | None = None, wan_bytes: WanBytes | None = None,
                      wan_budget: WanBudget | None = None, timezone: str | None = None,
                      platform: str | None = None) -> list[str]:
        """Also replaces what the device last said of misbehaving peers with `misbehaving`
        (an old agent's report says nothing: none), merges `wan_bytes` (its byte account)
        by day with what is stored (the newest week kept), replaces its `wan_budget` (None: it
        runs without one), keeps each app's status (replacing the
        previous one of that app; at most mesh.control.MAX_APPS per device, past which the
        apps this report leaves out lose theirs) and clears the force of every app now running
        the forced version or a newer one → those apps. `timezone`: the device's, as the
        report said (None: not said); `platform` likewise (None: kept as it was)."""

    def record_public_endpoint(self, device_id: str, endpoint: str | None) -> None:
        """The endpoint the hub last saw the device at (kept across coordinator restarts)."""

    def peer_paths(self, device_id: str) -> tuple[PeerPath, ...]: ...

    def misbehaviour_reports(self, fleet: str | None = None) -> list[MisbehaviourReport]:
        """What the live devices (of `fleet`) last reported of misbehaving peers, by offender
        then reporter."""

    # -- apps and logs ---------------------------------------------------------------------
    def app_statuses(self, fleet: str | None = None) -> dict[str, list[AppStatus]]:
        """Device ID → the last status of each app it reported, by app name."""

    def app_controls(self, device_id: str) -> dict[str, AppControl]:
        """App → the operator's force and retry counter for the device (absent: none)."""

    def set_force(self, device_id: str, app: str, version: int | None) -> None: ...

    def add_retry(self, device_ids: Sequence[str], app: str) -> dict[str, int]:
        """Increment each device's retry counter for the app → device ID → new counter."""

    def append_logs(self, device_id: str, lines: Sequence[LogLine], dropped: int, keep: int
                    ) -> int:
        """Store the lines with the next sequence numbers, keep the newest `keep` of the
        device, add `dropped` to its total → the last sequence number."""

    def read_logs(self, device_id: str, after: int, limit: int) -> LogPage:
        """At most `limit` lines with a sequence number above `after`, oldest first."""

    def tail_logs(self, device_id: str, count: int) -> LogPage:
        """The newest `count` lines, oldest first."""

    # -- operators -------------------------------------------------------------------------
    def add_operator(self, name: str, public_key: str, now: float) -> Operator:
        """Idempotent for the same name and key; Conflict otherwise."""

    def list_operators(self) -> list[Operator]: ...

    # -- releases --------------------------------------------------------------------------
    def add_release(self, release: Release) -> tuple[Release, bool]:
        """Publish `release` (creating its fleet if new) → (stored release, created?).

        The same signed bytes already published → (that release, False). Conflict if the
        version is not newer than every version of the app ever published in the fleet (also
        deleted ones: a version number never names two different releases)."""

    def get_release(self, fleet: str, app: str, version: int) -> Release | None: ...

    def list_releases(self, fleet: str, app: str | None = None) -> list[Release]:
        """Newest published first."""

    def latest_version(self, fleet: str, app: str) -> int | None:
        """The newest version of the app that is published (not deleted)."""

    def delete_release(self, fleet: str, app: str, version: int) -> list[str]:
        """NotFound if unknown; Conflict if a target names it. Returns the blob IDs that no
        remaining release names (the caller removes their files)."""

    def blob_referenced(self, blob_id: str, fleet: str | None = None) -> bool:
        """Whether any release (of `fleet`, if given) names the blob."""

    # -- release keys and targets ----------------------------------------------------------
    def set_release_key(self, key: FleetReleaseKey) -> None: ...

    def release_key(self, fleet: str) -> FleetReleaseKey | None: ...

    def add_root(self, fleet: str, version: int, document: bytes, key: FleetReleaseKey) -> None:
        """Store the fleet's root `version` (its signed JSON document, verified by the caller)
        and make `key`, the release key it names, the fleet's, in one durable transaction.
        Conflict unless `version` is the newest stored plus one (1 for the first)."""

    def roots(self, fleet: str, since: int, limit: int) -> list[bytes]:
        """The documents of the fleet's roots newer than `since`, oldest first, at most
        `limit`."""

    def latest_root(self, fleet: str) -> bytes | None:
        """The document of the fleet's newest root, None if it has none."""

    def set_target(self, target: FleetTarget) -> None:
        """Replace the fleet's (or the device's) target for the app."""

    def targets(self, fleet: str) -> list[FleetTarget]:
        """Every target of the fleet, fleet-wide and per device."""

    # -- tags and rollouts (issue 16) --------------------------------------------------------

    def update_tags(self, name: str, set_tags: dict[str, str], remove: Sequence[str],
                    max_tags: int) -> Device:
        """Remove the keys `remove`, then set `set_tags`, on the live device of that name
        (NotFound if none); ControlError if it would have more than `max_tags` tags."""

    def put_rollout(self, rollout: RolloutRecord, exclusive: bool = False) -> None:
        """Store (or replace) the release's rollout; NotFound if the release is not published.
        `exclusive`: Conflict if another rollout of the app in the fleet is running or
        paused (checked in the same transaction)."""

    def get_rollout(self, fleet: str, app: str, version: int) -> RolloutRecord | None: ...

    def rollouts(self, fleet: str | None = None, states: Sequence[str] | None = None
                 ) -> list[RolloutRecord]:
        """The rollouts (of `fleet`, in one of `states`), newest first."""

    # -- reachability policy (issue 18 item 6) -----------------------------------------------

    def set_policy(self, fleet: str, policy: str, now: float) -> FleetPolicy:
        """Store the fleet's policy text (checked by the caller), creating the fleet if need
        be; its version is one more than the stored one's (1 for the first)."""

    def active_tags(self, fleet: str) -> list[tuple[str, dict[str, str]]]:
        """(name, tags) of each active device of the fleet, by name: what the policy
        compiler reads (a tenth of `list_devices`' cost at 10,000 devices)."""

    def get_policy(self, fleet: str) -> FleetPolicy | None:
        """The fleet's policy (None: it has none, only the default)."""
