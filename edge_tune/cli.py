"""The ``edge-tune`` command: parse flags, call :mod:`edge_tune.api`, render events.

No heavy import happens at module level (``tests/unit/test_import_hygiene.py``), so ``--help`` is
instant. A user-facing failure is one line on stderr and the exit code of its kind
(:class:`edge_tune.errors.ExitCode`: 2 bad input, 1 a failed check, 3 network, 130 cancelled)
— never a traceback.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from edge_tune.errors import EdgeTuneError, ExitCode, UsageError

app = typer.Typer(
    name="edge-tune",
    help="Fine-tune a small LLM on your own data and run it offline.\n\n"
         "Typical flow: doctor -> train -> chat. Run `edge-tune demo` to see it all on the "
         "embedded SmolLM2-135M-Instruct model.",
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
out = Console()
err = Console(stderr=True)


@app.callback(invoke_without_command=True)
def _root(ctx: typer.Context) -> None:
    """With no command, open the terminal UI (the same as `edge-tune tui`)."""
    if ctx.invoked_subcommand is None:
        _open_tui(Path("runs"))


def _open_tui(runs: Path) -> None:
    try:
        import textual  # noqa: F401 - imported here only: --help and the core stay light
    except ImportError:
        raise UsageError("the terminal UI needs textual: pip install 'edge-tune[tui]' (or "
                         "run `edge-tune --help` for the commands)") from None
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UsageError("the terminal UI needs an interactive terminal; run "
                         "`edge-tune --help` for the commands")
    from edge_tune.tui import run

    run(runs_root=str(runs))


# --- options several commands share ----------------------------------------------------------

TEMPLATE_HELP = ("Chat template to render conversations with instead of the model's own: a "
                 "built-in name (chatml, smollm2, llama3, qwen2, qwen3, gemma, gemma2, phi3, "
                 "mistral) or a Jinja file. A run stores the one it trained with; chat, serve, verify, "
                 "bundle and export use it without being told again.")
DATA_HELP = ("Training data, repeatable to mix sources: a .jsonl, .json, .csv, .tsv, "
             ".parquet, .txt or .arrow file; a folder (train, valid, test files: train trains, valid "
             "validates, test is left for `eval`; else every file trains); a datasets "
             "save_to_disk folder; a hub ID NAME[:CONFIG][@SPLIT] read from the local HF cache. "
             "SOURCE*W weights a source (0.5 = a seeded half, 2 = twice). Formats: OpenAI "
             "messages, ShareGPT, Alpaca, prompt/completion, text, preference pairs "
             "(docs/data.md).")
COLUMNS_HELP = ("Rename source columns to the keys edge-tune reads, e.g. "
                "question=prompt,answer=completion (every source; a missing column is an error).")
MAX_SAMPLES_HELP = "Read only the first N records of each source."
SYSTEM_MODE_HELP = ("keep (system messages as the template renders them) | fold (into the "
                    "first user turn, for templates that reject the system role).")
REASONING_HELP = ("What to train of an assistant message's reasoning (reasoning_content or "
                  "thinking): auto (the chat template renders it, as qwen3 does; a template "
                  "that would drop it is refused) | inline (written into the answer between "
                  "the model's think markers, <think> and </think>) | drop (answers only) "
                  "[default: auto].")


# --- doctor ----------------------------------------------------------------------------------

@app.command()
def doctor(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Detect the hardware and show which training backend `auto` picks, and why."""
    from edge_tune import api
    from edge_tune.render.doctor import render_doctor

    report = api.doctor()
    if as_json:
        out.print_json(json.dumps(report))
    else:
        render_doctor(report, out)


# --- train -----------------------------------------------------------------------------------

