"""The release registry: publishing signed manifests, blobs, release keys and targets.

The coordinator never holds a signing key. It checks what it can without one: the manifest is
well formed, every blob it names is stored (and of the size it says), versions only grow, and,
once the operator has set a fleet's release key, that the manifest (or a rollback pin) is
signed with it. Devices verify everything again against the key they pinned at enrollment.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any, Final, TypedDict, TypeVar

import trio
from nacl.signing import SigningKey, VerifyKey

from mesh.blobs import BlobKind
from mesh.control import AppStatus, ControlError, SourceBytes, check_name
from mesh.names import unpublishable_app
from mesh.release import (
    MAX_ROOT_CHAIN,
    ManifestError,
    ReleaseError,
    ReleaseManifest,
    ReleasePin,
    RootError,
    SignedPin,
    SignedRoot,
    Timestamp,
    VerificationError,
    all_layers,
    decode_manifest,
    decode_pin,
    decode_root_body,
    decode_signed_manifest,
    decode_signed_pin,
    decode_signed_root,
    encode_signed_root,
    key_id,
    release_images,
    root_fingerprint,
    sign_timestamp,
    signed_root_to_json,
    verify_manifest,
    verify_pin,
    verify_root,
    verify_timestamp_grant,
)
from mesh.rollout import RolloutSpecError, Window

from . import _rollout as core
from ._blobs import MAX_BLOB_BYTES, BlobBackend, BlobStoreUnavailable, OpenBlob, check_blob_id
from ._model import (
    ROLLOUT_BAD,
    AppControl,
    Conflict,
    Device,
    DeviceState,
    FleetReleaseKey,
    FleetTarget,
    Forbidden,
    LayerInfo,
    NotFound,
    PlatformInfo,
    Release,
    ReleaseDetail,
    ReleaseInfo,
    RolloutRecord,
    TargetInfo,
    TooLarge,
    release_info,
    target_info,
)
from ._store import Store


class RolloutSummary(TypedDict):
    state: str
    phase: int
    phases: int
    reason: str | None


def rollout_summary(rollout: RolloutRecord | None) -> RolloutSummary | None:
    """ReleaseStatus's `rollout`: where the release's rollout stands (None: it has none)."""
    if rollout is None:
        return None
    data = rollout.data or {}
    return {"state": rollout.state, "phase": int(data.get("phase") or 0),
            "phases": len(data.get("phases") or []), "reason": data.get("reason")}


log = logging.getLogger("fleetmesh.coordinator")
_T = TypeVar("_T")

MAX_MISSING_QUERY: Final = 10_000  # IDs per POST /blobs/missing (docs/api.md)
# How long a timestamp a device fetched stays good: a device that gets no newer one within
# this says "stale" (docs/security.md, "A frozen coordinator is detected"). A day, as TUF's
# timestamp role suggests; agents ask with every target poll, so it is renewed long before.
TIMESTAMP_LIFETIME: Final = 86400
MAX_GRANT_HEX: Final = 2 * 4096
_GRANT_META: Final = "timestamp_grant:"


class ReleaseKeyInfo(TypedDict):
    """PUT /fleets/{fleet}/release-key's answer."""

    fleet: str
    public_key: str  # Ed25519, hex
    key_id: str


class RootInfo(TypedDict):
    """PUT /fleets/{fleet}/root's answer."""

    fleet: str
    version: int
    release_key: str  # Ed25519, hex: now the fleet's release key
    key_id: str
    fingerprint: str  # sha256 of the root's body, hex


class DeviceTargetInfo(TypedDict):
    """One entry of GET /device/target: the target plus the operator's force and retry, and
    what its rollout says (hold: download only; window: apply only inside it)."""

    app: str
    version: int
    pin: str | None  # hex
    force: bool
    retry: int
    hold: bool
    window: str | None


class ForceAnswer(TypedDict):
    """POST /devices/{name}/update."""

    device: str
    app: str
    version: int
    force: bool


class DeviceRetryAnswer(TypedDict):
    """POST /devices/{name}/retry."""

    device: str
    app: str
    retry: int


class RetriedDevice(TypedDict):
    device: str
    retry: int


