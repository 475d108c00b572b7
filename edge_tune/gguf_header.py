"""Reading a GGUF file's key-value header in place, without loading the model.

The format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md. The header is walked on
a memory map, skipping arrays (a vocabulary of 150k strings) without building Python objects
for them; gguf-py's ``GGUFReader`` parses every tensor record and vocabulary entry (seconds
for a large vocabulary). Pure module: no heavy imports.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Iterator

from edge_tune.errors import EdgeTuneError

# GGUF value types -> byte size of a scalar (8 = string, 9 = array are variable).
SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9


def gguf_kv(m) -> Iterator[tuple[str, int, int]]:
    """Walk a mapped GGUF file's key-value header: yields (key, value type, byte offset of the
    value) for each key, in file order. Raises struct.error/KeyError/IndexError on a truncated
    or corrupt header (the caller turns them into one line)."""
    if m[:4] != b"GGUF":
        raise ValueError("magic")
    n_kv, = struct.unpack_from("<Q", m, 16)
    pos = 24
    for _ in range(n_kv):
        n, = struct.unpack_from("<Q", m, pos)
        key = m[pos + 8: pos + 8 + n].decode("utf-8", "replace")
        kind, = struct.unpack_from("<I", m, pos + 8 + n)
        pos += 12 + n
        yield key, kind, pos
        pos = gguf_skip(m, kind, pos)


def gguf_skip(m, kind: int, at: int) -> int:
    """The offset just past a GGUF value of type ``kind`` stored at ``at``."""
    if kind == STRING:
        return at + 8 + struct.unpack_from("<Q", m, at)[0]
    if kind == ARRAY:
        sub, n = struct.unpack_from("<IQ", m, at)
        at += 12
        if sub in SCALAR_SIZE:
            return at + n * SCALAR_SIZE[sub]
        for _ in range(n):
            at = gguf_skip(m, sub, at)
        return at
    return at + SCALAR_SIZE[kind]


def gguf_metadata(path: Path, keys: set[str]) -> dict:
    """The values of the scalar or string ``keys`` in a GGUF file's header (missing keys are
    left out). Reads only the key-value section; raises EdgeTuneError for a file that is not
    a whole GGUF."""
    path = Path(path)
    found: dict = {}
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if m[:4] != b"GGUF":
                raise EdgeTuneError(f"{path}: not a GGUF file (expected the GGUF magic bytes)")
            version, = struct.unpack_from("<I", m, 4)
            if version < 2:
                raise EdgeTuneError(f"{path}: GGUF version {version} is too old (expected 2+)")
            for name, kind, pos in gguf_kv(m):
                if name in keys and kind == STRING:
                    n, = struct.unpack_from("<Q", m, pos)
                    found[name] = m[pos + 8: pos + 8 + n].decode("utf-8", "replace")
                elif name in keys and kind in SCALAR_SIZE:
                    fmt = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?",
                           10: "Q", 11: "q", 12: "d"}[kind]
                    found[name] = struct.unpack_from("<" + fmt, m, pos)[0]
                if len(found) == len(keys):
                    break
    except (struct.error, KeyError, ValueError, IndexError) as exc:
        raise EdgeTuneError(f"{path}: truncated or corrupt GGUF file ({type(exc).__name__} in "
                            "its header)") from None
    except OSError as exc:
        raise EdgeTuneError(f"{path}: cannot be read ({exc.strerror})") from None
    return found
