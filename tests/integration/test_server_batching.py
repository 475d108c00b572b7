"""The serving engine's prompt cache and adapter sets, on a tiny random model (hidden 64).

The project's guarantee: a greedy answer equals a fresh-context answer (`chat --prompt`) token
for token, whatever was asked before and under whichever adapters. These tests compare a
warm engine (prompt cache on, adapter sets switched back and forth) with a cold one (context
reset before every answer), and count the prompt tokens evaluated, not wall time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers.gguf_helpers import write_adapter  # noqa: E402
from tests.helpers.tiny_models import tiny_llama_gguf  # noqa: E402

CONVERSATION = ["What is the capital of France?", "And of Italy?", "Which one is older?",
                "Say it in one word."]
MIXES = [(), (("a", 1.0),), (("b", 1.0),), (("a", 0.7), ("b", 0.3))]


def _tiny_adapter(path: Path, seed: int) -> Path:
    """A random r=4 LoRA on every block's q and ffn_up: strong enough to change answers."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for b in range(2):
        tensors[f"blk.{b}.attn_q.weight.lora_a"] = rng.normal(size=(4, 64)) * 0.3
        tensors[f"blk.{b}.attn_q.weight.lora_b"] = rng.normal(size=(64, 4)) * 0.3
        tensors[f"blk.{b}.ffn_up.weight.lora_a"] = rng.normal(size=(4, 64)) * 0.3
        tensors[f"blk.{b}.ffn_up.weight.lora_b"] = rng.normal(size=(128, 4)) * 0.3
    return write_adapter(path, "llama", tensors, alpha=4.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, default_gguf):
    root = tmp_path_factory.mktemp("batching")
    base = tiny_llama_gguf(root / "tiny.gguf", default_gguf)
    return {"base": base, "a": _tiny_adapter(root / "a.gguf", 1),
            "b": _tiny_adapter(root / "b.gguf", 2)}


def _engine(tiny, **kw):
    from edge_tune.llama.engine import Engine

    engine = Engine(tiny["base"], n_ctx=1024, threads=1, **kw)
    engine.add_adapter(tiny["a"], "a")
    engine.add_adapter(tiny["b"], "b")
    return engine


def _answer(engine, mix, messages):
    engine.activate_mix(mix)
    pieces = list(engine.generate(messages=messages, temperature=0, max_tokens=16))
    return "".join(p.text for p in pieces), pieces[-1]


def test_prompt_cache_reuses_the_prefix_per_adapter_set_and_changes_no_answer(tiny):
    """Four conversations, one per adapter set (base, a, b, a 0.7 + b 0.3), asked turn by turn
    in turns: every answer equals the cold engine's, the four sets answer differently, and
    from turn 2 on each set's previous prompt comes from its cache (saved and restored
    across the switches), so only the new tokens are evaluated."""
    warm, cold = _engine(tiny), _engine(tiny, prompt_cache=False)
    try:
        history = {mix: [] for mix in MIXES}
        last_prompt = {mix: 0 for mix in MIXES}
        for question in CONVERSATION:
            answers = set()
            for mix in MIXES:
                messages = history[mix] + [{"role": "user", "content": question}]
                got, last = _answer(warm, mix, messages)
                want, _ = _answer(cold, mix, messages)
                assert got == want, (mix, question)
                assert last.cached_tokens >= last_prompt[mix], (mix, question)
                last_prompt[mix] = last.prompt_tokens
                history[mix] = messages + [{"role": "assistant", "content": got}]
                answers.add(got)
            assert len(answers) == len(MIXES), answers  # a cache of another set would show
    finally:
        warm.close()
        cold.close()


def test_the_same_prompt_twice_is_served_from_the_cache(tiny):
    engine = _engine(tiny)
    try:
        messages = [{"role": "user", "content": CONVERSATION[0]}]
        first, one = _answer(engine, (), messages)
        again, two = _answer(engine, (), messages)
        assert again == first
        assert one.cached_tokens == 0 and two.cached_tokens == two.prompt_tokens - 2
    finally:
        engine.close()


