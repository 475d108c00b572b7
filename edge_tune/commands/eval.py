"""``eval``: did the fine-tune get better at its task, and did it break anything else?

Measured on what ships — the GGUF base and the run's ``adapter.gguf`` (or a merged GGUF) in
llama.cpp — for the base and the tuned model side by side:

1. **Held-out loss and perplexity**: the mean negative log-likelihood (natural log) per trained
   token of held-out examples, and ``exp`` of it. The examples are tokenized exactly as
   training tokenized its validation data (:func:`edge_tune.training.worker.tokenize_records`
   with the run's tokenizer, chat template, ``seq_len``, ``train_on``, ``overflow`` and
   ``system_mode``), so "trained token" means the same tokens training took its loss on; the
   logits are llama.cpp's (``logits_all``) on those token ids.
2. **Generated answers**: for every held-out conversation, the greedy answer (temperature 0,
   at most ``max_tokens``) to the conversation up to its last trained assistant turn, rendered
   with the run's chat template and stop tokens as ``chat`` renders it, scored against that
   turn's text by :mod:`edge_tune.eval.scores` (exact, contains, ROUGE-L, valid JSON).
3. **Drift**: on a small set of general prompts shipped with edge-tune
   (``assets/drift_prompts.jsonl``), how far the tuned model moved from the base where the
   fine-tune should not have changed it. For each prompt the base's own greedy answer
   ``y = y_1..y_n`` is taken, and at every answer position ``t`` the next-token distributions
   of both models given the prompt and ``y_<t`` are compared:
   ``KL(base ‖ tuned) = Σ_v p_base(v) (log p_base(v) − log p_tuned(v))`` (nats). ``mean_kl`` is
   the mean over all answer positions of all prompts (0: unchanged; it grows without bound as
   the tuned model stops expecting what the base says). ``changed_share`` is the share of
   prompts whose greedy answer (normalized text) differs between the two models;
   ``changed_beyond_ties`` leaves out those that part at a near-tie of the base
   (:func:`edge_tune.eval.drift.divergence_gap`).

Held-out data: ``data`` when given, else the run's validation file (``--val``), else the same
seeded ``--val-split`` share training held back. A run that held nothing back needs ``data``
(its training data would measure memorization, not generalization).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from edge_tune.errors import DataError, UsageError
from edge_tune.eval import scores as eval_scores
from edge_tune.eval.drift import drift, drift_hint, drift_prompts, task_like
from edge_tune.eval.held_out import (generation_items, held_out_examples, held_out_records,
                                     run_tokenizer)
from edge_tune.eval.measure import Side, example_nll, greedy
from edge_tune.eval.rewards import evaluate_rewards
from edge_tune.events import Done, EventSink, Log, Progress, ignore

DEFAULT_PROMPTS = 32  # held-out records used (loss and answers)
DEFAULT_MAX_TOKENS = 64  # per generated answer


@dataclass
class EvalResult:
    """What ``edge-tune eval`` measured. Losses are mean negative log-likelihoods per trained
    token (nats); scores are means in [0, 1] (None: no answer it applies to); ``answers`` holds
    one row per scored record: prompt, reference, both answers and their scores."""
    run: str
    base: str  # the base GGUF
    tuned: str  # the adapter GGUF, or the merged GGUF
    data: str  # where the held-out examples came from
    n_records: int
    n_examples: int
    n_tokens: int  # trained tokens the loss is over
    loss: dict  # {"base": float, "tuned": float}
    perplexity: dict  # {"base": float, "tuned": float}
    scores: dict  # {"base": {score: mean}, "tuned": {...}}
    n_answers: int
    max_tokens: int
    drift: dict  # mean_kl, changed_share, changed_beyond_ties, tie_margin, n_prompts,
    # n_positions, prompts: [...]
    # the validation loss training measured (torch, every held-out example; None with --data)
    training_val_loss: Optional[float] = None
    answers: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# --- the command ----------------------------------------------------------------------------

def evaluate(run: Path, data: Optional[Path] = None, merged: Optional[Path] = None,
             max_tokens: int = DEFAULT_MAX_TOKENS, n_prompts: int = DEFAULT_PROMPTS,
             on_event: EventSink = ignore,
             drift_set: Optional[list[str]] = None) -> EvalResult:
    """Evaluate a run's tuned model against its base in llama.cpp (see the module docstring).

    ``run``: a run directory (or its ``adapter.gguf``); ``merged``: evaluate this merged GGUF
    as the tuned model instead of base + adapter; ``data``: held-out examples (any format
    ``train`` reads) instead of the run's validation data; ``n_prompts``: at most this many
    held-out records; ``max_tokens``: per generated answer; ``drift_set``: general prompts
    for the drift check instead of the shipped ones (:func:`drift_prompts`). Raises
    UsageError/DataError (exit 2) for bad input."""
    from edge_tune.adapters import open_engine, tuned_target

    if max_tokens < 1:
        raise UsageError("expected an integer >= 1",
                         setting="max_tokens", value=max_tokens)
    if n_prompts < 1:
        raise UsageError("expected an integer >= 1",
                         setting="prompts", value=n_prompts)
    target, tuned_path = tuned_target(Path(run), merged)
    merged = tuned_path if target.adapter is None else merged  # a full run's model too
    man = target.manifest
    hp = man.hyperparameters.to_dict()
    if hp.get("method") == "grpo":  # its rewards, base vs tuned
        return evaluate_rewards(target, tuned_path, data, max_tokens, n_prompts, on_event,
                                run)
    records, source = held_out_records(man, data)
    records = records[:n_prompts]
    if not records:
        raise DataError(f"{source}: no held-out records")
    on_event(Log(f"eval: {len(records)} held-out records from {source}"))
    tok = run_tokenizer(man, Path(target.base))
    system_mode = target.system_mode
    seq_len = int(hp.get("seq_len") or 512)
    examples = held_out_examples(records, tok, hp, system_mode, on_event)
    if not examples:
        raise DataError(f"{source}: no held-out example has a trained token within "
                        f"seq_len={seq_len}")
    items = generation_items(records)
    n_ctx = max([len(e.input_ids) for e in examples] + [256]) + max_tokens + 64
    engines = []
    try:
        engines.append(open_engine(target, n_ctx=n_ctx, logits_all=True,
                                   training_system=False))  # prompts as they are
        base = Side(engines[0], None)
        if merged is None:
            tuned = Side(engines[0], "adapter")
        else:
            engines.append(open_engine(_with_base(target, tuned_path), n_ctx=n_ctx,
                                       training_system=False,
                                       logits_all=True))
            if engines[1].n_vocab != engines[0].n_vocab:
                raise UsageError(f"its vocabulary ({engines[1].n_vocab}"
                                 f" tokens) is not the base's ({engines[0].n_vocab})",
                                 setting="merged", value=merged)
            tuned = Side(engines[1], None)
        result = _measure(base, tuned, tok, examples, items, max_tokens, system_mode, on_event,
                          drift_prompts() if drift_set is None else drift_set)
    finally:
        for engine in engines:
            engine.close()
    loss = {k: v[0] / v[1] if v[1] else float("nan") for k, v in result["nll"].items()}
    # the report carries them (the hint is shown under the drift line by the CLI and the TUI)
    result["drift"]["task_like"] = task_like(result["drift"]["prompts"],
                                             [item.reference for item in items])
    result["drift"]["hint"] = drift_hint(result["drift"], int(hp.get("replay") or 0))
    out = EvalResult(
        run=str(run), base=str(target.base), tuned=str(tuned_path), data=source,
        n_records=len(records), n_examples=len(examples),
        n_tokens=result["nll"]["base"][1], loss=loss,
        perplexity={k: eval_scores.perplexity(v) for k, v in loss.items()},
        scores={k: eval_scores.mean_scores(v) for k, v in result["scores"].items()},
        n_answers=len(result["answers"]), max_tokens=max_tokens, drift=result["drift"],
        training_val_loss=man.result.val_loss if data is None else None,
        answers=result["answers"])
    on_event(Done("eval", {"loss": out.loss, "drift_kl": out.drift["mean_kl"]}))
    return out


def _with_base(target, model: Path):
    """``target`` with ``model`` as the GGUF llama.cpp loads and no adapter."""
    from dataclasses import replace

    return replace(target, base=Path(model), adapter=None)


def _measure(base: Side, tuned: Side, tok, examples: list, items: list, max_tokens: int,
             system_mode: str, on_event: EventSink, general: list[str]) -> dict:
    """Loss, answers and drift for both sides (each side's work in one block: switching the
    adapter resets llama.cpp's context)."""
    nll, answers = {}, {}
    total = 2 * (len(examples) + len(items))
    done = 0
    for name, side in (("base", base), ("tuned", tuned)):
        engine = side.use()
        s, n = 0.0, 0
        for ex in examples:
            on_event(Progress("eval", done, total, "", f"eval: {name} loss"))
            a, b = example_nll(engine, ex.input_ids, ex.labels)
            s, n, done = s + a, n + b, done + 1
        nll[name] = (s, n)
        answers[name] = []
        for item in items:
            on_event(Progress("eval", done, total, "", f"eval: {name} answers"))
            answers[name].append(greedy(engine, item.prompt, max_tokens))
            done += 1
    on_event(Progress("eval", total, total, "", "eval: scored"))
    rows, scores = [], {"base": [], "tuned": []}
    for item, a_base, a_tuned in zip(items, answers["base"], answers["tuned"]):
        if a_base is None or a_tuned is None:
            continue
        s_base = eval_scores.score_answer(a_base, item.reference)
        s_tuned = eval_scores.score_answer(a_tuned, item.reference)
        scores["base"].append(s_base)
        scores["tuned"].append(s_tuned)
        rows.append({"prompt": item.prompt[-1]["content"] if item.prompt else "",
                     "reference": item.reference, "base": a_base, "tuned": a_tuned,
                     "base_scores": s_base.to_dict(), "tuned_scores": s_tuned.to_dict()})
    skipped = len(items) - len(rows)
    if skipped:
        on_event(Log(f"eval: {skipped} of {len(items)} held-out prompts were not answered (longer "
                     "than the context, or refused by the chat template)", "warning"))
    drift_result = drift(base, tuned, tok, general, max_tokens, system_mode, on_event)
    return {"nll": nll, "scores": scores, "answers": rows, "drift": drift_result}


# --- eval --tasks: lm-evaluation-harness tasks ------------------------------------------------

TASKS_CTX = 2048  # tokens one scored sequence may hold (lm-eval left-truncates past it)


@dataclass
class TasksResult:
    """What ``edge-tune eval --tasks`` measured: ``tasks[name] = {"n": examples,
    "base": {metric: value}, "tuned": {...}, "stderr": {"base": {...}, "tuned": {...}},
    "higher_is_better": {metric: bool | None}}`` (lm-eval's own metric names, e.g. ``acc``)."""
    run: str
    base: str
    tuned: str
    source: str  # the task file or folder
    limit: Optional[int]
    tasks: dict

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_tasks(run: Path, tasks: Path, merged: Optional[Path] = None,
                   limit: Optional[int] = None, on_event: EventSink = ignore) -> TasksResult:
    """Run lm-evaluation-harness tasks (``tasks``: a task YAML or a folder of them, local
    data; :mod:`edge_tune.eval.lm_tasks`) on the run's base and tuned model in llama.cpp;
    ``merged``: the tuned model is this merged GGUF; ``limit``: at most this many examples a
    task. Raises UsageError/DataError (exit 2) for bad input, UsageError when lm-eval is
    not installed."""
    from edge_tune.adapters import open_engine, tuned_target
    from edge_tune.eval.lm_tasks import load_tasks, run_tasks

    if limit is not None and limit < 1:
        raise UsageError(f"--limit {limit}: expected an integer >= 1")
    configs = load_tasks(Path(tasks))
    target, tuned_path = tuned_target(Path(run), merged)
    on_event(Log(f"eval: {len(configs)} lm-eval task(s) from {tasks}: "
                 + ", ".join(c["task"] for c in configs)))
    engines = [open_engine(target, n_ctx=TASKS_CTX, training_system=False)]
    try:
        sides = [("base", engines[0], ())]
        if target.adapter is not None:
            sides.append(("tuned", engines[0], (("adapter", 1.0),)))
        else:
            engines.append(open_engine(_with_base(target, tuned_path), n_ctx=TASKS_CTX,
                                       training_system=False))
            sides.append(("tuned", engines[1], ()))
        got = {}
        for i, (name, engine, mix) in enumerate(sides):
            on_event(Progress("eval", i, len(sides), "", f"eval: {name} on the tasks"))
            got[name] = run_tasks(engine, mix, configs, limit)
        on_event(Progress("eval", len(sides), len(sides), "", "eval: scored"))
    finally:
        for engine in engines:
            engine.close()
    table = {}
    for task, b in got["base"].items():
        t = got["tuned"].get(task, {"metrics": {}, "stderr": {}})
        table[task] = {"n": b["n"], "base": b["metrics"], "tuned": t["metrics"],
                       "stderr": {"base": b["stderr"], "tuned": t["stderr"]},
                       "higher_is_better": b["higher_is_better"]}
    out = TasksResult(run=str(run), base=str(target.base), tuned=str(tuned_path),
                      source=str(tasks), limit=limit, tasks=table)
    on_event(Done("eval", {"tasks": {k: v["tuned"] for k, v in table.items()}}))
    return out