class ReleaseRetryAnswer(TypedDict):
    """POST /releases/{fleet}/{app}/{version}/retry."""

    fleet: str
    app: str
    version: int
    devices: list[RetriedDevice]


class MissingBlobs(Conflict):
    """409 with the IDs the client still has to upload."""

    def __init__(self, missing: list[str]) -> None:
        super().__init__(f"{len(missing)} blob(s) the manifest names are not stored; upload "
                         "them first")
        self.missing = missing


def _manifest_blobs(m: ReleaseManifest) -> list[tuple[str, BlobKind, int]]:
    """(ID, kind, stored size) of every blob the manifest names (every platform's image),
    first occurrence only."""
    seen: set[str] = set()
    out = []
    for layer in all_layers(m):
        refs = [(c.id.hex(), BlobKind.CHUNK, c.stored_size) for c in layer.chunks]
        refs += [(d.blob_id.hex(), BlobKind.DELTA, d.size) for d in layer.deltas]
        for ref in refs:
            if ref[0] not in seen:
                seen.add(ref[0])
                out.append(ref)
    return out


def _decode(data: bytes) -> tuple[Any, ReleaseManifest]:
    try:
        signed = decode_signed_manifest(data)
        return signed, decode_manifest(signed.manifest)
    except ManifestError as exc:
        raise ControlError(f"release: {exc}") from None


