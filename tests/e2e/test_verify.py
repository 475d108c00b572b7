"""``verify``: torch+PEFT against llama.cpp on a real trained run, and two broken conversions
it must catch (a tampered alpha; an rsLoRA adapter converted as if it were plain LoRA)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import pytest
from tests.helpers.cli import assert_one_line_error, run_cli
from tests.helpers.gguf_helpers import write_adapter


@pytest.fixture(scope="session")
def run_dir(default_model_run):
    """The session's one real training run (conftest.default_model_run); ``train`` verified it
    on its held-back validation records."""
    out, proc = default_model_run
    assert "verify: adapter effect error" in proc.stderr and "(ok)" in proc.stderr, proc.stderr
    return out


def _verify_json(run, *extra):
    proc = run_cli("verify", str(run), "--json", "--prompts", "2", *extra)
    return proc, (json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else None)


def _copy_run(run_dir, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


def _rewrite_alpha(adapter: Path, alpha: float) -> None:
    r = gguf.GGUFReader(str(adapter))
    tensors = {t.name: t.data.reshape(tuple(reversed([int(x) for x in t.shape]))).copy()
               for t in r.tensors}
    write_adapter(adapter, r.fields["general.architecture"].contents(), tensors, alpha=alpha)


def test_verify_passes_on_a_real_run(run_dir):
    proc, report = _verify_json(run_dir)
    assert proc.returncode == 0, proc.stderr
    print(json.dumps({k: v for k, v in report.items() if k != "greedy"}))
    assert report["ok"] and report["checked"] == "adapter"
    assert report["effect_rel_err"] < 0.03
    assert report["top1_agreement"] >= 0.85 and report["mean_kl"] <= 0.1
    assert report["n_prompts"] == 2 and report["n_positions"] > 20
    assert all(g["prompt"] and "torch" in g and "llama_cpp" in g for g in report["greedy"])


def test_verify_fails_on_a_tampered_alpha(run_dir, tmp_path):
    run = _copy_run(run_dir, tmp_path)
    alpha = gguf.GGUFReader(str(run / "adapter.gguf")).fields["adapter.lora.alpha"].contents()
    _rewrite_alpha(run / "adapter.gguf", alpha * 2)
    proc, report = _verify_json(run)
    assert proc.returncode == 1, proc.stderr
    assert not report["ok"] and report["effect_rel_err"] > 0.5
    assert "alpha" in report["failures"][0]
    text = run_cli("verify", str(run), "--prompts", "1")
    assert text.returncode == 1 and "out of tolerance" in text.stdout


def test_verify_tells_rslora_converted_right_from_as_plain_lora(run_dir, tmp_path):
    """The same weights declared rsLoRA (scale alpha/sqrt(r)): the right conversion passes,
    the one that ignores use_rslora fails."""
    from edge_tune.converters.formats import base_info, peft_to_gguf

    run = _copy_run(run_dir, tmp_path)
    cfg_path = run / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["use_rslora"] = True
    cfg_path.write_text(json.dumps(cfg))
    base = base_info.from_gguf(json.loads((run / "manifest.json").read_text())["base"]["gguf"])
    plan = peft_to_gguf.convert(run / "adapter", base, run / "adapter.gguf")
    assert plan.alpha == pytest.approx(cfg["lora_alpha"] * cfg["r"] ** 0.5)
    proc, report = _verify_json(run)
    assert proc.returncode == 0 and report["ok"], proc.stdout + proc.stderr

    _rewrite_alpha(run / "adapter.gguf", float(cfg["lora_alpha"]))  # as if plain LoRA
    proc, report = _verify_json(run)
    assert proc.returncode == 1 and not report["ok"]
    assert report["effect_rel_err"] > 0.5


def test_merged_q4_k_m_export_verifies(run_dir, tmp_path):
    """`export --merge` verifies by default; `verify --merged` reports on the file."""
    out = tmp_path / "merged-q4_k_m.gguf"
    proc = run_cli("export", str(run_dir), "--merge", "--quant", "Q4_K_M", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "verify: adapter effect error" in proc.stderr and "(ok)" in proc.stderr
    proc, report = _verify_json(run_dir, "--merged", str(out))
    assert proc.returncode == 0, proc.stderr
    print("Q4_K_M merged:", json.dumps({k: v for k, v in report.items() if k != "greedy"}))
    assert report["checked"] == "merged" and report["effect_rel_err"] < 0.03


def test_verify_needs_a_run_directory(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    assert_one_line_error(run_cli("verify", str(tmp_path)), "run directory")
    assert_one_line_error(run_cli("verify", str(tmp_path / "nope")), "nope")
