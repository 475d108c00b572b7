"""``convert-base`` and ``fetch-converter``: HF weights -> GGUF base with llama.cpp's own
converter (see :mod:`edge_tune.converters.integrations.hf_to_gguf`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from edge_tune import models
from edge_tune.errors import UsageError
from edge_tune.events import Done, EventSink, Log, ignore
from edge_tune.gguf_config import check_llama_cpp_computes_as_hf


def convert_base(model: str, out: Optional[Path] = None, outtype: str = "f16",
                 on_event: EventSink = ignore) -> Path:
    """HF model directory or hub ID -> GGUF base, with llama.cpp's own converter (taken from the
    installed llama-cpp-python's sdist; see :mod:`edge_tune.converters.integrations.hf_to_gguf`)."""
    from edge_tune.converters.integrations import hf_to_gguf

    kind = models.check_spec(model)
    if kind in ("gguf", "default"):
        raise UsageError(f"{model}: already a GGUF model; convert-base takes an HF model "
                         "directory or hub ID")
    ref = models.resolve(model, on_event)
    hf_dir = models.hf_dir_for(ref, on_event)
    if out is None:
        out = Path(f"{Path(str(hf_dir)).name}-{outtype.lower()}.gguf")
    check_llama_cpp_computes_as_hf(Path(hf_dir))
    # A hub ID already means network: then a missing converter is fetched too.
    path = hf_to_gguf.convert(Path(hf_dir), Path(out), outtype, on_event,
                              fetch=ref.hub_id is not None)
    on_event(Log(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB)"))
    on_event(Done("convert-base", {"path": str(path)}))
    return path


def fetch_converter(sdist: Optional[Path] = None, on_event: EventSink = ignore) -> Path:
    """Put llama.cpp's converter (from the installed llama-cpp-python's sdist) in the cache, so
    convert-base runs offline. ``sdist``: a local copy instead of pip."""
    from edge_tune.converters.integrations import hf_to_gguf

    path = hf_to_gguf.fetch_converter(sdist, on_event)
    on_event(Done("fetch-converter", {"path": str(path)}))
    return path