@app.command()
def train(
    data: Optional[list[str]] = typer.Option(None, "--data", "-d", metavar="SOURCE",
                                             help=DATA_HELP),
    columns: Optional[str] = typer.Option(None, "--columns", metavar="SRC=KEY,...",
                                          help=COLUMNS_HELP),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", metavar="N",
                                              help=MAX_SAMPLES_HELP),
    data_format: Optional[str] = typer.Option(None, "--format", help="auto | openai | sharegpt "
                                              "| alpaca | completion | text [default: auto]."),
    skip_invalid: Optional[bool] = typer.Option(None, "--skip-invalid", help="Skip bad records "
                                                "(listed) instead of stopping at the first."),
    train_on: Optional[str] = typer.Option(None, help="assistant (loss on assistant turns "
                                           "only) | all [default: assistant]."),
    overflow: Optional[str] = typer.Option(None, help="Examples longer than --seq-len: "
                                           "truncate | drop [default: truncate]; counted and "
                                           "reported either way."),
    pack: Optional[bool] = typer.Option(None, "--pack/--no-pack", help="Pack each batch into "
                                        "as few rows of --seq-len tokens as fit, attention kept "
                                        "inside each example; --no-pack pads length-grouped "
                                        "batches instead [default: pack]."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="'default' (embedded "
                                        "SmolLM2-135M), a .gguf file, an HF model directory, "
                                        "or a hub ID."),
    backend: Optional[str] = typer.Option(None, help="auto | cpu | mlx | unsloth."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory "
                                           "(default runs/run-DATE-TIME)."),
    epochs: Optional[float] = typer.Option(None, help="Passes over the data [default: 2]."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after N optimizer steps "
                                            "(overrides --epochs)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate [default: 1e-3; 2e-5 "
                                       "with --full]."),
    rank: Optional[int] = typer.Option(None, help="LoRA rank r [default: 16]."),
    alpha: Optional[float] = typer.Option(None, help="LoRA alpha; scale = alpha/r "
                                          "[default: 32]."),
    batch_size: Optional[int] = typer.Option(None, help="Examples per step [default: 8]."),
    grad_accum: Optional[int] = typer.Option(None, help="Batches per optimizer step "
                                             "(effective batch = batch-size x this) "
                                             "[default: 1; raised by the planner to fit]."),
    grad_checkpoint: Optional[bool] = typer.Option(None, "--grad-checkpoint/"
                                                   "--no-grad-checkpoint", help="Recompute each "
                                                   "block in backward: far less memory, ~1/3 "
                                                   "slower [default: off; on if needed to fit]."),
    memory_gib: Optional[float] = typer.Option(None, help="Memory budget for the planner in "
                                               "GiB [default: what is free now]."),
    precision: Optional[str] = typer.Option(None, help="auto (bf16 where the CPU has it) | "
                                            "bf16 | fp32 [default: auto]."),
    seq_len: Optional[int] = typer.Option(None, help="Max tokens per example; longer ones "
                                          "are truncated [default: 512]."),
    seed: Optional[int] = typer.Option(None, help="Random seed [default: 0]."),
    val: Optional[Path] = typer.Option(None, "--val", help="Validation data (same format); "
                                       "validation loss is reported during training."),
    val_split: Optional[float] = typer.Option(None, help="Or hold out this share of --data "
                                              "for validation, e.g. 0.1."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="run.toml with any of "
                                          "these options (flags win)."),
    verify: Optional[bool] = typer.Option(None, "--verify/--no-verify", help="After training, "
                                          "check llama.cpp against torch+PEFT on held-back "
                                          "prompts; out of tolerance exits 1 [default: on]."),
    save_every: Optional[int] = typer.Option(None, help="Save a resumable checkpoint "
                                             "(RUN/checkpoint) every N steps; one is always "
                                             "saved on cancel (default 50)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue a cancelled run "
                                          "(its directory) from its checkpoint, with its own "
                                          "settings, to the same total steps; or finish one "
                                          "whose last steps failed (disk full). Works from "
                                          "any directory; add --data PATH if its data moved."),
    nproc: Optional[int] = typer.Option(None, "--nproc", help="Training processes on this "
                                        "machine, launched by torchrun (torch.distributed: "
                                        "gloo on CPU, NCCL with one GPU each for unsloth), "
                                        "each reading its shard; the global batch is "
                                        "batch-size x grad-accum x processes [default: 1]."),
    nnodes: Optional[int] = typer.Option(None, "--nnodes", help="Machines taking part (run "
                                         "the same command on each) [default: 1]."),
    rdzv: Optional[str] = typer.Option(None, "--rdzv", metavar="HOST:PORT", help="With "
                                       "--nnodes: the rendezvous address all nodes reach."),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", metavar="NAME|FILE",
                                                help=TEMPLATE_HELP + " Needed for chat data on "
                                                "a model without a template."),
    system_mode: Optional[str] = typer.Option(None, "--system-mode", metavar="keep|fold",
                                              help=SYSTEM_MODE_HELP + " [default: keep]"),
    reasoning: Optional[str] = typer.Option(None, "--reasoning", metavar="auto|inline|drop",
                                            help=REASONING_HELP),
    rslora: Optional[bool] = typer.Option(None, "--rslora/--no-rslora", help="Rank-stabilized "
                                          "LoRA: scale the update by alpha/sqrt(r) [default: "
                                          "off]."),
    dora: Optional[bool] = typer.Option(None, "--dora/--no-dora", help="Weight-decomposed LoRA "
                                        "(magnitude + direction); exports through --merge "
                                        "[default: off]."),
    lora_dropout: Optional[float] = typer.Option(None, metavar="P", help="Dropout on the LoRA "
                                                 "branch's input while training, 0 <= P < 1 "
                                                 "[default: 0]."),
    target_modules: Optional[str] = typer.Option(None, metavar="NAMES", help="Modules to adapt "
                                                 "inside each "
                                                 "block, comma-separated (q_proj,v_proj), or "
                                                 "all-linear [default: the seven projections]."),
    method: Optional[str] = typer.Option(None, "--method", metavar="sft|dpo|orpo", help="sft "
                                         "(supervised), or preference tuning on prompt/chosen/"
                                         "rejected pairs: dpo or orpo (cpu backend) "
                                         "[default: sft]."),
    desirable_only: Optional[bool] = typer.Option(None, "--desirable-only", help="KTO data "
                                                  "(records with 'label' or 'kto_tag'): train "
                                                  "only the desirable answers (label true) with "
                                                  "--method sft and say how many were left out; "
                                                  "without it such data is refused."),
    beta: Optional[float] = typer.Option(None, "--beta", help="DPO's beta (how far from the "
                                         "base the adapter may move) or ORPO's lambda (weight "
                                         "of the odds-ratio term) [default: 0.1]."),
    full: Optional[bool] = typer.Option(None, "--full/--no-full", help="Full fine-tuning: "
                                        "train every weight (AdamW) instead of a LoRA adapter; "
                                        "writes HF safetensors weights and a GGUF model; "
                                        "refused when weights, gradients and optimizer state "
                                        "do not fit the memory [default: off]."),
    replay: Optional[int] = typer.Option(None, "--replay", metavar="N", help="Keep the base's "
                                         "general behaviour: mix N general records (the base "
                                         "model's own answers to general prompts edge-tune "
                                         "ships, generated once in llama.cpp and cached) into "
                                         "training, so a narrow task does not take over every "
                                         "prompt. Measured on a narrow email-to-JSON task: "
                                         "40 took general prompts answered like the task from "
                                         "19 to 1 of 20 at no loss of task score; `edge-tune "
                                         "eval RUN` measures it (docs/eval.md, Forgetting) "
                                         "[default: 0, max 60]."),
    replay_kl: Optional[float] = typer.Option(None, "--replay-kl", metavar="WEIGHT",
                                              help="With --replay: also keep the base's whole "
                                              "next-token distribution on the replay answers "
                                              "(a KL-to-base term of this weight, the base "
                                              "being the model with the adapter off; cpu "
                                              "backend) [default: 0]."),
    report_to: Optional[str] = typer.Option(None, help="tensorboard | wandb | mlflow | none: "
                                            "where the run's metrics also go (tensorboard: "
                                            "RUN/tb; wandb offline) [default: tensorboard]; "
                                            "RUN/loss.png is always written."),
) -> None:
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
    from edge_tune.config import build
    from edge_tune.render import Renderer

    flags = dict(data=data or None, columns=columns, max_samples=max_samples,
                 format=data_format, skip_invalid=skip_invalid,
                 train_on=train_on, pack=pack, overflow=overflow, model=model, backend=backend,
                 out=str(out_dir) if out_dir else None, epochs=epochs, max_steps=max_steps,
                 lr=lr, rank=rank, alpha=alpha, batch_size=batch_size, seq_len=seq_len,
                 grad_accum=grad_accum, grad_checkpoint=grad_checkpoint, memory_gib=memory_gib,
                 precision=precision,
                 seed=seed, val=str(val) if val else None, val_split=val_split,
                 save_every=save_every, verify=verify, nproc=nproc, nnodes=nnodes, rdzv=rdzv,
                 chat_template=chat_template, system_mode=system_mode, reasoning=reasoning,
                 rslora=rslora,
                 dora=dora, lora_dropout=lora_dropout, target_modules=target_modules,
                 report_to=report_to, method=method, beta=beta, full=full, replay=replay,
                 replay_kl=replay_kl,
                 desirable_only=desirable_only)
    moved = None  # --resume RUN --data PATH: where the run's data is now
    if resume is not None:
        moved, flags["data"] = flags["data"], None
        given = [k for k, v in flags.items() if v is not None] + (["config"] if config else [])
        if given:
            raise UsageError(f"--resume {resume}: continues the run with its own settings; "
                             f"drop --{given[0].replace('_', '-')} (only --data, to say where "
                             "its data is now, goes with it)")
        cfg = None
    else:
        cfg = build(config, **flags)
    with Renderer(err) as render:
        result = api.train(cfg, render, resume=resume, **({"data": moved} if moved else {}))
    r = result.manifest.result
    val_text = f", validation loss {r.val_loss:.3f}" if r.val_loss is not None else ""
    out.print(f"[green]done[/] in {r.train_seconds:.0f}s: {r.steps} steps, final loss "
              f"{r.final_loss:.3f}{val_text}, {r.tokens_per_second:.0f} tok/s")
    out.print(f"run directory: [bold]{result.run_dir}[/]  (chat: edge-tune chat --adapter "
              f"{result.run_dir})")


