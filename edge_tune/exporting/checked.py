"""The check every merged or quantized model passes before it takes its name: made from the
exact F32 model, checked (``verify``'s short check), then renamed onto its name, or moved
aside as ``NAME.rejected.gguf`` with the reason (:func:`ship_checked`); and the free-space
check before an export writes."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from edge_tune.errors import UsageError
from edge_tune.events import EventSink, Log, Progress
from edge_tune.verify import VerifyReport

# `-q auto` tries these from the smallest up; the first whose check passes is written.
AUTO_LADDER = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16")


def quant_name(quant: str) -> str:
    """``auto`` -> ``AUTO``; anything else as :func:`quantize.normalize` spells it."""
    from edge_tune.converters.integrations import quantize as quant_mod

    return "AUTO" if quant.strip().lower() == "auto" else quant_mod.normalize(quant)


def disk_type(name: str) -> str:
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
            raise UsageError("picks the smallest type whose check passes: it needs the check "
                             "(drop --no-verify; only a run has held-back prompts)",
                             setting="quant", value="auto")
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
            raise CheckFailed(f"no type up to F16 passes the check ({why}); nothing was "
                              "written", setting="quant", value="auto")
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


def weights_bytes(model_dir: Path) -> int:
    """Bytes of a full run's fp32 weights (its safetensors files): the F32 GGUF's size."""
    from edge_tune.fsutil import tree_bytes

    return sum(tree_bytes(f) for f in Path(model_dir).glob("*.safetensors"))


def sweep_and_check(out: Path, f32_bytes: int, quant: str, on_event: EventSink) -> None:
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
