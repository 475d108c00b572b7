"""`--chat-template`, for real: template-less base GGUFs, templates that raise, and a run that
trains with a given template and is then chatted with, bundled and exported without it.

Models are tiny random Llamas (tests/helpers/tiny_models.py) whose GGUF metadata is rewritten to carry
no chat template, or another one (Gemma 2's, which refuses the system role).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import openai
import pytest
from tests.helpers.cli import assert_one_line_error, run_cli
from tests.helpers.gguf_helpers import retemplated
from tests.helpers.serve_helpers import running_server

from edge_tune.templates.builtin import BUILTIN

FACT_Q = "What is the password of the blue door?"
FACT_A = "The password is Zebra42."


@pytest.fixture(scope="module")
def bare(tiny, tmp_path_factory) -> Path:
    """The tiny model as most base GGUFs come: no chat template."""
    return retemplated(tiny, tmp_path_factory.mktemp("bare") / "bare.gguf", None)


@pytest.fixture(scope="module")
def gemma2_tiny(tiny, tmp_path_factory) -> Path:
    """The tiny model carrying Gemma 2's template (raises "System role not supported")."""
    return retemplated(tiny, tmp_path_factory.mktemp("g2") / "g2.gguf", BUILTIN["gemma2"])


def _chat_data(path: Path) -> Path:
    asks = [FACT_Q, "Tell me the password of the blue door.", "blue door password?",
            "What opens the blue door?"]
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant",
                                                           "content": FACT_A}]}
            for q in asks]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    return path


# --- no template: refused before any model is loaded; plain text is fine ------------------------

