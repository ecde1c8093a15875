"""Binary deltas between layer tars, in a self-describing, verified patch container.

The delta engine knows bytes and tars only: it imports nothing of mesh.release (nor the other
way round). Choosing which delta a release ships (`mesh.image.plan_layer`) and applying one
while rebuilding a release (`mesh.image.materialize_release`) sit in mesh.image, above both.
"""

from mesh.delta._container import BARE_HEADER_MIN, HEADER_MIN, DeltaError, DeltaHeader, Method
from mesh.delta._engine import (
    DEFAULT_MAX_TARGET,
    HDIFF_MAX_INPUT,
    HDIFF_ZSTD_LEVEL,
    PREFIX_MAX_INPUT,
    Source,
    apply_delta,
    apply_delta_file,
    create_delta,
    read_header,
)
from mesh.delta._hdiff import HDIFF_ZSTD_WINDOW_LOG
from mesh.delta._tar import is_tar

__all__ = [
    "BARE_HEADER_MIN", "DEFAULT_MAX_TARGET", "HDIFF_MAX_INPUT", "HDIFF_ZSTD_LEVEL",
    "HDIFF_ZSTD_WINDOW_LOG", "HEADER_MIN", "PREFIX_MAX_INPUT",
    "DeltaError", "DeltaHeader", "Method", "Source", "apply_delta", "apply_delta_file",
    "create_delta", "is_tar", "read_header",
]
