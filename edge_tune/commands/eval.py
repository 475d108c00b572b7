"""``eval``: did the fine-tune get better at its task, and did it break anything else?

Measured on what ships — the GGUF base and the run's ``adapter.gguf`` (or a merged GGUF) in
llama.cpp — for the base and the tuned model side by side:

1. **Held-out loss and perplexity**: the mean negative log-likelihood (natural log) per trained
   token of held-out examples, and ``exp`` of it. The examples are tokenized exactly as
   training tokenized its validation data (:func:`edge_tune.backends.worker.tokenize_records`
   with the run's tokenizer, chat template, ``seq_len``, ``train_on``, ``overflow`` and
   ``system_mode``), so "trained token" means the same tokens training took its loss on; the
   logits are llama.cpp's (``logits_all``) on those token ids.
2. **Generated answers**: for every held-out conversation, the greedy answer (temperature 0,
   at most ``max_tokens``) to the conversation up to its last trained assistant turn, rendered
   with the run's chat template and stop tokens as ``chat`` renders it, scored against that
   turn's text by :mod:`edge_tune.eval_scores` (exact, contains, ROUGE-L, valid JSON).
3. **Drift**: on a small set of general prompts shipped with edge-tune
   (``assets/drift_prompts.jsonl``), how far the tuned model moved from the base where the
   fine-tune should not have changed it. For each prompt the base's own greedy answer
   ``y = y_1..y_n`` is taken, and at every answer position ``t`` the next-token distributions
   of both models given the prompt and ``y_<t`` are compared:
   ``KL(base ‖ tuned) = Σ_v p_base(v) (log p_base(v) − log p_tuned(v))`` (nats). ``mean_kl`` is
   the mean over all answer positions of all prompts (0: unchanged; it grows without bound as
   the tuned model stops expecting what the base says). ``changed_share`` is the share of
   prompts whose greedy answer (normalized text) differs between the two models.

Held-out data: ``data`` when given, else the run's validation file (``--val``), else the same
seeded ``--val-split`` share training held back. A run that held nothing back needs ``data``
(its training data would measure memorization, not generalization).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Optional

from edge_tune import eval_scores
from edge_tune.errors import DataError, UsageError
from edge_tune.events import Done, EventSink, Log, Progress, ignore

DEFAULT_PROMPTS = 32  # held-out records used (loss and answers)
DEFAULT_MAX_TOKENS = 64  # per generated answer
# Drift this high gets a hint (docs/eval.md, "Forgetting"). The changed share cannot say it:
# on a small model every setting measured changed 19-20 of 20 greedy answers. What can: the
# share of general prompts answered like the task (TASK_LIKE), or the mean KL.
TASK_LIKE_ROUGE = 0.5  # a general answer this close (ROUGE-L F) to a held-out reference
HIGH_TASK_LIKE_SHARE = 0.25
HIGH_MEAN_KL = 0.5  # nats/token
REPLAY_HINT = 40  # the --replay the hint suggests
IGNORE = -100  # edge_tune.data.template.IGNORE: no loss on this position


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
    drift: dict  # mean_kl, changed_share, n_prompts, n_positions, prompts: [...]
    # the validation loss training measured (torch, every held-out example; None with --data)
    training_val_loss: Optional[float] = None
    answers: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# --- inputs ---------------------------------------------------------------------------------

def drift_prompts() -> list[str]:
    """The general prompts shipped with edge-tune for the drift check."""
    text = (resources.files("edge_tune") / "assets" / "drift_prompts.jsonl").read_text()
    return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]


def held_out_records(man, data: Optional[Path]) -> tuple[list, str]:
    """(records, where they came from): ``data``, else the test files of the run's data folder
    (``DIR/test.jsonl``: never trained), else the run's validation file, else its seeded
    validation split. Raises DataError when there is none of them."""
    from edge_tune.data.formats import read_records
    from edge_tune.data.layouts import data_spec
    from edge_tune.data.split import split_validation

    hp, recorded = man.hyperparameters.to_dict(), man.data.to_dict()
    fmt, skip = hp.get("format", "auto"), bool(hp.get("skip_invalid", False))
    reasoning = hp.get("reasoning") or "auto"  # read as training read it
    columns = hp.get("columns")  # the run's --columns map every file it reads
    if data is not None:
        if not Path(data).is_file():
            raise UsageError(f"--data {data}: no such file")
        return read_records(data_spec(str(data), columns), fmt="auto", skip_invalid=skip,
                            reasoning=reasoning).records, f"--data {data}"
    tests = (recorded.get("files") or {}).get("test") if isinstance(recorded.get("files"),
                                                                     dict) else None
    if tests:  # the data folder's test files: left for eval by training (data/layouts.py)
        gone = [t for t in tests if not Path(t).is_file()]
        if gone:
            raise DataError(f"{gone[0]}: the run's test file is gone; give --data FILE")
        records = [r for t in tests for r in read_records(
            data_spec(t, columns), fmt=fmt, skip_invalid=skip, reasoning=reasoning).records]
        return records, f"test file {', '.join(tests)}"
    if recorded.get("val"):
        path = recorded["val"]
        if not Path(path).is_file():
            raise DataError(f"{path}: the run's validation file is gone; give --data FILE")
        return read_records(data_spec(path, columns), fmt=fmt, skip_invalid=skip,
                            reasoning=reasoning).records, f"validation file {path}"
    if hp.get("val_split"):
        path = recorded.get("path") or hp.get("data")
        mixed = isinstance(hp.get("data"), list)  # several sources: path is their specs
        if not path or not (Path(path).exists() or mixed):
            raise DataError(f"{path}: the run's data file is gone (its --val-split share is the "
                            "held-out data); give --data FILE")
        spec = data_spec(hp["data"] if mixed else path, columns,
                         hp.get("max_samples"), hp.get("seed", 0))  # as training read it
        records = read_records(spec, fmt=fmt, skip_invalid=skip, reasoning=reasoning).records
        _, held = split_validation(records, hp["val_split"], hp.get("seed", 0))
        return held, (f"the {len(held)} records --val-split {hp['val_split']} held back from "
                      f"{path} (seed {hp.get('seed', 0)})")
    raise DataError("the run held no data back from training (no --val, --val-split 0); give "
                    "held-out examples with --data FILE")


def run_tokenizer(man, base_gguf: Path):
    """The tokenizer training used (the run's HF copy of the base), with the run's chat
    template; from the GGUF itself when that copy is gone (transformers rebuilds it)."""
    from transformers import AutoTokenizer

    from edge_tune.models import quiet_hf

    quiet_hf()
    hf_dir = man.base.hf_dir
    if hf_dir and Path(hf_dir).is_dir():
        tok = AutoTokenizer.from_pretrained(hf_dir)
    else:
        tok = AutoTokenizer.from_pretrained(str(base_gguf.parent), gguf_file=base_gguf.name)
    if man.chat_template:
        tok.chat_template = man.chat_template
    return tok


@dataclass
class _Item:
    """One held-out record's generation task: the conversation before its last trained
    assistant turn, and that turn's text."""
    prompt: list
    reference: str


def generation_items(records: list) -> list[_Item]:
    """A (prompt, reference) per conversation whose last trained assistant turn has text."""
    items = []
    for r in records:
        msgs = r.messages or []
        last = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"
                    and m.get("weight", 1) != 0), default=None)
        if last is None or not isinstance(msgs[last].get("content"), str) or \
                not msgs[last]["content"].strip():
            continue
        prompt = [{k: v for k, v in m.items() if k != "weight"} for m in msgs[:last]]
        items.append(_Item(prompt, msgs[last]["content"]))
    return items


