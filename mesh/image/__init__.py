"""Docker images and releases: image tars in and out, the layers a release ships as deltas
(`plan_layer`), and the device-side rebuild of a verified release (`materialize_release`).

The layer above the release format (mesh.release) and the delta engine (mesh.delta), which
import nothing of each other: this package is where they meet.
"""

from mesh.image._docker import DOCKER_TIMEOUT_S, docker_save, export_local_layers
from mesh.image._materialize import (
    FetchBlob,
    LayerSource,
    MaterializedRelease,
    MaterializeError,
    check_manifest_layers,
    materialize_release,
)
from mesh.image._plan import MAX_CANDIDATES, LayerPlan, PendingPlan, plan_layer, start_plan
from mesh.image._saved import (
    ImageError,
    SavedImage,
    SavedLayer,
    build_loadable_image,
    config_diff_ids,
    file_diff_id,
    read_saved_image,
)

__all__ = [
    "DOCKER_TIMEOUT_S", "MAX_CANDIDATES", "FetchBlob", "ImageError", "LayerPlan", "LayerSource",
    "MaterializeError", "MaterializedRelease", "PendingPlan", "SavedImage", "SavedLayer",
    "build_loadable_image",
    "check_manifest_layers", "config_diff_ids", "docker_save", "export_local_layers",
    "file_diff_id", "materialize_release", "plan_layer", "read_saved_image", "start_plan",
]
