"""Binary deltas between layer tars, in a self-describing, verified patch container."""

from mesh.delta._container import BARE_HEADER_MIN, HEADER_MIN, DeltaError, DeltaHeader, Method
from mesh.delta._engine import (
    DEFAULT_MAX_TARGET,
    HDIFF_MAX_INPUT,
    Source,
    apply_delta,
    create_delta,
    read_header,
)
from mesh.delta._plan import LayerPlan, plan_layer

__all__ = [
    "BARE_HEADER_MIN", "DEFAULT_MAX_TARGET", "HDIFF_MAX_INPUT", "HEADER_MIN", "DeltaError",
    "DeltaHeader", "LayerPlan", "Method", "Source", "apply_delta", "create_delta", "plan_layer",
    "read_header",
]
