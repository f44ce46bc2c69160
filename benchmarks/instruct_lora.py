"""Instruction finetuning, all weights against LoRA rank 8, from one small gptlab-pretrained model.

1. Pretrain a small GPT once (the `demo` shape with a 256-token context, on the embedded default
   corpus), or reuse a base run given with --base.
2. Finetune it on the book's instruction data twice, with the same split, batches and steps: all
   weights, then rank-8 adapters only, each at its own learning rate. The adapters sit on every
   linear layer, the LM head included: the base model learnt the token frequencies of Python's
   documentation, and adapting the head lets LoRA move them towards the instruction data's.
3. Print a table (response-only validation loss before and after, perplexity, trainable parameters,
   seconds, how the test responses ended), the share of parameters rank-8 LoRA trains in the 124M
   configuration, and write benchmarks/results/instruct_lora.json (with example responses).

    .venv/bin/python benchmarks/instruct_lora.py
    .venv/bin/python benchmarks/instruct_lora.py --base runs/bench-instruct/base --steps 100
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from host import describe

RESULTS = Path(__file__).parent / "results" / "instruct_lora.json"
BASE_MODEL = {"context_length": 256}  # the demo preset, with room for the longest instruction examples


def pretrain_base(work: Path, steps: int, threads: int) -> Path:
    from gptlab.train import pretrain

    values = {
        "out_dir": str(work / "base"), "preset": "demo", "model": BASE_MODEL,
        # The settings the recorded figures were measured with (the library's defaults then), pinned.
        "train": {"max_steps": steps, "learning_rate": 1e-3, "warmup_steps": 30, "eval_interval": max(1, steps // 3),
                  "log_interval": 50, "threads": threads},
    }  # fmt: skip
    result, run_dir = pretrain(values, overwrite=True, log=print)
    print(f"pretrained {run_dir}: validation loss {result.last_eval.get('val_loss', float('nan')):.3f}")
    return run_dir


def finetune(base: Path, out: Path, trainable: str, args: argparse.Namespace) -> dict:
    from gptlab.instruct import finetune_instruct

    learning_rate = args.lora_lr if trainable == "lora" else args.full_lr
    values = {
        "init_from": str(base), "out_dir": str(out), "template": "alpaca",
        "instruct": {"source": "instruction-data", "trainable": trainable},
        "lora": {"rank": args.lora_rank, "alpha": 2.0 * args.lora_rank, "targets": args.lora_targets},
        "train": {
            "max_steps": args.steps, "batch_size": args.batch_size, "learning_rate": learning_rate,
            "warmup_steps": max(1, args.steps // 10), "eval_interval": max(1, args.steps // 4), "eval_batches": 100,
            "log_interval": 25, "threads": args.threads, "seed": 123,
        },
    }  # fmt: skip
    start = time.perf_counter()
    result = finetune_instruct(values, overwrite=True, log=print)
    seconds = time.perf_counter() - start
    finishes = Counter(r["finish"] for r in result.responses)
    return {
        "run": str(out), "learning_rate": learning_rate,
        "val_loss_before": result.start_eval["val_loss"], "val_loss": result.final_eval["val_loss"],
        "perplexity": result.final_eval["perplexity"], "trainable_parameters": result.trainable_parameters,
        "total_parameters": result.total_parameters, "train_seconds": result.train.elapsed, "seconds": seconds,
        "test_responses": len(result.responses), "finish": dict(finishes),
        "examples": [
            {k: r[k] for k in ("instruction", "input", "output", "response", "finish")} for r in result.responses[:5]
        ],
    }  # fmt: skip


def lora_share_124m(rank: int, targets: list[str]) -> dict:
    """Trainable share of rank-`rank` LoRA on `targets` in the 124M GPT-2 configuration, by arithmetic."""
    from gptlab.config import LoRAConfig, get_preset
    from gptlab.lora import expected_lora_parameters
    from gptlab.sizing import count_parameters

    config = get_preset("gpt2")
    adapters = expected_lora_parameters(config, LoRAConfig(rank=rank, targets=targets))
    total = count_parameters(config).total
    return {"adapters": adapters, "base_parameters": total, "share": adapters / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/bench-instruct"), help="where the runs go")
    parser.add_argument("--base", type=Path, help="a pretrained run to start from (default: pretrain one)")
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--steps", type=int, default=200, help="finetuning steps of each run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--full-lr", type=float, default=1e-3)
    parser.add_argument("--lora-lr", type=float, default=1e-2)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument(
        "--lora-targets",
        type=lambda text: text.split(","),
        default=["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj", "lm_head"],
        help="adapted layers, comma-separated (default: every linear layer, the LM head too)",
    )
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: all physical cores)")
    args = parser.parse_args()

    base = args.base or pretrain_base(args.work, args.pretrain_steps, args.threads)
    runs = {name: finetune(base, args.work / name, name, args) for name in ("all", "lora")}
    share = lora_share_124m(args.lora_rank, args.lora_targets)
    ratio = runs["lora"]["val_loss"] / runs["all"]["val_loss"]

    print(f"\n{'trainable':<10} {'lr':>8} {'val loss before':>16} {'after':>8} {'ppl':>7} {'params':>12} "
          f"{'seconds':>8}  test responses ending at end-of-text")  # fmt: skip
    for name, run in runs.items():
        print(
            f"{name:<10} {run['learning_rate']:>8.0e} {run['val_loss_before']:>16.3f} {run['val_loss']:>8.3f} "
            f"{run['perplexity']:>7.2f} {run['trainable_parameters']:>12,} {run['train_seconds']:>8.0f}  "
            f"{run['finish'].get('end_of_text', 0)}/{run['test_responses']}"
        )
    print(f"LoRA's response loss / full finetuning's: {ratio:.3f}")
    print(f"LoRA rank {args.lora_rank} in the 124M configuration: {share['adapters']:,} of "
          f"{share['base_parameters']:,} parameters ({share['share']:.2%})")  # fmt: skip

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    results = {
        "base": str(base), "data": "instruction-data", "steps": args.steps, "batch_size": args.batch_size,
        "lora_rank": args.lora_rank, "lora_targets": args.lora_targets, "runs": runs, "lora_loss_ratio": ratio, "lora_124m": share,
        "machine": {**describe(), "threads": args.threads},
    }  # fmt: skip
    RESULTS.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
