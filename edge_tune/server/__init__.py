"""The multi-adapter, OpenAI-compatible server: one base GGUF in memory, many LoRA adapters
switched per request by the ``model`` field.

- :mod:`.openai_shapes`: request validation and response/error shapes (pure).
- :mod:`.scheduler`: the FIFO queue and the one thread that owns the llama.cpp context.
- :mod:`.app`: the Starlette routes; :func:`edge_tune.api.serve` runs them under uvicorn.
- :mod:`.adapter_admin`: per-request adapter mixes, adapters added and removed while serving.

Starlette and uvicorn are imported inside functions, so importing this package stays light.
"""

import re

from edge_tune.errors import UsageError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def parse_adapter_spec(spec: str) -> tuple[str, str]:
    """``NAME=PATH`` -> (name, path). Pure; the name is what clients send as ``model``."""
    name, sep, path = spec.partition("=")
    if not sep or not path:
        raise UsageError("expected NAME=PATH (PATH: a run directory or "
                         "an adapter .gguf), e.g. --adapter pirate=runs/demo",
                         setting="adapter", value=spec)
    check_model_name(name, setting="adapter", value=spec)
    return name, path


def check_model_name(name: str, where: str | None = None, *, setting: str | None = None,
                     value: object = None) -> None:
    """UsageError unless ``name`` can be served as a ``model``: about ``setting`` (its
    ``value``) when given, else with ``where`` (a file, an argument) before the message."""
    head = f"{where}: " if where else ""
    if name == "base":
        raise UsageError(f"{head}'base' is reserved for the model without an adapter",
                         setting=setting, value=value)
    if not _NAME.match(name):
        raise UsageError(f"{head}adapter name {name!r} must be 1-64 letters, digits, "
                         "'.', '_' or '-', starting with a letter or digit",
                         setting=setting, value=value)


def steady_malloc() -> None:
    """Keep a long-running server's RSS flat on glibc.

    glibc raises its mmap threshold each time a large block is freed, after which large
    temporary buffers come from the heap and stay in RSS. A fixed threshold
    (``mallopt(M_MMAP_THRESHOLD, 64 KiB)``) turns that off; measured here, RSS after 60 mixed
    requests grew +4 % instead of +9.5 % from the first request. Linux/glibc only.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        pass
