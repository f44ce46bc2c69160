"""Model arithmetic without building the model: parameters, FLOPs, memory, KV cache, training time.

Torch-free, so `gptlab size gpt3-175b` answers instantly without allocating 700 GB.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptlab.config import GPTConfig, published_learning_rate


@dataclass
class ParameterCounts:
    token_embedding: int
    position_embedding: int
    attention: int  # all blocks
    mlp: int  # all blocks
    layer_norms: int  # all blocks and the final one
    lm_head: int  # 0 when tied to the token embedding; a classifier's labels x width
    adapters: int = 0  # LoRA's A and B matrices

    @property
    def total(self) -> int:
        return (
            self.token_embedding + self.position_embedding + self.attention + self.mlp + self.layer_norms
            + self.lm_head + self.adapters
        )  # fmt: skip

    @property
    def non_embedding(self) -> int:
        return self.total - self.token_embedding - self.position_embedding


@dataclass(frozen=True)
class RunModel:
    """What a finetuned run's model has beside its GPT shape, counted on the built model (see
    `gptlab.cli`'s `gptlab size` of a run): a classifier's head, LoRA's adapters, what trains."""

    labels: int = 0  # a classifier's outputs: its head replaces the vocabulary head
    adapters: int = 0  # LoRA's A and B matrices
    lora_rank: int = 0
    trainable: int | None = None  # parameters that train; None: all
    parts: Trainable | None = None  # what trains, for a step's FLOPs (None: everything)


def run_model(run_config: dict) -> RunModel | None:
    """What a run's model has beside its GPT shape (a classifier's head, LoRA's adapters, what trains), from
    its run config, counted on the model built as the run builds it on PyTorch's meta device (shapes
    only, nothing allocated); None for a GPT whose every weight trains. Imports torch, unlike the rest."""
    if run_config.get("task") != "classify" and not run_config.get("lora"):
        return None
    import torch

    from gptlab.checkpoint import build_model
    from gptlab.lora import ADAPTER_SUFFIXES, count_trainable

    with torch.device("meta"):
        model = build_model(run_config)
    if run_config.get("task") == "classify":
        from gptlab.classify import set_trainable
        from gptlab.config import ClassifyConfig, config_from_dict

        set_trainable(model, config_from_dict(ClassifyConfig, run_config.get("classify") or {}, where="classify."))
    trainable, _ = count_trainable(model)
    adapters = sum(p.numel() for name, p in model.named_parameters() if name.endswith(ADAPTER_SUFFIXES))
    rank = (run_config.get("lora") or {}).get("rank", 0)
    return RunModel(getattr(model, "num_labels", 0), adapters, rank, trainable, trainable_parts(model))


def count_parameters(config: GPTConfig, run: RunModel | None = None) -> ParameterCounts:
    C, L = config.n_embd, config.n_layer
    labels, adapters = (run.labels, run.adapters) if run else (0, 0)
    bias = int(config.bias)
    attention = L * (3 * C * C + 3 * C * int(config.qkv_bias) + C * C + C * bias)
    mlp = L * (8 * C * C + 5 * C * bias)
    layer_norms = (2 * L + 1) * (C + C * bias)
    return ParameterCounts(
        token_embedding=config.vocab_size * C,
        position_embedding=config.context_length * C,
        attention=attention,
        mlp=mlp,
        layer_norms=layer_norms,
        lm_head=labels * C if labels else 0 if config.tie_embeddings else config.vocab_size * C,
        adapters=adapters,
    )


def block_matrix_params(config: GPTConfig) -> int:
    """The weights of the blocks' four linear layers (QKV 3C^2, projection C^2, MLP 4C^2 twice): the
    matrix products of the forward pass besides the head, and what Muon trains."""
    return config.n_layer * 12 * config.n_embd * config.n_embd


def forward_flops_per_token(config: GPTConfig, sequence_length: int | None = None, logit_share: float = 1.0) -> int:
    """Forward FLOPs per token: 2 per multiply-add of every matrix (the LM head at the `logit_share` of
    positions whose logits are computed) plus attention.

    Attention scores and the weighted sum cost 2 * 2 * T * C per layer and token; like PaLM's MFU
    convention we count the full T x T product, not the causal half.
    """
    T = sequence_length or config.context_length
    C, L = config.n_embd, config.n_layer
    matmul_params = block_matrix_params(config) + logit_share * config.vocab_size * C
    return round(2 * matmul_params + 4 * L * T * C)


