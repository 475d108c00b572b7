"""Where a run goes after training: Ollama (a Modelfile with Ollama's built-in RENDERER/PARSER
for the families it knows, then ``ollama create`` when Ollama is installed), LM Studio (the
merged GGUF in its models folder), PEFT (``RUN/adapter`` loads with ``PeftModel``) and mlx-lm
(an mlx run's ``RUN/mlx`` loads with mlx-lm's own ``load_adapters``).

The Modelfile tests write GGUFs that hold only what ``write_ollama`` reads (architecture,
vocabulary, chat template); the rest share one real two-step run on the tiny model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edge_tune.converters.integrations import ollama
from edge_tune.events import Log
from edge_tune.templates.builtin import BUILTIN
from tests.helpers.cli import run_cli


def _gguf(path: Path, arch: str, template: str) -> Path:
    """A GGUF with ``arch``, a ChatML vocabulary (EOS ``<|im_end|>``) and ``template``."""
    import gguf
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["<unk>", "<|im_start|>", "<|im_end|>", "a"])
    w.add_eos_token_id(2)
    w.add_chat_template(template)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _write(tmp_path: Path, arch: str, template: str) -> tuple[list[str], list[str]]:
    """(the Modelfile's lines, the messages) of write_ollama on such a GGUF."""
    from edge_tune.exporting.steps import write_ollama

    said: list[str] = []
    model = _gguf(tmp_path / "run" / "merged-f16.gguf", arch, template)
    path = write_ollama(tmp_path / "out", model, None, None, None,
                        lambda e: said.append(e.message) if isinstance(e, Log) else None)
    return path.read_text().splitlines(), said


CODER = BUILTIN["chatml"] + "{% if tools %}<tool_call>\n<function=name>{% endif %}"


@pytest.mark.parametrize("arch, template, want", [
    ("qwen3", BUILTIN["qwen3"], (None, "qwen3-thinking")),
    ("qwen3moe", CODER, ("qwen3-coder", "qwen3-coder")),
    ("qwen35", BUILTIN["chatml"], ("qwen3.5", "qwen3.5")),
    ("gpt-oss", "<|start|>{{ m }}<|end|>", (None, "harmony")),
    ("lfm2", BUILTIN["chatml"], ("lfm2", "lfm2")),
    ("gemma3", "<start_function_call>", ("functiongemma", "functiongemma")),
    ("llama", BUILTIN["llama3"], None),  # Ollama has neither for Llama 3: its TEMPLATE does it
    ("qwen3", BUILTIN["chatml"], None),  # no tool calls in the template: nothing to parse
])
def test_ollama_builtin_for_each_family(arch, template, want):
    got = ollama.builtin(arch, template)
    assert (got.renderer, got.parser) == want if want else got is None


def test_a_qwen3_modelfile_carries_its_parser_and_template(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no ollama here
    lines, said = _write(tmp_path, "qwen3", BUILTIN["qwen3"])
    assert "PARSER qwen3-thinking" in lines and not any(x.startswith("RENDERER") for x in lines)
    assert any(x.startswith('TEMPLATE """') for x in lines)  # the prompt is still the template's
    assert any(x.startswith("# note: Ollama has a Qwen3 parser") for x in lines)
    assert lines.index("PARSER qwen3-thinking") > lines.index("FROM ./merged-f16.gguf")
    assert any("PARSER qwen3-thinking" in m for m in said)
    assert any(m.startswith("--ollama: no `ollama` on PATH") and
               f"ollama create run -f {tmp_path / 'out' / 'Modelfile'}" in m for m in said)


def test_a_renderer_family_and_ollama_create(tmp_path, monkeypatch):
    """With an ``ollama`` on PATH (a script standing in for it, recording its arguments and
    folder), the Modelfile is created under the run's name."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "ollama"
    fake.write_text(f'#!/bin/sh\necho "$PWD $*" > {tmp_path / "ran"}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    lines, said = _write(tmp_path, "lfm2", BUILTIN["chatml"])
    assert lines[2:4] == ["RENDERER lfm2", "PARSER lfm2"]
    modelfile = tmp_path / "out" / "Modelfile"
    assert (tmp_path / "ran").read_text().split() == [str(tmp_path / "out"), "create", "run",
                                                      "-f", str(modelfile)]
    assert f"--ollama: running ollama create run -f {modelfile}" in said
    assert "--ollama: created run (ollama run run)" in said


# --- one real run: LM Studio, PEFT, mlx-lm -------------------------------------------------

def _mlx() -> bool:
    try:
        import mlx_lm  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def run(tiny, demo_jsonl, tmp_path_factory) -> Path:
    """Two steps on the tiny model, on mlx where mlx-lm is installed (its run also leaves the
    PEFT copy), else on the cpu."""
    out = tmp_path_factory.mktemp("targets") / "my-run"
    proc = run_cli("train", "--backend", "mlx" if _mlx() else "cpu", "--model", str(tiny),
                   "--data", str(demo_jsonl), "--max-steps", "2", "--batch-size", "2",
                   "--seq-len", "64", "--lr", "1e-2", "--no-verify", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_lmstudio_gets_the_merged_model_in_its_folder(run, tmp_path):
    home = tmp_path / "home"
    (home / ".lmstudio" / "models").mkdir(parents=True)
    proc = run_cli("export", str(run), "--lmstudio", "--no-verify",
                   env={"HOME": str(home), "EDGE_TUNE_LMSTUDIO_MODELS": ""})
    assert proc.returncode == 0, proc.stderr
    placed = home / ".lmstudio/models/edge-tune/my-run/my-run-F16.gguf"
    assert placed.read_bytes()[:4] == b"GGUF"
    assert placed.stat().st_size == (run / "merged-f16.gguf").stat().st_size
    assert f"--lmstudio: placed {placed}" in " ".join(proc.stderr.split())
    assert [p.name for p in placed.parent.iterdir()] == [placed.name]  # no temp file left


def test_lmstudio_and_vllm_together_is_one_line(run, tmp_path):
    proc = run_cli("export", str(run), "--lmstudio", "--vllm", str(tmp_path / "v"))
    assert proc.returncode == 2 and "give one" in proc.stderr and "Traceback" not in proc.stderr


def test_run_adapter_loads_with_peft_as_it_is(run, tiny_hf):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_hf), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(run / "adapter"))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.abs().sum()) > 0 for p in lora_b)  # trained, not zeros


def test_mlx_run_adapter_loads_with_mlx_lms_own_loader(run, tiny_hf):
    if not _mlx():
        pytest.skip("mlx-lm is not installed")
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import load_adapters
    import mlx.core as mx

    model, _ = load(str(tiny_hf))
    config = json.loads((run / "mlx" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["lora_parameters"]["rank"] > 0
    load_adapters(model, str(run / "mlx"))  # refuses tensors the LoRA layers do not have
    params = dict(tree_flatten(model.parameters()))
    saved = mx.load(str(run / "mlx" / "adapters.safetensors"))
    assert saved and all(mx.array_equal(params[k], v).item() for k, v in saved.items())
