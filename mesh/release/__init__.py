"""The release format shared by coordinator and agent: manifest, codec, signing, chunks.

It imports nothing of mesh.delta (nor the other way round); image tars and the device-side
rebuild of a release, which need both, are mesh.image.
"""

from mesh.release._chunks import (
    CHUNK_SIZE,
    CHUNK_ZSTD_LEVEL,
    Chunk,
    assemble,
    chunk_id,
    chunk_layer,
    compress_chunk,
    diff_id,
    open_chunk,
    open_stored_chunk,
)
from mesh.release._codec import (
    MAX_DELTAS_PER_LAYER,
    MAX_ENVELOPE_BYTES,
    MAX_IMAGE_CONFIG,
    decode_manifest,
    decode_pin,
    decode_signed_manifest,
    decode_signed_pin,
    encode_manifest,
    encode_pin,
    encode_signed_manifest,
    encode_signed_pin,
)
from mesh.release._freshness import (
    Freshness,
    Timestamp,
    TimestampGrant,
    sign_timestamp,
    sign_timestamp_grant,
    verify_timestamp,
    verify_timestamp_grant,
)
from mesh.release._model import (
    ChunkError,
    ChunkRef,
    ContainerSettings,
    HealthCheck,
    HealthKind,
    Layer,
    LayerDelta,
    ManifestError,
    NetworkMode,
    ReleaseError,
    ReleaseManifest,
    ReleasePin,
    RestartPolicy,
    SignedManifest,
    SignedPin,
    UpdateStrategy,
    VerificationError,
    Volume,
)
from mesh.release._signing import (
    DEFAULT_PIN_LIFETIME,
    VerifiedRelease,
    admit_release,
    key_fingerprint,
    key_id,
    new_pin,
    read_signing_key,
    sign_manifest,
    sign_pin,
    verify_manifest,
    verify_pin,
    verify_release,
    write_signing_key,
)

__all__ = [
    "CHUNK_SIZE", "CHUNK_ZSTD_LEVEL", "DEFAULT_PIN_LIFETIME", "MAX_DELTAS_PER_LAYER",
    "MAX_ENVELOPE_BYTES", "MAX_IMAGE_CONFIG", "Chunk",
    "ChunkError", "ChunkRef", "ContainerSettings", "HealthCheck", "HealthKind", "Layer",
    "LayerDelta", "ManifestError", "NetworkMode", "ReleaseError", "ReleaseManifest", "ReleasePin",
    "RestartPolicy", "SignedManifest", "SignedPin", "UpdateStrategy", "VerificationError",
    "VerifiedRelease", "Volume", "Freshness", "Timestamp", "TimestampGrant", "sign_timestamp",
    "sign_timestamp_grant", "verify_timestamp", "verify_timestamp_grant", "admit_release",
    "assemble", "chunk_id", "chunk_layer", "compress_chunk",
    "decode_manifest", "decode_pin", "decode_signed_manifest", "decode_signed_pin", "diff_id",
    "encode_manifest", "encode_pin", "encode_signed_manifest", "encode_signed_pin",
    "key_fingerprint", "key_id", "new_pin",
    "open_chunk", "open_stored_chunk", "read_signing_key", "sign_manifest", "sign_pin",
    "verify_manifest", "verify_pin", "verify_release", "write_signing_key",
]
