"""``edge-tune chat``, ``serve`` and ``bundle``: the base and its adapters in use, here or
packed for an edge box."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from edge_tune.cli.common import err, out
from edge_tune.config import SYSTEM_MODE_HELP
from edge_tune.errors import EdgeTuneError, UsageError


SPECULATIVE_HELP = ("Speculative decoding: guess the next tokens from the text so far "
                    "(prompt lookup) and check several per decode; answers are the same token "
                    "for token. auto: only guesses likely to be kept (a match of 2+ tokens, "
                    "shorter after misses); ngram: whenever a match is found; off: one token "
                    "per decode.")


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
    speculative: str = typer.Option("auto", "--speculative", metavar="auto|ngram|off",
                                    help=SPECULATIVE_HELP),
    feedback: Path = typer.Option(Path("feedback.jsonl"), "--feedback", metavar="FILE",
                                  help="Where /good and /bad [comment] append the last "
                                  "answer as a KTO record (`train --method kto` reads it)."),
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

    from edge_tune.llama.speculative import Speculative

    spec = Speculative(speculative)  # checked before a model loads
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
    engine.speculative = spec if spec.on else None
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
            if _judged(session, line, feedback):
                continue
            if len(session.sides) == 1:
                sys.stdout.write("bot> ")
            try:
                _say(session, line)
            except EdgeTuneError as exc:  # the template refused this turn: say so, go on
                err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False,
                          soft_wrap=True)
    finally:
        engine.close()


def _judged(session, line: str, path: Path) -> bool:
    """``/good`` or ``/bad [comment]``: the last answer marked in ``path`` (said on stderr;
    no answer yet is said too, and the chat goes on). False for any other line."""
    from edge_tune.chat_session import verdict_of

    verdict = verdict_of(line)
    if verdict is None:
        return False
    try:
        session.judge(verdict[0], path, verdict[1])
    except EdgeTuneError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return True
    err.print(f"marked the last answer {'good' if verdict[0] else 'bad'}: {path} (a KTO "
              "record; train it with --method kto)", highlight=False, soft_wrap=True,
              markup=False)
    return True


def _say_plain(model: str) -> None:
    """One notice line when a model has no chat template: answers are plain completions."""
    from edge_tune.templates.choice import no_template_hint

    err.print(f"note: {model} has no chat template (nor the run): answering as a plain "
              f"text completion of the prompt; to chat, {no_template_hint()}",
              highlight=False, soft_wrap=True, markup=False)


def _say(session, text: str, check_empty: bool = False) -> None:
    """One message to the session, rendered: one side streams to stdout (a reasoning
    model's thinking streams dimmed to stderr, so that stdout holds the answer alone); two
    are shown side by side when both have answered. Ctrl-C stops the answer (what was said
    stays), not the chat; ``check_empty``: an empty answer is an error (``--prompt``)."""
    from edge_tune.chat_session import Answer, require_text

    answers: list = []
    stream = session.ask(text)
    try:
        if len(session.sides) == 1:
            answers += _stream_one(stream)
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
        table.add_row(*(_with_thinking(a) for a in answers))
        out.print(table)
    if check_empty and len(answers) == 1:
        require_text(answers[0])


def _stream_one(stream) -> list:
    """One side's events written as they come: the answer to stdout, a reasoning model's
    thinking dimmed to stderr (on lines of its own); returns the Answer events."""
    from edge_tune.chat_session import Token

    answers, thinking = [], False
    for event in stream:
        if isinstance(event, Token) and event.thinking:
            if not thinking:  # after the "bot> " prompt on a terminal
                sys.stdout.flush()
            thinking = True
            err.print(event.text, style="dim", end="", markup=False, highlight=False,
                      soft_wrap=True)
        elif isinstance(event, Token):
            if thinking:  # the thinking ends on a line of its own
                err.print()
                thinking = False
            sys.stdout.write(event.text)
            sys.stdout.flush()
        else:
            answers.append(event)
    if thinking:
        err.print()
    return answers


def _with_thinking(answer):
    """An answer for the side-by-side table: a reasoning model's thinking dimmed above it."""
    from rich.text import Text

    if not answer.reasoning:
        return answer.text
    return Text.assemble((answer.reasoning.strip() + "\n\n", "dim"), answer.text)


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
    speculative: str = typer.Option("auto", "--speculative", metavar="auto|ngram|off",
                                    help=SPECULATIVE_HELP),
    draft_max: int = typer.Option(10, "--draft-max", help="Most tokens guessed at once "
                                  "(--speculative)."),
    draft_min: int = typer.Option(2, "--draft-min", help="Fewest tokens worth a guess "
                                  "(--speculative)."),
    spec_ngram: int = typer.Option(4, "--spec-ngram", help="Longest run of last tokens "
                                   "looked up for a guess (shorter ones down to 2 are tried)."),
    feedback: Optional[Path] = typer.Option(None, "--feedback", metavar="FILE",
                                            help="Record users' verdicts on chat answers: POST "
                                            "/v1/feedback {\"id\": ..., \"label\": "
                                            "true|false} appends a KTO record to FILE, which "
                                            "`train --method kto` reads (docs/preference.md)."),
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
    from edge_tune.llama.speculative import Speculative
    from edge_tune.render import Renderer

    spec = Speculative(speculative, draft_max, draft_min, spec_ngram)  # before any loading
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
              threads=threads, on_event=render, parallel=parallel,
              speculative=spec if spec.on else None, feedback=feedback)


# --- bundle ----------------------------------------------------------------------------------

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

