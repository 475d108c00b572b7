"""Reasoning output, sampler fields, seeds and stop-cut logprobs through `edge-tune serve` and the
official `openai` client, on the tiny random Qwen3 (tests/helpers/tiny_families.py: Qwen3's
reasoning template, ``<think>``/``</think>`` as tokens of its vocabulary); and the thinking in
`edge-tune chat` and ChatSession (what the TUI shows). One file: the tiny Qwen3 is built once.

A random model does not think by itself: a GBNF ``grammar`` (llama-server's request field)
makes it write a think block, so the split is checked on the real token stream the server
generates; for the chat, a DeepSeek-R1-style template whose generation prompt opens the block
makes everything the model writes thinking (it never closes the block). Greedy answers give
the stop-string probes their tokens."""

from __future__ import annotations

import concurrent.futures

import openai
import pytest
from tests.helpers.cli import run_cli_in_process
from tests.helpers.serve_helpers import one_llama_thread, running_server
from tests.helpers.tiny_families import family_gguf

from edge_tune.chat_session import THINKING_ONLY, Answer, ChatSession, Token

USER = [{"role": "user", "content": "What is 2 + 2?"}]
THOUGHT = "First I add.\nThen I check."
ANSWER = "The answer is 4."
THINKS = {"grammar": 'root ::= "<think>\\n' + THOUGHT.replace("\n", "\\n")
          + '\\n</think>\\n\\n' + ANSWER + '"'}


@pytest.fixture(scope="module")
def server():
    with one_llama_thread(), running_server("--base", str(family_gguf("qwen3")), "--ctx",
                                            "1024", "--parallel", "2") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                         timeout=120)


def _chat(client, **kw):
    kw = {"model": "base", "messages": USER, "max_tokens": 12, **kw}
    return client.chat.completions.create(**kw)


def _streamed(client, **kw) -> tuple[str, str, list]:
    """(content, reasoning_content, logprob tokens) of a streamed chat answer."""
    content, reasoning, tokens = [], [], []
    for c in _chat(client, stream=True, **kw):
        if not c.choices:
            continue
        delta = c.choices[0].delta
        content.append(delta.content or "")
        reasoning.append(getattr(delta, "reasoning_content", None) or "")
        if c.choices[0].logprobs is not None:
            tokens += c.choices[0].logprobs.content or []
    return "".join(content), "".join(reasoning), tokens


def test_thinking_comes_back_as_reasoning_content(client):
    resp = _chat(client, temperature=0, max_tokens=60, logprobs=True, extra_body=THINKS)
    msg = resp.choices[0].message
    assert (msg.reasoning_content, msg.content) == (THOUGHT, ANSWER)
    assert resp.choices[0].finish_reason == "stop"
    said = b"".join(bytes(t.bytes) for t in resp.choices[0].logprobs.content).decode()
    assert said == f"<think>\n{THOUGHT}\n</think>\n\n{ANSWER}"  # logprobs: every token
    content, reasoning, tokens = _streamed(client, temperature=0, max_tokens=60,
                                           logprobs=True, extra_body=THINKS)
    assert (reasoning, content) == (THOUGHT, ANSWER)
    assert [t.token for t in tokens] == [t.token for t in resp.choices[0].logprobs.content]
    # cut by max_tokens: inside the block all of it is reasoning, no answer yet
    thinking_only = 0
    for limit in range(1, resp.usage.completion_tokens, 2):
        cut = _chat(client, temperature=0, max_tokens=limit, extra_body=THINKS).choices[0]
        reasoning = getattr(cut.message, "reasoning_content", None) or ""
        content = cut.message.content
        assert cut.finish_reason == "length"
        if content and not reasoning:  # not even the start marker is whole yet
            assert "<think>".startswith(content), limit
        else:
            assert f"{THOUGHT}\n</think>".startswith(reasoning), limit
            assert ANSWER.startswith(content), limit
        thinking_only += bool(reasoning and not content)
    assert thinking_only >= 3


