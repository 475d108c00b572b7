"""Tiny random models of seven model families, as GGUF files made by llama.cpp's own converter.

``family_gguf(name)`` is what a user who downloaded that family's GGUF has; ``family_hf(name)``
is the HF checkpoint it was converted from. Families (``FAMILIES``), each with the config
quirks of its real models and a tokenizer of the same kind, trained here in memory on a small
corpus (vocabulary ~520, no hub access):

=========  =====================  ==========================================================
name       real model it mimics   quirks
=========  =====================  ==========================================================
llama      Llama-3.2-1B-Instruct  llama3 RoPE scaling (factor 32), RoPE base 500000, untied
                                  output; byte-level BPE with the Llama-3 regex
qwen2      Qwen2.5-0.5B-Instruct  q/k/v bias, RoPE base 1e6, tied; byte-level BPE (Qwen regex,
                                  NFC); tools in the system turn
qwen3      Qwen3-0.6B             q/k RMS norms, heads x head_dim != hidden, RoPE base 1e6,
                                  tied; the reasoning template
gemma2     gemma-2-2b-it          attention and final logit soft-capping, sliding window (128)
                                  on every other layer, norms stored as w-1, embeddings scaled by
                                  sqrt(hidden), tied; SentencePiece (no dummy prefix); the
                                  template refuses a system message
gemma3     gemma-3-4b-it          q/k norms, 5 sliding : 1 global layers (6 blocks, window 16),
                                  local RoPE
                                  base 10000 vs global 1e6 with linear scaling 8, tied
phi3       Phi-3-mini-4k-instruct fused qkv_proj and gate_up_proj, untied, vocabulary padded
                                  past the tokenizer; SentencePiece + added tokens
mistral    Mistral-7B-Instruct-0.3 RoPE base 1e6, no sliding window, untied; SentencePiece
                                  with [INST]-style control tokens
=========  =====================  ==========================================================

The gemma2 window (128) is longer than the test chats' --seq-len: mlx-lm's gemma2 has no
sliding window, so mlx trains it exactly only up to the window (``mlx_exact_length``), as with
a real Gemma 2 (window 4096).

Sizes: hidden 64, 2 blocks (gemma3: 6, the smallest with one global layer in its fixed 5:1
pattern), 4 query heads. Weights are random but larger than HF's init (std 0.15, norms
1 ± 0.1, biases ± 0.1), so attention is far from uniform and a wrong RoPE base, window,
soft-cap or norm shows in the logits.

Conversion: ``edge_tune.converters.integrations.hf_to_gguf.convert`` (the cached llama.cpp converter, F32).
For the three byte-level BPE families the converter identifies the pre-tokenizer by hashing
the token ids of a fixed text, which only works for tokenizers it knows by their exact
vocabulary; a tokenizer trained here is never in its table. Those are converted by the same
script with that one lookup answered (``PRE``: "llama-bpe", "qwen2" — the regexes these
tokenizers are built with), everything else unchanged.

Tokenization: on plain text, llama.cpp (from the GGUF), the dequantized copy's tokenizer and
the original agree for every family. Around special tokens, SentencePiece families with a dummy
prefix (mistral, phi3) differ as their real models do: llama.cpp puts "▁" before the text after
every special token ("[INST] Hi" -> [INST] "▁▁" "H" "i"), HF's Mistral tokenizer does not;
the dequantized phi3 tokenizer agrees with llama.cpp, the original does not.

All files live in one temporary directory per test session (built on first use, ~3-8 s per
family on 2 cores, then cached). ``family_gguf(name, template=False)`` is the same GGUF with
no ``tokenizer.chat_template`` (a "base" GGUF, as most base models ship).
"""

from __future__ import annotations

import atexit
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from edge_tune.templates.builtin import BUILTIN

# A small corpus: chat markup, code, numbers, punctuation (also used by test_template_families).
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello there! How can I help you today?",
    "You are a helpful assistant. Answer briefly and politely, in plain English.",
    "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n",
    "  indented line\n\tTabbed line\n\n  - item one\n  - item two\n\n",
    "user\nHi\nassistant\nHello! Sure, here it is.\nmodel\nThe answer is 42.\nsystem\nBe nice\n",
    "Numbers 12345 and 67890, dates like 2024-01-31; prices $9.99 (approx.) & 50% off.",
    "[INST] What is this? [/INST] It is a test. Arr, matey! Questions: why, what, how?",
    '{"name": "get_weather", "arguments": {"city": "Oslo"}} Cutting Knowledge Date: December',
] * 8

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE = {"llama": "llama-bpe", "qwen2": "qwen2", "qwen3": "qwen2"}

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, torch_dtype="float32",
            initializer_range=0.02)


