"""PEFT LoRA adapter -> GGUF LoRA adapter that llama.cpp loads.

``plan()`` is pure numpy: PEFT config + tensors + base facts in, GGUF alpha + named arrays out.
``convert()`` does the I/O and writes atomically. What llama.cpp computes at run time is
``W x + (alpha_gguf / r) * B A x`` with r read per tensor, so every PEFT scaling variant is
mapped onto that one formula:

* plain LoRA: scale = lora_alpha / r        -> alpha_gguf = lora_alpha
* rsLoRA:     scale = lora_alpha / sqrt(r)  -> alpha_gguf = lora_alpha * sqrt(r)
* rank_pattern / alpha_pattern: per-module scales differ; the ratio to the file-wide scale is
  folded into that module's B.

What the config says about *where* LoRA goes (``target_modules`` list or regex string,
``layers_to_transform`` / ``layers_pattern``) needs no handling: the saved tensors name their
modules. ``fan_in_fan_out`` only says how a GPT-2 ``Conv1D`` stores its weight; PEFT's A
(r x in) and B (out x r) and its forward are the same either way. DoRA, ``modules_to_save``,
LoRA ``bias`` and an output/embedding LoRA on a tied base have no GGUF LoRA form that llama.cpp
computes like PEFT: they are refused here with the route that works (``--merge``, see
:mod:`.merge`, which handles each of them). An adapter trained with a resized vocabulary
(added tokens; :func:`check_vocabulary` reads every layout PEFT and Unsloth write) runs through
neither: it is refused as such, with PEFT's merge on a resized base as the route.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from edge_tune.converters.formats.base_info import BaseInfo, writing_gguf
from edge_tune.converters.formats.lora_graph import MERGE_ROUTE, untie_route
from edge_tune.converters.formats.names import (
    gguf_tensor_name, needs_rope_permute, rope_permute_rows, split_peft_key,
)
from edge_tune.converters.formats.validate import check_tensors
from edge_tune.errors import DataError, Unsupported, UsageError

OUTTYPES = ("f32", "f16", "q8_0")

# The route for adapters that are not LoRA at all (IA3, LoHa, prefix tuning, ...).
PEFT_MERGE_ROUTE = ("merge it in PEFT (`model.merge_and_unload().save_pretrained(DIR)`) and "
                    "convert that model with `edge-tune convert-base DIR`")


@dataclass
class Plan:
    alpha: float
    tensors: list[tuple[str, np.ndarray]]  # GGUF name, numpy array (PEFT orientation)
    rank: int


@dataclass
class PeftAdapter:
    """A PEFT adapter's tensors sorted by what they are (HF module names, HF orientation)."""

    loras: dict[str, dict[str, np.ndarray]]  # module -> {lora_A, lora_B, lora_embedding_A, ...}
    # PEFT's save_embedding_layers: the base weight of a targeted embedding/lm_head, saved in
    # case the vocabulary was resized. module -> weight.
    base_layers: dict[str, np.ndarray] = field(default_factory=dict)
    saved: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # modules_to_save:
    # module -> {"weight": full copy, "bias": ...}
    lora_bias: dict[str, np.ndarray] = field(default_factory=dict)  # module -> lora_B.bias


_LORA_BIAS = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_B(?:\.default)?\.bias$")
_BASE_LAYER = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.base_layer\.weight$")
_SAVED = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)(?:\.modules_to_save)?"
                    r"(?:\.default)?\.(?P<leaf>weight|bias)$")


def _saved_module(module: str, modules_to_save) -> bool:
    # PEFT wraps a module when its name ends with one of the listed names.
    return any(module == m or module.endswith("." + m) for m in (modules_to_save or []))


