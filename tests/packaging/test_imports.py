"""What a device and an operator's workstation load: every module of the agent, and the
operator CLI with its whole parser built, import nothing of the coordinator package and none
of the server stack (pyproject.toml's coordinator extra). test_wheel.py shows the same from an
install without them; this one names the module that slipped in, in a second."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Final

from mesh.clikit import SERVER_STACK

ROOT: Final = Path(__file__).resolve().parents[2]

_PROBE: Final = """
import json, pkgutil, sys
import agent, agent.cli, ops.cli
for info in pkgutil.walk_packages(agent.__path__, "agent."):
    __import__(info.name)
ops.cli.build_parser()
agent.cli.build_parser()
print(json.dumps(sorted(sys.modules)))
"""


def _loaded() -> list[str]:
    done = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True,
                          text=True, check=False, env={"PYTHONPATH": str(ROOT),
                                                       "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    modules: list[str] = json.loads(done.stdout)
    return modules


def test_agent_and_operator_cli_load_no_server() -> None:
    loaded = _loaded()
    assert "agent._engine" in loaded and "ops._cli_server" in loaded  # the probe ran them
    forbidden = ("coordinator", *SERVER_STACK)
    assert [m for m in loaded if m.split(".")[0] in forbidden] == []
