"""The one training loop. Pretraining and every finetuning mode run through `train`, each with its own
objective (gptlab.objectives): the objective supplies micro-batches, the loss on one, and evaluation.

Around the loop: device and precision choice, AdamW with decoupled weight decay on matrices only (or
Muon for the blocks' matrices), warm-up then cosine schedule, gradient accumulation and clipping,
progress lines, metrics as JSON lines with a loss-curve PNG, atomic checkpoints, and exact resume.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.optim.adamw import adamw as adamw_update

from gptlab import checkpoint as ckpt
from gptlab import distributed
from gptlab.config import TASK_DEFAULTS, TrainConfig
from gptlab.errors import GptlabError
from gptlab.machine import (
    configure_allocator,
    configure_threads,
    cpu_has_bf16,
    measure_peak_flops,
    onednn_pays,
    physical_cores,
    synchronize,
)
from gptlab.model import release_loss_buffers

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class Objective(Protocol):
    """What the loop trains on. Implementations live in gptlab.objectives."""

    tokens_per_batch: int  # tokens in one training micro-batch (for throughput and accumulation)
    flops_per_token: float  # training FLOPs per token of the model (for MFU)

    def next_batch(self) -> dict[str, torch.Tensor]: ...

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def evaluate(self, model: torch.nn.Module, runtime: Runtime) -> dict[str, float]: ...

    def samples(self, model: torch.nn.Module, runtime: Runtime) -> list[str]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# ---------------------------------------------------------------- device, precision, threads


@dataclass
class Runtime:
    """Where and how the computation runs: device, autocast dtype, and this process's rank."""

    device: torch.device
    autocast_dtype: torch.dtype | None = None
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        non_blocking = self.device.type == "cuda"
        return {k: v.to(self.device, non_blocking=non_blocking) for k, v in batch.items()}


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA, then MPS, then the CPU; an explicit device that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = name.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise GptlabError("device 'cuda' requested but CUDA is not available; use the cpu device (or auto)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise GptlabError("device 'mps' requested but MPS is not available; use the cpu device (or auto)")
    if kind not in ("cpu", "cuda", "mps"):
        raise GptlabError(f"unknown device {name!r}; use auto, cpu, cuda or mps")
    return torch.device(name)


def resolve_autocast(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `dtype` on `device`, or None for plain fp32.

    `auto` is bf16 on CUDA (when supported) and fp32 elsewhere; `bf16` on a CPU without bf16 units
    falls back to fp32, since emulated bf16 is slower than fp32 there.
    """
    if dtype not in ("auto", "fp32", "bf16"):
        raise GptlabError(f"unknown dtype {dtype!r}; use auto, fp32 or bf16")
    if dtype == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if dtype == "bf16" and (device.type == "mps" or cpu_has_bf16()):
        return torch.bfloat16
    return None


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- optimizer and schedule

OPTIMIZERS = ("adamw", "muon")


def build_optimizer(
    model: torch.nn.Module, config: TrainConfig, device: torch.device, data_parallel: bool = False
) -> torch.optim.Optimizer:
    """AdamW that decays matrices only (biases and norms never, embeddings as configured); with
    `train.optimizer muon`, the blocks' weight matrices go to Muon instead and the rest stays on AdamW.
    `data_parallel`: the ranks of the process group train this model together (DDP or FSDP), so
    Muon splits its work among them."""
    matrices = muon_matrices(model) if config.optimizer == "muon" else []
    if config.optimizer == "muon" and not matrices:
        raise GptlabError(
            "train.optimizer muon has no weight matrices to train here (the blocks are frozen; LoRA's adapters and "
            "heads stay on AdamW); use --train.optimizer adamw"
        )
    on_muon = {id(p) for p in matrices}
    embedding_params = {
        id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding) and not config.decay_embeddings
    }
    decay, no_decay, seen = [], [], set(on_muon)
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (decay if param.dim() >= 2 and id(param) not in embedding_params else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if not decay and not no_decay and not matrices:
        raise GptlabError("the model has no trainable parameters; check what is frozen")
    fused = fused_adamw(device, distributed.is_sharded(model))
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2), fused=fused)
    muon_group = {"params": matrices, "muon": True, "weight_decay": config.weight_decay}
    return Muon([muon_group, *groups], lr=config.learning_rate, momentum=config.muon_momentum,
                betas=(config.beta1, config.beta2), split_across_ranks=data_parallel)  # fmt: skip


def muon_matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable weights of the linear layers inside the transformer blocks, in model order: what
    Muon updates. Embeddings, the output head, biases and norms are not hidden matrices (and LoRA's
    adapters are not `nn.Linear` weights), so they stay on AdamW."""
    return [
        module.weight
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and "blocks" in name.split(".") and module.weight.requires_grad
    ]


NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic: a X + b (X X^T) X + c (X X^T)^2 X


def orthogonalize(updates: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The nearest semi-orthogonal matrices to a stack (L, rows, cols) of updates, approximately:
    Newton-Schulz iterations of a quintic that push every singular value towards 1 in a few steps
    (to about 0.7-1.2, enough for Muon). bf16 on GPUs, as Muon's authors run it; fp32 on CPUs, in the
    Gram form, which does the same arithmetic in fewer products. Without bf16 units bf16 is emulated
    and 15x slower; with AMX the products alone are 2x faster in bf16, but the tinyshakespeare recipe's
    steps were slower (53.8 against 44.6 ms: the conversions of small stacks) and its loss no better
    (docs/benchmarks.md)."""
    wide = updates.size(-2) <= updates.size(-1)
    x = (updates if wide else updates.mT).to(iteration_dtype(updates.device))  # work on the shorter side
    x = newton_schulz(x, steps) if updates.is_cuda else newton_schulz_gram(x, steps)
    return (x if wide else x.mT).to(updates.dtype)


def iteration_dtype(device: torch.device) -> torch.dtype:
    """What `orthogonalize` computes in: bf16 on GPUs, fp32 on CPUs (see orthogonalize)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def newton_schulz(x: torch.Tensor, steps: int) -> torch.Tensor:
    """The iterations on wide matrices (rows <= cols): X <- a X + (b A + c A^2) X with A = X X^T."""
    a, b, c = NEWTON_SCHULZ
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2
        x = torch.baddbmm(x, poly, x, beta=a)
    return x


def newton_schulz_gram(x: torch.Tensor, steps: int) -> torch.Tensor:
    """The same iterations carried out on the (rows x rows) Gram matrix G = X0 X0^T of wide matrices.

    Every iterate is X_k = Q_k X0 with Q_k a polynomial in G, so Q_k is symmetric and A_k = Q_k G Q_k:
    the loop updates Q (four rows^3 products a step) and X0 is multiplied once at the end, instead of
    two rows^2 x cols products a step. For char-small's 16 matrices that is 30% less time (21.8 ->
    15.5 ms on 2 threads), with results equal to 2e-6 in fp32 (bf16 would lose too much in G's products)."""
    a, b, c = NEWTON_SCHULZ
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    gram = x @ x.mT
    poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # the first step, from Q_0 = I: A_0 = G
    q = poly + a * torch.eye(gram.size(-1), dtype=gram.dtype, device=gram.device)
    for _ in range(steps - 1):
        a_k = q @ (gram @ q)
        poly = torch.baddbmm(a_k, a_k, a_k, beta=b, alpha=c)
        q = torch.baddbmm(q, poly, q, beta=a)
    return q @ x


class Muon(torch.optim.Optimizer):
    """Muon ("MomentUm Orthogonalized by Newton-Schulz", Keller Jordan, 2024) for the groups marked
    `muon`, AdamW for the others, in one optimizer so that checkpoints hold one state.

    Muon keeps SGD momentum (Nesterov) per weight matrix and steps along the orthogonalised momentum,
    so that every direction of the update moves by the same amount instead of the few dominant ones;
    the step is scaled by sqrt(max(1, rows / cols)) to keep its per-entry size across shapes, and
    weight decay is decoupled, as in AdamW. Matrices of one shape are orthogonalised together
    (one batched product per iteration). PyTorch's own `torch.optim.Muon` runs the iterations in
    bf16 on every device, which a CPU without bf16 units emulates: its step on char-small's matrices
    takes 0.9 s on one thread of an AVX2 CPU, this one's 0.03 s (docs/benchmarks.md). Its weight
    decay is scaled by Muon's rate, as PyTorch's is. Under DDP and FSDP the ranks share the
    iterations (`split_across_ranks`); FSDP's row shards keep their own momentum, and their update is
    gathered whole for the iterations.
    """

    def __init__(self, groups, lr: float, momentum: float = 0.95, betas=(0.9, 0.95), eps: float = 1e-8,
                 ns_steps: int = 5, split_across_ranks: bool = False):  # fmt: skip
        defaults = {"lr": lr, "momentum": momentum, "betas": betas, "eps": eps, "ns_steps": ns_steps,
                    "weight_decay": 0.0, "muon": False}  # fmt: skip
        super().__init__(groups, defaults)
        # Every rank holds the same whole updates (DDP's all-reduced ones, or FSDP's gathered ones), so
        # each can orthogonalise a share of the matrices and gather the others' results.
        self.split_across_ranks = split_across_ranks

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # Checkpoints hold CPU tensors; torch.optim moves AdamW's step counts back to the parameters'
        # device only for optimizers it knows to be fused, and the fused kernel needs them there.
        for param, state in self.state.items():
            if "step" in state:
                state["step"] = state["step"].to(device=param.device, dtype=torch.float32)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ARG002 - the loop computes the loss itself
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon_step if group.get("muon") else self._adamw_step)(group, params)

    def _muon_step(self, group: dict, params: list[torch.Tensor]) -> None:
        by_shape: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buffer = state["momentum_buffer"].mul_(group["momentum"]).add_(p.grad)
            nesterov = p.grad.add(buffer, alpha=group["momentum"])
            by_shape.setdefault(tuple(p.shape), []).append((p, nesterov))
        # Whole matrices go in one round. FSDP's shards (DTensors) are gathered whole, since the
        # iterations need every row, in rounds of as many matrices as there are ranks (each rank
        # orthogonalises one), so that no rank holds more whole matrices than that at a time.
        if any(map(distributed.is_shard, params)):
            size = self._ranks()
            rounds = [[pairs[i : i + size]] for pairs in by_shape.values() for i in range(0, len(pairs), size)]
        else:
            rounds = [list(by_shape.values())]
        for shapes in rounds:
            stacks = [torch.stack([distributed.whole(u) for _, u in pairs]) for pairs in shapes]
            for pairs, directions in zip(shapes, self._orthogonalize(stacks, group["ns_steps"]), strict=True):
                rows, cols = pairs[0][0].shape
                step_size = group["lr"] * max(1.0, rows / cols) ** 0.5
                for (p, _), direction in zip(pairs, directions, strict=True):
                    weights, direction = distributed.own_rows(p, direction)
                    weights.mul_(1 - group["lr"] * group["weight_decay"])
                    weights.add_(direction, alpha=-step_size)

    def _ranks(self) -> int:
        """How many ranks share the iterations: the process group's, when asked to split."""
        return dist.get_world_size() if self.split_across_ranks and dist.is_initialized() else 1

    def _orthogonalize(self, stacks: list[torch.Tensor], steps: int) -> list[torch.Tensor]:
        """`orthogonalize` of each stack (L, rows, cols), split across the ranks when asked: of every
        stack rank r takes the r-th of equal slices (the last may be short), and one all-gather of all
        the slices, packed flat, returns every result to every rank. One collective, not one a shape:
        gloo's latency is about a millisecond each."""
        ranks = self._ranks()
        if ranks == 1:
            return [orthogonalize(stack, steps) for stack in stacks]
        rank = dist.get_rank()
        shares = [-(-stack.size(0) // ranks) for stack in stacks]
        dtype = iteration_dtype(stacks[0].device)  # the results' own precision: bf16 halves NCCL's traffic
        packed = []
        for stack, share in zip(stacks, shares, strict=True):
            mine = stack[rank * share : (rank + 1) * share]
            flat = (orthogonalize(mine, steps) if len(mine) else mine).to(dtype).flatten()
            packed.append(F.pad(flat, (0, share * stack[0].numel() - flat.numel())))
        packed = torch.cat(packed)
        gathered = packed.new_empty(ranks * packed.numel())
        dist.all_gather_single(gathered, packed)
        gathered = gathered.view(ranks, -1)
        results, offset = [], 0
        for stack, share in zip(stacks, shares, strict=True):
            size = share * stack[0].numel()
            results.append(gathered[:, offset : offset + size].reshape(-1, *stack.shape[1:])[: stack.size(0)].to(stack))
            offset += size
        return results

    def _adamw_step(self, group: dict, params: list[torch.Tensor]) -> None:
        for p in params:
            if not self.state[p]:
                self.state[p] = {
                    "step": torch.zeros((), dtype=torch.float32, device=p.device),
                    "exp_avg": torch.zeros_like(p),
                    "exp_avg_sq": torch.zeros_like(p),
                }
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw_update(
            params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [], [s["step"] for s in states], fused=fused_adamw(params[0].device, any(map(distributed.is_shard, params))),
            amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
            eps=group["eps"], maximize=False,
        )  # fmt: skip


def fused_adamw(device: torch.device, sharded: bool) -> bool | None:
    """The fused AdamW kernel: on a CPU 10x faster than the per-tensor loop AdamW uses there by default
    (docs/benchmarks.md); sharded (DTensor) parameters keep the default path on a CPU."""
    return device.type in ("cuda", "mps") or (device.type == "cpu" and not sharded) or None


def restore_optimizer(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    checkpoint: Path,
    state: dict[str, Any],
    config: TrainConfig,
) -> None:
    """Load the optimizer's state (moments, momentum, step counts) from a checkpoint; its settings
    (betas, momentum, weight decay) stay the config's, so --allow-config-change changes them."""
    saved = state.get("optimizer_kind", "adamw")  # checkpoints from before Muon were AdamW's
    if saved != config.optimizer:
        raise GptlabError(
            f"checkpoint {checkpoint} was trained with train.optimizer {saved}; resume with --train.optimizer "
            f"{saved}, or start a new run from its weights with --init-from"
        )
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    distributed.load_optimizer(model, optimizer, checkpoint, state)
    for group, configured in zip(optimizer.param_groups, settings, strict=True):
        group.update(configured)


def set_learning_rate(optimizer: torch.optim.Optimizer, step: int, config: TrainConfig) -> float:
    """Put the schedule's rate for `step` on every group (Muon's matrices at their own peak, scaled
    alike); the AdamW rate, which progress lines report."""
    lr = learning_rate(step, config)
    for group in optimizer.param_groups:
        group["lr"] = muon_rate(lr, config) if group.get("muon") else lr
    return lr


def muon_rate(lr: float, config: TrainConfig) -> float:
    """Muon's rate when AdamW's is `lr`: the schedule scales both peaks alike."""
    return lr * config.muon_learning_rate / config.learning_rate


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up to the peak, then cosine decay to `min_lr_ratio` of it at `max_steps`."""
    peak = config.learning_rate
    if config.warmup_steps and step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = peak * config.min_lr_ratio
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def accumulation_steps(config: TrainConfig, tokens_per_batch: int, world_size: int = 1) -> int:
    """Micro-batches per optimizer step to reach `tokens_per_step` across all ranks."""
    if not config.tokens_per_step:
        return 1
    per_round = tokens_per_batch * world_size
    if config.tokens_per_step < per_round:
        raise GptlabError(
            f"train.tokens_per_step {config.tokens_per_step} is smaller than one batch on all ranks "
            f"({per_round} tokens); lower train.batch_size or raise train.tokens_per_step"
        )
    if world_size > 1 and config.tokens_per_step % per_round:
        raise GptlabError(
            f"train.tokens_per_step {config.tokens_per_step} does not split evenly over {world_size} ranks of "
            f"{tokens_per_batch} tokens per batch; use a multiple of {per_round}"
        )
    return max(1, round(config.tokens_per_step / per_round))


def validate_train_config(config: TrainConfig) -> None:
    positive = ("max_steps", "batch_size", "eval_interval", "eval_batches", "log_interval")
    for name in positive:
        if getattr(config, name) <= 0:
            raise GptlabError(f"train.{name} must be positive, got {getattr(config, name)}")
    if config.learning_rate <= 0:
        raise GptlabError(f"train.learning_rate must be positive, got {config.learning_rate}")
    if not 0 <= config.min_lr_ratio <= 1:
        raise GptlabError(f"train.min_lr_ratio must be in [0, 1], got {config.min_lr_ratio}")
    if config.warmup_steps < 0 or config.weight_decay < 0 or config.grad_clip < 0:
        raise GptlabError("train.warmup_steps, train.weight_decay and train.grad_clip must not be negative")
    if not (0 <= config.beta1 < 1 and 0 <= config.beta2 < 1):
        raise GptlabError("train.beta1 and train.beta2 must be in [0, 1)")
    if config.optimizer not in OPTIMIZERS:
        raise GptlabError(f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got {config.optimizer!r}")
    if config.muon_learning_rate <= 0 or not 0 <= config.muon_momentum < 1:
        raise GptlabError("train.muon_learning_rate must be positive and train.muon_momentum in [0, 1)")


# ---------------------------------------------------------------- RNG state for exact resume


def rng_state() -> dict[str, Any]:
    import numpy as np

    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype("int64")), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype("uint32"), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- metrics and plots


class MetricsLog:
    """Metrics as JSON lines, one object per event, each with its step."""

    def __init__(self, path: Path):
        self.path = path

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:  # a line cut short by a kill
                continue
        return records

    def truncate_after(self, step: int) -> None:
        """Drop records a killed run wrote after its last checkpoint, so a resumed log has no duplicates."""
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        ckpt.atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def pyplot():
    """matplotlib's pyplot drawing to files (no window), imported on first use: it takes a second."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(records: list[dict[str, Any]], path: Path, tokens_per_step: float) -> None:
    """Train and validation loss against steps (bottom axis) and tokens (top axis), as a PNG."""
    plt = pyplot()

    train = [(r["step"], r["loss"]) for r in records if r.get("split") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("split") == "val" and "val_loss" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue", alpha=0.8)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss", color="tab:orange")
    unigram = [r["unigram_loss"] for r in records if "unigram_loss" in r]
    if unigram:  # the loss of token frequencies alone: what a model has to beat
        ax.axhline(unigram[-1], color="gray", linestyle="--", linewidth=1, label=f"unigram baseline {unigram[-1]:.2f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token)")
    top = ax.secondary_xaxis("top", functions=(lambda s: s * tokens_per_step, lambda t: t / max(tokens_per_step, 1e-9)))
    top.set_xlabel("tokens seen")
    _save_plot(fig, ax, path)


def _save_plot(fig, ax, path: Path) -> None:
    """Grid and legend, then the figure saved (`save_figure`)."""
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    """Lay out and write a figure as a PNG atomically (a viewer never sees half a file; a failed write
    leaves no temporary behind), then free it."""
    plt = pyplot()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)


PLOT_AXES = {"step": "optimizer step", "tokens": "tokens seen", "time": "training time (s)"}


def _plot_positions(records: list[dict[str, Any]], x: str, train: list[dict[str, Any]]) -> list[float]:
    """Where each record goes on the x axis; evaluations carry no time of their own, so theirs is the
    training records' elapsed time at that step."""
    import numpy as np

    if x in ("step", "tokens"):
        return [r[x] for r in records]
    steps, elapsed = [0, *(t["step"] for t in train)], [0.0, *(t["elapsed"] for t in train)]
    return [float(np.interp(r["step"], steps, elapsed)) for r in records]


def plot_runs(runs: dict[str, list[dict[str, Any]]], path: Path, x: str = "tokens", metric: str = "val_loss") -> dict:
    """Overlay runs' curves in one PNG: `metric` at each evaluation (and, for val_loss, the training loss
    faintly in the same colour) against steps, tokens or training time. Returns {run: (last, best)}.
    A name a run did not log is its validation metric: `accuracy` is a classifier's val_accuracy."""
    plt = pyplot()

    if x not in PLOT_AXES:
        raise GptlabError(f"the x axis must be one of {', '.join(PLOT_AXES)}, got {x!r}")
    fig, ax = plt.subplots(figsize=(9, 5), dpi=100)
    summary, logged = {}, metric
    for index, (name, records) in enumerate(runs.items()):
        train = [r for r in records if r.get("split") == "train"]
        validations = [r for r in records if r.get("split") == "val"]
        logged = metric if any(metric in r for r in validations) else f"val_{metric}"
        evals = [r for r in validations if logged in r]
        if not evals:
            known = sorted({k for r in validations for k in r} - {"step", "split", "tokens"})
            raise GptlabError(
                f"run {name} has no {metric!r} in its metrics; it has {', '.join(known) or 'no evaluations'}"
            )
        color = f"C{index % 10}"
        if logged == "val_loss" and train:
            xs = _plot_positions(train, x, train)
            ax.plot(xs, [r["loss"] for r in train], color=color, alpha=0.3, linewidth=1)
        values = [r[logged] for r in evals]
        ax.plot(_plot_positions(evals, x, train), values, "o-", color=color, markersize=3, label=name)
        higher_is_better = "accuracy" in metric
        summary[name] = (values[-1], max(values) if higher_is_better else min(values))
    ax.set_xlabel(PLOT_AXES[x])
    ax.set_ylabel(logged + (" (faint: training loss)" if logged == "val_loss" else ""))
    _save_plot(fig, ax, path)
    return summary


# ---------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    step: int
    train_loss: float
    best_val_loss: float
    last_eval: dict[str, float] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)
    elapsed: float = 0.0
    tokens_per_second: float = 0.0


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def train(
    model: torch.nn.Module,
    objective: Objective,
    config: TrainConfig,
    run_dir: str | Path,
    runtime: Runtime,
    resume_from: Path | None = None,
    log: Callable[[str], None] = lambda line: None,
    wrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    save_weights: Callable[[torch.nn.Module], dict[str, torch.Tensor]] | None = None,
    start_run: Callable[[], None] | None = None,
) -> TrainResult:
    """Train `model` on `objective` until `config.max_steps`, checkpointing into `run_dir`.

    `model` must already be on `runtime.device`. `resume_from` restores weights, optimizer, data
    position and RNG from a checkpoint so the run continues exactly. Under torchrun the model is wrapped
    in DDP or sharded by FSDP (gptlab.distributed); `wrap_model` wraps it further for the steps
    (torch.compile); `save_weights` picks what a checkpoint stores (LoRA: adapters). `start_run` (a
    `RunDirectory`'s `start`) runs on rank 0 once the loop's own checks have passed, before it writes.

    The run directory is locked against other commands (`checkpoint.lock_run`) from `start_run` to the end.
    """
    try:
        return _train_loop(
            model, objective, config, Path(run_dir), runtime, resume_from, log, wrap_model, save_weights, start_run
        )
    finally:
        ckpt.unlock_run(Path(run_dir))  # taken by start_run on rank 0; nothing to do elsewhere
        release_loss_buffers()  # so that what follows in this process (generation, evaluation) has the memory


def _train_loop(
    model, objective, config, run_dir: Path, runtime, resume_from, log, wrap_model, save_weights, start_run
) -> TrainResult:
    """The loop of `train`, given all of its arguments (typed and documented there)."""
    validate_train_config(config)
    metrics = MetricsLog(run_dir / METRICS_FILE)
    accum = accumulation_steps(config, objective.tokens_per_batch, runtime.world_size)
    tokens_per_step = objective.tokens_per_batch * accum * runtime.world_size
    save_weights = save_weights or (lambda m: m.state_dict())

    step, tokens_seen, elapsed_before, best_val = 0, 0, 0.0, math.inf
    state = None
    if resume_from is not None:
        state = ckpt.load_trainer_state(
            resume_from, require=("step", "tokens_seen", "elapsed", "best_val", "optimizer")
        )
    if state is not None:
        distributed.check_resume(state, runtime, tokens_per_step)
        ckpt.load_model_state(model, ckpt.load_weights(resume_from / ckpt.WEIGHTS_FILE, runtime.device), strict=False)
    # DDP or FSDP across the ranks; FSDP shards the parameters in place, so the optimizer comes after.
    stepper = distributed.parallelize(model, config, runtime)
    data_parallel = distributed.parallel_mode(config, runtime.world_size) != "none"
    optimizer = build_optimizer(model, config, runtime.device, data_parallel=data_parallel)
    if runtime.world_size > 1:
        torch.manual_seed(config.seed + runtime.rank)  # the weights agree already; dropout masks should not
    if start_run is not None:
        distributed.on_main(start_run, runtime)
    run_dir.mkdir(parents=True, exist_ok=True)
    if state is not None:
        restore_optimizer(model, optimizer, resume_from, state, config)
        objective.load_state_dict(distributed.own_state(state, "objective", runtime))
        set_rng_state(distributed.own_state(state, "rng", runtime))
        step, tokens_seen = state["step"], state["tokens_seen"]
        if step > config.max_steps:  # every rank reads the same step: all stop alike
            raise GptlabError(
                f"{resume_from} is at step {step}, past train.max_steps {config.max_steps}; resume with "
                f"--train.max_steps {step} or more (and --allow-config-change)"
            )
        elapsed_before, best_val = state["elapsed"], state["best_val"]
        if runtime.is_main:
            metrics.truncate_after(step)
            log(f"resumed from {resume_from} at step {step}")
            if state.get("world_size", 1) != runtime.world_size:
                log(f"on {runtime.world_size} rank(s) instead of {state.get('world_size', 1)}: the data order changes")

    if runtime.is_main and config.tokens_per_step and tokens_per_step != config.tokens_per_step:
        log(
            f"train.tokens_per_step {config.tokens_per_step:,} is not a whole number of batches: a step is "
            f"{accum} micro-batch(es) of about {objective.tokens_per_batch:,} tokens, {tokens_per_step:,} in all"
        )
    if runtime.is_main and 0 < config.max_steps < config.warmup_steps:
        log(
            f"train.max_steps {config.max_steps} ends within the warm-up of {config.warmup_steps} steps: the "
            "learning rate never reaches its peak; lower train.warmup_steps"
        )
    peak_flops = config.peak_flops or measure_peak_flops(runtime.device, runtime.autocast_dtype)
    if wrap_model is not None and runtime.device.type == "cpu":
        onednn_pays()  # chosen here, outside the compiled graphs, which take the choice as it stands
    stepper = wrap_model(stepper) if wrap_model else stepper
    if runtime.is_main:
        pyplot()  # now, not in the first evaluation: matplotlib's import swallows an interrupt that lands in it
    start_step, start_time = step, time.perf_counter()
    # The losses since the last log line: a resumed run logs the same means as one that never stopped.
    window_time, window_tokens, window_losses = time.perf_counter(), 0, list((state or {}).get("window_losses", []))
    last_eval: dict[str, float] = {}
    samples: list[str] = []
    train_loss = math.nan

    def save(best: bool) -> None:
        state = {
            "step": step,
            "tokens_seen": tokens_seen,
            "elapsed": elapsed_before + time.perf_counter() - start_time,
            "best_val": best_val,
            "world_size": runtime.world_size,
            "tokens_per_step": tokens_per_step,
            "optimizer_kind": config.optimizer,
            "window_losses": list(window_losses),
        }
        per_rank = {"objective": objective.state_dict(), "rng": rng_state()}
        distributed.save_checkpoint(
            run_dir, step, model, optimizer, save_weights(model), state, per_rank, runtime,
            keep=config.keep_checkpoints, best=best,
        )  # fmt: skip

    model.train()
    while step < config.max_steps:
        lr = set_learning_rate(optimizer, step, config)
        step_loss = torch.zeros((), device=runtime.device)
        for micro in range(accum):
            batch = runtime.to_device(objective.next_batch())
            with distributed.gradient_sync(stepper, micro == accum - 1), runtime.autocast():
                loss = objective.loss(stepper, batch) / accum
            loss.backward()
            step_loss += loss.detach()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        train_loss = distributed.mean_across_ranks(step_loss, runtime).item()
        if not math.isfinite(train_loss):
            kept = (
                f"the last good checkpoint is kept in {run_dir / ckpt.CHECKPOINTS}"
                if (run_dir / ckpt.CHECKPOINTS).is_dir() else "no checkpoint was written yet"
            )  # fmt: skip
            raise GptlabError(
                f"the training loss became {train_loss} at step {step + 1}; {kept}; lower train.learning_rate or "
                "check the data"
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        window_tokens += tokens_per_step
        window_losses.append(train_loss)

        if runtime.is_main and (step % config.log_interval == 0 or step == config.max_steps):
            synchronize(runtime.device)
            now = time.perf_counter()
            tokens_per_second = window_tokens / max(now - window_time, 1e-9)
            mfu = tokens_per_second * objective.flops_per_token / (peak_flops * runtime.world_size)
            elapsed = now - start_time
            left = elapsed / (step - start_step) * (config.max_steps - step)
            mean_loss = sum(window_losses) / len(window_losses)
            record = {
                "step": step, "split": "train", "loss": mean_loss, "lr": lr, "tokens": tokens_seen,
                "tokens_per_second": tokens_per_second, "mfu": mfu, "elapsed": elapsed_before + elapsed,
            }  # fmt: skip
            rates = f"lr {lr:.2e}"
            if config.optimizer == "muon":
                record["muon_lr"] = muon_rate(lr, config)
                rates += f" (Muon {record['muon_lr']:.2e})"
            metrics.append(record)
            log(
                f"step {step:>6}/{config.max_steps} | loss {mean_loss:.4f} | {rates} | "
                f"{tokens_per_second:,.0f} tok/s | MFU {mfu:.1%} | {format_duration(elapsed_before + elapsed)} "
                f"elapsed | {format_duration(left)} left"
            )
            window_time, window_tokens, window_losses = time.perf_counter(), 0, []

        evaluate_now = step % config.eval_interval == 0 or step == config.max_steps
        checkpoint_now = config.checkpoint_interval and step % config.checkpoint_interval == 0
        if evaluate_now:
            model.eval()
            with torch.no_grad(), runtime.autocast():
                last_eval = objective.evaluate(model, runtime)
                # Under FSDP every rank takes part in the forward passes of sampling.
                samples = objective.samples(model, runtime) if runtime.is_main or distributed.is_sharded(model) else []
            model.train()
            val_loss = last_eval.get("val_loss", math.inf)
            improved = val_loss < best_val
            best_val = min(best_val, val_loss)
            if runtime.is_main:
                metrics.append({"step": step, "split": "val", "tokens": tokens_seen, **last_eval})
                log(f"eval   {step:>6} | " + " | ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
                for sample in samples:
                    log(f"sample | {sample!r}")
                try:
                    plot_metrics(metrics.read(), run_dir / PLOT_FILE, tokens_per_step)
                except OSError as exc:  # the curve is for people; the checkpoint below decides whether the run goes on
                    log(f"could not draw {run_dir / PLOT_FILE} ({exc.strerror or exc}); training goes on")
            save(best=improved)
        elif checkpoint_now:
            save(best=False)

    total = elapsed_before + time.perf_counter() - start_time
    return TrainResult(
        step=step,
        train_loss=train_loss,
        best_val_loss=best_val,
        last_eval=last_eval,
        samples=samples,
        elapsed=total,
        tokens_per_second=(tokens_seen / total) if total else 0.0,
    )


# ---------------------------------------------------------------- runs: start, resume, pretrain


def make_runtime(config: TrainConfig) -> Runtime:
    """Device, precision and threads for a run; under torchrun also its rank, joining the process group."""
    world = distributed.world_from_env()
    configure_threads(config.threads or max(1, physical_cores() // world.local_world_size))
    configure_allocator()
    device = distributed.rank_device(resolve_device(config.device), world)
    autocast_dtype = resolve_autocast(config.dtype, device)
    runtime = Runtime(device, autocast_dtype, rank=world.rank, world_size=world.world_size)
    distributed.start(runtime, config)
    return runtime


@dataclass
class RunDirectory:
    """A run directory that passed `check_run_dir` and is not written to yet."""

    path: Path
    resume_from: Path | None  # the checkpoint to resume from; None for a fresh start
    # Makes the directory ready (rank 0). `train` calls it once the loop's own checks have passed, so that a
    # mistake found in the new run's config or data leaves no half-made run and never costs the replaced one.
    start: Callable[[], None]


def check_resumed_task(run_dir: str | Path, task: str) -> None:
    """Refuse to resume `run_dir` as a `task` run when it is a run of another task, or no run at all."""
    ckpt.check_resumable(run_dir)
    found = ckpt.read_run_config(run_dir).get("task") or "pretrain"  # runs from before `task` were pretraining
    if found != task:
        from gptlab.config import TASK_COMMANDS

        command = TASK_COMMANDS.get(found)
        how = f"resume it with `{command} --resume {run_dir}`" if command else f"it cannot resume as a {task} run"
        article = "an" if found[0] in "aeiou" else "a"
        raise GptlabError(f"{run_dir} is {article} {found} run; {how}")


def check_run_dir(
    run_dir: Path,
    config: dict[str, Any],
    runtime: Runtime,
    tokenizer,
    resume: bool,
    overwrite: bool,
    allow_config_change: bool,
    write_files: Callable[[], None] | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> RunDirectory:
    """Check on rank 0 that `run_dir` may take the run, writing nothing; every rank gets the checkpoint to
    resume from. The returned `start` replaces (or creates) a fresh run's directory and gives it its config,
    its tokenizer and `write_files()`; a resumed run that was stopped before its first checkpoint starts
    over, without the metrics of that attempt."""
    found = distributed.on_main(
        lambda: _check_run_dir(run_dir, config, resume, overwrite, allow_config_change), runtime
    )
    restart = resume and found is None
    if restart and runtime.is_main:
        log(f"{run_dir} holds no checkpoint (it stopped before its first): starting it over from step 0")

    def start() -> None:
        # The lock first: another command may have taken the run since the check (`train` lets go of it).
        ckpt.lock_run(run_dir)
        if restart:  # with --allow-config-change, the run starts over under the new config
            (run_dir / METRICS_FILE).unlink(missing_ok=True)
            ckpt.write_run_config(run_dir, config)
        if resume:
            return
        left = ckpt.run_files(run_dir)
        if left and not overwrite:  # made by another command since the check
            raise GptlabError(f"run directory {run_dir} was created by another command meanwhile; choose another --out")
        for path in left:  # --overwrite: all but the lock this command holds
            import shutil

            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        ckpt.write_run_config(run_dir, config)
        tokenizer.save(run_dir / "tokenizer")
        if write_files is not None:
            write_files()

    return RunDirectory(run_dir, found, start)


def _check_run_dir(
    run_dir: Path, config: dict[str, Any], resume: bool, overwrite: bool, allow_config_change: bool
) -> Path | None:
    """Refuse to clobber a run by accident; on resume, refuse a changed config. Returns the checkpoint to
    resume from (None for a fresh start, or a run stopped before its first checkpoint)."""

    from gptlab.config import config_differences

    if resume:
        stored = ckpt.read_run_config(run_dir)
        changed = [d for d in config_differences(stored, config) if not d.startswith("out_dir")]
        if changed and not allow_config_change:
            raise GptlabError(
                f"the config differs from the run's in {', '.join(changed)}; resume with the run's own config, "
                "or pass --allow-config-change"
            )
        try:
            return ckpt.find_checkpoint(run_dir)
        except GptlabError:
            steps = sorted(p.name for p in (run_dir / ckpt.CHECKPOINTS).glob("step-*") if p.is_dir())
            if steps:  # checkpoints without a pointer to them: never start over on top of them
                raise GptlabError(
                    f"{run_dir}/latest is missing or names no checkpoint, but {run_dir / ckpt.CHECKPOINTS} holds "
                    f"{', '.join(steps)}; write the name of the one to resume from into {run_dir}/latest"
                ) from None
            return None  # stopped before its first checkpoint
    ckpt.check_folder_path(run_dir, "the run directory")
    source = config.get("init_from")
    if source and run_dir.exists() and Path(source).resolve().is_relative_to(run_dir.resolve()):
        raise GptlabError(
            f"the weights to start from ({source}) lie inside the new run's directory {run_dir}, which the run "
            "would replace; write the new run elsewhere with --out"
        )
    if ckpt.run_files(run_dir) and not overwrite:
        raise GptlabError(
            f"run directory {run_dir} already exists; continue it with --resume {run_dir} "
            "or replace it with --overwrite"
        )
    return None


def init_weights_from(model: torch.nn.Module, source: str) -> Any:
    """Load the weights of run or checkpoint `source` into `model`; returns the source's run config."""
    checkpoint = ckpt.find_checkpoint(source)
    ckpt.load_model_state(model, ckpt.load_weights(checkpoint / ckpt.WEIGHTS_FILE))
    return ckpt.read_run_config(ckpt.run_dir_of(checkpoint))


def _check_same_text(checkpoint: Path, meta: dict[str, Any], source, allow_change: bool, log) -> None:
    """Refuse to resume on text other than the checkpoint's (edited or added files) unless allowed: the
    run would no longer continue exactly."""
    recorded = ckpt.load_trainer_state(checkpoint).get("objective", {}).get("source_sha256")
    if recorded is None or recorded == meta.get("source_sha256"):
        return
    what = f"the text of data.source {source or '(the embedded default corpus)'} changed since {checkpoint}"
    if not allow_change:
        raise GptlabError(f"{what}; restore it, or pass --allow-config-change to go on training on the new text")
    log(f"{what}: going on with the new text")


def pretrain(
    values: dict[str, Any],
    resume: bool = False,
    overwrite: bool = False,
    allow_config_change: bool = False,
    log: Callable[[str], None] = lambda line: None,
) -> tuple[TrainResult, Path]:
    """Pretrain a GPT by next-token prediction as the run config `values` describes.

    With `init_from`, training continues from another run's weights (and uses its tokenizer and
    model shape): continued pretraining for domain adaptation.
    """
    import dataclasses

    from gptlab.config import GPTConfig, check_task, finetuning_model_values, resolve_run_config, run_config_to_dict
    from gptlab.data import prepare_corpus, short_vocabulary_note
    from gptlab.model import GPT
    from gptlab.objectives import NextTokenObjective
    from gptlab.tokenizer import load_tokenizer

    values = {**TASK_DEFAULTS["pretrain"], **values}
    if not resume:  # a resumed run's task is checked against the run (check_resumed_task)
        check_task(values, "pretrain")
    run_dir = Path(values["out_dir"])
    tokenizer, init_config = None, None
    if resume:
        check_resumed_task(run_dir, "pretrain")
        tokenizer = load_tokenizer(run_dir / "tokenizer")
    elif values.get("init_from"):
        init_checkpoint = ckpt.find_checkpoint(values["init_from"])
        init_config = ckpt.read_run_config(ckpt.run_dir_of(init_checkpoint))
        tokenizer = load_tokenizer(ckpt.run_dir_of(init_checkpoint) / "tokenizer")
        data = dict(values.get("data") or {})
        if data.get("tokenizer", tokenizer.kind) != tokenizer.kind:
            raise GptlabError(
                f"data.tokenizer is {data['tokenizer']} but the run to start from, {init_checkpoint}, has a "
                f"{tokenizer.kind} tokenizer, which continued pretraining keeps; leave data.tokenizer out"
            )
        # The weights fix the model's shape (dropout may change) and the tokenizer; the config says so.
        model = finetuning_model_values(init_config["model"], values.get("model"), str(init_checkpoint))
        # Stored as an absolute checkpoint folder: a run directory's `latest` moves as that run goes on.
        values = {**values, "init_from": str(init_checkpoint.resolve()), "preset": None, "model": model,
                  "data": {**data, "tokenizer": tokenizer.kind}}  # fmt: skip
    source = (values.get("data") or {}).get("source")
    if not resume and source and Path(source).exists():  # absolute, so the run resumes and evaluates from anywhere
        values = {**values, "data": {**values["data"], "source": str(Path(source).resolve())}}
    config = resolve_run_config(values, ["model", "data", "train"])
    validate_train_config(config["train"])
    runtime = make_runtime(config["train"])
    log(
        f"preparing data ({config['data'].source or 'the embedded default corpus'}, {config['data'].tokenizer} tokenizer)"
    )
    with distributed.main_first(runtime):  # rank 0 fills the shared cache, the others then read it
        corpus = prepare_corpus(config["data"], tokenizer=tokenizer)
    note = short_vocabulary_note(config["data"], corpus.tokenizer) if tokenizer is None else None
    if note and runtime.is_main:
        log(note)
    if corpus.tokenizer.vocab_size > config["model"].vocab_size or init_config is None:
        config["model"] = dataclasses.replace(config["model"], vocab_size=corpus.tokenizer.vocab_size)
    model_config: GPTConfig = config["model"]
    stored = run_config_to_dict(config)
    run = check_run_dir(run_dir, stored, runtime, corpus.tokenizer, resume, overwrite, allow_config_change, log=log)
    if run.resume_from is not None:
        _check_same_text(run.resume_from, corpus.meta, config["data"].source, allow_config_change, log)

    seed_everything(config["train"].seed)
    model = GPT(model_config)
    if init_config is not None:
        init_weights_from(model, values["init_from"])
    model.to(runtime.device)
    log(
        f"model: {model.num_parameters():,} parameters ({model_config.n_layer} layers, width {model_config.n_embd}, "
        f"context {model_config.context_length}, vocabulary {model_config.vocab_size}); "
        f"{len(corpus.train_tokens):,} training tokens on {runtime.device}"
        + (f" with {runtime.autocast_dtype} autocast" if runtime.autocast_dtype else "")
    )
    objective = NextTokenObjective(
        corpus, model_config, config["data"], config["train"], rank=runtime.rank, world_size=runtime.world_size
    )
    wrap = torch.compile if config["train"].compile else None
    result = train(
        model, objective, config["train"], run_dir, runtime, resume_from=run.resume_from, log=log, wrap_model=wrap,
        start_run=run.start,
    )  # fmt: skip
    return result, run_dir
