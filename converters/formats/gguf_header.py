"""Reading a GGUF file's header in place: key-value metadata and tensor shapes, no model load.

The format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (versions 2 and 3,
little-endian). The header is walked on a memory map, and arrays (a vocabulary of 150k strings)
are skipped without building Python objects for their items; gguf-py's ``GGUFReader`` builds a
view of every item (seconds for a large vocabulary). This is the one GGUF header reader: the
base facts of :mod:`.base_info`, the chat template and the vocabulary checks of the core all
read through it, and every failure is one line (:func:`reading`).
"""

from __future__ import annotations

import contextlib
import mmap
import struct
from pathlib import Path
from typing import Iterator

from edge_tune.errors import DataError, EdgeTuneError, Unsupported, UsageError

# GGUF value type -> struct format of a scalar; 8 (string) and 9 (array) are variable-length.
SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                  10: "<Q", 11: "<q", 12: "<d"}
SCALAR_SIZE = {kind: struct.calcsize(fmt) for kind, fmt in SCALAR_FORMATS.items()}
STRING, ARRAY = 8, 9
VERSIONS = (2, 3)


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Refuse what is not a GGUF file of a known version, then turn any parse error inside the
    block into one line. Raises EdgeTuneError: ``no such file``, ``not a GGUF file``, an
    unsupported version, ``cannot be read`` (OSError) or ``truncated or corrupt GGUF file``
    (gguf and struct raise ValueError/IndexError/KeyError/struct.error on truncated files)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
        if head[:4] != b"GGUF":
            raise DataError(f"{path}: not a GGUF file (expected the GGUF magic bytes)")
        version = int.from_bytes(head[4:8], "little")
        if version not in VERSIONS:
            raise Unsupported(f"{path}: GGUF version {version} is not supported "
                              f"(expected {' or '.join(map(str, VERSIONS))})")
        yield
    except EdgeTuneError:
        raise
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except Exception as exc:
        detail = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: truncated or corrupt GGUF file ({detail})") from None


@contextlib.contextmanager
def mapped(path: Path) -> Iterator[mmap.mmap]:
    """The GGUF file mapped read-only, behind the one-line errors of :func:`reading` (also for
    what the block raises while it parses the map)."""
    with reading(path), open(path, "rb") as f, \
            mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        yield m


def _entries(m) -> Iterator[tuple[str, int, int, int]]:
    """(key, value type, offset of the value, offset just past it) for each key-value pair of a
    mapped GGUF file, in file order."""
    n_kv, = struct.unpack_from("<Q", m, 16)
    pos = 24
    for _ in range(n_kv):
        n, = struct.unpack_from("<Q", m, pos)
        if pos + 8 + n > len(m):
            raise ValueError("metadata key past the end of the file")
        key = m[pos + 8: pos + 8 + n].decode("utf-8", "replace")
        kind, = struct.unpack_from("<I", m, pos + 8 + n)
        pos += 12 + n
        end = gguf_skip(m, kind, pos)
        if end > len(m):
            raise ValueError(f"metadata {key} past the end of the file")
        yield key, kind, pos, end
        pos = end


def gguf_kv(m) -> Iterator[tuple[str, int, int]]:
    """Walk a mapped GGUF file's key-value header: yields (key, value type, byte offset of the
    value) for each key, in file order. Raises struct.error/KeyError/ValueError on a truncated
    or corrupt header (inside :func:`mapped`, they become one line)."""
    for key, kind, pos, _ in _entries(m):
        yield key, kind, pos


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


def value_at(m, kind: int, at: int):
    """The value of type ``kind`` stored at ``at``: a str, a number, or for an array its length
    only (:class:`ArrayLen`)."""
    if kind == STRING:
        n, = struct.unpack_from("<Q", m, at)
        return m[at + 8: at + 8 + n].decode("utf-8", "replace")
    if kind == ARRAY:
        return ArrayLen(struct.unpack_from("<IQ", m, at)[1])
    return struct.unpack_from(SCALAR_FORMATS[kind], m, at)[0]


class ArrayLen(int):
    """An array value read as its length only (``len()`` works, the items are skipped)."""

    def __len__(self) -> int:
        return int(self)


class Field:
    """One header value, with gguf-py's ``ReaderField.contents()`` interface."""

    def __init__(self, value):
        self.value = value

    def contents(self):
        return self.value


class TensorInfo:
    """A tensor's name, ggml shape (``ne`` order: innermost dimension first) and GGML type
    (``tensor_type``, an int as in ggml.h)."""

    def __init__(self, name: str, shape: list[int], tensor_type: int = 0):
        self.name, self.shape, self.tensor_type = name, shape, tensor_type


class GGUFHeader:
    """A GGUF's header: ``fields`` (key -> :class:`Field`; arrays as their length) and
    ``tensors`` (:class:`TensorInfo` in file order), the part of gguf-py's ``GGUFReader``
    interface that reading a base's facts needs. Every tensor's data is checked to lie inside
    the file. Build it with :func:`read_header` (one-line errors)."""

    def __init__(self, m):
        import gguf

        self.fields: dict[str, Field] = {}
        pos = 24
        for key, kind, at, pos in _entries(m):
            self.fields[key] = Field(value_at(m, kind, at))
        n_tensors, = struct.unpack_from("<Q", m, 8)
        infos = []
        for _ in range(n_tensors):
            n, = struct.unpack_from("<Q", m, pos)
            name = m[pos + 8: pos + 8 + n].decode("utf-8", "replace")
            pos += 8 + n
            n_dims, = struct.unpack_from("<I", m, pos)
            dims = list(struct.unpack_from(f"<{n_dims}Q", m, pos + 4))
            ttype, offset = struct.unpack_from("<IQ", m, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            infos.append((name, dims, ttype, offset))
        align = self.fields.get("general.alignment")
        align = int(align.value) if align is not None else 32
        start = pos + (-pos) % align
        self.tensors: list[TensorInfo] = []
        for name, dims, ttype, offset in infos:
            block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
            count = 1
            for d in dims:
                count *= d
            if start + offset + count // block * nbytes > len(m):
                raise ValueError(f"tensor {name} extends past the end of the file")
            self.tensors.append(TensorInfo(name, dims, ttype))


def read_header(path: Path) -> GGUFHeader:
    """The header of the GGUF file at ``path`` (:class:`GGUFHeader`). Raises EdgeTuneError
    (one line, see :func:`reading`) for a missing, foreign, truncated or corrupt file."""
    with mapped(Path(path)) as m:
        return GGUFHeader(m)


def gguf_metadata(path: Path, keys: set[str]) -> dict:
    """The values of the scalar or string ``keys`` in a GGUF file's header (missing keys and
    arrays are left out). Reads only the key-value section, up to the last key wanted; raises
    EdgeTuneError (one line) for a file that is not a whole GGUF."""
    found: dict = {}
    with mapped(Path(path)) as m:
        for key, kind, at in gguf_kv(m):
            if key in keys and kind != ARRAY:
                found[key] = value_at(m, kind, at)
                if len(found) == len(keys):
                    break
    return found

