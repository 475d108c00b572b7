"""Every use of llama-cpp-python's internals, in one class: :class:`SeqLlama`.

edge-tune runs several sequences in one llama.cpp context (:mod:`edge_tune.llama.batch_rows`)
and still lets llama-cpp-python's own generation loop (chat templates, grammars, logits
processors, stop strings, penalties) drive each of them. That needs a ``Llama`` whose
``eval``/``sample`` decode through edge-tune's rule and whose KV removals touch one sequence
only, which llama-cpp-python has no public way to say. Those private touches live here and
nowhere else; ``tests/integration/test_llama_pins.py`` checks each of them on a real ``Llama``, so that an
upgrade of llama-cpp-python fails there first.

``llama_cpp`` is imported inside functions (the class is built at first use), like every
heavy library of edge-tune.
"""

from __future__ import annotations

import contextlib

_CLASS: dict = {}


def _model_params(use_extra_bufts: bool):
    """``Llama()`` builds its llama_model_params from ``llama_model_default_params``, looked
    up on ``llama_cpp.llama_cpp`` at call time: replaced while a model loads, to set
    ``use_extra_bufts`` (no public argument)."""
    import llama_cpp.llama_cpp as low

    original = low.llama_model_default_params

    def patched():
        params = original()
        params.use_extra_bufts = use_extra_bufts
        return params

    return _swapped(low, "llama_model_default_params", patched)


def _context_params(n_seq_max: int, flash_attn: bool):
    """The same for llama_context_params (``llama_context_default_params``): ``n_seq_max``
    sequences, one KV stream each (``Llama()`` takes neither)."""
    import llama_cpp.llama_cpp as low

    from edge_tune.llama.batch_rows import stream_params

    original = low.llama_context_default_params
    return _swapped(low, "llama_context_default_params",
                    lambda: stream_params(original(), n_seq_max, flash_attn))


@contextlib.contextmanager
def _swapped(module, name: str, value):
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


class _SeqContext:
    """llama-cpp-python's ``LlamaContext`` (``Llama._ctx``), with its KV removals bound to one
    sequence: ``Llama.generate``/``eval`` remove from sequence ``-1`` (every sequence), which
    would wipe the other sequences' entries."""

    def __init__(self, inner, seq: int, deferred: bool = False) -> None:
        self._inner = inner
        self._seq = seq
        self._deferred = deferred

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def kv_cache_seq_rm(self, seq_id: int, p0: int, p1: int) -> bool:
        """Drop the sequence's entries from ``p0`` on (llama-cpp-python's prefix reuse).
        ``deferred`` (a view on a batcher): only the decoding thread touches the KV
        buffer, and :meth:`Batch.decode` drops everything past ``n_past`` anyway."""
        import llama_cpp

        if self._deferred:
            return True
        return llama_cpp.llama_memory_seq_rm(self._inner.memory, self._seq, p0, p1)

    def kv_cache_clear(self) -> None:
        self.kv_cache_seq_rm(self._seq, 0, -1)


