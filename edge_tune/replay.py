"""General replay (``train --replay N``): the base model's own answers to general prompts,
mixed into the training records so a narrow fine-tune keeps the base's general behaviour.

A fine-tune on one narrow task (e.g. support emails -> JSON) moves the model on every prompt:
nothing in the data says where the task ends. Replay adds N records that say it: general
prompts shipped with edge-tune (``assets/replay_prompts.jsonl``, written for edge-tune, none of
them a drift prompt of ``edge-tune eval``) answered by the **base model itself** (greedy, in
llama.cpp, with the run's chat template and system mode). Training on them pulls the adapter
towards "answer as the base did" away from the task — self-distillation, so the replay set
fits whatever base is trained, and nothing of another model's style is taught.

The answers are generated once per base file, template and system mode and cached under
``cache_dir()/replay/`` (a JSON object prompt -> answer); an answer that ran into the token
limit is left out (training on a cut-off answer would teach stopping mid-sentence), and the
next prompt takes its place. Measured effect on a narrow task: docs/eval.md ("Forgetting").
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Optional

from edge_tune.errors import UsageError
from edge_tune.events import EventSink, Log, Progress, ignore

MAX_TOKENS = 256  # per replay answer; longer answers are left out
SOURCE = "assets/replay_prompts.jsonl"


def replay_prompts() -> list[str]:
    """The shipped general prompts, in their file order."""
    text = (resources.files("edge_tune") / "assets" / "replay_prompts.jsonl").read_text()
    return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]


def max_replay() -> int:
    """The largest ``--replay`` there can be (one record per shipped prompt)."""
    return len(replay_prompts())


def _cache_path(base_sha256: str, chat_template: Optional[str], system_mode: str) -> Path:
    from edge_tune.fsutil import cache_dir

    key = hashlib.sha256(json.dumps([base_sha256, chat_template or "", system_mode,
                                     MAX_TOKENS]).encode()).hexdigest()[:16]
    return cache_dir() / "replay" / f"{key}.json"


def replay_records(base_gguf: Path, n: int, base_sha256: str,
                   chat_template: Optional[str] = None, system_mode: str = "keep",
                   on_event: EventSink = ignore) -> list[dict]:
    """``n`` training records (the job's form: ``{"messages": [user, assistant], "where",
    "replay": true}``; the flag marks them for ``--replay-kl``)
    whose answers are ``base_gguf``'s own greedy answers (at most :data:`MAX_TOKENS` tokens,
    rendered with ``chat_template`` — None: the GGUF's own — and ``system_mode``), taken from
    the shipped prompts in order, cut-off answers skipped. Fewer than ``n`` only when the
    shipped prompts run out (said as a warning). Answers are cached per ``base_sha256``,
    template and system mode. Raises UsageError when ``n`` exceeds :func:`max_replay`."""
    from edge_tune.fsutil import write_text_atomic

    prompts = replay_prompts()
    if n > len(prompts):
        raise UsageError(f"edge-tune ships {len(prompts)} general prompts to "
                         f"replay (expected at most {len(prompts)})", setting="replay", value=n)
    path = _cache_path(base_sha256, chat_template, system_mode)
    try:
        cached = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        cached = {}  # a damaged cache is regenerated
    records: list[dict] = []
    engine = None
    try:
        for i, prompt in enumerate(prompts):
            if len(records) == n:
                break
            if prompt not in cached:
                if engine is None:
                    on_event(Log(f"replay: the base answers {SOURCE} once (greedy, cached in "
                                 f"{path.parent})"))
                    engine = _engine(base_gguf, chat_template, system_mode)
                on_event(Progress("replay", len(records), n, "answers",
                                  "replay: base answers general prompts"))
                cached[prompt] = _answer(engine, prompt)
                write_text_atomic(path, json.dumps(cached, indent=1) + "\n")
            answer = cached[prompt]
            if answer:  # None: cut off at MAX_TOKENS, or empty
                records.append({"messages": [{"role": "user", "content": prompt},
                                             {"role": "assistant", "content": answer}],
                                "where": f"replay prompt {i + 1} ({SOURCE})",
                                "replay": True})
    finally:
        if engine is not None:
            engine.close()
    if len(records) < n:
        on_event(Log(f"--replay {n}: only {len(records)} of the base's answers to the shipped "
                     f"prompts end within {MAX_TOKENS} tokens; replaying those", "warning"))
    return records


def _engine(base_gguf: Path, chat_template: Optional[str], system_mode: str):
    from edge_tune.llama.engine import Engine

    return Engine(base_gguf, n_ctx=1024, chat_template=chat_template, system_mode=system_mode,
                  prompt_cache=False)


def _answer(engine, prompt: str) -> Optional[str]:
    """The base's greedy answer, or None when it ran into MAX_TOKENS or is empty."""
    text, finish = [], None
    for piece in engine.generate(messages=[{"role": "user", "content": prompt}],
                                 temperature=0.0, max_tokens=MAX_TOKENS):
        text.append(piece.text)
        finish = piece.finish_reason or finish
    answer = "".join(text).strip()
    return answer if answer and finish != "length" else None


def for_run(cfg, ref, base_sha256: Optional[str], chosen, n_train: int,
            on_event: EventSink = ignore) -> list[dict]:
    """``--replay N`` of a run (``cfg``: its TrainConfig; ``ref``: its base, a
    ``models.ModelRef``; ``chosen``: ``--chat-template``): N job records of the base's own
    answers (:func:`replay_records`), generated in llama.cpp from the base's GGUF or its cached
    conversion, with the run's template and system mode; [] without ``--replay``. Raises
    DataError when the base has no chat template to render the prompts with."""
    if not cfg.replay:
        return []
    from edge_tune.adapters import gguf_base_for
    from edge_tune.fsutil import sha256_file
    from edge_tune.templates.choice import require_for_conversations

    require_for_conversations([{"messages": [{"role": "user", "content": "?"}]}], ref, chosen)
    base_gguf = gguf_base_for(ref, on_event)  # HF weights: the GGUF training's end uses too
    records = replay_records(base_gguf, cfg.replay, base_sha256 or sha256_file(base_gguf),
                             chosen.text if chosen else None, cfg.system_mode, on_event)
    on_event(Log(f"replay: {len(records)} general records (the base's own answers to "
                 f"edge-tune's general prompts) mixed into the {n_train} training records, to "
                 "keep the base's behaviour outside your task"))
    return records
