"""Keys: generation, `wg pubkey` agreement, file handling, validation."""

from __future__ import annotations

import base64
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from vpn import (
    InvalidKeyError,
    generate_keypair,
    generate_preshared_key,
    key_from_hex,
    key_to_hex,
    public_key_from_private,
    read_private_key,
    validate_key,
    write_private_key,
)


def test_generated_pair_is_consistent() -> None:
    pair = generate_keypair()
    assert len(base64.b64decode(pair.private)) == 32
    assert len(pair.public) == 44
    assert public_key_from_private(pair.private) == pair.public
    assert pair.private not in repr(pair)
    assert generate_keypair().private != pair.private


@pytest.mark.skipif(shutil.which("wg") is None, reason="wg (wireguard-tools) not installed")
def test_public_key_matches_wg_pubkey() -> None:
    for _ in range(5):
        pair = generate_keypair()
        out = subprocess.run(
            ["wg", "pubkey"],
            input=pair.private + "\n",
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
        ).stdout.strip()
        assert out == pair.public


@pytest.mark.skipif(shutil.which("wg") is None, reason="wg (wireguard-tools) not installed")
def test_accepts_keys_from_wg_genkey() -> None:
    # wg genkey's output is clamped; ours must agree with wg pubkey on it, too.
    priv = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout
    pub = subprocess.run(
        ["wg", "pubkey"], input=priv, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert public_key_from_private(priv.strip()) == pub


def test_hex_round_trip() -> None:
    key = generate_keypair().public
    hexed = key_to_hex(key)
    assert len(hexed) == 64 and bytes.fromhex(hexed) == base64.b64decode(key)
    assert key_from_hex(hexed) == key
    assert key_from_hex(hexed.upper()) == key


def test_psk_is_32_random_bytes() -> None:
    assert len(base64.b64decode(generate_preshared_key())) == 32


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "not base64!",
        base64.b64encode(bytes(31)).decode(),
        base64.b64encode(bytes(33)).decode(),
        "A" * 43,  # bad padding
        "é" * 44,
    ],
)
def test_invalid_keys_rejected(bad: str) -> None:
    with pytest.raises(InvalidKeyError):
        validate_key(bad)
    with pytest.raises(InvalidKeyError):
        public_key_from_private(bad)
    with pytest.raises(InvalidKeyError):
        key_to_hex(bad)


@pytest.mark.parametrize("bad", ["", "00" * 31, "zz" * 32, "0" * 65])
def test_invalid_hex_rejected(bad: str) -> None:
    with pytest.raises(InvalidKeyError):
        key_from_hex(bad)


def test_invalid_key_error_is_value_error() -> None:
    assert issubclass(InvalidKeyError, ValueError)
    with pytest.raises(InvalidKeyError):
        validate_key(b"x" * 44)  # type: ignore[arg-type]


def test_write_private_key_mode_0600_and_round_trip(tmp_path: Path) -> None:
    old = os.umask(0)  # the mode must not depend on a friendly umask
    try:
        key = generate_keypair().private
        path = tmp_path / "wg.key"
        write_private_key(path, key)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_private_key(path) == key
    assert path.read_text() == key + "\n"
    # Replacing an existing key file keeps 0600 and leaves no temp files behind.
    key2 = generate_keypair().private
    write_private_key(path, key2)
    assert read_private_key(path) == key2
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["wg.key"]


def test_write_private_key_rejects_bad_key_without_creating(tmp_path: Path) -> None:
    with pytest.raises(InvalidKeyError):
        write_private_key(tmp_path / "k", "nope")
    assert list(tmp_path.iterdir()) == []


def test_read_private_key_rejects_garbage(tmp_path: Path) -> None:
    p = tmp_path / "k"
    p.write_text("garbage\n")
    with pytest.raises(InvalidKeyError):
        read_private_key(p)
    with pytest.raises(FileNotFoundError):
        read_private_key(tmp_path / "missing")


def test_generated_keys_are_clamped_like_wg_genkey() -> None:
    from vpn import clamp_private_key

    for _ in range(20):
        pair = generate_keypair()
        raw = base64.b64decode(pair.private)
        assert raw[0] & 7 == 0 and raw[31] & 128 == 0 and raw[31] & 64 == 64
        assert clamp_private_key(pair.private) == pair.private
    unclamped = base64.b64encode(bytes(range(32))).decode()
    clamped = clamp_private_key(unclamped)
    assert clamped != unclamped
    assert public_key_from_private(clamped) == public_key_from_private(unclamped)
