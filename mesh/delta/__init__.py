"""Binary deltas between layer tars, in a self-describing, verified patch container.

Importing the package loads what `apply_delta` needs (the decoders), not the planner: a device
that only applies patches does not pay for `plan_layer` (and, through `create_delta`'s tar
method, `tarfile`), which are loaded on first use.
"""

from typing import TYPE_CHECKING, Any

from mesh.delta._container import BARE_HEADER_MIN, HEADER_MIN, DeltaError, DeltaHeader, Method
from mesh.delta._engine import (
    DEFAULT_MAX_TARGET,
    HDIFF_MAX_INPUT,
    Source,
    apply_delta,
    create_delta,
    read_header,
)

if TYPE_CHECKING:
    from mesh.delta._plan import LayerPlan, plan_layer

__all__ = [
    "BARE_HEADER_MIN", "DEFAULT_MAX_TARGET", "HDIFF_MAX_INPUT", "HEADER_MIN", "DeltaError",
    "DeltaHeader", "LayerPlan", "Method", "Source", "apply_delta", "create_delta", "plan_layer",
    "read_header",
]


def __getattr__(name: str) -> Any:
    if name in ("LayerPlan", "plan_layer"):
        from mesh.delta import _plan

        return getattr(_plan, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
