"""The wheel as a device, an operator's workstation and a coordinator host install it (issue 17,
item 7): built by scripts/wheel, installed into FRESH venvs (no system site packages, not the
project's .venv), run from there.

- The base install has working `fleetmesh` and `fleetmesh-agent` and none of the server stack;
  the commands that need it say which extra in one line, exit 2.
- With the `coordinator` extra, `fleetmesh coordinator serve` starts on loopback and the
  installed operator CLI talks to it; the dashboard is served from the wheel's files.
- The wheel carries every file of the packages (data files included).

Dependencies come from PyPI through pip's cache. Time: about 50 s on a warm cache (the wheel build,
two venvs); a few minutes on a cold cache or a busy machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import httpx
import pytest

from tests.coordinator_process import running_coordinator

ROOT: Final = Path(__file__).resolve().parents[2]
PACKAGES: Final = ("coordinator", "ops", "agent", "mesh", "vpn", "lab")
# pyproject.toml's coordinator extra, as distributions (psycopg[binary] adds psycopg-binary)
SERVER_DISTS: Final = {"hypercorn", "starlette", "cryptography", "psycopg", "psycopg-binary"}
SERVER_LINE: Final = ("fleetmesh: the coordinator needs the server extra: "
                      "pip install 'fleetmesh[coordinator]'\n")
LAB_LINE: Final = "fleetmesh-lab: the lab needs the lab extra: pip install 'fleetmesh[lab]'\n"


def _env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this environment without a configured operator) without what would
    make the venv's Python see the source tree or another environment."""
    if base is None:
        base = {k: v for k, v in os.environ.items() if not k.startswith("FLEETMESH_")}
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")
    return {k: v for k, v in base.items() if k not in drop}


def _run(argv: Sequence[str | Path], cwd: Path, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], check=False, cwd=cwd, env=env or _env(),
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)


def _ok(argv: Sequence[str | Path], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = _run(argv, cwd, env)
    assert done.returncode == 0, f"{argv}: exit {done.returncode}\n{done.stderr[-3000:]}"
    return done.stdout


def _pip(python: Path, *argv: str) -> str:
    """This environment's pip working on the venv of `python` (`--python`): the venv needs no
    pip of its own, which saves seeding one into each."""
    return _ok([sys.executable, "-m", "pip", "--python", python, "--disable-pip-version-check",
                *argv], python.parent)


def _venv(where: Path, requirement: str) -> Path:
    """A fresh venv at `where` (no system site packages) with `requirement` installed (pip's
    cache makes a rerun fast); its bin directory."""
    _ok([sys.executable, "-m", "venv", "--without-pip", where], where.parent)
    _pip(where / "bin" / "python", "install", "-q", requirement)
    return where / "bin"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    built = Path(_ok([ROOT / "scripts" / "wheel", out], ROOT).strip())
    assert built.parent == out and built.name.startswith("fleetmesh-")
    assert built.name.endswith("-py3-none-any.whl")
    return built


@pytest.fixture(scope="module")
def device(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bin/ of a venv with the wheel alone, as on a device or an operator's workstation."""
    return _venv(tmp_path_factory.mktemp("device") / "venv", str(wheel))


@pytest.fixture(scope="module")
def server(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bin/ of a venv with the wheel and its coordinator extra, as on the coordinator host."""
    return _venv(tmp_path_factory.mktemp("server") / "venv", f"{wheel}[coordinator]")


def _installed(bin_dir: Path) -> set[str]:
    out = _pip(bin_dir / "python", "list", "--format=json")
    return {p["name"].lower().replace("_", "-") for p in json.loads(out)}


def test_the_wheel_carries_every_file_of_the_packages(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    source = {p.relative_to(ROOT).as_posix() for pkg in PACKAGES for p in (ROOT / pkg).rglob("*")
              if p.is_file() and "__pycache__" not in p.parts}
    # the data files the code reads at run time are among them; named so that a narrower
    # rglob (or none) cannot pass this
    for data in ("coordinator/dashboard/index.html", "coordinator/dashboard/app.js",
                 "coordinator/dashboard/app.css", "ops/systemd/fleetmesh-coordinator.service",
                 "agent/systemd/fleetmesh-agent.service", "agent/py.typed", "mesh/py.typed"):
        assert data in source
    assert sorted(source - names) == []
    assert not any(n.startswith(("tests/", "bench/", "examples/")) for n in names)


def test_a_device_install_has_no_server_stack(device: Path) -> None:
    installed = _installed(device)
    assert {"fleetmesh", "trio", "httpx", "pynacl", "docker"} <= installed
    assert sorted(installed & SERVER_DISTS) == []


def test_the_operator_and_agent_commands_run_from_the_wheel(device: Path, tmp_path: Path
                                                            ) -> None:
    assert "coordinator" in _ok([device / "fleetmesh", "--help"], tmp_path)
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert _ok([device / "fleetmesh", "--version"], tmp_path) == f"fleetmesh {version}\n"
    assert "doctor" in _ok([device / "fleetmesh-agent", "--help"], tmp_path)
    assert "usage: fleetmesh-agent doctor" in _ok([device / "fleetmesh-agent", "doctor",
                                                  "--help"], tmp_path)
    # the unit template is package data: read from the installed wheel, ExecStart this venv's
    _ok([device / "fleetmesh-agent", "install", "--root", tmp_path / "root"], tmp_path)
    unit = (tmp_path / "root/etc/systemd/system/fleetmesh-agent.service").read_text()
    assert f"ExecStart={device / 'fleetmesh-agent'} run" in unit


def test_server_commands_name_the_extra_without_it(device: Path, tmp_path: Path) -> None:
    for argv in ([device / "fleetmesh", "coordinator", "serve", "--data", tmp_path / "data"],
                 [device / "fleetmesh", "coordinator", "install", "--root", tmp_path / "root"]):
        done = _run(argv, tmp_path)
        assert (done.returncode, done.stderr, done.stdout) == (2, SERVER_LINE, "")
    assert not (tmp_path / "data").exists() and not (tmp_path / "root").exists()
    # before root or the topology file are looked at: nothing of a lab is touched
    done = _run([device / "fleetmesh-lab", "up", tmp_path / "none.toml"], tmp_path)
    assert (done.returncode, done.stderr, done.stdout) == (2, LAB_LINE, "")


def test_the_coordinator_extra_serves(server: Path, tmp_path: Path) -> None:
    assert SERVER_DISTS <= _installed(server)
    assert "--data DIR" in _ok([server / "fleetmesh", "coordinator", "serve", "--help"],
                               tmp_path)
    with running_coordinator(tmp_path / "data", tmp_path / "serve.log",
                             fleetmesh=str(server / "fleetmesh")) as coord:
        env = _env(coord.operator_env(tmp_path))
        listed = json.loads(_ok([server / "fleetmesh", "devices", "list", "--json"], tmp_path,
                                env))
        assert listed["devices"] == []
        # the dashboard's files come from the installed wheel, byte for byte the source's
        css = httpx.get(f"{coord.url}/dashboard/app.css", verify=False)
        assert css.status_code == 200
        assert css.content == (ROOT / "coordinator/dashboard/app.css").read_bytes()