class SeqLlama:
    """A ``llama_cpp.Llama`` decoding sequence ``seq_id`` of a shared context through
    ``decoder`` (a :class:`~edge_tune.llama.batch_rows.DirectDecoder` or the server's
    batcher), and the only code of edge-tune that touches llama-cpp-python's internals.
    :func:`llama_class` puts it before ``llama_cpp.Llama`` (imported at first use) in a
    subclass of both.

    What it relies on, as of llama-cpp-python 0.3.36 (``tests/integration/test_llama_pins.py``):

    - ``Llama.generate`` calls ``self.eval(tokens)`` and ``self.sample(..., idx=i)``
      through the instance (overridden here: decoding by the batching rule, the token
      counter's hooks) and builds ``self._sampler`` when it is None; with
      ``self.draft_model`` set it evaluates each sampled token with the drafter's guesses,
      samples at ``idx`` = each drafted position in turn and, at the first sampled token
      that differs, sets ``n_tokens`` back to that position (:meth:`answering`); its
      logits processors read ``self._input_ids``;
    - ``_ctx``: the ``LlamaContext``; ``generate``/``eval`` call its
      ``kv_cache_seq_rm(-1, p0, p1)`` and ``kv_cache_clear()``, and its ``memory`` is the
      context's ``llama_memory_t`` (replaced by a per-sequence :class:`_SeqContext`);
    - ``_model``: the ``LlamaModel``, for ``.vocab`` (a ``llama_vocab`` pointer) and
      ``.token_get_text(id)``;
    - ``_n_ctx``: the tokens the length checks allow (``exceed context window``), set to
      one sequence's share; ``_n_vocab``: the width of ``scores``; ``_logits_all``;
    - ``_input_ids`` (``input_ids[:n_tokens]``), ``input_ids``, ``n_tokens`` and
      ``scores``, written directly; ``_requires_eval``: ``generate`` evaluates again
      when True; ``_sampler``: None until ``generate`` builds one;
    - ``_stack``: the ``ExitStack`` that ``close``/``__del__`` close (a view gets an
      empty one: the model and context are the owner's);
    - ``llama_cpp.llama_cpp.llama_model_default_params`` and
      ``llama_context_default_params``, looked up at call time by ``Llama.__init__``
      (replaced while :func:`open_llama` builds one).
    """

    seq_id = 0
    decoder = None
    counter = None  # a token counter while one answer runs: see answering()
    keep_new = 0  # see answering()
    _last_row = -1
    verifying = False  # the tokens being evaluated are a sampled one and its draft
    _answer_sampled = False  # the answer has sampled once: later evals carry drafts

    # --- what edge-tune reads ------------------------------------------------------
    @property
    def vocab(self):
        """The model's ``llama_vocab`` pointer (for llama.cpp's vocabulary calls)."""
        return self._model.vocab

    @property
    def sequence_tokens(self) -> int:
        """The tokens one sequence may hold (its share of the context)."""
        return self._n_ctx

    @property
    def keeps_all_logits(self) -> bool:
        """Every evaluated row's logits go into ``scores`` (``logits_all=True``)."""
        return self._logits_all

    def token_text(self, token: int) -> str:
        """A token's text as the vocabulary stores it ("" for a negative id)."""
        return self._model.token_get_text(token) if token >= 0 else ""

    # --- the KV entries of this sequence -------------------------------------------
    def clear_kv(self) -> None:
        """Drop this sequence's KV entries (its tokens stay listed: :meth:`reset`)."""
        self._ctx.kv_cache_clear()

    def keep_only(self, n: int) -> None:
        """Keep the first ``n`` tokens of this sequence, drop the KV entries after."""
        if self.n_tokens > n:
            self.n_tokens = n
            self._ctx.kv_cache_seq_rm(-1, n, -1)

    def cached_tokens(self):
        """The tokens whose KV entries the sequence holds now (a copy)."""
        return self.input_ids[:self.n_tokens].copy()

    def set_cached_tokens(self, tokens) -> None:
        """Say that the sequence holds ``tokens`` (after its KV entries were put back)."""
        self.input_ids[:len(tokens)] = tokens
        self.n_tokens = len(tokens)

    # --- one answer -------------------------------------------------------------------
    @contextlib.contextmanager
    def answering(self, counter=None, keep_new: int = 0, draft=None):
        """For one answer of llama-cpp-python's generation loop: ``counter`` sees every
        evaluation (``evaluating(n_tokens)``) and sample (``cut_short()``: a token to
        answer instead of sampling, or None; ``sampled(token, n_tokens)``);
        ``keep_new`` > 0: a cached prefix is reused for at most ``len(prompt) -
        keep_new`` tokens (see :meth:`generate`); ``draft``: a drafter for speculative
        decoding (``llama_cpp``'s ``draft_model`` protocol: the tokens so far -> the
        guessed next ones, :mod:`edge_tune.llama.speculative`).

        With a drafter, ``Llama.generate`` evaluates each sampled token together with its
        draft, samples at every drafted position in turn with the answer's own sampler
        (its RNG, grammar and penalty state advance once per kept token, as without a
        draft) and stops at the first sampled token that differs from the draft, dropping
        the KV entries after it. Since every row's logits equal a one-row decode's (the
        rule of :mod:`edge_tune.llama.batch_rows`), the answer is the one plain decoding
        gives, greedy or sampled with the same seed."""
        self.counter, self.keep_new = counter, keep_new
        self.draft_model, self._answer_sampled = draft, False
        try:
            yield
        finally:
            self.counter, self.keep_new = None, 0
            self.draft_model, self._answer_sampled, self.verifying = None, False, False

    def generate(self, tokens, *args, **kwargs):
        """``Llama.generate``; with ``keep_new`` (:meth:`answering`) the last
        ``keep_new`` prompt tokens are evaluated even when the cache holds them.

        Why: llama-cpp-python re-evaluates a single token when the whole prompt is
        cached, and ggml computes a lone row with other kernels than a block
        (llamafile's sgemm needs two rows), so its logits would round differently from a
        fresh context's. Two rows take the block kernels, whose rows do not depend on
        how a prompt is split (checked for many splits: docs/serving.md)."""
        if self.keep_new:
            tokens = list(tokens)
            keep = 0
            for cached, new in zip(self._input_ids,
                                   tokens[:max(len(tokens) - self.keep_new, 0)]):
                if cached != new:
                    break
                keep += 1
            self.keep_only(keep)
        return super().generate(tokens, *args, **kwargs)

    def eval(self, tokens) -> None:
        if self.counter is not None:
            self.counter.evaluating(self.n_tokens)
        tokens = [int(t) for t in tokens]  # a draft comes as numpy integers
        # after the answer's first sample, llama_cpp evaluates a sampled token with its
        # draft: every row's logits are needed
        self.verifying = self.draft_model is not None and self._answer_sampled
        self._last_row = self.decoder(self, tokens)
        self.input_ids[self.n_tokens:self.n_tokens + len(tokens)] = tokens
        self.n_tokens += len(tokens)
        self._requires_eval = False

    def sample(self, *args, **kwargs) -> int:
        counter = self.counter
        if counter is not None:
            stop = counter.cut_short()
            if stop is not None:
                return stop
        # the logits of the row of position ``idx`` (llama_cpp's; default the last) in the
        # latest decode, whose rows are consecutive and end at _last_row
        idx = kwargs.get("idx")
        idx = self.n_tokens - 1 if idx is None else idx
        row = self._last_row - (self.n_tokens - 1 - idx)
        # while a drafted position is sampled, the tokens after it are not yet the
        # answer's: the sampler's logits processors must see those up to ``idx`` only
        n_tokens, self.n_tokens = self.n_tokens, idx + 1
        try:
            kwargs["idx"] = self.n_tokens + row
            with self.decoder.sample_lock:
                token = super().sample(*args, **kwargs)
        finally:
            self.n_tokens = n_tokens
        self._answer_sampled = True
        if counter is not None:
            counter.sampled(token, self.n_tokens)
        return token

    def keep_logits(self, entry) -> None:
        """After a decode (on the decoding thread): with ``logits_all``, copy the
        rows of ``entry`` (a :class:`~edge_tune.llama.batch_rows.Rows`) into
        ``scores``."""
        if not self._logits_all:
            return
        import llama_cpp
        import numpy as np

        for k in range(len(entry.tokens)):
            row = llama_cpp.llama_get_logits_ith(self.ctx, entry.first + k)
            self.scores[entry.n_past + k, :] = np.ctypeslib.as_array(
                row, shape=(self._n_vocab,))

    # --- several sequences ------------------------------------------------------------
    def view(self, seq_id: int, decoder) -> "SeqLlama":
        """Another sequence of the same model and context: its own tokens, sampler and
        KV entries; closing it frees nothing (the model and context are the owner's)."""
        import numpy as np

        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.seq_id, other.decoder = seq_id, decoder
        other.counter, other.keep_new, other.draft_model = None, 0, None
        other._stack = contextlib.ExitStack()  # Llama.__del__ closes _stack: not ours
        other._ctx = _SeqContext(getattr(self._ctx, "_inner", self._ctx), seq_id, True)
        other.input_ids = np.ndarray((self._n_ctx,), dtype=np.intc)
        other.n_tokens, other._sampler, other._requires_eval = 0, None, True
        other.chat_handler = None
        return other


