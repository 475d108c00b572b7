"""``verify``: does llama.cpp run what was trained?

On a few held-back examples (the run's validation data; its training data when there is none)
the training framework (torch + PEFT) and llama.cpp see the *same token ids*, and three things
are compared:

* **adapter effect, exact** — (tuned − base) logits in llama.cpp on an F32 copy of the base
  against the same difference in torch. Quantization noise is absent, so a wrong scale (alpha,
  rsLoRA), a missing q/k permutation or a wrong tensor shows up as a large relative error.
* **tuned distributions on the real base** — top-1 agreement and mean KL(torch ‖ llama.cpp)
  of the tuned model on the base users actually run (quantized), so quantization's cost is seen.
  llama.cpp's top token agrees when torch gives it a log-probability within ``TIE_NATS`` of
  torch's top one (a near-tie, relative to the distribution: on a flat one nothing else is).
* **greedy outputs side by side** (informational: near-ties may flip the text either way).

A merged export is checked the same way: the file itself for "real base + adapter" and, when
it is F32, for "F32 base + adapter" too (a quantized one: its F32 merge, remade from the run).
The file must also carry the run's adapter effect: **file effect** is the least-squares
coefficient of the file's logit change over the F32 base on torch's effect (1: the run's
effect; ~0: a file without it, or another run's; quantization noise is nearly orthogonal).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from edge_tune import models
from edge_tune.adapters import conversion_base, peft_adapter
from edge_tune.errors import CheckFailed, DataError, UsageError
from edge_tune.events import Done, EventSink, Log, Progress, ignore
from edge_tune.manifest import Manifest

# What "within tolerance" means. The effect error is float rounding when the conversion is
# right (~1e-4) and O(1) when a scale or layout is wrong; KL/top-1 absorb quantization noise.
TOLERANCE = {"effect_rel_err": 0.03, "top1_min": 0.85, "kl_max": 0.1,
             "file_effect_min": 0.5, "file_effect_max": 1.5}
# A token whose log-probability is this close (in nats) to the top one's, in torch's own
# distribution, counts as a tie for top-1 agreement: a near-tie flipped by rounding or by
# quantization noise is not a disagreement. Relative, so a flat distribution ties nothing more.
TIE_NATS = 0.2
# Below this RMS change of torch's logits (tuned - base) the adapter has no effect: its B
# matrices are still (about) zero, so the run learnt nothing, and the effect error compares
# rounding noise with rounding noise.
NO_EFFECT_RMS = 1e-5


@dataclass
class Sample:
    ids: list[int]  # prompt + reference answer, as trained (cut to max_len)
    prompt_ids: list[int]  # what greedy decoding starts from
    prompt_text: str


@dataclass
class VerifyReport:
    """What ``verify`` found (:func:`check_run`; :func:`judge` says ``failures``).

    effect_rel_err: relative error of the adapter's (or fine-tuning's) effect on the logits,
    torch against llama.cpp on the F32 base; top1: top-1 agreement of the tuned model on the
    real base (0-1); kl: mean KL(torch || llama.cpp) there, nats per position; n_prompts /
    n_positions: what was compared; checked: "adapter" or "merged"; greedy: answers side
    by side ({prompt, torch, llama_cpp}); file_effect: a merged file's share of the run's
    effect (merged only); summary: the one line ``train`` and ``export`` print for their
    check (None from ``verify`` itself); effect_rms: the RMS of torch's (tuned - base)
    logits over every position and token, below ``NO_EFFECT_RMS`` an adapter that changes
    nothing (``no_effect``; None where not measured). ``to_dict()``: the ``verify --json``
    object."""

    effect_rel_err: float
    top1: float
    kl: float
    n_prompts: int
    n_positions: int
    checked: str  # "adapter" | "merged"
    greedy: list[dict] = field(default_factory=list)
    tolerance: dict = field(default_factory=lambda: dict(TOLERANCE))
    failures: list[str] = field(default_factory=list)
    framework: str = "torch+PEFT"  # what llama.cpp is compared with: torch+PEFT or mlx
    file_effect: float | None = None  # merged only: the run's effect found in the file
    summary: str | None = None
    effect_rms: float | None = None

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def no_effect(self) -> bool:
        """The adapter changes no logit (a warning, not a failure: llama.cpp agrees)."""
        return self.effect_rms is not None and self.effect_rms < NO_EFFECT_RMS

    def to_dict(self) -> dict:
        return {"ok": self.ok, "checked": self.checked, "effect_rel_err": self.effect_rel_err,
                "top1_agreement": self.top1, "mean_kl": self.kl, "n_prompts": self.n_prompts,
                "n_positions": self.n_positions, "tolerance": self.tolerance,
                "failures": self.failures, "greedy": self.greedy, "framework": self.framework,
                "file_effect": self.file_effect, "effect_rms": self.effect_rms,
                "no_effect": self.no_effect,
                **({"summary": self.summary} if self.summary is not None else {})}


def judge(effect_rel_err: float, top1: float, kl: float, tol: dict = TOLERANCE,
          file_effect: float | None = None, exact_on_file: bool = False) -> list[str]:
    """Why the numbers are out of tolerance (empty: they are not); ``file_effect`` is judged
    when given (a merged file). ``exact_on_file``: the effect error was measured on that file
    (F32), so with a foreign file it says nothing about a conversion. Pure."""
    out = []
    foreign = file_effect is not None and not \
        tol["file_effect_min"] <= file_effect <= tol["file_effect_max"]
    if foreign:
        # A quantized file's exact check ran on its F32 merge: when that carries the effect,
        # the file lost it in quantization (small weight changes rounded back to the base's
        # grid) or is another run's; only an F32 file that lacks it is surely not this run's.
        why = "it is not a merge of this run" if exact_on_file or \
            not effect_rel_err <= tol["effect_rel_err"] else \
            (f"quantization rounded this run's weight changes away (its F32 merge carries "
             f"them: effect error {effect_rel_err:.1e}), or it is not a merge of this run")
        out.append(f"the merged file carries {file_effect:.0%} of this run's effect on the logits "
                   f"(expected {tol['file_effect_min']:.0%}-{tol['file_effect_max']:.0%}): {why}")
    if not effect_rel_err <= tol["effect_rel_err"] and not (foreign and exact_on_file):
        out.append(f"adapter effect differs by {effect_rel_err:.1%} between torch+PEFT and "
                   f"llama.cpp on the F32 base (limit {tol['effect_rel_err']:.0%}): the "
                   "conversion is wrong (alpha/rsLoRA scale, q/k layout, or tensors)")
    if not top1 >= tol["top1_min"]:
        out.append(f"top-1 agreement {top1:.1%} < {tol['top1_min']:.0%}")
    if not kl <= tol["kl_max"]:
        out.append(f"mean KL {kl:.3f} > {tol['kl_max']}")
    return out


def check_same_model(merged: Path, base_gguf: Path) -> None:
    """Refuse, before llama.cpp loads anything, a ``--merged`` file that cannot be a merge of a
    run on ``base_gguf``: another architecture, vocabulary size, or a tensor of another shape
    (tensors only one file has are let through: a merge may add an untied ``output.weight`` or
    LoRA biases, a converter may leave out all-zero biases). Reads both GGUF headers only.
    Raises DataError (one line)."""
    from edge_tune.converters.formats.gguf_header import read_header

    got, want = read_header(merged), read_header(base_gguf)
    expected = f"expected a merge of this run, whose base is {base_gguf}"

    def field(h, key):
        f = h.fields.get(key)
        return None if f is None else f.contents()

    arch = field(got, "general.architecture"), field(want, "general.architecture")
    if arch[0] != arch[1]:
        raise DataError(f"architecture {arch[0]}, the run's base is {arch[1]} ({expected})",
                        setting="merged", value=merged)
    vocab = (field(got, "tokenizer.ggml.tokens"), field(want, "tokenizer.ggml.tokens"))
    if vocab[0] is not None and vocab[1] is not None and int(vocab[0]) != int(vocab[1]):
        raise DataError(f"vocabulary of {int(vocab[0])} tokens, the run's base has "
                        f"{int(vocab[1])} ({expected})", setting="merged", value=merged)
    shapes = {t.name: list(t.shape) for t in got.tensors}
    for t in want.tensors:
        if t.name in shapes and shapes[t.name] != list(t.shape):
            raise DataError(f"tensor {t.name!r} is {shapes[t.name]}, {list(t.shape)} in the "
                            f"run's base ({expected})", setting="merged", value=merged)


# --- held-back prompts --------------------------------------------------------------------------

def held_back_records(man: Manifest, n: int) -> list:
    """Up to ``n`` records the adapter was not trained on: the validation file, else the same
    seeded validation split training made, else (no validation data) the training data."""
    from edge_tune.data.split import split_validation
    from edge_tune.data.formats import read_records

    from edge_tune.data.layouts import data_spec

    data, hp = man.data, man.hyperparameters
    if hp.to_dict().get("method") == "grpo":  # prompts only: their rendering is checked
        return _held_back_prompts(man, n)
    fmt, skip = hp.format or "auto", bool(hp.skip_invalid)
    path = data.val or data.path
    given = hp.to_dict()  # --columns, --max-samples, several --data: read as training read
    if not data.val and data.path and not Path(data.path).exists() and given.get("data"):
        path = data_spec(given["data"], given.get("columns"), given.get("max_samples"),
                         hp.seed or 0)  # several sources: data.path is their specs joined
    elif not path or not Path(path).exists():
        raise DataError(f"verify: the run's data file {path!r} is gone; it is needed for "
                        "held-back prompts")
    else:
        path = data_spec(path, given.get("columns"),
                         None if data.val else given.get("max_samples"), hp.seed or 0)
    records = read_records(path, fmt=fmt, skip_invalid=skip,
                           reasoning=hp.reasoning or "auto").records
    if not data.val and hp.val_split:
        _, records = split_validation(records, hp.val_split, hp.seed or 0)
    return records[:n]


def _held_back_prompts(man: Manifest, n: int) -> list:
    """A GRPO run's held-out prompt records (``eval``'s), else its first training prompts:
    dicts with ``messages`` (the prompt) and ``prompt_only``."""
    from edge_tune.eval.rewards import held_out_prompts

    try:
        records = held_out_prompts(man, None)[0]
    except DataError:  # nothing held back: the training prompts show the same computation
        from edge_tune.data.prompts import read_prompts

        records = read_prompts(man.data.path).records
    return [{**r, "prompt_only": True} for r in records[:n]]


def build_samples(tok, records: list, max_len: int, system_mode: str = "keep") -> list[Sample]:
    """Token ids of each record as training encoded it (``system_mode`` and the record's
    ``tools`` included) and the prompt of its last trained turn; records the template cannot
    train (skipped by ``--skip-invalid``) are left out."""
    from edge_tune.data.template import (RecordError, encode_rendered, encode_text,
                                         render_examples)

    samples = []
    for r in records:
        if isinstance(r, dict) and r.get("prompt_only"):  # GRPO: the prompt, for generation
            ids = list(tok.apply_chat_template(r["messages"], tools=r.get("tools"),
                                               add_generation_prompt=True, tokenize=True,
                                               return_dict=False))[:max_len]
            samples.append(Sample(ids, ids, tok.decode(ids)))
            continue
        if r.messages is not None:
            try:
                rendered = render_examples(tok, r.messages, getattr(r, "tools", None),
                                           system_mode=system_mode)[-1]
            except RecordError:
                continue
            if not rendered.spans:
                continue  # context only (every assistant turn at weight 0): nothing trained
            ids = encode_rendered(tok, rendered).input_ids[:max_len]
            text = rendered.text[:rendered.spans[-1][0]]
            prompt = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = encode_text(tok, r.text or "").input_ids[:max_len]
            prompt = ids[: min(16, len(ids))]
            text = tok.decode(prompt)
        samples.append(Sample(ids, prompt[:max_len], text))
    return samples


# --- the two engines ------------------------------------------------------------------------

def torch_side(hf_dir: Path, peft_dir: Path, samples: list[Sample], max_new: int):
    """(base logits, tuned logits, greedy token ids) per sample, from torch + PEFT in fp32;
    logits: one float32 (positions, vocabulary) array per sample, as torch computed them."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edge_tune.models import quiet_hf

    quiet_hf()
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(peft_dir)).eval()
    base, tuned, greedy = [], [], []
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s.ids])
            tuned.append(model(ids).logits[0].float().numpy())
            with model.disable_adapter():
                base.append(model(ids).logits[0].float().numpy())
            out = model.generate(torch.tensor([s.prompt_ids]), max_new_tokens=max_new,
                                 do_sample=False, attention_mask=torch.ones(1, len(s.prompt_ids),
                                                                           dtype=torch.long))
            greedy.append(out[0, len(s.prompt_ids):].tolist())
    return base, tuned, greedy