class ReleaseRegistry:
    def __init__(self, store: Store, blobs: BlobBackend,
                 clock: Callable[[], float] = time.time,
                 targets_changed: Callable[[str, str | None], None] | None = None) -> None:
        self.store = store
        self.blobs = blobs
        self.clock = clock
        # (fleet, device or None for all): what /device/target answers them has changed
        self.targets_changed = targets_changed or (lambda fleet, device: None)
        self.max_blob_bytes = MAX_BLOB_BYTES
        # The online key that signs the fleets' timestamps (never the release key). The server
        # replaces this throwaway one with the key kept in its data directory.
        self.timestamp_key = SigningKey.generate()
        self.timestamp_lifetime = TIMESTAMP_LIFETIME
        # Serialises what touches blobs and releases together (publish's existence check,
        # delete's garbage collection, an upload's final rename), so a blob can never vanish
        # between being checked and being named by a release.
        self._lock = trio.Lock()

    # -- blobs -------------------------------------------------------------------------------

    async def _in_store(self, fn: Callable[..., _T], *args: Any) -> _T:
        """`fn(*args)` of the blob backend, in a thread; a store that does not answer is
        logged (one line) and answered 503 (BlobStoreUnavailable)."""
        try:
            return await trio.to_thread.run_sync(fn, *args)
        except BlobStoreUnavailable as exc:
            log.warning("%s", exc)
            raise

    async def missing(self, ids: list[str]) -> list[str]:
        for i in ids:
            check_blob_id(i, "ids[]")
        return await self._in_store(self.blobs.missing, ids)

    async def put_blob(self, blob_id: str, kind: BlobKind, body: AsyncIterator[bytes]) -> bool:
        """Stream `body` to a temp file (at most max_blob_bytes), verify, name it. → new?"""
        check_blob_id(blob_id)
        limit = self.max_blob_bytes
        f, tmp = await self._in_store(self.blobs.new_temp, blob_id)
        try:
            seen = 0
            async for piece in body:
                seen += len(piece)
                if seen > limit:
                    raise TooLarge(f"blob larger than {limit} bytes")
                f.write(piece)  # to the page cache: short; the fsync happens in a thread
        except BaseException:
            self.blobs.discard(f, tmp)
            raise
        async with self._lock:
            return await self._in_store(self.blobs.commit, blob_id, kind, f, tmp)

    async def open_blob(self, blob_id: str, device: Device | None) -> OpenBlob:
        """A blob for reading; a device only gets blobs that a release of its fleet names."""
        check_blob_id(blob_id)
        if device is not None and not self.store.blob_referenced(blob_id, device.fleet):
            raise NotFound(f"no blob {blob_id} in fleet {device.fleet}")
        blob = await self._in_store(self.blobs.open, blob_id)
        if blob is None:
            raise NotFound(f"no blob {blob_id}")
        return blob

    # -- releases ----------------------------------------------------------------------------

    async def publish(self, data: bytes, held: bool = False) -> tuple[ReleaseInfo, bool]:
        """`held`: published for nobody (a rollout in state `held`) until a rollout starts;
        else the newest release is every unpinned device's target at once."""
        signed, m = _decode(data)
        check_name(m.fleet, "release fleet")
        reserved = unpublishable_app(m.app)
        if reserved is not None:
            raise ControlError(f"release: {reserved}")
        existing = self.store.get_release(m.fleet, m.app, m.version)
        if existing is not None and existing.signed == data:
            return release_info(existing), False
        key = self.store.release_key(m.fleet)
        if key is not None:
            try:
                verify_manifest(signed, bytes.fromhex(key.public_key), 0, fleet=m.fleet,
                                app=m.app)
            except VerificationError as exc:
                raise Forbidden(f"release not signed with fleet {m.fleet}'s release key "
                                f"{key.key_id}: {exc}") from None
        refs = _manifest_blobs(m)
        async with self._lock:
            latest = self.store.latest_version(m.fleet, m.app)
            if latest is not None and m.version <= latest:
                raise Conflict(f"{m.app} version {m.version} is not newer than the latest "
                               f"published in fleet {m.fleet} ({latest})")
            sizes = await self._in_store(self.blobs.sizes, [i for i, _, _ in refs])
            missing = [i for (i, _, _), got in zip(refs, sizes, strict=True) if got is None]
            if missing:
                raise MissingBlobs(missing)
            wrong = [(i, k, want, got) for (i, k, want), got in zip(refs, sizes, strict=True)
                     if got != want]
            if wrong:
                i, k, want, got = wrong[0]
                raise Conflict(f"{len(wrong)} blob(s) stored with another size than the "
                               f"manifest says, e.g. {k} {i}: {got} bytes, manifest {want} "
                               "(compress chunks exactly as the stored ones)")
            layers = list(all_layers(m))
            release = Release(
                fleet=m.fleet, app=m.app, version=m.version, signed=bytes(data),
                key_id=signed.key_id, created_at=m.created_at, published_at=self.clock(),
                layers=len(layers), size=sum(layer.size for layer in layers),
                stored_size=sum(c.stored_size for layer in layers for c in layer.chunks),
                delta_size=sum(d.size for layer in layers for d in layer.deltas),
                blob_ids=tuple(i for i, _, _ in refs))
            stored, created = self.store.add_release(release)
            if created and held:
                now = self.clock()
                self.store.put_rollout(RolloutRecord(
                    m.fleet, m.app, m.version, "held", self.previous_version(
                        m.fleet, m.app, m.version), now, now))
        if created and not held:  # the fleet's newest: the target of every device nobody pinned
            self.targets_changed(m.fleet, None)
        return release_info(stored), created

    def _release(self, fleet: str, app: str, version: int) -> Release:
        release = self.store.get_release(fleet, app, version)
        if release is None:
            raise NotFound(f"no release {app} version {version} in fleet {fleet}")
        return release

    def list_releases(self, fleet: str, app: str | None) -> list[ReleaseInfo]:
        return [release_info(r) for r in self.store.list_releases(fleet, app)]

    def release_detail(self, fleet: str, app: str, version: int) -> ReleaseDetail:
        release = self._release(fleet, app, version)
        _, m = _decode(release.signed)
        layers: list[LayerInfo] = []
        platforms: list[PlatformInfo] = []
        for image in release_images(m):
            mine: list[LayerInfo] = [
                {"diff_id": layer.diff_id, "size": layer.size, "chunks": len(layer.chunks),
                 "stored_size": sum(c.stored_size for c in layer.chunks),
                 "deltas": [{"source_diff_id": d.source_diff_id, "size": d.size,
                             "method": d.method} for d in layer.deltas],
                 "platform": image.platform}
                for layer in image.layers]
            layers += mine
            platforms.append({"platform": image.platform, "layers": len(mine),
                              "size": sum(x["size"] for x in mine),
                              "stored_size": sum(x["stored_size"] for x in mine),
                              "delta_size": sum(d["size"] for x in mine for d in x["deltas"])})
        return {**release_info(release), "layers": layers, "platforms": platforms}

    def manifest(self, fleet: str, app: str, version: int, device: Device | None) -> bytes:
        if device is not None and device.fleet != fleet:
            raise NotFound(f"no release {app} version {version} in fleet {fleet}")
        return self._release(fleet, app, version).signed

    async def delete(self, fleet: str, app: str, version: int) -> int:
        """Remove the release and the blobs no other release names → blobs removed.

        Finding the orphans and unlinking them happen under one hold of the lock: a publish
        (or an upload's final rename) between the two would otherwise be told a blob is stored
        and then lose it to this GC (docs/security.md, "Blob GC cannot delete a published
        blob")."""
        async with self._lock:
            orphans = self.store.delete_release(fleet, app, version)
            removed = await self._in_store(self.blobs.delete, orphans)
        self.targets_changed(fleet, None)  # it may have been the newest: devices re-read
        return removed

    # -- keys and targets --------------------------------------------------------------------

    def set_release_key(self, fleet: str, public_key_hex: str) -> ReleaseKeyInfo:
        if self.store.latest_root(fleet) is not None:
            raise Conflict(f"fleet {fleet} has root metadata: its release key changes only with "
                           "a new root signed by its root keys (`fleetmesh root rotate`)")
        try:
            raw = bytes.fromhex(public_key_hex)
            if len(raw) != 32:
                raise ValueError
            VerifyKey(raw)
        except (ValueError, TypeError):
            raise ControlError("public_key: must be an Ed25519 public key in hex "
                               "(64 digits)") from None
        key = FleetReleaseKey(fleet, raw.hex(), key_id(raw), self.clock())
        self.store.set_release_key(key)
        return {"fleet": fleet, "public_key": key.public_key, "key_id": key.key_id}

    def release_key(self, fleet: str) -> str | None:
        key = self.store.release_key(fleet)
        return None if key is None else key.public_key

    # -- root metadata (docs/security.md, "Release key rotation") -------------------------------

    def put_root(self, fleet: str, document: bytes) -> RootInfo:
        """Keep the fleet's next root, once it verifies against the stored one (version 1:
        against its own keys), and make the release key it names the fleet's. Devices trust no
        root for our word; this only keeps garbage and forks out of what they are served."""
        try:
            signed = decode_signed_root(document)
        except RootError as exc:
            raise ControlError(f"body: {exc}") from None
        meta = decode_root_body(signed.body)
        if meta.fleet != fleet:
            raise ControlError(f"root is for fleet {meta.fleet!r}, not {fleet!r}")
        latest = self.store.latest_root(fleet)
        trusted = None if latest is None else decode_root_body(decode_signed_root(latest).body)
        current = 0 if trusted is None else trusted.version
        if latest is not None and meta.version == current and (
                decode_signed_root(latest).body == signed.body):
            return self._root_info(signed)  # published again (a retried command): no change
        if meta.version != current + 1:
            raise Conflict(f"fleet {fleet} is at root version {current}: the next one is "
                           f"{current + 1}, not {meta.version}")
        try:
            verify_root(signed, trusted, root_fingerprint(signed))
        except RootError as exc:
            raise Forbidden(str(exc)) from None
        key = FleetReleaseKey(fleet, meta.release_key.hex(), key_id(meta.release_key),
                              self.clock())
        self.store.add_root(fleet, meta.version, encode_signed_root(signed), key)
        self.targets_changed(fleet, None)  # devices read targets and roots together
        return self._root_info(signed)

    @staticmethod
    def _root_info(signed: SignedRoot) -> RootInfo:
        meta = decode_root_body(signed.body)
        return {"fleet": meta.fleet, "version": meta.version,
                "release_key": meta.release_key.hex(), "key_id": key_id(meta.release_key),
                "fingerprint": root_fingerprint(signed)}

    def roots(self, fleet: str, since: int, device: Device | None) -> dict[str, Any]:
        """GET /fleets/{fleet}/root: the fleet's roots newer than `since`, oldest first, at most
        MAX_ROOT_CHAIN (a device asks again from the last one it verified)."""
        if device is not None and device.fleet != fleet:
            raise NotFound(f"no fleet {fleet}")
        documents = self.store.roots(fleet, since, MAX_ROOT_CHAIN)
        return {"fleet": fleet,
                "roots": [signed_root_to_json(decode_signed_root(d)) for d in documents]}

    # -- freeze detection: timestamps (docs/security.md) ---------------------------------------

    def timestamp_public_key(self) -> str:
        return bytes(self.timestamp_key.verify_key).hex()

    def set_timestamp_grant(self, fleet: str, grant_hex: str) -> dict[str, Any]:
        """Keep the operator's grant of our timestamp key for `fleet`, once it verifies with
        the fleet's release key and names our key."""
        key = self.store.release_key(fleet)
        if key is None:
            raise Conflict(f"fleet {fleet} has no release key: set it before granting the "
                           "timestamp key")
        try:
            raw = bytes.fromhex(grant_hex)
            grant = verify_timestamp_grant(raw, bytes.fromhex(key.public_key), fleet)
        except VerificationError as exc:
            raise Forbidden(f"grant not signed with fleet {fleet}'s release key: "
                            f"{exc}") from None
        except (ValueError, ReleaseError) as exc:
            raise ControlError(f"grant: not a hex encoded signed timestamp grant: "
                               f"{exc}") from None
        if grant.public_key != bytes(self.timestamp_key.verify_key):
            raise Conflict("grant names another timestamp key than this coordinator's "
                           f"({self.timestamp_public_key()})")
        self.store.set_meta(_GRANT_META + fleet, raw.hex())
        return {"fleet": fleet, "public_key": grant.public_key.hex(),
                "granted_at": grant.granted_at}

    def device_timestamp(self, device: Device) -> bytes | None:
        """A fresh timestamp of the device's fleet (its newest release per app), signed now;
        None if the operator has not granted our timestamp key for the fleet."""
        grant = self.store.get_meta(_GRANT_META + device.fleet)
        if grant is None:
            return None
        now = int(self.clock())
        newest = tuple(sorted((app, t.version) for app, t in self._newest(device.fleet).items()))
        stamp = Timestamp(device.fleet, newest, now, now + self.timestamp_lifetime)
        return sign_timestamp(stamp, bytes.fromhex(grant), self.timestamp_key)

    def set_target(self, fleet: str, app: str, version: int, device: str | None,
                   pin_hex: str | None) -> TargetInfo:
        self._release(fleet, app, version)
        if device is not None:
            dev = self.store.device_by_name(device)
            if dev is None or dev.fleet != fleet or dev.state is DeviceState.REVOKED:
                raise NotFound(f"no device {device!r} in fleet {fleet}")
        pin_bytes: bytes | None = None
        if pin_hex is not None:
            try:
                pin_bytes = bytes.fromhex(pin_hex)
                signed_pin = decode_signed_pin(pin_bytes)
            except (ValueError, ManifestError) as exc:
                raise ControlError(f"pin: not a hex encoded signed pin: {exc}") from None
        latest = self.store.latest_version(fleet, app)
        key = self.store.release_key(fleet)
        if latest is not None and version < latest:
            if key is None:
                raise Conflict(f"{app} version {version} is older than the latest ({latest}): "
                               "a rollback needs a signed pin; set the fleet's release key "
                               "first")
            if pin_bytes is None:
                raise Conflict(f"{app} version {version} is older than the latest ({latest}): "
                               "a rollback needs a pin signed with the fleet's release key")
        if pin_bytes is not None:
            pin = checked_pin(signed_pin, key, fleet, self.clock())
            if (pin.fleet, pin.app, pin.version) != (fleet, app, version) or \
                    pin.device not in (None, device):
                raise ControlError(
                    f"pin names {pin.app} version {pin.version} in fleet {pin.fleet}"
                    f"{'' if pin.device is None else ' for device ' + pin.device}, not "
                    f"{app} version {version}{'' if device is None else ' for ' + device}")
        target = FleetTarget(fleet, app, version, device, pin_bytes, self.clock())
        self.store.set_target(target)
        self.targets_changed(fleet, device)
        return target_info(target)

    def _newest(self, fleet: str, rollouts: list[RolloutRecord] | None = None
                ) -> dict[str, FleetTarget]:
        """Per app: the fleet's newest release, as the target of devices nobody pinned. A
        bad release (its rollout halted or aborted) is never the default, nor is a held one
        (published for nobody): both fall to the release below them."""
        if rollouts is None:
            rollouts = self.store.rollouts(fleet)
        skipped = {(r.app, r.version) for r in rollouts if r.state in (*ROLLOUT_BAD, "held")}
        newest: dict[str, FleetTarget] = {}
        for r in self.store.list_releases(fleet):
            if (r.app, r.version) in skipped:
                continue
            if r.app not in newest or r.version > newest[r.app].version:
                newest[r.app] = FleetTarget(fleet, r.app, r.version, None, None, r.published_at)
        return newest

    def previous_version(self, fleet: str, app: str, version: int) -> int | None:
        """The release a rollout of `version` falls back to: the highest published version
        below it that is not itself bad (its rollout halted or aborted)."""
        bad = {r.version for r in self.store.rollouts(fleet) if r.app == app and
               r.state in ROLLOUT_BAD}
        below = [r.version for r in self.store.list_releases(fleet, app)
                 if r.version < version and r.version not in bad]
        return max(below, default=None)

    def _targets_of(self, device: Device) -> dict[str, DeviceChoice]:
        rollouts = self.store.rollouts(device.fleet)
        return resolve_targets(self.store.targets(device.fleet), device,
                               self._newest(device.fleet, rollouts), rollouts)

    def device_targets(self, device: Device) -> list[DeviceTargetInfo]:
        """Per app: the device's target, with the operator's force and retry counter and
        its rollout's hold and window."""
        controls = self.store.app_controls(device.id)
        out: list[DeviceTargetInfo] = []
        for app, c in sorted(self._targets_of(device).items()):
            t = c.target
            control = controls.get(app, AppControl())
            out.append({"app": app, "version": t.version,
                        "pin": None if t.pin is None else t.pin.hex(),
                        "force": control.force_version == t.version, "retry": control.retry,
                        "hold": c.hold, "window": c.window})
        return out

    # -- operator actions on devices (issue 6: update locks, retries) -----------------------

    def _live_device(self, name: str) -> Device:
        device = self.store.device_by_name(name)
        if device is None or device.state is not DeviceState.ACTIVE:
            raise NotFound(f"no enrolled device {name!r}")
        return device

    def force(self, name: str, app: str, force: bool) -> ForceAnswer:
        """Force the device past its update lock for its current target of `app` (or take
        that back); the force goes by itself once the device runs that version or a newer."""
        device = self._live_device(name)
        choice = self._targets_of(device).get(app)
        if choice is None:
            raise Conflict(f"device {name} has no target for {app}: set one first")
        self.store.set_force(device.id, app, choice.target.version if force else None)
        self.targets_changed(device.fleet, device.name)
        return {"device": name, "app": app, "version": choice.target.version, "force": force}

    def retry_device(self, name: str, app: str) -> DeviceRetryAnswer:
        """Let the device try again the version of `app` it marked failed."""
        device = self._live_device(name)
        retry = self.store.add_retry([device.id], app)[device.id]
        self.targets_changed(device.fleet, device.name)
        return {"device": name, "app": app, "retry": retry}

    def retry_release(self, fleet: str, app: str, version: int) -> ReleaseRetryAnswer:
        """A retry for every device of the fleet that failed this release."""
        self._release(fleet, app, version)
        statuses = self.store.app_statuses(fleet)
        failed = [d for d in self.store.list_devices(fleet) if d.state is DeviceState.ACTIVE
                  and _failed(_status_of(statuses, d, app), version)]
        retries = self.store.add_retry([d.id for d in failed], app)
        for d in failed:
            self.targets_changed(fleet, d.name)
        return {"fleet": fleet, "app": app, "version": version,
                "devices": [{"device": d.name, "retry": retries[d.id]} for d in failed]}

    # -- rollout status ------------------------------------------------------------------------

    def release_status(self, fleet: str, app: str, version: int,
                       online: Callable[[Device], bool], lock_stale_after: float
                       ) -> dict[str, Any]:
        """Where every device concerned by the release stands (docs/api.md "Rollouts")."""
        self._release(fleet, app, version)
        now = self.clock()
        targets = self.store.targets(fleet)
        rollouts = self.store.rollouts(fleet)
        newest = self._newest(fleet, rollouts)
        statuses = self.store.app_statuses(fleet)
        rollout = next((r for r in rollouts if (r.app, r.version) == (app, version)), None)
        members = {} if rollout is None or rollout.data is None else \
            rollout.data.get("devices", {})
        rows = []
        for d in self.store.list_devices(fleet):
            if d.state is not DeviceState.ACTIVE:
                continue
            choice = resolve_targets(targets, d, newest, rollouts).get(app)
            target = None if choice is None else choice.target
            status = _status_of(statuses, d, app)
            state = device_release_state(version, None if target is None else target.version,
                                         status)
            if state is None:
                continue
            current = status is not None and status.target == version
            rows.append({
                "device": d.name, "state": state,
                "bytes_done": status.bytes_done if current and status else 0,
                "bytes_total": status.bytes_total if current and status else 0,
                "running": None if status is None else status.running,
                "target": (target.version if target is not None
                           else None if status is None else status.target),
                "online": online(d),
                "error": status.error if status is not None
                and state in ("failed", "no-platform") else None,
                "lock_since": None if status is None else status.lock_since,
                "lock_stale": lock_stale(status, now, lock_stale_after),
                "by_source": (status.by_source if current and status else SourceBytes()
                              ).to_json(),
                "updated_at": None if status is None else status.updated_at,
                "phase": _member_phase(members, d.name)})
        summary = {"total": len(rows)}
        for key, states in SUMMARY_STATES.items():
            summary[key] = sum(1 for r in rows if r["state"] in states)
        return {"fleet": fleet, "app": app, "version": version, "devices": rows,
                "summary": summary, "rollout": rollout_summary(rollout)}


