"""The one place release values become bytes and back.

Every value is a msgpack array whose first element is a type tag and whose fields follow in a
fixed order, so an encoding is canonical: decode re-encodes and rejects any input that does not
reproduce itself byte for byte (map order, integer widths, float forms), which makes the signed
bytes the only form of a manifest. Sizes and counts are bounded before and while unpacking;
every malformed input raises ManifestError.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable
from typing import Any, Final, TypeVar

import msgpack

from mesh.names import APP_NAME_RE, MAX_APP_NAME
from mesh.release._model import (
    MAX_ROOT_KEYS,
    ChunkRef,
    ContainerSettings,
    HealthCheck,
    HealthKind,
    Layer,
    LayerDelta,
    ManifestError,
    NetworkMode,
    PlatformImage,
    ReleaseManifest,
    ReleasePin,
    RestartPolicy,
    RootError,
    RootMetadata,
    SignedManifest,
    SignedPin,
    SignedRoot,
    UpdateStrategy,
    Volume,
)
from mesh.release._platform import image_platform, parse_platform

MAX_MANIFEST_BYTES: Final = 8 * 1024 * 1024
MAX_ENVELOPE_BYTES: Final = MAX_MANIFEST_BYTES + 1024
MAX_PIN_BYTES: Final = 4096
# Images per release: amd64, arm64, arm/v7, arm/v6, 386, ppc64le, s390x, riscv64 are the
# platforms official Docker images ship; 8 covers them, more is a mistake.
MAX_PLATFORMS: Final = 8
MAX_LAYERS: Final = 128  # moby's overlay2 driver refuses deeper images (overlay2 maxDepth)
MAX_CHUNKS_PER_LAYER: Final = 4096  # 16 GiB at CHUNK_SIZE = 4 MiB
MAX_DELTAS_PER_LAYER: Final = 16  # bases kept per layer; older releases fall back to chunks
MAX_NAME: Final = MAX_APP_NAME  # fleet and app names, and a pin's device (mesh.names)
MAX_ARG: Final = 131072  # Linux MAX_ARG_STRLEN: longest single argv/env string
MAX_PATH: Final = 4096  # Linux PATH_MAX
MAX_ARGS: Final = 1024
MAX_ENV: Final = 1024
MAX_VOLUMES: Final = 64
MAX_IMAGE_CONFIG: Final = 1024 * 1024
MAX_KEY_ID: Final = 64
MAX_SIZE: Final = 1 << 40  # 1 TiB: any layer, chunk or patch size beyond is malformed
MAX_VERSION: Final = (1 << 63) - 1
# A root body with 16 keys is about 700 bytes; 8 KiB bounds what a device parses before any
# signature is checked. Its JSON document: the body in base64 and 16 signatures.
MAX_ROOT_BODY: Final = 8 * 1024
MAX_ROOT_DOCUMENT: Final = 32 * 1024
MAX_HTTP_PATH: Final = 2048  # far below every server's request-line limit (nginx: 8 KiB)
# Health timing: probes at most 10 per second and at least once an hour; a commit waits at most
# a day. Anything outside is a typo, not a policy.
MIN_HEALTH_INTERVAL: Final = 0.1
MAX_HEALTH_INTERVAL: Final = 3600.0
MAX_HEALTH_WAIT: Final = 86400.0

_OLD_MANIFEST_TAG: Final = "fleetmesh.release/1"  # before health kinds and apply strategies

# /2: one image, whose platform is the one its config states; /3: one image per platform,
# each named. A one-image release is still written as /2, byte for byte as before.
_MANIFEST_TAG: Final = "fleetmesh.release/2"
_MULTI_MANIFEST_TAG: Final = "fleetmesh.release/3"
_OLD_PIN_TAG: Final = "fleetmesh.pin/1"  # before serials and expiry: replayable for ever
_PIN_TAG: Final = "fleetmesh.pin/2"
_SIGNED_TAG: Final = "fleetmesh.signed-release/1"
_SIGNED_PIN_TAG: Final = "fleetmesh.signed-pin/1"
_ROOT_TAG: Final = "fleetmesh.root/1"
_ROOT_DOCUMENT_FORMAT: Final = "fleetmesh-signed-root-v1"
_DIFF_ID: Final = re.compile(r"sha256:[0-9a-f]{64}\Z")

T = TypeVar("T")


# ---- encoding ------------------------------------------------------------------------------

def _pack(obj: object) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def _layers_obj(layers: tuple[Layer, ...]) -> list[object]:
    return [[layer.diff_id, layer.size,
             [[ch.id, ch.size, ch.stored_size] for ch in layer.chunks],
             [[d.source_diff_id, d.blob_id, d.size, d.method] for d in layer.deltas]]
            for layer in layers]


def _manifest_obj(m: ReleaseManifest) -> list[object]:
    c = m.container
    hc = c.health_check
    multi = bool(m.platform or m.more_images)
    return [
        _MULTI_MANIFEST_TAG if multi else _MANIFEST_TAG,
        m.fleet, m.app, m.version, m.created_at, m.image_config, _layers_obj(m.layers),
        [list(c.command), [[k, v] for k, v in c.environment], c.restart_policy.value,
         None if hc is None else [hc.kind.value, list(hc.command), hc.port, hc.path,
                                  float(hc.seconds), float(hc.interval_s)],
         c.update_strategy.value,
         [[v.source, v.target, v.read_only] for v in c.volumes],
         float(c.health_timeout_s), float(c.hand_over_timeout_s), c.network.value],
    ] + ([m.platform, [[i.platform, i.image_config, _layers_obj(i.layers)]
                       for i in m.more_images]] if multi else [])


def encode_manifest(manifest: ReleaseManifest) -> bytes:
    """Canonical bytes of `manifest`; raises ManifestError if it breaks a limit."""
    data = _pack(_manifest_obj(manifest))
    # Round-trip through the decoder so that nothing unencodable-back is ever signed.
    decode_manifest(data)
    return data


def _pin_obj(pin: ReleasePin) -> list[Any]:
    return [_PIN_TAG, pin.fleet, pin.app, pin.version, pin.device, pin.serial, pin.expires_at]


def encode_pin(pin: ReleasePin) -> bytes:
    """Canonical bytes of `pin`; ManifestError if it breaks a limit or lacks its serial or
    expiry."""
    data = _pack(_pin_obj(pin))
    decode_pin(data)
    return data


def encode_signed_manifest(signed: SignedManifest) -> bytes:
    return _pack([_SIGNED_TAG, signed.manifest, signed.signature, signed.key_id])


def encode_signed_pin(signed: SignedPin) -> bytes:
    return _pack([_SIGNED_PIN_TAG, signed.pin, signed.signature, signed.key_id])


# ---- decoding ------------------------------------------------------------------------------

def _unpack(data: bytes, limit: int) -> Any:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ManifestError("expected bytes")
    if len(data) > limit:
        raise ManifestError(f"{len(data)} bytes exceeds the limit of {limit}")
    try:
        return msgpack.unpackb(
            bytes(data), raw=False, use_list=True, strict_map_key=True, max_str_len=MAX_ARG,
            max_bin_len=max(MAX_IMAGE_CONFIG, limit), max_array_len=MAX_CHUNKS_PER_LAYER,
            max_map_len=0, max_ext_len=0)
    # ExtraData, FormatError, StackError and UnicodeDecodeError are ValueErrors; the limits raise
    # ValueError too.
    except (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException) as exc:
        raise ManifestError(f"not valid msgpack: {type(exc).__name__}") from None


def _list(x: object, n: int | None = None, *, max_len: int | None = None,
          what: str = "value") -> list[Any]:
    if not isinstance(x, list):
        raise ManifestError(f"{what}: expected an array")
    if n is not None and len(x) != n:
        raise ManifestError(f"{what}: expected {n} fields, got {len(x)}")
    if max_len is not None and len(x) > max_len:
        raise ManifestError(f"{what}: more than {max_len} entries")
    return x


def _str(x: object, max_len: int, what: str) -> str:
    if not isinstance(x, str) or len(x) > max_len:
        raise ManifestError(f"{what}: expected a string of at most {max_len} characters")
    return x


def _name(x: object, what: str) -> str:
    s = _str(x, MAX_NAME, what)
    if not APP_NAME_RE.match(s):
        raise ManifestError(f"{what}: {s!r} is not a valid name")
    return s


def _int(x: object, lo: int, hi: int, what: str) -> int:
    if not isinstance(x, int) or isinstance(x, bool) or not lo <= x <= hi:
        raise ManifestError(f"{what}: expected an integer in [{lo}, {hi}]")
    return x


def _float(x: object, what: str) -> float:
    if not isinstance(x, float) or not 0.0 <= x <= 1e9:
        raise ManifestError(f"{what}: expected a non-negative float")
    return x


def _bin(x: object, what: str, *, size: int | None = None, max_len: int = MAX_ARG) -> bytes:
    if not isinstance(x, bytes):
        raise ManifestError(f"{what}: expected bytes")
    if size is not None and len(x) != size:
        raise ManifestError(f"{what}: expected {size} bytes")
    if len(x) > max_len:
        raise ManifestError(f"{what}: more than {max_len} bytes")
    return x


def _bool(x: object, what: str) -> bool:
    if not isinstance(x, bool):
        raise ManifestError(f"{what}: expected a boolean")
    return x


def _diff_id(x: object, what: str) -> str:
    s = _str(x, 71, what)
    if not _DIFF_ID.match(s):
        raise ManifestError(f"{what}: expected sha256:<64 hex digits>")
    return s


def _enum(cls: Callable[[str], T], x: object, what: str) -> T:
    try:
        return cls(_str(x, 64, what))
    except ValueError:
        raise ManifestError(f"{what}: unknown value {x!r}") from None


def _canonical(data: bytes, obj: object, what: str) -> None:
    if _pack(obj) != bytes(data):
        raise ManifestError(f"{what} is not in canonical form")


def _layer(x: object) -> Layer:
    diff_id, size, chunks, deltas = _list(x, 4, what="layer")
    layer_id = _diff_id(diff_id, "layer diff ID")
    chunk_refs = tuple(
        ChunkRef(_bin(c[0], "chunk id", size=32), _int(c[1], 0, MAX_SIZE, "chunk size"),
                 _int(c[2], 0, MAX_SIZE, "chunk stored size"))
        for c in (_list(c, 3, what="chunk")
                  for c in _list(chunks, max_len=MAX_CHUNKS_PER_LAYER, what="chunks")))
    layer_size = _int(size, 0, MAX_SIZE, "layer size")
    if sum(c.size for c in chunk_refs) != layer_size:
        raise ManifestError(f"layer {layer_id}: chunk sizes do not add up to the layer size")
    delta_refs = tuple(
        LayerDelta(_diff_id(d[0], "delta source"), _bin(d[1], "delta blob id", size=32),
                   _int(d[2], 0, MAX_SIZE, "delta size"), _str(d[3], 32, "delta method"))
        for d in (_list(d, 4, what="delta")
                  for d in _list(deltas, max_len=MAX_DELTAS_PER_LAYER, what="deltas")))
    return Layer(layer_id, layer_size, chunk_refs, delta_refs)


def _bounded(x: object, lo: float, hi: float, what: str) -> float:
    value = _float(x, what)
    if not lo <= value <= hi:
        raise ManifestError(f"{what}: must be between {lo:g} and {hi:g} seconds")
    return value


def _health(x: object, network: NetworkMode) -> HealthCheck:
    kind_s, command, port, path, seconds, interval = _list(x, 6, what="health check")
    kind = _enum(HealthKind, kind_s, "health check kind")
    hc = HealthCheck(
        kind,
        tuple(_str(a, MAX_ARG, "health command") for a in
              _list(command, max_len=MAX_ARGS, what="health command")),
        _int(port, 0, 65535, "health port"), _str(path, MAX_HTTP_PATH, "health path"),
        _bounded(seconds, 0.0, MAX_HEALTH_WAIT, "health running time"),
        _bounded(interval, MIN_HEALTH_INTERVAL, MAX_HEALTH_INTERVAL, "health interval"))
    unused = HealthCheck(kind)
    if kind is HealthKind.CMD:
        if not hc.command:
            raise ManifestError("health check cmd: the command is empty")
    elif hc.command != unused.command:
        raise ManifestError(f"health check {kind.value}: takes no command")
    if kind in (HealthKind.TCP, HealthKind.HTTP):
        if hc.port == 0:
            raise ManifestError(f"health check {kind.value}: needs a port in [1, 65535]")
        if network is NetworkMode.NONE:
            raise ManifestError(f"health check {kind.value}: the agent cannot reach a port of a "
                                "container without a network; use a cmd check")
    elif hc.port != unused.port:
        raise ManifestError(f"health check {kind.value}: takes no port")
    if kind is HealthKind.HTTP:
        if not hc.path.startswith("/") or not hc.path.isprintable() or " " in hc.path:
            raise ManifestError("health check http: the path must start with / and hold no "
                                "spaces or control characters")
    elif hc.path != unused.path:
        raise ManifestError(f"health check {kind.value}: takes no path")
    if kind is HealthKind.RUNNING:
        if hc.seconds <= 0.0:
            raise ManifestError("health check running: needs a time above 0 seconds")
    elif hc.seconds != unused.seconds:
        raise ManifestError(f"health check {kind.value}: takes no running time")
    return hc


def _container(x: object) -> ContainerSettings:
    (command, env, restart, health, strategy, volumes, health_timeout, hand_over_timeout,
     network_s) = _list(x, 9, what="container settings")
    network = _enum(NetworkMode, network_s, "network")
    hc = None if health is None else _health(health, network)
    return ContainerSettings(
        command=tuple(_str(a, MAX_ARG, "command") for a in
                      _list(command, max_len=MAX_ARGS, what="command")),
        environment=tuple(
            (_str(e[0], MAX_ARG, "environment name"), _str(e[1], MAX_ARG, "environment value"))
            for e in (_list(e, 2, what="environment entry")
                      for e in _list(env, max_len=MAX_ENV, what="environment"))),
        restart_policy=_enum(RestartPolicy, restart, "restart policy"),
        health_check=hc,
        update_strategy=_enum(UpdateStrategy, strategy, "update strategy"),
        volumes=tuple(
            Volume(_str(v[0], MAX_PATH, "volume source"), _str(v[1], MAX_PATH, "volume target"),
                   _bool(v[2], "volume read-only"))
            for v in (_list(v, 3, what="volume")
                      for v in _list(volumes, max_len=MAX_VOLUMES, what="volumes"))),
        health_timeout_s=_bounded(health_timeout, 1.0, MAX_HEALTH_WAIT, "health timeout"),
        hand_over_timeout_s=_bounded(hand_over_timeout, 0.0, MAX_HEALTH_WAIT,
                                     "hand-over timeout"),
        network=network)


def _platform(x: object, config: bytes) -> str:
    """A named image's platform: canonical, and the one its config states."""
    text = _str(x, 64, "platform")
    platform = parse_platform(text)
    if platform != text:
        raise ManifestError(f"platform {text!r} is not in canonical form ({platform})")
    stated = image_platform(config)
    if stated != platform:
        raise ManifestError(f"the image for {platform} has a config for "
                            f"{stated or 'no platform'}")
    return platform


