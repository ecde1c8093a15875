"""The one codec for mesh frames: membership, manifest dissemination and blob exchange.

A frame is a 4-byte big-endian body length followed by a msgpack body `[type, *fields]`.
Everything that arrives from a peer passes through `decode` (or `FrameDecoder.feed`), which
checks types, arities, sizes and counts, and accepts only the canonical encoding (the one
`encode` produces), so a message has exactly one byte form. Anything else raises `WireError`,
and nothing else escapes: the driver counts it and drops the frame (docs/architecture.md, principle
5).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import msgpack

from mesh.blobs import BLOB_ID_LEN

HEADER_LEN: Final = 4
MAX_PIECE: Final = 1024 * 1024  # largest BlobData.data: one 1 MiB piece of a 4 MiB chunk
MAX_BODY: Final = MAX_PIECE + 4096  # a piece plus its header fields, with room to spare
MAX_FRAME: Final = HEADER_LEN + MAX_BODY
MAX_NODE_ID: Final = 63  # mesh.control.MAX_NAME_LEN: node ids are device names (DNS labels)
MAX_ADDRESS: Final = 45  # longest textual IPv6 address (INET6_ADDRSTRLEN - 1)
MAX_UPDATES: Final = 64  # piggybacked member updates per probe/gossip message
# Worst case member is ~121 bytes encoded; 8192 of them still fit MAX_BODY. A larger fleet sends a
# random subset per push-pull, which still converges (every exchange merges a different subset).
MAX_MEMBERS: Final = 8192
MAX_NAME: Final = 253  # mesh.release codec MAX_NAME: fleet and app names
MAX_VERSION: Final = (1 << 63) - 1  # mesh.release codec MAX_VERSION
MAX_UINT: Final = (1 << 64) - 1  # sequence numbers, incarnations, request ids
MAX_MANIFESTS: Final = 64  # signed manifests per Rumor
MAX_MANIFEST_BYTES: Final = MAX_PIECE  # one encoded SignedManifest must fit one frame
MAX_DIGEST: Final = 1024  # (fleet, app) entries per Digest / ManifestRequest
MAX_BLOB_IDS: Final = 16_384  # per Have: 16k x 34 bytes = 544 KiB
MAX_OFFSET: Final = 1 << 40  # mesh.release codec MAX_SIZE: no blob is larger than 1 TiB
MAX_REASON: Final = 256

_LEN: Final = struct.Struct(">I")


class WireError(ValueError):
    """A frame that is not a well-formed, canonical, in-limits mesh message."""


class Status(enum.IntEnum):
    ALIVE = 0
    SUSPECT = 1
    DEAD = 2


@dataclass(frozen=True, slots=True)
class MemberState:
    node_id: str
    incarnation: int
    status: Status
    address: str


@dataclass(frozen=True, slots=True)
class ReleaseKey:
    fleet: str
    app: str
    version: int


# ---- membership (SWIM) ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Ping:
    seq: int
    from_id: str
    updates: tuple[MemberState, ...] = ()


@dataclass(frozen=True, slots=True)
class PingReq:
    seq: int
    from_id: str
    target_id: str
    updates: tuple[MemberState, ...] = ()


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int
    from_id: str  # the node that answered the ping (the probe target, also when relayed)
    updates: tuple[MemberState, ...] = ()


@dataclass(frozen=True, slots=True)
class Gossip:
    """Piggyback updates with no probe attached (memberlist's gossip tick)."""

    from_id: str
    updates: tuple[MemberState, ...] = ()


@dataclass(frozen=True, slots=True)
class PushPull:
    from_id: str
    members: tuple[MemberState, ...]
    is_reply: bool


# ---- manifest dissemination ----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Rumor:
    manifests: tuple[bytes, ...]  # encoded SignedManifests (mesh.release.encode_signed_manifest)


@dataclass(frozen=True, slots=True)
class Digest:
    entries: tuple[ReleaseKey, ...]  # the newest version the sender holds per (fleet, app)


@dataclass(frozen=True, slots=True)
class ManifestRequest:
    keys: tuple[ReleaseKey, ...]  # send me (fleet, app) at this version or newer


# ---- blob exchange -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Have:
    release_key: ReleaseKey
    blob_ids: tuple[bytes, ...]  # the blobs of that release the sender holds (may be partial)


@dataclass(frozen=True, slots=True)
class BlobRequest:
    req_id: int
    blob_id: bytes
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class BlobData:
    req_id: int
    blob_id: bytes
    offset: int
    data: bytes
    last: bool


@dataclass(frozen=True, slots=True)
class BlobError:
    req_id: int
    reason: str


Message: TypeAlias = (Ping | PingReq | Ack | Gossip | PushPull | Rumor | Digest | ManifestRequest
                      | Have | BlobRequest | BlobData | BlobError)

_TAGS: Final[dict[type, int]] = {
    Ping: 1, PingReq: 2, Ack: 3, Gossip: 4, PushPull: 5, Rumor: 6, Digest: 7,
    ManifestRequest: 8, Have: 9, BlobRequest: 10, BlobData: 11, BlobError: 12,
}


# ---- encoding ------------------------------------------------------------------------------

def _member_obj(m: MemberState) -> list[object]:
    return [m.node_id, m.incarnation, int(m.status), m.address]


def _key_obj(k: ReleaseKey) -> list[object]:
    return [k.fleet, k.app, k.version]


def _obj(msg: Message) -> list[object]:
    tag = _TAGS.get(type(msg))
    if tag is None:
        raise WireError(f"not a mesh message: {type(msg).__name__}")
    if isinstance(msg, Ping):
        return [tag, msg.seq, msg.from_id, [_member_obj(u) for u in msg.updates]]
    if isinstance(msg, PingReq):
        return [tag, msg.seq, msg.from_id, msg.target_id, [_member_obj(u) for u in msg.updates]]
    if isinstance(msg, Ack):
        return [tag, msg.seq, msg.from_id, [_member_obj(u) for u in msg.updates]]
    if isinstance(msg, Gossip):
        return [tag, msg.from_id, [_member_obj(u) for u in msg.updates]]
    if isinstance(msg, PushPull):
        return [tag, msg.from_id, [_member_obj(u) for u in msg.members], msg.is_reply]
    if isinstance(msg, Rumor):
        return [tag, list(msg.manifests)]
    if isinstance(msg, Digest):
        return [tag, [_key_obj(k) for k in msg.entries]]
    if isinstance(msg, ManifestRequest):
        return [tag, [_key_obj(k) for k in msg.keys]]
    if isinstance(msg, Have):
        return [tag, _key_obj(msg.release_key), list(msg.blob_ids)]
    if isinstance(msg, BlobRequest):
        return [tag, msg.req_id, msg.blob_id, msg.offset, msg.length]
    if isinstance(msg, BlobData):
        return [tag, msg.req_id, msg.blob_id, msg.offset, msg.data, msg.last]
    return [tag, msg.req_id, msg.reason]


def encode_body(msg: Message) -> bytes:
    """The msgpack body alone; `decode(encode_body(m)) == m` for every valid message. A message
    the codec cannot carry (an integer out of range, a wrong type) raises `WireError`, like
    every other encoding failure: the caller drops and counts it."""
    try:
        body = msgpack.packb(_obj(msg), use_bin_type=True)
    except (OverflowError, ValueError, TypeError) as exc:
        raise WireError(f"cannot encode {type(msg).__name__}: {exc}") from None
    assert isinstance(body, bytes)
    if len(body) > MAX_BODY:
        raise WireError(f"message of {len(body)} bytes exceeds the frame limit of {MAX_BODY}")
    # Validate our own output with the same checks a peer applies: never send what we'd refuse.
    decode(body)
    return body


def frame_size(msg: Message) -> int:
    """Bytes of `encode(msg)`, without its validation (for simulators and budgets)."""
    body = msgpack.packb(_obj(msg), use_bin_type=True)
    assert isinstance(body, bytes)
    return HEADER_LEN + len(body)


def encode(msg: Message) -> bytes:
    """One frame: length prefix and body."""
    body = encode_body(msg)
    return _LEN.pack(len(body)) + body


# ---- decoding ------------------------------------------------------------------------------

def _list(x: object, what: str, n: int | None = None, max_len: int | None = None) -> list[Any]:
    if type(x) is not list:
        raise WireError(f"{what}: expected an array")
    if n is not None and len(x) != n:
        raise WireError(f"{what}: expected {n} fields, got {len(x)}")
    if max_len is not None and len(x) > max_len:
        raise WireError(f"{what}: more than {max_len} entries")
    return x


def _uint(x: object, what: str, hi: int = MAX_UINT, lo: int = 0) -> int:
    if type(x) is not int or not lo <= x <= hi:
        raise WireError(f"{what}: expected an integer in [{lo}, {hi}]")
    return x


def _str(x: object, what: str, max_len: int, min_len: int = 1) -> str:
    if type(x) is not str or not min_len <= len(x) <= max_len:
        raise WireError(f"{what}: expected a string of {min_len}..{max_len} characters")
    return x


def _bin(x: object, what: str, max_len: int, size: int | None = None) -> bytes:
    if type(x) is not bytes or len(x) > max_len or (size is not None and len(x) != size):
        raise WireError(f"{what}: expected {size if size is not None else 'at most'} "
                        f"{'' if size is not None else max_len} bytes")
    return x


def _bool(x: object, what: str) -> bool:
    if type(x) is not bool:
        raise WireError(f"{what}: expected a boolean")
    return x


def _member(x: object) -> MemberState:
    node_id, inc, status, address = _list(x, "member", 4)
    if type(status) is not int or status not in (0, 1, 2):
        raise WireError("member status: expected 0 (alive), 1 (suspect) or 2 (dead)")
    return MemberState(_str(node_id, "node id", MAX_NODE_ID), _uint(inc, "incarnation"),
                       Status(status), _str(address, "address", MAX_ADDRESS, 0))


def _members(x: object, max_len: int) -> tuple[MemberState, ...]:
    return tuple(_member(m) for m in _list(x, "members", max_len=max_len))


def _key(x: object) -> ReleaseKey:
    fleet, app, version = _list(x, "release key", 3)
    return ReleaseKey(_str(fleet, "fleet", MAX_NAME), _str(app, "app", MAX_NAME),
                      _uint(version, "version", MAX_VERSION))


def _keys(x: object) -> tuple[ReleaseKey, ...]:
    return tuple(_key(k) for k in _list(x, "keys", max_len=MAX_DIGEST))


def _fields(obj: list[Any]) -> Message:
    if not obj:
        raise WireError("empty message")
    tag, *f = obj
    if tag == 1 and type(tag) is int:
        a, b, c = _list(f, "ping", 3)
        return Ping(_uint(a, "seq"), _str(b, "from", MAX_NODE_ID), _members(c, MAX_UPDATES))
    if tag == 2 and type(tag) is int:
        a, b, c, d = _list(f, "ping-req", 4)
        return PingReq(_uint(a, "seq"), _str(b, "from", MAX_NODE_ID),
                       _str(c, "target", MAX_NODE_ID), _members(d, MAX_UPDATES))
    if tag == 3 and type(tag) is int:
        a, b, c = _list(f, "ack", 3)
        return Ack(_uint(a, "seq"), _str(b, "from", MAX_NODE_ID), _members(c, MAX_UPDATES))
    if tag == 4 and type(tag) is int:
        a, b = _list(f, "gossip", 2)
        return Gossip(_str(a, "from", MAX_NODE_ID), _members(b, MAX_UPDATES))
    if tag == 5 and type(tag) is int:
        a, b, c = _list(f, "push-pull", 3)
        return PushPull(_str(a, "from", MAX_NODE_ID), _members(b, MAX_MEMBERS),
                        _bool(c, "is_reply"))
    if tag == 6 and type(tag) is int:
        (a,) = _list(f, "rumor", 1)
        return Rumor(tuple(_bin(m, "manifest", MAX_MANIFEST_BYTES)
                           for m in _list(a, "manifests", max_len=MAX_MANIFESTS)))
    if tag == 7 and type(tag) is int:
        (a,) = _list(f, "digest", 1)
        return Digest(_keys(a))
    if tag == 8 and type(tag) is int:
        (a,) = _list(f, "manifest request", 1)
        return ManifestRequest(_keys(a))
    if tag == 9 and type(tag) is int:
        a, b = _list(f, "have", 2)
        return Have(_key(a), tuple(_bin(i, "blob id", BLOB_ID_LEN, BLOB_ID_LEN)
                                   for i in _list(b, "blob ids", max_len=MAX_BLOB_IDS)))
    if tag == 10 and type(tag) is int:
        a, b, c, d = _list(f, "blob request", 4)
        return BlobRequest(_uint(a, "req id"), _bin(b, "blob id", BLOB_ID_LEN, BLOB_ID_LEN),
                           _uint(c, "offset", MAX_OFFSET), _uint(d, "length", MAX_PIECE))
    if tag == 11 and type(tag) is int:
        a, b, c, d, e = _list(f, "blob data", 5)
        return BlobData(_uint(a, "req id"), _bin(b, "blob id", BLOB_ID_LEN, BLOB_ID_LEN),
                        _uint(c, "offset", MAX_OFFSET), _bin(d, "data", MAX_PIECE),
                        _bool(e, "last"))
    if tag == 12 and type(tag) is int:
        a, b = _list(f, "blob error", 2)
        return BlobError(_uint(a, "req id"), _str(b, "reason", MAX_REASON, 0))
    raise WireError(f"unknown message type {tag!r}")


def decode(body: bytes) -> Message:
    """A message from one frame body (without the length prefix)."""
    if type(body) is not bytes:
        body = bytes(body)
    if len(body) > MAX_BODY:
        raise WireError(f"body of {len(body)} bytes exceeds the limit of {MAX_BODY}")
    try:
        obj = msgpack.unpackb(
            body, raw=False, use_list=True, strict_map_key=True, max_str_len=MAX_REASON,
            max_bin_len=MAX_PIECE, max_array_len=max(MAX_MEMBERS, MAX_BLOB_IDS),
            max_map_len=0, max_ext_len=0)
    # ExtraData (trailing bytes), FormatError, StackError and UnicodeDecodeError are ValueErrors;
    # the length limits raise ValueError too.
    except (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException) as exc:
        raise WireError(f"not valid msgpack: {type(exc).__name__}") from None
    msg = _fields(_list(obj, "message"))
    # Canonical form only: rejects over-long ints/strings/arrays, float-for-int and the like.
    if msgpack.packb(_obj(msg), use_bin_type=True) != body:
        raise WireError("message is not in canonical form")
    return msg


def decode_frame(frame: bytes) -> Message:
    """A message from exactly one whole frame (a datagram): prefix, body, nothing after."""
    if len(frame) < HEADER_LEN:
        raise WireError("frame shorter than its length prefix")
    (n,) = _LEN.unpack_from(frame)
    if n > MAX_BODY:
        raise WireError(f"frame announces {n} bytes, the limit is {MAX_BODY}")
    if len(frame) != HEADER_LEN + n:
        raise WireError(f"frame has {len(frame) - HEADER_LEN} body bytes, announces {n}")
    return decode(frame[HEADER_LEN:])


class FrameDecoder:
    """Frames from a byte stream, as they complete.

    A malformed body raises `WireError` once all of `data` is consumed: the stream stays in
    step, and the well-formed messages of the same `feed` are returned by the next call. An
    over-limit length prefix raises at once, before any of that body is buffered, and closes
    the decoder for good (a stream whose framing is untrusted cannot be resynchronised).
    """

    __slots__ = ("_buf", "_need", "_ready", "_closed")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._need: int | None = None  # body length once the prefix is read
        self._ready: list[Message] = []
        self._closed = False

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def closed(self) -> bool:
        return self._closed

    def feed(self, data: bytes | bytearray) -> list[Message]:
        if self._closed:
            raise WireError("stream already failed framing")
        view = memoryview(data)
        pos = 0
        error: WireError | None = None
        while True:
            if self._need is None:
                take = min(HEADER_LEN - len(self._buf), len(view) - pos)
                self._buf += view[pos:pos + take]
                pos += take
                if len(self._buf) < HEADER_LEN:
                    break
                (n,) = _LEN.unpack(self._buf)
                self._buf.clear()
                if n > MAX_BODY:
                    self._closed = True
                    raise WireError(f"frame announces {n} bytes, the limit is {MAX_BODY}")
                self._need = n
            take = min(self._need - len(self._buf), len(view) - pos)
            self._buf += view[pos:pos + take]
            pos += take
            if len(self._buf) < self._need:
                break
            body = bytes(self._buf)
            self._buf.clear()
            self._need = None
            try:
                self._ready.append(decode(body))
            except WireError as exc:
                error = error or exc
        if error is not None:
            raise error  # the good messages stay in _ready for the next call
        out, self._ready = self._ready, []
        return out
