"""What a converter and the adapter validator need to know about a base model.

Read from a base GGUF (authoritative: it is what llama.cpp will run) or from an HF
``config.json`` when no GGUF is at hand.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from edge_tune.errors import EdgeTuneError
from edge_tune.converters.formats.lora_graph import ALWAYS_TIED_ARCHS
from edge_tune.converters.formats.names import gguf_arch


@dataclass
class BaseInfo:
    arch: str  # GGUF architecture name
    n_blocks: int
    n_head: int
    n_head_kv: int
    # GGUF tensor name -> ggml shape (ne order); None when built from an HF config.
    tensors: Optional[dict[str, tuple[int, ...]]] = None
    tied_embeddings: bool = False
    metadata: dict = field(default_factory=dict)

    def has_tensor(self, name: str) -> Optional[bool]:
        return None if self.tensors is None else name in self.tensors


@contextlib.contextmanager
def _reading(path: Path) -> Iterator:
    """Refuse what is not a GGUF file, then turn any parse error inside the block into one
    line (gguf and struct raise ValueError/IndexError/struct.error/... on truncated files)."""
    if not path.is_file():
        raise EdgeTuneError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise EdgeTuneError(f"{path}: not a GGUF file (expected the GGUF magic bytes)")
        yield
    except EdgeTuneError:
        raise
    except Exception as exc:
        detail = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise EdgeTuneError(f"{path}: truncated or corrupt GGUF file ({detail})") from None


def open_gguf(path: Path):
    """GGUFReader with a one-line error for anything that is not a whole GGUF file."""
    import gguf

    path = Path(path)
    with _reading(path):
        reader = gguf.GGUFReader(str(path), "r")
        size = path.stat().st_size
        for t in reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise ValueError(f"tensor {t.name} extends past the end of the file")
    return reader


@contextlib.contextmanager
def writing_gguf(path: Path, arch: str) -> Iterator:
    """A GGUFWriter for ``path``: fill it inside the block; on success the file is written
    whole to a temporary name and renamed onto ``path``, on failure nothing is left."""
    import gguf

    from edge_tune.fsutil import atomic_path

    with atomic_path(Path(path)) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        yield w
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def field_value(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def copy_fields(reader, writer, skip=()) -> None:
    """Copy every KV field of a ``GGUFReader`` to a ``GGUFWriter`` with its own value type
    (arrays with their element type), except ``skip`` and what the writer writes itself
    (``GGUF.*``, ``general.architecture``)."""
    import gguf

    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in skip:
            continue
        vtype = f.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, f.contents(), vtype, sub_type=f.types[-1])
        else:
            writer.add_key_value(key, f.contents(), vtype)


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}  # GGUFValueType -> struct format


class _Header:
    """The parts of a GGUF header :func:`from_gguf` needs, read without building gguf-py's
    per-element views of the vocabulary (GGUFReader spends seconds on a 49k-token tokenizer):
    scalar and string KV values, array lengths only, and every tensor's name and ggml shape.
    Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (v2/v3, little-endian).
    Mimics the reader interface ``field_value`` and ``from_gguf`` use."""

    def __init__(self, path: Path):
        import mmap
        import struct

        import gguf

        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            size = len(m)
            pos = 0

            def take(fmt: str):
                nonlocal pos
                (value,) = struct.unpack_from(fmt, m, pos)
                pos += struct.calcsize(fmt)
                return value

            def string() -> str:
                nonlocal pos
                n = take("<Q")
                if pos + n > size:
                    raise ValueError("string past the end of the file")
                pos += n
                return bytes(m[pos - n:pos]).decode("utf-8")

            if bytes(m[:4]) != b"GGUF":
                raise ValueError("bad magic")
            pos = 4
            version = take("<I")
            if version not in (2, 3):
                raise ValueError(f"unsupported GGUF version {version}")
            n_tensors, n_kv = take("<Q"), take("<Q")
            self.fields: dict[str, _Field] = {}
            for _ in range(n_kv):
                key = string()
                vtype = take("<I")
                if vtype == 9:  # array: keep its length, skip its items
                    etype, count = take("<I"), take("<Q")
                    if etype == 8:
                        for _ in range(count):
                            n = take("<Q")  # take() moves pos first
                            pos += n
                    elif etype in _SCALARS:
                        pos += count * struct.calcsize(_SCALARS[etype])
                    else:
                        raise ValueError(f"array of unsupported type {etype}")
                    value = _ArrayLen(count)
                elif vtype == 8:
                    value = string()
                elif vtype in _SCALARS:
                    value = take(_SCALARS[vtype])
                else:
                    raise ValueError(f"unknown value type {vtype}")
                if pos > size:
                    raise ValueError("metadata past the end of the file")
                self.fields[key] = _Field(value)
            infos = []
            for _ in range(n_tensors):
                name = string()
                dims = [take("<Q") for _ in range(take("<I"))]
                ttype, offset = take("<I"), take("<Q")
                infos.append((name, dims, ttype, offset))
            align = self.fields.get("general.alignment")
            align = int(align.value) if align is not None else 32
            start = pos + (-pos) % align
            self.tensors = []
            for name, dims, ttype, offset in infos:
                block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
                count = 1
                for d in dims:
                    count *= d
                if start + offset + count // block * nbytes > size:
                    raise ValueError(f"tensor {name} extends past the end of the file")
                self.tensors.append(_Tensor(name, dims))


class _Field:
    def __init__(self, value):
        self.value = value

    def contents(self):
        return self.value


class _ArrayLen(int):
    """An array KV value read as its length only (``len()`` works, the items are skipped)."""

    def __len__(self) -> int:
        return int(self)


class _Tensor:
    def __init__(self, name: str, shape: list[int]):
        self.name, self.shape = name, shape


def read_header(path: Path) -> _Header:
    """A fast, read-only view of a GGUF's KV scalars and tensor shapes; one-line errors like
    :func:`open_gguf`."""
    path = Path(path)
    with _reading(path):
        return _Header(path)


def from_gguf(path: Path, reader=None) -> BaseInfo:
    """``reader``: an already open GGUFReader of ``path``; without one, only the header is read
    (:func:`read_header`: parsing a large vocabulary with GGUFReader takes seconds)."""
    reader = reader if reader is not None else read_header(path)
    arch = field_value(reader, "general.architecture")
    if not arch:
        raise EdgeTuneError(f"{path}: GGUF has no general.architecture")
    if field_value(reader, "general.type") == "adapter":
        raise EdgeTuneError(f"{path}: this is an adapter GGUF, not a base model")
    n_blocks = field_value(reader, f"{arch}.block_count")
    n_head = field_value(reader, f"{arch}.attention.head_count")
    n_head_kv = field_value(reader, f"{arch}.attention.head_count_kv", n_head)
    if n_blocks is None or n_head is None:
        raise EdgeTuneError(f"{path}: GGUF lacks {arch}.block_count / attention.head_count")
    tensors = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}
    return BaseInfo(
        arch=arch, n_blocks=int(n_blocks), n_head=int(n_head), n_head_kv=int(n_head_kv),
        tensors=tensors,
        tied_embeddings="output.weight" not in tensors or arch in ALWAYS_TIED_ARCHS,
        metadata={"name": field_value(reader, "general.name", "")},
    )


def from_hf_config(config: dict) -> BaseInfo:
    try:
        n_head = int(config["num_attention_heads"])
        return BaseInfo(
            arch=gguf_arch(config["model_type"]),
            n_blocks=int(config["num_hidden_layers"]),
            n_head=n_head,
            n_head_kv=int(config.get("num_key_value_heads") or n_head),
            tied_embeddings=bool(config.get("tie_word_embeddings", False))
            or gguf_arch(config["model_type"]) in ALWAYS_TIED_ARCHS,
        )
    except KeyError as exc:
        raise EdgeTuneError(f"base config.json: missing field {exc.args[0]!r}") from None


def from_hf_dir(path: Path) -> BaseInfo:
    cfg = Path(path) / "config.json"
    try:
        return from_hf_config(json.loads(cfg.read_text()))
    except (OSError, json.JSONDecodeError) as exc:
        raise EdgeTuneError(f"{cfg}: cannot read ({exc})") from None
