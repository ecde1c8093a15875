"""A real `fleetmesh coordinator serve --blobs s3://…` (docs/scale.md, "Shared blob storage")
on a real S3-compatible server (SeaweedFS, tests/s3server.py): a release published with the
CLI lands in the bucket, a device reads a blob with Range, a restart keeps the blobs, the store
going away is a 503 and one log line, its return makes everything work again; bad settings stop
the start with one line and exit 2."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest
import trio

import ops._publish as publish
from coordinator._blobs import BlobStoreUnavailable
from coordinator._blobs_s3 import S3Blobs, S3Location
from coordinator._sigv4 import Credentials
from mesh.blobs import BlobVerifyError, check_frame
from mesh.clikit import run
from mesh.release import CHUNK_SIZE, decode_manifest, decode_signed_manifest, write_signing_key
from ops.cli import build_parser
from ops.client import ApiError, DeviceClient, OperatorClient, enroll
from tests.coordinator_process import FLEETMESH, RunningCoordinator, running_coordinator
from tests.release._fakes import image_config, layer_tar, saved_image_tar
from tests.s3server import S3Server
from vpn import generate_keypair

BUCKET = "fleet-blobs"


def _publish_with_the_cli(c: RunningCoordinator, tmp_path: Path,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`fleetmesh release set-key` and `release create app:1` as an operator would, with
    `docker save` replaced by a synthetic image of two layers."""
    home = tmp_path / "home"
    for name, value in c.operator_env(home).items():
        monkeypatch.setenv(name, value)
    for name in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    key = home / ".config" / "fleetmesh" / "release.key"
    key.parent.mkdir(parents=True)
    write_signing_key(key)
    layers = [layer_tar({"bin/tool": random.Random(1).randbytes(300_000)}),
              layer_tar({f"app/{i}.txt": (f"{i} " * 4000).encode() for i in range(40)})]
    image = saved_image_tar(tmp_path / "app.tar", layers, image_config(layers))

    def docker_save(name: str, out: Path, **kw: object) -> Path:
        assert name == "app:1"
        shutil.copy(image, out)
        return Path(out)

    monkeypatch.setattr(publish, "docker_save", docker_save)
    assert run(build_parser(), ["release", "set-key", "--fleet", "cams"]) == 0
    assert run(build_parser(), ["release", "create", "app:1", "--fleet", "cams",
                                "--app", "web"]) == 0


async def _device_reads_a_blob(c: RunningCoordinator, credential: str) -> tuple[str, bytes]:
    """The largest chunk of release web 1, fetched whole (and checked against its ID) and
    then as a range, over the device API → (ID, bytes)."""
    async with DeviceClient(c.url, credential, c.der) as dev:
        m = decode_manifest(decode_signed_manifest(await dev.manifest("cams", "web", 1)).manifest)
        chunk = max((ch for layer in m.layers for ch in layer.chunks),
                    key=lambda ch: ch.stored_size)
        blob_id = chunk.id.hex()
        whole = await dev.blob(blob_id)
        assert len(whole) == chunk.stored_size > 1000
        try:
            check_frame(chunk.id, [whole], CHUNK_SIZE)
        except BlobVerifyError as exc:
            pytest.fail(f"the coordinator served other bytes than chunk {blob_id}: {exc}")
        start, end = 17, len(whole) - 100
        assert await dev.blob(blob_id, start, end) == whole[start:end]
    return blob_id, whole


def _read_from_the_bucket(server: S3Server, blob_id: str, staging: Path) -> bytes:
    bucket = S3Blobs(S3Location.parse(server.url(BUCKET, "coord-a")),
                     Credentials(server.access_key, server.secret_key), staging)
    try:
        opened = bucket.open(blob_id)
        assert opened is not None
        data = b"".join(opened.reader.pieces(0, opened.size, 65536))
        opened.reader.close()
        return data
    finally:
        bucket.close()


