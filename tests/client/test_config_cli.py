"""Operator configuration, durations, and the CLI's argument errors (no coordinator needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.clikit import CliError
from ops._cli_common import parse_duration
from ops.client import OperatorConfigError, default_config_path, load_operator_config

FP_A = "a" * 64
FP_B = "b" * 64
BIN = Path(sys.executable).parent


def _toml(path: Path, **values: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f'{k} = "{v}"\n' for k, v in values.items()))
    return path


def test_env_wins_key_by_key_over_the_file(tmp_path: Path) -> None:
    file = _toml(tmp_path / "op.toml", url="https://file:1", api_key="fmo_file", fingerprint=FP_A)
    cfg = load_operator_config(file, env={})
    assert (cfg.url, cfg.api_key, cfg.fingerprint) == ("https://file:1", "fmo_file", FP_A)
    cfg = load_operator_config(file, env={"FLEETMESH_API_KEY": "fmo_env",
                                          "FLEETMESH_FINGERPRINT": FP_B.upper()})
    assert (cfg.url, cfg.api_key, cfg.fingerprint) == ("https://file:1", "fmo_env", FP_B)
    assert "fmo_env" not in repr(cfg)


def test_default_path_is_used_when_present_and_optional_when_absent(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path)}
    assert default_config_path(env) == tmp_path / ".config/fleetmesh/operator.toml"
    full = {"FLEETMESH_URL": "https://e:2/", "FLEETMESH_API_KEY": "k",
            "FLEETMESH_FINGERPRINT": FP_A}
    assert load_operator_config(None, env={**env, **full}).url == "https://e:2"
    _toml(default_config_path(env), url="https://home:3", api_key="k2", fingerprint=FP_B)
    cfg = load_operator_config(None, env=env)
    assert (cfg.url, cfg.fingerprint) == ("https://home:3", FP_B)


def test_missing_and_bad_configuration_say_what_to_set(tmp_path: Path) -> None:
    with pytest.raises(OperatorConfigError) as exc:
        load_operator_config(None, env={"HOME": str(tmp_path), "FLEETMESH_URL": "https://x"})
    msg = str(exc.value)
    assert "FLEETMESH_API_KEY" in msg and "FLEETMESH_FINGERPRINT" in msg
    assert "FLEETMESH_URL" not in msg and "\n" not in msg
    with pytest.raises(OperatorConfigError, match="cannot read"):
        load_operator_config(tmp_path / "absent.toml", env={})
    (tmp_path / "bad.toml").write_text("url = [")
    with pytest.raises(OperatorConfigError, match="not valid TOML"):
        load_operator_config(tmp_path / "bad.toml", env={})
    file = _toml(tmp_path / "op.toml", url="http://plain:1", api_key="k", fingerprint=FP_A)
    with pytest.raises(OperatorConfigError, match="https"):
        load_operator_config(file, env={})
    file = _toml(tmp_path / "op.toml", url="https://x:1", api_key="k", fingerprint="abc")
    with pytest.raises(OperatorConfigError, match="64 hex"):
        load_operator_config(file, env={})


@pytest.mark.parametrize("text, seconds", [
    ("90s", 90), ("30m", 1800), ("1h", 3600), ("2d", 172800), ("1h30m", 5400), ("45", 45),
    (" 1H ", 3600), ("1d2h3m4s", 93784)])
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0s", "1x", "h", "1.5h", "-1m", "30m1h", "400d", "1 h"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(CliError) as exc:
        parse_duration(text)
    assert exc.value.code == 2


def _cli(*argv: str, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLEETMESH_")}
    clean.update(HOME=str(home), **env)
    clean.pop("XDG_CONFIG_HOME", None)
    return subprocess.run([str(BIN / "fleetmesh"), *argv], capture_output=True, text=True,
                          timeout=60, env=clean, check=False)


def _one_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, result
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("argv, expect", [
    (["token", "create"], "--fleet"),
    (["token"], "required"),
    (["token", "create", "--fleet", "f", "--uses", "two"], "invalid int"),
    (["token", "create", "--fleet", "f", "--expires", "soon"], "bad duration"),
    (["token", "create", "--fleet", "f", "--uses", "0"], "at least 1"),
    (["token", "create", "--fleet", "Bad_Fleet"], "fleet"),
    (["devices"], "required"),
    (["devices", "show"], "NAME"),
    (["devices", "provision", "cam-1"], "--fleet"),
    (["devices", "revoke", "NOT valid"], "name"),
    (["peers"], "NAME"),
    (["operator-config"], "NAME"),
])
def test_argument_errors_are_one_line_exit_2(tmp_path: Path, argv: list[str], expect: str
                                             ) -> None:
    assert expect in _one_line(_cli(*argv, home=tmp_path), 2)


def test_unrecognized_options_exit_2_without_traceback(tmp_path: Path) -> None:
    # Reported by the top-level parser (mesh.clikit/ops.cli), which prints usage too.
    result = _cli("devices", "list", "--bogus", home=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unrecognized arguments: --bogus" in result.stderr.strip().splitlines()[-1]


def test_missing_configuration_is_one_line_exit_2(tmp_path: Path) -> None:
    line = _one_line(_cli("devices", "list", home=tmp_path), 2)
    assert "FLEETMESH_URL" in line and "operator.toml" in line
    line = _one_line(_cli("devices", "list", "--config", str(tmp_path / "nope.toml"),
                          home=tmp_path), 2)
    assert "cannot read" in line


def test_unreachable_coordinator_is_one_line_exit_3(tmp_path: Path) -> None:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = _cli("devices", "list", home=tmp_path, FLEETMESH_URL=f"https://127.0.0.1:{port}",
                  FLEETMESH_API_KEY="fmo_x", FLEETMESH_FINGERPRINT=FP_A)
    assert "cannot" in _one_line(result, 3)


def test_operator_config_refuses_existing_out_before_registering(tmp_path: Path) -> None:
    out = tmp_path / "wg.conf"
    out.write_text("keep")
    # No configuration at all: the file check comes first, so nothing is registered.
    result = _cli("operator-config", "laptop", "--out", str(out), home=tmp_path)
    assert "exists" in _one_line(result, 2)
    assert out.read_text() == "keep"