def llama_class():
    """A subclass of :class:`SeqLlama` and ``llama_cpp.Llama``, built once (``llama_cpp`` is
    imported at first use)."""
    if "cls" in _CLASS:
        return _CLASS["cls"]
    from llama_cpp import Llama

    class SeqLlamaCpp(SeqLlama, Llama):
        """:class:`SeqLlama` on llama-cpp-python's ``Llama``."""

    _CLASS["cls"] = SeqLlamaCpp
    return SeqLlamaCpp


def open_llama(sequences: int, n_ctx: int, flash_attn: bool = False,
               extra_bufts: bool = True, **llama_kw):
    """A :class:`SeqLlama` (sequence 0) on a context of ``max(2, sequences)`` sequences (a lone
    sequence needs a neighbour for its filler rows) of ``n_ctx`` tokens each, decoding at
    once (:class:`~edge_tune.llama.batch_rows.DirectDecoder`). ``.batch`` is the context's
    :class:`~edge_tune.llama.batch_rows.Batch`. ``extra_bufts``: whether llama.cpp may use its
    extra CPU buffer types (weight repacking, AMX). ``llama_kw``: ``Llama()``'s own arguments.
    Raises ValueError when llama.cpp cannot load the model (llama-cpp-python's)."""
    from edge_tune.llama.batch_rows import Batch, DirectDecoder

    cls = llama_class()
    streams = max(2, sequences)
    with _model_params(extra_bufts), _context_params(streams, flash_attn):
        llm = cls(n_ctx=n_ctx * streams, n_batch=512, n_ubatch=512, flash_attn=flash_attn,
                  **llama_kw)
    llm._n_ctx = n_ctx  # what one sequence may hold: llama-cpp-python's length checks
    llm._ctx = _SeqContext(llm._ctx, 0)
    llm.batch = Batch(llm.ctx, streams)
    llm.decoder = DirectDecoder(llm.batch)
    return llm