# --- plan ------------------------------------------------------------------------------------

_NOT_PLAN_OPTIONS = ("verify", "save_every", "resume", "report_to")


def _plan(as_json: bool = False, **options) -> None:
    from edge_tune import api
    from edge_tune.config import build
    from edge_tune.render.plan import render_plan

    config = options.pop("config", None)
    out_dir = options.pop("out_dir", None)
    val = options.pop("val", None)
    flags = {("format" if k == "data_format" else k): v for k, v in options.items()}
    cfg = build(config, out=str(out_dir) if out_dir else None, val=str(val) if val else None,
                **flags)
    from edge_tune.render import Renderer

    with Renderer(err, quiet=as_json) as render:  # what reading the data says, on stderr
        report = api.plan(cfg, render)
    if as_json:
        out.print_json(json.dumps(report))
    else:
        render_plan(report, out)


def _register_plan() -> None:
    """`edge-tune plan` takes exactly train's options (one list to keep in sync: train's)."""
    import inspect
    import typing

    hints = typing.get_type_hints(train)
    params = [p.replace(annotation=hints[name])
              for name, p in inspect.signature(train).parameters.items()
              if name not in _NOT_PLAN_OPTIONS]
    params.append(inspect.Parameter(
        "as_json", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
        default=typer.Option(False, "--json", help="Machine-readable output.")))

    def plan(**kw) -> None:
        _plan(**kw)

    plan.__signature__ = inspect.Signature(params)  # typer reads the options from here
    plan.__doc__ = ("Predict a run's peak memory and time, and the settings `train` would change "
                    "to fit this machine; loads no model.\n\nTakes the same options as "
                    "`train`. `train` runs this plan first and refuses runs that cannot fit.")
    app.command("plan")(plan)


_register_plan()


# --- export ----------------------------------------------------------------------------------