def parse_adapter(config: dict, tensors: dict[str, np.ndarray],
                  where: str = "adapter") -> PeftAdapter:
    """Sort PEFT's saved tensors into LoRA pairs, modules_to_save copies and LoRA biases.
    Refuses anything else, and adapters that are not LoRA. Pure."""
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise Unsupported(f"{where}: peft_type {config.get('peft_type')!r} is not LoRA, so it "
                          f"has no GGUF LoRA form; {PEFT_MERGE_ROUTE}")
    init = str(config.get("init_lora_weights", True)).lower()
    if init == "loftq":
        raise Unsupported(f"{where}: init_lora_weights='loftq': the adapter corrects the "
                          "quantization error of the 4-bit base it was trained on, not the "
                          "GGUF base; merge it in PEFT on that quantized base "
                          "(`merge_and_unload()`) and convert the result with "
                          "`edge-tune convert-base DIR`")
    if init.startswith(("pissa", "olora", "corda")):
        # These initializations move part of W into A/B and train on the residual W' = W - BA:
        # the adapter only computes what was trained on that residual base.
        raise Unsupported(f"{where}: init_lora_weights={config['init_lora_weights']!r}: the "
                          "adapter was trained on a modified base (W minus its initial "
                          "B·A), which the GGUF base is not; save it again with PEFT's "
                          "save_pretrained(..., path_initial_model_for_weight_conversion=...) "
                          "to get a plain LoRA, then export that")
    if config.get("layer_replication"):
        raise Unsupported(f"{where}: layer_replication changes the model's block structure; "
                          f"{PEFT_MERGE_ROUTE}")
    out = PeftAdapter(loras={})
    to_save = config.get("modules_to_save") or []
    if isinstance(to_save, str):
        to_save = [to_save]
    for key, arr in tensors.items():
        arr = np.asarray(arr, dtype=np.float32)
        split = split_peft_key(key)
        if split is not None:
            out.loras.setdefault(split[0], {})[split[1]] = arr
            continue
        m = _BASE_LAYER.match(key)
        if m:
            out.base_layers[m.group("module")] = arr
            continue
        m = _LORA_BIAS.match(key)
        if m:
            out.lora_bias[m.group("module")] = arr
            continue
        m = _SAVED.match(key)
        if m and ("modules_to_save" in key or _saved_module(m.group("module"), to_save)):
            out.saved.setdefault(m.group("module"), {})[m.group("leaf")] = arr
            continue
        if m and m.group("leaf") == "bias" and config.get("bias", "none") != "none":
            # PEFT's bias="all"/"lora_only": the base layers' own biases were trained too.
            module = m.group("module").removesuffix(".base_layer")  # under a LoRA wrapper
            out.saved.setdefault(module, {})["bias"] = arr
            continue
        if "trainable_tokens" in key:
            raise Unsupported(f"{where}: trainable_token_indices (retrained embedding rows, "
                              f"{key!r}) has no GGUF LoRA form; {PEFT_MERGE_ROUTE}")
        raise DataError(f"{where}: tensor {key!r} is not a LoRA A/B weight (expected "
                        "'<module>.lora_A.weight' / '.lora_B.weight', or a modules_to_save "
                        "copy listed in adapter_config.json)")
    if not out.loras and not out.saved:
        raise DataError(f"{where}: no LoRA tensors found")
    return out


def _pattern_value(patterns: dict, module: str, default):
    # PEFT (tuners_utils get_pattern_key) matches keys as regexes against the end of the
    # module name, at a dot boundary.
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _module_scale(config: dict, module: str, rank: int) -> float:
    alpha = float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8)))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def check_base_layers(adapter: PeftAdapter, base: BaseInfo, where: str) -> None:
    """PEFT saves a targeted embedding's base weight (``save_embedding_layers``) and loads it
    back over the model's: fine when it is the base's own shape, a resized vocabulary if not."""

    for module, arr in adapter.base_layers.items():
        name = gguf_tensor_name(module, base.arch, base.n_blocks)
        have = (base.tensors or {}).get(name if name != "output.weight" or not
                                        base.tied_embeddings else "token_embd.weight")
        if name is None or arr.ndim != 2 or (have is not None and
                                             tuple(reversed(have)) != arr.shape):
            raise Unsupported(
              f"{where}: the adapter carries its own {module} weight {list(arr.shape)} "
              f"that does not fit the base ({list(reversed(have)) if have else 'no tensor'}): "
              f"a resized vocabulary; {resized_route(arr.shape[0])}")