def torch_side_full(hf_dir: Path, model_dir: Path, samples: list[Sample], max_new: int):
    """The same as :func:`torch_side` for a full fine-tuning run: the base is the original HF
    model, the tuned one the run's trained weights (``model_dir``), both in fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    from edge_tune.models import quiet_hf

    quiet_hf()
    base, tuned, greedy = [], [], []
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
        base = [model(torch.tensor([s.ids])).logits[0].float().numpy() for s in samples]
        del model
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        for s in samples:
            tuned.append(model(torch.tensor([s.ids])).logits[0].float().numpy())
            out = model.generate(torch.tensor([s.prompt_ids]), max_new_tokens=max_new,
                                 do_sample=False, attention_mask=torch.ones(1, len(s.prompt_ids),
                                                                           dtype=torch.long))
            greedy.append(out[0, len(s.prompt_ids):].tolist())
    return base, tuned, greedy


def mlx_side(hf_dir: Path, mlx_adapter: Path, samples: list[Sample], max_new: int):
    """The same as :func:`torch_side` from mlx-lm with the run's native mlx adapter, so an
    mlx run is checked against what it was trained with (and the mlx -> GGUF conversion)."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load

    from edge_tune.training.backends.mlx_config import mlx_load_kwargs

    kw = mlx_load_kwargs(hf_dir)  # loaded exactly as the mlx backend loads it
    base_model, _ = load(str(hf_dir), **kw)
    tuned_model, _ = load(str(hf_dir), adapter_path=str(mlx_adapter), **kw)

    def logits(model, ids):
        return np.array(model(mx.array([ids]))[0].astype(mx.float32), dtype=np.float32)

    base, tuned, greedy = [], [], []
    for s in samples:
        base.append(logits(base_model, s.ids))
        tuned.append(logits(tuned_model, s.ids))
        ids = list(s.prompt_ids)
        for _ in range(max_new):  # greedy; a few tokens, so no KV cache is needed
            ids.append(int(np.argmax(logits(tuned_model, ids)[-1])))
        greedy.append(ids[len(s.prompt_ids):])
    return base, tuned, greedy