@dataclass(frozen=True)
class Trainable:
    """What of a model trains, as far as the FLOPs of a training step go."""

    blocks: float = 1.0  # the share of the blocks' matrix weights that train (LoRA freezes all of them)
    reach: float = 1.0  # the share of the blocks the backward pass goes through, down to the lowest that trains
    head: bool = True  # whether the LM head trains (GPT-2 ties it to the token embedding)


ALL_TRAINS = Trainable()  # pretraining, and finetuning every weight


def trainable_parts(model) -> Trainable:
    """What of a GPT (or a GPT classifier) trains, from its parameters' `requires_grad`."""

    def trains(module) -> bool:
        return any(p.requires_grad for p in module.parameters())

    # The blocks' matrices, not LoRA's small adapters beside them (lora_A, lora_B).
    weights = [(p.numel(), p.requires_grad) for block in model.blocks for name, p in block.named_parameters()
               if p.dim() == 2 and name.endswith("weight")]  # fmt: skip
    blocks = sum(n for n, trained in weights if trained) / max(1, sum(n for n, _ in weights))
    depth = len(model.blocks)
    lowest = 0 if trains(model.token_embedding) or trains(model.position_embedding) else depth
    lowest = min([lowest] + [i for i, block in enumerate(model.blocks) if trains(block)])
    return Trainable(blocks, (depth - lowest) / max(1, depth), model.lm_head.weight.requires_grad)


def train_flops_per_token(
    config: GPTConfig, sequence_length: int | None = None, logit_share: float = 1.0, trainable: Trainable = ALL_TRAINS
) -> int:
    """A training step: the forward pass, the backward pass to each layer's inputs (as many FLOPs), and
    the weight gradients (2 per multiply-add of a weight that trains); attention's backward is twice its
    forward. With everything training and every position's logits, three times the forward pass.

    `logit_share` is the share of positions whose logits are computed (instruction and preference
    losses skip those without a target; a classifier computes none); `trainable` says what trains
    (`trainable_parts`): frozen weights need no gradient, and the backward pass stops below the
    lowest block that trains.
    """
    T = sequence_length or config.context_length
    blocks, head = block_matrix_params(config), logit_share * config.vocab_size * config.n_embd
    attention = 4 * config.n_layer * T * config.n_embd
    forward = 2 * (blocks + head) + attention
    to_inputs = 2 * blocks * trainable.reach + 2 * attention * trainable.reach + (2 * head if trainable.reach else 0)
    weight_gradients = 2 * (blocks * trainable.blocks + head * trainable.head)
    return round(forward + to_inputs + weight_gradients)


def kv_cache_bytes_per_token(config: GPTConfig, bytes_per_value: int = 2) -> int:
    return 2 * config.n_layer * config.n_embd * bytes_per_value


BYTES_PER_VALUE = {"fp32": 4, "bf16": 2}


def training_memory_bytes(n_params: int, trainable: int | None = None) -> dict[str, dict[str, int]]:
    """Weights, gradients and AdamW's two moments (of the `trainable` parameters only, when not all), in fp32
    and in bf16."""
    trained = n_params if trainable is None else trainable
    return {
        dtype: {"weights": n_params * size, "gradients": trained * size, "adamw_states": 2 * trained * size}
        for dtype, size in BYTES_PER_VALUE.items()
    }


def muon_state_bytes(config: GPTConfig, n_params: int) -> dict[str, int]:
    """Optimizer state with `train.optimizer muon`: one momentum buffer for each block matrix (the
    12 C^2 weights of a block's four linear layers), AdamW's two moments for every other parameter."""
    matrices = block_matrix_params(config)
    return {dtype: (matrices + 2 * (n_params - matrices)) * size for dtype, size in BYTES_PER_VALUE.items()}


def gpu_hours(flops_per_token: float, tokens: float, peak_flops: float, mfu: float) -> float:
    """Device-hours to train on `tokens` at `mfu` of a device's `peak_flops` FLOP/s."""
    return flops_per_token * tokens / (peak_flops * mfu) / 3600.0


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M'; bytes with unit='B' use binary prefixes."""
    if unit == "B":
        for prefix in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(n) < 1024 or prefix == "TiB":
                return f"{n:.2f} {prefix}" if prefix != "B" else f"{int(n)} B"
            n /= 1024
    for prefix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{prefix}"
    return f"{n:.0f}"