@dataclass(frozen=True)
class Family:
    """One family: its hub-style config.json (vocabulary and special ids are filled in),
    its tokenizer kind and special tokens, and its built-in chat template's name."""
    config: dict
    tokenizer: str  # "bpe" (byte-level BPE, tokenizer.json) or "spm" (tokenizer.model)
    template: str  # a name in edge_tune.templates.builtin.BUILTIN
    specials: list[str]  # special (control) tokens, in id order
    bos: str | None
    eos: str
    pad: str | None = None
    unk: str | None = None
    added: list[str] = field(default_factory=list)  # non-special added tokens (Qwen's tags)
    split: str | None = None  # BPE pre-tokenizer regex
    nfc: bool = False  # BPE: NFC normalizer (Qwen)
    dummy_prefix: bool = True  # SentencePiece: "▁" before the text (Llama/Mistral/Phi-3)
    pad_vocab_to: int = 0  # config vocab_size rounded up to a multiple of this (Phi-3)


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]",
                    "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]
PHI3_ADDED = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>",
              "<|placeholder3|>", "<|placeholder4|>", "<|system|>", "<|end|>",
              "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]

FAMILIES: dict[str, Family] = {
    "llama": Family(
        dict(BASE, architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
             max_position_embeddings=131072, rope_theta=500000.0, rope_scaling={
                 "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
             attention_bias=False, mlp_bias=False, tie_word_embeddings=False),
        "bpe", "llama3", LLAMA3_SPECIALS, "<|begin_of_text|>", "<|eot_id|>",
        split=LLAMA3_SPLIT),
    "qwen2": Family(
        dict(BASE, architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu",
             max_position_embeddings=32768, rope_theta=1000000.0, sliding_window=32768,
             use_sliding_window=False, max_window_layers=2, tie_word_embeddings=True),
        "bpe", "qwen2", QWEN_SPECIALS, None, "<|im_end|>", pad="<|endoftext|>",
        added=["<tool_call>", "</tool_call>"], split=QWEN2_SPLIT, nfc=True),
    "qwen3": Family(
        dict(BASE, architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_act="silu",
             head_dim=32, max_position_embeddings=40960, rope_theta=1000000.0,
             attention_bias=False, sliding_window=None, use_sliding_window=False,
             max_window_layers=2, tie_word_embeddings=True),
        "bpe", "qwen3", QWEN_SPECIALS, None, "<|im_end|>", pad="<|endoftext|>",
        added=["<tool_call>", "</tool_call>", "<think>", "</think>"], split=QWEN2_SPLIT,
        nfc=True),
    "gemma2": Family(
        dict(BASE, architectures=["Gemma2ForCausalLM"], model_type="gemma2",
             hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192,
             rope_theta=10000.0, query_pre_attn_scalar=16, sliding_window=128,
             attn_logit_softcapping=7.5, final_logit_softcapping=4.0, rms_norm_eps=1e-6,
             tie_word_embeddings=True),
        "spm", "gemma2", GEMMA_SPECIALS, "<bos>", "<eos>", pad="<pad>", unk="<unk>",
        dummy_prefix=False),
    "gemma3": Family(
        dict(BASE, architectures=["Gemma3ForCausalLM"], model_type="gemma3_text",
             num_hidden_layers=6, hidden_activation="gelu_pytorch_tanh",
             max_position_embeddings=131072, rope_theta=1000000.0,
             rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
             query_pre_attn_scalar=16, sliding_window=16, sliding_window_pattern=6,
             final_logit_softcapping=None, attn_logit_softcapping=None, rms_norm_eps=1e-6,
             tie_word_embeddings=True),
        "spm", "gemma", GEMMA_SPECIALS, "<bos>", "<eos>", pad="<pad>", unk="<unk>",
        dummy_prefix=False),
    "phi3": Family(
        dict(BASE, architectures=["Phi3ForCausalLM"], model_type="phi3", hidden_act="silu",
             num_key_value_heads=4, max_position_embeddings=4096,
             original_max_position_embeddings=4096, rope_theta=10000.0, rope_scaling=None,
             sliding_window=2047, tie_word_embeddings=False),
        "spm", "phi3", ["<unk>", "<s>", "</s>"], "<s>", "<|endoftext|>", pad="<|endoftext|>",
        unk="<unk>", added=PHI3_ADDED, pad_vocab_to=64),
    "mistral": Family(
        dict(BASE, architectures=["MistralForCausalLM"], model_type="mistral",
             hidden_act="silu", max_position_embeddings=32768, rope_theta=1000000.0,
             sliding_window=None, tie_word_embeddings=False),
        "spm", "mistral", MISTRAL_SPECIALS, "<s>", "</s>", unk="<unk>"),
}
NAMES = list(FAMILIES)


# --- tokenizers -----------------------------------------------------------------------------

def _bpe(fam: Family):
    """A byte-level BPE tokenizer (tokenizers' ``Tokenizer``) with the family's regex."""
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers,
                            pre_tokenizers, trainers)

    tok = Tokenizer(models.BPE())
    if fam.nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(fam.split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=fam.specials,
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in fam.added])
    return tok


