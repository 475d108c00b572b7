"""Check a GGUF LoRA adapter against its base *before* llama.cpp sees it.

llama-cpp-python does not detect a failed adapter load: the first inference segfaults. And some
adapters load fine and then abort inside ggml at the first token, or run and compute something
other than what PEFT computes. So every check llama.cpp's loader makes (``llama-adapter.cpp``)
is repeated here, and so is what its graph does with each pair (:mod:`.lora_graph`), with a
one-line message that names the tensor, what was expected and the route that works.

This is the one check ``export``, ``chat``, ``serve``, ``bundle`` and ``verify`` share: the GGUF
writer plans through :func:`check_tensors`, and the engine calls :func:`validate_adapter_file`
for every adapter file it loads.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from edge_tune.converters.formats.base_info import BaseInfo, field_value, open_gguf
from edge_tune.converters.formats.lora_graph import (
    MERGE_ROUTE, TENSOR_TYPES, graph_problem, untie_route,
)
from edge_tune.errors import DataError, Unsupported


def check_tensors(tensors: dict[str, tuple[int, ...]], base: BaseInfo,
                  types: Optional[dict[str, str]] = None) -> list[str]:
    """Problems with adapter tensors (ggml ``ne`` shapes; ``types``: ggml type names) against
    the base, as llama.cpp's loader and graph would meet them. Pure."""
    problems: list[str] = []
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, shape in tensors.items():
        if name.endswith((".lora_a", ".lora_b")):
            pairs.setdefault(name[:-7], {})[name[-1]] = shape
        elif name.endswith("_norm.weight"):
            # llama.cpp's loader skips these: the adapter's norms would silently not apply.
            problems.append(f"tensor {name!r}: llama.cpp ignores norm vectors in an adapter, so "
                            f"it would not compute what was trained; {MERGE_ROUTE}")
        else:
            problems.append(f"tensor {name!r}: name must end in .lora_a or .lora_b (llama.cpp "
                            "refuses any other tensor in an adapter)")
        kind = (types or {}).get(name)
        if kind is not None and kind not in TENSOR_TYPES:
            problems.append(f"tensor {name!r}: type {kind} (expected one of "
                            f"{', '.join(sorted(TENSOR_TYPES))})")
    for target, ab in sorted(pairs.items()):
        if set(ab) != {"a", "b"}:
            missing = "lora_b" if "a" in ab else "lora_a"
            problems.append(f"tensor {target!r}: {missing} is missing")
            continue
        a, b = ab["a"], ab["b"]
        if base.tensors is not None and target not in base.tensors:
            if target == "output.weight" and base.tied_embeddings:
                problems.append("tensor 'output.weight': a LoRA on the output layer (lm_head) "
                                "cannot run on this base: it has no output.weight (its "
                                f"embeddings are tied); {untie_route(base.arch)}")
            else:
                problems.append(f"tensor {target!r} does not exist in the base model (an "
                                "adapter for another model?)")
            continue
        graph = graph_problem(target, base.arch, base.tied_embeddings)
        if graph:
            problems.append(graph)
            continue
        if len(a) != 2 or len(b) != 2 or min(a + b) < 1:
            problems.append(f"tensor {target!r}: lora_a {list(a)} / lora_b {list(b)} must be "
                            "non-empty 2-D matrices")
            continue
        shape_problem = _pair_shape_problem(target, a, b, (base.tensors or {}).get(target))
        if shape_problem:
            problems.append(shape_problem)
    if not pairs:
        problems.append("no LoRA tensors (expected <base tensor>.lora_a/.lora_b pairs)")
    return problems


def _pair_shape_problem(target: str, a: tuple, b: tuple,
                        base_shape: Optional[tuple]) -> Optional[str]:
    """The loader's shape rule for one pair (ggml ``ne`` order), plus the rank rule it leaves
    to the graph for embeddings; ``base_shape`` None: only that A and B multiply."""
    if target == "token_embd.weight":
        # Flipped (build_inp_embd: B · get_rows(A, tokens)): A [r, vocab], B [r, n_embd]. The
        # loader does not compare the ranks; a mismatch aborts at the first token.
        ok = a[0] == b[0] and (base_shape is None or (a[1] == base_shape[1] and
                                                        b[1] == base_shape[0]))
        want = ("lora_a [r, vocab] and lora_b [r, n_embd]" if base_shape is None else
                f"lora_a [r, {base_shape[1]}] and lora_b [r, {base_shape[0]}]")
    else:  # build_lora_mm: B · (A · x): A [n_in, r], B [r, n_out]
        ok = a[1] == b[0] and (base_shape is None or (a[0] == base_shape[0] and
                                                        b[1] == base_shape[1]))
        want = ("lora_a [n_in, r] and lora_b [r, n_out]" if base_shape is None else
                f"lora_a [{base_shape[0]}, r] and lora_b [r, {base_shape[1]}]")
    if ok:
        return None
    fit = f"do not fit base shape {list(base_shape)}" if base_shape else "do not multiply"
    return (f"tensor {target!r}: adapter does not fit the base model: shapes lora_a {list(a)}, "
            f"lora_b {list(b)} {fit} (expected {want}, ggml order)")


