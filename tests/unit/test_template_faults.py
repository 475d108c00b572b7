"""A record the chat template cannot train is that record's fault (issue 15, items 4, 5, 7).

- A template's own ``raise_exception`` (Gemma: "Conversation roles must alternate"; Gemma 2:
  "System role not supported") is ``FILE:LINE: the template says: ...``, exit code 2, and
  ``--skip-invalid`` skips and lists the record; ``--system-mode fold`` puts a system prompt
  into the first user turn for templates that reject the system role.
- Templates that rewrite earlier turns (Qwen3's reasoning template): each assistant turn is
  trained in the context the model sees when it generates it (one example per turn; the
  trained token ids are written out below); a template that cannot place a turn at all is a
  per-record error with its line.
- ``weight: 0`` (OpenAI fine-tuning format): the turn is context; anything but 0/1 is an error;
  a record with every assistant turn at weight 0 is dropped and counted, as any example with
  no trained token.

The records go through the real path: ``read_records`` -> the job records ``train`` sends to
its worker -> the worker's ``tokenize_records``. Tokenizers are byte-level (id = byte value,
specials from 256, see chat_tokenizer.py) with the built-in templates of
edge_tune.templates.builtin.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers.chat_tokenizer import ID, byte_tokenizer, ids
from edge_tune.data.formats import read_records
from edge_tune.errors import EdgeTuneError
from edge_tune.templates.builtin import BUILTIN

IGNORE = -100
HI = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr"}]


def write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def job_records(path) -> list[dict]:
    """The records exactly as ``train`` hands them to its worker."""
    from edge_tune.data.formats import job_record as _job_record

    return [_job_record(r) for r in read_records(path).records]


def tokenize(tok, records, **kw):
    """The worker's tokenization (what training uses); returns (examples, log lines)."""
    from edge_tune.training.worker import tokenize_records

    logs = []
    examples = tokenize_records(tok, records, 4096, logs.append, "training", **kw)
    return examples, [e.message for e in logs if hasattr(e, "message")]


def trained_ids(ex) -> list[int]:
    return [t for t in ex.labels if t != IGNORE]


def runs(ex) -> list[list[int]]:
    """Maximal runs of trained tokens."""
    out, cur = [], []
    for lab in ex.labels:
        if lab != IGNORE:
            cur.append(lab)
        elif cur:
            out, cur = out + [cur], []
    return out + ([cur] if cur else [])


# --- 4. template exceptions ---------------------------------------------------------------

def test_gemma_roles_must_alternate_names_the_line(tmp_path):
    tok = byte_tokenizer(BUILTIN["gemma"], "gemma")
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                        {"role": "assistant", "content": "c"}]}
    path = write(tmp_path / "d.jsonl", [{"messages": HI}, bad, {"messages": HI}])
    with pytest.raises(EdgeTuneError) as err:
        tokenize(tok, job_records(path))
    assert str(err.value) == (f"{path}:2: the template says: Conversation roles must alternate "
                              "user/assistant/user/assistant/...")
    assert err.value.exit_code == 2


def test_skip_invalid_skips_and_lists_template_faults(tmp_path):
    tok = byte_tokenizer(BUILTIN["gemma"], "gemma")
    bad = {"messages": [{"role": "user", "content": "x"}, *HI]}  # two user turns in a row
    path = write(tmp_path / "d.jsonl", [{"messages": HI}, bad, {"messages": HI}])
    examples, logs = tokenize(tok, job_records(path), skip_invalid=True)
    assert len(examples) == 2
    assert any("skipped 1 records" in m and f"{path}:2: the template says: Conversation "
               "roles must alternate" in m for m in logs), logs
    with pytest.raises(EdgeTuneError, match="every record was invalid"):
        tokenize(tok, job_records(write(tmp_path / "all_bad.jsonl", [bad])), skip_invalid=True)


def test_gemma2_rejects_the_system_role_and_fold_puts_it_in_the_first_user_turn(tmp_path):
    tok = byte_tokenizer(BUILTIN["gemma2"], "gemma2")
    sys = [{"role": "system", "content": "Be a pirate."}]
    path = write(tmp_path / "d.jsonl", [{"messages": sys + HI}])
    with pytest.raises(EdgeTuneError) as err:
        tokenize(tok, job_records(path))
    assert str(err.value) == (f"{path}:1: the template says: System role not supported (to put "
                              "the system text into the first user turn: --system-mode fold)")
    [ex], _ = tokenize(tok, job_records(path), system_mode="fold")
    assert ex.input_ids == ids("<bos><start_of_turn>user\nBe a pirate.\n\nHi<end_of_turn>\n"
                               "<start_of_turn>model\nArr<end_of_turn>\n")
    assert trained_ids(ex) == ids("Arr<end_of_turn>\n")


