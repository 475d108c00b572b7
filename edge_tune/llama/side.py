"""Side contexts on the engine's loaded model: prompt scoring and embeddings.

Each is a llama.cpp context of its own on the same ``llama_model`` (the weights are not loaded
twice), made on first use (:meth:`Engine.side <edge_tune.llama.engine.Engine.side>`), so a
server that never scores or embeds pays nothing. Neither touches the serving context: a
scoring or embedding request runs beside the batch of answers being decoded, on its own KV
cache.

- :class:`Scorer`: the log-probability of every prompt token given the tokens before it
  (OpenAI's ``echo`` with ``logprobs``; lm-evaluation-harness's log-likelihoods), under any
  adapter set. Its context has the engine's KV-cache settings and decodes by the engine's
  batching rule (:mod:`edge_tune.llama.batch_rows`), so its rows are the ones
  :meth:`Engine.logits <edge_tune.llama.engine.Engine.logits>` gives, bit for bit.
- :class:`Embedder`: one pooled, L2-normalised vector per input, from the base model alone
  (pooling as the GGUF declares it; mean pooling where it declares none, as a chat model's
  does).
"""

from __future__ import annotations

import ctypes
import threading

from edge_tune.errors import ContextOverflow, Unsupported

# llama.h's enum llama_pooling_type
POOLING = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}


class InputTooLong(ContextOverflow):
    """An input has more tokens than the side context holds."""


class Scorer:
    """Prompt log-probabilities on a context of its own over ``model`` (a ``llama_model``
    pointer): ``n_ctx`` tokens, ``threads`` CPU threads, ``cache`` the engine's KV-cache
    settings (:func:`~edge_tune.llama.batch_rows.kv_cache_params`). Calls are serialised by
    ``lock`` (re-entrant: a caller holds it while it looks up the adapters it passes, and
    :meth:`Engine.remove_adapter <edge_tune.llama.engine.Engine.remove_adapter>` while it
    frees one)."""

    def __init__(self, model, n_ctx: int, threads: int, cache: dict) -> None:
        import llama_cpp

        from edge_tune.llama.batch_rows import Batch, stream_params

        # two streams: a lone row's filler goes on the second, as in the engine's context
        params = stream_params(llama_cpp.llama_context_default_params(), 2,
                               cache["flash_attn"])
        params.n_ctx, params.n_batch, params.n_ubatch = 2 * n_ctx, 512, 512
        params.n_threads = params.n_threads_batch = threads
        params.type_k, params.type_v = cache["type_k"], cache["type_v"]
        self.ctx = llama_cpp.llama_init_from_model(model, params)
        if not self.ctx:
            raise Unsupported("llama.cpp could not make a scoring context (out of memory?)")
        self.n_ctx = n_ctx
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        self.batch = Batch(self.ctx, 2)
        self.lock = threading.RLock()

    def score(self, tokens: list[int], adapters: list, scales: list[float],
              top: int = 0, after: bool = False) -> list[tuple[float, list[tuple[int, float]]]]:
        """For each of ``tokens[1:]``: (its natural-log probability given the tokens before
        it, the ``top`` most likely tokens there as (id, logprob), best first), under
        ``adapters`` (``llama_adapter_lora`` pointers) at ``scales``; with ``after``, one
        more entry for the position after the last token, for its likeliest token (then
        ``top`` >= 1 there, so its id is ``entry[1][0][0]``). Raises
        :class:`InputTooLong` past ``n_ctx`` tokens."""
        import llama_cpp
        import numpy as np

        from edge_tune.llama.batch_rows import Rows, chunks

        if len(tokens) > self.n_ctx:
            raise InputTooLong(f"the prompt is {len(tokens)} tokens; the context window "
                               f"holds {self.n_ctx}")
        out: list = []
        if len(tokens) < (1 if after else 2):
            return out
        with self.lock:
            self._set_adapters(adapters, scales)
            try:
                llama_cpp.llama_memory_clear(self.batch.memory, True)
                for offset, part in chunks(tokens):
                    entry = Rows(0, offset, part, all_logits=True)
                    self.batch.decode([entry])
                    for k in range(len(part)):
                        at = offset + k + 1  # the token row k predicts
                        if at > len(tokens) or (at == len(tokens) and not after):
                            break
                        row = np.ctypeslib.as_array(
                            llama_cpp.llama_get_logits_ith(self.ctx, entry.first + k),
                            shape=(self.n_vocab,)).astype(np.float64)
                        out.append(_entry(row, tokens[at], top) if at < len(tokens)
                                   else _entry(row, None, max(top, 1)))
            finally:
                self._set_adapters([], [])  # a removed adapter must not stay referenced
        return out

    def _set_adapters(self, adapters: list, scales: list[float]) -> None:
        import llama_cpp

        if adapters:
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * len(adapters))(*adapters)
            values = (ctypes.c_float * len(adapters))(*scales)
            rc = llama_cpp.llama_set_adapters_lora(self.ctx, arr, len(adapters), values)
        else:
            rc = llama_cpp.llama_set_adapters_lora(self.ctx, None, 0, None)
        if rc != 0:
            raise Unsupported(f"llama.cpp could not apply the adapters (code {rc})")

    def close(self) -> None:
        import llama_cpp

        if self.ctx:
            self.batch.close()
            llama_cpp.llama_free(self.ctx)
            self.ctx = None