def _spm_model(fam: Family, path: Path) -> None:
    """Train a real SentencePiece BPE model (byte fallback) and write ``tokenizer.model``."""
    import sentencepiece as spm

    ids = {t: i for i, t in enumerate(fam.specials)}
    buf = io.BytesIO()
    # Gemma's turn markers are user-defined pieces (text "<start_of_turn>" is one token);
    # Mistral's [INST] family are control pieces, as in their tokenizer.model files.
    named = {fam.pad: "pad_id", fam.eos if fam.template.startswith("gemma") else "</s>":
             "eos_id", fam.bos: "bos_id", fam.unk: "unk_id"}
    special_ids = {arg: ids[t] for t, arg in named.items() if t in ids}
    special_ids.update({arg.replace("_id", "_piece"): t for t, arg in named.items() if t in ids})
    for arg in ("pad_id", "eos_id", "bos_id", "unk_id"):
        special_ids.setdefault(arg, -1)
    others = [t for t in fam.specials if t not in named]
    kind = "user_defined_symbols" if fam.template.startswith("gemma") else "control_symbols"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=512, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, split_digits=True,
        add_dummy_prefix=fam.dummy_prefix, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True,
        split_by_whitespace=fam.dummy_prefix, max_sentencepiece_length=16,
        hard_vocab_limit=False, minloglevel=2, **special_ids, **{kind: others})
    path.write_bytes(buf.getvalue())


