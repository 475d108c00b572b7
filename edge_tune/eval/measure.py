"""What ``eval`` measures on one llama.cpp engine: the summed negative log-likelihood of a
tokenized example (the causal shift training uses; ``IGNORE`` labels carry no loss) and the
greedy answer to a conversation. A :class:`Side` is one model to evaluate: an engine and the
adapter to activate on it. numpy and the engine's errors are imported inside the functions."""

from __future__ import annotations

from typing import Optional

IGNORE = -100  # edge_tune.data.template.IGNORE: no loss on this position


class Side:
    """One model to evaluate: an engine and the adapter to activate on it (None: none)."""

    def __init__(self, engine, adapter: Optional[str]) -> None:
        self.engine, self.adapter = engine, adapter

    def use(self):
        if self.engine.active != self.adapter:
            self.engine.activate(self.adapter)
        return self.engine


def log_softmax(rows):
    import numpy as np

    rows = rows.astype(np.float64)
    rows = rows - rows.max(-1, keepdims=True)
    return rows - np.log(np.exp(rows).sum(-1, keepdims=True))


def example_nll(engine, input_ids: list[int], labels: list[int]) -> tuple[float, int]:
    """(summed NLL in nats, tokens) of one example: position ``t``'s label is predicted from
    the logits at ``t-1`` (the causal shift training uses)."""
    import numpy as np

    targets = [t for t in range(1, len(input_ids)) if labels[t] != IGNORE]
    if not targets:
        return 0.0, 0
    logits = engine.logits(input_ids)
    logp = log_softmax(logits[[t - 1 for t in targets]])
    picked = logp[np.arange(len(targets)), [input_ids[t] for t in targets]]
    return float(-picked.sum()), len(targets)


def greedy(engine, messages: list, max_tokens: int) -> Optional[str]:
    """The greedy answer, or None when the prompt does not fit or the template refuses it."""
    from edge_tune.llama.engine import ChatTemplateError, ContextOverflow

    try:
        return engine.chat(messages, temperature=0.0, max_tokens=max_tokens).strip()
    except (ContextOverflow, ChatTemplateError):
        return None
