"""ChatSession, the one conversation behind `edge-tune chat`, the TUI's chat screen and the demo:
multi-turn history, two sides, the plain-completion fallback, a refused turn, stop, commands —
on a tiny random Llama in llama.cpp (greedy: every answer is checked against the engine)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from tests.helpers.gguf_helpers import retemplated
from tests.helpers.tiny_models import tiny_adapter

from edge_tune.chat_session import (EMPTY_ANSWER, Answer, ChatSession, Token, command_of,
                                    require_text)
from edge_tune.errors import CheckFailed

REPO = Path(__file__).resolve().parents[2]
GREEDY = dict(temperature=0.0, max_tokens=6)


@pytest.fixture(scope="module")
def engine(tiny, tmp_path_factory):
    """The tiny model (SmolLM2's ChatML template) with two strong random adapters on
    attn_q/v ("adapter", "other")."""
    from edge_tune.llama.engine import Engine

    adapters = tmp_path_factory.mktemp("a")
    eng = Engine(tiny, n_ctx=512, threads=1)
    eng.add_adapter(tiny_adapter(adapters / "a.gguf", seed=1), "adapter")
    eng.add_adapter(tiny_adapter(adapters / "b.gguf", seed=2), "other")
    yield eng
    eng.close()


def _direct(engine, adapter, messages) -> str:
    engine.activate(adapter)
    return engine.chat(messages, **GREEDY)


def test_multi_turn_history_is_sent_every_turn(engine):
    engine.activate(None)
    chat = ChatSession(engine, system="Be brief.", **GREEDY)
    events = list(chat.ask("What is the capital of Spain?"))
    assert isinstance(events[-1], Answer) and all(isinstance(e, Token) for e in events[:-1])
    first = events[-1].text
    assert "".join(e.text for e in events[:-1]) == first and first.strip()
    second = chat.answer("And of France?")[0]
    sent = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the capital of Spain?"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "And of France?"}]
    assert chat.messages() == sent[:1] + chat.history
    assert chat.history == sent[1:] + [{"role": "assistant", "content": second}]
    assert second == _direct(engine, None, sent)  # the whole conversation went to the model
    chat.reset()
    assert chat.history == [] and chat.system == "Be brief."


def test_two_sides_answer_in_turn_each_with_its_own_history(engine):
    chat = ChatSession(engine, [("base", None), ("tuned", "adapter")], **GREEDY)
    base, tuned = chat.answer("Name a color.")
    ask = [{"role": "user", "content": "Name a color."}]
    assert base == _direct(engine, None, ask) and tuned == _direct(engine, "adapter", ask)
    assert base != tuned  # the adapter changes the answer: the sides really differ
    assert [s.history[-1]["content"] for s in chat.sides] == [base, tuned]
    assert chat.history is chat.sides[-1].history  # the adapter's conversation continues
    moved = ChatSession(engine, [("bot", "adapter")], history=chat.history, **GREEDY)
    assert moved.history == chat.history and moved.history is not chat.history


def test_a_side_can_answer_with_a_mix_of_adapters(engine):
    """A side that names ((name, scale), ...) answers as the engine does under that adapter
    set (llama_set_adapters_lora), and switching sides switches sets."""
    mix = (("adapter", 0.7), ("other", 0.3))
    chat = ChatSession(engine, [("mix", mix), ("half", [("adapter", 0.5)])], **GREEDY)
    mixed, half = chat.answer("Name a color.")
    ask = [{"role": "user", "content": "Name a color."}]
    engine.activate_mix(mix)
    assert mixed == engine.chat(ask, **GREEDY)
    engine.activate("adapter", 0.5)
    assert half == engine.chat(ask, **GREEDY)
    assert len({mixed, half, _direct(engine, "adapter", ask), _direct(engine, "other", ask)}) \
        == 4  # every set answers differently: the scales really apply
    assert chat.sides[0].template_owner == "adapter" and chat.plain_sides() == []
    engine.activate_mix(mix)
    assert ChatSession(engine, **GREEDY).side_names == [("bot", mix)]  # what is active


def test_a_model_without_a_template_answers_as_a_plain_completion(tiny, tmp_path):
    from edge_tune.llama.engine import Engine, NoChatTemplate, plain_prompt

    bare = retemplated(tiny, tmp_path / "bare.gguf", None)
    with Engine(bare, n_ctx=512, threads=1) as eng:
        chat = ChatSession(eng, **GREEDY)
        assert chat.plain_sides() == ["bot"]
        answer = chat.answer("Once upon a time")[0]
        want = "".join(p.text for p in eng.generate(prompt=plain_prompt(
            [{"role": "user", "content": "Once upon a time"}]), **GREEDY))
        assert answer == want and answer.strip()
        strict = ChatSession(eng, plain_fallback=False, **GREEDY)
        with pytest.raises(NoChatTemplate):
            strict.answer("hi")
        assert strict.history == []  # a refused turn is not kept


def test_a_refused_turn_is_not_kept_and_says_how_to_fold(tiny, tmp_path):
    from edge_tune.llama.engine import ChatTemplateError, Engine
    from edge_tune.templates.builtin import BUILTIN

    gemma2 = retemplated(tiny, tmp_path / "g2.gguf", BUILTIN["gemma2"])
    with Engine(gemma2, n_ctx=512, threads=1) as eng:
        chat = ChatSession(eng, system="Be brief.", **GREEDY)
        with pytest.raises(ChatTemplateError, match="System role not supported.*--system-mode "
                                                    "fold"):
            chat.answer("hi")
        assert chat.history == []


def test_stop_keeps_what_was_said(engine):
    chat = ChatSession(engine, [("base", None), ("tuned", "adapter")], temperature=0.0,
                       max_tokens=12)
    events = []
    for event in chat.ask("Tell me a story."):
        events.append(event)
        if isinstance(event, Token):
            chat.stop()  # as the TUI's escape does, from another thread
    first, second = [e for e in events if isinstance(e, Answer)]
    assert first.stopped and first.text == events[0].text and second == Answer(1, "", True)
    assert chat.sides[0].history[-1] == {"role": "assistant", "content": first.text}
    # the consumer closing the stream (Ctrl-C in the CLI) keeps the partial answer too
    stream = chat.ask("Another one.")
    piece = next(stream)
    stream.close()
    assert chat.sides[0].history[-2:] == [{"role": "user", "content": "Another one."},
                                          {"role": "assistant", "content": piece.text}]


def test_commands_and_empty_answers():
    assert [command_of(x) for x in ("/exit", " /quit ", "/reset", "hi", "/nope")] == \
        ["exit", "exit", "reset", None, None]
    with pytest.raises(CheckFailed, match="^the answer is empty"):
        require_text(Answer(0, " \n"))
    require_text(Answer(0, "", stopped=True))  # stopped by the user: not an error
    assert EMPTY_ANSWER.startswith("the answer is empty")


def test_the_three_front_ends_use_the_one_session():
    """CLI chat, TUI chat screen and demo all converse through ChatSession and none calls the
    engine's generation itself (one loop, not three)."""
    for path in ("edge_tune/cli/run.py", "tui/screens/chat.py", "edge_tune/demo.py"):
        text = (REPO / path).read_text()
        assert re.search(r"^\s*from edge_tune\.chat_session import .*ChatSession", text, re.M), \
            path
        assert "ChatSession(" in text, path
        assert not re.search(r"\.(chat_stream|chat|generate)\(", text), path
    core = (REPO / "edge_tune/chat_session.py").read_text()
    assert not re.search(r"^\s*(from|import) edge_tune\.(cli|tui|render)", core, re.M)
