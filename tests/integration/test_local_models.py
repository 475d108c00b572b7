"""Models the user already has, offline: ``--model ollama:NAME[:TAG]`` read from Ollama's store,
and a hub ID read from the local Hugging Face cache.

Both stores are built on disk as their owners write them: Ollama's manifests and
content-addressed blobs (names computed from the bytes; the weights blob is a hard link to a
tiny random Llama GGUF), and huggingface_hub's cache (``models--ORG--NAME`` with blobs named by
their etag, snapshot symlinks and ``refs/main``; checked with huggingface_hub's own
``scan_cache_dir``). Every CLI call runs with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from edge_tune import ollama_store
from edge_tune.errors import EdgeTuneError
from tests.helpers.cli import assert_one_line_error, run_cli

HUB_ID = "edge-tune-test/tiny-llama"
GO_TEMPLATE = "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _ollama_blob(root: Path, data: bytes | None = None, src: Path | None = None) -> dict:
    """Store a blob as Ollama does (blobs/sha256-HEX) and return its manifest layer fields."""
    digest = _sha256(data if data is not None else src.read_bytes())
    blob = root / "blobs" / f"sha256-{digest}"
    blob.parent.mkdir(parents=True, exist_ok=True)
    if not blob.exists():
        if src is not None:
            try:
                os.link(src, blob)
            except OSError:
                blob.symlink_to(src)
        else:
            blob.write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": blob.stat().st_size}


def _ollama_manifest(root: Path, name: str, layers: list[dict], text: str | None = None):
    """manifests/HOST/NAMESPACE/MODEL/TAG, encoded as Ollama's WriteManifest does."""
    n = ollama_store.parse_name(name)
    path = root.joinpath("manifests", *n.manifest_parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = _ollama_blob(root, json.dumps({"model_format": "gguf", "model_family": "llama",
                                            "file_type": "F32"}).encode())
    doc = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
           "config": {"mediaType": "application/vnd.docker.container.image.v1+json", **config},
           "layers": layers}
    path.write_text(text if text is not None else json.dumps(doc, separators=(",", ":")) + "\n")
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny) -> Path:
    """An Ollama store: tiny:latest (weights, template, params), user/tiny2:q8 (the same
    weights), and broken entries for the error cases."""
    root = tmp_path_factory.mktemp("ollama") / "models"
    weights = {"mediaType": ollama_store.MEDIA_MODEL, **_ollama_blob(root, src=tiny)}
    template = {"mediaType": ollama_store.MEDIA_TEMPLATE,
                **_ollama_blob(root, GO_TEMPLATE.encode())}
    params = {"mediaType": ollama_store.MEDIA_PARAMS,
              **_ollama_blob(root, json.dumps({"stop": ["<|im_end|>"]}).encode())}
    _ollama_manifest(root, "tiny", [weights, template, params])
    _ollama_manifest(root, "user/tiny2:q8", [weights])
    _ollama_manifest(root, "broken", [], text='{"layers": [\n  {"mediaType": }\n')
    _ollama_manifest(root, "noblob", [{"mediaType": ollama_store.MEDIA_MODEL,
                                       "digest": "sha256:" + "0" * 64, "size": 10}])
    _ollama_manifest(root, "short", [{**weights, "size": weights["size"] + 1}])
    _ollama_manifest(root, "notgguf", [{"mediaType": ollama_store.MEDIA_MODEL,
                                        **_ollama_blob(root, b"safetensors?")}])
    return root


