"""A GRPO run's rewards on held-out prompts, base vs tuned, in llama.cpp (what ships).

Each held-out prompt is rendered with the run's chat template for generation and answered by
the base and by the base with the run's adapter (greedy by default: one deterministic answer
each; ``temperature`` > 0 samples ``samples`` answers per prompt with a fixed seed); the
run's reward functions (``--reward``, ``--reward-weights``, as training parsed them) score
both. Held-out prompts: ``data``, else the run's ``--val`` file, else its seeded
``--val-split`` share; a run that held nothing back needs ``data``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from edge_tune.errors import DataError, UsageError
from edge_tune.events import EventSink, Log, Progress, ignore


@dataclass
class RewardsResult:
    """``edge-tune eval`` of a GRPO run: ``rewards[side]`` = {"reward": weighted mean,
    "reward/SPEC": each function's mean} for side base and tuned (NaN-free means over the
    answers a function scored; None when it scored none); ``answers``: prompt, both answers
    and their total rewards, one row per answer."""

    run: str
    base: str
    tuned: str
    data: str
    n_prompts: int
    samples: int
    temperature: float
    max_tokens: int
    rewards: dict
    answers: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def held_out_prompts(man, data: Optional[Path]) -> tuple[list[dict], str]:
    """(prompt records, where they came from) of a GRPO run (see the module). Raises
    DataError / UsageError when there are none."""
    from edge_tune.data.layouts import data_spec
    from edge_tune.data.prompts import read_prompts
    from edge_tune.data.split import split_validation

    hp, recorded = man.hyperparameters.to_dict(), man.data.to_dict()
    columns, skip = hp.get("columns"), bool(hp.get("skip_invalid", False))
    if data is not None:
        if not Path(data).is_file():
            raise UsageError("no such file", setting="data", value=data)
        return read_prompts(data_spec(str(data), columns), skip).records, f"--data {data}"
    if hp.get("val"):
        path = hp["val"]
        if not Path(path).is_file():
            raise DataError(f"{path}: the run's validation file is gone; give --data FILE")
        return read_prompts(data_spec(path, columns), skip).records, f"validation file {path}"
    if hp.get("val_split"):
        path = recorded.get("path") or hp.get("data")
        spec = data_spec(hp["data"] if isinstance(hp.get("data"), list) else path, columns,
                         hp.get("max_samples"), hp.get("seed", 0))
        _, held = split_validation(read_prompts(spec, skip).records, hp["val_split"],
                                   hp.get("seed", 0))
        return held, (f"the {len(held)} prompts --val-split {hp['val_split']} held back "
                      f"(seed {hp.get('seed', 0)})")
    raise DataError("the run held no prompts back from training (no --val, --val-split 0); "
                    "give held-out prompts with --data FILE")


def _means(rewards, per: list[list[float]], total: list[float]) -> dict:
    import math

    def mean(xs):
        xs = [x for x in xs if not math.isnan(x)]
        return round(sum(xs) / len(xs), 6) if xs else None

    return {"reward": mean(total), **{f"reward/{r.name}": mean(p) for r, p in zip(rewards, per)}}


def reward_eval(base_gguf: Path, adapter_gguf: Optional[Path], tok, records: list[dict],
                rewards, max_tokens: int, temperature: float = 0.0, samples: int = 1,
                seed: int = 0, on_event: EventSink = ignore) -> dict:
    """Answers to ``records`` (prompt records) from the base and from the base with
    ``adapter_gguf`` (None: the base twice), scored by ``rewards``: ``{"rewards": {side:
    means}, "answers": rows}`` (see :class:`RewardsResult`). ``tok``: the run's HF
    tokenizer (its chat template renders the prompts)."""
    from edge_tune.llama.rollout import Rollouts
    from edge_tune.training.rewards import score

    ids = [list(tok.apply_chat_template(r["messages"], tools=r.get("tools"),
                                        add_generation_prompt=True, tokenize=True,
                                        return_dict=False)) for r in records]
    stops = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    chunk = max(1, 16 // samples)
    texts: dict[str, list[str]] = {}
    out: dict = {"rewards": {}, "answers": []}
    with Rollouts(Path(base_gguf), n_ctx=max(len(i) for i in ids) + max_tokens + 8,
                  parallel=chunk * samples, seed=seed) as roll:
        for side, adapter in (("base", None), ("tuned", adapter_gguf)):
            roll.use_adapter(adapter)
            roll.rng = __import__("numpy").random.default_rng(seed)  # same draws both sides
            texts[side] = []
            for k in range(0, len(ids), chunk):
                on_event(Progress("eval", k, len(ids), "prompts", f"eval: {side} answers"))
                got = roll.sample(ids[k:k + chunk], samples, max_tokens, temperature, stops)
                texts[side] += [tok.decode(s.ids, skip_special_tokens=True) for s in got]
    prompts = [r["messages"] for r in records for _ in range(samples)]
    keys = sorted({k for r in records for k in r.get("columns", {})})
    columns = {k: [r.get("columns", {}).get(k) for r in records for _ in range(samples)]
               for k in keys}
    totals = {}
    for side in ("base", "tuned"):
        per, totals[side] = score(rewards, prompts, texts[side], columns)
        out["rewards"][side] = _means(rewards, per, totals[side])
    for i, p in enumerate(prompts):
        out["answers"].append({"prompt": p[-1].get("content") or "", "base": texts["base"][i],
                               "tuned": texts["tuned"][i], "base_reward": totals["base"][i],
                               "tuned_reward": totals["tuned"][i]})
    on_event(Log(f"eval: reward base {out['rewards']['base']['reward']} -> tuned "
                 f"{out['rewards']['tuned']['reward']} on {len(records)} held-out prompts"))
    return out


def evaluate_rewards(target, tuned: Path, data: Optional[Path], max_tokens: int,
                     n_prompts: int, on_event: EventSink, run: Path) -> RewardsResult:
    """A GRPO run's evaluation: its reward functions on held-out prompts (at most
    ``n_prompts``), answered greedily (at most ``max_tokens`` each) by the base and the tuned
    model in llama.cpp. ``target``: the run's :class:`~edge_tune.adapters.ChatTarget`;
    ``tuned``: its adapter GGUF or merged GGUF. Raises DataError when there are no prompts."""
    from edge_tune.eval.held_out import run_tokenizer
    from edge_tune.events import Done
    from edge_tune.training.rewards import parse_rewards

    man = target.manifest
    hp = man.hyperparameters.to_dict()
    records, source = held_out_prompts(man, data)
    records = records[:n_prompts]
    if not records:
        raise DataError(f"{source}: no held-out prompts")
    on_event(Log(f"eval: {len(records)} held-out prompts from {source}"))
    rewards = parse_rewards(hp.get("reward") or [],
                            [float(w) for w in hp.get("reward_weights") or []])
    tok = run_tokenizer(man, Path(target.base))
    got = reward_eval(Path(target.base), Path(tuned) if target.adapter is not None else None,
                      tok, records, rewards, max_tokens, on_event=on_event,
                      seed=int(hp.get("seed") or 0))
    out = RewardsResult(run=str(run), base=str(target.base), tuned=str(tuned), data=source,
                        n_prompts=len(records), samples=1, temperature=0.0,
                        max_tokens=max_tokens, rewards=got["rewards"], answers=got["answers"])
    on_event(Done("eval", {"rewards": out.rewards}))
    return out
