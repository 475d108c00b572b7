"""``verify``: llama.cpp against torch+PEFT (or mlx) on a run's held-back prompts (the check
is :func:`edge_tune.verify.check_run`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from edge_tune.events import EventSink, ignore
from edge_tune.verify import VerifyReport, check_run


def verify(run: Path, base: Optional[Path] = None, merged: Optional[Path] = None,
           on_event: EventSink = ignore, n_prompts: int = 3, max_new: int = 12,
           _merged_f32: Optional[Path] = None, _adapter_gguf: Optional[Path] = None
           ) -> VerifyReport:
    """torch+PEFT vs llama.cpp on the run's held-back prompts (see :mod:`edge_tune.verify`).
    ``merged``: check a merged export instead of the run's adapter GGUF. Returns the report;
    ``report.ok`` says whether it is within tolerance."""
    return check_run(run, base, merged, on_event, n_prompts, max_new, _merged_f32, _adapter_gguf)
