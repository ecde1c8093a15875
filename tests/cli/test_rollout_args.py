"""The rollout and tag options are checked before any network call: against a coordinator that
cannot be reached (exit 3 if the CLI tried), a bad value is one line and exit 2."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.coordinator_process import FLEETMESH, free_port

BAD = [
    (["rollout", "start", "2", "--app", "web", "--phases", "0"], "--phases"),
    (["rollout", "start", "2", "--app", "web", "--phases", "1,,100%"], "--phases"),
    (["rollout", "start", "2", "--app", "web", "--phases", "1,site"], "--phases"),
    (["rollout", "start", "2", "--app", "web", "--phases", "150%"], "--phases"),
    (["rollout", "start", "2", "--app", "web", "--phases", "1", "--soak", "5x"], "--soak"),
    (["rollout", "start", "2", "--app", "web", "--phases", "1", "--deadline", "-1"],
     "--deadline"),
    (["rollout", "start", "2", "--app", "web", "--phases", "1", "--window", "25:00-01:00"],
     "--window"),
    (["rollout", "start", "2", "--app", "web", "--phases", "1", "--max-failures", "x"],
     "--max-failures"),
    (["rollout", "start", "2", "--app", "web", "--phases", "1", "--min-devices", "0"],
     "--min-devices"),
    (["rollout", "start", "2", "--app", "web", "--phases", "1", "--selector", "site"],
     "--selector"),
    (["rollout", "start", "2", "--app", "web"], "--phases"),
    (["rollout", "start", "0", "--app", "web", "--phases", "1"], "VERSION"),
    (["rollout", "status", "2", "--app", "bad app"], "--app"),
    (["rollout", "resume", "two", "--app", "web"], "invalid int"),
    (["rollout", "rewind", "2", "--app", "web"], "invalid choice"),
    (["release", "create", "img:1", "--fleet", "f", "--app", "web", "--phases", "1",
      "--no-rollout"], "exclude"),
    (["release", "create", "img:1", "--fleet", "f", "--app", "web", "--soak", "5m"],
     "needs --phases"),
    (["release", "create", "img:1", "--fleet", "f", "--app", "web", "--phases", "1,x"],
     "--phases"),
    (["devices", "tag", "cam-1", "site"], "key=value"),
    (["devices", "tag", "cam-1", "Site=berlin"], "key"),
    (["devices", "tag", "cam-1", "site=ber lin"], "value"),
    (["devices", "tag", "cam-1", "a=1", "a=2"], "twice"),
    (["devices", "tag", "cam-1"], "nothing to change"),
    (["devices", "tag", "cam-1", "--remove", "Bad Key"], "--remove"),
    (["devices", "list", "--selector", "site"], "--selector"),
    (["token", "create", "--fleet", "f", "--tag", "x"], "--tag"),
    (["devices", "provision", "cam-9", "--fleet", "f", "--tag", "a=b c"], "--tag"),
]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("home")
    out = {k: v for k, v in os.environ.items()
           if not k.startswith("FLEETMESH_") and k not in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME")}
    # Nothing listens there: a command that called the coordinator would exit 3, not 2.
    out.update(HOME=str(home), FLEETMESH_URL=f"https://127.0.0.1:{free_port()}",
               FLEETMESH_API_KEY="fmo_" + "a" * 43, FLEETMESH_FINGERPRINT="ab" * 32)
    return out


@pytest.mark.parametrize(("argv", "says"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_option_is_one_line_exit_2(env: dict[str, str], argv: list[str], says: str
                                       ) -> None:
    result = subprocess.run([FLEETMESH, *argv], capture_output=True, text=True, timeout=30,
                            env=env, check=False)
    assert result.returncode == 2, (argv, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], result.stderr


def test_a_good_command_does_reach_for_the_coordinator(env: dict[str, str],
                                                       tmp_path: Path) -> None:
    """The same kind of command with good options gets to the network (exit 3): the exits 2
    above are the checks, not a broken configuration."""
    for argv in (["rollout", "status", "2", "--app", "web", "--fleet", "f"],
                 ["devices", "list", "--selector", "site=berlin+role=cam"],
                 ["devices", "tag", "cam-1", "site=berlin", "--remove", "role"]):
        result = subprocess.run([FLEETMESH, *argv], capture_output=True, text=True,
                                timeout=30, env=env, check=False)
        assert result.returncode == 3, (argv, result.stderr)
        assert "Connection refused" in result.stderr