# States of a device in a rollout beyond the agent's APPLY_STATES (mesh.control.APP_STATES).
SUPERSEDED: Final = "superseded"  # runs a newer version of the app
PENDING: Final = "pending"  # targeted, but its agent has not reported working on it yet
SUMMARY_STATES: Final = {
    "running": ("running",), "failed": ("failed",), "downloading": ("downloading",),
    "waiting": ("waiting-lock", "waiting-phase", "waiting-window"), "pending": (PENDING,),
    "superseded": (SUPERSEDED,), "no_platform": ("no-platform",)}


def chosen_targets(targets: list[FleetTarget], device: str,
                   newest: dict[str, FleetTarget] | None = None) -> dict[str, FleetTarget]:
    """Per app: the device's own target (a pin) over the fleet's (the operator holds the
    fleet on a release) over the fleet's newest release."""
    chosen: dict[str, FleetTarget] = dict(newest or {})
    fleet_set: set[str] = set()
    for t in targets:
        if t.device is None:
            if t.app not in fleet_set:
                fleet_set.add(t.app)
                if chosen.get(t.app) is None or chosen[t.app].device is None:
                    chosen[t.app] = t
        elif t.device == device:
            chosen[t.app] = t
    return chosen


@dataclass(frozen=True, slots=True)
class DeviceChoice:
    """What one device should run of one app: the target, and what its rollout adds."""

    target: FleetTarget
    hold: bool = False  # download it, do not apply it: the device's phase has not started
    window: str | None = None  # apply only inside this window, in the device's local time


