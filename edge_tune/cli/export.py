"""``edge-tune export``, ``convert-base`` and ``fetch-converter``: GGUF files for llama.cpp
(and a PEFT copy for vLLM)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edge_tune.cli.common import err, out
from edge_tune.errors import UsageError


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
                                          "Modelfile (FROM/ADAPTER/TEMPLATE/stop; RENDERER/"
                                          "PARSER for the families Ollama has built in) into "
                                          "DIR, and run `ollama create RUN -f DIR/Modelfile` "
                                          "when ollama is on PATH."),
    system: Optional[str] = typer.Option(None, "--system", help="With --ollama: the "
                                         "Modelfile's SYSTEM prompt."),
    lmstudio: bool = typer.Option(False, "--lmstudio", help="Also place the merged GGUF "
                                  "(implies --merge; a full run: its model) where LM Studio "
                                  "lists it: MODELS/edge-tune/RUN/RUN-QUANT.gguf (MODELS: "
                                  "$EDGE_TUNE_LMSTUDIO_MODELS, else ~/.lmstudio/models). LM "
                                  "Studio loads no LoRA adapter."),
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
      edge-tune export runs/demo --lmstudio -q Q4_K_M   # merged, for LM Studio
      edge-tune export runs/demo --vllm out/vllm        # PEFT dir, `vllm serve`
      edge-tune export runs/full -q Q8_0                # a full run: RUN/model-q8_0.gguf"""
    from edge_tune import api
    from edge_tune.render import Renderer

    if (merge or lmstudio) and outtype is not None:  # --outtype f32 --merge means a merged F32 GGUF
        if quant is not None and quant.upper() != outtype.upper():
            raise UsageError(f"--outtype {outtype} and -q {quant}: with --merge both set the "
                             "merged GGUF's type; give one")
        quant = outtype.upper()
    with Renderer(err) as render:
        result = api.export(adapter, base=base, out=output, outtype=outtype or "f32",
                            on_event=render,
                            merge=merge, quant=quant, ollama=ollama, verify=verify,
                            system=system, vllm=vllm, chat_template=chat_template,
                            lmstudio=lmstudio)
    if vllm is not None:
        print(result.command)  # plain stdout: `$(edge-tune export RUN --vllm DIR)` runs it


# --- convert-base ----------------------------------------------------------------------------

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