def _hf_cache_put(hub: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """Lay files out as huggingface_hub's cache does: blobs named by their etag (sha256 for
    LFS files, the git blob sha1 otherwise), snapshots/COMMIT/NAME -> ../../blobs/ETAG,
    refs/main = COMMIT."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    for name, src in files.items():
        data = src.read_bytes()
        etag = _sha256(data) if name.endswith(".safetensors") else \
            hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        blob = repo / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, tiny) -> Path:
    """HF_HOME whose hub cache holds HUB_ID (the tiny model's HF weights and tokenizer)."""
    from huggingface_hub import scan_cache_dir

    from edge_tune import models

    hf_weights = models.dequantized_copy(tiny)
    home = tmp_path_factory.mktemp("hf_home")
    files = {f.name: f for f in hf_weights.iterdir()
             if f.is_file() and f.name != "edge_tune_source.json"}
    _hf_cache_put(home / "hub", HUB_ID, files)
    info = scan_cache_dir(home / "hub")  # huggingface_hub reads it as its own cache
    (repo,) = info.repos
    assert repo.repo_id == HUB_ID and "main" in next(iter(repo.revisions)).refs
    assert {f.file_name for f in next(iter(repo.revisions)).files} == set(files)
    return home


@pytest.fixture(scope="module")
def env(store, hf_home) -> dict:
    return {"OLLAMA_MODELS": str(store), "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}


# --- names and the store, in process --------------------------------------------------------

def test_ollama_names_are_parsed_as_ollama_does():
    p = ollama_store.parse_name
    assert p("ollama:tiny").manifest_parts == ("registry.ollama.ai", "library", "tiny", "latest")
    assert p("ollama:llama3.2:1b").display == "llama3.2:1b"
    assert p("ollama:user/name").manifest_parts == ("registry.ollama.ai", "user", "name",
                                                    "latest")
    assert p("ollama:user/name:q8").display == "user/name:q8"
    assert p("ollama:example.com/team/m:v1").display == "example.com/team/m:v1"
    for bad in ("ollama:", "ollama:a/b/c/d", "ollama:tiny:", "ollama:../x", "ollama:ns.x/m",
                "ollama:m@sha256-" + "0" * 64, "ollama:host:5000/ns/m", "ollama:a b"):
        with pytest.raises(EdgeTuneError, match="not an Ollama model name"):
            p(bad)


def test_find_returns_the_weights_blob_and_its_digest(store, tiny):
    env = {"OLLAMA_MODELS": str(store)}
    found = ollama_store.find("ollama:tiny", env)
    assert found.gguf.read_bytes() == tiny.read_bytes()
    assert found.digest == _sha256(tiny.read_bytes()) == found.gguf.name.split("-", 1)[1]
    assert found.name.display == "tiny:latest"
    assert found.layers[ollama_store.MEDIA_TEMPLATE][0].read_text() == GO_TEMPLATE
    assert ollama_store.find("ollama:user/tiny2:q8", env).gguf == found.gguf


def test_find_refuses_what_it_cannot_train_on(store, tmp_path):
    with pytest.raises(EdgeTuneError, match="no Ollama model store at"):
        ollama_store.find("ollama:tiny", {"OLLAMA_MODELS": str(tmp_path)})
    root = tmp_path / "models"  # a model created with an ADAPTER: its base is another model
    weights = {"mediaType": ollama_store.MEDIA_MODEL,
               **_ollama_blob(root, src=ollama_store.find("ollama:tiny", {
                   "OLLAMA_MODELS": str(store)}).gguf)}
    adapter = {"mediaType": ollama_store.MEDIA_ADAPTER, **_ollama_blob(root, b"GGUF lora")}
    _ollama_manifest(root, "tuned", [weights, adapter])
    with pytest.raises(EdgeTuneError, match="carries a LoRA adapter layer"):
        ollama_store.find("ollama:tuned", {"OLLAMA_MODELS": str(root)})


def test_a_cached_hub_id_is_a_model_only_with_all_its_weights(tmp_path, monkeypatch, hf_home):
    """A cache holding only a tokenizer (what `data inspect` on a hub ID downloads), or a
    sharded checkpoint with a shard missing, is not a model to train on."""
    from huggingface_hub import constants

    from edge_tune import models

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "tokenizer.json").write_text("{}")
    (src / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 8)
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    tok_only = _hf_cache_put(tmp_path, "org/tok-only", {n: src / n for n in
                                                        ("config.json", "tokenizer.json")})
    _hf_cache_put(tmp_path, "org/sharded", {f.name: f for f in src.iterdir()})
    assert models.hub_cache_snapshot("org/tok-only") is None
    assert models.hub_cache_snapshot("org/tok-only", complete=False) == tok_only
    assert models.hub_cache_snapshot("org/sharded") is None
    assert models.hub_cache_snapshot("org/absent", complete=False) is None
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    ref = models.resolve(HUB_ID)
    assert ref.hub_id == HUB_ID and (ref.hf_dir / "model.safetensors").is_file()
    with pytest.raises(EdgeTuneError, match="not a valid hub ID"):
        models.check_spec("org/na..me")


# --- through the CLI, offline ---------------------------------------------------------------

@pytest.fixture(scope="module")
def inspect_direct(env, tiny, demo_jsonl) -> dict:
    """`data inspect` through the tiny GGUF file itself (its "model" field left out)."""
    proc = run_cli("data", "inspect", str(demo_jsonl), "--model", str(tiny), "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report.pop("model") == str(tiny) and report["tokens_trained_within_seq_len"] > 0
    return report


def test_data_inspect_on_an_ollama_model_is_that_gguf(env, inspect_direct, demo_jsonl):
    """The report through ollama:tiny equals the one through the GGUF file itself."""
    proc = run_cli("data", "inspect", str(demo_jsonl), "--model", "ollama:tiny", "--json",
                   env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report.pop("model") == "ollama:tiny" and report == inspect_direct
    assert report["records"] > 0 and report["tokens_trained_within_seq_len"] > 0


def test_plan_on_a_cached_hub_id_reads_the_cache_offline(env, hf_home, demo_jsonl):
    """A hub ID in the cache plans exactly as its snapshot directory does, with no network."""
    args = ("--data", str(demo_jsonl), "--memory-gib", "8", "--backend", "cpu", "--json")
    by_id = run_cli("plan", "--model", HUB_ID, *args, env=env)
    assert by_id.returncode == 0, by_id.stderr
    snapshot = next((hf_home / "hub" / f"models--{HUB_ID.replace('/', '--')}" /
                     "snapshots").iterdir())
    by_dir = run_cli("plan", "--model", str(snapshot), *args, env=env)
    assert by_dir.returncode == 0, by_dir.stderr
    a, b = json.loads(by_id.stdout), json.loads(by_dir.stdout)
    assert a.pop("model") == HUB_ID and b.pop("model") == str(snapshot)
    assert a == b and a["backend"] == "cpu" and a["records"] > 0


def test_data_inspect_on_a_cached_hub_id(env, inspect_direct, demo_jsonl):
    """The cached HF copy of the tiny model tokenizes exactly as its GGUF does."""
    proc = run_cli("data", "inspect", str(demo_jsonl), "--model", HUB_ID, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report.pop("model") == HUB_ID and report == inspect_direct


@pytest.mark.parametrize("model, needles", [
    ("ollama:nope", ["nope:latest is not in Ollama's local store",
                     "manifests/registry.ollama.ai/library/nope/latest"]),
    ("ollama:broken", ["broken/latest:2: invalid JSON"]),
    ("ollama:noblob", ["sha256-" + "0" * 64, "is missing", "ollama pull noblob:latest"]),
    ("ollama:short", ["bytes where", "truncated"]),
    ("ollama:notgguf", ["not a GGUF file"]),
    ("ollama:a/b/c/d", ["not an Ollama model name"]),
    ("edge-tune-test/absent", ["not in the local Hugging Face cache",
                               "models--edge-tune-test--absent", "HF_HUB_OFFLINE"]),
])
def test_a_model_that_is_not_there_is_one_line(env, demo_jsonl, model, needles):
    proc = run_cli("plan", "--data", str(demo_jsonl), "--model", model, env=env)
    assert_one_line_error(proc, *needles)


def test_train_on_an_ollama_model_then_export_a_modelfile_from_it(env, store, tiny, demo_jsonl,
                                                                  tmp_path):
    """Offline: train on ollama:tiny; the run records the Ollama name and its adapter is for
    that blob; llama.cpp runs them; `export --ollama` writes FROM tiny:latest (Ollama already
    has the weights) plus the ADAPTER."""
    from edge_tune.converters.formats.base_info import field_value, open_gguf

    run = tmp_path / "run"
    proc = run_cli("train", "--data", str(demo_jsonl), "--model", "ollama:tiny",
                   "--max-steps", "2", "--batch-size", "2", "--seq-len", "64", "--backend",
                   "cpu", "--no-verify", "--out", str(run), env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    man = json.loads((run / "manifest.json").read_text())
    blob = ollama_store.find("ollama:tiny", {"OLLAMA_MODELS": str(store)}).gguf
    digest = _sha256(tiny.read_bytes())
    assert man["base"]["ollama"] == "tiny:latest"
    assert man["base"]["gguf"] == str(blob) and man["base"]["sha256"] == digest
    assert field_value(open_gguf(run / "adapter.gguf"), "edge_tune.base_sha256") == digest

    proc = run_cli("chat", "--adapter", str(run), "--prompt", "Hi", "--max-tokens", "4",
                   "--temperature", "0", env=env)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr

    out = tmp_path / "modelfile"
    proc = run_cli("export", str(run), "--ollama", str(out), env=env)
    assert proc.returncode == 0, proc.stderr
    lines = (out / "Modelfile").read_text().splitlines()
    assert "FROM tiny:latest" in lines and "ADAPTER ./adapter.gguf" in lines
    assert (out / "adapter.gguf").is_file()
    assert not (out / blob.name).exists()  # the base stays in Ollama's store
