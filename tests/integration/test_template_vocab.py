"""`--chat-template` whose turn markers are not tokens of the model: refused in one line before
any model is loaded (a tiny random Llama carrying SmolLM2's ChatML vocabulary)."""

from __future__ import annotations

import json
import time

from tests.helpers.cli import assert_one_line_error, run_cli

from edge_tune.templates.vocabulary import fitting_templates, hf_has_tokens, template_markers
from edge_tune.templates.builtin import BUILTIN


def test_markers_of_the_builtins():
    assert template_markers(BUILTIN["llama3"])[0] == "<|eot_id|>"
    assert template_markers(BUILTIN["chatml"]) == ["<|im_end|>", "<|im_start|>"]
    assert template_markers(BUILTIN["gemma2"]) == ["<end_of_turn>"]
    assert template_markers("{{ raise_exception('no') }}") == []


def test_foreign_template_is_refused_before_loading(tiny, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "yo"}]}) + "\n")
    start = time.monotonic()
    proc = run_cli("data", "inspect", str(data), "--model", str(tiny), "--chat-template",
                   "llama3")
    assert_one_line_error(proc, "--chat-template llama3: '<|eot_id|>' is not a token",
                          "smollm2, chatml, qwen2, qwen3)")  # the family's own first
    own = tmp_path / "gemma-like.jinja"
    own.write_text("{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}"
                   "<end_of_turn>\n{% endfor %}")
    proc = run_cli("train", "--data", str(data), "--model", str(tiny), "--chat-template",
                   str(own), "--out", str(tmp_path / "run"), "--backend", "cpu")
    proc.stderr = proc.stderr.split("\n", 1)[1]  # train first reports what it read
    assert_one_line_error(proc, "--chat-template FILE: '<end_of_turn>' is not a token")
    assert not (tmp_path / "run").exists()
    proc = run_cli("chat", "--base", str(tiny), "--chat-template", "phi3", "--prompt", "hi")
    assert_one_line_error(proc, "--chat-template phi3: '<|end|>' is not a token")
    proc = run_cli("data", "inspect", str(data), "--model", str(tiny), "--chat-template",
                   "chatml")
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - start < 60


def test_hf_tokenizer_vocabulary(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps(
        {"model": {"vocab": {"a": 0, "<|im_end|>": 1}}, "added_tokens": [{"content": "<x>"}]}))
    assert hf_has_tokens(tmp_path, ["<|im_end|>", "<x>", "<|eot_id|>"]) == {"<|im_end|>", "<x>"}
    assert hf_has_tokens(tmp_path / "none", ["a"]) is None


def test_templates_that_fit_a_model_family_first(tiny, tmp_path):
    """What the TUI suggests for a model without a template (``model_template()["fitting"]``):
    built-ins whose markers are tokens of the model, its family's own first. A Gemma-like HF
    directory (no <|im_start|>) gets gemma2 and gemma, never chatml; the tiny model (SmolLM2's
    tokenizer) smollm2 first; a hub ID not on disk: unknown (None)."""
    from edge_tune import models

    assert fitting_templates(models.resolve(str(tiny)))[:2] == ["smollm2", "chatml"]
    gemma = tmp_path / "gemma"
    gemma.mkdir()
    (gemma / "config.json").write_text(json.dumps({"model_type": "gemma2"}))
    (gemma / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {
        "<start_of_turn>": 0, "<end_of_turn>": 1, "a": 2}}}))
    assert fitting_templates(models.resolve(str(gemma))) == ["gemma2", "gemma"]
    (gemma / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    assert fitting_templates(models.resolve(str(gemma))) == ["gemma", "gemma2"]
    (gemma / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0}}}))
    assert fitting_templates(models.resolve(str(gemma))) == []
    assert fitting_templates(models.resolve("someone/not-downloaded-model")) is None
