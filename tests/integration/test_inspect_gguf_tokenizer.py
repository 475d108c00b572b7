"""``data inspect --model X.gguf`` reads the tokenizer from the GGUF's header: no dequantized
copy is made (the cache stays without one), and the token counts are those of the tokenizer of
the dequantized copy training uses. A tiny Qwen2-like GGUF (tests/helpers/tiny_families.py): its
tokenizer is rebuilt in a second, where the default model's 49k vocabulary takes ~30 s."""

from __future__ import annotations

import json
import shutil

from tests.helpers.cli import run_cli_in_process
from tests.helpers.tiny_families import family_gguf


def test_data_inspect_reads_the_gguf_tokenizer_without_dequantizing(demo_jsonl, tmp_path,
                                                                     monkeypatch):
    from transformers import AutoTokenizer

    from edge_tune import models
    from edge_tune.data.formats import read_records
    from edge_tune.data.inspect import inspect_records

    gguf = shutil.copyfile(family_gguf("qwen2"), tmp_path / "qwen2-tiny.gguf")
    cache = tmp_path / "cache"
    monkeypatch.setenv("EDGE_TUNE_CACHE", str(cache))
    proc = run_cli_in_process("data", "inspect", str(demo_jsonl), "--model", str(gguf),
                              "--seq-len", "64", "--json")
    assert proc.returncode == 0, proc.stderr
    assert not (cache / "hf").exists(), list(cache.rglob("*"))  # no dequantized copy
    report = json.loads(proc.stdout)
    assert report["records"] == 200 and report["lengths"]["max"] > 64

    copy = models.dequantized_copy(gguf)  # what training tokenizes with
    want = inspect_records(AutoTokenizer.from_pretrained(str(copy)), read_records(demo_jsonl),
                           str(demo_jsonl), str(gguf), 64)
    assert report == json.loads(json.dumps(want))
    # with the copy cached, inspect reads the tokenizer from it (and says the same)
    again = run_cli_in_process("data", "inspect", str(demo_jsonl), "--model", str(gguf),
                               "--seq-len", "64", "--json")
    assert json.loads(again.stdout) == report
