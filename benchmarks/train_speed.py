"""Training-step speed and memory: gptlab against transformers' GPT-2 on the same shapes, same machine, same run.

Each (shape, implementation, variant) runs in its own subprocess so its peak memory is its own; a step
is forward, loss, backward, AdamW step and zero_grad, as in the training loop, on the same random
tokens for every implementation. Prints a table (median tokens/s over the timed steps, ratio to
transformers fp32, MFU against the fastest fp32 matmul rate measured at the start of the run: torch's
own product (MKL) or oneDNN's; peak RSS of the process and the step's own growth over the built model)
and writes benchmarks/results/train_speed.json.
The steps are split into rounds that take every configuration in turn, so that the machine's drift
falls on all of them alike; besides the ratio of the medians, the median of the rounds' own ratios
(each round's median step against transformers' in the same round) is reported, which drift between
rounds moves less.

Variants: fp32; fp32+compile (torch.compile, its compile time reported apart); bf16 (what the
library does: bf16 autocast where the CPU has bf16 units, else the fp32 fallback, reported as such);
bf16-emulated (autocast forced on, to show what a CPU without bf16 units would get). gptlab's rows run
with the malloc settings its training sets (`machine.configure_allocator`: freed memory kept for the
next step); transformers' fp32 row, the base of the ratios, with the C library's defaults, as a plain
transformers loop runs, and its fp32+allocator row with gptlab's settings, to show what they are worth
to it.

    .venv/bin/python benchmarks/train_speed.py            # char-small and bpe-mini, 30 timed steps in 3 rounds
    .venv/bin/python benchmarks/train_speed.py --steps 10 --shapes char-small --variants fp32
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from host import describe

SHAPES = {
    # name: (model fields, batch size)
    "char-small": (dict(n_layer=4, n_head=4, n_embd=128, context_length=64, vocab_size=65), 12),
    "bpe-mini": (dict(n_layer=6, n_head=6, n_embd=384, context_length=256, vocab_size=50257), 8),
}
RUNS = [
    ("transformers", "fp32"),
    ("transformers", "fp32+allocator"),
    ("gptlab", "fp32"),
    ("gptlab", "fp32+compile"),
    ("gptlab", "bf16"),
    ("gptlab", "bf16-emulated"),
]
RESULTS = Path(__file__).parent / "results" / "train_speed.json"


def build(impl: str, fields: dict):
    """Model, optimizer and a loss function of (inputs, targets) for one implementation."""
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
    return model, optimizer, model, False


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def matmul_flops(dtype_name: str, kernel: str = "torch", n: int = 1024, repeats: int = 7) -> float:
    """Best FLOP/s of an n x n matrix product (the base of MFU), measured fresh, not cached: torch's own
    (MKL on a CPU) or oneDNN's, which gptlab's fp32 linear layers take where it is faster."""
    import torch

    from gptlab.machine import _onednn_forward

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    product = (lambda: a @ b) if kernel == "torch" else (lambda: _onednn_forward(a, b, None))
    product()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(3):
            product()
        best = min(best, (time.perf_counter() - start) / 3)
    return 2 * n**3 / best


def measure(impl: str, variant: str, shape: str, steps: int, warmup: int) -> dict:
    """One configuration, in this process: median step time, tokens/s and peak memory."""
    import torch

    from gptlab.machine import configure_allocator, configure_threads, cpu_has_bf16
    from gptlab.train import resolve_autocast

    threads = configure_threads(0)
    if impl == "gptlab" or variant.endswith("+allocator"):
        configure_allocator()
    fields, batch = SHAPES[shape]
    autocast_dtype = None
    if variant == "bf16":
        autocast_dtype = resolve_autocast("bf16", torch.device("cpu"))
        if autocast_dtype is None:
            return {"skipped": "no bf16 units (AMX / AVX-512 BF16) on this CPU: gptlab's bf16 falls back to fp32"}
    elif variant == "bf16-emulated":
        autocast_dtype = torch.bfloat16
    model, optimizer, loss_fn, labels_are_inputs = build(impl, fields)
    model.train()
    if variant.endswith("+compile"):
        if impl == "gptlab":  # as its training loop does: the kernel chosen before the graphs are compiled
            from gptlab.machine import onednn_pays

            onednn_pays()
        loss_fn = torch.compile(loss_fn)
    T, V = fields["context_length"], fields["vocab_size"]
    generator = torch.Generator().manual_seed(0)
    data = torch.randint(0, V, (steps + warmup, batch, T + 1), generator=generator)
    rss_before = rss_mib()
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
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    median = statistics.median(times[warmup:])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "tokens_per_second": batch * T / median,
        "median_step_s": median,
        "first_step_s": times[0],
        "compile_s": times[0] - median if variant.endswith("+compile") else 0.0,
        "peak_rss_mib": peak,
        "step_peak_mib": peak - rss_before,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "threads": threads,
        "cpu_bf16": cpu_has_bf16(),
        "load_average": os.getloadavg()[0],
        "step_times_s": times[warmup:],
    }


def order(key: str, runs: list[tuple[str, str, str]]) -> tuple[int, int]:
    """Table order: shapes as asked, then RUNS' order."""
    shape, impl, variant = key.split("/")
    shapes = list(dict.fromkeys(r[0] for r in runs)) or [shape]
    return (shapes.index(shape) if shape in shapes else len(shapes), RUNS.index((impl, variant)))