def llama_side(model: Path, samples: list[Sample], adapter: Path | None = None,
               max_new: int = 0, base_too: bool = False):
    """Per sample, in order, while one llama.cpp load of ``model`` (F32 KV cache) is open:
    ``(logits, greedy token ids, base logits or None)``; logits are float32 (positions,
    vocabulary). With ``adapter`` the logits are the tuned model's; ``base_too`` also scores
    the model without it (the adapter is switched off and on per sample: one load). A
    generator, so that a caller holds one sample's logits at a time; exhaust it before the
    next load (the engine closes at its end)."""
    from edge_tune.llama.engine import Engine

    n_ctx = max(len(s.ids) + 8 for s in samples) + max_new
    with Engine(model, n_ctx=max(n_ctx, 64), logits_all=True, exact=True,
                prompt_cache=False) as eng:
        name = eng.add_adapter(adapter) if adapter is not None else None
        if name is not None:
            eng.activate(name)
        for s in samples:
            base = None
            if base_too:
                eng.activate(None)
                base = eng.logits(s.ids)
                eng.activate(name)
            logits = eng.logits(s.ids)
            ids = eng.greedy_ids(s.prompt_ids, max_new) if max_new else []
            yield logits, ids, base


# Vocabulary entries compared at once (float64 temporaries of this many elements, 16 MiB
# each): the comparison's memory is bounded whatever the vocabulary or the prompts' length.
CHUNK_ELEMENTS = 1 << 21


