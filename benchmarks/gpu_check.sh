#!/usr/bin/env bash
# The CUDA / Unsloth check, on an NVIDIA machine with a fresh checkout of edge-tune:
#
#   bash benchmarks/gpu_check.sh            # from the repository root, or any directory
#
# 1. makes a venv, installs a pinned CUDA build of torch, then edge-tune[cuda,run,test];
# 2. `edge-tune doctor` (must list the GPU and pick unsloth);
# 3. trains the default model with --backend unsloth for a fixed number of steps (train
#    exports adapter.gguf and runs its short parity check), exports again, chats, and runs
#    the full parity check (`edge-tune verify`);
# 4. benchmarks/hf_peft_cuda.py: Unsloth vs HF Trainer + PEFT (bf16 LoRA, bnb 4-bit QLoRA)
#    on the same run: tokens/s and peak VRAM, with ratios (target >= 1.8x at <= 0.6x);
# 5. with 2 or more GPUs: --nproc 1 vs --nproc N (DDP over NCCL, same global batch), the
#    scaling figure.
#
# Any failing step stops the script with its exit status. Settings (environment):
#   VENV=.venv-gpu  STEPS=60  OUT=runs/gpu-check  REPEATS=3
#   TORCH_VERSION=2.11.0  TORCHVISION_VERSION=0.26.0  TORCH_CUDA=cu128 (cu126 for drivers
#   older than 570; the pair is one Unsloth 2026.10.9 is built and tested against)
#   PYTHON=python3
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-gpu}
STEPS=${STEPS:-60}
OUT=${OUT:-runs/gpu-check}
REPEATS=${REPEATS:-3}
TORCH_VERSION=${TORCH_VERSION:-2.11.0}
TORCHVISION_VERSION=${TORCHVISION_VERSION:-0.26.0}
TORCH_CUDA=${TORCH_CUDA:-cu128}
PYTHON=${PYTHON:-python3}

step() { printf '\n== %s\n' "$*"; }
fail() { printf 'gpu_check: %s\n' "$*" >&2; exit 1; }

command -v nvidia-smi >/dev/null 2>&1 || fail "nvidia-smi not found: this check needs an NVIDIA GPU"
GPU=$(nvidia-smi --query-gpu=name,memory.total,compute_cap,driver_version \
    --format=csv,noheader | head -n 1)
[ -n "$GPU" ] || fail "nvidia-smi lists no GPU"
step "GPU: $GPU"

step "venv $VENV: torch $TORCH_VERSION ($TORCH_CUDA), then edge-tune[cuda,run,test]"
"$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
ET="$VENV/bin/edge-tune"
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" \
    --index-url "https://download.pytorch.org/whl/$TORCH_CUDA"
# The CUDA torch is installed first: an unpinned resolve could swap it for another build.
"$PY" -m pip install --quiet -e ".[cuda,run,test]"
"$PY" - <<'EOF'
import torch
assert torch.cuda.is_available(), "torch sees no CUDA device"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
EOF

step "edge-tune doctor"
"$ET" doctor
"$ET" doctor --json | "$PY" -c '
import json, sys
r = json.load(sys.stdin)
unsloth = {b["name"]: b for b in r["backends"]}["unsloth"]
assert r["hardware"]["cuda_gpus"], "doctor lists no CUDA GPU"
assert unsloth["available"], "unsloth not usable: " + unsloth["reason"]
assert r["auto"]["backend"] == "unsloth", r["auto"]
print("doctor: auto -> unsloth")'

step "CPU test suite of the unsloth backend (argument mapping, hygiene)"
"$PY" -m pytest -q tests/integration/test_unsloth_backend.py tests/unit/test_import_hygiene.py

step "train the default model: --backend unsloth, $STEPS steps -> $OUT"
rm -rf "$OUT"
"$ET" train --data edge_tune/assets/demo.jsonl --backend unsloth --max-steps "$STEPS" \
    --out "$OUT"
test -f "$OUT/adapter.gguf" || fail "no $OUT/adapter.gguf"
"$PY" - "$OUT" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1] + "/manifest.json"))
r, base = m["result"], m["base"]
assert m["backend"] == "unsloth", m["backend"]
print("trained on %s: %.0f tok/s, peak VRAM %.2f GiB, final loss %.3f; GGUF base %s (%s)" % (
    r.get("gpu"), r["tokens_per_second"], r.get("peak_vram_bytes", 0) / 2**30,
    r["final_loss"], base["gguf"], base.get("gguf_source")))
EOF

step "export"
"$ET" export "$OUT"

step "chat"
"$ET" chat --adapter "$OUT" --prompt "What do bees make?" --max-tokens 48

step "parity check: edge-tune verify"
"$ET" verify "$OUT"

step "Unsloth vs HF Trainer + PEFT (bf16 LoRA, bnb 4-bit), same run, $REPEATS interleaved rounds"
"$PY" benchmarks/hf_peft_cuda.py --steps "$STEPS" --repeats "$REPEATS" \
    --json "$OUT/hf_peft_cuda.json"

NGPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
if [ "$NGPU" -ge 2 ]; then
    step "scaling: --nproc 1 vs --nproc $NGPU (DDP over NCCL), same global batch"
    for N in 1 "$NGPU"; do
        rm -rf "$OUT-nproc$N"
        "$ET" train --data edge_tune/assets/demo.jsonl --backend unsloth --max-steps "$STEPS" \
            --batch-size 4 --grad-accum $((NGPU / N)) --nproc "$N" --no-verify \
            --out "$OUT-nproc$N"
    done
    "$PY" - "$OUT" "$NGPU" <<'EOF'
import json, sys
out, n = sys.argv[1], sys.argv[2]
one = json.load(open(f"{out}-nproc1/manifest.json"))["result"]
many = json.load(open(f"{out}-nproc{n}/manifest.json"))["result"]
print("1 GPU: %.0f tok/s; %s GPUs: %.0f tok/s (%.2fx); final loss %.4f vs %.4f" % (
    one["tokens_per_second"], n, many["tokens_per_second"],
    many["tokens_per_second"] / one["tokens_per_second"], one["final_loss"],
    many["final_loss"]))
EOF
fi

step "done on $GPU: numbers above and in $OUT/hf_peft_cuda.json"
