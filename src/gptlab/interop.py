"""Interoperability with Hugging Face transformers' GPT-2 layout: state-dict conversion both ways.

transformers stores GPT-2's linear layers as `Conv1D` with weights shaped (in, out); ours are
`nn.Linear`, shaped (out, in), so every matrix is transposed on the way through.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from gptlab.config import GPTConfig
from gptlab.errors import GptlabError

# (our name, transformers' name, transposed?) for one block; `{i}` is the block index.
_BLOCK_NAMES = [
    ("ln_1.weight", "ln_1.weight", False),
    ("ln_1.bias", "ln_1.bias", False),
    ("attn.qkv.weight", "attn.c_attn.weight", True),
    ("attn.qkv.bias", "attn.c_attn.bias", False),
    ("attn.proj.weight", "attn.c_proj.weight", True),
    ("attn.proj.bias", "attn.c_proj.bias", False),
    ("ln_2.weight", "ln_2.weight", False),
    ("ln_2.bias", "ln_2.bias", False),
    ("mlp.fc.weight", "mlp.c_fc.weight", True),
    ("mlp.fc.bias", "mlp.c_fc.bias", False),
    ("mlp.proj.weight", "mlp.c_proj.weight", True),
    ("mlp.proj.bias", "mlp.c_proj.bias", False),
]
_TOP_NAMES = [
    ("token_embedding.weight", "wte.weight"),
    ("position_embedding.weight", "wpe.weight"),
    ("ln_f.weight", "ln_f.weight"),
    ("ln_f.bias", "ln_f.bias"),
]


def name_pairs(config: GPTConfig):
    """Yield (our name, transformers' name without the `transformer.` prefix, transposed?) for a config."""
    for ours, theirs in _TOP_NAMES:
        if ours.endswith("bias") and not config.bias:
            continue
        yield ours, theirs, False
    for i in range(config.n_layer):
        for ours, theirs, transposed in _BLOCK_NAMES:
            if ours.endswith("bias") and not (config.qkv_bias if ours.startswith("attn.qkv") else config.bias):
                continue
            yield f"blocks.{i}.{ours}", f"h.{i}.{theirs}", transposed


def state_dict_from_hf(hf_state: Mapping[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Convert a transformers GPT2LMHeadModel / GPT2Model state dict into gptlab's GPT state dict.

    Accepts keys with or without the `transformer.` prefix (the published checkpoints have none).
    Tensors are read one at a time from `hf_state`, so a lazy mapping keeps memory low.
    """
    prefix = "transformer." if any(k.startswith("transformer.") for k in hf_state.keys()) else ""
    ours: dict[str, torch.Tensor] = {}
    for our_name, hf_name, transposed in name_pairs(config):
        key = prefix + hf_name
        if key not in hf_state:
            raise GptlabError(f"GPT-2 weights are missing tensor {key!r}; the checkpoint is incomplete or not GPT-2")
        tensor = hf_state[key]
        if transposed:
            tensor = tensor.t()
        ours[our_name] = tensor.contiguous()
    if config.tie_embeddings:
        ours["lm_head.weight"] = ours["token_embedding.weight"]
    else:
        if "lm_head.weight" not in hf_state:
            raise GptlabError("GPT-2 weights are missing tensor 'lm_head.weight' for an untied LM head")
        ours["lm_head.weight"] = hf_state["lm_head.weight"]
    check_shapes(ours, config)
    return ours


def state_dict_to_hf(state: Mapping[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Convert gptlab's GPT state dict into transformers' GPT2LMHeadModel layout."""
    hf: dict[str, torch.Tensor] = {}
    for our_name, hf_name, transposed in name_pairs(config):
        tensor = state[our_name]
        hf["transformer." + hf_name] = (tensor.t() if transposed else tensor).contiguous()
    hf["lm_head.weight"] = state["token_embedding.weight" if config.tie_embeddings else "lm_head.weight"]
    return hf


def expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of gptlab's GPT for a config."""
    C, V = config.n_embd, config.vocab_size
    block = {
        "ln_1.weight": (C,), "ln_1.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
        "attn.qkv.weight": (3 * C, C), "attn.qkv.bias": (3 * C,),
        "attn.proj.weight": (C, C), "attn.proj.bias": (C,),
        "mlp.fc.weight": (4 * C, C), "mlp.fc.bias": (4 * C,),
        "mlp.proj.weight": (C, 4 * C), "mlp.proj.bias": (C,),
    }  # fmt: skip
    shapes = {
        "token_embedding.weight": (V, C),
        "position_embedding.weight": (config.context_length, C),
        "ln_f.weight": (C,),
        "ln_f.bias": (C,),
        "lm_head.weight": (V, C),
    }
    for i in range(config.n_layer):
        shapes.update({f"blocks.{i}.{name}": shape for name, shape in block.items()})
    return shapes


def check_shapes(state: Mapping[str, torch.Tensor], config: GPTConfig) -> None:
    """Raise a one-line error naming the first tensor whose shape does not fit the config."""
    shapes = expected_shapes(config)
    for name, tensor in state.items():
        want = shapes.get(name)
        if want is not None and tuple(tensor.shape) != want:
            raise GptlabError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, but the config needs {want}; "
                "the weights belong to a different model size"
            )