def test_fold_system_is_pure():
    from edge_tune.data.template import fold_system

    msgs = [{"role": "system", "content": "S1"}, {"role": "system", "content": "S2"},
            {"role": "user", "content": "U", "name": "bob"}, {"role": "assistant", "content": "A"},
            {"role": "system", "content": "later"}]
    before = json.dumps(msgs)
    assert fold_system(msgs) == [{"role": "user", "content": "S1\n\nS2\n\nU", "name": "bob"},
                                 msgs[3], msgs[4]]
    assert json.dumps(msgs) == before  # the input is untouched
    assert fold_system(msgs[2:]) == msgs[2:]
    assert fold_system([msgs[0], msgs[3]]) == [{"role": "user", "content": "S1"}, msgs[3]]


def test_mistral_system_prompt_is_a_record_error_with_its_line_and_fold_fixes_it(tmp_path):
    """Mistral v0.3 shows the system message only in an inference prompt: the turn cannot be
    placed. Once per record, with its line (it refused the whole file, without one)."""
    tok = byte_tokenizer(BUILTIN["mistral"], "mistral")
    sys = [{"role": "system", "content": "Be a pirate."}]
    path = write(tmp_path / "d.jsonl", [{"messages": HI}, {"messages": sys + HI}])
    with pytest.raises(EdgeTuneError, match=rf"^{path}:2: the chat template does not render "
                       r"incrementally at assistant turn 1: .*--system-mode fold\)$"):
        tokenize(tok, job_records(path))
    examples, logs = tokenize(tok, job_records(path), skip_invalid=True)
    assert len(examples) == 1 and any(f"{path}:2:" in m for m in logs)
    [_, ex], _ = tokenize(tok, job_records(path), system_mode="fold")
    assert ex.input_ids == ids("<s>[INST] Be a pirate.\n\nHi[/INST] Arr</s>")
    assert trained_ids(ex) == ids(" Arr</s>")


def test_a_broken_or_missing_template_is_the_runs_fault_not_a_records():
    from edge_tune.data.template import RecordError, encode_examples

    tok = byte_tokenizer("{% for m in messages %}{{ m.content }", "chatml")
    with pytest.raises(EdgeTuneError, match="not valid Jinja") as err:
        encode_examples(tok, HI)
    assert not isinstance(err.value, RecordError)  # --skip-invalid must not skip every record
    tok.chat_template = None
    with pytest.raises(EdgeTuneError, match="--chat-template") as err:
        encode_examples(tok, HI)
    assert not isinstance(err.value, RecordError)
    assert "\n" not in str(err.value) and "Cannot use chat template" not in str(err.value)
    [ex] = encode_examples(tok, None, "plain text needs no template")
    assert ex.n_trained == len(ex.input_ids)


def test_an_error_evaluating_the_template_is_the_records_fault(tmp_path):
    """A template evaluating data it was not written for (here: a number where it adds text)."""
    from edge_tune.data.template import RecordError, encode_examples

    tok = byte_tokenizer("{% for m in messages %}{{ m.content + m.extra }}{% endfor %}")
    msgs = [{"role": "user", "content": "Hi", "extra": 3}, HI[1]]
    with pytest.raises(RecordError, match=r"^d.jsonl:7: the template fails on this record "
                       r"\(TypeError: "):
        encode_examples(tok, msgs, where="d.jsonl:7")


# --- 5. templates that rewrite history ----------------------------------------------------

TWO_TURNS = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A1"},
             {"role": "user", "content": "Go"}, {"role": "assistant", "content": "A2"}]


def test_qwen3_multi_turn_each_turn_trained_in_its_own_context(tmp_path):
    """Qwen3 renders the first answer as "A1" once a later user turn follows, but as
    "<think>\\n\\n</think>\\n\\nA1" when it is the turn being generated. One example per
    assistant turn: the context is the conversation before it with the generation prompt
    (what the model is given at inference), the target what the template writes for it."""
    tok = byte_tokenizer(BUILTIN["qwen3"], "qwen3")
    path = write(tmp_path / "q.jsonl", [{"messages": TWO_TURNS}])
    first, second = tokenize(tok, job_records(path))[0]
    # <think> 259, </think> 260, <|im_end|> 258, "\n" 10, "A" 65, "1" 49, "2" 50
    assert trained_ids(first) == [259, 10, 10, 260, 10, 10, 65, 49, 258, 10]
    assert trained_ids(second) == [259, 10, 10, 260, 10, 10, 65, 50, 258, 10]
    assert first.input_ids == ids("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n") + \
        trained_ids(first)
    # The second turn's context shows the first answer as Qwen3 shows history: no think block.
    assert second.input_ids == ids(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\n"
        "Go<|im_end|>\n<|im_start|>assistant\n") + trained_ids(second)
    for ex, k in ((first, 1), (second, 3)):  # the context is the inference prompt, token for token
        prompt = tok.apply_chat_template(TWO_TURNS[:k], tokenize=False, add_generation_prompt=True)
        n = len(ex.input_ids) - len(trained_ids(ex))
        assert ex.input_ids[:n] == tok(prompt, add_special_tokens=False)["input_ids"]
        assert ex.labels[:n] == [IGNORE] * n and ex.labels[n:] == ex.input_ids[n:]


