"""One layer's causal attention on a CPU, forward and backward: SDPA against two batched products.

`gptlab.model` computes short causal contexts on a CPU as two batched products and a softmax
(`_attention_by_products`) and longer ones through PyTorch's SDPA (its flash kernel on a CPU); where
the line falls, per dtype, is `PRODUCTS_MAX_CONTEXT`. This script times both ways on the shapes that
decide it (char-small's and bpe-mini's layers, and longer contexts past the line), in rounds that
alternate them so that the machine's drift falls on both, and measures each way's error against a
float64 computation of the same attention (the largest error of the output and of q's gradient,
relative to their largest entry). Prints a table and writes
benchmarks/results/attention.json.

    .venv/bin/python benchmarks/attention.py
    .venv/bin/python benchmarks/attention.py --rounds 5 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gptlab.model import PRODUCTS_MAX_CONTEXT, _attention_by_products
from host import describe

RESULTS = Path(__file__).parent / "results" / "attention.json"

# (batch, heads, context, head width): char-small's and bpe-mini's layers, then contexts past the line
SHAPES = {
    torch.float32: [(12, 4, 64, 32), (8, 6, 128, 64), (8, 6, 256, 64)],
    torch.bfloat16: [(12, 4, 64, 32), (8, 6, 256, 64), (4, 6, 512, 64), (2, 12, 1024, 64)],
}
WAYS = {
    "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    "products": lambda q, k, v: _attention_by_products(q, k, v, 0.0),
}


def inputs(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """q, k, v and an output gradient, of scale 2 so that the softmax is not almost flat."""
    generator = torch.Generator().manual_seed(seed)
    return [(2 * torch.randn(shape, generator=generator)).to(dtype) for _ in range(4)]


def timed(way, tensors: list[torch.Tensor], steps: int) -> float:
    """Median seconds of `steps` forward-and-backward passes, after two untimed ones."""
    q, k, v = (t.clone().requires_grad_() for t in tensors[:3])
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        way(q, k, v).backward(tensors[3])
        if i >= 2:
            times.append(time.perf_counter() - start)
        q.grad = k.grad = v.grad = None
    return statistics.median(times)


def errors(way, tensors: list[torch.Tensor]) -> tuple[float, float]:
    """Largest absolute error of the output and of q's gradient against float64's, relative to the
    largest entry of float64's."""
    results = []
    for dtype in (tensors[0].dtype, torch.float64):
        q, k, v = (t.detach().to(dtype).requires_grad_() for t in tensors[:3])
        attend = way if dtype != torch.float64 else WAYS["sdpa"]
        out = attend(q, k, v)
        out.backward(tensors[3].to(dtype))
        results.append((out.double(), q.grad.double()))
    (out, grad), (exact_out, exact_grad) = results
    return tuple(((a - b).abs().max() / b.abs().max()).item() for a, b in ((out, exact_out), (grad, exact_grad)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15, help="timed passes of each way in each round")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"one layer's causal attention, forward and backward, {args.threads} threads, "
          f"median of {args.rounds} rounds x {args.steps} passes")  # fmt: skip
    print("| dtype | B, H, T, D | SDPA ms | products ms | products vs SDPA | gptlab takes | "
          "output error SDPA / products | q-gradient error SDPA / products |")  # fmt: skip
    print("|---|---|---:|---:|---:|---|---|---|")
    rows = []
    for dtype, shapes in SHAPES.items():
        for shape in shapes:
            tensors = inputs(shape, dtype, seed=len(rows))
            rounds = {name: [] for name in WAYS}
            for _ in range(args.rounds):
                for name, way in WAYS.items():
                    rounds[name].append(timed(way, tensors, args.steps))
            ms = {name: statistics.median(r) * 1000 for name, r in rounds.items()}
            error = {name: errors(way, tensors) for name, way in WAYS.items()}
            takes = "products" if shape[2] <= PRODUCTS_MAX_CONTEXT.get(dtype, 0) else "sdpa"
            row = {"dtype": str(dtype).removeprefix("torch."), "shape": list(shape), "ms": ms,
                   "speedup": ms["sdpa"] / ms["products"], "gptlab_takes": takes,
                   "out_error": {n: e[0] for n, e in error.items()},
                   "q_grad_error": {n: e[1] for n, e in error.items()}}  # fmt: skip
            rows.append(row)
            print(f"| {row['dtype']} | {', '.join(map(str, shape))} | {ms['sdpa']:.2f} | {ms['products']:.2f} | "
                  f"{row['speedup']:.2f}x | {takes} | {error['sdpa'][0]:.1e} / {error['products'][0]:.1e} | "
                  f"{error['sdpa'][1]:.1e} / {error['products'][1]:.1e} |", flush=True)  # fmt: skip
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "command": "benchmarks/attention.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "machine": describe(), "load_average": os.getloadavg(), "rows": rows,
    }, indent=1) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