def _row_chunks(rows: int, vocab: int):
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


class Tally:
    """The running sums behind :func:`compare` and :func:`file_effect`, fed one sample at a
    time (float32 logits as the engines give them, (positions, vocabulary) each) and summed
    in float64 a few positions at a time: verify never holds every position's logits of every
    sample in float64 (with a 262k vocabulary that was gigabytes)."""

    def __init__(self) -> None:
        self.err2 = self.want2 = 0.0  # effect: |got - want|^2, |want|^2
        self.want_n = 0  # logits summed into want2
        self.dot = self.file_want2 = 0.0  # file effect: <got, want>, |want|^2
        self.agree = 0
        self.kl = 0.0
        self.positions = 0

    @staticmethod
    def _effect(t_base, t_tuned, f_base, f_tuned, sl):
        import numpy as np

        want = np.asarray(t_tuned[sl], np.float64) - t_base[sl]
        got = np.asarray(f_tuned[sl], np.float64) - f_base[sl]
        return want, got

    def add_effect(self, t_base, t_tuned, f_base, f_tuned) -> None:
        """(tuned - base) in torch against the same in llama.cpp (the exact check)."""
        import numpy as np

        for sl in _row_chunks(len(t_tuned), t_tuned.shape[-1]):
            want, got = self._effect(t_base, t_tuned, f_base, f_tuned, sl)
            self.err2 += float(np.sum((got - want) ** 2))
            self.want2 += float(np.sum(want * want))
            self.want_n += int(want.size)

    def add_file(self, t_base, t_tuned, f_base, file_tuned) -> None:
        """The share of torch's effect in a file's logits over the F32 base."""
        import numpy as np

        for sl in _row_chunks(len(t_tuned), t_tuned.shape[-1]):
            want, got = self._effect(t_base, t_tuned, f_base, file_tuned, sl)
            self.dot += float(np.sum(got * want))
            self.file_want2 += float(np.sum(want * want))

    def add_tuned(self, t_tuned, real_tuned) -> None:
        """Top-1 agreement and KL(torch || llama.cpp) of the tuned distributions."""
        import numpy as np

        def log_softmax(x):
            x = x - x.max(-1, keepdims=True)
            return x - np.log(np.exp(x).sum(-1, keepdims=True))

        for sl in _row_chunks(len(t_tuned), t_tuned.shape[-1]):
            q_logits = np.asarray(real_tuned[sl], np.float64)
            lp, lq = log_softmax(np.asarray(t_tuned[sl], np.float64)), log_softmax(q_logits)
            picked = np.take_along_axis(lp, q_logits.argmax(-1)[:, None], axis=-1)[:, 0]
            self.agree += int(np.sum(picked >= lp.max(-1) - TIE_NATS))
            self.kl += float(np.sum(np.exp(lp) * (lp - lq)))
            self.positions += int(lp.shape[0])

    @property
    def effect_rel_err(self) -> float:
        return float(self.err2 ** 0.5 / max(self.want2 ** 0.5, 1e-12))

    @property
    def effect_rms(self) -> float:
        return float((self.want2 / max(self.want_n, 1)) ** 0.5)

    @property
    def top1(self) -> float:
        return self.agree / max(self.positions, 1)

    @property
    def mean_kl(self) -> float:
        return self.kl / max(self.positions, 1)

    @property
    def file_effect(self) -> float:
        return float(self.dot / max(self.file_want2, 1e-24))