def test_a_removed_adapter_takes_its_cache_along(tiny):
    from edge_tune.errors import EdgeTuneError

    engine = _engine(tiny)
    try:
        messages = [{"role": "user", "content": CONVERSATION[0]}]
        _answer(engine, (("a", 1.0),), messages)
        with pytest.raises(EdgeTuneError, match="active"):
            engine.remove_adapter("a")
        _answer(engine, (), messages)
        engine.remove_adapter("a")
        with pytest.raises(EdgeTuneError, match="not loaded"):
            engine.activate_mix((("a", 1.0),))
        assert not any(name == "a" for key in engine._saved for name, _ in key)
    finally:
        engine.close()


# --- the server: prompt cache, adapter mixes, adapters added and removed while serving ---------

def _cold_answer(tiny, mix, messages, extra: dict | None = None) -> str:
    """What `chat --prompt` computes: a fresh engine, context reset, greedy."""
    from edge_tune.llama.engine import Engine

    with Engine(tiny["base"], n_ctx=1024, threads=1, prompt_cache=False) as engine:
        for name, path in {"a": tiny["a"], "b": tiny["b"], **(extra or {})}.items():
            engine.add_adapter(path, name)
        return _answer(engine, mix, messages)[0]


@pytest.fixture(scope="module")
def server(tiny):
    from tests.helpers.serve_helpers import one_llama_thread, running_server

    with one_llama_thread(), running_server("--base", str(tiny["base"]), "--adapter",
                                            f"a={tiny['a']}", "--adapter",
                                            f"b={tiny['b']}", "--ctx", "1024") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=300)


def _chat(client, messages, model="base", **kw):
    resp = client.chat.completions.create(model=model, messages=messages, temperature=0,
                                          max_tokens=16, **kw)
    return resp.choices[0].message.content, resp.usage


def test_turn_n_evaluates_only_the_new_tokens(server, client, tiny):
    """Asked at once after the previous answer: its decoded KV entries are reused as they
    are (decoded rows equal block rows, batch_rows), and the answer is still the cold one."""
    messages, previous = [], 0
    for question in CONVERSATION[:3]:
        messages.append({"role": "user", "content": question})
        before = server.health()
        answer, usage = _chat(client, messages, "a")
        after = server.health()
        assert after["prompt_tokens"] - before["prompt_tokens"] == usage.prompt_tokens
        cached = after["prompt_tokens_cached"] - before["prompt_tokens_cached"]
        # the previous prompt and the previous answer's tokens (all but the last sampled)
        assert cached >= previous if previous else cached == 0, (cached, previous)
        assert answer == _cold_answer(tiny, (("a", 1.0),), messages)
        previous = usage.prompt_tokens + usage.completion_tokens - 1
        messages.append({"role": "assistant", "content": answer})
    assert previous > 0


def test_interleaved_conversations_each_find_their_own_cache(server, client):
    """Two conversations on one adapter, turns alternating: each turn goes to the slot that
    holds its own conversation (the most leading messages shared), not the most recent."""
    talks = {"x": [], "y": []}
    previous = {"x": 0, "y": 0}
    for question in CONVERSATION[:3]:
        for name in ("x", "y"):
            messages = talks[name]
            messages.append({"role": "user", "content": f"{name}: {question}"})
            before = server.health()
            answer, usage = _chat(client, messages, "a")
            cached = server.health()["prompt_tokens_cached"] - before["prompt_tokens_cached"]
            assert cached >= previous[name], (name, cached, previous[name])
            previous[name] = usage.prompt_tokens + usage.completion_tokens - 1
            messages.append({"role": "assistant", "content": answer})


def test_a_mixed_request_equals_the_engine_with_those_scales(client, tiny):
    messages = [{"role": "user", "content": CONVERSATION[0]}]
    mix = [{"name": "a", "scale": 0.7}, {"name": "b", "scale": 0.3}]
    got, _ = _chat(client, messages, extra_body={"adapters": mix})
    assert got == _cold_answer(tiny, (("a", 0.7), ("b", 0.3)), messages)
    assert got not in {_chat(client, messages, m)[0] for m in ("base", "a", "b")}


