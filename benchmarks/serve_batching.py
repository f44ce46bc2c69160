"""Serving concurrent clients: `gptlab serve`'s decoder batching requests against one request at a time.

Eight clients send a completion request each (prompts of 9 to 16 tokens, greedy, no early stop) to the
real FastAPI app behind uvicorn on 127.0.0.1, the `bpe-mini` preset (6 layers, 384 wide, GPT-2's
vocabulary) with random weights. Two scenarios:
- "at once": all at the same moment, 64 new tokens each. "batched" against "one at a time", the same
  server with `batch_size` 1, the way it served before it batched.
- "staggered": one request every 0.25 s, asking for 16 to 128 tokens. "continuous" (rows that end make
  room for requests that arrived meanwhile: the server's way) against "static" (the same server with
  `Batcher.joining` off: a batch keeps to the requests it started with, later ones wait for it to end).
- "queue": twice the clients at once, asking for 16 to 128 tokens, 4 decoded at a time: continuous
  against static batching.
The settings alternate, each repeat in a fresh server, so that a busy machine slows all alike; each
client's completion must be the same in every setting. Prints completion tokens per second over all
clients and the clients' waits, and writes benchmarks/results/serve_batching.json.

    .venv/bin/python benchmarks/serve_batching.py
    .venv/bin/python benchmarks/serve_batching.py --clients 4 --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from host import describe

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "serve_batching.json"
# GPT-2's tokenizer from the shared tiktoken cache when no other is set (no network needed).
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ROOT.parent / "shared" / "data" / "tiktoken-cache"))


def serving(app):
    """Start uvicorn with `app` on a free 127.0.0.1 port in a thread; returns (base URL, stop)."""
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)

    return f"http://127.0.0.1:{port}", stop


def one_round(
    run, batch_size: int, prompts: list[list[int]], new_tokens: list[int], delays: list[float], joining: bool = True
) -> dict:
    """Each client's request to a fresh server, `delays[i]` seconds after the start, for `new_tokens[i]`
    tokens; their completions, waits and the wall time. `joining` False: static batching."""
    import httpx

    from gptlab.config import GenerationConfig
    from gptlab.serve import create_app

    defaults = GenerationConfig(temperature=0.0, stop_at_eot=False, batch_size=batch_size)
    app = create_app(run, "bench", defaults)
    app.state.batcher.joining = joining
    url, stop = serving(app)
    texts, waits = [None] * len(prompts), [0.0] * len(prompts)
    start = threading.Barrier(len(prompts) + 1)

    def client(i: int) -> None:
        with httpx.Client(timeout=600) as http:
            start.wait()
            time.sleep(delays[i])
            began = time.perf_counter()
            body = {"prompt": prompts[i], "max_tokens": new_tokens[i]}
            reply = http.post(f"{url}/v1/completions", json=body).json()
            waits[i] = time.perf_counter() - began
            texts[i] = reply["choices"][0]["text"]
            assert reply["usage"]["completion_tokens"] == new_tokens[i]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    stop()
    batcher = app.state.batcher
    return {
        "wall": wall,
        "waits": waits,
        "texts": texts,
        "batches": list(batcher.batch_sizes),
        "joined": list(batcher.joined),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bpe-mini")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--gap", type=float, default=0.25, help="seconds between the staggered clients' requests")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()

    import torch

    from gptlab.config import get_preset
    from gptlab.model import GPT
    from gptlab.tokenizer import GPT2Tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT(get_preset(args.preset)).eval()
    run = SimpleNamespace(model=model, tokenizer=GPT2Tokenizer(), config={}, run_dir=Path("benchmark"))
    generator = torch.Generator().manual_seed(1)
    n = args.clients
    prompts = [torch.randint(0, 50_000, (16 - i % 8,), generator=generator).tolist() for i in range(n)]
    # Staggered: a request every `gap` seconds, asking for 16 to 128 tokens (a fixed mix), so that rows end
    # at different steps and later requests arrive while a batch runs.
    lengths = [16 * (1 + (5 * i) % 8) for i in range(2 * n)]
    scenarios = {  # prompts, new tokens, delays, {setting: (batch size, joining)}
        "at once": (prompts, [args.new_tokens] * n, [0.0] * n, {"batched": (n, True), "one at a time": (1, True)}),
        "staggered": (
            prompts,
            lengths[:n],
            [i * args.gap for i in range(n)],
            {"continuous": (n, True), "static": (n, False)},
        ),
        # Twice the clients at once, half of them at a time: a queue, which rows that end can make room in.
        "queue": (2 * prompts, lengths, [0.0] * 2 * n, {"continuous": (n // 2, True), "static": (n // 2, False)}),
    }
    one_round(run, 1, prompts[:1], [4], [0.0])  # warm-up: kernels, lazy imports
    rounds = {(scenario, name): [] for scenario, (*_, settings) in scenarios.items() for name in settings}
    for _ in range(args.repeats):
        for scenario, (asked, new_tokens, delays, settings) in scenarios.items():
            for name, (batch_size, joining) in settings.items():
                rounds[scenario, name].append(one_round(run, batch_size, asked, new_tokens, delays, joining))

    summary: dict[str, dict] = {}
    for (scenario, name), results in rounds.items():
        wall = statistics.median(r["wall"] for r in results)
        summary.setdefault(scenario, {})[name] = {
            "tokens_per_second": sum(scenarios[scenario][1]) / wall,
            "median_wall_seconds": wall,
            "median_client_wait_seconds": statistics.median(statistics.median(r["waits"]) for r in results),
            "longest_client_wait_seconds": statistics.median(max(r["waits"]) for r in results),
            "batches": results[-1]["batches"],
            "joined": results[-1]["joined"],
        }
    texts = {
        scenario: rounds[scenario, next(iter(settings))][0]["texts"] for scenario, (*_, settings) in scenarios.items()
    }
    same = all(r["texts"] == texts[scenario] for (scenario, _), rs in rounds.items() for r in rs)
    ratios = {
        "at once: batched / one at a time": summary["at once"]["batched"]["tokens_per_second"]
        / summary["at once"]["one at a time"]["tokens_per_second"],
        "staggered: continuous / static": summary["staggered"]["continuous"]["tokens_per_second"]
        / summary["staggered"]["static"]["tokens_per_second"],
        "queue: continuous / static": summary["queue"]["continuous"]["tokens_per_second"]
        / summary["queue"]["static"]["tokens_per_second"],
    }

    print(f"{args.preset}, {n} clients, greedy, {torch.get_num_threads()} threads, median of {args.repeats}; "
          f"at once: {args.new_tokens} new tokens each; staggered: one every {args.gap} s, {lengths[:n]} new tokens; "
          f"queue: {2 * n} at once, {n // 2} at a time, {lengths} new tokens")  # fmt: skip
    print(f"{'':28} {'tok/s':>8} {'wall s':>7} {'median wait s':>14} {'longest wait s':>15}  batches (joined)")
    for scenario, rows in summary.items():
        for name, row in rows.items():
            print(f"{scenario + ': ' + name:28} {row['tokens_per_second']:8.1f} {row['median_wall_seconds']:7.2f} "
                  f"{row['median_client_wait_seconds']:14.2f} {row['longest_client_wait_seconds']:15.2f}  "
                  f"{row['batches']} ({row['joined']})")  # fmt: skip
    for name, ratio in ratios.items():
        print(f"{name}: {ratio:.2f}x")
    print(f"same completions in every setting: {'yes' if same else 'NO'}")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "preset": args.preset, "clients": n, "new_tokens": args.new_tokens, "staggered_new_tokens": lengths,
        "gap_seconds": args.gap, "repeats": args.repeats, "threads": torch.get_num_threads(), "summary": summary,
        "ratios": ratios, "same_completions": same, "machine": describe(), "torch": torch.__version__,
        "load_average_at_end": os.getloadavg(),
    }  # fmt: skip
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