def resized_route(n_tokens: Optional[int]) -> str:
    """What runs an adapter trained with a resized vocabulary: nothing inside edge-tune (a GGUF
    LoRA adapter and ``--merge`` both keep the base's embedding rows), so PEFT's merge on a
    base resized first (``PeftModel.from_pretrained`` refuses the saved rows otherwise), then
    llama.cpp's converter via ``convert-base``."""
    n = str(n_tokens) if n_tokens else "N"
    return ("no edge-tune export can run it (a GGUF adapter and --merge keep the base's "
            f"embedding rows); merge it in PEFT on the base resized first "
            f"(`model.resize_token_embeddings({n})`, then `PeftModel.from_pretrained(model, "
            "ADAPTER).merge_and_unload().save_pretrained(DIR)`, the adapter's tokenizer saved "
            "into DIR too) and convert DIR with `edge-tune convert-base DIR` (llama.cpp's "
            "convert_hf_to_gguf.py)")


_WEIGHT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)"
                         r"(?:\.modules_to_save(?:\.default)?|\.original_module)?"
                         r"(?:\.base_layer)?(?:\.default)?\.weight$")


def _base_vocab(base: BaseInfo) -> Optional[int]:
    if base.n_vocab:
        return int(base.n_vocab)
    shape = (base.tensors or {}).get("token_embd.weight")
    return int(shape[1]) if shape is not None and len(shape) == 2 else None


def _vocab_side(module: str, base: BaseInfo) -> Optional[str]:
    """"token_embd.weight" / "output.weight" when ``module`` is the embedding / output layer."""
    try:
        name = gguf_tensor_name(module, base.arch, base.n_blocks)
    except KeyError:
        name = None
    if name in ("token_embd.weight", "output.weight"):
        return name
    leaf = module.rsplit(".", 1)[-1]
    return {"embed_tokens": "token_embd.weight", "lm_head": "output.weight"}.get(leaf)


def _token_indices(config: dict) -> list[int]:
    given = config.get("trainable_token_indices")
    lists = given.values() if isinstance(given, dict) else [given or []]
    return [i for ids in lists if isinstance(ids, list) for i in ids if isinstance(i, int)]


def adapter_vocabulary(config: dict, tensors: dict[str, np.ndarray],
                       base: BaseInfo) -> list[tuple[int, str]]:
    """Every vocabulary size the adapter's own tensors and config imply, as ``(tokens, what
    says so)``: full copies of the embedding / output layer (modules_to_save, PEFT's
    ``save_embedding_layers`` weights, with or without ``base_layer``), an embedding LoRA's
    A (r x vocab) or an output LoRA's B (vocab x r), and ``trainable_token_indices`` (its
    largest id + 1, a lower bound). Pure."""
    found: list[tuple[int, str]] = []
    for key, arr in tensors.items():
        shape = tuple(np.shape(arr))
        if len(shape) != 2:
            continue
        split = split_peft_key(key)
        if split is not None:
            module, part = split
            side = _vocab_side(module, base)
            if side == "token_embd.weight" and part == "lora_embedding_A":
                found.append((shape[1], f"the embedding LoRA of {module} is {list(shape)}"))
            elif side == "output.weight" and part == "lora_B":
                found.append((shape[0], f"the LoRA B of {module} is {list(shape)}"))
            continue
        m = _WEIGHT_KEY.match(key)
        if m and _vocab_side(m.group("module"), base):
            found.append((shape[0], f"its saved {key} is {list(shape)}"))
    ids = _token_indices(config)
    if ids:
        found.append((max(ids) + 1, f"trainable_token_indices reach token id {max(ids)}"))
    return found


