"""A tiny byte-level tokenizer for chat-template tests, built in memory (no hub, no weights).

Every byte is its own token and its id is the byte's value ("A" is 65, "\\n" is 10); the
special tokens of the chat-template families come after, from id 256 (see SPECIALS). So a test
can write the token ids it expects by hand, and read them back. The template is any Jinja text:
the built-in ones of :mod:`edge_tune.templates.builtin`, or a test's own.
"""

from __future__ import annotations

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>",
            "<tool_call>", "</tool_call>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<bos>", "<eos>", "<start_of_turn>",
            "<end_of_turn>", "<s>", "</s>", "[INST]", "[/INST]"]
ID = {s: 256 + i for i, s in enumerate(SPECIALS)}  # "<|im_end|>" -> 258, "<think>" -> 259, ...
# The bos/eos each family's template uses (bos_token / eos_token in its Jinja).
FAMILY_TOKENS = {"chatml": ("<|im_start|>", "<|im_end|>"), "qwen2": ("<|endoftext|>", "<|im_end|>"),
                 "qwen3": ("<|endoftext|>", "<|im_end|>"),
                 "llama3": ("<|begin_of_text|>", "<|eot_id|>"), "gemma": ("<bos>", "<eos>"),
                 "gemma2": ("<bos>", "<eos>"), "mistral": ("<s>", "</s>")}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies use."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def byte_tokenizer(template: str | None, family: str = "chatml"):
    """A PreTrainedTokenizerFast: one token per byte (id = byte value) plus SPECIALS, with
    ``template`` as its chat template and the family's bos/eos tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    backend = Tokenizer(models.BPE(vocab, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    bos, eos = FAMILY_TOKENS[family]
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos,
                                  pad_token=eos)
    tok.chat_template = template
    return tok


def ids(text: str) -> list[int]:
    """The ids byte_tokenizer gives ``text`` (specials by name, other characters by byte)."""
    out, i = [], 0
    while i < len(text):
        special = next((s for s in SPECIALS if text.startswith(s, i)), None)
        if special:
            out.append(ID[special])
            i += len(special)
        else:
            out.extend(text[i].encode("utf-8"))
            i += 1
    return out