def _member_phase(members: dict[str, Any], name: str) -> int | None:
    entry = members.get(name)
    phase = entry.get("phase") if isinstance(entry, dict) else None
    return phase if isinstance(phase, int) else None


def _window_tag(device: Device) -> str | None:
    """The device's `window` tag as a window (a tag that is not one holds nothing back)."""
    text = device.tags.get("window")
    if not text:
        return None
    try:
        return str(Window.parse(text))
    except RolloutSpecError:
        return None


def stored_rollout(record: RolloutRecord) -> core.Rollout:
    """The core's Rollout of a stored record (a held one has no JSON of its own)."""
    if record.data is None:
        return core.held(record.fleet, record.app, record.version, record.previous,
                         record.created_at)
    return replace(core.Rollout.from_json(record.data), state=record.state)


def resolve_targets(targets: list[FleetTarget], device: Device,
                    newest: dict[str, FleetTarget], rollouts: list[RolloutRecord]
                    ) -> dict[str, DeviceChoice]:
    """Per app: what the device should run (docs/rollouts.md, "Targets"). Its own target
    wins; a release with a rollout goes to the devices of its started phases (hold for the
    later ones, the previous release for the others); a bad release's previous version goes
    to everyone with the rollback pin."""
    by_release = {(r.app, r.version): r for r in rollouts}
    out: dict[str, DeviceChoice] = {}
    for app, chosen in chosen_targets(targets, device.name, newest).items():
        if chosen.device is not None:  # the operator's word for this device
            out[app] = DeviceChoice(chosen)
            continue
        # The way back from a bad release above this one: its rollback pin lets the devices
        # that ran it go back (the others already run this one).
        back = next((r for r in sorted(rollouts, key=lambda r: -r.version)
                     if r.app == app and r.state in ROLLOUT_BAD and r.previous == chosen.version
                     and r.rollback_pin is not None), None)
        t = chosen if back is None else FleetTarget(chosen.fleet, app, chosen.version, None,
                                                     back.rollback_pin, chosen.set_at)
        record = by_release.get((app, t.version))
        if record is None:
            out[app] = DeviceChoice(t, window=None if back else _window_tag(device))
            continue
        try:
            rollout = stored_rollout(record)
        except ValueError:  # a damaged row: the release is treated as held, never as out
            rollout = core.held(record.fleet, app, record.version, record.previous, 0.0)
        decided = core.target_for(rollout, device.name, device.tags.get("window"))
        if decided.version is None:
            continue
        if decided.version == t.version:
            out[app] = DeviceChoice(t, hold=decided.hold,
                                    window=None if back else decided.window)
        else:
            pin = record.rollback_pin if decided.pin_needed else None
            out[app] = DeviceChoice(FleetTarget(t.fleet, app, decided.version, None, pin,
                                                t.set_at))
    return out


