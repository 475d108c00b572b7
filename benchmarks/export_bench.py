"""Export and merge on the default model: wall time and peak RSS, against the usual route.

Each job runs in a fresh Python process (peak RSS = that process's ru_maxrss), the jobs are
interleaved round by round, and the median is printed. The machine is shared and noisy: read
the ratios, not the absolute seconds.

Jobs, on a random r=16 adapter on all seven projections of SmolLM2-135M (Q4_1 GGUF base):
  adapter   edge-tune export            -> adapter GGUF (F32)
  merge-f32 edge-tune export --merge -q F32     (streamed, tensor by tensor)
  merge-q4  edge-tune export --merge -q Q4_K_M  (F32 merge, then llama.cpp's quantizer)
  peft      the usual route's merge step: transformers loads the (dequantized) model, PEFT
            merge_and_unload(), save_pretrained() — before any conversion to GGUF even starts

Usage: python benchmarks/export_bench.py [--rounds 3] [--run RUN_DIR]
With --run, the Q4_K_M merge of that run is verified and the numbers printed (README).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

_PRE = "import json, resource, time\nt0 = time.perf_counter()\n"
# Peak RSS: VmHWM of this process's own memory map (ru_maxrss would also carry the parent's
# peak across fork+exec on Linux); ru_maxrss where /proc is missing.
_POST = ("\ntry:\n    rss = int([ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')]"
         "[0].split()[1]) * 1024\nexcept OSError:\n"
         "    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
         "print(json.dumps({'seconds': time.perf_counter() - t0, 'rss': rss}))\n")

JOBS = {
    "adapter": "from edge_tune import api\napi.export({peft!r}, base={base!r}, out={out!r})",
    "merge-f32": "from edge_tune import api\napi.export({peft!r}, base={base!r}, out={out!r}, "
                 "merge=True, quant='F32')",
    "merge-q4": "from edge_tune import api\napi.export({peft!r}, base={base!r}, out={out!r}, "
                "merge=True, quant='Q4_K_M')",
    "peft": ("import torch\nfrom peft import PeftModel\n"
             "from transformers import AutoModelForCausalLM\n"
             "m = AutoModelForCausalLM.from_pretrained({hf!r}, dtype=torch.float32)\n"
             "m = PeftModel.from_pretrained(m, {peft!r}).merge_and_unload()\n"
             "m.save_pretrained({out!r})"),
}


def make_adapter(hf_dir: Path, dst: Path) -> None:
    """A random non-zero PEFT adapter with the default model's shapes (numpy only)."""
    import numpy as np
    from safetensors.numpy import save_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    h, f, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
              "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}
    rng = np.random.default_rng(0)
    tensors = {}
    for i in range(layers):
        for mod, (n_out, n_in) in shapes.items():
            part = "self_attn" if mod.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) \
                else "mlp"
            pre = f"base_model.model.model.layers.{i}.{part}.{mod}"
            tensors[f"{pre}.lora_A.weight"] = (rng.standard_normal((16, n_in)) * 0.02
                                               ).astype(np.float32)
            tensors[f"{pre}.lora_B.weight"] = (rng.standard_normal((n_out, 16)) * 0.02
                                               ).astype(np.float32)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    (dst / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": TARGETS,
         "base_model_name_or_path": str(hf_dir), "task_type": "CAUSAL_LM"}))


def run_job(name: str, **paths) -> dict:
    code = _PRE + JOBS[name].format(**paths) + _POST
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--run", type=Path, help="a run directory to verify a Q4_K_M merge of")
    args = ap.parse_args()

    from edge_tune import models

    base = models.default_gguf()
    hf = models.dequantized_copy(base)
    results: dict[str, list[dict]] = {k: [] for k in JOBS}
    with tempfile.TemporaryDirectory(prefix="export-bench-") as tmp:
        tmp = Path(tmp)
        peft = tmp / "peft"
        make_adapter(hf, peft)
        for r in range(args.rounds):
            for name in JOBS:  # interleaved: each round runs every job once
                out = tmp / f"{name}-{r}" / ("out" if name == "peft" else "out.gguf")
                results[name].append(run_job(name, peft=str(peft), base=str(base), out=str(out),
                                             hf=str(hf)))
                print(f"round {r + 1} {name:9s} {results[name][-1]['seconds']:6.1f} s  "
                      f"{results[name][-1]['rss'] / 2**20:6.0f} MiB", flush=True)
        f32_size = (tmp / "merge-f32-0" / "out.gguf").stat().st_size
        q4_size = (tmp / "merge-q4-0" / "out.gguf").stat().st_size
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("seconds", "rss")}
           for k, v in results.items()}
    print(f"\nmedian of {args.rounds} interleaved rounds (shared 2-core machine: noisy)")
    print(f"{'job':10s} {'wall s':>7s} {'peak RSS MiB':>13s} {'RSS / F32 size':>15s}")
    for k, m in med.items():
        print(f"{k:10s} {m['seconds']:7.1f} {m['rss'] / 2**20:13.0f} "
              f"{m['rss'] / f32_size:15.2f}")
    print(f"F32 file {f32_size / 2**20:.0f} MiB, Q4_K_M file {q4_size / 2**20:.0f} MiB")
    for k in ("merge-f32", "merge-q4"):
        print(f"{k} vs peft merge_and_unload+save: wall x{med[k]['seconds'] / med['peft']['seconds']:.2f}"
              f", peak RSS x{med[k]['rss'] / med['peft']['rss']:.2f}")
    if args.run:
        with tempfile.TemporaryDirectory(prefix="export-bench-") as tmp:
            out = Path(tmp) / "merged-q4_k_m.gguf"
            from edge_tune import api

            api.export(args.run, out=out, merge=True, quant="Q4_K_M")
            report = api.verify(args.run, merged=out)
            print("verify of the Q4_K_M merge:",
                  json.dumps({k: report.to_dict()[k] for k in (
                      "ok", "effect_rel_err", "top1_agreement", "mean_kl", "n_prompts",
                      "n_positions")}))
            for g in report.greedy:
                print(f"  torch: {g['torch']!r}\n  llama.cpp: {g['llama_cpp']!r}")


if __name__ == "__main__":
    main()
