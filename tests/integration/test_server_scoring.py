"""Benchmarks and retrieval against `edge-tune serve`: ``/v1/completions`` with ``echo`` and
prompt logprobs (exact against the engine's own logits), lm-evaluation-harness's
``local-completions`` model on a task in local files (the same scores as lm-eval's own HF
backend on the same weights), and ``/v1/embeddings`` through the official ``openai`` client.

One server on the tiny random F32 llama (tests/conftest.py ``tiny``) with a strong random
adapter; its dequantized HF copy (``tiny_hf``) holds the very same weights for the HF side."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import openai
import pytest
from tests.helpers.serve_helpers import http_json, one_llama_thread, running_server
from tests.helpers.tiny_models import tiny_adapter

pytest.importorskip("llama_cpp")

TASKS = Path(__file__).resolve().parents[1] / "data" / "lm_eval"
PROMPT = "The quick brown fox jumps over the lazy dog. Bees make honey, and"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    return tiny_adapter(tmp_path_factory.mktemp("scoring") / "t.gguf")


@pytest.fixture(scope="module")
def server(tiny, adapter):
    with one_llama_thread(), running_server("--base", str(tiny), "--ctx", "512",
                                            "--adapter", f"t={adapter}") as srv:
        yield srv


def _post(server, path: str, body: dict) -> tuple[int, dict]:
    return http_json("POST", server.url + path, json.dumps(body).encode(),
                     {"Content-Type": "application/json"})


def _engine_logprobs(tiny, adapter, model: str, prompt: str) -> tuple[list, np.ndarray]:
    """(token ids, log-softmax of every position) from a logits_all engine in this process,
    under the adapter when ``model`` is "t"."""
    from edge_tune.llama.engine import Engine

    with Engine(tiny, n_ctx=512, logits_all=True, threads=1) as eng:
        if model == "t":
            eng.activate(eng.add_adapter(adapter, "t"))
        ids = eng.tokenize(prompt)
        x = eng.logits(ids).astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    return ids, x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


@pytest.mark.parametrize("model", ["base", "t"])
def test_echo_logprobs_are_the_engines_own(server, tiny, adapter, model):
    status, out = _post(server, "/v1/completions", {
        "model": model, "prompt": PROMPT, "echo": True, "max_tokens": 0, "logprobs": 3})
    assert status == 200, out
    choice = out["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert "".join(lp["tokens"]) == PROMPT
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(len(lp["tokens"]))]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ids, ref = _engine_logprobs(tiny, adapter, model, PROMPT)
    assert len(lp["tokens"]) == len(ids) == out["usage"]["prompt_tokens"]
    want = [ref[i - 1, ids[i]] for i in range(1, len(ids))]
    # the scoring context decodes by the engine's own rule: the same floats
    assert np.abs(np.array(lp["token_logprobs"][1:]) - want).max() < 1e-9
    for i, top in enumerate(lp["top_logprobs"][1:], start=1):
        assert len(top) == 3
        assert max(top.values()) == pytest.approx(ref[i - 1].max(), abs=1e-9)
        assert lp["token_logprobs"][i] <= max(top.values())

    # an answer after the echo: the prompt's entries stay, the answer's follow
    status, more = _post(server, "/v1/completions", {
        "model": model, "prompt": PROMPT, "echo": True, "max_tokens": 2, "logprobs": 1,
        "temperature": 0})
    assert status == 200, more
    lp2 = more["choices"][0]["logprobs"]
    assert more["choices"][0]["text"].startswith(PROMPT)
    assert "".join(lp2["tokens"]) == more["choices"][0]["text"]
    assert lp2["token_logprobs"][:len(ids)] == lp["token_logprobs"]
    assert len(lp2["tokens"]) == len(ids) + more["usage"]["completion_tokens"]


def _stops_early(src: Path, dst: Path) -> Path:
    """A copy of the tiny model that often ends its answer at once: the final norm weighs
    one dimension 300x the others, and the end-of-sequence token's (tied) embedding points
    along it, so wherever that dimension is positive the likeliest next token is EOS."""
    from edge_tune.converters.formats.base_info import (copy_fields, field_value, open_gguf,
                                                        writing_gguf)

    reader = open_gguf(src)
    eos = int(field_value(reader, "tokenizer.ggml.eos_token_id"))
    with writing_gguf(dst, field_value(reader, "general.architecture")) as w:
        copy_fields(reader, w)
        for t in reader.tensors:
            data = np.array(t.data, dtype=np.float32).reshape(tuple(reversed(t.shape.tolist())))
            if t.name == "output_norm.weight":
                data[:] = 0.1
                data[0] = 30.0
            elif t.name == "token_embd.weight":
                data[eos, :] = 0.0
                data[eos, 0] = 5.0
            w.add_tensor(t.name, data)
    return dst


def test_echo_lists_the_end_token_that_stops_a_greedy_answer(tiny, tmp_path):
    """lm-eval's local-completions asks for one token after the echo and drops the last
    entry: when the greedy answer ends at once, the end-of-generation token is listed, so
    that the continuation's last token is not the one dropped."""
    from edge_tune.llama.engine import Engine

    gguf = _stops_early(tiny, tmp_path / "stops.gguf")
    words = "fox dog bee sun tree rain stone bird cloud river".split()
    with Engine(gguf, n_ctx=256, logits_all=True, threads=1) as eng:
        eos = eng.llm.token_eos()
        prompt = next(p for p in (f"The {a} and the {b}" for a in words for b in words)
                      if eng.logits(eng.tokenize(p))[-1].argmax() == eos)
        n = len(eng.tokenize(prompt))
    with one_llama_thread(), running_server("--base", str(gguf), "--ctx", "256") as srv:
        status, out = _post(srv, "/v1/completions", {
            "model": "base", "prompt": prompt, "echo": True, "max_tokens": 1, "logprobs": 1,
            "temperature": 0})
    assert status == 200, out
    choice = out["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == prompt and choice["finish_reason"] == "stop"
    assert len(lp["tokens"]) == n + 1 and lp["text_offset"][-1] == len(prompt)
    assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())
    assert out["usage"]["completion_tokens"] == 0


