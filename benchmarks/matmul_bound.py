"""The bf16 matmul bound of this machine for training one model: GFLOP/s and a tokens/s ceiling.

    python benchmarks/matmul_bound.py [--hf-dir DIR] [--tokens 1024] [--threads N] [--json]

A training step of a transformer is almost all matrix multiplication, so the speed at which
this CPU multiplies bf16 matrices *of the model's own shapes* caps how many tokens per second
any trainer can reach here. This script measures that speed and turns it into that cap.

What is timed: every ``nn.Linear`` of the model (found on the meta device from its
``config.json``, so any family works, output layer included), each as the three products of a
training step at ``--tokens`` rows (the tokens of one batch): forward ``X W^T`` (tokens x in x
out), input gradient ``G W`` and weight gradient ``G^T X``, bf16 inputs and output as under
``torch.autocast``, on ``--threads`` torch threads. Each product is run until 0.2 s have
passed, fastest run kept (so other work on the machine lowers it less than it lowers a
trainer's tok/s: a trainer may then show more than 100 % of the bound); GFLOP/s = the sum of
2*m*k*n over all layers / the sum of their times, over all three products (the 6N ceiling) and
over forward and input gradient only (the 4N ceiling: what a frozen base runs).
A plain 2048^3 bf16 product is timed too, as the figure usually quoted for a machine.

From GFLOP/s to tokens/s: training costs about ``6 N`` FLOPs per token, N = the parameters that
take part in matmuls (the blocks' linear layers and the output layer; the embedding lookup is
free). Source: Kaplan et al. 2020, "Scaling Laws for Neural Language Models", section 2.1 and
Table 1: the forward pass is ``2 N`` (one multiply and one add per parameter per token) and the
backward pass twice that (input gradient ``2 N`` + weight gradient ``2 N``); attention scores add
``2 n_layer n_ctx d_model`` per token forward, under 2 % at 256 tokens for a 576-wide model and
left out. LoRA with a frozen base skips the base's weight gradients, so its own work is nearer
``4 N`` (plus the adapters' small ``6 N_lora``): the ``4 N`` ceiling is printed beside the ``6 N``
one, and a LoRA trainer may pass the ``6 N`` figure without beating the machine. Neither counts
the recomputation of gradient checkpointing or logits skipped at prompt positions.

Output (``--json``): ``{"gflops": model mix, "gflops_frozen": forward + input gradient,
"gflops_2048": square, "n_matmul_params": N,
"tokens": rows, "ceiling_6n": tok/s, "ceiling_4n": tok/s, "threads": n}``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter


def linear_shapes(hf_dir: str) -> Counter:
    """(in_features, out_features) -> how many such ``nn.Linear`` the model has (meta device:
    nothing is allocated; tied output layers count once, as the matmul they are)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(hf_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return Counter((m.in_features, m.out_features) for m in model.modules()
                   if isinstance(m, torch.nn.Linear))


def _fastest(fn, budget: float = 0.2) -> float:
    """Seconds of the fastest call of ``fn`` over ``budget`` seconds (one call to warm up)."""
    fn()
    best, spent = float("inf"), 0.0
    while spent < budget:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
    return best


def measure(shapes: Counter, tokens: int) -> dict:
    """bf16 GFLOP/s over the training products of ``shapes`` at ``tokens`` rows, and of a
    2048^3 product. Uses torch's current thread count."""
    import torch

    flops = [0.0, 0.0]  # forward + input gradient; weight gradient
    seconds = [0.0, 0.0]
    g = torch.Generator().manual_seed(0)
    for (k, n), count in shapes.items():
        x = torch.randn(tokens, k, generator=g).bfloat16()
        w = torch.randn(n, k, generator=g).bfloat16()
        grad = torch.randn(tokens, n, generator=g).bfloat16()
        for kind, fn in ((0, lambda: torch.nn.functional.linear(x, w)),  # forward
                         (0, lambda: grad @ w),  # input gradient
                         (1, lambda: grad.t() @ x)):  # weight gradient
            flops[kind] += count * 2 * tokens * k * n
            seconds[kind] += count * _fastest(fn)
    a = torch.randn(2048, 2048, generator=g).bfloat16()
    square = 2 * 2048**3 / _fastest(lambda: a @ a)
    return {"gflops": sum(flops) / sum(seconds) / 1e9,
            "gflops_frozen": flops[0] / seconds[0] / 1e9, "gflops_2048": square / 1e9}


def bound(hf_dir: str, tokens: int, threads: int) -> dict:
    """The measured matmul speed and the tokens/s ceilings it implies (see the module doc)."""
    import torch

    torch.set_num_threads(threads)
    shapes = linear_shapes(hf_dir)
    n_params = sum(count * k * n for (k, n), count in shapes.items())
    speed = measure(shapes, tokens)
    return {**speed, "n_matmul_params": n_params, "tokens": tokens, "threads": threads,
            "ceiling_6n": speed["gflops"] * 1e9 / (6 * n_params),
            "ceiling_4n": speed["gflops_frozen"] * 1e9 / (4 * n_params)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf-dir", help="an HF model directory (default: the embedded default "
                   "model, dequantized)")
    p.add_argument("--tokens", type=int, default=1024, help="rows of each product (tokens of "
                   "one batch)")
    p.add_argument("--threads", type=int, help="torch threads (default: physical cores)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = p.parse_args()
    hf_dir = args.hf_dir
    threads = args.threads
    if hf_dir is None or threads is None:
        from edge_tune import hardware, models

        hf_dir = hf_dir or str(models.dequantized_copy(models.default_gguf()))
        threads = threads or hardware.probe().physical_cores
    r = bound(hf_dir, args.tokens, threads)
    if args.json:
        print(json.dumps(r))
        return
    print(f"{r['threads']} threads, {r['tokens']} tokens per product, "
          f"N = {r['n_matmul_params'] / 1e6:.1f}M matmul parameters")
    print(f"bf16 matmul, the model's shapes: {r['gflops']:.0f} GFLOP/s, forward and input "
          f"gradient only {r['gflops_frozen']:.0f} (2048^3: {r['gflops_2048']:.0f} GFLOP/s)")
    print(f"training ceiling: {r['ceiling_6n']:.0f} tok/s at 6N FLOPs/token, "
          f"{r['ceiling_4n']:.0f} tok/s at 4N (frozen-base LoRA)")


if __name__ == "__main__":
    main()
