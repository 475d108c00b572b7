"""A tokenizer with more tokens than the model has embedding rows (``vocab_size``): training
used to stop at the first such id with a raw IndexError (exit 1) and leave a run folder behind.
Such a model is refused before training (llama.cpp's converter rejects it too; the worker's
check of the tokenized data against config.json covers a GGUF base): one line, exit 2, no
folder."""

from __future__ import annotations

import json
import shutil

from tests.helpers.cli import assert_one_line_error, run_cli
from tests.helpers.tiny_families import family_hf


def test_train_refuses_token_ids_beyond_vocab_size_and_leaves_no_run(tmp_path):
    from transformers import AutoTokenizer

    hf = tmp_path / "qwen2"
    shutil.copytree(family_hf("qwen2"), hf)
    vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
    tok = AutoTokenizer.from_pretrained(hf)
    tok.add_tokens(["<zz_extra>"], special_tokens=True)  # one more token than the model has
    tok.save_pretrained(hf)
    assert len(tok) > vocab
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi <zz_extra>"},
                                             {"role": "assistant", "content": "ok"}]}) + "\n")
    run = tmp_path / "run"
    proc = run_cli("train", "--data", str(data), "--model", str(hf), "--backend", "cpu",
                   "--max-steps", "1", "--no-verify", "--out", str(run), timeout=600)
    assert "Traceback" not in proc.stderr and proc.stderr.count("error: ") == 1
    proc.stderr = proc.stderr.splitlines()[-1]  # train reports its progress up to the refusal
    assert_one_line_error(proc, "config.json: vocab_size", f"{vocab} is smaller",
                          f"{len(tok)} tokens", "matches the model's embedding")
    assert not run.exists()
