"""``verify``: llama.cpp against torch+PEFT (or mlx) on a run's held-back prompts (the
comparison itself is :mod:`edge_tune.verify`), and the short check ``train`` and ``export``
run by default."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from edge_tune import models
from edge_tune.adapters import conversion_base, peft_adapter
from edge_tune.errors import CheckFailed, EdgeTuneError
from edge_tune.events import Done, EventSink, Log, ignore
from edge_tune.verify import VerifyReport


def verify(run: Path, base: Optional[Path] = None, merged: Optional[Path] = None,
           on_event: EventSink = ignore, n_prompts: int = 3, max_new: int = 12,
           _merged_f32: Optional[Path] = None, _adapter_gguf: Optional[Path] = None
           ) -> VerifyReport:
    """torch+PEFT vs llama.cpp on the run's held-back prompts (see :mod:`edge_tune.verify`).
    ``merged``: check a merged export instead of the run's adapter GGUF. Returns the report;
    ``report.ok`` says whether it is within tolerance."""
    import tempfile

    from edge_tune import verify as verify_mod

    run = Path(run)
    if run.suffix.lower() == ".gguf" and run.is_file():  # an adapter .gguf alone
        from edge_tune.converters.formats.validate import what_verify_can_check

        raise EdgeTuneError(what_verify_can_check(run, base or models.default_gguf()))
    if run.is_dir() and (full := _full_run(run)) is not None:
        return _verify_full(run, full, base, merged, on_event, n_prompts, max_new, _merged_f32)
    peft_dir, man = peft_adapter(run)
    if man is None:
        raise EdgeTuneError(f"{run}: verify needs an edge-tune run directory (its manifest.json "
                            "names the data and the base)")
    mlx_adapter = _mlx_side_for(run, man)
    _, base_gguf = conversion_base(peft_dir, man, base)
    if base_gguf is None:
        raise EdgeTuneError(f"{run}: verify runs llama.cpp and needs a GGUF base: pass --base")
    if merged is not None:  # another model's file: one line, before llama.cpp decodes it
        verify_mod.check_same_model(Path(merged), Path(base_gguf))
    man_hf = man.base.hf_dir
    if man_hf and Path(man_hf, "config.json").is_file() and \
            (base is None or not man.base.gguf):
        hf_dir = Path(man_hf)
    else:
        hf_dir = models.dequantized_copy(Path(base_gguf), on_event)
    kw = dict(n_prompts=n_prompts, max_new=max_new, on_event=on_event, mlx_adapter=mlx_adapter)
    if merged is None:
        gg = _adapter_gguf or (run / man.adapter.gguf if man.adapter.gguf else None)
        if gg is None or not Path(gg).is_file():
            raise EdgeTuneError(f"{run}: no adapter.gguf to verify; run `edge-tune export {run}`")
        report = verify_mod.verify_run(run, man, peft_dir, Path(base_gguf), hf_dir,
                                       adapter_gguf=Path(gg), **kw)
    elif _merged_f32 is not None or _is_f32(Path(merged)):
        report = verify_mod.verify_run(run, man, peft_dir, Path(base_gguf), hf_dir,
                                       merged=Path(merged), merged_f32=_merged_f32, **kw)
    else:  # quantized: the exact check needs the F32 merge; remake it (seconds, small models)
        from edge_tune.converters.formats import merge as merge_mod
        from edge_tune.converters.formats.peft_to_gguf import read_peft_dir

        config, tensors = read_peft_dir(peft_dir)
        with tempfile.TemporaryDirectory(prefix="edge-tune-verify-") as work:
            f32 = Path(work) / "merged-f32.gguf"
            merge_mod.merge(Path(base_gguf), config, tensors, f32, "F32", str(peft_dir),
                            on_event)
            report = verify_mod.verify_run(run, man, peft_dir, Path(base_gguf), hf_dir,
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

    from edge_tune import verify as verify_mod
    from edge_tune.adapters import run_base_gguf
    from edge_tune.converters.integrations import hf_to_gguf

    base_gguf = Path(base) if base is not None else run_base_gguf(man)
    if base_gguf is None:
        raise EdgeTuneError(f"{run}: verify compares against the base in llama.cpp and needs "
                            "a GGUF base: pass --base BASE.gguf")
    model_dir = run / (man.model.hf if man.model is not None else "model")
    shipped = Path(merged) if merged is not None else         run / (man.model.gguf if man.model is not None and man.model.gguf else "model.gguf")
    if not shipped.is_file():
        raise EdgeTuneError(f"{shipped}: no model GGUF to verify; run `edge-tune export {run}`")
    verify_mod.check_same_model(shipped, base_gguf)
    man_hf = man.base.hf_dir
    hf_dir = Path(man_hf) if man_hf and Path(man_hf, "config.json").is_file() and base is None \
        else models.dequantized_copy(Path(base_gguf), on_event)
    kw = dict(n_prompts=n_prompts, max_new=max_new, on_event=on_event, full_model=model_dir)
    with tempfile.TemporaryDirectory(prefix="edge-tune-verify-") as work:
        if merged_f32 is None and not _is_f32(shipped):  # an F32 file is read for both
            merged_f32 = hf_to_gguf.convert(model_dir, Path(work) / "model-f32.gguf", "f32")
        report = verify_mod.verify_run(run, man, model_dir, base_gguf, hf_dir, merged=shipped,
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
    report = verify(run, base=base, merged=merged, on_event=on_event, n_prompts=2, max_new=8,
                    _merged_f32=merged_f32, _adapter_gguf=adapter_gguf)
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
    return report
