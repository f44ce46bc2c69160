"""Preference tuning (DPO) on the book's preference data: what it changes, what it costs, and the loss's memory.

1. Quality: DPO from an instruction-tuned gptlab run (by default the full finetune that
   benchmarks/instruct_lora.py writes to runs/bench-instruct/all), twice with the same split and
   batches: all weights, then rank-8 LoRA adapters. Reward accuracy and margin on the validation and
   test splits before and after, and where the time goes (reference log-probabilities, steps, responses).
2. Memory and speed of one DPO step on the `bpe-mini` shape (GPT-2's 50,257-token vocabulary, 8 pairs
   of 256 tokens, half of each the response): gptlab's response-only, chunked log-probabilities
   (`model(x, y, reduction="none")`) against the plain way, log_softmax over the full (B, T, V) logits
   and a gather. Each runs in its own subprocess so that its peak RSS is its own.
Prints a table and writes benchmarks/results/preference_dpo.json.

    .venv/bin/python benchmarks/instruct_lora.py          # once, for the instruction-tuned start
    .venv/bin/python benchmarks/preference_dpo.py
    .venv/bin/python benchmarks/preference_dpo.py --skip-quality --steps 5
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

RESULTS = Path(__file__).parent / "results" / "preference_dpo.json"
DEFAULT_BASE = Path("runs/bench-instruct/all")


def tune(base: Path, out: Path, trainable: str, args: argparse.Namespace) -> dict:
    from gptlab.preference import finetune_preference

    values = {
        "init_from": str(base), "out_dir": str(out),
        "preference": {"source": "instruction-preference", "trainable": trainable, "beta": args.beta},
        "lora": {"rank": 8, "alpha": 16.0, "targets": ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj", "lm_head"]},
        "train": {"learning_rate": args.lora_lr if trainable == "lora" else args.full_lr, "threads": args.threads,
                  "eval_batches": 100, "sample_tokens": 0},
    }  # fmt: skip
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append((time.perf_counter(), line))
        print(line, flush=True)

    start = time.perf_counter()
    result = finetune_preference(values, overwrite=True, log=log)
    total = time.perf_counter() - start
    reference_done = next(t for t, line in lines if line.startswith("reference log-probabilities of"))
    return {
        "trainable": trainable,
        "trainable_parameters": result.trainable_parameters,
        "learning_rate": values["train"]["learning_rate"],
        "steps": result.train.step,
        "validation_before": result.start_eval,
        "validation_after": result.final_eval,
        "test_after": result.test_metrics,
        "seconds_total": total,
        "seconds_reference": reference_done - start,
        "seconds_training": result.train.elapsed,
        "skipped": result.skipped,
        "example_responses": [
            {
                "instruction": r["instruction"],
                "chosen": r["chosen"],
                "rejected": r["rejected"],
                "response": r["response"],
            }
            for r in result.responses[:3]
        ],
    }


def step_child(way: str, steps: int, threads: int) -> dict:
    """One DPO configuration's step time and memory, run inside its own process."""
    import torch
    import torch.nn.functional as F

    from gptlab.config import TrainConfig, get_preset
    from gptlab.model import GPT
    from gptlab.preference import dpo_loss
    from gptlab.train import build_optimizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = get_preset("bpe-mini")
    model = GPT(config)
    optimizer = build_optimizer(model, TrainConfig(learning_rate=1e-5), torch.device("cpu"))
    pairs, length = 8, config.context_length
    inputs = torch.randint(0, config.vocab_size, (2 * pairs, length))
    targets = torch.roll(inputs, -1, dims=1)
    targets[:, : length // 2] = -100  # the prompt half carries no target
    reference = torch.randn(pairs, 2) - 300.0

    def log_probs() -> torch.Tensor:
        if way == "gptlab":
            per_token = -model(inputs, targets, reduction="none")
        else:  # the plain way: every position's full distribution, then the targets' entries
            logprobs = F.log_softmax(model(inputs).float(), dim=-1)
            per_token = logprobs.gather(2, targets.clamp(min=0)[..., None]).squeeze(2) * (targets != -100)
        return per_token.sum(1).view(2, -1).t()

    def rss() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    built = rss()
    times = []
    for _ in range(steps + 1):  # the first step (allocating AdamW's state) is not timed
        start = time.perf_counter()
        loss, _ = dpo_loss(log_probs(), reference, beta=0.1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"way": way, "step_seconds": statistics.median(times[1:]), "peak_rss_mib": peak,
            "step_growth_mib": peak - built}  # fmt: skip


def measure_steps(args: argparse.Namespace) -> list[dict]:
    rows = []
    for way in ("plain", "gptlab"):
        code = (
            "import json, sys; sys.path.insert(0, 'benchmarks'); from preference_dpo import step_child; "
            f"print(json.dumps(step_child({way!r}, {args.steps}, {args.threads})))"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE, help="instruction-tuned run to start from")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-preference"))
    parser.add_argument("--full-lr", type=float, default=5e-5)
    parser.add_argument("--lora-lr", type=float, default=5e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=5, help="timed DPO steps per way in part 2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-quality", action="store_true", help="only part 2")
    args = parser.parse_args()

    results: dict = {"machine": describe(), "threads": args.threads}
    import torch

    results["torch"] = torch.__version__
    if not args.skip_quality:
        if not (args.base / "config.yaml").is_file():
            sys.exit(f"{args.base} is not a run; make it with: .venv/bin/python benchmarks/instruct_lora.py")
        results["quality"] = [tune(args.base, args.work / t, t, args) for t in ("all", "lora")]
    results["step"] = measure_steps(args)

    if "quality" in results:
        print(f"\nDPO from {args.base} on instruction-preference (beta {args.beta})")
        print(f"{'trainable':<10} {'params':>9} {'lr':>7} {'steps':>5} {'val acc':>15} {'val margin':>16} "
              f"{'test acc':>8} {'test margin':>11} {'ref s':>6} {'train s':>7} {'total s':>7}")  # fmt: skip
        for row in results["quality"]:
            before, after, test = row["validation_before"], row["validation_after"], row["test_after"]
            print(
                f"{row['trainable']:<10} {row['trainable_parameters']:>9,} {row['learning_rate']:>7.0e} {row['steps']:>5} "
                f"{before['reward_accuracy']:>6.1%} -> {after['reward_accuracy']:>6.1%} "
                f"{before['reward_margin']:>6.3f} -> {after['reward_margin']:>6.3f} {test['reward_accuracy']:>8.1%} "
                f"{test['reward_margin']:>11.3f} {row['seconds_reference']:>6.1f} {row['seconds_training']:>7.1f} "
                f"{row['seconds_total']:>7.1f}"
            )
    plain, ours = results["step"]
    print(f"\none DPO step, bpe-mini, 8 pairs x 256 tokens (half response), {args.threads} threads, "
          f"median of {args.steps}")  # fmt: skip
    print(f"{'way':<8} {'step s':>7} {'peak RSS MiB':>13} {'step growth MiB':>16}")
    for row in results["step"]:
        print(
            f"{row['way']:<8} {row['step_seconds']:>7.2f} {row['peak_rss_mib']:>13,.0f} {row['step_growth_mib']:>16,.0f}"
        )
    print(
        f"gptlab / plain: step time {ours['step_seconds'] / plain['step_seconds']:.2f}x, "
        f"step memory {ours['step_growth_mib'] / plain['step_growth_mib']:.2f}x"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