def check_alpha(reader) -> Optional[str]:
    """Why ``adapter.lora.alpha`` would crash llama.cpp or scale differently, or None."""
    import gguf

    alpha = reader.fields.get(gguf.Keys.Adapter.LORA_ALPHA)
    # Any type other than FLOAT32 aborts the whole process inside ggml (gguf_get_val_f32).
    if alpha is None or alpha.types != [gguf.GGUFValueType.FLOAT32]:
        kind = "missing" if alpha is None else f"of type {alpha.types[0].name}"
        return f"adapter.lora.alpha is {kind} (expected a FLOAT32 value)"
    value = float(alpha.contents())
    if not math.isfinite(value):
        return f"adapter.lora.alpha is {value} (expected a finite number)"
    if value == 0.0:
        # llama-adapter.h get_scale: alpha 0 means "no alpha", scale 1 (not an effect of 0).
        return ("adapter.lora.alpha is 0, which llama.cpp reads as 'no alpha' and applies at "
                "scale 1 (expected the LoRA alpha, e.g. 2x the rank)")
    return None


def validate_adapter_file(path: Path, base: BaseInfo) -> dict:
    """Raise EdgeTuneError unless ``path`` is a GGUF LoRA that llama.cpp loads onto ``base`` and
    runs computing what the adapter was trained to compute.

    Returns the adapter's KV metadata (alpha, edge_tune.* provenance keys, and
    ``made_by``: ``"edge-tune"`` or ``"llama.cpp"`` (its convert_lora_to_gguf.py) or
    ``"unknown"``).
    """
    import gguf

    reader = open_gguf(path)
    kind = field_value(reader, "general.type")
    if kind != "adapter" or field_value(reader, "adapter.type") != "lora":
        raise DataError(f"{path}: not a LoRA adapter GGUF (general.type={kind!r}; "
                        "expected 'adapter' with adapter.type='lora')")
    arch = field_value(reader, "general.architecture")
    if arch != base.arch:
        raise DataError(f"{path}: adapter architecture {arch!r} does not match the base "
                        f"model's {base.arch!r}")
    alpha_problem = check_alpha(reader)
    if alpha_problem:
        raise DataError(f"{path}: {alpha_problem}")
    if "adapter.alora.invocation_tokens" in reader.fields:
        raise Unsupported(f"{path}: an aLoRA (activated LoRA) adapter: edge-tune runs plain "
                          "LoRA adapters only (expected no adapter.alora.* keys)")
    tensors = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}
    types = {t.name: gguf.GGMLQuantizationType(t.tensor_type).name for t in reader.tensors}
    problems = check_tensors(tensors, base, types)
    if problems:
        extra = len(problems) - 1
        more = f" (and {extra} more problem{'s' if extra > 1 else ''})" if extra else ""
        raise DataError(f"{path}: {problems[0]}{more}")
    import numpy as np

    # llama.cpp loads NaN/inf weights without a word, then every logit is NaN: the answer is
    # empty. Adapters are small, so every value is checked (quantized types dequantized).
    for t in reader.tensors:
        if not np.isfinite(gguf.quants.dequantize(t.data, t.tensor_type)).all():
            raise DataError(f"{path}: tensor {t.name!r} has NaN or infinite values "
                            "(expected finite LoRA weights; a run that diverged leaves "
                            "these: retrain with a lower --lr)")
    meta = {k: field_value(reader, k) for k in reader.fields
            if k.startswith(("adapter.", "edge_tune.", "general.name"))}
    meta["made_by"] = made_by(reader)
    return meta


def made_by(reader) -> str:
    """Who wrote an adapter GGUF: edge-tune records its base; llama.cpp's converter does not
    (it writes ``general.type=adapter`` plus its own ``general.*`` naming keys)."""
    keys = set(reader.fields)
    if any(k.startswith("edge_tune.") for k in keys):
        return "edge-tune"
    if {"general.quantization_version", "general.file_type"} & keys or \
            any(k.startswith("general.base_model") for k in keys):
        return "llama.cpp"
    return "unknown"


def what_verify_can_check(path: Path, base_gguf: Path) -> str:
    """``edge-tune verify ADAPTER.gguf``, one line: a GGUF adapter alone carries no trained
    adapter to compare with, so this says what the shared check against ``base_gguf`` checked
    (it passed) and what it cannot check. A failing file raises the shared check's own
    EdgeTuneError (:func:`validate_adapter_file`)."""
    from edge_tune.converters.formats.base_info import from_gguf

    meta = validate_adapter_file(Path(path), from_gguf(base_gguf))
    pairs = sum(1 for _ in open_gguf(path).tensors) // 2
    who = {"edge-tune": "edge-tune", "llama.cpp": "llama.cpp's convert_lora_to_gguf.py"}.get(
        meta["made_by"], "an unknown tool")
    not_checked = "its numbers against the trained adapter"
    if meta["made_by"] == "llama.cpp":
        not_checked += (" (that converter writes PEFT's lora_alpha as is: rsLoRA and "
                        "alpha_pattern adapters come out at the wrong scale)")
    if not meta.get("edge_tune.base_sha256"):
        not_checked += "; which base it was trained on (the file does not record it)"
    return (f"{path}: made by {who}; checked: it loads and runs on {Path(base_gguf).name} "
            f"({pairs} LoRA pairs: names, shapes, alpha, what llama.cpp's graph does with "
            f"each); not checked: {not_checked}. For the numbers, verify the run directory, "
            "or export the PEFT adapter with `edge-tune export ADAPTER_DIR --base BASE` and "
            "compare there")
