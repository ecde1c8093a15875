"""What a release is: frozen, slotted values shared by the coordinator and the agent."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ReleaseError(Exception):
    """Base of every release-format error."""


class ManifestError(ReleaseError):
    """Bytes that are not a well-formed, canonical manifest (or pin, or signed envelope)."""


class VerificationError(ReleaseError):
    """A manifest or pin that is well formed but must not be trusted or installed."""


class ChunkError(ReleaseError):
    """A chunk or an assembled layer that does not match its content address."""


class RestartPolicy(enum.Enum):
    NO = "no"
    ON_FAILURE = "on-failure"
    UNLESS_STOPPED = "unless-stopped"
    ALWAYS = "always"


class UpdateStrategy(enum.Enum):
    STOP_THEN_START = "stop-then-start"  # frees ports and volumes first; short downtime
    START_THEN_STOP = "start-then-stop"  # new container must pass its health check first


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """One zstd-compressed piece of a layer, named by blake3 of its uncompressed bytes."""

    id: bytes  # blake3 digest, 32 bytes
    size: int  # uncompressed bytes
    stored_size: int  # compressed bytes on the wire


@dataclass(frozen=True, slots=True)
class LayerDelta:
    """A patch producing this layer from an earlier release's layer of the same app."""

    source_diff_id: str  # "sha256:<hex>" of the base layer tar
    blob_id: bytes  # blake3 digest of the patch bytes, 32 bytes
    size: int  # patch bytes
    method: str  # mesh.delta.Method name, e.g. "HDIFF"


@dataclass(frozen=True, slots=True)
class Layer:
    diff_id: str  # "sha256:<hex>" of the uncompressed layer tar (Docker's rootfs.diff_ids)
    size: int  # uncompressed tar bytes
    chunks: tuple[ChunkRef, ...]
    deltas: tuple[LayerDelta, ...] = ()


@dataclass(frozen=True, slots=True)
class HealthCheck:
    command: tuple[str, ...]
    interval_s: float = 30.0  # Docker's HEALTHCHECK defaults
    timeout_s: float = 30.0
    retries: int = 3
    start_period_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Volume:
    source: str  # named volume or host path
    target: str  # path inside the container
    read_only: bool = False


@dataclass(frozen=True, slots=True)
class ContainerSettings:
    command: tuple[str, ...] = ()
    environment: tuple[tuple[str, str], ...] = ()
    restart_policy: RestartPolicy = RestartPolicy.UNLESS_STOPPED
    health_check: HealthCheck | None = None
    update_strategy: UpdateStrategy = UpdateStrategy.STOP_THEN_START
    volumes: tuple[Volume, ...] = ()


@dataclass(frozen=True, slots=True)
class ReleaseManifest:
    fleet: str
    app: str
    version: int  # strictly increasing per (fleet, app)
    created_at: int  # Unix seconds
    image_config: bytes  # the image config JSON exactly as Docker hashed it (its sha256 = image ID)
    layers: tuple[Layer, ...]
    container: ContainerSettings = ContainerSettings()


@dataclass(frozen=True, slots=True)
class ReleasePin:
    """An operator's order to run `version` even if it is not newer (a deliberate rollback)."""

    fleet: str
    app: str
    version: int
    device: str | None = None  # None: every device of the fleet


@dataclass(frozen=True, slots=True)
class SignedManifest:
    manifest: bytes  # canonical encoding of a ReleaseManifest
    signature: bytes  # Ed25519, 64 bytes
    key_id: str


@dataclass(frozen=True, slots=True)
class SignedPin:
    pin: bytes  # canonical encoding of a ReleasePin
    signature: bytes
    key_id: str