def compare(torch_base, torch_tuned, f32_base, f32_tuned, real_tuned) -> tuple[float, float,
                                                                                 float, int]:
    """(effect relative error, top-1 agreement, mean KL(torch‖llama.cpp), positions). Pure.
    Each argument: one (positions, vocabulary) logits array per sample."""
    tally = Tally()
    for tb, tt, fb, ft, rt in zip(torch_base, torch_tuned, f32_base, f32_tuned, real_tuned):
        tally.add_effect(tb, tt, fb, ft)
        tally.add_tuned(tt, rt)
    return tally.effect_rel_err, tally.top1, tally.mean_kl, tally.positions


def file_effect(torch_base, torch_tuned, f32_base, file_tuned) -> float:
    """How much of torch's adapter effect (tuned − base logits) the file's logits carry over
    the F32 base: the least-squares coefficient <file − base, effect> / <effect, effect>.
    1 for this run's merge (quantization noise is nearly orthogonal to the effect), ~0 for a
    file without the adapter or with another run's. Pure."""
    tally = Tally()
    for tb, tt, fb, ft in zip(torch_base, torch_tuned, f32_base, file_tuned):
        tally.add_file(tb, tt, fb, ft)
    return tally.file_effect


# --- the whole check ------------------------------------------------------------------------

def f32_copy(base_gguf: Path, sha256: str | None, on_event: EventSink = ignore) -> Path:
    """An F32 copy of ``base_gguf`` in the cache (made once)."""
    from edge_tune.converters.formats.gguf_f32 import write_f32_copy
    from edge_tune.fsutil import cache_dir, sha256_file

    digest = sha256 or sha256_file(base_gguf)
    target = cache_dir() / "f32" / f"{digest[:16]}.gguf"
    if not target.exists():
        on_event(Log(f"writing an F32 copy of {base_gguf.name} for exact checks (once)"))
        write_f32_copy(base_gguf, target)
    return target


