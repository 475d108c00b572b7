"""Drift: how far the tuned model moved from the base where the fine-tune should not have
changed it, on a small set of general prompts shipped with edge-tune
(``assets/drift_prompts.jsonl``). For each prompt the base's own greedy answer
``y = y_1..y_n`` is taken, and at every answer position ``t`` the next-token distributions of
both models given the prompt and ``y_<t`` are compared:
``KL(base ‖ tuned) = Σ_v p_base(v) (log p_base(v) − log p_tuned(v))`` (nats). ``mean_kl`` is the
mean over all answer positions of all prompts (0: unchanged; it grows without bound as the
tuned model stops expecting what the base says). ``changed_share`` is the share of prompts
whose greedy answer (normalized text) differs between the two models. ``changed_beyond_ties``
counts only the changed answers that part where the base was decided: at the first token where
the tuned answer leaves the base's, the base preferred its own token by more than TIE_MARGIN
nats (:func:`divergence_gap`); the others are ``changed_at_tie``, the flips any adapter at all
causes in llama.cpp (docs/eval.md, "Forgetting"). :func:`drift_hint` says what to do when
drift is high.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Optional

from edge_tune.eval import scores as eval_scores
from edge_tune.eval.measure import Side, greedy, log_softmax
from edge_tune.events import EventSink, Progress, ignore

# Drift this high gets a hint (docs/eval.md, "Forgetting"). The changed share cannot say it:
# on a small model every setting measured changed 19-20 of 20 greedy answers. What can: the
# share of general prompts answered like the task (TASK_LIKE), or the mean KL.
TASK_LIKE_ROUGE = 0.5  # a general answer this close (ROUGE-L F) to a held-out reference
HIGH_TASK_LIKE_SHARE = 0.25
HIGH_MEAN_KL = 0.5  # nats/token
REPLAY_HINT = 40  # the --replay the hint suggests
# A changed answer counts as changed beyond ties only when, at the first token where it leaves
# the base's answer, the base's log-probability of its own token exceeds that of the tuned
# model's token by more than this (nats; in one row, the difference of the two logits).
# Measured (docs/eval.md, "Forgetting"): four adapters at a ten-thousandth of their strength,
# whose answers part only through llama.cpp's rounding, changed 55 of 80 answers, all at gaps
# of at most 0.39 (greedy decoding and eval's one-pass logits round differently, so a flip
# shows up to ~0.4 nats from a tie); full-strength takeovers part at 5-19 nats.
TIE_MARGIN = 0.5


def drift_prompts() -> list[str]:
    """The general prompts shipped with edge-tune for the drift check."""
    text = (resources.files("edge_tune") / "assets" / "drift_prompts.jsonl").read_text()
    return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]


def _mean_kl(base_rows, tuned_rows) -> list[float]:
    """KL(base ‖ tuned) in nats at each row (next-token logits of the two models)."""
    import numpy as np

    lp, lq = log_softmax(base_rows), log_softmax(tuned_rows)
    return np.sum(np.exp(lp) * (lp - lq), axis=-1).tolist()


def divergence_gap(base_logp, base_ids: list[int], tuned_ids: list[int],
                   end_id: Optional[int] = None) -> Optional[float]:
    """How decided the base was where the tuned answer leaves it: at the first position ``t``
    where the two answers' tokens differ, the base's log-probability of its own token minus
    that of the tuned model's token, in nats (about 0 at a near-tie; negative where the
    retokenized base token was not the base's top choice).

    ``base_logp``: the base's next-token log-probabilities along its own answer, shape
    (len(base_ids) + 1, vocab): row ``t`` predicts ``base_ids[t]``, the last row what follows
    the answer (the base's own token there: that row's top one, its end of turn when it
    stopped). A tuned answer that stops where the base goes on has ``end_id`` (the end-of-turn
    token) as its token there. None when the answers' tokens are the same, or the tuned one
    stops early and ``end_id`` is None."""
    for t, (b, q) in enumerate(zip(base_ids, tuned_ids)):
        if b != q:
            return float(base_logp[t, b] - base_logp[t, q])
    n = len(base_ids)
    if len(tuned_ids) > n:  # the tuned answer goes on where the base's ended
        return float(base_logp[n].max() - base_logp[n, tuned_ids[n]])
    if len(tuned_ids) < n and end_id is not None:  # it ends where the base's goes on
        t = len(tuned_ids)
        return float(base_logp[t, base_ids[t]] - base_logp[t, end_id])
    return None


def changed_at_tie(changed: bool, gap: Optional[float]) -> bool:
    """A changed answer whose first parting token was a near-tie for the base (``gap`` <=
    TIE_MARGIN nats); a part the gap cannot place (None) counts as a real change."""
    return changed and gap is not None and gap <= TIE_MARGIN


def drift(base: Side, tuned: Side, tok, prompts: list[str], max_tokens: int,
          system_mode: str, on_event: EventSink = ignore) -> dict:
    """The drift check (see the module docstring) on ``prompts``."""
    from edge_tune.data.template import fold_system, render

    rows, all_kl = [], []
    for n, prompt in enumerate(prompts):
        on_event(Progress("eval-drift", n, len(prompts), "prompts", "drift: general prompts"))
        msgs = [{"role": "user", "content": prompt}]
        base_answer = greedy(base.use(), msgs, max_tokens)
        tuned_answer = greedy(tuned.use(), msgs, max_tokens)
        if base_answer is None or tuned_answer is None:
            continue
        shown = fold_system(msgs) if system_mode == "fold" else msgs
        prompt_ids = tok(render(tok, shown, True), add_special_tokens=False)["input_ids"]
        answer_ids = tok(base_answer, add_special_tokens=False)["input_ids"]
        changed = eval_scores.normalize(base_answer) != eval_scores.normalize(tuned_answer)
        kl: list[float] = []
        gap = None
        if answer_ids:
            ids = prompt_ids + answer_ids
            at = slice(len(prompt_ids) - 1, len(ids) - 1)  # the rows that predict the answer
            base_all = base.use().logits(ids)
            kl = _mean_kl(base_all[at], tuned.use().logits(ids)[at])
            if changed:  # tokenized as the base's answer is, so the ids line up with the rows
                gap = divergence_gap(log_softmax(base_all[len(prompt_ids) - 1:]), answer_ids,
                                     tok(tuned_answer, add_special_tokens=False)["input_ids"],
                                     getattr(tok, "eos_token_id", None))
        all_kl += kl
        rows.append({"prompt": prompt, "base": base_answer, "tuned": tuned_answer,
                     "changed": changed, "changed_at_tie": changed_at_tie(changed, gap),
                     "divergence_gap": gap,
                     "mean_kl": sum(kl) / len(kl) if kl else 0.0})
    on_event(Progress("eval-drift", len(prompts), len(prompts), "prompts", "drift: done"))
    n = len(rows)
    return {"mean_kl": sum(all_kl) / len(all_kl) if all_kl else 0.0,
            "changed_share": sum(r["changed"] for r in rows) / n if n else 0.0,
            "changed_beyond_ties": sum(r["changed"] and not r["changed_at_tie"]
                                       for r in rows) / n if n else 0.0,
            "tie_margin": TIE_MARGIN,
            "n_prompts": n, "n_positions": len(all_kl), "prompts": rows}


def task_like(rows: list[dict], references: list[str]) -> int:
    """Drift rows whose tuned answer reads like the task: ROUGE-L F >= TASK_LIKE_ROUGE with
    some held-out reference, where the base's answer to the same prompt had none."""
    def near(answer: str) -> bool:
        return any(eval_scores.rouge_l(answer, ref) >= TASK_LIKE_ROUGE for ref in references)

    return sum(near(r["tuned"]) and not near(r["base"]) for r in rows)


def drift_hint(drift_result: dict, replay: int = 0) -> Optional[str]:
    """One line saying what to do when drift is high — ``task_like`` general answers at
    least HIGH_TASK_LIKE_SHARE of the prompts, or ``mean_kl`` >= HIGH_MEAN_KL nats/token —
    naming ``train --replay`` and the other remedies; None when it is not. ``replay``: the
    ``--replay`` the run was trained with."""
    n = drift_result.get("n_prompts", 0)
    like = drift_result.get("task_like", 0)
    if n == 0 or (like < HIGH_TASK_LIKE_SHARE * n and drift_result["mean_kl"] < HIGH_MEAN_KL):
        return None
    switch = (f"retrain with a larger --replay (this run used {replay}; at most 60)" if replay
              else f"retrain with --replay {REPLAY_HINT} (mixes the base's own answers to "
              "general prompts into training)")
    return (f"drift is high ({like} of {n} general prompts answered like the task, mean KL "
            f"{drift_result['mean_kl']:.2f}): if the run should change only its task, "
            f"{switch}, or lower --lr, --epochs, --rank or --target-modules (docs/eval.md, "
            "Forgetting)")
