"""Full fine-tuning (``train --full``) on the cpu backend: every weight trains, the run saves HF
safetensors weights and a GGUF model made by llama.cpp's converter, and that model verifies,
chats and bundles like a merged export; ``plan --full`` shows LoRA and full side by side.

The tiny model is tests/helpers/tiny_families.py's Mistral: random weights with the real config quirks
that a full export must carry (an untied output layer, RoPE base 1e6, grouped-query
attention), its SentencePiece tokenizer and chat template, from the F32 GGUF alone as a user
has it. train, export, verify, plan, bundle and chat run in this process
(``edge_tune.cli.main``); serve runs as a process of its own.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from tests.helpers.cli import assert_one_line_error
from tests.helpers.cli import run_cli_in_process as cli

from tests.helpers.tiny_families import family_gguf  # noqa: E402

DATA = [
    {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    for q, a in [("What is the capital of Japan?", "Tokyo."),
                 ("Name a fruit.", "An apple."),
                 ("What do bees make?", "Honey."),
                 ("Say hello.", "Hello there!")]
]
# Enough steps at a high rate for a 0.14M-parameter model to learn the four answers by heart.
TRAIN = ["--full", "--max-steps", "30", "--batch-size", "4", "--seq-len", "64", "--lr", "3e-3",
         "--report-to", "none"]


def _ok(proc) -> str:
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("full-data") / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in DATA))
    return path


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, data_file):
    """(run directory, train's process) of a full fine-tuning run on the tiny Mistral."""
    run = tmp_path_factory.mktemp("full") / "run"
    proc = cli("train", "--data", str(data_file), "--model", str(family_gguf("mistral")),
               "--backend", "cpu", *TRAIN, "--out", str(run))
    _ok(proc)
    return run, proc


def test_a_full_run_trains_every_weight_and_records_its_kind(full_run):
    from safetensors import safe_open

    run, proc = full_run
    man = json.loads((run / "manifest.json").read_text())
    assert man["kind"] == "full"
    assert man["model"] == {"hf": "model", "gguf": "model.gguf", "quant": "F16"}
    assert "peft" not in man["adapter"] and not (run / "adapter").exists()
    losses = man["result"]["losses"]
    assert losses[-1] < losses[0] / 10, losses  # it learned the answers
    with safe_open(str(run / "model" / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        count = sum(_numel(f.get_slice(n).get_shape()) for n in names)
    assert "lm_head.weight" in names  # the untied output layer is trained and saved
    assert man["result"]["trainable_parameters"] == count
    said = proc.stdout + proc.stderr
    assert "verify: fine-tuning effect error" in said and "(ok)" in said, said[-2000:]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def test_the_full_model_verifies_exports_chats_and_bundles(full_run, data_file, tmp_path):
    run, _ = full_run
    report = json.loads(_ok(cli("verify", str(run), "--json")))
    # llama.cpp on the F32 export against torch on the trained weights, the same tokens
    assert report["ok"] and report["framework"] == "torch" and report["checked"] == "merged"
    # float rounding only (1e-6 to 1e-3 here): a wrong layout or scale would be O(1)
    assert report["effect_rel_err"] < 1e-2 and report["top1_agreement"] == 1.0
    assert all(g["torch"] == g["llama_cpp"] for g in report["greedy"]), report["greedy"]

    exported = cli("export", str(run), "-q", "Q8_0")
    _ok(exported)
    assert (run / "model-q8_0.gguf").is_file()
    assert "verify: fine-tuning effect error" in exported.stderr and "(ok)" in exported.stderr

    # chat takes the run like a merged model: its GGUF is the base, no adapter
    chat = cli("chat", "--adapter", str(run), "--prompt", "What is the capital of Japan?",
               "--temperature", "0", "--max-tokens", "8")
    assert "Tokyo." in _ok(chat)

    # serve takes it as the base (like a merged GGUF); as an adapter it is refused in one line
    import openai
    from tests.helpers.serve_helpers import running_server

    with running_server("--base", str(run)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                               timeout=120)
        reply = client.chat.completions.create(
            model="base", messages=[{"role": "user", "content": "Name a fruit."}],
            temperature=0, max_tokens=8)
    assert "An apple." in reply.choices[0].message.content
    assert_one_line_error(cli("serve", "--adapter", f"tuned={run}"), "full fine-tuning run",
                          f"--base {run}")

    # eval: the full model against its base, on what ships (llama.cpp)
    report = json.loads(_ok(cli("eval", str(run), "--data", str(data_file), "--max-tokens",
                                "8", "--json")))
    assert report["tuned"].endswith("model.gguf") and report["loss"]["tuned"] < 0.1
    assert report["scores"]["tuned"]["exact"] == 1.0 > report["scores"]["base"]["exact"]
    assert report["drift"]["n_prompts"] > 0

    bundle = tmp_path / "bundle"
    _ok(cli("bundle", str(run), "-o", str(bundle), "--no-wheels"))
    index = json.loads((bundle / "bundle.json").read_text())
    assert index["merged"] == "run" and index["adapters"] == {}
    answer = cli("chat", "--bundle", str(bundle), "--prompt", "What do bees make?",
                 "--temperature", "0", "--max-tokens", "8")
    assert "Honey." in _ok(answer)


def test_plan_full_shows_lora_and_full_side_by_side_on_the_default_model(demo_jsonl):
    report = json.loads(_ok(cli("plan", "--data", str(demo_jsonl), "--full", "--json")))
    lora, full = report["compare"]["lora"], report["compare"]["full"]
    assert 100e6 < full["trained_parameters"] < 200e6  # SmolLM2-135M: every weight
    assert lora["trained_parameters"] < full["trained_parameters"] / 20
    for part in ("weights", "gradients", "optimizer state"):
        assert full["parts_gib"][part] > lora["parts_gib"][part], part
    assert full["parts_gib"]["optimizer state"] == pytest.approx(
        2 * full["parts_gib"]["gradients"], rel=1e-3)  # AdamW: two moments per weight
    assert full["peak_gib"] > lora["peak_gib"]
    assert full["output_gib"]["gguf"] > 10 * lora["output_gib"]["gguf"]
    assert full["seconds_per_step"] > lora["seconds_per_step"]
    from rich.console import Console

    from edge_tune.render.plan import render_plan

    console = Console(width=120, record=True, file=io.StringIO())
    render_plan(report, console)  # what `plan --full` prints, from the same report
    table = console.export_text()
    assert "LoRA (r=16)" in table and "full" in table and "optimizer state" in table


def test_full_lowers_the_default_learning_rate_only():
    from edge_tune.config import FULL_LR, build

    assert build(data="x.jsonl", full=True).lr == FULL_LR
    assert build(data="x.jsonl", full=True, lr=1e-4).lr == 1e-4  # given: kept
    assert build(data="x.jsonl").lr == 1e-3


@pytest.mark.parametrize("extra, needle", [
    (["--rank", "8"], "--rank"),
    (["--dora"], "--dora"),
    (["--target-modules", "q_proj"], "--target-modules"),
    (["--method", "dpo"], "--method dpo"),
])
def test_lora_only_settings_are_refused_with_full(data_file, extra, needle):
    assert_one_line_error(cli("train", "--data", str(data_file), "--full", *extra), needle,
                          "--full")


def test_a_full_run_that_cannot_fit_is_refused_before_loading(demo_jsonl, tmp_path):
    proc = cli("train", "--data", str(demo_jsonl), "--full", "--memory-gib", "1", "--out",
               str(tmp_path / "run"))
    # Progress lines may come first; the refusal itself is one line, exit 2, no traceback.
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --full: full fine-tuning needs"), last
    assert "gradients" in last and "optimizer state" in last and "drop --full" in last
    assert not (tmp_path / "run").exists()


def test_a_cancelled_full_run_resumes_to_the_end(data_file, tmp_path):
    import threading

    from edge_tune import api
    from edge_tune.config import build
    from edge_tune.errors import EdgeTuneError
    from edge_tune.events import Metric

    out, cancel = tmp_path / "run", threading.Event()
    cfg = build(None, data=str(data_file), out=str(out), model=str(family_gguf("mistral")),
                full=True, max_steps=6, batch_size=2, seq_len=64, lr=3e-3, verify=False,
                report_to="none")

    def on_event(event):
        if isinstance(event, Metric) and event.split == "train" and event.step == 2:
            cancel.set()

    with pytest.raises(EdgeTuneError) as info:
        api.train(cfg, on_event, cancel=cancel)
    assert info.value.exit_code == 130 and "--resume" in str(info.value)
    state = api.resume_state(out)
    assert state is not None and 2 <= state["step"] < 6  # every weight and AdamW's moments
    resumed: list[Metric] = []
    result = api.train(None, lambda e: isinstance(e, Metric) and resumed.append(e), resume=out)
    assert [m.step for m in resumed if m.split == "train"] == list(range(state["step"] + 1, 7))
    assert result.manifest.kind == "full" and (out / "model.gguf").is_file()
    assert not (out / "checkpoint").exists()