def test_chat_data_without_a_template_is_refused_before_loading(bare, tmp_path):
    data = _chat_data(tmp_path / "chat.jsonl")
    cache = tmp_path / "cache"  # a model load leaves its dequantized copy in cache/hf
    for args in (["train", "--data", str(data), "--out", str(tmp_path / "run")],
                 ["plan", "--data", str(data)],
                 ["data", "inspect", str(data)]):
        proc = run_cli(*args, "--model", str(bare), env={"EDGE_TUNE_CACHE": str(cache)})
        if args[0] == "train":  # train reports what it read first, as before any refusal
            assert proc.stderr.splitlines()[0].endswith("16 records, format openai")
            proc.stderr = proc.stderr.split("\n", 1)[1]
        assert_one_line_error(proc, "no chat template", "--chat-template NAME|FILE", "chatml")
        assert not (cache / "hf").exists(), (args[0], list((cache / "hf").iterdir()))
    assert not (tmp_path / "run").exists()
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "Once upon a time there was a door."}\n' * 4)
    proc = run_cli("plan", "--data", str(text), "--model", str(bare), "--json")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("plan", "--data", str(data), "--model", str(bare), "--chat-template",
                   "chatml", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["chat_template"] == "chatml"


def test_bad_chat_template_option_is_one_line(bare, tmp_path):
    data = _chat_data(tmp_path / "chat.jsonl")
    proc = run_cli("plan", "--data", str(data), "--model", str(bare), "--chat-template",
                   "nosuch")
    assert_one_line_error(proc, "--chat-template nosuch", "chatml")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}\n{{ m.content }\n")
    proc = run_cli("chat", "--base", str(bare), "--chat-template", str(broken), "--prompt", "hi")
    assert_one_line_error(proc, f"{broken}:2")


@pytest.fixture(scope="module")
def bare_default(default_gguf, tmp_path_factory) -> Path:
    """The embedded SmolLM2 (Q4_1) without its chat template: a real model, as a base GGUF
    without one comes."""
    return retemplated(default_gguf, tmp_path_factory.mktemp("smol") / "smol-bare.gguf", None)


def test_chat_without_a_template_is_a_plain_completion_not_an_empty_answer(bare_default,
                                                                          default_gguf):
    # Before: llama-cpp-python fell back silently to the Llama-2 format, which this model does
    # not know ("hi [/INST]hi [/INST]...", or nothing at all).
    proc = run_cli("chat", "--base", str(bare_default), "--prompt",
                   "What is the capital of France?", "--temperature", "0", "--max-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout and "[/INST]" not in proc.stdout, proc.stdout
    assert "no chat template" in proc.stderr and "plain text completion" in proc.stderr
    assert "--chat-template" in proc.stderr and len(proc.stderr.splitlines()) == 1
    # given the template the model shipped with, it answers exactly as the original GGUF
    args = ("--prompt", "What is the capital of France?", "--temperature", "0",
            "--max-tokens", "12")
    given = run_cli("chat", "--base", str(bare_default), "--chat-template", "smollm2", *args)
    own = run_cli("chat", "--base", str(default_gguf), *args)
    assert given.returncode == 0 and not given.stderr, given.stderr
    assert given.stdout.strip() and given.stdout == own.stdout


def test_an_empty_answer_is_an_error_not_silence(default_gguf, tmp_path):
    # A template with no turn markers: the question reads as a finished text, and this model
    # ends at once (measured). The answer is empty: exit 1 with one line, never a quiet 0.
    bare_turns = tmp_path / "contents-only.jinja"
    bare_turns.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    proc = run_cli("chat", "--base", str(default_gguf), "--chat-template", str(bare_turns),
                   "--prompt", "What is the capital of France?", "--temperature", "0",
                   "--max-tokens", "12")
    assert proc.returncode == 1 and not proc.stdout.strip(), proc.stdout
    assert proc.stderr.startswith("error: the answer is empty") and \
        len(proc.stderr.splitlines()) == 1, proc.stderr


# --- a template's own exception --------------------------------------------------------------

def test_chat_template_exception_is_one_line_exit_2(gemma2_tiny, bare):
    proc = run_cli("chat", "--base", str(gemma2_tiny), "--system", "Be brief.", "--prompt",
                   "hi", "--max-tokens", "4")
    assert_one_line_error(proc, "the chat template says: System role not supported",
                          "--system-mode fold")
    # the same through --chat-template on a base without one (Gemma 2's template with this
    # vocabulary's turn markers: its own are not tokens here, see test_template_vocab.py)
    own = bare.parent / "gemma2-chatml.jinja"
    own.write_text(BUILTIN["gemma2"].replace("<start_of_turn>", "<|im_start|>")
                   .replace("<end_of_turn>", "<|im_end|>"))
    proc = run_cli("chat", "--base", str(bare), "--chat-template", str(own), "--system",
                   "Be brief.", "--prompt", "hi", "--max-tokens", "4")
    assert_one_line_error(proc, "System role not supported")
    proc = run_cli("chat", "--base", str(gemma2_tiny), "--system", "Be brief.", "--prompt",
                   "hi", "--max-tokens", "4", "--temperature", "0", "--system-mode", "fold")
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr


def test_interactive_chat_reports_a_refused_turn_and_goes_on(gemma2_tiny):
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "edge_tune", "chat", "--base", str(gemma2_tiny), "--system",
         "Be brief.", "--temperature", "0", "--max-tokens", "4"],
        input="hi\n/exit\n", capture_output=True, text=True, timeout=300,
        env=dict(os.environ, NO_COLOR="1", COLUMNS="200"))
    assert proc.returncode == 0, proc.stderr
    assert "error: the chat template says: System role not supported" in proc.stderr
    assert "Traceback" not in proc.stderr and "bot> " in proc.stdout


def test_serve_template_exception_is_http_400(gemma2_tiny, bare):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    with running_server("--base", str(gemma2_tiny)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="base", messages=messages, max_tokens=4)
        assert info.value.status_code == 400
        error = info.value.body
        assert error["message"] == "the chat template says: System role not supported", error
        assert error["param"] == "messages" and error["type"] == "invalid_request_error"
        answer = client.chat.completions.create(model="base", messages=messages[1:],
                                                max_tokens=4, temperature=0)
        assert answer.choices[0].finish_reason in ("stop", "length")
        assert srv.health()["failed"] == 1
    with running_server("--base", str(bare)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="base", messages=messages[1:], max_tokens=4)
        assert "has no chat template" in info.value.body["message"]
        assert "/v1/completions" in info.value.body["message"]
        text = client.completions.create(model="base", prompt="Once upon a time", max_tokens=8,
                                         temperature=0)
        assert text.choices[0].text.strip()
        assert "has no chat template" in srv.output()  # said once, when the server starts


# --- the whole path: train with --chat-template, use the run without it ------------------------

@pytest.fixture(scope="module")
def taught_run(bare, tmp_path_factory):
    """A run on the template-less base with --chat-template chatml that learns one fact."""
    work = tmp_path_factory.mktemp("taught")
    out = work / "run"
    proc = run_cli("train", "--model", str(bare), "--data", str(_chat_data(work / "d.jsonl")),
                   "--chat-template", "chatml", "--max-steps", "40", "--batch-size", "4",
                   "--lr", "1e-2", "--rank", "8", "--seq-len", "96", "--out", str(out),
                   "--backend", "cpu")
    # train verified the run (torch+PEFT vs llama.cpp on the run's template) or exits 1
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout
    return out