def tokenizer_size(adapter_dir: Path) -> Optional[tuple[int, str]]:
    """``(tokens, file)`` of a tokenizer saved beside an adapter (Unsloth and HF's Trainer
    write one: ``tokenizer.json``, ``added_tokens.json``, ``tokenizer_config.json``'s
    ``added_tokens_decoder``): the largest token id + 1 any of them names; None without one
    or when none can be read. Reads JSON only."""
    adapter_dir = Path(adapter_dir)
    best: Optional[tuple[int, str]] = None

    def ids_of(name: str, doc) -> list[int]:
        if name == "tokenizer.json":
            vocab = (doc.get("model") or {}).get("vocab")
            ids = list(vocab.values()) if isinstance(vocab, dict) else \
                list(range(len(vocab))) if isinstance(vocab, list) else []
            return ids + [t.get("id") for t in doc.get("added_tokens") or []
                          if isinstance(t, dict)]
        if name == "added_tokens.json":
            return list(doc.values())
        return [int(k) for k in (doc.get("added_tokens_decoder") or {}) if str(k).isdigit()]

    for name in ("tokenizer.json", "added_tokens.json", "tokenizer_config.json"):
        path = adapter_dir / name
        if not path.is_file():
            continue
        try:
            doc = json.loads(path.read_text())
            ids = [i for i in ids_of(name, doc) if isinstance(i, int)]
        except (OSError, ValueError, AttributeError, TypeError):
            continue
        if ids and (best is None or max(ids) + 1 > best[0]):
            best = (max(ids) + 1, name)
    return best


def check_vocabulary(config: dict, tensors: dict[str, np.ndarray], base: BaseInfo,
                     where: str = "adapter", adapter_dir: Optional[Path] = None) -> None:
    """Refuse, in one line, an adapter trained with a resized vocabulary: one whose saved
    embedding/output tensors, trainable token ids or (``adapter_dir``) saved tokenizer imply a
    vocabulary other than the base's embedding rows. Every layout PEFT and Unsloth write after
    ``resize_token_embeddings``: modules_to_save copies of embed_tokens/lm_head,
    ``save_embedding_layers`` weights (``...embed_tokens.weight``, ``.base_layer.weight``),
    embedding/output LoRA, ``trainable_token_indices``, ``added_tokens.json`` or a larger
    ``tokenizer.json`` beside the adapter. Raises EdgeTuneError ``WHERE: the adapter was trained
    with a resized vocabulary (N tokens vs the base's M; what says so): ROUTE``; does nothing
    when the base's vocabulary is unknown."""
    have = _base_vocab(base)
    if not have:
        return
    found = [(n, what) for n, what in adapter_vocabulary(config, tensors, base)
             if (n > have if what.startswith("trainable") else n != have)]
    if adapter_dir is not None:
        saved = tokenizer_size(adapter_dir)
        if saved is not None and saved[0] > have:
            found.append((saved[0], f"the {saved[1]} beside it names {saved[0]} tokens"))
    if not found:
        return
    n, what = max(found, key=lambda x: x[0])
    bound = "at least " if what.startswith("trainable") else ""
    raise Unsupported(f"{where}: the adapter was trained with a resized vocabulary "
                      f"({bound}{n} tokens vs the base's {have}; {what}): {resized_route(n)}")


def refuse_unsupported(config: dict, adapter: PeftAdapter, where: str) -> None:
    """What has no GGUF LoRA form at all: each is refused with the route that works."""
    if config.get("use_dora") or any("lora_magnitude_vector" in p
                                     for p in adapter.loras.values()):
        raise Unsupported(f"{where}: DoRA adapters have no GGUF LoRA form (llama.cpp has no "
                          f"magnitude vectors); {MERGE_ROUTE}")
    if config.get("bias", "none") != "none" and any(
            list(leaves) == ["bias"] for leaves in adapter.saved.values()):
        raise Unsupported(f"{where}: bias={config['bias']!r} (the base layers' biases were "
                          f"trained too) has no GGUF LoRA form; {MERGE_ROUTE}")
    if adapter.saved or config.get("modules_to_save"):
        names = sorted(adapter.saved) or config.get("modules_to_save")
        raise Unsupported(f"{where}: modules_to_save (full copies of {names}) has no GGUF "
                          f"LoRA form; {MERGE_ROUTE}")
    if adapter.lora_bias or config.get("lora_bias"):
        raise Unsupported(f"{where}: lora_bias=true (a bias on LoRA B) has no GGUF LoRA form; "
                          f"{MERGE_ROUTE}")