def _more_images(x: object, first: str) -> tuple[PlatformImage, ...]:
    entries = _list(x, max_len=MAX_PLATFORMS - 1, what="platform images")
    if not entries:
        raise ManifestError("a manifest naming its platforms has more than one image")
    seen = {first}
    images = []
    for entry in entries:
        platform_s, config_b, layers = _list(entry, 3, what="platform image")
        config = _bin(config_b, "image config", max_len=MAX_IMAGE_CONFIG)
        platform = _platform(platform_s, config)
        if platform in seen:
            raise ManifestError(f"platform {platform} has more than one image")
        seen.add(platform)
        images.append(PlatformImage(platform, config, tuple(
            _layer(y) for y in _list(layers, max_len=MAX_LAYERS, what="layers"))))
    return tuple(images)


def decode_manifest(data: bytes) -> ReleaseManifest:
    """The manifest in `data`; ManifestError for anything malformed or non-canonical."""
    obj = _unpack(data, MAX_MANIFEST_BYTES)
    tag = obj[0] if isinstance(obj, list) and obj else None
    if tag == _OLD_MANIFEST_TAG:
        raise ManifestError(f"manifest format {_OLD_MANIFEST_TAG} is no longer read: publish "
                            "the release again")
    if tag not in (_MANIFEST_TAG, _MULTI_MANIFEST_TAG):
        raise ManifestError("not a fleetmesh release manifest")
    fields = _list(obj, 8 if tag == _MANIFEST_TAG else 10, what="manifest")
    image_config = _bin(fields[5], "image config", max_len=MAX_IMAGE_CONFIG)
    platform, more = "", tuple[PlatformImage, ...]()
    if tag == _MULTI_MANIFEST_TAG:
        platform = _platform(fields[8], image_config)
        more = _more_images(fields[9], platform)
    manifest = ReleaseManifest(
        fleet=_name(fields[1], "fleet"),
        app=_name(fields[2], "app"),
        version=_int(fields[3], 1, MAX_VERSION, "version"),
        created_at=_int(fields[4], 0, MAX_VERSION, "creation time"),
        image_config=image_config,
        layers=tuple(_layer(x) for x in _list(fields[6], max_len=MAX_LAYERS, what="layers")),
        container=_container(fields[7]),
        platform=platform,
        more_images=more,
    )
    _canonical(data, _manifest_obj(manifest), "manifest")
    return manifest


