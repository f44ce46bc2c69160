"""Low-rank adapters (LoRA): train two small matrices beside each frozen linear layer, merge them in later.

A `LoRALinear` keeps the wrapped layer's own `weight` and `bias` Parameters under the same names and
adds `lora_A` (rank x in) and `lora_B` (out x rank). So a LoRA model's state dict is the base model's
plus `<layer>.lora_A` / `<layer>.lora_B`: base checkpoints load into it unchanged, and an adapted tied
LM head still shares its weight with the (frozen, untouched) token embedding.

On disk a LoRA run stays small. Its config.yaml holds `lora` (the LoRAConfig) and `init_from` (the
base checkpoint, best written as an absolute checkpoint-folder path so the base run training on does
not move it); each checkpoint's model.safetensors holds only `lora_state_dict(model)`.
`checkpoint.load_run` builds the wrapped model and lays the adapters over the base weights;
`gptlab lora merge` turns a LoRA run into a plain run.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gptlab import machine
from gptlab.config import GPTConfig, LoRAConfig, config_to_dict
from gptlab.errors import GptlabError
from gptlab.model import Linear

ADAPTER_SUFFIXES = (".lora_A", ".lora_B")


class LoRALinear(nn.Module):
    """A linear layer plus a low-rank update: y = x W^T + b + dropout(x) A^T B^T * alpha / rank."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features, self.rank = linear.in_features, linear.out_features, rank
        self.scaling = alpha / rank
        # The very Parameters of the wrapped layer: same state-dict names, and a tied head stays tied.
        self.weight = linear.weight
        self.bias = linear.bias
        factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        # A as nn.Linear initialises its weight, B zero: training starts from the base model exactly.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)  # (..., rank) -> (..., out)
        return machine.linear(x, self.weight, self.bias) + update * self.scaling

    def matmul_operands(self, x):
        """(inputs, weight) whose product inputs @ weight^T is this layer's output less its bias, for a loss
        that takes the head's weight (the GPT's chunked cross-entropy): [x, s * dropout(x) A^T] @ [W, B]^T."""
        update_input = F.linear(self.dropout(x), self.lora_A) * self.scaling  # (..., rank)
        return torch.cat([x, update_input], dim=-1), torch.cat([self.weight, self.lora_B], dim=1)

    def delta_weight(self) -> torch.Tensor:
        """The update as a full matrix (out, in), computed in fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def merged(self) -> Linear:
        """A plain linear layer with the update folded into a new weight; this layer's weight is not touched."""
        linear = Linear(self.in_features, self.out_features, bias=False, device="meta")
        weight = (self.weight.float() + self.delta_weight()).to(self.weight.dtype)
        linear.weight = nn.Parameter(weight.detach())
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _short_name(name: str) -> str:
    """A module name without its layer index: blocks.3.attn.qkv -> attn.qkv."""
    parts = name.split(".")
    numbered = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[numbered[-1] + 1 :]) if numbered else name


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attribute, module)


