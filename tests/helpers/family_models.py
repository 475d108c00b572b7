"""Tiny random HF models per family with real tokenizers, built here without the hub: BPE
families reuse the default model's byte-level BPE (SmolLM2's, whose pre-tokenizer llama.cpp
recognizes); SentencePiece families get a real SentencePiece model trained in memory on a
small corpus, with the family's control tokens. Used by ``convert-base`` round trips and by
tests that need an HF model directory of a given family."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

from tests.helpers.chat_templates import CHATML, GEMMA, LLAMA3

MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
           "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}"
           "{{ message['content'] + eos_token }}{% endif %}{% endfor %}")
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs!",
    "How vexingly quick daft zebras jump; 12 + 30 = 42.",
    "A pirate said: arr, where is the treasure, matey?",
    "def add(a, b):\n    return a + b",
] * 40


def _sentencepiece(dst: Path, specials: list[str], ids: dict) -> None:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=400, model_type="bpe",
        byte_fallback=True, user_defined_symbols=specials, hard_vocab_limit=False,
        character_coverage=1.0, minloglevel=2, **ids)
    (dst / "tokenizer.model").write_bytes(buf.getvalue())


def _bpe_from_default(dst: Path, hf_dir: Path) -> None:
    shutil.copy(hf_dir / "tokenizer.json", dst / "tokenizer.json")
    # Name the generic class: for a qwen2 config, AutoTokenizer would otherwise rebuild
    # SmolLM2's tokenizer with Qwen2's pre-tokenizer (a different tokenizer).
    doc = json.loads((hf_dir / "tokenizer_config.json").read_text())
    doc["tokenizer_class"] = "PreTrainedTokenizerFast"
    (dst / "tokenizer_config.json").write_text(json.dumps(doc))


# Qwen2 gets a SentencePiece tokenizer (its converter tries one first): for a qwen2 config,
# transformers 5 forces its Qwen2Tokenizer onto any tokenizer.json, which turns SmolLM2's into
# a hybrid whose pre-tokenizer hash llama.cpp rightly does not know.
FAMILIES = {
    # name: (config class, architecture, tokenizer kind, chat template, extra config)
    "llama": ("LlamaConfig", "LlamaForCausalLM", "bpe", LLAMA3, {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", "spm", MISTRAL, {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "spm", CHATML, {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "bpe", CHATML, {"head_dim": 16}),
    "gemma": ("Gemma3TextConfig", "Gemma3ForCausalLM", "spm", GEMMA,
              {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 512}),
}


def build_tiny(family: str, dst: Path, hf_dir: Path) -> Path:
    import torch
    import transformers

    cls_name, arch, tok_kind, template, extra = FAMILIES[family]
    dst.mkdir(parents=True)
    if tok_kind == "bpe":
        _bpe_from_default(dst, hf_dir)
        vocab = 49152
        special = {"bos_token_id": 1, "eos_token_id": 2}
    elif family == "gemma":
        # Gemma's own SentencePiece model adds no dummy prefix; llama.cpp's converter assumes so.
        _sentencepiece(dst, ["<start_of_turn>", "<end_of_turn>"],
                       {"pad_id": 0, "eos_id": 1, "bos_id": 2, "unk_id": 3, "pad_piece": "<pad>",
                        "eos_piece": "<eos>", "bos_piece": "<bos>", "add_dummy_prefix": False})
        vocab = 400
        special = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
        (dst / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
             "unk_token": "<unk>"}))
    else:
        _sentencepiece(dst, ["[INST]", "[/INST]"], {"unk_id": 0, "bos_id": 1, "eos_id": 2})
        vocab = 400
        special = {"bos_token_id": 1, "eos_token_id": 2}
        (dst / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    cfg_doc = json.loads((dst / "tokenizer_config.json").read_text())
    cfg_doc["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg_doc))
    config = getattr(transformers, cls_name)(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, initializer_range=0.1, **special, **extra)
    config.architectures = [arch]
    torch.manual_seed(0)
    model = getattr(transformers, arch)(config).to(torch.float32).eval()
    with torch.no_grad():  # norms away from their all-ones start, so their layout is tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(dst))
    return dst