async def test_serve_keeps_blobs_in_s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = S3Server()  # its own: it is stopped and started under the coordinator
    try:
        await trio.to_thread.run_sync(server.start)
        await trio.to_thread.run_sync(server.make_bucket, BUCKET)
        args = ("--blobs", server.url(BUCKET, "coord-a"), "--blobs-credentials-file",
                str(server.credentials_file(tmp_path / "s3.credentials")))
        data = tmp_path / "d"
        with running_coordinator(data, tmp_path / "first.log", *args) as c:
            await trio.to_thread.run_sync(_publish_with_the_cli, c, tmp_path, monkeypatch)
            with OperatorClient(c.url, c.api_key, cert_der=c.der) as op:
                token = (await trio.to_thread.run_sync(op.create_token, "cams"))["token"]
            with trio.fail_after(60):
                enrolled, _ = await enroll(c.url, token, generate_keypair().public, name="cam")
                blob_id, whole = await _device_reads_a_blob(c, enrolled.credential)
        # the bytes are in the bucket, under the prefix, and nowhere in the data directory
        assert _read_from_the_bucket(server, blob_id, tmp_path / "t") == whole
        assert not any(p.is_file() for p in (data / "blobs").rglob("*"))
        assert not any((data / "blobs-staging").iterdir())

        log = tmp_path / "again.log"
        with running_coordinator(data, log, *args) as c:
            with trio.fail_after(60):  # a restart finds them
                assert (await _device_reads_a_blob(c, enrolled.credential))[0] == blob_id
            await trio.to_thread.run_sync(server.stop_server)
            with trio.fail_after(60):
                async with DeviceClient(c.url, enrolled.credential, c.der) as dev:
                    with pytest.raises(ApiError) as down:
                        await dev.blob(blob_id, 0, 10)
            assert down.value.status == 503 and "blob store" in str(down.value)
            with OperatorClient(c.url, c.api_key, cert_der=c.der) as op:
                with pytest.raises(ApiError) as down:
                    await trio.to_thread.run_sync(op.missing_blobs, [blob_id])
                assert down.value.status == 503
                assert await trio.to_thread.run_sync(op.list_devices)  # the rest goes on
            await trio.to_thread.run_sync(server.start_again)
            with trio.fail_after(60):
                # SeaweedFS serves stored objects a moment after it answers: wait for that
                # (outside the coordinator), then the coordinator must serve it at once
                while True:
                    try:
                        await trio.to_thread.run_sync(_read_from_the_bucket, server, blob_id,
                                                      tmp_path / "t")
                        break
                    except BlobStoreUnavailable:
                        await trio.sleep(0.2)
                assert (await _device_reads_a_blob(c, enrolled.credential))[1] == whole
        text = log.read_text()
        store_lines = [line for line in text.splitlines() if "blob store" in line]
        assert len(store_lines) == 2, text  # one per refused request
        assert "Traceback" not in text and server.secret_key not in text
    finally:
        server.stop()


@pytest.mark.parametrize(("blobs", "credentials", "message"), [
    ("s3://Not_A_Bucket", True, "is not an S3 bucket name"),
    ("s3://fleet-blobs?endpoint=ftp://127.0.0.1", True, "endpoint must be http(s)"),
    ("s3://fleet-blobs?endpoint=http://127.0.0.1:1", False, "credentials needed"),
])
def test_bad_blob_settings_stop_serve_with_one_line(tmp_path: Path, blobs: str,
                                                    credentials: bool, message: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    extra = []
    if credentials:
        creds = tmp_path / "creds"
        creds.write_text("aws_access_key_id = AKID\naws_secret_access_key = sec\n")
        extra = ["--blobs-credentials-file", str(creds)]
    done = subprocess.run([FLEETMESH, "coordinator", "serve", "--data", str(tmp_path / "d"),
                           "--listen", "127.0.0.1:0", "--no-hub", "--blobs", blobs, *extra],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_wrong_s3_credentials_stop_serve_with_one_line(tmp_path: Path,
                                                       s3_server: S3Server) -> None:
    s3_server.make_bucket("wrong-creds")
    creds = tmp_path / "creds"
    creds.write_text(f"aws_access_key_id = {s3_server.access_key}\n"
                     "aws_secret_access_key = not-the-secret\n")
    done = subprocess.run([FLEETMESH, "coordinator", "serve", "--data", str(tmp_path / "d"),
                           "--listen", "127.0.0.1:0", "--no-hub", "--blobs",
                           s3_server.url("wrong-creds"), "--blobs-credentials-file",
                           str(creds)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert "refuses these credentials" in done.stderr and done.stderr.count("\n") == 1
    assert "not-the-secret" not in done.stderr
