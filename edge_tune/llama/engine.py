"""llama.cpp (llama-cpp-python) behind a small interface: one base, validated adapters.

Why adapters are validated here first: llama-cpp-python does not notice a failed adapter load,
and the first inference then segfaults. Every adapter is checked against the base in Python
(:mod:`edge_tune.converters.formats.validate`), and the pointer llama.cpp returns is checked too.
Several adapters can be loaded on one base; :meth:`Engine.activate` switches between them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from edge_tune.converters.formats.base_info import BaseInfo, from_gguf
from edge_tune.converters.formats.validate import validate_adapter_file
from edge_tune.errors import (ChatTemplateError, ContextOverflow, DataError, NoChatTemplate,
                              Unsupported, UsageError)
from edge_tune.native_log import quiet_stderr


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


def _env_threads() -> int | None:
    value = os.environ.get("EDGE_TUNE_THREADS", "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise UsageError(f"EDGE_TUNE_THREADS={value!r}: expected a whole number >= 1")
    return int(value)


def plain_prompt(messages: list[dict]) -> str:
    """The text of a conversation for a model with no chat template, for a plain completion:
    each message's content on its own line(s), ending with a newline so that the answer
    starts on a line of its own (without it a model may take the question as a finished
    text and end at once). Pure."""
    return "".join(str(m["content"]).strip() + "\n" for m in messages if m.get("content"))


class _TemplateFormatter:
    """llama-cpp-python's :class:`Jinja2ChatFormatter` (the environment transformers uses),
    with the stop tokens edge-tune found for the template, and a template's own exception
    turned into :class:`ChatTemplateError` (llama-cpp-python raises a bare ValueError)."""

    def __init__(self, text: str, eos: str, bos: str, stop_ids: set[int],
                 stop_texts: list[str]) -> None:
        import jinja2
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        try:
            self._jinja = Jinja2ChatFormatter(text, eos, bos, stop_token_ids=sorted(stop_ids))
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"the chat template is not valid Jinja (line {exc.lineno}: "
                                    f"{exc.message})") from None
        self._stop = stop_texts

    def __call__(self, **kw):
        import jinja2

        try:
            result = self._jinja(**kw)
        except (jinja2.TemplateError, ValueError, TypeError) as exc:
            said = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ChatTemplateError(f"the chat template says: {said}") from None
        result.stop = list(self._stop)
        return result


def render_chat(template: str, messages: list[dict], tools: list[dict] | None = None,
                add_generation_prompt: bool = True) -> str:
    """The text of ``messages`` (and ``tools``) rendered with chat template ``template``
    (Jinja text) by llama-cpp-python's formatter, with empty BOS/EOS texts. Raises whatever
    the template raises (jinja2 errors, ValueError from its ``raise_exception``...)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    fmt = Jinja2ChatFormatter(template, eos_token="", bos_token="",
                              add_generation_prompt=add_generation_prompt)
    return fmt(messages=messages, tools=tools).prompt


def logits_processors(*processors):
    """``processors`` (callables ``(input_ids, logits) -> logits``, called in order at every
    sampling step with the step's raw logits) as the ``logits_processor`` sampling argument of
    :meth:`Engine.generate`."""
    from llama_cpp import LogitsProcessorList

    return LogitsProcessorList(list(processors))


