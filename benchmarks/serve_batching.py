"""Serving concurrent clients: `gptlab serve`'s decoder batching requests against one request at a time.

Eight clients send a completion request each at the same moment (prompts of 9 to 16 tokens, 64 new
tokens, greedy, no early stop) to the real FastAPI app behind uvicorn on 127.0.0.1, the `bpe-mini`
preset (6 layers, 384 wide, GPT-2's vocabulary) with random weights. "one at a time" is the same server
with `batch_size` 1, the way it served before it batched. The two settings alternate, each repeat in a
fresh server, so that a busy machine slows both alike; each client's completion must be the same in
both. Prints completion tokens per second over all clients and the median client's wait, and writes
benchmarks/results/serve_batching.json.

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


def one_round(run, batch_size: int, prompts: list[list[int]], new_tokens: int) -> dict:
    """Every client's request at once to a fresh server; their completions, waits and the wall time."""
    import httpx

    from gptlab.config import GenerationConfig
    from gptlab.serve import create_app

    defaults = GenerationConfig(max_new_tokens=new_tokens, temperature=0.0, stop_at_eot=False, batch_size=batch_size)
    app = create_app(run, "bench", defaults)
    url, stop = serving(app)
    texts, waits = [None] * len(prompts), [0.0] * len(prompts)
    start = threading.Barrier(len(prompts) + 1)

    def client(i: int) -> None:
        with httpx.Client(timeout=600) as http:
            start.wait()
            began = time.perf_counter()
            reply = http.post(f"{url}/v1/completions", json={"prompt": prompts[i]}).json()
            waits[i] = time.perf_counter() - began
            texts[i] = reply["choices"][0]["text"]
            assert reply["usage"]["completion_tokens"] == new_tokens

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    stop()
    return {"wall": wall, "waits": waits, "texts": texts, "batches": list(app.state.batcher.batch_sizes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bpe-mini")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
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
    prompts = [torch.randint(0, 50_000, (16 - i % 8,), generator=generator).tolist() for i in range(args.clients)]
    settings = {"batched": args.clients, "one at a time": 1}
    one_round(run, 1, prompts[:1], 4)  # warm-up: kernels, lazy imports
    rounds: dict[str, list[dict]] = {name: [] for name in settings}
    for _ in range(args.repeats):
        for name, batch_size in settings.items():
            rounds[name].append(one_round(run, batch_size, prompts, args.new_tokens))

    tokens = args.clients * args.new_tokens
    summary = {}
    for name, results in rounds.items():
        wall = statistics.median(r["wall"] for r in results)
        summary[name] = {
            "tokens_per_second": tokens / wall,
            "median_wall_seconds": wall,
            "median_client_wait_seconds": statistics.median(statistics.median(r["waits"]) for r in results),
            "batches": results[-1]["batches"],
        }
    same = all(r["texts"] == rounds["one at a time"][0]["texts"] for rs in rounds.values() for r in rs)
    speedup = summary["batched"]["tokens_per_second"] / summary["one at a time"]["tokens_per_second"]

    print(f"{args.preset}, {args.clients} clients at once, {args.new_tokens} new tokens each, greedy, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")  # fmt: skip
    print(f"{'':16} {'tok/s':>8} {'wall s':>7} {'median wait s':>14}  batches")
    for name, row in summary.items():
        print(f"{name:16} {row['tokens_per_second']:8.1f} {row['median_wall_seconds']:7.2f} "
              f"{row['median_client_wait_seconds']:14.2f}  {row['batches']}")  # fmt: skip
    print(f"batched / one at a time: {speedup:.2f}x; same completions: {'yes' if same else 'NO'}")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "preset": args.preset, "clients": args.clients, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "threads": torch.get_num_threads(), "summary": summary, "speedup": speedup, "same_completions": same,
        "machine": describe(), "torch": torch.__version__,
        "load_average_at_end": os.getloadavg(),
    }  # fmt: skip
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