def verify_run(run_dir: Path, man: Manifest, peft_dir: Path, base_gguf: Path, hf_dir: Path,
               adapter_gguf: Path | None = None, merged: Path | None = None,
               merged_f32: Path | None = None, n_prompts: int = 3, max_len: int = 64,
               max_new: int = 12, on_event: EventSink = ignore,
               mlx_adapter: Path | None = None, full_model: Path | None = None
               ) -> VerifyReport:
    """Compare torch+PEFT with llama.cpp for this run (adapter GGUF, or a merged export).
    ``merged_f32``: the F32 merge for the exact check when ``merged`` is quantized (None: the
    merged file is F32 and is read for both). ``full_model``: a full fine-tuning run's HF weights; torch then runs them against the
    base (``hf_dir``), and ``merged``/``merged_f32`` are the GGUF made from them."""
    import gc

    from transformers import AutoTokenizer

    if (merged is None) == (adapter_gguf is None):
        raise ValueError("give exactly one of adapter_gguf / merged")
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    if man.chat_template:  # the prompts as the run rendered them (--chat-template too)
        tok.chat_template = man.chat_template
    samples = build_samples(tok, held_back_records(man, n_prompts), max_len,
                            man.hyperparameters.system_mode or "keep")
    if not samples:
        raise DataError(f"verify {run_dir}: no held-back examples to check with")
    steps = 4
    progress = lambda i, what: on_event(Progress("verify", i, steps, "", what))
    if full_model is not None:
        progress(0, "verify: torch, base and fully fine-tuned weights")
        t_base, t_tuned, t_greedy = torch_side_full(hf_dir, full_model, samples, max_new)
    elif mlx_adapter is not None:
        progress(0, "verify: mlx")
        t_base, t_tuned, t_greedy = mlx_side(hf_dir, mlx_adapter, samples, max_new)
    else:
        progress(0, "verify: torch + PEFT")
        t_base, t_tuned, t_greedy = torch_side(hf_dir, peft_dir, samples, max_new)
    gc.collect()  # the torch model goes before llama.cpp loads (PEFT keeps cycles)
    progress(1, "verify: llama.cpp, F32 base and tuned")
    f32 = f32_copy(base_gguf, man.base.sha256, on_event)
    # One llama.cpp model loaded at a time, each sample's logits compared as they come: what
    # stays are torch's two logits arrays per sample (and, for a merged file, the F32 base's).
    tally, r_greedy = Tally(), []
    if merged is not None:
        f_base = [row[0] for row in llama_side(f32, samples)]
        progress(2, "verify: llama.cpp, F32 merged")
        if merged_f32 is not None:
            for i, (f_tuned, _, _) in enumerate(llama_side(merged_f32, samples)):
                tally.add_effect(t_base[i], t_tuned[i], f_base[i], f_tuned)
        progress(3, f"verify: llama.cpp, {Path(merged).name}")
        for i, (r_tuned, ids, _) in enumerate(llama_side(merged, samples, None, max_new)):
            if merged_f32 is None:  # the file is F32 itself: it is what the exact check reads
                tally.add_effect(t_base[i], t_tuned[i], f_base[i], r_tuned)
            tally.add_file(t_base[i], t_tuned[i], f_base[i], r_tuned)
            tally.add_tuned(t_tuned[i], r_tuned)
            r_greedy.append(ids)
        del f_base
    else:
        for i, (f_tuned, _, f_base) in enumerate(llama_side(f32, samples, adapter_gguf,
                                                            base_too=True)):
            tally.add_effect(t_base[i], t_tuned[i], f_base, f_tuned)
        progress(3, f"verify: llama.cpp, {Path(base_gguf).name}")
        for i, (r_tuned, ids, _) in enumerate(llama_side(base_gguf, samples, adapter_gguf,
                                                         max_new)):
            tally.add_tuned(t_tuned[i], r_tuned)
            r_greedy.append(ids)
    progress(4, "verified")
    err, top1, kl, n_pos = tally.effect_rel_err, tally.top1, tally.mean_kl, tally.positions
    in_file = tally.file_effect if merged is not None else None
    greedy = [{"prompt": s.prompt_text, "torch": tok.decode(a, skip_special_tokens=True),
               "llama_cpp": tok.decode(b, skip_special_tokens=True)}
              for s, a, b in zip(samples, t_greedy, r_greedy)]
    report = VerifyReport(effect_rel_err=err, top1=top1, kl=kl, n_prompts=len(samples),
                    n_positions=n_pos, checked="merged" if merged is not None else "adapter",
                    greedy=greedy, framework="mlx" if mlx_adapter is not None else
                    "torch" if full_model is not None else "torch+PEFT", file_effect=in_file,
                    effect_rms=tally.effect_rms)
    report.failures = [f.replace("torch+PEFT", report.framework)
                       for f in judge(err, top1, kl, file_effect=in_file,
                                      exact_on_file=merged is not None and merged_f32 is None)]
    return report


