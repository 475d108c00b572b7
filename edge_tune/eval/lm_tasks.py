"""lm-evaluation-harness tasks on the llama.cpp engine itself: ``edge-tune eval --tasks``.

A task is lm-eval's own YAML (``task``, ``dataset_path``, ``doc_to_text``...) in a local file;
a ``data_files`` path (and a ``dataset_path`` folder) relative to the YAML is read from beside
it, and nothing is fetched from the hub (the ``HF_*_OFFLINE`` variables are set). lm-eval
runs in this process (its ``evaluate``, as ``simple_evaluate`` calls it) against
:func:`engine_lm`, an lm-eval model (``TemplateLM``) over an
:class:`~edge_tune.llama.engine.Engine` and an adapter set:

- log-likelihoods come from the engine's scoring context (the same numbers as the server's
  ``echo`` logprobs and as :meth:`Engine.logits`), with lm-eval's own context/continuation
  split (trailing spaces move to the continuation; no BOS added, as lm-eval's ``hf`` model
  does by default);
- rolling log-likelihoods (perplexity tasks) use lm-eval's windows over one sequence's
  context;
- ``generate_until`` answers greedily (temperature 0) with the task's ``until`` as stop
  strings.

``lm_eval`` is imported inside functions: it is a test/extra dependency (``pip install
'lm-eval[api]'``).
"""

from __future__ import annotations

import os
from pathlib import Path

from edge_tune.errors import DataError, UsageError

OFFLINE = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def _lm_eval():
    for var in OFFLINE:  # before datasets is imported: it reads them once
        os.environ.setdefault(var, "1")
    try:
        import lm_eval
    except ImportError:
        raise UsageError("--tasks needs lm-evaluation-harness: pip install "
                         "'lm-eval[api]>=0.4.8,<0.5'") from None
    return lm_eval