def test_echo_bad_requests(server):
    for body, param in [
            ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),  # 0 needs echo
            ({"prompt": "hi", "echo": True, "stream": True}, "echo"),
            ({"prompt": "hi", "echo": "yes"}, "echo"),
            ({"prompt": "hi " * 600, "echo": True, "max_tokens": 0, "logprobs": 1}, "prompt")]:
        status, out = _post(server, "/v1/completions", {"model": "base", **body})
        assert status == 400 and out["error"]["param"] == param, out
    # echo without logprobs: the prompt comes back before the answer
    status, out = _post(server, "/v1/completions", {"model": "base", "prompt": "Hello",
                                                    "echo": True, "max_tokens": 2})
    assert status == 200 and out["choices"][0]["text"].startswith("Hello")
    assert out["choices"][0]["logprobs"] is None


def _task_config() -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(TASKS / "tiny_mc.yaml")
    cfg["dataset_kwargs"]["data_files"]["test"] = str(TASKS / "tiny_mc.jsonl")
    return cfg


def test_lm_eval_local_completions_equals_its_hf_backend(server, tiny_hf, tmp_path,
                                                        monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed "
                                          "(pip install 'edge-tune[test]')")
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    import lm_eval
    from lm_eval.tasks import TaskManager

    cfg = _task_config()
    manager = TaskManager(include_defaults=False)  # lm-eval's own ~10k YAMLs: not needed
    hf = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tiny_hf},dtype=float32",
                                 tasks=[cfg], task_manager=manager, device="cpu",
                                 log_samples=True)
    name = cfg["task"]
    for tokenized in (False, True):  # prompts sent as text, or as token ids
        served = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=f"base_url={server.url}/v1/completions,model=base,"
                       f"tokenizer_backend=huggingface,tokenizer={tiny_hf},"
                       f"tokenized_requests={tokenized}",
            tasks=[cfg], task_manager=manager, log_samples=True)
        assert served["results"][name]["acc,none"] == hf["results"][name]["acc,none"]
        pairs = [(a["resps"], b["resps"]) for a, b in zip(hf["samples"][name],
                                                          served["samples"][name])]
        assert len(pairs) == 6
        for want, got in pairs:
            for (w,), (g,) in zip(want, got):
                # llama.cpp's BF16 KV cache against torch's F32: a relative 1e-3 at most
                assert g[0] == pytest.approx(w[0], rel=1e-3), (tokenized, want, got)


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                         timeout=120)


def test_embeddings_openai_client(server):
    client = _client(server)
    texts = ["The quick brown fox", "Bees make honey.", "The quick brown fox"]
    got = client.embeddings.create(model="base", input=texts, encoding_format="float")
    assert [d.index for d in got.data] == [0, 1, 2]
    assert all(d.object == "embedding" for d in got.data)
    vecs = np.array([d.embedding for d in got.data])
    assert vecs.shape == (3, 64)  # the tiny model's hidden size
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0)
    assert got.usage.prompt_tokens == got.usage.total_tokens > 0
    # deterministic: the same text, in the same request, alone, or asked again
    assert vecs[0].tolist() == vecs[2].tolist()
    alone = client.embeddings.create(model="base", input=texts[1], encoding_format="float")
    assert alone.data[0].embedding == vecs[1].tolist()
    assert not np.allclose(vecs[0], vecs[1])
    # the client's default is base64 (float32), which it decodes itself
    packed = client.embeddings.create(model="base", input=texts)
    assert np.array_equal(np.array([d.embedding for d in packed.data], dtype=np.float32),
                          vecs.astype(np.float32))
    status, raw = _post(server, "/v1/embeddings", {"model": "base", "input": "hi",
                                                   "encoding_format": "base64"})
    assert status == 200 and len(base64.b64decode(raw["data"][0]["embedding"])) == 64 * 4
    ids = client.embeddings.create(model="base", input=[[504, 2365, 8493]],
                                   encoding_format="float")
    assert len(ids.data[0].embedding) == 64


def test_embeddings_bad_requests(server):
    for body, status, param in [
            ({"model": "t", "input": "hi"}, 400, "model"),  # an adapter: base only
            ({"model": "nope", "input": "hi"}, 404, "model"),
            ({"model": "base", "input": ""}, 400, "input[0]"),
            ({"model": "base", "input": []}, 400, "input"),
            ({"model": "base", "input": [[10 ** 9]]}, 400, "input[0]"),
            ({"model": "base", "input": "hi", "encoding_format": "int8"}, 400,
             "encoding_format"),
            ({"model": "base", "input": "hi", "dimensions": 8}, 400, "dimensions"),
            ({"model": "base", "input": "hi " * 700}, 400, "input")]:
        got, out = _post(server, "/v1/embeddings", body)
        assert got == status and out["error"]["param"] == param, (body, out)
