"""The plain-HDiffPatch anchor of bench.delta, run in its own process so its peak RSS is its own.

    python -m bench._hdiff create OLD NEW PATCH
    python -m bench._hdiff apply OLD PATCH OUT

`create` is the hdiffpatch module's default diff (default matching, no tuning), its streams
compressed by HDiffPatch's own plugins the way a user of its tools would ship it: zstd -19 and
LZMA -9, the smaller kept (an uncompressed diff would be a strawman anchor). The windows are the
largest the module accepts for zstd (2**27) and the 2**24 LZMA dictionary mesh.delta decodes.
`apply` is `hdiffpatch.apply`, both inputs and the output in memory, as the module offers it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hdiffpatch

ZSTD_WINDOW_LOG = 27
LZMA_WINDOW_LOG = 24


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[0] == "create":
        old, new = Path(argv[1]).read_bytes(), Path(argv[2]).read_bytes()
        raw = hdiffpatch.diff(old, new, validate=False)
        del old, new
        smallest = min(
            (hdiffpatch.recompress(raw, hdiffpatch.ZStdConfig(level=19, window=ZSTD_WINDOW_LOG)),
             hdiffpatch.recompress(raw, hdiffpatch.LzmaConfig(level=9, window=LZMA_WINDOW_LOG))),
            key=len)
        Path(argv[3]).write_bytes(smallest)
        return 0
    if len(argv) == 4 and argv[0] == "apply":
        out = hdiffpatch.apply(Path(argv[1]).read_bytes(), Path(argv[2]).read_bytes())
        Path(argv[3]).write_bytes(out)
        return 0
    print("usage: python -m bench._hdiff create OLD NEW PATCH | apply OLD PATCH OUT",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