def merge_rounds(rounds: list[dict], batch_tokens: int) -> dict:
    """One configuration's rounds as one result: the median over every timed step of every round, the
    highest peak memory; compile time and first step from the first round (later ones find a warm cache)."""
    merged = dict(rounds[0])
    times = [t for r in rounds for t in r["step_times_s"]]
    merged["median_step_s"] = statistics.median(times)
    merged["tokens_per_second"] = batch_tokens / merged["median_step_s"]
    merged["round_medians_s"] = [statistics.median(r["step_times_s"]) for r in rounds]
    merged["peak_rss_mib"] = max(r["peak_rss_mib"] for r in rounds)
    merged["step_peak_mib"] = max(r["step_peak_mib"] for r in rounds)
    merged["load_average"] = max(r["load_average"] for r in rounds)
    merged["step_times_s"] = times
    return merged


def flops_per_token(shape: str) -> float:
    from gptlab.config import GPTConfig
    from gptlab.sizing import train_flops_per_token

    fields, _ = SHAPES[shape]
    return train_flops_per_token(GPTConfig(**fields), fields["context_length"])


def table(results: dict, rates: dict[str, float]) -> str:
    """The results as a table; MFU against the matrix-product rate of the variant's own dtype (the bf16
    row, which runs only on bf16 units, against bf16's; emulated bf16 against fp32's)."""
    header = (
        f"{'shape':<11} {'implementation':<13} {'variant':<14} {'tokens/s':>9} {'vs HF':>6} {'rounds':>6} "
        f"{'MFU':>6} {'peak MiB':>15} {'step MiB':>15} {'compile s':>9}"
    )
    lines = [header, "-" * len(header)]
    for key, r in results.items():
        shape, impl, variant = key.split("/")
        if "skipped" in r:
            lines.append(f"{shape:<11} {impl:<13} {variant:<14} skipped: {r['skipped']}")
            continue
        base = results[f"{shape}/transformers/fp32"]
        ratio = r["tokens_per_second"] / base["tokens_per_second"]
        peak_rate = rates["bfloat16"] if variant == "bf16" else rates["float32"]
        mfu = r["tokens_per_second"] * flops_per_token(shape) / peak_rate
        peak = f"{r['peak_rss_mib']:,.0f} ({r['peak_rss_mib'] / base['peak_rss_mib']:.2f}x)"
        step = f"{r['step_peak_mib']:,.0f} ({r['step_peak_mib'] / max(base['step_peak_mib'], 1):.2f}x)"
        lines.append(
            f"{shape:<11} {impl:<13} {variant:<14} {r['tokens_per_second']:>9,.0f} {ratio:>5.2f}x "
            f"{r['round_ratio_median']:>5.2f}x {mfu:>6.1%} {peak:>15} {step:>15} {r['compile_s']:>9.1f}"
        )
    return "\n".join(lines)


