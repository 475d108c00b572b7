"""Several sequences in one llama.cpp context, decoded so that batching changes no answer.

The rule (measured on the default Q4_1 model with and without adapters: docs/serving.md
"Why it is exact"): **one KV stream per sequence** (``kv_unified = false``), **flash
attention with a BF16 KV cache** (:func:`kv_cache_params`), and every decode either a
*step*, one token per sequence, of **at least two rows** unless one row is known to compute
as several (below), or a *prompt chunk* of one sequence alone (at least two rows, its last
two as outputs).

Why each part: ggml's CPU flash attention computes every query row on its own, over its
own stream's cells in order, unless the cache is F16/F32 (then blocks of 64 rows or more
take a tiled kernel and a lone row over 512 cells a split one); with BF16 a decoded row's
entries equal the same token's inside any prompt block, so an answer's KV entries serve the
next turn as they are. Without flash attention the attention matrices go through
llamafile's sgemm for blocks and ggml's dot products for a decoded row, which round
differently. The weights: llamafile's sgemm takes over at two rows for F32 adapter matrices
and F16/F32 weights, so a lone sequence's step gets a *filler* row (appended to a
neighbouring stream's end, with logits: llama.cpp computes the last layer only for output
rows, and removed after) unless a lone row is known to compute as it would beside others
(``Batch.lone_ok``, measured per adapter set by :func:`lone_rows_agree`: on x86 it does for
quantized weights with the engine's Q8_0 adapter copies, :mod:`edge_tune.llama.serving_copy`).
llama.cpp splits a batch over per-sequence streams into micro-batches of consecutive,
increasing sequence ids with equal token counts; without ``lone_ok`` a step therefore covers
a consecutive range of sequence ids, in order, with a filler row in each gap (rows out of
order are split off into micro-batches of one row).

:func:`edge_tune.llama.native.open_llama` makes a ``llama_cpp.Llama`` whose
``eval``/``sample`` follow that rule for one sequence id; llama-cpp-python's own generation
loop (chat templates, grammars, logits processors, stop strings, penalties) runs on top
unchanged. A decoder callable does the decoding: :class:`DirectDecoder` at once (``chat``),
or the server's batcher (:mod:`edge_tune.server.batch_loop`), which gathers the steps of many
sequences into one ``llama_decode``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from edge_tune.errors import EdgeTuneError, KVFull, Unsupported

CHUNK = 510  # rows of one prompt chunk: n_ubatch (512) with room to spare


GGML_TYPE_F32, GGML_TYPE_BF16 = 0, 30  # ggml.h


def kv_cache_params(exact: bool = False) -> dict:
    """``Llama()`` keyword arguments for the KV cache: BF16 with flash attention (the rule
    above: decoded rows equal block rows), or with ``exact`` F32 without flash attention
    (precise block logits for comparisons with torch; decoded rows then differ from block
    rows, so an exact engine does not reuse an answer's entries)."""
    if exact:
        return {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32, "flash_attn": False}
    return {"type_k": GGML_TYPE_BF16, "type_v": GGML_TYPE_BF16, "flash_attn": True}


def lone_rows_agree(model, threads: int, adapters: list, cache: dict) -> bool:
    """Whether a lone decoded row gives the same logits, bit for bit, as the same row beside
    another sequence's, on this machine, for ``model`` under ``adapters``
    (``llama_adapter_lora`` pointers, scale 1) with the KV cache settings ``cache``
    (:func:`kv_cache_params`). When it does, a lone sequence needs no filler row.

    Measured rather than assumed: whether ggml's one-row and several-row kernels agree
    depends on the tensor types (Q8_0 and Q4_1 do on x86, F32 does not) and on the CPU's
    instruction set. Three steps after an 8-token prompt, on a context of its own (two
    streams of 256 cells)."""
    import ctypes

    import llama_cpp
    import numpy as np

    params = stream_params(llama_cpp.llama_context_default_params(), 2, cache["flash_attn"])
    params.n_ctx, params.n_batch, params.n_ubatch = 512, 16, 16
    params.n_threads = params.n_threads_batch = threads
    params.type_k, params.type_v = cache["type_k"], cache["type_v"]
    ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        return False
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    batch = Batch(ctx, 2)
    try:
        if adapters:
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * len(adapters))(*adapters)
            ones = (ctypes.c_float * len(adapters))(*([1.0] * len(adapters)))
            if llama_cpp.llama_set_adapters_lora(ctx, arr, len(adapters), ones) != 0:
                return False
        tokens = [(7 * i + 11) % n_vocab for i in range(11)]

        def steps(beside: bool) -> list:
            llama_cpp.llama_memory_clear(batch.memory, True)
            batch.decode([Rows(0, 0, tokens[:8])])
            if beside:
                batch.decode([Rows(1, 0, tokens[3:11])])
            out = []
            for k in range(3):
                entries = [Rows(0, 8 + k, [tokens[8 + k]])]
                if beside:
                    entries.append(Rows(1, 8 + k, [tokens[k]]))
                batch.decode(entries)
                row = llama_cpp.llama_get_logits_ith(ctx, entries[0].first)
                out.append(np.ctypeslib.as_array(row, shape=(n_vocab,)).copy())
            return out

        batch.lone_ok = True
        return all(np.array_equal(a, b) for a, b in zip(steps(False), steps(True)))
    except EdgeTuneError:
        return False
    finally:
        batch.close()
        llama_cpp.llama_free(ctx)


