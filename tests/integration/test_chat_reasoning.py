"""A reasoning model's thinking in `edge-tune chat` and ChatSession (what the TUI shows): apart
from the answer, on the tiny random Qwen3 (tests/helpers/tiny_families.py) with a
DeepSeek-R1-style template whose generation prompt opens the think block, so that everything
the random model writes is thinking (it never closes the block)."""

from __future__ import annotations

import pytest
from tests.helpers.cli import run_cli_in_process
from tests.helpers.tiny_families import family_gguf

from edge_tune.chat_session import THINKING_ONLY, Answer, ChatSession, Token

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
