"""The model names other tools use, resolved offline to the GGUF on disk: a bare Ollama name,
Ollama's ``hf.co/USER/REPO:QUANT``, ``USER/REPO:QUANT`` for a GGUF repo in the Hugging Face
cache or in LM Studio's models folder.

The stores are built in a temporary HOME as their owners lay them out (Ollama's manifests and
blobs, huggingface_hub's ``models--USER--REPO/snapshots/REV`` with ``refs/main``, LM Studio's
``~/.lmstudio/models/PUBLISHER/REPO``). Resolution reads only names and the GGUF magic, so the
weights here are a few bytes behind it; the CLI test trains nothing and exits at the model.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_tune import models
from edge_tune.errors import EdgeTuneError
from tests.helpers.cli import assert_one_line_error, run_cli
from tests.integration.test_local_models import _hf_cache_put, _ollama_blob, _ollama_manifest

REPO = "someone/Tiny-GGUF"
FAKE_GGUF = b"GGUF" + bytes(60)


def _gguf(path: Path, tag: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(FAKE_GGUF + tag.encode())  # distinct contents: distinct Ollama blobs
    return path


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """HOME with an Ollama store, an HF cache and LM Studio's folder, all pointed at by the
    variables their owners read."""
    from huggingface_hub import constants

    src = tmp_path / "src"
    ollama = tmp_path / ".ollama" / "models"
    weights = {"mediaType": "application/vnd.ollama.image.model",
               **_ollama_blob(ollama, src=_gguf(src / "llama.gguf", "llama"))}
    _ollama_manifest(ollama, "llama3.2:1b", [weights])
    _ollama_manifest(ollama, "qwen3", [{"mediaType": "application/vnd.ollama.image.model",
                                        **_ollama_blob(ollama, src=_gguf(src / "q.gguf", "q"))}])
    _ollama_manifest(ollama, "hf.co/other/Pulled-GGUF:Q8_0", [weights])
    files = {name: _gguf(src / name, name) for name in
             ("Tiny-Q4_K_M.gguf", "Tiny-Q8_0.gguf", "Tiny-IQ4_XS.gguf", "mmproj-Tiny-F16.gguf")}
    _hf_cache_put(tmp_path / "hf" / "hub", REPO, files)
    _hf_cache_put(tmp_path / "hf" / "hub", "someone/Split-GGUF",
                  {n: _gguf(src / n, n) for n in ("s-Q4_0-00001-of-00002.gguf",
                                                  "s-Q4_0-00002-of-00002.gguf")})
    _gguf(tmp_path / ".lmstudio" / "models" / "pub" / "Studio-GGUF" / "studio-q5_k_m.gguf", "s")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("OLLAMA_MODELS", str(ollama))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv(models.LMSTUDIO_ENV, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return tmp_path


def _snapshot(home: Path, repo: str) -> Path:
    return next((home / "hf" / "hub" / f"models--{repo.replace('/', '--')}" /
                 "snapshots").iterdir())


def test_every_form_resolves_to_its_gguf(home):
    snap = _snapshot(home, REPO)
    assert models.resolve(f"hf.co/{REPO}:Q4_K_M").gguf == snap / "Tiny-Q4_K_M.gguf"
    assert models.resolve(f"huggingface.co/{REPO}:q8_0").gguf == snap / "Tiny-Q8_0.gguf"
    assert models.resolve(f"{REPO}:iq4_xs").gguf == snap / "Tiny-IQ4_XS.gguf"
    # no quant: Q4_K_M, as Ollama picks; a GGUF-only repo named as a hub ID too
    assert models.resolve(f"hf.co/{REPO}").gguf == snap / "Tiny-Q4_K_M.gguf"
    assert models.check_spec(REPO) == "gguf"
    assert models.resolve(REPO).gguf == snap / "Tiny-Q4_K_M.gguf"
    studio = models.resolve("pub/Studio-GGUF:Q5_K_M")
    assert studio.gguf == home / ".lmstudio/models/pub/Studio-GGUF/studio-q5_k_m.gguf"
    bare = models.resolve("llama3.2:1b")
    assert bare.ollama == "llama3.2:1b" and bare.gguf.read_bytes().endswith(b"llama")
    assert models.resolve("qwen3").ollama == "qwen3:latest"
    pulled = models.resolve("hf.co/other/Pulled-GGUF:Q8_0")  # what `ollama pull hf.co/...` kept
    assert pulled.ollama == "hf.co/other/Pulled-GGUF:Q8_0" and pulled.gguf == bare.gguf


def test_lmstudio_folders_in_order(home, monkeypatch):
    pointed = home / "elsewhere"
    (home / ".lmstudio-home-pointer").write_text(f"{pointed}\n")
    assert models.lmstudio_dirs()[:2] == [pointed / "models", home / ".lmstudio" / "models"]
    assert models.lmstudio_models_dir() == home / ".lmstudio" / "models"  # the one that exists
    monkeypatch.setenv(models.LMSTUDIO_ENV, str(home / "mine"))
    assert models.lmstudio_dirs()[0] == models.lmstudio_models_dir() == home / "mine"


@pytest.mark.parametrize("spec, needles", [
    (f"{REPO}:Q6_K", ["no GGUF file in", "carries Q6_K",  # no vision projector (mmproj)
                      "(there: Tiny-IQ4_XS.gguf, Tiny-Q4_K_M.gguf, Tiny-Q8_0.gguf)"]),
    ("someone/Split-GGUF:Q4_0", ["2 GGUF files in", "s-Q4_0-00001-of-00002.gguf",
                                 "give the file's path"]),
    ("nobody/None-GGUF:Q4_K_M", ["not on this machine", "models--nobody--None-GGUF",
                                 "LM Studio's models folder", "Ollama's store",
                                 "hf download nobody/None-GGUF"]),
    ("llama3.2:3b", ["has no llama3.2:3b", "did you mean `ollama:llama3.2:3b`"]),
    ("hf.co/someone/..:Q4_K_M", ["not a GGUF repo name"]),
    ("hf.co/a/b/c:Q4_K_M", ["not a GGUF repo name"]),
])
def test_what_is_not_there_says_what_is(home, spec, needles):
    with pytest.raises(EdgeTuneError) as info:
        models.check_spec(spec)
    message = str(info.value)
    assert "\n" not in message and all(n in message for n in needles), message


def test_a_bare_name_that_is_not_there_is_one_line_through_the_cli(home, demo_jsonl):
    proc = run_cli("plan", "--data", str(demo_jsonl), "--model", "phi4-mini",
                   env={"HOME": str(home), "OLLAMA_MODELS": str(home / ".ollama" / "models"),
                        "HF_HUB_OFFLINE": "1"})
    assert_one_line_error(proc, "did you mean `ollama:phi4-mini`", "ollama pull phi4-mini",
                          "hf.co/USER/REPO:Q4_K_M")
