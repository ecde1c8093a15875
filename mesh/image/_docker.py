"""`docker save` through the Docker CLI, and a local image's layers as files (delta bases)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Final

from mesh.image._saved import ImageError, read_saved_image

DOCKER_TIMEOUT_S: Final = 600.0  # `docker save` of a multi-GB image on a slow disk


def docker_save(image_ref: str, out: str | os.PathLike[str], *, docker: str = "docker",
                timeout: float = DOCKER_TIMEOUT_S) -> Path:
    """`docker save image_ref -o out`; ImageError with Docker's own message if it fails."""
    try:
        result = subprocess.run([docker, "save", "-o", str(out), image_ref],
                                capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise ImageError(f"{docker}: command not found") from None
    except subprocess.TimeoutExpired:
        raise ImageError(f"docker save {image_ref}: timed out after {timeout:.0f} s") from None
    if result.returncode != 0:
        message = " ".join(result.stderr.split()) or f"exit code {result.returncode}"
        raise ImageError(f"docker save {image_ref}: {message}")
    return Path(out)


def export_local_layers(image_ref: str, workdir: str | os.PathLike[str], *,
                        docker: str = "docker") -> dict[str, Path]:
    """The layers of a local image as files `{diff_id: <workdir>/<hex>.tar}`, via `docker save`
    (each checked against the image config), for use as delta bases."""
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".save-", suffix=".tar", dir=work)
    os.close(fd)
    try:
        docker_save(image_ref, name, docker=docker)
        image = read_saved_image(name, work)
    finally:
        os.unlink(name)
    return {layer.diff_id: Path(layer.data) for layer in image.layers
            if isinstance(layer.data, Path)}
