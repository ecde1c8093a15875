"""The app containers' logs: followed in threads, kept in a bounded buffer until uploaded.

Each (container, stream) gets a daemon thread running `docker logs --follow --timestamps`
(docker SDK `logs(stream=True, follow=True, timestamps=True)`); lines go into a `LogBuffer`.
Appending never waits on anything but a short lock, so a slow or absent coordinator cannot
block the app or its log driver: when the buffer is full the oldest line is dropped and
counted. The agent's uploader drains it:

    lines, dropped = buffer.take(1000)      # [{"ts", "app", "stream", "line"}], int
    try: upload(lines, dropped)
    except Unreachable: buffer.put_back(lines, dropped)   # kept, within the bound

Line format (docs/api.md, "App status"): {"ts": float, "app": str, "stream": "stdout"|"stderr",
"line": str of at most 4096 characters}.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, Protocol

from mesh.control import MAX_LOG_LINE, LogLine

from ._engine import parse_docker_time

MAX_LINE_CHARS: Final = MAX_LOG_LINE  # what the coordinator takes per line
# At the contract's 1000 lines per upload this is ten uploads' worth; ~20 MB at worst.
MAX_BUFFERED_LINES: Final = 10_000
_MAX_PARTIAL: Final = 64 * 1024  # an unterminated line longer than this is cut
STREAMS: Final = ("stdout", "stderr")


class LogSource(Protocol):
    def logs(self, container_id: str, stream: str, since: float | None) -> Iterator[bytes]: ...




class LogBuffer:
    """A bounded FIFO of log lines; never blocks a producer, counts what it drops."""

    def __init__(self, max_lines: int = MAX_BUFFERED_LINES) -> None:
        if max_lines < 1:
            raise ValueError("max_lines must be at least 1")
        self.max_lines = max_lines
        self._lines: collections.deque[dict[str, Any]] = collections.deque()
        self._dropped = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._lines)

    @property
    def dropped(self) -> int:
        return self._dropped

    def append(self, line: LogLine) -> None:
        with self._lock:
            if len(self._lines) >= self.max_lines:
                self._lines.popleft()
                self._dropped += 1
            self._lines.append(line.to_json())

    def take(self, max_lines: int) -> tuple[list[dict[str, Any]], int]:
        """Up to `max_lines` oldest lines and the lines dropped since the last take; both are
        the caller's now (give them back with `put_back` if the upload fails)."""
        with self._lock:
            n = min(max(0, max_lines), len(self._lines))
            out = [self._lines.popleft() for _ in range(n)]
            dropped, self._dropped = self._dropped, 0
        return out, dropped

    def take_tail(self, app: str, max_lines: int) -> list[dict[str, Any]]:
        """The newest `max_lines` lines of `app`, oldest first, taken out of the buffer (the
        last words of an app that failed); the other lines keep their order."""
        with self._lock:
            picked: list[dict[str, Any]] = []
            kept: collections.deque[dict[str, Any]] = collections.deque()
            for line in reversed(self._lines):
                if len(picked) < max_lines and line.get("app") == app:
                    picked.append(line)
                else:
                    kept.appendleft(line)
            self._lines = kept
        picked.reverse()
        return picked

    def put_back(self, lines: Iterable[dict[str, Any]], dropped: int) -> None:
        """Return a failed upload: its lines go back in front (oldest first), as far as the
        bound allows; lines that no longer fit are counted as dropped."""
        back = list(lines)
        with self._lock:
            room = self.max_lines - len(self._lines)
            keep = back[max(0, len(back) - room):] if room > 0 else []
            self._dropped += dropped + (len(back) - len(keep))
            self._lines.extendleft(reversed(keep))


def parse_log_line(raw: bytes, app: str, stream: str) -> LogLine | None:
    """One `docker logs --timestamps` line ("<RFC 3339 time> <text>") as a LogLine."""
    text = raw.decode("utf-8", "replace").rstrip("\r\n")
    stamp, sep, rest = text.partition(" ")
    ts = parse_docker_time(stamp) if sep or stamp else None
    if ts is None:  # not timestamped (should not happen): keep the text
        return None if not text else LogLine(0.0, app, stream, text[:MAX_LINE_CHARS])
    return LogLine(ts, app, stream, rest[:MAX_LINE_CHARS])


class LogCollector:
    """Follows the app containers the applier names; one thread per container and stream."""

    def __init__(self, source: LogSource, buffer: LogBuffer,
                 log: Callable[[str], None] | None = None) -> None:
        self.source = source
        self.buffer = buffer
        self._log = log or (lambda _m: None)
        self._threads: dict[tuple[str, str], threading.Thread] = {}
        self._last: dict[tuple[str, str], float] = {}  # newest line seen: resume after it
        self._lock = threading.Lock()

    def follow(self, app: str, container_id: str, since: float | None) -> None:
        """Make sure both streams of `container_id` are followed (from `since`, or after the
        last line seen when a follower is restarted, e.g. after the container restarted)."""
        for stream in STREAMS:
            key = (container_id, stream)
            with self._lock:
                thread = self._threads.get(key)
                if thread is not None and thread.is_alive():
                    continue
                start = self._last.get(key, since)
                thread = threading.Thread(target=self._run, args=(app, container_id, stream,
                                                                  start),
                                          daemon=True, name=f"fleetmesh-logs-{app}-{stream}")
                self._threads[key] = thread
            thread.start()

    def forget(self, keep: Iterable[str]) -> None:
        """Drop the bookkeeping of containers not in `keep` (removed containers)."""
        alive = set(keep)
        with self._lock:
            for key in [k for k in self._last if k[0] not in alive]:
                del self._last[key]
            for key in [k for k, t in self._threads.items()
                        if k[0] not in alive and not t.is_alive()]:
                del self._threads[key]

    def _run(self, app: str, container_id: str, stream: str, since: float | None) -> None:
        key = (container_id, stream)
        floor = since
        partial = b""
        try:
            for block in self.source.logs(container_id, stream, since):
                partial += block
                while b"\n" in partial or len(partial) > _MAX_PARTIAL:
                    raw, nl, rest = partial.partition(b"\n")
                    if not nl:
                        raw, rest = partial[:_MAX_PARTIAL], partial[_MAX_PARTIAL:]
                    partial = rest
                    self._emit(key, app, stream, raw, floor)
            if partial:
                self._emit(key, app, stream, partial, floor)
        except Exception as exc:  # noqa: BLE001 - a broken stream ends this follower only
            self._log(f"logs of {app} ({container_id[:12]} {stream}): {exc}")

    def _emit(self, key: tuple[str, str], app: str, stream: str, raw: bytes,
              floor: float | None) -> None:
        line = parse_log_line(raw, app, stream)
        if line is None:
            return
        if floor is not None and line.ts and line.ts <= floor:
            return  # already seen by an earlier follower of the same container
        if line.ts:
            self._last[key] = max(self._last.get(key, 0.0), line.ts)
        self.buffer.append(line)


__all__ = ["MAX_BUFFERED_LINES", "MAX_LINE_CHARS", "LogBuffer", "LogCollector", "LogLine",
           "parse_log_line"]