@app.command()
def export(
    adapter: Path = typer.Argument(..., help="A run directory or any PEFT adapter directory."),
    base: Optional[Path] = typer.Option(None, help="Base model (.gguf or HF dir); default: "
                                        "the run's base."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output .gguf "
                                          "[default: RUN/adapter.gguf]."),
    outtype: Optional[str] = typer.Option(None, help="Tensor type of the adapter GGUF: f32 | "
                                          "f16 | q8_0 [default: f32]; with --merge, the same "
                                          "as -q."),
    merge: bool = typer.Option(False, "--merge", help="Write ONE GGUF with the adapter merged "
                               "into the base weights (W + scale*B*A; rsLoRA and DoRA too) "
                               "instead of an adapter file [default: RUN/merged-QUANT.gguf]."),
    quant: Optional[str] = typer.Option(None, "--quant", "-q", help="With --merge: F32 | F16 | "
                                        "BF16 | Q8_0 | Q6_K | Q5_K_M | Q4_K_M | Q4_0 | ... "
                                        "(llama.cpp's own quantizer), or auto: the smallest of "
                                        "Q4_K_M, Q5_K_M, Q6_K, Q8_0, F16 whose check passes "
                                        "[default: F16]."),
    ollama: Optional[Path] = typer.Option(None, "--ollama", help="Also write an Ollama "
                                          "Modelfile (FROM/ADAPTER/TEMPLATE/stop) into DIR."),
    system: Optional[str] = typer.Option(None, "--system", help="With --ollama: the "
                                         "Modelfile's SYSTEM prompt."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check a run's export: "
                                "llama.cpp against torch+PEFT on held-back prompts (see "
                                "`edge-tune verify`). A merged model that fails is not "
                                "written at its name: it is kept as NAME.rejected.gguf, the "
                                "cause in NAME.rejected.txt (exit 1)."),
    vllm: Optional[Path] = typer.Option(None, "--vllm", help="Instead of GGUF: copy the PEFT "
                                        "adapter to DIR/NAME for vLLM, write DIR/serve.sh and "
                                        "print the `vllm serve ... --enable-lora` command."),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", metavar="NAME|FILE",
                                                help="With --ollama / --merge: the template "
                                                "for the Modelfile's TEMPLATE (and a merged "
                                                "GGUF whose base has none) [default: the "
                                                "run's]."),
) -> None:
    """Convert a PEFT LoRA adapter to a GGUF LoRA adapter for llama.cpp, or (--merge) write a
    merged, optionally quantized GGUF. A full fine-tuning run (train --full) exports its
    model: RUN/model-QUANT.gguf (-q, default F16).

    Examples:
      edge-tune export runs/demo                        # RUN/adapter.gguf
      edge-tune export runs/demo --merge -q Q4_K_M      # RUN/merged-q4_k_m.gguf
      edge-tune export runs/demo --merge -q auto        # smallest type that passes
      edge-tune export runs/demo --merge --ollama out/  # plus out/Modelfile
      edge-tune export runs/demo --vllm out/vllm        # PEFT dir, `vllm serve`
      edge-tune export runs/full -q Q8_0                # a full run: RUN/model-q8_0.gguf"""
    from edge_tune import api
    from edge_tune.render import Renderer

    if merge and outtype is not None:  # --outtype f32 --merge means a merged F32 GGUF
        if quant is not None and quant.upper() != outtype.upper():
            raise UsageError(f"--outtype {outtype} and -q {quant}: with --merge both set the "
                             "merged GGUF's type; give one")
        quant = outtype.upper()
    with Renderer(err) as render:
        result = api.export(adapter, base=base, out=output, outtype=outtype or "f32",
                            on_event=render,
                            merge=merge, quant=quant, ollama=ollama, verify=verify,
                            system=system, vllm=vllm, chat_template=chat_template)
    if vllm is not None:
        print(result.command)  # plain stdout: `$(edge-tune export RUN --vllm DIR)` runs it


# --- convert-base ----------------------------------------------------------------------------

@app.command("convert-base")
def convert_base(
    model: str = typer.Argument(..., help="An HF model directory (config.json + "
                                "*.safetensors) or a hub ID."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output .gguf "
                                          "[default: NAME-OUTTYPE.gguf here]."),
    outtype: str = typer.Option("f16", help="f32 | f16 | bf16 | q8_0, or any --quant type of "
                                "`export --merge` (Q4_K_M, Q5_K_M, ...)."),
) -> None:
    """Convert an HF safetensors model to a GGUF base for llama.cpp (weights, tokenizer,
    special tokens, chat template).

    Uses llama.cpp's own convert_hf_to_gguf.py from the installed llama-cpp-python's sdist, so
    converter and runtime agree. It runs offline from the cache, where `make install` (or
    `edge-tune fetch-converter`) put it; with a hub ID it is fetched if missing."""
    from edge_tune import api
    from edge_tune.render import Renderer

    with Renderer(err) as render:
        path = api.convert_base(model, out=output, outtype=outtype, on_event=render)
    out.print(f"base GGUF: [bold]{path}[/]  (train on it: edge-tune train --model {path})")


@app.command("fetch-converter")
def fetch_converter(
    sdist: Optional[Path] = typer.Option(None, "--sdist", help="A local llama_cpp_python-"
                                         "VERSION.tar.gz (the installed version) instead of "
                                         "pip."),
) -> None:
    """Put llama.cpp's convert_hf_to_gguf.py in the cache, once per llama-cpp-python version
    (install time; `make install` runs it), so convert-base needs no network.

    Taken from the installed llama-cpp-python's own sdist (pip download, or --sdist), so the
    converter matches the runtime that serves its files."""
    from edge_tune import api
    from edge_tune.render import Renderer

    with Renderer(err) as render:
        path = api.fetch_converter(sdist, on_event=render)
    out.print(f"converter: [bold]{path}[/]")


# --- verify ----------------------------------------------------------------------------------

