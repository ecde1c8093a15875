"""nftables scripts applied on this host (`nft -f -`): one atomic transaction, all of it or,
on error, nothing. The hub's filter (coordinator/_hubfilter.py) and the device's
(agent/_devfilter.py) write the scripts; this runs them."""

from __future__ import annotations

import subprocess
from typing import Final

NFT_TIMEOUT: Final = 10.0


class NftError(OSError):
    """nft could not be run or refused the script: one line."""


def run_nft(script: str, timeout: float = NFT_TIMEOUT) -> None:
    try:
        done = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NftError(f"nft: {exc}") from None
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        raise NftError(f"nft: {last[0]}")