# --- a run checked: the verify command, and the short check train and export run -----------

def check_run(run: Path, base: Optional[Path] = None, merged: Optional[Path] = None,
              on_event: EventSink = ignore, n_prompts: int = 3, max_new: int = 12,
              merged_f32: Optional[Path] = None, adapter_gguf: Optional[Path] = None
              ) -> VerifyReport:
    """torch+PEFT vs llama.cpp on the held-back prompts of ``run`` (a run directory; a full
    fine-tuning run is checked against its model GGUF). ``merged``: check a merged export
    instead of the run's adapter GGUF (``merged_f32``: its F32 merge when it is quantized;
    None: remade here). ``adapter_gguf``: the adapter file to check (default: the run's).
    Returns the report (``report.ok``: within tolerance); raises EdgeTuneError (one line) when
    ``run`` is not a run directory or there is no GGUF base or file to check."""
    import tempfile

    run = Path(run)
    if run.suffix.lower() == ".gguf" and run.is_file():  # an adapter .gguf alone
        from edge_tune.converters.formats.validate import what_verify_can_check

        raise UsageError(what_verify_can_check(run, base or models.default_gguf()))
    if run.is_dir() and (full := _full_run(run)) is not None:
        return _verify_full(run, full, base, merged, on_event, n_prompts, max_new, merged_f32)
    peft_dir, man = peft_adapter(run)
    if man is None:
        raise DataError(f"{run}: verify needs an edge-tune run directory (its manifest.json "
                        "names the data and the base)")
    mlx_adapter = _mlx_side_for(run, man)
    _, base_gguf = conversion_base(peft_dir, man, base)
    if base_gguf is None:
        raise UsageError(f"{run}: verify runs llama.cpp and needs a GGUF base: pass --base")
    if merged is not None:  # another model's file: one line, before llama.cpp decodes it
        check_same_model(Path(merged), Path(base_gguf))
    man_hf = man.base.hf_dir
    if man_hf and Path(man_hf, "config.json").is_file() and \
            (base is None or not man.base.gguf):
        hf_dir = Path(man_hf)
    else:
        hf_dir = models.dequantized_copy(Path(base_gguf), on_event)
    kw = dict(n_prompts=n_prompts, max_new=max_new, on_event=on_event, mlx_adapter=mlx_adapter)
    if merged is None:
        gg = adapter_gguf or (run / man.adapter.gguf if man.adapter.gguf else None)
        if gg is None or not Path(gg).is_file():
            raise DataError(f"{run}: no adapter.gguf to verify; run `edge-tune export {run}`")
        report = verify_run(run, man, peft_dir, Path(base_gguf), hf_dir,
                            adapter_gguf=Path(gg), **kw)
    elif merged_f32 is not None or _is_f32(Path(merged)):
        report = verify_run(run, man, peft_dir, Path(base_gguf), hf_dir,
                            merged=Path(merged), merged_f32=merged_f32, **kw)
    else:  # quantized: the exact check needs the F32 merge; remake it (seconds, small models)
        from edge_tune.converters.formats import merge as merge_mod
        from edge_tune.converters.formats.peft_to_gguf import read_peft_dir

        config, tensors = read_peft_dir(peft_dir)
        with tempfile.TemporaryDirectory(prefix="edge-tune-verify-") as work:
            f32 = Path(work) / "merged-f32.gguf"
            merge_mod.merge(Path(base_gguf), config, tensors, f32, "F32", str(peft_dir),
                            on_event)
            report = verify_run(run, man, peft_dir, Path(base_gguf), hf_dir,
                                merged=Path(merged), merged_f32=f32, **kw)
    on_event(Done("verify", {"ok": report.ok}))
    return report


def _is_f32(gguf_file: Path) -> bool:
    """Whether a GGUF's tensors are all F32 (``general.file_type`` 0, llama_ftype ALL_F32)."""
    from edge_tune.converters.formats.gguf_header import gguf_metadata

    return gguf_metadata(gguf_file, {"general.file_type"}).get("general.file_type") == 0