def size_report(
    config: GPTConfig, tokens: float = 300e9, peak_flops: float = 989e12, mfu: float = 0.4, run: RunModel | None = None
) -> dict[str, object]:
    """Everything `gptlab size` prints, as data; `run` describes a finetuned run's model."""
    run = run or RunModel()
    counts = count_parameters(config, run)
    # A classifier computes no vocabulary logits: its head's few products are left out, as in its MFU.
    logit_share = 0.0 if run.labels else 1.0
    forward = forward_flops_per_token(config, None, logit_share)
    train_flops = train_flops_per_token(config, None, logit_share, run.parts or ALL_TRAINS)
    return {
        "config": config,
        "run": run,
        "parameters": counts,
        "trainable_parameters": counts.total if run.trainable is None else run.trainable,
        "forward_flops_per_token": forward,
        "train_flops_per_token": train_flops,
        "memory": training_memory_bytes(counts.total, run.trainable),
        "muon_state_bytes": muon_state_bytes(config, counts.total),
        "kv_cache_bytes_per_token": {
            dtype: kv_cache_bytes_per_token(config, size) for dtype, size in BYTES_PER_VALUE.items()
        },
        "published_learning_rate": published_learning_rate(config),
        "tokens": tokens,
        "peak_flops": peak_flops,
        "mfu": mfu,
        "gpu_hours": gpu_hours(train_flops, tokens, peak_flops, mfu),
    }


def format_size_report(report: dict[str, object]) -> str:
    config: GPTConfig = report["config"]  # type: ignore[assignment]
    counts: ParameterCounts = report["parameters"]  # type: ignore[assignment]
    run: RunModel = report["run"]  # type: ignore[assignment]
    trainable: int = report["trainable_parameters"]  # type: ignore[assignment]
    if run.labels:
        head = ("  classifier head", f"{counts.lm_head:,} ({run.labels} labels)")
    else:
        head = (
            "  LM head",
            f"{counts.lm_head:,}" + (" (tied to the token embedding)" if config.tie_embeddings else ""),
        )
    rows = [
        ("shape", f"{config.n_layer} layers, {config.n_head} heads, width {config.n_embd}, "
                  f"context {config.context_length}, vocabulary {config.vocab_size}"),
        ("parameters, total", f"{counts.total:,} ({human(counts.total)})"),
        ("parameters, non-embedding", f"{counts.non_embedding:,} ({human(counts.non_embedding)})"),
        ("  token embedding", f"{counts.token_embedding:,}"),
        ("  position embedding", f"{counts.position_embedding:,}"),
        ("  attention (all blocks)", f"{counts.attention:,}"),
        ("  MLP (all blocks)", f"{counts.mlp:,}"),
        ("  LayerNorms", f"{counts.layer_norms:,}"),
        head,
    ]  # fmt: skip
    if run.adapters:
        rows.append(("  LoRA adapters", f"{counts.adapters:,} (rank {run.lora_rank})"))
    if trainable != counts.total:
        rows.append(("parameters, trainable", f"{trainable:,} ({trainable / counts.total:.2%})"))
    rows += [
        ("FLOPs per token, forward", f"{human(report['forward_flops_per_token'])}"),
        ("FLOPs per token, training step", f"{human(report['train_flops_per_token'])}"),
    ]  # fmt: skip
    for dtype, parts in report["memory"].items():  # type: ignore[union-attr]
        total = sum(parts.values())
        rows.append(
            (f"memory {dtype}: weights / grads / AdamW", " / ".join(human(v, "B") for v in parts.values())
             + f"  (total {human(total, 'B')})")
        )  # fmt: skip
    muon = report["muon_state_bytes"]
    if trainable == counts.total:  # Muon trains the blocks' matrices: a run that freezes them has no such state
        rows.append(
            ("optimizer state with Muon, fp32 / bf16", f"{human(muon['fp32'], 'B')} / {human(muon['bf16'], 'B')}")
        )  # type: ignore[index]
    kv = report["kv_cache_bytes_per_token"]
    rows.append(("KV cache per token, fp32 / bf16", f"{human(kv['fp32'], 'B')} / {human(kv['bf16'], 'B')}"))  # type: ignore[index]
    if report["published_learning_rate"]:
        rows.append(
            ("peak learning rate (GPT-3 paper)", f"{report['published_learning_rate']:g}, the default for this size")
        )
    rows.append(
        (f"training on {human(report['tokens'])} tokens",
         f"{report['gpu_hours']:,.1f} device-hours at {human(report['peak_flops'])}FLOP/s peak, "
         f"{report['mfu']:.0%} MFU")
    )  # fmt: skip
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
