"""Training-step speed and memory: gptlab against transformers' GPT-2 on the same shapes, same machine, same run.

Each (shape, implementation, precision) runs in its own subprocess so its peak memory is its own; a
step is forward, loss, backward, AdamW step and zero_grad, as in the training loop. Prints a table
(median tokens/s over the timed steps, ratio to transformers fp32, MFU against the measured fp32
matmul rate, peak RSS) and writes benchmarks/results/train_speed.json.

    .venv/bin/python benchmarks/train_speed.py            # char-small and bpe-mini, 30 timed steps
    .venv/bin/python benchmarks/train_speed.py --steps 10 --shapes char-small
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    # name: (preset fields, batch size)
    "char-small": (dict(n_layer=4, n_head=4, n_embd=128, context_length=64, vocab_size=65), 12),
    "bpe-mini": (dict(n_layer=6, n_head=6, n_embd=384, context_length=256, vocab_size=50257), 8),
}
RUNS = [("transformers", "fp32"), ("gptlab", "fp32"), ("gptlab", "bf16")]
RESULTS = Path(__file__).parent / "results" / "train_speed.json"


def build(impl: str, fields: dict):
    import torch

    torch.manual_seed(0)
    if impl == "transformers":
        import transformers

        config = transformers.GPT2Config(
            vocab_size=fields["vocab_size"], n_positions=fields["context_length"], n_embd=fields["n_embd"],
            n_layer=fields["n_layer"], n_head=fields["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

        def loss_fn(x, y):
            return model(input_ids=x, labels=y).loss  # transformers shifts the labels itself

        return model, optimizer, loss_fn, True
    from gptlab.config import GPTConfig, TrainConfig
    from gptlab.model import GPT
    from gptlab.train import build_optimizer

    model = GPT(GPTConfig(**fields, dropout=0.0))
    optimizer = build_optimizer(model, TrainConfig(learning_rate=1e-4), torch.device("cpu"))
    return model, optimizer, lambda x, y: model(x, y), False


def measure(impl: str, precision: str, shape: str, steps: int, warmup: int) -> dict:
    """One configuration, in this process: median step time, tokens/s and peak memory."""
    import torch

    from gptlab.train import configure_threads, cpu_has_bf16, measure_peak_flops, resolve_autocast

    threads = configure_threads(0)
    fields, batch = SHAPES[shape]
    autocast_dtype = resolve_autocast(precision, torch.device("cpu")) if precision == "bf16" else None
    if precision == "bf16" and autocast_dtype is None:
        return {"skipped": "this CPU has no bf16 units (AMX / AVX-512 BF16): bf16 autocast falls back to fp32"}
    model, optimizer, loss_fn, labels_are_inputs = build(impl, fields)
    model.train()
    T, V = fields["context_length"], fields["vocab_size"]
    generator = torch.Generator().manual_seed(0)
    data = torch.randint(0, V, (steps + warmup, batch, T + 1), generator=generator)
    times, losses = [], []
    for i in range(steps + warmup):
        x = data[i, :, :T]
        y = x if labels_are_inputs else data[i, :, 1:]
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = loss_fn(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        losses.append(loss.item())
        if i >= warmup:
            times.append(elapsed)
    from gptlab.config import GPTConfig
    from gptlab.sizing import train_flops_per_token

    median = statistics.median(times)
    tokens_per_second = batch * T / median
    fp32_peak = measure_peak_flops(torch.device("cpu"), None)
    return {
        "tokens_per_second": tokens_per_second,
        "median_step_s": median,
        "mfu_vs_fp32_matmul": tokens_per_second * train_flops_per_token(GPTConfig(**fields), T) / fp32_peak,
        "fp32_matmul_flops": fp32_peak,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "first_loss": losses[0],
        "threads": threads,
        "cpu_bf16": cpu_has_bf16(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: impl,precision,shape in a subprocess
    args = parser.parse_args()
    if args.one:
        impl, precision, shape = args.one.split(",")
        print(json.dumps(measure(impl, precision, shape, args.steps, args.warmup)))
        return

    import torch

    results = {}
    for shape in args.shapes.split(","):
        for impl, precision in RUNS:
            command = [sys.executable, __file__, "--one", f"{impl},{precision},{shape}",
                       "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[f"{shape}/{impl}/{precision}"] = json.loads(output.strip().splitlines()[-1])
    header = f"{'shape':<11} {'implementation':<14} {'dtype':<5} {'tokens/s':>10} {'vs HF fp32':>10} {'MFU':>6} {'peak MiB':>9}"
    lines = [header, "-" * len(header)]
    for key, r in results.items():
        shape, impl, precision = key.split("/")
        if "skipped" in r:
            lines.append(f"{shape:<11} {impl:<14} {precision:<5} skipped: {r['skipped']}")
            continue
        base = results[f"{shape}/transformers/fp32"]
        ratio = r["tokens_per_second"] / base["tokens_per_second"]
        memory = r["peak_rss_mib"] / base["peak_rss_mib"]
        lines.append(
            f"{shape:<11} {impl:<14} {precision:<5} {r['tokens_per_second']:>10,.0f} {ratio:>9.2f}x "
            f"{r['mfu_vs_fp32_matmul']:>6.1%} {r['peak_rss_mib']:>9,.0f} ({memory:.2f}x)"
        )
    print("\n".join(lines))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "steps": args.steps, "command": " ".join(sys.argv)}  # fmt: skip
    RESULTS.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