@dataclass
class Piece:
    """A piece of streamed text; the last one of an answer has ``finish_reason`` set."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV entries were reused, not evaluated
    last_token: int | None = None  # the last piece: the answer's last sampled token id
    reasoning: str = ""  # thinking of a reasoning model (generate's split_reasoning)
    raw: str | None = None  # what the model wrote, think markers included (None: text)

    @property
    def said(self) -> str:
        """The piece as the model wrote it (thinking, markers and answer)."""
        return self.text if self.raw is None else self.raw


def _splitter(template: str, prompts: list):
    """A :class:`~edge_tune.llama.thinking.ThinkSplitter` for an answer to ``prompts[-1]``
    (rendered with ``template``); None when the template has no think markers."""
    from edge_tune.llama.thinking import ThinkSplitter, prompt_opens, template_markers

    markers = template_markers(template)
    if markers is None or not prompts:
        return None
    return ThinkSplitter(markers, prompt_opens(prompts[-1], markers))


def _split(splitter, text: str, finish, counter) -> Iterator[Piece]:
    """The pieces of one chunk of the answer, its thinking apart; at the end, what the
    splitter held goes in a piece of its own before the one with ``finish``."""
    reasoning, content = splitter.feed(text)
    if finish:
        more = splitter.finish()
        reasoning, content = reasoning + more[0], content + more[1]
    counts = (counter.prompt_tokens, counter.completion_tokens, counter.cached_tokens)
    if reasoning or content or text:
        yield Piece(content, None, *counts, reasoning=reasoning, raw=text)
    if finish:
        yield Piece("", finish, *counts, raw="", last_token=counter.last)


def _overflow_as_error(chunks, n_ctx: int):
    """llama-cpp-python raises a bare ValueError for a prompt over the context; name it.
    ``n_ctx``: the tokens one sequence may hold (its message gives the whole context's size,
    all sequences together)."""
    try:
        first = next(chunks)
    except StopIteration:
        return
    except ValueError as exc:
        if "exceed context window" in str(exc):
            n = re.search(r"\((\d+)\)", str(exc))
            raise ContextOverflow(f"the prompt is {n.group(1) if n else 'too many'} tokens; "
                                  f"the context window holds {n_ctx} tokens (prompt + "
                                  "answer)") from None
        raise
    yield first
    yield from chunks


class _TokenCounter:
    """Counts the tokens llama-cpp-python samples, for the OpenAI ``usage`` block.

    Its streaming API reports no token counts, so the sequence's ``eval`` and ``sample`` call
    this counter for the duration of one answer
    (:meth:`edge_tune.llama.native.SeqLlama.answering`). On the first sample the context holds exactly the
    prompt; an end-of-generation token is not counted as completion.

    ``cached_tokens``: the prompt tokens llama-cpp-python took from the KV cache (its
    ``generate`` keeps the longest common prefix; the first ``eval`` starts after it).

    It also enforces ``limit`` (max_tokens): llama-cpp-python's streaming loop skips its own
    max_tokens check while the text ends in an incomplete UTF-8 sequence, so a model that
    keeps sampling lead bytes (seen with a tiny Gemma 3 and an adapter) generated until the
    context was full and llama_decode failed. Past the limit the counter answers an
    end-of-generation token instead of sampling, which stops the loop; ``cut`` says the answer
    was cut there.
    """

    def __init__(self, vocab, limit: Optional[int] = None) -> None:
        import llama_cpp

        self.vocab = vocab
        self.limit = limit
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0
        self._sampled = 0
        self._evals = 0
        self.cut = False
        self.last: Optional[int] = None  # the last token sampled
        self.stop = llama_cpp.llama_vocab_eos(vocab)
        if self.stop < 0:
            self.stop = llama_cpp.llama_vocab_eot(vocab)

    def evaluating(self, n_tokens: int) -> None:
        """Before an evaluation, with ``n_tokens`` in the context."""
        if self._evals == 0:
            self.cached_tokens = n_tokens
        self._evals += 1

    def cut_short(self) -> Optional[int]:
        """Before a sample: the token to answer instead (the limit is reached), or None."""
        if self.limit is not None and self.completion_tokens >= self.limit and self.stop >= 0:
            self.cut = True
            return self.stop
        return None

    def sampled(self, token: int, n_tokens: int) -> None:
        """After a sample of ``token``, with ``n_tokens`` in the context."""
        import llama_cpp

        if self._sampled == 0:
            self.prompt_tokens = n_tokens
        self._sampled += 1
        self.last = token
        if not llama_cpp.llama_vocab_is_eog(self.vocab, token):
            self.completion_tokens += 1


# rows of a prompt evaluated even when the cache holds all of it (SeqLlama.generate says why)
MIN_NEW_TOKENS = 2


_LONE_ROWS: dict[tuple, bool] = {}  # see Engine._decide_lone_rows


def _matrix_kinds(path: Path) -> frozenset:
    """(tensor name suffix, GGML type, row width) of an adapter file's matrices: what decides
    which of ggml's kernels multiply by them (a header read)."""
    from edge_tune.converters.formats.gguf_header import read_header

    return frozenset((t.name.rsplit(".", 1)[-1], int(t.tensor_type), int(t.shape[0]))
                     for t in read_header(path).tensors)