def test_bad_mixes_are_400_or_404(client):
    import openai

    messages = [{"role": "user", "content": "hi"}]
    for mix, error in [([{"name": "a", "scale": "x"}], openai.BadRequestError),
                       ([{"name": "a"}, {"name": "a"}], openai.BadRequestError),
                       ([{"name": "base"}], openai.BadRequestError),
                       ("a", openai.BadRequestError),
                       ([{"name": "nope"}], openai.NotFoundError)]:
        with pytest.raises(error):
            _chat(client, messages, extra_body={"adapters": mix})


def test_adapters_added_and_removed_while_serving(server, client, tiny, tmp_path):
    from tests.helpers.serve_helpers import http_json

    def post(body: dict):
        import json

        return http_json("POST", server.url + "/v1/adapters", json.dumps(body).encode(),
                         {"Content-Type": "application/json"})

    messages = [{"role": "user", "content": CONVERSATION[1]}]
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(tiny["a"].read_bytes()[:5000])
    status, body = post({"name": "broken", "path": str(corrupt)})
    assert status == 400 and body["error"]["code"] == "invalid_adapter", body
    assert [m.id for m in client.models.list()] == ["base", "a", "b"]
    assert _chat(client, messages, "a")[0] == _cold_answer(tiny, (("a", 1.0),), messages)

    c = _tiny_adapter(tmp_path / "c.gguf", 3)
    assert post({"name": "c", "path": str(c)})[0] == 201
    assert post({"name": "c", "path": str(c)})[0] == 400  # the name is taken
    assert [m.id for m in client.models.list()] == ["base", "a", "b", "c"]
    got = _chat(client, messages, "c")[0]
    assert got == _cold_answer(tiny, (("c", 1.0),), messages, {"c": c})

    status, _ = http_json("DELETE", server.url + "/v1/adapters/c")
    assert status == 200
    assert http_json("DELETE", server.url + "/v1/adapters/c")[0] == 404
    import openai

    with pytest.raises(openai.NotFoundError):
        _chat(client, messages, "c")
    assert _chat(client, messages, "b")[0] == _cold_answer(tiny, (("b", 1.0),), messages)


def test_admin_routes_refused_without_a_key_off_loopback():
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from edge_tune.server.adapter_admin import admin_routes

    app = Starlette(routes=admin_routes(None, ["base"], None, api_key=None, loopback=False))
    with TestClient(app) as http:
        resp = http.post("/v1/adapters", json={"name": "x", "path": "/etc/passwd"})
        assert resp.status_code == 403 and resp.json()["error"]["code"] == "admin_disabled"
        assert http.delete("/v1/adapters/x").status_code == 403


# --- continuous batching on the default model: batched answers equal single answers ------------

BATCH_TOKENS = 16
MIX = (("pirate", 0.7), ("anti", 0.3))


@pytest.fixture(scope="module")
def batching(tmp_path_factory):
    """The server on the default model with two real adapters (8 sequences of 512 tokens),
    and the single-request engine the references come from: the same plan, one sequence,
    no prompt cache (what `chat --prompt` runs)."""
    from tests.helpers.serve_helpers import one_llama_thread, running_server, trained_adapters

    from edge_tune.api import open_serving, plan_serving

    adapters = trained_adapters()
    specs = [f"pirate={adapters['pirate']}", f"anti={adapters['anti']}"]
    with one_llama_thread(), running_server(*[a for s in specs for a in ("--adapter", s)],
                                            "--ctx", "512", "--parallel", "8") as srv:
        engine = open_serving(plan_serving(specs), n_ctx=512, threads=1, prompt_cache=False)
        try:
            yield srv, engine
        finally:
            engine.close()


def _single(engine, mix, *, prompt=None, messages=None, max_tokens=BATCH_TOKENS) -> str:
    engine.activate_mix(mix)
    return "".join(p.text for p in engine.generate(messages=messages, prompt=prompt,
                                                   temperature=0, max_tokens=max_tokens))


def _openai(srv):
    import openai

    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0,
                         timeout=600)


