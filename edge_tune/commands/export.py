"""``export``: a run's (or a PEFT / mlx-lm) adapter as a GGUF LoRA, merged into its base
(optionally quantized by llama.cpp), as an Ollama Modelfile, or as a vLLM adapter with its
``vllm serve`` line. The steps are :mod:`edge_tune.exporting`'s."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from edge_tune import manifest as manifest_mod
from edge_tune.adapters import conversion_base, merge_base, peft_adapter
from edge_tune.errors import UsageError
from edge_tune.events import EventSink, ignore
from edge_tune.exporting.run import finish_run
from edge_tune.exporting.targets import place_for_lmstudio
from edge_tune.exporting.steps import (ExportResult, export_adapter, export_full, export_merged,
                                       export_vllm)
from edge_tune.fsutil import check_writable, disk_full_says, write_errors_say
from edge_tune.manifest import Manifest
from edge_tune.runs import RUN_CONFIG, say_leftovers, training_finished
from edge_tune.templates import choice as template_choice


def export(adapter: Path, base: Optional[Path] = None, out: Optional[Path] = None,
           outtype: str = "f32", on_event: EventSink = ignore, merge: bool = False,
           quant: Optional[str] = None, ollama: Optional[Path] = None, verify: bool = True,
           system: Optional[str] = None, vllm: Optional[Path] = None,
           chat_template: Optional[str] = None, lmstudio: bool = False) -> ExportResult:
    """Convert a PEFT adapter (or a run's adapter) to a GGUF LoRA adapter; with ``merge``,
    write one GGUF with the adapter merged into the base (``quant``: F16 default, Q4_K_M,
    ..., or ``auto``: the smallest type that passes the check). ``verify`` (the default; runs
    only) checks llama.cpp against the training framework: a merged or quantized model is
    checked before it takes its name, and one that fails is kept as ``NAME.rejected.gguf``
    with CheckFailed naming the cause (see :func:`edge_tune.exporting.checked.ship_checked`);
    ``ollama`` writes a Modelfile into that directory (``system``: its SYSTEM prompt).
    ``chat_template`` (``--chat-template``; default: the run's) goes into the Modelfile's
    TEMPLATE and, with ``merge``, into a merged GGUF whose base has none. ``lmstudio``
    implies ``merge`` and places the checked GGUF where LM Studio lists it
    (:func:`edge_tune.exporting.targets.place_for_lmstudio`). Returns what was
    written (:class:`ExportResult`). An ``out``, ``ollama`` or ``vllm`` that cannot be written
    is a UsageError before any work; an OSError while writing is one too."""
    adapter = Path(adapter)
    if lmstudio and vllm is not None:
        raise UsageError("--lmstudio and --vllm: LM Studio takes a merged GGUF, vLLM a PEFT "
                         "adapter; give one", setting="lmstudio")
    merge = merge or lmstudio  # LM Studio loads no LoRA adapter: it gets the merged model
    # A destination that cannot be written is said now, not after the merge and its check.
    for setting, path, folder in (("output", out, False), ("ollama", ollama, True),
                                  ("vllm", vllm, True)):
        if path is not None:
            check_writable(Path(path), setting, folder)
    # A run whose training finished but whose GGUF or manifest was not written (disk full,
    # killed) is completed first (without verify), so `export RUN` works from what is there.
    if adapter.is_dir() and training_finished(adapter):
        finish_run(adapter, on_event, verify=False)
    elif (adapter / RUN_CONFIG).is_file():  # a run: what killed commands left in it
        say_leftovers(adapter, on_event)
    with write_errors_say(f"{adapter} is unchanged"), \
            disk_full_says(Path(out or ollama or vllm or adapter),
                           f"nothing was left at the output name and {adapter} is unchanged: "
                           "free space and export again"):
        result = _export(adapter, base, out, outtype, on_event, merge, quant, ollama, verify,
                         system, vllm, chat_template)
        if lmstudio:
            place_for_lmstudio(result.path, adapter.resolve().name, result.quant, on_event)
        return result


def _export(adapter: Path, base: Optional[Path], out: Optional[Path], outtype: str,
            on_event: EventSink, merge: bool, quant: Optional[str], ollama: Optional[Path],
            verify: bool, system: Optional[str], vllm: Optional[Path],
            chat_template: Optional[str]) -> ExportResult:
    """:func:`export` once the run is complete: which kind, then :mod:`edge_tune.exporting`'s
    step."""
    if chat_template is not None and ollama is None and not merge:
        raise UsageError("applies to --ollama (the Modelfile's TEMPLATE) "
                         "and --merge; an adapter GGUF carries no template",
                         setting="chat_template")
    full_run = _full_run(Path(adapter))
    if full_run is not None:  # a full fine-tuning run: its model, converted (no adapter)
        if base is not None or vllm is not None or outtype is not None and outtype != "f32":
            setting = "base" if base is not None else "vllm" if vllm is not None else "outtype"
            raise UsageError(f"{adapter} is a full fine-tuning run: it exports a model GGUF "
                             "(quantize it with -q), not an adapter", setting=setting)
        return export_full(Path(adapter), full_run, out, quant or "F16", on_event,
                           verify=verify, ollama=ollama, system=system,
                           template=template_choice.choose(chat_template, full_run))
    peft_dir, man = peft_adapter(Path(adapter))
    template = template_choice.choose(chat_template, man)
    if vllm is not None:  # vLLM serves the PEFT directory itself: no GGUF involved
        return export_vllm(Path(adapter), peft_dir, man, base, Path(vllm), on_event)
    if merge:  # merge reads the base itself: parsing a GGUF's vocabulary twice costs seconds
        return export_merged(Path(adapter), peft_dir, man, merge_base(man, base), out,
                             quant or "F16", on_event, verify=verify, ollama=ollama,
                             system=system, template=template)
    info, base_gguf = conversion_base(peft_dir, man, base)
    if quant is not None:
        raise UsageError("applies to merged exports only: add --merge (an adapter GGUF takes "
                         "--outtype f32|f16|q8_0)", setting="quant")
    return export_adapter(Path(adapter), peft_dir, man, info, base_gguf, out, outtype, on_event,
                          verify=verify, base=base, ollama=ollama, system=system,
                          template=template)


def _full_run(path: Path) -> Optional[Manifest]:
    """The manifest of ``path`` when it is a full fine-tuning run directory, else None."""
    man = manifest_mod.read(path) if path.is_dir() else None
    return man if man is not None and man.full else None