@app.command()
def verify(
    run: Path = typer.Argument(..., help="A run directory (manifest.json names its data and "
                               "base)."),
    base: Optional[Path] = typer.Option(None, help="Base GGUF to check on [default: the "
                                        "run's base]."),
    merged: Optional[Path] = typer.Option(None, "--merged", help="Check this merged export "
                                          "(from `export --merge`) instead of adapter.gguf."),
    prompts: int = typer.Option(3, "--prompts", "-n", help="Held-back examples to use."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable report."),
) -> None:
    """Check that llama.cpp runs what was trained: torch+PEFT vs llama.cpp on held-back
    prompts from the run's validation data (else its training data).

    Reports the relative error of the adapter's effect on an F32 copy of the base (exact:
    catches wrong alpha, rsLoRA scale, q/k layout), top-1 agreement and mean KL of the tuned
    model on the real (quantized) base, and greedy answers side by side. Exit 0 only within
    tolerance, 1 when out of it."""
    from edge_tune import api
    from edge_tune.render import Renderer

    with Renderer(err, quiet=as_json) as render:
        report = api.verify(run, base=base, merged=merged, on_event=render, n_prompts=prompts)
    if as_json:
        out.print_json(json.dumps(report.to_dict()))
    else:
        from rich.table import Table

        t = report.tolerance
        out.print(f"checked: {report.checked} on {report.n_prompts} held-back prompts "
                  f"({report.n_positions} positions)")
        out.print(f"  adapter effect, F32 base: relative error {report.effect_rel_err:.2e}"
                  f"  (limit {t['effect_rel_err']})")
        out.print(f"  tuned model, real base:   top-1 agreement {report.top1:.1%}"
                  f" (min {t['top1_min']:.0%}), mean KL {report.kl:.4f} "
                  f"(max {t['kl_max']})")
        table = Table("prompt", report.framework, "llama.cpp",
                      title="greedy answers")
        for g in report.greedy:
            table.add_row(g["prompt"][-60:].strip(), g["torch"], g["llama_cpp"])
        out.print(table)
        out.print("[green]ok[/]: within tolerance" if report.ok else
                  "[red]out of tolerance[/]: " + "; ".join(report.failures))
    if not report.ok:
        raise typer.Exit(ExitCode.FAILED)


# --- eval ------------------------------------------------------------------------------------

@app.command("eval")
def eval_(
    run: Path = typer.Argument(..., help="A run directory (or its adapter.gguf): its manifest "
                               "names the base, chat template and held-out data."),
    data: Optional[Path] = typer.Option(None, "--data", help="Held-out examples (any format "
                                        "train reads) [default: the run's validation data]."),
    merged: Optional[Path] = typer.Option(None, "--merged", help="Evaluate this merged GGUF "
                                          "(from `export --merge`) instead of base + "
                                          "adapter.gguf."),
    max_tokens: int = typer.Option(64, "--max-tokens", help="Max tokens per generated answer."),
    prompts: int = typer.Option(32, "--prompts", "-n", help="At most this many held-out "
                                "records."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable report."),
) -> None:
    """Did the fine-tune get better at its task, and did it break anything else? Base and
    tuned side by side in llama.cpp (what ships).

    Reports held-out loss and perplexity per trained token, greedy answers scored against the
    references (exact match, contains, ROUGE-L, valid JSON where the reference is JSON), and
    drift: mean KL(base || tuned) over the base's greedy answers to general prompts shipped
    with edge-tune, and the share of those answers that changed. See docs/eval.md."""
    from edge_tune import api
    from edge_tune.render import Renderer

    with Renderer(err, quiet=as_json) as render:
        report = api.evaluate(run, data=data, merged=merged, max_tokens=max_tokens,
                          n_prompts=prompts, on_event=render).to_dict()
    if as_json:
        out.print_json(json.dumps(report))
    else:
        from edge_tune.render.eval import render_eval

        render_eval(report, out)


# --- chat ------------------------------------------------------------------------------------

@app.command()
def chat(
    adapter: list[str] = typer.Option([], "--adapter", "-a", metavar="PATH[=SCALE]",
                                      help="A run directory or an adapter .gguf; none = the "
                                      "plain base. Repeat to mix adapters, each at its SCALE "
                                      "(default 1), as the server's 'adapters' field does."),
    adapter_scale: Optional[float] = typer.Option(None, "--adapter-scale", metavar="SCALE",
                                                  help="Scale of the one --adapter (-8 to 8; "
                                                  "0 = the base, 1 = as trained)."),
    base: Optional[str] = typer.Option(None, help="Base GGUF (default: the first run's base, "
                                       "else the embedded model)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Answer once and exit."),
    system: Optional[str] = typer.Option(None, help="System prompt [default: the one every "
                                         "training record of the run shared, if any]."),
    temperature: float = typer.Option(0.7, help="0 = greedy."),
    max_tokens: int = typer.Option(256, help="Max tokens per answer."),
    compare: Optional[str] = typer.Option(None, "--compare", metavar="OTHER", help="Answer "
                                          "each prompt twice, side by side: with --adapter and "
                                          "with OTHER ('base', or a second run dir / adapter "
                                          ".gguf; an adapter name with --bundle)."),
    bundle: Optional[Path] = typer.Option(None, help="Chat with a bundle made by `edge-tune "
                                          "bundle`; --adapter then names one of its adapters "
                                          "(checksums verified)."),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", metavar="NAME|FILE",
                                                help="Render the chat with this template "
                                                "(built-in name or Jinja file) [default: the "
                                                "run's, else the base GGUF's]."),
    system_mode: Optional[str] = typer.Option(None, "--system-mode", metavar="keep|fold",
                                              help=SYSTEM_MODE_HELP + " [default: the run's, "
                                              "else keep]"),
) -> None:
    """Chat with the base model plus an adapter (or a mix), through llama.cpp (streamed).

    The chat template is the run's (the one it trained with), else the base GGUF's; a model
    with neither answers as a plain text completion of the prompt (and says so).

    \b
      edge-tune chat --adapter runs/demo --prompt "What do bees make?"
      edge-tune chat --adapter runs/demo --compare base --prompt "Hi"
      edge-tune chat --adapter runs/demo --adapter-scale 0.5
      edge-tune chat --adapter runs/pirate=0.7 --adapter runs/legal=0.3
      edge-tune chat --bundle my-bundle --adapter pirate
    """
    from edge_tune import api
    from edge_tune.render import Renderer

    mix = api.parse_adapter_options(adapter, adapter_scale)
    if bundle is not None or compare is not None or len(mix) > 1 or \
            any(scale != 1.0 for _, scale in mix):
        plan, sides = api.chat_plan(mix or None, base, bundle, compare, chat_template,
                                    system_mode)
        engine = api.open_serving(plan, Renderer(err))
        base_name = plan.base.name
        title = f"{base_name} as {' | '.join(label for label, _ in sides)}"
    else:
        adapter = Path(mix[0][0]) if mix else None
        target = api.resolve_chat(adapter, base, chat_template, system_mode)
        engine = api.open_engine(target, Renderer(err))
        base_name, sides = target.base.name, None
        title = f"{base_name} + {target.adapter.name if target.adapter else 'base'}"
    try:
        from edge_tune.chat_session import ChatSession

        session = ChatSession(engine, sides, system=system, temperature=temperature,
                              max_tokens=max_tokens)
        for label in session.plain_sides():
            _say_plain(base_name if len(session.sides) == 1 else f"{base_name} ({label})")
        for text in session.training_systems():
            from edge_tune.server.plan import quote_system

            err.print(f"note: using the training system prompt: {quote_system(text)} "
                      "(override with --system)", highlight=False, soft_wrap=True,
                      markup=False)
        if prompt is not None:
            _say(session, prompt, check_empty=True)
            return
        from edge_tune.chat_session import HELP, command_of

        err.print(f"[dim]chatting with {title}; {HELP}[/]")
        for line in _prompts():
            command = command_of(line)
            if command == "exit":
                return
            if command == "reset":
                session.reset()
                continue
            if len(session.sides) == 1:
                sys.stdout.write("bot> ")
            try:
                _say(session, line)
            except EdgeTuneError as exc:  # the template refused this turn: say so, go on
                err.print(f"[bold red]error:[/] {_escape(str(exc))}", highlight=False,
                          soft_wrap=True)
    finally:
        engine.close()


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _say_plain(model: str) -> None:
    """One notice line when a model has no chat template: answers are plain completions."""
    from edge_tune.templates.choice import no_template_hint

    err.print(f"note: {model} has no chat template (nor the run): answering as a plain "
              f"text completion of the prompt; to chat, {no_template_hint()}",
              highlight=False, soft_wrap=True, markup=False)


def _say(session, text: str, check_empty: bool = False) -> None:
    """One message to the session, rendered: one side streams to stdout; two are shown side by
    side when both have answered. Ctrl-C stops the answer (what was said stays), not the chat;
    ``check_empty``: an empty answer is an error (``--prompt``)."""
    from edge_tune.chat_session import Answer, Token, require_text

    answers: list = []
    stream = session.ask(text)
    try:
        if len(session.sides) == 1:
            for event in stream:
                if isinstance(event, Token):
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
                else:
                    answers.append(event)
        else:
            for side in session.sides:
                with err.status(f"[dim]{side.label} is answering...[/]"):
                    answers.append(next(e for e in stream if isinstance(e, Answer)))
    except KeyboardInterrupt:
        stream.close()
        if check_empty:  # --prompt: Ctrl-C ends the command
            raise
        sys.stdout.write(" [stopped]\n")
        return
    except EdgeTuneError:
        if len(session.sides) == 1 and not check_empty:
            sys.stdout.write("\n")  # the error goes on a line of its own
        raise
    if len(session.sides) == 1:
        sys.stdout.write("\n")
    else:
        from rich.table import Table

        table = Table(show_lines=False, expand=True)
        for side in session.sides:
            table.add_column(side.label, ratio=1, overflow="fold")
        table.add_row(*(a.text for a in answers))
        out.print(table)
    if check_empty and len(answers) == 1:
        require_text(answers[0])


def _prompts():
    """The interactive chat's input: each non-empty line (commands included); ends at Ctrl-D."""
    while True:
        try:
            line = input("you> ")
        except EOFError:
            return
        if line.strip():
            yield line


# --- serve -----------------------------------------------------------------------------------

@app.command()
def serve(
    adapter: list[str] = typer.Option([], "--adapter", "-a", metavar="NAME=PATH",
                                      help="An adapter clients reach as model NAME; PATH is a "
                                      "run directory or an adapter .gguf. Repeat for more."),
    base: Optional[str] = typer.Option(None, help="Base GGUF (default: the first run's base, "
                                       "else the embedded model). Clients reach it as 'base'."),
    bundle: Optional[Path] = typer.Option(None, help="Serve a bundle made by `edge-tune "
                                          "bundle` (a folder or .tar.gz; checksums verified)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; anything but loopback "
                             "exposes the models to the network."),
    port: int = typer.Option(8000, help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="EDGE_TUNE_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' (or set "
                                          "EDGE_TUNE_API_KEY, which ps cannot show)."),
    ctx: int = typer.Option(4096, "--ctx", help="Context window in tokens (prompt + answer)."),
    max_queue: int = typer.Option(64, help="Requests that may wait; more get HTTP 503."),
    parallel: int = typer.Option(4, min=1, max=64, help="Requests decoded together "
                                 "(continuous batching); each has its own --ctx tokens of "
                                 "KV cache."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads for llama.cpp "
                                          "(default: EDGE_TUNE_THREADS, else physical cores); "
                                          "on a box busy with other work, fewer is faster."),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", metavar="NAME|FILE",
                                                help="Render every model's chats with this "
                                                "template (built-in name or Jinja file) "
                                                "[default: each run's, else the base GGUF's]."),
    system_mode: Optional[str] = typer.Option(None, "--system-mode", metavar="keep|fold",
                                              help=SYSTEM_MODE_HELP + " [default: each run's, "
                                              "else keep]"),
) -> None:
    """Serve the base and its adapters over an OpenAI-compatible API.

    One base model in memory, every adapter loaded once and switched per request by the
    `model` field (`base` = no adapter). Concurrent requests decode together (--parallel).
    Each adapter's chats use its run's chat template; a chat the template refuses is HTTP
    400 with the template's message, and so is a chat with a model that has no template.

    \b
      edge-tune serve --adapter pirate=runs/demo --adapter legal=legal.gguf
      curl localhost:8000/v1/chat/completions -d '{"model": "pirate",
           "messages": [{"role": "user", "content": "hi"}]}'
    Any OpenAI client works: base_url="http://127.0.0.1:8000/v1".
    """
    from edge_tune import api
    from edge_tune.render import Renderer

    if bundle is not None:
        if adapter or base:
            raise UsageError("--bundle: serves the bundle's own base and adapters; leave "
                             "out --adapter and --base")
        from edge_tune.bundle import load_bundle

        plan = load_bundle(bundle)
        plan.override(chat_template, system_mode)
    else:
        plan = api.plan_serving(adapter, base, chat_template, system_mode)
    render = Renderer(err)
    api.serve(plan, host=host, port=port, api_key=api_key, n_ctx=ctx, max_queue=max_queue,
              threads=threads, on_event=render, parallel=parallel)


