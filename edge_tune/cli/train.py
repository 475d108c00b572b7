"""``edge-tune train`` and ``plan``: their flags are :class:`~edge_tune.config.TrainConfig`'s
fields, each spelled, typed and explained by the field's metadata (``config.option``)."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from edge_tune.cli.common import err, out, setting
from edge_tune.config import TrainConfig, cli_flags
from edge_tune.errors import UsageError

KEYWORD = inspect.Parameter.KEYWORD_ONLY


def _own(name: str, kind, *decls: str, default=None, **option) -> inspect.Parameter:
    """A command's option that is no setting of the run (``--config``, ``--json``)."""
    return inspect.Parameter(name, KEYWORD, default=default,
                             annotation=Annotated[kind, typer.Option(*decls, **option)])


def _flags(skip: tuple[str, ...] = (), after: Optional[dict] = None,
           last: tuple = ()) -> inspect.Signature:
    """The signature typer reads a command's flags from: one per setting that has a flag, in
    TrainConfig's order, less ``skip``; the command's own options placed ``after`` the
    setting each is keyed by (a tuple of them), then ``last``."""
    params = []
    for f in dataclasses.fields(TrainConfig):
        if f.name not in skip and cli_flags(f):
            params.append(inspect.Parameter(f.name, KEYWORD, default=None,
                                            annotation=setting(f.name)))
        if f.name in (after or {}):
            params.extend(after[f.name])
    return inspect.Signature([*params, *last])


def _settings(given: dict) -> dict:
    """The flags' values as :func:`edge_tune.config.build` takes them: paths as text; a
    repeatable flag not given is None, as every other one."""
    return {name: str(v) if isinstance(v, Path) else (v or None) if isinstance(v, list) else v
            for name, v in given.items()}


CONFIG = _own("config", Optional[Path], "--config", "-c",
              help="A TOML or YAML file of these settings (flags win): edge-tune's keys, or "
                   "those of Axolotl, LLaMA-Factory, Unsloth, mlx-lm or TRL, each mapped and "
                   "said on stderr (docs/coming-from.md).")
STRICT = _own("strict", bool, "--strict", default=False,
              help="With --config: refuse (exit 2) a key edge-tune cannot honour instead of "
                   "warning and ignoring it.")


def _build(config: Optional[Path], strict: bool, settings: dict):
    """The run's settings (:func:`edge_tune.config.build`), what the config file's keys became
    said on stderr."""
    from edge_tune.config import build

    return build(config, strict=strict, say=lambda line: err.print(line, markup=False,
                                                                    highlight=False),
                 **settings)
RESUME = _own("resume", Optional[Path], "--resume",
              help="Continue a cancelled run (its directory) from its checkpoint, with its own "
                   "settings, to the same total steps; or finish one whose last steps failed "
                   "(disk full). Works from any directory; add --data PATH if its data moved.")


# --- train -----------------------------------------------------------------------------------

def train(*, config: Optional[Path] = None, strict: bool = False,
          resume: Optional[Path] = None, **given) -> None:
    """Train a LoRA adapter; writes RUN/adapter (PEFT), RUN/adapter.gguf, RUN/manifest.json.
    With --full, every weight trains: RUN/model (HF safetensors) and RUN/model.gguf instead.

    Ctrl-C (or SIGTERM) stops training and leaves RUN/checkpoint; `--resume RUN` continues
    it from any directory (`--data PATH` with it if the data moved), and finishes a run
    whose last steps failed (disk full) without training again.

    Examples:
      edge-tune train --data chats.jsonl                            # one process
      edge-tune train --data chats.jsonl --nproc 2 --batch-size 4   # batch 8
      edge-tune train --data chats.jsonl --full --lr 2e-5           # all weights"""
    from edge_tune import api
    from edge_tune.render import Renderer

    settings = _settings(given)
    moved = None  # --resume RUN --data PATH: where the run's data is now
    if resume is not None:
        moved, settings["data"] = settings.get("data"), None
        named = [k for k, v in settings.items() if v is not None] + (["config"] if config else [])
        if named:
            raise UsageError(f"--resume {resume}: continues the run with its own settings; "
                             f"drop --{named[0].replace('_', '-')} (only --data, to say where "
                             "its data is now, goes with it)")
        cfg = None
    else:
        cfg = _build(config, strict, settings)
    with Renderer(err) as render:
        result = api.train(cfg, render, resume=resume, **({"data": moved} if moved else {}))
    r = result.manifest.result
    val_text = f", validation loss {r.val_loss:.3f}" if r.val_loss is not None else ""
    out.print(f"[green]done[/] in {r.train_seconds:.0f}s: {r.steps} steps, final loss "
              f"{r.final_loss:.3f}{val_text}, {r.tokens_per_second:.0f} tok/s")
    out.print(f"run directory: [bold]{result.run_dir}[/]  (chat: edge-tune chat --adapter "
              f"{result.run_dir})")


train.__signature__ = _flags(after={"val_split": (CONFIG, STRICT), "save_every": (RESUME,)})


# --- plan ------------------------------------------------------------------------------------

def plan(*, config: Optional[Path] = None, strict: bool = False, as_json: bool = False,
         **given) -> None:
    """Predict a run's peak memory and time, and the settings `train` would change to fit
    this machine; loads no model.

    Takes the same options as `train`. `train` runs this plan first and refuses runs that
    cannot fit."""
    from edge_tune import api
    from edge_tune.render import Renderer
    from edge_tune.render.plan import render_plan

    cfg = _build(config, strict, _settings(given))
    with Renderer(err, quiet=as_json) as render:  # what reading the data says, on stderr
        report = api.plan(cfg, render)
    if as_json:
        out.print_json(json.dumps(report))
    else:
        render_plan(report, out)


# what only a run does, not its plan: checking, checkpointing and reporting once it runs
plan.__signature__ = _flags(skip=("verify", "save_every", "report_to"),
                            after={"val_split": (CONFIG, STRICT)},
                            last=(_own("as_json", bool, "--json", default=False,
                                       help="Machine-readable output."),))
