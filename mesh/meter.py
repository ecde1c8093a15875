"""Who hears of the bytes a network exchange moved, per task: the caller opens a meter around
a call, the code that does the exchange (deep in a client library) reports to it, and neither
needs the other's signatures. A context variable, so concurrent calls in other trio tasks
(each runs in a copy of its parent's context) never count into each other's meter.

    with metered(lambda n: account.add("control", n, ...)):   # agent/_link.py
        await client.report(report)
    ...
    count_bytes(len(request_bytes) + len(response_bytes))    # ops/client.py DeviceClient

Without a meter open, `count_bytes` does nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

Meter = Callable[[int], None]

_meter: ContextVar[Meter | None] = ContextVar("fleetmesh_byte_meter", default=None)


@contextmanager
def metered(meter: Meter) -> Iterator[None]:
    """Bytes counted in this task while inside go to `meter`."""
    token = _meter.set(meter)
    try:
        yield
    finally:
        _meter.reset(token)


def count_bytes(n: int) -> None:
    """`n` bytes moved by the current task: to its meter, if one is open."""
    meter = _meter.get()
    if meter is not None and n > 0:
        meter(n)


__all__ = ["Meter", "count_bytes", "metered"]