def test_concurrent_greedy_answers_equal_single_answers(batching):
    """Eight concurrent clients (base, an adapter, the other, a 0.7/0.3 mix; two prompts
    each) decoded in batches: every answer equals the single-request engine's, token for
    token, and the server did decode several sequences in one step."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.helpers.serve_helpers import PROMPTS

    srv, engine = batching
    client = _openai(srv)
    models = {"base": (), "pirate": (("pirate", 1.0),), "anti": (("anti", 1.0),), "mix": MIX}
    jobs = [(m, p) for p in PROMPTS[:2] for m in models]

    def ask(job):
        model, prompt = job
        extra = {"adapters": [{"name": n, "scale": s} for n, s in MIX]} if model == "mix" \
            else None
        resp = client.chat.completions.create(
            model="base" if model == "mix" else model, temperature=0, max_tokens=BATCH_TOKENS,
            messages=[{"role": "user", "content": prompt}], extra_body=extra)
        return resp.choices[0].message.content

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = dict(zip(jobs, pool.map(ask, jobs)))
    for (model, prompt), answer in got.items():
        want = _single(engine, models[model], messages=[{"role": "user", "content": prompt}])
        assert answer == want, (model, prompt)
    assert len({got[(m, PROMPTS[0])] for m in models}) == len(models)  # cross-talk shows
    assert srv.health()["max_batch"] >= 2


def _stream_completion(srv, prompt: str, max_tokens: int):
    """A streamed /v1/completions request: (connection, response) with status 200."""
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=600)
    conn.request("POST", "/v1/completions", json.dumps(
        {"model": "base", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
         "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    return conn, resp


def _read_text(resp, chunks: int | None = None) -> str:
    """Concatenated text of the next ``chunks`` content chunks (None: to the end)."""
    import json

    text, seen = [], 0
    while chunks is None or seen < chunks:
        line = resp.readline()
        if not line or line.strip() == b"data: [DONE]":
            break
        if line.startswith(b"data: {"):
            choice = json.loads(line[6:])["choices"]
            if choice and choice[0].get("text"):
                text.append(choice[0]["text"])
                seen += 1
    return "".join(text)


COUNT = "1, 2, 3, 4, 5,"  # a completion that never ends by itself


def test_a_request_joins_a_running_decode(batching):
    """A long streamed answer is running; a second request arrives, joins it between two
    steps and is answered while the first is still generating; both equal their single
    answers."""
    srv, engine = batching
    before = srv.health()
    conn, resp = _stream_completion(srv, COUNT, 48)
    try:
        head = _read_text(resp, 1)
        messages = [{"role": "user", "content": "Name a fruit."}]
        joined = _openai(srv).chat.completions.create(
            model="base", messages=messages, temperature=0,
            max_tokens=6).choices[0].message.content
        during = srv.health()
        rest = _read_text(resp)
    finally:
        conn.close()
    assert during["served"] - before["served"] == 1  # the joiner, not the long answer
    assert joined == _single(engine, (), messages=messages, max_tokens=6)
    assert head + rest == _single(engine, (), prompt=COUNT, max_tokens=48)


def test_a_cancelled_sequence_leaves_the_batch(batching):
    """Two long answers decode together; one client hangs up: its sequence stops (counted
    as cancelled) and the other answer is unchanged."""
    import time

    srv, engine = batching
    before = srv.health()
    gone_conn, gone = _stream_completion(srv, COUNT, 200)
    kept_conn, kept = _stream_completion(srv, "The days of the week are", 32)
    try:
        _read_text(gone, 2)
        gone_conn.sock.shutdown(2)
        gone_conn.close()
        text = _read_text(kept)
    finally:
        kept_conn.close()
    assert text == _single(engine, (), prompt="The days of the week are", max_tokens=32)
    end = time.monotonic() + 120
    while time.monotonic() < end:  # the state is polled, not waited for
        now = srv.health()
        if now["cancelled"] > before["cancelled"] and not now["busy"]:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the cancelled sequence kept decoding: {now}")
    assert now["tokens_generated"] - before["tokens_generated"] < 150, now