# --- bundle ----------------------------------------------------------------------------------

@app.command()
def bundle(
    runs: list[str] = typer.Argument(..., metavar="RUN...", help="Run directories or adapter "
                                     ".gguf files, each RUN or NAME=RUN (NAME: the model name "
                                     "clients use; default: the folder/file name)."),
    output: Path = typer.Option(..., "--output", "-o", help="Bundle folder, or a .tar.gz."),
    base: Optional[str] = typer.Option(None, help="Base GGUF [default: the runs' base]."),
    merged: bool = typer.Option(False, "--merged", help="Ship one run merged into the base "
                                "(one model file, served as 'base') instead of base + "
                                "adapters."),
    quant: Optional[str] = typer.Option(None, help="With --merged: quantize the merged model "
                                        "(Q4_K_M, Q8_0, ..., or auto: the smallest type whose "
                                        "check passes). The merged model is checked as `export "
                                        "--merge` checks it: one that fails is refused."),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", metavar="NAME|FILE",
                                                help="The template the bundle serves every "
                                                "model with (built-in name or Jinja file) "
                                                "[default: each run's, else the base GGUF's]."),
    wheels: bool = typer.Option(True, "--wheels/--no-wheels", help="Carry wheels/ (edge-tune, "
                                "llama-cpp-python as built here, their dependencies) and "
                                "install.sh, for an offline install on a box of this "
                                "platform."),
) -> None:
    """Pack a base model and adapters into a folder (or .tar.gz) for an edge box.

    The bundle holds the base GGUF, one GGUF LoRA per run, the runs' manifests, the chat
    templates they are served with, a serve.sh launcher, a README, the wheels to install
    edge-tune offline with install.sh, and bundle.json with every file's sha256 (verified on
    load). On the box (same OS, CPU architecture and Python; no network needed):

    \b
      ./OUT/install.sh                      (pip --no-index from OUT/wheels into OUT/.venv)
      ./OUT/serve.sh                        (edge-tune serve --bundle OUT)
      OUT/.venv/bin/edge-tune chat --bundle OUT --adapter NAME
    """
    from edge_tune import api
    from edge_tune.render import Renderer

    with Renderer(err) as render:
        api.bundle(runs, output, base=base, merged=merged, quant=quant, on_event=render,
                   chat_template=chat_template, wheels=wheels)