def _lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_adapters(model: nn.Module) -> bool:
    return bool(_lora_layers(model))


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Wrap every linear layer a target names in a LoRALinear and freeze all but the adapters, in place."""
    if has_adapters(model):
        raise GptlabError("the model already has LoRA adapters; merge them first (gptlab lora merge)")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen = set()
    for target in config.targets:
        matched = {name for name in linears if _matches(name, target)}
        if not matched:
            short = list(dict.fromkeys(_short_name(name) for name in linears))
            close = difflib.get_close_matches(target, short, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise GptlabError(
                f"LoRA target {target!r} matches no linear layer{hint}; the model's linear layers end in "
                f"{', '.join(short)}"
            )
        chosen |= matched
    model.requires_grad_(False)
    # In the model's own order, not the set's: the adapters' random initialisation must not depend on
    # string hashing, which differs from process to process (PYTHONHASHSEED).
    for name in (n for n in linears if n in chosen):
        _set_module(model, name, LoRALinear(linears[name], config.rank, config.alpha, config.dropout))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer, leaving a plain model with all parameters trainable again.

    A merged tied LM head gets its own weight (the embedding stays as it was), so the model's config
    is switched to `tie_embeddings=False`.
    """
    layers = _lora_layers(model)
    if not layers:
        raise GptlabError("the model has no LoRA adapters to merge")
    for name, layer in layers.items():
        _set_module(model, name, layer.merged())
    config = getattr(model, "config", None)
    if getattr(config, "tie_embeddings", False) and model.lm_head.weight is not model.token_embedding.weight:
        model.config = dataclasses.replace(config, tie_embeddings=False)
    return model.requires_grad_(True)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a LoRA run saves: the adapters, plus any parameter the caller unfroze (e.g. a new task head)."""
    if not _lora_layers(model):
        raise GptlabError("the model has no LoRA adapters; apply_lora first")
    # Activation checkpointing wraps blocks: their parameter names gain the wrapper's prefix, which the
    # state dict strips, so compare names without it.
    from gptlab.distributed import CHECKPOINT_WRAPPED

    trainable = {name.replace(f"{CHECKPOINT_WRAPPED}.", "") for name, p in model.named_parameters() if p.requires_grad}
    return {name: t for name, t in model.state_dict().items() if name.endswith(ADAPTER_SUFFIXES) or name in trainable}


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load tensors saved by `lora_state_dict` into a wrapped model; every adapter must be among them."""
    own = model.state_dict()
    for name, tensor in state.items():
        if name not in own:
            raise GptlabError(f"adapter file holds {name!r}, which the model lacks; were other LoRA targets used?")
        if tensor.shape != own[name].shape:
            raise GptlabError(
                f"{name!r} has shape {tuple(tensor.shape)}, the model's is {tuple(own[name].shape)}; "
                "was another LoRA rank or model size used?"
            )
    missing = [name for name in own if name.endswith(ADAPTER_SUFFIXES) and name not in state]
    if missing:
        raise GptlabError(f"adapter file lacks {missing[0]!r}; were other LoRA targets used?")
    model.load_state_dict(state, strict=False)


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, a tied weight counted once."""
    parameters = list(model.parameters())
    return sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters)


def linear_shapes(config: GPTConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of every linear layer of the GPT, by module name."""
    C = config.n_embd
    block = {"attn.qkv": (C, 3 * C), "attn.proj": (C, C), "mlp.fc": (C, 4 * C), "mlp.proj": (4 * C, C)}
    shapes = {f"blocks.{i}.{name}": shape for i in range(config.n_layer) for name, shape in block.items()}
    shapes["lm_head"] = (C, config.vocab_size)
    return shapes


def expected_lora_parameters(model_config: GPTConfig, lora_config: LoRAConfig) -> int:
    """Adapter parameters predicted by the rank: rank * (in + out) for every targeted layer."""
    return sum(
        lora_config.rank * (n_in + n_out)
        for name, (n_in, n_out) in linear_shapes(model_config).items()
        if any(_matches(name, target) for target in lora_config.targets)
    )


def merge_run(run: str | Path, out_dir: str | Path, which: str = "latest") -> Path:
    """Write a plain run to `out_dir` holding a LoRA run's model with its adapters merged; returns the checkpoint.

    The new run keeps the tokenizer and the run config, minus `lora` (and with an untied head if it was adapted).
    """
    from gptlab.checkpoint import CONFIG_FILE, load_run, load_trainer_state, save_checkpoint, write_run_config

    loaded = load_run(run, which=which)
    if not loaded.config.get("lora"):
        raise GptlabError(f"{loaded.run_dir} is not a LoRA run (no 'lora' in its {CONFIG_FILE}); nothing to merge")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise GptlabError(f"{out_dir} already exists and is not empty; choose a new run directory")
    model = merge_lora(loaded.model)
    config = {key: value for key, value in loaded.config.items() if key != "lora"}
    config["model"] = config_to_dict(model.config)
    if "out_dir" in config:
        config["out_dir"] = str(out_dir)
    loaded.tokenizer.save(out_dir / "tokenizer")
    write_run_config(out_dir, config)
    step = load_trainer_state(loaded.checkpoint).get("step", 0)
    return save_checkpoint(out_dir, step, model.state_dict(), {"step": step, "merged_from": str(loaded.checkpoint)})
