"""``export``: a run's (or a PEFT / mlx-lm) adapter as a GGUF LoRA, merged into its base
(optionally quantized by llama.cpp), as an Ollama Modelfile, or as a vLLM adapter with its
``vllm serve`` line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from edge_tune.adapters import conversion_base, merge_base, peft_adapter, vllm_base
from edge_tune.errors import EdgeTuneError, UsageError
from edge_tune.events import Done, EventSink, Log, Progress, ignore
from edge_tune.fsutil import TEMP_SUFFIX, sha256_file, temp_prefix
from edge_tune.manifest import Manifest
from edge_tune.templates import choice as template_choice
from edge_tune.verify import VerifyReport, verify_hook


@dataclass
class ExportResult:
    """What one ``export`` wrote, whichever kind.

    kind: "adapter" (a GGUF LoRA adapter), "merged" (the adapter merged into its base),
    "full" (a full fine-tuning run's model) or "vllm" (a PEFT folder for ``vllm serve``);
    path: the GGUF written (vllm: the adapter folder); quant: its tensor type ("F32", "F16",
    "Q4_K_M", ...; an adapter's ``--outtype`` upper-cased; None for vllm); bytes: its size;
    rank / alpha: the LoRA's (adapter; vllm: rank); merged_tensors / dora: base tensors the
    merge changed, and whether a DoRA magnitude was folded in (merged); verify: the check it
    passed (None: not checked); modelfile: the ``--ollama`` Modelfile written; command /
    script / max_lora_rank: vllm's ``vllm serve`` line, the script holding it and the
    ``--max-lora-rank`` it needs."""

    kind: str
    path: Path
    quant: Optional[str] = None
    bytes: Optional[int] = None
    rank: Optional[int] = None
    alpha: Optional[float] = None
    merged_tensors: Optional[int] = None
    dora: bool = False
    verify: Optional[VerifyReport] = None
    modelfile: Optional[Path] = None
    command: Optional[str] = None
    script: Optional[Path] = None
    max_lora_rank: Optional[int] = None


def export(adapter: Path, base: Optional[Path] = None, out: Optional[Path] = None,
           outtype: str = "f32", on_event: EventSink = ignore, _base_sha256: Optional[str] = None,
           merge: bool = False, quant: Optional[str] = None, ollama: Optional[Path] = None,
           verify: bool = True, system: Optional[str] = None, vllm: Optional[Path] = None,
           chat_template: Optional[str] = None, _keep_rejected: bool = True) -> ExportResult:
    """Convert a PEFT adapter (or a run's adapter) to a GGUF LoRA adapter; with ``merge``,
    write one GGUF with the adapter merged into the base (``quant``: F16 default, Q4_K_M,
    ..., or ``auto``: the smallest type that passes the check). ``verify`` (the default; runs
    only) checks llama.cpp against the training framework: a merged or quantized model is
    checked before it takes its name, and one that fails is kept as ``NAME.rejected.gguf``
    (``_keep_rejected`` False: deleted) with CheckFailed naming the cause (see
    :func:`ship_checked`);
    ``ollama`` writes a Modelfile into that directory (``system``: its SYSTEM prompt).
    ``chat_template`` (``--chat-template``; default: the run's) goes into the Modelfile's
    TEMPLATE and, with ``merge``, into a merged GGUF whose base has none. Returns what was
    written (:class:`ExportResult`)."""
    from edge_tune.converters.formats import peft_to_gguf

    if chat_template is not None and ollama is None and not merge:
        raise EdgeTuneError("--chat-template: applies to --ollama (the Modelfile's TEMPLATE) "
                            "and --merge; an adapter GGUF carries no template")
    full_run = _full_run(Path(adapter))
    if full_run is not None:  # a full fine-tuning run: its model, converted (no adapter)
        if base is not None or vllm is not None or outtype is not None and outtype != "f32":
            flag = "--base" if base is not None else "--vllm" if vllm is not None else "--outtype"
            raise EdgeTuneError(f"{flag}: {adapter} is a full fine-tuning run: it exports a "
                                "model GGUF (quantize it with -q), not an adapter")
        return export_full(Path(adapter), full_run, out, quant or "F16", on_event,
                           verify=verify, ollama=ollama, system=system,
                           template=template_choice.choose(chat_template, full_run),
                           keep_rejected=_keep_rejected)
    peft_dir, man = peft_adapter(Path(adapter))
    template = template_choice.choose(chat_template, man)
    if vllm is not None:  # vLLM serves the PEFT directory itself: no GGUF involved
        return _export_vllm(Path(adapter), peft_dir, man, base, Path(vllm), on_event)
    if merge:  # merge reads the base itself: parsing a GGUF's vocabulary twice costs seconds
        return _export_merged(Path(adapter), peft_dir, man, merge_base(man, base), out,
                              quant or "F16", on_event, verify=verify, ollama=ollama,
                              system=system, template=template, keep_rejected=_keep_rejected)
    info, base_gguf = conversion_base(peft_dir, man, base)
    if quant is not None:
        raise EdgeTuneError("--quant applies to merged exports only: add --merge (an adapter "
                            "GGUF takes --outtype f32|f16|q8_0)")
    if out is None:
        out = (Path(adapter) / "adapter.gguf") if man is not None else \
            Path(adapter).with_name(Path(adapter).name + ".gguf")
    meta = {"general.name": f"edge-tune LoRA ({Path(adapter).name})"}
    if base_gguf is not None:
        meta["edge_tune.base_sha256"] = _base_sha256 or sha256_file(base_gguf)
        meta["edge_tune.base_name"] = Path(base_gguf).name
    plan = peft_to_gguf.convert(peft_dir, info, Path(out), outtype, meta)
    on_event(Log(f"wrote {out} ({len(plan.tensors) // 2} LoRA pairs, rank {plan.rank}, "
                 f"alpha {plan.alpha:g}, {outtype})"))
    report = None
    if verify and man is not None:
        report = verify_hook(Path(adapter), base, on_event, adapter_gguf=Path(out))
    modelfile = None
    if ollama is not None:
        modelfile = _write_ollama(Path(ollama), base_gguf, Path(out), system, man, on_event,
                                  template)
    on_event(Done("export", {"path": str(out)}))
    return ExportResult("adapter", Path(out), quant=outtype.upper(),
                        bytes=Path(out).stat().st_size, rank=plan.rank, alpha=plan.alpha,
                        verify=report, modelfile=modelfile)


def _full_run(path: Path) -> Optional[Manifest]:
    """The manifest of ``path`` when it is a full fine-tuning run directory, else None."""
    from edge_tune import manifest as manifest_mod

    man = manifest_mod.read(path) if path.is_dir() else None
    return man if man is not None and man.full else None


def export_full(run: Path, man: Manifest, out: Optional[Path], quant: str,
                on_event: EventSink = ignore, verify: bool = True,
                ollama: Optional[Path] = None, system: Optional[str] = None,
                template: Optional["template_choice.ChatTemplate"] = None,
                vocab_from: Optional[Path] = None, keep_rejected: bool = True,
                checked_later: bool = False) -> ExportResult:
    """A full run's HF weights (``RUN/model``) as one GGUF model: llama.cpp's converter
    writes F32 (exact; what verify checks against torch), then llama.cpp's quantizer makes
    ``quant`` (F16 default, Q8_0, Q4_K_M, ...) from it. Default output:
    ``RUN/model-<quant>.gguf``. ``verify``: checked before it takes its name, as
    :func:`ship_checked` does (``quant`` ``auto`` too). Returns its :class:`ExportResult`.

    ``vocab_from``: the base GGUF the run was trained from (default: the manifest's, when it
    was given as a GGUF). Its tokenizer was rebuilt by transformers for training, and
    llama.cpp's converter does not turn that rebuilt copy back into the same vocabulary
    (token types, special tokens, pre-tokenizer), so the model keeps the base's own
    ``tokenizer.*`` metadata (the converted chat template excepted)."""
    import tempfile

    from edge_tune.converters.integrations import hf_to_gguf

    name = quant_name(quant)
    if name == "AUTO" and not verify:
        raise UsageError("--quant auto picks the smallest type whose check passes: drop "
                         "--no-verify")
    model_dir = run / (man.model.hf if man.model is not None else "model")
    if not (model_dir / "config.json").is_file():
        raise EdgeTuneError(f"{model_dir}: the full run's model is missing (expected its HF "
                            "weights: config.json and model.safetensors)")
    given = Path(out) if out is not None else None
    out = given or run / f"model-{name.lower()}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = None
    if vocab_from is None and man.base.gguf and man.base.gguf_source == "given":
        vocab_from = Path(man.base.gguf)
    _sweep_and_check(out, _weights_bytes(model_dir), _disk_type(name), on_event)
    with tempfile.TemporaryDirectory(prefix=temp_prefix(out.name), suffix=TEMP_SUFFIX,
                                     dir=out.parent) as work:
        f32 = Path(work) / "model-f32.gguf"
        if vocab_from is not None and Path(vocab_from).is_file():
            converted = hf_to_gguf.convert(model_dir, Path(work) / "converted.gguf", "f32",
                                           on_event)
            _with_vocabulary_of(Path(vocab_from), converted, f32)
            converted.unlink()
        else:
            hf_to_gguf.convert(model_dir, f32, "f32", on_event)

        def check(model: Path, exact: Optional[Path]) -> VerifyReport:
            return verify_hook(run, None, on_event, merged=model, merged_f32=exact,
                               raise_on_fail=False)

        out, name, report = ship_checked(f32, given, name, Path(work),
                                         check if verify else None, on_event,
                                         lambda t: run / f"model-{t.lower()}.gguf",
                                         keep_rejected, say_unchecked=not checked_later)
        size = out.stat().st_size
        on_event(Log(f"wrote {out} (full fine-tuned model, {name}, {size / 2**20:.1f} MiB"
                     f"{', checked' if report else ''})"))
    modelfile = None
    if ollama is not None:
        modelfile = _write_ollama(Path(ollama), out, None, system, man, on_event, template)
    on_event(Done("export", {"path": str(out)}))
    return ExportResult("full", out, quant=name, bytes=size, verify=report, modelfile=modelfile)


def _with_vocabulary_of(base: Path, converted: Path, dst: Path) -> None:
    """Write ``dst``: ``converted`` with the ``tokenizer.*`` fields of ``base`` (its chat
    template kept where it has one). Raises EdgeTuneError when the vocabularies differ in
    size (not the same tokenizer)."""
    import gguf
    import numpy as np

    from edge_tune.converters.formats.base_info import (copy_fields, field_value, open_gguf,
                                                         writing_gguf)

    src, vocab = open_gguf(converted), open_gguf(base)
    n_src = len(field_value(src, "tokenizer.ggml.tokens") or [])
    n_base = len(field_value(vocab, "tokenizer.ggml.tokens") or [])
    if n_src != n_base:
        raise EdgeTuneError(f"{converted}: {n_src} tokens, but the base {base} has {n_base} "
                            "(expected the base's own vocabulary)")
    own = {k for k in src.fields if k.startswith("tokenizer.")}
    keep = {"tokenizer.chat_template"} & own
    with writing_gguf(dst, field_value(src, "general.architecture")) as w:
        copy_fields(src, w, skip=own - keep)
        copy_fields(vocab, w, skip={k for k in vocab.fields
                                    if not k.startswith("tokenizer.") or k in keep})
        for t in src.tensors:  # F32 from the converter: dequantize() returns them as they are
            data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            w.add_tensor(t.name, data.reshape(tuple(reversed([int(x) for x in t.shape]))))


def _export_vllm(adapter: Path, peft_dir: Path, man: Optional[Manifest], base: Optional[Path],
                 directory: Path, on_event: EventSink) -> ExportResult:
    from edge_tune.converters.integrations import vllm_export

    name = vllm_export.adapter_name(adapter.resolve().name)
    result = vllm_export.export(peft_dir, directory, name, vllm_base(peft_dir, man, base))
    on_event(Log(f"wrote {result['adapter_dir']} and {result['script']} (max LoRA rank "
                 f"{result['max_lora_rank']} for rank {result['rank']})"))
    on_event(Done("export", {"path": result["adapter_dir"], **result}))
    return ExportResult("vllm", Path(result["adapter_dir"]), rank=result["rank"],
                        command=result["command"], script=Path(result["script"]),
                        max_lora_rank=result["max_lora_rank"])


def _export_merged(adapter: Path, peft_dir: Path, man: Optional[Manifest],
                   base_gguf: Optional[Path], out: Optional[Path], quant: str, on_event: EventSink, verify: bool,
                   ollama: Optional[Path], system: Optional[str] = None,
                   template: Optional["template_choice.ChatTemplate"] = None,
                   keep_rejected: bool = True) -> ExportResult:
    """Merge into an F32 GGUF first (exact; what verify checks), then let llama.cpp's own
    quantizer make the requested type from it; checked before it takes its name
    (:func:`ship_checked`)."""
    import tempfile

    from edge_tune.converters.formats import merge as merge_mod
    from edge_tune.converters.formats.base_info import from_gguf
    from edge_tune.converters.formats.peft_to_gguf import check_vocabulary, read_peft_dir

    name = quant_name(quant)
    if name == "AUTO" and (not verify or man is None):
        raise UsageError("--quant auto picks the smallest type whose check passes: it needs "
                         "the check (drop --no-verify; the check needs a run directory)")
    if base_gguf is None:
        raise EdgeTuneError(f"{adapter}: --merge needs a GGUF base: pass --base BASE.gguf "
                            "(make one from an HF model with `edge-tune convert-base`)")
    where = adapter if man is not None else peft_dir.parent
    given = Path(out) if out is not None else None
    out = given or where / f"merged-{name.lower()}.gguf"
    config, tensors = read_peft_dir(peft_dir)
    # A resized vocabulary cannot merge into this base: said before the base is hashed.
    check_vocabulary(config, tensors, from_gguf(base_gguf), str(peft_dir), peft_dir)
    meta = {"edge_tune.merged_adapter": peft_dir.name,
            "edge_tune.base_sha256": sha256_file(base_gguf)}
    if template is not None:
        own = template_choice.gguf_chat_template(base_gguf)
        if own is None:  # the merged model then chats as it was trained, with no flag
            meta["tokenizer.chat_template"] = template.text
        elif own != template.text:
            on_event(Log(f"--merge: {out or 'the merged model'} keeps the base's own chat "
                         f"template; chat with it using --chat-template "
                         f"{template.name or 'FILE'} (the run's)", "warning"))
    out.parent.mkdir(parents=True, exist_ok=True)
    report = None
    from edge_tune.converters.formats.gguf_header import read_header

    _sweep_and_check(out, merge_mod.estimate_bytes(read_header(base_gguf), "F32"),
                     _disk_type(name), on_event)
    with tempfile.TemporaryDirectory(prefix=temp_prefix(out.name), suffix=TEMP_SUFFIX,
                                     dir=out.parent) as work:
        f32 = Path(work) / "merged-f32.gguf"
        summary = merge_mod.merge(base_gguf, config, tensors, f32, "F32", where=str(peft_dir),
                                  on_event=on_event, extra_metadata=meta)

        def check(model: Path, exact: Optional[Path]) -> VerifyReport:
            return verify_hook(adapter, base_gguf, on_event, merged=model, merged_f32=exact,
                               raise_on_fail=False)

        out, name, report = ship_checked(f32, given, name, Path(work),
                                         check if verify and man is not None else None,
                                         on_event, lambda t: where / f"merged-{t.lower()}.gguf",
                                         keep_rejected)
        size = out.stat().st_size
        on_event(Log(f"wrote {out} ({summary['merged']} merged tensors"
                     f"{', DoRA' if summary['dora'] else ''}, {name}, {size / 2**20:.0f} MiB"
                     f"{', checked' if report else ''})"))
    modelfile = None
    if ollama is not None:
        modelfile = _write_ollama(Path(ollama), out, None, system, man, on_event, template)
    on_event(Done("export", {"path": str(out)}))
    return ExportResult("merged", out, quant=name, bytes=size, merged_tensors=summary["merged"],
                        dora=summary["dora"], verify=report, modelfile=modelfile)


def _weights_bytes(model_dir: Path) -> int:
    """Bytes of a full run's fp32 weights (its safetensors files): the F32 GGUF's size."""
    from edge_tune.fsutil import tree_bytes

    return sum(tree_bytes(f) for f in Path(model_dir).glob("*.safetensors"))


def _sweep_and_check(out: Path, f32_bytes: int, quant: str, on_event: EventSink) -> None:
    """Before a merged (or full) export writes beside ``out``: remove the temp folders
    killed exports left there (named with their pid, see ``fsutil.sweep_leftovers``), then
    DiskFull (exit 2) unless the F32 model and the ``quant`` file it becomes both fit."""
    from edge_tune.converters.integrations import quantize as quant_mod
    from edge_tune.fsutil import leftovers_line, mib, require_free, sweep_leftovers

    removed = sweep_leftovers(out.parent, legacy=(out.name,))
    if removed:
        on_event(Log(leftovers_line(removed)))
    final = f32_bytes * quant_mod.BITS_PER_WEIGHT[quant] // 32 if quant != "F32" else 0
    require_free(out.parent, int(f32_bytes + final),
                 f"{out} (an F32 merge of {mib(f32_bytes)}" +
                 (f", then {quant} of about {mib(final)})" if final else ")"))


def _place_beside(src: Path, directory: Path) -> str:
    """Put ``src`` in ``directory`` (hard link, else copy) and return its name there."""
    import os
    import shutil

    from edge_tune.fsutil import atomic_path

    dst = directory / src.name
    if dst.exists() and dst.resolve() == src.resolve():
        return src.name
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
    return src.name


def _write_ollama(directory: Path, model_gguf: Optional[Path], adapter_gguf: Optional[Path],
                  system: Optional[str], man: Optional[Manifest], on_event: EventSink,
                  chosen: Optional["template_choice.ChatTemplate"] = None) -> Path:
    """DIR/Modelfile (FROM model, ADAPTER adapter, TEMPLATE from the chat template: ``chosen``
    (--chat-template or the run's), else the model's own; stop words, SYSTEM), with the files
    it names placed beside it."""
    from edge_tune.converters.integrations import ollama
    from edge_tune.converters.formats.base_info import field_value, open_gguf
    from edge_tune.fsutil import write_text_atomic

    if model_gguf is None:
        raise EdgeTuneError("--ollama needs a GGUF base model (pass --base BASE.gguf)")
    reader = open_gguf(Path(model_gguf))
    template = chosen.text if chosen else field_value(reader, "tokenizer.chat_template")
    tokens = field_value(reader, "tokenizer.ggml.tokens") or []
    eos_id = field_value(reader, "tokenizer.ggml.eos_token_id")
    eos = tokens[eos_id] if eos_id is not None and eos_id < len(tokens) else None
    del reader
    go, blocks = None, None
    if template:
        try:
            go, blocks = ollama.translate(template, eos or "")
        except ollama.Untranslatable as exc:
            on_event(Log(f"--ollama: chat template not translated ({exc}); the Modelfile has no "
                         "TEMPLATE, so Ollama falls back to its own detection", "warning"))
    trim_note = ollama.trim_note(blocks)
    if trim_note:
        on_event(Log(f"--ollama: {trim_note}", "warning"))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # A run's base read from Ollama's store is named, not copied: Ollama already has it.
    base_rec = man.base if man is not None else None
    from_ollama = base_rec.ollama if adapter_gguf and base_rec and base_rec.gguf and \
        Path(base_rec.gguf) == Path(model_gguf) else None
    from_name = from_ollama or _place_beside(Path(model_gguf), directory)
    adapter_name = _place_beside(Path(adapter_gguf), directory) if adapter_gguf else None
    text = ollama.modelfile(from_ollama or f"./{from_name}",
                            f"./{adapter_name}" if adapter_name else None, go,
                            ollama.stop_words(blocks, eos), system,
                            note="written by edge-tune export --ollama; run: ollama create NAME "
                                 "-f Modelfile", notes=(trim_note,) if trim_note else ())
    path = directory / "Modelfile"
    write_text_atomic(path, text)
    on_event(Log(f"wrote {path} (FROM {from_name}" + (f", ADAPTER {adapter_name}" if adapter_name
                                                       else "") + ")"))
    return path


# --- the check every merged or quantized model passes before it gets its name ----------------

# `-q auto` tries these from the smallest up; the first whose check passes is written.
AUTO_LADDER = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16")


def quant_name(quant: str) -> str:
    """``auto`` -> ``AUTO``; anything else as :func:`quantize.normalize` spells it."""
    from edge_tune.converters.integrations import quantize as quant_mod

    return "AUTO" if quant.strip().lower() == "auto" else quant_mod.normalize(quant)


def _disk_type(name: str) -> str:
    """The type whose size the free-space check assumes (``auto``: its largest, F16)."""
    return AUTO_LADDER[-1] if name == "AUTO" else name


def rejected_paths(out: Path) -> tuple[Path, Path]:
    """(``NAME.rejected.gguf``, ``NAME.rejected.txt``) beside ``out`` (``NAME.gguf``). Pure."""
    stem = out.name[:-5] if out.name.endswith(".gguf") else out.name
    return out.with_name(f"{stem}.rejected.gguf"), out.with_name(f"{stem}.rejected.txt")


def reject(candidate: Path, out: Path, reason: str, keep: bool = True) -> str:
    """A model that failed its check never keeps (or takes) the name ``out``: ``out`` is
    removed, ``candidate`` moves to ``NAME.rejected.gguf`` (a rename: it appears whole or
    not at all) with the reason in ``NAME.rejected.txt`` (``keep`` False: ``candidate`` is
    deleted). Returns the clause saying where it went."""
    import os

    from edge_tune.fsutil import write_text_atomic

    out = Path(out)
    if out.absolute() != Path(candidate).absolute():
        out.unlink(missing_ok=True)  # an earlier export's file would read as this one's result
    bad, note = rejected_paths(out)
    if not keep:
        Path(candidate).unlink(missing_ok=True)
        return f"nothing was written at {out}"
    write_text_atomic(note, f"{bad.name} failed edge-tune's check (torch against llama.cpp on "
                      f"held-back prompts) and was not given the name {out.name}.\n\n{reason}\n")
    os.replace(candidate, bad)
    return f"nothing is left at {out}: the file is kept as {bad} (the reason in {note.name})"


def _numbers(report: VerifyReport) -> str:
    fe = report.file_effect
    return (f"{'' if fe is None else f'file effect {fe:.0%}, '}top-1 "
            f"{report.top1:.0%}, mean KL {report.kl:.3f}")


def _quantize_to(f32: Path, name: str, work: Path, out: Path, on_event: EventSink) -> Path:
    """``name`` made from the F32 model by llama.cpp's quantizer, in ``work``."""
    from edge_tune.converters.formats.merge import check_disk
    from edge_tune.converters.integrations import quantize as quant_mod

    if name == "F32":
        return f32
    dst = Path(work) / f"{name.lower()}.gguf"
    check_disk(out.parent, int(f32.stat().st_size * quant_mod.BITS_PER_WEIGHT[name] // 32),
               str(out))
    on_event(Progress("quantize", 0, None, "", f"quantizing to {name} (llama.cpp)"))
    quant_mod.quantize(f32, dst, name)
    on_event(Progress("quantize", 1, 1, "", f"quantized to {name}"))
    return dst


def _larger_types(name: str) -> tuple[str, ...]:
    """The types worth measuring when ``name`` loses too much: Q8_0, then F16 (above Q8_0:
    F16 only). Pure."""
    from edge_tune.converters.integrations.quantize import BITS_PER_WEIGHT

    return tuple(t for t in ("Q8_0", "F16") if BITS_PER_WEIGHT[t] > BITS_PER_WEIGHT[name])


def ship_checked(f32: Path, out: Optional[Path], name: str, work: Path, check,
                 on_event: EventSink, default_out, keep_rejected: bool = True,
                 say_unchecked: bool = True) -> tuple[Path, str, Optional[VerifyReport]]:
    """Make ``name`` (``AUTO``: the smallest of :data:`AUTO_LADDER` that passes) from the
    exact F32 model ``f32``, check it, and only then rename it onto ``out`` (None:
    ``default_out(type)``). ``check(file, f32_or_None) -> report`` (verify's, not raising);
    None: unchecked (--no-verify; said unless ``say_unchecked`` is False: the caller checks
    it afterwards, as train does a full run's model). A file that fails goes to
    :func:`reject` and CheckFailed (exit 1) names the likely cause: a quantized file whose F32
    merge passes lost the adapter's changes to rounding, and the larger type that passes
    (measured). Returns (path, type, report)."""
    import os

    from edge_tune.errors import CheckFailed
    from edge_tune.verify import TOLERANCE

    if name == "AUTO":
        if check is None:
            raise UsageError("--quant auto picks the smallest type whose check passes: it needs "
                             "the check (drop --no-verify; only a run has held-back prompts)")
        report = None
        for t in AUTO_LADDER:
            cand = _quantize_to(f32, t, work, out or default_out(t), on_event)
            report = check(cand, f32)
            on_event(Log(f"--quant auto: {t} {'passes' if report.ok else 'fails'} "
                         f"({_numbers(report)})"))
            if report.ok:
                name = t
                break
            cand.unlink()
        else:
            why = "; ".join(report.failures)
            raise CheckFailed(f"--quant auto: no type up to F16 passes the check ({why}); "
                              "nothing was written")
    else:
        cand = _quantize_to(f32, name, work, out or default_out(name), on_event)
        report = None
        if check is not None:
            report = check(cand, None if cand == f32 else f32)
        elif say_unchecked:
            on_event(Log(f"{name}: not checked (--no-verify, or not a run: the check needs "
                         "a run's held-back prompts)", "warning"))
    final = Path(out) if out is not None else default_out(name)
    if report is not None and not report.ok:
        exact_ok = report.effect_rel_err <= TOLERANCE["effect_rel_err"]
        if name == "F32" or not exact_ok:  # the merge itself is wrong, not the rounding
            reason = f"{report.summary}: out of tolerance: {'; '.join(report.failures)}"
        else:
            reason = _quantization_loss(report, name, f32, work, final, check, on_event)
        where = reject(cand, final, reason, keep_rejected)
        raise CheckFailed(f"{final.name}: {reason}; {where}")
    for stale in rejected_paths(final):  # an earlier failed export's leftovers
        stale.unlink(missing_ok=True)
    os.replace(cand, final)
    return final, name, report


def _quantization_loss(report: VerifyReport, name: str, f32: Path, work: Path, out: Path, check,
                       on_event: EventSink) -> str:
    """The failure of a quantized file whose F32 merge passed: rounding, with the numbers,
    and the first larger type (measured here) that passes."""
    what = (f"quantization loss: {name} rounded away the run's small weight changes (the "
            f"{name} file: {_numbers(report)}; its F32 merge matches "
            f"{report.framework} exactly, effect error "
            f"{report.effect_rel_err:.1e})")
    for alt in _larger_types(name):
        cand = _quantize_to(f32, alt, work, out, on_event)
        alt_report = check(cand, f32)
        cand.unlink()
        ok = alt_report.ok
        on_event(Log(f"{alt} measured instead: {'passes' if ok else 'fails'} "
                     f"({_numbers(alt_report)})"))
        if ok:
            return (f"{what}; {alt} passes ({_numbers(alt_report)}): use --quant {alt}, or "
                    "--quant auto for the smallest type that passes")
    return f"{what}; no larger quantized type passes either: use --quant F32"
