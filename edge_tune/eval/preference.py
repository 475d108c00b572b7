"""Did preference tuning move the model the right way? The chosen-minus-rejected margin of
held-out preference pairs, base vs tuned, measured in llama.cpp on what ships.

For each pair the margin is ``log P(chosen answer | prompt) − log P(rejected answer | prompt)``
(nats, summed over the answer tokens, end of turn included: the tokens training labels). The
base is the run's GGUF base, the tuned model the base with the run's ``adapter.gguf``, in one
llama.cpp engine with the adapter switched on and off. llama_cpp and transformers are imported
inside the functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_tune.errors import DataError


@dataclass
class Margins:
    """Per-pair margins in nats (``base[i]`` and ``tuned[i]`` are the same pair)."""
    base: list[float]
    tuned: list[float]

    @staticmethod
    def _mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    @property
    def base_mean(self) -> float:
        return self._mean(self.base)

    @property
    def tuned_mean(self) -> float:
        return self._mean(self.tuned)

    @property
    def tuned_accuracy(self) -> float:
        """Share of pairs where the tuned model gives the chosen answer the higher log-prob."""
        return self._mean([float(m > 0) for m in self.tuned])

    @property
    def improved(self) -> float:
        """Share of pairs whose margin grew from base to tuned."""
        return self._mean([float(t > b) for b, t in zip(self.base, self.tuned)])


def preference_margins(run: Path, data: Path, limit: int = 0) -> Margins:
    """Margins of the preference pairs in ``data`` (at most ``limit``; 0 = all) for the run's
    base and tuned model. Raises DataError when ``data`` holds no preference pairs."""
    from edge_tune import manifest as manifest_mod
    from edge_tune.adapters import open_engine, resolve_chat
    from edge_tune.training.worker import tokenize_records
    from edge_tune.data.formats import job_record, read_records
    from edge_tune.data.preference import PREFERENCE_FORMATS
    from edge_tune.eval.held_out import run_tokenizer
    from edge_tune.eval.measure import example_nll

    read = read_records(data)
    if read.format not in PREFERENCE_FORMATS:
        raise DataError(f"{data}: expected preference pairs (prompt/chosen/rejected), got "
                        f"{read.format} records")
    records = read.records[:limit or None]
    man = manifest_mod.read(Path(run))
    target = resolve_chat(Path(run), None)
    tok = run_tokenizer(man, Path(target.base))
    pairs = tokenize_records(tok, [job_record(r) for r in records], 1 << 20, lambda e: None,
                             "held-out", system_mode=target.system_mode)
    n_ctx = max(max(p.longest for p in pairs) + 16, 256)
    engine = open_engine(target, n_ctx=n_ctx, logits_all=True, training_system=False)
    out = Margins([], [])
    try:
        for adapter, into in ((None, out.base), ("adapter", out.tuned)):
            engine.activate(adapter)
            for p in pairs:
                chosen = example_nll(engine, p.input_ids, p.labels)[0]
                rejected = example_nll(engine, p.rejected_ids, p.rejected_labels)[0]
                into.append(rejected - chosen)  # NLLs: log P(chosen) − log P(rejected)
    finally:
        engine.close()
    return out