def decode_pin(data: bytes) -> ReleasePin:
    obj = _unpack(data, MAX_PIN_BYTES)
    if isinstance(obj, list) and obj and obj[0] == _OLD_PIN_TAG:
        raise ManifestError(f"pin format {_OLD_PIN_TAG} (no serial, no expiry) is no longer "
                            "read: sign the pin again")
    fields = _list(obj, 7, what="pin")
    if fields[0] != _PIN_TAG:
        raise ManifestError("not a fleetmesh release pin")
    pin = ReleasePin(_name(fields[1], "fleet"), _name(fields[2], "app"),
                     _int(fields[3], 1, MAX_VERSION, "version"),
                     None if fields[4] is None else _name(fields[4], "device"),
                     _int(fields[5], 1, MAX_VERSION, "pin serial"),
                     _int(fields[6], 1, MAX_VERSION, "pin expiry"))
    _canonical(data, _pin_obj(pin), "pin")
    return pin


def decode_signed_manifest(data: bytes) -> SignedManifest:
    fields = _list(_unpack(data, MAX_ENVELOPE_BYTES), 4, what="signed manifest")
    if fields[0] != _SIGNED_TAG:
        raise ManifestError("not a signed fleetmesh release")
    return SignedManifest(_bin(fields[1], "manifest", max_len=MAX_MANIFEST_BYTES),
                          _bin(fields[2], "signature", size=64),
                          _str(fields[3], MAX_KEY_ID, "key id"))