def build_tokenizer(name: str, dst: Path):
    """Save family ``name``'s tokenizer (with its chat template) into ``dst``; returns it."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    fam = FAMILIES[name]
    special = dict(bos_token=fam.bos, eos_token=fam.eos, pad_token=fam.pad, unk_token=fam.unk)
    special = {k: v for k, v in special.items() if v is not None}
    if fam.tokenizer == "bpe":
        tok = PreTrainedTokenizerFast(tokenizer_object=_bpe(fam), **special)
        if name == "llama":  # Llama 3's tokenizer.json adds <|begin_of_text|> itself
            from tokenizers import processors

            bos_id = tok.convert_tokens_to_ids(fam.bos)
            tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
                single=f"{fam.bos} $A", pair=f"{fam.bos} $A {fam.bos} $B",
                special_tokens=[(fam.bos, bos_id)])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            _spm_model(fam, Path(tmp) / "tokenizer.model")
            cls = "GemmaTokenizer" if fam.template.startswith("gemma") else "LlamaTokenizer"
            (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": cls, "add_bos_token": True, "add_eos_token": False,
                 **special}))
            tok = AutoTokenizer.from_pretrained(tmp)
            shutil.copy(Path(tmp) / "tokenizer.model", Path(dst) / "tokenizer.model")
        from tokenizers import AddedToken

        # The control/user-defined pieces are single tokens in the HF tokenizer too.
        tok.add_special_tokens({"additional_special_tokens": [
            AddedToken(t, special=True, normalized=False) for t in fam.specials
            if t not in special.values()]})
        if fam.added:  # Phi-3: appended after the SentencePiece vocabulary, special
            tok.add_special_tokens({"additional_special_tokens": [
                AddedToken(t, special=True, normalized=False) for t in fam.added]})
    tok.chat_template = BUILTIN[fam.template]
    tok.save_pretrained(dst)
    # transformers 5 keeps added tokens in tokenizer.json only; hub checkpoints (written by
    # transformers 4) also list them in tokenizer_config.json, where llama.cpp's SentencePiece
    # conversion reads which pieces are special (Gemma's turn markers: control tokens).
    cfg_path = Path(dst) / "tokenizer_config.json"
    doc = json.loads(cfg_path.read_text())
    doc["added_tokens_decoder"] = {
        str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                 "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
        for i, t in sorted(tok.added_tokens_decoder.items())}
    cfg_path.write_text(json.dumps(doc, indent=2, ensure_ascii=False))
    return tok


# --- weights --------------------------------------------------------------------------------

def _randomize(model, seed: int) -> None:
    """Weights with some spread (HF's init std 0.02 makes attention nearly uniform)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if "norm" in name:
                p.add_(0.1 * noise)  # around the init: 1 (or 0 where stored as w - 1)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_((0.3 if "embed" in name or "lm_head" in name else 0.15) * noise)


def build_hf(name: str, dst: Path, seed: int = 0) -> Path:
    """Write family ``name``'s tiny random HF checkpoint (safetensors) into ``dst``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from edge_tune.models import quiet_hf

    quiet_hf()
    fam = FAMILIES[name]
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(name, dst)
    cfg = dict(fam.config)
    vocab = len(tok)
    if fam.pad_vocab_to:
        vocab = -(-vocab // fam.pad_vocab_to) * fam.pad_vocab_to
    cfg["vocab_size"] = vocab
    for key, tok_text in (("bos_token_id", fam.bos), ("eos_token_id", fam.eos),
                          ("pad_token_id", fam.pad)):
        cfg[key] = tok.convert_tokens_to_ids(tok_text) if tok_text else None
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    config = AutoConfig.from_pretrained(dst)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed)
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if cfg["tie_word_embeddings"]:
        state.pop("lm_head.weight", None)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))  # hub-style, as written
    return dst


# --- conversion -----------------------------------------------------------------------------

_CONVERT_WITH_PRE = """
import runpy, sys
conv, pre = sys.argv[1], sys.argv[2]
sys.path[:0] = [conv, conv + "/gguf-py"]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = [conv + "/convert_hf_to_gguf.py"] + sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert(name: str, hf_dir: Path, out: Path) -> Path:
    """llama.cpp's converter, F32 (see the module docstring for the BPE families)."""
    from edge_tune.converters.integrations.hf_to_gguf import convert as hf_to_gguf, converter_dir

    if name not in PRE:
        return hf_to_gguf(hf_dir, out, "f32")
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    cmd = [sys.executable, "-c", _CONVERT_WITH_PRE, str(converter_dir()), PRE[name],
           str(hf_dir), "--outfile", str(out), "--outtype", "f32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp's converter failed on {name}:\n{proc.stderr[-3000:]}")
    return out


def without_template(src: Path, dst: Path) -> Path:
    """A copy of GGUF ``src`` without ``tokenizer.chat_template`` (all else byte-equal data)."""
    import gguf

    from edge_tune.converters.formats.base_info import copy_fields

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    copy_fields(reader, writer, skip={"tokenizer.chat_template"})
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data, raw_shape=list(reversed([int(d) for d in t.shape])),
                          raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


# --- the cache ------------------------------------------------------------------------------

_ROOT: Path | None = None


def _root() -> Path:
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="edge-tune-families-"))
        atexit.register(shutil.rmtree, _ROOT, True)
    return _ROOT


def family_hf(name: str) -> Path:
    """The tiny HF checkpoint of family ``name`` (built once per session; do not modify it:
    copy it first)."""
    if name not in FAMILIES:
        raise KeyError(f"unknown family {name!r} (expected one of {', '.join(NAMES)})")
    d = _root() / name / "hf"
    if not (d / "model.safetensors").exists():
        if d.exists():
            shutil.rmtree(d)
        build_hf(name, d.with_name("hf.partial"))
        d.with_name("hf.partial").rename(d)
    return d


def family_gguf(name: str, template: bool = True) -> Path:
    """The F32 GGUF of family ``name`` converted by llama.cpp's converter, with the family's
    chat template in ``tokenizer.chat_template`` (``template=False``: without one). Built once
    per session; read-only for callers."""
    hf = family_hf(name)
    out = _root() / name / f"{name}.gguf"
    if not out.exists():
        convert(name, hf, out.with_name("partial.gguf")).rename(out)
    if template:
        return out
    base = _root() / name / f"{name}-base.gguf"
    if not base.exists():
        without_template(out, base.with_name("partial-base.gguf")).rename(base)
    return base
