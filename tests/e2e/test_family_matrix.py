"""Every supported model family, its whole path, from the GGUF alone (as a user who downloaded
it): data inspect -> train (cpu; verify runs after training) -> chat -> serve -> export --merge
-q Q8_0 with an Ollama Modelfile -> verify of the merged file; mlx training where mlx-lm runs
the family.

The models are tests/helpers/tiny_families.py's: tiny random weights with each family's real config
quirks, tokenizer kind and chat template, converted by llama.cpp's own converter. What this
proves is the plumbing and the numbers (verify compares llama.cpp with torch+PEFT on every
run), not that a tiny random model learns anything. The README's support table is this file.

data inspect, train and export run through ``edge_tune.cli.main`` (the console script's entry
point) in this process: each would otherwise be a new interpreter importing torch again, per
family. chat and serve run as processes of their own, so the two answers compared come from
two separate llama.cpp processes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.cli import run_cli
from tests.helpers.cli import run_cli_in_process as cli

from tests.helpers.tiny_families import FAMILIES, family_gguf  # noqa: E402

pytestmark = pytest.mark.slow

DATA = [
    {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    for q, a in [("What is the capital of Japan?", "Tokyo."),
                 ("Name a fruit.", "An apple."),
                 ("What do bees make?", "Honey."),
                 ("Say hello.", "Hello there!"),
                 ("What is two plus two?", "Four."),
                 ("Name a colour.", "Blue.")]
]
# Small and quick: the point is that every step runs and agrees, not that it learns.
TRAIN = ["--max-steps", "12", "--batch-size", "2", "--seq-len", "64", "--rank", "4",
         "--alpha", "8", "--lr", "1e-2"]
# mlx-lm has no model class for these families' quirks (see docs/models.md).
MLX_FAMILIES = [f for f in FAMILIES if f not in ()]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in DATA))
    return path


def _ok(proc) -> str:
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    return proc.stdout


def _verified(proc) -> None:
    """train/export ran their verify step (llama.cpp vs torch+PEFT) and it passed."""
    said = proc.stdout + proc.stderr
    assert "verify: adapter effect error" in said and "(ok)" in said, said[-2000:]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_whole_path(family, data_file, tmp_path):
    gguf = family_gguf(family)
    report = json.loads(_ok(cli("data", "inspect", str(data_file), "--model", str(gguf),
                                "--seq-len", "64", "--json")))
    assert report["records"] == len(DATA) and report["tokens_trained"] > 0

    run = tmp_path / "run"
    trained = cli("train", "--data", str(data_file), "--model", str(gguf), "--backend", "cpu",
                  *TRAIN, "--out", str(run))
    _ok(trained)
    _verified(trained)
    man = json.loads((run / "manifest.json").read_text())
    assert man["adapter"]["gguf"] == "adapter.gguf"

    chat = run_cli("chat", "--adapter", str(run), "--prompt", "Name a fruit.",
                   "--temperature", "0", "--max-tokens", "6")
    # A random model may answer nothing printable: that is one line and exit 1, never an
    # empty answer with exit 0 (and never a hang: max_tokens holds).
    if chat.returncode == 1:
        assert chat.stderr.startswith("error: the answer is empty"), chat.stderr
        answer = ""
    else:
        answer = _ok(chat)
        assert answer.strip(), "an answer"

    from tests.helpers.serve_helpers import running_server

    import openai

    with running_server("--adapter", f"tuned={run}") as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                               timeout=300)
        reply = client.chat.completions.create(
            model="tuned", messages=[{"role": "user", "content": "Name a fruit."}],
            temperature=0, max_tokens=6)
        # The server and `chat --prompt` run the same tokens: the same greedy answer.
        assert reply.choices[0].message.content.strip() == answer.strip()

    merged = tmp_path / "merged-q8_0.gguf"
    exported = cli("export", str(run), "--merge", "-q", "Q8_0", "-o", str(merged),
                   "--ollama", str(tmp_path / "ollama"))
    _ok(exported)
    _verified(exported)  # the merged file, checked the same way
    modelfile = (tmp_path / "ollama" / "Modelfile").read_text()
    assert "FROM " in modelfile and "TEMPLATE" in modelfile


@pytest.mark.parametrize("family", MLX_FAMILIES)
def test_mlx_train_verifies(family, data_file, tmp_path):
    pytest.importorskip("mlx_lm")
    run = tmp_path / "run"
    trained = cli("train", "--data", str(data_file), "--model", str(family_gguf(family)),
                  "--backend", "mlx", *TRAIN, "--out", str(run))
    _ok(trained)
    _verified(trained)