class Engine:
    def __init__(self, base_gguf: Path, n_ctx: int = 4096, threads: Optional[int] = None,
                 logits_all: bool = False, seed: int = 0, exact: bool = False,
                 chat_template: Optional[str] = None, stop_tokens: tuple = (),
                 system_mode: str = "keep", prompt_cache: bool = True,
                 parallel: int = 1) -> None:
        """``exact``: keep the KV cache in F32 with flash attention off, for bit-careful
        comparisons with torch (default: BF16 with flash attention, the batching rule's
        setting, :func:`edge_tune.llama.batch_rows.kv_cache_params`).
        ``parallel``: sequences the context holds (the server's batch), ``n_ctx`` tokens
        each (a KV stream per sequence, at least two), all decoded by the rule of
        :mod:`edge_tune.llama.batch_rows`, so a greedy answer is the same alone or
        batched.
        ``prompt_cache``: reuse the KV entries of the longest common prefix of the previous
        prompt (per adapter set, see :meth:`activate_mix`) instead of starting each answer
        from an empty context; greedy answers are the same either way (tests/integration/
        test_server_batching.py measures it).
        ``chat_template``: Jinja text used for conversations instead of the GGUF's own
        ``tokenizer.chat_template`` (:meth:`set_chat_template` sets one per adapter);
        ``stop_tokens``: token texts that also end an answer (e.g. a run's); ``system_mode``
        "fold" puts a system message into the first user turn before rendering (templates
        without a system role; see :func:`edge_tune.data.template.fold_system`)."""
        self.base_path = Path(base_gguf)
        self.base: BaseInfo = from_gguf(self.base_path)  # refuses truncated/corrupt files
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise UsageError("llama-cpp-python is not installed: pip install "
                             "'edge-tune[run]'") from None
        import psutil

        # EDGE_TUNE_THREADS: on a box shared with other work, fewer threads than cores is
        # much faster: ggml's threads wait for each other at every op, and one descheduled
        # thread stalls the rest (measured here: 2 threads 4-13x slower than 1 under load).
        threads = threads or _env_threads() or psutil.cpu_count(logical=False) or 1
        try:
            from edge_tune.llama.batch_rows import kv_cache_params, streams_for
            from edge_tune.llama.native import open_llama

            with quiet_stderr():
                self.llm = open_llama(streams_for(parallel), n_ctx,
                                      extra_bufts=_want_extra_bufts(),
                                      model_path=str(self.base_path), n_threads=threads,
                                      n_threads_batch=threads, logits_all=logits_all, seed=seed,
                                      verbose=False, **kv_cache_params(exact))
        except ValueError as exc:
            raise DataError(f"{self.base_path}: llama.cpp could not load this model "
                            f"({exc})") from None
        self._adapters: dict[str, object] = {}
        self.adapter_meta: dict[str, dict] = {}
        self.active: Optional[str] = None
        self.active_mix: tuple = ()  # ((name, scale), ...) applied to the context now
        self.prompt_cache = prompt_cache
        self.parallel = max(1, parallel)
        # exact: F32 cache without flash attention, where decoded rows differ from block
        # rows, so answers' KV entries are not reused (see generate)
        self._exact = exact
        # float matrices take other ggml kernels for one row than for several (a lone
        # row then needs a filler); quantized ones measured: _decide_lone_rows
        file_type = self.llm.metadata.get("general.file_type")
        self._float_weights = not str(file_type or "").isdigit() or int(file_type) in (0, 1, 32)
        self._threads = threads
        self._kernels: dict[str, frozenset] = {}  # adapter -> its matrices' (type, width)
        self._decide_lone_rows(())
        # adapter set -> its cached prompt (KV entries + tokens), saved when it was left
        self._saved: OrderedDict[tuple, object] = OrderedDict()
        own = self.llm.metadata.get("tokenizer.chat_template") or None
        self._templates: dict[Optional[str], Optional[str]] = {None: chat_template or own}
        self._stop_tokens = tuple(stop_tokens)
        self._handlers: dict[str, object] = {}
        self._fold: dict[Optional[str], bool] = {None: system_mode == "fold"}
        self._systems: dict[Optional[str], str] = {}  # see set_system
        self._sides: dict[str, object] = {}  # see side()
        # speculative decoding (edge_tune.llama.speculative.Speculative; None: off) and
        # what it did: guesses checked, tokens guessed, tokens kept
        self.speculative = None
        self.draft_stats = {"verifies": 0, "drafted": 0, "kept": 0}
        self._stats_lock = threading.Lock()  # the server's sequences end on their threads

    # --- chat templates -------------------------------------------------------------------
    def set_chat_template(self, text: Optional[str], adapter: Optional[str] = None,
                          stop_tokens: tuple = (), system_mode: Optional[str] = None) -> None:
        """Use ``text`` (and ``system_mode``) for conversations while ``adapter`` is active
        (None: the base, and every adapter without its own)."""
        if text:
            self._templates[adapter] = text
        if system_mode is not None:
            self._fold[adapter] = system_mode == "fold"
        self._stop_tokens = tuple(dict.fromkeys(self._stop_tokens + tuple(stop_tokens)))

    def set_system(self, text: Optional[str], adapter: Optional[str] = None) -> None:
        """Send ``text`` as the system message of every conversation that has none while
        ``adapter`` is active (None: the base, and every adapter without its own): a run's
        training system prompt (:func:`edge_tune.data.training.shared_system`). A
        conversation's own system message wins."""
        if text:
            self._systems[adapter] = text
        else:
            self._systems.pop(adapter, None)

    def system_of(self, adapter: Optional[str]) -> Optional[str]:
        """The system prompt a conversation without one gets while ``adapter`` is active."""
        return self._systems.get(adapter) if adapter in self._systems else \
            self._systems.get(None)

    def template_of(self, adapter: Optional[str]) -> Optional[str]:
        """The template conversations are rendered with while ``adapter`` is active (None:
        the base); None when there is none at all."""
        return self._templates.get(adapter) or self._templates[None]

    @property
    def chat_template(self) -> Optional[str]:
        """The template conversations are rendered with now (None: the model has none)."""
        return self.template_of(self.active)

    def _token_text(self, token: int) -> str:
        return self.llm.token_text(token)

    def _turn_end_tokens(self, text: str, eos: str, bos: str) -> set[int]:
        """The token a template closes an assistant turn with (ChatML's ``<|im_end|>``,
        Llama-3's ``<|eot_id|>``...), found by rendering a probe answer: llama.cpp stops only
        at the vocabulary's end-of-generation tokens, and a template given for a base model
        may end turns with another special token. Empty when the probe cannot be rendered."""
        import jinja2
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        probe = "\u2063edge-tune-probe\u2063"
        try:
            rendered = Jinja2ChatFormatter(text, eos, bos, add_generation_prompt=False)(
                messages=[{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": probe}]).prompt
        except (jinja2.TemplateError, ValueError, TypeError):
            return set()
        rest = rendered.partition(probe)[2].lstrip()
        if not rest:
            return set()
        first = self.llm.tokenize(rest.encode(), add_bos=False, special=True)[:1]
        vocab = self.llm.vocab
        return {t for t in first if llama_cpp.llama_vocab_is_eog(vocab, t)
                or llama_cpp.llama_vocab_is_control(vocab, t)}

    def _chat_handler(self, text: str):
        """A llama-cpp-python chat handler for ``text`` (built once per template)."""
        handler = self._handlers.get(text)
        if handler is None:
            from llama_cpp.llama_chat_format import chat_formatter_to_chat_completion_handler

            eos, bos = self._token_text(self.llm.token_eos()), \
                self._token_text(self.llm.token_bos())
            ids = {self.llm.token_eos()} | self._turn_end_tokens(text, eos, bos)
            for word in self._stop_tokens:
                found = self.llm.tokenize(word.encode(), add_bos=False, special=True)
                if len(found) == 1:
                    ids.add(found[0])
            ids.discard(-1)
            texts = list(dict.fromkeys(t for t in [eos, *(self._token_text(i) for i in ids),
                                                   *self._stop_tokens] if t))
            formatter = _TemplateFormatter(text, eos, bos, ids, texts)
            handler = chat_formatter_to_chat_completion_handler(formatter)
            handler.formatter = formatter
            self._handlers[text] = handler
        return handler

    def _call_handler(self, text: str, template_kwargs: dict | None, prompts: list):
        """:meth:`_chat_handler` for one answer: ``template_kwargs`` go to the template as
        variables (``enable_thinking``...), and the rendered prompt is appended to
        ``prompts``."""
        from llama_cpp.llama_chat_format import chat_formatter_to_chat_completion_handler

        formatter = self._chat_handler(text).formatter

        def render(**kw):
            result = formatter(**kw, **(template_kwargs or {}))
            prompts.append(result.prompt)
            return result

        return chat_formatter_to_chat_completion_handler(render)

    # --- adapters -----------------------------------------------------------------------
    def add_adapter(self, path: Path, name: Optional[str] = None) -> str:
        """Validate and load an adapter GGUF; returns its name (default: the path). On a
        quantized base (not ``exact``) its Q8_0 serving copy is what llama.cpp loads
        (:mod:`edge_tune.llama.serving_copy`)."""
        import llama_cpp

        path = Path(path)
        name = name or str(path)
        if name in self._adapters:
            return name
        self.adapter_meta[name] = validate_adapter_file(path, self.base)
        load = path
        if not self._exact and not self._float_weights:
            from edge_tune.llama.serving_copy import serving_copy

            try:
                load = serving_copy(path)
            except OSError as exc:
                raise UsageError(f"{path}: could not make its Q8_0 serving copy in "
                                 f"edge-tune's cache ({exc.strerror or exc})") from None
        with quiet_stderr():
            ptr = llama_cpp.llama_adapter_lora_init(self.llm.model, str(load).encode())
        if not ptr and load != path:  # the cached copy went bad after its check: remake it
            from edge_tune.llama.serving_copy import serving_copy

            load = serving_copy(path, fresh=True)
            with quiet_stderr():
                ptr = llama_cpp.llama_adapter_lora_init(self.llm.model, str(load).encode())
        if not ptr:  # a NULL pointer object, not None
            where = "" if load == path else f" (its Q8_0 serving copy {load})"
            raise DataError(f"{path}: llama.cpp refused to load this adapter{where}")
        self._kernels[name] = _matrix_kinds(load)
        self._adapters[name] = ptr
        return name

    SAVED_STATES = 4  # adapter sets whose prompt cache survives a switch (LRU)

    def remove_adapter(self, name: str) -> None:
        """Unload adapter ``name`` (its saved prompt caches go with it). The active set must
        not contain it (:meth:`activate_mix` another set first)."""
        import llama_cpp

        if any(n == name for n, _ in self.active_mix):
            raise UsageError(f"adapter {name!r} is active; activate another set first")
        ptr = self._adapters.pop(name, None)
        if ptr is None:
            raise UsageError(f"adapter {name!r} is not loaded")
        self.adapter_meta.pop(name, None)
        for key in [k for k in self._saved if any(n == name for n, _ in k)]:
            del self._saved[key]
        self._kernels.pop(name, None)
        scorer = self._sides.get("score")  # may be using it on another thread: wait for it
        with scorer.lock if scorer is not None else contextlib.nullcontext():
            llama_cpp.llama_adapter_lora_free(ptr)

    def _save_prompt(self) -> tuple:
        """The cached prompt: its KV entries (``llama_state_seq_get_data``, sequence 0, the
        one llama-cpp-python uses) and its tokens."""
        import llama_cpp

        ctx = self.llm.ctx
        size = llama_cpp.llama_state_seq_get_size(ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(ctx, buf, size, 0)
        return buf, written, self.llm.cached_tokens()

    def _restore_prompt(self, buf, written: int, tokens) -> None:
        """Put a :meth:`_save_prompt` back into the (cleared) context; on failure the
        context stays empty, which is only slower."""
        import llama_cpp

        if llama_cpp.llama_state_seq_set_data(self.llm.ctx, buf, written, 0) != written:
            self.llm.clear_kv()
            return
        self.llm.set_cached_tokens(tokens)

    def activate(self, name: Optional[str], scale: float = 1.0) -> None:
        """Make ``name`` the only active adapter, at ``scale`` (None = the plain base)."""
        self.activate_mix([] if name is None else [(name, scale)])

    def activate_mix(self, mix) -> None:
        """Apply several adapters at once: ``mix`` is ``[(name, scale), ...]`` (empty: the
        plain base), passed to llama.cpp's ``llama_set_adapters_lora`` (llama.h), which adds
        each adapter's ``scale * alpha / rank * B A x``. The first adapter's chat template is
        used. KV entries are valid only under the set they were computed with: with the
        prompt cache on, the cached prompt is saved under the set being left and the new
        set's saved prompt (if any) is restored (llama_state_seq_get_data / set_data)."""
        mix = tuple((str(n), float(s)) for n, s in mix)
        for name, _ in mix:
            if name not in self._adapters:
                raise UsageError(f"adapter {name!r} is not loaded")
        if mix == self.active_mix and self.prompt_cache:
            return
        left = self.active_mix
        self.apply_mix(mix)
        if self.prompt_cache and self.llm.n_tokens > 0:
            self._saved[left] = self._save_prompt()
            self._saved.move_to_end(left)
            while len(self._saved) > self.SAVED_STATES:
                self._saved.popitem(last=False)
        # KV entries of the previous set must not be reused under this one
        self.llm.reset()
        self.llm.clear_kv()
        saved = self._saved.pop(mix, None) if self.prompt_cache else None
        if saved is not None:
            self._restore_prompt(*saved)

    def apply_mix(self, mix) -> None:
        """Set the adapters of the context to ``mix`` (as :meth:`activate_mix` takes it)
        and nothing else: the KV entries of every sequence stay (the server's batcher keeps
        each sequence's adapter set itself)."""
        import llama_cpp

        mix = tuple((str(n), float(s)) for n, s in mix)
        for name, _ in mix:
            if name not in self._adapters:
                raise UsageError(f"adapter {name!r} is not loaded")
        if mix:
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * len(mix))(
                *(self._adapters[n] for n, _ in mix))
            scales = (ctypes.c_float * len(mix))(*(s for _, s in mix))
            rc = llama_cpp.llama_set_adapters_lora(self.llm.ctx, arr, len(mix), scales)
        else:
            rc = llama_cpp.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
        if rc != 0:
            raise Unsupported(f"llama.cpp could not activate adapters {mix!r} (code {rc})")
        self._decide_lone_rows(tuple(n for n, _ in mix))
        self.active_mix = mix
        self.active = mix[0][0] if mix else None

    def _decide_lone_rows(self, names: tuple) -> None:
        """Whether a lone sequence may decode without a filler row under the adapters
        ``names`` (any scales) is decided at the first step that asks
        (:attr:`Batch.lone_ok`): measured on this machine (``lone_rows_agree``), once per
        process for each base file and kind of adapter set, since which ggml kernels run
        depends on the matrices' types and widths, not on their values."""
        batch = self.llm.batch
        if self._float_weights or (names and self._exact):
            batch.lone_ok = False  # float matrices change kernels at two rows
            return
        stat = self.base_path.stat()
        key = (str(self.base_path), stat.st_size, stat.st_mtime_ns, self._exact,
               frozenset().union(*(self._kernels[n] for n in names)))
        adapters = [self._adapters[n] for n in names]

        def check() -> bool:
            if key not in _LONE_ROWS:
                from edge_tune.llama.batch_rows import kv_cache_params, lone_rows_agree

                with quiet_stderr():
                    _LONE_ROWS[key] = lone_rows_agree(self.llm.model, self._threads, adapters,
                                                      kv_cache_params(self._exact))
            return _LONE_ROWS[key]

        batch.lone_ok, batch.lone_check = _LONE_ROWS.get(key), check

    # --- inference ------------------------------------------------------------------------
    def chat_stream(self, messages: list[dict], temperature: float = 0.7,
                    max_tokens: int = 256, seed: Optional[int] = None,
                    plain_fallback: bool = False, split_reasoning: bool = False):
        """Stream the assistant's reply (str pieces), rendered with :attr:`chat_template`. A
        model with no template raises :class:`NoChatTemplate`, or with ``plain_fallback``
        answers as a plain completion of :func:`plain_prompt` (the caller says so to the
        user). ``split_reasoning``: :class:`Piece` s instead, a reasoning model's thinking in
        their ``reasoning`` (see :meth:`generate`)."""
        if plain_fallback and self.chat_template is None:
            pieces = self.generate(prompt=plain_prompt(messages), temperature=temperature,
                                   max_tokens=max_tokens, seed=seed)
        else:
            pieces = self.generate(messages=messages, temperature=temperature,
                                   max_tokens=max_tokens, seed=seed,
                                   split_reasoning=split_reasoning)
        for piece in pieces:
            if split_reasoning and (piece.text or piece.reasoning):
                yield piece
            elif piece.text and not split_reasoning:
                yield piece.text

    def generate(self, *, messages: list[dict] | None = None, prompt: str | None = None,
                 temperature: float = 0.7, max_tokens: int = 256, seed: int | None = None,
                 sequence=None, mix: tuple | None = None, template_kwargs: dict | None = None,
                 split_reasoning: bool = False, **sampling) -> Iterator[Piece]:
        """The one generation path for the CLI and the server: a chat (``messages``, rendered
        with :attr:`chat_template`) or a plain text completion (``prompt``), streamed as pieces.

        With :attr:`prompt_cache` the KV entries of the longest common prefix with the
        previous prompt under the same adapter set are reused (llama-cpp-python's
        ``Llama.generate``), the previous answer's included, so turn N of a conversation
        evaluates only its new tokens; otherwise every answer starts from an empty context.
        With ``temperature=0`` the answer is greedy and the same whoever asks, cached prefix
        or not.
        With :attr:`speculative` set, tokens are guessed from the text so far and checked
        several per decode (:mod:`edge_tune.llama.speculative`); the answer is the same.
        The last piece carries ``finish_reason`` ("stop" or "length")
        and token counts. ``sampling``: top_p, stop, presence/frequency_penalty... as
        llama-cpp-python names them. A prompt longer than the context raises
        :class:`ContextOverflow` before any piece; a conversation the template refuses raises
        :class:`ChatTemplateError`, one on a model without a template :class:`NoChatTemplate`.
        ``sequence``: another sequence of the context (the server's batch, from
        :meth:`sequence`) generating under ``mix`` (its adapter set, applied by the
        caller); default: sequence 0 under :attr:`active_mix`.
        ``template_kwargs``: variables for the chat template (``{"enable_thinking": False}``).
        ``split_reasoning``: on a template with think markers
        (:func:`edge_tune.llama.thinking.template_markers`) the pieces' ``text`` is the
        answer and their ``reasoning`` the thinking (``raw``: what the model wrote).
        """
        llm = self.llm if sequence is None else sequence
        first = (mix[0][0] if mix else None) if sequence is not None else self.active
        if messages is not None:
            template = self.template_of(first)
            if template is None:
                raise NoChatTemplate(f"{self.base_path.name} has no chat template; "
                                     "give --chat-template NAME|FILE, or ask for a plain text "
                                     "completion")
            prompts: list[str] = []  # the rendered prompt, once the handler ran
            llm.chat_handler = self._call_handler(template, template_kwargs, prompts)
            default = self.system_of(first)
            if default and not any(m.get("role") == "system" for m in messages):
                messages = [{"role": "system", "content": default}, *messages]
            if self._fold.get(first, self._fold[None]):
                from edge_tune.data.template import fold_system

                messages = fold_system(messages)
        if not self.prompt_cache:
            llm.reset()
        counter = _TokenCounter(llm.vocab, max_tokens if max_tokens and max_tokens > 0
                                else None)
        kw = dict(temperature=temperature, max_tokens=max_tokens, stream=True, seed=seed,
                  **sampling)
        splitter = None
        # an exact engine's decoded rows differ from block rows (batch_rows): no drafts
        draft = None if self._exact or self.speculative is None else \
            self.speculative.drafter(getattr(llm.decoder, "crowd", None))
        try:
            with llm.answering(counter, MIN_NEW_TOKENS if self.prompt_cache else 0, draft):
                if messages is not None:
                    stream = llm.create_chat_completion(messages=messages, **kw)
                    chunks = ((c["choices"][0]["delta"].get("content") or "",
                               c["choices"][0].get("finish_reason")) for c in stream)
                    splitter = _splitter(template, prompts) if split_reasoning else None
                else:
                    stream = llm.create_completion(prompt=prompt or "", **kw)
                    chunks = ((c["choices"][0].get("text") or "",
                               c["choices"][0].get("finish_reason")) for c in stream)
                for text, finish in _overflow_as_error(chunks, llm.sequence_tokens):
                    if finish and counter.cut:
                        finish = "length"
                    if splitter is not None:
                        yield from _split(splitter, text, finish, counter)
                    elif text or finish:
                        yield Piece(text, finish, counter.prompt_tokens,
                                    counter.completion_tokens, counter.cached_tokens,
                                    last_token=counter.last if finish else None)
        finally:
            if draft is not None:
                with self._stats_lock:
                    for name in self.draft_stats:
                        self.draft_stats[name] += getattr(draft, name)
            if self.prompt_cache and self._exact and counter.prompt_tokens:
                # an exact engine (F32 KV cache, flash attention off) computes a decoded
                # row's attention with other kernels than a block's (batch_rows), so reusing
                # the answer's entries could change the next turn's answer: keep the
                # prompt's only, the answer goes with the next prompt
                llm.keep_only(counter.prompt_tokens)

    def chat(self, messages: list[dict], **kw) -> str:
        return "".join(self.chat_stream(messages, **kw))

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """Token ids of ``text`` (no BOS added); ``special``: special tokens' texts are
        parsed as those tokens."""
        return self.llm.tokenize(text.encode(), add_bos=False, special=special)

    @property
    def n_vocab(self) -> int:
        """Tokens in the model's vocabulary (the width of a logits row)."""
        return self.llm.n_vocab()

    def token_bytes(self, token: int, special: bool) -> bytes:
        """A token's bytes as llama.cpp writes them into text (``llama_token_to_piece``, no
        leading-space stripping); ``special``: control tokens spelled out, else empty."""
        import llama_cpp

        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(self.llm.vocab, token, buf, size, 0, special)
            if n >= 0:
                return buf.raw[:n]
            size = -n

    def grammar(self, gbnf: str):
        """``gbnf`` (GBNF text, root rule ``root``) as a grammar for the ``grammar`` sampling
        argument of :meth:`generate`. Raises :class:`~edge_tune.llama.gbnf.GrammarRefused`
        when llama.cpp cannot parse it against this model's vocabulary."""
        from edge_tune.llama.gbnf import compile_grammar

        return compile_grammar(gbnf, self.llm.vocab)

    def greedy_ids(self, prompt_ids: list[int], max_new: int) -> list[int]:
        """At most ``max_new`` greedy token ids after ``prompt_ids`` (evaluated from an empty
        context, under the active adapters), up to the end-of-sequence token (left out)."""
        ids: list[int] = []
        self.llm.reset()
        for t in self.llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True):
            if t == self.llm.token_eos() or len(ids) >= max_new:
                break
            ids.append(t)
        return ids

    # --- the context's sequences (the server's batcher) -----------------------------------
    @property
    def batch(self):
        """The context's :class:`~edge_tune.llama.batch_rows.Batch`: its decodes, its
        ``streams`` (sequence ids) and row counts."""
        return self.llm.batch

    def sequence(self, seq_id: int, decoder):
        """Sequence ``seq_id`` of the context, decoding through ``decoder`` (a callable
        ``(sequence, tokens) -> index of the last row's logits``, with a ``sample_lock``), to
        pass as :meth:`generate`'s ``sequence``."""
        return self.llm.view(seq_id, decoder)

    def logits(self, tokens: list[int]):
        """Per-position logits (needs ``logits_all=True``), as a numpy array (n, vocab)."""
        self.llm.reset()
        self.llm.eval(tokens)
        return self.llm.scores[: len(tokens)].copy()

    def side(self, kind: str):
        """The side context ``kind`` on this model, made at first use
        (:mod:`edge_tune.llama.side`): "score", a :class:`~edge_tune.llama.side.Scorer`
        (one sequence's ``n_ctx``, the engine's KV-cache settings); "embed", an
        :class:`~edge_tune.llama.side.Embedder` (at most 2048 tokens an input, pooling as
        the GGUF declares, mean where it declares none; EdgeTuneError for a reranker's
        "rank" pooling). Not thread-safe to create: the server makes them from its event
        loop only."""
        made = self._sides.get(kind)
        if made is not None:
            return made
        from edge_tune.llama import side

        n_ctx = self.llm.sequence_tokens
        if kind == "score":
            from edge_tune.llama.batch_rows import kv_cache_params

            with quiet_stderr():
                made = side.Scorer(self.llm.model, n_ctx, self._threads,
                                   kv_cache_params(self._exact))
        elif kind == "embed":
            arch = self.llm.metadata.get("general.architecture", "")
            declared = self.llm.metadata.get(f"{arch}.pooling_type", "0")
            pooling = int(declared) if str(declared).isdigit() else 0
            if pooling == 4:
                raise UsageError(f"{self.base_path.name} is a reranker (rank pooling): it "
                                 "gives scores, not embeddings")
            with quiet_stderr():
                made = side.Embedder(self.llm.model, min(n_ctx, 2048), self._threads,
                                     pooling or 1)
        else:
            raise ValueError(f"no side context {kind!r}")
        self._sides[kind] = made
        return made

    def prompt_logprobs(self, prompt, mix=(), top: int = 0,
                        after: bool = False) -> tuple[list, list]:
        """(ids, scored) of ``prompt`` read as a text completion reads it (special tokens
        parsed; a list: token ids, as they are): ``ids`` its tokens (a BOS the model adds to
        a text left out), ``scored[i]`` =
        (natural-log probability of ``ids[i]`` given everything before it, the ``top``
        likeliest tokens there as [(id, logprob)], best first), or None for a first token
        that nothing precedes; under ``mix`` (``[(name, scale), ...]``), computed on the
        "score" side context (:meth:`side`), equal to :meth:`logits`' log-softmax; with
        ``after``, one entry more, for the likeliest token after the prompt
        (:meth:`Scorer.score <edge_tune.llama.side.Scorer.score>`). Raises
        :class:`~edge_tune.llama.side.InputTooLong` past one sequence's context."""
        if isinstance(prompt, str):
            ids = self.llm.tokenize(prompt.encode(), add_bos=True, special=True)
            plain = self.llm.tokenize(prompt.encode(), add_bos=False, special=True)
            lead = len(ids) - len(plain)  # BOS (and the like) added by the vocabulary
        else:
            ids, lead = list(prompt), 0
        scorer = self.side("score")
        with scorer.lock:  # no adapter of the mix is freed until it is done
            adapters, scales = self.adapter_pointers(mix)
            scored = scorer.score(ids, adapters, scales, top, after)
        return ids[lead:], ([None] if lead == 0 else []) + scored[max(lead - 1, 0):]

    def embed(self, inputs: list) -> tuple[list[list[float]], int]:
        """(one unit-length vector per input, tokens read) from the base model alone, on the
        "embed" side context (:meth:`side`); an input is a string (tokenized as the model
        says, BOS included, special-token texts left as text) or a list of token ids.
        Raises :class:`~edge_tune.llama.side.InputTooLong` for an input past its context."""
        made = self.side("embed")
        vectors, used = [], 0
        for item in inputs:
            ids = self.llm.tokenize(item.encode(), add_bos=True, special=False) \
                if isinstance(item, str) else list(item)
            used += len(ids)
            vectors.append(made.embed(ids))
        return vectors, used

    def adapter_pointers(self, mix) -> tuple[list, list[float]]:
        """(``llama_adapter_lora`` pointers, scales) of ``mix`` (``[(name, scale), ...]``),
        for a side context. Raises EdgeTuneError for an adapter not loaded."""
        for name, _ in mix:
            if name not in self._adapters:
                raise UsageError(f"adapter {name!r} is not loaded")
        return [self._adapters[n] for n, _ in mix], [float(s) for _, s in mix]

    def close(self) -> None:
        import llama_cpp

        for made in self._sides.values():  # before the model they run on
            with contextlib.suppress(Exception):
                made.close()
        self._sides.clear()
        with contextlib.suppress(Exception):
            llama_cpp.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
        with contextlib.suppress(Exception):
            self.llm.batch.close()
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
