"""tinyshakespeare at the character level, against the clock: the real `gptlab.train.pretrain` with the
settings of recipes/shakespeare-char.yaml (4 layers, 4 heads, width 128, context 64, batch 12).

Reports the training time (the loop, without evaluation, sampling and checkpoints, which are timed
apart), the validation loss at each evaluation, tokens/s, and for a compiled model the compile time
(the first step's excess over the median step). Writes benchmarks/results/shakespeare_char.json.

    .venv/bin/python benchmarks/shakespeare_char.py
    .venv/bin/python benchmarks/shakespeare_char.py --set train.compile=true --set train.max_steps=1500
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

from host import describe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "shakespeare-char.yaml"
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
RESULTS = ROOT / "benchmarks" / "results" / "shakespeare_char.json"
TARGET = {"val_loss": 1.88, "train_seconds": 32.0}


def apply_override(values: dict, assignment: str) -> None:
    """`train.max_steps=1500` into values["train"]["max_steps"] (the value parsed as YAML)."""
    key, _, raw = assignment.partition("=")
    *parents, leaf = key.split(".")
    for parent in parents:
        values = values.setdefault(parent, {})
    value = yaml.safe_load(raw)
    if isinstance(value, str):  # YAML reads 2e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    values[leaf] = value


class Timers:
    """Wall time spent in the named calls, patched onto their owners for the length of a run."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.step_starts: list[float] = []

    def wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start

        setattr(owner, name, timed)

    def mark_steps(self, owner) -> None:
        original = owner.loss

        def loss(objective, model, batch):
            self.step_starts.append(time.perf_counter())
            return original(objective, model, batch)

        owner.loss = loss


def run(values: dict) -> dict:
    from gptlab import distributed
    from gptlab.objectives import NextTokenObjective
    from gptlab.train import pretrain

    timers = Timers()
    timers.wrap(NextTokenObjective, "evaluate", "evaluation")
    timers.wrap(NextTokenObjective, "samples", "sampling")
    timers.wrap(distributed, "save_checkpoint", "checkpoints")
    timers.mark_steps(NextTokenObjective)
    lines: list[str] = []
    start = time.perf_counter()
    result, run_dir = pretrain(values, overwrite=True, log=lines.append)
    total = time.perf_counter() - start
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [{"step": r["step"], "val_loss": r["val_loss"]} for r in records if r.get("split") == "val"]
    side = sum(timers.seconds.values())
    train_seconds = result.elapsed - side
    steps = [b - a for a, b in zip(timers.step_starts, timers.step_starts[1:], strict=False)]
    median_step = statistics.median(steps)
    tokens_per_step = values["train"]["batch_size"] * values.get("model", {}).get("context_length", 64)
    return {
        "train_seconds": train_seconds,
        "loop_seconds": result.elapsed,
        "side_seconds": timers.seconds,
        "pretrain_call_seconds": total,
        "first_step_seconds": timers.step_starts[1] - timers.step_starts[0] if len(steps) else None,
        "compile_seconds_estimate": (steps[0] - median_step) if values["train"].get("compile") else 0.0,
        "median_step_seconds": median_step,
        "tokens_per_second": result.step * tokens_per_step / train_seconds,
        "median_tokens_per_second": tokens_per_step / median_step,
        "steps": result.step,
        "evals": evals,
        "final_val_loss": evals[-1]["val_loss"] if evals else None,
        "best_val_loss": result.best_val_loss,
        "sample": result.samples[0] if result.samples else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    parser.add_argument("--out", type=Path, help="results file (default benchmarks/results/shakespeare_char.json)")
    args = parser.parse_args()
    if not DATA.is_file():
        sys.exit(f"missing {DATA}: the benchmark trains on the shared tinyshakespeare file")

    values = yaml.safe_load(args.recipe.read_text())
    for assignment in args.set:
        apply_override(values, assignment)
    values["data"]["source"] = str(DATA)
    with tempfile.TemporaryDirectory() as tmp:
        values["out_dir"] = str(Path(tmp) / "run")
        measured = run(values)

    import torch

    for e in measured["evals"]:
        print(f"step {e['step']:>5}  val loss {e['val_loss']:.4f}")
    met = measured["final_val_loss"] <= TARGET["val_loss"] and measured["train_seconds"] <= TARGET["train_seconds"]
    print(
        f"training {measured['train_seconds']:.1f} s for {measured['steps']} steps "
        f"({measured['tokens_per_second']:,.0f} tokens/s; median step {measured['median_step_seconds'] * 1e3:.1f} ms); "
        f"evaluation, samples and checkpoints {sum(measured['side_seconds'].values()):.1f} s apart"
        + (f"; compile about {measured['compile_seconds_estimate']:.1f} s" if values["train"].get("compile") else "")
    )
    print(
        f"final val loss {measured['final_val_loss']:.4f}: target (<= {TARGET['val_loss']} within "
        f"{TARGET['train_seconds']:.0f} s) {'met' if met else 'missed'}"
    )
    meta = {
        "machine": describe(),
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "torch": torch.__version__,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {k: values[k] for k in ("preset", "model", "data", "train") if k in values},
    }
    out = args.out or RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, **measured, "target": TARGET, "met": met}, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