def add_round_ratios(results: dict) -> None:
    """Each configuration's ratios to transformers fp32 of its shape, round by round (their step times in
    the same round), and the median of those: 'round_ratios' and 'round_ratio_median'."""
    for key, r in results.items():
        if "skipped" in r:
            continue
        base = results[f"{key.split('/')[0]}/transformers/fp32"]
        r["round_ratios"] = [
            theirs / ours for ours, theirs in zip(r["round_medians_s"], base["round_medians_s"], strict=True)
        ]
        r["round_ratio_median"] = statistics.median(r["round_ratios"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="the steps are split into this many interleaved rounds")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--variants", default=",".join(dict.fromkeys(v for _, v in RUNS)))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--emulated-shapes",
        default="char-small",
        help="shapes that also run bf16-emulated (minutes a step on bpe-mini)",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: impl,variant,shape in a subprocess
    args = parser.parse_args()
    if args.one:
        impl, variant, shape = args.one.split(",")
        print(json.dumps(measure(impl, variant, shape, args.steps, args.warmup)))
        return

    import torch

    from gptlab.machine import configure_threads

    configure_threads(0)
    from gptlab.machine import _onednn_available

    rates = {"float32 torch": matmul_flops("float32"), "bfloat16": matmul_flops("bfloat16")}
    if _onednn_available():
        rates["float32 oneDNN"] = matmul_flops("float32", "onednn")
    rates["float32"] = max(rates["float32 torch"], rates.get("float32 oneDNN", 0.0))  # MFU's base
    variants = args.variants.split(",")
    runs, results = [], {}
    for shape in args.shapes.split(","):
        for impl, variant in RUNS:
            if variant not in variants and (impl, variant) != ("transformers", "fp32"):  # the base always runs
                continue
            if variant == "bf16-emulated" and shape not in args.emulated_shapes.split(","):
                results[f"{shape}/{impl}/{variant}"] = {
                    "skipped": "emulated bf16 at this size: add it to --emulated-shapes"
                }
                continue
            runs.append((shape, impl, variant))
    # Rounds: every configuration runs a share of the steps in each round, so that a slow spell of the
    # machine (it drifts by 20-30% within minutes) falls on all of them alike instead of on one.
    steps = max(1, args.steps // args.rounds)
    rounds: dict[str, list[dict]] = {}
    for round_index in range(args.rounds):
        for shape, impl, variant in runs:
            key = f"{shape}/{impl}/{variant}"
            command = [sys.executable, __file__, "--one", f"{impl},{variant},{shape}",
                       "--steps", str(steps), "--warmup", str(args.warmup)]  # fmt: skip
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            rounds.setdefault(key, []).append(json.loads(output.strip().splitlines()[-1]))
            median = rounds[key][-1]["median_step_s"]
            print(
                f"round {round_index + 1}/{args.rounds} {key}: median step {median:.4f} s", file=sys.stderr, flush=True
            )
    for shape, impl, variant in runs:
        fields, batch = SHAPES[shape]
        results[f"{shape}/{impl}/{variant}"] = merge_rounds(
            rounds[f"{shape}/{impl}/{variant}"], batch * fields["context_length"]
        )
    results = {key: results[key] for key in sorted(results, key=lambda k: order(k, runs))}
    add_round_ratios(results)
    onednn = f", oneDNN's {rates['float32 oneDNN'] / 1e9:,.0f}" if "float32 oneDNN" in rates else ""
    print(
        f"matmul 1024^3: fp32 torch's {rates['float32 torch'] / 1e9:,.0f} GFLOP/s{onednn} (MFU's base the faster), "
        f"bf16 {rates['bfloat16'] / 1e9:,.0f} GFLOP/s"
    )
    print(table(results, rates))
    loads = [r["load_average"] for r in results.values() if "load_average" in r]
    if loads and max(loads) > (os.cpu_count() or 1) + 0.5:  # the benchmark itself keeps every core busy
        print(f"warning: 1-minute load average reached {max(loads):.1f} during the run; the figures are disturbed")
    meta = {
        "machine": describe(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "matmul_flops": rates,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
