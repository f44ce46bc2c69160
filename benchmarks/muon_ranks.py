"""Muon's optimizer step under DDP: every rank orthogonalising every matrix, against the split in which
each rank takes its share and one all-gather returns the rest (`gptlab.train.Muon`, split_across_ranks).

Run under torchrun; both optimizers step the same model on the same gradients, interleaved, with a
barrier before each step so that the slowest rank sets the time. Prints the medians and their ratio
and writes benchmarks/results/muon_ranks.json.

    .venv/bin/torchrun --nproc-per-node 2 benchmarks/muon_ranks.py                    # char-small and bpe-mini
    .venv/bin/torchrun --nproc-per-node 2 benchmarks/muon_ranks.py --shapes char-small --steps 50
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from gptlab.config import PRESETS, GPTConfig, TrainConfig
from gptlab.model import GPT
from gptlab.train import build_optimizer

RESULTS = Path(__file__).resolve().parent / "results" / "muon_ranks.json"
SHAPES = {"char-small": {"vocab_size": 256}, "bpe-mini": {}}


def time_steps(shape: str, steps: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**PRESETS[shape], **SHAPES[shape]}))
    for param in model.parameters():
        param.grad = torch.randn_like(param)  # the same on every rank, as after DDP's all-reduce
    config = TrainConfig(optimizer="muon")
    optimizers = {
        split: build_optimizer(model, config, torch.device("cpu"), data_parallel=split) for split in (False, True)
    }
    seconds: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(steps + 2):
        for split, optimizer in optimizers.items():
            dist.barrier()
            start = time.perf_counter()
            optimizer.step()
            dist.barrier()
            seconds[split].append(time.perf_counter() - start)
    every, shared = (statistics.median(seconds[split][2:]) for split in (False, True))  # 2 warm-up steps
    return {"every_rank_all_ms": every * 1e3, "split_ms": shared * 1e3, "speedup": every / shared}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each optimizer")
    args = parser.parse_args()
    if "RANK" not in os.environ:
        sys.exit("run under torchrun: .venv/bin/torchrun --nproc-per-node 2 benchmarks/muon_ranks.py")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    dist.init_process_group("gloo")
    try:
        rows = {shape: time_steps(shape, args.steps) for shape in args.shapes}
        if dist.get_rank() == 0:
            ranks, threads = dist.get_world_size(), torch.get_num_threads()
            print(f"Muon step, {ranks} ranks x {threads} thread(s), median of {args.steps}")
            print(f"{'shape':<12} {'every rank all':>15} {'split':>10} {'speed-up':>9}")
            for shape, row in rows.items():
                print(
                    f"{shape:<12} {row['every_rank_all_ms']:>12.1f} ms {row['split_ms']:>7.1f} ms {row['speedup']:>8.2f}x"
                )
            meta = {"ranks": ranks, "threads_per_rank": threads, "torch": torch.__version__,
                    "command": " ".join(["torchrun", *sys.argv]), "load_average_at_end": os.getloadavg()}  # fmt: skip
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
            print(f"written to {RESULTS}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
