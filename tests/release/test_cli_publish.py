"""`fleetmesh release create|list|show|set-key` through the real parser and dispatcher, with
the coordinator replaced by the in-memory registry and `docker save` by a synthetic tar."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import ops._cli_release as cli_release
import ops._publish as publish
from mesh.clikit import run
from mesh.image import ImageError
from mesh.release import read_signing_key, write_signing_key
from ops.cli import build_parser
from ops.client import ApiError, CoordinatorUnreachable

from ._fakes import FakeRegistry, image_config, layer_tar, saved_image_tar

BASE = layer_tar({"bin/busybox": random.Random(5).randbytes(30_000)})


def _app(version: int) -> bytes:
    files = {f"app/{i}.txt": (f"{i} " * 2000).encode() for i in range(20)}
    files["app/VERSION"] = str(version).encode()
    return layer_tar(files)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeRegistry]:
    reg = FakeRegistry()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(cli_release, "operator_client", lambda args: reg)
    images = {}
    for v in (1, 2):
        layers = [BASE, _app(v)]
        images[f"app:{v}"] = saved_image_tar(tmp_path / f"app{v}.tar", layers,
                                             image_config(layers, ("echo", f"v{v}")))

    def fake_save(image: str, out: Path, **kw: object) -> Path:
        if image not in images:
            raise ImageError(f"docker save {image}: No such image: {image}")
        shutil.copy(images[image], out)
        return Path(out)

    monkeypatch.setattr(publish, "docker_save", fake_save)
    key_path = tmp_path / "home" / ".config" / "fleetmesh" / "release.key"
    key_path.parent.mkdir(parents=True)
    write_signing_key(key_path)
    yield reg


def fleetmesh(*argv: str) -> int:
    return run(build_parser(), list(argv))


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_create_list_show_set_key(env: FakeRegistry, capsys: pytest.CaptureFixture[str],
                                  tmp_path: Path) -> None:
    assert fleetmesh("release", "set-key", "--fleet", "cams") == 0
    key = read_signing_key(tmp_path / "home" / ".config" / "fleetmesh" / "release.key")
    assert env.release_keys["cams"] == bytes(key.verify_key).hex()
    assert "registered" in capsys.readouterr().out

    assert fleetmesh("release", "create", "app:1", "--fleet", "cams", "--app", "web",
                     "--env", "MODE=prod", "--volume", "data:/data:ro", "--restart", "always",
                     "--command", "echo 'hello world'", "--health-cmd", "true") == 0
    out = capsys.readouterr().out
    assert "LAYER" in out and "published cams/web version 1" in out
    assert fleetmesh("release", "create", "app:2", "--fleet", "cams", "--app", "web",
                     "--json") == 0
    created = json.loads(capsys.readouterr().out)
    assert created["version"] == 2 and created["created"] is True
    assert created["layers"][0]["reused_from"] == 1
    assert created["layers"][1]["deltas"][0]["source_diff_id"]
    assert fleetmesh("release", "create", "app:2", "--fleet", "cams", "--app", "web") == 0
    assert "already published" in capsys.readouterr().out
    assert (tmp_path / "home" / ".cache" / "fleetmesh" / "layers").is_dir()

    assert fleetmesh("release", "list", "--fleet", "cams", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["version"] for r in listed["releases"]] == [2, 1]
    assert fleetmesh("release", "list", "--fleet", "cams") == 0
    assert "VERSION" in capsys.readouterr().out
    assert fleetmesh("release", "list", "--fleet", "other") == 0
    assert "no releases" in capsys.readouterr().out
    assert fleetmesh("release", "show", "cams", "web", "2") == 0
    shown = capsys.readouterr().out
    assert "DELTAS" in shown and "from" in shown
    assert fleetmesh("release", "show", "cams", "web", "2", "--json") == 0
    assert json.loads(capsys.readouterr().out)["layers"][1]["deltas"]

    # What the signed manifest says about the container.
    from mesh.release import decode_signed_manifest, verify_manifest
    m = verify_manifest(decode_signed_manifest(env.release_manifest("cams", "web", 1)),
                        key.verify_key, None)
    assert m.container.command == ("echo", "hello world")
    assert m.container.environment == (("MODE", "prod"),)
    assert m.container.volumes[0].read_only and m.container.restart_policy.value == "always"
    assert m.container.health_check is not None and m.container.health_check.command == ("true",)
    assert m.container.update_strategy.value == "download-then-kill"
    assert m.container.network.value == "host" and m.container.health_timeout_s == 60.0


@pytest.mark.parametrize(("argv", "code", "text"), [
    (["release", "create", "nope:1", "--fleet", "cams", "--app", "web"], 1, "No such image"),
    (["release", "create", "app:1", "--fleet", "cams", "--app", "web", "--env", "X"], 2,
     "NAME=VALUE"),
    (["release", "create", "app:1", "--fleet", "cams", "--app", "web", "--volume", "x"], 2,
     "SOURCE:/TARGET"),
    (["release", "create", "app:1", "--fleet", "cams", "--app", "web", "--signing-key",
      "/nonexistent/k"], 2, "no release signing key"),
    (["release", "create", "app:1", "--fleet", "bad name", "--app", "web"], 2, "fleet"),
    (["release", "show", "cams", "web", "7"], 1, "no such release"),
    (["release", "create", "app:1", "--fleet", "cams", "--app", "web", "--health-http", "x/"],
     2, "PORT[/PATH]"),
    (["release", "create", "app:1", "--fleet", "cams", "--app", "web", "--health-tcp", "0"],
     2, "needs a port"),
    (["release", "create", "app:1", "--fleet", "cams", "--app", "web", "--health-running",
      "0"], 2, "above 0 seconds"),
    (["release", "create", "app:1", "--fleet", "cams", "--app", "web", "--health-timeout",
      "0"], 2, "health timeout"),
    (["release", "create", "app:1", "--fleet", "cams", "--app", "web", "--health-tcp", "80",
      "--network", "none"], 2, "use a cmd check"),
])
def test_errors_are_one_line(env: FakeRegistry, capsys: pytest.CaptureFixture[str],
                             argv: list[str], code: int, text: str) -> None:
    assert fleetmesh(*argv) == code
    assert text in _one_line(capsys)


def test_refused_and_unreachable_exit_codes(env: FakeRegistry, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    def refuse(signed: bytes, rollout: str | None = None) -> tuple[dict[str, object], bool]:
        raise ApiError(403, "signature does not verify with the fleet's release key")

    monkeypatch.setattr(env, "publish_release", refuse)
    assert fleetmesh("release", "create", "app:1", "--fleet", "cams", "--app", "web") == 1
    assert "release key" in _one_line(capsys)

    def down(*a: object, **k: object) -> list[dict[str, object]]:
        raise CoordinatorUnreachable("cannot reach the coordinator at https://x: refused")

    monkeypatch.setattr(env, "list_releases", down)
    assert fleetmesh("release", "list", "--fleet", "cams") == 3
    assert "cannot reach" in _one_line(capsys)


def test_create_apply_settings(env: FakeRegistry, capsys: pytest.CaptureFixture[str],
                               tmp_path: Path) -> None:
    from mesh.release import HealthKind, decode_signed_manifest, verify_manifest
    key = read_signing_key(tmp_path / "home" / ".config" / "fleetmesh" / "release.key")
    assert fleetmesh("release", "create", "app:1", "--fleet", "cams", "--app", "web",
                     "--strategy", "hand-over", "--health-http", "8080/ready?x=1",
                     "--health-timeout", "30", "--hand-over-timeout", "5",
                     "--health-interval", "0.5", "--network", "none") == 2  # http needs host
    capsys.readouterr()
    assert fleetmesh("release", "create", "app:1", "--fleet", "cams", "--app", "web",
                     "--strategy", "hand-over", "--health-http", "8080/ready?x=1",
                     "--health-timeout", "30", "--hand-over-timeout", "5",
                     "--health-interval", "0.5") == 0
    m = verify_manifest(decode_signed_manifest(env.release_manifest("cams", "web", 1)),
                        key.verify_key, None)
    hc = m.container.health_check
    assert hc is not None and hc.kind is HealthKind.HTTP
    assert (hc.port, hc.path, hc.interval_s) == (8080, "/ready?x=1", 0.5)
    assert m.container.update_strategy.value == "hand-over"
    assert (m.container.health_timeout_s, m.container.hand_over_timeout_s) == (30.0, 5.0)
    assert fleetmesh("release", "create", "app:2", "--fleet", "cams", "--app", "web",
                     "--strategy", "kill-then-download", "--health-running", "3",
                     "--network", "none") == 0
    m = verify_manifest(decode_signed_manifest(env.release_manifest("cams", "web", 2)),
                        key.verify_key, None)
    hc = m.container.health_check
    assert hc is not None and hc.kind is HealthKind.RUNNING and hc.seconds == 3.0
    assert m.container.network.value == "none"
    assert m.container.update_strategy.value == "kill-then-download"