# --- the two models -------------------------------------------------------------------------

class _Side:
    """One model to evaluate: an engine and the adapter to activate on it (None: none)."""

    def __init__(self, engine, adapter: Optional[str]) -> None:
        self.engine, self.adapter = engine, adapter

    def use(self):
        if self.engine.active != self.adapter:
            self.engine.activate(self.adapter)
        return self.engine


def _log_softmax(rows):
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
    logp = _log_softmax(logits[[t - 1 for t in targets]])
    picked = logp[np.arange(len(targets)), [input_ids[t] for t in targets]]
    return float(-picked.sum()), len(targets)


def greedy(engine, messages: list, max_tokens: int) -> Optional[str]:
    """The greedy answer, or None when the prompt does not fit or the template refuses it."""
    from edge_tune.llama.engine import ChatTemplateError, ContextOverflow

    try:
        return engine.chat(messages, temperature=0.0, max_tokens=max_tokens).strip()
    except (ContextOverflow, ChatTemplateError):
        return None


def _mean_kl(base_rows, tuned_rows) -> list[float]:
    """KL(base ‖ tuned) in nats at each row (next-token logits of the two models)."""
    import numpy as np

    lp, lq = _log_softmax(base_rows), _log_softmax(tuned_rows)
    return np.sum(np.exp(lp) * (lp - lq), axis=-1).tolist()


