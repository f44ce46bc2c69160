"""Data-parallel training over the processes torchrun starts: the process group, DDP or FSDP2 applied
from outside the model, activation checkpointing per block, checkpoints every rank takes part in, and
errors that reach every rank so that none waits forever in a collective.

One process (no torchrun) runs plain: every function here is then a pass-through. The model stays free
of distributed code; everything is wrapped around it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from gptlab import checkpoint as ckpt
from gptlab.config import TrainConfig
from gptlab.errors import GptlabError
from gptlab.model import Block

if TYPE_CHECKING:
    from gptlab.train import Runtime

PARALLEL_MODES = ("auto", "ddp", "fsdp")
OPTIMIZER_DIR = "optimizer"  # an FSDP checkpoint's sharded optimizer state (torch.distributed.checkpoint)

T = TypeVar("T")

# ---------------------------------------------------------------- the world and the process group


@dataclass(frozen=True)
class World:
    """This process's place among the processes torchrun started (rank 0 of 1 without torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1


def world_from_env() -> World:
    """The World torchrun describes in RANK, LOCAL_RANK, WORLD_SIZE and LOCAL_WORLD_SIZE."""
    names = {
        "rank": "RANK",
        "local_rank": "LOCAL_RANK",
        "world_size": "WORLD_SIZE",
        "local_world_size": "LOCAL_WORLD_SIZE",
    }
    values = {}
    for field_name, variable in names.items():
        text = os.environ.get(variable, "1" if "size" in field_name else "0")
        if not text.isdigit():
            raise GptlabError(f"environment variable {variable}={text!r} is not a number; launch with torchrun")
        values[field_name] = int(text)
    world = World(**values)
    if world.world_size < 1 or not 0 <= world.rank < world.world_size:
        raise GptlabError(f"RANK {world.rank} is outside WORLD_SIZE {world.world_size}; launch with torchrun")
    return world


def rank_device(device: torch.device, world: World) -> torch.device:
    """The device this rank computes on: a CUDA device without an index becomes the local rank's GPU."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", world.local_rank)
    return device


def parallel_mode(config: TrainConfig, world_size: int) -> str:
    """`ddp`, `fsdp`, or `none` for one process; `auto` is DDP whenever several processes run."""
    if config.parallel not in PARALLEL_MODES:
        raise GptlabError(f"unknown train.parallel {config.parallel!r}; use {', '.join(PARALLEL_MODES)}")
    if world_size == 1:
        return "none"
    return "ddp" if config.parallel == "auto" else config.parallel


def start(runtime: Runtime, config: TrainConfig) -> None:
    """Join torchrun's process group (gloo for CPU tensors, NCCL for CUDA ones) and agree on the devices.

    Does nothing in one process. Refuses devices no distributed backend serves.
    """
    mode = parallel_mode(config, runtime.world_size)
    if mode == "none":
        return
    device = runtime.device
    if not dist.is_available():
        raise GptlabError(
            "this PyTorch build has no torch.distributed; install a build with it, or train on one process"
        )
    if device.type not in ("cpu", "cuda"):
        raise GptlabError(
            f"train.parallel {mode} needs CUDA (NCCL) or the CPU (gloo); {device.type} has no distributed backend, "
            "so train it on one process"
        )
    if device.type == "cuda" and not dist.is_nccl_available():
        raise GptlabError(f"train.parallel {mode} on CUDA needs NCCL, which this PyTorch lacks; use --train.device cpu")
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
        atexit.register(teardown)
    with all_or_none(runtime):
        if device.type == "cuda":
            count = torch.cuda.device_count()
            if device.index >= count:
                raise GptlabError(
                    f"{device} does not exist: this node has {count} GPU(s); launch at most --nproc-per-node {count}"
                )
            torch.cuda.set_device(device)


def teardown() -> None:
    """Leave the process group (at exit, or when a run is over)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- errors that reach every rank


def _describe(error: BaseException | None) -> str | None:
    if error is None:
        return None
    return str(error) if isinstance(error, GptlabError) else f"{type(error).__name__}: {error}"


def _raise_first(outcomes: list[str | None], error: BaseException | None) -> None:
    """Raise the first failure among the ranks' outcomes on this rank (a program error keeps its traceback)."""
    failures = [(rank, message) for rank, message in enumerate(outcomes) if message is not None]
    if not failures:
        return
    if error is not None and not isinstance(error, GptlabError):
        raise error
    rank, message = failures[0]
    raise GptlabError(message if rank == 0 else f"rank {rank}: {message}") from error


