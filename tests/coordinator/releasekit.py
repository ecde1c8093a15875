"""Build real releases (mesh.release) for the coordinator's registry tests."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import blake3
from nacl.signing import SigningKey

from mesh.release import (
    DEFAULT_PIN_LIFETIME,
    Layer,
    LayerDelta,
    ReleaseManifest,
    chunk_layer,
    diff_id,
    encode_signed_manifest,
    encode_signed_pin,
    new_pin,
    sign_manifest,
    sign_pin,
)

SMALL_CHUNK = 16 * 1024  # several chunks per layer without megabytes of test data


@dataclass
class Built:
    signed: bytes
    manifest: ReleaseManifest
    blobs: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # id -> (bytes, kind)

    @property
    def chunk_ids(self) -> list[str]:
        return [i for i, (_, k) in self.blobs.items() if k == "chunk"]

    @property
    def delta_ids(self) -> list[str]:
        return [i for i, (_, k) in self.blobs.items() if k == "delta"]


def build(key: SigningKey, *, fleet: str = "fleet", app: str = "app", version: int = 1,
          layers: list[bytes] | None = None, delta: bytes | None = None) -> Built:
    layers = layers if layers is not None else [os.urandom(40_000)]
    blobs: dict[str, tuple[bytes, str]] = {}
    out = []
    for i, data in enumerate(layers):
        chunks = chunk_layer(data, SMALL_CHUNK)
        for c in chunks:
            blobs[c.ref.id.hex()] = (c.data, "chunk")
        deltas: tuple[LayerDelta, ...] = ()
        if delta is not None and i == 0:
            did = blake3.blake3(delta).digest()
            blobs[did.hex()] = (delta, "delta")
            deltas = (LayerDelta("sha256:" + "0" * 64, did, len(delta), "HDIFF"),)
        out.append(Layer(diff_id(data), len(data), tuple(c.ref for c in chunks), deltas))
    manifest = ReleaseManifest(fleet, app, version, 1_700_000_000 + version, b'{"a":1}',
                               tuple(out))
    return Built(encode_signed_manifest(sign_manifest(manifest, key)), manifest, blobs)


def pin(key: SigningKey, fleet: str, app: str, version: int, device: str | None = None, *,
        now: float | None = None, lifetime: int = DEFAULT_PIN_LIFETIME) -> bytes:
    """An encoded signed pin, signed at `now` (the wall clock by default)."""
    at = time.time() if now is None else now
    return encode_signed_pin(sign_pin(new_pin(fleet, app, version, device, now=at,
                                              lifetime=lifetime), key))
