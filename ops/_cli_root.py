"""`fleetmesh root ...`: the fleet's root metadata, which names its release key and is signed by
k of n offline root keys (docs/releases.md, "Root keys and release-key rotation").

Files are the JSON documents of mesh.release's codec (`fleetmesh-signed-root-v1`). Each
root-key holder runs `root sign` on their own machine, one after the other; `root publish`
hands the signed root to the coordinator, which passes it to devices. A bad file or argument
is one line and exit 2 (mesh.clikit).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from mesh.clikit import CliError
from mesh.release import (
    ReleaseError,
    RootError,
    RootMetadata,
    SignedRoot,
    decode_root_body,
    encode_root_body,
    encode_signed_root,
    key_id,
    read_signing_key,
    root_fingerprint,
    sign_root,
    valid_signers,
    verify_root,
)
from ops._cli_common import (
    add_common_options,
    api_errors,
    one_line_errors,
    operator_client,
    print_json,
    read_root_file,
)
from vpn import write_private_file


def register(subparsers: Any) -> None:
    root = subparsers.add_parser(
        "root", help="root metadata: k-of-n offline root keys naming the release key",
        description="Make, sign, inspect and publish the fleet's root metadata: which release "
                    "key devices trust, signed by a threshold of offline root keys. Root keys "
                    "are ordinary key files (`fleetmesh release keygen`).")
    sub = root.add_subparsers(dest="root_command", metavar="ACTION", required=True)

    init = one_line_errors(sub.add_parser("init", help="write an unsigned root version 1"))
    init.add_argument("--fleet", required=True)
    _root_key_options(init, required=True)
    _release_key_option(init)
    init.add_argument("-o", "--out", type=Path, required=True, metavar="FILE",
                      help="new root file (never overwritten)")
    init.set_defaults(handler=_root_init)

    rotate = one_line_errors(sub.add_parser("rotate",
                                            help="write the next root version, unsigned"))
    rotate.add_argument("previous", metavar="PREV", type=Path, help="the current root file")
    _root_key_options(rotate, required=False)
    _release_key_option(rotate)
    rotate.add_argument("-o", "--out", type=Path, required=True, metavar="FILE",
                        help="new root file (never overwritten)")
    rotate.set_defaults(handler=_root_rotate)

    sign = one_line_errors(sub.add_parser(
        "sign", help="add one root key's signature to a root file (in place)"))
    sign.add_argument("file", metavar="FILE", type=Path)
    sign.add_argument("--key", type=Path, required=True, metavar="FILE",
                      help="a root key file (made with `fleetmesh release keygen`)")
    sign.set_defaults(handler=_root_sign)

    show = one_line_errors(sub.add_parser(
        "show", help="what a root file says and how many signatures count"))
    show.add_argument("file", metavar="FILE", type=Path)
    show.add_argument("--previous", type=Path, metavar="PREV",
                      help="also verify FILE as the successor of this root file")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(handler=_root_show)

    publish = add_common_options(sub.add_parser(
        "publish", help="hand a signed root to the coordinator (it becomes the fleet's root "
        "and its release key the fleet's release key)"), json_flag=False)
    publish.add_argument("file", metavar="FILE", type=Path)
    publish.set_defaults(handler=_root_publish)


def _root_key_options(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--root-key", nargs="+", required=required, metavar="PUB",
                   help="root public keys (64 hex digits, as `fleetmesh release keygen` prints "
                        "them) or key files" + ("" if required else
                                                "; default: the previous root's"))
    p.add_argument("--threshold", type=int, required=required, metavar="K",
                   help="how many root keys must sign" + ("" if required else
                                                          "; default: the previous root's"))


def _release_key_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--release-key", required=True, metavar="FILE_OR_PUB",
                   help="the release key devices are to trust: its public half (64 hex "
                        "digits) or its key file")


def _public_key(text: str, what: str) -> bytes:
    """A 64-hex-digit public key, or the public half of a fleetmesh key file."""
    candidate = text.strip().lower()
    if len(candidate) == 64 and all(c in "0123456789abcdef" for c in candidate):
        return bytes.fromhex(candidate)
    path = Path(text)
    if not path.is_file():
        raise CliError(f"{what} {text!r} is neither 64 hex digits nor a key file")
    try:
        return bytes(read_signing_key(path).verify_key)
    except ReleaseError as exc:
        raise CliError(str(exc)) from None


def _write_root(path: Path, signed: SignedRoot, *, new: bool) -> None:
    """Whole or absent after a crash (write_private_file: temporary file, fsync, rename), so an
    interrupted `root sign` never loses the signatures collected so far; a new file never
    replaces an existing one. 0600 like every file fleetmesh writes this way: a root holds no
    secret, chmod it to share it."""
    try:
        write_private_file(path, encode_signed_root(signed), exclusive=new)
    except FileExistsError:
        raise CliError(f"{path} already exists; not overwriting it") from None
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror}") from None


def _build(fleet: str, version: int, root_keys: list[str], threshold: int,
           release_key: str) -> RootMetadata:
    keys = tuple(_public_key(k, "--root-key") for k in root_keys)
    try:
        meta = RootMetadata(fleet, version, threshold, keys,
                            _public_key(release_key, "--release-key"), int(time.time()))
        encode_root_body(meta)
    except RootError as exc:
        raise CliError(str(exc)) from None
    return meta


def _created(path: Path, meta: RootMetadata) -> int:
    print(f"{path}: root version {meta.version} of fleet {meta.fleet}, unsigned; "
          f"{meta.threshold} of {len(meta.root_keys)} root keys must sign it "
          f"(`fleetmesh root sign {path} --key FILE`)")
    return 0


def _root_init(args: argparse.Namespace) -> int:
    meta = _build(args.fleet, 1, args.root_key, args.threshold, args.release_key)
    _write_root(args.out, SignedRoot(encode_root_body(meta)), new=True)
    return _created(args.out, meta)


def _root_rotate(args: argparse.Namespace) -> int:
    previous = decode_root_body(read_root_file(args.previous).body)
    root_keys = args.root_key or [k.hex() for k in previous.root_keys]
    threshold = args.threshold if args.threshold is not None else previous.threshold
    meta = _build(previous.fleet, previous.version + 1, root_keys, threshold, args.release_key)
    _write_root(args.out, SignedRoot(encode_root_body(meta)), new=True)
    print(f"note: version {meta.version} needs {previous.threshold} signatures by version "
          f"{previous.version}'s root keys as well")
    return _created(args.out, meta)


def _root_sign(args: argparse.Namespace) -> int:
    signed = read_root_file(args.file)
    try:
        key = read_signing_key(args.key)
        signed = sign_root(signed, key)
    except ReleaseError as exc:
        raise CliError(str(exc)) from None
    meta = decode_root_body(signed.body)
    kid = key_id(key.verify_key)
    _write_root(args.file, signed, new=False)
    listed = "" if bytes(key.verify_key) in meta.root_keys else " (not one of its root keys)"
    own = len(valid_signers(signed, meta.root_keys))
    print(f"{args.file}: signed by key {kid}{listed}; {own} of the {meta.threshold} signatures "
          f"its own root keys must give")
    return 0


def _root_show(args: argparse.Namespace) -> int:
    signed = read_root_file(args.file)
    meta = decode_root_body(signed.body)
    own = valid_signers(signed, meta.root_keys)
    successor = None
    if args.previous is not None:
        previous = decode_root_body(read_root_file(args.previous).body)
        try:
            verify_root(signed, previous)
            successor = "ok"
        except RootError as exc:
            successor = str(exc)
    info: dict[str, Any] = {
        "fleet": meta.fleet, "version": meta.version, "threshold": meta.threshold,
        "root_keys": [key_id(k) for k in meta.root_keys],
        "release_key": meta.release_key.hex(), "release_key_id": key_id(meta.release_key),
        "issued": meta.issued, "signatures": [kid for kid, _ in signed.signatures],
        "valid_signatures": len(own), "fingerprint": root_fingerprint(signed)}
    if successor is not None:
        info["successor_of_previous"] = successor
    if args.json:
        print_json(info)
        return 0
    print(f"fleet        {meta.fleet}\nversion      {meta.version}\n"
          f"threshold    {meta.threshold} of {len(meta.root_keys)}\n"
          f"root keys    {' '.join(info['root_keys'])}\n"
          f"release key  {info['release_key_id']} ({info['release_key']})\n"
          f"issued       {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(meta.issued))}\n"
          f"signatures   {' '.join(info['signatures']) or '-'} ({len(own)} valid by its own "
          f"root keys, {meta.threshold} needed)\n"
          f"fingerprint  {info['fingerprint']}")
    if successor is not None:
        print(f"successor    {successor}")
    return 0


def _root_publish(args: argparse.Namespace) -> int:
    signed = read_root_file(args.file)
    meta = decode_root_body(signed.body)
    with api_errors(), operator_client(args) as client:
        client.put_root(meta.fleet, signed)
    print(f"fleet {meta.fleet}: root version {meta.version} published; release key "
          f"{key_id(meta.release_key)} is the fleet's release key")
    return 0

