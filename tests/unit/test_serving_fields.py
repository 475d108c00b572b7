"""The pure parts of the server's reasoning, sampler and logprob handling: the think splitter
on hand-written streams (every way of cutting them into pieces), the request fields that reach
llama.cpp's sampler, the seed mapping, and the logprobs that cover a stop-cut answer."""

from __future__ import annotations

import pytest

from edge_tune.llama.thinking import ThinkSplitter, prompt_opens, template_markers
from edge_tune.server.logprobs import TokenLogprob, covering
from edge_tune.server.openai_shapes import SEED_MAX, RequestError, llama_seed, parse_request
from edge_tune.templates.builtin import BUILTIN

MARKS = ("<think>", "</think>")


def _split(text: str, cuts: list[int], opened: bool = False) -> tuple[str, str]:
    """``text`` fed to a splitter in pieces cut at ``cuts``: (reasoning, content)."""
    sp = ThinkSplitter(MARKS, opened)
    got = [sp.feed(text[a:b]) for a, b in zip([0, *cuts], [*cuts, len(text)])]
    got.append(sp.finish())
    return "".join(r for r, _ in got), "".join(c for _, c in got)


@pytest.mark.parametrize("text, opened, want", [
    ("<think>\nFirst.\n\nThen.\n</think>\n\nThe answer.", False,
     ("First.\n\nThen.", "The answer.")),
    ("\n<think>x</think>y", False, ("x", "y")),
    ("Plain answer, <think> later is text</think>.", False,
     ("", "Plain answer, <think> later is text</think>.")),
    ("I reason.\n</think>\n\nDone.", True, ("I reason.", "Done.")),  # DeepSeek-R1's prompt
    ("<think>\ncut while thinking", False, ("cut while thinking", "")),
    ("<think>\n\n</think>\n\nAnswer", False, ("", "Answer")),  # an empty block
    ("<thin", False, ("", "<thin")),  # a marker's start, then the end of the answer
    ("", False, ("", "")),
])
def test_the_splitter_gives_the_same_parts_however_the_text_is_cut(text, opened, want):
    assert _split(text, [], opened) == want
    for cut in range(1, len(text)):
        assert _split(text, [cut], opened) == want, cut
    assert _split(text, list(range(1, len(text))), opened) == want  # one character a piece


def test_markers_of_templates_and_prompts():
    assert template_markers(BUILTIN["qwen3"]) == MARKS
    assert template_markers(BUILTIN["chatml"]) is None and template_markers(None) is None
    assert template_markers("{{ '[THINK]' }}...{{ '[/THINK]' }}") == ("[THINK]", "[/THINK]")
    assert prompt_opens("<|Assistant|><think>\n", MARKS)
    assert not prompt_opens("assistant\n<think>\n\n</think>\n\n", MARKS)  # enable_thinking off
    assert not prompt_opens("assistant\n", MARKS)
    assert not prompt_opens("<think>x</think> then <think> quoted, then more", MARKS)


def test_seeds_map_into_what_llama_cpp_honours():
    for seed in (0, 1, 12345, SEED_MAX):
        assert llama_seed(seed) == seed
    odd = [-1, -(1 << 63), (1 << 32) - 1, 1 << 32, (1 << 63) - 1, (1 << 64) - 1]
    mapped = [llama_seed(s) for s in odd]
    assert all(0 <= m <= SEED_MAX for m in mapped)
    assert mapped == [llama_seed(s) for s in odd]  # the same seed, the same llama.cpp seed
    assert len(set(mapped)) == len(mapped)
    assert llama_seed(5 + (1 << 32)) != llama_seed(5)  # 2**32 apart: llama.cpp would cut both


def _parse(**fields):
    return parse_request("chat", {"model": "base", "messages": [{"role": "user",
                                                                 "content": "x"}], **fields},
                         ["base"])


def test_sampler_fields_reach_the_sampling_arguments():
    req = _parse(top_k=5, min_p=0.1, typical_p=0.9, repeat_penalty=1.1, presence_penalty=0.5,
                 frequency_penalty=-0.5, top_p=0.8, seed=-1,
                 chat_template_kwargs={"enable_thinking": False})
    assert req.sampling == {"top_k": 5, "min_p": 0.1, "typical_p": 0.9, "repeat_penalty": 1.1,
                            "presence_penalty": 0.5, "frequency_penalty": -0.5, "top_p": 0.8}
    assert req.seed == llama_seed(-1) and req.template_kwargs == {"enable_thinking": False}
    assert _parse(top_k=-1).sampling["top_k"] == 0  # vLLM's "off"
    for fields, param in [({"top_k": 1.5}, "top_k"), ({"min_p": 2}, "min_p"),
                          ({"typical_p": -0.1}, "typical_p"), ({"repeat_penalty": 0}, "repeat_penalty"),
                          ({"repeat_penalty": 11}, "repeat_penalty"), ({"seed": 1 << 64}, "seed"),
                          ({"seed": "1"}, "seed"), ({"mirostat": 2}, "mirostat"),
                          ({"chat_template_kwargs": []}, "chat_template_kwargs"),
                          ({"chat_template_kwargs": {"messages": []}},
                           "chat_template_kwargs.messages"),
                          ({"chat_template_kwargs": {"a b": 1}}, "chat_template_kwargs.a b"),
                          ({"grammar": ""}, "grammar")]:
        with pytest.raises(RequestError) as info:
            _parse(**fields)
        assert info.value.status == 400 and info.value.body()["error"]["param"] == param
    with pytest.raises(RequestError):  # a chat field, not a completions one
        parse_request("text", {"model": "base", "prompt": "x", "chat_template_kwargs": {}},
                      ["base"])


def _tok(text: str) -> TokenLogprob:
    return TokenLogprob(text, text.encode(), -1.0, [])


def test_logprobs_cover_exactly_the_returned_text():
    tokens = [_tok(t) for t in ["Hel", "lo", ", wor", "ld", "!"]]
    for answer in ["Hello, world!", "Hello", "Hel", "Hello, w", "He", "", "Hello, world"]:
        got = covering(tokens, answer)
        assert "".join(t.text for t in got) == answer
        assert b"".join(t.bytes for t in got) == answer.encode()
    cut = covering(tokens, "Hello, w")
    assert cut[-1].text == ", w" and cut[-1].logprob == -1.0
    assert covering(tokens, "Jello") == tokens  # bytes that do not spell it: unchanged
    snow = TokenLogprob("?", "\u2603".encode()[:2], -1.0, [])
    rest = TokenLogprob("?", "\u2603".encode()[2:] + b"x", -1.0, [])
    assert b"".join(t.bytes for t in covering([snow, rest], "\u2603")) == "\u2603".encode()


def test_a_grammar_deep_enough_to_overflow_llama_cpp_is_refused():
    # 100000 nested groups kill the process inside llama.cpp's recursive parser
    for grammar in ["root ::= " + "(" * 201 + '"a"' + ")" * 201,
                    'root ::= "' + "a" * 20000 + '"']:
        with pytest.raises(RequestError) as info:
            _parse(grammar=grammar)
        assert info.value.body()["error"]["param"] == "grammar"
    fine = 'root ::= ("(" [(] "\\\\"(") ' + "(" * 150 + '"a"' + ")" * 150
    assert _parse(grammar=fine).grammar == fine
