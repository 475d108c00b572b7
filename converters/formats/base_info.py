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

from edge_tune.errors import DataError
from edge_tune.converters.formats.gguf_header import read_header, reading
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
    # Rows of the token embedding (the model's vocabulary size); None when not known.
    n_vocab: Optional[int] = None


def open_gguf(path: Path):
    """GGUFReader with a one-line error for anything that is not a whole GGUF file."""
    import gguf

    path = Path(path)
    with reading(path):
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


def from_gguf(path: Path, reader=None) -> BaseInfo:
    """``reader``: an already open GGUFReader of ``path``; without one, only the header is read
    (:func:`.gguf_header.read_header`: parsing a large vocabulary with GGUFReader takes seconds)."""
    reader = reader if reader is not None else read_header(path)
    arch = field_value(reader, "general.architecture")
    if not arch:
        raise DataError(f"{path}: GGUF has no general.architecture")
    if field_value(reader, "general.type") == "adapter":
        raise DataError(f"{path}: this is an adapter GGUF, not a base model")
    n_blocks = field_value(reader, f"{arch}.block_count")
    n_head = field_value(reader, f"{arch}.attention.head_count")
    n_head_kv = field_value(reader, f"{arch}.attention.head_count_kv", n_head)
    if n_blocks is None or n_head is None:
        raise DataError(f"{path}: GGUF lacks {arch}.block_count / attention.head_count")
    tensors = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}
    return BaseInfo(
        arch=arch, n_blocks=int(n_blocks), n_head=int(n_head), n_head_kv=int(n_head_kv),
        tensors=tensors,
        tied_embeddings="output.weight" not in tensors or arch in ALWAYS_TIED_ARCHS,
        metadata={"name": field_value(reader, "general.name", "")},
        n_vocab=tensors["token_embd.weight"][1] if len(tensors.get("token_embd.weight", ()))
        == 2 else None,
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
            n_vocab=int(config["vocab_size"]) if isinstance(config.get("vocab_size"), int)
            else None,
        )
    except KeyError as exc:
        raise DataError(f"base config.json: missing field {exc.args[0]!r}") from None


def from_hf_dir(path: Path) -> BaseInfo:
    cfg = Path(path) / "config.json"
    try:
        return from_hf_config(json.loads(cfg.read_text()))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{cfg}: cannot read ({exc})") from None