def load_tasks(path: Path) -> list[dict]:
    """The task configs of ``path``: one lm-eval task YAML, or every ``*.yaml`` in a folder
    (sorted by name), relative data paths resolved against each YAML's folder. Raises
    UsageError for a missing path, DataError for a YAML that is not one task."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"--tasks {path}: no such file or folder")
    _lm_eval()
    from lm_eval.tasks._yaml_loader import load_yaml

    files = sorted(path.glob("*.yaml")) + sorted(path.glob("*.yml")) if path.is_dir() \
        else [path]
    if not files:
        raise UsageError(f"--tasks {path}: no *.yaml task file in this folder")
    configs = []
    for f in files:
        try:
            cfg = load_yaml(f)
        except Exception as exc:  # yaml's errors, a bad include, a missing !function file
            said = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(f"{f}: not a readable lm-eval task YAML ({said})") from None
        if not isinstance(cfg.get("task"), str):
            raise DataError(f"{f}: expected one lm-eval task (a 'task: NAME' YAML); groups "
                            "are not supported, give their tasks' files")
        configs.append(_resolved(cfg, f.parent))
    return configs


def _resolved(cfg: dict, folder: Path) -> dict:
    """``cfg`` with relative ``dataset_kwargs.data_files`` (str, list or {split: str|list})
    and a relative local ``dataset_path`` folder made absolute from ``folder``."""
    def fix(p):
        if isinstance(p, list):
            return [fix(x) for x in p]
        if isinstance(p, str) and not Path(p).is_absolute() and (folder / p).exists():
            return str((folder / p).resolve())
        return p

    cfg = dict(cfg)
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    files = kwargs.get("data_files")
    if files is not None:
        kwargs["data_files"] = {k: fix(v) for k, v in files.items()} \
            if isinstance(files, dict) else fix(files)
        cfg["dataset_kwargs"] = kwargs
    if isinstance(cfg.get("dataset_path"), str) and (folder / cfg["dataset_path"]).is_dir():
        cfg["dataset_path"] = str((folder / cfg["dataset_path"]).resolve())
    return cfg


def engine_lm(engine, mix: tuple = ()):
    """An lm-eval model (``lm_eval.api.model.TemplateLM``) over ``engine`` under adapter set
    ``mix`` (``((name, scale), ...)``; empty: the base)."""
    _lm_eval()
    from lm_eval.api.model import TemplateLM

    class EngineLM(TemplateLM):
        def __init__(self) -> None:
            super().__init__()
            self.engine = engine
            self.mix = tuple(mix)

        @property
        def eot_token_id(self) -> int:
            return engine.llm.token_eos()

        @property
        def prefix_token_id(self) -> int:
            bos = engine.llm.token_bos()
            return bos if bos >= 0 else self.eot_token_id

        @property
        def max_length(self) -> int:
            return engine.llm.sequence_tokens

        def tok_encode(self, string: str, **kwargs) -> list[int]:
            # add_special_tokens (kwargs) asks for a BOS: never added, as lm-eval's hf model
            return engine.tokenize(string, special=True)

        def _score(self, tokens: list[int], first: int) -> tuple[float, bool]:
            """(sum of the logprobs of ``tokens[first:]``, whether each is the argmax)."""
            scorer = engine.side("score")
            with scorer.lock:  # as Engine.prompt_logprobs: no adapter freed meanwhile
                adapters, scales = engine.adapter_pointers(self.mix)
                scored = scorer.score(tokens, adapters, scales, top=1)
            total, greedy = 0.0, True
            for i in range(max(first, 1), len(tokens)):
                lp, best = scored[i - 1]
                total += lp
                greedy = greedy and best[0][0] == tokens[i]
            return total, greedy

        def _loglikelihood_tokens(self, requests, **kwargs):
            out = []
            for _, context_enc, continuation_enc in requests:
                whole = (context_enc + continuation_enc)[-self.max_length:]
                out.append(self._score(whole, len(whole) - len(continuation_enc)))
            return out

        def loglikelihood_rolling(self, requests, **kwargs):
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

            out = []
            for (text,) in (r.args for r in requests):
                total = 0.0
                for ctx, pred in map(make_disjoint_window, get_rolling_token_windows(
                        self.tok_encode(text), self.prefix_token_id, self.max_length, 1)):
                    got, _ = self._score(ctx + pred, len(ctx))
                    total += got
                out.append(total)
            return out

        def generate_until(self, requests, **kwargs):
            engine.activate_mix(self.mix)
            out = []
            for context, kw in (r.args for r in requests):
                until = kw.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                pieces = engine.generate(prompt=context, temperature=0.0,
                                         max_tokens=int(kw.get("max_gen_toks", 256)),
                                         stop=until[:4] or None)
                out.append("".join(p.text for p in pieces))
            return out

    return EngineLM()


def run_tasks(engine, mix: tuple, configs: list[dict], limit: int | None = None) -> dict:
    """``{task: {"n": examples, "metrics": {name: value}, "stderr": {name: value},
    "higher_is_better": {name: bool | None}}}`` of
    ``configs`` (:func:`load_tasks`) on ``engine`` under ``mix``; ``limit``: at most this
    many examples a task. Raises DataError when lm-eval cannot load a task's data."""
    import logging
    import random

    import jinja2
    import numpy as np

    _lm_eval()
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import TaskManager

    for name in ("lm_eval", "lm-eval"):  # its INFO lines would bury edge-tune's own
        logging.getLogger(name).setLevel(logging.WARNING)
    # lm-eval's evaluate() as simple_evaluate() calls it, without what needs torch (its
    # seed, an environment report: seconds of imports) or a model name: the same seeds,
    # few-shot default and samples
    random.seed(0)
    np.random.seed(1234)
    try:
        loaded = TaskManager(include_defaults=False).load([dict(c) for c in configs])
        for task in loaded["tasks"].values():
            if task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=1234)
        quiet = os.environ.get("TQDM_DISABLE")
        os.environ["TQDM_DISABLE"] = "1"  # lm-eval's progress bars: edge-tune shows its own
        try:
            raw = evaluate(lm=engine_lm(engine, mix), task_dict=loaded, limit=limit,
                           bootstrap_iters=1000, log_samples=False, verbosity="WARNING")
        finally:
            if quiet is None:
                os.environ.pop("TQDM_DISABLE", None)
            else:
                os.environ["TQDM_DISABLE"] = quiet
    except (FileNotFoundError, ValueError, ConnectionError) as exc:
        said = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"lm-eval could not run the tasks: {said}") from None
    except (jinja2.TemplateError, KeyError) as exc:  # a task's doc_to_* against its data
        said = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"a task's template does not fit its data ({type(exc).__name__}: "
                        f"{said})") from None
    out = {}
    for task, values in raw["results"].items():
        metrics, stderr = {}, {}
        for key, value in values.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue
            name, _, filt = key.partition(",")
            label = name if filt == "none" else f"{name} ({filt})"
            if name.endswith("_stderr"):
                stderr[label.replace("_stderr", "", 1)] = value
            else:
                metrics[label] = value
        n = raw.get("n-samples", {}).get(task, {}).get("effective")
        better = raw.get("higher_is_better", {}).get(task, {})
        out[task] = {"n": n, "metrics": metrics, "stderr": stderr,
                     "higher_is_better": {k: better.get(k.split(" (")[0]) for k in metrics}}
    return out
