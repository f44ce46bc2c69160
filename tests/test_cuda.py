"""The paths that only a GPU takes: bf16 autocast, torch.compile, the fused AdamW kernel, Muon's bf16
Newton-Schulz iterations and its step counts, the KV cache (with rows joining and leaving) and the
chunked loss, all on CUDA.

Skipped without CUDA. GPTLAB_TEST_DEVICE=cpu runs them on the CPU instead (bf16 falls back to fp32
there, compile is left out), which checks the tests themselves on a machine without a GPU:

    .venv/bin/python -m pytest tests/test_cuda.py                            # on a machine with CUDA
    GPTLAB_TEST_DEVICE=cpu .venv/bin/python -m pytest tests/test_cuda.py     # the same checks on the CPU
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from gptlab.config import GenerationConfig, GPTConfig, TrainConfig
from gptlab.generate import generate_ids
from gptlab.model import GPT, linear_cross_entropy
from gptlab.train import Runtime, build_optimizer, make_runtime, orthogonalize, train
from test_train import RandomWindows

DEVICE = os.environ.get("GPTLAB_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="needs CUDA (or GPTLAB_TEST_DEVICE=cpu to run on the CPU)")
CONFIG = GPTConfig(vocab_size=32, context_length=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


def device_config(**overrides) -> TrainConfig:
    fields = dict(max_steps=30, batch_size=8, learning_rate=3e-3, warmup_steps=2, eval_interval=10, log_interval=10,
                  eval_batches=1, peak_flops=1e12, seed=0, device=DEVICE, dtype="auto", threads=1)  # fmt: skip
    return TrainConfig(**{**fields, **overrides})


class DeviceWindows(RandomWindows):
    """RandomWindows, evaluated on the run's device."""

    def evaluate(self, model, runtime):
        x, y = self._batch(torch.Generator().manual_seed(123))
        return {"val_loss": model(x.to(runtime.device), y.to(runtime.device)).float().item()}


def run(tmp_path, config: TrainConfig, resume_from=None):
    runtime = make_runtime(config)
    torch.manual_seed(0)
    model = GPT(CONFIG).to(runtime.device)
    wrap = torch.compile if config.compile else None
    result = train(model, DeviceWindows(), config, tmp_path, runtime, resume_from=resume_from, wrap_model=wrap)
    return result, model, runtime


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("compile", [False, True])
def test_training_on_the_device_lowers_the_loss(tmp_path, optimizer, compile):
    if compile and DEVICE != "cuda":
        pytest.skip("torch.compile is exercised on CUDA only here (it takes a minute on the CPU)")
    config = device_config(optimizer=optimizer, compile=compile)
    result, model, runtime = run(tmp_path, config)
    assert runtime.device.type == DEVICE
    if DEVICE == "cuda" and torch.cuda.is_bf16_supported():
        assert runtime.autocast_dtype == torch.bfloat16
    assert all(p.device.type == DEVICE and p.dtype == torch.float32 for p in model.parameters())  # fp32 masters
    records = [r for r in map(eval_record, (tmp_path / "metrics.jsonl").read_text().splitlines()) if r]
    assert records[-1] < records[0] - 0.5, records  # the stream repeats: the loss falls fast


def eval_record(line: str) -> float | None:
    record = json.loads(line)
    return record["val_loss"] if record.get("split") == "val" else None