def test_enable_thinking_false_reaches_the_template(client, server):
    from tests.helpers.serve_helpers import http_json

    on = _chat(client, temperature=0, max_tokens=4)
    off = _chat(client, temperature=0, max_tokens=4,
                extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    # Qwen3's template then renders an empty block: <think>, \n\n, </think>, \n\n
    assert off.usage.prompt_tokens == on.usage.prompt_tokens + 4
    assert getattr(off.choices[0].message, "reasoning_content", None) is None
    content, reasoning, _ = _streamed(client, temperature=0, max_tokens=4, extra_body={
        "chat_template_kwargs": {"enable_thinking": False}})
    assert (content, reasoning) == (off.choices[0].message.content, "")
    status, err = http_json("POST", server.url + "/v1/chat/completions", (
        b'{"model": "base", "messages": [{"role": "user", "content": "x"}], '
        b'"chat_template_kwargs": {"add_generation_prompt": false}}'),
        {"Content-Type": "application/json"})
    assert status == 400 and err["error"]["param"] == "chat_template_kwargs.add_generation_prompt"


def test_reasoning_in_the_history_reaches_the_template(client):
    # Qwen3's template renders an answer's reasoning in the turns after the last question
    turn = {"role": "assistant", "content": "4"}
    plain = _chat(client, messages=USER + [turn], max_tokens=1)
    told = _chat(client, messages=USER + [{**turn, "reasoning_content": "Two and two."}],
                 max_tokens=1)
    assert told.usage.prompt_tokens > plain.usage.prompt_tokens


def test_sampler_fields_reach_llama_cpp(client):
    greedy = _chat(client, temperature=0).choices[0].message.content
    # only the most likely token survives top_k 1 or min_p 1: a sampled answer is greedy's,
    # also with two requests decoded together
    asks = [{"top_k": 1}, {"min_p": 1.0}, {"top_k": 1, "typical_p": 0.5}]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda extra: _chat(client, temperature=1.5, seed=7,
                                                extra_body=extra), asks))
    assert [r.choices[0].message.content for r in got] == [greedy] * 3
    # the penalties act before greedy's pick in llama.cpp's chain: they change its answer
    long = _chat(client, temperature=0, max_tokens=24).choices[0].message.content
    for extra in [{"repeat_penalty": 3.0}, {"presence_penalty": 2.0},
                  {"frequency_penalty": 2.0}]:
        assert _chat(client, temperature=0, max_tokens=24, extra_body=extra) \
            .choices[0].message.content != long, extra
    for extra, param in [({"top_k": "5"}, "top_k"), ({"repeat_penalty": 0}, "repeat_penalty"),
                         ({"mirostat": 2}, "mirostat")]:
        with pytest.raises(openai.BadRequestError) as info:
            _chat(client, extra_body=extra)
        assert info.value.body["param"] == param


def test_the_same_seed_gives_the_same_answer(client):
    def sampled(seed):
        return _chat(client, temperature=1.5, seed=seed, max_tokens=16).choices[0] \
            .message.content

    for seed in (-1, (1 << 32) - 1, (1 << 63) - 1, 7):
        assert sampled(seed) == sampled(seed), seed
    assert sampled(7) != sampled(7 + (1 << 32))  # llama.cpp alone would cut both to 7
    with pytest.raises(openai.BadRequestError) as info:
        _chat(client, seed=1 << 64)
    assert info.value.body["param"] == "seed" and "18446744073709551615" in \
        info.value.body["message"]