def plan(config: dict, tensors: dict[str, np.ndarray], base: BaseInfo,
         where: str = "adapter") -> Plan:
    check_vocabulary(config, tensors, base, where)
    adapter = parse_adapter(config, tensors, where)
    refuse_unsupported(config, adapter, where)
    check_base_layers(adapter, base, where)
    modules = adapter.loras

    ranks = {m: (p.get("lora_A", p.get("lora_embedding_A"))).shape[0] for m, p in modules.items()
             if ("lora_A" in p or "lora_embedding_A" in p)}
    ref_rank = int(config.get("r") or next(iter(ranks.values())))
    # alpha_gguf / ref_rank must equal PEFT's scale for a default (un-patterned) module.
    alpha = _module_scale({**config, "alpha_pattern": None}, "", ref_rank) * ref_rank

    out: list[tuple[str, np.ndarray]] = []
    for module, parts in sorted(modules.items()):
        name = gguf_tensor_name(module, base.arch, base.n_blocks)
        if name is None:
            raise DataError(f"{where}: module {module!r} has no GGUF tensor for arch "
                            f"{base.arch!r}")
        if name == "output.weight" and base.tied_embeddings:
            raise Unsupported(f"{where}: LoRA on lm_head cannot run on this base as a GGUF "
                              f"adapter: its embeddings are tied (no output.weight); "
                              f"{untie_route(base.arch)}")
        embedding, a, b = lora_pair(parts, module, where)
        rank = a.shape[0]
        # Fold any per-module deviation from the file-wide scale into B.
        factor = _module_scale(config, module, rank) * rank / alpha
        if not math.isclose(factor, 1.0, rel_tol=1e-9):
            b = b * np.float32(factor)
        if embedding:
            # llama.cpp flips A and B for token_embd: lora_a = A^T, lora_b = B.
            a = a.T
        # Shapes first: the q/k permutation below assumes the base's head layout.
        problems = check_tensors({name + ".lora_a": tuple(reversed(a.shape)),
                                  name + ".lora_b": tuple(reversed(b.shape))}, base)
        if problems:
            raise DataError(f"{where}: {problems[0]}")
        which = needs_rope_permute(base.arch, name)
        if which:
            b = rope_permute_rows(b, base.n_head if which == "q" else base.n_head_kv)
        out.append((name + ".lora_a", np.ascontiguousarray(a)))
        out.append((name + ".lora_b", np.ascontiguousarray(b)))

    problems = check_tensors({n: tuple(reversed(a.shape)) for n, a in out}, base)
    if problems:
        raise DataError(f"{where}: {problems[0]}")
    return Plan(alpha=float(alpha), tensors=out, rank=ref_rank)


def lora_pair(parts: dict[str, np.ndarray], module: str,
              where: str) -> tuple[bool, np.ndarray, np.ndarray]:
    """A module's LoRA halves as PEFT stores them: ``(embedding, A, B)``, A (r, in) and B
    (out, r) (``lora_embedding_A``/``_B`` for an embedding). Raises EdgeTuneError when a half
    is missing or the two do not multiply."""
    embedding = "lora_embedding_A" in parts
    a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else \
        ("lora_A", "lora_B")
    if a_key not in parts or b_key not in parts:
        raise DataError(f"{where}: module {module!r} lacks {a_key} or {b_key}")
    a, b = parts[a_key], parts[b_key]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise DataError(f"{where}: module {module!r}: {a_key} {list(a.shape)} and "
                        f"{b_key} {list(b.shape)} do not multiply")
    return embedding, a, b