def test_qwen3_reasoning_is_trained_where_it_is_generated():
    from edge_tune.data.template import encode_examples

    tok = byte_tokenizer(BUILTIN["qwen3"], "qwen3")
    msgs = [TWO_TURNS[0], {"role": "assistant", "content": "A1", "reasoning_content": "r"},
            *TWO_TURNS[2:]]
    first, second = encode_examples(tok, msgs)
    assert trained_ids(first) == ids("<think>\nr\n</think>\n\nA1<|im_end|>\n")
    assert ID["<think>"] not in second.input_ids[:-10]  # history: the reasoning is dropped


def test_incremental_templates_keep_one_example_per_record(tmp_path):
    """Single-turn Qwen3 and multi-turn ChatML render incrementally: one example, every answer
    trained in it (the think block Qwen3 writes into the turn included)."""
    path = write(tmp_path / "d.jsonl", [{"messages": HI}, {"messages": TWO_TURNS}])
    qwen3 = byte_tokenizer(BUILTIN["qwen3"], "qwen3")
    [one], _ = tokenize(qwen3, job_records(path)[:1])
    assert trained_ids(one) == ids("<think>\n\n</think>\n\nArr<|im_end|>\n")
    chatml = byte_tokenizer(BUILTIN["chatml"], "chatml")
    [a, b], _ = tokenize(chatml, job_records(path))
    assert runs(b) == [ids("A1<|im_end|>\n"), ids("A2<|im_end|>\n")]


def test_qwen3_train_on_all_is_the_one_whole_conversation():
    from edge_tune.data.template import encode_examples

    tok = byte_tokenizer(BUILTIN["qwen3"], "qwen3")
    [ex] = encode_examples(tok, TWO_TURNS, train_on_all=True)
    assert ex.input_ids == ids(tok.apply_chat_template(TWO_TURNS, tokenize=False))
    assert ex.labels == ex.input_ids


# --- 7. weight ----------------------------------------------------------------------------

def test_weight_zero_is_context_and_weight_one_is_trained(tmp_path):
    msgs = [TWO_TURNS[0], {**TWO_TURNS[1], "weight": 0}, TWO_TURNS[2], {**TWO_TURNS[3],
                                                                        "weight": 1}]
    path = write(tmp_path / "w.jsonl", [{"messages": msgs}])
    [ex], _ = tokenize(byte_tokenizer(BUILTIN["chatml"], "chatml"), job_records(path))
    assert runs(ex) == [ids("A2<|im_end|>\n")]
    assert ids("A1<|im_end|>\n")[0] in ex.input_ids  # still in the context
    [only], _ = tokenize(byte_tokenizer(BUILTIN["qwen3"], "qwen3"), job_records(path))
    assert trained_ids(only) == ids("<think>\n\n</think>\n\nA2<|im_end|>\n")  # no A1 example


@pytest.mark.parametrize("message,contains", [
    ({"role": "assistant", "content": "y", "weight": 0.5},
     "messages[1]: 'weight' must be 0 (context, not trained) or 1 (trained), got 0.5"),
    ({"role": "assistant", "content": "y", "weight": True}, "'weight' must be 0"),
    ({"role": "assistant", "content": "y", "weight": "0"}, "'weight' must be 0"),
    ({"role": "user", "content": "y", "weight": 0},
     "messages[1]: 'weight' is only for assistant messages (got it on user)"),
])
def test_bad_weight_is_a_record_error_naming_the_field(tmp_path, message, contains):
    good = {"messages": HI}
    path = write(tmp_path / "w.jsonl", [good, {"messages": [HI[0], message, HI[1]]}])
    with pytest.raises(EdgeTuneError) as err:
        read_records(path)
    assert str(err.value).startswith(f"{path}:2: ") and contains in str(err.value)
    assert len(read_records(path, skip_invalid=True).records) == 1


def test_every_turn_weight_zero_is_dropped_and_counted(tmp_path):
    """A record whose every assistant turn has weight 0 is valid (OpenAI's format allows it):
    it is context only, so its one example has no trained token and is dropped and counted."""
    path = write(tmp_path / "w.jsonl", [{"messages": [HI[0], {**HI[1], "weight": 0}]},
                                        {"messages": HI}])
    assert len(read_records(path).records) == 2
    examples, logs = tokenize(byte_tokenizer(BUILTIN["chatml"], "chatml"), job_records(path))
    assert len(examples) == 1 and trained_ids(examples[0]) == ids("Arr<|im_end|>\n")
    assert any("dropped 1 examples with no trained token" in line for line in logs), logs