@contextlib.contextmanager
def all_or_none(runtime: Runtime) -> Iterator[None]:
    """Run the block on every rank; if it fails on any, it fails on all, with the first rank's message."""
    error = None
    try:
        yield
    except Exception as exc:
        if runtime.world_size == 1:
            raise
        error = exc
    if runtime.world_size == 1:
        return
    outcomes: list[str | None] = [None] * runtime.world_size
    dist.all_gather_object(outcomes, _describe(error))
    _raise_first(outcomes, error)


def on_main(work: Callable[[], T], runtime: Runtime) -> T:
    """`work()` on rank 0 only (creating the run directory, say); every rank gets its result or its error."""
    if runtime.world_size == 1:
        return work()
    result, error = None, None
    if runtime.is_main:
        try:
            result = work()
        except Exception as exc:
            error = exc
    message = [(result, _describe(error))]
    dist.broadcast_object_list(message, src=0)
    result, outcome = message[0]
    _raise_first([outcome], error)
    return result


@contextlib.contextmanager
def main_first(runtime: Runtime) -> Iterator[None]:
    """Rank 0 runs the block first (preparing a shared cache, say); the others run it once it has succeeded."""
    if runtime.world_size == 1:
        yield
        return
    if not runtime.is_main:
        message = [None]
        dist.broadcast_object_list(message, src=0)
        _raise_first(message, None)
        yield
        return
    try:
        yield
    except Exception as exc:
        dist.broadcast_object_list([_describe(exc)], src=0)
        raise
    dist.broadcast_object_list([None], src=0)


# ---------------------------------------------------------------- wrapping the model


# The attribute under which torch's checkpoint_wrapper holds a block; it also prefixes the wrapped
# parameters' names (the state dict strips it).
CHECKPOINT_WRAPPED = "_checkpoint_wrapped_module"


def _block_slots(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, child name) of every transformer block, checkpoint-wrapped or not."""
    slots = []
    for parent in model.modules():
        if hasattr(parent, CHECKPOINT_WRAPPED):
            continue  # the block inside a wrapper: its wrapper is the slot
        for name, child in parent.named_children():
            inner = getattr(child, CHECKPOINT_WRAPPED, child)
            if isinstance(inner, Block):
                slots.append((parent, name))
    return slots


def checkpoint_blocks(model: nn.Module) -> nn.Module:
    """Recompute each block's activations in the backward pass instead of storing them (in place).

    Gradients are unchanged (dropout masks are replayed from the saved RNG state); the state dict keeps
    its names, since the wrapper strips its own prefix.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, checkpoint_wrapper

    for parent, name in _block_slots(model):
        block = getattr(parent, name)
        if not isinstance(block, CheckpointWrapper):
            setattr(parent, name, checkpoint_wrapper(block))
    return model


def _shard(model: nn.Module, runtime: Runtime) -> None:
    """FSDP2: each block is one unit of all-gather and reduce-scatter, the root holds the rest."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    # Gather parameters in the autocast dtype (half the traffic), reduce gradients in fp32.
    policy = MixedPrecisionPolicy(param_dtype=runtime.autocast_dtype, reduce_dtype=torch.float32)
    for parent, name in _block_slots(model):
        fully_shard(getattr(parent, name), mesh=mesh, mp_policy=policy)
    # The root's parameters (embeddings, tied head) are needed again as soon as backward starts.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)


def parallelize(model: nn.Module, config: TrainConfig, runtime: Runtime) -> nn.Module:
    """The module to train with: activation checkpointing if asked, then DDP or FSDP2 across the ranks.

    FSDP shards `model` in place (build the optimizer afterwards); DDP returns a wrapper around it.
    """
    if config.activation_checkpointing:
        checkpoint_blocks(model)
    mode = parallel_mode(config, runtime.world_size)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        # The buffers (position ids) never change: synced once at the start, not before every forward.
        return DistributedDataParallel(
            model, device_ids=device_ids, forward_sync_buffers=False, gradient_as_bucket_view=True
        )
    if mode == "fsdp":
        _shard(model, runtime)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP shards the model: its parameters are shards (asked without importing FSDP, which
    costs a second in `gptlab generate`)."""
    return any(is_shard(param) for param in model.parameters())