def _probes(whole: str, tokens: list[bytes]) -> dict[str, str]:
    """Stop strings on ``whole`` (a greedy answer spelled by ``tokens``), each first found
    where it was taken from, by kind: ending inside a token, ending at a token's end,
    spanning two tokens, beginning inside a token, at the very start."""
    bounds, said = {0}, b""
    for t in tokens:
        said += t
        bounds.add(len(said.decode("utf-8", errors="ignore")))
    kinds = {"ends mid-token": lambda a, b: b not in bounds,
             "ends at a token's end": lambda a, b: b in bounds and a in bounds,
             "spans two tokens": lambda a, b: any(a < x < b for x in bounds),
             "begins mid-token": lambda a, b: a not in bounds,
             "at the start": lambda a, b: a == 0}
    picks: dict[str, str] = {}
    for a in [*range(len(whole)), *reversed(range(len(whole)))]:  # early ones, late ones
        for b in range(a + 1, min(a + 4, len(whole) + 1)):
            stop = whole[a:b]
            if whole.find(stop) != a or not stop.strip():
                continue
            for kind, test in kinds.items():
                late = kind + (" (late)" if a > len(whole) // 2 else "")
                if late not in picks and test(a, b):
                    picks[late] = stop
    return picks


def _spelled(tokens) -> str:
    """Completions' token texts joined, as the answer's text is decoded (a byte that is not
    UTF-8 on its own is U+FFFD in a token's text and left out of the answer)."""
    return "".join(tokens).replace("\ufffd", "")


def _decoded(tokens) -> str:
    return b"".join(bytes(t.bytes) for t in tokens).decode("utf-8", errors="ignore")


def test_logprobs_cover_exactly_the_text_a_stop_string_ends(client):
    base = dict(model="base", temperature=0, max_tokens=16)
    text = client.completions.create(prompt="1, 2, 3,", logprobs=1, **base).choices[0]
    chat = _chat(client, temperature=0, max_tokens=16, logprobs=True).choices[0]
    cases = [("text", text.text, [t.encode() for t in text.logprobs.tokens]),
             ("chat", chat.message.content, [bytes(t.bytes) for t in chat.logprobs.content])]
    probed = 0
    for kind, whole, tokens in cases:
        assert len(tokens) >= 6, whole
        probes = _probes(whole, tokens)
        assert "ends mid-token" in probes and len(probes) >= 4, (whole, probes)
        for stop in probes.values():
            probed += 1
            want = whole[:whole.index(stop)]
            if kind == "text":
                got = client.completions.create(prompt="1, 2, 3,", logprobs=1, stop=[stop],
                                                **base).choices[0]
                assert got.text == want and _spelled(got.logprobs.tokens) == want, stop
                streamed = list(client.completions.create(
                    prompt="1, 2, 3,", logprobs=1, stop=[stop], stream=True, **base))
                said = "".join(c.choices[0].text for c in streamed if c.choices)
                spelled = _spelled(t for c in streamed if c.choices and c.choices[0].logprobs
                                   for t in c.choices[0].logprobs.tokens)
                assert said == spelled == want, stop
            else:
                got = _chat(client, temperature=0, max_tokens=16, logprobs=True, stop=[stop])
                lp = got.choices[0].logprobs.content
                assert got.choices[0].message.content == want, stop
                assert _decoded(lp) == want, stop
                content, _, tokens_s = _streamed(client, temperature=0, max_tokens=16,
                                                 logprobs=True, stop=[stop])
                assert content == want, stop
                assert _decoded(tokens_s) == want, stop
    assert probed >= 8


# --- edge-tune chat and ChatSession ----------------------------------------------------------

# ChatML, with DeepSeek-R1's habits: earlier answers lose their thinking, and the generation
# prompt opens a think block
OPENS_THINKING = (
    "{% for m in messages %}{% set c = m['content'] %}"
    "{% if m['role'] == 'assistant' and '</think>' in c %}{% set c = c.split('</think>')[-1] %}"
    "{% endif %}{{ '<|im_start|>' + m['role'] + '\n' + c + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}")


@pytest.fixture(scope="module")
def engine():
    from edge_tune.llama.engine import Engine

    eng = Engine(family_gguf("qwen3"), n_ctx=512, threads=1, chat_template=OPENS_THINKING)
    yield eng
    eng.close()


def test_the_session_streams_thinking_apart_from_the_answer(engine):
    raw = engine.chat([{"role": "user", "content": "Hi"}], temperature=0.0, max_tokens=8)
    chat = ChatSession(engine, temperature=0.0, max_tokens=8)
    events = list(chat.ask("Hi"))
    answer = events[-1]
    assert isinstance(answer, Answer) and all(isinstance(e, Token) for e in events[:-1])
    assert all(e.thinking for e in events[:-1]) and answer.text == ""
    assert answer.reasoning == "".join(e.text for e in events[:-1]) == raw.strip()
    assert chat.history[-1] == {"role": "assistant", "content": ""}  # thinking is not kept


def test_chat_prints_thinking_to_stderr_and_says_the_answer_is_empty(tmp_path):
    template = tmp_path / "r1.jinja"
    template.write_text(OPENS_THINKING)
    proc = run_cli_in_process("chat", "--base", str(family_gguf("qwen3")), "--chat-template",
                              str(template), "--prompt", "Hi", "--temperature", "0",
                              "--max-tokens", "8")
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.strip() == ""  # stdout holds the answer alone
    assert THINKING_ONLY.split(";")[0] in proc.stderr
    thinking = proc.stderr[:proc.stderr.index("error:")]
    assert thinking.strip() and thinking.endswith("\n")  # shown, on lines of its own
    assert "Traceback" not in proc.stderr
