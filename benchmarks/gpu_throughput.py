"""Training throughput of GPT-2 124M at context 1024 on one GPU: bf16 autocast, torch.compile, fused AdamW.

A step is the training loop's: forward with the loss, backward, gradient clipping, AdamW (fused on
CUDA, as gptlab.train builds it), zero_grad, on random tokens (no data loading in the way). Prints
tokens/s (median over the timed steps), MFU against the device's dense bf16 peak (the datasheet value
for known GPUs, else the measured matmul rate) and peak memory. Compiling takes about a minute; the
whole run stays under 3 minutes on an A100 or H100.

Without CUDA it trains a tiny model for a few steps on the CPU (fp32, no compile unless --compile),
so the script runs everywhere; that number says nothing about GPUs.

    python benchmarks/gpu_throughput.py                       # GPT-2 124M, 16 x 1024 tokens a step
    python benchmarks/gpu_throughput.py --batch-size 32 --activation-checkpointing
    python benchmarks/gpu_throughput.py --no-compile --out benchmarks/results/gpu_throughput.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

# Dense bf16 tensor-core FLOP/s from the datasheets (no sparsity), by a piece of the device name; the
# first match wins, so the more specific names come first.
DATASHEET_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "H200": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}
GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768, context_length=1024, vocab_size=50304)
TINY = dict(n_layer=2, n_head=2, n_embd=64, context_length=64, vocab_size=512)
RESULTS = Path(__file__).parent / "results" / "gpu_throughput.json"


def peak_flops(device, dtype) -> tuple[float, str]:
    """The device's peak FLOP/s for `dtype` and where the number comes from."""
    import torch

    from gptlab.machine import measure_peak_flops

    if device.type == "cuda" and dtype == torch.bfloat16:
        name = torch.cuda.get_device_name(device)
        for piece, flops in DATASHEET_BF16_FLOPS.items():
            if piece in name:
                return flops, f"datasheet ({piece})"
    return measure_peak_flops(device, dtype), "measured matmul rate"


def measure(args: argparse.Namespace) -> dict:
    """Time `args.steps` training steps after `args.warmup` untimed ones (compilation happens there)."""
    import torch

    from gptlab.config import GPTConfig, TrainConfig
    from gptlab.distributed import checkpoint_blocks
    from gptlab.machine import configure_threads
    from gptlab.model import GPT
    from gptlab.sizing import train_flops_per_token
    from gptlab.train import build_optimizer

    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    fields = GPT2_124M if cuda else TINY
    batch = args.batch_size if cuda else 4
    compile_model = args.compile if args.compile is not None else cuda
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None
    if not cuda:
        configure_threads(0)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(0)
    config = GPTConfig(**fields, dropout=0.0)
    model = GPT(config).to(device)
    if args.activation_checkpointing:
        checkpoint_blocks(model)
    optimizer = build_optimizer(model, TrainConfig(learning_rate=6e-4), device)
    stepper = torch.compile(model) if compile_model else model
    T = config.context_length
    generator = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (batch, T + 1), device=device, generator=generator)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    times, losses = [], []
    started = time.perf_counter()
    for i in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = stepper(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
        losses.append(loss.item())
    median = statistics.median(times)
    tokens_per_second = batch * T / median
    peak, peak_source = peak_flops(device, dtype)
    memory = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if cuda:
        memory["max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        memory["max_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
    return {
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "model": "GPT-2 124M" if cuda else "tiny (CPU smoke run)",
        "parameters": model.num_parameters(),
        "batch_size": batch,
        "context_length": T,
        "dtype": str(dtype or torch.float32),
        "compile": compile_model,
        "activation_checkpointing": args.activation_checkpointing,
        "timed_steps": args.steps,
        "median_step_s": median,
        "tokens_per_second": tokens_per_second,
        "mfu": tokens_per_second * train_flops_per_token(config, T) / peak,
        "peak_flops": peak,
        "peak_flops_source": peak_source,
        **memory,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "wall_s": time.perf_counter() - started,
        "torch": torch.__version__,
    }


def report(result: dict) -> str:
    memory = f"peak RSS {result['peak_rss_mib']:,.0f} MiB"
    if "max_allocated_mib" in result:
        memory = f"{result['max_allocated_mib']:,.0f} MiB allocated, {result['max_reserved_mib']:,.0f} MiB reserved"
    return "\n".join(
        [
            f"{result['model']} on {result['device']}: batch {result['batch_size']} x {result['context_length']}, "
            f"{result['dtype']}, compile {result['compile']}, activation checkpointing {result['activation_checkpointing']}",
            f"tokens/s  {result['tokens_per_second']:,.0f}  (median step {result['median_step_s'] * 1e3:.1f} ms "
            f"over {result['timed_steps']} steps)",
            f"MFU       {result['mfu']:.1%}  of {result['peak_flops'] / 1e12:,.2f} TFLOP/s ({result['peak_flops_source']})",
            f"memory    {memory}",
            f"loss      {result['first_loss']:.3f} -> {result['last_loss']:.3f}; {result['wall_s']:.0f} s in all",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step on the GPU (default 16)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first, compilation included (default 5)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the model (default: on CUDA only)")  # fmt: skip
    parser.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    parser.add_argument("--tiny", action="store_true", help="the CPU smoke run even where CUDA is available")
    parser.add_argument("--out", type=Path, help=f"write the result as JSON (default on CUDA: {RESULTS})")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    result = measure(args)
    print(report(result))
    out = args.out or (RESULTS if "tiny" not in result["model"] else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**result, "command": " ".join(sys.argv)}, indent=2) + "\n")
        print(f"written to {out}")


if __name__ == "__main__":
    main()