# --- demo ------------------------------------------------------------------------------------

@app.command()
def demo(
    out_dir: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Run directory."),
    epochs: float = typer.Option(2.0, help="Passes over the demo data."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after N steps."),
) -> None:
    """The whole job on the embedded model: doctor, train on the bundled pirate dataset,
    export to GGUF, and compare base vs tuned answers on held-back prompts."""
    from edge_tune.render.demo import run_demo

    run_demo(out_dir, epochs=epochs, max_steps=max_steps, console=out)


# --- data ------------------------------------------------------------------------------------

data_app = typer.Typer(help="Look at training data before training on it.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("inspect")
def data_inspect(
    file: str = typer.Argument(..., help="Data file, folder (its train part), saved dataset "
                               "or hub ID: one SOURCE as `train --data` takes it."),
    columns: Optional[str] = typer.Option(None, "--columns", metavar="SRC=KEY,...",
                                          help=COLUMNS_HELP),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", metavar="N",
                                              help=MAX_SAMPLES_HELP),
    model: str = typer.Option("default", "--model", "-m", help="Whose tokenizer and chat "
                              "template to count with (same as `train --model`)."),
    seq_len: str = typer.Option("512", "--seq-len", metavar="L", help="Count the examples "
                                "longer than L tokens (training truncates them)."),
    data_format: str = typer.Option("auto", "--format", help="auto | openai | sharegpt | "
                                    "alpaca | completion | text."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", metavar="NAME|FILE",
                                                help=TEMPLATE_HELP),
    system_mode: Optional[str] = typer.Option(None, "--system-mode", metavar="keep|fold",
                                              help=SYSTEM_MODE_HELP + " [default: keep]"),
    reasoning: Optional[str] = typer.Option(None, "--reasoning", metavar="auto|inline|drop",
                                            help=REASONING_HELP),
) -> None:
    """Show a data file as training sees it: format, records, token lengths, trained share.

    Also how many examples --seq-len truncates, and the first example with the trained
    characters highlighted."""
    from edge_tune import api
    from edge_tune.render import Renderer

    try:  # parsed here, not by typer, so a bad value is one `error:` line like the rest
        n_tokens = int(seq_len)
    except ValueError:
        raise UsageError(f"--seq-len {seq_len!r}: expected a whole number of tokens") from None
    with Renderer(err, quiet=as_json) as render:
        source = file
        if columns or max_samples is not None:  # the same reading as train's
            from edge_tune.data.layouts import data_spec

            if max_samples is not None and max_samples < 1:
                raise UsageError(f"--max-samples {max_samples}: expected an integer >= 1")
            source = data_spec(file, columns, max_samples)
        report = api.inspect_data(source, model=model, seq_len=n_tokens, fmt=data_format,
                                  on_event=render, chat_template=chat_template,
                                  system_mode=system_mode, reasoning=reasoning)
    if as_json:
        out.print_json(json.dumps(report))
    else:
        from edge_tune.render.inspect import render_inspect

        render_inspect(report, out)


# --- tui -------------------------------------------------------------------------------------

@app.command()
def tui(runs: Path = typer.Option(Path("runs"), "--runs", help="Where runs are listed and "
                                  "new ones are written.")) -> None:
    """Open the terminal UI (also what `edge-tune` alone does).

    Screens: hardware, model & data, train (live loss chart, cancel, resume), adapters
    (export, verify, delete), chat (base vs adapter side by side).

    Keys: F1-F5 switch screens; each screen's keys are in its footer; ctrl+q quits."""
    _open_tui(runs)


def _reflowed(text: str) -> str:
    """Help prose as the rich help renderer should get it: the renderer keeps a docstring's
    hard line breaks, so each paragraph's prose is joined into one line, while indented lines
    (examples) and a click ``\\b`` block stay line by line; ``[`` is escaped so that
    "[default: ...]" is not taken for markup and dropped."""
    from rich.markup import escape

    out = []
    for para in inspect.cleandoc(text).split("\n\n"):
        lines = para.split("\n")
        verbatim = lines[0].strip() == "\b"
        kept: list[str] = []
        for line in lines[1:] if verbatim else lines:
            if verbatim or line.startswith(" ") or not kept or kept[-1].startswith(" "):
                kept.append(line)
            else:
                kept[-1] += " " + line.strip()
        out.append(escape("\n".join(kept)))
    return "\n\n".join(out)


def _tidy_help(command) -> None:
    """Reflow and escape the help of a click command, its parameters and its subcommands."""
    if command.help:
        command.help = _reflowed(command.help)
    for param in command.params:
        if getattr(param, "help", None):
            param.help = _reflowed(param.help)
    for sub in getattr(command, "commands", {}).values():
        _tidy_help(sub)


def _usage_line(exc: typer.TyperException) -> str:
    """A usage error of the command line parser as one line: the message and where the help
    is, e.g. "No such option: --dat (did you mean --data?) (see edge-tune train --help)"."""
    possibilities = getattr(exc, "possibilities", None)
    if type(exc).__name__ == "NoSuchOption" and possibilities:
        from difflib import get_close_matches

        best = get_close_matches(exc.option_name, possibilities, n=1) or sorted(possibilities)
        message = f"{exc.message} (did you mean {best[0]}?)"
    else:
        message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    return f"{message} (see {ctx.command_path} --help)" if ctx is not None else message


def _terminate(signum, frame) -> None:
    """SIGTERM (``timeout``, service managers) stops a command as Ctrl-C does, so the same
    cleanup runs (temp folders removed, training's checkpoint saved). A second SIGTERM ends
    the process at once (the training worker, in its own process group, still saves)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise KeyboardInterrupt


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    try:
        command = typer.main.get_command(app)
        _tidy_help(command)
        # Not standalone: the parser would print a usage error as a box of several lines.
        code = command.main(standalone_mode=False)
        if isinstance(code, int) and code:  # typer.Exit(N) from a command
            raise SystemExit(code)
    except typer.TyperException as exc:  # the parser's usage errors (typer's vendored click)
        if type(exc).__name__ != "NoArgsIsHelpError":  # that one has printed the help
            err.print(f"[bold red]error:[/] {_escape(_usage_line(exc))}", highlight=False,
                      soft_wrap=True)
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:  # end of input inside a parser prompt
        err.print("[yellow]cancelled[/]")
        raise SystemExit(ExitCode.CANCELLED) from None
    except EdgeTuneError as exc:
        from rich.markup import escape  # a message may hold [brackets]: print them as-is

        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("[yellow]cancelled[/]")
        raise SystemExit(ExitCode.CANCELLED) from None
    except Exception as exc:  # a bug: one line for the user, the traceback in a log file
        import os
        import traceback

        if os.environ.get("EDGE_TUNE_DEBUG"):
            raise
        from rich.markup import escape

        from edge_tune.fsutil import cache_dir, free_bytes, is_disk_full, mib

        if is_disk_full(exc):  # a write nothing named: still one line, and not a bug
            where = getattr(exc, "filename", None) or os.getcwd()
            err.print(f"[bold red]error:[/] {escape(str(where))}: no space left on device "
                      f"({mib(free_bytes(Path(where)))} free); free some space and run the "
                      "command again", highlight=False, soft_wrap=True)
            raise SystemExit(ExitCode.BAD_INPUT) from None
        log = cache_dir() / "last-error.log"
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(traceback.format_exc())
            where = f"traceback in {log}"
        except OSError:
            where = "set EDGE_TUNE_DEBUG=1 for the traceback"
        err.print(f"[bold red]error:[/] internal error: {escape(type(exc).__name__)}: "
                  f"{escape(str(exc).splitlines()[0] if str(exc) else '')} ({where}; please "
                  "report it)", highlight=False, soft_wrap=True)
        raise SystemExit(ExitCode.FAILED) from None


if __name__ == "__main__":
    main()