def drift(base: _Side, tuned: _Side, tok, prompts: list[str], max_tokens: int,
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
        kl: list[float] = []
        if answer_ids:
            ids = prompt_ids + answer_ids
            at = slice(len(prompt_ids) - 1, len(ids) - 1)  # the rows that predict the answer
            base_rows = base.use().logits(ids)[at]
            kl = _mean_kl(base_rows, tuned.use().logits(ids)[at])
        all_kl += kl
        rows.append({"prompt": prompt, "base": base_answer, "tuned": tuned_answer,
                     "changed": eval_scores.normalize(base_answer)
                     != eval_scores.normalize(tuned_answer),
                     "mean_kl": sum(kl) / len(kl) if kl else 0.0})
    on_event(Progress("eval-drift", len(prompts), len(prompts), "prompts", "drift: done"))
    return {"mean_kl": sum(all_kl) / len(all_kl) if all_kl else 0.0,
            "changed_share": sum(r["changed"] for r in rows) / len(rows) if rows else 0.0,
            "n_prompts": len(rows), "n_positions": len(all_kl), "prompts": rows}


# --- the command ----------------------------------------------------------------------------

def _targets(run: Path, merged: Optional[Path]):
    """(ChatTarget of the run, tuned GGUF): the run's adapter.gguf, or ``merged`` (then the
    target carries no adapter)."""
    from edge_tune import manifest as manifest_mod
    from edge_tune import models
    from edge_tune.adapters import ChatTarget, resolve_chat, run_base_gguf
    from edge_tune.templates import choice as template_choice

    if not run.exists():
        raise UsageError(f"{run}: no such run directory")
    man = manifest_mod.read(run if run.is_dir() else run.parent)
    if man is None:
        raise UsageError(f"{run}: not an edge-tune run directory (no manifest.json); eval reads "
                         "its base, chat template and held-out data from it")
    if merged is None and man.full and man.model is not None and man.model.gguf:
        merged = run / man.model.gguf  # a full fine-tuning run: its model against the base
    if merged is None:
        target = resolve_chat(run, None)
        return target, target.adapter
    if not Path(merged).is_file():
        raise UsageError(f"--merged {merged}: no such file")
    base = run_base_gguf(man)
    if base is None:
        raise UsageError(f"{run}: the run has no GGUF base to compare the merged model with")
    if not base.exists() and man.base.sha256 == models.DEFAULT_SHA256:
        base = models.default_gguf()  # run copied to another machine: refetch
    mode = man.hyperparameters.system_mode or "keep"
    return ChatTarget(base, None, man, template_choice.choose(None, man), mode), Path(merged)


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
    from edge_tune.backends.worker import tokenize_records
    from edge_tune.commands.chat import open_engine
    from edge_tune.data.formats import job_record

    if max_tokens < 1:
        raise UsageError(f"--max-tokens {max_tokens}: expected an integer >= 1")
    if n_prompts < 1:
        raise UsageError(f"--prompts {n_prompts}: expected an integer >= 1")
    target, tuned_path = _targets(Path(run), merged)
    merged = tuned_path if target.adapter is None else merged  # a full run's model too
    man = target.manifest
    hp = man.hyperparameters.to_dict()
    records, source = held_out_records(man, data)
    records = records[:n_prompts]
    if not records:
        raise DataError(f"{source}: no held-out records")
    on_event(Log(f"eval: {len(records)} held-out records from {source}"))
    tok = run_tokenizer(man, Path(target.base))
    system_mode = target.system_mode
    seq_len = int(hp.get("seq_len") or 512)

    def emit(event):  # the tokenizer's own progress is noise here; its warnings are not
        if isinstance(event, Log):
            on_event(event)

    examples = tokenize_records(tok, [job_record(r) for r in records], seq_len, emit,
                                "held-out", hp.get("train_on") == "all",
                                hp.get("overflow", "truncate"),
                                skip_invalid=bool(hp.get("skip_invalid")),
                                system_mode=system_mode)
    if not examples:
        raise DataError(f"{source}: no held-out example has a trained token within "
                        f"seq_len={seq_len}")
    items = generation_items(records)
    n_ctx = max([len(e.input_ids) for e in examples] + [256]) + max_tokens + 64
    engines = []
    try:
        engines.append(open_engine(target, n_ctx=n_ctx, logits_all=True,
                                   training_system=False))  # prompts as they are
        base = _Side(engines[0], None)
        if merged is None:
            tuned = _Side(engines[0], "adapter")
        else:
            engines.append(open_engine(_with_base(target, tuned_path), n_ctx=n_ctx,
                                       training_system=False,
                                       logits_all=True))
            if engines[1].n_vocab != engines[0].n_vocab:
                raise UsageError(f"--merged {merged}: its vocabulary ({engines[1].n_vocab}"
                                 f" tokens) is not the base's ({engines[0].n_vocab})")
            tuned = _Side(engines[1], None)
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


def _with_base(target, model: Path):
    """``target`` with ``model`` as the GGUF llama.cpp loads and no adapter."""
    from dataclasses import replace

    return replace(target, base=Path(model), adapter=None)


def _measure(base: _Side, tuned: _Side, tok, examples: list, items: list, max_tokens: int,
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
