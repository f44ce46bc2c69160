"""Configs as dataclasses: the model, named presets, and helpers to read, write and override them.

Kept free of torch so that `gptlab --help` and `gptlab size` start instantly.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptlab.errors import GptlabError


@dataclass
class GPTConfig:
    """The shape of a GPT-2-style model."""

    vocab_size: int = field(default=50257, metadata={"help": "number of token ids the model knows"})
    context_length: int = field(default=1024, metadata={"help": "longest sequence the model attends over"})
    n_layer: int = field(default=12, metadata={"help": "number of transformer blocks"})
    n_head: int = field(default=12, metadata={"help": "attention heads per block"})
    n_embd: int = field(default=768, metadata={"help": "width of the residual stream"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on embeddings, attention and residuals"})
    qkv_bias: bool = field(default=True, metadata={"help": "bias on the fused query/key/value projection"})
    bias: bool = field(default=True, metadata={"help": "bias on the other linear layers and LayerNorms"})
    tie_embeddings: bool = field(default=True, metadata={"help": "share the LM head with the token embedding"})
    layer_norm_epsilon: float = field(default=1e-5, metadata={"help": "LayerNorm epsilon"})

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise GptlabError(f"model.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise GptlabError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head}); "
                f"try n_head={_nearest_divisor(self.n_embd, self.n_head)}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise GptlabError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.layer_norm_epsilon <= 0:
            raise GptlabError(f"model.layer_norm_epsilon must be positive, got {self.layer_norm_epsilon}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def _nearest_divisor(n: int, near: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: abs(d - near))


# Named model shapes. vocab_size of the small presets is a default: training sets it from the tokenizer.
# The GPT-3 rows follow Table 2.1 of "Language Models are Few-Shot Learners" (for sizing; GPT-3's
# alternating sparse attention is not modelled). Two paper rows are not self-consistent and are
# rounded to the nearest valid shape: 1.3B lists 24 heads of 128 for d_model 2048 (we use 16 heads),
# 13B lists d_model 5140 (we use 5120, as 40 heads of 128).
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    "gpt3-small": dict(n_layer=12, n_head=12, n_embd=768, context_length=2048),
    "gpt3-medium": dict(n_layer=24, n_head=16, n_embd=1024, context_length=2048),
    "gpt3-large": dict(n_layer=24, n_head=16, n_embd=1536, context_length=2048),
    "gpt3-xl": dict(n_layer=24, n_head=16, n_embd=2048, context_length=2048),
    "gpt3-2.7b": dict(n_layer=32, n_head=32, n_embd=2560, context_length=2048),
    "gpt3-6.7b": dict(n_layer=32, n_head=32, n_embd=4096, context_length=2048),
    "gpt3-13b": dict(n_layer=40, n_head=40, n_embd=5120, context_length=2048),
    "gpt3-175b": dict(n_layer=96, n_head=96, n_embd=12288, context_length=2048),
    # Small shapes for CPUs: tests, demos and the speed benchmarks.
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, context_length=64, vocab_size=512),
    "demo": dict(n_layer=4, n_head=4, n_embd=128, context_length=128, vocab_size=2048, qkv_bias=False),
    "char-small": dict(n_layer=4, n_head=4, n_embd=128, context_length=64, vocab_size=65),
    "bpe-mini": dict(n_layer=6, n_head=6, n_embd=384, context_length=256),
}

# The peak learning rates GPT-3's paper trained these sizes with (Table 2.1). A run whose model has one
# of these shapes (from the preset, or the run it continues) takes the rate unless it sets
# train.learning_rate; GPT-2's sizes take the GPT-3 row of about their size (GPT-2's paper gives none).
# Other shapes, the small CPU presets among them, keep TrainConfig's default.
PRESET_LEARNING_RATES: dict[str, float] = {
    "gpt2": 6.0e-4, "gpt3-small": 6.0e-4,  # 124-125M
    "gpt2-medium": 3.0e-4, "gpt3-medium": 3.0e-4,  # 350-355M
    "gpt2-large": 2.5e-4, "gpt3-large": 2.5e-4,  # 760-774M
    "gpt2-xl": 2.0e-4, "gpt3-xl": 2.0e-4,  # 1.3-1.6B
    "gpt3-2.7b": 1.6e-4, "gpt3-6.7b": 1.2e-4, "gpt3-13b": 1.0e-4, "gpt3-175b": 0.6e-4,
}  # fmt: skip


def published_learning_rate(model: GPTConfig) -> float | None:
    """The PRESET_LEARNING_RATES rate of the preset with this model's depth and width (its size; the
    number of heads does not change it), if any."""
    for name, rate in PRESET_LEARNING_RATES.items():
        if (model.n_layer, model.n_embd) == (PRESETS[name]["n_layer"], PRESETS[name]["n_embd"]):
            return rate
    return None


def get_preset(name: str, **overrides: Any) -> GPTConfig:
    """The GPTConfig of a named preset, with fields overridden."""
    if name not in PRESETS:
        raise GptlabError(f"unknown model preset {name!r}{_suggest(name, PRESETS)}; known: {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


@dataclass
class DataConfig:
    """Where the training text comes from and how it is tokenized and batched."""

    source: str = field(
        default="", metadata={"help": "text file, folder, .jsonl, or named data set; empty: the embedded default"}
    )
    tokenizer: str = field(default="bpe", metadata={"help": "tokenizer kind: gpt2, bpe or byte"})
    vocab_size: int = field(default=2048, metadata={"help": "vocabulary size of a trained bpe tokenizer"})
    val_fraction: float = field(default=0.1, metadata={"help": "share of the corpus held out for validation"})
    sampler: str = field(default="random", metadata={"help": "random windows or sequential (the book's stride)"})
    stride: int | None = field(default=None, metadata={"help": "sequential sampler step; default: context length"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})
    encoding_errors: str = field(
        default="strict", metadata={"help": "invalid UTF-8 in the corpus: strict (stop and say where) or replace"}
    )


@dataclass
class TrainConfig:
    """The training loop: optimisation, schedule, evaluation, checkpoints and devices."""

    max_steps: int = field(default=800, metadata={"help": "optimizer steps to train"})
    batch_size: int = field(default=16, metadata={"help": "sequences per micro-batch"})
    tokens_per_step: int | None = field(
        default=None, metadata={"help": "target tokens per optimizer step (gradient accumulation); default: one batch"}
    )
    learning_rate: float = field(
        default=2e-3,
        metadata={
            "help": "peak learning rate (models of GPT-2's and GPT-3's shapes: GPT-3's published rate for the size)"
        },
    )
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decay floor as a fraction of the peak"})
    warmup_steps: int = field(default=40, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay on matrices"})
    decay_embeddings: bool = field(default=True, metadata={"help": "apply weight decay to embeddings too"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    optimizer: str = field(
        default="adamw",
        metadata={"help": "adamw, or muon: Muon for the blocks' weight matrices, AdamW for the rest"},
    )
    muon_learning_rate: float = field(
        default=0.02, metadata={"help": "Muon's peak learning rate (scheduled like learning_rate)"}
    )
    muon_momentum: float = field(default=0.95, metadata={"help": "Muon's Nesterov momentum"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0: off)"})
    eval_interval: int = field(default=200, metadata={"help": "evaluate every N steps"})
    eval_batches: int = field(default=20, metadata={"help": "validation batches per evaluation"})
    log_interval: int = field(default=10, metadata={"help": "print progress every N steps"})
    checkpoint_interval: int = field(default=0, metadata={"help": "checkpoint every N steps (0: at evaluations)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept besides the best"})
    sample_prompts: list[str] = field(
        default_factory=lambda: ["The"], metadata={"help": "prompts sampled at each evaluation"}
    )
    sample_tokens: int = field(default=40, metadata={"help": "tokens generated per sample"})
    seed: int = field(default=1337, metadata={"help": "seed for weights, data order and sampling"})
    device: str = field(default="auto", metadata={"help": "auto (cuda, then mps, then cpu), cpu, cuda, mps"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 autocast on CUDA), fp32 or bf16"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    threads: int = field(default=0, metadata={"help": "CPU threads (0: all physical cores)"})
    peak_flops: float = field(default=0.0, metadata={"help": "device peak FLOP/s for MFU (0: measure once)"})
    parallel: str = field(
        default="auto",
        metadata={"help": "under torchrun: ddp (replicas) or fsdp (sharded weights, gradients, optimizer); auto: ddp"},
    )
    activation_checkpointing: bool = field(
        default=False, metadata={"help": "recompute each block's activations in backward: less memory, more compute"}
    )


@dataclass
class GenerationConfig:
    """How text is decoded: length, sampling strategy, stopping, and long prompts (see gptlab.generate)."""

    max_new_tokens: int = field(default=100, metadata={"help": "most tokens generated per prompt"})
    temperature: float = field(default=0.8, metadata={"help": "divides the logits before sampling (0: greedy)"})
    top_k: int | None = field(default=None, metadata={"help": "sample only among the k most likely tokens"})
    top_p: float = field(default=1.0, metadata={"help": "sample from the smallest set holding this probability"})
    min_p: float = field(default=0.0, metadata={"help": "drop tokens below this fraction of the top probability"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "above 1 discourages tokens already seen"})
    seed: int | None = field(default=None, metadata={"help": "seed for reproducible sampling (none: torch's RNG)"})
    stop: list[str] = field(default_factory=list, metadata={"help": "strings that end generation (not included)"})
    stop_at_eot: bool = field(default=True, metadata={"help": "end generation at <|endoftext|>"})
    prompt_overflow: str = field(
        default="truncate",
        metadata={"help": "prompt longer than the context: truncate (keep the end, warn) or error"},
    )
    use_cache: bool = field(default=True, metadata={"help": "decode with the KV cache (off: recompute every step)"})
    batch_size: int = field(default=16, metadata={"help": "prompts decoded together in one forward pass"})

    def __post_init__(self) -> None:
        if isinstance(self.stop, (str, tuple)):  # one stop string (not its characters), or a tuple of them
            self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        check_field_types(self)
        for name in ("max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if value < 1:
                raise GptlabError(f"{name} must be a positive integer, got {value!r}")
        if self.seed is not None and not 0 <= self.seed < 2**63:  # what torch's generators take, with room for seed + i
            raise GptlabError(f"seed must be from 0 to 2**63 - 1, got {self.seed}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise GptlabError(f"temperature must be >= 0 (0 means greedy) and finite, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise GptlabError(f"top_k must be at least 1 (or none for all tokens), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GptlabError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise GptlabError(f"min_p must be in [0, 1), got {self.min_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise GptlabError(f"repetition_penalty must be positive and finite (1: off), got {self.repetition_penalty}")
        if self.prompt_overflow not in ("truncate", "error"):
            raise GptlabError(f"prompt_overflow must be 'truncate' or 'error', got {self.prompt_overflow!r}")
        if any(not s for s in self.stop):
            raise GptlabError("stop strings must not be empty")


@dataclass
class LoRAConfig:
    """Low-rank adapters on the model's linear layers (see gptlab.lora)."""

    rank: int = field(default=8, metadata={"help": "rank r of each adapter's A (r x in) and B (out x r)"})
    alpha: float = field(default=16.0, metadata={"help": "the adapter's output is scaled by alpha / rank"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input"})
    targets: list[str] = field(
        default_factory=lambda: ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"],
        metadata={"help": "linear layers to adapt, by name suffix: attn.qkv, attn.proj, mlp.fc, mlp.proj, lm_head"},
    )

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise GptlabError(f"lora.rank must be a positive integer, got {self.rank!r}")
        if self.alpha <= 0:
            raise GptlabError(f"lora.alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise GptlabError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise GptlabError("lora.targets is empty; name at least one linear layer, e.g. attn.qkv")


CLASSIFY_CHOICES = {
    "format": ("auto", "tsv", "csv", "jsonl"),
    "balance": ("none", "downsample", "class_weights"),
    "trainable": ("head", "last_blocks", "all", "lora"),
    "pooling": ("last", "mean"),
}


@dataclass
class ClassifyConfig:
    """Text classification (see gptlab.classify): the labelled data, its split, and what finetuning trains."""

    source: str = field(default="sms-spam", metadata={"help": "a .tsv, .csv or .jsonl file, or a named data set"})
    format: str = field(default="auto", metadata={"help": "auto (by extension, else sniffed), tsv, csv or jsonl"})
    columns: list[str] = field(
        default_factory=list, metadata={"help": "column names of a file without a header row, in order"}
    )
    text_column: str = field(default="text", metadata={"help": "the column (or JSON key) holding the text"})
    label_column: str = field(default="label", metadata={"help": "the column (or JSON key) holding the label"})
    labels: list[str] = field(
        default_factory=list, metadata={"help": "label names in id order (empty: the data's labels, sorted)"}
    )
    balance: str = field(
        default="none",
        metadata={"help": "none, downsample (every label to the rarest's count) or class_weights (in the loss)"},
    )
    split: list[float] = field(
        default_factory=lambda: [0.7, 0.1, 0.2], metadata={"help": "train, validation and test fractions"}
    )
    split_seed: int = field(default=123, metadata={"help": "seed of the down-sampling and the split"})
    trainable: str = field(
        default="last_blocks", metadata={"help": "what trains besides the new head: head, last_blocks, all or lora"}
    )
    last_blocks: int = field(default=1, metadata={"help": "blocks trained (with the final norm) for last_blocks"})
    pooling: str = field(
        default="last", metadata={"help": "last (the last real token's output) or mean (over real tokens)"}
    )
    max_length: int = field(default=0, metadata={"help": "truncate texts to this many tokens (0: the context)"})

    def __post_init__(self) -> None:
        for name, choices in CLASSIFY_CHOICES.items():
            if getattr(self, name) not in choices:
                raise GptlabError(
                    f"classify.{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}"
                    f"{_suggest(str(getattr(self, name)), choices)}"
                )
        _check_split(self.split, "classify")
        if self.last_blocks < 1:
            raise GptlabError(f"classify.last_blocks must be at least 1, got {self.last_blocks}")
        if self.max_length < 0:
            raise GptlabError(f"classify.max_length must be 0 (the context) or positive, got {self.max_length}")
        if len(set(self.labels)) != len(self.labels):
            raise GptlabError(f"classify.labels names a label twice: {self.labels}")


def _check_split(split: list[float], section: str) -> None:
    if len(split) != 3 or min(split) <= 0 or abs(sum(split) - 1) > 1e-6:
        raise GptlabError(
            f"{section}.split must be three fractions above 0 (train, validation, test) summing to 1, got {split}"
        )


@dataclass
class RecordsConfig:
    """What instruction and preference finetuning share: JSON records, their split, truncation, what trains."""

    SECTION: typing.ClassVar[str] = "instruct"  # the config section, for error messages

    source: str = field(
        default="instruction-data",
        metadata={"help": "JSON list or JSON lines of Alpaca-style or chat records, or a named data set"},
    )
    split: list[float] = field(
        default_factory=lambda: [0.85, 0.05, 0.10], metadata={"help": "train, validation and test fractions"}
    )
    split_seed: int = field(default=123, metadata={"help": "seed of the shuffle before the split"})
    bucketing: bool = field(default=False, metadata={"help": "batch examples of similar length (less padding)"})
    max_length: int = field(default=0, metadata={"help": "truncate examples to this many tokens (0: the context)"})
    trainable: str = field(default="all", metadata={"help": "all (full finetuning) or lora (adapters only)"})
    response_tokens: int = field(default=256, metadata={"help": "most tokens generated per test-split response"})

    def __post_init__(self) -> None:
        section = self.SECTION
        _check_split(self.split, section)
        if self.trainable not in ("all", "lora"):
            raise GptlabError(
                f"{section}.trainable must be all or lora, got {self.trainable!r}"
                f"{_suggest(self.trainable, ('all', 'lora'))}"
            )
        if self.max_length < 0:
            raise GptlabError(f"{section}.max_length must be 0 (the context) or positive, got {self.max_length}")
        if self.response_tokens < 1:
            raise GptlabError(f"{section}.response_tokens must be at least 1, got {self.response_tokens}")


@dataclass
class InstructConfig(RecordsConfig):
    """Instruction finetuning (see gptlab.instruct): the records, their split, the loss mask and batching.

    The prompt template is the run's top-level `template` field, so generate, chat and serve find it.
    """

    mask_prompt: bool = field(default=True, metadata={"help": "train on the response tokens only (not the prompt)"})


@dataclass
class PreferenceConfig(RecordsConfig):
    """Preference tuning with DPO (see gptlab.preference): records with a chosen and a rejected response."""

    SECTION: typing.ClassVar[str] = "preference"

    source: str = field(
        default="instruction-preference",
        metadata={"help": "JSON list or JSON lines of instruction or chat records with 'chosen' and 'rejected'"},
    )
    beta: float = field(
        default=0.1, metadata={"help": "DPO's beta: how far the model may move from the reference (higher: less)"}
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "assumed share of wrong preference labels (conservative DPO), below 0.5"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta <= 0:
            raise GptlabError(f"preference.beta must be above 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise GptlabError(f"preference.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


# ---------------------------------------------------------------- dataclass helpers


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def config_to_dict(config: Any) -> dict[str, Any]:
    """A plain, YAML-serialisable dict of a (nested) config dataclass."""
    return dataclasses.asdict(config)


def config_from_dict(cls: type, values: dict[str, Any], where: str = "", source: str = "") -> Any:
    """Build dataclass `cls` from a dict, refusing unknown fields (with a suggestion) and values of the
    wrong type; `where` ("train.") and `source` (a file) place a field in error messages."""
    return cls(**field_values(cls, values, where, source))


def field_values(cls: type, values: dict[str, Any], where: str = "", source: str = "") -> dict[str, Any]:
    """`values` with every field's value converted to the field's type by `to_field_type`."""
    if not isinstance(values, dict):
        raise GptlabError(
            f"config section {where.rstrip('.')!r}{_in(source)} must be a mapping of fields, got {values!r}"
        )
    known = {f.name for f in dataclasses.fields(cls)}
    converted = {}
    for key, value in values.items():
        if key not in known:
            raise GptlabError(f"unknown config field {where}{key}{_in(source)}{_suggest(str(key), known)}")
        hint = _field_type(cls, key)
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            converted[key] = config_from_dict(hint, value, where=f"{where}{key}.", source=source)
        else:
            converted[key] = to_field_type(hint, value, f"{where}{key}", source)
    return converted


def _field_type(cls: type, name: str) -> Any:
    hints = typing.get_type_hints(cls)
    return hints[name]


def _in(source: str) -> str:
    return f" in {source}" if source else ""


def parse_value(cls: type, name: str, text: str, where: str = "") -> Any:
    """Turn the command-line text for field `name` of `cls` into the field's type."""
    return to_field_type(_field_type(cls, name), text, f"{where}{name}")


def to_field_type(hint: Any, value: Any, name: str, source: str = "") -> Any:
    """`value` (command-line text, or what a config file holds) as a field of type `hint`, else a one-line
    error naming field `name`, the value and the type expected."""
    try:
        return _convert(hint, value)
    except ValueError:
        raise GptlabError(f"invalid value {value!r} for {name}{_in(source)}: it must be {_describe(hint)}") from None


# The words for a type in error messages: (one value, several).
_TYPE_WORDS = {
    int: ("a whole number", "whole numbers"),
    float: ("a finite number", "finite numbers"),
    bool: ("true or false", "true/false values"),
    str: ("text", "texts"),
}


def _convert(hint: Any, value: Any) -> Any:
    """`value` as type `hint`, or ValueError. Text is read as the command line reads it, so YAML's `1e-3`
    (text to YAML 1.1) is a float and a list field takes comma-separated text; a number is read from its
    text too (3.7 is no whole number); true/false fits only a true/false field (bool is an int subclass,
    and YAML reads yes/no/on/off as booleans); a YAML list converts item by item."""
    optional, hint = _split_optional(hint)
    if optional and (value is None or isinstance(value, str) and value.lower() in ("none", "null", "")):
        return None
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint) or (str,)
        if isinstance(value, str):
            return [_convert(item, part) for part in value.split(",") if part != ""]
        if not isinstance(value, list):
            raise ValueError(value)
        return [_convert(item, part) for part in value]
    if not isinstance(value, (str, int, float)) or isinstance(value, bool) and hint is not bool:
        raise ValueError(value)
    text = str(value)
    if hint is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(text)
    if hint is float:
        number = float(text)
        if not math.isfinite(number):  # no field means anything by nan or inf; they fail later, far from here
            raise ValueError(text)
        return number
    if hint in (int, str):
        return hint(text)
    return value


def check_field_types(config: Any) -> None:
    """Refuse a dataclass config built in Python with a field of the wrong type (`top_k=2.5`, `seed="1"`)
    by name, before it fails far away; a whole number passes for a float. Values read from YAML or the
    command line are converted already (`to_field_type`)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, hint = getattr(config, f.name), hints[f.name]
        if not _has_type(hint, value):
            raise GptlabError(f"{f.name} must be {_describe(hint, command_line=False)}, got {value!r}")


def _has_type(hint: Any, value: Any) -> bool:
    optional, hint = _split_optional(hint)
    if value is None:
        return optional
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint) or (str,)
        return isinstance(value, list) and all(_has_type(item, part) for part in value)
    if hint is float:  # numpy's numbers too
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _split_optional(hint: Any) -> tuple[bool, Any]:
    """(whether None is allowed, the type without None) of a field's type hint."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return True, args[0]
    return False, hint


def _describe(hint: Any, command_line: bool = True) -> str:
    optional, hint = _split_optional(hint)
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint) or (str,)
        words = f"a list of {_TYPE_WORDS[item][1]}" + (
            " (or one text of them, comma-separated)" if command_line else ""
        )
    else:
        words = _TYPE_WORDS.get(hint, (getattr(hint, "__name__", str(hint)),))[0]
    return words + (" or none" if optional else "")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (or JSON) config file into a dict."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise GptlabError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise GptlabError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise GptlabError(f"config file {path} must hold a mapping of fields, got {type(data).__name__}")
    return data


def dump_yaml(values: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(values, sort_keys=False)


# ---------------------------------------------------------------- run configs


def section_types() -> dict[str, type]:
    """The config sections a run may hold, by name; each finetuning mode adds its section here."""
    sections: dict[str, type] = {"model": GPTConfig, "data": DataConfig, "train": TrainConfig}
    sections["lora"] = LoRAConfig
    sections["classify"] = ClassifyConfig
    sections["instruct"] = InstructConfig
    sections["preference"] = PreferenceConfig
    return sections


# Top-level run fields besides the sections.
RUN_FIELDS: dict[str, str] = {
    "task": "what the run trains: pretrain, classify, instruct or preference",
    "preset": "named model shape the model section starts from (see `gptlab size`)",
    "out_dir": "run directory to write",
    "init_from": "run or checkpoint whose weights start training (continued pretraining, finetuning)",
    "template": "prompt template of an instruction-tuned run (alpaca, chat); generate, chat and serve reuse it",
}


def check_run_values(values: dict[str, Any], source: str = "") -> dict[str, Any]:
    """A run config's values with every field converted to its type (`to_field_type`: text as on the
    command line), unknown names refused; `source`, the file they come from, for error messages."""
    types_by_name = section_types()
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if key in RUN_FIELDS:
            checked[key] = to_field_type(str | None, value, key, source)
        elif key in types_by_name:
            checked[key] = field_values(types_by_name[key], {} if value is None else value, f"{key}.", source)
        else:
            known = [*RUN_FIELDS, *types_by_name]
            raise GptlabError(f"unknown config field {key}{_in(source)}{_suggest(str(key), known)}")
    return checked


def load_run_config(path: str | Path) -> dict[str, Any]:
    """A run config file (a recipe), its fields checked and converted to their types (errors name the file)."""
    return check_run_values(load_config_file(path), source=str(path))


# What each task's run starts from before a recipe and options. The dataclasses' defaults are pretraining's;
# finetuning moves a trained model little, with a shorter schedule and a lower learning rate of its own.
# DPO also turns dropout off unless asked for: with it, the policy at step 0 would already differ from the
# reference. Each command's --help shows these.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    # With no arguments `gptlab pretrain` is the demo (recipes/demo.yaml says the same).
    "pretrain": {"task": "pretrain", "out_dir": "runs/pretrain", "preset": "demo"},
    "classify": {
        "task": "classify", "out_dir": "runs/classify",
        "train": {"max_steps": 500, "batch_size": 8, "learning_rate": 5e-5, "warmup_steps": 20, "eval_interval": 50,
                  "eval_batches": 10, "log_interval": 10, "sample_prompts": []},
    },
    "instruct": {
        "task": "instruct", "out_dir": "runs/instruct",
        "train": {"max_steps": 300, "batch_size": 8, "learning_rate": 3e-4, "warmup_steps": 20, "eval_interval": 50,
                  "log_interval": 10, "sample_tokens": 60, "sample_prompts": []},
    },
    "preference": {
        "task": "preference", "out_dir": "runs/preference", "model": {"dropout": 0.0},
        "train": {"max_steps": 120, "batch_size": 8, "learning_rate": 5e-5, "warmup_steps": 10, "eval_interval": 40,
                  "log_interval": 10, "sample_tokens": 60, "weight_decay": 0.01, "sample_prompts": []},
    },
}  # fmt: skip

# The command that trains (and resumes) each task's runs.
TASK_COMMANDS = {
    "pretrain": "gptlab pretrain",
    "classify": "gptlab finetune classify",
    "instruct": "gptlab finetune instruct",
    "preference": "gptlab finetune preference",
}


def check_task(values: dict[str, Any], task: str) -> None:
    """Refuse a run config whose `task` is another than the one being trained (a recipe given to the
    wrong command): its run would be recorded as a run it is not."""
    found = values.get("task") or task
    if found != task:
        how = f"; train it with `{TASK_COMMANDS[found]}`" if found in TASK_COMMANDS else ""
        raise GptlabError(f"the config's task is {found}, but this command trains {task} runs{how}")


# What a finetuning run may change of its base run's model: the other fields shape the weights it
# loads, or change what they compute.
FINETUNE_MODEL_FIELDS = ("dropout",)


def finetuning_model_values(base: dict[str, Any], given: dict[str, Any] | None, base_name: str) -> dict[str, Any]:
    """The model fields of a finetuning run: its base run's, with the changes it may make."""
    for name, value in (given or {}).items():
        if name not in FINETUNE_MODEL_FIELDS and name in base and value != base[name]:
            allowed = ", ".join(f"model.{field}" for field in FINETUNE_MODEL_FIELDS)
            raise GptlabError(
                f"model.{name} is {value!r} but {base[name]!r} in the base run {base_name}, whose weights fix it; "
                f"a finetuning run may change only {allowed}"
            )
    return {**base, **(given or {})}


def resolve_run_config(values: dict[str, Any], sections: list[str]) -> dict[str, Any]:
    """Validate a run config dict: every section becomes its dataclass, unknown fields are refused.

    The model section starts from `preset` (if any) and is overridden field by field; the train
    section's learning rate defaults to the published one of models of GPT-2's and GPT-3's shapes.
    """
    types_by_name = section_types()
    values = check_run_values(values)
    resolved: dict[str, Any] = {key: value for key, value in values.items() if key in RUN_FIELDS}
    sections = sorted(sections, key=lambda name: name != "model")  # the train section's default needs the model
    for name in sections:
        section = dict(values.get(name) or {})
        if name == "model":
            preset = values.get("preset")
            base = dict(PRESETS[preset]) if preset in PRESETS else {}
            if preset and preset not in PRESETS:
                get_preset(preset)  # raises the unknown-preset error with a suggestion
            section = {**base, **section}
        if name == "train" and "model" in resolved and "learning_rate" not in section:
            rate = published_learning_rate(resolved["model"])
            if rate:
                section["learning_rate"] = rate
        resolved[name] = config_from_dict(types_by_name[name], section, where=f"{name}.")
    return resolved


def run_config_to_dict(config: dict[str, Any]) -> dict[str, Any]:
    return {k: (config_to_dict(v) if dataclasses.is_dataclass(v) else v) for k, v in config.items()}


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields whose values differ between two config dicts."""
    names = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            names += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            names.append(f"{prefix}{key} ({a!r} -> {b!r})")
    return names


def set_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    """values['train']['max_steps'] = value for dotted 'train.max_steps'."""
    *parents, leaf = dotted.split(".")
    node = values
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
