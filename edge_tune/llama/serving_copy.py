"""The adapter file the engine loads: a Q8_0 copy of the user's adapter, made once.

With its A/B matrices in Q8_0 (:mod:`edge_tune.converters.formats.lora_q8`), a lone
sequence decodes without a filler row, so `chat --adapter` and a server answering one
request run at the base model's speed instead of half of it, with the same greedy answer
alone or batched (:mod:`edge_tune.llama.batch_rows`). The copy's logits differ from the F32
adapter's by about as much as an F16 KV cache moves them from an F32 one (docs/serving.md);
`verify` and every parity check load the adapter as written (``Engine(exact=True)``).
"""

from __future__ import annotations

from pathlib import Path


FORMAT = "q8_0-v2"  # in the cached copy's name: a change of the conversion makes new copies


def serving_copy(path: Path, fresh: bool = False) -> Path:
    """The Q8_0 copy of adapter ``path``, kept in edge-tune's cache under the SHA-256 of the
    file (made on first use: a second for the default model's 18.6 MiB adapter); ``path``
    itself when some pair cannot be stored in Q8_0. A cached copy that is not a whole GGUF
    (or any copy, with ``fresh``) is made again. Raises EdgeTuneError (one line) for an
    adapter that is not a whole GGUF."""
    from edge_tune.converters.formats.gguf_header import read_header
    from edge_tune.converters.formats.lora_q8 import write_q8_copy
    from edge_tune.errors import EdgeTuneError
    from edge_tune.fsutil import cache_dir, sha256_file

    path = Path(path)
    root = cache_dir() / "serving-adapters"
    stem = f"{sha256_file(path)[:32]}.{FORMAT}"
    copy, none = root / f"{stem}.gguf", root / f"{stem}.none"  # .none: nothing to convert
    if none.is_file() and not fresh:
        return path
    if copy.is_file() and not fresh:
        try:
            read_header(copy)  # every tensor inside the file
            return copy
        except EdgeTuneError:
            pass  # damaged since it was written: made again below
    root.mkdir(parents=True, exist_ok=True)
    if write_q8_copy(path, copy) == 0:
        none.touch()
        return path
    return copy
