"""Assistant reasoning (``reasoning_content``) is trained or refused, never dropped silently.

On templates that do not render reasoning (ChatML, ``qwen2``, the default model's SmolLM2
template) a record with reasoning is a ``FILE:LINE`` error naming both ways out; Qwen3's own
template trains it inside the answer; ``--reasoning inline`` trains it between think markers
on any template; ``--reasoning drop`` trains the answer alone. Tokenizers: the tiny ``qwen2``
and ``qwen3`` families of ``tiny_families`` (load in well under a second); the default
model's template is the built-in ``smollm2`` (the embedded SmolLM2 model's own).
"""

from __future__ import annotations

import json

import pytest
from tests.helpers.cli import assert_one_line_error, run_cli
from tests.helpers.tiny_families import family_hf

from edge_tune.data import reasoning
from edge_tune.data.template import IGNORE, RecordError, encode_examples, render_examples
from edge_tune.errors import EdgeTuneError
from edge_tune.templates.builtin import BUILTIN

THOUGHT = "Seventeen times three: ten times three is thirty, seven times three is twenty-one."
THOUGHT2 = "Two plus two is four."
CHAT = [{"role": "user", "content": "What is 17 * 3?"},
        {"role": "assistant", "reasoning_content": THOUGHT, "content": "51"}]
TWO_TURNS = CHAT + [{"role": "user", "content": "And 2 + 2?"},
                    {"role": "assistant", "reasoning_content": THOUGHT2, "content": "4"}]


def _tokenizer(family: str, template: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(family_hf(family))
    if template is not None:
        tok.chat_template = BUILTIN[template]
    return tok


def _trained(tok, messages) -> list[str]:
    """The trained text of each example of ``messages``."""
    return [tok.decode([t for t in ex.labels if t != IGNORE])
            for ex in encode_examples(tok, messages, where="d.jsonl:1")]


# --- the pure module ------------------------------------------------------------------------

def test_apply_inline_drop_auto():
    msgs = TWO_TURNS + [{"role": "assistant", "content": None, "reasoning_content": "call it",
                         "tool_calls": []}]
    inline = reasoning.apply(msgs, "inline")
    assert inline[1] == {"role": "assistant", "content": f"<think>\n{THOUGHT}\n</think>\n\n51"}
    assert inline[4]["content"] == "<think>\ncall it\n</think>\n\n" and "tool_calls" in inline[4]
    assert reasoning.apply(CHAT, "inline", ("[THINK]", "[/THINK]"))[1]["content"] == \
        f"[THINK]\n{THOUGHT}\n[/THINK]\n\n51"
    assert reasoning.apply(msgs, "drop")[1] == {"role": "assistant", "content": "51"}
    assert reasoning.apply(msgs, "auto") is msgs
    assert "reasoning_content" in msgs[1]  # pure: the input is unchanged
    empty = [{"role": "assistant", "content": "x", "reasoning_content": ""}]
    assert reasoning.apply(empty, "inline") == [{"role": "assistant", "content": "x"}]
    assert reasoning.count(msgs) == 3 and reasoning.count(empty) == 0
    with pytest.raises(EdgeTuneError, match="--reasoning 'think': expected one of auto, inline"):
        reasoning.apply(msgs, "think")


def test_think_markers_are_the_models_own_when_known():
    assert reasoning.think_markers(None) == ("<think>", "</think>")
    assert reasoning.think_markers({"a": 0, "[THINK]": 1, "[/THINK]": 2}) == ("[THINK]",
                                                                            "[/THINK]")
    assert reasoning.think_markers(["<seed:think>"]) == ("<think>", "</think>")  # half a pair
    assert reasoning.think_markers(_tokenizer("qwen3")) == ("<think>", "</think>")


# --- templates ------------------------------------------------------------------------------

@pytest.mark.parametrize("template", ["chatml", "qwen2", "smollm2"])
def test_a_template_that_drops_reasoning_refuses_the_record(template):
    tok = _tokenizer("qwen2", template)
    with pytest.raises(RecordError) as info:
        render_examples(tok, CHAT, where="data.jsonl:3")
    msg = str(info.value)
    assert msg.startswith("data.jsonl:3: the chat template drops assistant turn 1's "
                          "reasoning (reasoning_content/thinking"), msg
    for needle in ("--chat-template qwen3", "--reasoning inline", "--reasoning drop"):
        assert needle in msg
    assert "\n" not in msg


def test_qwen3_trains_each_turns_reasoning_inside_its_answer():
    tok = _tokenizer("qwen3")
    trained = _trained(tok, TWO_TURNS)
    # Qwen3 drops earlier turns' reasoning in a whole render: one example per turn
    assert trained == [f"<think>\n{THOUGHT}\n</think>\n\n51<|im_end|>\n",
                       f"<think>\n{THOUGHT2}\n</think>\n\n4<|im_end|>\n"]


def test_inline_trains_the_reasoning_between_think_markers_on_qwen2():
    tok = _tokenizer("qwen2")
    markers = reasoning.think_markers(tok)
    trained = _trained(tok, reasoning.apply(TWO_TURNS, "inline", markers))
    assert trained == [f"<think>\n{THOUGHT}\n</think>\n\n51<|im_end|>\n"
                       f"<think>\n{THOUGHT2}\n</think>\n\n4<|im_end|>\n"]


def test_drop_trains_the_answers_alone():
    tok = _tokenizer("qwen2")
    assert _trained(tok, reasoning.apply(TWO_TURNS, "drop")) == ["51<|im_end|>\n4<|im_end|>\n"]


# --- the CLI --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reasoning_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("reasoning") / "distilled.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n")
    return path


def test_data_inspect_refuses_reasoning_the_template_drops(reasoning_jsonl):
    proc = run_cli("data", "inspect", str(reasoning_jsonl), "--model",
                   str(family_hf("qwen2")), timeout=300)
    assert_one_line_error(proc, f"{reasoning_jsonl}:1", "drops assistant turn 1's "
                          "reasoning (reasoning_content", "--reasoning inline")


def test_data_inspect_inline_shows_the_think_block(reasoning_jsonl):
    proc = run_cli("data", "inspect", str(reasoning_jsonl), "--model",
                   str(family_hf("qwen2")), "--reasoning", "inline", "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    first = json.loads(proc.stdout)["first_example"]
    text = first["text"]
    trained = "".join(text[a:b] for a, b in first["spans"])
    assert f"<think>\n{THOUGHT}\n</think>\n\n51" in trained


def test_a_bad_reasoning_value_is_one_line(reasoning_jsonl):
    assert_one_line_error(run_cli("data", "inspect", str(reasoning_jsonl), "--reasoning",
                                  "think"), "--reasoning 'think'", "auto, inline, drop")


def test_train_and_plan_take_reasoning_through_the_config(reasoning_jsonl):
    """``--reasoning`` is one of train's options (plan takes the same); a bad value is the
    config's one-line refusal."""
    proc = run_cli("plan", "--data", str(reasoning_jsonl), "--reasoning", "think")
    assert_one_line_error(proc, "reasoning: 'think' is not valid", "auto, inline or drop")
