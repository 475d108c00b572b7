"""GRPO's rollouts in llama.cpp: many completions sampled at once on one loaded base, with
the log-probability of every sampled token, under an adapter replaced in place each step.

Why a loop of its own rather than llama-cpp-python's ``generate``: GRPO needs the sampler's
log-probability of each token at the sampling temperature (for the importance-sampling
correction of the trainer/sampler gap) and plain ancestral sampling (no top-k / top-p /
min-p: TRL samples from the whole distribution). All sequences step together, one token each
per ``llama_decode`` (:class:`~edge_tune.llama.batch_rows.Batch`), so G completions of a
prompt cost about one decode each step, not G.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from edge_tune.errors import ContextOverflow


@dataclass
class Sample:
    """One completion: ``prompt`` (its index in the prompts given), ``ids`` (sampled tokens,
    the stop token included when one ended it), ``logps`` (the sampler's log-probability of
    each, natural log, at the temperature), ``stopped`` (ended by a stop token rather than
    the length limit)."""

    prompt: int
    ids: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    stopped: bool = False


class Rollouts:
    """A llama.cpp context on ``base_gguf`` holding ``parallel`` sequences of ``n_ctx`` tokens
    each, sampling with or without the current adapter. ``threads``: llama.cpp's CPU
    threads (None: the engine's default). The KV cache is F32 and the adapter loaded as
    written (``Engine(exact=True)``): the rollouts differ from the trainer only by the base's
    quantization."""

    def __init__(self, base_gguf: Path, n_ctx: int, parallel: int,
                 threads: Optional[int] = None, seed: int = 0) -> None:
        import numpy as np

        from edge_tune.llama.engine import Engine

        self.engine = Engine(Path(base_gguf), n_ctx=n_ctx, threads=threads, exact=True,
                             parallel=parallel, prompt_cache=False, seed=seed)
        self.parallel = parallel
        self.n_ctx = n_ctx
        self.rng = np.random.default_rng(seed)
        self.adapter: Optional[str] = None
        self._loads = 0

    @property
    def base(self):
        """The base's :class:`~edge_tune.converters.formats.base_info.BaseInfo` (what an
        adapter GGUF is converted against)."""
        return self.engine.base

    def use_adapter(self, path: Optional[Path]) -> None:
        """Sample under the adapter GGUF ``path`` from now on (None: the base alone); the
        previous adapter is unloaded. The base stays loaded."""
        old = self.adapter
        self.adapter = None
        if path is not None:
            self._loads += 1
            self.adapter = self.engine.add_adapter(Path(path), name=f"rollout-{self._loads}")
        self.engine.activate(self.adapter)
        if old is not None:
            self.engine.remove_adapter(old)

    def sample(self, prompts: list[list[int]], n: int, max_new: int, temperature: float,
               stop_ids: set[int]) -> list[Sample]:
        """``n`` completions of each prompt (token ids, rendered for generation), at most
        ``max_new`` tokens each, sampled at ``temperature`` from the whole distribution;
        ``n`` consecutive samples per prompt, in prompt order. Raises EdgeTuneError when
        there are more sequences than the context holds or a prompt leaves no room."""
        from edge_tune.llama.batch_rows import Rows, chunks

        total = len(prompts) * n
        if total > self.parallel:
            raise RuntimeError(f"internal: {total} rollouts for a context of "
                               f"{self.parallel} sequences")
        samples = [Sample(i // n) for i in range(total)]
        batch = self.engine.batch
        lengths = [len(p) for p in prompts]
        if max(lengths) + max_new > self.n_ctx:
            raise ContextOverflow(f"a prompt of {max(lengths)} tokens leaves no room for "
                                  f"{max_new} new tokens in {self.n_ctx}")
        for seq, s in enumerate(samples):  # each prompt's tokens, once per sequence
            last = None
            for offset, part in chunks(prompts[s.prompt]):
                last = Rows(seq, offset, part)
                batch.decode([last])
            self._draw(s, last.first + len(last.tokens) - 1, temperature, stop_ids)
        while True:
            live = [seq for seq, s in enumerate(samples)
                    if not s.stopped and len(s.ids) < max_new]
            if not live:
                return samples
            entries = [Rows(seq, lengths[samples[seq].prompt] + len(samples[seq].ids) - 1,
                            [samples[seq].ids[-1]]) for seq in live]
            batch.decode(entries)
            for seq, e in zip(live, entries):
                self._draw(samples[seq], e.first, temperature, stop_ids)

    def _draw(self, s: Sample, row: int, temperature: float, stop_ids: set[int]) -> None:
        """Sample the next token of ``s`` from the logits of batch row ``row``."""
        import llama_cpp
        import numpy as np

        ptr = llama_cpp.llama_get_logits_ith(self.engine.llm.ctx, row)
        logits = np.ctypeslib.as_array(ptr, shape=(self.engine.n_vocab,)).astype(np.float64)
        x = logits / max(temperature, 1e-6)
        x -= x.max()
        p = np.exp(x)
        z = p.sum()
        token = int(np.searchsorted(np.cumsum(p), self.rng.random() * z, side="right"))
        token = min(token, len(p) - 1)
        s.ids.append(token)
        s.logps.append(float(x[token] - np.log(z)))
        s.stopped = token in stop_ids

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "Rollouts":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
