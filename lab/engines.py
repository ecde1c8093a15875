"""One Docker engine per lab node (every device and the operator), so no node sees another's
images: `dockerd` started inside the node's network and private mount namespace, with its own
data root, exec root, socket, config file and cgroup parent.

Where things live (all lab-prefixed, all removed by `down`):

- exec root, socket, pid file, config: ``/run/fleetmesh-lab/docker/<node>/`` (short: a unix
  socket path has at most 107 bytes, and containerd puts its sockets below the exec root);
- data root: ``/var/lib/fleetmesh-lab/docker/<node>`` (on disk: overlay2 wants a real file
  system, and images are too big for a small /run tmpfs);
- container cgroups: ``/sys/fs/cgroup/[<controller>/]fleetmesh-lab/<node>/<id>``, so a crash
  cleanup finds container processes that live in network namespaces of their own;
- mounts (overlay, shm, netns files) exist only in the node's mount namespace, which dies with
  its last process; containerd's shim sockets go to the node's private tmpfs on /run/containerd.

The host's own engine, its containers and images are never touched: nothing here talks to
/var/run/docker.sock or /var/lib/docker.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ._host import (
    LOG_DIR,
    STATE_DIR,
    LabError,
    mounts_under,
    proc_start_time,
    read_state,
    state_lock,
    umount,
    write_state,
)
from .network import LabNetwork, Node

ENGINE_DIR: Final = STATE_DIR / "docker"
DATA_DIR: Final = Path("/var/lib/fleetmesh-lab")
DATA_ROOTS: Final = DATA_DIR / "docker"
CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
CGROUP_PARENT: Final = "fleetmesh-lab"
BUSYBOX_IMAGE: Final = "fleetmesh-lab/busybox:latest"
# Measured on 2 cores: one engine answers in ~0.2 s, twelve started together within 1 s; the
# deadline is for a machine under load (tests running beside the lab).
READY_TIMEOUT: Final = 60.0
# sockaddr_un.sun_path is 108 bytes including the terminating NUL (unix(7)).
MAX_SOCKET_PATH: Final = 107
# containerd's debug socket is the longest path it creates below the exec root.
_LONGEST_BELOW_EXEC_ROOT: Final = "/containerd/containerd-debug.sock"
# Containers still running when `down` stops an engine get this long (dockerd --shutdown-timeout);
# whatever survives is killed through the lab's cgroups anyway.
SHUTDOWN_TIMEOUT_S: Final = 2


@dataclass(frozen=True, slots=True)
class EnginePaths:
    node: str

    @property
    def exec_root(self) -> Path:
        return ENGINE_DIR / self.node

    @property
    def socket(self) -> Path:
        return self.exec_root / "docker.sock"

    @property
    def data_root(self) -> Path:
        return DATA_ROOTS / self.node

    @property
    def config(self) -> Path:
        return self.exec_root / "daemon.json"

    @property
    def pidfile(self) -> Path:
        return self.exec_root / "docker.pid"

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket}"

    @property
    def cgroup_parent(self) -> str:
        return f"/{CGROUP_PARENT}/{self.node}"


def dockerd_argv(paths: EnginePaths) -> list[str]:
    """The recipe of docs/architecture.md "Platform facts": no bridge, no iptables or
    masquerading (the node's namespace is the lab's, the host's iptables are not ours), plus a
    config file of our own so that the host's /etc/docker/daemon.json and /etc/docker/key.json
    are neither read nor written."""
    return ["dockerd", "--config-file", str(paths.config), "--data-root", str(paths.data_root),
            "--exec-root", str(paths.exec_root), "-H", paths.docker_host,
            "--pidfile", str(paths.pidfile), "--bridge", "none", "--iptables=false",
            "--ip-masq=false", "--cgroup-parent", paths.cgroup_parent,
            "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S)]


def engine_nodes(lab: LabNetwork) -> list[Node]:
    """The nodes that get an engine: every device and the operator (if the topology has one
    and `[agents] docker` is not false)."""
    if not lab.topology.agents.docker:
        return []
    return [n for n in lab.nodes if n.role in ("device", "operator")]


def ping(sock: Path, timeout: float = 2.0) -> bool:
    """GET /_ping on an engine's socket: True once the engine serves its API."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(sock))
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            head = s.recv(64)
    except OSError:
        return False
    return head.startswith(b"HTTP/1.") and head[9:12] == b"200"


def start_engines(lab: LabNetwork, nodes: Sequence[Node], timeout: float = READY_TIMEOUT
                  ) -> dict[str, dict[str, Any]]:
    """Start one engine per node, all at once; return once every one answers its socket.
    The engines are recorded in the state file (`engines`, and their PIDs under `processes`)
    before the wait, so `down` finds them whatever happens next."""
    started: dict[str, tuple[EnginePaths, subprocess.Popen[bytes]]] = {}
    for n in nodes:
        paths = EnginePaths(n.name)
        if len(str(paths.exec_root) + _LONGEST_BELOW_EXEC_ROOT) > MAX_SOCKET_PATH:
            raise LabError(f"{n.name}: engine socket path too long for a unix socket")
        paths.exec_root.mkdir(parents=True, exist_ok=True)
        paths.data_root.mkdir(parents=True, exist_ok=True)
        paths.config.write_text(json.dumps({
            "deprecated-key-path": str(paths.exec_root / "key.json"),
            "log-level": "warn",
        }))
        log = open(lab_log(n.name), "ab")  # noqa: SIM115 - handed to the child process
        try:
            p = lab.spawn(n, dockerd_argv(paths), stdin=subprocess.DEVNULL, stdout=log,
                          stderr=subprocess.STDOUT, env=_engine_env())
        finally:
            log.close()
        started[n.name] = (paths, p)
    engines: dict[str, dict[str, Any]] = {
        name: {"pid": p.pid, "start": proc_start_time(p.pid), "socket": str(paths.socket),
               "docker_host": paths.docker_host, "data_root": str(paths.data_root),
               "exec_root": str(paths.exec_root)}
        for name, (paths, p) in started.items()}
    with state_lock():
        state = read_state() or lab.state_now()
        state.setdefault("engines", {}).update(engines)
        write_state(state)

    deadline = time.monotonic() + timeout
    waiting = dict(started)
    while waiting:
        for name, (paths, p) in list(waiting.items()):
            if ping(paths.socket):
                del waiting[name]
            elif p.poll() is not None:
                raise LabError(f"{name}: dockerd exited with {p.returncode} "
                               f"(see {lab_log(name)})")
        if waiting and time.monotonic() > deadline:
            raise LabError(f"engine(s) not answering within {timeout:.0f} s: "
                           f"{', '.join(sorted(waiting))} (see {lab_log(next(iter(waiting)))})")
        if waiting:
            time.sleep(0.05)
    return engines


def lab_log(node: str) -> Path:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    return LOG_DIR / f"{node}-dockerd.log"


def _engine_env() -> dict[str, str]:
    """dockerd must not inherit a DOCKER_HOST or similar meant for a client."""
    return {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}


def docker(docker_host: str, *argv: str, timeout: float = 120, input: bytes | None = None,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """`docker ARGV` against one engine (through its socket; no namespace needed)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    return subprocess.run(["docker", *argv], capture_output=True, timeout=timeout, input=input,
                          env={**base, **(env or {}), "DOCKER_HOST": docker_host}, check=False)


def operator_docker_host(lab: LabNetwork) -> str:
    """DOCKER_HOST of the lab operator's engine (where sample and bench images are built)."""
    engine = lab.state_now().get("engines", {}).get("operator")
    if engine is None:
        raise LabError("the lab has no operator engine (no [operator], --network-only, or "
                       "[agents] docker = false)")
    return str(engine["docker_host"])


def busybox_rootfs_tar(busybox: Path = Path("/bin/busybox")) -> bytes:
    """A minimal root file system from Debian's busybox-static: /bin/busybox, a symlink per
    applet, /tmp. Deterministic (sorted, mtime 0, uid 0), so every lab imports the same layer."""
    if not busybox.is_file():
        raise LabError(f"{busybox} is missing (Debian package busybox-static)")
    listed = subprocess.run([str(busybox), "--list"], capture_output=True, text=True,
                            timeout=10, check=False)
    applets = sorted({a for a in listed.stdout.split() if a and "/" not in a} - {"busybox"})
    if listed.returncode != 0 or "sh" not in applets:
        raise LabError(f"{busybox} --list failed: is it busybox-static?")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        def add(name: str, kind: bytes, mode: int, data: bytes = b"", link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime, info.linkname = kind, mode, 0, link
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)

        add("bin", tarfile.DIRTYPE, 0o755)
        add("bin/busybox", tarfile.REGTYPE, 0o755, busybox.read_bytes())
        for applet in applets:
            add(f"bin/{applet}", tarfile.SYMTYPE, 0o777, link="busybox")
        add("tmp", tarfile.DIRTYPE, 0o1777)
        add("etc", tarfile.DIRTYPE, 0o755)
        add("etc/passwd", tarfile.REGTYPE, 0o644, b"root:x:0:0:root:/:/bin/sh\n")
        add("etc/group", tarfile.REGTYPE, 0o644, b"root:x:0:\n")
    return buf.getvalue()


def load_busybox(docker_host: str) -> str:
    """`docker import` the busybox root file system into one engine as BUSYBOX_IMAGE."""
    r = docker(docker_host, "import", "--change", 'CMD ["sh"]', "--change", "ENV PATH=/bin",
               "-", BUSYBOX_IMAGE, input=busybox_rootfs_tar())
    if r.returncode != 0:
        raise LabError(f"docker import {BUSYBOX_IMAGE}: {r.stderr.decode(errors='replace')}")
    return BUSYBOX_IMAGE


def memory_kib(pid: int) -> int:
    """Resident memory of an engine: dockerd plus its children (containerd, shims), KiB."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
        todo += [int(c) for c in children]
    return total


# --- crash cleanup ---------------------------------------------------------------------------


def _lab_cgroups() -> list[Path]:
    """The lab's cgroup directories in every hierarchy (v1 controllers, v2), deepest first."""
    roots = [CGROUP_ROOT / CGROUP_PARENT]
    if CGROUP_ROOT.is_dir():
        roots += [d / CGROUP_PARENT for d in CGROUP_ROOT.iterdir() if d.is_dir()]
    found: list[Path] = []
    for root in roots:
        if root.is_dir():
            found += [Path(dirpath) for dirpath, _, _ in os.walk(root)]
    return sorted(set(found), key=lambda p: (-len(p.parts), str(p)))


def cgroup_pids() -> set[int]:
    """Processes in the lab's container cgroups (containers with a network namespace of their
    own are in no lab namespace; this is how a crash cleanup finds them)."""
    pids: set[int] = set()
    for d in _lab_cgroups():
        try:
            pids.update(int(x) for x in (d / "cgroup.procs").read_text().split())
        except (OSError, ValueError):
            continue
    return pids


def remove_cgroups(timeout: float = 5.0) -> list[str]:
    """rmdir the lab's cgroups, deepest first (a cgroup goes once its processes are gone).
    Returns the ones that could not be removed."""
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for d in _lab_cgroups():
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                left.append(str(d))
        if not left or time.monotonic() > deadline:
            return left
        for pid in cgroup_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def remove_data(paths: Iterable[Path] = (DATA_DIR,)) -> None:
    """Unmount whatever an engine left mounted under its roots in the host's mount namespace
    (an engine started by hand, or an older layout), then delete the roots."""
    for root in paths:
        for mp in mounts_under(root):
            umount(mp)
        left = mounts_under(root)
        if left:
            raise LabError(f"could not unmount {left[0]}; not removing {root}")
        if root.exists():
            shutil.rmtree(root)