def decode_signed_pin(data: bytes) -> SignedPin:
    fields = _list(_unpack(data, MAX_PIN_BYTES + 1024), 4, what="signed pin")
    if fields[0] != _SIGNED_PIN_TAG:
        raise ManifestError("not a signed fleetmesh pin")
    return SignedPin(_bin(fields[1], "pin", max_len=MAX_PIN_BYTES),
                     _bin(fields[2], "signature", size=64), _str(fields[3], MAX_KEY_ID, "key id"))



# ---- root metadata -------------------------------------------------------------------------
# The body is msgpack like a manifest (canonical: these bytes are what root keys sign and what
# the fingerprint hashes); the signed root travels and is stored as a small JSON document
# (`fleetmesh root` files, the coordinator's API, the device's copy) with the body in base64.

def _root_obj(meta: RootMetadata) -> list[object]:
    return [_ROOT_TAG, meta.fleet, meta.version, meta.threshold, list(meta.root_keys),
            meta.release_key, meta.issued]


def encode_root_body(meta: RootMetadata) -> bytes:
    """The canonical bytes that root keys sign; RootError if `meta` breaks a limit."""
    data = _pack(_root_obj(meta))
    decode_root_body(data)
    return data


def decode_root_body(data: bytes) -> RootMetadata:
    """The RootMetadata in `data`; RootError for anything malformed, non-canonical or too big."""
    try:
        fields = _list(_unpack(data, MAX_ROOT_BODY), 7, what="root")
        if fields[0] != _ROOT_TAG:
            raise ManifestError("not a fleetmesh root")
        meta = RootMetadata(
            fleet=_name(fields[1], "fleet"),
            version=_int(fields[2], 1, MAX_VERSION, "root version"),
            threshold=_int(fields[3], 1, MAX_ROOT_KEYS, "threshold"),
            root_keys=tuple(_bin(k, "root key", size=32)
                            for k in _list(fields[4], max_len=MAX_ROOT_KEYS, what="root keys")),
            release_key=_bin(fields[5], "release key", size=32),
            issued=_int(fields[6], 0, MAX_VERSION, "issue time"))
        _canonical(data, _root_obj(meta), "root")
    except ManifestError as exc:
        raise RootError(f"malformed root: {exc}") from None
    return meta


