"""``train`` on HF weights that llama.cpp's converter rejects is refused before training, in
one line naming the converter's reason: an adapter of such a model could not be chatted with,
served or verified here.

The model: a tiny Qwen2 config carrying SmolLM2's byte-level BPE tokenizer. For a qwen2 config
transformers swaps in its Qwen2 pre-tokenizer, so the tokenizer's hash is one llama.cpp's
converter does not know ("BPE pre-tokenizer was not recognized").
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.helpers.cli import run_cli_in_process as cli


def _qwen2_with_smollm2_tokenizer(dst: Path, hf_dir: Path) -> Path:
    import torch
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2)
    config.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(str(dst))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (hf_dir / name).is_file():
            shutil.copy(hf_dir / name, dst / name)
    return dst


def test_train_refuses_a_model_llama_cpp_cannot_convert_before_training(hf_dir, demo_jsonl,
                                                                         tmp_path):
    model = _qwen2_with_smollm2_tokenizer(tmp_path / "qwen2-smollm2-tok", hf_dir)
    out = tmp_path / "run"
    proc = cli("train", "--data", str(demo_jsonl), "--model", str(model), "--out", str(out),
               "--max-steps", "1")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --model {model}: llama.cpp cannot run this model"), last
    assert "nothing trained" in last and "BPE pre-tokenizer was not recognized" in last, last
    assert "step 1" not in proc.stderr + proc.stdout  # refused before training
    assert not out.exists()