@dataclass
class Rows:
    """What one sequence asks of a decode: ``tokens`` at positions ``n_past``...; with
    ``all_logits`` every row's logits are kept (``Llama(logits_all=True)``); ``verify``:
    a sampled token and its draft (speculative decoding), every row an output, which may
    join a step beside other sequences' rows (:meth:`Batch.decode`)."""

    seq: int
    n_past: int
    tokens: list
    all_logits: bool = False
    first: int = -1  # batch index of the first row, set by Batch.decode
    verify: bool = False


def stream_params(params, n_seq_max: int, flash_attn: bool):
    """``params`` (llama_context_params) set for ``n_seq_max`` sequences, one KV stream
    each, flash attention on or off."""
    import llama_cpp

    params.n_seq_max = n_seq_max
    params.kv_unified = False
    params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                              else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    return params


class Batch:
    """One ``llama_batch``, reused for every decode of a context of ``streams`` sequences."""

    def __init__(self, ctx, streams: int) -> None:
        import llama_cpp

        self.ctx = ctx
        self.streams = streams
        self.batch = llama_cpp.llama_batch_init(max(CHUNK, streams) + 2, 0, 1)
        self.memory = llama_cpp.llama_get_memory(ctx)
        # whether a lone row may go without a filler: set by the engine, or measured when
        # first asked (``lone_check``: Engine._decide_lone_rows)
        self._lone_ok: bool | None = False
        self.lone_check = None  # decides ``lone_ok`` when it is None (the engine sets both)
        self.rows = 0  # rows decoded, fillers included
        self.filler_rows = 0
        self.shared_draft_steps = 0  # decodes where a drafted run joined other sequences

    @property
    def lone_ok(self) -> bool:
        """A lone sequence's step needs no filler row; None until decided, by
        ``lone_check()`` at the first step that asks."""
        if self._lone_ok is None:
            self._lone_ok = bool(self.lone_check()) if self.lone_check else False
        return self._lone_ok

    @lone_ok.setter
    def lone_ok(self, value: bool | None) -> None:
        self._lone_ok = value

    def decode(self, entries: list[Rows]) -> None:
        """Decode a prompt chunk (one entry) or a step (entries of one token each, distinct
        sequences; with :attr:`lone_ok`, ``verify`` entries of several tokens too: llama.cpp
        then splits the batch into micro-batches of any shape, one row included, and each
        row still computes as it would alone); sets each entry's ``first``. Raises
        :class:`KVFull` when the KV buffer has no room (nothing decoded), EdgeTuneError on
        any other failure."""
        import llama_cpp

        mem = self.memory
        for entry in entries:  # a sequence's entries past n_past are stale: a new answer,
            # or drafted tokens that were not kept
            llama_cpp.llama_memory_seq_rm(mem, entry.seq, entry.n_past, -1)
        if len(entries) > 1 and any(len(e.tokens) != 1 and not (e.verify and self.lone_ok)
                                    for e in entries):
            raise RuntimeError("internal: a step decodes one token per sequence")
        fillers = self._fillers(entries)
        filler_token = entries[0].tokens[-1]
        parts = [(e.seq, e) for e in entries] + [(seq, pos) for seq, pos in fillers]
        # a filler beside one real row is an output too: llama.cpp computes the last layer
        # and the output matrix only for output rows, and those must be two or more
        filler_out = len(entries) < 2
        rows = []  # (token, pos, seq, logits), by sequence id: llama.cpp's split takes
        for seq, part in sorted(parts, key=lambda p: p[0]):  # increasing ids only
            if not isinstance(part, Rows):
                rows.append((filler_token, part, seq, filler_out))
                continue
            part.first = len(rows)
            n = len(part.tokens)
            for k, token in enumerate(part.tokens):
                out = part.all_logits or part.verify or k >= n - 2 or len(entries) > 1
                rows.append((token, part.n_past + k, seq, out))
        b = self.batch
        for i, (token, pos, seq, out) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i] = token, pos, 1
            b.seq_id[i][0], b.logits[i] = seq, 1 if out else 0
        b.n_tokens = len(rows)
        self.rows += len(rows)
        self.filler_rows += len(fillers)
        if len(entries) > 1 and any(len(e.tokens) > 1 for e in entries):
            self.shared_draft_steps += 1
        try:
            rc = llama_cpp.llama_decode(self.ctx, b)
        finally:
            for seq, pos in fillers:
                llama_cpp.llama_memory_seq_rm(mem, seq, pos, -1)
        if rc == 1:
            raise KVFull("the KV cache is full")
        if rc != 0:
            raise Unsupported(f"llama_decode failed (code {rc})")

    def _fillers(self, entries: list[Rows]) -> list[tuple[int, int]]:
        """(sequence, position) of the filler rows a decode needs (see the module)."""
        import llama_cpp

        if len(entries) == 1 and len(entries[0].tokens) > 1:
            return []  # a prompt chunk: its last two rows are the outputs
        if self.lone_ok:  # one row computes as several: gaps (1-row micro-batches) too
            return []
        seqs = {e.seq for e in entries}
        lo, hi = min(seqs), max(seqs)
        need = [s for s in range(lo, hi + 1) if s not in seqs]
        if lo == hi:
            need = [hi + 1 if hi + 1 < self.streams else lo - 1]
        return [(s, llama_cpp.llama_memory_seq_pos_max(self.memory, s) + 1) for s in need]

    def drop(self, seq: int) -> None:
        """Drop every KV entry of sequence ``seq`` (its cache)."""
        import llama_cpp

        llama_cpp.llama_memory_seq_rm(self.memory, seq, 0, -1)

    def close(self) -> None:
        import llama_cpp

        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None


class DirectDecoder:
    """Decodes one sequence's tokens at once, in chunks: the single-request path."""

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.sample_lock = threading.Lock()

    def __call__(self, view, tokens: list) -> int:
        last = -1
        for chunk in chunks(tokens):
            entry = Rows(view.seq_id, view.n_tokens + chunk[0], chunk[1], view.keeps_all_logits,
                         verify=view.verifying)
            self.batch.decode([entry])
            view.keep_logits(entry)
            last = entry.first + len(entry.tokens) - 1
        return last


def chunks(tokens: list) -> list[tuple[int, list]]:
    """(offset, tokens) pieces of at most CHUNK tokens."""
    return [(i, tokens[i:i + CHUNK]) for i in range(0, len(tokens), CHUNK)]


def streams_for(parallel: int) -> int:
    """KV streams (sequence ids) of a context that runs ``parallel`` sequences at once:
    two for one (a lone sequence's filler row goes on a neighbour), else twice
    ``parallel``, so that the server can give the sequences of one adapter set
    neighbouring ids (each gap in a step's range of ids costs a filler row)."""
    return 2 if parallel <= 1 else 2 * parallel
