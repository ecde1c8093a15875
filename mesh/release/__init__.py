"""The release format shared by coordinator and agent: manifest, codec, signing, chunks."""

from mesh.release._chunks import (
    CHUNK_SIZE,
    Chunk,
    assemble,
    chunk_id,
    chunk_layer,
    diff_id,
    open_chunk,
    open_stored_chunk,
)
from mesh.release._codec import (
    decode_manifest,
    decode_pin,
    decode_signed_manifest,
    decode_signed_pin,
    encode_manifest,
    encode_pin,
    encode_signed_manifest,
    encode_signed_pin,
)
from mesh.release._image import (
    ImageError,
    LayerSource,
    MaterializedRelease,
    MaterializeError,
    SavedImage,
    SavedLayer,
    build_loadable_image,
    check_manifest_layers,
    config_diff_ids,
    docker_save,
    export_local_layers,
    file_diff_id,
    materialize_release,
    read_saved_image,
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
    key_id,
    read_signing_key,
    sign_manifest,
    sign_pin,
    verify_manifest,
    verify_pin,
    write_signing_key,
)

__all__ = [
    "CHUNK_SIZE", "Chunk", "ChunkError", "ChunkRef", "ContainerSettings", "HealthCheck",
    "HealthKind", "Layer", "LayerDelta", "ManifestError", "NetworkMode", "ReleaseError",
    "ReleaseManifest", "ReleasePin",
    "RestartPolicy", "SignedManifest", "SignedPin", "UpdateStrategy", "VerificationError",
    "Volume", "assemble", "chunk_id", "chunk_layer", "decode_manifest", "decode_pin",
    "decode_signed_manifest", "decode_signed_pin", "diff_id", "encode_manifest", "encode_pin",
    "encode_signed_manifest", "encode_signed_pin", "key_id", "open_chunk", "open_stored_chunk",
    "read_signing_key",
    "sign_manifest", "sign_pin", "verify_manifest", "verify_pin", "write_signing_key",
    # image tars and the device-side rebuild (_image.py)
    "ImageError", "LayerSource", "MaterializeError", "MaterializedRelease", "SavedImage",
    "SavedLayer", "build_loadable_image", "check_manifest_layers", "config_diff_ids",
    "docker_save", "export_local_layers", "file_diff_id", "materialize_release",
    "read_saved_image",
]