def _entry(row, token: int | None, top: int) -> tuple[float, list[tuple[int, float]]]:
    """(logprob of ``token`` (None: the likeliest), ``top`` best (id, logprob)) of one
    logits row (float64)."""
    import numpy as np

    m = row.max()
    lp = row - (m + np.log(np.exp(row - m).sum()))
    if token is None:
        token = int(lp.argmax())
    best: list = []
    if top:
        ids = np.argpartition(-lp, min(top, len(lp) - 1))[:top]
        ids = ids[np.argsort(-lp[ids], kind="stable")]
        best = [(int(i), float(lp[i])) for i in ids]
    return float(lp[token]), best


class Embedder:
    """Pooled embeddings on a context of its own over ``model``, with no adapter: ``n_ctx``
    tokens per input at most, ``pooling`` a llama.h pooling type (mean, cls or last).
    Each input is decoded alone on an empty cache, so a vector does not depend on the other
    inputs of a request. Calls are serialised."""

    def __init__(self, model, n_ctx: int, threads: int, pooling: int) -> None:
        import llama_cpp

        params = llama_cpp.llama_context_default_params()
        # pooled embeddings need a whole input in one micro-batch
        params.n_ctx = params.n_batch = params.n_ubatch = n_ctx
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = threads
        params.embeddings = True
        params.pooling_type = pooling
        self.ctx = llama_cpp.llama_init_from_model(model, params)
        if not self.ctx:
            raise Unsupported("llama.cpp could not make an embedding context (out of "
                              "memory?)")
        self.n_ctx = n_ctx
        self.pooling = POOLING.get(pooling, str(pooling))
        self.dim = llama_cpp.llama_model_n_embd(model)
        self.batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        self.lock = threading.Lock()

    def embed(self, tokens: list[int]) -> list[float]:
        """The unit-length (L2) embedding of ``tokens`` (at least one token). Raises
        :class:`InputTooLong` past ``n_ctx`` tokens, EdgeTuneError when llama.cpp fails."""
        import llama_cpp
        import numpy as np

        if len(tokens) > self.n_ctx:
            raise InputTooLong(f"the input is {len(tokens)} tokens; at most {self.n_ctx} "
                               "fit the embedding context")
        if not tokens:
            raise RuntimeError("internal: nothing to embed")
        with self.lock:
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
            b = self.batch
            for i, t in enumerate(tokens):
                b.token[i], b.pos[i], b.n_seq_id[i] = t, i, 1
                b.seq_id[i][0], b.logits[i] = 0, 1
            b.n_tokens = len(tokens)
            rc = llama_cpp.llama_decode(self.ctx, b)
            if rc != 0:
                raise Unsupported(f"llama_decode failed while embedding (code {rc})")
            ptr = llama_cpp.llama_get_embeddings_seq(self.ctx, 0)
            if not ptr:
                raise Unsupported("llama.cpp returned no pooled embedding")
            vec = np.ctypeslib.as_array(ptr, shape=(self.dim,)).astype(np.float64)
        norm = float(np.sqrt((vec * vec).sum()))
        return (vec / norm if norm > 0 else vec).tolist()

    def close(self) -> None:
        import llama_cpp

        if self.ctx:
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
