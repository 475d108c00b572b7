"""llama.cpp generation limits that hold whatever the model samples."""

from __future__ import annotations


def _lead_byte_token(engine) -> int:
    """A token whose text is the lone byte 0xCE: the start of a two-byte UTF-8 character."""
    llm = engine.llm
    return next(t for t in range(llm.n_vocab()) if llm.detokenize([t]) == b"\xce")


def test_max_tokens_holds_when_the_text_is_incomplete_utf8(default_gguf):
    """llama-cpp-python's streaming loop skips its max_tokens check while the text ends in an
    incomplete UTF-8 sequence; a model that keeps sampling lead bytes used to generate until
    the context was full (llama_decode failed). Forced here with a logit bias."""
    from edge_tune.llama.engine import Engine

    with Engine(default_gguf, n_ctx=128, threads=1) as engine:
        lead = _lead_byte_token(engine)
        pieces = list(engine.generate(prompt="Hello", temperature=0, max_tokens=5,
                                      logit_bias={lead: 100.0}))
    last = pieces[-1]
    assert last.finish_reason == "length", pieces
    assert last.completion_tokens == 5, last