def read_peft_dir(adapter_dir: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Load ``adapter_config.json`` + ``adapter_model.safetensors`` (never pickles)."""
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    st_path = adapter_dir / "adapter_model.safetensors"
    if not cfg_path.is_file():
        raise DataError(f"{adapter_dir}: no adapter_config.json (expected a PEFT adapter "
                        "directory or an edge-tune run directory)")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{cfg_path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if not st_path.is_file():
        extra = " (adapter_model.bin is a pickle: edge-tune loads safetensors only)" \
            if (adapter_dir / "adapter_model.bin").exists() else ""
        raise DataError(f"{adapter_dir}: no adapter_model.safetensors{extra}")
    return config, _load_safetensors(st_path)


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k: f.get_tensor(k).astype(np.float32) for k in f.keys()}
    except TypeError:
        pass  # bf16 has no numpy dtype: read the bytes (below)
    except Exception as exc:
        raise DataError(f"{path}: unreadable safetensors file ({exc})") from None
    return _load_safetensors_bytes(path)


# safetensors dtype -> numpy dtype of its bytes; BF16 is read as the top 16 bits of a float32.
_BYTE_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}


def _load_safetensors_bytes(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as float32, bf16 included, without torch. The format
    (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length, a JSON
    header (name -> dtype, shape, data_offsets from the end of the header), then the data."""
    try:
        raw = Path(path).read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            dtype = np.dtype(_BYTE_DTYPES[info["dtype"]])
            if 8 + n + end > len(raw) or end - begin != math.prod(info["shape"]) * dtype.itemsize:
                raise ValueError(f"tensor {name}: data_offsets do not fit its shape or the file")
            data = np.frombuffer(raw, dtype, (end - begin) // dtype.itemsize, 8 + n + begin)
            if info["dtype"] == "BF16":
                data = (data.astype("<u4") << 16).view("<f4")
            out[name] = data.astype(np.float32).reshape(info["shape"])
        return out
    except KeyError as exc:
        raise DataError(f"{path}: unreadable safetensors file (dtype or field {exc} not "
                        f"supported; expected {', '.join(_BYTE_DTYPES)} tensors)") from None
    except (ValueError, TypeError) as exc:
        raise DataError(f"{path}: unreadable safetensors file ({exc})") from None


def write_gguf(plan_: Plan, arch: str, out_path: Path, outtype: str = "f32",
               metadata: Optional[dict] = None) -> Path:
    """Write the planned adapter to ``out_path`` atomically (temp file, then rename)."""
    import gguf

    if outtype not in OUTTYPES:
        raise UsageError(f"expected one of {', '.join(OUTTYPES)}",
                         setting="outtype", value=repr(outtype))
    out_path = Path(out_path)
    with writing_gguf(out_path, arch) as w:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(plan_.alpha))
        for key, value in (metadata or {}).items():
            if isinstance(value, str):
                w.add_string(key, value)
            elif isinstance(value, int):
                w.add_uint32(key, value)
            elif isinstance(value, float):
                w.add_float32(key, value)
        for name, arr in plan_.tensors:
            if outtype == "f16":
                w.add_tensor(name, arr.astype(np.float16))
            elif outtype == "q8_0" and arr.shape[-1] % 32 == 0:
                q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
                w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            elif outtype == "q8_0":  # rows too short to quantize in 32-blocks: keep f16
                w.add_tensor(name, arr.astype(np.float16))
            else:
                w.add_tensor(name, arr.astype(np.float32))
    return out_path


def convert(adapter_dir: Path, base: BaseInfo, out_path: Path, outtype: str = "f32",
            metadata: Optional[dict] = None) -> Plan:
    config, tensors = read_peft_dir(adapter_dir)
    check_vocabulary(config, tensors, base, str(adapter_dir), adapter_dir)
    p = plan(config, tensors, base, where=str(adapter_dir))
    write_gguf(p, base.arch, out_path, outtype, metadata)
    return p