def is_shard(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is FSDP's shard of a parameter (a DTensor), not a whole one."""
    return hasattr(tensor, "full_tensor")


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from the ranks if it is a shard (a collective: every rank calls it)."""
    return tensor.full_tensor() if is_shard(tensor) else tensor


def own_rows(param: torch.Tensor, update: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tensor to update in place for `param`, and the rows of the whole `update` that belong to it:
    all of them, or for an FSDP shard its local rows. FSDP gives rank r the rows from r * ceil(rows /
    ranks), as many as its shard holds (the last shards may be short or empty)."""
    if not is_shard(param):
        return param, update
    from torch.distributed.tensor import Shard

    if tuple(param.placements) != (Shard(0),):
        raise GptlabError(f"Muon updates parameters sharded by rows (FSDP's Shard(0)), not {param.placements}")
    mesh, local = param.device_mesh, param.to_local()
    start = min(mesh.get_local_rank() * -(-update.size(0) // mesh.size()), update.size(0))
    return local, update.narrow(0, start, local.size(0))


@contextlib.contextmanager
def gradient_sync(stepper: nn.Module, enabled: bool) -> Iterator[None]:
    """Within it, backward reduces gradients across ranks only if `enabled`: micro-steps before the last
    of an accumulated step only accumulate locally."""
    module = getattr(stepper, "_orig_mod", stepper)  # under torch.compile
    if enabled:
        yield
    elif hasattr(module, "no_sync"):  # DDP
        with module.no_sync():
            yield
    elif hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def mean_across_ranks(value: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """The mean of a scalar over the ranks (every rank gets it: they log and stop on the same loss)."""
    if runtime.world_size == 1:
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total / runtime.world_size


def mean_over_shares(
    compute: Callable[[Any], torch.Tensor], items: Sequence[Any], runtime: Runtime, sharded: bool = False
) -> torch.Tensor:
    """The mean of `compute(item)` (a scalar tensor) over all items, each rank computing its share of
    them (`spread_rows`)."""
    if not items:
        raise ValueError("mean_over_shares needs at least one item")
    values = spread_rows(lambda share: torch.stack([compute(item) for item in share]), items, runtime, sharded)
    return values.mean()


def spread_rows(
    compute: Callable[[Sequence[Any]], torch.Tensor], items: Sequence[Any], runtime: Runtime, sharded: bool = False
) -> torch.Tensor:
    """`compute(items)`, a tensor with one row per item, with the items spread over the ranks: each
    computes a contiguous share and every rank gets all the rows, in order. Every rank computes as
    many items (a short share is filled up with its last item, whose extra rows are dropped), so a
    model whose forward pass needs every rank (FSDP) stays in step. An error on one rank reaches all
    of them, unless `sharded` (the computation runs FSDP's collectives, where the other ranks wait:
    the rank then raises its own error)."""
    if runtime.world_size == 1 or not items:
        return compute(items)
    share = -(-len(items) // runtime.world_size)
    mine = list(items[runtime.rank * share : (runtime.rank + 1) * share])
    filled = mine + [mine[-1] if mine else items[0]] * (share - len(mine))
    with contextlib.nullcontext() if sharded else all_or_none(runtime):
        rows = compute(filled).cpu()  # the short shares are the last, so their filler rows follow every real row
    gathered = rows.new_empty(runtime.world_size * share, *rows.shape[1:])
    dist.all_gather_single(gathered, rows)  # CPU tensors go through gloo, also beside NCCL
    return gathered[: len(items)]


def spread_items(compute: Callable[[Sequence[Any]], Sequence[T]], items: Sequence[Any], runtime: Runtime) -> list[T]:
    """`compute(items)`, a list with one result per item (texts, records), with the items spread over
    the ranks as `spread_rows` spreads them; every rank gets every result, in order. For computations
    that need no other rank (not a sharded model's forward passes, whose number would differ between
    shares); an error on one rank reaches all of them."""
    if runtime.world_size == 1 or not items:
        return list(compute(items))
    share = -(-len(items) // runtime.world_size)
    with all_or_none(runtime):
        results = list(compute(items[runtime.rank * share : (runtime.rank + 1) * share]))
    gathered: list[list[T] | None] = [None] * runtime.world_size
    dist.all_gather_object(gathered, results)
    return [result for part in gathered for result in part or []]


# ---------------------------------------------------------------- checkpoints


def _full_weights(state: dict[str, torch.Tensor], runtime: Runtime) -> dict[str, torch.Tensor]:
    """The full tensors of a state dict whose values may be FSDP shards, on rank 0 (others get {})."""
    from torch.distributed.tensor import DTensor

    full: dict[str, torch.Tensor] = {}
    gathered: dict[int, torch.Tensor | None] = {}  # by storage, so a tied head is gathered (and stored) once
    for name, value in state.items():
        if not isinstance(value, DTensor):
            full[name] = value
            continue
        key = value.to_local().untyped_storage().data_ptr()  # a shard's own padded buffer, never empty
        if key not in gathered:
            tensor = value.full_tensor()  # a collective: every rank gathers the same tensors in the same order
            gathered[key] = tensor.cpu() if runtime.is_main else None
        full[name] = gathered[key]
    return full if runtime.is_main else {}


def _per_rank(values: dict[str, Any], runtime: Runtime) -> dict[str, Any]:
    """`values` of rank 0, plus every rank's under `<key>_ranks` (each rank has its own data position)."""
    if runtime.world_size == 1:
        return values
    gathered: list[Any] | None = [None] * runtime.world_size if runtime.is_main else None
    dist.gather_object(values, gathered, dst=0)
    if not runtime.is_main:
        return values
    return {**values, **{f"{key}_ranks": [ranks[key] for ranks in gathered] for key in values}}


def own_state(state: dict[str, Any], key: str, runtime: Runtime) -> Any:
    """This rank's saved `key` when the number of ranks is unchanged; else rank 0's (a new data order)."""
    ranks = state.get(f"{key}_ranks")
    if ranks is not None and len(ranks) == runtime.world_size:
        return ranks[runtime.rank]
    return state[key]


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    weights: dict[str, torch.Tensor],
    state: dict[str, Any],
    per_rank: dict[str, Any],
    runtime: Runtime,
    keep: int,
    best: bool,
) -> None:
    """Write a checkpoint; every rank calls it. Rank 0 writes full weights and the trainer state (with each
    rank's `per_rank` values); with FSDP every rank also writes its shard of the optimizer state.
    """
    sharded = is_sharded(model)
    staging = run_dir / ckpt.CHECKPOINTS / f".{ckpt.checkpoint_name(step)}.{OPTIMIZER_DIR}"
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        with all_or_none(runtime):
            if runtime.is_main:
                shutil.rmtree(staging, ignore_errors=True)
        dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=staging)
    state = {**state, "optimizer": {} if sharded else optimizer.state_dict(), **_per_rank(per_rank, runtime)}
    weights = _full_weights(weights, runtime)
    with all_or_none(runtime):
        if runtime.is_main:
            add_optimizer = (lambda folder: os.replace(staging, folder / OPTIMIZER_DIR)) if sharded else None
            ckpt.save_checkpoint(run_dir, step, weights, state, keep=keep, best=best, extra=add_optimizer)


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, checkpoint: Path, state: dict[str, Any]) -> None:
    """Restore the optimizer from a checkpoint: a sharded one reshards to any number of ranks (or none)."""
    sharded = checkpoint / OPTIMIZER_DIR
    if sharded.is_dir():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        template = {"optimizer": get_optimizer_state_dict(model, optimizer)}
        try:
            with warnings.catch_warnings():  # one process reading a sharded state is what we mean to do
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(template, checkpoint_id=sharded)
        except Exception as exc:
            raise GptlabError(
                f"checkpoint {checkpoint} has a damaged optimizer state ({str(exc).splitlines()[0]})"
            ) from None
        set_optimizer_state_dict(model, optimizer, template["optimizer"])
    elif is_sharded(model):
        raise GptlabError(
            f"checkpoint {checkpoint} holds a whole optimizer state (a DDP or one-process run); resume it with "
            "train.parallel ddp, or start an FSDP run from its weights with --init-from"
        )
    else:
        try:
            optimizer.load_state_dict(state["optimizer"])
        except ValueError as exc:  # other parameter groups: another train.optimizer, or other frozen weights
            raise GptlabError(
                f"checkpoint {checkpoint} holds the state of another optimizer ({str(exc).splitlines()[0]}); "
                "resume with the run's own train.optimizer, or start a new run from its weights with --init-from"
            ) from None


def check_resume(state: dict[str, Any], runtime: Runtime, tokens_per_step: int) -> None:
    """Refuse to resume on a different number of ranks when that would change the tokens per step."""
    saved_ranks, saved_tokens = state.get("world_size", 1), state.get("tokens_per_step")
    if saved_ranks != runtime.world_size and saved_tokens not in (None, tokens_per_step):
        raise GptlabError(
            f"the run trained on {saved_ranks} rank(s) with {saved_tokens} tokens per step, and {runtime.world_size} "
            f"rank(s) would make it {tokens_per_step}; resume on {saved_ranks} rank(s), or fix the step size with "
            f"--train.tokens_per_step {saved_tokens} --allow-config-change"
        )
