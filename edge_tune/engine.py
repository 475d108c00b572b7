"""llama.cpp (llama-cpp-python) behind a small interface: one base, validated adapters.

Why adapters are validated here first: llama-cpp-python does not notice a failed adapter load,
and the first inference then segfaults. Every adapter is checked against the base in Python
(:mod:`edge_tune.converters.validate`), and the pointer llama.cpp returns is checked too.
Several adapters can be loaded on one base; :meth:`Engine.activate` switches between them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path
from typing import Iterator, Optional

from edge_tune.converters.base_info import BaseInfo, from_gguf
from edge_tune.converters.validate import validate_adapter_file
from edge_tune.errors import EdgeTuneError


@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp prints load logs straight to fd 2; hide them unless EDGE_TUNE_DEBUG is set."""
    if os.environ.get("EDGE_TUNE_DEBUG"):
        yield
        return
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _want_extra_bufts() -> bool:
    """Whether llama.cpp may use its extra CPU buffer types (weight repacking, AMX).

    ggml's AMX path dies with a general-protection fault on CPUs that advertise AMX where the
    kernel/VM does not grant tile state (seen on this project's CI machines, on a plain Q4_1
    model, no adapter). Repacking is only a speed-up, so it is turned off where AMX is
    advertised; ``EDGE_TUNE_EXTRA_BUFTS=1|0`` overrides.
    """
    env = os.environ.get("EDGE_TUNE_EXTRA_BUFTS")
    if env in ("0", "1"):
        return env == "1"
    from edge_tune.hardware import probe_simd

    return "amx_tile" not in probe_simd()


@contextlib.contextmanager
def _model_params(use_extra_bufts: bool):
    """Llama() builds its llama_model_params internally; adjust the defaults it starts from."""
    import llama_cpp.llama_cpp as low

    original = low.llama_model_default_params

    def patched():
        params = original()
        params.use_extra_bufts = use_extra_bufts
        return params

    low.llama_model_default_params = patched
    try:
        yield
    finally:
        low.llama_model_default_params = original


class Engine:
    def __init__(self, base_gguf: Path, n_ctx: int = 4096, threads: Optional[int] = None,
                 logits_all: bool = False, seed: int = 0, exact: bool = False) -> None:
        """``exact``: keep the KV cache in F32 (default F16) for bit-careful comparisons."""
        self.base_path = Path(base_gguf)
        self.base: BaseInfo = from_gguf(self.base_path)  # refuses truncated/corrupt files
        try:
            from llama_cpp import Llama
        except ImportError:
            raise EdgeTuneError("llama-cpp-python is not installed: pip install "
                                "'edge-tune[run]'") from None
        import psutil

        threads = threads or psutil.cpu_count(logical=False) or 1
        try:
            with _quiet_stderr(), _model_params(_want_extra_bufts()):
                self.llm = Llama(model_path=str(self.base_path), n_ctx=n_ctx, n_threads=threads,
                                 n_threads_batch=threads, logits_all=logits_all, seed=seed,
                                 verbose=False, **({"type_k": 0, "type_v": 0} if exact else {}))
        except ValueError as exc:
            raise EdgeTuneError(f"{self.base_path}: llama.cpp could not load this model "
                                f"({exc})") from None
        self._adapters: dict[str, object] = {}
        self.adapter_meta: dict[str, dict] = {}
        self.active: Optional[str] = None

    # --- adapters -----------------------------------------------------------------------
    def add_adapter(self, path: Path, name: Optional[str] = None) -> str:
        """Validate and load an adapter GGUF; returns its name (default: the path)."""
        import llama_cpp

        path = Path(path)
        name = name or str(path)
        if name in self._adapters:
            return name
        self.adapter_meta[name] = validate_adapter_file(path, self.base)
        with _quiet_stderr():
            ptr = llama_cpp.llama_adapter_lora_init(self.llm.model, str(path).encode())
        if not ptr:  # a NULL pointer object, not None
            raise EdgeTuneError(f"{path}: llama.cpp refused to load this adapter")
        self._adapters[name] = ptr
        return name

    def activate(self, name: Optional[str], scale: float = 1.0) -> None:
        """Make ``name`` the only active adapter (None = the plain base)."""
        import llama_cpp

        if name is not None and name not in self._adapters:
            raise EdgeTuneError(f"adapter {name!r} is not loaded")
        if name is None:
            rc = llama_cpp.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
        else:
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._adapters[name])
            scales = (ctypes.c_float * 1)(scale)
            rc = llama_cpp.llama_set_adapters_lora(self.llm.ctx, arr, 1, scales)
        if rc != 0:
            raise EdgeTuneError(f"llama.cpp could not activate adapter {name!r} (code {rc})")
        # The prompt cache holds tokens computed under the previous adapter: drop it.
        self.llm.reset()
        self.active = name

    # --- inference ------------------------------------------------------------------------
    def chat_stream(self, messages: list[dict], temperature: float = 0.7,
                    max_tokens: int = 256, seed: Optional[int] = None) -> Iterator[str]:
        """Stream the assistant's reply, using the base GGUF's own chat template."""
        self.llm.reset()
        stream = self.llm.create_chat_completion(
            messages=messages, temperature=temperature, max_tokens=max_tokens, stream=True,
            seed=seed)
        for chunk in stream:
            piece = chunk["choices"][0]["delta"].get("content")
            if piece:
                yield piece

    def chat(self, messages: list[dict], **kw) -> str:
        return "".join(self.chat_stream(messages, **kw))

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=special)

    def logits(self, tokens: list[int]):
        """Per-position logits (needs ``logits_all=True``), as a numpy array (n, vocab)."""
        self.llm.reset()
        self.llm.eval(tokens)
        return self.llm.scores[: len(tokens)].copy()

    def close(self) -> None:
        import llama_cpp

        with contextlib.suppress(Exception):
            llama_cpp.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
        for ptr in self._adapters.values():
            with contextlib.suppress(Exception):
                llama_cpp.llama_adapter_lora_free(ptr)
        self._adapters.clear()
        with contextlib.suppress(Exception):
            self.llm.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