def test_adamw_is_fused_on_the_device():
    model = GPT(CONFIG).to(DEVICE)
    optimizer = build_optimizer(model, device_config(), torch.device(DEVICE))
    assert all(group["fused"] for group in optimizer.param_groups)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_resumed_run_on_the_device_ends_where_the_straight_one_does(tmp_path, optimizer):
    # The optimizer's state comes back from a CPU checkpoint; the fused kernel needs its step counts on
    # the device. fp32, so that only the kernels' own nondeterminism separates the two runs.
    config = device_config(optimizer=optimizer, max_steps=8, eval_interval=4, dtype="fp32", keep_checkpoints=10)
    _, straight, _ = run(tmp_path / "straight", config)
    midway = tmp_path / "straight" / "checkpoints" / "step-0000004"
    _, resumed, _ = run(tmp_path / "resumed", config, resume_from=midway)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_muons_iterations_run_in_bf16_on_cuda_and_return_the_input_dtype(monkeypatch):
    from gptlab import train as train_module

    seen = []
    for name in ("newton_schulz", "newton_schulz_gram"):  # the direct form on CUDA, the Gram form on CPUs
        original = getattr(train_module, name)
        monkeypatch.setattr(train_module, name, lambda x, steps, f=original: seen.append(x.dtype) or f(x, steps))
    torch.manual_seed(0)
    updates = torch.randn(3, 64, 160, device=DEVICE)
    directions = orthogonalize(updates)
    assert seen == [torch.bfloat16 if DEVICE == "cuda" else torch.float32]
    assert directions.dtype == torch.float32 and directions.device.type == DEVICE
    singular = torch.linalg.svdvals(directions.float().cpu())
    # bf16 rounds the iterations (CUDA); fp32 on the CPU: both land in the band Muon needs.
    assert singular.min() > 0.5 and singular.max() < 1.3


def test_cached_greedy_decoding_on_the_device_equals_the_uncached_loop():
    torch.manual_seed(0)
    model = GPT(CONFIG).to(DEVICE).eval()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    cached = generate_ids(model, prompts, GenerationConfig(temperature=0.0, max_new_tokens=20, batch_size=2))
    uncached = generate_ids(
        model, prompts, GenerationConfig(temperature=0.0, max_new_tokens=20, batch_size=2, use_cache=False)
    )
    assert cached == uncached


def test_rows_joining_and_leaving_on_the_device_decode_as_they_would_alone():
    """Continuous batching on the device: the KV cache's allocated rows, joins (shorter and longer
    newcomers), leaves and compaction, and the module-free decoding step, against each prompt alone."""
    from gptlab.generate import decode_rows

    torch.manual_seed(0)
    model = GPT(CONFIG).to(DEVICE).eval()
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    settings = [GenerationConfig(temperature=0.0, max_new_tokens=n) for n in (3, 9, 5, 8, 4)]
    alone = [generate_ids(model, [p], config)[0] for p, config in zip(prompts, settings, strict=True)]
    waiting = list(zip(range(len(prompts)), prompts, settings, strict=True))
    out: dict[int, list[int]] = {}

    def take(room):
        chosen = waiting[:room]
        del waiting[:room]
        return chosen

    for key, token, _ in decode_rows(model, GenerationConfig(temperature=0.0, batch_size=2), take, set()):
        out.setdefault(key, []).append(token)
    assert [out[i] for i in range(len(prompts))] == alone


def test_the_chunked_loss_on_the_device_equals_cross_entropy(monkeypatch):
    from gptlab import model as model_module

    monkeypatch.setattr(model_module, "LOSS_CHUNK_ELEMENTS", 10 * 1000)  # chunks of 10 rows
    torch.manual_seed(0)
    hidden = torch.randn(64, 32, device=DEVICE, requires_grad=True)
    weight = torch.randn(1000, 32, device=DEVICE, requires_grad=True)
    targets = torch.randint(0, 1000, (64,), device=DEVICE)
    chunked = linear_cross_entropy(hidden, weight, targets)
    plain = F.cross_entropy(hidden @ weight.t(), targets)
    torch.testing.assert_close(chunked, plain)
    chunked_grads = torch.autograd.grad(chunked, (hidden, weight))
    plain_grads = torch.autograd.grad(plain, (hidden, weight))
    for a, b in zip(chunked_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 autocast runs on CUDA (a CPU without bf16 units trains in fp32)")
def test_runtime_autocast_keeps_the_loss_in_fp32():
    runtime = Runtime(torch.device(DEVICE), torch.bfloat16)
    model = GPT(CONFIG).to(DEVICE)
    x = torch.randint(0, 32, (2, 16), device=DEVICE)
    with runtime.autocast():
        loss = model(x, x)
    assert loss.dtype == torch.float32
