"""The set-up scripts refuse clearly what they cannot do, and every console script is installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def _as_nobody(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv],
        check=False, capture_output=True, text=True, timeout=60, cwd="/",
    )


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root to drop privileges with setpriv")
@pytest.mark.parametrize("script", ["setup", "test", "demo"])
def test_scripts_refuse_non_root_with_one_line(script: str) -> None:
    # A copy nobody can read: the checkout may sit under /root, which nobody cannot enter.
    box = Path(tempfile.mkdtemp(prefix="fm-scripts-"))
    try:
        box.chmod(0o755)
        shutil.copytree(ROOT / "scripts", box / "scripts")
        (box / "scripts").chmod(0o755)
        result = _as_nobody(["bash", str(box / "scripts" / script)])
    finally:
        shutil.rmtree(box)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "root" in lines[0]


def test_ci_runs_the_readme_test_command() -> None:
    assert "scripts/test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "sudo scripts/demo" in readme and "sudo scripts/test" in readme


@pytest.mark.parametrize("command", ["fleetmesh", "fleetmesh-agent", "fleetmesh-lab"])
def test_console_scripts_installed(command: str) -> None:
    result = subprocess.run([str(VENV_BIN / command), "--help"], check=False,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
