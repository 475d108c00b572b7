"""Check a GGUF LoRA adapter against its base *before* llama.cpp sees it.

llama-cpp-python does not detect a failed adapter load: the first inference segfaults. So
every check llama.cpp makes at load time (llama-adapter.cpp) is repeated here, in Python, with
a message that names the tensor and the expected shape.
"""

from __future__ import annotations

from pathlib import Path

from edge_tune.converters.base_info import BaseInfo, field_value, open_gguf
from edge_tune.errors import EdgeTuneError


def check_tensors(tensors: dict[str, tuple[int, ...]], base: BaseInfo) -> list[str]:
    """Problems with adapter tensors (ggml ``ne`` shapes) against the base. Pure."""
    problems: list[str] = []
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, shape in tensors.items():
        if name.endswith((".lora_a", ".lora_b")):
            pairs.setdefault(name[:-7], {})[name[-1]] = shape
        elif not name.endswith("_norm.weight"):  # llama.cpp skips norm vectors
            problems.append(f"tensor {name!r}: name must end in .lora_a or .lora_b")
    for target, ab in sorted(pairs.items()):
        if set(ab) != {"a", "b"}:
            missing = "lora_b" if "a" in ab else "lora_a"
            problems.append(f"tensor {target!r}: {missing} is missing")
            continue
        a, b = ab["a"], ab["b"]
        if base.tensors is not None and target not in base.tensors:
            problems.append(f"tensor {target!r} does not exist in the base model")
            continue
        if len(a) != 2 or len(b) != 2:
            problems.append(f"tensor {target!r}: lora_a/lora_b must be 2-D")
            continue
        if base.tensors is None:
            continue
        base_shape = base.tensors[target]
        if target.endswith("token_embd.weight"):
            # For embeddings A and B are flipped (llm_build_inp_embd).
            ok = base_shape[0] == b[1] and base_shape[1] == a[1]
            want = f"lora_a [r, {base_shape[1]}] and lora_b [r, {base_shape[0]}]"
        else:
            ok = base_shape[0] == a[0] and base_shape[1] == b[1] and a[1] == b[0]
            want = f"lora_a [{base_shape[0]}, r] and lora_b [r, {base_shape[1]}]"
        if not ok:
            problems.append(f"tensor {target!r}: shapes lora_a {list(a)}, lora_b {list(b)} do "
                            f"not fit base shape {list(base_shape)} (expected {want})")
    if not pairs:
        problems.append("no LoRA tensors")
    return problems


def validate_adapter_file(path: Path, base: BaseInfo) -> dict:
    """Raise EdgeTuneError unless ``path`` is a GGUF LoRA llama.cpp will load onto ``base``.

    Returns the adapter's KV metadata (alpha, edge_tune.* provenance keys).
    """
    import gguf

    reader = open_gguf(path)
    kind = field_value(reader, "general.type")
    if kind != "adapter" or field_value(reader, "adapter.type") != "lora":
        raise EdgeTuneError(f"{path}: not a LoRA adapter GGUF (general.type={kind!r}; "
                            "expected 'adapter' with adapter.type='lora')")
    arch = field_value(reader, "general.architecture")
    if arch != base.arch:
        raise EdgeTuneError(f"{path}: adapter architecture {arch!r} does not match the base "
                            f"model's {base.arch!r}")
    alpha = reader.fields.get("adapter.lora.alpha")
    # Any type other than FLOAT32 aborts the whole process inside ggml.
    if alpha is None or alpha.types != [gguf.GGUFValueType.FLOAT32]:
        raise EdgeTuneError(f"{path}: adapter.lora.alpha must be a FLOAT32 value")
    tensors = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}
    problems = check_tensors(tensors, base)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise EdgeTuneError(f"{path}: adapter does not fit the base model: {problems[0]}{more}")
    return {k: field_value(reader, k) for k in reader.fields
            if k.startswith(("adapter.", "edge_tune.", "general.name"))}
