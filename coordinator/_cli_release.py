"""`fleetmesh delta ...` and `fleetmesh release keygen`: patches and the release signing key."""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path
from typing import Any

from mesh.clikit import CliError
from mesh.delta import DeltaError, apply_delta, create_delta, read_header
from mesh.release import ReleaseError, key_id, write_signing_key


def register(subparsers: Any) -> None:
    delta = subparsers.add_parser("delta", help="create and apply binary layer deltas")
    dsub = delta.add_subparsers(dest="delta_command", metavar="ACTION", required=True)

    create = dsub.add_parser("create", help="write a patch that turns OLD into NEW")
    create.add_argument("old", metavar="OLD", type=Path)
    create.add_argument("new", metavar="NEW", type=Path)
    create.add_argument("patch", metavar="PATCH", type=Path)
    create.add_argument("--bare", action="store_true",
                        help="write the manifest form: no self-check digests (~27 bytes less); "
                             "applying it needs --expect")
    create.set_defaults(handler=_delta_create)

    apply = dsub.add_parser("apply", help="rebuild NEW from OLD and PATCH (verified)")
    apply.add_argument("old", metavar="OLD", type=Path)
    apply.add_argument("patch", metavar="PATCH", type=Path)
    apply.add_argument("out", metavar="OUT", type=Path)
    apply.add_argument("--expect", metavar="DIFF_ID",
                       help="require the output to hash to this sha256:<hex> "
                            "(needed for a bare patch)")
    apply.set_defaults(handler=_delta_apply)

    release = subparsers.add_parser("release", help="release signing keys")
    rsub = release.add_subparsers(dest="release_command", metavar="ACTION", required=True)
    keygen = rsub.add_parser("keygen", help="generate the operator's Ed25519 release key")
    keygen.add_argument("--out", metavar="FILE", type=Path, required=True,
                        help="new key file (created 0600; never overwritten)")
    keygen.set_defaults(handler=_release_keygen)


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise CliError(f"{what} {path}: no such file")


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CliError(f"cannot write {path}: {exc.strerror}") from None


def _file_diff_id(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None


def _delta_create(args: argparse.Namespace) -> int:
    _require_file(args.old, "old file")
    _require_file(args.new, "new file")
    try:
        patch = create_delta(args.old, args.new, self_check=not args.bare)
    except DeltaError as exc:
        raise CliError(str(exc)) from None
    _write_atomically(args.patch, patch)
    header = read_header(patch)
    form = "bare" if header.bare else "self-checking"
    print(f"{args.patch}: {len(patch)} bytes, {header.method.name}, {form}, "
          f"target {_file_diff_id(args.new)}")
    return 0


def _delta_apply(args: argparse.Namespace) -> int:
    _require_file(args.old, "old file")
    _require_file(args.patch, "patch")
    try:
        patch = args.patch.read_bytes()
        out = apply_delta(args.old, patch, args.expect)
    except OSError as exc:
        raise CliError(f"cannot read {args.patch}: {exc.strerror}") from None
    except DeltaError as exc:
        raise CliError(f"{args.patch}: {exc}") from None
    _write_atomically(args.out, out)
    print(f"{args.out}: {len(out)} bytes, sha256:{hashlib.sha256(out).hexdigest()}")
    return 0


def _release_keygen(args: argparse.Namespace) -> int:
    try:
        key = write_signing_key(args.out)
    except FileExistsError:
        raise CliError(f"{args.out} already exists; not overwriting a key") from None
    except OSError as exc:
        raise CliError(f"cannot write {args.out}: {exc.strerror}") from None
    except ReleaseError as exc:
        raise CliError(str(exc)) from None
    public = bytes(key.verify_key)
    print(f"{public.hex()}  key-id {key_id(public)}")
    return 0
