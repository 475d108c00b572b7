"""Loss masks for four chat-template families: ChatML, Llama-3, Gemma and Mistral.

encode() finds the trained spans from the template itself, so it should work for any template
that renders incrementally. Each family here is a faithful simplification of the real template
(same special tokens, same whitespace, same trimming) with a tokenizer of the same kind as the
real one, trained here in memory on a small corpus (no hub access):

- ChatML (SmolLM2, the default model): byte-level BPE, GPT-2 pre-tokenizer regex.
- Llama-3: byte-level BPE with the Llama-3 pre-tokenizer regex.
- Gemma: SentencePiece-style BPE (" " -> "▁", no pre-tokenizer, byte fallback).
- Mistral (v0.3 template): SentencePiece-style BPE with a Metaspace "▁" prefix, byte fallback,
  [INST]/[/INST] as control tokens and a decoder that drops the leading space. Its template
  only shows a system message in an inference prompt, so conversations with one are refused.

What is trained, precisely, per assistant turn: the characters the template renders between
the generation prompt and the end of the turn, i.e. the (trimmed, where the template trims)
content, the end-of-turn token, and any whitespace the template puts after it before the next
turn (ChatML's and Gemma's "\\n" after the end-of-turn token; Mistral's " " before the answer).
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_tune.data.template import IGNORE, assistant_spans, encode, tokenize_spans
from edge_tune.errors import EdgeTuneError
from tests.helpers.chat_templates import CHATML, GEMMA, LLAMA3, MISTRAL

# --- templates ----------------------------------------------------------------------------

# --- tokenizers ---------------------------------------------------------------------------

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello there! How can I help you today?",
    "You are a helpful assistant. Answer briefly and politely, in plain English.",
    "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n",
    "  indented line\n\tTabbed line\n\n  - item one\n  - item two\n\n",
    "user\nHi\nassistant\nHello! Sure, here it is.\nmodel\nThe answer is 42.\nsystem\nBe nice\n",
    "Numbers 12345 and 67890, dates like 2024-01-31; prices $9.99 (approx.) & 50% off.",
    "[INST] What is this? [/INST] It is a test. Arr, matey! Questions: why, what, how?",
] * 8

GPT2_SPLIT = None  # ByteLevel(use_regex=True) is the GPT-2 regex, as in SmolLM2
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(specials: list[str], regex: str | None):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if regex is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _sentencepiece_like(specials: list[str], normalizer, pre_tokenizer, decoder):
    """BPE over "▁"-marked text with byte fallback (<0x00>..<0xFF>), as Gemma and Mistral."""
    from tokenizers import AddedToken, Tokenizer, models, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    # No pre-tokenizer (as Gemma's tokenizer.json): merges may cross spaces and newlines, up to
    # SentencePiece's default longest piece of 16 characters.
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=500, special_tokens=specials,
                                                        max_token_length=16, show_progress=False))
    model = json.loads(tok.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    out = Tokenizer(models.BPE(vocab, merges, byte_fallback=True))
    out.normalizer, out.pre_tokenizer, out.decoder = normalizer, pre_tokenizer, decoder
    out.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return out


def _wrap(backend, template: str, **special):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **special)
    tok.chat_template = template
    return tok


def build_chatml():
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return _wrap(_byte_level(specials, GPT2_SPLIT), CHATML, bos_token="<|im_start|>",
                 eos_token="<|im_end|>", unk_token="<|endoftext|>", pad_token="<|im_end|>")


def build_llama3():
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"]
    return _wrap(_byte_level(specials, LLAMA3_SPLIT), LLAMA3, bos_token="<|begin_of_text|>",
                 eos_token="<|eot_id|>")


def build_gemma():
    from tokenizers import decoders, normalizers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    backend = _sentencepiece_like(
        specials, normalizers.Replace(" ", "▁"), None,
        decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]))
    return _wrap(backend, GEMMA, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                 pad_token="<pad>")


def build_mistral():
    from tokenizers import decoders, pre_tokenizers

    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
    backend = _sentencepiece_like(
        specials, None, pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                 split=False),
        decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                           decoders.Strip(" ", 1, 0)]))
    return _wrap(backend, MISTRAL, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


# --- families -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
    build: Callable
    eot: str
    trims: bool  # the template trims message contents
    system: bool  # the template renders a system message incrementally
    trained: Callable[[str], str]  # assistant content -> its trained text, as decoded


FAMILIES = {
    # The "\n" the template writes after <|im_end|> is part of the turn, so it is trained.
    "chatml": Family(build_chatml, "<|im_end|>", False, True, lambda c: c + "<|im_end|>\n"),
    "llama3": Family(build_llama3, "<|eot_id|>", True, True, lambda c: c.strip() + "<|eot_id|>"),
    "gemma": Family(build_gemma, "<end_of_turn>", True, True,
                    lambda c: c.strip() + "<end_of_turn>\n"),
    # " " + answer + </s> is trained; the Mistral decoder drops a decoded string's leading space.
    "mistral": Family(build_mistral, "</s>", True, False, lambda c: c.strip() + "</s>"),
}
NAMES = sorted(FAMILIES)
SPECIAL_STRINGS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
                   "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                   "<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                   "<s>", "</s>", "[INST]", "[/INST]"]


@pytest.fixture(scope="module")
def toks():
    return {name: FAMILIES[name].build() for name in NAMES}


def decode(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def runs(ex, trained: bool) -> list[list[int]]:
    """Maximal runs of consecutive tokens that are (or are not) trained."""
    out, cur = [], []
    for tok, lab in zip(ex.input_ids, ex.labels):
        if (lab != IGNORE) == trained:
            cur.append(tok)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def check(fam: Family, tok, msgs: list[dict]):
    """The trained runs are exactly the assistant turns, in order; everything else is not."""
    text = tok.apply_chat_template(msgs, tokenize=False)
    ex = encode(tok, msgs)
    assert len(ex.input_ids) == len(ex.labels)
    assert all(lab in (IGNORE, i) for i, lab in zip(ex.input_ids, ex.labels))
    # The ids still spell the rendered conversation, character for character.
    assert decode(tok, ex.input_ids) == text
    answers = [m["content"] for m in msgs if m["role"] == "assistant"]
    assert [decode(tok, r) for r in runs(ex, True)] == [fam.trained(a) for a in answers]
    prompt = [decode(tok, r) for r in runs(ex, False)]
    for m in msgs:
        if m["role"] in ("user", "system"):
            shown = m["content"].strip() if fam.trims else m["content"]
            assert any(shown in p for p in prompt), (m, prompt)
    # The prompt before each answer is tokenized as on its own: before the first answer that is
    # exactly the inference prompt (the conversation up to it with the generation prompt), so
    # training sees what inference sees. (Later prompts start at a special token, where
    # tokenization starts afresh anyway.)
    _, spans = assistant_spans(tok, msgs)
    starts = [k for k, lab in enumerate(ex.labels)
              if lab != IGNORE and (k == 0 or ex.labels[k - 1] == IGNORE)]
    ends = [k + 1 for k, lab in enumerate(ex.labels)
            if lab != IGNORE and (k + 1 == len(ex.labels) or ex.labels[k + 1] == IGNORE)]
    assert len(starts) == len(ends) == len(spans)
    for (a, _), k, (prev_b, prev_k) in zip(spans, starts, [(0, 0)] + list(zip(
            [b for _, b in spans], ends))):
        assert ex.input_ids[prev_k:k] == tok(text[prev_b:a], add_special_tokens=False)["input_ids"]
    first = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    at_inference = tok.apply_chat_template(msgs[:first], tokenize=False,
                                           add_generation_prompt=True)
    assert ex.input_ids[:starts[0]] == tok(at_inference, add_special_tokens=False)["input_ids"]
    return text, ex, prompt


def straddles(tok, msgs) -> bool:
    """Whether plain tokenization of the rendered text has a token across a span edge."""
    text, spans = assistant_spans(tok, msgs)
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return any(s < x < e for s, e in offsets for span in spans for x in span)


# --- 1. a fixed conversation per family ---------------------------------------------------

def two_turns(system: bool):
    head = [{"role": "system", "content": "You are a pirate."}] if system else []
    return head + [{"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Arr, matey! One."},
                   {"role": "user", "content": "More?"},
                   {"role": "assistant", "content": "Arr, matey! Two."}]


EXPECTED_TRAINED = {
    "chatml": ["Arr, matey! One.<|im_end|>\n", "Arr, matey! Two.<|im_end|>\n"],
    "llama3": ["Arr, matey! One.<|eot_id|>", "Arr, matey! Two.<|eot_id|>"],
    "gemma": ["Arr, matey! One.<end_of_turn>\n", "Arr, matey! Two.<end_of_turn>\n"],
    "mistral": ["Arr, matey! One.</s>", "Arr, matey! Two.</s>"],
}
# The rendered prompt between the answers: every role header and user/system text, untrained.
EXPECTED_PROMPT = {
    "chatml": [("<|im_start|>system\nYou are a pirate.<|im_end|>\n<|im_start|>user\nHi"
                "<|im_end|>\n<|im_start|>assistant\n"),
               "<|im_start|>user\nMore?<|im_end|>\n<|im_start|>assistant\n"],
    "llama3": [("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a "
                "pirate.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n"),
               ("<|start_header_id|>user<|end_header_id|>\n\nMore?<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")],
    "gemma": [("<bos><start_of_turn>user\nYou are a pirate.\n\nHi<end_of_turn>\n"
               "<start_of_turn>model\n"),
              "<start_of_turn>user\nMore?<end_of_turn>\n<start_of_turn>model\n"],
    "mistral": ["<s>[INST] Hi[/INST]", "[INST] More?[/INST]"],
}


@pytest.mark.parametrize("name", NAMES)
def test_two_turns_train_exactly_the_answers(toks, name):
    fam, tok = FAMILIES[name], toks[name]
    msgs = two_turns(system=fam.system)
    text, ex, prompt = check(fam, tok, msgs)
    trained = [decode(tok, r) for r in runs(ex, True)]
    assert trained == EXPECTED_TRAINED[name]
    assert prompt == EXPECTED_PROMPT[name]
    # Interleaved, prompt and answers give back the rendered text (Mistral's decoder drops the
    # template's " " before each answer, so put it back).
    sep = " " if name == "mistral" else ""
    assert "".join(p + sep + t for p, t in zip(prompt, trained)) == text
    for t in trained:
        assert t.count(fam.eot) == 1 and t.rstrip("\n").endswith(fam.eot)
        for marker in ("user", "assistant", "system", "model", "pirate", "Hi", "More?"):
            assert marker not in t


@pytest.mark.parametrize("name", NAMES)
def test_trained_spans_come_from_the_template(toks, name):
    """assistant_spans() cuts the rendered text right after the generation prompt and right
    after the end of the turn (whitespace the template writes after the end token included)."""
    fam, tok = FAMILIES[name], toks[name]
    text, spans = assistant_spans(tok, two_turns(system=fam.system))
    lead = " " if name == "mistral" else ""  # Mistral writes " " + answer
    assert [text[a:b] for a, b in spans] == [lead + t for t in EXPECTED_TRAINED[name]]


# Answers whose first characters merge with the end of the role header in one token, when the
# rendered text is tokenized as a whole ("assistant\n" + "  Arr" gives "\n " in byte-level BPE;
# "model\n" + "Hello" gives "\nHello" in the Gemma-like tokenizer).
STRADDLING = {"chatml": ["  Arr, two leading spaces.", "\n\nArr, leading newlines.",
                         "\n  def f():\n    return 1\n"],
              "gemma": ["Hello, matey.", "The answer is 42.", "Be nice."]}
PLAIN = ["\tArr, tab.", "\t\tArr, tabs.", " Arr, one space.", "Arr, trailing.  \n", "Arr!"]


@pytest.mark.parametrize("name,answer", [(n, a) for n in STRADDLING
                                         for a in STRADDLING[n] + PLAIN])
def test_a_token_across_the_header_edge_does_not_leak_into_the_loss(toks, name, answer):
    """Such a token is split at the edge: the header's "\\n" is not trained, the answer's first
    characters are, and the prompt is tokenized as at inference."""
    fam, tok = FAMILIES[name], toks[name]
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": answer}]
    assert straddles(tok, msgs) == (answer in STRADDLING[name])  # the case at hand does occur
    _, _, prompt = check(fam, tok, msgs)
    header = "<|im_start|>assistant\n" if name == "chatml" else "<start_of_turn>model\n"
    assert prompt[0].endswith(header)


def test_mistral_rejects_non_alternating_roles(toks):
    tok = toks["mistral"]
    with pytest.raises(Exception, match="must alternate"):
        encode(tok, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                     {"role": "assistant", "content": "c"}])


def test_gemma_rejects_non_alternating_roles(toks):
    with pytest.raises(Exception, match="must alternate"):
        encode(toks["gemma"], [{"role": "user", "content": "a"},
                               {"role": "assistant", "content": "b"},
                               {"role": "assistant", "content": "c"}])


def test_mistral_system_message_is_a_clear_error(toks):
    """Mistral v0.3 writes the system message into the user turn that is the *last* message,
    so it shows only in an inference prompt: a training conversation renders without it, and
    its prefixes with it. That is no incremental rendering, and encode() says so instead of
    guessing a mask."""
    tok = toks["mistral"]
    sys = [{"role": "system", "content": "Be a pirate."}]
    assert "Be a pirate." not in tok.apply_chat_template(sys + two_turns(False)[:2],
                                                         tokenize=False)
    for msgs in (two_turns(False)[:2], two_turns(False)):
        with pytest.raises(EdgeTuneError, match="incrementally"):
            encode(tok, sys + msgs)


# --- 2. property: random conversations ----------------------------------------------------

CHARS = st.one_of(
    st.sampled_from(list(string.ascii_letters + string.digits + string.punctuation + " \n\t")),
    # any other printable character; "▁" is SentencePiece's space, decoded back as " "
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="▁"))
# Whitespace at either end, often: that is where the template's own text meets the content.
EDGE = st.text(st.sampled_from(list(" \n\t\u3000")), max_size=3)
CONTENT = st.builds(lambda a, b, c: a + b + c, EDGE, st.text(CHARS, min_size=1, max_size=20),
                    EDGE).filter(lambda s: s.strip() and not any(t in s for t in SPECIAL_STRINGS))


@st.composite
def conversations(draw, system: bool):
    n = draw(st.integers(1, 4))
    msgs = []
    if system and draw(st.booleans()):
        msgs.append({"role": "system", "content": draw(CONTENT)})
    for _ in range(n):
        msgs.append({"role": "user", "content": draw(CONTENT)})
        msgs.append({"role": "assistant", "content": draw(CONTENT)})
    return msgs


def _property(name):
    fam = FAMILIES[name]

    @settings(max_examples=50, deadline=None, database=None,
              suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
    @given(msgs=conversations(fam.system))
    def run(tok, msgs):
        check(fam, tok, msgs)

    return run


@pytest.mark.parametrize("name", NAMES)
def test_random_conversations_train_exactly_the_answers(toks, name):
    _property(name)(toks[name])


# --- 3. train_on_all and truncation -------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_train_on_all_and_truncation(toks, name):
    fam, tok = FAMILIES[name], toks[name]
    msgs = two_turns(system=fam.system)
    full = encode(tok, msgs)
    every = encode(tok, msgs, train_on_all=True)
    assert every.labels == every.input_ids == full.input_ids
    assert every.n_trained == len(every.input_ids)
    n = len(full.input_ids)
    for seq_len in (1, 2, n // 3, n // 2, n - 1, n, n + 5):
        cut = encode(tok, msgs, seq_len=seq_len)
        assert len(cut.input_ids) == len(cut.labels) == min(seq_len, n)
        assert cut.input_ids == full.input_ids[:seq_len] and cut.labels == full.labels[:seq_len]
        cut_all = encode(tok, msgs, seq_len=seq_len, train_on_all=True)
        assert cut_all.labels == cut_all.input_ids == full.input_ids[:seq_len]


# --- token edges at arbitrary span edges ------------------------------------------------------

@st.composite
def text_and_spans(draw):
    text = "".join(draw(st.lists(CONTENT, min_size=1, max_size=4)))
    edges = sorted(set(draw(st.lists(st.integers(0, len(text)), min_size=2, max_size=6))))
    spans = [(a, b) for a, b in zip(edges[::2], edges[1::2]) if a < b]
    return text, spans


@pytest.mark.parametrize("name", NAMES)
def test_every_span_edge_is_a_token_edge(toks, name):
    """tokenize_spans() on any text and spans (here without special tokens): the ids still spell
    the text, the tokens inside spans cover exactly the span characters, and no token crosses
    a span edge, except with Mistral's tokenizer, which puts "▁" before every call's text, so a
    piece on its own would not spell the same tokens: there a crossing token is kept, and
    trained."""
    tok = toks[name]

    @settings(max_examples=50, deadline=None, database=None,
              suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
    @given(text_and_spans())
    def run(case):
        text, spans = case
        ids, offsets, inside = tokenize_spans(tok, text, spans)
        assert len(ids) == len(offsets) == len(inside)
        if name != "mistral":  # its decoder drops a leading space
            assert decode(tok, ids) == text
        chars = set().union(*(range(s, e) for (s, e), keep in zip(offsets, inside) if keep))
        wanted = set().union(*(range(a, b) for a, b in spans))
        edges = {x for span in spans for x in span}
        crossing = [(s, e) for s, e in offsets if any(s < x < e for x in edges)]
        if name == "mistral":
            assert wanted <= chars
        else:
            assert crossing == []
            assert chars == wanted
        assert inside == [any(s < b and e > a for a, b in spans) for s, e in offsets]

    run()


def test_special_tokens_are_never_split(toks):
    tok = toks["chatml"]
    text = "<|im_start|>assistant\nArr"
    ids, _, inside = tokenize_spans(tok, text, [(5, len(text))])
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and inside[0]


def test_a_token_whose_pieces_do_not_spell_it_is_kept_and_trained(toks):
    """Mistral's tokenizer puts "▁" before a call's text, so the second half of a word on its
    own does not tokenize as it does inside the word: the word stays one token, trained."""
    tok = toks["mistral"]
    text = "Hello there, matey."
    plain = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    k, s = next((k, s) for k, (s, e) in enumerate(plain["offset_mapping"]) if e - s > 2)
    ids, _, inside = tokenize_spans(tok, text, [(s + 1, len(text))])
    assert ids == plain["input_ids"] and inside[k] and not any(inside[:k])


def test_splitting_at_one_edge_does_not_undo_another(toks):
    """Gemma-like BPE: "xd  " is "x", "d", "▁▁", but "xd " alone is "x", "d▁". Splitting "▁▁"
    at 3 must not bring back a token across the edge at 2."""
    tok = toks["gemma"]
    assert tok.convert_ids_to_tokens(tok("xd ", add_special_tokens=False)["input_ids"])[-1] \
        == "d▁"
    _, offsets, inside = tokenize_spans(tok, "xd  ", [(2, 3)])
    assert offsets == [(0, 1), (1, 2), (2, 3), (3, 4)] and inside == [False, False, True, False]
