"""The export steps ``export`` and ``train`` share: a PEFT adapter as a GGUF LoRA adapter, merged
into its base (F32 first, then llama.cpp's quantizer), a full fine-tuning run's model as one
GGUF, a vLLM adapter folder, and an Ollama Modelfile beside any of them. Merged and full models
are checked before they take their name (:mod:`edge_tune.exporting.checked`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from edge_tune.adapters import vllm_base
from edge_tune.errors import DataError, UsageError
from edge_tune.events import Done, EventSink, Log, ignore
from edge_tune.exporting.checked import (disk_type, quant_name, ship_checked,
                                         sweep_and_check, weights_bytes)
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


def export_adapter(adapter: Path, peft_dir: Path, man: Optional[Manifest], info,
                   base_gguf: Optional[Path], out: Optional[Path], outtype: str = "f32",
                   on_event: EventSink = ignore, base_sha256: Optional[str] = None,
                   verify: bool = True, base: Optional[Path] = None,
                   ollama: Optional[Path] = None, system: Optional[str] = None,
                   template: Optional["template_choice.ChatTemplate"] = None) -> ExportResult:
    """A PEFT adapter (``peft_dir``, of the run or folder ``adapter``) as a GGUF LoRA adapter
    converted against the base ``info`` (:func:`edge_tune.adapters.conversion_base`), of type
    ``outtype`` (f32, f16, q8_0). Default output: ``RUN/adapter.gguf`` for a run, else
    ``ADAPTER.gguf`` beside the folder. ``base_sha256``: the GGUF base's digest when known (it
    goes into the file; else hashed here). ``verify`` (a run only): the short check against
    ``base`` (None: the run's). ``ollama``: a Modelfile into that directory (``system``: its
    SYSTEM prompt; ``template``: its TEMPLATE). Returns its :class:`ExportResult`."""
    from edge_tune.converters.formats import peft_to_gguf

    if out is None:
        out = (Path(adapter) / "adapter.gguf") if man is not None else \
            Path(adapter).with_name(Path(adapter).name + ".gguf")
    meta = {"general.name": f"edge-tune LoRA ({Path(adapter).name})"}
    if base_gguf is not None:
        meta["edge_tune.base_sha256"] = base_sha256 or sha256_file(base_gguf)
        meta["edge_tune.base_name"] = Path(base_gguf).name
    plan = peft_to_gguf.convert(peft_dir, info, Path(out), outtype, meta)
    on_event(Log(f"wrote {out} ({len(plan.tensors) // 2} LoRA pairs, rank {plan.rank}, "
                 f"alpha {plan.alpha:g}, {outtype})"))
    report = None
    if verify and man is not None:
        report = verify_hook(Path(adapter), base, on_event, adapter_gguf=Path(out))
    modelfile = None
    if ollama is not None:
        modelfile = write_ollama(Path(ollama), base_gguf, Path(out), system, man, on_event,
                                 template)
    on_event(Done("export", {"path": str(out)}))
    return ExportResult("adapter", Path(out), quant=outtype.upper(),
                        bytes=Path(out).stat().st_size, rank=plan.rank, alpha=plan.alpha,
                        verify=report, modelfile=modelfile)


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
    :func:`~edge_tune.exporting.checked.ship_checked` does (``quant`` ``auto`` too). Returns its :class:`ExportResult`.

    ``vocab_from``: the base GGUF the run was trained from (default: the manifest's, when it
    was given as a GGUF). Its tokenizer was rebuilt by transformers for training, and
    llama.cpp's converter does not turn that rebuilt copy back into the same vocabulary
    (token types, special tokens, pre-tokenizer), so the model keeps the base's own
    ``tokenizer.*`` metadata (the converted chat template excepted)."""
    import tempfile

    from edge_tune.converters.integrations import hf_to_gguf

    name = quant_name(quant)
    if name == "AUTO" and not verify:
        raise UsageError("picks the smallest type whose check passes: drop --no-verify",
                         setting="quant", value="auto")
    model_dir = run / (man.model.hf if man.model is not None else "model")
    if not (model_dir / "config.json").is_file():
        raise DataError(f"{model_dir}: the full run's model is missing (expected its HF "
                        "weights: config.json and model.safetensors)")
    given = Path(out) if out is not None else None
    out = given or run / f"model-{name.lower()}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = None
    if vocab_from is None and man.base.gguf and man.base.gguf_source == "given":
        vocab_from = Path(man.base.gguf)
    sweep_and_check(out, weights_bytes(model_dir), disk_type(name), on_event)
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
        modelfile = write_ollama(Path(ollama), out, None, system, man, on_event, template)
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
        raise DataError(f"{converted}: {n_src} tokens, but the base {base} has {n_base} "
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


def export_vllm(adapter: Path, peft_dir: Path, man: Optional[Manifest], base: Optional[Path],
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


def export_merged(adapter: Path, peft_dir: Path, man: Optional[Manifest],
                   base_gguf: Optional[Path], out: Optional[Path], quant: str, on_event: EventSink, verify: bool,
                   ollama: Optional[Path], system: Optional[str] = None,
                   template: Optional["template_choice.ChatTemplate"] = None,
                   keep_rejected: bool = True) -> ExportResult:
    """Merge into an F32 GGUF first (exact; what verify checks), then let llama.cpp's own
    quantizer make the requested type from it; checked before it takes its name
    (:func:`~edge_tune.exporting.checked.ship_checked`)."""
    import tempfile

    from edge_tune.converters.formats import merge as merge_mod
    from edge_tune.converters.formats.base_info import from_gguf
    from edge_tune.converters.formats.peft_to_gguf import check_vocabulary, read_peft_dir

    name = quant_name(quant)
    if name == "AUTO" and (not verify or man is None):
        raise UsageError("picks the smallest type whose check passes: it needs the check "
                         "(drop --no-verify; the check needs a run directory)",
                         setting="quant", value="auto")
    if base_gguf is None:
        raise UsageError(f"{adapter}: --merge needs a GGUF base: pass --base BASE.gguf "
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

    sweep_and_check(out, merge_mod.estimate_bytes(read_header(base_gguf), "F32"),
                     disk_type(name), on_event)
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
        modelfile = write_ollama(Path(ollama), out, None, system, man, on_event, template)
    on_event(Done("export", {"path": str(out)}))
    return ExportResult("merged", out, quant=name, bytes=size, merged_tensors=summary["merged"],
                        dora=summary["dora"], verify=report, modelfile=modelfile)


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


def write_ollama(directory: Path, model_gguf: Optional[Path], adapter_gguf: Optional[Path],
                  system: Optional[str], man: Optional[Manifest], on_event: EventSink,
                  chosen: Optional["template_choice.ChatTemplate"] = None) -> Path:
    """DIR/Modelfile (FROM model, ADAPTER adapter, TEMPLATE from the chat template: ``chosen``
    (--chat-template or the run's), else the model's own; stop words, SYSTEM), with the files
    it names placed beside it."""
    from edge_tune.converters.integrations import ollama
    from edge_tune.converters.formats.base_info import field_value, open_gguf
    from edge_tune.fsutil import write_text_atomic

    if model_gguf is None:
        raise UsageError("needs a GGUF base model (pass --base BASE.gguf)", setting="ollama")
    reader = open_gguf(Path(model_gguf))
    template = chosen.text if chosen else field_value(reader, "tokenizer.chat_template")
    handlers = ollama.builtin(field_value(reader, "general.architecture") or "", template or "")
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
    notes = tuple(n for n in (trim_note, ollama.builtin_note(handlers)) if n)
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
                                 "-f Modelfile", notes=notes, handlers=handlers)
    path = directory / "Modelfile"
    write_text_atomic(path, text)
    builtin = f", RENDERER {handlers.renderer}" if handlers and handlers.renderer else ""
    builtin += f", PARSER {handlers.parser}" if handlers else ""
    on_event(Log(f"wrote {path} (FROM {from_name}" + (f", ADAPTER {adapter_name}" if adapter_name
                                                       else "") + builtin + ")"))
    from edge_tune.exporting.targets import ollama_create, ollama_name

    ollama_create(path, ollama_name(Path(adapter_gguf or model_gguf)), on_event)
    return path