def checked_pin(signed: SignedPin, key: FleetReleaseKey | None, fleet: str, now: float,
                field: str = "pin") -> ReleasePin:
    """A signed pin verified with the fleet's release key (only decoded while the fleet has
    none) and not expired: 403 for another key, 400 otherwise."""
    try:
        if key is not None:
            pin = verify_pin(signed, bytes.fromhex(key.public_key))
        else:
            pin = decode_pin(signed.pin)
    except VerificationError as exc:
        raise Forbidden(f"{field} not signed with fleet {fleet}'s release key: {exc}") from None
    except ManifestError as exc:
        raise ControlError(f"{field}: {exc}") from None
    if pin.expires_at <= now:
        raise ControlError(f"{field} expired at {pin.expires_at} (Unix time): devices would "
                           "refuse it; sign a new one")
    return pin


def _status_of(statuses: dict[str, list[AppStatus]], device: Device, app: str
               ) -> AppStatus | None:
    return next((s for s in statuses.get(device.id, ()) if s.app == app), None)


def _failed(status: AppStatus | None, version: int) -> bool:
    return status is not None and (version in status.failed or (
        status.target == version and status.state == "failed"))


def device_release_state(version: int, target: int | None, status: AppStatus | None
                         ) -> str | None:
    """The state of one device in the rollout of `version`: the agent's own state while it
    works on that version, "running" once it runs it, "failed" if it failed it (also when its
    target has moved on), "superseded" once it runs a newer one, "pending" while it is
    targeted but has not reported on it yet; None if the release does not concern it."""
    if status is not None and status.running is not None and status.running > version \
            and target != version:  # (a rollback pin to `version` is still to come)
        return SUPERSEDED
    if status is not None and status.running == version:
        return "running"
    if _failed(status, version):
        return "failed"
    if status is not None and status.target == version:
        # "idle" or "running" about a version it does not run: a report from mid-switch
        return PENDING if status.state in ("idle", "running") else status.state
    return PENDING if target == version else None


def lock_stale(status: AppStatus | None, now: float, after: float) -> bool:
    """The app has held its update lock for longer than `after` seconds: shown to the
    operator, never acted on."""
    return status is not None and status.lock_since is not None and \
        now - status.lock_since > after