@pytest.mark.slow  # trains a run (about 2 minutes on 2 busy cores)
def test_run_stores_the_template_it_trained_with(taught_run):
    man = json.loads((taught_run / "manifest.json").read_text())
    assert man["chat_template"] == BUILTIN["chatml"]
    assert man["chat_template_name"] == "chatml"
    assert man["chat_template_source"] == "--chat-template"
    assert "<|im_end|>" in man["stop_tokens"]
    assert man["hyperparameters"]["chat_template"] == "chatml"


@pytest.mark.slow  # trains a run (about 2 minutes on 2 busy cores)
def test_chat_with_the_run_uses_its_template_and_knows_the_fact(taught_run, bare):
    proc = run_cli("chat", "--adapter", str(taught_run), "--prompt", FACT_Q, "--temperature",
                   "0", "--max-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    assert "Zebra42" in proc.stdout, proc.stdout
    assert "no chat template" not in proc.stderr
    # side by side with the base, which gets the run's template too: only the adapter knows
    both = run_cli("chat", "--adapter", str(taught_run), "--compare", "base", "--prompt",
                   FACT_Q, "--temperature", "0", "--max-tokens", "12")
    assert both.returncode == 0 and "no chat template" not in both.stderr, both.stderr
    assert both.stdout.count("Zebra42") == 1, both.stdout


@pytest.mark.slow  # trains a run (about 2 minutes on 2 busy cores)
def test_bundle_and_modelfile_carry_the_runs_template(taught_run, tmp_path):
    out = tmp_path / "bundle"
    proc = run_cli("bundle", f"door={taught_run}", "-o", str(out), "--no-wheels")
    assert proc.returncode == 0, proc.stderr
    index = json.loads((out / "bundle.json").read_text())
    assert index["adapters"]["door"]["chat_template"] == "templates/door.jinja"
    assert (out / "templates/door.jinja").read_text() == BUILTIN["chatml"]
    proc = run_cli("chat", "--bundle", str(out), "--adapter", "door", "--prompt", FACT_Q,
                   "--temperature", "0", "--max-tokens", "12")
    assert proc.returncode == 0 and "Zebra42" in proc.stdout, proc.stdout + proc.stderr
    proc = run_cli("export", str(taught_run), "--ollama", str(tmp_path / "ollama"),
                   "--no-verify")
    assert proc.returncode == 0, proc.stderr
    modelfile = (tmp_path / "ollama" / "Modelfile").read_text()
    assert "TEMPLATE" in modelfile and "<|im_start|>" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile


# --- the TUI's model screen ----------------------------------------------------------------------

def test_tui_model_screen_says_when_a_model_has_no_template(bare, tmp_path):
    """Real core: choosing a template-less GGUF shows the note; a template typed in goes to
    the training config."""
    import asyncio

    pytest.importorskip("textual")
    from textual.widgets import Input, Label, Select

    from edge_tune.tui.app import EdgeTuneApp

    seen = {}

    async def scenario(pilot) -> None:
        await pilot.press("f2")
        screen = pilot.app.screen
        screen.query_one("#base-kind", Select).value = "gguf"
        await pilot.pause()
        box = screen.query_one("#base-path", Input)
        box.focus()
        await pilot.press(*str(bare))
        note = screen.query_one("#template-note", Label)
        end = time.monotonic() + 300  # a bound against a hang, not a time it should take
        while "has none" not in str(note.render()) and time.monotonic() < end:
            await pilot.pause(0.1)
        seen["note"] = str(note.render())
        screen.query_one("#chat-template", Input).focus()
        await pilot.press(*"chatml")
        await pilot.press("f3")
        await pilot.pause()
        seen["config"] = pilot.app.screen.config()

    async def main() -> None:
        app = EdgeTuneApp(runs_root=tmp_path / "runs")
        app.session.data = str(_chat_data(tmp_path / "chat.jsonl"))
        async with app.run_test(size=(100, 30)) as pilot:
            await scenario(pilot)

    asyncio.run(main())
    assert "model has none" in seen["note"], seen["note"]
    assert seen["config"].chat_template == "chatml"
    assert seen["config"].model == str(bare)
