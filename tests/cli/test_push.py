"""`fleetmesh push`: from examples/app's Dockerfile to published releases, against a real
coordinator process (tests.coordinator_process) and the real Docker engine the `docker` client
reaches (DOCKER_HOST or the host's; scripts/setup starts one). The engine tests are marked
`lab` and skipped with the reason when no engine answers; everything they create is named
after a random app and removed in `finally`.

The base image is the lab's busybox one (`fleetmesh-lab/busybox:latest`, Debian's
busybox-static as a root file system, imported here if the engine lacks it): no registry on
the internet is needed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab.engines import BUSYBOX_IMAGE, busybox_rootfs_tar
from mesh.clikit import run
from mesh.release import write_signing_key
from ops._build import same_platform
from ops.cli import build_parser
from tests.coordinator_process import running_coordinator
from tests.release.test_release_docker import _docker, _docker_skip_reason

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "app"
HOOK = ROOT / "examples" / "git" / "post-receive"
# This tree's `fleetmesh` (the console script may belong to another checkout of the venv).
FLEETMESH = [sys.executable, "-m", "ops.cli"]
BASE_ARG = f"BASE={BUSYBOX_IMAGE}"


@dataclass
class Env:
    env: dict[str, str]
    app: str
    tmp: Path

    def cli(self, *argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([*FLEETMESH, *argv], capture_output=True, text=True, timeout=600,
                           env=self.env, cwd=cwd, check=False)
        assert "Traceback" not in r.stderr, r.stderr
        return r

    def versions(self) -> list[int]:
        r = self.cli("release", "list", "--fleet", "cams", "--app", self.app, "--json")
        assert r.returncode == 0, r.stderr
        return sorted(x["version"] for x in json.loads(r.stdout)["releases"])


@pytest.fixture
def engine_base() -> Iterator[None]:
    """The engine, with the busybox base image (imported for this test if it lacked it)."""
    reason = _docker_skip_reason()
    if reason:
        pytest.skip(reason)
    imported = _docker("image", "inspect", BUSYBOX_IMAGE, check=False).returncode != 0
    if imported:
        r = subprocess.run(["docker", "import", "--change", 'CMD ["/bin/sh"]', "-",
                            BUSYBOX_IMAGE], input=busybox_rootfs_tar(), capture_output=True,
                           timeout=300, check=False)
        assert r.returncode == 0, r.stderr
    try:
        yield
    finally:
        if imported:
            _docker("rmi", "-f", BUSYBOX_IMAGE, check=False, timeout=120)


@pytest.fixture
def env(engine_base: None, tmp_path: Path) -> Iterator[Env]:
    (tmp_path / "coord").mkdir()
    (tmp_path / "home").mkdir()
    app = f"push-{uuid.uuid4().hex[:8]}"
    with running_coordinator(tmp_path / "coord", tmp_path / "coord.log") as coord:
        environ = coord.operator_env(tmp_path / "home")
        environ["PYTHONPATH"] = str(ROOT)
        e = Env(environ, app, tmp_path)
        key = tmp_path / "home" / ".config" / "fleetmesh" / "release.key"
        key.parent.mkdir(parents=True)
        assert e.cli("release", "keygen", "--out", str(key)).returncode == 0
        r = e.cli("release", "set-key", "--fleet", "cams")
        assert r.returncode == 0, r.stderr
        try:
            yield e
        finally:
            listed = _docker("images", "--format", "{{.Repository}}:{{.Tag}}",
                             f"fleetmesh/{app}", check=False).stdout.split()
            for tag in listed:
                _docker("rmi", "-f", tag, check=False, timeout=120)


def _engine_arch() -> str:
    return _docker("version", "--format", "{{.Server.Arch}}").stdout.strip()


def _steps(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines()
            if line.startswith("Step ") or line.startswith("#")]


def _layer_sizes(out: dict[str, object]) -> list[dict[str, object]]:
    layers = out["layers"]
    assert isinstance(layers, list)
    return layers


@pytest.mark.lab
def test_push_builds_and_publishes_then_ships_a_delta(env: Env) -> None:
    ctx = env.tmp / "app"
    shutil.copytree(EXAMPLE, ctx)
    r = env.cli("push", str(ctx), "--fleet", "cams", "--app", env.app, "--build-arg", BASE_ARG,
                "--health-http", "8080/", "--json", "--platform", f"linux/{_engine_arch()}")
    assert r.returncode == 0, r.stderr
    v1 = json.loads(r.stdout)
    assert v1["version"] == 1 and v1["created"] is True
    # On a pipe: our line, then one line per build step and nothing of the steps' output.
    steps = _steps(r.stderr)
    assert len(steps) == len(set(steps)) >= 3, r.stderr
    assert any("COPY www /www" in s for s in steps), r.stderr
    assert "--->" not in r.stderr and "Sending build context" not in r.stderr, r.stderr
    assert f"as fleetmesh/{env.app}:1" in r.stderr.splitlines()[0]
    assert _docker("image", "inspect", f"fleetmesh/{env.app}:1", check=False).returncode == 0
    assert env.versions() == [1]

    # A version that is not newer is refused before anything is built.
    r = env.cli("push", str(ctx), "--fleet", "cams", "--app", env.app, "--build-arg", BASE_ARG,
                "--version", "1")
    assert r.returncode == 1 and "not newer" in r.stderr and not _steps(r.stderr), r.stderr

    # A one-line change: v2's base layer is reused, its www layer travels as a delta.
    page = ctx / "www" / "index.html"
    text = page.read_text()
    assert text.count("the first release of the example app") == 1
    page.write_text(text.replace("the first release of the example app",
                                 "the second release: one line changed"))
    r = env.cli("push", str(ctx), "--fleet", "cams", "--app", env.app, "--build-arg", BASE_ARG,
                "--health-http", "8080/", "--json")
    assert r.returncode == 0, r.stderr
    v2 = json.loads(r.stdout)
    assert v2["version"] == 2 and v2["created"] is True
    base, www = _layer_sizes(v2)
    assert base["reused_from"] == 1 and www["reused_from"] is None
    deltas = www["deltas"]
    assert isinstance(deltas, list) and deltas, v2
    best = min(d["size"] for d in deltas)
    assert best < www["stored_size"]
    print(f"\npush v2 www layer: size {www['size']} B, chunks {www['stored_size']} B, "
          f"delta {best} B ({deltas[0]['method']}); uploaded {v2['uploaded_blobs']} blobs, "
          f"{v2['uploaded_bytes']} B; v1 uploaded {v1['uploaded_bytes']} B")
    shown = env.cli("release", "show", "cams", env.app, "2", "--json")
    assert json.loads(shown.stdout)["layers"][1]["deltas"], shown.stdout

    # The same tree again: nothing new is published, and no fleetmesh/APP:3 tag is left.
    r = env.cli("push", str(ctx), "--fleet", "cams", "--app", env.app, "--build-arg", BASE_ARG,
                "--health-http", "8080/")
    assert r.returncode == 0 and "already published" in r.stdout, (r.stdout, r.stderr)
    assert env.versions() == [1, 2]
    assert _docker("image", "inspect", f"fleetmesh/{env.app}:3", check=False).returncode != 0


@pytest.mark.lab
def test_a_broken_build_exits_1_with_its_error_and_publishes_nothing(env: Env) -> None:
    ctx = env.tmp / "broken"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {BUSYBOX_IMAGE}\nRUN echo {env.app}; exit 3\n")
    r = env.cli("push", str(ctx), "--fleet", "cams", "--app", env.app)
    assert r.returncode == 1, (r.stdout, r.stderr)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("fleetmesh: docker build") and "exit 3" in last, r.stderr
    assert r.stdout == ""
    assert env.versions() == []
    # The failed step's container does not stay behind on the operator's engine.
    left = _docker("ps", "-a", "--no-trunc", "--format", "{{.Command}}").stdout
    assert env.app not in left, left

    # Another platform than the base image's: the classic builder would take the base as it
    # is; push refuses the image and publishes nothing.
    other = "arm64" if _engine_arch() == "amd64" else "amd64"
    (ctx / "Dockerfile").write_text(f"FROM {BUSYBOX_IMAGE}\nCMD [\"true\"]\n")
    r = env.cli("push", str(ctx), "--fleet", "cams", "--app", env.app, "--platform",
                f"linux/{other}")
    assert r.returncode == 1, (r.stdout, r.stderr)
    last = r.stderr.strip().splitlines()[-1]
    assert f"not linux/{other}" in last, r.stderr
    assert _docker("image", "inspect", f"fleetmesh/{env.app}:1", check=False).returncode != 0
    assert env.versions() == []

    (ctx / "Dockerfile").write_text(f"FROM {BUSYBOX_IMAGE}\nCOPPY x /x\n")
    r = env.cli("push", str(ctx), "--fleet", "cams", "--app", env.app)
    assert r.returncode == 1, (r.stdout, r.stderr)
    last = r.stderr.strip().splitlines()[-1]
    assert "unknown instruction" in last.lower() and "COPPY" in last.upper(), r.stderr
    assert env.versions() == []


@pytest.mark.lab
def test_git_push_to_a_bare_repository_publishes(env: Env) -> None:
    bare = env.tmp / "web.git"
    work = env.tmp / "work"
    git_env = dict(env.env, GIT_AUTHOR_NAME="op", GIT_AUTHOR_EMAIL="op@example.invalid",
                   GIT_COMMITTER_NAME="op", GIT_COMMITTER_EMAIL="op@example.invalid",
                   FLEETMESH=" ".join(FLEETMESH), GIT_CONFIG_NOSYSTEM="1")

    def git(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(["git", *argv], cwd=cwd, env=git_env, capture_output=True,
                           text=True, timeout=600, check=False)
        assert r.returncode == 0, (argv, r.stdout, r.stderr)
        return r

    git("init", "--bare", "-q", "-b", "main", str(bare), cwd=env.tmp)
    shutil.copy2(HOOK, bare / "hooks" / "post-receive")
    git("config", "fleetmesh.app", env.app, cwd=bare)
    git("config", "fleetmesh.fleet", "cams", cwd=bare)
    git("config", "fleetmesh.dir", "app", cwd=bare)
    git("config", "fleetmesh.args", f"--build-arg {BASE_ARG} --health-http 8080/", cwd=bare)
    shutil.copytree(EXAMPLE, work / "app")
    (work / "README").write_text("the web app\n")
    git("init", "-q", "-b", "main", str(work), cwd=env.tmp)
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "v1", cwd=work)
    r = git("push", "-q", str(bare), "main", cwd=work)
    # git relays the hook's output to the pusher, prefixed `remote:` over ssh; locally as is.
    assert f"published cams/{env.app} version 1" in r.stdout + r.stderr, (r.stdout, r.stderr)
    assert env.versions() == [1]
    # A push to another branch publishes nothing.
    git("push", "-q", str(bare), "main:refs/heads/topic", cwd=work)
    assert env.versions() == [1]


# --------------------------------------------------------------------------- arguments


@pytest.fixture
def keyed_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A release key where the CLI looks for it; no coordinator (arguments fail before)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("FLEETMESH_URL", "https://127.0.0.1:9")
    monkeypatch.setenv("FLEETMESH_API_KEY", "k")
    key = tmp_path / "home" / ".config" / "fleetmesh" / "release.key"
    key.parent.mkdir(parents=True)
    write_signing_key(key)
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "Dockerfile").write_text("FROM scratch\n")
    (tmp_path / "empty").mkdir()
    return tmp_path


@pytest.mark.parametrize(("argv", "text"), [
    (["{tmp}/nope"], "no such directory"),
    (["{tmp}/empty"], "no Dockerfile"),
    (["{tmp}/ctx", "--platform", "linux"], "not os/arch"),
    (["{tmp}/ctx", "--platform", "linux/amd64,linux/amd64"], "named twice"),
    (["{tmp}/ctx", "--tag", "Bad Tag"], "not an image reference"),
    (["{tmp}/ctx", "--app", "agent"], "fleetmesh-agent, the agent's own container"),
    (["{tmp}/ctx", "--build-arg", "NOEQUALS"], "NAME=VALUE"),
    (["{tmp}/ctx", "--env", "X"], "NAME=VALUE"),
    (["{tmp}/ctx", "--version", "0"], "--version must be 1 or more"),
    (["{tmp}/ctx", "--phases", "1", "--no-rollout"], "exclude each other"),
    (["{tmp}/ctx", "--fleet", "bad name"], "fleet"),
    (["{tmp}/ctx", "--key", "-1"], "--key must be 0 or more"),
    (["{tmp}/ctx", "--health-http", "x/"], "PORT[/PATH]"),
])
def test_bad_arguments_exit_2_with_one_line(keyed_home: Path, argv: list[str], text: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    args = [a.replace("{tmp}", str(keyed_home)) for a in argv]
    fleet = [] if "--fleet" in args else ["--fleet", "cams"]
    app = [] if "--app" in args else ["--app", "web"]
    try:
        code = run(build_parser(), ["push", *args, *app, *fleet])
    except SystemExit as exc:  # argparse's own errors (one line: ops._cli_common)
        code = exc.code  # type: ignore[assignment]
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and text in err, err



@pytest.mark.parametrize(("built", "wanted", "same"), [
    ("linux/amd64", "linux/amd64", True),
    ("linux/arm64/v8", "linux/arm64", True),
    ("linux/arm/v7", "linux/arm/v7", True),
    ("linux/arm/v6", "linux/arm/v7", False),
    ("linux/arm", "linux/arm/v7", False),
    ("linux/amd64", "linux/arm64", False),
    ("windows/amd64", "linux/amd64", False),
])
def test_the_built_platform_must_be_the_one_asked_for(built: str, wanted: str,
                                                      same: bool) -> None:
    assert same_platform(built, wanted) is same


@pytest.mark.parametrize("buildx", [True, False])
def test_several_platforms_are_built_one_by_one_and_published_as_one_release(
        keyed_home: Path, monkeypatch: pytest.MonkeyPatch, buildx: bool) -> None:
    """`--platform a,b` builds each platform under its own tag, with `docker buildx build
    --load` where the client has buildx (absent on this host: faked), else with the classic
    builder, then publishes them together (the classic path for real: below)."""
    import contextlib
    from types import SimpleNamespace

    import ops._cli_push as cli_push
    built: list[tuple[str, str | None, bool]] = []
    published: list[list[str]] = []

    def fake_build(context: Path, tag: str, *, platform: str | None = None,
                   buildx: bool = False, **kw: object) -> None:
        built.append((tag, platform, buildx))

    def fake_publish(args: object, plan: object, client: object,
                     images: list[str]) -> SimpleNamespace:
        published.append(images)
        return SimpleNamespace(created=True, version=4)

    monkeypatch.setattr(cli_push, "buildx_available", lambda: buildx)
    monkeypatch.setattr(cli_push, "docker_build", fake_build)
    monkeypatch.setattr(cli_push, "publish_and_report", fake_publish)
    monkeypatch.setattr(cli_push, "operator_client", lambda args: contextlib.nullcontext(
        SimpleNamespace(list_releases=lambda fleet, app: [{"version": 3}])))
    code = run(build_parser(), ["push", str(keyed_home / "ctx"), "--app", "web", "--fleet",
                                "cams", "--platform", "linux/amd64,linux/arm/v7"])
    assert code == 0
    assert built == [("fleetmesh/web:4-linux-amd64", "linux/amd64", buildx),
                     ("fleetmesh/web:4-linux-arm-v7", "linux/arm/v7", buildx)]
    assert published == [["fleetmesh/web:4-linux-amd64", "fleetmesh/web:4-linux-arm-v7"]]


@pytest.mark.lab
def test_a_push_for_two_platforms_builds_each_and_publishes_one_release(env: Env) -> None:
    """Without buildx (this host's client), the classic builder builds each platform in turn:
    a Dockerfile without RUN (FROM scratch + COPY) builds for any platform, and the release
    carries an image per platform, each with its own layer."""
    ctx = env.tmp / "multi"
    ctx.mkdir()
    (ctx / "payload.txt").write_text(f"{env.app}\n")
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY payload.txt /payload.txt\n")
    r = env.cli("push", str(ctx), "--fleet", "cams", "--app", env.app, "--platform",
                "linux/amd64,linux/arm64", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["version"] == 1 and out["created"] is True
    assert sorted(layer["platform"] for layer in out["layers"]) == ["linux/amd64",
                                                                    "linux/arm64"], out
    for platform in ("linux-amd64", "linux-arm64"):
        tag = f"fleetmesh/{env.app}:1-{platform}"
        shown = _docker("image", "inspect", "--format", "{{.Os}}/{{.Architecture}}", tag)
        assert shown.stdout.strip() == platform.replace("-", "/"), (tag, shown.stdout)
    shown = env.cli("release", "show", "cams", env.app, "1")
    assert shown.returncode == 0 and "linux/arm64" in shown.stdout \
        and "linux/amd64" in shown.stdout, shown.stdout
