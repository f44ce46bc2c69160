"""An instruction-finetuning step with and without the loss's row selection.

With `instruct.mask_prompt` (the default) the prompt's positions and the padding have no target, so
the loss needs no logits for them: `gptlab.model.targeted_rows` keeps only the rows with a target
before the head's product. This script times one training step (forward, loss, backward, AdamW) on
real batches of the book's instruction data in the Alpaca template with GPT-2's tokenizer, two ways in
the same process, interleaved step by step: the library as it is, and with `targeted_rows` replaced
by one that keeps every row (what the loss did before). Both compute the same loss. Prints a table
and writes benchmarks/results/instruct_step.json (by preset).

    .venv/bin/python benchmarks/instruct_step.py                    # bpe-mini, batch 8, 10 steps
    .venv/bin/python benchmarks/instruct_step.py --preset gpt2 --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import gptlab.model
from gptlab.config import get_preset
from gptlab.instruct import collate, encode_example, load_records
from gptlab.model import GPT
from gptlab.templates import get_template
from gptlab.tokenizer import GPT2Tokenizer
from host import describe

RESULTS = Path(__file__).parent / "results" / "instruct_step.json"
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "instruction-data.json"


def batches(batch_size: int, count: int, context_length: int) -> list[dict[str, torch.Tensor]]:
    tokenizer, template = GPT2Tokenizer(), get_template("alpaca")
    records = load_records(str(DATA))
    examples = [encode_example(r, template, tokenizer, context_length) for r in records[: batch_size * count]]
    return [collate(examples[i : i + batch_size], tokenizer.eot_id) for i in range(0, len(examples), batch_size)]


def step(model, optimizer, batch) -> float:
    start = time.perf_counter()
    loss = model(batch["input"], batch["target"])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start, loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bpe-mini")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(DATA.parent / "tiktoken-cache"))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = get_preset(args.preset, dropout=0.0)
    data = batches(args.batch_size, args.steps + 1, config.context_length)
    targeted = sum(int((b["target"] != -100).sum()) for b in data) / sum(b["target"].numel() for b in data)

    library_rows = gptlab.model.targeted_rows
    ways = {
        "targeted rows (gptlab)": library_rows,
        "every row (before)": lambda hidden, targets, ignore: (hidden, targets),
    }
    models = {}
    for name in ways:
        torch.manual_seed(0)
        model = GPT(config)
        models[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True))
    times = {name: [] for name in ways}
    losses = {name: [] for name in ways}
    for i, batch in enumerate(data):
        for name, rows in ways.items():
            gptlab.model.targeted_rows = rows
            seconds, loss = step(*models[name], batch)
            if i:  # the first step warms up
                times[name].append(seconds)
                losses[name].append(loss)
    gptlab.model.targeted_rows = library_rows

    medians = {name: statistics.median(t) for name, t in times.items()}
    before, after = medians["every row (before)"], medians["targeted rows (gptlab)"]
    print(f"{args.preset}, batch {args.batch_size}, {targeted:.1%} of the positions have a target, "
          f"median of {args.steps} interleaved steps, {args.threads} threads")  # fmt: skip
    print("| way | step | speed-up |\n|---|---:|---:|")
    for name, median in medians.items():
        print(f"| {name} | {median * 1000:,.0f} ms | {before / median:.2f}x |")
    agree = max(abs(a - b) for a, b in zip(*losses.values(), strict=True))
    print(f"largest loss difference between the two ways: {agree:.2e}")
    RESULTS.parent.mkdir(exist_ok=True)
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.write_text(json.dumps({**previous, args.preset: {
        "command": "benchmarks/instruct_step.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "torch": torch.__version__, "machine": describe(),
        "load_average": os.getloadavg()[0], "targeted_share": targeted,
        "median_seconds": medians, "speedup": before / after, "largest_loss_difference": agree,
    }}, indent=1) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
