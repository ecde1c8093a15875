"""Per layer, the cheapest way to ship it: a delta from the best earlier layer, or full chunks."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Final

from mesh.delta import (
    HDIFF_MAX_INPUT,
    PREFIX_MAX_INPUT,
    Method,
    create_delta,
    is_tar,
    read_header,
)
from mesh.release import chunk_layer

# Each candidate base costs one diff; releases keep deltas from the last few only
# (mesh.release's MAX_DELTAS_PER_LAYER bounds what a manifest can carry).
MAX_CANDIDATES: Final = 4


@dataclass(frozen=True, slots=True)
class LayerPlan:
    """`patch` is None when shipping the full compressed layer is smaller than any delta."""

    diff_id: str
    full_size: int  # bytes of the full layer as compressed chunks
    source_diff_id: str | None
    patch: bytes | None
    tried: tuple[tuple[str, str, int], ...]  # (source diff ID, method, patch bytes) per attempt

    @property
    def wire_size(self) -> int:
        return self.full_size if self.patch is None else len(self.patch)


def plan_layer(new: bytes, candidates: Mapping[str, bytes], *, full_size: int | None = None,
               try_tar: bool = True, hdiff_max_input: int = HDIFF_MAX_INPUT,
               self_check: bool = False) -> LayerPlan:
    """Try each candidate base (diff ID -> layer tar, newest first) and keep the smallest.

    `full_size` defaults to the size of `new` as mesh.release chunks. Tried per base: the
    default method (HDiffPatch; above `hdiff_max_input` the streaming tar method, or zstd windows
    for non-tars, and nothing else: docs/delta.md, "Apply memory"), both tar-aware methods
    when both sides are tars, and one zstd frame with the whole source as prefix when both
    fit its window. Each of these was the
    smallest on at least one pair of the bench corpus (bench/delta.py prints what was tried).

    Patches are bare by default (`self_check=False`): a release manifest names each delta by
    blob id with its source and target diff IDs, which is everything the self-checking header's
    digests would check (docs/delta.md, "Bare patches"). Apply them with the layer's diff ID.
    """
    pending = start_plan(new, candidates, try_tar=try_tar, hdiff_max_input=hdiff_max_input,
                         self_check=self_check)
    if full_size is None:
        full_size = sum(c.ref.stored_size for c in chunk_layer(new))
    return pending.result(full_size)


class PendingPlan:
    """`plan_layer`'s diffs, started (in a pool, or run in place); `result` picks the plan.

    The attempts keep their order, so the choice (the first of the smallest) is the same
    whether they ran one after the other or at the same time.
    """

    def __init__(self, new_id: str, attempts: list[tuple[str, Method | None, Future[bytes]]]
                 ) -> None:
        self._new_id = new_id
        self._attempts = attempts

    def result(self, full_size: int) -> LayerPlan:
        """The plan, given the size of `new` as chunks; waits for the diffs."""
        best: tuple[int, str, bytes] | None = None
        tried: list[tuple[str, str, int]] = []
        for source_id, method, future in self._attempts:
            patch = future.result()
            name = method.name if method is not None else read_header(patch).method.name
            tried.append((source_id, name, len(patch)))
            if best is None or len(patch) < best[0]:
                best = (len(patch), source_id, patch)
        if best is None or best[0] >= full_size:
            return LayerPlan(self._new_id, full_size, None, None, tuple(tried))
        return LayerPlan(self._new_id, full_size, best[1], best[2], tuple(tried))


def start_plan(new: bytes, candidates: Mapping[str, bytes], *, pool: Executor | None = None,
               try_tar: bool = True, hdiff_max_input: int = HDIFF_MAX_INPUT,
               self_check: bool = False) -> PendingPlan:
    """Start `plan_layer`'s diffs in `pool` (its threads: the diff and compression libraries
    release the GIL), or run them now when `pool` is None. The longest attempts are submitted
    first, so that chunk compression submitted after them fills the other cores."""
    new_id = "sha256:" + hashlib.sha256(new).hexdigest()
    new_is_tar = try_tar and is_tar(new)
    jobs: list[tuple[str, Method | None, Callable[[], bytes]]] = []
    for source_id, old in list(candidates.items())[:MAX_CANDIDATES]:
        methods: list[Method | None] = [None]
        # Above hdiff_max_input, only what applies in bounded memory on a small device (None
        # is TAR_STREAM there, for tars): TAR_MEMBERS' apply would hold both layers.
        if new_is_tar and len(old) + len(new) <= hdiff_max_input and is_tar(old):
            methods += [Method.TAR_MEMBERS, Method.TAR_STREAM]
        if len(old) + len(new) <= PREFIX_MAX_INPUT:
            # zstd --patch-from (at levels up to 22 on small inputs, frames trimmed): it wins on
            # tiny edits, where HDiffPatch's own header is a noticeable part of a patch of a
            # few hundred bytes.
            methods.append(Method.ZSTD_PREFIX)
        for method in methods:
            jobs.append((source_id, method, _diff_job(old, new, method, hdiff_max_input,
                                                      self_check)))
    futures: dict[int, Future[bytes]] = {}
    # The tar-aware method indexes the whole source at zstd -19: the longest, so first.
    order = sorted(range(len(jobs)), key=lambda i: jobs[i][1] is not Method.TAR_MEMBERS)
    for i in order:
        futures[i] = _run(jobs[i][2], pool)
    return PendingPlan(new_id, [(s, m, futures[i]) for i, (s, m, _) in enumerate(jobs)])


def _diff_job(old: bytes, new: bytes, method: Method | None, hdiff_max_input: int,
              self_check: bool) -> Callable[[], bytes]:
    def job() -> bytes:
        return create_delta(old, new, method=method, hdiff_max_input=hdiff_max_input,
                            self_check=self_check)
    return job


def _run(job: Callable[[], bytes], pool: Executor | None) -> Future[bytes]:
    if pool is not None:
        return pool.submit(job)
    done: Future[bytes] = Future()
    try:
        done.set_result(job())
    except BaseException as exc:  # re-raised by result(), as a pool's future would
        done.set_exception(exc)
    return done
