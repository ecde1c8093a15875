"""`fleetmesh keygen` and `fleetmesh pubkey`: WireGuard key pairs, as `wg genkey`/`wg pubkey`
would make them, with the private key written 0600 and never printed unless asked."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mesh.clikit import CliError
from vpn import InvalidKeyError, generate_keypair, public_key_from_private, write_private_key


def _keygen(args: argparse.Namespace) -> int:
    pair = generate_keypair()
    if args.out is None:
        print(pair.private)
        return 0
    out = Path(args.out)
    if out.exists() and not args.force:
        raise CliError(f"{out} exists; pass --force to replace it")
    try:
        write_private_key(out, pair.private)
    except OSError as exc:
        raise CliError(f"cannot write {out}: {exc.strerror}") from exc
    print(pair.public)
    return 0


def _pubkey(args: argparse.Namespace) -> int:
    try:
        text = Path(args.file).read_text() if args.file else sys.stdin.read()
    except OSError as exc:
        raise CliError(f"cannot read {args.file}: {exc.strerror}") from exc
    try:
        print(public_key_from_private(text.strip()))
    except InvalidKeyError as exc:
        raise CliError(f"not a WireGuard private key: {exc}") from exc
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keygen = sub.add_parser(
        "keygen", help="make a WireGuard key pair",
        description="Make a WireGuard key pair. With --out, write the private key there (mode "
                    "0600) and print the public key; without, print the private key.")
    keygen.add_argument("--out", metavar="FILE", help="private key file to write (0600)")
    keygen.add_argument("--force", action="store_true", help="replace an existing --out file")
    keygen.set_defaults(handler=_keygen)

    pubkey = sub.add_parser(
        "pubkey", help="print the public key of a private key (stdin or FILE)")
    pubkey.add_argument("file", nargs="?", metavar="FILE", help="private key file (default: stdin)")
    pubkey.set_defaults(handler=_pubkey)