def signed_root_to_json(signed: SignedRoot) -> dict[str, object]:
    """The JSON object of a signed root (what files, the API and the device store hold)."""
    return {"format": _ROOT_DOCUMENT_FORMAT,
            "body": base64.b64encode(signed.body).decode("ascii"),
            "signatures": [{"key_id": kid, "signature": base64.b64encode(sig).decode("ascii")}
                           for kid, sig in signed.signatures]}


def _b64(x: object, what: str, max_len: int) -> bytes:
    if not isinstance(x, str) or len(x) > (max_len + 2) // 3 * 4:
        raise RootError(f"malformed root document: {what} is not base64 of at most "
                        f"{max_len} bytes")
    try:
        return base64.b64decode(x, validate=True)
    except (binascii.Error, ValueError):
        raise RootError(f"malformed root document: {what} is not base64") from None


def signed_root_from_json(obj: object) -> SignedRoot:
    """The SignedRoot in a parsed JSON object; RootError if malformed or over a limit. The body
    is decoded too (so a malformed one never gets further), the signatures are not checked."""
    if not isinstance(obj, dict) or obj.get("format") != _ROOT_DOCUMENT_FORMAT:
        raise RootError(f"not a signed root document (format {_ROOT_DOCUMENT_FORMAT})")
    if set(obj) != {"format", "body", "signatures"}:
        raise RootError("malformed root document: expected the fields format, body, signatures")
    body = _b64(obj["body"], "body", MAX_ROOT_BODY)
    decode_root_body(body)
    sigs = obj["signatures"]
    if not isinstance(sigs, list) or len(sigs) > MAX_ROOT_KEYS:
        raise RootError(f"malformed root document: signatures is a list of at most "
                        f"{MAX_ROOT_KEYS}")
    signatures = []
    for entry in sigs:
        if not isinstance(entry, dict) or set(entry) != {"key_id", "signature"}:
            raise RootError("malformed root document: a signature is {key_id, signature}")
        kid = entry["key_id"]
        if not isinstance(kid, str) or not re.fullmatch(r"[0-9a-f]{16}", kid):
            raise RootError("malformed root document: a key_id is 16 hex digits")
        sig = _b64(entry["signature"], "signature", 64)
        if len(sig) != 64:
            raise RootError("malformed root document: a signature is 64 bytes")
        signatures.append((kid, sig))
    return SignedRoot(body, tuple(signatures))


def encode_signed_root(signed: SignedRoot) -> bytes:
    """A signed root as a JSON document (UTF-8, ends with a newline)."""
    return (json.dumps(signed_root_to_json(signed), indent=2) + "\n").encode()


def decode_signed_root(data: bytes) -> SignedRoot:
    """The signed root in a JSON document; RootError if malformed or over a limit."""
    if len(data) > MAX_ROOT_DOCUMENT:
        raise RootError(f"root document of {len(data)} bytes exceeds the limit of "
                        f"{MAX_ROOT_DOCUMENT}")
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        raise RootError("root document is not JSON") from None
    return signed_root_from_json(obj)