def _full_run(run: Path):
    from edge_tune import manifest as manifest_mod

    man = manifest_mod.read(run)
    return man if man is not None and man.full else None


def _verify_full(run: Path, man, base: Optional[Path], merged: Optional[Path],
                 on_event: EventSink, n_prompts: int, max_new: int,
                 merged_f32: Optional[Path]) -> VerifyReport:
    """A full fine-tuning run: torch on the base and on the trained weights against llama.cpp
    on the base GGUF's F32 copy and on the model GGUF (``merged``, default the run's), with
    the exact comparison on an F32 conversion of the trained weights (made here unless
    given)."""
    import tempfile

    from edge_tune.adapters import run_base_gguf
    from edge_tune.converters.integrations import hf_to_gguf

    base_gguf = Path(base) if base is not None else run_base_gguf(man)
    if base_gguf is None:
        raise UsageError(f"{run}: verify compares against the base in llama.cpp and needs "
                         "a GGUF base: pass --base BASE.gguf")
    model_dir = run / (man.model.hf if man.model is not None else "model")
    shipped = Path(merged) if merged is not None else \
        run / (man.model.gguf if man.model is not None and man.model.gguf else "model.gguf")
    if not shipped.is_file():
        raise DataError(f"{shipped}: no model GGUF to verify; run `edge-tune export {run}`")
    check_same_model(shipped, base_gguf)
    man_hf = man.base.hf_dir
    hf_dir = Path(man_hf) if man_hf and Path(man_hf, "config.json").is_file() and base is None \
        else models.dequantized_copy(Path(base_gguf), on_event)
    kw = dict(n_prompts=n_prompts, max_new=max_new, on_event=on_event, full_model=model_dir)
    with tempfile.TemporaryDirectory(prefix="edge-tune-verify-") as work:
        if merged_f32 is None and not _is_f32(shipped):  # an F32 file is read for both
            merged_f32 = hf_to_gguf.convert(model_dir, Path(work) / "model-f32.gguf", "f32")
        report = verify_run(run, man, model_dir, base_gguf, hf_dir, merged=shipped,
                            merged_f32=merged_f32, **kw)
    on_event(Done("verify", {"ok": report.ok}))
    return report


def _mlx_side_for(run: Path, man) -> Optional[Path]:
    """An mlx run is checked against mlx itself (its native adapter) where mlx is installed;
    elsewhere against torch+PEFT with the run's PEFT copy."""
    from edge_tune.hardware import missing_modules

    native = man.adapter.mlx
    if man.backend != "mlx" or not native or missing_modules("mlx", "mlx_lm"):
        return None
    return run / native


def verify_hook(run: Path, base: Optional[Path], on_event: EventSink,
                merged: Optional[Path] = None, merged_f32: Optional[Path] = None,
                adapter_gguf: Optional[Path] = None, raise_on_fail: bool = True
                ) -> VerifyReport:
    """The short check ``train`` and ``export`` run by default: two prompts, a few tokens.
    Out of tolerance is CheckFailed (exit 1); with ``raise_on_fail`` False the report comes
    back instead (``report.ok``), for callers that decide what happens to the file.
    ``report.summary`` is the one-line result either way."""
    report = check_run(run, base=base, merged=merged, on_event=on_event, n_prompts=2,
                       max_new=8, merged_f32=merged_f32, adapter_gguf=adapter_gguf)
    in_file = report.file_effect
    summary = (f"verify: {'fine-tuning' if report.framework == 'torch' else 'adapter'} "
               f"effect error {report.effect_rel_err:.2e}, "
               f"{'' if in_file is None else f'file effect {in_file:.2f}, '}top-1 "
               f"{report.top1:.0%}, mean KL {report.kl:.4f} on "
               f"{report.n_prompts} held-back prompts")
    report.summary = summary
    if not report.ok:
        if raise_on_fail:
            raise CheckFailed(f"{summary}: out of tolerance: {'; '.join(report.failures)}")
        return report
    on_event(Log(summary + " (ok)"))
    if report.no_effect:
        on_event(Log(no_effect_line(report), "warning"))
    return report


def no_effect_line(report: VerifyReport) -> str:
    """The warning for an adapter that changes nothing (``report.no_effect``)."""
    return (f"verify: the {'fine-tuning' if report.framework == 'torch' else 'adapter'} has no "
            f"effect (logits change by {report.effect_rms:.1e} RMS): the run learnt nothing, "
            "so the effect check above compares nothing")
