"""``doctor``: hardware facts and which training backend can run here."""

from __future__ import annotations

from edge_tune.training import registry
from edge_tune.errors import EdgeTuneError
from edge_tune.hardware import probe


def doctor() -> dict:
    """Hardware facts, every backend's availability (with the reason for each "no"), and
    what ``--backend auto`` picks."""
    from edge_tune.fsutil import cache_dir

    hw = probe(cache_dir())
    table = registry.availability(hw)
    try:
        pick, why = registry.choose("auto", hw)
    except EdgeTuneError as exc:
        pick, why = None, str(exc)
    return {
        "hardware": hw.to_dict(),
        "backends": [dict(vars(a), optimizers=list(registry.capabilities(a.name).optimizers))
                     for a in table],
        "auto": {"backend": pick, "reason": why},
        "cpu_bf16": hw.has_bf16_cpu,
    }
