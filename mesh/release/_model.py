"""What a release is: frozen, slotted values shared by the coordinator and the agent."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

# A fleet has at most 16 root-key holders, and a root at most as many signatures (TUF's roots
# have a handful; 16 leaves room for two generations of keys signing a rotation).
MAX_ROOT_KEYS: Final = 16


class ReleaseError(Exception):
    """Base of every release-format error."""


class ManifestError(ReleaseError):
    """Bytes that are not a well-formed, canonical manifest (or pin, or signed envelope)."""


class VerificationError(ReleaseError):
    """A manifest or pin that is well formed but must not be trusted or installed."""


class RootError(ReleaseError):
    """Root metadata (the fleet's k-of-n statement of its release key) that is malformed, or
    that must not be trusted."""


class ChunkError(ReleaseError):
    """A chunk or an assembled layer that does not match its content address."""


class RestartPolicy(enum.Enum):
    NO = "no"
    ON_FAILURE = "on-failure"
    UNLESS_STOPPED = "unless-stopped"
    ALWAYS = "always"


class UpdateStrategy(enum.Enum):
    # Fetch everything, load the image, then stop the old container and start the new one: the
    # app is down only for the swap (balena's default, "download-then-kill").
    DOWNLOAD_THEN_KILL = "download-then-kill"
    # Stop the old container as soon as the target arrives, then download: frees disk, memory
    # and the link for devices that cannot hold both (balena's "kill-then-download").
    KILL_THEN_DOWNLOAD = "kill-then-download"
    # Start the new container beside the old; stop the old once the new one is healthy or
    # after the hand-over timeout (balena's "hand-over"). The app must tolerate two instances.
    HAND_OVER = "hand-over"


class HealthKind(enum.Enum):
    CMD = "cmd"  # a command run inside the container; exit status 0 = healthy
    TCP = "tcp"  # a TCP connect to 127.0.0.1:port succeeds (host networking)
    HTTP = "http"  # GET http://127.0.0.1:port/path answers 2xx or 3xx
    RUNNING = "running"  # the container has been running, unrestarted, for `seconds`


class NetworkMode(enum.Enum):
    HOST = "host"  # the device's network namespace (the lab's engines run with --bridge none)
    NONE = "none"  # loopback only


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
    """The check that gates the commit of a new release (docs/agent-apply.md). The fields a
    kind does not use keep their defaults (the codec refuses anything else)."""

    kind: HealthKind
    command: tuple[str, ...] = ()  # cmd
    port: int = 0  # tcp, http
    path: str = "/"  # http
    seconds: float = 0.0  # running
    interval_s: float = 2.0  # between probes


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
    # None: the image's Docker HEALTHCHECK if it has one, else "running" for 5 s.
    health_check: HealthCheck | None = None
    update_strategy: UpdateStrategy = UpdateStrategy.DOWNLOAD_THEN_KILL
    volumes: tuple[Volume, ...] = ()
    health_timeout_s: float = 60.0  # a check not passed this long after the start fails
    hand_over_timeout_s: float = 60.0  # hand-over: the old one is stopped after this at most
    network: NetworkMode = NetworkMode.HOST


@dataclass(frozen=True, slots=True)
class PlatformImage:
    """One platform's image in a release: its config and layers (docs/releases.md, "Several
    platforms")."""

    platform: str  # "os/arch[/variant]", normalised (mesh.release.parse_platform)
    image_config: bytes
    layers: tuple[Layer, ...]


@dataclass(frozen=True, slots=True)
class ReleaseManifest:
    fleet: str
    app: str
    version: int  # strictly increasing per (fleet, app)
    created_at: int  # Unix seconds
    image_config: bytes  # the image config JSON exactly as Docker hashed it (its sha256 = image ID)
    layers: tuple[Layer, ...]
    container: ContainerSettings = ContainerSettings()
    # The platform of image_config and layers. "" only with one image: then it is the one the
    # image config states (mesh.release.release_images reads it).
    platform: str = ""
    # The images of the other platforms, one per platform (mesh.release.MAX_PLATFORMS in all).
    more_images: tuple[PlatformImage, ...] = ()


@dataclass(frozen=True, slots=True)
class ReleasePin:
    """An operator's order to run `version` even if it is not newer (a deliberate rollback).

    `serial` and `expires_at` keep an old pin from being replayed (docs/security.md): a device
    takes no pin past its expiry, none with a serial older than the newest pin it acted on,
    and not the same pin again once it moved on to a release without it. Both are required
    (the codec refuses 0); `mesh.release.new_pin` fills them in."""

    fleet: str
    app: str
    version: int
    device: str | None = None  # None: every device of the fleet
    serial: int = 0  # increases with every pin the operator signs: the signing time in µs
    expires_at: int = 0  # Unix seconds; a device refuses the pin from then on


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


@dataclass(frozen=True, slots=True)
class RootMetadata:
    """Which release key a fleet trusts, as stated by k of its n offline root keys.

    `root_keys` are Ed25519 public keys (32 bytes each, distinct); `threshold` of them must sign
    a root, and of the previous version's keys too, for a device to move to it (TUF's root
    rotation). `issued` is Unix seconds, informative.
    """

    fleet: str
    version: int
    threshold: int
    root_keys: tuple[bytes, ...]
    release_key: bytes
    issued: int

    def __post_init__(self) -> None:
        if not 1 <= len(self.root_keys) <= MAX_ROOT_KEYS:
            raise RootError(f"a root lists 1 to {MAX_ROOT_KEYS} root keys, not "
                            f"{len(self.root_keys)}")
        if any(not isinstance(k, bytes) or len(k) != 32 for k in self.root_keys):
            raise RootError("a root key is a 32-byte Ed25519 public key")
        if len(set(self.root_keys)) != len(self.root_keys):
            raise RootError("the root keys are not distinct")
        if not 1 <= self.threshold <= len(self.root_keys):
            raise RootError(f"threshold {self.threshold} is not between 1 and the "
                            f"{len(self.root_keys)} root keys")
        if not isinstance(self.release_key, bytes) or len(self.release_key) != 32:
            raise RootError("the release key is a 32-byte Ed25519 public key")
        if self.version < 1:
            raise RootError(f"root version {self.version} is below 1")


@dataclass(frozen=True, slots=True)
class SignedRoot:
    """The canonical bytes of a RootMetadata and the signatures collected for them so far:
    (key_id of the root key, 64-byte Ed25519 signature), one per root-key holder."""

    body: bytes
    signatures: tuple[tuple[str, bytes], ...] = ()

